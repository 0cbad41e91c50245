"""Single sign-on with OpenID Connect, on mozilla-django-oidc's authorization code flow
(with PKCE and a nonce), and the rule for password logins.

- The provider's endpoints come from its discovery document, read at the first sign-in
  and kept (`provider()`), unless the settings name them; nothing here contacts the
  provider while a password login is checked.
- The ID token is checked for its signature (the provider's JWKS), issuer, audience
  (this client), expiry and nonce.
- A user is found by the provider's issuer + subject (SsoIdentity), created at first
  sign-in with an unusable password; e-mail and names follow the provider.
- At every sign-in the user's groups (claim OIDC_GROUPS_CLAIM) set their roles in the
  teams OIDC_GROUP_MAP names, the highest role when several groups map to one team; a
  team the map names but the user's groups do not is left (membership removed). Teams
  the map does not name are managed in the console as before. A "staff" entry makes
  staff status follow the groups too. Changes are audited like the console's.
- PASSWORD_LOGIN=0: only superusers may log in with a password (break-glass).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import jwt
import requests
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.core import checks
from django.core.exceptions import SuspiciousOperation
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from mozilla_django_oidc.auth import OIDCAuthenticationBackend
from mozilla_django_oidc.views import OIDCAuthenticationCallbackView, OIDCAuthenticationRequestView

from jobs.models import AuditEntry, Role, SsoIdentity, Team
from jobs.teams import services as team_services

log = logging.getLogger(__name__)

ROLE_RANK = {Role.VIEWER: 0, Role.MEMBER: 1, Role.MANAGER: 2}
STAFF = "staff"


# --- configuration --------------------------------------------------------------------

def enabled() -> bool:
    return bool(settings.OIDC_ISSUER and settings.OIDC_RP_CLIENT_ID)


@dataclass(frozen=True)
class Grant:
    """What one group gives: a role in a team, or staff status (team None)."""

    team: str | None
    role: str | None = None


def group_grants() -> dict[str, list[Grant]]:
    """OIDC_GROUP_MAP parsed: group -> grants. Raises ValueError naming a bad entry."""
    raw = settings.OIDC_GROUP_MAP
    if not isinstance(raw, dict):
        raise ValueError("OIDC_GROUP_MAP must be a JSON object: {\"<group>\": \"<team>:<role>\" or \"staff\"}")
    grants: dict[str, list[Grant]] = {}
    for group, value in raw.items():
        for item in value if isinstance(value, list) else [value]:
            if item == STAFF:
                grants.setdefault(group, []).append(Grant(None))
                continue
            slug, _, role = str(item).partition(":")
            if not slug or role not in ROLE_RANK:
                raise ValueError(f"OIDC_GROUP_MAP[{group!r}]: {item!r} is not \"<team slug>:<role>\" with a role of "
                                 f"{', '.join(ROLE_RANK)}, nor \"staff\"")
            grants.setdefault(group, []).append(Grant(slug, role))
    return grants


@checks.register(checks.Tags.security)
def check_sso_settings(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """`manage.py check` (and every start of the web app) names a bad OIDC_GROUP_MAP."""
    try:
        group_grants()
    except ValueError as exc:
        return [checks.Error(str(exc), id="neurondeck.E001")]
    if settings.OIDC_ISSUER and not settings.OIDC_RP_CLIENT_ID:
        return [checks.Error("OIDC_ISSUER is set but OIDC_CLIENT_ID is not", id="neurondeck.E002")]
    if not settings.PASSWORD_LOGIN and not enabled():
        return [checks.Warning("PASSWORD_LOGIN is off and single sign-on is not configured: only superusers "
                               "can log in (at /login/?local=1)", id="neurondeck.W001")]
    return []


class ProviderUnavailable(Exception):
    """The identity provider's discovery document could not be read."""


@dataclass(frozen=True)
class Provider:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    userinfo_endpoint: str
    jwks_uri: str


_discovered: dict[str, dict] = {}


def _discovery(issuer: str) -> dict:
    if issuer not in _discovered:
        url = issuer + "/.well-known/openid-configuration"
        try:
            response = requests.get(url, timeout=settings.OIDC_TIMEOUT)
            response.raise_for_status()
            document = response.json()
        except (requests.RequestException, ValueError) as exc:
            raise ProviderUnavailable(f"the identity provider's discovery document ({url}) cannot be read: "
                                      f"{exc}") from exc
        if document.get("issuer", "").rstrip("/") != issuer:  # OpenID Connect Discovery 1.0, section 4.3
            raise ProviderUnavailable(f"the discovery document at {url} names another issuer "
                                      f"({document.get('issuer')!r})")
        _discovered[issuer] = document
    return _discovered[issuer]


