"""API tokens: scopes (read < submit < manage) checked before any endpoint runs, expiry,
team service accounts for CI, last use shown, and creation / use / revocation audited.
Tokens made before scopes existed keep the full scope."""
from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from jobs.models import ApiToken, AuditEntry, Membership, RevokedToken, Role
from jobs.teams import tokens
from jobs.teams.services import membership_change


def bearer(raw: str, ip: str = "10.2.0.1") -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}", REMOTE_ADDR=ip)


def token_of(user, scope: str = "manage", **kwargs) -> str:
    return tokens.token_create(user=user, name="t", scope=scope, **kwargs)[0]


def submit(client: Client):
    # a body the submit refuses on its own (no such model): reaching it at all is what matters
    return client.post("/api/v1/jobs", json.dumps({"team": "vision", "kind": "inference", "family": "cpu", "cores": 1,
                                                  "model": 999999, "prompts": ["hi"]}), content_type="application/json")


def patch_quota(client: Client):
    return client.patch("/api/v1/teams/vision/quota", json.dumps({"max_pending": 7}), content_type="application/json")


def test_a_read_token_reads_but_a_submit_is_a_403_naming_the_missing_scope(cast):
    client = bearer(token_of(cast.bob, "read"))
    assert client.get("/api/v1/jobs?team=vision").status_code == 200
    response = submit(client)
    assert response.status_code == 403
    body = response.json()
    assert body["code"] == "token_scope" and "needs the submit scope" in body["detail"]
    assert "has the read scope" in body["detail"]


def test_a_submit_token_reaches_the_submit_but_not_team_settings(cast):
    client = bearer(token_of(cast.admin, "submit"))
    assert submit(client).status_code not in (401, 403)  # the submit itself answers (the model does not exist)
    response = patch_quota(client)
    assert response.status_code == 403 and "needs the manage scope" in response.json()["detail"]
    assert patch_quota(bearer(token_of(cast.admin, "manage"))).status_code == 200


def test_a_scope_never_exceeds_the_users_role(cast):
    response = submit(bearer(token_of(cast.vera, "manage")))  # vera is a viewer
    assert response.status_code == 403 and "viewer" in response.json()["detail"]


def test_an_expired_token_is_a_401_saying_it_expired(cast):
    raw = token_of(cast.bob, "read", expires_at=timezone.now() - timedelta(minutes=1))
    response = bearer(raw).get("/api/v1/jobs?team=vision")
    assert response.status_code == 401
    assert response.json()["code"] == "token_expired" and "expired" in response.json()["detail"]
    assert 'error="invalid_token"' in response["WWW-Authenticate"]
    assert submit(bearer(raw)).status_code == 401  # a write too: expiry before scope, and never a CSRF 403


def test_a_token_not_yet_expired_works(cast):
    raw = token_of(cast.bob, "read", expires_at=timezone.now() + timedelta(days=1))
    assert bearer(raw).get("/api/v1/jobs?team=vision").status_code == 200


def test_a_token_made_before_scopes_existed_keeps_the_full_scope(cast):
    # what migration 0018 gives an existing row: the field's default
    raw = "nd_" + "x" * 43
    token = ApiToken.objects.create(user=cast.admin, name="old", prefix=raw[:10], digest=ApiToken.hash(raw))
    assert token.scope == "manage" and token.expires_at is None
    assert patch_quota(bearer(raw)).status_code == 200


def test_creation_use_and_revocation_are_audited_with_the_address(cast):
    raw, token = tokens.token_create(user=cast.bob, name="laptop", scope="read", ip="10.3.0.1")
    bearer(raw, ip="10.3.0.2").get("/api/v1/jobs?team=vision")
    bearer(raw, ip="10.3.0.2").get("/api/v1/jobs?team=vision")  # the same minute and address: no new entry
    bearer(raw, ip="10.3.0.3").get("/api/v1/jobs?team=vision")  # a new address: audited
    tokens.token_revoke(token=token, actor=cast.bob, ip="10.3.0.4")
    trail = list(AuditEntry.objects.filter(subject__startswith="token.").order_by("id")
                 .values_list("subject", "actor__username", "ip"))
    assert trail == [("token.created", "bob", "10.3.0.1"), ("token.used", "bob", "10.3.0.2"),
                     ("token.used", "bob", "10.3.0.3"), ("token.revoked", "bob", "10.3.0.4")]
    assert "laptop" in AuditEntry.objects.get(subject="token.created").new
    assert bearer(raw).get("/api/v1/jobs?team=vision").status_code == 401


