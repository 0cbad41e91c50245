"""API tokens: a person's own, or a team's service account for CI. Shown once at
creation, stored as a SHA-256 digest; each has a scope (read < submit < manage) and
may expire. Creation, use and revocation are AuditEntries."""
from __future__ import annotations

import re
import secrets
from datetime import datetime, timedelta

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.text import slugify

from jobs.models import ApiToken, AuditEntry, RevokedToken, Role, Team
from jobs.teams import services as team_services

PREFIX = "nd_"
Scope = ApiToken.Scope
SCOPE_RANK = {Scope.READ: 0, Scope.SUBMIT: 1, Scope.MANAGE: 2}
# last_used_at is shown to the user to the minute ("is this token still in use?");
# writing it on every request would add an UPDATE (and a dead row) to each API call,
# so it is refreshed at most this often, or when the token is used from a new address.
LAST_USED_EVERY = timedelta(seconds=60)
# A use is audited when the token is first used, used from a new address, or used
# again after this long: the audit log shows where and when a token is in use without
# a row per request.
USE_AUDITED_EVERY = timedelta(hours=1)
# Writes that change a team's settings rather than its work need the manage scope
# (paths under /api/v1/); every other write needs submit, every read read.
MANAGE_PATHS = [re.compile(p) for p in (r"/teams/[^/]+/quota/?$", r"/teams/[^/]+/compile-cache-policy/?$",
                                        r"/compile-cache/[^/]+/pin/?$")]
READ_METHODS = {"GET", "HEAD", "OPTIONS"}
BEARER = re.compile(r"Bearer (\S+)", re.IGNORECASE)


class TokenRefused(Exception):
    status = 401
    code = "token_refused"


class TokenExpired(TokenRefused):
    code = "token_expired"


class TokenRevoked(TokenRefused):
    code = "token_revoked"


class TokenUnknown(TokenRefused):
    code = "token_unknown"


class AuthorizationMalformed(TokenRefused):
    code = "authorization_malformed"


class ScopeMissing(TokenRefused):
    status = 403
    code = "token_scope"


