"""What issue 13 asked of pages that is not about how they look (those are browser
tests): styled error pages without Django's debug output, no link a role cannot
follow, the job list's rows.json, the job form's limits and preselection, the
pending explanation in status.json, the favicon, artifact content types and admin
names. Against real PostgreSQL, no worker."""
from __future__ import annotations

import re

import pytest
from django.test import Client, RequestFactory
from django.utils import timezone

from jobs.lifecycle import states
from jobs.models import Host, Job

pytestmark = pytest.mark.django_db
S = Job.Status


def login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def make_job(team, user, model=None, **fields) -> Job:
    job = Job.objects.create(team=team, user=user, kind=fields.pop("kind", "inference"), model=model,
                             spec={"prompts": ["hi"]}, **fields)
    states.event(job.pk, "pending", f"submitted by {user.username}", actor=user)
    return job


# --- error pages ----------------------------------------------------------------------

def test_a_missing_page_is_a_styled_404_with_the_navigation_and_no_debug_listing(cast, settings):
    settings.DEBUG = False
    response = login(cast.bob).get("/no/such/page/")
    html = response.content.decode()
    assert response.status_code == 404
    assert 'id="error-page"' in html and "There is no such page" in html
    assert 'href="/teams/vision/jobs/"' in html  # the user's navigation, to get back
    assert "URLconf" not in html and "Traceback" not in html


def test_a_staff_page_for_a_manager_is_the_same_styled_404(cast, settings):
    settings.DEBUG = False
    for url in ("/usage/", "/quotas/", "/teams/new/"):
        response = login(cast.alice).get(url)
        assert response.status_code == 404 and b'id="error-page"' in response.content, url


def test_a_forbidden_action_is_a_styled_403_with_the_views_sentence(cast, settings):
    settings.DEBUG = False
    Host.objects.create(name="h1", family="cpu", core_ids=[0])
    response = login(cast.alice).post("/hosts/h1/drain/", {"action": "drain"})
    html = response.content.decode()
    assert response.status_code == 403
    assert 'data-status="403"' in html and "Only site admins can drain" in html


def test_the_500_page_renders_without_a_request_context():
    from django.views.defaults import server_error

    response = server_error(RequestFactory().get("/"))
    html = response.content.decode()
    assert response.status_code == 500 and 'data-status="500"' in html and "Something went wrong" in html
    assert "/static/jobs/neurondeck.css" in html  # the console's own styles


