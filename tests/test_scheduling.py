"""Scheduling against real PostgreSQL: every waiting reason and its sentence, kind
priority, fair share with decay, bursts that cannot jump the queue, preemption of
borrowed cores, and what a pending job's owner sees (page and API)."""
from __future__ import annotations

import re
from datetime import timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from neuron_workers import execution
from jobs.lifecycle import scheduler
from jobs.lifecycle import selectors
from jobs.lifecycle import states
from jobs.quotas.fairshare import QueueItem, decayed_usage, fair_order
from jobs.models import CoreAllocation, Host, Job, JobAttempt, JobEvent, KindPriority
from jobs.quotas import selectors as quota_selectors
from jobs.quotas.backfill import NO_TIME_LIMIT
from jobs.quotas.selectors import clear_usage_cache
from jobs.quotas.services import quota_update
from tests.conftest import api_client

S = Job.Status
NO_QUOTA = "needs 1 cpu core; team vision has no cpu cores guaranteed and may not borrow any; 4 are free in the fleet"


@pytest.fixture(autouse=True)
def _fresh_usage(settings):
    settings.FAIRSHARE_CACHE_S = 0  # every test sees the usage it just wrote
    # The cast's five passwords would otherwise cost seconds of PBKDF2 per test.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    clear_usage_cache()
    scheduler._last_run.update(ended=0.0, waiting=0)
    yield
    scheduler._last_run.update(ended=0.0, waiting=0)


def pending(team, user, *, cores: int = 1, family: str = "cpu", kind: str = "inference", at=None) -> Job:
    """A pending job as job_submit leaves it (these tests are about what comes after)."""
    job = Job.objects.create(team=team, user=user, kind=kind, family=family, cores=cores,
                             created_at=at or timezone.now(), reason_code="submitted")
    states.event(job.pk, "pending", "submitted")
    return job


def host(name: str, family: str, cores: int, **extra) -> Host:
    return Host.objects.create(name=name, family=family, core_ids=list(range(cores)), last_heartbeat=timezone.now(),
                               **extra)


def set_family(team, family: str, guaranteed: int, borrow: int = 0) -> None:
    quota_update(team=team, values={"families": {family: {"guaranteed_cores": guaranteed, "borrow_limit": borrow}}})


def run(job: Job) -> Job:
    """Start a queued job as its worker's claim would."""
    assert states.mark_running(job.pk, Job.objects.get(pk=job.pk).host_id)
    return Job.objects.get(pk=job.pk)


def used_core_hours(team, user, hours: float, ended_ago: timedelta, cores: int = 60) -> None:
    """A finished attempt worth `hours` NeuronCore-hours that ended `ended_ago`."""
    job = Job.objects.create(team=team, user=user, kind="inference", status=S.SUCCEEDED, cores=cores)
    end = timezone.now() - ended_ago
    JobAttempt.objects.create(job=job, team=team, user=user, kind="inference", family="cpu", number=1, cores=cores,
                              started_at=end - timedelta(hours=hours / cores), ended_at=end,
                              core_seconds=hours * 3600, outcome="succeeded")


def reason(job: Job) -> tuple[str, str]:
    job.refresh_from_db()
    return job.reason_code, job.reason


# --- every reason code has a sentence with the numbers ------------------------------

def test_waiting_for_quota_says_how_much_of_the_guarantee_is_used(cast):
    host("trn-a", "trn1", 32)
    host("trn-b", "trn1", 32)
    set_family(cast.vision, "trn1", 32)
    set_family(cast.audio, "trn1", 36)
    for team, cores in ((cast.vision, 24), (cast.audio, 32), (cast.audio, 4)):
        pending(team, cast.alice if team == cast.vision else cast.charlie, cores=cores, family="trn1")
        scheduler.dispatch()
    big = pending(cast.vision, cast.bob, cores=32, family="trn1")
    scheduler.dispatch()
    assert reason(big) == ("waiting_for_quota",
                           "needs 32 trn1 cores; team vision uses 24 of its 32 guaranteed; 4 are free in the fleet")


def test_borrowing_limit_reached_names_guarantee_and_borrowable(cast, cpu_host):
    set_family(cast.vision, "cpu", 1, borrow=1)
    jobs = [pending(cast.vision, cast.bob) for _ in range(3)]
    scheduler.dispatch()
    assert reason(jobs[2]) == ("borrowing_limit_reached",
                               "needs 1 cpu core; team vision uses 2 (1 guaranteed + 1 borrowable); "
                               "2 are free in the fleet")
    assert list(CoreAllocation.objects.order_by("job_id").values_list("borrowed", flat=True)) == [False, True]


