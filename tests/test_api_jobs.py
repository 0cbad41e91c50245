"""The JSON API for jobs, models and datasets (jobs/api_jobs.py), against real
PostgreSQL and no worker: jobs stay pending unless a test dispatches them or moves
them through jobs.states itself."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from jobs.lifecycle import scheduler
from jobs.lifecycle import states
from jobs.assets import storage
from jobs.models import ApiToken, Artifact, Dataset, Host, Job, JobLogChunk, ModelAsset, TeamQuota
from tests.conftest import api_client

S = Job.Status


# --- helpers ------------------------------------------------------------------------

def post_json(client: Client, url: str, body) -> "HttpResponse":
    return client.post(url, data=json.dumps(body), content_type="application/json")


def inference_body(asset, **extra) -> dict:
    return {"team": "vision", "kind": "inference", "family": "cpu", "cores": 1, "model": asset.pk,
            "prompts": ["hello", "world"], "max_new_tokens": 4, "temperature": 0, **extra}


def compile_body(asset, **extra) -> dict:
    return {"team": "vision", "kind": "compile", "family": "cpu", "cores": 1, "model": asset.pk,
            "batch_size": 1, "sequence_length": 32, **extra}


def finetune_body(asset, data_set, **extra) -> dict:
    return {"team": "vision", "kind": "finetune", "family": "cpu", "cores": 1, "model": asset.pk,
            "dataset": data_set.pk, "steps": 5, "learning_rate": 0.001, "batch_size": 2, "sequence_length": 32, **extra}


def submit(client: Client, body: dict) -> dict:
    response = post_json(client, "/api/v1/jobs", body)
    assert response.status_code == 201, response.content
    return response.json()


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_of_folder(folder: Path, top: str = "tiny-gpt") -> bytes:
    return zip_bytes({f"{top}/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in files_under(folder)})


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    """The cast's five users are hashed with PBKDF2 otherwise (~0.3 s each, every test)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def alice(cast):
    return api_client(cast.alice)


# --- submit -------------------------------------------------------------------------

def test_an_inference_job_is_created_pending_and_returned_as_a_document(cast, bob, tiny_model, cpu_host):
    doc = submit(bob, inference_body(tiny_model))
    job = Job.objects.get()
    assert doc["id"] == job.pk and doc["url"] == f"/api/v1/jobs/{job.pk}"
    assert (doc["team"], doc["user"], doc["kind"], doc["status"]) == ("vision", "bob", "inference", "pending")
    assert doc["spec"]["prompts"] == ["hello", "world"] and doc["spec"]["model_id"] == tiny_model.pk
    assert (doc["family"], doc["cores"], doc["host"], doc["core_range"]) == ("cpu", 1, None, None)
    assert doc["reason_code"] == "submitted" and doc["reason"] == "waiting for the scheduler"
    assert doc["attempts"] == 0 and doc["max_attempts"] == job.max_attempts and doc["max_runtime_s"] == job.max_runtime_s
    assert doc["result"] == {} and doc["started_at"] is None and doc["logs_url"] == f"/api/v1/jobs/{job.pk}/logs"
    # The submit answer is the job as created; the timeline, artifacts and queue
    # position (several queries each) are in the full document at its url.
    assert not {"events", "artifacts", "queue_position", "output_model"} & set(doc)
    full = bob.get(doc["url"]).json()
    assert {k: full[k] for k in doc} == doc
    assert full["queue_position"] == 1 and full["artifacts"] == [] and full["output_model"] is None
    assert [(e["kind"], e["actor"]) for e in full["events"]] == [("pending", "bob")]


def test_a_submit_costs_a_fixed_handful_of_statements(cast, bob, tiny_model, cpu_host):
    submit(bob, inference_body(tiny_model))  # the token's last_used_at is written (at most once a minute)
    with CaptureQueriesContext(connection) as queries:
        submit(bob, inference_body(tiny_model))
    # token + user, membership + team, the form's model, the family's hosts, a bound
    # of the month's use (roll-up days, unfolded attempts); then the quota lock (with
    # the user's cap in the same query), pending count, job and event inserts, in the
    # test's savepoint.
    assert len(queries) == 12, "\n".join(q["sql"][:120] for q in queries.captured_queries)
    assert not [q for q in queries.captured_queries if "jobs_apitoken" in q["sql"] and "UPDATE" in q["sql"]]


def test_a_compile_job_takes_compiler_options_as_a_list_and_stores_them_normalized(cast, bob, tiny_model, cpu_host):
    doc = submit(bob, compile_body(tiny_model, compiler_options=["--model-type=transformer", "-O2"]))
    assert doc["kind"] == "compile"
    assert doc["spec"]["compiler_options"] == ["--model-type=transformer", "--optlevel=2"]
    assert doc["spec"]["batch_size"] == 1 and doc["spec"]["compile_key"]


def test_a_finetune_job_records_its_base_model_and_dataset(cast, bob, tiny_model, dataset, cpu_host):
    doc = submit(bob, finetune_body(tiny_model, dataset, max_runtime_s=600))
    assert doc["model_id"] == tiny_model.pk and doc["dataset_id"] == dataset.pk
    assert doc["spec"]["steps"] == 5 and doc["max_runtime_s"] == 600


