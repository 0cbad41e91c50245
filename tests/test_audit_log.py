"""The staff audit log: logins, token events, quota and membership changes, new teams
and host drains in one place, filtered, paged and exported as CSV; 404 for anyone
but staff."""
from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from jobs.live.services import host_set_state
from jobs.models import AuditEntry, Host, Role
from jobs.quotas.services import quota_update
from jobs.teams import tokens
from jobs.teams.services import membership_change


@pytest.fixture
def staff(cast) -> Client:
    client = Client()
    client.force_login(cast.admin)  # itself audited: login.succeeded
    return client


@pytest.fixture
def history(cast):
    """One entry of each area."""
    host = Host.objects.create(name="inf2-a", family="inf2", core_ids=[0, 1])
    host_set_state(host=host, state=Host.State.DRAINING, actor=cast.admin)
    quota_update(team=cast.vision, values={"max_pending": 7}, actor=cast.admin)
    membership_change(team=cast.vision, user=cast.charlie, role=Role.VIEWER, actor=cast.alice)
    tokens.token_create(user=cast.bob, name="ci", scope="read", ip="10.6.0.1")
    Client().post("/login/", {"username": "bob", "password": "nope"}, REMOTE_ADDR="10.6.0.2")
    return host


def rows(response) -> list[dict]:
    return list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))


def test_staff_see_every_area_newest_first(staff, history):
    page = staff.get("/audit/").content.decode()
    for text in ("host.inf2-a", "draining", "quota.max_pending", "member.charlie", "token.created", "login.failed",
                 "10.6.0.2"):
        assert text in page, text
    assert page.index("login.failed") < page.index("host.inf2-a")


def test_anyone_but_staff_gets_a_404(cast, history):
    for user in (cast.alice, cast.bob, cast.charlie):
        client = Client()
        client.force_login(user)
        assert client.get("/audit/").status_code == 404
        assert client.get("/audit/?format=csv").status_code == 404
    assert Client().get("/audit/").status_code == 302  # anonymous: the login page


@pytest.mark.parametrize("query, subjects", [
    ("area=host", {"host.inf2-a"}),
    ("area=quota", {"quota.max_pending"}),
    ("area=member&actor=alice", {"member.charlie"}),
    ("area=token", {"token.created"}),
    ("area=login&actor=bob", {"login.failed"}),
    ("team=vision&actor=alice", {"member.charlie"}),
    ("q=inf2", {"host.inf2-a"}),
])
def test_filters_narrow_the_csv_export_too(staff, history, query, subjects):
    response = staff.get(f"/audit/?{query}&format=csv")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert {r["subject"] for r in rows(response)} == subjects


def test_site_wide_entries_are_team_dash(staff, history):
    found = {r["subject"] for r in rows(staff.get("/audit/?team=-&format=csv"))}
    assert "host.inf2-a" in found and "login.failed" in found and "quota.max_pending" not in found


def test_the_csv_has_every_column_and_the_address(staff, history):
    entry = next(r for r in rows(staff.get("/audit/?area=login&actor=bob&format=csv")))
    assert list(entry) == ["at", "area", "subject", "team", "actor", "old", "new", "ip"]
    assert entry["ip"] == "10.6.0.2" and entry["new"] == "bob" and entry["area"] == "login"


def test_days_filter_by_date(staff, history):
    AuditEntry.objects.filter(subject="quota.max_pending").update(at=timezone.now() - timedelta(days=10))
    day = (timezone.now() - timedelta(days=10)).date().isoformat()
    assert {r["subject"] for r in rows(staff.get(f"/audit/?since={day}&until={day}&format=csv"))} == {"quota.max_pending"}
    assert "quota.max_pending" not in {r["subject"] for r in rows(staff.get(
        f"/audit/?since={timezone.now().date().isoformat()}&format=csv"))}


def test_a_username_that_looks_like_a_formula_is_text_in_the_csv(staff, cast):
    Client().post("/login/", {"username": "=HYPERLINK(\"http://x\")", "password": "nope"}, REMOTE_ADDR="10.6.0.3")
    entry = rows(staff.get("/audit/?area=login&format=csv"))[0]
    assert entry["new"].startswith("'=")


@pytest.mark.parametrize("query, field", [("team=nosuch", "team"), ("since=yesterday", "since"),
                                          ("area=everything", "area"), ("since=2026-02-02&until=2026-02-01", "until")])
def test_a_bad_filter_is_a_400_naming_it(staff, query, field):
    response = staff.get(f"/audit/?{query}")
    assert response.status_code == 400 and f'id="id_{field}_error"' in response.content.decode()


def test_the_page_is_paged(staff, cast):
    AuditEntry.objects.bulk_create(AuditEntry(team=cast.vision, subject=f"quota.n{i}", new=str(i)) for i in range(130))
    first = staff.get("/audit/?area=quota").content.decode()
    assert "page 1 of 2" in first and "quota.n0" not in first
    assert "quota.n0" in staff.get("/audit/?area=quota&page=2").content.decode()
    assert len(rows(staff.get("/audit/?area=quota&format=csv"))) == 130


def test_draining_and_undraining_a_host_from_its_page_is_audited(staff, cast):
    Host.objects.create(name="trn1-b", family="trn1", core_ids=[0])
    staff.post("/hosts/trn1-b/drain/", {"action": "drain"})
    staff.post("/hosts/trn1-b/drain/", {"action": "undrain"})
    trail = list(AuditEntry.objects.filter(subject="host.trn1-b").order_by("id").values_list("old", "new", "actor"))
    assert trail == [("online", "draining", cast.admin.pk), ("draining", "online", cast.admin.pk)]
