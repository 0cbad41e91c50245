"""Live metric streams in Redis, their cursor reads, the per-minute roll-up into
MetricMinute and pruning (DESIGN.md §5).

Streams (bounded with approximate MAXLEN = settings.METRICS_STREAM_MAXLEN, i.e.
about an hour of 1 s samples), one field "d" holding compact JSON:

* ``nd:m:host:<name>`` — one *host point* per report::

      {"ts": float,                     # sample time, unix seconds
       "kind": "neuron" | "host",       # "host" = OS metrics (no Neuron devices)
       "util": {"<core>": float},       # percent; NeuronCores, or CPU job slots
       "mem": {"<core>": int},          # device bytes per NeuronCore (absent on CPU hosts)
       "job": {"<core>": int},          # the job whose runtime used the core in this sample
       "vcpu": {"user", "system", "idle"} | None, "host_mem": {"total", "used"} | None,
       "ecc": {...} | None,             # cumulative ECC counters summed over devices
       "orphans": [{"tag", "pid", "job_id", "cores", "reason"}],  # unattributed runtimes
       "idle": {"<job>": [cores]},      # allocated cores with 0 util
       "errors": [str], "replay": True}  # replay only when replayed

* ``nd:m:job:<id>`` — one *job point* per report while the job runs on a host::

      {"ts", "kind", "host": name,
       "util": {"<core>": float}, "mem": {"<core>": int},
       "device_mem": int | None, "host_mem": int | None,   # bytes
       "lat_p50": float | None, "lat_p99": float | None,   # seconds
       "completed": int, "errors": int, "idle": [cores], "replay": True}

A stream entry id is "<ms>-<seq>" where <ms> is Redis's clock at XADD time; ids
only grow, which is what makes the roll-up exact (see `rollup`).

Reads return *columns* (one list per series, cores in a fixed order) so the
browser can hand them to Plotly.extendTraces as they are.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

import orjson
from django.conf import settings
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from jobs.live.store import redis
from jobs.models import CoreAllocation, Host, Job, MetricMinute

HOST_PREFIX = "nd:m:host:"
JOB_PREFIX = "nd:m:job:"
ROLLUP_CURSORS = "nd:m:rollup"  # hash: stream key -> ms up to which it is rolled up
ROLLUP_LOCK = "nd:m:rollup:lock"
MAX_POINTS = 600  # a chart's initial series is downsampled to at most this many points
MAX_SINCE_POINTS = 1000  # at most this many raw points per cursor read
FRESH_S = 10.0  # a host's last sample older than this is "no data" on the fleet view
IDLE_UTIL = 1.0  # percent: an allocated core below this is "allocated but idle"
MINUTE_MS = 60_000
_MAX_SEQ = 18446744073709551615  # largest sequence part of a stream id


def host_key(name: str) -> str:
    return HOST_PREFIX + name


def job_key(job_id: int) -> str:
    return f"{JOB_PREFIX}{job_id}"


def _dumps(value: Any) -> bytes:
    # Non-str keys: attribute()'s idle_allocated is keyed by int job id (json.dumps
    # would turn those into strings too, which is what readers expect).
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


_loads = orjson.loads


# --- building points from a sample (pure) ------------------------------------------

def host_point(sample: dict, attribution: dict | None, slot_util: dict[str, float] | None = None) -> dict:
    """The host point of one sample (reader Report + `attribute()` result).

    `slot_util` replaces per-core util on CPU hosts, where "cores" are job slots
    and their use is measured per job process (see the agent)."""
    cores = sample["cores"]
    point: dict[str, Any] = {
        "ts": sample["ts"],
        "kind": sample["kind"],
        "util": slot_util if slot_util is not None else {k: c["util"] for k, c in cores.items()},
        "mem": {k: c["mem"] for k, c in cores.items() if c["mem"] is not None},
        "job": {},
        "vcpu": sample["vcpu"],
        "host_mem": sample["mem"],
        "ecc": sample["ecc"],
        "orphans": [],
        "idle": {},
        "errors": sample["errors"],
    }
    if attribution:
        point["job"] = {core: job_id for job_id, usage in attribution["by_job"].items() for core in usage["cores"]}
        point["orphans"] = attribution["unattributed"]
        point["idle"] = attribution["idle_allocated"]
    if sample.get("replay"):
        point["replay"] = True
    return point


def job_points(sample: dict, attribution: dict, placements: Iterable, host: str) -> dict[int, dict]:
    """One point per job placed on the host (reader JobPlacement list), also for a
    job none of whose runtimes is visible yet: its assigned cores then read 0 %,
    which is exactly "allocated but idle"."""
    points: dict[int, dict] = {}
    by_job, idle = attribution["by_job"], attribution["idle_allocated"]
    for placement in placements:
        usage = by_job.get(placement.job_id)
        used = usage["cores"] if usage else {}
        util = {str(c): 0.0 for c in placement.cores}
        mem: dict[str, int] = {}
        for key, core in used.items():
            util[key] = core["util"]
            if core["mem"] is not None:
                mem[key] = core["mem"]
        point = {
            "ts": sample["ts"], "kind": sample["kind"], "host": host, "util": util, "mem": mem,
            "device_mem": usage["device_mem"] if usage else None,
            "host_mem": usage["host_mem"] if usage else None,
            "lat_p50": usage["lat_p50"] if usage else None,
            "lat_p99": usage["lat_p99"] if usage else None,
            "completed": usage["completed"] if usage else 0,
            "errors": usage["errors"] if usage else 0,
            "idle": idle.get(placement.job_id, []),
        }
        if sample.get("replay"):
            point["replay"] = True
        points[placement.job_id] = point
    return points


# --- publishing ---------------------------------------------------------------------

def publish(host: str, host_pt: dict, job_pts: dict[int, dict], r=None) -> list[bytes]:
    """XADD the host point and every job point in one pipeline (one round trip).
    Returns the new entry ids, host first."""
    pipe = (r or redis()).pipeline(transaction=False)
    maxlen = settings.METRICS_STREAM_MAXLEN
    # XADD <key> MAXLEN ~ <n> * d <json>, issued directly: this runs for every
    # report of every host, and the xadd() wrapper only rebuilds the same arguments.
    pipe.execute_command("XADD", host_key(host), "MAXLEN", "~", maxlen, "*", "d", _dumps(host_pt))
    for job_id, point in job_pts.items():
        pipe.execute_command("XADD", job_key(job_id), "MAXLEN", "~", maxlen, "*", "d", _dumps(point))
    return pipe.execute()


# --- cursors ------------------------------------------------------------------------

class BadCursor(ValueError):
    """`since` is not a stream id ("<ms>-<seq>" or "<ms>")."""


def parse_cursor(since: str) -> tuple[int, int]:
    ms, _, seq = since.partition("-")
    try:
        parsed = int(ms), int(seq or 0)
    except ValueError:
        raise BadCursor(f"not a stream id like 1700000000000-0: {since!r}") from None
    if not (0 <= parsed[0] < 2**64 and 0 <= parsed[1] < 2**64):  # Redis stream ids are two 64-bit numbers
        raise BadCursor(f"not a stream id like 1700000000000-0: {since[:40]!r}")
    return parsed


def _id_str(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def _id_ms(entry_id: bytes | str) -> int:
    return int(_id_str(entry_id).partition("-")[0])


@dataclass
class StreamRead:
    """Entries of one stream for a cursor read: decoded points, the cursor to ask
    from next time, and whether entries after `since` were trimmed away."""

    points: list[dict]
    cursor: str | None
    reset: bool = False
    more: bool = False


def read_stream(key: str, since: str | None, *, initial: int | None = None, r=None) -> StreamRead:
    """Points of `key` after `since` (exclusive), oldest first.

    Without `since`: the newest `initial` points (default: the whole bounded
    stream). `reset` is True when `since` is older than the stream's first entry
    by more than one entry, i.e. points the client never saw were trimmed; the
    client should then reload instead of extending."""
    r = r or redis()
    if since is None:
        raw = r.xrevrange(key, "+", "-", count=initial or settings.METRICS_STREAM_MAXLEN * 2)
        raw.reverse()
        return StreamRead([_loads(f[b"d"]) for _, f in raw], _id_str(raw[-1][0]) if raw else "0-0")
    ms, seq = parse_cursor(since)
    pipe = r.pipeline(transaction=False)
    pipe.xrange(key, f"({ms}-{seq}", "+", count=MAX_SINCE_POINTS)
    pipe.xrange(key, "-", "+", count=1)
    raw, first = pipe.execute()
    # The client's last entry is gone from the front of the stream: entries it never
    # saw may have been trimmed with it (a client more than MAXLEN points behind).
    reset = bool(first) and (ms, seq) != (0, 0) and parse_cursor(_id_str(first[0][0])) > (ms, seq)
    return StreamRead([_loads(f[b"d"]) for _, f in raw], _id_str(raw[-1][0]) if raw else since,
                      reset=reset, more=len(raw) == MAX_SINCE_POINTS)


# --- columns for charts -------------------------------------------------------------

def _core_order(cores: Iterable[str | int]) -> list[str]:
    return sorted({str(c) for c in cores}, key=int)


@dataclass
class JobColumns:
    """A job's series, aligned on `t` (ms since the epoch); util/mem by core."""

    cores: list[str]
    t: list[int] = field(default_factory=list)
    util: list[list[float | None]] = field(default_factory=list)
    device_mem: list[int | None] = field(default_factory=list)
    host_mem: list[int | None] = field(default_factory=list)
    lat_p50_ms: list[float | None] = field(default_factory=list)
    lat_p99_ms: list[float | None] = field(default_factory=list)
    errors: list[int | None] = field(default_factory=list)
    completed: list[int | None] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"cores": [int(c) for c in self.cores], "t": self.t, "util": self.util,
                "device_mem": self.device_mem, "host_mem": self.host_mem, "lat_p50_ms": self.lat_p50_ms,
                "lat_p99_ms": self.lat_p99_ms, "errors": self.errors, "completed": self.completed}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def job_columns(points: list[dict], cores: Iterable[int | str]) -> JobColumns:
    """Columns of raw job points. Cores: `cores` plus any core a point reports."""
    order = _core_order([*cores, *(k for p in points for k in p["util"])])
    cols = JobColumns(order, util=[[] for _ in order])
    for p in points:
        cols.t.append(int(p["ts"] * 1000))
        util, mem = p["util"], p["mem"]
        for i, core in enumerate(order):
            cols.util[i].append(util.get(core))
        device = p["device_mem"]
        cols.device_mem.append(device if device is not None else (sum(mem.values()) if mem else None))
        cols.host_mem.append(p["host_mem"])
        cols.lat_p50_ms.append(_ms(p["lat_p50"]))
        cols.lat_p99_ms.append(_ms(p["lat_p99"]))
        cols.errors.append(p["errors"])
        cols.completed.append(p["completed"])
    return cols


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 2) if present else None


