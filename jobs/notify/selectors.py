"""Reads for the notifications page: a member's notification history in a team, with
how each reached the member's own subscriptions. No writes here."""
from __future__ import annotations

from dataclasses import dataclass, field

from django.db.models import Q

from jobs import access
from jobs.models import Delivery, Notification, Role, Subscription, Team

HISTORY_PAGE = 50


@dataclass
class HistoryEntry:
    notification: Notification
    deliveries: list[Delivery] = field(default_factory=list)  # to the subscriptions the reader sees


def visible_notifications(user, team: Team):
    """A team's notifications a user may read: managers (and staff) all of them; a
    member or viewer the team's facts (budget, quota, endpoints) and their own jobs'."""
    qs = Notification.objects.filter(team=team)
    if access.role_in(user, team) == Role.MANAGER:
        return qs
    return qs.filter(Q(user=user) | Q(user__isnull=True))


def history(user, team: Team, subscriptions: list[Subscription], *, before: int | None = None,
            limit: int = HISTORY_PAGE) -> tuple[list[HistoryEntry], int | None]:
    """The newest `limit` notifications (older than id `before`), each with its
    deliveries to `subscriptions`, and the id to pass as `before` for the next page
    (None on the last). Three queries whatever the history's length."""
    qs = visible_notifications(user, team).order_by("-id")
    if before is not None:
        qs = qs.filter(id__lt=before)
    rows = list(qs.only("id", "kind", "title", "created_at", "job_id", "payload")[:limit + 1])
    more = len(rows) > limit
    entries = {n.pk: HistoryEntry(n) for n in rows[:limit]}
    if entries and subscriptions:
        for d in (Delivery.objects.filter(notification_id__in=list(entries), subscription__in=subscriptions)
                  .select_related("subscription").order_by("subscription_id")):
            entries[d.notification_id].deliveries.append(d)
    return list(entries.values()), (rows[limit - 1].pk if more else None)
