"""The host agent: one per host, beside the Celery worker (DESIGN.md §1, §4, §5).

* Registers the host (a Host row by name) from `neuron-ls -j`: instance type,
  family, devices, NeuronCore ids, memory. Without Neuron devices it is a CPU host
  whose "cores" are job slots: NEURONDECK_CPU_SLOTS, else os.cpu_count(). A Neuron
  host also records what its job Python (NEURONDECK_JOB_PYTHON) reports: the SDK,
  compiler, runtime, torch and torch-neuronx versions (backends.neuron_env), which
  the submit checks and the compile cache key read.
* Finds neuron-ls and neuron-monitor on PATH, else in /opt/aws/neuron/bin, where
  aws-neuronx-tools installs them (a service's PATH usually lacks it).
* Heartbeats every settings.HEARTBEAT_S from a thread of its own (a stalled
  neuron-monitor must not make the host look dead). A heartbeat brings an
  offline host back online and never touches a draining one.
* Streams one sample a second into Redis (jobs.metrics): from
  `neuron-monitor -c <config>` on Neuron hosts, restarted with backoff whenever it
  exits; from /proc on hosts without devices or neuron-monitor; or, in replay
  mode, from a recorded neuron-monitor file at its original pace, with the host
  and every sample marked as a replay.
* Attributes each sample to the jobs running on this host (tag, pid, core
  range: neuron_workers.readers.neuron_monitor.attribute) and publishes a point
  per job next to the host point, in one Redis round trip.

Parsing stays in the pure readers; this module adds the processes, the database
(Host and Job rows) and Redis. A malformed line, a database or Redis hiccup is
logged and skipped — never fatal: the agent is what keeps a host visible.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import redis as redis_lib
from django.conf import settings
from django.db import Error as DatabaseError, close_old_connections, connection
from django.db.models import BooleanField, Case, F, QuerySet, Value, When
from django.utils import timezone

from jobs.live import metrics, requests
from jobs.models import GangMember, Host, Job
from neuron_workers import config
from neuron_workers.backends.neuron_env import probe_interpreter
from neuron_workers.readers.neuron_ls import (
    INSTANCE_TYPES,
    NEURON_BIN_DIR,
    Device,
    HostInventory,
    NeuronLsError,
    cpu_inventory,
    family_for_instance_type,
    find_tool,
    run_neuron_ls,
)
from neuron_workers.readers.neuron_monitor import (
    JobPlacement,
    MalformedReport,
    Report,
    anomaly_counts,
    attribute,
    iter_reports,
    monitor_config,
    parse_report,
    replay,
)
from neuron_workers.readers.os_sampler import sample_os

log = logging.getLogger("neuron_workers.agent")


def agent_host_name() -> str:
    return settings.HOST_NAME or socket.gethostname()


# --- inventory and registration ----------------------------------------------------

def cpu_slots() -> int:
    """Job slots of a CPU host: NEURONDECK_CPU_SLOTS, else the CPU count."""
    raw = os.environ.get("NEURONDECK_CPU_SLOTS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"NEURONDECK_CPU_SLOTS must be a positive integer, got {raw!r}")
        return int(raw)
    return os.cpu_count() or 1


def local_inventory(neuron_ls: str = "neuron-ls", bin_dir: str | Path = NEURON_BIN_DIR) -> HostInventory:
    """This host from `neuron-ls -j`, with what its job Python reports; a CPU host
    (slots as cores) when it has no device."""
    inventory = run_neuron_ls(binary=neuron_ls, bin_dir=bin_dir)
    if inventory.is_neuron:
        return dataclasses.replace(inventory, software=job_software())
    return dataclasses.replace(inventory, core_ids=list(range(cpu_slots())))


def job_software() -> dict:
    """The report of the interpreter this host's jobs run in (NEURONDECK_JOB_PYTHON, else
    this one), probed in that interpreter (backends.neuron_env). A failure is part of
    the report, not fatal: the host registers and the submit checks show the error."""
    python = config.job_python() or sys.executable
    report = probe_interpreter(python)
    if report.get("error"):
        log.error("cannot probe the job Python: %s", report["error"])
    else:
        packages = report.get("packages") or {}
        log.info("job Python %s: torch %s, torch-neuronx %s, neuronx-cc %s, runtime %s, Neuron SDK %s (%s path)",
                 python, packages.get("torch"), packages.get("torch_neuronx"), packages.get("neuronx_cc"),
                 report.get("runtime_version"), report.get("sdk_version") or "not stated", report.get("framework"))
    return report


def replay_inventory(path: str | Path) -> HostInventory:
    """The host a recording was made on, from its first report: instance type and
    device counts (neuron_hardware_info), device memory from the instance table.
    A recording without devices (no driver) gives a CPU host."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            sample = parse_report(line)
        except MalformedReport:
            continue
        if sample is None:
            continue
        hw, itype = sample["hw"], sample["instance_type"] or ""
        count = hw["device_count"] * hw["cores_per_device"]
        if not count:
            return cpu_inventory(cpu_count=max(len(sample["cores"]), 1), instance_type=itype,
                                 host_memory_bytes=(sample["mem"] or {}).get("total"))
        known = INSTANCE_TYPES.get(itype)
        per_device = known.device_memory_bytes // known.devices if known else 0
        per = hw["cores_per_device"]
        devices = [Device(index=d, core_ids=list(range(d * per, (d + 1) * per)), memory_bytes=per_device)
                   for d in range(hw["device_count"])]
        return HostInventory(
            family=family_for_instance_type(itype) or "trn1", instance_type=itype, devices=devices,
            core_ids=list(range(count)), device_memory_bytes=per_device * len(devices),
            core_memory_bytes=per_device // per if per else 0, host_memory_bytes=(sample["mem"] or {}).get("total"),
        )
    raise ValueError(f"{path}: no neuron-monitor report in the file")


