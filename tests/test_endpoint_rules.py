"""The pure rules endpoints add: the autoscaler's decision (jobs.endpoints.scaling),
how reservations treat a job with no time limit (a replica), and how a pass
preempts a replica that must drain first (it keeps its cores until it has stopped)."""
from __future__ import annotations

import math

from jobs.endpoints.scaling import Bounds, Load, decide
from jobs.quotas.backfill import NO_TIME_LIMIT, Running, estimated_end, reserve, time_limit_s
from jobs.quotas.placement import HostSlots

BOUNDS = Bounds(min_replicas=1, max_replicas=4, max_concurrent=10, target_utilization=0.5, cooldown_s=60,
                idle_to_zero_s=300)
NOW = 10_000.0


def test_it_scales_up_at_once_to_carry_the_load_at_the_target_utilization():
    assert decide(1, Load(inflight=12, waiting=0, last_request_at=NOW), BOUNDS, now=NOW, scaled_at=NOW - 1,
                  idle_since=NOW)[0] == 3  # 12 / (10 × 0.5)


def test_it_never_goes_above_max_or_below_min():
    assert decide(1, Load(500, 50, NOW), BOUNDS, now=NOW, scaled_at=None, idle_since=NOW)[0] == 4
    assert decide(2, Load(0, 0, NOW - 900), BOUNDS, now=NOW, scaled_at=None, idle_since=NOW - 900)[0] == 1


def test_it_scales_down_only_after_the_cool_down():
    quiet = Load(inflight=1, waiting=0, last_request_at=NOW)
    assert decide(3, quiet, BOUNDS, now=NOW, scaled_at=NOW - 30, idle_since=NOW) == (3, "cool-down")
    assert decide(3, quiet, BOUNDS, now=NOW, scaled_at=NOW - 61, idle_since=NOW)[0] == 1


def test_min_zero_keeps_one_replica_until_the_idle_period_has_passed_then_goes_to_zero():
    bounds = Bounds(0, 2, 10, 0.5, 60, 300)
    assert decide(1, Load(0, 0, NOW - 100), bounds, now=NOW, scaled_at=None, idle_since=NOW - 100)[0] == 1
    assert decide(1, Load(0, 0, NOW - 301), bounds, now=NOW, scaled_at=None, idle_since=NOW - 301)[0] == 0


def test_a_waiting_request_wakes_an_endpoint_scaled_to_zero_without_cool_down():
    bounds = Bounds(0, 2, 10, 0.5, 60, 300)
    assert decide(0, Load(0, 1, NOW), bounds, now=NOW, scaled_at=NOW - 1, idle_since=NOW)[0] == 1


def test_a_replica_has_no_time_limit_and_reservations_do_not_count_on_its_cores():
    assert time_limit_s(NO_TIME_LIMIT) == math.inf and time_limit_s(3600) == 3600
    assert estimated_end(100.0, time_limit_s(NO_TIME_LIMIT), 0.5, 200.0) == math.inf
    host = HostSlots(1, "h", "cpu", (0, 1, 2, 3), frozenset({0, 1, 2, 3}))
    replica = Running(7, 1, "cpu", 1, (0, 1), math.inf)
    batch = Running(8, 1, "cpu", 1, (2, 3), 500.0)
    assert reserve(9, "cpu", 2, [host], [replica, batch], 100.0).start == 500.0  # the batch job's cores
    assert reserve(9, "cpu", 4, [host], [replica, batch], 100.0) is None  # would need the replica's: no promise


def _fleet(*running: Running) -> "FleetState":
    from jobs.quotas.backfill import FleetState

    hosts = {1: HostSlots(1, "h", "cpu", (0, 1, 2, 3, 4, 5))}
    # team 1 borrows (no guarantee), team 2 is guaranteed the whole host
    return FleetState(hosts, {r.job_id: r for r in running}, {(1, "cpu"): (0, 6), (2, "cpu"): (6, 0)},
                      limit_end={r.job_id: r.end for r in running})


def _waiting(job_id: int, team_id: int, cores: int, limit: float = 600.0):
    from jobs.quotas.backfill import Waiting

    return Waiting(job_id, team_id, "cpu", cores, limit, limit)


def test_a_preempted_replica_keeps_its_cores_while_it_drains_and_the_job_waits_for_exactly_them():
    from jobs.quotas.backfill import schedule_pass

    replica = Running(7, 1, "cpu", 1, (2, 3), math.inf, borrowed=True, since=50.0, drains=True)
    batch = Running(8, 1, "cpu", 1, (0, 1), NOW + 900, borrowed=True, since=10.0)
    state = _fleet(replica, batch)
    # team 2 needs 4 cores: cores 4-5 are free, the newest borrower (the replica) makes 2 more
    result = schedule_pass([_waiting(20, 2, 4), _waiting(21, 1, 2, NO_TIME_LIMIT)], state, NOW, preempt=True,
                           drain_s=40)
    assert [(v.job_id, by) for v, by in result.preempted] == [(7, 20)]
    assert result.started == [] and result.reasons[20] == "preempting" and result.awaiting[20] == (7,)
    assert "#7" in result.sentences[20] and "40 s" in result.sentences[20]
    assert state.running[7].stopping and state.running[7].end == NOW + 40  # still holds cores 2-3
    assert 8 in state.running  # just enough: the older borrower keeps running
    # team 1's replacement replica may not take the free cores the job waits for
    assert 21 not in {r.job_id for r in result.started}

    # Next pass, the replica still draining: nobody else is preempted for the same job.
    result = schedule_pass([_waiting(20, 2, 4)], state, NOW + 5, preempt=True, drain_s=40)
    assert result.preempted == [] and result.reasons[20] == "preempting" and 8 in state.running

    # Its process ended: the job starts on its cores.
    state.finish(7)
    result = schedule_pass([_waiting(21, 1, 2, NO_TIME_LIMIT), _waiting(20, 2, 4)], state, NOW + 9, preempt=True,
                           drain_s=40)
    (started,) = result.started
    assert started.job_id == 20 and started.cores == (2, 3, 4, 5)


def test_a_second_job_does_not_count_on_cores_an_earlier_one_waits_for():
    from jobs.quotas.backfill import schedule_pass

    replica = Running(7, 1, "cpu", 1, (0, 1), math.inf, borrowed=True, since=50.0, drains=True)
    batch = Running(8, 1, "cpu", 1, (2, 3), NOW + 900, borrowed=True, since=10.0)
    state = _fleet(replica, batch)
    result = schedule_pass([_waiting(20, 2, 2), _waiting(22, 2, 2)], state, NOW, preempt=True, drain_s=40)
    # 20 gets the free cores 4-5 at once; 22 preempts the replica and waits for it
    assert [r.job_id for r in result.started] == [20]
    assert [(v.job_id, by) for v, by in result.preempted] == [(7, 22)]
    result = schedule_pass([_waiting(22, 2, 2), _waiting(23, 2, 2)], state, NOW + 1, preempt=True, drain_s=40)
    # 22 still waits for the replica; 23 may not wait on the same cores: it preempts the batch job
    assert result.reasons[22] == "preempting"
    assert [(v.job_id, by) for v, by in result.preempted] == [(8, 23)]
    assert [r.job_id for r in result.started] == [23]
