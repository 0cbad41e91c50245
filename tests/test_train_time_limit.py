"""A fine-tune that reaches its time limit saves a checkpoint in its grace period, goes
back to the queue and resumes from it; on its last attempt, or without a checkpoint
of the attempt, it fails as timed_out (jobs.lifecycle.time_limits).

The first tests run the rule against the database; the others run it for real: a
Celery worker (two for a two-host gang) running the cpu backend on the tiny GPT-2,
each attempt stopped by its worker at the time limit (SIGTERM, then the grace)."""
from __future__ import annotations

import pytest
from django.utils import timezone

from jobs.assets import storage
from jobs.lifecycle import scheduler, states, time_limits
from jobs.models import CoreAllocation, Host, Job, JobAttempt, JobEvent, Kind
from neuron_workers.backends.checkpoints import CheckpointStore
from tests.conftest import api_client
from tests.polling import wait_until
from tests.test_faults import (  # noqa: F401 - fixtures
    broker,
    job_processes,
    log_text,
    make_host,
    redis_server,
    start_worker,
    status,
)
from tests.test_train_gang_e2e import gang_finetune, start_host_workers, two_hosts  # noqa: F401 - fixtures
from tests.test_train_resume_e2e import finetune_job, resumed_events

S = Job.Status
LIMIT_S, GANG_LIMIT_S = 25, 45  # time limits a loaded machine starts training well within
ENDLESS = {"steps": 1_000_000, "checkpoint_every": 1_000_000}  # only the grace period saves a checkpoint


# --- the rule ------------------------------------------------------------------------------

def running(cast, host: Host, kind: str = Kind.FINETUNE, *, attempts: int = 1, max_attempts: int = 3) -> Job:
    job = Job.objects.create(team=cast.vision, user=cast.bob, kind=kind, family="cpu", cores=1, host=host,
                             core_start=0, max_runtime_s=60, max_attempts=max_attempts, spec={"steps": 10})
    Job.objects.filter(pk=job.pk).update(status=S.RUNNING, attempts=attempts, started_at=timezone.now())
    return Job.objects.get(pk=job.pk)


def checkpointed(job: Job, step: int, attempt: int) -> None:
    states.event(job.pk, "checkpoint", f"checkpoint at step {step}", step=step, attempt=attempt)


@pytest.fixture
def host(db) -> Host:
    return Host.objects.create(name="limit-host", family="cpu", core_ids=[0], backend="cpu",
                               last_heartbeat=timezone.now())


def test_a_fine_tune_that_saved_a_checkpoint_in_the_attempt_is_requeued_to_resume_and_the_api_says_why(
        cast, host):
    job = running(cast, host, attempts=1)
    checkpointed(job, 40, attempt=1)
    assert time_limits.reached(job, 1) == "requeued"
    job.refresh_from_db()
    assert (job.status, job.reason_code, job.host_id) == (S.PENDING, "time_limit", None)
    event = JobEvent.objects.filter(job=job, kind="time_limit").get()
    assert event.data == {"step": 40, "attempt": 1}
    assert "reached its time limit of 60 s" in event.message and "step 40" in event.message
    assert "attempt 2 of 3 next" in event.message
    doc = api_client(cast.bob).get(f"/api/v1/jobs/{job.pk}/pending").json()
    assert doc["reason_code"] == "time_limit" and "resumes from that checkpoint" in doc["hint"]


def test_its_last_attempt_fails_as_timed_out_naming_its_newest_checkpoint(cast, host):
    job = running(cast, host, attempts=3, max_attempts=3)
    checkpointed(job, 40, attempt=2)
    checkpointed(job, 90, attempt=3)
    assert time_limits.reached(job, 3) == "failed"
    job.refresh_from_db()
    assert (job.status, job.failure) == (S.FAILED, "timed_out")
    assert "on its last attempt (3 of 3)" in job.reason and "newest checkpoint is at step 90" in job.reason


def test_an_attempt_that_saved_nothing_fails_rather_than_start_over_and_other_kinds_fail_at_their_limit(
        cast, host):
    stalled = running(cast, host, attempts=2)
    checkpointed(stalled, 40, attempt=1)  # an earlier attempt's: this one got no further
    assert time_limits.reached(stalled, 2) == "failed"
    stalled.refresh_from_db()
    assert stalled.failure == "timed_out" and "this attempt saved no checkpoint" in stalled.reason
    assert "newest checkpoint is at step 40" in stalled.reason

    inference = running(cast, host, Kind.INFERENCE)
    checkpointed(inference, 5, attempt=1)  # whatever it reported: only a fine-tune resumes
    assert time_limits.reached(inference, 1) == "failed"
    inference.refresh_from_db()
    assert inference.failure == "timed_out" and inference.reason == "exceeded max runtime of 60 s"