def register_host(name: str, inventory: HostInventory, *, replay_mode: bool = False) -> Host:
    """Create or update the Host row `name` from `inventory`.

    The state is only set on creation (online): re-registering never undrains a
    host; the heartbeat that follows brings an offline host back online."""
    devices = len(inventory.devices)
    fields = {
        "instance_type": inventory.instance_type,
        "family": inventory.family,
        "device_count": devices,
        "core_ids": list(inventory.core_ids),
        "device_memory_bytes": inventory.device_memory_bytes,
        "memory_bytes": inventory.host_memory_bytes or 0,
        "backend": "neuron" if devices else "cpu",
        "inventory": inventory.to_dict(),
        "replay": replay_mode,
        # Where a multi-host job's other hosts reach this one, and its placement group.
        "address": config.address(),
        "network": config.network(),
    }
    # create_defaults replaces defaults on creation (Django 5), so it repeats them.
    host, _ = Host.objects.update_or_create(
        name=name, defaults=fields,
        create_defaults={**fields, "state": Host.State.ONLINE, "last_heartbeat": timezone.now()},
    )
    return host


def heartbeat(host_id: int) -> bool:
    """Stamp the host alive; offline -> online, draining stays draining. One UPDATE."""
    return bool(Host.objects.filter(pk=host_id).update(
        last_heartbeat=timezone.now(),
        state=Case(When(state=Host.State.OFFLINE, then=Value(Host.State.ONLINE)), default=F("state")),
    ))


def placements_query(host_id: int) -> QuerySet:
    """The query behind running_placements: the jobs running on this host (id,
    runner child pid, assigned cores, guest or not), in one query. Built once per
    agent and run at every re-read: building it costs more CPU than running it."""
    own = Job.objects.filter(host_id=host_id, status=Job.Status.RUNNING).annotate(
        guest=Value(False, output_field=BooleanField())).order_by().values_list(
        "pk", "worker_pid", "core_start", "cores", "guest")
    ranks = GangMember.objects.filter(host_id=host_id, state=GangMember.State.RUNNING, rank__gt=0,
                                      job__status=Job.Status.RUNNING).annotate(
        guest=Value(True, output_field=BooleanField())).order_by().values_list(
        "job_id", "worker_pid", "core_start", "cores", "guest")
    # No ORDER BY inside a UNION's parts (SQLite refuses one; the models order by default).
    return own.union(ranks, all=True)


