"""Make an endpoint's replicas follow what it should be. One pass per endpoint, with
its row locked (the beat's pass, a change from the page or API, and a wake-up
serialize on it), every few seconds (jobs.endpoints_reconcile):

1. sync: each replica's state from its job's (a finished job: stopped, or failed if
   nobody asked it to stop - a crash, which raises endpoint.unhealthy);
2. autoscale: desired_replicas from the measured load (jobs.endpoints.autoscaler);
3. rollout: the newest revision takes traffic (Endpoint.serving_revision) once as
   many of its replicas are ready as desired; it is rolled back if they are not by
   its deadline or ROLLBACK_AFTER_FAILURES of them failed;
4. scale: start or drain replicas of the newest revision to reach desired (this also
   replaces crashed ones); replicas of revisions that take no traffic are drained;
5. drained replicas' jobs are stopped after the routing grace; routes republished.

A deleting endpoint drains everything and becomes deleted once no replica is left.
Lock order: the endpoint's row, then its replicas, then their jobs (workers recording a
replica's report or exit take the endpoint's row first too: replicas.lock_endpoint)."""
from __future__ import annotations

import logging
from collections import Counter
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs.endpoints import routing
from jobs.endpoints.autoscaler import autoscale, wake_up
from jobs.endpoints.health import replica_failed, rollout_failed
from jobs.endpoints.replicas import replica_drain, replica_start, stop_drained, sync
from jobs.endpoints.timeline import endpoint_event
from jobs.models import Endpoint, EndpointRevision, Membership, Replica, Role

log = logging.getLogger(__name__)
R = Replica.State
REV = EndpointRevision.State
ROLLBACK_AFTER_FAILURES = 3  # failed replicas of a rolling-out revision before its deadline
CRASH_LOOP_FAILURES = 3  # this many failures within CRASH_LOOP_WINDOW_S: no new replica this pass
CRASH_LOOP_WINDOW_S = 60


def reconcile_all() -> dict:
    counts: Counter = Counter()
    for pk in Endpoint.objects.exclude(state=Endpoint.State.DELETED).values_list("pk", flat=True):
        try:
            counts.update(reconcile_endpoint(pk))
        except Exception:  # one endpoint's trouble must not stop the others'
            log.exception("endpoint %s: reconcile failed", pk)
            counts["errors"] += 1
    return dict(counts)


def wake(endpoint_id: int) -> bool:
    """A request waits at an endpoint scaled to zero: ask for a replica and start it
    now (the gateway calls this, or sends the Celery task jobs.endpoint_wake)."""
    woke = wake_up(endpoint_id)
    if woke:
        reconcile_endpoint(endpoint_id)
    return woke


def reconcile_endpoint(endpoint_id: int) -> Counter:
    counts: Counter = Counter()
    with transaction.atomic():
        endpoint = (Endpoint.objects.select_for_update(of=("self",), no_key=True).select_related("team")
                    .filter(pk=endpoint_id).first())
        if endpoint is None or endpoint.state == Endpoint.State.DELETED:
            return counts
        _sync(endpoint, counts)
        if endpoint.state == Endpoint.State.DELETING:
            _delete(endpoint, counts)
        else:
            if autoscale(endpoint, set(_active(endpoint).values_list("pk", flat=True))):
                counts["rescaled"] += 1
            _rollout(endpoint, counts)
            _scale(endpoint, counts)
        counts["stopped"] += stop_drained(endpoint.pk)
    routing.publish(endpoint_id)
    return counts


def _active(endpoint: Endpoint):
    return Replica.objects.filter(endpoint=endpoint, state__in=Replica.ACTIVE)


def _sync(endpoint: Endpoint, counts: Counter) -> None:
    for replica in _active(endpoint).select_related("job"):
        happened = sync(replica, replica.job.status, replica.job.reason, replica.job.reason_code)
        if happened == "failed":
            replica.refresh_from_db(fields=["stopped_at"])
            replica_failed(replica, replica.job.reason)
        elif happened in ("preempted", "requeued"):
            endpoint_event(endpoint.pk, f"replica_{happened}", f"replica {replica.pk} {happened}: {replica.job.reason}",
                           revision=replica.revision, replica=replica.pk)
        if happened:
            counts[f"replicas_{happened}"] += 1


def _rollout(endpoint: Endpoint, counts: Counter) -> None:
    revision = EndpointRevision.objects.filter(endpoint=endpoint, number=endpoint.revision).first()
    if revision is None or revision.state != REV.ROLLING_OUT:
        return
    ready = _active(endpoint).filter(revision=revision.number, state=R.READY).count()
    if ready >= endpoint.desired_replicas:
        _shift_traffic(endpoint, revision, ready)
        counts["traffic_shifted"] += 1
        return
    failed = Replica.objects.filter(endpoint=endpoint, revision=revision.number, state=R.FAILED).count()
    late = revision.deadline_at is not None and timezone.now() >= revision.deadline_at
    if not (late or failed >= ROLLBACK_AFTER_FAILURES):
        return
    reason = (f"{failed} of its replicas failed" if failed >= ROLLBACK_AFTER_FAILURES
              else f"{ready} of {endpoint.desired_replicas} replicas ready by the deadline")
    previous = EndpointRevision.objects.filter(endpoint=endpoint, number=endpoint.serving_revision).first()
    if previous is None:
        # The first revision: nothing to go back to. Say so once; replicas keep being
        # replaced (at most CRASH_LOOP_FAILURES a minute).
        if revision.deadline_at is not None:
            EndpointRevision.objects.filter(pk=revision.pk).update(deadline_at=None)
            rollout_failed(endpoint, revision, reason, rolled_back_to=None)
        return
    _roll_back(endpoint, revision, previous, reason)
    counts["rolled_back"] += 1


