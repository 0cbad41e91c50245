"""Single sign-on with OpenID Connect against a real provider started on localhost
(tests/oidc_provider.py: discovery, a login form, token endpoint with PKCE, userinfo,
JWKS, RS256-signed ID tokens): the full browser redirect flow in Chromium, and the same
flow driven over real HTTP with Django's test client; users created at first sign-in,
groups mapped to team roles and staff status at every sign-in, ID tokens that fail a
check refused, and password logins switched off with a superusers' break-glass."""
from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from django.contrib.auth import get_user_model
from django.test import Client

from conftest import PASSWORD, browser_page
from jobs.models import AuditEntry, Membership, Role, SsoIdentity
from jobs.teams import sso
from oidc_provider import Provider

GROUP_MAP = {"nd-vision-managers": "vision:manager", "nd-vision": "vision:member",
             "nd-audio": ["audio:viewer"], "nd-admins": "staff"}


def dana(groups: list[str], **claims) -> dict:
    return {"password": "idp-pw", "claims": {"sub": "u-7f3a", "email": "dana@corp.example",
                                             "preferred_username": "dana", "given_name": "Dana",
                                             "family_name": "Ng", "groups": groups, **claims}}


@pytest.fixture
def idp(settings):
    with Provider() as provider:
        settings.OIDC_ISSUER = provider.issuer
        settings.OIDC_RP_CLIENT_ID = provider.client_id
        settings.OIDC_RP_CLIENT_SECRET = provider.client_secret
        settings.OIDC_GROUP_MAP = GROUP_MAP
        sso._discovered.clear()
        yield provider
    sso._discovered.clear()


