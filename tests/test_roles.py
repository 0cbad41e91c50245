"""Every role's permissions on pages and API, and the audit trail of quota and
membership changes. Cast: alice manages vision, bob is a member, vera a viewer,
charlie manages audio (no access to vision), admin is staff."""
from __future__ import annotations

import json

import pytest
from django.test import Client

from jobs.models import AuditEntry, FamilyQuota, Host, Job, Kind, Membership, Role, TeamQuota
from jobs.teams.services import membership_set
from tests.conftest import api_client

S = Job.Status


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def page_client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def submit(user, model, **extra):
    return api_client(user).post("/api/v1/jobs", data=json.dumps({
        "team": "vision", "kind": "inference", "model": model.pk, "prompts": ["hi"], "max_new_tokens": 2,
        "family": "cpu", "cores": 1, **extra}), content_type="application/json")


@pytest.fixture
def maria(cast, django_user_model):
    """A second member of vision."""
    user = django_user_model.objects.create_user("maria", "maria@example.com", "pw-for-tests-1")
    membership_set(team=cast.vision, user=user, role=Role.MEMBER)
    return user


def job_of(team, user) -> Job:
    return Job.objects.create(team=team, user=user, kind="inference", family="cpu")


# --- submit and cancel ------------------------------------------------------------

def test_a_viewer_cannot_submit(cast, tiny_model, cpu_host):
    response = submit(cast.vera, tiny_model)
    assert response.status_code == 403 and response.json()["code"] == "forbidden"
    assert not Job.objects.exists()


def test_a_viewer_sees_the_submit_form_refused(cast, tiny_model, cpu_host):
    response = page_client(cast.vera).post("/teams/vision/jobs/new/inference/",
                                           {"model": tiny_model.pk, "prompts": "hi", "max_new_tokens": 2,
                                            "temperature": 0, "family": "cpu", "cores": 1})
    assert response.status_code == 403 and not Job.objects.exists()


def test_a_member_can_submit(cast, tiny_model, cpu_host):
    assert submit(cast.bob, tiny_model).status_code == 201


def test_another_team_cannot_submit_to_vision(cast, tiny_model, cpu_host):
    assert submit(cast.charlie, tiny_model).status_code == 404


def test_submit_over_max_pending_is_a_4xx_with_a_code(cast, tiny_model, cpu_host):
    TeamQuota.objects.filter(team=cast.vision).update(max_pending=1)
    assert submit(cast.bob, tiny_model).status_code == 201
    response = submit(cast.bob, tiny_model)
    assert response.status_code == 409
    assert response.json()["code"] == "too_many_pending"
    assert response.json()["detail"] == "team vision already has 1 pending jobs (limit 1)"


def test_submit_with_the_budget_spent_is_a_4xx_with_a_code(cast, tiny_model, cpu_host):
    TeamQuota.objects.filter(team=cast.vision).update(monthly_core_hours=0)
    response = submit(cast.bob, tiny_model)
    assert response.status_code == 409 and response.json()["code"] == "budget_exhausted"
    assert response.json()["detail"] == "team vision has used 0.0 of its 0 NeuronCore-hours this month"


def test_a_kind_the_team_may_not_run_is_a_4xx_naming_the_kind(cast, tiny_model, cpu_host):
    TeamQuota.objects.filter(team=cast.vision).update(allowed_kinds=["compile"])
    for dry_run in ("", "?dry_run=true"):
        response = api_client(cast.bob).post(f"/api/v1/jobs{dry_run}", {"team": "vision", "kind": "inference",
                                             "model": tiny_model.pk, "prompts": ["hi"], "family": "cpu", "cores": 1},
                                             content_type="application/json")
        assert response.status_code == 400, response.content
        body = response.json()
        assert (body["code"], body["field"]) == ("kind_not_allowed", "kind"), body
        assert body["errors"] == {"kind": ["team vision may not run inference jobs (allowed: compile)"]}


def test_a_kind_the_team_may_not_run_is_refused_on_the_form(cast, tiny_model, cpu_host):
    TeamQuota.objects.filter(team=cast.vision).update(allowed_kinds=["compile"])
    response = page_client(cast.bob).post("/teams/vision/jobs/new/inference/",
                                          {"model": tiny_model.pk, "prompts": "hi", "max_new_tokens": 2,
                                           "temperature": 0, "family": "cpu", "cores": 1})
    assert response.status_code == 400
    assert "team vision may not run inference jobs (allowed: compile)" in response.content.decode()