def test_inference_prompts_can_be_uploaded_as_a_jsonl_file(cast, bob, tiny_model, cpu_host):
    upload = SimpleUploadedFile("prompts.jsonl", b'{"prompt": "one"}\n\n{"text": "two"}\n')
    response = bob.post("/api/v1/jobs", data={"team": "vision", "kind": "inference", "family": "cpu", "cores": "1",
                                              "model": str(tiny_model.pk), "max_new_tokens": "4",
                                              "temperature": "0", "prompts_file": upload})
    assert response.status_code == 201, response.content
    assert response.json()["spec"]["prompts"] == ["one", "two"]


BAD_JOBS = [
    # (what, body builder, field named in the error, words of the message)
    ("unknown model", lambda m, d: inference_body(m, model=987654), "model", "Unknown model"),
    ("batch size 0", lambda m, d: compile_body(m, batch_size=0), "batch_size", "greater than or equal to 1"),
    ("sequence longer than the model's positions", lambda m, d: compile_body(m, sequence_length=300),
     "sequence_length", "longer than the model's 256 positions"),
    ("negative steps", lambda m, d: finetune_body(m, d, steps=-5), "steps", "greater than or equal to 1"),
    ("no steps nor epochs", lambda m, d: finetune_body(m, d, steps=None), "steps", "steps or epochs"),
    ("a compiler option off the allow-list", lambda m, d: compile_body(m, compiler_options="--foo"),
     "compiler_options", "unknown or unsupported flag '--foo'"),
    ("shell syntax as compiler options", lambda m, d: compile_body(m, compiler_options="; rm -rf /"),
     "compiler_options", "shell syntax"),
    ("shell syntax in a list of compiler options", lambda m, d: compile_body(m, compiler_options=["; rm -rf /"]),
     "compiler_options", "shell syntax"),
    ("an unknown dataset", lambda m, d: finetune_body(m, d, dataset=987654), "dataset", "Unknown dataset"),
    ("no prompts", lambda m, d: inference_body(m, prompts=[]), "prompts", "at least one prompt"),
    ("prompts that are not strings", lambda m, d: inference_body(m, prompts=[1, 2]), "prompts", "list of strings"),
    ("zero cores", lambda m, d: inference_body(m, cores=0), "cores", "greater than or equal to 1"),
    ("a learning rate that is not a number", lambda m, d: finetune_body(m, d, learning_rate="fast"),
     "learning_rate", "Enter a number"),
    ("an unknown family", lambda m, d: inference_body(m, family="gpu"), "family", "not one of the available"),
    ("an unknown kind", lambda m, d: {**inference_body(m), "kind": "train"}, "kind", "kind must be one of"),
    ("no team", lambda m, d: {k: v for k, v in inference_body(m).items() if k != "team"}, "team", "required"),
    ("a misspelt field", lambda m, d: finetune_body(m, d, stepz=3), "stepz", "unknown field for finetune jobs"),
    ("a prompts_file inside a JSON body", lambda m, d: inference_body(m, prompts_file="x.jsonl"), "prompts_file",
     "multipart/form-data"),
]


@pytest.mark.parametrize("what,build,field,words", BAD_JOBS, ids=[b[0] for b in BAD_JOBS])
def test_a_bad_job_is_refused_with_json_naming_the_field_and_nothing_is_created(
        cast, bob, tiny_model, dataset, cpu_host, what, build, field, words):
    response = post_json(bob, "/api/v1/jobs", build(tiny_model, dataset))
    assert response.status_code == 400, response.content
    body = response.json()
    assert field in body["errors"], body
    assert words in " ".join(body["errors"][field]), body
    assert field in body["detail"] or words in body["detail"]
    assert not Job.objects.exists()


def test_a_compiled_model_is_refused_as_a_fine_tune_base(cast, bob, tiny_model, dataset, cpu_host):
    compiled = ModelAsset.objects.create(team=cast.vision, name="tiny-cpu", format=ModelAsset.Format.TORCHSCRIPT,
                                         parent=tiny_model, path=tiny_model.path)
    response = post_json(bob, "/api/v1/jobs", finetune_body(tiny_model, dataset, model=compiled.pk))
    assert response.status_code == 400
    assert response.json()["errors"]["model"] == ["Unknown model: select an uncompiled model of your team."]
    assert not Job.objects.exists()


def test_api_errors_match_the_html_forms_messages(cast, bob, tiny_model, cpu_host):
    from jobs.lifecycle.forms import CompileForm

    body = compile_body(tiny_model, batch_size=0, compiler_options="--foo")
    form = CompileForm(data=body, team=cast.vision)
    assert not form.is_valid()
    errors = post_json(bob, "/api/v1/jobs", body).json()["errors"]
    assert errors == {k: list(v) for k, v in form.errors.items()}