def test_when_the_teams_own_endpoint_replicas_hold_its_cores_the_hint_says_they_end_only_when_stopped(cast, cpu_host):
    """Replicas have no time limit: a job waiting behind the team's own replicas for
    its guarantee or its borrowing does not start "when one of the team's jobs ends"."""
    set_family(cast.vision, "cpu", 1, borrow=1)
    replicas = [pending(cast.vision, cast.bob) for _ in range(2)]
    scheduler.dispatch()
    Job.objects.filter(pk__in=[r.pk for r in replicas]).update(kind="serve", max_runtime_s=NO_TIME_LIMIT)
    waiting = pending(cast.vision, cast.bob)
    scheduler.dispatch()
    api = api_client(cast.bob)
    body = api.get(f"/api/v1/jobs/{waiting.pk}/pending").json()
    assert body["reason_code"] == "borrowing_limit_reached"
    assert "team's inference-endpoint replicas" in body["hint"] and "scaled down or stopped" in body["hint"]
    set_family(cast.vision, "cpu", 2)
    scheduler.dispatch()
    body = api.get(f"/api/v1/jobs/{waiting.pk}/pending").json()
    assert body["reason_code"] == "waiting_for_quota"
    assert "team's inference-endpoint replicas" in body["hint"] and "scaled down or stopped" in body["hint"]


def test_no_free_cores_of_family_when_the_fleet_is_full(cast, cpu_host):
    set_family(cast.vision, "cpu", 8, borrow=0)
    jobs = [pending(cast.vision, cast.bob, cores=2) for _ in range(3)]
    scheduler.dispatch()
    assert reason(jobs[2]) == ("no_free_cores_of_family",
                               "needs 2 cpu cores; team vision uses 4 of its 8 guaranteed; "
                               "only 0 of 4 are free in the fleet")


def test_no_free_cores_of_family_explains_fragmentation(cast, cpu_host):
    set_family(cast.vision, "cpu", 8)
    singles = [pending(cast.vision, cast.bob) for _ in range(4)]
    scheduler.dispatch()
    for job in (singles[0], singles[2]):
        states.mark_finished(job.pk, S.CANCELLED, sources=(S.QUEUED,), failure="cancelled")
    pair = pending(cast.vision, cast.bob, cores=2)
    scheduler.dispatch()
    assert reason(pair) == ("no_free_cores_of_family", "needs 2 contiguous cpu cores; 2 of 4 are free in the fleet "
                                                       "but no host has a free run that long")


def test_budget_exhausted_at_dispatch_keeps_the_job_waiting(cast, cpu_host):
    job = pending(cast.vision, cast.bob)
    used_core_hours(cast.vision, cast.bob, 2.0, timedelta(minutes=5))
    quota_update(team=cast.vision, values={"monthly_core_hours": 1.5})
    scheduler.dispatch()
    assert reason(job) == ("budget_exhausted", "team vision has used 2.0 of its 1.5 NeuronCore-hours this month; "
                                               "the job waits until an admin raises the budget or the month ends")
    quota_update(team=cast.vision, values={"monthly_core_hours": 10})
    assert scheduler.dispatch().placed == [job.pk]


def test_dispatch_judges_a_team_far_from_its_budget_by_sums_not_attempt_by_attempt(cast, cpu_host, settings):
    settings.FAIRSHARE_CACHE_S = 60  # the fair-share usage is read once, by the first run
    used_core_hours(cast.vision, cast.bob, 2.0, timedelta(minutes=5))
    set_family(cast.vision, "cpu", 0)  # the jobs keep waiting: every run has pending jobs to check
    [pending(cast.vision, cast.bob) for _ in range(3)]
    scheduler.dispatch()
    with CaptureQueriesContext(connection) as queries:
        scheduler.dispatch()
    # The budget's upper bound is summed by the database; no attempt row is read.
    attempts = [q["sql"] for q in queries.captured_queries if "jobattempt" in q["sql"]]
    assert attempts and all("SUM(" in sql for sql in attempts)


