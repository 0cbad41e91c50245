"""Gangs in the pure scheduler: N whole hosts or nothing, one network label when
asked, reservations for a gang at the head honoured by backfill."""
from __future__ import annotations

import random

import pytest

from jobs.quotas.backfill import FleetState, Running, Waiting, conflicts, reserve, runtime_ratio, schedule_pass
from jobs.quotas.placement import Placement
from jobs.quotas.placement import HostSlots, place_gang, place_job
from jobs.quotas.policy import check_gang_hosts


def host(i, cores=8, used=(), draining=False, network="", family="trn1"):
    return HostSlots(i, f"h{i}", family, tuple(range(cores)), frozenset(used), draining, network)


def test_a_gang_takes_whole_idle_hosts_of_its_size_or_nothing():
    fleet = [host(1), host(2, used={0}), host(3), host(4, cores=32), host(5, draining=True), host(6)]
    spots = place_gang(fleet, "trn1", 3, 8)
    assert [(s.host_id, s.core_start, s.cores) for s in spots] == [(1, 0, 8), (3, 0, 8), (6, 0, 8)]
    # A fourth idle 8-core host does not exist (2 is partly used, 4 is another size, 5 drains).
    assert place_gang(fleet, "trn1", 4, 8) is None
    assert place_job(fleet, "trn1", 32, 4) is None


def test_a_gang_that_asks_for_one_network_stays_inside_one_label():
    fleet = [host(1, network="a"), host(2, network="b"), host(3, network="b"), host(4, network="a"),
             host(5, network="a"), host(6)]
    spots = place_gang(fleet, "trn1", 2, 8, same_network=True)
    # Label b has exactly two idle hosts: the best fit; a keeps its three for a larger gang.
    assert {s.host_id for s in spots} == {2, 3}
    assert {s.host_id for s in place_gang(fleet, "trn1", 3, 8, same_network=True)} == {1, 4, 5}
    assert place_gang(fleet, "trn1", 4, 8, same_network=True) is None  # no label has four
    assert len(place_gang(fleet, "trn1", 4, 8)) == 4  # without the constraint it fits


def test_a_gang_without_the_constraint_takes_small_idle_groups_first():
    fleet = [host(1, network="a"), host(2, network="a"), host(3, network="a"), host(4, network="b")]
    assert {s.host_id for s in place_gang(fleet, "trn1", 2, 8)} == {4, 1}


def test_the_hosts_check_names_what_the_fleet_lacks():
    fleet = [host(1, network="a"), host(2, network="b"), host(3, draining=True, network="a")]
    assert check_gang_hosts("trn1", 4, 8, False, fleet).code == "no_hosts_of_family"
    assert check_gang_hosts("trn1", 2, 8, True, fleet).code == "host_draining"
    assert check_gang_hosts("trn1", 2, 8, False, fleet).ok
    assert "one network" in check_gang_hosts("trn1", 3, 8, True, fleet).sentence


def test_a_gang_is_reserved_the_hosts_that_are_all_free_earliest():
    fleet = [host(1, used=range(8)), host(2, used=range(4)), host(3, used=range(8)), host(4, cores=2)]
    running = [Running(10, 1, "trn1", 1, tuple(range(8)), end=500),
               Running(11, 1, "trn1", 2, (0, 1), end=100), Running(12, 1, "trn1", 2, (2, 3), end=300),
               Running(13, 1, "trn1", 3, tuple(range(8)), end=200)]
    held = reserve(9, "trn1", 16, fleet, running, now=0, host_count=2)
    assert held.start == 300 and {m.host_id for m in held.members} == {2, 3}
    assert held.on(2) == frozenset(range(8)) and held.on(4) == frozenset()


def test_a_gang_is_reserved_the_hosts_expected_free_first_and_promised_them_by_time_limits():
    fleet = [host(1, used=range(8)), host(2, used=range(8)), host(3, used=range(8))]
    running = [Running(10, 1, "trn1", 1, tuple(range(8)), end=100), Running(11, 2, "trn1", 2, tuple(range(8)), end=150),
               Running(12, 2, "trn1", 3, tuple(range(8)), end=200)]
    by_limits = reserve(9, "trn1", 16, fleet, running, now=0, host_count=2)
    assert {m.host_id for m in by_limits.members} == {1, 2} and by_limits.held_from == by_limits.start == 150
    # Team 2's jobs are expected to end long before their limits, job 10 near its own.
    held = reserve(9, "trn1", 16, fleet, running, now=0, host_count=2, expected={10: 90, 11: 30, 12: 40})
    assert {m.host_id for m in held.members} == {2, 3}
    assert (held.start, held.held_from) == (200, 40)  # promised by the limits, kept from backfill from 40
    # An expected end already past is "any moment now"; never later than the time limit.
    late = reserve(9, "trn1", 16, fleet, running, now=50, host_count=2, expected={10: 500, 11: 30, 12: 40})
    assert {m.host_id for m in late.members} == {2, 3} and late.held_from == 50


