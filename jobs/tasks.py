"""Scheduler-side Celery tasks (queue "scheduler"): thin wrappers."""
from celery import shared_task


@shared_task(name="jobs.dispatch", ignore_result=True)
def dispatch_task(periodic: bool = False) -> list[int]:
    from jobs.lifecycle.scheduler import dispatch_kicked

    return dispatch_kicked(periodic).placed


@shared_task(name="jobs.reap", ignore_result=True)
def reap_task() -> dict:
    from jobs.lifecycle.scheduler import reap

    return reap()


@shared_task(name="jobs.estimate_starts", ignore_result=True)
def estimate_starts_task() -> dict:
    """Every pending job's start-time estimate, stored for pages and the API."""
    from jobs.lifecycle.forecasts import store

    return store()


@shared_task(name="jobs.rollup_usage", ignore_result=True)
def rollup_usage_task() -> dict:
    """Fold usage up to a few minutes ago into the usage roll-ups (jobs.usage_rollup)."""
    from jobs.usage.rollup import fold

    return fold().as_dict()


@shared_task(name="jobs.rollup_metrics", ignore_result=True)
def rollup_metrics_task() -> dict:
    """Aggregate complete minutes of the live metric streams into MetricMinute."""
    from dataclasses import asdict

    from jobs.live.metrics import rollup

    return asdict(rollup())


@shared_task(name="jobs.prune_metrics", ignore_result=True)
def prune_metrics_task() -> dict:
    """Drop rolled-up raw stream data: finished jobs' streams and entries older than an hour."""
    from dataclasses import asdict

    from jobs.live.metrics import prune

    return asdict(prune())


@shared_task(name="jobs.notify_deliver", ignore_result=True)
def notify_deliver_task(pairs: list[list[int]]) -> dict:
    """Attempt deliveries: [[delivery id, ticket], ...] (jobs.notify.delivery)."""
    from jobs.notify.delivery import deliver

    return deliver(pairs)


@shared_task(name="jobs.notify_sweep", ignore_result=True)
def notify_sweep_task() -> int:
    """Send due deliveries (retries, lost kicks) to the notify queue."""
    from jobs.notify.delivery import sweep

    return sweep()



@shared_task(name="jobs.notify_scan", ignore_result=True)
def notify_scan_task() -> dict:
    """Once a minute: long waits, idle cores (and the stop policy), budget thresholds."""
    from jobs.lifecycle.watch import scan

    return scan()


@shared_task(name="jobs.endpoints_reconcile", ignore_result=True)
def endpoints_reconcile_task() -> dict:
    """Every few seconds: autoscale endpoints on measured load, then make their
    replicas follow (start, replace, roll out, drain, stop) and republish routes."""
    from jobs.endpoints.reconcile import reconcile_all

    return reconcile_all()


@shared_task(name="jobs.endpoint_wake", ignore_result=True)
def endpoint_wake_task(endpoint_id: int) -> None:
    """A request reached an endpoint with no ready replica (scaled to zero): start one now."""
    from jobs.endpoints.reconcile import wake

    wake(endpoint_id)