def test_a_superseded_attempt_changes_nothing(cast, host):
    job = running(cast, host, attempts=2)
    checkpointed(job, 40, attempt=1)
    assert time_limits.reached(job, 1) == "superseded"  # attempt 1 is over; attempt 2 runs
    assert status(job) == S.RUNNING


# --- for real ------------------------------------------------------------------------------

def checkpoint_events(job: Job) -> list[dict]:
    return list(JobEvent.objects.filter(job=job, kind="checkpoint").order_by("id").values_list("data", flat=True))


def story(job: Job) -> str:
    """The timeline and the log's end, for a failure's message."""
    events = "\n".join(f"{kind}: {message}" for kind, message in JobEvent.objects.filter(job=job)
                       .values_list("kind", "message"))
    return f"{events}\n{log_text(job)[-3000:]}"


def run_to_the_end(job: Job, timeout: float) -> Job:
    """Dispatch (as beat would) until the job is over."""
    wait_until(lambda: scheduler.dispatch() is not None and status(job) in Job.FINISHED, timeout, interval=0.5,
               message=f"job {job.pk} to end")
    return Job.objects.get(pk=job.pk)


@pytest.mark.e2e
@pytest.mark.postgres_only
def test_a_fine_tune_at_its_time_limit_saves_in_its_grace_is_requeued_and_resumes_until_its_last_attempt(
        cast, tiny_model, dataset, make_host, start_worker):
    make_host(backend="cpu")
    job = finetune_job(cast, tiny_model, dataset, **ENDLESS)
    # Long enough for a loaded machine to load the model and train some steps first.
    Job.objects.filter(pk=job.pk).update(max_runtime_s=LIMIT_S, max_attempts=2)
    start_worker(JOB_KILL_GRACE_S="20")
    job = run_to_the_end(job, 8 * LIMIT_S)

    saves = checkpoint_events(job)
    assert [data["attempt"] for data in saves] == [1, 2], story(job)  # one save per attempt, in its grace period
    first, second = saves[0]["step"], saves[1]["step"]
    assert 0 < first < second
    requeue = JobEvent.objects.get(job=job, kind="time_limit")
    assert requeue.data == {"step": first, "attempt": 1}
    said = f"reached its time limit of {LIMIT_S} s; stopped with its checkpoint at step {first} saved"
    assert said in requeue.message
    assert resumed_events(job) == [{"step": first, "attempt": 2}]
    assert list(JobAttempt.objects.filter(job=job).order_by("number").values_list("outcome", flat=True)) == [
        "requeued", S.FAILED]
    assert (job.status, job.failure, job.attempts) == (S.FAILED, "timed_out", 2)
    assert "on its last attempt (2 of 2)" in job.reason and f"newest checkpoint is at step {second}" in job.reason
    assert max(CheckpointStore(storage.job_dir(job.pk) / "checkpoints").complete_steps()) == second
    assert job.output_model is None  # nothing registered: the run never finished
    wait_until(lambda: not job_processes(job), 30, message="the job's processes to end")
    assert not CoreAllocation.objects.exists()


@pytest.mark.e2e
@pytest.mark.postgres_only
def test_a_two_host_gang_at_its_time_limit_is_requeued_whole_and_resumes_from_rank_0s_checkpoint(
        cast, tiny_model, dataset, two_hosts, start_host_workers):
    start_host_workers()
    job = gang_finetune(cast, tiny_model, dataset, **ENDLESS)
    Job.objects.filter(pk=job.pk).update(max_runtime_s=GANG_LIMIT_S, max_attempts=2)
    job = run_to_the_end(job, 8 * GANG_LIMIT_S)

    saves = checkpoint_events(job)
    assert [data["attempt"] for data in saves] == [1, 2], story(job)
    first, second = saves[0]["step"], saves[1]["step"]
    assert 0 < first < second
    requeue = JobEvent.objects.get(job=job, kind="time_limit")
    assert requeue.data["step"] == first and requeue.data["rank"] in (0, 1)
    assert requeue.data["host"] == two_hosts[requeue.data["rank"]].name
    where = f"rank {requeue.data['rank']} on {requeue.data['host']}"
    assert f"reached its time limit of {GANG_LIMIT_S} s ({where})" in requeue.message
    assert resumed_events(job) == [{"step": first, "attempt": 2}]
    assert (job.status, job.failure) == (S.FAILED, "timed_out")
    assert "on its last attempt (2 of 2)" in job.reason
    assert list(JobAttempt.objects.filter(job=job).order_by("number").values_list("outcome", flat=True)) == [
        "requeued", S.FAILED]
    assert not CoreAllocation.objects.exists()