def test_a_body_that_is_not_a_json_object_is_a_400(cast, bob):
    assert bob.post("/api/v1/jobs", data="{nope", content_type="application/json").status_code == 400
    response = post_json(bob, "/api/v1/jobs", ["team", "vision"])
    assert response.status_code == 400 and "JSON object" in response.json()["detail"]


def test_a_malformed_line_in_the_prompts_file_is_refused_naming_the_line(cast, bob, tiny_model, cpu_host):
    upload = SimpleUploadedFile("prompts.jsonl", b'{"prompt": "one"}\n{"prompt": oops}\n')
    response = bob.post("/api/v1/jobs", data={"team": "vision", "kind": "inference", "family": "cpu", "cores": "1",
                                              "model": str(tiny_model.pk), "max_new_tokens": "4",
                                              "temperature": "0", "prompts_file": upload})
    assert response.status_code == 400
    assert "line 2 is not valid JSON" in response.json()["errors"]["prompts_file"][0]
    assert not Job.objects.exists()


def test_a_viewer_gets_403_with_a_sentence_saying_why(cast, tiny_model, cpu_host):
    response = post_json(api_client(cast.vera), "/api/v1/jobs", inference_body(tiny_model))
    assert response.status_code == 403
    assert response.json()["detail"] == "You cannot submit jobs: your role in team vision is viewer; this needs member."
    assert not Job.objects.exists()


def test_an_unknown_team_is_a_404(cast, bob, tiny_model, cpu_host):
    assert post_json(bob, "/api/v1/jobs", inference_body(tiny_model, team="nope")).status_code == 404
    assert post_json(bob, "/api/v1/jobs", inference_body(tiny_model, team="audio")).status_code == 404
    assert not Job.objects.exists()


def test_a_request_no_host_can_hold_is_refused_naming_cores(cast, bob, tiny_model, cpu_host):
    response = post_json(bob, "/api/v1/jobs", inference_body(tiny_model, cores=5))
    assert response.status_code == 400
    body = response.json()
    assert (body["code"], body["field"]) == ("request_too_large", "cores")
    assert "largest available is 4" in body["errors"]["cores"][0]
    assert not Job.objects.exists()


def test_a_team_at_its_pending_limit_gets_a_409(cast, bob, tiny_model, cpu_host):
    TeamQuota.objects.filter(team=cast.vision).update(max_pending=1)
    submit(bob, inference_body(tiny_model))
    response = post_json(bob, "/api/v1/jobs", inference_body(tiny_model))
    assert response.status_code == 409
    assert response.json()["code"] == "too_many_pending" and "already has 1 pending" in response.json()["detail"]
    assert Job.objects.count() == 1


def test_a_runtime_above_the_teams_limit_is_refused_naming_max_runtime_s(cast, bob, tiny_model, cpu_host):
    TeamQuota.objects.filter(team=cast.vision).update(max_runtime_s=60)
    response = post_json(bob, "/api/v1/jobs", inference_body(tiny_model, max_runtime_s=61))
    assert response.status_code == 400
    assert response.json()["errors"] == {"max_runtime_s": ["max_runtime_s 61 is above team vision's limit of 60 s"]}


# --- list ---------------------------------------------------------------------------

def make_jobs(team, user, n: int, **fields) -> list[Job]:
    return [Job.objects.create(team=team, user=user, kind=fields.get("kind", "inference"),
                               status=fields.get("status", S.PENDING), family="cpu") for _ in range(n)]


def test_the_job_list_is_newest_first_and_filters_by_team_status_kind_and_user(cast, bob):
    older = make_jobs(cast.vision, cast.alice, 2, kind="compile")
    newer = make_jobs(cast.vision, cast.bob, 2, status=S.SUCCEEDED)
    make_jobs(cast.audio, cast.charlie, 1)

    def ids(query: str) -> list[int]:
        response = bob.get(f"/api/v1/jobs{query}")
        assert response.status_code == 200, response.content
        return [j["id"] for j in response.json()["items"]]

    everything = [j.pk for j in reversed(older + newer)]
    assert ids("") == everything  # bob sees only vision's jobs
    assert ids("?team=vision") == everything
    assert ids("?status=succeeded") == [j.pk for j in reversed(newer)]
    assert ids("?kind=compile") == [j.pk for j in reversed(older)]
    assert ids("?user=alice") == [j.pk for j in reversed(older)]
    assert ids("?user=alice&status=succeeded") == []


def test_the_job_list_is_paginated_with_a_count_and_next_links(cast, bob):
    jobs = make_jobs(cast.vision, cast.bob, 5)
    page = bob.get("/api/v1/jobs?limit=2&kind=inference").json()
    assert page["count"] == 5 and page["previous"] is None
    seen = [j["id"] for j in page["items"]]
    while page["next"]:
        assert "kind=inference" in page["next"]
        page = bob.get(page["next"]).json()
        seen += [j["id"] for j in page["items"]]
    assert seen == [j.pk for j in reversed(jobs)]
    assert page["previous"] is not None and page["offset"] == 4