def test_a_member_cannot_cancel_another_members_job(cast, maria):
    job = job_of(cast.vision, maria)
    response = api_client(cast.bob).post(f"/api/v1/jobs/{job.pk}/cancel")
    assert response.status_code == 403
    assert page_client(cast.bob).post(f"/jobs/{job.pk}/cancel/").status_code == 403
    assert Job.objects.get(pk=job.pk).status == S.PENDING


def test_a_member_can_cancel_their_own_job(cast):
    job = job_of(cast.vision, cast.bob)
    assert api_client(cast.bob).post(f"/api/v1/jobs/{job.pk}/cancel").status_code == 200
    assert Job.objects.get(pk=job.pk).status == S.CANCELLED


def test_a_manager_can_cancel_any_job_of_the_team(cast, maria):
    job = job_of(cast.vision, maria)
    assert page_client(cast.alice).post(f"/jobs/{job.pk}/cancel/").status_code == 302
    assert Job.objects.get(pk=job.pk).status == S.CANCELLED


def test_a_viewer_cannot_cancel(cast):
    job = job_of(cast.vision, cast.bob)
    assert api_client(cast.vera).post(f"/api/v1/jobs/{job.pk}/cancel").status_code == 403


def test_another_teams_manager_gets_404_on_cancel(cast):
    job = job_of(cast.vision, cast.bob)
    assert api_client(cast.charlie).post(f"/api/v1/jobs/{job.pk}/cancel").status_code == 404


# --- the team page ----------------------------------------------------------------

@pytest.mark.parametrize("who, status", [("alice", 200), ("bob", 200), ("vera", 200), ("admin", 200), ("charlie", 404)])
def test_who_sees_the_team_page(cast, who, status):
    assert page_client(getattr(cast, who)).get("/teams/vision/").status_code == status


def test_the_team_page_shows_share_usage_and_limits(cast, cpu_host):
    page = page_client(cast.bob).get("/teams/vision/").content.decode()
    assert "Fair share" in page and "50.0 % of all shares" in page
    assert "NeuronCore-hours this month: <strong>0.0</strong> of 1000" in page
    assert 'data-family="cpu"' in page and "Audit trail" in page


def test_only_managers_see_member_controls(cast):
    assert "Add user" in page_client(cast.alice).get("/teams/vision/").content.decode()
    assert "Add user" not in page_client(cast.bob).get("/teams/vision/").content.decode()


def test_a_manager_adds_a_member_and_it_is_audited(cast):
    response = page_client(cast.alice).post("/teams/vision/members/", {"username": "charlie", "role": "viewer"})
    assert response.status_code == 302
    assert Membership.objects.get(team=cast.vision, user=cast.charlie).role == Role.VIEWER
    entry = AuditEntry.objects.filter(team=cast.vision).first()
    assert (entry.actor, entry.subject, entry.old, entry.new) == (cast.alice, "member.charlie", "", "viewer")


def test_a_manager_changes_a_role_and_removes_a_member(cast):
    client = page_client(cast.alice)
    client.post("/teams/vision/members/role/", {"user_id": cast.bob.pk, "role": "viewer"})
    client.post("/teams/vision/members/role/", {"user_id": cast.vera.pk, "role": "remove"})
    assert Membership.objects.get(team=cast.vision, user=cast.bob).role == Role.VIEWER
    assert not Membership.objects.filter(team=cast.vision, user=cast.vera).exists()
    trail = list(AuditEntry.objects.filter(team=cast.vision, actor=cast.alice).values_list("subject", "old", "new"))
    assert ("member.bob", "member", "viewer") in trail and ("member.vera", "viewer", "removed") in trail
    page = client.get("/teams/vision/").content.decode()
    assert "member.vera" in page and "removed" in page


@pytest.mark.parametrize("who, status", [("bob", 403), ("vera", 403), ("charlie", 404)])
def test_non_managers_cannot_change_members(cast, who, status):
    response = page_client(getattr(cast, who)).post("/teams/vision/members/",
                                                    {"username": "charlie", "role": "manager"})
    assert response.status_code == status
    assert not Membership.objects.filter(team=cast.vision, user=cast.charlie).exists()


def test_an_unknown_user_is_a_field_error(cast):
    response = page_client(cast.alice).post("/teams/vision/members/", {"username": "nobody", "role": "member"})
    assert response.status_code == 400 and "no active user named &#x27;nobody&#x27;" in response.content.decode()