def _peak(values: list):
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _total(values: list):
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def downsample(cols: JobColumns, max_points: int = MAX_POINTS) -> tuple[JobColumns, float | None]:
    """At most `max_points` points: consecutive points are grouped; util and p50
    become the group mean, memory and p99 the group peak, counts the group sum.
    Returns the columns and the resulting resolution in seconds (None if kept)."""
    n = len(cols.t)
    if n <= max_points:
        return cols, None
    size = math.ceil(n / max_points)
    out = JobColumns(cols.cores, util=[[] for _ in cols.cores])
    for start in range(0, n, size):
        end = start + size
        out.t.append(cols.t[start])
        for i, series in enumerate(cols.util):
            out.util[i].append(_mean(series[start:end]))
        out.device_mem.append(_peak(cols.device_mem[start:end]))
        out.host_mem.append(_peak(cols.host_mem[start:end]))
        out.lat_p50_ms.append(_mean(cols.lat_p50_ms[start:end]))
        out.lat_p99_ms.append(_peak(cols.lat_p99_ms[start:end]))
        out.errors.append(_total(cols.errors[start:end]))
        out.completed.append(_total(cols.completed[start:end]))
    span_s = (cols.t[-1] - cols.t[0]) / 1000.0
    return out, round(span_s / max(n - 1, 1) * size, 1)