def running_placements(query: QuerySet) -> tuple[list[JobPlacement], set[int]]:
    """The jobs running on this host (placements_query, read afresh), and which of
    them are guests: ranks > 0 of multi-host jobs, whose own host is their rank 0's.
    A guest's runtimes are its job's, not orphans, but its job's live charts follow
    rank 0's host, so the agent publishes no job point for it."""
    rows = list(query.all())
    return ([JobPlacement(pk, pid, list(range(start, start + n)) if start is not None else [])
             for pk, pid, start, n, _ in rows], {pk for pk, *_, guest in rows if guest})


class HeartbeatThread(threading.Thread):
    """Heartbeats every `interval` s until `stop` is set; database errors are logged
    and retried on the next beat (the connection is reopened)."""

    def __init__(self, host_id: int, interval: float, stop: threading.Event) -> None:
        super().__init__(name="agent-heartbeat", daemon=True)
        self.host_id, self.interval, self.stop = host_id, interval, stop
        self.beats = 0

    def run(self) -> None:
        try:
            while not self.stop.wait(self.interval):
                try:
                    heartbeat(self.host_id)
                    self.beats += 1
                except DatabaseError as exc:
                    log.warning("heartbeat failed (%s); retrying in %s s", exc, self.interval)
                    connection.close()
        finally:
            connection.close()


# --- sample sources ----------------------------------------------------------------

class MonitorProcess:
    """Runs neuron-monitor (argv list, no shell) and yields its stdout lines.

    When it exits — or cannot start — it is started again after a backoff that
    doubles from `backoff[0]` to `backoff[1]` seconds and falls back to the start
    once a run lasted `stable_s`. Its stderr (debug output) goes to ours."""

    def __init__(self, argv: list[str], stop: threading.Event, backoff: tuple[float, float] = (1.0, 30.0),
                 stable_s: float = 60.0) -> None:
        self.argv, self.stop, self.backoff, self.stable_s = argv, stop, backoff, stable_s
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def lines(self) -> Iterator[str]:
        delay = self.backoff[0]
        try:
            while not self.stop.is_set():
                began = time.monotonic()
                yield from self._run_once()
                if self.stop.is_set():
                    return
                if time.monotonic() - began >= self.stable_s:
                    delay = self.backoff[0]
                log.warning("%s stopped; restarting in %.1f s", self.argv[0], delay)
                if self.stop.wait(delay):
                    return
                delay = min(delay * 2, self.backoff[1])
        finally:
            self.terminate()

    def _run_once(self) -> Iterator[str]:
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         text=True, errors="replace", bufsize=1)
        except OSError as exc:
            log.error("cannot start %s: %s", self.argv[0], exc)
            return
        self.starts += 1
        log.info("started %s (pid %s, start %s)", " ".join(self.argv), self.proc.pid, self.starts)
        assert self.proc.stdout is not None
        yield from self.proc.stdout
        code = self.proc.wait()
        log.warning("%s exited with status %s", self.argv[0], code)

    def terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _log_malformed(exc: MalformedReport, line: str | bytes) -> None:
    log.warning("skipped a malformed neuron-monitor line (%s): %.120r", exc, line)


ANOMALY_LOG_EVERY_S = 60.0


def logging_anomalies(samples: Iterable[Report], every_s: float = ANOMALY_LOG_EVERY_S) -> Iterator[Report]:
    """The samples, passed through; the reader's anomalies (a utilization outside
    0-100, memory reported for another runtime's core) logged at most once per
    `every_s`, with the process's running counts."""
    last = -every_s
    for sample in samples:
        if sample.get("anomalies") and time.monotonic() - last >= every_s:
            last = time.monotonic()
            log.warning("neuron-monitor report anomalies: %s; since start: %s", sample["anomalies"], anomaly_counts())
        yield sample


def monitor_samples(monitor: MonitorProcess) -> Iterator[Report]:
    # Points carry host vCPU as a whole, not per CPU: skip that part of parsing.
    return logging_anomalies(iter_reports(monitor.lines(), on_error=_log_malformed, per_cpu=False))


