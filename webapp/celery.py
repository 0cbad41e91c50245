"""The Celery app: broker settings come from Django settings (CELERY_*), tasks
from jobs.tasks (scheduler side) and neuron_workers.tasks (host side)."""
from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

app = Celery("neurondeck")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["jobs", "neuron_workers"])


def _beat_schedule() -> dict:
    from django.conf import settings

    return {
        # periodic: a full run even when the fleet is full (it writes new jobs' reasons).
        "dispatch": {"task": "jobs.dispatch", "schedule": float(settings.DISPATCH_EVERY_S),
                     "kwargs": {"periodic": True}},
        "reap": {"task": "jobs.reap", "schedule": float(settings.REAP_EVERY_S)},
        # expires: a run the estimator could not start within the interval is dropped (the next one comes)
        "estimate-starts": {"task": "jobs.estimate_starts", "schedule": float(settings.ESTIMATES_EVERY_S),
                            "options": {"expires": float(settings.ESTIMATES_EVERY_S)}},
        "rollup-metrics": {"task": "jobs.rollup_metrics", "schedule": 60.0},
        "prune-metrics": {"task": "jobs.prune_metrics", "schedule": 3600.0},
        "rollup-usage": {"task": "jobs.rollup_usage", "schedule": 60.0},
        "notify-sweep": {"task": "jobs.notify_sweep", "schedule": float(settings.NOTIFY_SWEEP_S)},
        "notify-scan": {"task": "jobs.notify_scan", "schedule": 60.0},
        "endpoints-reconcile": {"task": "jobs.endpoints_reconcile",
                                "schedule": float(settings.ENDPOINT_RECONCILE_S)},
    }


app.conf.beat_schedule = _beat_schedule()


# Celery 5.5 with the threads pool (what host workers use) acknowledges a message in
# the pool thread, and nothing wakes the worker's event loop afterwards: once the
# prefetch window is full, the loop sleeps until its next timer (seconds) before
# fetching again (celery/celery#6941), which holds back job starts in a burst. A
# no-op timer bounds that wait; 50 ms keeps bursts flowing at a small idle cost
# (a shorter period costs CPU that a training job on the same cores would feel).
WAKE_THREADS_POOL_S = 0.05


@worker_ready.connect
def _wake_threads_pool_loop(sender=None, **_kwargs) -> None:
    from celery.concurrency.thread import TaskPool

    if isinstance(getattr(sender, "pool", None), TaskPool) and getattr(sender, "timer", None) is not None:
        sender.timer.call_repeatedly(WAKE_THREADS_POOL_S, lambda: None)