def minute_columns(rows: Iterable[MetricMinute], cores: Iterable[int | str]) -> JobColumns:
    """Columns of a job's stored MetricMinute rows (one point per minute; util =
    the minute's mean, memory its peak, latency p50 mean / p99 peak)."""
    rows = list(rows)
    order = _core_order([*cores, *(r.core for r in rows if r.core >= 0)])
    index = {core: i for i, core in enumerate(order)}
    minutes = sorted({r.minute for r in rows})
    at = {m: i for i, m in enumerate(minutes)}
    cols = JobColumns(order, t=[int(m.timestamp() * 1000) for m in minutes],
                      util=[[None] * len(minutes) for _ in order])
    for name in ("device_mem", "host_mem", "lat_p50_ms", "lat_p99_ms", "errors", "completed"):
        setattr(cols, name, [None] * len(minutes))
    for row in rows:
        i = at[row.minute]
        if row.core >= 0:
            cols.util[index[str(row.core)]][i] = row.util_mean
        else:
            cols.device_mem[i] = row.mem_bytes
            cols.lat_p50_ms[i] = _ms(row.lat_p50)
            cols.lat_p99_ms[i] = _ms(row.lat_p99)
            cols.errors[i] = row.errors
    return cols


def _core_column(cols: JobColumns, core: str) -> list:
    return list(cols.util[cols.cores.index(core)]) if core in cols.cores else [None] * len(cols.t)


def _concat(a: JobColumns, b: JobColumns) -> JobColumns:
    """`a` then `b`, re-aligned on the union of their cores."""
    order = _core_order([*a.cores, *b.cores])
    out = JobColumns(order, t=a.t + b.t, util=[_core_column(a, c) + _core_column(b, c) for c in order])
    for name in ("device_mem", "host_mem", "lat_p50_ms", "lat_p99_ms", "errors", "completed"):
        setattr(out, name, getattr(a, name) + getattr(b, name))
    return out


