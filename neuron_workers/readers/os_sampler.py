"""Host metrics from /proc for hosts without Neuron devices (pure, Django-free).

DESIGN.md §5: on CPU hosts the agent samples the OS instead of neuron-monitor,
"in the same sample shape, clearly labelled as host metrics". So `sample_os`
returns the Report shape documented in neuron_monitor.py with kind "host",
no cores and no runtimes; vcpu/per_cpu come from /proc/stat deltas and mem from
/proc/meminfo.

CPU percentages need two readings: pass the CpuTimes returned by the previous
call. The first call (prev=None) has vcpu and per_cpu None.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from neuron_workers.readers.neuron_monitor import Report, empty_hw

__all__ = ["CpuTimes", "read_cpu_times", "read_meminfo", "sample_os"]

# /proc/stat columns after the cpu label (proc(5)). guest and guest_nice are
# already included in user and nice, so they are left out of the total.
_USER, _NICE, _SYSTEM, _IDLE, _IOWAIT, _IRQ, _SOFTIRQ, _STEAL = range(8)


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative jiffies per CPU from /proc/stat.

    `per_cpu` maps "cpu" (the aggregate line) and "0", "1", ... to the first
    eight counters: user nice system idle iowait irq softirq steal.
    """

    per_cpu: dict[str, tuple[int, ...]]


def read_cpu_times(root: str | Path = "/") -> CpuTimes:
    """Parse <root>/proc/stat. Raises OSError if it cannot be read."""
    per_cpu: dict[str, tuple[int, ...]] = {}
    text = (Path(root) / "proc" / "stat").read_text(encoding="ascii")
    for line in text.splitlines():
        if not line.startswith("cpu"):
            continue
        label, *values = line.split()
        counters = tuple(int(v) for v in values[:8])
        # Old kernels print fewer columns; pad so indexes stay valid.
        per_cpu["cpu" if label == "cpu" else label[3:]] = counters + (0,) * (8 - len(counters))
    return CpuTimes(per_cpu)


def read_meminfo(root: str | Path = "/") -> dict[str, int] | None:
    """{"total", "used"} in bytes from <root>/proc/meminfo, or None if unreadable.

    used = MemTotal - MemAvailable: what applications cannot get back, the
    usual "used" (page cache is reclaimable, so it is not counted).
    """
    try:
        text = (Path(root) / "proc" / "meminfo").read_text(encoding="ascii")
    except OSError:
        return None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024  # values are in kB
    total = fields.get("MemTotal")
    if total is None:
        return None
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    return {"total": total, "used": max(0, total - available)}


def sample_os(
    prev: CpuTimes | None,
    root: str | Path = "/",
    ts: float | None = None,
    instance_type: str | None = None,
) -> tuple[Report, CpuTimes]:
    """One host sample and the CPU counters to pass to the next call.

    Reads only <root>/proc/stat and <root>/proc/meminfo (`root` lets tests use
    a fixture tree). vcpu/per_cpu are percentages over the interval since
    `prev`; per_cpu busy = 100 - idle - iowait, the same rule the neuron-monitor
    reader uses, so both kinds of sample chart the same quantity.
    """
    now = read_cpu_times(root)
    errors: list[str] = []
    mem = read_meminfo(root)
    if mem is None:
        errors.append("memory_info: /proc/meminfo unreadable")
    sample: Report = {
        "ts": time.time() if ts is None else float(ts),
        "kind": "host",
        "cores": {},
        "runtimes": [],
        "vcpu": _vcpu(prev, now),
        "per_cpu": _per_cpu(prev, now),
        "mem": mem,
        "ecc": None,
        "hw": empty_hw(),
        "instance_type": instance_type or None,
        "errors": errors,
    }
    return sample, now


def _deltas(prev: tuple[int, ...], now: tuple[int, ...]) -> tuple[list[int], int]:
    """Per-column deltas and their total; negative deltas (a CPU went offline
    and back, counters reset) are clamped to 0."""
    delta = [max(0, b - a) for a, b in zip(prev[:8], now[:8])]
    return delta, sum(delta)


def _vcpu(prev: CpuTimes | None, now: CpuTimes) -> dict[str, float] | None:
    if prev is None or "cpu" not in prev.per_cpu or "cpu" not in now.per_cpu:
        return None
    delta, total = _deltas(prev.per_cpu["cpu"], now.per_cpu["cpu"])
    if total == 0:
        return None
    # neuron-monitor reports user and nice separately and our shape keeps only
    # "user", so nice is left out here too.
    return {
        "user": round(100.0 * delta[_USER] / total, 2),
        "system": round(100.0 * delta[_SYSTEM] / total, 2),
        "idle": round(100.0 * delta[_IDLE] / total, 2),
    }


def _per_cpu(prev: CpuTimes | None, now: CpuTimes) -> dict[str, float] | None:
    if prev is None:
        return None
    busy: dict[str, float] = {}
    for idx, counters in now.per_cpu.items():
        if idx == "cpu" or idx not in prev.per_cpu:
            continue  # the aggregate line, or a CPU that just came online
        delta, total = _deltas(prev.per_cpu[idx], counters)
        quiet = delta[_IDLE] + delta[_IOWAIT]
        busy[idx] = round(100.0 * (total - quiet) / total, 2) if total else 0.0
    return busy
