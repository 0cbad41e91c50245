"""Reads for the endpoint pages and the API: endpoints of a team, one endpoint's
replicas (host, cores, state, utilization), its live figures from the gateway's
request stream, the timeline, measured cold starts, its stable URL."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import orjson
import redis as redis_lib
from django.conf import settings
from django.db.models import Count, Q

from jobs.gateway.load import inflight_key, requests_key
from jobs.live.metrics import job_key
from jobs.models import Endpoint, EndpointEvent, EndpointRevision, Replica, Team

STATS_WINDOW_S = 60  # the live figures are over the last minute
STREAM_READ_LIMIT = 20_000  # entries of the request stream read for one figure set
TIMELINE_LIMIT = 100


def public_url(endpoint: Endpoint) -> str:
    """The endpoint's stable OpenAI-compatible base URL (…/v1) on the gateway
    (jobs.gateway, its own process)."""
    return f"{settings.ENDPOINT_GATEWAY_URL}/endpoints/{endpoint.team.slug}/{endpoint.name}/v1"


def endpoints_of(team: Team, *, with_deleted: bool = False) -> list[Endpoint]:
    qs = Endpoint.objects.filter(team=team).select_related("team", "model")
    if not with_deleted:
        qs = qs.exclude(state=Endpoint.State.DELETED)
    return list(qs.annotate(
        ready=Count("replicas", filter=Q(replicas__state=Replica.State.READY)),
        starting=Count("replicas", filter=Q(replicas__state=Replica.State.STARTING)),
    ).order_by("name", "-id"))


def health(endpoint: Endpoint, ready_serving: int) -> str:
    """One word for the list and the page: deleting, idle (scaled to zero), healthy,
    degraded (fewer ready than wanted), down (none ready while some are wanted),
    rolling out."""
    if endpoint.state != Endpoint.State.ACTIVE:
        return endpoint.state
    if endpoint.desired_replicas == 0 and ready_serving == 0:
        return "idle"
    if endpoint.revision != endpoint.serving_revision:
        return "rolling out" if endpoint.serving_revision else "starting"
    if ready_serving == 0:
        return "down"
    return "healthy" if ready_serving >= endpoint.desired_replicas else "degraded"


@dataclass
class ReplicaRow:
    id: int
    job_id: int
    revision: int
    state: str
    host: str | None
    cores: str | None
    url: str
    job_status: str
    reason: str
    created_at: str
    ready_at: str | None
    cold_start_s: float | None
    inflight: int | None
    util_pct: float | None  # mean over its cores of the last live sample

    def as_dict(self) -> dict:
        return asdict(self)


def replica_rows(endpoint: Endpoint, *, include_stopped: int = 10) -> list[ReplicaRow]:
    """The live replicas, then the last `include_stopped` stopped or failed ones."""
    live = list(Replica.objects.filter(endpoint=endpoint, state__in=Replica.ACTIVE)
                .select_related("job", "job__host").order_by("revision", "pk"))
    gone = list(Replica.objects.filter(endpoint=endpoint).exclude(state__in=Replica.ACTIVE)
                .select_related("job", "job__host").order_by("-pk")[:include_stopped])
    inflight, util = _live_figures(endpoint.pk, [r.job_id for r in live])
    rows = []
    for r in live + gone:
        cold = max((r.ready_at - r.created_at).total_seconds(), 0.0) if r.ready_at else None
        rows.append(ReplicaRow(
            r.pk, r.job_id, r.revision, r.state, r.job.host.name if r.job.host else None, r.job.core_range, r.url,
            r.job.status, r.detail or (r.job.reason if r.job.status == "pending" else ""),
            r.created_at.isoformat(), r.ready_at.isoformat() if r.ready_at else None,
            round(cold, 2) if cold is not None else None, inflight.get(str(r.pk)), util.get(r.job_id)))
    return rows


def _live_figures(endpoint_id: int, job_ids: list[int]) -> tuple[dict[str, int], dict[int, float]]:
    """In-flight requests per replica (the gateway's) and each replica job's mean core
    utilization in its last live sample (the host agent's stream). Empty if Redis
    cannot say: the page still shows the rest."""
    from jobs.live import store

    try:
        pipe = store.redis().pipeline(transaction=False)
        pipe.hgetall(inflight_key(endpoint_id))
        for job_id in job_ids:
            pipe.xrevrange(job_key(job_id), count=1)
        results = pipe.execute()
    except redis_lib.RedisError:
        return {}, {}
    counts = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in (results[0] or {}).items()}
    util: dict[int, float] = {}
    for job_id, entries in zip(job_ids, results[1:]):
        if entries:
            point = orjson.loads(entries[0][1][b"d"])
            values = [float(v) for v in (point.get("util") or {}).values() if v is not None]
            if values:
                util[job_id] = round(sum(values) / len(values), 1)
    return counts, util


@dataclass
class Stats:
    window_s: int
    requests: int
    requests_per_s: float
    tokens_per_s: float
    errors: int
    error_rate_pct: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    queue_p50_ms: float | None
    queue_p95_ms: float | None
    inflight: int
    waiting: int

    def as_dict(self) -> dict:
        return asdict(self)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))], 1)


def _num(value: bytes | None) -> float | None:
    try:
        return float(value) if value not in (None, b"") else None
    except ValueError:
        return None


def stats(endpoint_id: int, window_s: int = STATS_WINDOW_S) -> Stats | None:
    """The last `window_s` of the gateway's finished requests: rates, time to first
    token and queue time percentiles, errors (5xx and streams broken mid-way; a
    client that left, 499, is not the endpoint's error). None if Redis cannot say."""
    from jobs.live import store

    try:
        r = store.redis()
        now_ms = int(r.time()[0] * 1000)
        entries = r.xrevrange(requests_key(endpoint_id), min=f"{now_ms - window_s * 1000}-0",
                              count=STREAM_READ_LIMIT)
        counts = r.hgetall(inflight_key(endpoint_id))
    except redis_lib.RedisError:
        return None
    ttft, queue, tokens, errors = [], [], 0.0, 0
    for _, fields in entries:
        status = int(_num(fields.get(b"status")) or 0)
        if status == 0 or status >= 500:
            errors += 1
        if (value := _num(fields.get(b"ttft_ms"))) is not None:
            ttft.append(value)
        if (value := _num(fields.get(b"queue_ms"))) is not None:
            queue.append(value)
        tokens += _num(fields.get(b"tokens")) or 0.0
    counts = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in (counts or {}).items()}
    n = len(entries)
    return Stats(window_s, n, round(n / window_s, 2), round(tokens / window_s, 1), errors,
                 round(100.0 * errors / n, 1) if n else 0.0, _pct(ttft, 0.5), _pct(ttft, 0.95), _pct(queue, 0.5),
                 _pct(queue, 0.95), sum(v for k, v in counts.items() if k.isdigit() and v > 0),
                 max(counts.get("waiting", 0), 0))


def cold_starts(endpoint: Endpoint, last: int = 20) -> dict:
    """Measured cold starts of the endpoint's recent replicas: from asking for the
    replica to its server answering (queue wait for cores included), median and
    worst; and the part spent starting the server alone."""
    rows = list(EndpointEvent.objects.filter(endpoint=endpoint, kind="replica_ready")
                .order_by("-at")[:last].values_list("data", flat=True))
    total = sorted(d["cold_start_s"] for d in rows if d.get("cold_start_s") is not None)
    load = sorted(d["load_s"] for d in rows if d.get("load_s") is not None)
    return {"count": len(total), "median_s": total[len(total) // 2] if total else None,
            "max_s": total[-1] if total else None, "load_median_s": load[len(load) // 2] if load else None}


def timeline(endpoint: Endpoint, limit: int = TIMELINE_LIMIT) -> list[EndpointEvent]:
    return list(EndpointEvent.objects.filter(endpoint=endpoint).select_related("actor").order_by("-at", "-id")[:limit])


def revisions(endpoint: Endpoint) -> list[EndpointRevision]:
    return list(EndpointRevision.objects.filter(endpoint=endpoint).select_related("model").order_by("-number")[:20])
