"""Gangs in the real dispatcher on PostgreSQL: all N hosts in one transaction or
nothing, a run message to every host, release on requeue and cancel, and no partial
gang or doubly held core while several dispatchers, finishers and cancellers race."""
from __future__ import annotations

import random
import threading
import time
from datetime import timedelta

import pytest
from django.core.cache import cache, caches
from django.db import connection, transaction
from django.utils import timezone

from jobs.lifecycle import scheduler, states
from jobs.models import CoreAllocation, GangMember, Host, Job
from jobs.quotas.selectors import clear_usage_cache
from tests.test_quota_race import in_threads
from tests.test_scheduling import host, pending, set_family

S = Job.Status


@pytest.fixture(autouse=True)
def _fresh(settings):
    settings.FAIRSHARE_CACHE_S = 0
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    clear_usage_cache()
    scheduler._last_run.update(ended=0.0, waiting=0)


def gang(team, user, hosts: int, per_host: int = 8, family: str = "trn1", same_network: bool = False) -> Job:
    job = pending(team, user, cores=hosts * per_host, family=family)
    Job.objects.filter(pk=job.pk).update(host_count=hosts, same_network=same_network)
    job.refresh_from_db()
    return job


@pytest.fixture
def sent(monkeypatch):
    """The run messages the dispatcher hands the broker: (job id, host queue)."""
    out: list[tuple[int, str]] = []
    monkeypatch.setattr(scheduler, "send_run", lambda job_id, queue, producer=None: out.append((job_id, queue)))
    return out


def test_a_gang_is_placed_on_all_its_hosts_at_once(cast, sent, django_capture_on_commit_callbacks):
    hosts = [host(f"trn-{i}", "trn1", 8) for i in range(3)]
    set_family(cast.vision, "trn1", 24)
    job = gang(cast.vision, cast.bob, 3)
    with django_capture_on_commit_callbacks(execute=True):
        report = scheduler.dispatch()
    assert report.placed == [job.pk]
    job.refresh_from_db()
    members = list(GangMember.objects.filter(job=job).order_by("rank"))
    assert job.status == S.QUEUED and job.core_start == 0
    assert [m.rank for m in members] == [0, 1, 2] and members[0].host_id == job.host_id
    assert {m.host_id for m in members} == {h.pk for h in hosts}
    assert all((m.core_start, m.cores, m.state) == (0, 8, "placed") for m in members)
    assert CoreAllocation.objects.filter(job=job).count() == 24
    assert sorted(sent) == sorted((job.pk, h.queue) for h in hosts)  # every rank's worker is woken


def test_a_gang_that_does_not_fit_takes_nothing_and_says_why(cast, sent):
    host("trn-0", "trn1", 8)
    host("trn-1", "trn1", 8)
    host("trn-2", "trn1", 8)
    set_family(cast.vision, "trn1", 32)
    small = pending(cast.vision, cast.bob, cores=2, family="trn1")
    assert scheduler.dispatch().placed == [small.pk]  # one host is no longer idle
    big = gang(cast.vision, cast.bob, 3)
    assert scheduler.dispatch().placed == []
    big.refresh_from_db()
    assert big.status == S.PENDING and big.host_id is None
    assert not GangMember.objects.filter(job=big).exists() and not CoreAllocation.objects.filter(job=big).exists()
    assert big.reason_code == "no_free_cores_of_family"
    assert "3 whole trn1 hosts of 8 cores" in big.reason and "2 such hosts are idle" in big.reason


def test_a_gang_asking_for_one_network_waits_for_one(cast, sent):
    for i, label in enumerate(["efa-a", "efa-b", "efa-b", "efa-a"]):
        host(f"trn-{i}", "trn1", 8, network=label)
    set_family(cast.vision, "trn1", 64)
    job = gang(cast.vision, cast.bob, 2, same_network=True)
    assert scheduler.dispatch().placed == [job.pk]
    labels = set(GangMember.objects.filter(job=job).values_list("host__network", flat=True))
    assert len(labels) == 1
    refused = gang(cast.vision, cast.bob, 3, same_network=True)
    scheduler.dispatch()
    refused.refresh_from_db()
    assert refused.reason_code == "no_hosts_of_family" and "at most 2 in one network" in refused.reason


def test_requeue_and_cancel_release_every_core_and_rank_of_a_gang(cast, sent):
    for i in range(2):
        host(f"trn-{i}", "trn1", 8)
    set_family(cast.vision, "trn1", 16)
    job = gang(cast.vision, cast.bob, 2)
    scheduler.dispatch()
    assert states.requeue(job.pk, message="host lost", kind="worker_lost")
    assert not CoreAllocation.objects.exists() and not GangMember.objects.exists()
    assert scheduler.dispatch().placed == [job.pk]
    assert GangMember.objects.filter(job=job).count() == 2
    assert states.mark_finished(job.pk, S.CANCELLED, sources=(S.QUEUED,), failure="cancelled")
    assert not CoreAllocation.objects.exists() and not GangMember.objects.exists()