def test_a_bad_filter_is_a_400_naming_it(cast, bob):
    response = bob.get("/api/v1/jobs?status=exploded")
    assert response.status_code == 400 and "status" in response.json()["errors"]
    assert bob.get("/api/v1/jobs?kind=train").json()["errors"]["kind"][0].startswith("'train' is not one of")
    assert bob.get("/api/v1/jobs?limit=0").status_code == 422  # ninja's own check of the documented bounds


def test_the_job_list_costs_the_same_number_of_queries_for_3_or_30_jobs(cast, bob, cpu_host):
    def queries_for_list() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert bob.get("/api/v1/jobs?limit=100").status_code == 200
        return len(ctx.captured_queries)

    jobs = make_jobs(cast.vision, cast.bob, 3)
    Job.objects.filter(pk=jobs[0].pk).update(host=cpu_host, core_start=0)
    queries_for_list()  # the token's first use records last_used_at (then at most once a minute)
    few = queries_for_list()
    make_jobs(cast.vision, cast.alice, 27)
    assert queries_for_list() == few
    assert few <= 6


# --- detail, queue position, reasons -----------------------------------------------------

def test_a_dispatched_job_shows_its_host_cores_and_no_queue_position(cast, bob, tiny_model, cpu_host):
    doc = submit(bob, inference_body(tiny_model, cores=2))
    scheduler.dispatch()
    doc = bob.get(doc["url"]).json()
    assert (doc["status"], doc["host"], doc["core_range"]) == ("queued", "test-host", "0-1")
    assert doc["queue_position"] is None and doc["reason_code"] is None and doc["queued_at"]
    assert [e["kind"] for e in doc["events"]] == ["pending", "queued"]


def test_queue_position_follows_the_dispatch_order_within_a_family(cast, bob, alice, tiny_model, cpu_host):
    Host.objects.create(name="inf-host", family="inf2", core_ids=[0, 1])
    first_compile = submit(bob, compile_body(tiny_model, cores=4))
    second_compile = submit(alice, compile_body(tiny_model, cores=4, batch_size=2))
    other_family = submit(bob, inference_body(tiny_model, family="inf2", cores=2))
    inference = submit(bob, inference_body(tiny_model, cores=4))  # kind priority: inference before compile

    def position(doc) -> int | None:
        return bob.get(doc["url"]).json()["queue_position"]

    assert [position(d) for d in (inference, first_compile, second_compile)] == [1, 2, 3]
    assert position(other_family) == 1
    scheduler.dispatch()  # the inference job takes all four cpu cores
    assert position(inference) is None
    assert [position(d) for d in (first_compile, second_compile)] == [1, 2]


def test_a_failed_job_shows_its_failure_and_reason(cast, bob, tiny_model, cpu_host):
    doc = submit(bob, inference_body(tiny_model))
    scheduler.dispatch()
    assert states.mark_running(doc["id"], cpu_host.pk)
    states.mark_finished(doc["id"], S.FAILED, failure="error", reason="the runner exited with code 1",
                         result={"error": "boom"})
    doc = bob.get(doc["url"]).json()
    assert (doc["status"], doc["failure"], doc["reason_code"]) == ("failed", "error", "error")
    assert doc["reason"] == "the runner exited with code 1" and doc["result"] == {"error": "boom"}
    assert doc["attempts"] == 1 and doc["started_at"] and doc["finished_at"]


# --- logs ---------------------------------------------------------------------------

LOG = "step 1 loss 3.2\nstep 2 loss 2.9 ✓\nnaïve résumé — ünïcödé\nstep 3 loss 2.5\n" * 3


def write_log(job_id: int, text: str, cuts: list[int]) -> None:
    """Store `text` as chunks split at the character positions `cuts`, with byte offsets."""
    offset, start = 0, 0
    for end in [*cuts, len(text)]:
        piece = text[start:end]
        if piece:
            JobLogChunk.objects.create(job_id=job_id, offset=offset, text=piece)
            offset += len(piece.encode("utf-8"))
        start = end


def follow(client: Client, job_id: int, max_bytes: int) -> tuple[str, list[dict]]:
    text, offset, pages = "", 0, []
    while True:
        page = client.get(f"/api/v1/jobs/{job_id}/logs?offset={offset}&max_bytes={max_bytes}").json()
        pages.append(page)
        assert page["offset"] == offset
        text += page["text"]
        if page["finished"] or page["next_offset"] == offset:
            return text, pages
        offset = page["next_offset"]


@pytest.fixture
def running_job(cast, bob, tiny_model, cpu_host) -> int:
    doc = submit(bob, inference_body(tiny_model))
    scheduler.dispatch()
    assert states.mark_running(doc["id"], cpu_host.pk)
    return doc["id"]


@pytest.mark.parametrize("cuts", [[], [1, 2, 3], [17, 40, 41, 100], list(range(5, len(LOG), 7))],
                         ids=["one chunk", "tiny chunks", "uneven chunks", "every 7 characters"])
@pytest.mark.parametrize("max_bytes", [10, 4096])
def test_a_client_following_the_log_gets_it_whole_whatever_the_chunk_boundaries(bob, running_job, cuts, max_bytes):
    write_log(running_job, LOG, cuts)
    text, pages = follow(bob, running_job, max_bytes)
    assert text == LOG
    assert not pages[-1]["finished"]  # still running: a client keeps polling from next_offset
    assert pages[-1]["next_offset"] == len(LOG.encode("utf-8"))


