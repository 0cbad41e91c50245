"""Jobs survive faults: killed workers, duplicate and late messages, a flushed or
restarted Redis, crashing jobs, time limits and cancels with Redis down.

Everything here is real: PostgreSQL (the test database), a private redis-server
(tests/workers.py; so flushing and restarting it disturbs nobody else) and
`celery worker` subprocesses serving host queues. Job children run the fake
backends of tests/fake_backends.py, chosen per host through Host.backend.
Leases are short (JOB_LEASE_S=4, HEARTBEAT_S=1); the tests call the reaper and
the dispatcher themselves instead of waiting for beat.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis as redis_lib
from django.utils import timezone

from jobs.lifecycle import scheduler
from jobs.lifecycle import states
from jobs.assets import storage
from jobs.models import CoreAllocation, Host, Job, JobAttempt, JobEvent, JobLogChunk, Kind
from jobs.lifecycle.services import job_cancel
from neuron_workers.process import find_orphans
from tests.polling import wait_until
from tests.workers import RedisServer, Worker, point_celery_at, worker_env

pytestmark = [pytest.mark.e2e]

S = Job.Status
SLEEP = "tests.fake_backends:SleepBackend"
CRASH = "tests.fake_backends:CrashBackend"
LEASE_S = 4


# --- fixtures ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def broker(redis_server, settings):
    """This test process (scheduler, reaper, services) and its workers use the private Redis."""
    from webapp.celery import app

    if not redis_server.ping():
        redis_server.start()
    url = redis_server.url(15)
    redis_lib.Redis.from_url(url).flushdb()
    previous = app.conf.broker_url
    settings.REDIS_URL = settings.CELERY_BROKER_URL = url
    settings.JOB_LEASE_S = LEASE_S
    settings.QUEUED_RESEND_AFTER_S = 2
    settings.HOST_OFFLINE_AFTER_S = 3600  # no host agent heartbeats in these tests
    point_celery_at(url)
    yield redis_server
    point_celery_at(previous)


@pytest.fixture
def start_worker(broker, transactional_db, _storage, tmp_path):
    """Factory: start_worker(host="test-host", name=..., concurrency=4, **env) -> Worker."""
    started: list[Worker] = []

    def start(host: str = "test-host", *, name: str | None = None, concurrency: int = 4, **env: str) -> Worker:
        name = name or f"w{len(started) + 1}"
        worker = Worker(tmp_path / f"{name}.log", worker_env(redis_url=broker.url(15), storage_root=_storage,
                                                             host=host, **env),
                        queues=f"scheduler,host.{host}", name=name, concurrency=concurrency)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.kill9()
    # Job processes of this test only (tagged and living under this session's storage).
    for pids in _our_job_processes(_storage).values():
        for pid in pids:
            _kill(pid)


@pytest.fixture
def make_host(transactional_db):
    def make(name: str = "test-host", backend: str = SLEEP, cores: int = 4) -> Host:
        return Host.objects.create(name=name, family="cpu", core_ids=list(range(cores)), backend=backend,
                                   memory_bytes=8 << 30, last_heartbeat=timezone.now())

    return make


# --- helpers -----------------------------------------------------------------------

def new_job(cast, *, spec: dict, cores: int = 1, max_attempts: int = 1, max_runtime_s: int = 3600) -> Job:
    """A pending job as job_submit leaves it, with a spec for the fake backends (which
    job_submit's forms would not accept)."""
    job = Job.objects.create(team=cast.vision, user=cast.bob, kind=Kind.INFERENCE, spec=spec, family="cpu",
                             cores=cores, max_runtime_s=max_runtime_s, max_attempts=max_attempts,
                             reason_code="submitted", reason="waiting for the scheduler")
    states.event(job.pk, "pending", "submitted by bob")
    return job


def status(job: Job) -> str:
    return Job.objects.values_list("status", flat=True).get(pk=job.pk)


def wait_status(job: Job, *wanted: str, timeout: float = 30) -> Job:
    wait_until(lambda: status(job) in wanted, timeout, message=f"job {job.pk} to be {'/'.join(wanted)}")
    return Job.objects.get(pk=job.pk)


def workdir(job: Job, attempt: int = 1) -> Path:
    return storage.job_dir(job.pk) / f"attempt-{attempt}"


def wait_running(job: Job, attempt: int = 1, timeout: float = 30) -> None:
    """Running, and the backend has touched its ready file (the child really runs)."""
    wait_status(job, S.RUNNING, timeout=timeout)
    wait_until(lambda: (workdir(job, attempt) / "ready").exists(), timeout, message=f"job {job.pk} ready file")


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def _our_job_processes(root: Path) -> dict:
    """find_orphans(), limited to processes working under `root`: other test sessions on
    this machine run jobs with the same ids against other databases."""
    found = {}
    for job_id, pids in find_orphans().items():
        ours = [pid for pid in pids if _cwd(pid).startswith(str(root))]
        if ours:
            found[job_id] = ours
    return found


def job_processes(job: Job) -> list[int]:
    from django.conf import settings

    return _our_job_processes(Path(settings.STORAGE_ROOT)).get(job.pk, [])


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def reap_until(job: Job, leaves: str = S.RUNNING, timeout: float = 60) -> tuple[Job, float]:
    """Run the reaper (as beat would) until the job leaves `leaves`; returns (job, seconds)."""
    started = time.monotonic()

    def reaped():
        scheduler.reap()
        return status(job) != leaves

    wait_until(reaped, timeout, interval=0.25, message=f"the reaper to move job {job.pk} out of {leaves}")
    return Job.objects.get(pk=job.pk), time.monotonic() - started


def headers(job: Job) -> int:
    """How many attempts wrote their "=== attempt N on host ===" log header."""
    return sum(chunk.count("=== attempt ") for chunk in JobLogChunk.objects.filter(job=job).values_list("text", flat=True))


def log_text(job: Job) -> str:
    return "".join(JobLogChunk.objects.filter(job=job).order_by("offset").values_list("text", flat=True))


def event_kinds(job: Job) -> list[str]:
    return list(JobEvent.objects.filter(job=job).order_by("at", "id").values_list("kind", flat=True))


def dispatch_until_placed(*jobs: Job, timeout: float = 10) -> None:
    wait_until(lambda: scheduler.dispatch() and all(status(j) != S.PENDING for j in jobs), timeout,
               interval=0.1, message="dispatch to place the jobs")


# --- kill -9 -----------------------------------------------------------------------

def test_kill_9_of_worker_and_job_child_requeues_the_job_and_frees_its_cores_once(cast, make_host, start_worker):
    make_host()
    job = new_job(cast, spec={"seconds": 600, "ready_file": "ready"}, cores=2, max_attempts=2)
    first = start_worker()
    dispatch_until_placed(job)
    wait_running(job)
    children = job_processes(job)
    assert children, "the job's child process should be visible by its NEURON_PROCESS_TAG"

    first.kill9()
    for pid in children:
        _kill(pid)
    wait_until(lambda: not job_processes(job), 10, message="the job's processes to be gone")
    assert status(job) == S.RUNNING  # nobody has noticed yet: the lease has not expired

    job, _ = reap_until(job)
    assert job.status == S.PENDING and job.reason_code == "worker_lost" and job.host_id is None
    assert not CoreAllocation.objects.filter(job=job).exists()
    attempt = JobAttempt.objects.get(job=job)
    assert attempt.ended_at is not None and attempt.outcome == "requeued" and attempt.core_seconds > 0
    scheduler.reap()  # a second reaper pass changes nothing
    attempt_again = JobAttempt.objects.get(job=job)
    assert (attempt_again.ended_at, attempt_again.core_seconds) == (attempt.ended_at, attempt.core_seconds)
    assert event_kinds(job).count("pending") == 2  # submitted, requeued once

    # A restarted worker runs attempt 2 (made short here) to the end.
    Job.objects.filter(pk=job.pk).update(spec={"seconds": 0.2})
    start_worker(name="w2")
    dispatch_until_placed(job)
    job = wait_status(job, S.SUCCEEDED)
    assert job.attempts == 2 and headers(job) == 2
    assert list(JobAttempt.objects.filter(job=job).order_by("number").values_list("outcome", flat=True)) == [
        "requeued", S.SUCCEEDED]
    assert not CoreAllocation.objects.exists()


@pytest.mark.parametrize("mode", ["fork", "exec"])
def test_a_job_whose_worker_is_killed_stops_by_itself_and_fails_as_worker_lost(mode, cast, make_host, start_worker):
    make_host()
    job = new_job(cast, spec={"seconds": 600, "ready_file": "ready", "grandchild": True}, max_attempts=1)
    worker = start_worker(RUNNER_MODE=mode)
    dispatch_until_placed(job)
    wait_running(job)
    grandchild = int((workdir(job) / "grandchild.pid").read_text())
    assert grandchild in job_processes(job)

    worker.kill9()  # the worker and its zygote; the job's own session is left alone
    wait_until(lambda: not job_processes(job), 15, message="the orphaned job to stop by itself")
    assert not _alive(grandchild)

    job, _ = reap_until(job)
    assert job.status == S.FAILED and job.failure == "worker_lost"
    assert "worker lost" in job.reason
    assert not CoreAllocation.objects.exists()
    assert list(JobAttempt.objects.filter(job=job).values_list("outcome", flat=True)) == [S.FAILED]


# --- duplicate and late messages ------------------------------------------------------

def test_a_job_longer_than_the_visibility_timeout_runs_once(cast, make_host, start_worker):
    """With a 1 s visibility timeout, a second worker starting mid-run restores every
    unacknowledged message older than that (including one the first worker has
    prefetched); whatever the broker redelivers, each job runs exactly once."""
    make_host(cores=2)
    long_jobs = [new_job(cast, spec={"seconds": 4, "ready_file": "ready"}) for _ in range(3)]
    first = start_worker(concurrency=1, CELERY_VISIBILITY_TIMEOUT="1")
    dispatch_until_placed(*long_jobs[:2])
    wait_running(long_jobs[0])
    time.sleep(1.5)  # older than the visibility timeout while running / prefetched
    second = start_worker(name="w2", concurrency=1, CELERY_VISIBILITY_TIMEOUT="1")
    for job in long_jobs:
        wait_until(lambda j=job: scheduler.dispatch() and status(j) in Job.FINISHED, 40,
                   interval=0.2, message=f"job {job.pk} to finish")
    for job in long_jobs:
        job.refresh_from_db()
        assert job.status == S.SUCCEEDED, job.reason
        assert job.attempts == 1 and JobAttempt.objects.filter(job=job).count() == 1 and headers(job) == 1
    assert first.alive() and second.alive()


def test_duplicate_run_messages_to_two_workers_claim_once(cast, make_host, start_worker):
    make_host()
    jobs = [new_job(cast, spec={"seconds": 1.0}) for _ in range(4)]
    workers = [start_worker(name="w1"), start_worker(name="w2")]
    from webapp.celery import app

    dispatch_until_placed(*jobs)  # one run message each, plus five duplicates each:
    for _ in range(5):
        for job in jobs:
            app.send_task("neuron_workers.run_job", args=[job.pk], queue="host.test-host")
    for job in jobs:
        wait_status(job, S.SUCCEEDED)
    for job in jobs:  # and one more after the end
        app.send_task("neuron_workers.run_job", args=[job.pk], queue="host.test-host")
    total = len(jobs) * 7
    wait_until(lambda: sum(w.output().count(b"] succeeded in") for w in workers) >= total, 20,
               message=f"both workers to handle all {total} run messages")
    replies = b"".join(w.output() for w in workers)
    assert replies.count(b"'succeeded'") == len(jobs)
    assert replies.count(b"'not_claimed'") == total - len(jobs)
    for job in jobs:
        job.refresh_from_db()
        assert job.attempts == 1 and JobAttempt.objects.filter(job=job).count() == 1 and headers(job) == 1
        assert event_kinds(job).count("running") == 1
    assert all(w.output().count(b"'not_claimed'") for w in workers), "both workers should have lost a race"


# --- Redis flushed or restarted ---------------------------------------------------------

@pytest.mark.parametrize("fault", ["flushdb", "restart"])
def test_redis_lost_mid_flight_loses_nothing_and_runs_nothing_twice(fault, cast, make_host, start_worker, broker):
    make_host("test-host", cores=2)
    make_host("test-host-b", cores=1)
    running = new_job(cast, spec={"seconds": 4, "ready_file": "ready"}, cores=2)
    start_worker("test-host", name="wa")
    dispatch_until_placed(running)
    wait_running(running)
    queued = new_job(cast, spec={"seconds": 0.2}, cores=1)
    pending = new_job(cast, spec={"seconds": 0.2}, cores=2)
    scheduler.dispatch()
    queued.refresh_from_db()
    assert queued.status == S.QUEUED and queued.host.name == "test-host-b"  # no worker serves it yet
    assert status(pending) == S.PENDING

    client = redis_lib.Redis.from_url(broker.url(15))
    assert client.llen("host.test-host-b") == 1
    if fault == "flushdb":
        client.flushdb()
    else:
        broker.restart()  # no persistence: a restart is an empty Redis too
        point_celery_at(broker.url(15))
    assert client.llen("host.test-host-b") == 0  # the run message of the queued job is gone

    start_worker("test-host-b", name="wb")
    resent = 0

    def all_done():
        nonlocal resent
        resent += scheduler.reap()["resent"]
        scheduler.dispatch()
        return all(status(j) in Job.FINISHED for j in (running, queued, pending))

    wait_until(all_done, 60, interval=0.3, message="every job to finish")
    assert resent >= 1
    for job in (running, queued, pending):
        job.refresh_from_db()
        assert job.status == S.SUCCEEDED, (job.pk, job.status, job.reason)
        assert job.attempts == 1 and JobAttempt.objects.filter(job=job).count() == 1 and headers(job) == 1
    assert not CoreAllocation.objects.exists()


# --- crashes and time limits ---------------------------------------------------------------

def test_a_job_that_crashes_every_time_stops_after_its_maximum_attempts(cast, make_host, start_worker):
    make_host(backend=CRASH)
    job = new_job(cast, spec={"how": "exit", "code": 3}, max_attempts=3)
    start_worker()
    scheduler.dispatch()  # later attempts are dispatched by the worker's own kick
    job = wait_status(job, S.FAILED, timeout=60)
    assert job.failure == "crashed" and job.attempts == 3
    assert "exited with code 3" in job.reason and "gave up after 3 attempts" in job.reason
    assert list(JobAttempt.objects.filter(job=job).order_by("number").values_list("outcome", flat=True)) == [
        "requeued", "requeued", S.FAILED]
    assert event_kinds(job).count("retry") == 2
    # Each attempt's log: its header, then what the child printed (after it, not over it).
    text = log_text(job)
    assert [text.index(f"=== attempt {n} ") for n in (1, 2, 3)] == sorted(text.index(f"=== attempt {n} ") for n in (1, 2, 3))
    assert text.count("about to crash via exit") == 3
    assert text.rindex("about to crash via exit") > text.index("=== attempt 3 ")
    assert Job.objects.get(pk=job.pk).log_bytes == len(text.encode())
    assert not CoreAllocation.objects.exists()


def test_a_job_over_its_time_limit_is_terminated_then_killed_with_nothing_left(cast, make_host, start_worker):
    make_host()
    job = new_job(cast, spec={"seconds": 600, "ready_file": "ready", "ignore_sigterm": True, "grandchild": True},
                  max_runtime_s=1)
    start_worker(JOB_KILL_GRACE_S="1")
    dispatch_until_placed(job)
    wait_running(job)
    grandchild = int((workdir(job) / "grandchild.pid").read_text())
    job = wait_status(job, S.FAILED, timeout=30)
    assert job.failure == "timed_out" and "max runtime of 1 s" in job.reason
    ran = (job.finished_at - job.started_at).total_seconds()
    assert ran >= 2.0, ran  # 1 s of runtime, then the 1 s grace: SIGTERM was ignored
    assert not job_processes(job) and not _alive(grandchild)
    assert not CoreAllocation.objects.exists()


# --- cancel is a database fact -----------------------------------------------------------

def test_cancel_works_with_redis_down(cast, make_host, start_worker, broker, tiny_model):
    from jobs.lifecycle.forms import InferenceForm
    from jobs.lifecycle.services import job_submit

    make_host()
    job = new_job(cast, spec={"seconds": 600, "ready_file": "ready"})
    start_worker()
    dispatch_until_placed(job)
    wait_running(job)

    broker.stop()
    assert job_cancel(job=Job.objects.get(pk=job.pk), user=cast.bob)  # a database write: no broker on the way
    job = wait_status(job, S.CANCELLED, timeout=20)  # the worker polls the database, not Redis
    assert job.failure == "cancelled" and not job_processes(job)
    assert not CoreAllocation.objects.exists()

    # Submitting and cancelling a pending job need no Redis either.
    form = InferenceForm(data={"model": tiny_model.pk, "prompts": "hi", "max_new_tokens": 1, "temperature": 0,
                               "family": "cpu", "cores": 1}, team=cast.vision)
    assert form.is_valid(), form.errors
    pending = job_submit(team=cast.vision, user=cast.bob, form=form)
    assert pending.status == S.PENDING
    assert job_cancel(job=pending, user=cast.bob)
    assert status(pending) == S.CANCELLED


def test_cancel_while_the_worker_is_stopped_takes_effect_when_it_is_seen(cast, make_host, start_worker):
    make_host()
    running = new_job(cast, spec={"seconds": 600, "ready_file": "ready"}, max_attempts=3)
    queued = new_job(cast, spec={"seconds": 600, "ready_file": "ready"}, max_attempts=3)
    worker = start_worker(concurrency=1)
    dispatch_until_placed(running)
    wait_running(running)
    dispatch_until_placed(queued)
    assert status(queued) == S.QUEUED  # the worker's only slot is busy
    worker.kill9()

    for job in (running, queued):
        assert job_cancel(job=Job.objects.get(pk=job.pk), user=cast.alice)
    assert status(queued) == S.CANCELLED  # never started: cancelled at once
    assert status(running) == S.RUNNING  # its worker is gone; only the database knows

    from webapp.celery import app

    restarted = start_worker(name="w2")
    for job in (running, queued):  # stale or duplicate run messages must not revive them
        app.send_task("neuron_workers.run_job", args=[job.pk], queue="host.test-host")
    running_job, _ = reap_until(running)
    assert running_job.status == S.CANCELLED and running_job.failure == "cancelled"
    wait_until(lambda: restarted.output().count(b"'not_claimed'") >= 2, 20, message="the restarted worker to ignore both")
    assert JobAttempt.objects.filter(job=queued).count() == 0
    assert list(JobAttempt.objects.filter(job=running).values_list("outcome", flat=True)) == [S.CANCELLED]
    assert not job_processes(running) and not CoreAllocation.objects.exists()
