"""neuron-monitor reports -> compact samples, and job attribution (pure, Django-free).

The host agent runs `neuron-monitor -c <config>` (config from `monitor_config`),
feeds each stdout line to `parse_report`, and publishes the compact sample to a
Redis stream (DESIGN.md §5). Roll-ups, live endpoints and charts read that
sample, so its shape below is a contract: add keys if needed, never rename or
change the meaning of one.

Compact sample ("Report"), JSON-serializable, all dict keys are strings::

    {"ts": float,                 # unix seconds: the ts argument, else time.time()
     "kind": "neuron",            # "host" for OS samples (os_sampler.sample_os)
     "cores": {"<core_id>": {     # only cores some runtime reports; {} when idle
         "util": float,           # percent 0-100; max over runtimes on that core
         "mem": int | None,       # device bytes: sum of neuroncore_memory_usage
                                  # breakdown over runtimes; None if not reported
         "flops": int | None,     # max over runtimes; None on old tools
         "v3d": {"nc_v3.0": float, ...} | None}},  # Trn2 physical-core util
     "runtimes": [{
         "tag": str,              # NEURON_PROCESS_TAG, or the pid as a string
         "pid": int,
         "job_id": int | None,    # from a "job-<id>" tag, else None
         "cores": [int],          # sorted: cores in use or holding its memory
         "util": {"<core_id>": float},
         "host_mem": int | None, "device_mem": int | None,  # bytes
         "lat_p50": float | None, "lat_p99": float | None,  # seconds, total_latency
         "completed": int,        # executions completed OK in the period
         "errors": int,           # executions that did not complete OK
         "vcpu_user": float | None, "vcpu_system": float | None,  # percent
         "error": str}],          # "" when fine
     "vcpu": {"user": float, "system": float, "idle": float} | None,  # percent
     "per_cpu": {"<cpu_idx>": float} | None,   # busy percent = 100 - idle - io_wait
     "mem": {"total": int, "used": int} | None,  # host bytes
     "ecc": {"mem_corrected": int, "mem_uncorrected": int,
             "sram_corrected": int, "sram_uncorrected": int} | None,  # summed over devices
     "hw": {"device_count": int, "cores_per_device": int,
            "device_type": str | None, "core_version": str | None},
     "instance_type": str | None,
     "errors": [str],             # "<group>: <message>" for host-level errors
     "anomalies": {str: int},     # only when the report had some (see below)
     "replay": True}              # only on samples produced by `replay()`

Anomalies (values the reader did not take as reported; also summed process-wide
in `anomaly_counts()` for the agent to log):
"util_out_of_range": a utilization (percent) below 0, above 100 or not finite,
clamped to 0-100; "mem_of_foreign_core": a runtime's per-core memory entry for a
core another runtime uses (left out: the core and its memory are the user's);
"mem_of_shared_idle_core": a core no runtime uses with memory reported by several
runtimes (it belongs to none of them; its memory counts once, the largest report).

Sources for the input format are neuron.md §1.4-§1.6; quirks handled here are
cited where they are handled. Nothing here imports Django, torch or redis.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import msgspec

__all__ = [
    "CoreSample",
    "JobPlacement",
    "MalformedReport",
    "Report",
    "RuntimeSample",
    "anomaly_counts",
    "attribute",
    "dump_sample",
    "empty_hw",
    "iter_reports",
    "job_id_from_tag",
    "monitor_config",
    "parse_report",
    "replay",
]


class MalformedReport(ValueError):
    """A line that is not a neuron-monitor report. The agent logs it and skips it."""


class CoreSample(TypedDict):
    util: float
    mem: int | None
    flops: int | None
    v3d: dict[str, float] | None


class RuntimeSample(TypedDict):
    tag: str
    pid: int
    job_id: int | None
    cores: list[int]
    util: dict[str, float]
    host_mem: int | None
    device_mem: int | None
    lat_p50: float | None
    lat_p99: float | None
    completed: int
    errors: int
    vcpu_user: float | None
    vcpu_system: float | None
    error: str


class Report(TypedDict):
    ts: float
    kind: str
    cores: dict[str, CoreSample]
    runtimes: list[RuntimeSample]
    vcpu: dict[str, float] | None
    per_cpu: dict[str, float] | None
    mem: dict[str, int] | None
    ecc: dict[str, int] | None
    hw: dict[str, Any]
    instance_type: str | None
    errors: list[str]
    anomalies: NotRequired[dict[str, int]]
    replay: NotRequired[bool]


def empty_hw() -> dict[str, Any]:
    """The "hw" value of a host without Neuron hardware information."""
    return {"device_count": 0, "cores_per_device": 0, "device_type": None, "core_version": None}


# --------------------------------------------------------------------------
# The input: what the reader reads of a report
# --------------------------------------------------------------------------
# A report is decoded into these structs (msgspec), which declare only the fields
# read below: everything else — the per-CPU breakdown of a 128-vCPU host, each
# runtime's loaded models, the latency percentiles other than p50 and p99 — is
# skipped without building Python objects. Every field is optional (a report only
# holds the groups that were due, neuron.md §1.1) and null reads as absent.
# Scalars are typed Any and converted where they are used, so odd values (a number
# as text, out of range, null) are handled there. Where an object belongs (a group,
# a runtime's report), anything but an object or null makes the line a
# MalformedReport, with the path of the offending value.


class _PhysicalCore(msgspec.Struct):
    neuroncore_utilization: Any = None


class _CoreCounter(msgspec.Struct):
    neuroncore_utilization: Any = None
    flops: Any = None  # missing on old tools
    v3d: dict[str, _PhysicalCore] | None = None  # Trn2 only: its physical cores


class _Latency(msgspec.Struct):
    p50: Any = None
    p99: Any = None


class _LatencyStats(msgspec.Struct):
    total_latency: _Latency | None = None  # null when no model ran


class _UsageBreakdown(msgspec.Struct):
    neuroncore_memory_usage: dict[str, dict[str, Any]] | None = None  # core -> bytes by kind


class _RuntimeUsedBytes(msgspec.Struct):
    host: Any = None
    neuron_device: Any = None
    usage_breakdown: _UsageBreakdown | None = None


class _RuntimeGroup(msgspec.Struct):
    """One group of a runtime's report (neuroncore_counters, execution_stats,
    memory_used, neuron_runtime_vcpu_usage): the fields read of any of them."""

    error: Any = None
    neuroncores_in_use: dict[str, _CoreCounter] | None = None  # neuroncore_counters
    execution_summary: Any = None  # execution_stats: {"completed": n, ...}
    latency_stats: _LatencyStats | None = None  # execution_stats
    neuron_runtime_used_bytes: _RuntimeUsedBytes | None = None  # memory_used
    vcpu_usage: Any = None  # neuron_runtime_vcpu_usage: {"user": %, "system": %}


class _Runtime(msgspec.Struct):
    pid: Any = None
    neuron_runtime_tag: Any = None
    error: Any = None
    report: dict[str, _RuntimeGroup | None] | None = None


class _Device(msgspec.Struct):
    """One neuron_hw_counters device: its ECC counts."""

    mem_ecc_corrected: Any = None
    mem_ecc_uncorrected: Any = None
    sram_ecc_corrected: Any = None
    sram_ecc_uncorrected: Any = None


class _SystemGroup(msgspec.Struct):
    """One group of system_data (vcpu_usage, memory_info, neuron_hw_counters)."""

    error: Any = None
    average_usage: Any = None  # vcpu_usage: {"user": %, "system": %, "idle": %, ...}
    # vcpu_usage per CPU, kept undecoded: only `per_cpu` decodes it.
    usage_data: msgspec.Raw = msgspec.Raw(b"null")
    memory_total_bytes: Any = None  # memory_info
    memory_used_bytes: Any = None
    neuron_devices: list[_Device] | None = None  # neuron_hw_counters; null without a driver


class _InstanceInfo(msgspec.Struct):
    instance_type: Any = None
    error: Any = None


class _HardwareInfo(msgspec.Struct):
    neuron_device_count: Any = None
    neuroncore_per_device_count: Any = None
    neuron_device_type: Any = None
    neuroncore_version: Any = None
    error: Any = None


class _Report(msgspec.Struct):
    # UNSET (absent) tells a line without any report key from a report whose groups are null.
    neuron_runtime_data: list[_Runtime] | None | msgspec.UnsetType = msgspec.UNSET
    system_data: dict[str, _SystemGroup | None] | None | msgspec.UnsetType = msgspec.UNSET
    instance_info: _InstanceInfo | None | msgspec.UnsetType = msgspec.UNSET
    neuron_hardware_info: _HardwareInfo | None | msgspec.UnsetType = msgspec.UNSET


_decode_report = msgspec.json.Decoder(_Report).decode
_NO_RUNTIME_GROUP = _RuntimeGroup()
_NO_SYSTEM_GROUP = _SystemGroup()
_NO_USED_BYTES = _RuntimeUsedBytes()


# --------------------------------------------------------------------------
# Parsing one report
# --------------------------------------------------------------------------

_JOB_TAG_RE = re.compile(r"job-([0-9]+)")

# execution_summary keys other than "completed": each counts executions that
# did not complete cleanly in the period (neuron.md §1.4, execution_stats).
_FAILED_EXECUTION_KEYS = (
    "completed_with_err",
    "completed_with_num_err",
    "timed_out",
    "incorrect_input",
    "failed_to_queue",
)


def job_id_from_tag(tag: object) -> int | None:
    """42 for the tag "job-42"; None for anything else (pid tags, custom tags).

    The runner sets NEURON_PROCESS_TAG=job-<id> (DESIGN.md §2); without a tag
    neuron-monitor uses the pid (neuron.md §1.3).
    """
    if not isinstance(tag, str):
        return None
    match = _JOB_TAG_RE.fullmatch(tag)
    return int(match.group(1)) if match else None


def parse_report(line: str | bytes, ts: float | None = None, *, per_cpu: bool = True) -> Report | None:
    """Turn one neuron-monitor JSON report line into a compact sample.

    Returns None for a blank line. Raises MalformedReport (with a short reason)
    for anything that is not a report object of the documented shape. Every
    group is optional (the config decides which are present, and periods can
    differ per group, neuron.md §1.2); only the top level must be an object
    with at least one known report key.

    `per_cpu=False` leaves "per_cpu" None: on a 128-vCPU host that breakdown is
    most of a report, and the host agent does not publish it.
    """
    if not line.strip():
        return None
    try:
        data = _decode_report(line)
    except msgspec.ValidationError as exc:  # valid JSON, not of a report's shape
        raise MalformedReport(f"unexpected structure: {exc}") from None
    except msgspec.DecodeError as exc:  # not JSON, or not UTF-8
        raise MalformedReport(f"not JSON: {exc}") from None
    if all(group is msgspec.UNSET for group in (data.neuron_runtime_data, data.system_data, data.instance_info,
                                                  data.neuron_hardware_info)):
        raise MalformedReport("no neuron-monitor report keys")
    try:
        return _build_sample(data, time.time() if ts is None else float(ts), per_cpu)
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        # A value of the wrong type where the reader converts it (e.g. a text size).
        raise MalformedReport(f"unexpected structure: {type(exc).__name__}: {exc}") from None


_ANOMALIES: Counter[str] = Counter()


def anomaly_counts() -> dict[str, int]:
    """Anomalies (see the module doc) of every report parsed by this process so far."""
    return dict(_ANOMALIES)


def _percent(value: Any, anomalies: Counter[str]) -> float:
    """A utilization in 0-100: anything outside (or not finite) is clamped and counted."""
    number = float(value or 0.0)
    if 0.0 <= number <= 100.0:
        return number
    anomalies["util_out_of_range"] += 1
    return 100.0 if number > 100.0 else 0.0  # NaN compares false: 0


def _build_sample(data: _Report, ts: float, per_cpu: bool = True) -> Report:
    cores: dict[str, CoreSample] = {}
    anomalies: Counter[str] = Counter()
    entries = [(rt, rt.report or {}) for rt in data.neuron_runtime_data or ()]
    in_use = [_group(report, "neuroncore_counters").neuroncores_in_use or {} for _, report in entries]
    memory = [_core_memory(report) for _, report in entries]
    owners = _memory_owners(in_use, memory, anomalies)
    runtimes = [_runtime(rt, report, used, mem, owners, index, cores, anomalies)
                for index, ((rt, report), used, mem) in enumerate(zip(entries, in_use, memory))]
    system = data.system_data or {}
    vcpu = system.get("vcpu_usage") or _NO_SYSTEM_GROUP
    hw_info = data.neuron_hardware_info or _HardwareInfo()
    instance = data.instance_info or _InstanceInfo()
    sample: Report = {
        "ts": ts,
        "kind": "neuron",
        "cores": cores,
        "runtimes": runtimes,
        "vcpu": _vcpu(vcpu.average_usage, anomalies),
        "per_cpu": _per_cpu(msgspec.json.decode(vcpu.usage_data)) if per_cpu else None,
        "mem": _host_mem(system.get("memory_info")),
        "ecc": _ecc(system.get("neuron_hw_counters")),
        "hw": _hw(hw_info),
        "instance_type": instance.instance_type or None,
        "errors": _host_errors(system, hw_info, instance),
    }
    if anomalies:
        sample["anomalies"] = dict(anomalies)
        _ANOMALIES.update(anomalies)
    return sample


def _group(report: dict[str, _RuntimeGroup | None], name: str) -> _RuntimeGroup:
    """The runtime's group `name`, empty when absent or null."""
    return report.get(name) or _NO_RUNTIME_GROUP


