"""OS sampler for CPU hosts: /proc/stat deltas and /proc/meminfo in the same
sample shape as neuron-monitor samples, labelled kind "host". No Django."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuron_workers.readers.neuron_monitor import parse_report
from neuron_workers.readers.os_sampler import CpuTimes, read_cpu_times, read_meminfo, sample_os

DATA = Path(__file__).parent / "data" / "neuron-monitor"

MEMINFO = """MemTotal:       16384000 kB
MemFree:         1000000 kB
MemAvailable:   12288000 kB
Buffers:          100000 kB
HugePages_Total:       0
"""


def write_proc(root: Path, stat_lines: list[str], meminfo: str | None = MEMINFO) -> Path:
    proc = root / "proc"
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "stat").write_text("\n".join(stat_lines + ["intr 12345 0 0", "ctxt 999", "btime 1"]) + "\n")
    if meminfo is not None:
        (proc / "meminfo").write_text(meminfo)
    return root


# user nice system idle iowait irq softirq steal guest guest_nice
BEFORE = [
    "cpu  1000 0 500 8000 100 0 0 0 0 0",
    "cpu0 500 0 250 4000 50 0 0 0 0 0",
    "cpu1 500 0 250 4000 50 0 0 0 0 0",
]
AFTER = [
    # +100 jiffies per CPU: cpu0 60 user, 20 system, 10 idle, 10 iowait;
    # cpu1 10 user, 0 system, 90 idle.
    "cpu  1070 0 520 8100 110 0 0 0 0 0",
    "cpu0 560 0 270 4010 60 0 0 0 0 0",
    "cpu1 510 0 250 4090 50 0 0 0 0 0",
]


def test_it_returns_no_cpu_percentages_on_the_first_call(tmp_path: Path) -> None:
    root = write_proc(tmp_path, BEFORE)

    sample, times = sample_os(None, root=root, ts=5.0)

    assert sample["vcpu"] is None and sample["per_cpu"] is None
    assert sample["ts"] == 5.0
    assert isinstance(times, CpuTimes)
    assert set(times.per_cpu) == {"cpu", "0", "1"}


def test_it_computes_cpu_percentages_from_the_previous_reading(tmp_path: Path) -> None:
    _, prev = sample_os(None, root=write_proc(tmp_path, BEFORE))

    sample, _ = sample_os(prev, root=write_proc(tmp_path, AFTER))

    # Aggregate: 200 jiffies, 70 user, 20 system, 100 idle, 10 iowait.
    assert sample["vcpu"] == {"user": 35.0, "system": 10.0, "idle": 50.0}
    # busy = 100 - idle - iowait, the rule the neuron-monitor reader uses too.
    assert sample["per_cpu"] == {"0": 80.0, "1": 10.0}


def test_it_reads_total_and_used_memory(tmp_path: Path) -> None:
    sample, _ = sample_os(None, root=write_proc(tmp_path, BEFORE))

    assert sample["mem"] == {"total": 16384000 * 1024, "used": (16384000 - 12288000) * 1024}
    assert sample["errors"] == []


def test_it_labels_the_sample_as_host_metrics_in_the_neuron_sample_shape(tmp_path: Path) -> None:
    neuron = parse_report((DATA / "inf2.xlarge-idle.jsonl").read_text().splitlines()[0])

    sample, _ = sample_os(None, root=write_proc(tmp_path, BEFORE), instance_type="m5.large")

    assert set(sample) == set(neuron)
    assert sample["kind"] == "host"
    assert sample["cores"] == {} and sample["runtimes"] == []
    assert sample["ecc"] is None
    assert sample["hw"] == {"device_count": 0, "cores_per_device": 0,
                            "device_type": None, "core_version": None}
    assert sample["instance_type"] == "m5.large"
    json.dumps(sample)


def test_it_reports_an_error_when_meminfo_is_missing(tmp_path: Path) -> None:
    sample, _ = sample_os(None, root=write_proc(tmp_path, BEFORE, meminfo=None))

    assert sample["mem"] is None
    assert sample["errors"] == ["memory_info: /proc/meminfo unreadable"]


def test_it_falls_back_to_memfree_on_old_kernels(tmp_path: Path) -> None:
    write_proc(tmp_path, BEFORE, meminfo="MemTotal: 2000 kB\nMemFree: 500 kB\n")

    assert read_meminfo(tmp_path) == {"total": 2000 * 1024, "used": 1500 * 1024}


def test_it_skips_cpus_that_came_online_and_clamps_counter_resets(tmp_path: Path) -> None:
    _, prev = sample_os(None, root=write_proc(tmp_path, BEFORE))
    after = AFTER + ["cpu2 10 0 10 80 0 0 0 0 0 0"]
    after[2] = "cpu1 0 0 0 100 0 0 0 0 0 0"  # went offline and back: counters reset

    sample, _ = sample_os(prev, root=write_proc(tmp_path, after))

    assert set(sample["per_cpu"]) == {"0", "1"}
    assert sample["per_cpu"]["1"] == 0.0


def test_it_reports_no_cpu_percentages_when_no_time_passed(tmp_path: Path) -> None:
    _, prev = sample_os(None, root=write_proc(tmp_path, BEFORE))

    sample, _ = sample_os(prev, root=write_proc(tmp_path, BEFORE))

    assert sample["vcpu"] is None
    assert sample["per_cpu"] == {"0": 0.0, "1": 0.0}


def test_it_pads_short_stat_lines_of_old_kernels(tmp_path: Path) -> None:
    write_proc(tmp_path, ["cpu  1 2 3 4", "cpu0 1 2 3 4"])

    assert read_cpu_times(tmp_path).per_cpu["0"] == (1, 2, 3, 4, 0, 0, 0, 0)


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc")
def test_it_samples_this_machine() -> None:
    _, prev = sample_os(None)

    sample, _ = sample_os(prev)

    assert sample["mem"]["total"] > sample["mem"]["used"] > 0
    assert sample["per_cpu"] is not None
    assert all(0.0 <= busy <= 100.0 for busy in sample["per_cpu"].values())
