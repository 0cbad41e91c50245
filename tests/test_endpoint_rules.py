"""The pure rules endpoints add: the autoscaler's decision (jobs.endpoints.scaling)
and how reservations treat a job with no time limit (a replica)."""
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