def _core_memory(report: dict[str, _RuntimeGroup | None]) -> dict[str, int]:
    """A runtime's device bytes per core (its neuroncore_memory_usage breakdown, summed)."""
    used = _group(report, "memory_used").neuron_runtime_used_bytes
    breakdown = used.usage_breakdown if used else None
    per_core = breakdown.neuroncore_memory_usage if breakdown else None
    return {key: sum(parts.values()) for key, parts in (per_core or {}).items()}


def _memory_owners(in_use: list[dict[str, Any]], memory: list[dict[str, int]],
                   anomalies: Counter[str]) -> dict[str, int | None]:
    """Which runtime (index) a memory-only core belongs to: a core no runtime uses
    (neuron-monitor lists only the cores active in the period) belongs to the one
    runtime that holds memory on it; reported by several, to none (None)."""
    used = {key for keys in in_use for key in keys}
    owners: dict[str, int | None] = {}
    for index, per_core in enumerate(memory):
        for key in per_core:
            if key in used:
                continue
            if key in owners:
                if owners[key] is not None:
                    anomalies["mem_of_shared_idle_core"] += 1
                owners[key] = None
            else:
                owners[key] = index
    return owners


def _runtime(rt: _Runtime, report: dict[str, _RuntimeGroup | None], in_use: dict[str, _CoreCounter],
             memory: dict[str, int],
             owners: dict[str, int | None], index: int, cores: dict[str, CoreSample],
             anomalies: Counter[str]) -> RuntimeSample:
    """One neuron_runtime_data[] entry; also merges its cores into `cores`.

    Its cores are the ones it uses (neuroncores_in_use) and the idle ones only it
    holds memory on (`owners`). A memory entry for a core another runtime uses is
    not its: the core is not charged to it and its memory is not added again."""
    stats = _group(report, "execution_stats")
    vcpu = _group(report, "neuron_runtime_vcpu_usage").vcpu_usage or {}
    used = _group(report, "memory_used").neuron_runtime_used_bytes or _NO_USED_BYTES
    pid = int(rt.pid or 0)
    # An untagged app's tag is its pid (neuron.md §1.3); keep it a string.
    tag = str(rt.neuron_runtime_tag or pid)

    util = _merge_core_counters(in_use, cores, anomalies)
    own_memory: dict[str, int] = {}
    for key, total in memory.items():
        if key in in_use or owners.get(key) == index:
            own_memory[key] = total
        elif key not in owners:
            anomalies["mem_of_foreign_core"] += 1
    _merge_core_memory(own_memory, cores, summed=True)
    _merge_core_memory({k: t for k, t in memory.items() if k in owners and owners[k] is None}, cores, summed=False)
    lat_p50, lat_p99 = _latency(stats.latency_stats)
    completed, failed = _executions(stats.execution_summary)
    return {
        "tag": tag,
        "pid": pid,
        "job_id": job_id_from_tag(tag),
        "cores": sorted({int(c) for c in util.keys() | own_memory.keys()}),
        "util": util,
        "host_mem": used.host,
        "device_mem": used.neuron_device,
        "lat_p50": lat_p50,
        "lat_p99": lat_p99,
        "completed": completed,
        "errors": failed,
        "vcpu_user": _opt_percent(vcpu.get("user"), anomalies),
        "vcpu_system": _opt_percent(vcpu.get("system"), anomalies),
        "error": _runtime_error(rt, report),
    }