# --- job series (the job chart endpoint) -------------------------------------------

_END_SLACK_S = 2.0  # a sample stamped this soon after a job's end may still be its own


def _within_run(job: Job, points: list[dict]) -> list[dict]:
    """Points of a finished job up to its end. An agent re-reads its host's jobs
    every few seconds, so it may publish a few 0 % points for a job that has just
    finished; they are not the job's."""
    if job.finished_at is None:
        return points
    end = job.finished_at.timestamp() + _END_SLACK_S
    return [p for p in points if p["ts"] <= end]


GANG_WINDOW_POINTS = 300  # a gang's per-host chart: its hosts' last five minutes of 1 s samples


@dataclass
class RankCores:
    """One host of a gang: its rank, host name and the cores its rank holds there."""

    rank: int
    host: str
    cores: list[int]


def gang_host_util(ranks: list[RankCores], start_ms: int, end_ms: int | None = None, r=None) -> list[dict]:
    """Each gang host's utilization of the rank's own cores (NeuronCores; job slots on a
    CPU host), the mean over those cores per sample, from the hosts' streams between
    `start_ms` (the attempt's start) and `end_ms` (its end; None: now), the last
    GANG_WINDOW_POINTS samples of each: [{"rank", "host", "cores", "t": [ms], "util":
    [percent], "now": percent or None}] in rank order. "now" is the latest sample's,
    None unless the host reported within FRESH_S (and the attempt has not ended).
    One round trip for every host. A job's own stream holds rank 0's host only: the
    other hosts' samples are read here from their host streams."""
    pipe = (r or redis()).pipeline(transaction=False)
    upper = str(end_ms) if end_ms is not None else "+"
    for rank in ranks:
        pipe.xrevrange(host_key(rank.host), upper, str(start_ms), count=GANG_WINDOW_POINTS)
    now = time.time()
    rows = []
    for rank, raw in zip(ranks, pipe.execute()):
        points = [_loads(fields[b"d"]) for _, fields in reversed(raw)]
        keys = [str(core) for core in rank.cores]
        # neuron-monitor lists only the cores in use, so a core missing from a point was idle.
        util = [round(sum(p["util"].get(key, 0.0) for key in keys) / len(keys), 2) if keys else None
                for p in points]
        fresh = end_ms is None and points and now - points[-1]["ts"] <= FRESH_S
        rows.append({"rank": rank.rank, "host": rank.host, "cores": len(keys),
                     "t": [int(p["ts"] * 1000) for p in points], "util": util,
                     "now": util[-1] if fresh else None})
    return rows


def job_series(job: Job, since: str | None) -> dict:
    """What the job charts draw. Without `since`: the whole history, downsampled to
    at most MAX_POINTS (stored minutes before the live stream, then the stream);
    with `since`: the raw points after that cursor. `live` says whether to keep
    polling (the job may still produce points)."""
    live = not job.is_finished  # a pending job's charts start by themselves once it runs
    base = {"job": job.pk, "status": job.status, "live": live, "host": job.host.name if job.host else None,
            "replay": bool(job.host and job.host.replay), "requested_cores": job.cores}
    key = job_key(job.pk)
    if since is not None:
        read = read_stream(key, since)
        cols = job_columns(_within_run(job, read.points), job.core_list)
        return {**base, **cols.as_dict(), "cursor": read.cursor, "reset": read.reset, "more": read.more,
                "source": "stream", "resolution_s": None, "kind": _kind(read.points)}
    read = read_stream(key, None)
    cols = job_columns(_within_run(job, read.points), job.core_list)
    first_ms = cols.t[0] if cols.t else None
    rows = MetricMinute.objects.filter(job=job).order_by("minute", "core")
    if first_ms is not None:
        # Minutes that end before the first live point: the stream covers the rest.
        rows = rows.filter(minute__lte=_dt(first_ms - MINUTE_MS))
    history = minute_columns(rows, job.core_list)
    source = "stream" if not history.t else ("history" if not cols.t else "mixed")
    merged = _concat(history, cols) if history.t else cols
    merged, resolution = downsample(merged)
    if resolution is None and history.t:
        resolution = 60.0
    return {**base, **merged.as_dict(), "cursor": read.cursor, "reset": False, "more": False,
            "source": source, "resolution_s": resolution, "kind": _kind(read.points)}


def _kind(points: list[dict]) -> str | None:
    return points[-1]["kind"] if points else None


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000.0, tz=dt_timezone.utc)


# --- host series, hosts and fleet --------------------------------------------------

def _visible_team_ids(user) -> set[int] | None:
    """Team ids whose jobs `user` may see named; None = all (staff)."""
    if user.is_staff:
        return None
    from jobs.access import teams_of

    return set(teams_of(user).values_list("pk", flat=True))


