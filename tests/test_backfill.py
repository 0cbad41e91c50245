"""EASY backfill: the head job's reservation is honoured (no backfilled job delays
it past the reservation), small jobs still fill holes; pure rules and the real
dispatcher on PostgreSQL."""
from __future__ import annotations

import random
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.lifecycle import scheduler, states
from jobs.models import Job
from jobs.quotas import backfill
from jobs.quotas.backfill import (
    FleetState,
    Running,
    Waiting,
    backfill_spot,
    forecast,
    reserve,
    schedule_pass,
)
from jobs.quotas.placement import HostSlots, Placement
from jobs.quotas.selectors import clear_usage_cache
from tests.test_scheduling import host, pending, set_family

S = Job.Status


def hosts(n: int, cores: int = 8, family: str = "cpu") -> dict[int, HostSlots]:
    return {i: HostSlots(i, f"h{i}", family, tuple(range(cores))) for i in range(n)}


def test_the_reservation_is_the_earliest_time_the_cores_free_up_by_time_limits():
    fleet = [HostSlots(0, "h0", "cpu", tuple(range(8)), frozenset(range(8)))]
    running = [Running(1, 1, "cpu", 0, (0, 1, 2, 3), end=100), Running(2, 1, "cpu", 0, (4, 5, 6, 7), end=50)]
    held = reserve(9, "cpu", 6, fleet, running, now=0)
    assert (held.start, held.host_id, held.core_start) == (100, 0, 0)
    assert reserve(9, "cpu", 4, fleet, running, now=0).start == 50


def test_a_job_that_ends_before_the_reservation_backfills_and_one_that_would_not_waits():
    fleet = [HostSlots(0, "h0", "cpu", tuple(range(8)), frozenset(range(4)))]
    held = reserve(9, "cpu", 8, fleet, [Running(1, 1, "cpu", 0, (0, 1, 2, 3), end=100)], now=0)
    assert held.start == 100
    assert backfill_spot(fleet, "cpu", 2, 90, held) is not None  # gone by 90
    assert backfill_spot(fleet, "cpu", 2, 150, held) is None  # would hold reserved cores at 100


def test_a_long_job_may_use_cores_the_reservation_does_not_need():
    fleet = [HostSlots(0, "h0", "cpu", tuple(range(8)), frozenset(range(4)))]
    held = reserve(9, "cpu", 4, fleet + [HostSlots(1, "h1", "cpu", tuple(range(8)), frozenset(range(8)))],
                   [Running(1, 1, "cpu", 0, (0, 1, 2, 3), end=100),
                    Running(2, 1, "cpu", 1, tuple(range(8)), end=50)], now=0)
    # 4 cores free on h0 now: the reservation is there at once, so the pass would start it; a
    # reservation for 8 on h1 at 50 leaves h0's free cores to anyone, however long.
    assert held.start == 0
    held = reserve(9, "cpu", 8, fleet + [HostSlots(1, "h1", "cpu", tuple(range(8)), frozenset(range(8)))],
                   [Running(1, 1, "cpu", 0, (0, 1, 2, 3), end=100),
                    Running(2, 1, "cpu", 1, tuple(range(8)), end=50)], now=0)
    assert (held.host_id, held.start) == (1, 50)
    spot = backfill_spot(fleet + [HostSlots(1, "h1", "cpu", tuple(range(8)), frozenset(range(8)))], "cpu", 4,
                         10_000, held)
    assert spot is not None and spot[0].host_id == 0