def _opt_percent(value: Any, anomalies: Counter[str]) -> float | None:
    return None if value is None else _percent(value, anomalies)


def _merge_core_counters(in_use: dict[str, _CoreCounter], cores: dict[str, CoreSample],
                         anomalies: Counter[str]) -> dict[str, float]:
    """Per-core util of one runtime, merged into the host-wide `cores` by max.

    Several runtimes can report the same core; CloudWatch had to take the max
    per core (neuron.md §1.7 and §5.3), and flops are treated the same way.
    Keys are NeuronCore indices as strings, treated as global ids (neuron.md
    §6 lists this as unconfirmed under NEURON_RT_VISIBLE_CORES).
    `flops` and `v3d` are optional: old tools lack flops, only Trn2 has v3d.
    """
    util: dict[str, float] = {}
    for key, counter in in_use.items():
        value = _percent(counter.neuroncore_utilization, anomalies)
        flops = counter.flops
        v3d = counter.v3d
        v3d_util = (
            {name: _percent(phys.neuroncore_utilization, anomalies) for name, phys in v3d.items()}
            if v3d
            else None
        )
        util[key] = value
        core = cores.get(key)
        if core is None:
            cores[key] = {"util": value, "mem": None, "flops": flops, "v3d": v3d_util}
            continue
        core["util"] = max(core["util"], value)
        if flops is not None:
            core["flops"] = flops if core["flops"] is None else max(core["flops"], flops)
        if v3d_util:
            core["v3d"] = _max_merge(core["v3d"], v3d_util)
    return util