def test_the_last_manager_cannot_demote_themselves(cast):
    response = page_client(cast.alice).post("/teams/vision/members/role/", {"user_id": cast.alice.pk, "role": "member"})
    assert response.status_code == 409
    assert "alice is the only manager of team vision" in response.content.decode()
    assert Membership.objects.get(team=cast.vision, user=cast.alice).role == Role.MANAGER


# --- the quota page (staff) ------------------------------------------------------

@pytest.mark.parametrize("who", ["alice", "bob", "vera", "charlie"])
def test_non_staff_get_404_on_the_quota_page(cast, who):
    client = page_client(getattr(cast, who))
    assert client.get("/quotas/").status_code == 404
    assert client.post("/quotas/vision/", {"max_pending": 5}).status_code == 404


def test_anonymous_users_are_sent_to_log_in(cast):
    response = Client().get("/quotas/")
    assert response.status_code == 302 and "/login/" in response["Location"]


def quota_form(team_slug: str = "vision", **changes) -> dict:
    """The whole row as the quota page posts it, with `changes`."""
    data = {"share": 1, "monthly_core_hours": 1000, "max_runtime_s": 86400, "max_pending": 100,
            "allowed_kinds": Kind.values}  # every box ticked, as the page shows a team allowed all kinds
    for family, (g, b) in {"inf2": (0, 32), "trn1": (0, 32), "trn2": (0, 32), "cpu": (8, 8)}.items():
        data[f"{family}_guaranteed_cores"], data[f"{family}_borrow_limit"] = g, b
    data.update(changes)
    return data


def test_staff_see_every_team_on_the_quota_page(cast, cpu_host):
    page = page_client(cast.admin).get("/quotas/").content.decode()
    assert 'id="team-vision"' in page and 'id="team-audio"' in page
    assert 'name="cpu_guaranteed_cores"' in page


def test_a_quota_change_is_saved_and_audited(cast):
    response = page_client(cast.admin).post("/quotas/vision/", quota_form(max_pending=5, trn1_guaranteed_cores=16))
    assert response.status_code == 302
    assert TeamQuota.objects.get(team=cast.vision).max_pending == 5
    assert FamilyQuota.objects.get(team=cast.vision, family="trn1").guaranteed_cores == 16
    trail = set(AuditEntry.objects.filter(team=cast.vision, actor=cast.admin).values_list("subject", "old", "new"))
    assert trail == {("quota.max_pending", "100", "5"), ("family.trn1.guaranteed_cores", "0", "16")}
    page = page_client(cast.alice).get("/teams/vision/").content.decode()
    assert "family.trn1.guaranteed_cores" in page and "quota.max_pending" in page


def test_a_negative_number_is_a_field_error_and_changes_nothing(cast):
    response = page_client(cast.admin).post("/quotas/vision/", quota_form(max_pending=3, cpu_guaranteed_cores=-1))
    assert response.status_code == 400
    assert "must not be negative" in response.content.decode()
    assert TeamQuota.objects.get(team=cast.vision).max_pending == 100
    assert not AuditEntry.objects.filter(actor=cast.admin, team__isnull=False).exists()  # its login is audited site-wide


def test_guarantees_beyond_the_fleet_are_saved_with_a_warning(cast, cpu_host):
    response = page_client(cast.admin).post("/quotas/vision/", quota_form(cpu_guaranteed_cores=64), follow=True)
    assert FamilyQuota.objects.get(team=cast.vision, family="cpu").guaranteed_cores == 64
    assert "cpu guarantees add up to 72 cores but the fleet has 4 online" in response.content.decode()


def test_the_quota_page_runs_a_fixed_number_of_queries(cast, cpu_host, django_assert_max_num_queries):
    from jobs.teams.services import team_create

    client = page_client(cast.admin)
    client.get("/quotas/")
    for i in range(30):
        team_create(slug=f"team-{i}", name=f"Team {i}")
    with django_assert_max_num_queries(16):
        response = client.get("/quotas/")
    assert response.content.decode().count('class="quota-row" id="team-') == 25
    with django_assert_max_num_queries(16):
        rest = client.get("/quotas/?page=2").content.decode()
    assert rest.count('class="quota-row" id="team-') == 7 and 'id="team-vision"' in rest


def test_the_quota_page_finds_teams_by_slug_or_name(cast):
    client = page_client(cast.admin)
    page = client.get("/quotas/?q=VIS").content.decode()
    assert 'id="team-vision"' in page and 'id="team-audio"' not in page
    assert "No team matches" in client.get("/quotas/?q=nothing-like-it").content.decode()