def allocations(hosts: Iterable[Host], user) -> dict[int, dict[str, dict]]:
    """host id -> core -> who holds it: {"job": id | None, "team": slug | None,
    "since": iso}. Another team's job is shown as held, without naming it."""
    visible = _visible_team_ids(user)
    held: dict[int, dict[str, dict]] = {}
    rows = (CoreAllocation.objects.filter(host__in=list(hosts))
            .values_list("host_id", "core", "job_id", "team_id", "team__slug", "since"))
    for host_id, core, job_id, team_id, slug, since in rows:
        mine = visible is None or team_id in visible
        held.setdefault(host_id, {})[str(core)] = {"job": job_id if mine else None, "team": slug if mine else None,
                                                   "since": since.isoformat()}
    return held


def host_info(host: Host, now: datetime | None = None) -> dict:
    now = now or timezone.now()
    age = (now - host.last_heartbeat).total_seconds() if host.last_heartbeat else None
    return {
        "name": host.name, "family": host.family, "instance_type": host.instance_type, "state": host.state,
        "backend": host.backend, "replay": host.replay, "device_count": host.device_count,
        "core_ids": host.core_ids, "memory_bytes": host.memory_bytes, "device_memory_bytes": host.device_memory_bytes,
        "last_heartbeat": host.last_heartbeat.isoformat() if host.last_heartbeat else None,
        "heartbeat_age_s": round(age, 1) if age is not None else None,
    }


def host_series(host: Host, since: str | None, user) -> dict:
    """What the host page draws: per-core util and memory over time, vCPU and host
    memory over time, the latest ECC counters, orphans and per-core jobs, and
    which job holds which core (CoreAllocation)."""
    read = read_stream(host_key(host.name), since)
    points = read.points
    order = _core_order([*host.core_ids, *(k for p in points for k in p["util"])])
    t = [int(p["ts"] * 1000) for p in points]
    # neuron-monitor lists only the cores in use, so a core missing from a point was idle.
    util = [[p["util"].get(c, 0.0) for p in points] for c in order]
    mem = [[p["mem"].get(c) for p in points] for c in order]
    vcpu = [round(p["vcpu"]["user"] + p["vcpu"]["system"], 2) if p["vcpu"] else None for p in points]
    host_mem = [p["host_mem"]["used"] if p["host_mem"] else None for p in points]
    resolution = None
    if since is None and len(t) > MAX_POINTS:
        size = math.ceil(len(t) / MAX_POINTS)
        resolution = round((t[-1] - t[0]) / 1000.0 / max(len(t) - 1, 1) * size, 1)
        t = t[::size]
        util = [[_mean(s[i:i + size]) for i in range(0, len(s), size)] for s in util]
        mem = [[_peak(s[i:i + size]) for i in range(0, len(s), size)] for s in mem]
        vcpu = [_mean(vcpu[i:i + size]) for i in range(0, len(vcpu), size)]
        host_mem = [_peak(host_mem[i:i + size]) for i in range(0, len(host_mem), size)]
    latest = points[-1] if points else None
    visible = _visible_team_ids(user)
    return {
        "host": host_info(host), "cursor": read.cursor, "reset": read.reset, "more": read.more,
        "resolution_s": resolution, "cores": [int(c) for c in order], "t": t, "util": util, "mem": mem,
        "vcpu_busy": vcpu, "host_mem_used": host_mem,
        "host_mem_total": (latest["host_mem"] or {}).get("total") if latest else None,
        "ecc": latest["ecc"] if latest else None,
        "kind": latest["kind"] if latest else None,
        "used_by": _named_jobs(latest["job"], visible) if latest else {},
        "orphans": latest["orphans"] if latest else [],
        "errors": latest["errors"] if latest else [],
        "allocations": allocations([host], user).get(host.pk, {}),
    }


def _named_jobs(used: dict[str, int], visible: set[int] | None) -> dict[str, int | None]:
    """core -> job id for jobs the user may see; None for another team's job."""
    if visible is None or not used:
        return used
    mine = set(Job.objects.filter(pk__in=set(used.values()), team_id__in=visible).values_list("pk", flat=True))
    return {core: job if job in mine else None for core, job in used.items()}


def latest_points(hosts: list[Host], r=None) -> dict[int, dict | None]:
    """host id -> its newest host point (or None), in one pipeline."""
    pipe = (r or redis()).pipeline(transaction=False)
    for host in hosts:
        pipe.xrevrange(host_key(host.name), "+", "-", count=1)
    return {host.pk: (_loads(raw[0][1][b"d"]) if raw else None) for host, raw in zip(hosts, pipe.execute())}


