"""The HTML pages against real PostgreSQL (no worker): every page renders for a
member, each kind's form submits a pending job, bad input shows the error next to
its field and creates nothing, charlie gets 404 on everything of team vision,
viewers cannot submit, only the owner or a manager can cancel, and the job list
costs the same number of queries for 5 jobs as for 50."""
from __future__ import annotations

import io
import json
import re
import zipfile
from html import unescape
from pathlib import Path

import pytest
from conftest import PASSWORD
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.assets import selectors as asset_selectors
from jobs.assets import storage
from jobs.lifecycle import charts, selectors, states
from jobs.models import ApiToken, Artifact, Dataset, Job, JobLogChunk, JobMetric, ModelAsset, TeamQuota

S = Job.Status


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """The cast's five users are created per test; PBKDF2 would make that ~1.5 s each time."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def field_errors(response, field: str) -> list[str]:
    """The error messages rendered next to `field` (the <ul> the field template puts under it)."""
    html = response.content.decode()
    match = re.search(rf'<ul class="errorlist field-errors" id="id_{field}_error">(.*?)</ul>', html, re.S)
    return re.findall(r"<li>(.*?)</li>", match.group(1), re.S) if match else []


def form_errors(response) -> list[str]:
    html = response.content.decode()
    match = re.search(r'<ul class="errorlist nonfield">(.*?)</ul>', html, re.S)
    return re.findall(r"<li>(.*?)</li>", match.group(1), re.S) if match else []


def make_job(team, user, model=None, *, kind="inference", status=S.PENDING, **fields) -> Job:
    job = Job.objects.create(team=team, user=user, kind=kind, status=status, model=model,
                             spec=fields.pop("spec", {"prompts": ["hi"], "max_new_tokens": 4}), **fields)
    states.event(job.pk, "pending", f"submitted by {user.username}", actor=user)
    return job


def write_log(job: Job, *pieces: str) -> None:
    offset = 0
    for text in pieces:
        JobLogChunk.objects.create(job=job, offset=offset, text=text)
        offset += len(text.encode())
    Job.objects.filter(pk=job.pk).update(log_bytes=offset)
    job.refresh_from_db()


def add_artifact(job: Job, path: Path) -> Artifact:
    is_dir = path.is_dir()
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if is_dir else path.stat().st_size
    return Artifact.objects.create(job=job, name=path.name, path=storage.rel_path(path), size_bytes=size, is_dir=is_dir)


@pytest.fixture
def inference_job(cast, tiny_model, cpu_host) -> Job:
    """A succeeded inference job of bob in vision, with outputs, a folder artifact and a log."""
    now = timezone.now()
    job = make_job(cast.vision, cast.bob, tiny_model, status=S.SUCCEEDED, host=cpu_host, core_start=0,
                   started_at=now, finished_at=now,
                   result={"requests": 2, "latency_ms_p50": 12.5, "latency_ms_p90": 20.25, "latency_ms_p99": 21.0,
                           "requests_per_s": 3.25, "tokens_per_s": 40.0, "outputs": "outputs.jsonl"})
    states.event(job.pk, "succeeded", "succeeded in 1.2 s")
    artifacts = storage.job_dir(job.pk) / "attempt-1" / "artifacts"
    (artifacts / "extra" / "sub").mkdir(parents=True)
    (artifacts / "outputs.jsonl").write_text(
        json.dumps({"index": 0, "prompt": "hello", "output": "<b>world</b>", "new_tokens": 3, "latency_ms": 12.5})
        + "\nnot json\n"
        + json.dumps({"index": 2, "prompt": "again", "output": "and again", "new_tokens": 2, "latency_ms": 20.2})
        + "\n")
    (artifacts / "extra" / "config.json").write_text('{"model_type": "gpt2"}')
    (artifacts / "extra" / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    (storage.root() / "secret.txt").write_text("not yours")
    (artifacts / "extra" / "escape").symlink_to(storage.root() / "secret.txt")
    add_artifact(job, artifacts / "outputs.jsonl")
    add_artifact(job, artifacts / "extra")
    write_log(job, "=== attempt 1 on test-host cores 0 ===\n", "loading model\n", "generated 2 outputs\n")
    return job


@pytest.fixture
def finetune_job(cast, tiny_model, dataset, cpu_host) -> Job:
    now = timezone.now()
    job = make_job(cast.vision, cast.alice, tiny_model, kind="finetune", status=S.SUCCEEDED, dataset=dataset,
                   host=cpu_host, core_start=0, started_at=now, finished_at=now, spec={"steps": 5},
                   result={"steps": 5, "first_loss": 5.5, "final_loss": 3.25, "train_seconds": 1.5,
                           "tokens_per_s": 900.0})
    JobMetric.objects.bulk_create([JobMetric(job=job, step=s, name="loss", value=6 - s * 0.5) for s in range(1, 6)])
    return job


@pytest.fixture
def compile_job(cast, tiny_model, cpu_host) -> Job:
    now = timezone.now()
    return make_job(cast.vision, cast.bob, tiny_model, kind="compile", status=S.SUCCEEDED, host=cpu_host,
                    core_start=1, started_at=now, finished_at=now, spec={"batch_size": 1, "sequence_length": 16},
                    result={"compile_seconds": 1.234, "latency_ms_p50": 0.8123, "latency_ms_p95": 1.1,
                            "max_abs_logit_diff": 2.5e-06, "input_shape": [1, 16]})


def valid_post(kind: str, tiny_model, dataset=None) -> dict:
    common = {"family": "cpu", "cores": 1}
    if kind == "compile":
        return {**common, "model": tiny_model.pk, "batch_size": 1, "sequence_length": 16,
                "compiler_options": "--model-type=transformer -O2"}
    if kind == "finetune":
        return {**common, "model": tiny_model.pk, "dataset": dataset.pk, "steps": 3, "learning_rate": 0.001,
                "batch_size": 2, "sequence_length": 16}
    return {**common, "model": tiny_model.pk, "prompts": "hello there\nsecond prompt", "max_new_tokens": 4,
            "temperature": 0}


# --- pages render -------------------------------------------------------------------

def test_every_page_renders_for_a_member(cast, tiny_model, dataset, inference_job, finetune_job, compile_job):
    bob = login(cast.bob)
    pages = ["/teams/vision/jobs/", "/teams/vision/jobs/?status=succeeded&kind=inference&page=1",
             "/teams/vision/jobs/new/compile/", "/teams/vision/jobs/new/finetune/", "/teams/vision/jobs/new/inference/",
             f"/jobs/{inference_job.pk}/", f"/jobs/{finetune_job.pk}/", f"/jobs/{compile_job.pk}/",
             f"/jobs/{inference_job.pk}/result/", "/teams/vision/models/", f"/models/{tiny_model.pk}/",
             "/teams/vision/datasets/", "/tokens/"]
    for url in pages:
        response = bob.get(url)
        assert response.status_code == 200, url
        assert b"<h2>Result</h2>" in response.content if url.endswith("/result/") else b"NeuronDeck" in response.content


def test_a_browser_opening_the_result_section_itself_is_sent_to_the_job_page(cast, inference_job):
    """The section is fetched by the job page; opened as a page it would have no page around it."""
    bob = login(cast.bob)
    response = bob.get(f"/jobs/{inference_job.pk}/result/", headers={"Sec-Fetch-Mode": "navigate"})
    assert response.status_code == 302
    assert response["Location"] == f"/jobs/{inference_job.pk}/#result"
    fetched = bob.get(f"/jobs/{inference_job.pk}/result/", headers={"Sec-Fetch-Mode": "cors"})
    assert fetched.status_code == 200 and b"<h2>Result</h2>" in fetched.content


def test_the_login_page_logs_a_user_in_and_home_goes_to_their_teams_jobs(client, cast):
    assert client.get("/login/").status_code == 200
    response = client.post("/login/", {"username": "bob", "password": PASSWORD}, follow=True)
    assert response.redirect_chain[-1][0] == "/teams/vision/jobs/"
    assert b"Team: <strong>vision</strong>" in response.content


def test_a_wrong_password_is_a_form_error(client, cast):
    response = client.post("/login/", {"username": "bob", "password": "nope"})
    assert response.status_code == 200 and b"correct username and password" in response.content


def _csrf_token(response) -> str:
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', response.content.decode()).group(1)


def test_a_form_sent_with_a_stale_token_is_the_styled_403_that_says_what_to_do(cast):
    """Two tabs on the login page: signing in in one changes the token the other's form
    holds. Django's own page said "CSRF verification failed. Request aborted." with an
    inline <style> that the Content-Security-Policy refuses."""
    browser = Client(enforce_csrf_checks=True)
    stale = _csrf_token(browser.get("/login/"))
    fresh = _csrf_token(browser.get("/login/"))
    signed_in = browser.post("/login/", {"username": "bob", "password": PASSWORD, "csrfmiddlewaretoken": fresh})
    assert signed_in.status_code == 302
    response = browser.post("/login/?next=/fleet/", {"username": "bob", "password": PASSWORD,
                                                       "csrfmiddlewaretoken": stale},
                            HTTP_REFERER="http://testserver/login/?next=/fleet/")
    html = response.content.decode()
    assert response.status_code == 403 and "This form has expired" in html and "another tab" in html
    assert 'href="/login/?next=/fleet/">Reload the form</a>' in html
    assert "<style" not in html and "style=" not in html and "Content-Security-Policy" in response
    assert 'href="/teams/vision/jobs/"' in html  # the signed-in user's navigation

    # no cookie at all; a Referer of another site is not offered as the form to reload
    cookieless = Client(enforce_csrf_checks=True).post("/login/", {"username": "bob", "password": PASSWORD},
                                                       HTTP_REFERER="https://evil.example/login/")
    html = cookieless.content.decode()
    assert cookieless.status_code == 403 and "did not send this site&#x27;s cookie" in html
    assert "evil.example" not in html and "Reload the form" not in html


def test_anonymous_users_are_sent_to_the_login_page(client, cast, inference_job):
    for url in ["/", "/teams/vision/jobs/", f"/jobs/{inference_job.pk}/", f"/jobs/{inference_job.pk}/status.json"]:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/"), url


PUBLIC_PAGES = ("login/", "logout/", "sso/", "metrics", "csp-report", "favicon.ico", "api/", "admin/")


def test_every_console_url_sends_an_anonymous_user_to_the_login_page(client, cast, inference_job):
    """Walks the URLconf, so a page added without @login_required is caught (the
    compile cache page answered an anonymous user with a 404)."""
    from django.urls import URLPattern, URLResolver, get_resolver

    values = {"slug": "vision", "kind": "inference", "name": "test-host", "path:name": "outputs.jsonl"}

    def walk(patterns, prefix=""):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                yield from walk(pattern.url_patterns, prefix + str(pattern.pattern))
            elif isinstance(pattern, URLPattern):
                yield prefix + str(pattern.pattern)

    checked = 0
    for route in walk(get_resolver().url_patterns):
        if route.startswith(PUBLIC_PAGES):
            continue
        url = "/" + re.sub(r"<(?:(\w+):)?(\w+)>", lambda m: str(values.get(f"{m[1]}:{m[2]}", values.get(
            m[2], inference_job.pk))), route)
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/"), (url, response.status_code)
        checked += 1
    assert checked > 30


def test_the_several_hosts_fields_are_on_the_fine_tune_form_only(cast, tiny_model):
    client = login(cast.bob)
    for kind in ("compile", "inference"):
        page = client.get(f"/teams/vision/jobs/new/{kind}/").content.decode()
        assert 'name="host_count"' not in page and 'name="same_network"' not in page, kind
        assert "several hosts" not in page, kind  # the cores' help spoke of a host count the form has not
    page = client.get("/teams/vision/jobs/new/finetune/").content.decode()
    assert 'name="host_count"' in page and 'name="same_network"' in page
    assert "the host count times one host's cores" in page.replace("&#x27;", "'")
    assert page.index('name="cores"') < page.index('name="host_count"')  # with the resources, after the cores


def test_a_user_in_no_team_is_told_so(cast, django_user_model):
    loner = django_user_model.objects.create_user("loner", password=PASSWORD)
    response = login(loner).get("/")
    assert response.status_code == 200 and b"not in a team" in response.content


def test_the_nav_links_other_areas_and_staff_pages_only_for_staff(cast):
    page = login(cast.bob).get("/teams/vision/jobs/").content.decode()
    for href in ["/hosts/", "/fleet/", "/teams/vision/", "/teams/vision/usage/", "/teams/vision/models/"]:
        assert f'href="{href}"' in page
    assert 'href="/quotas/"' not in page and 'href="/admin/"' not in page
    staff = login(cast.admin).get("/teams/vision/jobs/").content.decode()
    for href in ["/quotas/", "/usage/", "/admin/"]:
        assert f'href="{href}"' in staff


def test_the_team_switcher_lists_only_the_users_teams(cast):
    page = login(cast.bob).get("/teams/vision/jobs/").content.decode()
    assert 'href="/teams/vision/jobs/"' in page and "/teams/audio/" not in page


# --- submit forms -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["compile", "finetune", "inference"])
def test_each_kinds_form_submits_a_pending_job(cast, tiny_model, dataset, cpu_host, kind):
    response = login(cast.bob).post(f"/teams/vision/jobs/new/{kind}/", valid_post(kind, tiny_model, dataset))
    job = Job.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/jobs/{job.pk}/"
    assert (job.kind, job.status, job.user, job.team) == (kind, S.PENDING, cast.bob, cast.vision)


def test_inference_takes_prompts_from_a_jsonl_upload(cast, tiny_model, cpu_host):
    upload = io.BytesIO(b'{"prompt": "from a file"}\n\n{"text": "second"}\n')
    upload.name = "prompts.jsonl"
    data = {**valid_post("inference", tiny_model), "prompts": "", "prompts_file": upload}
    response = login(cast.bob).post("/teams/vision/jobs/new/inference/", data)
    assert response.status_code == 302
    assert Job.objects.get().spec["prompts"] == ["from a file", "second"]


def test_the_compile_form_shows_the_compiler_option_allow_list(cast, tiny_model):
    page = login(cast.bob).get("/teams/vision/jobs/new/compile/").content.decode()
    assert "--model-type" in page and "transformer" in page and "--auto-cast" in page


def test_the_model_dropdown_offers_only_the_teams_models(cast, tiny_model):
    audio_model = ModelAsset.objects.create(team=cast.audio, name="audio-secret", path="x")
    page = login(cast.bob).get("/teams/vision/jobs/new/inference/").content.decode()
    assert "tiny-gpt" in page and "audio-secret" not in page and f'value="{audio_model.pk}"' not in page


def test_a_model_page_button_prefills_the_form(cast, tiny_model):
    page = login(cast.bob).get(f"/teams/vision/jobs/new/compile/?model={tiny_model.pk}").content.decode()
    assert f'<option value="{tiny_model.pk}" selected>' in page


@pytest.mark.parametrize("kind, change, field, message", [
    ("compile", {"compiler_options": "--output=/tmp/x"}, "compiler_options", "not allowed"),
    ("compile", {"compiler_options": "--model-type=banana"}, "compiler_options", "not one of"),
    ("compile", {"batch_size": 0}, "batch_size", "greater than or equal to 1"),
    ("compile", {"sequence_length": "many"}, "sequence_length", "Enter a whole number"),
    ("finetune", {"steps": -1}, "steps", "greater than or equal to 1"),
    ("finetune", {"steps": ""}, "steps", "Give steps or epochs"),
    ("finetune", {"dataset": 99999999}, "dataset", "Unknown dataset"),
    ("inference", {"model": 99999999}, "model", "Unknown model"),
    ("inference", {"prompts": ""}, "prompts", "Give at least one prompt"),
    ("inference", {"temperature": -1}, "temperature", "greater than or equal to 0"),
    ("inference", {"cores": 0}, "cores", "greater than or equal to 1"),
])
def test_bad_input_shows_the_field_error_and_creates_nothing(cast, tiny_model, dataset, cpu_host,
                                                              kind, change, field, message):
    data = {**valid_post(kind, tiny_model, dataset), **change}
    response = login(cast.bob).post(f"/teams/vision/jobs/new/{kind}/", data)
    assert response.status_code == 400
    assert any(message in unescape(e) for e in field_errors(response, field)), field_errors(response, field)
    assert not Job.objects.exists()


def test_a_malformed_prompts_file_line_is_a_prompts_file_error(cast, tiny_model, cpu_host):
    upload = io.BytesIO(b'{"prompt": "ok"}\n{"prompt": \n')
    upload.name = "prompts.jsonl"
    data = {**valid_post("inference", tiny_model), "prompts_file": upload}
    response = login(cast.bob).post("/teams/vision/jobs/new/inference/", data)
    assert response.status_code == 400
    assert any("line 2 is not valid JSON" in e for e in field_errors(response, "prompts_file"))
    assert not Job.objects.exists()


def test_another_teams_model_is_an_unknown_model_in_the_form(cast, tiny_model, cpu_host):
    response = login(cast.charlie).post("/teams/audio/jobs/new/inference/", valid_post("inference", tiny_model))
    assert response.status_code == 400 and "Unknown model" in field_errors(response, "model")[0]
    assert not Job.objects.exists()


def test_a_refused_submit_is_a_form_error_and_a_field_error(cast, tiny_model, cpu_host):
    data = {**valid_post("inference", tiny_model), "cores": 5}
    response = login(cast.bob).post("/teams/vision/jobs/new/inference/", data)
    assert response.status_code == 400
    assert any("largest available is 4" in e for e in form_errors(response))
    assert any("largest available is 4" in e for e in field_errors(response, "cores"))
    assert not Job.objects.exists()


def test_a_quota_refusal_is_shown_as_a_sentence(cast, tiny_model, cpu_host):
    TeamQuota.objects.filter(team=cast.vision).update(max_pending=0)
    response = login(cast.bob).post("/teams/vision/jobs/new/inference/", valid_post("inference", tiny_model))
    assert response.status_code == 400 and form_errors(response)
    assert not Job.objects.exists()


def test_an_unknown_job_kind_is_404(cast):
    assert login(cast.bob).get("/teams/vision/jobs/new/bake/").status_code == 404


# --- viewers --------------------------------------------------------------------------

def test_a_viewer_sees_the_forms_disabled_with_a_sentence(cast, tiny_model):
    vera = login(cast.vera)
    for url in ["/teams/vision/jobs/new/inference/", "/teams/vision/models/", "/teams/vision/datasets/"]:
        page = vera.get(url).content.decode()
        assert "<fieldset disabled>" in page and "You are a viewer in team vision" in page, url
    assert "New job" not in vera.get("/teams/vision/jobs/").content.decode()


def test_a_viewers_post_is_refused_and_creates_nothing(cast, tiny_model, demo_dataset_file, cpu_host):
    vera = login(cast.vera)
    response = vera.post("/teams/vision/jobs/new/inference/", valid_post("inference", tiny_model))
    assert response.status_code == 403 and "You are a viewer" in form_errors(response)[0]
    upload = io.BytesIO(demo_dataset_file.read_bytes())
    upload.name = "d.jsonl"
    assert vera.post("/teams/vision/datasets/", {"name": "sneaky", "file": upload}).status_code == 403
    assert not Job.objects.exists() and not Dataset.objects.filter(name="sneaky").exists()


# --- team scoping -----------------------------------------------------------------------

def test_charlie_gets_404_on_every_url_of_vision(cast, inference_job, tiny_model, dataset):
    charlie = login(cast.charlie)
    job = inference_job.pk
    urls = [f"/jobs/{job}/", f"/jobs/{job}/status.json", f"/jobs/{job}/result/", f"/jobs/{job}/artifacts/outputs.jsonl",
            f"/jobs/{job}/artifacts/extra", f"/jobs/{job}/artifacts/extra/config.json", f"/models/{tiny_model.pk}/",
            "/teams/vision/jobs/", "/teams/vision/jobs/new/inference/", "/teams/vision/models/",
            "/teams/vision/datasets/"]
    for url in urls:
        assert charlie.get(url).status_code == 404, url
    assert charlie.post(f"/jobs/{job}/cancel/").status_code == 404
    assert charlie.post("/teams/vision/jobs/new/inference/", valid_post("inference", tiny_model)).status_code == 404
    assert Job.objects.get(pk=job).status == S.SUCCEEDED and Job.objects.count() == 1


def test_a_charlie_404_does_not_tell_him_the_job_exists(cast, inference_job):
    charlie = login(cast.charlie)

    def page(url: str) -> bytes:
        # The log-out form's CSRF token is masked afresh in every response (BREACH).
        return re.sub(rb'name="csrfmiddlewaretoken" value="[^"]*"', b"", charlie.get(url).content)

    assert page(f"/jobs/{inference_job.pk}/") == page("/jobs/999999999/")


def test_an_id_too_large_for_the_database_is_a_404_not_a_500(cast):
    bob = login(cast.bob)
    for url in ["/jobs/99999999999999999999999/", "/jobs/99999999999999999999999/status.json",
                "/models/99999999999999999999999/"]:
        assert bob.get(url).status_code == 404, url


# --- cancel -------------------------------------------------------------------------------

def test_bob_cannot_cancel_alices_job(cast, tiny_model):
    job = make_job(cast.vision, cast.alice, tiny_model)
    response = login(cast.bob).post(f"/jobs/{job.pk}/cancel/")
    assert response.status_code == 403 and b"owner or a team manager" in response.content
    job.refresh_from_db()
    assert job.status == S.PENDING and not job.cancel_requested
    assert b'id="cancel-form"' not in login(cast.bob).get(f"/jobs/{job.pk}/").content


def test_alice_can_cancel_bobs_job(cast, tiny_model):
    job = make_job(cast.vision, cast.bob, tiny_model)
    alice = login(cast.alice)
    assert b'id="cancel-form"' in alice.get(f"/jobs/{job.pk}/").content
    response = alice.post(f"/jobs/{job.pk}/cancel/")
    assert response.status_code == 302 and response["Location"] == f"/jobs/{job.pk}/"
    job.refresh_from_db()
    assert job.status == S.CANCELLED
    assert job.events.filter(kind="cancelled", actor=cast.alice).exists()


def test_cancel_needs_a_post_with_a_csrf_token(cast, tiny_model):
    job = make_job(cast.vision, cast.bob, tiny_model)
    assert login(cast.bob).get(f"/jobs/{job.pk}/cancel/").status_code == 405
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(cast.bob)
    assert strict.post(f"/jobs/{job.pk}/cancel/").status_code == 403
    job.refresh_from_db()
    assert job.status == S.PENDING


def test_a_viewer_cannot_cancel(cast, tiny_model):
    job = make_job(cast.vision, cast.bob, tiny_model)
    assert login(cast.vera).post(f"/jobs/{job.pk}/cancel/").status_code == 403
    job.refresh_from_db()
    assert job.status == S.PENDING


# --- job list ----------------------------------------------------------------------------------

def _jobs(cast, tiny_model, cpu_host, count: int) -> None:
    users = [cast.alice, cast.bob]
    Job.objects.bulk_create([Job(team=cast.vision, user=users[i % 2], kind="inference", model=tiny_model,
                                 host=cpu_host if i % 3 else None, core_start=0 if i % 3 else None,
                                 status=S.SUCCEEDED if i % 3 else S.PENDING, spec={}) for i in range(count)])


def test_the_job_list_does_not_query_per_job(cast, tiny_model, cpu_host, django_assert_max_num_queries):
    bob = login(cast.bob)
    _jobs(cast, tiny_model, cpu_host, 5)
    with CaptureQueriesContext(connection) as five:
        assert bob.get("/teams/vision/jobs/").status_code == 200
    _jobs(cast, tiny_model, cpu_host, 45)
    with django_assert_max_num_queries(len(five.captured_queries)):
        response = bob.get("/teams/vision/jobs/")
    assert response.content.count(b'<a href="/jobs/') == 50


def test_the_job_list_pages_50_newest_first_and_keeps_filters(cast, tiny_model, cpu_host):
    _jobs(cast, tiny_model, cpu_host, 60)
    bob = login(cast.bob)
    first = bob.get("/teams/vision/jobs/").content.decode()
    ids = [int(i) for i in re.findall(r'<a href="/jobs/(\d+)/">', first)]
    assert len(ids) == 50 and ids == sorted(ids, reverse=True)
    assert f'href="?before={ids[-1]}"' in first and "Newer" not in first
    older = bob.get(f"/teams/vision/jobs/?before={ids[-1]}").content.decode()
    rest = [int(i) for i in re.findall(r'<a href="/jobs/(\d+)/">', older)]
    assert len(rest) == 10 and rest == sorted(rest, reverse=True) and rest[0] < ids[-1]
    assert f'href="?after={rest[0]}"' in older and "Older" not in older
    assert [int(i) for i in re.findall(r'<a href="/jobs/(\d+)/">', bob.get(f"/teams/vision/jobs/?after={rest[0]}")
                                       .content.decode())] == ids
    filtered = bob.get("/teams/vision/jobs/?status=pending&page=1").content.decode()
    assert filtered.count("badge status-pending") == Job.objects.filter(status=S.PENDING).count() == 20
    assert "status-succeeded" not in filtered
    assert bob.get("/teams/vision/jobs/?page=banana&before=banana").status_code == 200


def test_a_bad_filter_value_is_a_400_with_the_field_named(cast):
    response = login(cast.bob).get("/teams/vision/jobs/?status=exploded")
    assert response.status_code == 400 and b"status: Select a valid choice" in response.content


# --- job page, status.json, result fragment -------------------------------------------------

def test_the_job_page_shows_status_timeline_host_and_log(cast, inference_job):
    page = login(cast.bob).get(f"/jobs/{inference_job.pk}/").content.decode()
    assert 'id="job-status" class="badge badge-large status-succeeded"' in page
    assert "submitted by bob" in page and "succeeded in 1.2 s" in page
    assert '<dd id="job-host">test-host</dd>' in page and '<dd id="job-cores">0</dd>' in page
    assert "generated 2 outputs" in page
    assert "/static/plotly/plotly.min.js" in page and 'id="job-live-config"' in page
    assert 'id="cancel-form"' not in page  # finished


def test_a_pending_job_shows_its_reason_and_queue_position(cast, tiny_model, cpu_host):
    job = make_job(cast.vision, cast.bob, tiny_model, reason_code="budget_exhausted",
                   reason="team vision has used 2.0 of its 1.5 NeuronCore-hours this month")
    page = login(cast.bob).get(f"/jobs/{job.pk}/").content.decode()
    assert '<code id="job-reason-code">budget_exhausted</code>' in page
    assert "team vision has used 2.0 of its 1.5 NeuronCore-hours this month" in page
    assert re.search(r'id="queue-position-value">1<', page)


def test_inference_results_show_latency_throughput_and_escaped_outputs(cast, inference_job):
    page = login(cast.bob).get(f"/jobs/{inference_job.pk}/result/").content.decode()
    for text in ["Latency p50", "12.5 ms", "Latency p90", "20.2 ms", "Latency p99", "21.0 ms", "3.25 requests/s"]:
        assert text in page
    assert "&lt;b&gt;world&lt;/b&gt;" in page and "<b>world</b>" not in page
    assert "line 2 of outputs.jsonl is not a JSON object" in page and "and again" in page


def test_finetune_results_draw_the_loss_curve_from_metric_rows(cast, finetune_job):
    page = login(cast.alice).get(f"/jobs/{finetune_job.pk}/").content.decode()
    source = re.search(r'<script id="loss-figure" type="application/json">(.*?)</script>', page, re.S)
    figure = json.loads(source.group(1))
    assert figure["data"][0]["x"] == [1, 2, 3, 4, 5]
    assert figure["data"][0]["y"] == [5.5, 5.0, 4.5, 4.0, 3.5]
    assert "Final loss" in page and "3.2500" in page


def test_compile_results_show_compile_time_latency_and_logit_difference(cast, compile_job):
    page = login(cast.bob).get(f"/jobs/{compile_job.pk}/").content.decode()
    for text in ["Compile time", "1.23 s", "Latency p50", "0.812 ms", "Max logit difference", "2.5e-06", "1 × 16"]:
        assert text in page


def test_status_json_returns_events_and_log_after_the_given_cursors(cast, tiny_model):
    job = make_job(cast.vision, cast.bob, tiny_model, status=S.RUNNING)
    write_log(job, "first line\n", "second line\n")
    bob = login(cast.bob)
    data = bob.get(f"/jobs/{job.pk}/status.json").json()
    assert data["status"] == "running" and not data["finished"] and data["result"] is None
    assert [e["kind"] for e in data["events"]] == ["pending"] and data["events"][0]["actor"] == "bob"
    assert data["log"] == {"text": "first line\nsecond line\n", "offset": 23, "more": False}
    last_event = data["events"][-1]["id"]
    states.event(job.pk, "note", "a new event")
    JobLogChunk.objects.create(job=job, offset=23, text="third line\n")
    Job.objects.filter(pk=job.pk).update(log_bytes=34)
    data = bob.get(f"/jobs/{job.pk}/status.json?events_after={last_event}&log_offset=23").json()
    assert [e["message"] for e in data["events"]] == ["a new event"]
    assert data["log"]["text"] == "third line\n" and data["log"]["offset"] == 34
    assert bob.get(f"/jobs/{job.pk}/status.json?log_offset=6").json()["log"]["text"].startswith("line\nsecond")


def test_status_json_has_the_result_once_finished(cast, inference_job):
    data = login(cast.bob).get(f"/jobs/{inference_job.pk}/status.json").json()
    assert data["finished"] and data["result"]["latency_ms_p50"] == 12.5 and not data["can_cancel"]


@pytest.mark.parametrize("query, field", [("log_offset=-1", "log_offset"), ("events_after=abc", "events_after"),
                                          ("log_offset=1e9", "log_offset"), ("log_offset=" + "9" * 30, "log_offset")])
def test_status_json_rejects_bad_cursors_with_the_field_named(cast, inference_job, query, field):
    response = login(cast.bob).get(f"/jobs/{inference_job.pk}/status.json?{query}")
    assert response.status_code == 400
    assert field in response.json()["errors"]


def test_the_log_tail_starts_on_a_whole_line_and_says_it_is_cut(cast, tiny_model):
    job = make_job(cast.vision, cast.bob, tiny_model, status=S.RUNNING)
    write_log(job, *[f"line {i:05d} {'x' * 80}\n" for i in range(2000)])
    window = selectors.log_tail(job)
    assert window.truncated and window.end == job.log_bytes
    assert window.text.startswith("line ") and window.text.endswith("line 01999 " + "x" * 80 + "\n")
    assert len(window.text.encode()) <= selectors.LOG_TAIL_BYTES
    page = login(cast.bob).get(f"/jobs/{job.pk}/").content.decode()
    assert "Showing the end of the log" in page and "line 00000" not in page


# --- artifacts -----------------------------------------------------------------------------

def test_a_file_artifact_downloads_as_a_stream(cast, inference_job):
    response = login(cast.bob).get(f"/jobs/{inference_job.pk}/artifacts/outputs.jsonl")
    assert response.status_code == 200 and response.streaming
    assert b"".join(response.streaming_content).startswith(b'{"index": 0')
    assert 'attachment; filename="outputs.jsonl"' in response["Content-Disposition"]


def test_a_folder_artifact_downloads_as_a_zip_without_symlinks(cast, inference_job):
    response = login(cast.bob).get(f"/jobs/{inference_job.pk}/artifacts/extra")
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert sorted(archive.namelist()) == ["extra/config.json", "extra/sub/weights.bin"]
    assert archive.read("extra/sub/weights.bin") == bytes(range(256)) * 40
    assert archive.testzip() is None


def test_a_file_inside_a_folder_artifact_downloads(cast, inference_job):
    response = login(cast.bob).get(f"/jobs/{inference_job.pk}/artifacts/extra/config.json")
    assert b"".join(response.streaming_content) == b'{"model_type": "gpt2"}'


@pytest.mark.parametrize("name", ["extra/../../../../secret.txt", "extra/%2e%2e/%2e%2e/%2e%2e/%2e%2e/secret.txt",
                                  "extra/escape", "../secret.txt", "nothing-here", "extra/missing.bin"])
def test_artifact_paths_cannot_leave_the_artifact(cast, inference_job, name):
    response = login(cast.bob).get(f"/jobs/{inference_job.pk}/artifacts/{name}")
    assert response.status_code == 404


def test_an_artifact_row_pointing_outside_its_jobs_folder_is_not_served(cast, inference_job, tiny_model):
    Artifact.objects.create(job=inference_job, name="weights", path=tiny_model.path, is_dir=True)
    assert login(cast.bob).get(f"/jobs/{inference_job.pk}/artifacts/weights").status_code == 404


def test_the_job_page_links_each_artifact(cast, inference_job):
    page = login(cast.bob).get(f"/jobs/{inference_job.pk}/").content.decode()
    assert f'href="/jobs/{inference_job.pk}/artifacts/outputs.jsonl"' in page
    assert f'href="/jobs/{inference_job.pk}/artifacts/extra"' in page


# --- models and datasets ---------------------------------------------------------------------

def model_zip(folder: Path, extra: dict[str, bytes] | None = None) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in folder.iterdir():
            archive.write(path, f"my-model/{path.name}")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    buffer.seek(0)
    buffer.name = "my-model.zip"
    return buffer


def test_the_models_page_shows_lineage_base_then_finetuned_then_compiled(cast, tiny_model):
    tuned = ModelAsset.objects.create(team=cast.vision, name="tiny-gpt-ft", path="a", parent=tiny_model)
    compiled = ModelAsset.objects.create(team=cast.vision, name="tiny-gpt-ft-cpu", path="b", parent=tuned,
                                         format=ModelAsset.Format.TORCHSCRIPT)
    other = ModelAsset.objects.create(team=cast.vision, name="another-base", path="c")
    rows = asset_selectors.model_lineage(cast.vision)
    assert [(r.model.pk, r.depth) for r in rows] == [(other.pk, 0), (tiny_model.pk, 0), (tuned.pk, 1), (compiled.pk, 2)]
    page = login(cast.bob).get("/teams/vision/models/").content.decode()
    assert page.index("tiny-gpt <") < page.index("tiny-gpt-ft <") < page.index("tiny-gpt-ft-cpu <")
    assert 'class="depth-2"' in page


def test_the_model_page_shows_parent_children_source_job_and_prefilled_buttons(cast, tiny_model, finetune_job):
    tuned = ModelAsset.objects.create(team=cast.vision, name="tiny-gpt-ft", path="a", parent=tiny_model,
                                      source_job=finetune_job)
    base_page = login(cast.bob).get(f"/models/{tiny_model.pk}/").content.decode()
    assert f'href="/models/{tuned.pk}/"' in base_page
    for kind in ("compile", "finetune", "inference"):
        assert f'href="/teams/vision/jobs/new/{kind}/?model={tiny_model.pk}"' in base_page
    tuned_page = login(cast.bob).get(f"/models/{tuned.pk}/").content.decode()
    assert f'href="/models/{tiny_model.pk}/"' in tuned_page and f'href="/jobs/{finetune_job.pk}/"' in tuned_page


def test_a_model_zip_upload_registers_a_model(cast, tiny_model_dir):
    response = login(cast.bob).post("/teams/vision/models/", {"name": "uploaded", "file": model_zip(tiny_model_dir)})
    model = ModelAsset.objects.get(name="uploaded")
    assert response.status_code == 302 and response["Location"] == f"/models/{model.pk}/"
    assert model.team == cast.vision and model.version == 1 and model.meta["model_type"]


@pytest.mark.parametrize("data, field, message", [
    ({"name": "bad", "file": "not a zip"}, "file", "not a zip archive"),
    ({"name": "bad", "file": "escaping"}, "file", "escaping its folder"),
    ({"name": "has spaces", "file": "ok"}, "name", "Enter a valid"),
    ({"name": "bad"}, "file", "This field is required"),
])
def test_a_bad_model_upload_shows_the_field_error_and_registers_nothing(cast, tiny_model_dir, data, field, message):
    files = {"not a zip": io.BytesIO(b"plain text"), "ok": model_zip(tiny_model_dir),
             "escaping": model_zip(tiny_model_dir, {"../../evil.txt": b"x"})}
    if "file" in data:
        data = {**data, "file": files[data["file"]]}
        data["file"].name = "model.zip"
    response = login(cast.bob).post("/teams/vision/models/", data)
    assert response.status_code == 400
    assert any(message in unescape(e) for e in field_errors(response, field)), field_errors(response, field)
    assert not ModelAsset.objects.exists()


def test_a_dataset_upload_is_listed_with_its_rows(cast, demo_dataset_file):
    upload = io.BytesIO(demo_dataset_file.read_bytes())
    upload.name = "demo.jsonl"
    bob = login(cast.bob)
    assert bob.post("/teams/vision/datasets/", {"name": "my data", "file": upload}).status_code == 302
    page = bob.get("/teams/vision/datasets/").content.decode()
    assert "my data" in page and "<td>64</td>" in page


@pytest.mark.parametrize("filename, content, message", [
    ("d.jsonl", b'{"text": "ok"}\n{"text": \n', "line 2 is not valid JSON"),
    ("d.jsonl", b'{"body": "no text field"}\n', 'needs a "text" string field'),
    ("d.csv", b"a,b\n1,2\n", 'a "text" column'),
    ("d.jsonl", b"", "empty"),
])
def test_a_bad_dataset_upload_shows_the_file_error_and_stores_nothing(cast, filename, content, message):
    upload = io.BytesIO(content)
    upload.name = filename
    response = login(cast.bob).post("/teams/vision/datasets/", {"name": "bad", "file": upload})
    assert response.status_code == 400
    assert any(message in unescape(e) for e in field_errors(response, "file")), field_errors(response, "file")
    assert not Dataset.objects.exists()


# --- API tokens --------------------------------------------------------------------------------

def test_a_new_token_is_shown_once_and_listed_by_prefix(cast):
    bob = login(cast.bob)
    response = bob.post("/tokens/", {"name": "laptop"})
    raw = re.search(r'<pre class="token" id="new-token">(nd_[^<]+)</pre>', response.content.decode()).group(1)
    assert response["Cache-Control"] == "no-store"
    token = ApiToken.objects.get(user=cast.bob)
    assert token.digest == ApiToken.hash(raw) and raw.startswith(token.prefix)
    listing = bob.get("/tokens/").content.decode()
    assert raw not in listing and token.prefix in listing and "laptop" in listing and "never" in listing


def test_a_token_name_is_required(cast):
    response = login(cast.bob).post("/tokens/", {"name": ""})
    assert response.status_code == 400 and field_errors(response, "name")
    assert not ApiToken.objects.exists()


def test_tokens_can_be_deleted_only_by_their_owner(cast):
    from jobs.teams.tokens import token_create

    _, token = token_create(user=cast.bob, name="ci")
    assert login(cast.charlie).post(f"/tokens/{token.pk}/delete/").status_code == 404
    assert ApiToken.objects.filter(pk=token.pk).exists()
    assert login(cast.bob).post(f"/tokens/{token.pk}/delete/").status_code == 302
    assert not ApiToken.objects.filter(pk=token.pk).exists()


# --- chart builder (pure) ---------------------------------------------------------------------

def test_the_loss_figure_is_plain_json_with_steps_and_losses():
    figure = charts.loss_figure([1, 2, 3], [3.0, 2.5, 2.25])
    assert json.loads(json.dumps(figure)) == figure
    assert figure["data"][0]["x"] == [1, 2, 3] and figure["data"][0]["y"] == [3.0, 2.5, 2.25]
    assert figure["layout"]["xaxis"]["title"]["text"] == "step"
    assert charts.loss_figure([], [])["layout"]["annotations"][0]["text"] == "no loss recorded yet"
    with pytest.raises(ValueError):
        charts.loss_figure([1, 2], [1.0])


def test_a_long_loss_series_is_thinned_in_the_database(cast, finetune_job):
    JobMetric.objects.bulk_create([JobMetric(job=finetune_job, step=s, name="loss", value=1.0)
                                   for s in range(6, 10001)])
    steps, losses = selectors.loss_series(finetune_job, max_points=1000)
    assert 900 <= len(steps) <= 1100 and steps == sorted(steps) and len(steps) == len(losses)


def test_a_staff_users_team_switcher_lists_twenty_teams_and_links_the_rest_on_every_kind_of_page(cast):
    from jobs.access import NAV_TEAMS_STAFF
    from jobs.teams.services import team_create

    for i in range(30):
        team_create(slug=f"extra-{i:02d}", name=f"Extra {i:02d}")
    admin = login(cast.admin)
    for url in ["/teams/vision/jobs/", "/teams/vision/usage/", "/fleet/", "/quotas/"]:
        page = admin.get(url)
        assert page.status_code == 200, url
        switcher = page.content.decode().split('class="menu team-switcher"', 1)[1].split("</details>", 1)[0]
        assert switcher.count('role="menuitem" href="/teams/') == NAV_TEAMS_STAFF, url
        assert "All teams (search)" in switcher, url
        assert len(page.context["nav_teams"]) == NAV_TEAMS_STAFF + 1, url  # not every team read for the menu
    # A member's switcher lists all of their teams and no link.
    bob = login(cast.bob).get("/teams/vision/jobs/").content.decode()
    assert "All teams (search)" not in bob