def test_a_team_near_its_budget_is_judged_by_the_exact_measure(cast, cpu_host):
    # An attempt begun 40 days ago that the roll-up has not folded: its whole span
    # (the quick bound, 40 days) is far over the budget; only this month's part
    # (the exact measure) counts, and it is what the sentence shows.
    from jobs.quotas.selectors import core_hours_by_team

    old = Job.objects.create(team=cast.vision, user=cast.bob, kind="inference", status=S.SUCCEEDED, cores=1)
    JobAttempt.objects.create(job=old, team=cast.vision, user=cast.bob, kind="inference", family="cpu", number=1,
                              cores=1, started_at=timezone.now() - timedelta(days=40),
                              ended_at=timezone.now() - timedelta(minutes=1), outcome="succeeded")
    exact = core_hours_by_team([cast.vision.pk])[cast.vision.pk]
    assert exact < 31 * 24 < 40 * 24 - 1
    quota_update(team=cast.vision, values={"monthly_core_hours": exact + 0.5})
    first = pending(cast.vision, cast.bob)
    assert scheduler.dispatch().placed == [first.pk]
    quota_update(team=cast.vision, values={"monthly_core_hours": exact})
    job = pending(cast.vision, cast.bob)
    scheduler.dispatch()
    assert reason(job) == ("budget_exhausted", f"team vision has used {exact:.1f} of its {exact:g} NeuronCore-hours "
                                               "this month; the job waits until an admin raises the budget or the "
                                               "month ends")


def test_the_budget_measure_is_exact_near_a_budget_and_never_below_the_use_elsewhere(cast, cpu_host):
    from jobs.quotas.selectors import core_hours_by_team, core_hours_for_budget

    for team, user, days in ((cast.vision, cast.bob, 40), (cast.audio, cast.charlie, 1)):
        job = Job.objects.create(team=team, user=user, kind="inference", status=S.SUCCEEDED, cores=2)
        JobAttempt.objects.create(job=job, team=team, user=user, kind="inference", family="cpu", number=1, cores=2,
                                  started_at=timezone.now() - timedelta(days=days),
                                  ended_at=timezone.now() - timedelta(minutes=1), outcome="succeeded")
    teams = [cast.vision.pk, cast.audio.pk]
    exact = core_hours_by_team(teams)
    far = core_hours_for_budget({team: 10_000.0 for team in teams})
    assert all(exact[team] - 1e-6 <= far[team] < 10_000.0 for team in teams)
    assert far[cast.vision.pk] > exact[cast.vision.pk]  # the bound counts the 40 days, the month fewer
    near = core_hours_for_budget({cast.vision.pk: exact[cast.vision.pk], cast.audio.pk: 10_000.0})
    assert near[cast.vision.pk] == pytest.approx(exact[cast.vision.pk])


def test_host_draining_when_every_large_enough_host_drains(cast, cpu_host):
    Host.objects.filter(pk=cpu_host.pk).update(state=Host.State.DRAINING)
    job = pending(cast.vision, cast.bob, cores=2)
    scheduler.dispatch()
    assert reason(job) == ("host_draining", "needs 2 cpu cores; every cpu host large enough is draining (test-host)")


def test_no_hosts_of_family_when_none_is_online(cast, cpu_host):
    host("trn2-a", "trn2", 64, state=Host.State.OFFLINE)
    job = pending(cast.vision, cast.bob, cores=8, family="trn2")
    scheduler.dispatch()
    assert reason(job) == ("no_hosts_of_family", "needs 8 trn2 cores; no trn2 host is online")


def test_a_reason_is_rewritten_only_when_it_changes(cast, cpu_host, django_assert_max_num_queries):
    set_family(cast.vision, "cpu", 0)
    [pending(cast.vision, cast.bob) for _ in range(30)]
    scheduler.dispatch()
    # Nothing changed: the second run writes no reason (a fixed number of queries).
    with django_assert_max_num_queries(16):
        scheduler.dispatch()