def _fresh_util(host: Host, point: dict | None, now: float) -> list[float] | None:
    """Util of each of the host's cores in its newest point, None if that is stale."""
    if point is None or now - point["ts"] > FRESH_S:
        return None
    return [point["util"].get(str(c), 0.0) for c in host.core_ids]


def host_list() -> list[dict]:
    """Every host with its heartbeat, allocated core count and current mean util."""
    hosts = list(Host.objects.all())
    latest = latest_points(hosts) if hosts else {}
    held = dict(CoreAllocation.objects.values("host_id").annotate(n=Count("id")).values_list("host_id", "n"))
    now, wall = timezone.now(), time.time()
    out = []
    for host in hosts:
        util = _fresh_util(host, latest.get(host.pk), wall)
        out.append({**host_info(host, now), "cores_allocated": held.get(host.pk, 0),
                    "util_mean": round(sum(util) / len(util), 1) if util else None})
    return out


def fleet(user, family: str = "") -> dict:
    """Every host × core with its current util (None when the host's newest point
    is older than FRESH_S), the job holding it, and allocated-but-idle flags."""
    hosts = list(Host.objects.all() if not family else Host.objects.filter(family=family))
    latest = latest_points(hosts) if hosts else {}
    held = allocations(hosts, user)
    now = time.time()
    rows = []
    for host in hosts:
        point = latest.get(host.pk)
        fresh = _fresh_util(host, point, now)
        cores = [str(c) for c in host.core_ids]
        util = fresh if fresh is not None else [None] * len(cores)
        alloc = held.get(host.pk, {})
        rows.append({
            **host_info(host), "cores": [int(c) for c in cores], "util": util,
            "held": [c in alloc for c in cores],
            "job": [alloc[c]["job"] if c in alloc else None for c in cores],
            "idle": [c in alloc and u is not None and u < IDLE_UTIL for c, u in zip(cores, util)],
            "orphans": len(point["orphans"]) if fresh is not None else 0,
            "sample_age_s": round(now - point["ts"], 1) if point else None,
        })
    families = sorted(set(Host.objects.values_list("family", flat=True)))
    return {"family": family or None, "families": families, "hosts": rows}


# --- roll-up ------------------------------------------------------------------------

@dataclass
class RollupReport:
    streams: int = 0
    entries: int = 0
    rows: int = 0
    skipped: str = ""


class _Acc:
    """Running aggregate of one MetricMinute row."""

    __slots__ = ("n", "util_sum", "util_peak", "mem", "p50_sum", "p50_n", "p99", "errors")

    def __init__(self) -> None:
        self.n = 0
        self.util_sum = 0.0
        self.util_peak = 0.0
        self.mem = 0
        self.p50_sum = 0.0
        self.p50_n = 0
        self.p99: float | None = None
        self.errors = 0


class _Minute:
    """The rows of one (host, job or None, minute): per-core accumulators
    [samples, util sum, util peak, memory peak] by core key, and the whole row
    (core -1). Lists and string keys keep the per-core step cheap: a trn1.32xlarge
    report adds 32 host cores and 4 × 8 job cores."""

    __slots__ = ("cores", "whole")

    def __init__(self) -> None:
        self.cores: dict[str, list] = {}
        self.whole = _Acc()


def _minute(table: dict, key: tuple) -> _Minute:
    group = table.get(key)
    if group is None:
        group = table[key] = _Minute()
    return group


def _add_cores(cores: dict[str, list], util: dict[str, float], mem: dict[str, int]) -> None:
    for core, value in util.items():
        acc = cores.get(core)
        peak_mem = mem.get(core)
        if acc is None:
            cores[core] = [1, value, value, peak_mem or 0]
            continue
        acc[0] += 1
        acc[1] += value
        if value > acc[2]:
            acc[2] = value
        if peak_mem is not None and peak_mem > acc[3]:
            acc[3] = peak_mem


def _add_util(acc: _Acc, util: float, mem: int | None) -> None:
    acc.n += 1
    acc.util_sum += util
    if util > acc.util_peak:
        acc.util_peak = util
    if mem is not None and mem > acc.mem:
        acc.mem = mem


def _add_job_entry(table: dict, host_id: int, job_id: int, minute: int, point: dict) -> None:
    util, mem = point["util"], point["mem"]
    group = _minute(table, (host_id, job_id, minute))
    _add_cores(group.cores, util, mem)
    job = group.whole
    device = point["device_mem"] if point["device_mem"] is not None else (sum(mem.values()) if mem else None)
    if not point.get("requests_only"):  # jobs.live.requests.point: no utilization sample
        _add_util(job, sum(util.values()) / len(util) if util else 0.0, device)
    if point["lat_p50"] is not None:
        job.p50_sum += point["lat_p50"]
        job.p50_n += 1
    if point["lat_p99"] is not None and (job.p99 is None or point["lat_p99"] > job.p99):
        job.p99 = point["lat_p99"]
    job.errors += point["errors"]