def bearer_token(header: str) -> str:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case,
    one space, a token without spaces), the one rule for the API and the endpoints
    gateway. Anything else raises AuthorizationMalformed saying the form expected."""
    match = BEARER.fullmatch(header)
    if match is None:
        raise AuthorizationMalformed(f"Authorization must be 'Bearer <token>' (one space, then an API token from "
                                     f"the Tokens page, nd_…); {_what_is_wrong(header)}.")
    return match.group(1)


def _what_is_wrong(header: str) -> str:
    """Why `header` is not "Bearer <token>", without repeating the token (a secret)."""
    scheme, rest = re.match(r"(\S*)(.*)", header, re.DOTALL).groups()
    if scheme.lower() != "bearer":
        named = re.fullmatch(r"[A-Za-z][A-Za-z-]{0,19}", scheme)  # a scheme such as Basic, not a token
        return f"this one's scheme is {scheme!r}" if named else "this one does not start with 'Bearer '"
    if not rest.strip():
        return "this one has no token after Bearer"
    if not rest.startswith(" ") or rest[1].isspace():
        return "this one has more than one space (or a tab) after Bearer"
    return "this one has a space in or after the token"


def scope_needed(method: str, path: str) -> str:
    if method.upper() in READ_METHODS:
        return Scope.READ
    return Scope.MANAGE if any(p.search(path) for p in MANAGE_PATHS) else Scope.SUBMIT


def describe(token: ApiToken) -> str:
    expires = f", expires {token.expires_at:%Y-%m-%d %H:%M}" if token.expires_at else ""
    owner = f" of team {token.team.slug}" if token.team_id else ""
    return f"{token.name} ({token.prefix}…){owner}, scope {token.scope}{expires}"[:200]


def _audit(token: ApiToken, subject: str, *, actor, ip: str | None, old: str = "", new: str = "") -> None:
    AuditEntry.objects.create(team_id=token.team_id, actor=actor, subject=subject, old=old[:200], new=new[:200], ip=ip)


def token_create(*, user, name: str, scope: str = Scope.MANAGE, expires_at: datetime | None = None,
                 team: Team | None = None, created_by=None, ip: str | None = None) -> tuple[str, ApiToken]:
    raw = PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(user=user, team=team, created_by=created_by or user, name=name[:80] or "token",
                                    prefix=raw[:10], digest=ApiToken.hash(raw), scope=scope, expires_at=expires_at)
    _audit(token, "token.created", actor=created_by or user, ip=ip, new=describe(token))
    return raw, token


def service_account_create(*, team: Team, name: str, role: str, scope: str, expires_at: datetime | None,
                           actor, ip: str | None = None) -> tuple[str, ApiToken]:
    """A team's service account: a user of its own that cannot log in, a `role` member
    of `team` only, and its one token. Jobs it submits show that user."""
    User = get_user_model()
    base = f"svc-{team.slug}-{slugify(name) or 'token'}"[:140]
    username, n = base, 1
    while User.objects.filter(username=username).exists():
        n += 1
        username = f"{base}-{n}"
    with transaction.atomic():
        user = User(username=username)
        user.set_unusable_password()
        user.save()
        team_services.membership_set(team=team, user=user, role=role, actor=actor)
        return token_create(user=user, name=name, scope=scope, expires_at=expires_at, team=team, created_by=actor,
                            ip=ip)


def token_revoke(*, token: ApiToken, actor, ip: str | None = None) -> None:
    """Delete the token (clients using it are refused from now on, told it was revoked:
    its digest is kept as a RevokedToken, see jobs.models). A team's service
    account goes with it: out of the team, unable to act."""
    with transaction.atomic():
        _audit(token, "token.revoked", actor=actor, ip=ip, old=describe(token), new="revoked")
        token.delete()
        if token.team_id is not None:
            team_services.membership_change(team=token.team, user=token.user, role=None, actor=actor)
            get_user_model().objects.filter(pk=token.user_id).update(is_active=False)


def manageable_teams(user):
    """The teams whose service accounts `user` may create and revoke."""
    teams = Team.objects.all() if user.is_staff else Team.objects.filter(memberships__user=user,
                                                                          memberships__role=Role.MANAGER)
    return teams.order_by("slug")


def token_authenticate(raw: str, *, ip: str | None = None) -> ApiToken | None:
    """The token `raw` with its active user (one query), or None if `raw` is not of
    the shape tokens have. Raises TokenRevoked for a token that was revoked,
    TokenUnknown for one never issued (or whose user is deactivated), TokenExpired
    past its expiry. Its last use (time, address) is written at most once a minute
    per address, conditionally, so concurrent requests write it once."""
    if not raw or not raw.startswith(PREFIX):
        return None
    digest = ApiToken.hash(raw)
    token = ApiToken.objects.select_related("user").filter(digest=digest).first()
    if token is None:
        revoked = RevokedToken.objects.filter(digest=digest).first()
        if revoked is not None:
            raise TokenRevoked(f"This API token ({revoked.prefix}…) was revoked at {revoked.revoked_at:%Y-%m-%d %H:%M} "
                               "UTC: create a new one on the Tokens page.")
        raise TokenUnknown("This API token was never issued by this NeuronDeck (check that it was copied whole): "
                           "create one on the Tokens page.")
    if not token.user.is_active:
        raise TokenUnknown(f"This API token ({token.prefix}…) belongs to a deactivated account: "
                           "ask a site admin, or create a token of your own on the Tokens page.")
    now = timezone.now()
    if token.expires_at is not None and token.expires_at <= now:
        raise TokenExpired(f"This API token ({token.prefix}…) expired at {token.expires_at:%Y-%m-%d %H:%M} UTC: "
                           "create a new one on the Tokens page.")
    previous, previous_ip = token.last_used_at, token.last_used_ip
    if previous is None or now - previous >= LAST_USED_EVERY or previous_ip != ip:
        stale = Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - LAST_USED_EVERY)
        stale |= Q(last_used_ip__isnull=True) if ip is None else ~Q(last_used_ip=ip) | Q(last_used_ip__isnull=True)
        if ApiToken.objects.filter(stale, pk=token.pk).update(last_used_at=now, last_used_ip=ip):
            if previous is None or previous_ip != ip or now - previous >= USE_AUDITED_EVERY:
                _audit(token, "token.used", actor=token.user, ip=ip, new=describe(token))
        token.last_used_at, token.last_used_ip = now, ip
    return token


def require_scope(token: ApiToken, needed: str) -> None:
    if SCOPE_RANK[token.scope] < SCOPE_RANK[needed]:
        raise ScopeMissing(f"This API token has the {token.scope} scope; this request needs the {needed} scope. "
                           f"Create a token with the {needed} scope on the Tokens page.")


def token_user(raw: str):
    """The active user owning the unexpired token `raw`, or None (for callers that
    only read, such as /metrics)."""
    try:
        token = token_authenticate(raw)
    except TokenRefused:
        return None
    return token.user if token is not None else None
