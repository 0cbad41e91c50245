"""Subscription writes and the team-scoped fetches the API and pages use: a
subscription is its owner's; a team-scoped one is also its team's managers'. Anyone
else gets a 404 (Http404), as for any other object."""
from __future__ import annotations

from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import transaction
from django.db.models import Q, QuerySet
from django.http import Http404

from jobs import access
from jobs.models import AuditEntry, Delivery, EventKind, Membership, Role, Subscription, Team, TeamAlertPolicy
from jobs.notify import delivery as notify_delivery
from jobs.notify import targets


class Invalid(Exception):
    def __init__(self, errors: dict[str, list[str]]):
        super().__init__("; ".join(f"{f}: {' '.join(m)}" for f, m in errors.items()))
        self.errors = errors


def visible_subscriptions(user) -> QuerySet[Subscription]:
    if user.is_staff:
        return Subscription.objects.all()
    managed = Membership.objects.filter(user=user, role=Role.MANAGER).values("team_id")
    return Subscription.objects.filter(Q(user=user) | Q(scope=Subscription.Scope.TEAM, team_id__in=managed))


def get_subscription(user, pk: int) -> Subscription:
    sub = visible_subscriptions(user).select_related("team", "user").filter(pk=pk).first()
    if sub is None:
        raise Http404("No such subscription")
    return sub


def get_delivery(user, pk: int) -> Delivery:
    d = Delivery.objects.filter(pk=pk, subscription__in=visible_subscriptions(user)).select_related(
        "subscription", "notification").first()
    if d is None:
        raise Http404("No such delivery")
    return d


def subscription_create(*, team: Team, user, scope: str, channel: str, target: str, events: list) -> Subscription:
    """Validate and create. Team-wide subscriptions need the manager role; a member
    may subscribe to their own jobs and the team's facts (budget, quota, endpoints)."""
    errors: dict[str, list[str]] = {}
    if scope not in Subscription.Scope.values:
        errors["scope"] = [f"one of {', '.join(Subscription.Scope.values)}"]
    elif scope == Subscription.Scope.TEAM:
        try:
            access.require_role(user, team, Role.MANAGER)
        except access.Forbidden:
            errors["scope"] = [f"only managers of team {team.slug} may subscribe for the whole team"]
    else:
        try:
            access.require_role(user, team, Role.VIEWER)
        except access.Forbidden:
            errors["scope"] = ["no role in this team"]
    if channel not in Subscription.Channel.values:
        errors["channel"] = [f"one of {', '.join(Subscription.Channel.values)}"]
    elif channel == Subscription.Channel.EMAIL:
        try:
            validate_email(target)
        except ValidationError:
            errors["target"] = ["an email address"]
    else:
        parts = urlsplit(str(target))
        if parts.scheme not in ("http", "https") or not parts.hostname or len(str(target)) > 500:
            errors["target"] = ["an http(s) URL of at most 500 characters"]
        elif (unsafe := targets.target_error(str(target))) is not None:
            errors["target"] = [unsafe]
    if not isinstance(events, list) or not events or any(e not in EventKind.values for e in events):
        errors["events"] = [f"a non-empty list of: {', '.join(EventKind.values)}"]
    if errors:
        raise Invalid(errors)
    return Subscription.objects.create(team=team, user=user, scope=scope, channel=channel, target=target,
                                       events=sorted(set(events)))


def delivery_resend(delivery: Delivery) -> Delivery:
    return notify_delivery.resend(delivery)


# --- the team's alert policy ---------------------------------------------------------------

POLICY_FIELDS = ("idle_util_below", "idle_minutes", "idle_action", "idle_grace_minutes", "budget_thresholds")


def alert_policy_of(team: Team) -> TeamAlertPolicy:
    """The team's policy, or the defaults (unsaved) when it never set one."""
    return TeamAlertPolicy.objects.filter(team=team).first() or TeamAlertPolicy(team=team)


def alert_policy_update(*, team: Team, values: dict, actor) -> list[AuditEntry]:
    """Set the team's idle-core rule and budget thresholds (managers; the caller checks
    the role), one AuditEntry per changed field (subject alert.<field>, old -> new)."""
    with transaction.atomic():
        policy, _ = TeamAlertPolicy.objects.select_for_update().get_or_create(team=team)
        entries = [AuditEntry(team=team, actor=actor, subject=f"alert.{name}", old=_shown(getattr(policy, name)),
                              new=_shown(values[name]))
                   for name in POLICY_FIELDS if name in values and getattr(policy, name) != values[name]]
        if entries:
            for name in POLICY_FIELDS:
                if name in values:
                    setattr(policy, name, values[name])
            policy.save()
            AuditEntry.objects.bulk_create(entries)
    return entries


def _shown(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "site default"
    return f"{value:g}" if isinstance(value, float) else str(value)