def test_the_tokens_page_shows_scope_expiry_and_last_use_with_its_address(cast, client):
    raw, _ = tokens.token_create(user=cast.bob, name="ci-read", scope="read",
                                 expires_at=timezone.now() + timedelta(days=30))
    bearer(raw, ip="10.4.0.9").get("/api/v1/jobs?team=vision")
    client.force_login(cast.bob)
    page = client.get("/tokens/").content.decode()
    row = re.search(r"<tr><td>ci-read</td>.*?</tr>", page, re.S).group(0)
    assert "read" in row and "from 10.4.0.9" in row and "never" not in row


def test_a_token_is_created_on_the_page_with_its_scope_and_expiry(cast, client):
    client.force_login(cast.bob)
    response = client.post("/tokens/", {"name": "ci", "scope": "read", "expires": "7"})
    assert response.status_code == 200 and 'id="new-token"' in response.content.decode()
    token = ApiToken.objects.get(user=cast.bob, name="ci")
    assert token.scope == "read" and timedelta(days=6) < token.expires_at - timezone.now() <= timedelta(days=7)
    client.post("/tokens/", {"name": "forever", "expires": "never"})
    assert ApiToken.objects.get(name="forever").expires_at is None


# --- team service accounts ------------------------------------------------------------

def create_service_token(client: Client, **fields) -> str:
    data = {"svc-team": "vision", "svc-name": "Nightly build", "svc-role": "member", "svc-scope": "submit",
            "svc-expires": "90", **fields}
    response = client.post("/tokens/", data)
    assert response.status_code == 200, response.content.decode()[-2000:]
    return re.search(r'id="new-token">(nd_[^<]+)<', response.content.decode()).group(1)


def test_a_manager_creates_a_team_service_account_that_acts_in_that_team_only(cast, client):
    client.force_login(cast.alice)
    raw = create_service_token(client)
    token = ApiToken.objects.select_related("user").get(team=cast.vision)
    assert token.user.username == "svc-vision-nightly-build" and not token.user.has_usable_password()
    assert token.created_by == cast.alice and token.scope == "submit"
    assert Membership.objects.get(user=token.user).team == cast.vision
    api = bearer(raw)
    assert [t["slug"] for t in api.get("/api/v1/teams").json()] == ["vision"]
    assert api.get("/api/v1/jobs?team=audio").status_code in (400, 404)
    assert submit(api).status_code not in (401, 403)
    # it belongs to the team, not to alice: it keeps working when she leaves
    membership_change(team=cast.vision, user=cast.bob, role=Role.MANAGER, actor=cast.admin)
    membership_change(team=cast.vision, user=cast.alice, role=None, actor=cast.admin)
    assert api.get("/api/v1/jobs?team=vision").status_code == 200
    assert AuditEntry.objects.filter(subject="token.created", team=cast.vision, actor=cast.alice).exists()


def test_only_the_teams_managers_see_and_revoke_its_service_tokens(cast, client):
    client.force_login(cast.alice)
    raw = create_service_token(client)
    token = ApiToken.objects.get(team=cast.vision)
    for outsider in (cast.bob, cast.charlie):
        other = Client()
        other.force_login(outsider)
        assert "Nightly build" not in other.get("/tokens/").content.decode()
        assert other.post(f"/tokens/{token.pk}/delete/").status_code == 404
    assert "Nightly build" in client.get("/tokens/").content.decode()
    assert client.post(f"/tokens/{token.pk}/delete/").status_code == 302
    assert bearer(raw).get("/api/v1/jobs?team=vision").status_code == 401
    service_user = get_user_model().objects.get(username="svc-vision-nightly-build")
    assert not service_user.is_active and not Membership.objects.filter(user=service_user).exists()
    assert AuditEntry.objects.filter(subject="token.revoked", team=cast.vision, actor=cast.alice).exists()


