"""The JSON API for notifications (/api/v1/...).

- GET    /teams/{slug}/subscriptions      yours in the team (managers: the team's too)
- POST   /teams/{slug}/subscriptions      {scope, channel, target, events}: 201 with the
                                          signing secret (signed webhooks)
- DELETE /subscriptions/{id}
- GET    /subscriptions/{id}/deliveries   the delivery log: status, attempts, last error
- POST   /deliveries/{id}/resend          the same delivery id again, due now

Another user's subscription is a 404 (jobs.notify.services)."""
from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from ninja import Router

from jobs import access
from jobs.api.body import json_type_errors, read_json
from jobs.models import Delivery, EventKind, Subscription
from jobs.notify import services
from jobs.notify.forms import SubscriptionForm

router = Router(tags=["notifications"])
LOG_LIMIT = 200


def subscription_document(sub: Subscription, *, with_secret: bool = False) -> dict:
    doc = {"id": sub.pk, "team": sub.team.slug, "user": sub.user.username, "scope": sub.scope,
           "channel": sub.channel, "target": sub.target, "events": sub.events, "active": sub.active,
           "created_at": sub.created_at.isoformat(),
           "failing_since": sub.failing_since.isoformat() if sub.failing_since else None,
           "last_failure": sub.last_failure or None}
    if with_secret and sub.channel == Subscription.Channel.WEBHOOK:
        doc["secret"] = sub.secret
    return doc


def delivery_document(d: Delivery) -> dict:
    return {"id": d.pk, "delivery_id": str(d.delivery_id), "event": d.notification.kind,
            "title": d.notification.title, "status": d.status, "attempts": d.attempts,
            "last_error": d.last_error or None, "created_at": d.created_at.isoformat(),
            "next_attempt_at": d.next_attempt_at.isoformat() if d.status == "pending" else None,
            "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None}


@router.get("/teams/{slug}/subscriptions")
def subscription_list(request: HttpRequest, slug: str):
    team = access.get_team(request.auth, slug)
    subs = services.visible_subscriptions(request.auth).filter(team=team).select_related("team", "user")
    return {"subscriptions": [subscription_document(s, with_secret=s.user_id == request.auth.pk) for s in subs]}


_SUBSCRIPTION_BODY = {"type": "object", "required": ["channel", "target", "events"], "properties": {
    "scope": {"type": "string", "enum": list(Subscription.Scope.values), "default": "self",
              "description": "team: everything of the team (managers only)"},
    "channel": {"type": "string", "enum": list(Subscription.Channel.values)},
    "target": {"type": "string", "maxLength": 500, "description": "an email address or an https webhook URL"},
    "events": {"type": "array", "minItems": 1, "items": {"type": "string", "enum": list(EventKind.values)}}},
    "example": {"channel": "email", "target": "me@example.com", "events": ["job.failed"]}}


@router.post("/teams/{slug}/subscriptions", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": _SUBSCRIPTION_BODY}}}})
def subscription_create(request: HttpRequest, slug: str):
    team = access.get_team(request.auth, slug)
    body, refused = read_json(request, "No subscription was created", empty={})
    if refused is not None:
        return refused
    if not isinstance(body, dict):
        return JsonResponse({"detail": "Send a JSON object.", "code": "invalid"}, status=400)
    fields = SubscriptionForm.base_fields
    errors = {key: [f"unknown field; the fields are {', '.join(fields)}"] for key in sorted(set(body) - set(fields))}
    errors.update(json_type_errors(body, fields))
    if errors:
        return JsonResponse({"detail": "No subscription was created: " + "; ".join(
            f"{f}: {' '.join(m)}" for f, m in errors.items()), "code": "invalid", "errors": errors}, status=400)
    try:
        sub = services.subscription_create(team=team, user=request.auth, scope=body.get("scope", "self"),
                                           channel=body.get("channel", ""), target=body.get("target", ""),
                                           events=body.get("events"))
    except services.Invalid as exc:
        return JsonResponse({"detail": f"No subscription was created: {exc}", "code": "invalid",
                             "errors": exc.errors}, status=400)
    return JsonResponse(subscription_document(sub, with_secret=True), status=201)


@router.delete("/subscriptions/{dbid:sub_id}")
def subscription_delete(request: HttpRequest, sub_id: int):
    services.get_subscription(request.auth, sub_id).delete()
    return HttpResponse(status=204)


@router.get("/subscriptions/{dbid:sub_id}/deliveries")
def delivery_log(request: HttpRequest, sub_id: int):
    sub = services.get_subscription(request.auth, sub_id)
    rows = sub.deliveries.select_related("notification")[:LOG_LIMIT]
    return {"subscription": subscription_document(sub), "deliveries": [delivery_document(d) for d in rows]}


@router.post("/deliveries/{dbid:delivery_id}/resend")
def delivery_resend(request: HttpRequest, delivery_id: int):
    d = services.delivery_resend(services.get_delivery(request.auth, delivery_id))
    return delivery_document(d)
