"""Scheduler-side Celery tasks (queue "scheduler"): thin wrappers."""
from celery import shared_task


@shared_task(name="jobs.dispatch", ignore_result=True)
def dispatch_task() -> list[int]:
    from jobs.scheduler import dispatch

    return dispatch().placed


@shared_task(name="jobs.reap", ignore_result=True)
def reap_task() -> dict:
    from jobs.scheduler import reap

    return reap()
