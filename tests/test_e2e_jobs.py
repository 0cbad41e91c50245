"""Each job kind submitted through the API runs for real on a Celery worker
subprocess (cpu backend, the tiny model), against PostgreSQL and Redis."""
from __future__ import annotations

import json

import pytest
import torch

from jobs.models import CoreAllocation, Job, JobAttempt, JobMetric, ModelAsset
from tests.conftest import api_client
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def submit(client, **body) -> dict:
    response = client.post("/api/v1/jobs", data=json.dumps({"team": "vision", "family": "cpu", "cores": 1, **body}),
                           content_type="application/json")
    assert response.status_code == 201, response.content
    return response.json()


def wait_finished(client, job_id: int, timeout: float = 120) -> dict:
    return wait_until(lambda: client.get(f"/api/v1/jobs/{job_id}").json(), timeout, f"job {job_id} to finish",
                      until=lambda doc: doc["status"] in ("succeeded", "failed", "cancelled"), interval=0.2)


def wait_status(job_id: int, timeout: float, message: str, until) -> str:
    return wait_until(lambda: Job.objects.get(pk=job_id).status, timeout, message, until=until)


def test_compile_traces_a_model_whose_logits_match_the_source(cast, tiny_model, cpu_host, celery_worker_proc):
    client = api_client(cast.bob)
    job = submit(client, kind="compile", model=tiny_model.pk, batch_size=1, sequence_length=16, compiler_options=[])
    doc = wait_finished(client, job["id"])
    assert doc["status"] == "succeeded", doc
    assert doc["result"]["max_abs_logit_diff"] < 1e-4
    compiled = ModelAsset.objects.get(source_job_id=job["id"])
    assert compiled.parent_id == tiny_model.pk and compiled.format == "torchscript"

    # The artifact, loaded independently, gives the source model's logits.
    from transformers import AutoModelForCausalLM

    from jobs.assets import storage

    traced = torch.jit.load(str(storage.abs_path(compiled.path) / "model.pt"))
    eager = AutoModelForCausalLM.from_pretrained(storage.abs_path(tiny_model.path)).eval()
    ids = torch.randint(0, eager.config.vocab_size, (1, 16))
    with torch.no_grad():
        out = traced(ids)
        out = out[0] if isinstance(out, (tuple, list)) else out
        assert torch.allclose(out, eager(ids).logits, atol=1e-4)

    # An identical request is a cache hit pointing at the same artifact.
    again = submit(client, kind="compile", model=tiny_model.pk, batch_size=1, sequence_length=16, compiler_options=[])
    assert again["status"] == "succeeded" and again["cache_hit"] is True
    assert Job.objects.get(pk=again["id"]).output_model_id == compiled.pk


def test_finetune_lowers_the_loss_and_registers_a_new_version(cast, tiny_model, dataset, cpu_host, celery_worker_proc):
    client = api_client(cast.bob)
    job = submit(client, kind="finetune", model=tiny_model.pk, dataset=dataset.pk, steps=40, learning_rate=3e-3,
                 batch_size=4, sequence_length=32, seed=1)
    doc = wait_finished(client, job["id"], timeout=240)
    assert doc["status"] == "succeeded", doc
    losses = list(JobMetric.objects.filter(job_id=job["id"], name="loss").order_by("step").values_list("value", flat=True))
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    new = ModelAsset.objects.get(source_job_id=job["id"])
    assert new.parent_id == tiny_model.pk and new.format == "hf"
    lineage = client.get(f"/api/v1/models/{new.pk}").json()
    assert lineage["parent_id"] == tiny_model.pk
    assert [m["id"] for m in lineage["lineage"]] == [tiny_model.pk, new.pk]


def test_inference_writes_an_output_per_prompt_with_latencies(cast, tiny_model, cpu_host, celery_worker_proc):
    client = api_client(cast.bob)
    prompts = ["hello", "the quick brown fox", "neuron"]
    job = submit(client, kind="inference", model=tiny_model.pk, prompts=prompts, max_new_tokens=4, temperature=0)
    doc = wait_finished(client, job["id"])
    assert doc["status"] == "succeeded", doc
    assert doc["result"]["requests"] == 3 and doc["result"]["latency_ms_p50"] > 0
    outputs = client.get(f"/api/v1/jobs/{job['id']}/artifacts/outputs.jsonl")
    assert outputs.status_code == 200
    rows = [json.loads(line) for line in b"".join(outputs.streaming_content if outputs.streaming else [outputs.content]).decode().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert all(r["latency_ms"] > 0 for r in rows)
    # Usage was recorded and the cores were given back.
    attempt = JobAttempt.objects.get(job_id=job["id"])
    assert attempt.ended_at is not None and attempt.core_seconds > 0
    assert not CoreAllocation.objects.filter(job_id=job["id"]).exists()
    log = client.get(f"/api/v1/jobs/{job['id']}/logs?offset=0").json()
    assert "attempt 1 on test-host" in log["text"]


def test_cancel_stops_a_running_job(cast, tiny_model, dataset, cpu_host, celery_worker_proc):
    client = api_client(cast.bob)
    job = submit(client, kind="finetune", model=tiny_model.pk, dataset=dataset.pk, steps=100000, learning_rate=1e-3,
                 batch_size=2, sequence_length=16)
    wait_status(job["id"], 60, "the job to run", until=lambda status: status == "running")
    response = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    doc = wait_finished(client, job["id"], timeout=60)
    assert doc["status"] == "cancelled"
    assert not CoreAllocation.objects.filter(job_id=job["id"]).exists()


def test_a_duplicate_delivery_runs_the_job_once(cast, tiny_model, cpu_host, celery_worker_proc):
    from webapp.celery import app

    client = api_client(cast.bob)
    job = submit(client, kind="inference", model=tiny_model.pk, prompts=["once"], max_new_tokens=2, temperature=0)
    wait_status(job["id"], 30, "the job to be dispatched", until=lambda status: status != "pending")
    for _ in range(3):
        app.send_task("neuron_workers.run_job", args=[job["id"]], queue="host.test-host")
    doc = wait_finished(client, job["id"])
    assert doc["status"] == "succeeded"
    assert JobAttempt.objects.filter(job_id=job["id"]).count() == 1
    assert Job.objects.get(pk=job["id"]).attempts == 1


def test_a_team_s_next_inference_runs_in_its_warm_process_and_another_team_s_does_not(
        cast, tiny_model, tiny_model_dir, cpu_host, celery_worker_proc, settings):
    import shutil
    from pathlib import Path

    from jobs.assets.services import model_register
    from jobs.assets.uploads import model_meta
    from tests.test_warm_runners import wait_idle

    dest = Path(settings.STORAGE_ROOT) / "models" / "audio" / "tiny"
    shutil.copytree(tiny_model_dir, dest)
    audio_model = model_register(team=cast.audio, user=cast.charlie, name="tiny-gpt", path=dest, meta=model_meta(dest))

    def run(client, team, model):
        job = submit(client, team=team, kind="inference", model=model.pk, prompts=["hi"], max_new_tokens=2,
                     temperature=0)
        doc = wait_finished(client, job["id"])
        assert doc["status"] == "succeeded", doc
        return Job.objects.get(pk=job["id"]).worker_pid

    bob, charlie = api_client(cast.bob), api_client(cast.charlie)
    first = run(bob, "vision", tiny_model)
    wait_idle(first)
    assert run(bob, "vision", tiny_model) == first
    wait_idle(first)
    other = run(charlie, "audio", audio_model)
    assert other != first
    wait_idle(other)
    assert run(bob, "vision", tiny_model) == first
    assert run(charlie, "audio", audio_model) == other