def sign_in(client: Client, idp: Provider, username: str, password: str = "idp-pw"):
    """The authorization code flow over real HTTP: this site redirects to the provider,
    the user signs in there (a POST of its form), the provider redirects back with a
    code, and this site exchanges it at the provider's token endpoint."""
    start = client.get("/sso/authenticate/")
    assert start.status_code == 302 and start["Location"].startswith(idp.issuer + "/authorize?")
    query = {k: v[-1] for k, v in parse_qs(urlsplit(start["Location"]).query).items()}
    assert query["scope"].split()[0] == "openid" and query["code_challenge_method"] == "S256" and query["nonce"]
    answer = requests.post(idp.issuer + "/authorize", data={**query, "username": username, "password": password},
                           allow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    back = urlsplit(answer.headers["Location"])
    assert back.path == "/sso/callback/"
    return client.get(f"{back.path}?{back.query}")


def roles(user) -> dict[str, str]:
    return dict(Membership.objects.filter(user=user).values_list("team__slug", "role"))


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_a_first_sign_in_in_the_browser_creates_the_user_with_teams_and_roles_from_groups(cast, idp, live_server,
                                                                                        browser):
    idp.users["dana"] = dana(["nd-vision-managers", "nd-vision", "nd-audio", "unmapped"])
    page = browser_page(browser, 390, 844)
    page.goto(f"{live_server.url}/login/")
    page.click("#sso-login")
    page.wait_for_url(re.compile(re.escape(idp.issuer) + "/authorize"))
    page.fill("#username", "dana")
    page.fill("#password", "idp-pw")
    page.click("#signin")
    page.wait_for_url(re.compile(r"/teams/[\w-]+/jobs/$"))
    assert page.locator(".user-name").inner_text() == "dana"
    user = get_user_model().objects.get(username="dana")
    assert not user.has_usable_password() and user.email == "dana@corp.example" and user.first_name == "Dana"
    assert roles(user) == {"vision": Role.MANAGER, "audio": Role.VIEWER}  # the highest role a group gives
    assert not user.is_staff
    assert SsoIdentity.objects.filter(user=user, issuer=idp.issuer, subject="u-7f3a").exists()
    assert AuditEntry.objects.filter(subject="login.succeeded", actor=user).exists()
    assert AuditEntry.objects.filter(subject="member.dana", team=cast.vision, new=Role.MANAGER).exists()
    # the console works for the new manager: the team page lists them
    page.goto(f"{live_server.url}/teams/vision/")
    assert "dana" in page.content()
    page.context.close()


def test_at_the_next_sign_in_removed_groups_remove_memberships_and_new_ones_add_them(cast, idp):
    idp.users["dana"] = dana(["nd-vision-managers", "nd-audio"])
    assert sign_in(Client(), idp, "dana").status_code == 302
    user = get_user_model().objects.get(username="dana")
    Membership.objects.create(team=cast.audio.__class__.objects.create(slug="local", name="Local"), user=user,
                              role=Role.MEMBER)  # a team the map does not name: managed in the console
    idp.users["dana"] = dana(["nd-vision", "nd-admins"])
    client = Client()
    response = sign_in(client, idp, "dana")
    assert response.status_code == 302 and not response["Location"].startswith("/login")
    user.refresh_from_db()
    assert roles(user) == {"vision": Role.MEMBER, "local": Role.MEMBER}
    assert user.is_staff and client.get("/quotas/").status_code == 200
    assert AuditEntry.objects.filter(subject="member.dana", team=cast.audio, old=Role.VIEWER, new="removed").exists()
    assert AuditEntry.objects.filter(subject="staff.dana", new="staff").exists()
    assert get_user_model().objects.filter(username__startswith="dana").count() == 1  # the same user again

    idp.users["dana"] = dana([])
    sign_in(Client(), idp, "dana")
    user.refresh_from_db()
    assert roles(user) == {"local": Role.MEMBER} and not user.is_staff


def test_a_user_is_found_by_the_providers_subject_never_by_email(cast, idp):
    idp.users["mallory"] = {"password": "idp-pw", "claims": {"sub": "u-other", "email": "bob@example.com",
                                                             "preferred_username": "bob", "groups": []}}
    client = Client()
    assert sign_in(client, idp, "mallory").status_code == 302
    created = get_user_model().objects.get(sso_identities__subject="u-other")
    assert created.pk != cast.bob.pk and created.username == "bob-2"  # bob's name is taken here
    assert client.get("/api/v1/teams").json() == []  # none of bob's teams
    # the same subject with a new address and name is the same user, updated
    idp.users["mallory"]["claims"].update(email="m@corp.example", preferred_username="mallory")
    sign_in(Client(), idp, "mallory")
    created.refresh_from_db()
    assert created.email == "m@corp.example" and created.username == "bob-2"


@pytest.mark.parametrize("tamper", ["audience", "issuer", "signature", "expired", "nonce"])
def test_an_id_token_that_fails_a_check_signs_nobody_in(cast, idp, tamper):
    idp.users["dana"] = dana(["nd-vision"])
    idp.tamper = tamper
    client = Client()
    response = sign_in(client, idp, "dana")
    assert response.status_code == 302 and response["Location"] == "/login/"
    page = client.get("/login/").content.decode()
    assert "Single sign-on did not sign you in" in page
    assert not get_user_model().objects.filter(username="dana").exists()
    assert client.get("/tokens/").status_code == 302  # not signed in


def test_a_code_is_good_once_and_a_state_from_another_browser_is_refused(cast, idp):
    idp.users["dana"] = dana(["nd-vision"])
    first = Client()
    start = first.get("/sso/authenticate/")
    query = {k: v[-1] for k, v in parse_qs(urlsplit(start["Location"]).query).items()}
    answer = requests.post(idp.issuer + "/authorize", data={**query, "username": "dana", "password": "idp-pw"},
                           allow_redirects=False, timeout=10)
    callback = urlsplit(answer.headers["Location"])
    other = Client()  # an attacker's browser with the victim's code: no state in its session
    assert other.get(f"{callback.path}?{callback.query}")["Location"] == "/login/"
    assert first.get(f"{callback.path}?{callback.query}").status_code == 302
    assert first.get("/tokens/").status_code == 200
    assert first.get(f"{callback.path}?{callback.query}")["Location"] == "/login/"  # replayed: state used up


def test_with_the_provider_down_sign_in_says_so_and_passwords_still_work(cast, settings):
    settings.OIDC_ISSUER, settings.OIDC_RP_CLIENT_ID = "http://127.0.0.1:9", "neurondeck"  # nothing listens
    sso._discovered.clear()
    client = Client()
    response = client.get("/sso/authenticate/")
    assert response.status_code == 302 and response["Location"] == "/login/"
    assert "Single sign-on is unavailable right now" in client.get("/login/").content.decode()
    assert client.post("/login/", {"username": "bob", "password": PASSWORD}).status_code == 302
    assert client.get("/tokens/").status_code == 200


def test_with_password_logins_off_only_superusers_log_in_with_a_password_at_the_break_glass_form(cast, idp,
                                                                                                settings):
    settings.PASSWORD_LOGIN = False
    page = Client().get("/login/").content.decode()
    assert 'id="sso-login"' in page and 'name="password"' not in page
    bob = Client()
    bob.post("/login/", {"username": "bob", "password": PASSWORD})
    assert bob.get("/tokens/").status_code == 302  # refused
    staff = get_user_model().objects.create_user("stan", password=PASSWORD, is_staff=True)
    assert staff.is_staff and not staff.is_superuser
    admin_login = Client()
    admin_login.post("/admin/login/", {"username": "stan", "password": PASSWORD, "next": "/admin/"})
    assert admin_login.get("/admin/").status_code == 302  # the admin's form is a password login too
    break_glass = Client().get("/login/?local=1").content.decode()
    assert 'name="password"' in break_glass and "superusers" in break_glass
    admin = Client()
    assert admin.post("/login/?local=1", {"username": "admin", "password": PASSWORD}).status_code == 302
    assert admin.get("/quotas/").status_code == 200
    idp.users["dana"] = dana(["nd-vision"])
    assert sign_in(Client(), idp, "dana")["Location"] != "/login/"  # single sign-on is the way in


def test_a_bad_group_map_is_named_by_manage_py_check(settings):
    settings.OIDC_GROUP_MAP = {"nd-x": "vision:owner"}
    errors = sso.check_sso_settings()
    assert errors and "nd-x" in errors[0].msg and "owner" in errors[0].msg
    settings.OIDC_GROUP_MAP = {"nd-x": ["vision:manager", "staff"]}
    assert sso.check_sso_settings() == []


def test_a_group_change_that_would_leave_a_team_without_a_manager_is_skipped(cast, settings):
    settings.OIDC_GROUP_MAP = {"nd-audio-leads": "audio:manager", "nd-vision": "vision:member"}
    sso.memberships_sync(cast.charlie, {"nd-vision"})  # charlie is audio's only manager
    assert roles(cast.charlie) == {"audio": Role.MANAGER, "vision": Role.MEMBER}