def os_samples(stop: threading.Event, period: float = 1.0, instance_type: str | None = None,
               root: str | Path = "/") -> Iterator[Report]:
    """A host sample (kind "host") every `period` s from /proc, on a fixed schedule;
    the first comes one period after the start (CPU % needs two readings)."""
    _, prev = sample_os(None, root=root, instance_type=instance_type)
    next_at = time.monotonic() + period
    while not stop.wait(max(0.0, next_at - time.monotonic())):
        next_at += period
        try:
            sample, prev = sample_os(prev, root=root, instance_type=instance_type)
        except OSError as exc:
            log.warning("cannot read /proc: %s", exc)
            continue
        yield sample


def replay_samples(path: str | Path, stop: threading.Event, loop: bool) -> Iterator[Report]:
    """A recording at its original pace (one report per second), marked replay."""
    for sample in logging_anomalies(replay(path, loop=loop, on_error=_log_malformed, sleep=stop.wait)):
        if stop.is_set():
            return
        yield sample


# --- CPU hosts: usage of job processes ---------------------------------------------

class ProcessCpu:
    """CPU use and resident memory of job processes from /proc/<pid>/stat.

    CPU % is the process's user+system time (its threads included, plus children
    it has waited for) over the time since the previous reading of that pid for
    the same job, so 100 % = one CPU busy. The first reading has no CPU % yet; a
    warm runner's process runs several jobs in turn, and a job must not be
    charged for the CPU its predecessor used."""

    _TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    _PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def __init__(self, proc_root: str | Path = "/proc") -> None:
        self.root = Path(proc_root)
        self.prev: dict[int, tuple[float, int, int | None]] = {}  # pid -> (when, ticks, job)

    def read(self, pid: int, job: int | None = None) -> tuple[float | None, int | None]:
        try:
            text = (self.root / str(pid) / "stat").read_text()
        except OSError:
            self.prev.pop(pid, None)
            return None, None
        # Fields after the command name (which may hold spaces) close with ")".
        fields = text.rpartition(")")[2].split()
        ticks = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime (proc(5) 14-17)
        rss = int(fields[21]) * self._PAGE  # rss (proc(5) field 24) in pages
        now = time.monotonic()
        before = self.prev.get(pid)
        self.prev[pid] = (now, ticks, job)
        if before is None or now <= before[0] or before[2] != job:
            return None, rss
        return round(100.0 * (ticks - before[1]) / self._TICKS / (now - before[0]), 2), rss

    def forget_except(self, pids: set[int]) -> None:
        for pid in set(self.prev) - pids:
            del self.prev[pid]


def cpu_points(sample: Report, placements: list[JobPlacement], slots: list[int], host: str,
               usage: Callable[[int, int], tuple[float | None, int | None]],
               request_stats: dict[int, dict] | None = None) -> tuple[dict, dict[int, dict]]:
    """Host and job points of an OS sample. A job's slots each show its process's
    CPU % as a share of its slots (100 % = as many CPUs busy as it has slots),
    since the process is not pinned to particular CPUs. `request_stats` are the
    requests each job reported itself since the last sample (jobs.live.requests)."""
    request_stats = request_stats or {}
    slot_util = {str(s): 0.0 for s in slots}
    job_pts: dict[int, dict] = {}
    for job in placements:
        pct, rss = usage(job.pid, job.job_id) if job.pid else (None, None)
        share = min(100.0, round(pct / max(len(job.cores), 1), 2)) if pct is not None else None
        util = {str(c): share for c in job.cores} if share is not None else {}
        slot_util.update(util)
        job_pts[job.job_id] = {
            "ts": sample["ts"], "kind": "host", "host": host, "util": util, "mem": {}, "device_mem": None,
            "host_mem": rss, "lat_p50": None, "lat_p99": None, "completed": 0, "errors": 0,
            "idle": [c for c in job.cores if share is not None and share < metrics.IDLE_UTIL],
            **request_stats.get(job.job_id, {}),
        }
    host_pt = metrics.host_point(sample, None, slot_util=slot_util)
    host_pt["job"] = {str(c): job.job_id for job in placements for c in job.cores if str(c) in slot_util}
    return host_pt, job_pts