def simulate(policy: str, seed: int, n_jobs: int = 120):
    """Virtual time, true runtimes below limits: each job's actual start and the
    reservation it was first given (job id -> (start, reserved start))."""
    rng = random.Random(seed)
    state = FleetState(hosts(4), unlimited=True)
    jobs = []
    for i in range(n_jobs):
        cores = rng.choice([1, 1, 2, 2, 4, 8])
        limit = rng.choice([50, 100, 400, 1000])
        jobs.append((rng.uniform(0, 2000), Waiting(i, i % 5, "cpu", cores, limit, limit * rng.uniform(0.2, 1.0))))
    jobs.sort(key=lambda j: j[0])
    queue, started, reserved, t, k = [], {}, {}, 0.0, 0
    while len(started) < n_jobs:
        while k < len(jobs) and jobs[k][0] <= t:
            queue.append(jobs[k][1])
            k += 1
        result = schedule_pass(queue, state, t, policy)
        for r in result.reservations.values():
            reserved.setdefault(r.job_id, r.start)
        ids = {r.job_id for r in result.started}
        for job_id in ids:
            started[job_id] = t
        queue = [j for j in queue if j.job_id not in ids]
        nexts = [r.end for r in state.running.values()] + ([jobs[k][0]] if k < len(jobs) else [])
        t = max(t, min(nexts))
        for job_id in [r.job_id for r in state.running.values() if r.end <= t]:
            state.finish(job_id)
    return started, reserved


@pytest.mark.parametrize("seed", range(8))
def test_no_backfilled_job_ever_delays_a_head_job_past_its_reservation(seed):
    started, reserved = simulate("easy", seed)
    assert reserved, "the trace should make some job wait for room"
    late = {j: (started[j], r) for j, r in reserved.items() if started[j] > r + 1e-9}
    assert not late


def test_small_jobs_still_fill_holes():
    state = FleetState(hosts(1), unlimited=True)
    state.start(Waiting(1, 1, "cpu", 6, 100, 100), Placement(0, 0, 6), 0)
    order = [Waiting(2, 2, "cpu", 8, 100, 100), Waiting(4, 3, "cpu", 1, 500, 500), Waiting(3, 3, "cpu", 2, 50, 50)]
    result = schedule_pass(order, state, 0.0, "easy")
    assert [r.job_id for r in result.started] == [3]  # ends by 50 < the reservation at 100
    assert result.reservations["cpu"].job_id == 2 and result.reservations["cpu"].start == 100
    assert result.reasons[4] == "backfill_blocked"
    fifo = schedule_pass(order, FleetState(hosts(1), unlimited=True), 0.0, "fifo")
    assert [r.job_id for r in fifo.started] == [2]


def test_the_forecast_of_the_head_job_is_its_reservation_when_estimates_are_limits():
    state = FleetState(hosts(1), unlimited=True,
                       running={1: Running(1, 1, "cpu", 0, tuple(range(6)), end=100)}, limit_end={1: 100})
    out = forecast([Waiting(2, 2, "cpu", 8, 100, 100), Waiting(3, 3, "cpu", 2, 50, 50)], state, 0.0)
    assert out[2].start == 100 and out[3].start == 0


def mixed_fleet(seed: int) -> tuple[FleetState, list[Waiting]]:
    """Two families (one with gangs over network labels), quotas with borrowing, a
    fleet part-held by jobs that end before their limits, and a queue to replay;
    odd seeds with the teams' runtime ratios (what a forecast's runtimes come from)."""
    rng = random.Random(seed)
    ratios = {t: rng.uniform(0.2, 1.0) for t in range(4)} if seed % 2 else {}
    fleet = {i: HostSlots(i, f"a{i}", "a", tuple(range(8)), network=f"pg{i // 4}") for i in range(8)}
    fleet.update({i: HostSlots(i, f"b{i}", "b", tuple(range(rng.choice([2, 4, 16])))) for i in range(8, 14)})
    quotas = {(t, f): (rng.choice([0, 4, 8]), rng.choice([8, 32, 64])) for t in range(4) for f in "ab"}
    state = FleetState(fleet, quotas=quotas, ratios=ratios)
    jobs = []
    for i in range(90):
        family, host_count = rng.choice("ab"), 1
        cores = rng.choice([1, 2, 2, 4, 8])
        if family == "a" and rng.random() < 0.15:
            host_count = rng.choice([2, 3])
            cores = 8 * host_count
        limit, team = rng.choice([60, 300, 900, 3600]), rng.randrange(4)
        jobs.append(Waiting(i, team, family, cores, limit, limit * ratios.get(team, rng.uniform(0.1, 1.0)),
                            host_count, rng.random() < 0.5))
    schedule_pass(jobs[:30], state, 0.0)  # what holds cores when the replay starts
    left = [j for j in jobs if j.job_id not in state.running]
    return state, left