def test_an_offset_inside_a_chunk_returns_the_rest_of_the_log_from_that_byte(bob, running_job):
    write_log(running_job, LOG, [30])
    start = len(LOG[:20].encode("utf-8"))
    page = bob.get(f"/api/v1/jobs/{running_job}/logs?offset={start}").json()
    assert page["text"] == LOG[20:] and page["next_offset"] == len(LOG.encode("utf-8"))


def test_the_log_is_finished_once_the_job_ended_and_everything_was_read(bob, running_job):
    write_log(running_job, "first line\n", [])
    page = bob.get(f"/api/v1/jobs/{running_job}/logs").json()
    assert (page["text"], page["finished"]) == ("first line\n", False)
    JobLogChunk.objects.create(job_id=running_job, offset=page["next_offset"], text="last line\n")
    states.mark_finished(running_job, S.SUCCEEDED, result={})
    later = bob.get(f"/api/v1/jobs/{running_job}/logs?offset={page['next_offset']}").json()
    assert (later["text"], later["finished"]) == ("last line\n", True)
    assert bob.get(f"/api/v1/jobs/{running_job}/logs?offset=0&max_bytes=5").json()["finished"] is False


def test_a_job_without_a_log_returns_empty_text(bob, running_job):
    page = bob.get(f"/api/v1/jobs/{running_job}/logs?offset=0").json()
    assert page == {"offset": 0, "next_offset": 0, "text": "", "finished": False}


# --- cancel and roles ---------------------------------------------------------------

