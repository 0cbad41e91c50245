"""Logins: Argon2 hashing (old hashes upgraded at login), throttling and lockout of
repeated failures per username and per address (django-axes), the lockout's message
on the page and to JSON clients, and an audit entry for each."""
from __future__ import annotations

import pytest
from django.contrib.auth.hashers import make_password
from django.test import Client

import webapp.settings as project_settings
from jobs.models import AuditEntry
from tests.conftest import PASSWORD

LIMIT = project_settings.LOGIN_FAILURE_LIMIT


def post_login(username: str, password: str, ip: str = "10.0.0.1", **headers):
    return Client().post("/login/", {"username": username, "password": password}, REMOTE_ADDR=ip, **headers)


def test_the_project_hashes_new_passwords_with_argon2(cast, settings, django_user_model):
    settings.PASSWORD_HASHERS = project_settings.PASSWORD_HASHERS
    user = django_user_model.objects.create_user("dora", password="a-long-passphrase")
    assert user.password.startswith("argon2$")
    assert user.check_password("a-long-passphrase") and not user.check_password("wrong")


def test_an_old_pbkdf2_hash_is_upgraded_to_argon2_at_login(cast, settings):
    settings.PASSWORD_HASHERS = project_settings.PASSWORD_HASHERS
    cast.bob.password = make_password(PASSWORD, hasher="pbkdf2_sha256")
    cast.bob.save(update_fields=["password"])
    response = post_login("bob", PASSWORD)
    assert response.status_code == 302
    cast.bob.refresh_from_db()
    assert cast.bob.password.startswith("argon2$")


def test_a_login_and_a_failure_are_audited_with_the_address(cast):
    assert post_login("bob", PASSWORD, ip="10.1.2.3").status_code == 302
    assert post_login("bob", "nope", ip="10.1.2.4").status_code == 200
    ok, failed = AuditEntry.objects.filter(subject__startswith="login.").order_by("id")
    assert (ok.subject, ok.actor, ok.ip, ok.team) == ("login.succeeded", cast.bob, "10.1.2.3", None)
    assert (failed.subject, failed.actor, failed.new, failed.ip) == ("login.failed", cast.bob, "bob", "10.1.2.4")


def test_repeated_failures_lock_the_username_out_from_any_address(cast):
    for i in range(LIMIT - 1):
        assert post_login("bob", "nope", ip=f"10.0.1.{i}").status_code == 200
    locked = post_login("bob", "nope", ip="10.0.1.99")
    assert locked.status_code == 429
    assert b"Too many failed logins" in locked.content and locked["Retry-After"]
    # the right password from a fresh address is refused too, and bob stays logged out
    refused = post_login("bob", PASSWORD, ip="10.9.9.9")
    assert refused.status_code == 429 and "_auth_user_id" not in refused.client.session
    assert AuditEntry.objects.filter(subject="login.locked_out", actor=cast.bob).exists()
    # other users are not affected
    assert post_login("alice", PASSWORD, ip="10.9.9.8").status_code == 302


def test_repeated_failures_from_one_address_lock_that_address_out(cast):
    for i in range(LIMIT):
        post_login(f"guess{i}", "nope", ip="10.0.2.1")
    assert post_login("alice", PASSWORD, ip="10.0.2.1").status_code == 429
    assert post_login("alice", PASSWORD, ip="10.0.2.2").status_code == 302
    entry = AuditEntry.objects.filter(subject="login.locked_out").first()
    assert entry.ip == "10.0.2.1"


def test_a_json_client_is_told_it_is_locked_out_in_json(cast):
    for _ in range(LIMIT):
        post_login("bob", "nope", ip="10.0.3.1")
    response = post_login("bob", PASSWORD, ip="10.0.3.1", HTTP_ACCEPT="application/json")
    assert response.status_code == 429
    body = response.json()
    assert body["code"] == "login_locked_out" and "Too many failed logins" in body["detail"]
    assert body["retry_after_s"] == project_settings.LOGIN_LOCKOUT_MINUTES * 60


def test_a_success_before_the_limit_clears_the_usernames_failures(cast):
    for _ in range(LIMIT - 1):
        post_login("bob", "nope", ip="10.0.4.1")
    assert post_login("bob", PASSWORD, ip="10.0.4.2").status_code == 302
    for _ in range(LIMIT - 1):
        post_login("bob", "nope", ip="10.0.4.3")
    assert post_login("bob", PASSWORD, ip="10.0.4.4").status_code == 302


@pytest.mark.parametrize("count, forwarded, expected", [
    (0, "1.1.1.1", "127.0.0.1"),  # no trusted proxy: the header is the client's own words
    (1, "1.1.1.1, 2.2.2.2", "2.2.2.2"),
    (2, "1.1.1.1, 2.2.2.2", "1.1.1.1"),
    (1, "not-an-address", None),
])
def test_the_client_address_honours_only_the_trusted_proxies(settings, rf, count, forwarded, expected):
    from jobs.teams.logins import client_ip

    settings.TRUSTED_PROXY_COUNT = count
    assert client_ip(rf.get("/", HTTP_X_FORWARDED_FOR=forwarded, REMOTE_ADDR="127.0.0.1")) == expected


@pytest.mark.parametrize("username", ["x" * 5000, "a\x00b", "é" * 300])
def test_a_hostile_username_is_a_failed_login_not_a_500(cast, username):
    response = post_login(username, "nope", ip="10.0.5.1")
    assert response.status_code == 200 and b"errorlist" in response.content  # refused on the form