def _merge_core_memory(per_core: dict[str, int], cores: dict[str, CoreSample], *, summed: bool) -> None:
    """Per-core device bytes of one runtime, merged into the host-wide `cores`.

    A runtime's memory on its own cores adds up across runtimes sharing a core (each
    allocates its own); a core nobody owns (`summed=False`) takes the largest report.
    A core that holds memory but is not in neuroncores_in_use was idle in the
    period: util 0.
    """
    for key, total in per_core.items():
        core = cores.get(key)
        if core is None:
            cores[key] = {"util": 0.0, "mem": total, "flops": None, "v3d": None}
        elif core["mem"] is None:
            core["mem"] = total
        else:
            core["mem"] = core["mem"] + total if summed else max(core["mem"], total)


def _max_merge(old: dict[str, float] | None, new: dict[str, float]) -> dict[str, float]:
    if not old:
        return new
    merged = dict(old)
    for name, value in new.items():
        merged[name] = max(merged.get(name, value), value)
    return merged


def _latency(latency_stats: _LatencyStats | None) -> tuple[float | None, float | None]:
    """p50/p99 of total_latency in seconds; None when no model ran (it is null)."""
    total = latency_stats.total_latency if latency_stats else None
    if not total:
        return None, None
    return total.p50, total.p99