@pytest.mark.parametrize("seed", range(12))
def test_the_forecast_passes_only_the_families_that_changed_and_starts_the_same_jobs_at_the_same_times(seed):
    def replay_every_family(order, state, now):  # each step passes the whole queue
        left, out, reserved, t = list(order), {}, set(), now
        while left:
            result = schedule_pass(left, state, t)
            reserved |= result.reserved_jobs()
            out.update({r.job_id: (t, r.job_id in reserved) for r in result.started})
            left = [j for j in left if j.job_id not in out]
            if not left or not state.running:
                break
            t = max(min(r.end for r in state.running.values()), t)
            for job_id in [r.job_id for r in state.running.values() if r.end <= t]:
                state.finish(job_id)
        return out

    state, order = mixed_fleet(seed)
    expected = replay_every_family(order, state, 10.0)
    state, order = mixed_fleet(seed)
    got = forecast(order, state, 10.0, step=0)
    assert len(expected) > 40, "most of the queue should start within the replay"
    assert {j: (f.start, f.reserved) for j, f in got.items() if f.start is not None} == expected


def test_a_job_behind_the_scan_comes_into_the_replays_view_as_the_jobs_ahead_start():
    def replay(scan):
        state = FleetState(hosts(1), unlimited=True,
                           running={1: Running(1, 1, "cpu", 0, tuple(range(6)), end=100)}, limit_end={1: 100})
        order = [Waiting(2, 2, "cpu", 8, 100, 100), Waiting(3, 2, "cpu", 8, 100, 100), Waiting(4, 3, "cpu", 2, 50, 50)]
        return {j: f.start for j, f in forecast(order, state, 0.0, scan=scan).items()}

    assert replay(None) == {2: 100, 3: 200, 4: 0}  # it backfills in front of both
    assert replay(3) == replay(None)
    # The scan holds the two big jobs: job 4 is looked at once job 2 has started (at 100, when it no
    # longer fits), and starts after job 3, the head, as a dispatch run reading 2 jobs would start it.
    assert replay(2) == {2: 100, 3: 200, 4: 300}


def test_a_job_coming_into_view_is_looked_at_in_a_pass_at_the_same_time():
    state = FleetState(hosts(1), unlimited=True)
    order = [Waiting(i, 1, "cpu", 2, 100, 100) for i in range(4)]
    assert {j: f.start for j, f in forecast(order, state, 0.0, scan=1).items()} == {0: 0, 1: 0, 2: 0, 3: 0}


def test_a_dry_runs_job_not_yet_submitted_counts_as_the_newest_in_the_scan():
    def state():
        return FleetState(hosts(1), unlimited=True,
                          running={1: Running(1, 1, "cpu", 0, tuple(range(6)), end=100)}, limit_end={1: 100})

    order = [Waiting(-1, 3, "cpu", 2, 50, 50), Waiting(2, 2, "cpu", 8, 100, 100), Waiting(3, 2, "cpu", 8, 100, 100)]
    assert forecast(order, state(), 0.0)[-1].start == 0
    # Not at 0 with a scan of 2: it is behind both. It comes into view when job 2 starts (at
    # 100) and is then first in the order: the next start.
    assert forecast(order, state(), 0.0, scan=2)[-1].start == 200


def busy_queue(n: int) -> tuple[list[Waiting], FleetState]:
    """A full fleet of 16 8-core hosts and `n` jobs of mixed sizes and runtimes behind it."""
    rng = random.Random(7)
    state = FleetState(hosts(16), unlimited=True)
    jobs = [Waiting(i, i % 5, "cpu", rng.choice([1, 2, 4, 8]), 7200, rng.uniform(300, 7200)) for i in range(n)]
    schedule_pass(jobs, state, 0.0)
    return [j for j in jobs if j.job_id not in state.running], state