def test_the_favicon_is_served_for_pages_that_name_none(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 301 and response["Location"].endswith("/static/jobs/favicon.svg")


# --- no link a role cannot follow --------------------------------------------------------

def test_a_managers_usage_page_does_not_point_at_the_staff_only_site_page(cast):
    from jobs.models import UsageDaily, UsageRollupState

    today = timezone.localdate()
    UsageRollupState.objects.create(cutoff=timezone.now(), ran_at=timezone.now())
    UsageDaily.objects.create(team=cast.vision, day=today, user=cast.bob, kind="inference", family="trn1",
                              instance_type="x9.unpriced", core_seconds=7200, unpriced_core_seconds=7200)
    html = login(cast.alice).get("/teams/vision/usage/").content.decode()
    assert 'id="unpriced"' in html and "a site admin can add their prices" in html
    assert 'href="/usage/' not in html
    staff = login(cast.admin).get("/teams/vision/usage/").content.decode()
    assert 'href="/usage/#prices"' in staff


# --- the job list's rows ------------------------------------------------------------------

def test_rows_json_sends_status_duration_finished_and_reason_of_the_jobs_asked(cast, tiny_model):
    now = timezone.now()
    pending = make_job(cast.vision, cast.bob, tiny_model, reason_code="no_capacity", reason="no trn2 host is online")
    failed = make_job(cast.vision, cast.bob, tiny_model, status=S.FAILED, started_at=now - timezone.timedelta(seconds=75),
                      finished_at=now, failure="timed_out", reason="exceeded max runtime of 60 s")
    other = make_job(cast.audio, cast.charlie)
    client = login(cast.bob)
    data = client.get(f"/teams/vision/jobs/rows.json?ids={pending.pk},{failed.pk},{other.pk}").json()
    rows = {row["id"]: row for row in data["jobs"]}
    assert set(rows) == {pending.pk, failed.pk}  # another team's job is not answered
    assert rows[pending.pk]["status"] == "pending" and rows[pending.pk]["reason"] == "no trn2 host is online"
    assert rows[pending.pk]["duration"].startswith("waiting ")
    assert rows[failed.pk]["duration"] == "1 min 15 s" and rows[failed.pk]["finished"]
    assert rows[failed.pk]["reason"] == "exceeded max runtime of 60 s"
    newer = client.get(f"/teams/vision/jobs/rows.json?newest={pending.pk}").json()["newer"]
    assert newer == 1  # the failed job came after
    assert client.get("/teams/vision/jobs/rows.json?ids=1,x").status_code == 400
    assert login(cast.charlie).get(f"/teams/vision/jobs/rows.json?ids={pending.pk}").status_code == 404


def test_the_job_list_fills_reason_and_duration_for_every_state(cast, tiny_model):
    now = timezone.now()
    make_job(cast.vision, cast.bob, tiny_model)  # pending, no reason yet
    make_job(cast.vision, cast.bob, tiny_model, status=S.CANCELLED, finished_at=now)
    make_job(cast.vision, cast.bob, tiny_model, status=S.SUCCEEDED, started_at=now - timezone.timedelta(seconds=3),
             finished_at=now)
    html = login(cast.bob).get("/teams/vision/jobs/").content.decode()
    assert "Waiting for the scheduler to place it." in html
    assert "Cancelled before it started." in html
    assert re.search(r'data-cell="duration"[^>]*>3\.0 s<', html)


def test_an_empty_job_list_says_what_to_do_next(cast, tiny_model):
    html = login(cast.bob).get("/teams/vision/jobs/").content.decode()
    assert 'id="no-jobs"' in html and "/teams/vision/jobs/new/inference/" in html
    html = login(cast.charlie).get("/teams/audio/jobs/").content.decode()  # no model yet: upload one first
    assert 'id="no-jobs"' in html and 'href="/teams/audio/models/"' in html


# --- the job page's pending explanation --------------------------------------------------------

def test_status_json_carries_the_pending_explanation_and_drops_it_when_the_job_runs(cast, tiny_model):
    job = make_job(cast.vision, cast.bob, tiny_model, reason_code="no_hosts_of_family", reason="no cpu host")
    client = login(cast.bob)
    data = client.get(f"/jobs/{job.pk}/status.json").json()
    assert data["pending"]["reason_code"] == "no_hosts_of_family" and data["pending"]["hint"]
    assert data["queue_position"] == data["pending"]["position"]
    Job.objects.filter(pk=job.pk).update(status=S.RUNNING)
    data = client.get(f"/jobs/{job.pk}/status.json").json()
    assert data["pending"] is None and data["queue_position"] is None


# --- forms --------------------------------------------------------------------------------------

def test_the_job_form_preselects_a_lone_model_and_states_limits(cast, tiny_model, dataset):
    html = login(cast.bob).get("/teams/vision/jobs/new/finetune/").content.decode()
    assert re.search(rf'<option value="{tiny_model.pk}" selected>', html)
    assert re.search(rf'<option value="{dataset.pk}" selected>', html)
    assert 'id="id_batch_size_limit">1–512<' in html
    assert 'id="id_max_runtime_s_limit">1–86,400 s (the team&#x27;s limit)<' in html


def test_the_family_choice_marks_families_without_an_online_host(cast, tiny_model, cpu_host):
    html = login(cast.bob).get("/teams/vision/jobs/new/inference/").content.decode()
    assert '<option value="cpu" selected>CPU</option>' in html
    assert '<option value="trn1">Trainium (no host online)</option>' in html


def test_the_inference_form_asks_for_prompts_or_a_file_as_one_choice(cast, tiny_model):
    html = login(cast.bob).get("/teams/vision/jobs/new/inference/").content.decode()
    assert 'data-choice id="prompts-choice"' in html and "Prompts <span class=\"muted\">(required)" in html
    assert html.count('name="prompts_source"') == 2


def test_steps_and_epochs_together_are_refused(cast, tiny_model, dataset, cpu_host):
    response = login(cast.bob).post("/teams/vision/jobs/new/finetune/", {
        "family": "cpu", "cores": 1, "model": tiny_model.pk, "dataset": dataset.pk, "steps": 3, "epochs": 2,
        "learning_rate": 0.001, "batch_size": 2, "sequence_length": 16})
    assert response.status_code == 400 and b"not both" in response.content
    assert not Job.objects.exists()


# --- admin names ------------------------------------------------------------------------------

def test_the_compile_help_never_breaks_a_flag(cast, tiny_model):
    html = login(cast.bob).get("/teams/vision/jobs/new/compile/").content.decode()
    assert "<code>--model-type=transformer</code>" in html


# --- artifacts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("filename, expected", [
    ("model.pt", "application/octet-stream"), ("graph.neff", "application/octet-stream"),
    ("outputs.jsonl", "application/jsonl"), ("metrics.json", "application/json"),
    ("model.safetensors", "application/octet-stream")])
def test_an_artifact_downloads_with_a_content_type_for_what_it_is(cast, tiny_model, cpu_host, filename, expected):
    from jobs.assets import storage
    from jobs.models import Artifact

    job = make_job(cast.vision, cast.bob, tiny_model, status=S.SUCCEEDED, host=cpu_host)
    folder = storage.job_dir(job.pk) / "attempt-1" / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / filename).write_bytes(b"\x00\x01 data")
    Artifact.objects.create(job=job, name=filename, path=storage.rel_path(folder / filename), size_bytes=7)
    response = login(cast.bob).get(f"/jobs/{job.pk}/artifacts/{filename}")
    assert response.status_code == 200
    assert response["Content-Type"] == expected
    assert "snesdev" not in response["Content-Type"]