def _executions(summary: Any) -> tuple[int, int]:
    if not summary:
        return 0, 0
    failed = sum(int(summary.get(key) or 0) for key in _FAILED_EXECUTION_KEYS)
    return int(summary.get("completed") or 0), failed


def _runtime_error(rt: _Runtime, report: dict[str, _RuntimeGroup | None]) -> str:
    """The runtime's error, else its groups' errors as "<group>: <message>"."""
    if rt.error:
        return str(rt.error)
    return "; ".join(f"{name}: {group.error}" for name, group in report.items() if group and group.error)


def _vcpu(average: Any, anomalies: Counter[str]) -> dict[str, float] | None:
    if not average:
        return None
    return {
        "user": _percent(average.get("user"), anomalies),
        "system": _percent(average.get("system"), anomalies),
        "idle": _percent(average.get("idle"), anomalies),
    }


def _per_cpu(usage: Any) -> dict[str, float] | None:
    if not usage:
        return None
    # io_wait is idle time waiting on I/O, so it is not "busy" (same rule as
    # os_sampler, so host and neuron samples chart the same quantity).
    return {
        idx: round(min(100.0, max(0.0, 100.0 - (cpu.get("idle") or 0.0) - (cpu.get("io_wait") or 0.0))), 2)
        for idx, cpu in usage.items()
    }