def test_a_saved_quota_returns_to_the_page_listing_the_team(cast):
    from jobs.teams.services import team_create

    for i in range(30):
        team_create(slug=f"team-{i:02d}", name=f"Team {i}")
    response = page_client(cast.admin).post("/quotas/vision/", quota_form(max_pending=5))
    assert response.status_code == 302 and response["Location"] == "/quotas/?page=2#team-vision"
    bad = page_client(cast.admin).post("/quotas/vision/", quota_form(max_pending=-1))
    assert bad.status_code == 400 and 'quota-row has-errors" id="team-vision"' in bad.content.decode()


# --- the team API ----------------------------------------------------------------

def test_members_read_their_team_over_the_api(cast, cpu_host):
    body = api_client(cast.vera).get("/api/v1/teams/vision").json()
    assert body["team"]["slug"] == "vision"
    assert body["quota"]["families"]["cpu"] == {"guaranteed_cores": 8, "borrow_limit": 8}
    assert body["usage"]["families"]["cpu"] == {"in_use": 0, "borrowed": 0, "lent": 0}


def test_another_teams_member_gets_404_on_the_team_api(cast):
    assert api_client(cast.charlie).get("/api/v1/teams/vision").status_code == 404


def patch_quota(user, body):
    return api_client(user).patch("/api/v1/teams/vision/quota", data=json.dumps(body), content_type="application/json")


def test_staff_patch_a_quota_and_it_is_audited(cast):
    response = patch_quota(cast.admin, {"max_pending": 7, "families": {"trn1": {"borrow_limit": 0}}})
    assert response.status_code == 200
    body = response.json()
    assert body["quota"]["max_pending"] == 7 and body["quota"]["families"]["trn1"]["borrow_limit"] == 0
    assert {(c["subject"], c["old"], c["new"]) for c in body["changes"]} == {
        ("quota.max_pending", "100", "7"), ("family.trn1.borrow_limit", "32", "0")}
    assert AuditEntry.objects.filter(team=cast.vision, actor=cast.admin).count() == 2
    assert TeamQuota.objects.get(team=cast.vision).monthly_core_hours == 1000  # untouched


@pytest.mark.parametrize("who, status", [("alice", 403), ("bob", 403), ("charlie", 404)])
def test_only_staff_patch_quotas(cast, who, status):
    response = patch_quota(getattr(cast, who), {"max_pending": 1})
    assert response.status_code == status
    assert TeamQuota.objects.get(team=cast.vision).max_pending == 100


def test_a_bad_quota_body_names_the_field(cast):
    response = patch_quota(cast.admin, {"max_pending": -3, "families": {"trn1": {"guaranteed_cores": "x"}}, "color": 1})
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert errors["max_pending"] == ["must not be negative"]
    assert errors["trn1_guaranteed_cores"] == ["Enter a whole number. trn1_guaranteed_cores must be an integer, "
                                               "not a string."]
    assert errors["color"] == ["unknown quota field"]
    assert not AuditEntry.objects.filter(actor=cast.admin, team__isnull=False).exists()  # its login is audited site-wide


def test_a_patch_that_overcommits_the_fleet_warns(cast, cpu_host):
    Host.objects.filter(pk=cpu_host.pk).update(core_ids=[0, 1])
    body = patch_quota(cast.admin, {"families": {"cpu": {"guaranteed_cores": 4}}}).json()
    assert body["warnings"] == ["cpu guarantees add up to 12 cores but the fleet has 2 online; "
                                "not every team can get its guarantee at once"]


def test_quota_edits_in_the_django_admin_are_audited_too(cast):
    quota = FamilyQuota.objects.get(team=cast.vision, family="trn1")
    response = page_client(cast.admin).post(f"/admin/jobs/familyquota/{quota.pk}/change/", {
        "team": cast.vision.pk, "family": "trn1", "guaranteed_cores": 12, "borrow_limit": 32})
    assert response.status_code == 302
    assert FamilyQuota.objects.get(pk=quota.pk).guaranteed_cores == 12
    assert AuditEntry.objects.filter(team=cast.vision, actor=cast.admin, subject="family.trn1.guaranteed_cores",
                                     old="0", new="12").exists()


def test_the_audit_trail_cannot_be_edited_in_the_django_admin(cast):
    entry = AuditEntry.objects.filter(team=cast.vision).first()
    client = page_client(cast.admin)
    client.post(f"/admin/jobs/auditentry/{entry.pk}/change/", {"subject": "forged", "old": "", "new": ""})
    client.post(f"/admin/jobs/auditentry/{entry.pk}/delete/", {"post": "yes"})
    assert AuditEntry.objects.get(pk=entry.pk).subject == entry.subject
