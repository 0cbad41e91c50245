"""Team scoping of the jobs API: charlie (who manages team audio) gets a 404 for
every URL of the API that takes an id of team vision, learns nothing from it, and
changes nothing; he cannot use vision's models or datasets in his own jobs."""
from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from jobs.lifecycle import scheduler
from jobs.lifecycle import states
from jobs.assets import storage
from jobs.api.jobs import router
from jobs.models import Artifact, Dataset, Job, ModelAsset
from tests.conftest import api_client

# Every URL of the jobs router that takes an id, with how to fill it from vision's objects.
ID_URLS: dict[tuple[str, str], str] = {
    ("GET", "/jobs/{job_id}"): "/api/v1/jobs/{job}",
    ("GET", "/jobs/{job_id}/logs"): "/api/v1/jobs/{job}/logs?offset=0",
    ("POST", "/jobs/{job_id}/cancel"): "/api/v1/jobs/{job}/cancel",
    ("POST", "/jobs/{job_id}/suspend"): "/api/v1/jobs/{job}/suspend",
    ("POST", "/jobs/{job_id}/resume"): "/api/v1/jobs/{job}/resume",
    ("GET", "/jobs/{job_id}/artifacts/{path:name}"): "/api/v1/jobs/{job}/artifacts/outputs.jsonl",
    ("GET", "/models/{model_id}"): "/api/v1/models/{model}",
    ("GET", "/datasets/{dataset_id}"): "/api/v1/datasets/{dataset}",
}


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def visions(cast, tiny_model, dataset, cpu_host) -> dict[str, int]:
    """A running vision job with a log and an artifact, vision's model and dataset."""
    body = {"team": "vision", "kind": "inference", "family": "cpu", "cores": 1, "model": tiny_model.pk,
            "prompts": ["hi"], "max_new_tokens": 2, "temperature": 0}
    response = api_client(cast.bob).post("/api/v1/jobs", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 201, response.content
    job_id = response.json()["id"]
    scheduler.dispatch()
    assert states.mark_running(job_id, cpu_host.pk)
    out = storage.job_dir(job_id) / "artifacts" / "outputs.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text('{"output": "secret"}\n')
    Artifact.objects.create(job_id=job_id, name="outputs.jsonl", path=storage.rel_path(out), size_bytes=22)
    Job.objects.get(pk=job_id).log_chunks.create(offset=0, text="vision's log\n")
    return {"job": job_id, "model": tiny_model.pk, "dataset": dataset.pk}


def call(client: Client, method: str, url: str):
    return client.get(url) if method == "GET" else client.post(url)


def test_every_id_url_of_the_jobs_api_is_in_this_files_scoping_table():
    with_ids = {(method, path.replace("{dbid:", "{")) for path, view in router.path_operations.items() if "{" in path
                for op in view.operations for method in op.methods}
    assert with_ids == set(ID_URLS)


@pytest.mark.parametrize("method,template", [(m, url) for (m, _), url in ID_URLS.items()],
                         ids=[f"{m} {p}" for m, p in ID_URLS])
def test_charlie_gets_404_for_visions_objects_and_learns_nothing(cast, visions, method, template):
    charlie = api_client(cast.charlie)
    response = call(charlie, method, template.format(**visions))
    assert response.status_code == 404
    missing = call(charlie, method, template.format(job=2**31 - 1, model=2**31 - 1, dataset=2**31 - 1))
    assert missing.status_code == 404 and response.json() == missing.json()
    # it says what was not found (ninja's own answer was "Not Found" alone)
    assert response.json()["code"] == "not_found" and response.json()["detail"].startswith("No such "), response.json()
    assert b"secret" not in response.content and b"vision" not in response.content


@pytest.mark.parametrize("method,template", [(m, url) for (m, _), url in ID_URLS.items()],
                         ids=[f"{m} {p}" for m, p in ID_URLS])
def test_alice_of_vision_reaches_the_same_urls(cast, visions, method, template):
    # vision's job is an inference: only fine-tunes suspend, so her answer is the refusal
    expected = 409 if template.endswith(("/suspend", "/resume")) else 200
    assert call(api_client(cast.alice), method, template.format(**visions)).status_code == expected


def test_charlies_404_on_cancel_leaves_the_job_running(cast, visions):
    assert api_client(cast.charlie).post(f"/api/v1/jobs/{visions['job']}/cancel").status_code == 404
    job = Job.objects.get(pk=visions["job"])
    assert job.status == Job.Status.RUNNING and not job.cancel_requested


def test_charlies_lists_hold_none_of_visions_objects(cast, visions):
    charlie = api_client(cast.charlie)
    for url in ("/api/v1/jobs", "/api/v1/models", "/api/v1/datasets"):
        page = charlie.get(url).json()
        assert (page["count"], page["items"]) == (0, []), url
        assert charlie.get(f"{url}?team=vision").status_code == 404, url


def test_charlie_cannot_submit_to_vision(cast, visions):
    body = {"team": "vision", "kind": "inference", "family": "cpu", "cores": 1, "model": visions["model"],
            "prompts": ["hi"], "max_new_tokens": 2, "temperature": 0}
    response = api_client(cast.charlie).post("/api/v1/jobs", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 404
    assert Job.objects.count() == 1


def test_charlie_cannot_use_visions_model_or_dataset_in_his_own_team(cast, visions):
    body = {"team": "audio", "kind": "finetune", "family": "cpu", "cores": 1, "model": visions["model"],
            "dataset": visions["dataset"], "steps": 2, "learning_rate": 0.001, "batch_size": 1, "sequence_length": 8}
    response = api_client(cast.charlie).post("/api/v1/jobs", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert errors["model"][0].startswith("Unknown model") and errors["dataset"][0].startswith("Unknown dataset")
    assert not Job.objects.filter(team=cast.audio).exists()


def test_charlie_cannot_upload_into_vision(cast, visions):
    charlie = api_client(cast.charlie)
    model = charlie.post("/api/v1/models", data={"team": "vision", "name": "x",
                                                 "file": SimpleUploadedFile("m.zip", b"PK")})
    data = charlie.post("/api/v1/datasets", data={"team": "vision", "name": "x",
                                                  "file": SimpleUploadedFile("d.jsonl", b'{"text": "a"}\n')})
    assert (model.status_code, data.status_code) == (404, 404)
    assert ModelAsset.objects.count() == 1 and Dataset.objects.count() == 1


def test_a_site_admin_sees_every_team(cast, visions):
    admin = api_client(cast.admin)
    assert admin.get(f"/api/v1/jobs/{visions['job']}").status_code == 200
    assert admin.get("/api/v1/jobs?team=vision").json()["count"] == 1
