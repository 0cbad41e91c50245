"""Delivering the outbox: claim, send, record; retries with exponential back-off and
jitter; give up after NOTIFY_GIVE_UP_S with the failure shown to the subscriber.

Every attempt is sent to Celery the moment it is due: the first right after the
event's transaction commits (jobs.notify.events.kick), a retry by the failed attempt
itself as a message with a countdown of its back-off. Such messages live in a
worker's memory (we ack early), so a worker killed with -9 loses them; the Delivery
row is the record that recovers them: `next_attempt_at` is the attempt's due time
plus NOTIFY_LEASE_S, and the sweep (beat) sends again every delivery whose time has
passed - a backstop, not the way deliveries normally move.

Every send is made by a claim that bumped the row's `ticket` (a conditional UPDATE,
one row or none), so two messages for one delivery cannot both send, and only the
claim that sent may record the outcome. A worker that dies after its receiver
accepted but before recording leaves a redelivery of the same delivery id, which
receivers drop (at-least-once sending, at-most-once acceptance)."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from jobs.models import Delivery, Subscription
from jobs.notify.channels import CHANNELS, DeliveryError
from jobs.notify.events import DELIVER_TASK
from webapp.celery import app

log = logging.getLogger("jobs.notify")
P = Delivery.Status


@dataclass
class Outgoing:
    delivery_id: str
    kind: str
    title: str
    document: dict


def backoff_s(attempts: int, *, rng: random.Random = random) -> float:  # type: ignore[assignment]
    """Seconds before the next try after `attempts` failed ones: base × 2^(n-1), capped,
    times a jitter in [0.5, 1.5) so a receiver coming back is not hit by every retry at once."""
    base = min(settings.NOTIFY_BACKOFF_MAX_S, settings.NOTIFY_BACKOFF_BASE_S * 2 ** max(attempts - 1, 0))
    return base * (0.5 + rng.random())


def claim(pk: int, ticket: int) -> Delivery | None:
    """Take delivery `pk` for one attempt if it still holds `ticket` and is pending."""
    now = timezone.now()
    changed = Delivery.objects.filter(pk=pk, ticket=ticket, status=P.PENDING).update(
        ticket=ticket + 1, attempts=F("attempts") + 1,
        next_attempt_at=now + timedelta(seconds=settings.NOTIFY_LEASE_S))
    if changed != 1:
        return None
    return Delivery.objects.select_related("notification", "subscription").get(pk=pk)


def attempt(pk: int, ticket: int) -> str | None:
    """One delivery attempt; returns the new status, or None if another claim holds it."""
    delivery = claim(pk, ticket)
    if delivery is None:
        return None
    sub, note = delivery.subscription, delivery.notification
    out = Outgoing(str(delivery.delivery_id), note.kind, note.title,
                   {**note.payload, "delivery_id": str(delivery.delivery_id),
                    "created_at": note.created_at.isoformat()})
    try:
        CHANNELS[sub.channel].send(sub.target, sub.secret, out)
    except DeliveryError as exc:
        return _failed(delivery, str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug in a channel is a failed attempt, not a lost delivery
        log.exception("notify: delivery %s crashed", pk)
        return _failed(delivery, f"{type(exc).__name__}: {exc}")
    now = timezone.now()
    done = Delivery.objects.filter(pk=pk, ticket=ticket + 1, status=P.PENDING).update(
        status=P.DELIVERED, delivered_at=now, last_error="")
    if done and sub.failing_since is not None:  # one success clears the subscription's failure notice
        Subscription.objects.filter(pk=sub.pk).update(failing_since=None, last_failure="")
    return P.DELIVERED


def _failed(delivery: Delivery, error: str) -> str:
    now = timezone.now()
    give_up = (now - delivery.created_at).total_seconds() >= settings.NOTIFY_GIVE_UP_S
    mine = Delivery.objects.filter(pk=delivery.pk, ticket=delivery.ticket, status=P.PENDING)
    if give_up:
        with transaction.atomic():
            if mine.update(status=P.FAILED, last_error=error):
                Subscription.objects.filter(pk=delivery.subscription_id).update(
                    failing_since=now, last_failure=f"{delivery.notification.title}: gave up after "
                                                    f"{delivery.attempts} attempts; last error: {error}")
        return P.FAILED
    delay = backoff_s(delivery.attempts)
    if mine.update(last_error=error, next_attempt_at=now + timedelta(seconds=delay + settings.NOTIFY_LEASE_S)):
        _send([[delivery.pk, delivery.ticket]], countdown=delay)
    return P.PENDING


def sweep(limit: int = 2000) -> int:
    """The backstop: send to Celery every pending delivery whose message was lost (a
    broker outage when it was sent, a worker killed with it in memory) once its lease
    has passed. Each is re-ticketed, so an older message for it does nothing."""
    now = timezone.now()
    with transaction.atomic():
        due = list(Delivery.objects.select_for_update(skip_locked=True)
                   .filter(status=P.PENDING, next_attempt_at__lte=now).order_by("next_attempt_at")
                   .values_list("pk", "ticket")[:limit])
        if not due:
            return 0
        Delivery.objects.filter(pk__in=[pk for pk, _ in due]).update(
            ticket=F("ticket") + 1, next_attempt_at=now + timedelta(seconds=settings.NOTIFY_LEASE_S))
    pairs = [[pk, ticket + 1] for pk, ticket in due]
    for start in range(0, len(pairs), settings.NOTIFY_BATCH):
        app.send_task(DELIVER_TASK, args=[pairs[start:start + settings.NOTIFY_BATCH]],
                                        queue=settings.NOTIFY_QUEUE)
    return len(pairs)


def deliver(pairs: list[list[int]]) -> dict[str, int]:
    """Attempt each (delivery id, ticket) in turn; a worker's concurrency sends in parallel."""
    counts: dict[str, int] = {}
    for pk, ticket in pairs:
        status = attempt(pk, ticket) or "skipped"
        counts[status] = counts.get(status, 0) + 1
    return counts


def resend(delivery: Delivery) -> Delivery:
    """The delivery log's re-send: the same delivery id again (receivers that accepted it
    drop it), due now, with a fresh give-up window."""
    now = timezone.now()
    Delivery.objects.filter(pk=delivery.pk).update(
        status=P.PENDING, created_at=now, ticket=F("ticket") + 1,
        next_attempt_at=now + timedelta(seconds=settings.NOTIFY_LEASE_S))  # the sweep's, if this kick is lost
    delivery.refresh_from_db()
    transaction.on_commit(lambda: _send([[delivery.pk, delivery.ticket]]))
    return delivery


def _send(pairs: list[list[int]], countdown: float | None = None) -> None:
    """Send attempts to the notify queue (after `countdown` seconds). Best effort: a
    message that is lost is the sweep's once its lease has passed."""
    try:
        app.send_task(DELIVER_TASK, args=[pairs], queue=settings.NOTIFY_QUEUE, countdown=countdown)
    except Exception as exc:  # noqa: BLE001 - the row is the record; the sweep recovers
        log.warning("notify: could not send deliveries %s to Celery (%s); the sweep will", pairs, exc)
