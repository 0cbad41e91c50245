"""HTML pages for notifications: a member's history in a team and their subscriptions
(subscribe, delivery log, re-send, unsubscribe), and the team's alert policy (idle
cores, budget thresholds), which managers edit. The JSON API is jobs.api.notify."""
from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_POST, require_safe

from jobs import access, pages
from jobs.models import EventKind, Role, Subscription, Team
from jobs.notify import selectors, services
from jobs.notify.forms import AlertPolicyForm, SubscriptionForm

LOG_PAGE = 50  # deliveries per page of a subscription's log, as the history pages by HISTORY_PAGE


def _subscriptions(user, team: Team) -> list[Subscription]:
    return list(services.visible_subscriptions(user).filter(team=team).select_related("user").order_by("-id"))


def _team_subscription(user, team: Team, sub_id: int) -> Subscription:
    sub = services.get_subscription(user, sub_id)
    if sub.team_id != team.pk:
        raise Http404("No such subscription")
    return sub


def _before(request: HttpRequest) -> int | None:
    """The ?before=<id> cursor of a paged list (a bad one shows the newest)."""
    try:
        return int(request.GET["before"]) if request.GET.get("before") else None
    except ValueError:
        return None


@login_required
@require_safe
def notifications(request: HttpRequest, slug: str) -> HttpResponse:
    """The notifications page (GET; the forms' POST views show it again with their answer)."""
    return _notifications_page(request, slug)


def _notifications_page(request: HttpRequest, slug: str, *, form: SubscriptionForm | None = None,
                        policy_form: AlertPolicyForm | None = None, created: Subscription | None = None,
                        status: int = 200) -> HttpResponse:
    team = access.get_team(request.user, slug)
    is_manager = access.role_in(request.user, team) == Role.MANAGER
    subs = _subscriptions(request.user, team)
    before = _before(request)
    entries, older = selectors.history(request.user, team, subs, before=before)
    policy = services.alert_policy_of(team)
    return pages.render_page(request, "notify/notifications.html", {
        "subscriptions": subs, "entries": entries, "older": older, "before": before, "is_manager": is_manager,
        "form": form or SubscriptionForm(may_subscribe_team=is_manager),
        "policy": policy, "policy_form": policy_form or AlertPolicyForm(initial=AlertPolicyForm.initial_of(policy)),
        "created": created, "event_labels": dict(EventKind.choices),
    }, team=team, nav="notifications", status=status)


@login_required
@require_POST
def subscribe(request: HttpRequest, slug: str) -> HttpResponse:
    team = access.get_team(request.user, slug)
    is_manager = access.role_in(request.user, team) == Role.MANAGER
    form = SubscriptionForm(request.POST, may_subscribe_team=is_manager)
    if not form.is_valid():
        return _notifications_page(request, slug, form=form, status=400)
    data = form.cleaned_data
    try:
        sub = services.subscription_create(team=team, user=request.user, scope=data["scope"], channel=data["channel"],
                                           target=data["target"].strip(), events=list(data["events"]))
    except services.Invalid as exc:
        for name, errors in exc.errors.items():
            for error in errors:
                form.add_error(name if name in form.fields else None, error)
        return _notifications_page(request, slug, form=form, status=400)
    # Rendered, not redirected: a signed webhook's secret is shown this once.
    return _notifications_page(request, slug, created=sub, status=201)


@login_required
@require_POST
def policy_update(request: HttpRequest, slug: str) -> HttpResponse:
    team = access.get_team(request.user, slug)
    try:
        access.require_role(request.user, team, Role.MANAGER)
    except access.Forbidden as exc:
        raise PermissionDenied(f"Only managers can change the alert policy: {exc}.") from None
    form = AlertPolicyForm(request.POST)
    if not form.is_valid():
        return _notifications_page(request, slug, policy_form=form, status=400)
    changed = services.alert_policy_update(team=team, values=form.policy_values(), actor=request.user)
    messages.success(request, f"Alert policy saved ({len(changed)} change{'s' if len(changed) != 1 else ''})."
                     if changed else "Nothing changed.")
    return redirect("notifications", slug=team.slug)


@login_required
@require_safe
def subscription_detail(request: HttpRequest, slug: str, sub_id: int) -> HttpResponse:
    team = access.get_team(request.user, slug)
    sub = _team_subscription(request.user, team, sub_id)
    before = _before(request)
    deliveries = sub.deliveries.select_related("notification").order_by("-id")
    if before is not None:
        deliveries = deliveries.filter(id__lt=before)
    rows = list(deliveries[:LOG_PAGE + 1])
    return pages.render_page(request, "notify/subscription.html", {
        "sub": sub, "deliveries": rows[:LOG_PAGE], "before": before,
        "older": rows[LOG_PAGE - 1].pk if len(rows) > LOG_PAGE else None, "event_labels": dict(EventKind.choices),
    }, team=team, nav="notifications")


@login_required
@require_POST
def subscription_delete(request: HttpRequest, slug: str, sub_id: int) -> HttpResponse:
    team = access.get_team(request.user, slug)
    sub = _team_subscription(request.user, team, sub_id)
    sub.delete()
    messages.success(request, f"Unsubscribed: {sub.get_channel_display()} to {sub.target}.")
    return redirect("notifications", slug=team.slug)


@login_required
@require_POST
def delivery_resend(request: HttpRequest, slug: str, delivery_id: int) -> HttpResponse:
    team = access.get_team(request.user, slug)
    delivery = services.get_delivery(request.user, delivery_id)
    if delivery.subscription.team_id != team.pk:
        raise Http404("No such delivery")
    services.delivery_resend(delivery)
    messages.success(request, f"Delivery {delivery.delivery_id} is sent again.")
    return redirect("notify_subscription", slug=team.slug, sub_id=delivery.subscription_id)
