"""Autoscaling on measured load: the gateway publishes per-endpoint load in Redis
(jobs.gateway.load: requests in flight per replica and waiting, the last arrival); the rule is jobs.endpoints.scaling.decide.
Called by the reconciler (every ENDPOINT_RECONCILE_S) with the endpoint row locked."""
from __future__ import annotations

import logging
import time

import redis as redis_lib
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs.endpoints.timeline import endpoint_event
from jobs.gateway.load import inflight_key, last_request_key
from jobs.endpoints.scaling import Bounds, Load, decide
from jobs.models import Endpoint

log = logging.getLogger(__name__)


def read_load(endpoint_id: int, replica_ids: set[int]) -> Load | None:
    """The gateway's figures for the endpoint (in flight counted only on its live
    replicas: a dead replica's counter is not load). None if Redis cannot say."""
    from jobs.live import store

    try:
        pipe = store.redis().pipeline()
        pipe.hgetall(inflight_key(endpoint_id))
        pipe.get(last_request_key(endpoint_id))
        counts, last = pipe.execute()
    except redis_lib.RedisError as exc:
        log.warning("endpoint %s: load unavailable (%s); not rescaling", endpoint_id, exc)
        return None
    counts = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in (counts or {}).items()}
    inflight = sum(max(n, 0) for key, n in counts.items() if key.isdigit() and int(key) in replica_ids)
    return Load(inflight, max(counts.get("waiting", 0), 0), float(last) if last else None)


def bounds(endpoint: Endpoint) -> Bounds:
    return Bounds(endpoint.min_replicas, endpoint.max_replicas,
                  int((endpoint.options or {}).get("max_concurrent") or 1), settings.ENDPOINT_TARGET_UTILIZATION,
                  settings.ENDPOINT_SCALE_DOWN_COOLDOWN_S, settings.ENDPOINT_IDLE_TO_ZERO_S)


def autoscale(endpoint: Endpoint, replica_ids: set[int]) -> bool:
    """Set endpoint.desired_replicas from the measured load (the row is locked by
    the caller). Returns whether it changed."""
    load = read_load(endpoint.pk, replica_ids)
    if load is None:
        return False
    now = time.time()
    idle_since = max(load.last_request_at or 0.0, endpoint.created_at.timestamp())
    target, why = decide(endpoint.desired_replicas, load, bounds(endpoint), now=now,
                         scaled_at=endpoint.scaled_at.timestamp() if endpoint.scaled_at else None,
                         idle_since=idle_since)
    if target == endpoint.desired_replicas:
        return False
    before = endpoint.desired_replicas
    endpoint.desired_replicas, endpoint.scaled_at = target, timezone.now()
    Endpoint.objects.filter(pk=endpoint.pk).update(desired_replicas=target, scaled_at=endpoint.scaled_at)
    endpoint_event(endpoint.pk, "scaled", f"{before} → {target} replicas ({why})", before=before, after=target,
                   inflight=load.inflight, waiting=load.waiting)
    return True


def wake_up(endpoint_id: int) -> bool:
    """desired 0 -> 1 for an active endpoint that may have a replica (a request is
    waiting: no cool-down). Returns whether it changed; jobs.endpoints.reconcile.wake
    then starts the replica."""
    with transaction.atomic():
        woke = Endpoint.objects.filter(pk=endpoint_id, state=Endpoint.State.ACTIVE, desired_replicas=0,
                                       max_replicas__gte=1).update(desired_replicas=1, scaled_at=timezone.now())
        if woke:
            endpoint_event(endpoint_id, "scaled", "0 → 1 replicas (a request arrived: cold start)", before=0, after=1)
    return bool(woke)
