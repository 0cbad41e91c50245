"""One replica's life as the control plane sees it: started as a Job of kind serve,
reported ready by its worker, drained, stopped. Replica.state changes only here.

A replica is a job: the scheduler places it (contiguous cores, the team's quota:
never preempted within the guarantee; a borrowed one may be, after a drain:
replica_preempted), the worker runs it
(neuron_workers.execution), usage counts its attempts. It has no time limit
(max_runtime_s = NO_TIME_LIMIT) and one attempt: a crash fails the job and the
reconciler starts a new replica in its place."""
from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.dispatch import receiver
from django.utils import timezone

from jobs.lifecycle import signals, states
from jobs.endpoints.timeline import endpoint_event
from jobs.models import Endpoint, EndpointEvent, EndpointRevision, Job, Kind, Replica
from jobs.quotas.backfill import NO_TIME_LIMIT

R = Replica.State
S = Job.Status
# A replica's reports, as {"event": "serve_ready", "url": …} or {"replica": "ready", "url": …}.
REPORTS = {"serve_ready": "ready", "ready": "ready", "serve_draining": "draining", "draining": "draining"}


def replica_start(endpoint: Endpoint, revision: EndpointRevision, *, user) -> Replica:
    """A pending job of kind serve and its Replica row (the scheduler is kicked after commit)."""
    from jobs.wake import kick_dispatch

    job = Job.objects.create(
        team_id=endpoint.team_id, user=user, kind=Kind.SERVE, family=endpoint.family,
        cores=endpoint.cores_per_replica, model=revision.model,
        spec={}, max_runtime_s=NO_TIME_LIMIT, max_attempts=1, reason_code="submitted",
        reason="waiting for the scheduler",
    )
    replica = Replica.objects.create(endpoint=endpoint, job=job, revision=revision.number)
    Job.objects.filter(pk=job.pk).update(spec=replica_spec(endpoint, revision, replica))
    states.event(job.pk, S.PENDING, f"replica {replica.pk} of endpoint {endpoint.team.slug}/{endpoint.name} "
                 f"(revision {revision.number})")
    transaction.on_commit(kick_dispatch)
    return replica


def replica_spec(endpoint: Endpoint, revision: EndpointRevision, replica: Replica) -> dict:
    """What the serve backend gets as its job spec (see the README's endpoint section)."""
    return {"endpoint_id": endpoint.pk, "endpoint": f"{endpoint.team.slug}/{endpoint.name}",
            "replica_id": replica.pk, "revision": revision.number, **(revision.options or {})}


def lock_endpoint(endpoint_id: int) -> None:
    """Take the endpoint's row lock (inside the caller's transaction) before touching
    its replicas: the reconciler holds it while it changes them, so a worker recording
    a replica's report or exit waits for it instead of deadlocking with it. FOR NO KEY
    UPDATE: inserts that only reference the endpoint (its events) are not blocked."""
    Endpoint.objects.select_for_update(no_key=True).filter(pk=endpoint_id).values_list("pk").first()


def replica_drain(replica: Replica, reason: str) -> bool:
    """Take no new requests; the job is stopped ENDPOINT_DRAIN_ROUTE_GRACE_S later
    (stop_drained), and its server finishes its in-flight requests on SIGTERM."""
    changed = Replica.objects.filter(pk=replica.pk, state__in=(R.STARTING, R.READY)).update(
        state=R.DRAINING, draining_at=timezone.now(), detail=reason)
    return changed == 1


@receiver(signals.drain_requested, dispatch_uid="jobs.endpoints.replica_preempted")
def replica_preempted(sender, *, job_id: int, message: str, by_job: int, by_team: str, **_) -> bool:
    """The scheduler preempts this replica's borrowed cores for another team's
    guarantee (inside its dispatch transaction): out of the routes now, stopped
    after the routing grace (stop_drained), its in-flight requests finish within its
    drain, and only when its process has ended do its cores go to job `by_job`.
    The endpoint then starts a replacement, which waits for room like any job.
    Returns whether the replica is draining."""
    replica = Replica.objects.filter(job_id=job_id).only("pk", "endpoint_id", "revision", "state").first()
    if replica is None:
        return False
    lock_endpoint(replica.endpoint_id)
    if not replica_drain(replica, f"preempted for team {by_team}'s job #{by_job}"):
        return Replica.objects.filter(pk=replica.pk, state=R.DRAINING).exists()
    endpoint_event(replica.endpoint_id, "replica_preempted",
                   f"replica {replica.pk} {message}: it takes no new requests, finishes those in flight "
                   f"(at most {settings.ENDPOINT_DRAIN_S} s), then stops and its cores go to job #{by_job}",
                   revision=replica.revision, replica=replica.pk, by_job=by_job, by_team=by_team)
    from jobs.endpoints import routing

    routing.publish_on_commit(replica.endpoint_id)
    return True


def stop_drained(endpoint_id: int) -> int:
    """Stop the jobs of replicas that have drained long enough (or never took traffic)."""
    grace = timezone.now() - timezone.timedelta(seconds=settings.ENDPOINT_DRAIN_ROUTE_GRACE_S)
    due = Replica.objects.filter(endpoint_id=endpoint_id, state=R.DRAINING).filter(
        Q(draining_at__lte=grace) | Q(ready_at__isnull=True)).values_list("job_id", flat=True)
    return sum(stop_job(job_id, "drained: stopped by its endpoint") for job_id in due)