def test_a_waiting_jobs_figures_are_shown_as_they_are_and_a_pass_rewrites_only_changed_codes(cast, cpu_host, client):
    set_family(cast.vision, "cpu", 8)
    singles = [pending(cast.vision, cast.bob) for _ in range(4)]
    scheduler.dispatch()
    pair = pending(cast.vision, cast.bob, cores=2)
    scheduler.dispatch()
    assert reason(pair) == ("no_free_cores_of_family", "needs 2 cpu cores; team vision uses 4 of its 8 guaranteed; "
                                                       "only 0 of 4 are free in the fleet")
    states.mark_finished(singles[0].pk, S.CANCELLED, sources=(S.QUEUED,), failure="cancelled")
    with CaptureQueriesContext(connection) as queries:
        assert scheduler.dispatch().placed == []
    # Same code, other figures: the pass writes no reason ...
    assert not [q["sql"] for q in queries.captured_queries if q["sql"].startswith("UPDATE") and "reason" in q["sql"]]
    # ... and every place that shows it gives the figures as they are now.
    now = "needs 2 cpu cores; team vision uses 3 of its 8 guaranteed; only 1 of 4 are free in the fleet"
    api = api_client(cast.bob)
    assert api.get(f"/api/v1/jobs/{pair.pk}/pending").json()["reason"] == now
    assert api.get(f"/api/v1/jobs/{pair.pk}").json()["reason"] == now
    assert next(j for j in api.get("/api/v1/jobs?team=vision").json()["items"] if j["id"] == pair.pk)["reason"] == now
    client.force_login(cast.bob)
    assert now in client.get(f"/jobs/{pair.pk}/").content.decode()
    assert client.get(f"/jobs/{pair.pk}/status.json").json()["reason"] == now
    assert now in client.get("/teams/vision/jobs/").content.decode()
    rows = client.get(f"/teams/vision/jobs/rows.json?ids={pair.pk}").json()["jobs"]
    assert rows[0]["reason"] == now


# --- order: kind priority, fair share, submission ------------------------------------

def test_inference_goes_before_compile_before_finetune(cast, cpu_host):
    set_family(cast.vision, "cpu", 0)  # hold everything so the order is all we look at
    ft = pending(cast.vision, cast.bob, kind="finetune")
    comp = pending(cast.vision, cast.bob, kind="compile")
    inf = pending(cast.vision, cast.bob, kind="inference")
    assert [selectors.queue_position(j) for j in (inf, comp, ft)] == [1, 2, 3]


def test_admins_can_change_kind_priority(cast, cpu_host):
    KindPriority.objects.create(kind="finetune", priority=100)
    set_family(cast.vision, "cpu", 1)
    inf = pending(cast.vision, cast.bob, kind="inference")
    ft = pending(cast.vision, cast.bob, kind="finetune")
    assert scheduler.dispatch().placed == [ft.pk]
    assert reason(inf)[0] == "waiting_for_quota"


def test_the_team_with_less_recent_usage_goes_first(cast, cpu_host):
    used_core_hours(cast.audio, cast.charlie, 10, timedelta(hours=1))
    audio_job = pending(cast.audio, cast.charlie, at=timezone.now() - timedelta(minutes=5))
    vision_job = pending(cast.vision, cast.bob)
    assert selectors.queue_position(vision_job) == 1
    assert selectors.queue_position(audio_job) == 2
    Host.objects.filter(pk=cpu_host.pk).update(core_ids=[0])  # room for one job only
    assert scheduler.dispatch().placed == [vision_job.pk]


def test_usage_decays_with_the_half_life(cast, cpu_host, settings):
    settings.FAIRSHARE_HALF_LIFE_H = 24
    used_core_hours(cast.audio, cast.charlie, 10, timedelta(days=7))  # 10 × 2^-7 ≈ 0.08 core-hours now
    used_core_hours(cast.vision, cast.bob, 1, timedelta(hours=1))  # ≈ 0.97 core-hours now
    audio_job = pending(cast.audio, cast.charlie)
    pending(cast.vision, cast.bob, at=timezone.now() - timedelta(minutes=5))
    assert selectors.queue_position(audio_job) == 1


def test_a_larger_share_allows_more_usage_before_yielding(cast, cpu_host):
    used_core_hours(cast.audio, cast.charlie, 10, timedelta(hours=1))
    used_core_hours(cast.vision, cast.bob, 4, timedelta(hours=1))
    quota_update(team=cast.audio, values={"share": 4})  # 10 / 4 < 4 / 1
    audio_job = pending(cast.audio, cast.charlie)
    pending(cast.vision, cast.bob, at=timezone.now() - timedelta(minutes=5))
    assert selectors.queue_position(audio_job) == 1


def test_a_burst_cannot_jump_the_queue(cast, cpu_host):
    early = pending(cast.audio, cast.charlie, at=timezone.now() - timedelta(minutes=1))
    burst = [pending(cast.vision, cast.bob) for _ in range(20)]
    late = pending(cast.audio, cast.charlie)
    assert selectors.queue_position(early) == 1
    # The later audio job waits behind two vision jobs (the second submitted before
    # it, with both teams then charged equally), not behind the whole burst.
    assert selectors.queue_position(late) == 4
    assert selectors.queue_position(burst[-1]) == 22