def test_a_gang_keeps_the_hosts_it_was_reserved_unless_others_promise_it_an_earlier_start():
    fleet = [host(1, used=range(8)), host(2, used=range(8)), host(3, used=range(8))]
    running = [Running(10, 1, "trn1", 1, tuple(range(8)), end=100), Running(11, 2, "trn1", 2, tuple(range(8)), end=150),
               Running(12, 2, "trn1", 3, tuple(range(8)), end=200)]
    expected = {10: 90, 11: 30, 12: 40}  # new history: hosts 2 and 3, promised by 200
    kept = reserve(9, "trn1", 16, fleet, running, now=0, host_count=2, expected=expected, kept=(1, 2))
    assert [m.host_id for m in kept.members] == [1, 2] and (kept.start, kept.held_from) == (150, 90)
    # Hosts that promise an earlier start win over the ones kept.
    moved = reserve(9, "trn1", 16, fleet, running, now=0, host_count=2, kept=(2, 3))
    assert {m.host_id for m in moved.members} == {1, 2} and moved.start == 150
    # A kept host that can no longer hold it (draining) is not kept.
    fleet[0] = host(1, used=range(8), draining=True)
    gone = reserve(9, "trn1", 16, fleet, running, now=0, host_count=2, expected=expected, kept=(1, 2))
    assert {m.host_id for m in gone.members} == {2, 3} and gone.start == 200


def test_backfill_keeps_off_a_gangs_hosts_from_its_expected_start():
    hosts = {i: host(i) for i in range(3)}
    # Team 7 runs its jobs for a tenth of their limits, team 8 for nine tenths.
    state = FleetState(hosts, unlimited=True, ratios={7: 0.1, 8: 0.9})
    state.start(Waiting(1, 7, "trn1", 8, 1000, 1000), (Placement(1, 0, 8),), 0)
    state.start(Waiting(2, 8, "trn1", 8, 500, 500), (Placement(2, 0, 8),), 0)
    # Expected ends come from the limits and the ratios, never from the runtimes the caller knows.
    assert state.expected_end == {1: 100, 2: 450}
    gang = Waiting(3, 1, "trn1", 16, 1000, 1000, host_count=2)
    short, medium = Waiting(4, 2, "trn1", 4, 50, 50), Waiting(5, 2, "trn1", 4, 300, 300)
    result = schedule_pass([gang, medium, short], state, 0.0)
    held = result.reservations["trn1"]
    assert {m.host_id for m in held.members} == {0, 1} and (held.start, held.held_from) == (1000, 100)
    assert result.reasons[5] == "backfill_blocked"  # would hold h0 past 100, the gang's expected start
    assert [r.job_id for r in result.started] == [4]  # gone by 50


def test_a_job_expected_gone_before_a_gangs_expected_start_may_use_its_hosts_if_its_limit_keeps_the_promise():
    hosts = {i: host(i) for i in range(3)}
    state = FleetState(hosts, unlimited=True, ratios={7: 0.1, 8: 0.9, 9: 0.05})
    state.start(Waiting(1, 7, "trn1", 8, 1000, 1000), (Placement(1, 0, 8),), 0)
    state.start(Waiting(2, 8, "trn1", 8, 500, 500), (Placement(2, 0, 8),), 0)
    gang = Waiting(3, 1, "trn1", 16, 1000, 1000, host_count=2)  # promised h0, h1 by 1000, expected by 100
    past_promise = Waiting(4, 7, "trn1", 4, 1200, 1200)  # expected gone by 120: past the expected start
    beyond_limit = Waiting(5, 9, "trn1", 4, 1100, 10)  # expected by 55, but its limit passes the promise
    kept = Waiting(6, 7, "trn1", 4, 900, 900)  # expected by 90, gone by its limit at 900 < 1000
    exact = Waiting(7, 7, "trn1", 4, 1000, 1000)  # expected by 100, gone by 1000 at the latest
    result = schedule_pass([gang, past_promise, beyond_limit, kept, exact], state, 0.0)
    held = result.reservations["trn1"]
    assert {m.host_id for m in held.members} == {0, 1} and (held.start, held.held_from) == (1000, 100)
    assert result.reasons[4] == result.reasons[5] == "backfill_blocked"
    assert [r.job_id for r in result.started] == [6, 7]


