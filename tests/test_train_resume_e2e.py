"""A fine-tune survives a killed worker and a preemption by resuming from its checkpoints.

Real PostgreSQL, a private redis-server and `celery worker` subprocesses running
the cpu backend for real on the tiny GPT-2 (fixtures and helpers of test_faults).
The final weights are compared with an uninterrupted run of the same spec in this
process.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.assets import storage
from jobs.lifecycle import scheduler, states
from jobs.models import CoreAllocation, Job, JobEvent, Kind
from neuron_workers.backends import JobContext, get_backend
from neuron_workers.backends.checkpoints import CheckpointStore
from tests.polling import wait_until
from tests.test_faults import (  # noqa: F401 - fixtures
    _kill,
    broker,
    dispatch_until_placed,
    job_processes,
    make_host,
    reap_until,
    redis_server,
    start_worker,
    status,
    wait_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres_only]

S = Job.Status
EVERY = 20
SPEC = {"steps": 400, "learning_rate": 3e-3, "batch_size": 4, "sequence_length": 32, "seed": 5,
        "checkpoint_every": EVERY}


def finetune_job(cast, model, dataset, **spec) -> Job:
    job = Job.objects.create(team=cast.vision, user=cast.bob, kind=Kind.FINETUNE, spec={**SPEC, **spec}, family="cpu",
                             cores=1, model=model, dataset=dataset, max_attempts=3, reason_code="submitted",
                             reason="waiting for the scheduler")
    states.event(job.pk, "pending", "submitted by bob")
    return job


def checkpoint_steps(job: Job) -> list[int]:
    return CheckpointStore(storage.job_dir(job.pk) / "checkpoints").complete_steps()


def weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).state_dict()


def uninterrupted_weights(model, dataset, tmp_path: Path, spec: dict) -> dict[str, torch.Tensor]:
    inputs = {"model_path": str(storage.abs_path(model.path)), "model_format": "hf",
              "dataset_path": str(storage.abs_path(dataset.path)), "dataset_format": dataset.format,
              "checkpoint_dir": str(tmp_path / "reference-checkpoints")}
    ctx = JobContext(job_id=0, kind="finetune", spec=spec, workdir=tmp_path / "reference", inputs=inputs,
                     log=lambda line: None, metric=lambda row: None)
    get_backend("cpu").run(ctx)
    return weights(tmp_path / "reference" / "artifacts" / "checkpoint")


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def last_loss_step(job: Job, attempt: int = 1) -> int:
    """The last step the attempt's process reported (its metrics.jsonl, written as it goes)."""
    path = storage.job_dir(job.pk) / f"attempt-{attempt}" / "metrics.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    except FileNotFoundError:
        return 0
    return max((row["step"] for row in rows if "loss" in row), default=0)


def resumed_events(job: Job) -> list[dict]:
    return list(JobEvent.objects.filter(job=job, kind="resumed").values_list("data", flat=True))


def test_kill_9_of_the_worker_mid_run_resumes_from_the_checkpoint_with_the_same_final_weights(
        cast, tiny_model, dataset, make_host, start_worker, tmp_path):
    make_host(backend="cpu")
    job = finetune_job(cast, tiny_model, dataset)
    worker = start_worker()
    dispatch_until_placed(job)
    wait_until(lambda: any(step >= 3 * EVERY for step in checkpoint_steps(job)), 120,
               message="the job's third checkpoint")
    children = job_processes(job)
    worker.kill9()
    for pid in children:
        _kill(pid)  # the job's own process too: no checkpoint in a grace period
    wait_until(lambda: not job_processes(job), 15, message="the job's processes to be gone")
    saved = max(checkpoint_steps(job))
    killed_at = max(last_loss_step(job), saved)

    job, _ = reap_until(job)
    assert job.status == S.PENDING and job.reason_code == "worker_lost"
    start_worker(name="w2")
    dispatch_until_placed(job)
    job = wait_status(job, S.SUCCEEDED, timeout=180)

    assert resumed_events(job) == [{"step": saved, "attempt": 2}]
    assert killed_at - saved <= EVERY  # steps lost to the kill
    assert job.result["steps"] == SPEC["steps"] and job.result["resumed_from_step"] == saved
    second = [data["step"] for data in JobEvent.objects.filter(job=job, kind="checkpoint").order_by("id")
              .values_list("data", flat=True) if data["attempt"] == 2]
    assert second == list(range(saved + EVERY, SPEC["steps"], EVERY))  # every K steps after the resume
    assert checkpoint_steps(job) == [340, 360, 380]  # the last three kept
    final = weights(storage.abs_path(job.output_model.path))
    assert max_abs_diff(final, uninterrupted_weights(tiny_model, dataset, tmp_path, job.spec)) <= 1e-5
    assert not CoreAllocation.objects.exists()


def test_preemption_saves_a_checkpoint_in_its_grace_period_and_the_job_resumes_there(
        cast, tiny_model, dataset, make_host, start_worker):
    make_host(backend="cpu")
    job = finetune_job(cast, tiny_model, dataset, checkpoint_every=1000)  # no periodic checkpoint
    start_worker(JOB_KILL_GRACE_S="20")
    dispatch_until_placed(job)
    wait_until(lambda: last_loss_step(job) >= 10, 120, message="the job to train ten steps")

    assert states.requeue(job.pk, kind="preempted", message="preempted: test reclaims the cores")
    wait_until(lambda: JobEvent.objects.filter(job=job, kind="checkpoint").exists(), 30,
               message="the checkpoint of the preempted attempt")
    saved = JobEvent.objects.get(job=job, kind="checkpoint").data["step"]
    assert saved >= 10 and checkpoint_steps(job) == [saved]
    wait_until(lambda: not job_processes(job), 30, message="the preempted attempt's process to end")

    dispatch_until_placed(job)
    job = wait_status(job, S.SUCCEEDED, timeout=180)
    assert resumed_events(job) == [{"step": saved, "attempt": 2}]
    assert job.result["resumed_from_step"] == saved


def test_a_torn_newest_checkpoint_is_ignored_and_the_next_attempt_resumes_from_the_one_before(
        cast, tiny_model, dataset, make_host, start_worker, tmp_path):
    from neuron_workers.backends.checkpoints import step_dir_name
    from tests.test_faults import log_text

    make_host(backend="cpu")
    job = finetune_job(cast, tiny_model, dataset)
    start_worker(JOB_KILL_GRACE_S="20")
    dispatch_until_placed(job)
    wait_until(lambda: len(checkpoint_steps(job)) >= 2, 120, message="the job's second checkpoint")
    assert states.suspend(job.pk, message="suspended by the test")  # it saves the step it reached, then stops
    wait_until(lambda: not job_processes(job), 60, message="the suspended attempt's process to end")
    steps = checkpoint_steps(job)
    newest, before = steps[-1], steps[-2]
    # The newest copy torn on the shared storage: same size, other bytes.
    state = storage.job_dir(job.pk) / "checkpoints" / step_dir_name(newest) / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))

    assert states.resume(job.pk, message="resumed by the test")
    dispatch_until_placed(job)
    job = wait_status(job, S.SUCCEEDED, timeout=180)
    assert resumed_events(job) == [{"step": before, "attempt": 2}]
    assert f"checkpoint {step_dir_name(newest)} ignored: state.pt does not match its digest" in log_text(job)
    assert job.result["resumed_from_step"] == before and job.result["steps"] == SPEC["steps"]
    final = weights(storage.abs_path(job.output_model.path))
    assert max_abs_diff(final, uninterrupted_weights(tiny_model, dataset, tmp_path, job.spec)) <= 1e-5
