"""Raising notifications: the outbox. `emit` writes a Notification and one Delivery
per matching subscription in the caller's transaction, and asks Celery to deliver
them once that transaction commits. So an event exists exactly when the state change
it reports does: rolled back together, committed together. A lost Celery message
loses nothing (the sweep finds due deliveries in the database)."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from jobs.models import Delivery, EventKind, Notification, Subscription
from webapp.celery import app

# The Celery task that attempts deliveries (jobs.tasks), sent by name so that this
# module need not import the task registry.
DELIVER_TASK = "jobs.notify_deliver"

log = logging.getLogger("jobs.notify")

# A job's failure code -> the event it raises (anything else that failed: job.failed).
FAILURE_EVENTS = {"timed_out": EventKind.JOB_TIMED_OUT}


MATCH_FIELDS = ("pk", "scope", "user_id", "events")  # what _wanting reads of a subscription


def matching_subscriptions(team_id: int, kind: str, user_id: int | None) -> list[Subscription]:
    """The team's active subscriptions that want `kind`: team-scoped ones, and the
    self-scoped ones the event concerns: those of `user_id` when it is about a user (a
    job's owner, a user's own budget cap), every one when it is about the team as a
    whole (user_id None: its budget, quota, endpoints)."""
    return _wanting(Subscription.objects.filter(team_id=team_id, active=True).only(*MATCH_FIELDS), kind, user_id)


def _wanting(subs: Iterable[Subscription], kind: str, user_id: int | None) -> list[Subscription]:
    """Those of the active `subs` that want `kind` (see matching_subscriptions). Filtered
    in Python: a team has a handful, and JSON containment is not portable to SQLite."""
    return [s for s in subs if kind in s.events and (
        s.scope == Subscription.Scope.TEAM or user_id is None or s.user_id == user_id)]


def emit(kind: str, *, team_id: int, title: str, job_id: int | None = None, user_id: int | None = None,
         dedup_key: str | None = None, subscriptions: list[Subscription] | None = None,
         **payload) -> Notification | None:
    """Record event `kind` and its deliveries in the current transaction. With
    `dedup_key`, an event already recorded under that key is not recorded again
    (returns None): "fires once" facts race safely on the unique key.
    `subscriptions`: matching_subscriptions' answer, if the caller has read it."""
    now = timezone.now()
    subs = matching_subscriptions(team_id, kind, user_id) if subscriptions is None else subscriptions
    if dedup_key is None and not subs:
        return None  # nothing to tell anybody and nothing to remember
    body = {"kind": kind, "team_id": team_id, "job_id": job_id, "title": title, **payload}
    try:
        with transaction.atomic():  # a savepoint: a duplicate key leaves the caller's transaction usable
            notification = Notification.objects.create(team_id=team_id, job_id=job_id, user_id=user_id, kind=kind,
                                                        title=title, payload=body, dedup_key=dedup_key,
                                                        created_at=now)
    except IntegrityError:
        if dedup_key is None:
            raise
        return None
    # The kick message is sent after commit; until its lease passes the sweep leaves
    # the delivery to it (no double send of a fresh delivery).
    lease = now + timedelta(seconds=settings.NOTIFY_LEASE_S)
    deliveries = Delivery.objects.bulk_create([Delivery(notification=notification, subscription=s, created_at=now,
                                                        next_attempt_at=lease) for s in subs])
    if deliveries:
        ids = [d.pk for d in deliveries] if deliveries[0].pk else list(
            Delivery.objects.filter(notification=notification).values_list("pk", flat=True))
        transaction.on_commit(lambda: kick(ids))
    return notification


def kick(delivery_ids: list[int]) -> None:
    """Send the deliveries' first attempt to Celery (ticket 0). Best effort: if the
    broker is down, the sweep sends them when their lease has passed."""
    try:
        app.send_task(DELIVER_TASK, args=[[[pk, 0] for pk in delivery_ids]], queue=settings.NOTIFY_QUEUE)
    except Exception as exc:  # noqa: BLE001 - the outbox row is the record; the sweep recovers
        log.warning("notify: could not send deliveries %s to Celery (%s); the sweep will", delivery_ids, exc)


# --- the hooks other areas call -------------------------------------------------------

def job_transition(job_id: int, target: str, *, failure: str = "", message: str = "") -> None:
    """Called by jobs.lifecycle.states inside a transition's transaction: raises the
    job event the new status means, if anybody wants it."""
    from jobs.models import Job

    S = Job.Status
    if target == S.SUCCEEDED:
        kind = EventKind.JOB_SUCCEEDED
    elif target == S.FAILED:
        kind = FAILURE_EVENTS.get(failure, EventKind.JOB_FAILED)
    elif target in (EventKind.JOB_PREEMPTED, EventKind.JOB_REQUEUED):
        kind = target
    else:
        return
    # Most jobs' teams want no such event: the subscriptions first (found through the
    # job), and the job itself only if somebody may want to hear about it.
    team_subs = [s for s in Subscription.objects.filter(team__jobs=job_id, active=True).only(*MATCH_FIELDS)
                 if kind in s.events]
    if not team_subs:
        return
    row = Job.objects.filter(pk=job_id).values("team_id", "user_id", "kind", "team__slug").first()
    verb = kind.split(".", 1)[1].replace("_", " ")
    emit(kind, team_id=row["team_id"], job_id=job_id, user_id=row["user_id"],
         title=f"{row['kind']} job {job_id} of team {row['team__slug']} {verb}", message=message,
         failure=failure or None, job_kind=row["kind"],
         subscriptions=_wanting(team_subs, kind, row["user_id"]))


def job_requeued(job_id: int, kind: str, message: str) -> None:
    """A job went back to pending: preempted (kind "preempted") or requeued."""
    job_transition(job_id, EventKind.JOB_PREEMPTED if kind == "preempted" else EventKind.JOB_REQUEUED,
                   message=message)


def quota_changed(team, changes: list[tuple[str, str, str]], actor=None) -> None:
    """Called by jobs.quotas.services in the quota update's transaction."""
    if not changes:
        return
    emit(EventKind.QUOTA_CHANGED, team_id=team.pk, title=f"quota of team {team.slug} changed",
         changes=[{"subject": s, "old": o, "new": n} for s, o, n in changes],
         actor=getattr(actor, "username", None))


def endpoint_unhealthy(*, team_id: int, endpoint: str, reason: str, since=None,
                       figures: dict | None = None) -> Notification | None:
    """Called by jobs.endpoints.health in the transaction that records the endpoint as
    unhealthy. One notification per endpoint per unhealthy stretch (`since` names the
    stretch). `figures`: the endpoint's last minute at the gateway (requests/s, error
    rate, time to first token, in flight, waiting), sent along so a subscriber sees
    what its users saw."""
    key = f"endpoint:{endpoint}:{since.isoformat()}" if since else None
    message = reason
    if figures:
        message += (f" (last minute: {figures['requests_per_s']} requests/s, {figures['error_rate_pct']} % errors, "
                    f"{figures['inflight']} in flight, {figures['waiting']} waiting)")
    return emit(EventKind.ENDPOINT_UNHEALTHY, team_id=team_id, title=f"endpoint {endpoint} is unhealthy",
                dedup_key=key, endpoint=endpoint, reason=reason, message=message, figures=figures)