def test_a_gang_member_held_by_a_gang_frees_when_that_gang_ends():
    fleet = [host(1, used=range(8)), host(2, used=range(8))]
    gang = Running(10, 1, "trn1", 1, tuple(range(8)), end=50, ranks=((2, tuple(range(8))),))
    assert reserve(9, "trn1", 16, fleet, [gang], now=0, host_count=2).start == 50
    assert reserve(9, "trn1", 8, fleet, [gang], now=0).start == 50


def test_backfill_may_not_take_a_reserved_host_past_the_gangs_start():
    hosts = {i: host(i) for i in range(3)}
    state = FleetState(hosts, unlimited=True)
    state.start(Waiting(1, 1, "trn1", 8, 100, 100), place_job(state.slots("trn1"), "trn1", 8), 0)
    head = Waiting(2, 2, "trn1", 24, 1000, 1000, host_count=3)
    long_one = Waiting(3, 3, "trn1", 4, 500, 500)
    short_one = Waiting(4, 3, "trn1", 4, 50, 50)
    result = schedule_pass([head, long_one, short_one], state, 0.0)
    assert result.reservations["trn1"].job_id == 2 and result.reservations["trn1"].start == 100
    assert result.reasons[3] == "backfill_blocked"
    assert [r.job_id for r in result.started] == [4]


def test_a_gang_behind_the_head_holds_its_own_reservation():
    # The head (16 cores of the one 16-core host) waits until 1000. The gang behind it
    # needs two 8-core hosts: h0 is idle now, h1 frees at 300.
    hosts = {0: host(0), 1: host(1), 2: host(2, cores=16)}
    state = FleetState(hosts, unlimited=True)
    state.start(Waiting(10, 9, "trn1", 8, 300, 300), (Placement(1, 0, 8),), 0)
    state.start(Waiting(11, 9, "trn1", 16, 1000, 1000), (Placement(2, 0, 16),), 0)
    head = Waiting(1, 1, "trn1", 16, 1000, 1000)
    gang = Waiting(2, 2, "trn1", 16, 1000, 1000, host_count=2)
    long_one, short_one = Waiting(3, 3, "trn1", 4, 1000, 1000), Waiting(4, 3, "trn1", 4, 200, 200)
    result = schedule_pass([head, gang, long_one, short_one], state, 0.0)
    assert result.reservations["trn1"].job_id == 1
    (held,) = result.gang_reservations["trn1"]
    assert (held.job_id, held.start, {m.host_id for m in held.members}) == (2, 300, {0, 1})
    assert result.reasons[3] == "backfill_blocked" and "job #2" in result.sentences[3]
    assert [r.job_id for r in result.started] == [4]  # gone by 200, before the gang's start


def check_reservations(order: list[Waiting], result, state: FleetState) -> None:
    """No job started in the pass delays a reservation of a job ahead of it, and each
    reservation is planned around the ones made before it."""
    rank = {job.job_id: i for i, job in enumerate(order)}
    for family, held in result.made.items():
        for run in result.started:
            spot = tuple(Placement(h, cores[0], len(cores)) for h, cores in run.members)
            for r in held:
                if rank[r.job_id] < rank[run.job_id]:
                    assert not conflicts(spot, state.limit_end[run.job_id], r, state.expected_end.get(run.job_id))
        for i, later in enumerate(held):
            for earlier in held[:i]:
                shared = any(earlier.on(m.host_id) & later.on(m.host_id) for m in later.members)
                assert not shared or later.start >= earlier.until or later.until <= earlier.start


def check_invariants(state: FleetState, jobs: dict[int, Waiting]) -> None:
    """No core held twice; every running gang holds exactly its hosts, whole."""
    seen: set[tuple[int, int]] = set()
    for run in state.running.values():
        job = jobs[run.job_id]
        assert len(run.members) == job.host_count
        assert len({h for h, _ in run.members}) == job.host_count
        assert run.total == job.cores
        for host_id, cores in run.members:
            if job.host_count > 1:
                assert cores == state.hosts[host_id].core_ids  # whole hosts
            for core in cores:
                assert (host_id, core) not in seen
                seen.add((host_id, core))