def provider() -> Provider:
    """The provider's endpoints: each from the settings if set, else from discovery."""
    explicit = {"authorization_endpoint": settings.OIDC_OP_AUTHORIZATION_ENDPOINT,
                "token_endpoint": settings.OIDC_OP_TOKEN_ENDPOINT,
                "userinfo_endpoint": settings.OIDC_OP_USER_ENDPOINT, "jwks_uri": settings.OIDC_OP_JWKS_ENDPOINT}
    if not all(explicit.values()):
        document = _discovery(settings.OIDC_ISSUER)
        explicit = {key: value or document.get(key, "") for key, value in explicit.items()}
    missing = [key for key in ("authorization_endpoint", "token_endpoint", "jwks_uri") if not explicit[key]]
    if missing:
        raise ProviderUnavailable(f"the identity provider names no {', '.join(missing)}")
    return Provider(issuer=settings.OIDC_ISSUER, **explicit)


# --- password logins ----------------------------------------------------------------------

def password_login_allowed(user) -> bool:
    return settings.PASSWORD_LOGIN or user.is_superuser


class PasswordBackend(ModelBackend):
    """Django's username + password check (the login form and the admin's), refused
    while PASSWORD_LOGIN is off unless the user is a superuser (break-glass)."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        user = super().authenticate(request, username=username, password=password, **kwargs)
        return user if user is not None and password_login_allowed(user) else None


def login_context(request: HttpRequest) -> dict:
    """What the login page shows: the sign-in button, and the password form unless
    password logins are off (then only at ?local=1, for superusers)."""
    local = "local" in request.GET or "local" in request.POST
    return {"sso_enabled": enabled(), "sso_name": settings.OIDC_PROVIDER_NAME,
            "password_form": settings.PASSWORD_LOGIN or local, "break_glass": not settings.PASSWORD_LOGIN and local}


# --- the sign-in flow ----------------------------------------------------------------------

class SsoStart(OIDCAuthenticationRequestView):
    """/sso/authenticate/: redirect to the provider's authorization endpoint."""

    def __init__(self, **kwargs):
        super(OIDCAuthenticationRequestView, self).__init__(**kwargs)  # endpoints are read per request

    def get(self, request: HttpRequest) -> HttpResponse:
        if not enabled():
            messages.error(request, "Single sign-on is not configured on this site.")
            return redirect("login")
        try:
            self.OIDC_OP_AUTH_ENDPOINT = provider().authorization_endpoint
        except ProviderUnavailable as exc:
            log.warning("single sign-on unavailable: %s", exc)
            messages.error(request, f"Single sign-on is unavailable right now: {exc}.")
            return redirect("login")
        self.OIDC_RP_CLIENT_ID = settings.OIDC_RP_CLIENT_ID
        return super().get(request)


class SsoCallback(OIDCAuthenticationCallbackView):
    """/sso/callback/: the provider sends the browser back here with a code. Whatever
    goes wrong (a token that fails a check, a state that is not this browser's, the
    provider unreachable) ends on the login page with a sentence, never a 4xx/5xx page."""

    def get(self, request: HttpRequest) -> HttpResponse:
        try:
            return super().get(request)
        except (SuspiciousOperation, ProviderUnavailable, requests.RequestException) as exc:
            log.warning("single sign-on refused: %s", exc)
            return self.login_failure()

    def login_failure(self) -> HttpResponse:
        messages.error(self.request, "Single sign-on did not sign you in: the provider refused, the sign-in took "
                                     "too long, or your account here is deactivated. Try again.")
        return super().login_failure()