def test_a_member_cancels_their_own_pending_job_and_a_second_cancel_is_a_409(cast, bob, tiny_model, cpu_host):
    doc = submit(bob, inference_body(tiny_model))
    response = bob.post(f"/api/v1/jobs/{doc['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["events"][-1] == {**response.json()["events"][-1], "kind": "cancelled", "actor": "bob"}
    again = bob.post(f"/api/v1/jobs/{doc['id']}/cancel")
    assert again.status_code == 409 and again.json()["code"] == "already_finished"


def test_bob_cannot_cancel_alices_job(cast, bob, alice, tiny_model, cpu_host):
    doc = submit(alice, inference_body(tiny_model))
    response = bob.post(f"/api/v1/jobs/{doc['id']}/cancel")
    assert response.status_code == 403 and "owner or a team manager" in response.json()["detail"]
    assert Job.objects.get(pk=doc["id"]).status == S.PENDING


def test_alice_the_manager_can_cancel_bobs_job(cast, bob, alice, tiny_model, cpu_host):
    doc = submit(bob, inference_body(tiny_model))
    scheduler.dispatch()
    response = alice.post(f"/api/v1/jobs/{doc['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert response.json()["events"][-1]["actor"] == "alice"


def test_vera_the_viewer_can_read_a_job_but_not_cancel_it(cast, bob, tiny_model, cpu_host):
    doc = submit(bob, inference_body(tiny_model))
    vera = api_client(cast.vera)
    assert vera.get(doc["url"]).status_code == 200
    assert vera.post(f"/api/v1/jobs/{doc['id']}/cancel").status_code == 403
    assert Job.objects.get(pk=doc["id"]).status == S.PENDING


def test_cancelling_a_running_job_asks_its_worker_to_stop(bob, running_job):
    doc = bob.post(f"/api/v1/jobs/{running_job}/cancel").json()
    assert doc["status"] == "running" and doc["cancel_requested"] is True
    assert doc["events"][-1]["kind"] == "cancel_requested"


# --- artifacts ----------------------------------------------------------------------

@pytest.fixture
def job_with_artifacts(running_job) -> Job:
    job = Job.objects.get(pk=running_job)
    out = storage.job_dir(job.pk) / "artifacts"
    (out / "checkpoint" / "sub").mkdir(parents=True, exist_ok=True)
    (out / "outputs.jsonl").write_text('{"output": "hi"}\n')
    (out / "checkpoint" / "config.json").write_text("{}")
    (out / "checkpoint" / "sub" / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    secret = storage.root() / "secret.txt"
    secret.write_text("not yours")
    link = out / "checkpoint" / "leak.txt"
    if not link.is_symlink():
        os.symlink(secret, link)
    for name, is_dir in (("outputs.jsonl", False), ("checkpoint", True)):
        Artifact.objects.create(job=job, name=name, path=storage.rel_path(out / name), is_dir=is_dir,
                                size_bytes=0 if is_dir else (out / name).stat().st_size)
    states.mark_finished(job.pk, S.SUCCEEDED, result={"requests": 1})
    return job


def test_the_job_document_lists_artifacts_with_download_urls(bob, job_with_artifacts):
    doc = bob.get(f"/api/v1/jobs/{job_with_artifacts.pk}").json()
    assert [(a["name"], a["is_dir"]) for a in doc["artifacts"]] == [("checkpoint", True), ("outputs.jsonl", False)]
    file_url = doc["artifacts"][1]["url"]
    assert file_url == f"/api/v1/jobs/{job_with_artifacts.pk}/artifacts/outputs.jsonl"
    response = bob.get(file_url)
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b'{"output": "hi"}\n'
    assert 'filename="outputs.jsonl"' in response["Content-Disposition"]


def test_a_directory_artifact_downloads_as_a_zip_without_symlinked_files(bob, job_with_artifacts):
    response = bob.get(f"/api/v1/jobs/{job_with_artifacts.pk}/artifacts/checkpoint")
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    data = b"".join(response.streaming_content)
    assert int(response["Content-Length"]) == len(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert sorted(archive.namelist()) == ["checkpoint/config.json", "checkpoint/sub/weights.bin"]
        assert archive.read("checkpoint/sub/weights.bin") == b"\x00\x01" * 1000


def test_a_file_inside_a_directory_artifact_downloads_alone(bob, job_with_artifacts):
    response = bob.get(f"/api/v1/jobs/{job_with_artifacts.pk}/artifacts/checkpoint/sub/weights.bin")
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b"\x00\x01" * 1000


@pytest.mark.parametrize("name", ["../../secret.txt", "..%2F..%2Fsecret.txt", "checkpoint/../../../secret.txt",
                                  "%2Fetc%2Fpasswd", "nope.txt", "checkpoint/nope.json"])
def test_an_artifact_name_that_is_not_a_registered_artifact_is_a_404(bob, job_with_artifacts, name):
    response = bob.get(f"/api/v1/jobs/{job_with_artifacts.pk}/artifacts/{name}")
    assert response.status_code == 404
    assert b"not yours" not in response.content


def test_a_missing_file_inside_a_folder_artifact_is_named_as_such(bob, job_with_artifacts):
    # It said "The artifact's file is gone", as if the checkpoint itself had been deleted.
    response = bob.get(f"/api/v1/jobs/{job_with_artifacts.pk}/artifacts/checkpoint/nope.json")
    assert response.status_code == 404 and response.json()["detail"] == "No such file in this artifact"
    shutil.rmtree(storage.abs_path(job_with_artifacts.artifacts.get(name="checkpoint").path))
    response = bob.get(f"/api/v1/jobs/{job_with_artifacts.pk}/artifacts/checkpoint")
    assert response.status_code == 404 and response.json()["detail"] == "The artifact's file is gone"


def test_an_artifact_row_pointing_outside_storage_is_a_404(bob, job_with_artifacts):
    Artifact.objects.create(job=job_with_artifacts, name="evil", path="../../../../etc/passwd")
    assert bob.get(f"/api/v1/jobs/{job_with_artifacts.pk}/artifacts/evil").status_code == 404


# --- models -------------------------------------------------------------------------

def upload_model(client: Client, data: bytes, name: str = "uploaded", team: str = "vision", filename="model.zip"):
    return client.post("/api/v1/models", data={"team": team, "name": name,
                                               "file": SimpleUploadedFile(filename, data)})


def test_a_zipped_hugging_face_folder_uploads_as_a_new_model_version(cast, bob, tiny_model_dir):
    first = upload_model(bob, zip_of_folder(tiny_model_dir))
    assert first.status_code == 201, first.content
    doc = first.json()
    assert (doc["team"], doc["name"], doc["version"], doc["format"]) == ("vision", "uploaded", 1, "hf")
    assert doc["meta"]["max_positions"] == 256 and doc["created_by"] == "bob" and doc["digest"]
    assert doc["lineage"] == [{"id": doc["id"], "name": "uploaded", "version": 1, "format": "hf"}]
    model = ModelAsset.objects.get(pk=doc["id"])
    assert (storage.abs_path(model.path) / "config.json").exists()
    assert upload_model(bob, zip_of_folder(tiny_model_dir)).json()["version"] == 2


def test_models_list_with_their_lineage_from_base_to_compiled(cast, bob, tiny_model):
    from jobs.assets.services import model_register

    path = storage.abs_path(tiny_model.path)
    tuned = model_register(team=cast.vision, user=cast.bob, name="tiny-gpt-ft", path=path, meta={}, parent=tiny_model)
    compiled = model_register(team=cast.vision, user=cast.bob, name="tiny-gpt-ft-cpu", path=path, meta={},
                              parent=tuned, fmt=ModelAsset.Format.TORCHSCRIPT)
    page = bob.get("/api/v1/models?team=vision").json()
    assert page["count"] == 3
    by_id = {m["id"]: m for m in page["items"]}
    assert [m["id"] for m in by_id[compiled.pk]["lineage"]] == [tiny_model.pk, tuned.pk, compiled.pk]
    assert by_id[compiled.pk]["parent_id"] == tuned.pk and by_id[compiled.pk]["format"] == "torchscript"
    assert [m["id"] for m in by_id[tiny_model.pk]["lineage"]] == [tiny_model.pk]
    one = bob.get(f"/api/v1/models/{compiled.pk}").json()
    assert [m["name"] for m in one["lineage"]] == ["tiny-gpt", "tiny-gpt-ft", "tiny-gpt-ft-cpu"]


def evil_zip() -> bytes:
    return zip_bytes({"config.json": b'{"model_type": "gpt2"}', "model.safetensors": b"x", "../evil": b"boom"})


BAD_MODEL_UPLOADS = [
    ("not a zip", lambda d: dict(data=b"hello, I am text"), 400, "file", "not a zip archive"),
    ("a path escaping the folder", lambda d: dict(data=evil_zip()), 400, "file", "escaping its folder"),
    ("no config.json", lambda d: dict(data=zip_bytes({"model.safetensors": b"x"})), 400, "file", "no config.json"),
    ("no weights", lambda d: dict(data=zip_bytes({"config.json": b'{"model_type": "gpt2"}'})), 400, "file",
     "no weights"),
    ("a name that is not a slug", lambda d: dict(data=zip_of_folder(d), name="bad name!"), 400, "name", "slug"),
    ("no team", lambda d: dict(data=zip_of_folder(d), team=""), 400, "team", "required"),
]


@pytest.mark.parametrize("what,kwargs,status,field,words", BAD_MODEL_UPLOADS, ids=[b[0] for b in BAD_MODEL_UPLOADS])
def test_a_bad_model_upload_is_refused_naming_the_field_and_leaves_nothing(
        cast, bob, tiny_model_dir, what, kwargs, status, field, words):
    before = files_under(storage.root() / "models")
    response = upload_model(bob, **kwargs(tiny_model_dir))
    assert response.status_code == status, response.content
    assert words in " ".join(response.json()["errors"][field])
    assert not ModelAsset.objects.exists()
    assert files_under(storage.root() / "models") == before
    assert not (storage.root() / "models" / "evil").exists() and not (storage.root() / "evil").exists()


def test_a_model_upload_over_the_size_limit_is_a_413_naming_file(cast, bob, tiny_model_dir, settings):
    settings.MAX_UPLOAD_BYTES = 1000
    before = files_under(storage.root() / "models")
    response = upload_model(bob, zip_of_folder(tiny_model_dir))
    assert response.status_code == 413
    assert response.json()["errors"]["file"][0].endswith("the limit is 1000")
    assert not ModelAsset.objects.exists() and files_under(storage.root() / "models") == before


def test_a_viewer_cannot_upload_a_model(cast, tiny_model_dir):
    response = upload_model(api_client(cast.vera), zip_of_folder(tiny_model_dir))
    assert response.status_code == 403 and "viewer" in response.json()["detail"]
    assert not ModelAsset.objects.exists()


# --- datasets -----------------------------------------------------------------------

def upload_dataset(client: Client, data: bytes, filename: str = "train.jsonl", name: str = "train"):
    return client.post("/api/v1/datasets", data={"team": "vision", "name": name,
                                                 "file": SimpleUploadedFile(filename, data)})


def test_jsonl_and_csv_datasets_upload_and_list(cast, bob):
    jsonl = upload_dataset(bob, b'{"text": "a"}\n{"text": "b"}\n')
    assert jsonl.status_code == 201, jsonl.content
    assert (jsonl.json()["format"], jsonl.json()["rows"], jsonl.json()["team"]) == ("jsonl", 2, "vision")
    csv = upload_dataset(bob, b"text,label\nhello,1\nworld,2\nagain,3\n", filename="t.csv", name="csv")
    assert (csv.json()["format"], csv.json()["rows"]) == ("csv", 3)
    listed = bob.get("/api/v1/datasets?team=vision").json()
    assert [d["name"] for d in listed["items"]] == ["csv", "train"] and listed["count"] == 2
    assert bob.get(jsonl.json()["url"]).json()["rows"] == 2


@pytest.mark.parametrize("data,filename,words", [
    (b'{"text": "a"}\n{"text": broken\n', "t.jsonl", "line 2 is not valid JSON"),
    (b'{"text": "a"}\n{"label": 1}\n', "t.jsonl", 'line 2 needs a "text" string field'),
    (b"label\n1\n", "t.csv", '"text" column'),
    (b"\xff\xfe\x00", "t.jsonl", "not UTF-8"),
    (b"\n\n", "t.jsonl", "no rows"),
], ids=["malformed JSONL line", "a line without text", "CSV without a text column", "not UTF-8", "empty"])
def test_a_bad_dataset_is_refused_naming_file_and_nothing_is_stored(cast, bob, data, filename, words):
    before = files_under(storage.root() / "datasets")
    response = upload_dataset(bob, data, filename=filename)
    assert response.status_code == 400
    assert response.json()["field"] == "file" and words in response.json()["errors"]["file"][0]
    assert not Dataset.objects.exists()
    assert files_under(storage.root() / "datasets") == before


def test_a_dataset_over_the_size_limit_is_a_413(cast, bob, settings):
    settings.MAX_UPLOAD_BYTES = 10
    response = upload_dataset(bob, b'{"text": "more than ten bytes"}\n')
    assert response.status_code == 413 and "file" in response.json()["errors"]
    assert not Dataset.objects.exists()


# --- auth and tokens ------------------------------------------------------------------

def test_no_credentials_and_a_bad_token_are_401_json(cast):
    assert Client().get("/api/v1/jobs").status_code == 401
    response = Client(HTTP_AUTHORIZATION="Bearer nd_not-a-real-token").get("/api/v1/jobs")
    assert response.status_code == 401 and response.json()["code"] == "token_unknown"
    response = Client(HTTP_AUTHORIZATION="Bearer not-ours").get("/api/v1/jobs")
    assert response.status_code == 401 and response.json()["detail"].startswith("Unauthorized")
    assert Client(HTTP_AUTHORIZATION="Bearer ").post("/api/v1/jobs").status_code == 401
    assert not Job.objects.exists()


def test_a_token_of_a_deactivated_user_stops_working(cast):
    client = api_client(cast.bob)
    assert client.get("/api/v1/jobs").status_code == 200
    cast.bob.is_active = False
    cast.bob.save()
    assert client.get("/api/v1/jobs").status_code == 401


def test_a_token_is_stored_only_as_its_sha256(cast):
    from jobs.teams.tokens import token_create

    raw, token = token_create(user=cast.bob, name="laptop")
    token.refresh_from_db()
    assert token.digest == hashlib.sha256(raw.encode()).hexdigest()
    stored = json.dumps(list(ApiToken.objects.values()), default=str)
    assert raw not in stored and raw[10:] not in stored
    assert Client(HTTP_AUTHORIZATION=f"Bearer {raw}").get("/api/v1/jobs").status_code == 200
    token.refresh_from_db()
    assert token.last_used_at is not None


def test_a_tokens_last_use_is_recorded_at_most_once_a_minute(cast):
    from datetime import timedelta

    from jobs.teams.tokens import token_create

    raw, token = token_create(user=cast.bob, name="laptop")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert client.get("/api/v1/teams").status_code == 200
    token.refresh_from_db()
    first = token.last_used_at
    assert first is not None
    assert client.get("/api/v1/teams").status_code == 200
    token.refresh_from_db()
    assert token.last_used_at == first
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=first - timedelta(seconds=61))
    assert client.get("/api/v1/teams").status_code == 200
    token.refresh_from_db()
    assert token.last_used_at > first


def test_a_logged_in_session_works_too(cast, client):
    client.force_login(cast.bob)
    assert client.get("/api/v1/jobs").status_code == 200


def test_teams_lists_the_callers_teams_with_their_role(cast):
    assert api_client(cast.vera).get("/api/v1/teams").json() == [{"slug": "vision", "name": "Vision", "role": "viewer"}]
    charlies = api_client(cast.charlie).get("/api/v1/teams").json()
    assert charlies == [{"slug": "audio", "name": "Audio", "role": "manager"}]
    assert [t["role"] for t in api_client(cast.admin).get("/api/v1/teams").json()] == ["manager", "manager"]


# --- schema and docs ------------------------------------------------------------------

def test_the_openapi_schema_documents_every_endpoint_with_schemas(db):
    schema = Client().get("/api/v1/openapi.json").json()
    paths = schema["paths"]
    for path, method in [("/api/v1/jobs", "post"), ("/api/v1/jobs", "get"), ("/api/v1/jobs/{job_id}", "get"),
                         ("/api/v1/jobs/{job_id}/logs", "get"), ("/api/v1/jobs/{job_id}/cancel", "post"),
                         ("/api/v1/jobs/{job_id}/artifacts/{name}", "get"), ("/api/v1/models", "get"),
                         ("/api/v1/models", "post"), ("/api/v1/models/{model_id}", "get"),
                         ("/api/v1/datasets", "get"), ("/api/v1/datasets", "post"),
                         ("/api/v1/datasets/{dataset_id}", "get"), ("/api/v1/teams", "get")]:
        assert method in paths[path], (path, method)
    components = schema["components"]["schemas"]
    assert {"JobOut", "JobPage", "LogOut", "ModelOut", "DatasetOut", "ErrorOut", "TeamRoleOut"} <= set(components)
    assert {"detail", "code", "field", "errors"} <= set(components["ErrorOut"]["properties"])
    assert "queue_position" in components["JobOut"]["properties"]
    submit_body = paths["/api/v1/jobs"]["post"]["requestBody"]["content"]
    assert "kind" in submit_body["application/json"]["schema"]["properties"]
    assert "prompts_file" in submit_body["multipart/form-data"]["schema"]["properties"]
    assert paths["/api/v1/jobs"]["post"]["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobSubmitOut"}
    assert {"id", "url", "status", "spec", "logs_url"} <= set(components["JobSubmitOut"]["properties"])


def test_the_api_docs_load_their_assets_from_this_server_not_a_cdn(db):
    client = Client()
    page = client.get("/api/v1/docs")
    assert page.status_code == 200
    html = page.content.decode()
    assert "/static/ninja/swagger-ui-bundle.js" in html and "/static/ninja/swagger-ui.css" in html
    assert "cdn" not in html.lower() and "https://" not in html
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "swagger-ui-init.js"):
        assert client.get(f"/static/ninja/{asset}").status_code == 200, asset
