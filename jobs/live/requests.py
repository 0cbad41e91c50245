"""Request latency and completions that a job reports itself (a cpu inference job:
one `request_ms` metric per finished request), on their way from the worker that
tails the job's metrics to the host agent that publishes the job's points.

Neuron hosts read these from neuron-monitor's execution stats; a CPU host has no
such monitor, so the worker RPUSHes each request's latency to a Redis list per job
and names the job in its host's set; the host's agent drains every job in the set
with each sample, also one that ended before the agent saw it run. Push and drain
are each one MULTI transaction, so every request is counted in exactly one point."""
from __future__ import annotations

import math

from jobs.live.store import redis

PREFIX = "nd:req:"
TTL_S = 3600  # a list nobody drains (no agent on the host) goes away


def key(job_id: int) -> str:
    return f"{PREFIX}{job_id}"


def host_set(host: str) -> str:
    return f"{PREFIX}host:{host}"


def push(job_id: int, host: str, latencies_ms: list[float], r=None) -> None:
    if not latencies_ms:
        return
    pipe = (r or redis()).pipeline(transaction=True)
    pipe.rpush(key(job_id), *latencies_ms)
    pipe.expire(key(job_id), TTL_S)
    pipe.sadd(host_set(host), job_id)
    pipe.expire(host_set(host), TTL_S)
    pipe.execute()


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def stats(latencies_ms: list[float]) -> dict:
    """A job point's request fields: p50 and p99 latency in seconds, completions."""
    ordered = sorted(latencies_ms)
    if not ordered:
        return {"lat_p50": None, "lat_p99": None, "completed": 0}
    return {"lat_p50": _quantile(ordered, 0.50) / 1000.0, "lat_p99": _quantile(ordered, 0.99) / 1000.0,
            "completed": len(ordered)}


def drain(host: str, r=None) -> dict[int, dict]:
    """What each job of `host` reported since the last drain, as `stats`."""
    r = r or redis()
    job_ids = sorted(int(v) for v in r.smembers(host_set(host)))
    if not job_ids:
        return {}
    pipe = r.pipeline(transaction=True)
    for job_id in job_ids:
        pipe.lrange(key(job_id), 0, -1)
        pipe.delete(key(job_id))
        pipe.srem(host_set(host), job_id)
    answers = pipe.execute()
    drained = {}
    for job_id, values in zip(job_ids, answers[::3]):
        if values:
            drained[job_id] = stats([float(v) for v in values])
    return drained


def point(ts: float, host: str, job_stats: dict) -> dict:
    """A job point holding only requests, for a job not running here any more (its
    last requests, or all of a job shorter than a sample): no utilization, which the
    roll-up leaves out (requests_only)."""
    return {"ts": ts, "kind": "host", "host": host, "util": {}, "mem": {}, "device_mem": None, "host_mem": None,
            "errors": 0, "idle": [], "requests_only": True, **job_stats}
