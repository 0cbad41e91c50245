"""The Celery app: broker settings come from Django settings (CELERY_*), tasks
from jobs.tasks (scheduler side) and neuron_workers.tasks (host side)."""
from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

app = Celery("neurondeck")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["jobs", "neuron_workers"])


def _beat_schedule() -> dict:
    from django.conf import settings

    return {
        "dispatch": {"task": "jobs.dispatch", "schedule": float(settings.DISPATCH_EVERY_S)},
        "reap": {"task": "jobs.reap", "schedule": float(settings.REAP_EVERY_S)},
        "rollup-metrics": {"task": "jobs.rollup_metrics", "schedule": 60.0},
        "prune-metrics": {"task": "jobs.prune_metrics", "schedule": 3600.0},
        "rollup-usage": {"task": "jobs.rollup_usage", "schedule": 60.0},
    }


app.conf.beat_schedule = _beat_schedule()
