"""Multi-host jobs (gangs) run on every host of the gang, all or nothing.

Real PostgreSQL, a private redis-server and two real `celery worker` processes with
different host names (tests/workers.py): on this machine they are the two hosts of a
gang. Each host's share runs under torchrun, and the ranks of tests/gang_backends.py
really rendezvous (torch's store at rank 0) and all-reduce over gloo. The gang is
placed by the real dispatcher (cores on every host, a GangMember per rank, the job
queued, the run message to every host).
"""
from __future__ import annotations

import random

import pytest

from jobs.assets import storage
from jobs.lifecycle import scheduler
from jobs.models import CoreAllocation, GangMember, Host, Job, JobAttempt, JobEvent
from tests.polling import wait_until
from tests.test_faults import (  # noqa: F401 - fixtures
    _alive, _cwd, broker, job_processes, log_text, make_host, new_job, reap_until, redis_server, start_worker, status,
    wait_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres_only]

S = Job.Status
M = GangMember.State
GANG = "tests.gang_backends:AllReduce"


@pytest.fixture
def two_hosts(make_host):
    hosts = [make_host(name, backend=GANG, cores=2) for name in ("gang-a", "gang-b")]
    Host.objects.filter(pk__in=[h.pk for h in hosts]).update(address="127.0.0.1")
    return [Host.objects.get(pk=h.pk) for h in hosts]


@pytest.fixture
def gang_workers(start_worker, two_hosts):
    """A worker per host, sharing one rendezvous port range of their own."""
    base = str(random.randrange(20000, 31000, 2))  # below Linux's ephemeral ports
    return [start_worker(h.name, name=f"w-{h.name}", GANG_PORT_BASE=base) for h in two_hosts]


def gang_job(cast, hosts: list[Host], *, spec: dict, max_attempts: int = 1, max_runtime_s: int = 600) -> Job:
    job = new_job(cast, spec=spec, cores=2 * len(hosts), max_attempts=max_attempts, max_runtime_s=max_runtime_s)
    Job.objects.filter(pk=job.pk).update(host_count=len(hosts), kind="finetune")
    return Job.objects.get(pk=job.pk)


def place_gang(job: Job, hosts: list[Host]) -> None:
    """The real dispatcher places the gang (all its hosts' cores, a GangMember per rank,
    queued, in one transaction) and sends run_job to every one of its hosts."""
    wait_until(lambda: scheduler.dispatch() and status(job) != S.PENDING, 30, interval=0.2,
               message=f"dispatch to place gang {job.pk}")
    assert sorted(GangMember.objects.filter(job=job).values_list("host_id", flat=True)) == sorted(h.pk for h in hosts)


def ranks(job: Job) -> list[GangMember]:
    return list(GangMember.objects.filter(job=job).order_by("rank"))


def events(job: Job) -> list[tuple[str, str, dict]]:
    return list(JobEvent.objects.filter(job=job).order_by("at", "id").values_list("kind", "message", "data"))


def test_a_two_host_gang_runs_on_both_workers_rendezvous_and_all_reduces(cast, two_hosts, gang_workers):
    job = gang_job(cast, two_hosts, spec={"seconds": 1})
    place_gang(job, two_hosts)
    job = wait_status(job, S.SUCCEEDED, S.FAILED, timeout=120)
    assert job.status == S.SUCCEEDED, (job.reason, log_text(job), gang_workers[1].tail())
    # Rank 0's result is the job's: a real all-reduce over both hosts' ranks (1 + 2).
    assert job.result["sum"] == 3.0 and job.result["world_size"] == 2 and job.result["rank"] == 0
    env = job.result["env"]
    assert env["GROUP_RANK"] == "0" and env["WORLD_SIZE"] == "2" and env["LOCAL_WORLD_SIZE"] == "1"
    assert env["NEURONDECK_GANG_HOSTS"] == "127.0.0.1,127.0.0.1"
    assert env["OMP_NUM_THREADS"] == "2" and env["NEURON_RT_VISIBLE_CORES"] == "0-1"
    assert env["TORCHELASTIC_RUN_ID"] == f"job-{job.pk}-1" and env["NEURON_PROCESS_TAG"] == f"job-{job.pk}"
    members = ranks(job)
    assert [(m.rank, m.host_id, m.state, m.exit_code) for m in members] == [
        (0, two_hosts[0].pk, M.EXITED, 0), (1, two_hosts[1].pk, M.EXITED, 0)]
    assert all(m.started_at and m.heartbeat_at and m.finished_at and m.worker_pid for m in members)
    # Each host ran its own rank, in its own folder.
    from neuron_workers.gang_execution import rank_workdir
    from neuron_workers.process.workdir import read_result

    other = read_result(rank_workdir(job.pk, 1, 1))["result"]
    assert other["rank"] == 1 and other["env"]["GROUP_RANK"] == "1" and other["sum"] == 3.0
    assert b"job %d rank 1" % job.pk in gang_workers[1].output() or b"rank 1:" in gang_workers[1].output()
    # One attempt over all the gang's cores, its cores all freed together; rank 0's artifacts recorded once.
    assert list(JobAttempt.objects.filter(job=job).values_list("number", "cores", "outcome")) == [
        (1, 4, S.SUCCEEDED)]
    assert not CoreAllocation.objects.filter(job=job).exists()
    assert list(job.artifacts.filter(name="sum.txt").values_list("name", flat=True)) == ["sum.txt"]
    # The other host's log is kept as an artifact of the job.
    other_log = job.artifacts.get(name="rank-1-attempt-1-log.txt")
    assert "all-reduced sum 3.0" in (storage.abs_path(other_log.path)).read_text()
    assert "all-reduced sum 3.0" in log_text(job) and "=== attempt 1 on 2 hosts gang-a, gang-b" in log_text(job)