def _add_host_entry(table: dict, host_id: int, minute: int, point: dict) -> None:
    group = _minute(table, (host_id, None, minute))
    _add_cores(group.cores, point["util"], point["mem"])
    vcpu, host_mem, ecc = point["vcpu"], point["host_mem"], point["ecc"]
    _add_util(group.whole, (vcpu["user"] + vcpu["system"]) if vcpu else 0.0, host_mem["used"] if host_mem else None)
    if ecc:
        # ECC counters are cumulative (hardware_ecc_events_total): keep the newest, not a sum.
        group.whole.errors = max(group.whole.errors, sum(ecc.values()))


def _rows(table: dict) -> tuple[list[MetricMinute], list[MetricMinute]]:
    job_rows, host_rows = [], []
    for (host_id, job_id, minute), group in table.items():
        at = _dt(minute)
        out = host_rows if job_id is None else job_rows
        for core, (n, total, peak, mem) in group.cores.items():
            out.append(MetricMinute(host_id=host_id, job_id=job_id, minute=at, core=int(core),
                                    util_mean=round(total / n, 3), util_peak=peak, mem_bytes=mem, samples=n))
        acc = group.whole
        out.append(MetricMinute(
            host_id=host_id, job_id=job_id, minute=at, core=-1,
            util_mean=round(acc.util_sum / acc.n, 3) if acc.n else 0.0, util_peak=acc.util_peak,
            mem_bytes=acc.mem, lat_p50=acc.p50_sum / acc.p50_n if acc.p50_n else None, lat_p99=acc.p99,
            errors=acc.errors, samples=acc.n,
        ))
    return job_rows, host_rows


_UPDATE_FIELDS = ["util_mean", "util_peak", "mem_bytes", "lat_p50", "lat_p99", "errors", "samples"]


def _write(job_rows: list[MetricMinute], host_rows: list[MetricMinute]) -> None:
    """Upsert the rows. Every row covers a whole minute (see `rollup`), so writing it
    again replaces it with the same values: a repeated run cannot double-count."""
    with transaction.atomic():
        MetricMinute.objects.bulk_create(
            job_rows, batch_size=2000, update_conflicts=True,
            unique_fields=["host", "job", "minute", "core"], update_fields=_UPDATE_FIELDS)
        if host_rows:
            # job IS NULL never conflicts in a plain unique index (NULLs are distinct,
            # also in SQLite), so host rows are replaced: delete the minutes, insert.
            MetricMinute.objects.filter(job__isnull=True, host_id__in={r.host_id for r in host_rows},
                                        minute__in={r.minute for r in host_rows}).delete()
            MetricMinute.objects.bulk_create(host_rows, batch_size=2000)


def redis_ms(r=None) -> int:
    """Redis's clock in ms: stream ids are made from it, so it is the clock that
    decides which minutes are complete."""
    seconds, micros = (r or redis()).time()
    return seconds * 1000 + micros // 1000


def stream_keys(r=None) -> list[bytes]:
    return list((r or redis()).scan_iter(match="nd:m:[hj]*", count=1000, _type="STREAM"))


