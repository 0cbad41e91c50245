"""The autoscaler's rule, pure (no Django): how many replicas an endpoint wants for
its measured load. jobs.endpoints.autoscaler reads the load and applies the answer."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    """What the gateway measured for one endpoint (jobs.endpoints.autoscaler.read_load)."""

    inflight: int  # requests being served by its replicas now
    waiting: int  # requests waiting in the gateway for a replica (none ready, or all saturated)
    last_request_at: float | None  # Unix time of the last request's arrival


@dataclass(frozen=True)
class Bounds:
    min_replicas: int
    max_replicas: int
    max_concurrent: int  # requests one replica takes at once
    target_utilization: float  # of max_concurrent, per replica
    cooldown_s: float  # a scale-down waits this long after the last change
    idle_to_zero_s: float  # min 0: no request for this long before the last replica goes


def wanted(load: Load) -> int:
    """Requests that want a replica's slot now."""
    return max(load.inflight, 0) + max(load.waiting, 0)


def decide(desired: int, load: Load, bounds: Bounds, *, now: float, scaled_at: float | None,
           idle_since: float) -> tuple[int, str]:
    """(new desired replica count, why). Up at once (0 -> 1 included: a cold start is
    waiting); down only after the cool-down; to zero only after `idle_to_zero_s`
    without requests (`idle_since`: the last request, or the endpoint's creation)."""
    per_replica = max(bounds.max_concurrent * bounds.target_utilization, 1e-9)
    demand = wanted(load)
    need = math.ceil(demand / per_replica) if demand else 0
    if load.waiting > 0:
        need = max(need, 1)
    floor = bounds.min_replicas
    if floor == 0 and need == 0 and desired > 0 and now - idle_since < bounds.idle_to_zero_s:
        floor = 1  # recently used: keep one warm until the idle period has passed
    target = min(max(need, floor), bounds.max_replicas)
    if target > desired:
        return target, f"load: {demand} requests in flight or waiting, {per_replica:g} per replica wanted"
    if target < desired:
        if scaled_at is not None and now - scaled_at < bounds.cooldown_s:
            return desired, "cool-down"
        if target == 0:
            return 0, f"idle for {now - idle_since:.0f} s: scaled to zero"
        return target, f"load: {demand} requests in flight or waiting"
    return desired, "steady"