def test_a_duplicate_delivery_of_a_ranks_message_does_nothing(cast, two_hosts, gang_workers):
    job = gang_job(cast, two_hosts, spec={"seconds": 1})
    place_gang(job, two_hosts)
    for h in two_hosts:  # every host gets its message a second time
        scheduler.send_run(job.pk, h.queue)
    job = wait_status(job, S.SUCCEEDED, S.FAILED, timeout=120)
    assert job.status == S.SUCCEEDED, (job.reason, log_text(job))
    assert job.attempts == 1 and JobAttempt.objects.filter(job=job).count() == 1
    wait_until(lambda: all(w.output().count(b"not_claimed") >= 1 for w in gang_workers), 30,
               message="both duplicates to be refused")
    assert log_text(job).count("=== attempt") == 1


def test_one_rank_failing_with_an_error_fails_the_whole_gang_naming_it(cast, two_hosts, gang_workers):
    job = gang_job(cast, two_hosts, spec={"seconds": 60, "fail_rank": 1}, max_attempts=3)
    place_gang(job, two_hosts)
    job = wait_status(job, S.FAILED, S.SUCCEEDED, S.PENDING, timeout=120)
    assert job.status == S.FAILED  # a reported error is not retried, however many attempts are left
    assert job.failure == "bad_input" and "rank 1 on gang-b failed: rank 1 refuses its shard" in job.reason
    wait_until(lambda: all(m.state == M.FAILED for m in ranks(job)), 30, message="both ranks to end")
    zero, one = ranks(job)
    assert one.detail.startswith("bad_input:")
    wait_until(lambda: job.artifacts.filter(name="rank-1-attempt-1-log.txt").exists(), 30,
               message="rank 1's log kept")
    log_1 = storage.abs_path(job.artifacts.get(name="rank-1-attempt-1-log.txt").path).read_text()
    assert "rank 1 refuses its shard" in log_1
    assert zero.finished_at is not None  # rank 0 was stopped, not left waiting in its collective
    kind, message, data = events(job)[-1]
    assert kind == S.FAILED and data["rank"] == 1 and data["host"] == "gang-b"
    assert not CoreAllocation.objects.filter(job=job).exists()
    wait_until(lambda: not job_processes(job), 30, message="every process of the gang to be gone")