def rollup(upto_ms: int | None = None, r=None, chunk: int = 200) -> RollupReport:
    """Aggregate every stream's entries of complete minutes into MetricMinute.

    For each stream, entries with ids in [cursor, upto) are read, where `upto` is
    the start of the current minute on Redis's clock and the cursor (kept in the
    hash ROLLUP_CURSORS) is where the previous run stopped. Stream ids only grow
    with Redis's clock, so no entry can still arrive for a minute before `upto`:
    each minute is aggregated once, from all its entries, and the cursor moves to
    `upto` after the rows are committed. A run that dies between the commit and
    the cursor update is repeated later and writes identical rows (upserts), so
    every entry is counted exactly once. A lock keeps runs from overlapping."""
    r = r or redis()
    lock = r.lock(ROLLUP_LOCK, timeout=600, blocking=False)
    if not lock.acquire():
        return RollupReport(skipped="another roll-up is running")
    try:
        return _rollup(r, upto_ms if upto_ms is not None else redis_ms(r) // MINUTE_MS * MINUTE_MS, chunk)
    finally:
        try:
            lock.release()
        except Exception:  # expired: the next run takes over; nothing to undo
            pass


def _rollup(r, upto: int, chunk: int) -> RollupReport:
    report = RollupReport()
    cursors = {k: int(v) for k, v in r.hgetall(ROLLUP_CURSORS).items()}
    keys = [k for k in stream_keys(r) if cursors.get(k, 0) < upto]
    hosts = dict(Host.objects.values_list("name", "pk"))
    job_ids = {int(k[len(JOB_PREFIX):]) for k in keys if k.startswith(JOB_PREFIX.encode())}
    # job id -> the latest sample time that is still the job's (its end + slack), or inf.
    jobs = {pk: (end.timestamp() + _END_SLACK_S if end else math.inf)
            for pk, end in Job.objects.filter(pk__in=job_ids).values_list("pk", "finished_at")} if job_ids else {}
    table: dict[tuple, _Minute] = {}
    done: dict[bytes, int] = {}
    for start in range(0, len(keys), chunk):
        batch = keys[start:start + chunk]
        pipe = r.pipeline(transaction=False)
        for key in batch:
            begin = cursors.get(key)
            pipe.xrange(key, f"{begin}-0" if begin else "-", f"{upto - 1}-{_MAX_SEQ}")
        for key, entries in zip(batch, pipe.execute()):
            report.entries += _absorb(table, key, entries, hosts, jobs)
            done[key] = upto
    job_rows, host_rows = _rows(table)
    _write(job_rows, host_rows)
    if done:
        r.hset(ROLLUP_CURSORS, mapping=done)
    report.streams, report.rows = len(done), len(job_rows) + len(host_rows)
    return report


def _absorb(table: dict, key: bytes, entries: list, hosts: dict[str, int], jobs: dict[int, float]) -> int:
    """Fold one stream's entries into `table`; entries of unknown hosts or deleted
    jobs are skipped (nothing to attach their rows to), and so are a finished job's
    points stamped after its end (see `_within_run`)."""
    name = key.decode()
    if name.startswith(HOST_PREFIX):
        host_id = hosts.get(name[len(HOST_PREFIX):])
        if host_id is None:
            return 0
        for entry_id, fields in entries:
            _add_host_entry(table, host_id, _id_ms(entry_id) // MINUTE_MS * MINUTE_MS, _loads(fields[b"d"]))
        return len(entries)
    job_id = int(name[len(JOB_PREFIX):])
    end = jobs.get(job_id)
    if end is None:
        return 0
    for entry_id, fields in entries:
        point = _loads(fields[b"d"])
        host_id = hosts.get(point["host"])
        if host_id is not None and point["ts"] <= end:
            _add_job_entry(table, host_id, job_id, _id_ms(entry_id) // MINUTE_MS * MINUTE_MS, point)
    return len(entries)


# --- pruning ------------------------------------------------------------------------

@dataclass
class PruneReport:
    deleted: list[str] = field(default_factory=list)
    trimmed: int = 0


def prune(r=None, keep_s: int | None = None, finished_grace_s: int = 600) -> PruneReport:
    """Drop raw data that the roll-up has already absorbed.

    * the stream of a job that finished more than `finished_grace_s` ago (or was
      deleted), once its last entry is rolled up: the job page then draws the
      stored minutes;
    * the stream of a host that is no longer registered, likewise;
    * entries older than `keep_s` (default: one hour per MAXLEN of 1 s samples)
      that are rolled up, from every other stream (XTRIM MINID).
    Never removes an entry the roll-up has not counted."""
    r = r or redis()
    keep_s = settings.METRICS_STREAM_MAXLEN if keep_s is None else keep_s
    rollup(r=r)
    report = PruneReport()
    cursors = {k: int(v) for k, v in r.hgetall(ROLLUP_CURSORS).items()}
    keys = stream_keys(r)
    gone = _finished_streams(keys, finished_grace_s)
    cutoff = redis_ms(r) - keep_s * 1000
    for key in keys:
        cursor = cursors.get(key, 0)
        last = r.xrevrange(key, "+", "-", count=1)
        if key in gone and (not last or _id_ms(last[0][0]) < cursor):
            r.delete(key)
            r.hdel(ROLLUP_CURSORS, key)
            report.deleted.append(key.decode())
        elif min(cursor, cutoff) > 0:
            report.trimmed += r.xtrim(key, minid=f"{min(cursor, cutoff)}-0", approximate=False)
    return report


def _finished_streams(keys: list[bytes], grace_s: int) -> set[bytes]:
    """Keys of streams whose owner is done: finished (long enough ago) or deleted
    jobs, and hosts that are no longer registered."""
    job_ids = {int(k[len(JOB_PREFIX):]): k for k in keys if k.startswith(JOB_PREFIX.encode())}
    still = set(Job.objects.filter(pk__in=job_ids).exclude(
        status__in=Job.FINISHED, finished_at__lt=timezone.now() - timedelta(seconds=grace_s)
    ).values_list("pk", flat=True))
    hosts = set(Host.objects.values_list("name", flat=True))
    gone = {k for job_id, k in job_ids.items() if job_id not in still}
    gone |= {k for k in keys if k.startswith(HOST_PREFIX.encode()) and k.decode()[len(HOST_PREFIX):] not in hosts}
    return gone
