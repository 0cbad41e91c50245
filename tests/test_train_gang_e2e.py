"""A fine-tune as a two-host gang: two real Celery workers with different host names on
this machine, each running its rank of the cpu backend's data-parallel training under
torchrun (gloo). Its loss equals a single process's with the same global batch; kill -9
of one host's worker stops the other rank and the next attempt resumes from the
checkpoint with the uninterrupted run's weights."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

pytest.importorskip("jobs.lifecycle.gangs", reason="the workers do not run multi-host gangs on this tree")

from jobs.assets import storage  # noqa: E402
from jobs.lifecycle import scheduler, states
from jobs.models import GangMember, Host, Job, JobAttempt, JobEvent, JobMetric, Kind
from neuron_workers.backends import JobContext, get_backend
from neuron_workers.backends.checkpoints import CheckpointStore
from tests.polling import wait_until
from tests.test_faults import (  # noqa: F401 - fixtures
    _kill,
    broker,
    job_processes,
    make_host,
    redis_server,
    start_worker,
    status,
    wait_status,
)
from tests.test_train_checkpoints import torchrun_job  # noqa: E402
from tests.test_train_resume_e2e import max_abs_diff, weights  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.postgres_only]

S = Job.Status
SPEC = {"learning_rate": 3e-3, "batch_size": 8, "sequence_length": 32, "seed": 11, "lr_schedule": "linear"}


@pytest.fixture
def two_hosts(make_host):
    hosts = [make_host(name, backend="cpu", cores=1) for name in ("train-a", "train-b")]
    Host.objects.filter(pk__in=[h.pk for h in hosts]).update(address="127.0.0.1")
    return [Host.objects.get(pk=h.pk) for h in hosts]


@pytest.fixture
def start_host_workers(start_worker, two_hosts):
    base = str(random.randrange(20000, 31000, 2))

    def start(suffix: str = "") -> list:
        return [start_worker(h.name, name=f"w-{h.name}{suffix}", GANG_PORT_BASE=base, JOB_KILL_GRACE_S="10")
                for h in two_hosts]

    return start


def gang_finetune(cast, model, dataset, **spec) -> Job:
    job = Job.objects.create(team=cast.vision, user=cast.bob, kind=Kind.FINETUNE, spec={**SPEC, **spec}, family="cpu",
                             cores=2, host_count=2, model=model, dataset=dataset, max_attempts=3,
                             reason_code="submitted", reason="waiting for the scheduler")
    states.event(job.pk, "pending", "submitted by bob")
    return job


def place(job: Job) -> None:
    wait_until(lambda: scheduler.dispatch() and status(job) != S.PENDING, 30, interval=0.2,
               message=f"dispatch to place gang {job.pk}")


def single_process(model, dataset, tmp_path: Path, spec: dict) -> tuple[dict, Path]:
    inputs = {"model_path": str(storage.abs_path(model.path)), "model_format": "hf",
              "dataset_path": str(storage.abs_path(dataset.path)), "dataset_format": dataset.format,
              "checkpoint_dir": str(tmp_path / "single-checkpoints")}
    ctx = JobContext(job_id=0, kind="finetune", spec=spec, workdir=tmp_path / "single", inputs=inputs,
                     log=lambda line: None, metric=lambda row: None)
    return get_backend("cpu").run(ctx), tmp_path / "single" / "artifacts" / "checkpoint"


def test_a_two_host_gang_trains_with_the_loss_of_one_process_and_the_same_global_batch(
        cast, tiny_model, dataset, two_hosts, start_host_workers, tmp_path):
    start_host_workers()
    job = gang_finetune(cast, tiny_model, dataset, steps=12, checkpoint_every=5)
    place(job)
    job = wait_status(job, S.SUCCEEDED, S.FAILED, timeout=240)
    assert job.status == S.SUCCEEDED, job.reason
    single, single_model = single_process(tiny_model, dataset, tmp_path, job.spec)
    assert job.result["world_size"] == 2 and job.result["rank"] == 0
    assert job.result["losses"] == pytest.approx(single["losses"], rel=1e-5)
    # Not bit-equal: the all-reduce adds the two halves' gradients in another order, and
    # AdamW's normalised step turns last-bit differences of near-zero gradients into
    # differences of a few 1e-5 after a dozen steps.
    assert max_abs_diff(weights(storage.abs_path(job.output_model.path)), weights(single_model)) <= 1e-4
    # Both ranks reported their progress; rank 0 alone wrote the checkpoints.
    names = set(JobMetric.objects.filter(job=job, name__startswith="samples_per_s.r").values_list("name", flat=True))
    assert names == {"samples_per_s.r0", "samples_per_s.r1"}
    assert CheckpointStore(storage.job_dir(job.pk) / "checkpoints").complete_steps() == [5, 10]


def test_kill_9_of_one_hosts_worker_stops_the_gang_and_it_resumes_from_the_checkpoint(
        cast, tiny_model, dataset, two_hosts, start_host_workers, start_worker, tmp_path):
    first = start_host_workers()
    job = gang_finetune(cast, tiny_model, dataset, steps=300, checkpoint_every=20)
    place(job)
    store = CheckpointStore(storage.job_dir(job.pk) / "checkpoints")
    wait_until(lambda: max(store.complete_steps(), default=0) >= 40, 240, message="the gang's second checkpoint")
    children = job_processes(job)
    first[1].kill9()  # host train-b's worker; its rank's processes die with the host
    for pid in children:
        if "/rank-1" in _cwd_of(pid):
            _kill(pid)
    saved = max(store.complete_steps())

    def first_attempt_over() -> bool:
        scheduler.reap()  # as beat would: rank 1's lease expires, the gang is requeued
        return JobAttempt.objects.filter(job=job, number=1, ended_at__isnull=False).exists()

    wait_until(first_attempt_over, 120, interval=0.5, message="the gang's first attempt to end")
    assert JobAttempt.objects.get(job=job, number=1).outcome == "requeued"
    assert JobEvent.objects.filter(job=job, kind="pending").count() == 2  # submitted, requeued
    start_worker(two_hosts[1].name, name="w-train-b-2", GANG_PORT_BASE=first[1].env["GANG_PORT_BASE"],
                 JOB_KILL_GRACE_S="10")  # host train-b is back
    wait_until(lambda: scheduler.dispatch() is not None and status(job) in (S.SUCCEEDED, S.FAILED), 300,
               interval=1, message="the gang's next attempt to end")
    job = Job.objects.get(pk=job.pk)
    assert job.status == S.SUCCEEDED, job.reason
    resumed = list(JobEvent.objects.filter(job=job, kind="resumed").values_list("data", flat=True))
    assert resumed and resumed[-1]["step"] >= saved
    assert job.result["resumed_from_step"] == resumed[-1]["step"]
    # The same two ranks uninterrupted, under plain torchrun: the same sums in the same order.
    inputs = {"model_path": str(storage.abs_path(tiny_model.path)), "model_format": "hf",
              "dataset_path": str(storage.abs_path(dataset.path)), "dataset_format": dataset.format}
    torchrun_job(tmp_path / "uninterrupted", inputs, job.spec, 2)
    reference = weights(tmp_path / "uninterrupted" / "artifacts" / "checkpoint")
    assert max_abs_diff(weights(storage.abs_path(job.output_model.path)), reference) <= 1e-5
    assert not GangMember.objects.filter(job=job).exclude(state=GangMember.State.EXITED).exists()


def _cwd_of(pid: int) -> str:
    import os

    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""