def test_fair_order_interleaves_teams_and_keeps_each_teams_order():
    items = [QueueItem(i, team_id=1 if i <= 6 else 2, priority=0, cores=1) for i in range(1, 10)]
    order = [i.job_id for i in fair_order(items, usage={}, shares={}, charge_s=3600)]
    assert order == [1, 7, 2, 8, 3, 9, 4, 5, 6]


def test_a_team_alone_at_a_priority_level_is_charged_for_each_job_it_gets_there():
    # Team 1 alone gets its three inference jobs, charged 3 × 1 h; at the next level
    # team 2 (1 h of usage) takes two turns before team 1's first fine-tune, then
    # they alternate.
    items = [QueueItem(i, team_id=1, priority=30, cores=1) for i in (1, 2, 3)]
    items += [QueueItem(i, team_id=1, priority=10, cores=1) for i in (5, 6)]
    items += [QueueItem(i, team_id=2, priority=10, cores=1) for i in (7, 8, 9)]
    order = [i.job_id for i in fair_order(items, usage={2: 3600.0}, shares={}, charge_s=3600)]
    assert order == [1, 2, 3, 7, 8, 5, 9, 6]


def test_decayed_usage_halves_every_half_life():
    now = timezone.now()
    usage = decayed_usage([(1, now, 100.0), (2, now - timedelta(hours=2), 100.0)], now, 3600)
    assert usage[1] == pytest.approx(100.0) and usage[2] == pytest.approx(25.0)


def test_usage_from_cached_days_matches_a_fresh_read_and_counts_an_attempt_closing_today(cast, cpu_host):
    # Closed attempts count at the middle of the day they ended (before yesterday);
    # whole past days are kept in the cache, so the second read must not query them
    # and must agree with the rule and with a read after the cache is dropped.
    used_core_hours(cast.audio, cast.charlie, 10, timedelta(days=3))
    used_core_hours(cast.audio, cast.charlie, 6, timedelta(days=10))
    used_core_hours(cast.vision, cast.bob, 4, timedelta(days=5))
    half = quota_selectors.half_life_s()

    def expected(hours_ago: list[tuple[float, timedelta]]) -> float:
        now = timezone.now()
        total = 0.0
        for hours, ago in hours_ago:
            midnight = timezone.localtime(now - ago).replace(hour=0, minute=0, second=0, microsecond=0)
            total += hours * 3600 * 0.5 ** ((now - midnight - timedelta(hours=12)).total_seconds() / half)
        return total

    with CaptureQueriesContext(connection) as first_read:
        first = quota_selectors.decayed_usage_by_team(fresh=True)
    with CaptureQueriesContext(connection) as cached_read:
        cached = quota_selectors.decayed_usage_by_team(fresh=True)
    assert len(cached_read) < len(first_read)
    clear_usage_cache()
    recomputed = quota_selectors.decayed_usage_by_team(fresh=True)
    audio = expected([(10, timedelta(days=3)), (6, timedelta(days=10))])
    vision = expected([(4, timedelta(days=5))])
    for usage in (first, cached, recomputed):  # rel 1e-4: a minute's decay between the reads, at most
        assert usage[cast.audio.pk] == pytest.approx(audio, rel=1e-4)
        assert usage[cast.vision.pk] == pytest.approx(vision, rel=1e-4)

    # An attempt that started four days ago and closes now counts in full, at the weight
    # of the middle of the hour it closed in (never later than now), although the days
    # it ran through are cached already.
    job = pending(cast.vision, cast.bob, cores=2)
    scheduler.dispatch()
    run(job)
    JobAttempt.objects.filter(job=job).update(started_at=timezone.now() - timedelta(days=4))
    assert states.mark_finished(job.pk, S.SUCCEEDED)
    closed = JobAttempt.objects.get(job=job)
    assert closed.core_seconds == pytest.approx(2 * 4 * 86400, rel=1e-3)
    after = quota_selectors.decayed_usage_by_team(fresh=True)
    now = timezone.now()
    hour_middle = min(timezone.localtime(closed.ended_at).replace(minute=30, second=0, microsecond=0), now)
    weight = 0.5 ** ((now - hour_middle).total_seconds() / half)
    assert after[cast.vision.pk] == pytest.approx(vision + closed.core_seconds * weight, rel=1e-4)
    assert after[cast.audio.pk] == pytest.approx(audio, rel=1e-4)