def _host_mem(group: _SystemGroup | None) -> dict[str, int] | None:
    if not group or group.memory_total_bytes is None:
        return None
    return {"total": int(group.memory_total_bytes), "used": int(group.memory_used_bytes or 0)}


def _ecc(group: _SystemGroup | None) -> dict[str, int] | None:
    """ECC counts summed over devices; None when the group is absent or the
    driver is unreachable (neuron_devices is null in containers, neuron.md §1.4)."""
    devices = group.neuron_devices if group else None
    if devices is None:
        return None
    ecc = {"mem_corrected": 0, "mem_uncorrected": 0, "sram_corrected": 0, "sram_uncorrected": 0}
    for dev in devices:
        ecc["mem_corrected"] += int(dev.mem_ecc_corrected or 0)
        ecc["mem_uncorrected"] += int(dev.mem_ecc_uncorrected or 0)
        ecc["sram_corrected"] += int(dev.sram_ecc_corrected or 0)
        ecc["sram_uncorrected"] += int(dev.sram_ecc_uncorrected or 0)
    return ecc


def _hw(info: _HardwareInfo) -> dict[str, Any]:
    # Old tools print only the two counts (neuron.md §1.6); the rest is optional.
    return {
        "device_count": int(info.neuron_device_count or 0),
        "cores_per_device": int(info.neuroncore_per_device_count or 0),
        "device_type": info.neuron_device_type or None,
        "core_version": info.neuroncore_version or None,
    }


def _host_errors(system: dict[str, _SystemGroup | None], hw_info: _HardwareInfo,
                 instance: _InstanceInfo) -> list[str]:
    errors = [f"{name}: {group.error}" for name, group in system.items() if group and group.error]
    # A hardware-info error usually means the driver is missing (neuron.md §1.4).
    if hw_info.error:
        errors.append(f"neuron_hardware_info: {hw_info.error}")
    if instance.error:
        errors.append(f"instance_info: {instance.error}")
    return errors


# --------------------------------------------------------------------------
# Attribution of runtimes to jobs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class JobPlacement:
    """A job placed on this host: its id, runner pid (if known), assigned cores."""

    job_id: int
    pid: int | None
    cores: list[int] = field(default_factory=list)