def test_coarse_steps_take_far_fewer_passes_and_keep_the_fleets_throughput(monkeypatch):
    passes = []

    def counted(*args, **kwargs):
        passes.append(1)
        return schedule_pass(*args, **kwargs)

    monkeypatch.setattr(backfill, "schedule_pass", counted)
    exact = forecast(*busy_queue(1000), 0.0, step=0)
    exact_passes = len(passes)
    passes.clear()
    coarse = forecast(*busy_queue(1000), 0.0, step=0.05)
    assert exact_passes > 900 and len(passes) < exact_passes / 4
    assert all(f.start is not None for f in [*exact.values(), *coarse.values()])
    # The queue drains about as fast: jobs that start within a step count from when their
    # cores came back, so the cores are not idle for the rest of the step.
    last = max(f.start for f in exact.values())
    assert abs(max(f.start for f in coarse.values()) - last) <= 0.05 * last
    late = sorted((coarse[j].start - f.start) / max(f.start, 60.0) for j, f in exact.items())
    assert abs(late[len(late) // 2]) <= 0.05


def test_a_coarse_step_counts_a_job_as_started_when_its_cores_came_back():
    fleet = {**hosts(1), 1: HostSlots(1, "g1", "gpu", (0, 1))}
    state = FleetState(fleet, unlimited=True, limit_end={1: 1200, 2: 1000},
                       running={1: Running(1, 1, "cpu", 0, tuple(range(8)), end=1200),
                                2: Running(2, 1, "gpu", 1, (0, 1), end=1000)})
    order = [Waiting(i, 1, "cpu", 8, 100, 100) for i in range(3, 7)]
    # Passes at 0 and 1000 (the next end); the next step goes to max(1200, 1000 + 0.5 × 1000) = 1500.
    # The pass there starts job 3 on the cores that came back at 1200: it counts from then, so it
    # ends within the step, and so on - the starts of a pass at every end.
    got = forecast(order, state, 0.0, step=0.5)
    assert [got[i].start for i in range(3, 7)] == [1200, 1300, 1400, 1500]


@pytest.mark.parametrize("seed", range(6))
def test_a_forecast_stopped_once_a_job_has_started_gives_that_job_the_whole_replays_forecast(seed):
    state, order = mixed_fleet(seed)
    whole = forecast(order, state, 10.0)
    for job in order[::7]:
        state, _ = mixed_fleet(seed)
        assert forecast(order, state, 10.0, until=job.job_id)[job.job_id] == whole[job.job_id]


# --- the real dispatcher ---------------------------------------------------------------

@pytest.fixture(autouse=True)
def _fresh(settings):
    settings.FAIRSHARE_CACHE_S = 0
    clear_usage_cache()
    scheduler._last_run.update(ended=0.0, waiting=0)


def running_job(team, user, cores: int, limit_s: int, started_ago_s: int) -> Job:
    job = pending(team, user, cores=cores)
    Job.objects.filter(pk=job.pk).update(max_runtime_s=limit_s)
    assert scheduler.dispatch().placed == [job.pk]
    assert states.mark_running(job.pk, Job.objects.get(pk=job.pk).host_id)
    Job.objects.filter(pk=job.pk).update(started_at=timezone.now() - timedelta(seconds=started_ago_s))
    return job


def test_dispatch_reserves_for_the_head_and_backfills_only_what_ends_before(cast):
    host("cpu-a", "cpu", 8)
    vision, bob = cast.vision, cast.bob
    set_family(vision, "cpu", 16)  # the quota allows all of it: only room holds jobs back
    running_job(vision, bob, 6, 3600, 600)  # its cores are back by 3000 s from now at the latest
    big = pending(vision, bob, cores=8)
    long_small = pending(vision, bob, cores=2)
    Job.objects.filter(pk=long_small.pk).update(max_runtime_s=7200)
    short_small = pending(vision, bob, cores=2)
    Job.objects.filter(pk=short_small.pk).update(max_runtime_s=600)
    report = scheduler.dispatch()
    assert report.placed == [short_small.pk]
    big.refresh_from_db()
    long_small.refresh_from_db()
    assert big.reason_code == "no_free_cores_of_family"
    assert long_small.reason_code == "backfill_blocked" and f"job #{big.pk}" in long_small.reason