class SsoBackend(OIDCAuthenticationBackend):
    """Authenticates the /sso/callback/ request: code -> tokens at the provider, the ID
    token checked, the user found or created, their teams and roles set from groups."""

    def __init__(self, *args, **kwargs):
        # The library reads the endpoints here; Django makes a backend for every
        # authenticate() call, password logins included, so they are read in
        # authenticate() instead, only for a callback.
        self.UserModel = get_user_model()

    def authenticate(self, request, **kwargs):
        if request is None or not enabled() or "code" not in request.GET or "state" not in request.GET:
            return None
        endpoints = provider()
        self.OIDC_OP_TOKEN_ENDPOINT = endpoints.token_endpoint
        self.OIDC_OP_USER_ENDPOINT = endpoints.userinfo_endpoint
        self.OIDC_OP_JWKS_ENDPOINT = endpoints.jwks_uri
        self.OIDC_RP_CLIENT_ID = settings.OIDC_RP_CLIENT_ID
        self.OIDC_RP_CLIENT_SECRET = settings.OIDC_RP_CLIENT_SECRET
        self.OIDC_RP_SIGN_ALGO = settings.OIDC_RP_SIGN_ALGO
        self.OIDC_RP_IDP_SIGN_KEY = None
        return super().authenticate(request, **kwargs)

    def _verify_jws(self, payload, key):
        """The signature as the library checks it, plus what it leaves out: the issuer,
        the audience (this client) and the required claims."""
        algorithm = jwt.get_unverified_header(payload).get("alg")
        if algorithm != self.OIDC_RP_SIGN_ALGO:
            raise SuspiciousOperation(f"ID token signed with {algorithm!r}, not {self.OIDC_RP_SIGN_ALGO}")
        try:
            return jwt.decode(payload, key, algorithms=[algorithm], audience=self.OIDC_RP_CLIENT_ID,
                              issuer=settings.OIDC_ISSUER, options={"require": ["exp", "iat", "iss", "aud", "sub"]})
        except jwt.InvalidTokenError as exc:
            raise SuspiciousOperation(f"ID token refused: {exc}") from exc

    def get_userinfo(self, access_token, id_token, payload):
        """The ID token's claims, completed by the userinfo endpoint's (same subject)."""
        claims = dict(payload)
        if self.OIDC_OP_USER_ENDPOINT:
            extra = super().get_userinfo(access_token, id_token, payload)
            if extra.get("sub") != payload["sub"]:
                raise SuspiciousOperation("the userinfo endpoint answered for another subject")
            claims.update(extra)
        claims["iss"] = payload["iss"]
        return claims

    def verify_claims(self, claims) -> bool:
        return bool(claims.get("sub"))

    def filter_users_by_claims(self, claims):
        return self.UserModel.objects.filter(sso_identities__issuer=claims["iss"],
                                             sso_identities__subject=claims["sub"])

    def create_user(self, claims):
        with transaction.atomic():
            user = self.UserModel(username=free_username(claims))
            user.set_unusable_password()
            user.save()
            SsoIdentity.objects.create(user=user, issuer=claims["iss"], subject=claims["sub"])
            AuditEntry.objects.create(team=None, actor=user, subject="login.sso_created", new=user.username,
                                      ip=None)
        return self.update_user(user, claims)

    def update_user(self, user, claims):
        fields = {"email": claims.get("email", user.email)[:254],
                  "first_name": claims.get("given_name", user.first_name)[:150],
                  "last_name": claims.get("family_name", user.last_name)[:150]}
        changed = [name for name, value in fields.items() if getattr(user, name) != value]
        for name in changed:
            setattr(user, name, fields[name])
        if changed:
            user.save(update_fields=changed)
        memberships_sync(user, groups_of(claims))
        return user


def groups_of(claims: dict) -> set[str]:
    value = claims.get(settings.OIDC_GROUPS_CLAIM) or []
    return {value} if isinstance(value, str) else {str(group) for group in value}


def free_username(claims: dict) -> str:
    """A username from the provider's preferred_username (or the e-mail's local part),
    made unique here with a number."""
    wanted = claims.get("preferred_username") or (claims.get("email") or "").split("@")[0] or "user"
    base = re.sub(r"[^\w.@+-]", "-", str(wanted))[:140] or "user"
    username, n = base, 1
    User = get_user_model()
    while User.objects.filter(username=username).exists():
        n += 1
        username = f"{base}-{n}"
    return username


def memberships_sync(user, groups: set[str]) -> None:
    """Set `user`'s roles in the teams the group map names from their `groups` (the
    highest role a group gives; none: removed), and staff status if the map has a
    staff entry. A change that would leave a team without a manager is skipped and
    logged. Audited as the console's changes are (actor: nobody, i.e. the provider)."""
    grants = group_grants()
    wanted: dict[str, str] = {}
    managed: set[str] = set()
    staff_managed = staff = False
    for group, items in grants.items():
        for grant in items:
            if grant.team is None:
                staff_managed = True
                staff = staff or group in groups
                continue
            managed.add(grant.team)
            if group in groups and ROLE_RANK[grant.role] > ROLE_RANK.get(wanted.get(grant.team), -1):
                wanted[grant.team] = grant.role
    teams = {team.slug: team for team in Team.objects.filter(slug__in=managed)}
    current = dict(user.memberships.filter(team__slug__in=managed).values_list("team__slug", "role"))
    for slug in sorted(managed):
        if slug not in teams:
            log.warning("OIDC_GROUP_MAP names team %r, which does not exist", slug)
            continue
        if current.get(slug) != wanted.get(slug):
            try:
                team_services.membership_change(team=teams[slug], user=user, role=wanted.get(slug))
            except team_services.MembershipError as exc:
                log.warning("single sign-on left %s in team %s: %s", user.username, slug, exc)
    if staff_managed and user.is_staff != staff:
        get_user_model().objects.filter(pk=user.pk).update(is_staff=staff)
        AuditEntry.objects.create(team=None, actor=None, subject=f"staff.{user.username}",
                                  old="staff" if user.is_staff else "", new="staff" if staff else "removed")
        user.is_staff = staff