def attribute(sample: Report, jobs: Iterable[JobPlacement]) -> dict[str, Any]:
    """Map the runtimes of one sample to the jobs placed on the host.

    Matching order per runtime: its "job-<id>" tag; else its pid; else the job
    whose assigned cores overlap the runtime's cores most (ties: lowest id).
    A runtime whose tag names a job that is not in `jobs` is NOT matched by pid
    or cores: it is a leftover process of another job (neuron.md §5.1, cores
    held by dead or leftover processes) and is reported as unattributed.

    Returns::

        {"by_job": {job_id: {"cores": {"<core>": CoreSample},
                             "lat_p50", "lat_p99",        # worst over its runtimes
                             "completed", "errors",       # summed
                             "host_mem", "device_mem",    # summed, None if unknown
                             "runtimes": int}},
         "unattributed": [{"tag", "pid", "job_id", "cores", "reason"}],
         "idle_allocated": {job_id: [assigned cores with 0 util]}}

    `by_job` holds only jobs with at least one runtime; `idle_allocated` only
    jobs with at least one idle assigned core. Job ids are int keys (json.dumps
    turns them into strings). `reason` is "unknown_job" (tagged for a job not
    placed here) or "no_match" (no tag, pid or core overlap): an orphan.
    """
    placements = list(jobs)
    by_id = {job.job_id: job for job in placements}
    by_pid = {job.pid: job for job in placements if job.pid is not None}
    by_job: dict[int, dict[str, Any]] = {}
    unattributed: list[dict[str, Any]] = []
    for runtime in sample["runtimes"]:
        job, reason = _match(runtime, by_id, by_pid, placements)
        if job is None:
            unattributed.append(_orphan(runtime, reason))
        else:
            _add_runtime(by_job.setdefault(job.job_id, _empty_job_usage()), runtime, sample["cores"])
    return {
        "by_job": by_job,
        "unattributed": unattributed,
        "idle_allocated": _idle_allocated(placements, sample["cores"]),
    }


def _match(
    runtime: RuntimeSample,
    by_id: dict[int, JobPlacement],
    by_pid: dict[int, JobPlacement],
    placements: list[JobPlacement],
) -> tuple[JobPlacement | None, str]:
    if runtime["job_id"] is not None:
        job = by_id.get(runtime["job_id"])
        return job, "" if job else "unknown_job"
    if runtime["pid"] in by_pid:
        return by_pid[runtime["pid"]], ""
    held = set(runtime["cores"])
    best, best_overlap = None, 0
    for job in sorted(placements, key=lambda j: j.job_id):
        overlap = len(held.intersection(job.cores))
        if overlap > best_overlap:
            best, best_overlap = job, overlap
    return best, "" if best else "no_match"


def _orphan(runtime: RuntimeSample, reason: str) -> dict[str, Any]:
    return {
        "tag": runtime["tag"],
        "pid": runtime["pid"],
        "job_id": runtime["job_id"],
        "cores": list(runtime["cores"]),
        "reason": reason,
    }


def _empty_job_usage() -> dict[str, Any]:
    return {
        "cores": {},
        "lat_p50": None,
        "lat_p99": None,
        "completed": 0,
        "errors": 0,
        "host_mem": None,
        "device_mem": None,
        "runtimes": 0,
    }


def _add_runtime(usage: dict[str, Any], runtime: RuntimeSample, cores: dict[str, CoreSample]) -> None:
    """Fold one runtime into a job's usage (a job can run several processes,
    e.g. one runtime per data-parallel worker, all with the same tag)."""
    for core in runtime["cores"]:
        key = str(core)
        if key in cores:
            usage["cores"][key] = cores[key]
    usage["lat_p50"] = _max_opt(usage["lat_p50"], runtime["lat_p50"])
    usage["lat_p99"] = _max_opt(usage["lat_p99"], runtime["lat_p99"])
    usage["completed"] += runtime["completed"]
    usage["errors"] += runtime["errors"]
    usage["host_mem"] = _sum_opt(usage["host_mem"], runtime["host_mem"])
    usage["device_mem"] = _sum_opt(usage["device_mem"], runtime["device_mem"])
    usage["runtimes"] += 1