def test_a_rank_that_hangs_after_rank_0_succeeded_is_stopped_after_the_exit_window_and_the_job_succeeds(
        cast, two_hosts, start_worker):
    """Rank 1 never leaves its teardown (deaf to SIGTERM), so rank 0's torchrun waits for
    it in its exit barrier too: GANG_EXIT_WINDOW_S after rank 0 wrote its result both
    hosts are stopped, and the job succeeds once, with rank 0's result and artifacts,
    long before its time limit (and torchrun's 300 s exit barrier)."""
    base = str(random.randrange(20000, 31000, 2))
    workers = [start_worker(h.name, name=f"w-{h.name}", GANG_PORT_BASE=base, GANG_EXIT_WINDOW_S="2")
               for h in two_hosts]
    job = gang_job(cast, two_hosts, spec={"hang_rank": 1}, max_runtime_s=3600)
    place_gang(job, two_hosts)
    job = wait_status(job, S.SUCCEEDED, S.FAILED, timeout=180)
    assert job.status == S.SUCCEEDED, (job.reason, log_text(job), workers[1].tail())
    assert [m.state for m in ranks(job)] == [M.EXITED, M.EXITED]
    assert ranks(job)[1].detail == ("stopped: the training finished (rank 0's result) 2 s before and this "
                                    "host's processes had not exited")
    assert job.result["rank"] == 0 and job.result["sum"] == 3.0
    assert list(job.artifacts.filter(name="sum.txt").values_list("name", flat=True)) == ["sum.txt"]
    kind, message, _ = events(job)[-1]
    assert kind == S.SUCCEEDED and "rank 1 on gang-b stopped: the training finished" in message
    assert JobAttempt.objects.get(job=job).outcome == S.SUCCEEDED
    wait_until(lambda: not job_processes(job), 60, message="the hung rank's processes to be gone")


def test_a_rank_that_crashes_requeues_the_whole_gang_until_its_attempts_run_out(cast, two_hosts, gang_workers):
    job = gang_job(cast, two_hosts, spec={"seconds": 60, "crash_rank": 1}, max_attempts=2)
    place_gang(job, two_hosts)
    # Requeued after the first crash, placed again by the dispatcher (the worker kicks
    # it when the cores are freed), crashed again: failed.
    job = wait_status(job, S.FAILED, S.SUCCEEDED, timeout=240)
    assert job.status == S.FAILED and job.attempts == 2, (job.reason, log_text(job))
    assert job.failure == "crashed" and "gave up after 2 attempts" in job.reason
    retry = [(message, data) for kind, message, data in events(job) if kind == "retry"]
    assert len(retry) == 1 and "failed: the job process exited with code" in retry[0][0]
    assert "the whole gang stopped and is requeued (attempt 1 of 2)" in retry[0][0]
    rank, host = retry[0][1]["rank"], retry[0][1]["host"]
    assert rank == 1 and host in ("gang-a", "gang-b") and f"rank 1 on {host} failed" in retry[0][0]
    assert list(JobAttempt.objects.filter(job=job).order_by("number").values_list("number", "cores", "outcome")) == [
        (1, 4, "requeued"), (2, 4, S.FAILED)]
    assert not CoreAllocation.objects.filter(job=job).exists()
    wait_until(lambda: not job_processes(job), 30, message="every process of the gang to be gone")


def attempt_processes(job: Job, attempt: int) -> list[int]:
    """The live processes of one attempt of `job` (its hosts' folders are under attempt-<n>)."""
    from neuron_workers.gang_execution import rank_workdir

    root = str(rank_workdir(job.pk, attempt, 0))
    return [pid for pid in job_processes(job) if _cwd(pid).startswith(root)]


def test_kill_9_of_one_hosts_worker_stops_the_other_rank_and_requeues_naming_the_dead_host(
        cast, two_hosts, gang_workers):
    job = gang_job(cast, two_hosts, spec={"seconds": 300}, max_attempts=2)
    place_gang(job, two_hosts)
    wait_until(lambda: all(m.state == M.RUNNING for m in ranks(job)) and len(job_processes(job)) >= 4, 120,
               message="both ranks running")
    from neuron_workers.gang_execution import rank_workdir

    b_rank = GangMember.objects.get(job=job, host=two_hosts[1]).rank
    wait_until(lambda: (rank_workdir(job.pk, 1, b_rank) / "ready").exists(), 120, message="gang-b's rank running")
    gang_workers[1].kill9()  # host gang-b's worker (and zygote); the job's processes are left alone
    wait_until(lambda: scheduler.reap() is not None and JobEvent.objects.filter(job=job, kind="worker_lost").exists(),
               90, interval=0.25, message="the reaper to give up the gang")
    message, data = JobEvent.objects.filter(job=job, kind="worker_lost").values_list("message", "data").get()
    assert f"rank {b_rank} on gang-b was lost: no heartbeat from its worker for 4 s" in message
    assert "requeued (attempt 1 of 2)" in message
    assert data == {"rank": b_rank, "host": "gang-b", "code": "worker_lost"}
    assert JobAttempt.objects.get(job=job, number=1).outcome == "requeued"
    # Rank on gang-a (alive worker) stopped; gang-b's processes stopped by themselves
    # (the lifeline, then torchrun gone).
    wait_until(lambda: not attempt_processes(job, 1), 60, message="every process of attempt 1 to be gone")
    assert gang_workers[0].alive()
    # The dispatcher places the gang again on both hosts; gang-b has no worker any more, so
    # its rank is never taken: given up in its turn, the job fails after its 2 attempts.
    wait_until(lambda: scheduler.reap() is not None and status(job) == S.FAILED, 120, interval=0.25,
               message="the second attempt to be given up")
    job = Job.objects.get(pk=job.pk)
    assert job.attempts == 2 and job.failure == "worker_lost" and "gang-b was lost" in job.reason
    assert "its worker did not start it" in job.reason and "gave up after 2 attempts" in job.reason
    assert not CoreAllocation.objects.filter(job=job).exists()
    wait_until(lambda: not job_processes(job), 60, message="every process of the gang to be gone")