def test_hours_that_are_over_are_read_once_and_the_current_hour_at_every_read(cast):
    # Since the start of yesterday closed attempts count at the middle of the UTC hour
    # they ended in. An hour over for LAG is kept in the cache (its attempts never
    # change), so a row written into it later, as only a repair would, goes unseen until
    # the cache is dropped; an attempt closing now counts at the next read.
    half = quota_selectors.half_life_s()
    middle = (timezone.now() - timedelta(hours=20)).astimezone(dt_timezone.utc).replace(minute=30, second=0,
                                                                                        microsecond=0)

    def weighted(hours: float, at) -> float:
        return hours * 3600 * 0.5 ** ((timezone.now() - at).total_seconds() / half)

    used_core_hours(cast.audio, cast.charlie, 5, timezone.now() - middle)
    first = quota_selectors.decayed_usage_by_team(fresh=True)
    assert first[cast.audio.pk] == pytest.approx(weighted(5, middle), rel=1e-4)

    used_core_hours(cast.audio, cast.charlie, 3, timezone.now() - middle)
    used_core_hours(cast.vision, cast.bob, 2, timedelta(0))
    now_hour = JobAttempt.objects.get(team=cast.vision).ended_at.astimezone(dt_timezone.utc)
    now_middle = min(now_hour.replace(minute=30, second=0, microsecond=0), timezone.now())
    second = quota_selectors.decayed_usage_by_team(fresh=True)
    assert second[cast.audio.pk] == pytest.approx(weighted(5, middle), rel=1e-4)
    assert second[cast.vision.pk] == pytest.approx(weighted(2, now_middle), rel=1e-4)

    clear_usage_cache()
    repaired = quota_selectors.decayed_usage_by_team(fresh=True)
    assert repaired[cast.audio.pk] == pytest.approx(weighted(8, middle), rel=1e-4)
    assert repaired[cast.vision.pk] == pytest.approx(weighted(2, now_middle), rel=1e-4)


# --- preemption of borrowed cores -----------------------------------------------------

@pytest.fixture
def borrowed_fleet(cast, cpu_host):
    """vision borrows all 4 cores of test-host; audio is guaranteed 4 of them."""
    set_family(cast.vision, "cpu", 0, borrow=4)
    set_family(cast.audio, "cpu", 4, borrow=0)
    jobs = []
    for _ in range(4):  # one by one, so each got its cores at a distinct moment
        jobs.append(pending(cast.vision, cast.bob))
        scheduler.dispatch()
    return [run(j) for j in jobs]


def kick() -> None:
    """What kick_dispatch does before it sends the jobs.dispatch task."""
    from jobs.live import store

    store.redis().set(scheduler.KICK_FLAG, 1, ex=5)


def kicked_run() -> scheduler.DispatchReport:
    kick()
    return scheduler.dispatch_kicked()


def test_a_kick_while_the_fleet_is_full_costs_one_statement_and_the_periodic_run_writes_reasons(cast, cpu_host):
    set_family(cast.vision, "cpu", 8)
    first = [pending(cast.vision, cast.bob) for _ in range(5)]
    assert len(kicked_run().placed) == 4  # one job waits: the fleet is full
    late = pending(cast.vision, cast.bob)
    with CaptureQueriesContext(connection) as queries:
        assert kicked_run().placed == []
    assert len(queries.captured_queries) == 1 and reason(late)[0] == "submitted"
    scheduler.dispatch_kicked(periodic=True)
    assert reason(late) == ("no_free_cores_of_family", "needs 1 cpu core; team vision uses 4 of its 8 guaranteed; "
                                                       "only 0 of 4 are free in the fleet")
    # Cores freed: the next kick runs and places the oldest waiting job.
    states.mark_finished(first[0].pk, S.CANCELLED, sources=(S.QUEUED,), failure="cancelled")
    assert kicked_run().placed == [first[4].pk]


def test_a_kicked_task_does_nothing_when_a_later_run_served_its_kick(cast, cpu_host):
    job = pending(cast.vision, cast.bob)
    kick()
    assert scheduler.dispatch().placed == [job.pk]  # any run clears the flag before it reads
    with CaptureQueriesContext(connection) as queries:
        assert scheduler.dispatch_kicked().placed == []
    assert queries.captured_queries == []