def test_a_member_cannot_create_a_service_account(cast, client):
    client.force_login(cast.bob)
    assert 'name="svc-team"' not in client.get("/tokens/").content.decode()
    response = client.post("/tokens/", {"svc-team": "vision", "svc-name": "x", "svc-role": "member"})
    assert response.status_code == 400 and not ApiToken.objects.filter(team__isnull=False).exists()


def test_a_service_account_cannot_log_in(cast, client):
    client.force_login(cast.alice)
    create_service_token(client)
    response = Client().post("/login/", {"username": "svc-vision-nightly-build", "password": ""}, REMOTE_ADDR="10.5.0.1")
    assert response.status_code == 200 and "_auth_user_id" not in response.client.session


@pytest.mark.parametrize("method, path, scope", [
    ("GET", "/api/v1/jobs", "read"), ("HEAD", "/api/v1/jobs/1", "read"),
    ("POST", "/api/v1/jobs", "submit"), ("POST", "/api/v1/jobs/3/cancel", "submit"), ("POST", "/api/v1/models", "submit"),
    ("PATCH", "/api/v1/teams/vision/quota", "manage"), ("PUT", "/api/v1/compile-cache/4/pin", "manage"),
    ("PUT", "/api/v1/teams/vision/compile-cache-policy", "manage"),
])
def test_the_scope_a_request_needs(method, path, scope):
    assert tokens.scope_needed(method, path) == scope


# --- revoked or never issued ------------------------------------------------------------

def test_a_revoked_token_is_a_401_saying_it_was_revoked(cast, client):
    raw, token = tokens.token_create(user=cast.bob, name="laptop", scope="submit")
    client.force_login(cast.bob)
    assert client.post(f"/tokens/{token.pk}/delete/").status_code == 302
    for response in (bearer(raw).get("/api/v1/jobs?team=vision"), submit(bearer(raw))):
        assert response.status_code == 401
        body = response.json()
        assert body["code"] == "token_revoked" and "was revoked" in body["detail"] and raw[:10] in body["detail"]
        assert 'error_description="token_revoked"' in response["WWW-Authenticate"]


def test_a_never_issued_token_is_a_401_saying_so_not_revoked(cast):
    tokens.token_revoke(token=tokens.token_create(user=cast.bob, name="other")[1], actor=cast.bob)
    response = bearer("nd_" + "q" * 43).get("/api/v1/jobs?team=vision")
    assert response.status_code == 401
    body = response.json()
    assert body["code"] == "token_unknown" and "never issued" in body["detail"] and "revoked" not in body["detail"]


def test_only_the_digest_of_a_revoked_token_is_kept(cast):
    raw, token = tokens.token_create(user=cast.bob, name="laptop")
    tokens.token_revoke(token=token, actor=cast.bob)
    record = RevokedToken.objects.get()
    assert record.digest == ApiToken.hash(raw) and record.prefix == raw[:10]
    stored = " ".join(str(value) for value in RevokedToken.objects.values_list().get())
    assert raw not in stored and raw[10:] not in stored


def test_a_token_deleted_with_its_user_or_in_the_admin_is_revoked_too(cast):
    raw_admin, token = tokens.token_create(user=cast.bob, name="via admin")
    ApiToken.objects.filter(pk=token.pk).delete()
    raw_user = tokens.token_create(user=cast.charlie, name="with the user")[0]
    cast.charlie.delete()
    for raw in (raw_admin, raw_user):
        assert bearer(raw).get("/api/v1/jobs").json()["code"] == "token_revoked"


def test_a_token_of_a_deactivated_account_is_a_401_saying_so(cast):
    raw = token_of(cast.bob, "read")
    get_user_model().objects.filter(pk=cast.bob.pk).update(is_active=False)
    response = bearer(raw).get("/api/v1/jobs")
    assert response.status_code == 401 and "deactivated" in response.json()["detail"]