def test_quotas_count_a_gangs_total_cores(cast, sent):
    for i in range(4):
        host(f"trn-{i}", "trn1", 8)
    set_family(cast.vision, "trn1", 16)  # two hosts' worth: a 3-host gang is beyond it
    job = gang(cast.vision, cast.bob, 3)
    scheduler.dispatch()
    job.refresh_from_db()
    assert job.status == S.PENDING and job.reason_code == "waiting_for_quota"
    assert "needs 24 trn1 cores" in job.reason


@pytest.mark.postgres_only  # row locks under real concurrency (its checker runs raw PostgreSQL SQL)
@pytest.mark.django_db(transaction=True)
def test_concurrent_dispatch_never_leaves_a_partial_gang_or_a_core_held_twice(cast, sent):
    for i in range(5):
        host(f"trn-{i}", "trn1", 8, network="ab"[i % 2])
    set_family(cast.vision, "trn1", 40)
    rng = random.Random(16)
    jobs = []
    for _ in range(40):
        if rng.random() < 0.5:
            jobs.append(gang(cast.vision, cast.bob, rng.choice([2, 3]), same_network=rng.random() < 0.3))
        else:
            jobs.append(pending(cast.vision, cast.bob, cores=rng.choice([1, 2, 4, 8]), family="trn1"))
    want = {j.pk: (j.host_count, j.cores) for j in jobs}
    bad: list = []
    stop = threading.Event()

    def check() -> None:
        """From its own connection: every job holding cores holds all of them, on all its hosts."""
        try:
            while not stop.is_set():
                with connection.cursor() as cur:
                    cur.execute("SELECT job_id, COUNT(*), COUNT(DISTINCT host_id), COUNT(DISTINCT (host_id, core)) "
                                "FROM jobs_coreallocation GROUP BY job_id")
                    for job_id, cores, hosts, distinct in cur.fetchall():
                        if (hosts, cores) != want[job_id] or distinct != cores:
                            bad.append((job_id, hosts, cores))
        finally:
            connection.close()

    def finish_some(i: int) -> None:
        """Finish, requeue or cancel whatever holds cores, while the dispatchers run."""
        local = random.Random(i)
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and Job.objects.exclude(status__in=Job.FINISHED).exists():
            for pk, host_id in Job.objects.filter(status=S.QUEUED).values_list("pk", "host_id")[:3]:
                roll = local.random()
                if roll < 0.2:
                    states.requeue(pk, sources=(S.QUEUED,), message="lost", kind="worker_lost")
                elif roll < 0.3:
                    states.mark_finished(pk, S.CANCELLED, sources=(S.QUEUED,), failure="cancelled")
                elif states.mark_running(pk, host_id):
                    states.mark_finished(pk, S.SUCCEEDED)

    def dispatch_loop(i: int) -> int:
        placed, deadline = 0, time.monotonic() + 6
        while time.monotonic() < deadline and Job.objects.filter(status=S.PENDING).exists():
            placed += len(scheduler.dispatch().placed)
        return placed

    checker = threading.Thread(target=check, daemon=True)
    checker.start()
    try:
        results = in_threads(6, lambda i: dispatch_loop(i) if i < 4 else finish_some(i))
    finally:
        stop.set()
        checker.join(10)
    assert sum(r for r in results if r) >= 10
    assert not bad, bad[:5]
    for job in Job.objects.filter(host_count__gt=1):
        ranks = list(GangMember.objects.filter(job=job).values_list("host_id", flat=True))
        if job.status == S.PENDING:
            assert not ranks
        elif job.status != S.CANCELLED:
            assert len(set(ranks)) == job.host_count



def holding(team, user, limit_s: int) -> Job:
    """A running 8-core trn1 job of `team` that started just now with this time limit."""
    job = pending(team, user, cores=8, family="trn1")
    Job.objects.filter(pk=job.pk).update(max_runtime_s=limit_s)
    assert scheduler.dispatch().placed == [job.pk]
    assert states.mark_running(job.pk, Job.objects.get(pk=job.pk).host_id)
    return job