def test_a_busy_task_dispatches_again_until_a_run_places_nothing_then_clears_the_kick(cast, cpu_host):
    from jobs.live import store

    set_family(cast.vision, "cpu", 8)
    jobs = [pending(cast.vision, cast.bob) for _ in range(6)]
    kick()
    report = scheduler.dispatch_kicked()
    assert {j.pk for j in jobs[:4]} == set(Job.objects.filter(status=S.QUEUED).values_list("pk", flat=True))
    assert report.waiting == 2 and not store.redis().exists(scheduler.KICK_FLAG)


def test_a_kick_while_the_fleet_is_full_of_borrowers_still_preempts(cast, borrowed_fleet):
    waiting = pending(cast.vision, cast.bob)
    kicked_run()
    assert reason(waiting)[0] == "borrowing_limit_reached"  # the fleet is full and a job waits
    need = pending(cast.audio, cast.charlie)
    report = kicked_run()
    assert report.placed == [need.pk] and report.preempted == [borrowed_fleet[3].pk]


def test_a_guarantee_preempts_the_newest_borrowers_just_enough(cast, borrowed_fleet):
    need = pending(cast.audio, cast.charlie, cores=2)
    report = scheduler.dispatch()
    assert report.placed == [need.pk]
    victims = {j.pk for j in borrowed_fleet[2:]}
    assert set(report.preempted) == victims
    assert set(Job.objects.filter(pk__in=victims).values_list("status", flat=True)) == {S.PENDING}
    spared = Job.objects.filter(pk__in=[j.pk for j in borrowed_fleet[:2]])
    assert set(spared.values_list("status", flat=True)) == {S.RUNNING}
    assert CoreAllocation.objects.filter(team=cast.audio, borrowed=False).count() == 2
    assert CoreAllocation.objects.count() == 4


def test_the_victims_timeline_names_who_took_the_cores_and_why(cast, borrowed_fleet):
    need = pending(cast.audio, cast.charlie, cores=1)
    scheduler.dispatch()
    victim = borrowed_fleet[-1]
    event = JobEvent.objects.get(job=victim, kind="preempted")
    assert event.message == (f"preempted: team audio reclaimed 1 cpu core for its job #{need.pk}, which needs 1 of its "
                             "4 guaranteed cpu cores; this job was borrowing them beyond team vision's guarantee and "
                             "is back in the queue")
    assert event.data["by_team"] == "audio"
    attempt = JobAttempt.objects.get(job=victim)
    assert attempt.outcome == "requeued" and attempt.ended_at is not None
    assert reason(victim)[0] == "preempted"


def test_borrowers_are_not_preempted_for_a_job_beyond_its_teams_guarantee(cast, borrowed_fleet):
    set_family(cast.audio, "cpu", 1, borrow=4)
    need = pending(cast.audio, cast.charlie, cores=2)
    report = scheduler.dispatch()
    assert report.preempted == [] and report.placed == []
    assert reason(need)[0] == "no_free_cores_of_family"


def test_nobody_is_preempted_when_preempting_would_not_make_room(cast, cpu_host):
    set_family(cast.vision, "cpu", 2, borrow=2)
    set_family(cast.audio, "cpu", 8)
    for _ in range(4):
        pending(cast.vision, cast.bob)
    scheduler.dispatch()  # vision: 2 guaranteed + 2 borrowed
    need = pending(cast.audio, cast.charlie, cores=3)  # only 2 borrowed cores exist
    report = scheduler.dispatch()
    assert report.preempted == [] and reason(need)[0] == "no_free_cores_of_family"


def test_a_preempted_worker_stops_and_records_nothing(cast, borrowed_fleet, tmp_path: Path):
    victim = borrowed_fleet[-1]
    recorder = execution.JobRecorder(victim, victim.host_id)
    assert not recorder.should_cancel()
    pending(cast.audio, cast.charlie)
    scheduler.dispatch()
    assert recorder.should_cancel()
    outcome = SimpleNamespace(status="cancelled", result=None, duration_s=1.0, error_code="", error="")
    assert execution.record_outcome(victim, outcome, tmp_path) == "superseded"
    assert Job.objects.get(pk=victim.pk).status == S.PENDING
    assert not JobEvent.objects.filter(job=victim, kind=S.CANCELLED).exists()