def _idle_allocated(placements: list[JobPlacement], cores: dict[str, CoreSample]) -> dict[int, list[int]]:
    idle: dict[int, list[int]] = {}
    for job in placements:
        quiet = [c for c in sorted(job.cores) if not (cores.get(str(c)) or {}).get("util")]
        if quiet:
            idle[job.job_id] = quiet
    return idle


def _max_opt(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def _sum_opt(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else a + b


# --------------------------------------------------------------------------
# Streams, replay and config
# --------------------------------------------------------------------------

OnError = Callable[[MalformedReport, "str | bytes"], None]


def iter_reports(
    stream: Iterable[str | bytes],
    on_error: OnError | None = None,
    clock: Callable[[], float] = time.time,
    *,
    per_cpu: bool = True,
) -> Iterator[Report]:
    """Yield a sample per report line of `stream` (a file, a pipe, a list).

    Blank lines are skipped silently. Malformed lines are skipped and passed to
    `on_error(exc, line)`, so the caller can count and log them; one bad line
    must never stop the live stream. Each sample is stamped with `clock()`.
    """
    for line in stream:
        try:
            sample = parse_report(line, ts=clock(), per_cpu=per_cpu)
        except MalformedReport as exc:
            if on_error is not None:
                on_error(exc, line)
            continue
        if sample is not None:
            yield sample


def replay(
    path: str | Path,
    period: float = 1.0,
    pace: bool = True,
    loop: bool = False,
    on_error: OnError | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> Iterator[Report]:
    """Replay a recorded .jsonl of reports as live samples, marked "replay": True.

    Reports are yielded `period` seconds apart when `pace` (neuron-monitor
    prints one report per period, 1 s in our config; recorded files carry no
    timestamps), each stamped with the current time so charts treat them as
    live. `loop` starts again at the end (a demo or dev host without Neuron).
    Pacing is against a schedule, so slow consumers do not accumulate drift.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    next_at = time.monotonic()
    while True:
        for sample in iter_reports(lines, on_error=on_error, clock=clock):
            if pace:
                delay = next_at - time.monotonic()
                if delay > 0:
                    sleep(delay)
                next_at += period
            # iter_reports stamped the sample when it parsed it, one period before
            # it is due; stamp it again when it is actually emitted.
            sample["ts"] = clock()
            sample["replay"] = True
            yield sample
        if not loop or not lines:
            return


_DURATION_RE = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$")


def monitor_config(
    period: str = "1s",
    tag_filter: str = ".*",
    hw_counters_period: str | None = None,
) -> dict[str, Any]:
    """The neuron-monitor config the agent writes and passes with `-c`.

    Same groups as the documented example (neuron.md §1.2): every app-level
    group for every app matching `tag_filter`, plus vcpu_usage, memory_info and
    neuron_hw_counters. The documented example polls neuron_hw_counters every
    2 s; by default we keep it at `period` so every sample carries ECC counts
    (a report only holds the groups that were due, neuron.md §1.1).
    """
    for value in (period, hw_counters_period):
        if value is not None and not _DURATION_RE.match(value):
            raise ValueError(f"not a duration like '1s' or '500ms': {value!r}")
    hw_counters: dict[str, str] = {"type": "neuron_hw_counters"}
    if hw_counters_period is not None:
        hw_counters = {"period": hw_counters_period, "type": "neuron_hw_counters"}
    return {
        "period": period,
        "neuron_runtimes": [
            {
                "tag_filter": tag_filter,
                "metrics": [
                    {"type": "neuroncore_counters"},
                    {"type": "memory_used"},
                    {"type": "neuron_runtime_vcpu_usage"},
                    {"type": "execution_stats"},
                ],
            }
        ],
        "system_metrics": [
            {"type": "vcpu_usage"},
            {"type": "memory_info"},
            hw_counters,
        ],
    }


def dump_sample(sample: Report) -> str:
    """Compact JSON of a sample, as published to the Redis stream."""
    return json.dumps(sample, separators=(",", ":"))