def history(team, user, ratio: float, n: int = 5, limit_s: int = 1000) -> None:
    """`n` finished jobs of `team` that each ran `ratio` of its time limit."""
    end = timezone.now()
    Job.objects.bulk_create([Job(team=team, user=user, kind="inference", family="trn1", cores=1, status=S.SUCCEEDED,
                                 max_runtime_s=limit_s, started_at=end - timedelta(seconds=limit_s * ratio),
                                 finished_at=end) for _ in range(n)])
    cache.delete(f"runtime-ratio:{team.pk}")  # a ratio an earlier test run cached for the same id


def test_a_waiting_gang_is_kept_the_hosts_its_holders_history_expects_free_first(cast, sent):
    set_family(cast.vision, "trn1", 32)
    set_family(cast.audio, "trn1", 8)
    host("trn-fast", "trn1", 8)
    holding(cast.vision, cast.bob, 1000)  # vision's jobs run a tenth of their limits
    host("trn-slow", "trn1", 8)
    holding(cast.audio, cast.charlie, 500)  # audio's nine tenths
    assert set(CoreAllocation.objects.values_list("host__name", flat=True)) == {"trn-fast", "trn-slow"}
    host("trn-idle", "trn1", 8)
    job = gang(cast.vision, cast.bob, 2)
    small = pending(cast.vision, cast.bob, cores=4, family="trn1")
    Job.objects.filter(pk=small.pk).update(max_runtime_s=300)
    longer = pending(cast.vision, cast.bob, cores=4, family="trn1")
    Job.objects.filter(pk=longer.pk).update(max_runtime_s=1500)
    # Without history the gang is promised trn-idle and trn-slow (free by 500 s by the
    # limits), and the 300 s job may use trn-idle meanwhile; the 1500 s one may not.
    cache.delete_many([f"runtime-ratio:{cast.vision.pk}", f"runtime-ratio:{cast.audio.pk}"])
    with transaction.atomic():
        dry = scheduler.DispatchRun(scheduler.lock_hosts(), scheduler.RunInputs.read(ratios=scheduler.gang_ratios()),
                                    dry=True)
        assert [r.job_id for r in dry.decide().started] == [small.pk]
    # With it, trn-fast is expected free by 100 s: the gang gets it and trn-idle,
    # promised by 1000 s and kept from backfill from 100 s. Vision's 300 s job is
    # expected gone by 30 s and gone by its limit before 1000 s: it may use trn-idle.
    # Its 1500 s job, expected to run 150 s, would delay the gang's expected start.
    history(cast.vision, cast.bob, 0.1)
    history(cast.audio, cast.charlie, 0.9)
    assert scheduler.dispatch().placed == [small.pk]
    longer.refresh_from_db()
    job.refresh_from_db()
    assert longer.reason_code == "backfill_blocked" and f"job #{job.pk}" in longer.reason
    assert job.reason_code == "no_free_cores_of_family"
    assert reserved_hosts() == {"trn-fast", "trn-idle"}


def reserved_hosts() -> set[str]:
    """The hosts a dry run reserves the waiting trn1 gang."""
    with transaction.atomic():
        dry = scheduler.DispatchRun(scheduler.lock_hosts(), scheduler.RunInputs.read(ratios=scheduler.gang_ratios()),
                                    dry=True)
        held = dry.decide().reservations["trn1"]
    return {Host.objects.get(pk=m.host_id).name for m in held.members}


def test_a_waiting_gang_keeps_its_hosts_from_run_to_run_when_new_history_would_promise_it_later(cast, sent):
    set_family(cast.vision, "trn1", 32)
    set_family(cast.audio, "trn1", 8)
    host("trn-long", "trn1", 8)
    holding(cast.vision, cast.bob, 1000)
    host("trn-short", "trn1", 8)
    holding(cast.audio, cast.charlie, 500)
    host("trn-idle", "trn1", 8)
    history(cast.vision, cast.bob, 0.9)
    history(cast.audio, cast.charlie, 0.1)
    gang(cast.vision, cast.bob, 2)
    # Audio's job is expected gone first and is also the first by the limits (500 s).
    assert scheduler.dispatch().placed == []
    assert reserved_hosts() == {"trn-short", "trn-idle"}
    # The histories turn around: vision's job is now expected gone first. Moving the gang
    # to trn-long would promise it 1000 s instead of 500: it keeps the hosts it was given.
    history(cast.vision, cast.bob, 0.05, n=11)
    history(cast.audio, cast.charlie, 0.95, n=11)
    assert scheduler.dispatch().placed == []
    assert reserved_hosts() == {"trn-short", "trn-idle"}
    # Without the last run's memory the new histories alone would choose trn-long.
    caches["shared"].delete(scheduler.GANG_HOSTS)
    assert reserved_hosts() == {"trn-long", "trn-idle"}