def stop_job(job_id: int, message: str) -> bool:
    """A replica's job ends: pending / queued ones now, a running one by its worker
    (SIGTERM: the server drains, then exits)."""
    with transaction.atomic():
        if not Job.objects.filter(pk=job_id, status__in=(S.PENDING, *Job.ACTIVE), cancel_requested=False
                                  ).update(cancel_requested=True):
            return False
        if not states.mark_finished(job_id, S.CANCELLED, sources=(S.PENDING, S.QUEUED), message=message,
                                    failure="cancelled"):
            states.event(job_id, "cancel_requested", message)
    return True


def replica_reported(job_id: int, attempt: int, host_id: int, row: dict) -> int | None:
    """A report of the replica's process on its metric channel (its worker calls this;
    neuron_workers.backends.serve_handoff writes them): ready with its URL once its
    /health answers, draining when it stops taking requests (either shape of
    REPORTS). Only the running attempt's report counts. Returns the
    endpoint's id when the replica became ready (the caller reconciles it at once:
    a rollout or a cold start waits for that, not for the next tick)."""
    if not Job.objects.filter(pk=job_id, status=S.RUNNING, attempts=attempt, host_id=host_id).exists():
        return None
    replica = Replica.objects.filter(job_id=job_id).only("pk", "endpoint_id", "created_at", "revision").first()
    if replica is None:
        return None
    became_ready = False
    event = REPORTS.get(row.get("event")) or REPORTS.get(row.get("replica"))
    if event == "ready" and isinstance(row.get("url"), str) and row["url"].startswith("http"):
        with transaction.atomic():
            lock_endpoint(replica.endpoint_id)
            became_ready = _mark_ready(replica, row["url"], job_id)
    elif event == "draining":
        with transaction.atomic():
            lock_endpoint(replica.endpoint_id)
            replica_drain(replica, "its server began draining")
    else:
        return None
    from jobs.endpoints import routing

    routing.publish_on_commit(replica.endpoint_id)
    return replica.endpoint_id if became_ready else None


def _mark_ready(replica: Replica, url: str, job_id: int) -> bool:
    now = timezone.now()
    if not Replica.objects.filter(pk=replica.pk, state=R.STARTING).update(state=R.READY, url=url[:255], ready_at=now,
                                                                          detail=""):
        return False
    cold = (now - replica.created_at).total_seconds()
    started = Job.objects.filter(pk=job_id).values_list("started_at", flat=True).first()
    load = (now - started).total_seconds() if started else None
    endpoint_event(replica.endpoint_id, "replica_ready",
                   f"replica {replica.pk} ready at {url} after {cold:.1f} s"
                   + (f" ({load:.1f} s starting its server)" if load is not None else ""),
                   revision=replica.revision, replica=replica.pk, cold_start_s=round(cold, 3),
                   load_s=round(load, 3) if load is not None else None)
    return True


def sync(replica: Replica, job_status: str, job_reason: str, reason_code: str) -> str | None:
    """Bring the replica's state in line with its job's; returns what happened
    ("stopped", "failed", "requeued") or None. Called by the reconciler and by the
    worker when the replica's process ended."""
    now = timezone.now()
    if job_status in Job.FINISHED:
        crashed = replica.state != R.DRAINING and job_status != S.CANCELLED
        target = R.FAILED if crashed else R.STOPPED
        detail = job_reason or ("stopped" if not crashed else "its process ended")
        if Replica.objects.filter(pk=replica.pk, state__in=Replica.ACTIVE).update(
                state=target, stopped_at=now, url="", detail=detail[:500]):
            if not crashed:
                _preempted_replica_stopped(replica, now)
            return "failed" if crashed else "stopped"
        return None
    if job_status == S.PENDING and replica.state == R.READY:
        # preempted (its borrowed cores were reclaimed) or requeued: no traffic until it is ready again
        if Replica.objects.filter(pk=replica.pk, state=R.READY).update(state=R.STARTING, url="",
                                                                        detail=job_reason[:500]):
            return "preempted" if reason_code == "preempted" else "requeued"
    return None


def _preempted_replica_stopped(replica: Replica, now) -> None:
    """A preempted replica's timeline ends with its stop: how long it drained and
    which job gets its cores now."""
    preempted = (EndpointEvent.objects.filter(endpoint_id=replica.endpoint_id, kind="replica_preempted",
                                              data__replica=replica.pk).values_list("at", "data").first())
    if preempted is None:
        return
    at, data = preempted
    endpoint_event(replica.endpoint_id, "replica_stopped",
                   f"replica {replica.pk} stopped after draining for {(now - at).total_seconds():.1f} s "
                   f"(preempted); its cores go to job #{data.get('by_job')}",
                   revision=replica.revision, replica=replica.pk, by_job=data.get("by_job"),
                   drained_s=round((now - at).total_seconds(), 3))


def replica_exited(job_id: int) -> None:
    """The worker recorded the replica job's outcome: update the replica and the
    routes now rather than at the next reconcile tick."""
    replica = Replica.objects.filter(job_id=job_id).select_related("job").first()
    if replica is None:
        return
    with transaction.atomic():
        lock_endpoint(replica.endpoint_id)
        happened = sync(replica, replica.job.status, replica.job.reason, replica.job.reason_code)
        if happened == "failed":
            from jobs.endpoints.health import replica_failed

            replica_failed(replica, replica.job.reason)
    from jobs.endpoints import routing

    routing.publish(replica.endpoint_id)
