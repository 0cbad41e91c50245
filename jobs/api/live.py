"""Live metrics JSON (/api/v1/...): the endpoints behind the live charts.

Cursor contract (every `?since=` endpoint): the first call without `since` returns
the history so far (downsampled to at most jobs.metrics.MAX_POINTS points) and a
`cursor`; each later call with `since=<cursor>` returns only the raw points after
it and the next cursor. `reset: true` means points after the cursor were trimmed
away (the client fell more than the stream's length behind) and it should start
again without `since`. Series are columns aligned on `t` (ms since the epoch,
UTC); `util[i]` belongs to `cores[i]`.

Job data is team-scoped through jobs.access.get_job (another team's job is a 404).
Hosts are fleet-wide and visible to every signed-in user, but a core held by
another team's job is shown as held without naming the job.

Responses are built as plain dicts and returned as JsonResponse: the schemas below
document them in OpenAPI, while skipping per-point validation keeps a 32-core ×
600-point response cheap.
"""
from __future__ import annotations

from django.http import Http404, HttpRequest, JsonResponse
from ninja import Router, Schema

from jobs import access
from jobs.api.schemas import ErrorOut
from jobs.live import metrics
from jobs.models import Family, Host

router = Router(tags=["live"])


class JobMetricsOut(Schema):
    job: int
    status: str
    live: bool  # keep polling: the job has not finished
    host: str | None
    replay: bool  # the host streams a recorded file, not live hardware
    requested_cores: int
    kind: str | None  # "neuron" (NeuronCores) or "host" (OS metrics of a CPU host)
    cursor: str | None
    reset: bool
    more: bool  # more raw points are waiting: ask again at once
    source: str  # "stream", "history" (stored minutes) or "mixed"
    resolution_s: float | None  # seconds per point when downsampled
    cores: list[int]
    t: list[int]
    util: list[list[float | None]]  # percent, per core
    device_mem: list[int | None]  # bytes
    host_mem: list[int | None]  # bytes
    lat_p50_ms: list[float | None]
    lat_p99_ms: list[float | None]
    errors: list[int | None]
    completed: list[int | None]


class HostOut(Schema):
    name: str
    family: str
    instance_type: str
    state: str
    backend: str
    replay: bool
    device_count: int
    core_ids: list[int]
    memory_bytes: int
    device_memory_bytes: int
    last_heartbeat: str | None
    heartbeat_age_s: float | None
    cores_allocated: int
    util_mean: float | None  # mean util over its cores in the newest sample (None: no fresh sample)


class HostListOut(Schema):
    hosts: list[HostOut]


class AllocationOut(Schema):
    job: int | None  # None: another team's job
    team: str | None
    since: str


class HostMetricsOut(Schema):
    host: dict
    cursor: str | None
    reset: bool
    more: bool
    resolution_s: float | None
    kind: str | None
    cores: list[int]
    t: list[int]
    util: list[list[float | None]]
    mem: list[list[int | None]]  # device bytes per core
    vcpu_busy: list[float | None]  # percent (user + system)
    host_mem_used: list[int | None]
    host_mem_total: int | None
    ecc: dict[str, int] | None  # cumulative ECC counters summed over devices
    used_by: dict[str, int | None]  # core -> job whose runtime used it in the newest sample
    orphans: list[dict]  # runtimes no job on this host accounts for
    errors: list[str]
    allocations: dict[str, AllocationOut]  # core -> the job holding it (CoreAllocation)


class FleetHostOut(Schema):
    name: str
    family: str
    instance_type: str
    state: str
    replay: bool
    cores: list[int]
    util: list[float | None]  # None: no sample in the last few seconds
    held: list[bool]
    job: list[int | None]
    idle: list[bool]  # held but below 1 % utilization
    orphans: int
    sample_age_s: float | None


class FleetOut(Schema):
    family: str | None
    families: list[str]
    hosts: list[FleetHostOut]


def _bad(field: str, message: str) -> JsonResponse:
    return JsonResponse({"detail": f"{field}: {message}", "errors": {field: [message]}}, status=400)


def _host(name: str) -> Host:
    host = Host.objects.filter(name=name).first()
    if host is None:
        raise Http404("No such host")
    return host


@router.get("/jobs/{dbid:job_id}/metrics", response={200: JobMetricsOut, 400: ErrorOut, 404: ErrorOut},
            url_name="job_metrics", summary="A job's live NeuronCore metrics")
def job_metrics(request: HttpRequest, job_id: int, since: str | None = None):
    """Per-core utilization, device memory, execution latency and errors of a job:
    live points from its stream while it runs, stored per-minute history once the
    stream has moved on."""
    job = access.get_job(request.auth, job_id)
    try:
        return JsonResponse(metrics.job_series(job, since))
    except metrics.BadCursor as exc:
        return _bad("since", str(exc))


@router.get("/hosts", response={200: HostListOut}, url_name="hosts", summary="List hosts")
def hosts(request: HttpRequest):
    """Every registered host with its state, heartbeat, allocated cores and current utilization."""
    return JsonResponse({"hosts": metrics.host_list()})


@router.get("/hosts/{name}/metrics", response={200: HostMetricsOut, 400: ErrorOut, 404: ErrorOut},
            url_name="host_metrics", summary="A host's live per-core metrics")
def host_metrics(request: HttpRequest, name: str, since: str | None = None):
    """Every core of the host (utilization, device memory), who holds and who uses
    each core, vCPU, host memory and ECC counters."""
    host = _host(name)
    try:
        return JsonResponse(metrics.host_series(host, since, request.auth))
    except metrics.BadCursor as exc:
        return _bad("since", str(exc))


@router.get("/fleet", response={200: FleetOut, 400: ErrorOut}, url_name="fleet",
            summary="All hosts × cores, current utilization")
def fleet(request: HttpRequest, family: str = ""):
    """Current utilization of every core of every host (optionally of one family),
    with the cores that are allocated but idle flagged."""
    if family and family not in Family.values:
        return _bad("family", f"unknown family {family!r}; one of {', '.join(Family.values)}")
    return JsonResponse(metrics.fleet(request.auth, family))
