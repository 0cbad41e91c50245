"""Multi-host jobs (gangs) run on every host of the gang, all or nothing.

Real PostgreSQL, a private redis-server and two real `celery worker` processes with
different host names (tests/workers.py): on this machine they are the two hosts of a
gang. Each host's share runs under torchrun, and the ranks of tests/gang_backends.py
really rendezvous (c10d at rank 0) and all-reduce over gloo. The placement is written
as the dispatcher writes it (place_gang below: cores on every host, a GangMember per
rank, the job queued, the run message to every host).
"""
from __future__ import annotations

import random

import pytest
from django.utils import timezone

from jobs.lifecycle import scheduler, states
from jobs.models import CoreAllocation, GangMember, Host, Job, JobAttempt, JobEvent
from tests.polling import wait_until
from tests.test_faults import (  # noqa: F401 - fixtures
    _alive, broker, job_processes, log_text, make_host, new_job, reap_until, redis_server, start_worker, status,
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


def place_gang(job: Job, hosts: list[Host], *, send: bool = True) -> None:
    """What the dispatcher does for a gang, in one transaction: every host's cores, a
    GangMember per rank (rank 0 = Job.host), queued; then run_job to every host."""
    from django.db import transaction

    with transaction.atomic():
        assert states.mark_queued(job, hosts[0].pk, 0, f"placed on {len(hosts)} hosts")
        now = timezone.now()
        per_host = job.cores // len(hosts)
        CoreAllocation.objects.bulk_create([
            CoreAllocation(host=h, core=c, job=job, team_id=job.team_id, family=job.family, since=now)
            for h in hosts for c in range(per_host)])
        GangMember.objects.bulk_create([GangMember(job=job, rank=r, host=h, core_start=0, cores=per_host)
                                        for r, h in enumerate(hosts)])
    if send:
        for h in hosts:
            scheduler.send_run(job.pk, h.queue)


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
    assert zero.finished_at is not None  # rank 0 was stopped, not left waiting in its collective
    kind, message, data = events(job)[-1]
    assert kind == S.FAILED and data["rank"] == 1 and data["host"] == "gang-b"
    assert not CoreAllocation.objects.filter(job=job).exists()
    wait_until(lambda: not job_processes(job), 30, message="every process of the gang to be gone")


def test_a_rank_that_crashes_requeues_the_whole_gang(cast, two_hosts, gang_workers):
    job = gang_job(cast, two_hosts, spec={"seconds": 60, "crash_rank": 1}, max_attempts=2)
    place_gang(job, two_hosts)
    job = wait_status(job, S.PENDING, S.FAILED, S.SUCCEEDED, timeout=120)
    assert job.status == S.PENDING and job.attempts == 1, (job.reason, log_text(job))
    assert job.reason_code == "retry" and "rank 1 on gang-b failed" in job.reason
    assert not CoreAllocation.objects.filter(job=job).exists() and not GangMember.objects.filter(job=job).exists()
    kinds = [kind for kind, _, _ in events(job)]
    assert kinds[-2:] == [S.PENDING, "retry"]
    wait_until(lambda: not job_processes(job), 30, message="every process of the gang to be gone")


def test_kill_9_of_one_hosts_worker_stops_the_other_rank_and_requeues_naming_the_dead_host(
        cast, two_hosts, gang_workers):
    job = gang_job(cast, two_hosts, spec={"seconds": 300}, max_attempts=2)
    place_gang(job, two_hosts)
    wait_until(lambda: all(m.state == M.RUNNING for m in ranks(job)) and len(job_processes(job)) >= 4, 120,
               message="both ranks running")
    from neuron_workers.gang_execution import rank_workdir

    wait_until(lambda: (rank_workdir(job.pk, 1, 1) / "ready").exists(), 120, message="rank 1 in its collective")
    gang_workers[1].kill9()  # host gang-b's worker (and zygote); the job's processes are left alone
    job, _ = reap_until(job, timeout=90)
    assert job.status == S.PENDING and job.attempts == 1
    assert job.reason_code == "worker_lost"
    assert "rank 1 on gang-b was lost: no heartbeat from its worker" in job.reason
    kind, message, data = events(job)[-1]
    assert kind == "worker_lost" and data == {"rank": 1, "host": "gang-b", "code": "worker_lost"}
    assert not CoreAllocation.objects.filter(job=job).exists()
    # Rank 0 (alive worker) stopped; rank 1's processes stopped by themselves (lifeline, then torchrun gone).
    wait_until(lambda: not job_processes(job), 60, message="every process of the gang to be gone")
    assert gang_workers[0].alive()
    wait_until(lambda: b"rank 0: " in gang_workers[0].output(), 30, message="rank 0's worker to report")
    scheduler.reap()  # a second pass changes nothing
    assert status(job) == S.PENDING and Job.objects.get(pk=job.pk).attempts == 1


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
