"""Teams and their quota rows, however a team is created (issue 13, bug 1 and "staff
create teams"): the console's team-create page, the Django admin and a plain ORM
create all give the team a TeamQuota and a FamilyQuota per family; the quota page
saves a team whose rows went missing instead of a 500; the admin edits allowed
kinds with checkboxes and names its models in plural English."""
from __future__ import annotations

import importlib

import pytest
from django.apps import apps
from django.test import Client

from jobs.models import AuditEntry, Family, FamilyQuota, Kind, Membership, Team, TeamQuota, default_family_quota

pytestmark = pytest.mark.django_db


def login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def family_rows(team) -> dict[str, tuple[int, int]]:
    return {f.family: (f.guaranteed_cores, f.borrow_limit) for f in FamilyQuota.objects.filter(team=team)}


def expected_defaults() -> dict[str, tuple[int, int]]:
    return {family: default_family_quota(family) for family in Family.values}


def test_a_team_created_any_way_has_its_quota_rows_for_every_family(cast):
    team = Team.objects.create(slug="plain", name="Plain")
    assert TeamQuota.objects.filter(team=team).exists()
    assert family_rows(team) == expected_defaults()
    assert family_rows(cast.vision) == expected_defaults()  # team_create: the same rows, created once


def test_the_quota_page_saves_a_team_whose_rows_are_missing(cast):
    team = Team.objects.create(slug="bare", name="Bare")
    FamilyQuota.objects.filter(team=team).delete()
    TeamQuota.objects.filter(team=team).delete()
    data = {"share": 2, "monthly_core_hours": 50, "max_runtime_s": 600, "max_pending": 5,
            "allowed_kinds": ["inference", "compile", "finetune"]}
    for family in Family.values:
        data[f"{family}_guaranteed_cores"] = 1 if family == "cpu" else 0
        data[f"{family}_borrow_limit"] = 2
    response = login(cast.admin).post("/quotas/bare/", data)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert family_rows(team) == {family: (1 if family == "cpu" else 0, 2) for family in Family.values}
    assert TeamQuota.objects.get(team=team).share == 2


def test_the_data_migration_adds_missing_rows_and_keeps_existing_ones(cast):
    FamilyQuota.objects.filter(team=cast.audio, family__in=["trn1", "cpu"]).delete()
    TeamQuota.objects.filter(team=cast.audio).delete()
    FamilyQuota.objects.filter(team=cast.vision, family="trn1").update(guaranteed_cores=5)
    migration = importlib.import_module("jobs.migrations.0013_team_quota_rows_admin_names")
    migration.add_missing_quota_rows(apps, None)
    assert family_rows(cast.audio) == expected_defaults()
    assert TeamQuota.objects.filter(team=cast.audio).exists()
    assert family_rows(cast.vision)["trn1"] == (5, default_family_quota("trn1")[1])


def test_a_team_added_in_the_django_admin_gets_quota_rows_and_an_audit_entry(cast):
    response = login(cast.admin).post("/admin/jobs/team/add/", {"slug": "admin-made", "name": "Admin made",
                                                                "time_zone": "UTC",
                                                                "created_at_0": "2026-01-01",
                                                                "created_at_1": "00:00:00"})
    assert response.status_code == 302, response.content.decode()[:3000]
    team = Team.objects.get(slug="admin-made")
    assert family_rows(team) == expected_defaults()
    assert AuditEntry.objects.filter(team=team, subject="team", actor=cast.admin).exists()
    # ... and its row on the quota page saves (this was a 500).
    data = {"share": 1, "monthly_core_hours": 10, "max_runtime_s": 60, "max_pending": 1,
            "allowed_kinds": ["inference"]}
    for family in Family.values:
        data[f"{family}_guaranteed_cores"] = 0
        data[f"{family}_borrow_limit"] = 4
    assert login(cast.admin).post("/quotas/admin-made/", data).status_code == 302
    assert family_rows(team)["trn2"] == (0, 4)


