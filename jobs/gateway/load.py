"""The load the gateway publishes per endpoint, in Redis (the app's Redis db), for
the autoscaler and the endpoint page (jobs.endpoints reads these keys):

- `nd:endpoint:<id>:inflight`  HASH replica id -> requests in flight on it, and
  field "waiting" -> requests waiting for a replica (none ready: a cold start, or
  all at max_concurrent). Rewritten whole at every flush (one gateway process owns
  it), expires FLUSH_TTL_S after the last one, so a stopped gateway leaves no load.
- `nd:endpoint:<id>:requests`  STREAM, one entry per finished request: replica (id or
  ""), status (HTTP code; 0 when the replica's stream broke off after it began),
  ttft_ms, duration_ms, queue_ms (waiting in the gateway for a replica), tokens
  (text chunks streamed, one per token on our servers; usage.completion_tokens for a
  whole answer). MAXLEN ~ STREAM_MAX.
- `nd:endpoint:<id>:last_request`  unix time of the last request's arrival.
- `nd:endpoint:<id>:demand`  unix time of the last request that found no ready
  replica; also PUBLISHed on channel `nd:endpoint:demand` (the endpoint id) so the
  control plane can start a replica at once (scale from zero).

Written from memory every FLUSH_S by one task, in one pipeline: no Redis round
trip on a request's path.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("jobs.gateway")

FLUSH_S = 0.25
FLUSH_TTL_S = 30
STREAM_MAX = 20_000
DEMAND_TTL_S = 300
DEMAND_CHANNEL = "nd:endpoint:demand"


def inflight_key(endpoint_id: int) -> str:
    return f"nd:endpoint:{endpoint_id}:inflight"


def requests_key(endpoint_id: int) -> str:
    return f"nd:endpoint:{endpoint_id}:requests"


def last_request_key(endpoint_id: int) -> str:
    return f"nd:endpoint:{endpoint_id}:last_request"


def demand_key(endpoint_id: int) -> str:
    return f"nd:endpoint:{endpoint_id}:demand"


@dataclass
class _EndpointLoad:
    inflight: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    waiting: int = 0
    finished: list[dict] = field(default_factory=list)
    last_request: float = 0.0
    demand: float = 0.0
    dirty: bool = True


class LoadBoard:
    """In-memory load per endpoint, flushed to Redis by `run()`."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._load: dict[int, _EndpointLoad] = {}
        self._demand_sent: dict[int, float] = {}

    def _of(self, endpoint_id: int) -> _EndpointLoad:
        load = self._load.get(endpoint_id)
        if load is None:
            load = self._load[endpoint_id] = _EndpointLoad()
        load.dirty = True
        return load

    def arrived(self, endpoint_id: int) -> None:
        self._of(endpoint_id).last_request = time.time()

    def waiting(self, endpoint_id: int, delta: int) -> None:
        self._of(endpoint_id).waiting += delta

    def started(self, endpoint_id: int, replica_id: int) -> None:
        self._of(endpoint_id).inflight[replica_id] += 1

    def ended(self, endpoint_id: int, replica_id: int) -> None:
        inflight = self._of(endpoint_id).inflight
        inflight[replica_id] -= 1
        if inflight[replica_id] <= 0:
            del inflight[replica_id]

    def finished(self, endpoint_id: int, *, replica_id: int | None, status: int, ttft_ms: float | None,
                 duration_ms: float, queue_ms: float, tokens: int) -> None:
        self._of(endpoint_id).finished.append({
            "replica": "" if replica_id is None else replica_id, "status": status,
            "ttft_ms": "" if ttft_ms is None else round(ttft_ms, 3), "duration_ms": round(duration_ms, 3),
            "queue_ms": round(queue_ms, 3), "tokens": tokens})

    def no_replica(self, endpoint_id: int) -> bool:
        """Record demand for an endpoint with no ready replica; True when it is news
        (first in a second), so the caller wakes the control plane once, not per request."""
        now = time.time()
        self._of(endpoint_id).demand = now
        if now - self._demand_sent.get(endpoint_id, 0.0) < 1.0:
            return False
        self._demand_sent[endpoint_id] = now
        return True

    async def flush(self) -> None:
        dirty = [(eid, load) for eid, load in self._load.items() if load.dirty]
        if not dirty:
            return
        pipe = self.redis.pipeline(transaction=False)
        for endpoint_id, load in dirty:
            key = inflight_key(endpoint_id)
            pipe.delete(key)
            pipe.hset(key, mapping={"waiting": load.waiting, **{str(r): n for r, n in load.inflight.items()}})
            pipe.expire(key, FLUSH_TTL_S)
            for entry in load.finished:
                pipe.xadd(requests_key(endpoint_id), entry, maxlen=STREAM_MAX, approximate=True)
            if load.last_request:
                pipe.set(last_request_key(endpoint_id), load.last_request)
            if load.demand:
                pipe.set(demand_key(endpoint_id), load.demand, ex=DEMAND_TTL_S)
                pipe.publish(DEMAND_CHANNEL, endpoint_id)
            load.finished, load.demand = [], 0.0
            # Keep publishing while anything is in flight or waiting (the key expires otherwise).
            load.dirty = bool(load.inflight or load.waiting)
        await pipe.execute()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - load figures only: never stop the gateway
                log.warning("publishing endpoint load failed: %r", exc)