# --- the agent ---------------------------------------------------------------------

class Agent:
    """Turns samples into published points for one registered host."""

    def __init__(self, host: Host, *, replay_mode: bool = False, placements_ttl: float = 5.0,
                 publish: Callable[..., object] = metrics.publish,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.host_id, self.slots = host.name, host.pk, list(host.core_ids)
        self.replay_mode, self.placements_ttl, self.publish = replay_mode, placements_ttl, publish
        self.clock = clock
        self._placements_query = placements_query(host.pk)
        self._placements: list[JobPlacement] = []
        self._guests: set[int] = set()  # jobs here as a gang's rank > 0 (running_placements)
        self._placements_at = float("-inf")
        self._known_orphans: frozenset[tuple[int, str]] = frozenset()
        self.cpu = ProcessCpu()
        self.published = 0
        self.failures = 0

    def placements(self, soon: bool = False) -> list[JobPlacement]:
        """Running jobs of this host, re-read every `placements_ttl` s, or every
        second when `soon`. Jobs start and end rarely; re-reading for every report
        would cost a query a second per host."""
        if self._due(soon):
            self._reload()
        return self._placements

    def _due(self, soon: bool) -> bool:
        age = self.clock() - self._placements_at
        return age >= self.placements_ttl or (soon and age >= min(1.0, self.placements_ttl))

    def _reload(self) -> None:
        try:
            self._placements, self._guests = running_placements(self._placements_query)
        except DatabaseError as exc:
            log.warning("cannot read this host's jobs (%s); keeping the last known", exc)
            connection.close()
        self._placements_at = self.clock()

    def _attribute(self, sample: Report) -> tuple[dict, list[JobPlacement]]:
        placements = self.placements()
        if self.replay_mode:
            # A recording's pids belong to the machine it was made on (its tags are
            # dropped in `points`): match its runtimes to the jobs here by cores only.
            placements = [dataclasses.replace(p, pid=None) for p in placements]
        return attribute(sample, placements), placements

    def points(self, sample: Report) -> tuple[dict, dict[int, dict]]:
        if sample["kind"] == "host":
            # OS samples carry no tags to notice a new job by: re-read every second.
            placements = self.placements(soon=True)
            self.cpu.forget_except({p.pid for p in placements if p.pid})
            stats = self._requests()
            host_pt, job_pts = cpu_points(sample, placements, self.slots, self.name, self.cpu.read, stats)
            for job_id in stats.keys() - job_pts.keys():  # a job that has ended (or not been seen running)
                job_pts[job_id] = requests.point(sample["ts"], self.name, stats[job_id])
            return host_pt, self._own(job_pts)
        if self.replay_mode:
            for runtime in sample["runtimes"]:
                runtime["job_id"] = None
        attribution, placements = self._attribute(sample)
        if attribution["unattributed"] and self._orphans(attribution) != self._known_orphans and self._due(True):
            # A runtime no known job accounts for — perhaps a job that has just
            # started: re-read now. What is still unattributed afterwards is an
            # orphan, and the same orphans do not trigger a re-read again.
            self._reload()
            attribution, placements = self._attribute(sample)
            self._known_orphans = self._orphans(attribution)
        return (metrics.host_point(sample, attribution),
                self._own(metrics.job_points(sample, attribution, placements, self.name)))

    def _own(self, job_pts: dict[int, dict]) -> dict[int, dict]:
        """The job points to publish: not a gang's rank > 0 (its job's charts follow
        rank 0's host; this host's own charts show it)."""
        return {job_id: point for job_id, point in job_pts.items() if job_id not in self._guests}

    def _requests(self) -> dict[int, dict]:
        """The requests jobs on this host reported since the last sample (a cpu
        inference job's latency and completions, jobs.live.requests)."""
        try:
            return requests.drain(self.name)
        except redis_lib.RedisError:
            return {}

    @staticmethod
    def _orphans(attribution: dict) -> frozenset[tuple[int, str]]:
        return frozenset((o["pid"], o["tag"]) for o in attribution["unattributed"])

    def handle(self, sample: Report) -> bool:
        """Publish one sample; False (logged) when Redis is unreachable."""
        host_pt, job_pts = self.points(sample)
        try:
            self.publish(self.name, host_pt, job_pts)
        except redis_lib.RedisError as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 60 == 0:
                log.warning("cannot publish to Redis (%s); %s samples dropped so far", exc, self.failures)
            return False
        self.published += 1
        return True


@dataclasses.dataclass
class AgentOptions:
    name: str
    replay: Path | None = None
    once: bool = False
    loop: bool = True  # replay: start again at the end of the file (unless once)
    neuron_ls: str = "neuron-ls"
    neuron_monitor: str = "neuron-monitor"
    neuron_bin_dir: str | Path = NEURON_BIN_DIR  # where the tools are when PATH lacks them
    period_s: float = 1.0
    heartbeat_s: float | None = None  # default settings.HEARTBEAT_S


def register(opts: AgentOptions) -> tuple[Host, HostInventory]:
    if opts.replay is not None:
        inventory = replay_inventory(opts.replay)
        host = register_host(opts.name, inventory, replay_mode=True)
    else:
        inventory = local_inventory(opts.neuron_ls, opts.neuron_bin_dir)
        host = register_host(opts.name, inventory)
    heartbeat(host.pk)
    log.info("registered host %s: %s %s, %s cores%s", host.name, host.family, host.instance_type or "?",
             len(host.core_ids), " (replay)" if host.replay else "")
    return host, inventory


def samples_for(opts: AgentOptions, inventory: HostInventory, stop: threading.Event,
                workdir: Path) -> tuple[Iterator[Report], MonitorProcess | None]:
    """The sample source: replay, neuron-monitor (devices and the tool present), or /proc."""
    if opts.replay is not None:
        return replay_samples(opts.replay, stop, loop=opts.loop and not opts.once), None
    binary = find_tool(opts.neuron_monitor, opts.neuron_bin_dir)
    if inventory.is_neuron and binary:
        config = workdir / "neuron-monitor.json"
        config.write_text(json.dumps(monitor_config(period=f"{opts.period_s:g}s")))
        monitor = MonitorProcess([binary, "-c", str(config)], stop)
        return monitor_samples(monitor), monitor
    if inventory.is_neuron:
        log.warning("%s not found: sampling the OS instead of the NeuronCores", opts.neuron_monitor)
    return os_samples(stop, opts.period_s, inventory.instance_type or None), None


def run(opts: AgentOptions, stop: threading.Event | None = None) -> int:
    """Register, heartbeat and publish until `stop` (or SIGTERM/SIGINT when run in
    the main thread). `once`: one sample (replay: the file once). Returns the
    number of samples published."""
    stop = stop or threading.Event()
    try:
        host, inventory = register(opts)
    except NeuronLsError as exc:
        raise SystemExit(f"cannot register this host: {exc}") from None
    beat = HeartbeatThread(host.pk, opts.heartbeat_s or settings.HEARTBEAT_S, stop)
    beat.start()
    agent = Agent(host, replay_mode=opts.replay is not None)
    with tempfile.TemporaryDirectory(prefix="nd-agent-") as workdir:
        source, monitor = samples_for(opts, inventory, stop, Path(workdir))
        _install_signal_handlers(stop)
        if monitor is not None:
            # Reading neuron-monitor's stdout blocks; ending the process is what
            # unblocks it when the agent is asked to stop.
            threading.Thread(target=_terminate_on_stop, args=(stop, monitor), name="agent-stop", daemon=True).start()
        try:
            for sample in source:
                agent.handle(sample)
                close_old_connections()
                if stop.is_set() or (opts.once and opts.replay is None):
                    break
        finally:
            stop.set()
            if monitor is not None:
                monitor.terminate()
            beat.join(5)
            connection.close()
    log.info("agent %s stopped after %s samples", host.name, agent.published)
    return agent.published


def _terminate_on_stop(stop: threading.Event, monitor: MonitorProcess) -> None:
    stop.wait()
    monitor.terminate()


def _install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM / SIGINT stop the agent cleanly (only possible in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