def _shift_traffic(endpoint: Endpoint, revision: EndpointRevision, ready: int) -> None:
    now = timezone.now()
    old = endpoint.serving_revision
    EndpointRevision.objects.filter(endpoint=endpoint, state=REV.LIVE).update(state=REV.SUPERSEDED, finished_at=now)
    EndpointRevision.objects.filter(pk=revision.pk).update(state=REV.LIVE, finished_at=now)
    endpoint.serving_revision = revision.number
    Endpoint.objects.filter(pk=endpoint.pk).update(serving_revision=revision.number)
    message = (f"revision {revision.number} takes the traffic ({ready} replicas ready)" if old
               else f"revision {revision.number} is live ({ready} replicas ready)")
    endpoint_event(endpoint.pk, "traffic_shifted", message, revision=revision.number, previous=old or None)
    for replica in _active(endpoint).exclude(revision=revision.number):
        replica_drain(replica, f"revision {revision.number} took the traffic")


def _roll_back(endpoint: Endpoint, failed: EndpointRevision, previous: EndpointRevision, reason: str) -> None:
    """Back to the serving revision's model, options and cores; the failed revision's
    replicas are drained (they never took traffic)."""
    now = timezone.now()
    EndpointRevision.objects.filter(pk=failed.pk).update(state=REV.ROLLED_BACK, finished_at=now)
    endpoint.revision, endpoint.model_id = previous.number, previous.model_id
    endpoint.options, endpoint.cores_per_replica = previous.options, previous.cores_per_replica
    Endpoint.objects.filter(pk=endpoint.pk).update(revision=previous.number, model_id=previous.model_id,
                                                   options=previous.options,
                                                   cores_per_replica=previous.cores_per_replica, updated_at=now)
    for replica in _active(endpoint).filter(revision=failed.number):
        replica_drain(replica, f"revision {failed.number} rolled back")
    rollout_failed(endpoint, failed, reason, rolled_back_to=previous.number)


def _scale(endpoint: Endpoint, counts: Counter) -> None:
    """Replicas of the newest revision: start or drain to reach desired. Replicas of
    a revision that is neither the newest nor the serving one are drained."""
    active = list(_active(endpoint).exclude(state=R.DRAINING).order_by("pk"))
    for replica in active:
        if replica.revision not in (endpoint.revision, endpoint.serving_revision):
            replica_drain(replica, f"revision {replica.revision} is not served any more")
    current = [r for r in active if r.revision == endpoint.revision]
    missing = endpoint.desired_replicas - len(current)
    if missing > 0:
        started = _start(endpoint, missing)
        counts["replicas_started"] += started
    elif missing < 0:
        # Extras: those not ready first (they serve nothing yet), then the newest.
        extras = sorted(current, key=lambda r: (r.state == R.READY, -r.pk))[:-missing]
        for replica in extras:
            replica_drain(replica, f"scaled down to {endpoint.desired_replicas}")
        counts["replicas_drained"] += len(extras)


def _start(endpoint: Endpoint, count: int) -> int:
    recent = timezone.now() - timedelta(seconds=CRASH_LOOP_WINDOW_S)
    if Replica.objects.filter(endpoint=endpoint, state=R.FAILED, stopped_at__gte=recent).count() >= CRASH_LOOP_FAILURES:
        return 0  # crash loop: wait for the window to pass rather than start a replica every pass
    revision = EndpointRevision.objects.filter(endpoint=endpoint, number=endpoint.revision).first()
    user = _owner(endpoint)
    if revision is None or user is None or revision.model_id is None:
        why = ("its model was deleted" if revision is not None and revision.model_id is None
               else "it has no member left to run its replicas as")
        log.warning("endpoint %s: cannot start replicas: %s", endpoint.pk, why)
        return 0
    for _ in range(count):
        replica_start(endpoint, revision, user=user)
    return count


def _owner(endpoint: Endpoint):
    """Whom replica jobs run as: the endpoint's creator while a member, else a manager."""
    members = Membership.objects.filter(team_id=endpoint.team_id)
    if endpoint.created_by_id and members.filter(user_id=endpoint.created_by_id).exists():
        return endpoint.created_by
    manager = members.filter(role=Role.MANAGER).select_related("user").order_by("pk").first()
    return manager.user if manager else None


def _delete(endpoint: Endpoint, counts: Counter) -> None:
    for replica in _active(endpoint).exclude(state=R.DRAINING):
        replica_drain(replica, "the endpoint is being deleted")
    if not _active(endpoint).exists():
        now = timezone.now()
        Endpoint.objects.filter(pk=endpoint.pk).update(state=Endpoint.State.DELETED, updated_at=now)
        EndpointRevision.objects.filter(endpoint=endpoint, state__in=[REV.ROLLING_OUT, REV.LIVE]).update(
            state=REV.STOPPED, finished_at=now)
        endpoint_event(endpoint.pk, "deleted", "every replica stopped: the endpoint is deleted")
        counts["deleted"] += 1