def simulate(seed: int, n_jobs: int = 150, learn: bool = False):
    """Virtual time with gangs: each job's start, and the reservation it was first given.
    `learn`: the state is told each team's runtime ratio as its jobs finish (gangs'
    hosts then go by expected ends)."""
    rng = random.Random(seed)
    hosts = {i: host(i, network="ab"[i % 2]) for i in range(6)}
    state = FleetState(hosts, unlimited=True)
    history: dict[int, list[tuple[float, float]]] = {}
    arrivals, jobs = [], {}
    for i in range(n_jobs):
        limit = rng.choice([50, 100, 400, 1000])
        if rng.random() < 0.2:
            n = rng.choice([2, 3])
            job = Waiting(i, i % 5, "trn1", 8 * n, limit, limit * rng.uniform(0.2, 1.0), n, rng.random() < 0.5)
        else:
            job = Waiting(i, i % 5, "trn1", rng.choice([1, 2, 4, 8]), limit, limit * rng.uniform(0.2, 1.0))
        jobs[i] = job
        arrivals.append((rng.uniform(0, 3000), job))
    arrivals.sort(key=lambda a: a[0])
    queue, started, reserved, t, k = [], {}, {}, 0.0, 0
    while len(started) < n_jobs:
        while k < len(arrivals) and arrivals[k][0] <= t:
            queue.append(arrivals[k][1])
            k += 1
        result = schedule_pass(queue, state, t)
        check_invariants(state, jobs)
        check_reservations(queue, result, state)
        for r in result.reservations.values():
            reserved.setdefault(r.job_id, r.start)
        for r in result.started:
            started[r.job_id] = t
        queue = [j for j in queue if j.job_id not in started]
        nexts = [r.end for r in state.running.values()] + ([arrivals[k][0]] if k < len(arrivals) else [])
        t = max(t, min(nexts))
        for job_id in [r.job_id for r in state.running.values() if r.end <= t]:
            run = state.finish(job_id)
            if learn:
                history.setdefault(run.team_id, []).append((run.end - run.since, jobs[job_id].limit_s))
                state.ratios[run.team_id] = runtime_ratio(history[run.team_id])[1]
    return jobs, started, reserved


# Seed 42: the learned ratios move the head gang's choice of hosts to ones promised later.
@pytest.mark.parametrize("seed,learn", [(s, False) for s in range(6)] + [(s, True) for s in (*range(6), 42)])
def test_no_backfilled_job_ever_delays_a_head_gang_past_its_reservation(seed, learn):
    jobs, started, reserved = simulate(seed, learn=learn)
    gangs = [j for j in reserved if jobs[j].host_count > 1]
    assert gangs, "the trace should make some gang wait at the head"
    assert not {j: (started[j], r) for j, r in reserved.items() if started[j] > r + 1e-9}


@pytest.mark.parametrize("seed", range(4))
def test_a_gang_reservation_from_the_states_kept_host_ends_is_the_one_from_its_running_jobs(seed):
    """FleetState.host_ends (made once per change of the family) gives every gang the
    reservation reserve() finds going over the running jobs, as jobs start and end."""
    rng = random.Random(seed)
    hosts = {i: host(i, cores=rng.choice([8, 8, 8, 16]), network="ab"[i % 2]) for i in range(10)}
    state = FleetState(hosts, unlimited=True, ratios={t: rng.uniform(0.2, 1.0) for t in range(4)})
    queue = [Waiting(i, i % 4, "trn1", rng.choice([1, 2, 4, 8]), rng.choice([50, 400, 1000]), 10.0)
             for i in range(60)]
    t, found = 0.0, 0
    for _ in range(12):
        result = schedule_pass(queue, state, t)
        queue = [j for j in queue if j.job_id not in {r.job_id for r in result.started}]
        earlier = reserve(98, "trn1", 16, state.slots("trn1"), state.limit_running("trn1"), t, host_count=2,
                          expected=state.expected_end)
        for host_count, same_network in [(2, False), (2, True), (3, False), (4, True)]:
            for reserved in ([], [earlier] if earlier else []):
                args = (99, "trn1", 8 * host_count, state.slots("trn1"), state.limit_running("trn1"), t,
                        host_count, same_network, reserved, state.expected_end)
                held = reserve(*args, ends=state.host_ends("trn1"))
                assert held == reserve(*args)
                found += held is not None and held.start > t
        t += rng.choice([20.0, 60.0, 300.0])
        for job_id in [j for j, end in state.limit_end.items() if end <= t]:
            state.finish(job_id)
    assert found > 20, "most gangs should have to wait for hosts"