def test_a_late_success_of_a_preempted_attempt_does_not_finish_the_next_attempt(cast, borrowed_fleet, tmp_path: Path):
    victim = borrowed_fleet[-1]
    pending(cast.audio, cast.charlie)
    scheduler.dispatch()
    # The victim gets cores again (audio's job ended) and runs as attempt 2 on the same host.
    states.mark_finished(Job.objects.get(team=cast.audio).pk, S.CANCELLED, sources=(S.QUEUED,))
    assert victim.pk in scheduler.dispatch().placed
    run(victim)
    assert execution.JobRecorder(victim, victim.host_id).should_cancel()  # attempt 1's recorder: not ours
    outcome = SimpleNamespace(status="succeeded", result={"x": 1}, duration_s=1.0, error_code="", error="")
    assert execution.record_outcome(victim, outcome, tmp_path) == "superseded"
    fresh = Job.objects.get(pk=victim.pk)
    assert (fresh.status, fresh.attempts) == (S.RUNNING, 2)


# --- what the owner sees -------------------------------------------------------------

def test_the_pending_api_explains_position_and_who_is_ahead(cast, cpu_host):
    set_family(cast.vision, "cpu", 0)
    set_family(cast.audio, "cpu", 0)
    pending(cast.audio, cast.charlie, cores=2, at=timezone.now() - timedelta(minutes=2))
    ours = pending(cast.vision, cast.alice, at=timezone.now() - timedelta(minutes=1))
    mine = pending(cast.vision, cast.bob)
    scheduler.dispatch()
    body = api_client(cast.bob).get(f"/api/v1/jobs/{mine.pk}/pending").json()
    assert body["reason_code"] == "waiting_for_quota"
    assert body["reason"] == NO_QUOTA
    assert body["position"] == 3 and body["queue_length"] == 3
    assert body["ahead"] == [
        {"id": None, "team": "audio", "kind": None, "cores": 2, "mine": False},
        {"id": ours.pk, "team": "vision", "kind": "inference", "cores": 1, "mine": True},
    ]


def test_another_teams_job_is_a_404_on_the_pending_api(cast, cpu_host):
    job = pending(cast.vision, cast.bob)
    assert api_client(cast.charlie).get(f"/api/v1/jobs/{job.pk}/pending").status_code == 404


def test_a_running_job_has_no_position(cast, cpu_host):
    job = pending(cast.vision, cast.bob)
    scheduler.dispatch()
    body = api_client(cast.bob).get(f"/api/v1/jobs/{job.pk}/pending").json()
    assert body["status"] == "queued" and body["position"] is None and body["ahead"] == []


def test_the_job_page_explains_why_it_waits(cast, cpu_host, client):
    set_family(cast.vision, "cpu", 0)
    job = pending(cast.vision, cast.bob)
    scheduler.dispatch()
    client.force_login(cast.bob)
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert "Why is this job waiting?" in page
    assert NO_QUOTA in page
    assert "Number <strong>1</strong> of 1 in the cpu queue: it is next." in page


def test_the_job_pages_list_of_jobs_ahead_follows_its_ahead_of_it(cast, cpu_host, client):
    """'Number 2 of 2 in the cpu queue; ahead of it:' was followed by the estimated
    start, and the list of jobs ahead came after that."""
    set_family(cast.vision, "cpu", 0)
    first = pending(cast.vision, cast.bob)
    job = pending(cast.vision, cast.bob)
    scheduler.dispatch()
    client.force_login(cast.bob)
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert re.search(r'in the cpu queue; ahead of it:</p>\s*<ol class="ahead" id="pending-ahead">\s*'
                     rf'<li><a href="/jobs/{first.pk}/">#{first.pk}</a>', page), page
    assert page.index('id="pending-estimate"') < page.index('id="pending-position"')


def test_team_pages_show_who_borrows_and_who_lends(cast, borrowed_fleet, client):
    vision = api_client(cast.bob).get("/api/v1/teams/vision").json()["usage"]["families"]["cpu"]
    audio = api_client(cast.charlie).get("/api/v1/teams/audio").json()["usage"]["families"]["cpu"]
    assert vision == {"in_use": 4, "borrowed": 4, "lent": 0}
    assert audio == {"in_use": 0, "borrowed": 0, "lent": 4}
    client.force_login(cast.charlie)
    page = client.get("/teams/audio/").content.decode()
    assert "Lends <strong>4</strong> idle guaranteed cpu cores to other teams" in page
    client.force_login(cast.bob)
    page = client.get("/teams/vision/").content.decode()
    assert "Borrows <strong>4</strong> cpu cores beyond its guarantee of 0" in page
