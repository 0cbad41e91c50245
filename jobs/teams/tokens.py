"""Per-user API tokens: shown once at creation, stored as a SHA-256 digest."""
from __future__ import annotations

import secrets
from datetime import timedelta

from django.db.models import Q
from django.utils import timezone

from jobs.models import ApiToken

PREFIX = "nd_"
# last_used_at is shown to the user to the minute ("is this token still in use?");
# writing it on every request would add an UPDATE (and a dead row) to each API call,
# so it is refreshed at most this often.
LAST_USED_EVERY = timedelta(seconds=60)


def token_create(*, user, name: str) -> tuple[str, ApiToken]:
    raw = PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(user=user, name=name[:80] or "token", prefix=raw[:10], digest=ApiToken.hash(raw))
    return raw, token


def token_user(raw: str):
    """The active user owning token `raw`, or None (one query: the token with its
    user). The token's last use is written only when the one stored is a minute
    old, and conditionally, so concurrent requests write it once."""
    if not raw or not raw.startswith(PREFIX):
        return None
    token = ApiToken.objects.select_related("user").filter(digest=ApiToken.hash(raw)).first()
    if token is None or not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_EVERY:
        ApiToken.objects.filter(Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - LAST_USED_EVERY),
                                pk=token.pk).update(last_used_at=now)
    return token.user