def test_cancel_stops_every_rank(cast, two_hosts, gang_workers):
    from jobs.lifecycle.services import job_cancel

    job = gang_job(cast, two_hosts, spec={"seconds": 300})
    place_gang(job, two_hosts)
    wait_until(lambda: all(m.state == M.RUNNING for m in ranks(job)), 120, message="both ranks running")
    job_cancel(job=job, user=cast.bob)
    job = wait_status(job, S.CANCELLED, timeout=60)
    wait_until(lambda: all(m.state == M.FAILED for m in ranks(job)), 30, message="both ranks to stop")
    assert not CoreAllocation.objects.filter(job=job).exists()
    wait_until(lambda: not job_processes(job), 30, message="every process of the gang to be gone")


def test_a_two_host_fine_tune_trains_with_ddp_and_matches_one_process_with_the_same_global_batch(
        cast, make_host, start_worker, tiny_model, dataset, tmp_path):
    """The real cpu backend on both hosts: DDP over gloo, each rank a shard of every
    global batch; rank 0's model is registered once; its losses are a single process's."""
    hosts = [make_host(name, backend="cpu", cores=1) for name in ("ft-a", "ft-b")]
    Host.objects.filter(pk__in=[h.pk for h in hosts]).update(address="127.0.0.1")
    base = str(random.randrange(20000, 31000, 2))
    workers = [start_worker(h.name, name=f"w-{h.name}", GANG_PORT_BASE=base) for h in hosts]
    spec = {"steps": 12, "learning_rate": 3e-3, "batch_size": 4, "sequence_length": 32, "seed": 5,
            "checkpoint_every": 100}
    # Submitted as a user does (the API, host_count 2), placed by the real dispatcher.
    from tests.conftest import api_client
    from tests.test_api_jobs import finetune_body, submit

    answer = submit(api_client(cast.bob), finetune_body(tiny_model, dataset, cores=2, host_count=2, **spec))
    job = Job.objects.get(pk=answer["id"])
    assert (job.host_count, job.cores) == (2, 2)
    place_gang(job, hosts)
    job = wait_status(job, S.SUCCEEDED, S.FAILED, timeout=300)
    assert job.status == S.SUCCEEDED, (job.reason, log_text(job), workers[1].tail())
    assert job.result["world_size"] == 2 and job.result["hosts"] == 2
    assert [(m.state, m.exit_code) for m in ranks(job)] == [(M.EXITED, 0), (M.EXITED, 0)]
    assert job.output_model is not None and job.output_model.source_job_id == job.pk
    from jobs.models import ModelAsset

    assert ModelAsset.objects.filter(source_job=job).count() == 1
    # The same spec in one process here: the same global batches, so the same final loss.
    reference = tmp_path / "one-process"
    from jobs.assets import storage
    from neuron_workers.backends import JobContext, get_backend

    inputs = {"model_path": str(storage.abs_path(tiny_model.path)), "model_format": "hf",
              "dataset_path": str(storage.abs_path(dataset.path)), "dataset_format": dataset.format,
              "checkpoint_dir": str(tmp_path / "one-process-checkpoints")}
    one = get_backend("cpu").run(JobContext(job_id=0, kind="finetune", spec=spec, workdir=reference, inputs=inputs,
                                            log=lambda line: None, metric=lambda row: None))
    assert abs(one["final_loss"] - job.result["final_loss"]) <= 1e-4 * max(1.0, abs(one["final_loss"]))