def test_the_admin_edits_allowed_kinds_with_checkboxes(cast):
    quota = TeamQuota.objects.get(team=cast.vision)
    client = login(cast.admin)
    page = client.get(f"/admin/jobs/teamquota/{quota.pk}/change/").content.decode()
    assert page.count('type="checkbox" name="allowed_kinds"') == len(Kind.values)
    assert "<textarea" not in page.split('name="allowed_kinds"')[0].rsplit("<div", 1)[-1]
    response = client.post(f"/admin/jobs/teamquota/{quota.pk}/change/", {
        "team": cast.vision.pk, "share": quota.share, "monthly_core_hours": quota.monthly_core_hours,
        "max_runtime_s": quota.max_runtime_s, "max_pending": quota.max_pending,
        "allowed_kinds": ["inference", "compile"]})
    assert response.status_code == 302, response.content.decode()[:3000]
    quota.refresh_from_db()
    assert quota.allowed_kinds == ["compile", "inference"]
    assert AuditEntry.objects.filter(team=cast.vision, subject="quota.allowed_kinds", new="compile,inference").exists()


def test_the_admin_names_its_models_in_plural_english(cast):
    page = login(cast.admin).get("/admin/jobs/").content.decode()
    assert "Audit entries" in page and "Kind priorities" in page
    assert "entrys" not in page and "prioritys" not in page


def test_staff_create_a_team_in_the_console_and_add_a_member_with_a_role(cast):
    client = login(cast.admin)
    assert client.get("/teams/new/").status_code == 200
    response = client.post("/teams/new/", {"slug": "speech", "name": "Speech", "time_zone": "UTC",
                                           "manager": "charlie"})
    assert response.status_code == 302 and response["Location"] == "/teams/speech/"
    team = Team.objects.get(slug="speech")
    assert family_rows(team) == expected_defaults()
    assert Membership.objects.get(team=team, user=cast.charlie).role == "manager"
    response = client.post("/teams/speech/members/", {"username": "bob", "role": "viewer"})
    assert response.status_code == 302
    assert Membership.objects.get(team=team, user=cast.bob).role == "viewer"
    subjects = set(AuditEntry.objects.filter(team=team).values_list("subject", flat=True))
    assert {"team", "member.charlie", "member.bob"} <= subjects


@pytest.mark.parametrize("data, field", [
    ({"slug": "vision", "name": "Again"}, "slug"),
    ({"slug": "Not A Slug", "name": "x"}, "slug"),
    ({"slug": "ok-slug", "name": ""}, "name"),
    ({"slug": "ok-slug", "name": "x", "manager": "nobody"}, "manager"),
    ({"slug": "ok-slug", "name": "x", "time_zone": "Mars/Base"}, "time_zone"),
])
def test_a_bad_new_team_is_a_form_error_and_creates_nothing(cast, data, field):
    response = login(cast.admin).post("/teams/new/", {"time_zone": "UTC", **data})
    assert response.status_code == 400
    assert f'id="id_{field}_error"' in response.content.decode()
    assert not Team.objects.filter(slug="ok-slug").exists()
    assert Team.objects.filter(slug="vision").count() == 1


def test_only_staff_see_the_team_create_page(cast):
    assert login(cast.alice).get("/teams/new/").status_code == 404
    assert login(cast.alice).post("/teams/new/", {"slug": "x", "name": "x"}).status_code == 404
    assert not Team.objects.filter(slug="x").exists()


def test_the_demo_team_is_guaranteed_no_more_cpu_cores_than_the_local_host_has(db, monkeypatch):
    from django.core.management import call_command
    from django.utils import timezone

    from jobs.models import Host
    from jobs.quotas.selectors import overcommit_warnings

    monkeypatch.setenv("NEURONDECK_CPU_SLOTS", "4")
    call_command("seed_demo")
    demo = Team.objects.get(slug="demo")
    assert family_rows(demo)["cpu"] == (4, default_family_quota("cpu")[1])
    Host.objects.create(name="local", family="cpu", core_ids=list(range(4)), last_heartbeat=timezone.now())
    assert overcommit_warnings() == []
    call_command("seed_demo")  # idempotent: nothing changes on a second run
    assert family_rows(demo)["cpu"][0] == 4
