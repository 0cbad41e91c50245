"""neuron-monitor reader: every sample in tests/data/neuron-monitor, the compact
sample shape, malformed lines, attribution to jobs, replay and the config.

The samples are copies of /work/shared/reference/samples/neuron-monitor (built
from the documented format, not captured on hardware). Expected values are
computed from the raw JSON, not copied by hand. No Django.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from neuron_workers.readers.neuron_monitor import (
    JobPlacement,
    MalformedReport,
    attribute,
    dump_sample,
    iter_reports,
    job_id_from_tag,
    monitor_config,
    parse_report,
    replay,
)

DATA = Path(__file__).parent / "data" / "neuron-monitor"
ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted(p.name for p in DATA.glob("*.jsonl"))
SAMPLE_KEYS = {"ts", "kind", "cores", "runtimes", "vcpu", "per_cpu", "mem", "ecc", "hw",
               "instance_type", "errors"}
RUNTIME_KEYS = {"tag", "pid", "job_id", "cores", "util", "host_mem", "device_mem", "lat_p50",
                "lat_p99", "completed", "errors", "vcpu_user", "vcpu_system", "error"}
CORE_KEYS = {"util", "mem", "flops", "v3d"}


def lines(name: str) -> list[str]:
    return (DATA / name).read_text().splitlines()


def raw_reports(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(name)]


def parsed(name: str) -> list[dict[str, Any]]:
    return [parse_report(line, ts=1000.0 + i) for i, line in enumerate(lines(name))]


def first_raw(name: str) -> dict[str, Any]:
    return raw_reports(name)[0]


def runtime_of(raw: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return raw["neuron_runtime_data"][index]


def line_of(raw: dict[str, Any]) -> str:
    return json.dumps(raw)


# --- every sample ------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_it_parses_every_report_of_every_sample_into_the_documented_shape(name: str) -> None:
    samples = parsed(name)

    assert len(samples) == len(lines(name))
    for i, sample in enumerate(samples):
        assert set(sample) == SAMPLE_KEYS
        assert sample["ts"] == 1000.0 + i
        assert sample["kind"] == "neuron"
        assert json.loads(dump_sample(sample)) == json.loads(json.dumps(sample))
        for core in sample["cores"].values():
            assert set(core) == CORE_KEYS
        for runtime in sample["runtimes"]:
            assert set(runtime) == RUNTIME_KEYS


@pytest.mark.parametrize("name", SAMPLES)
def test_it_takes_hardware_host_memory_and_cpu_from_every_sample(name: str) -> None:
    for raw, sample in zip(raw_reports(name), parsed(name)):
        info, system = raw["neuron_hardware_info"], raw["system_data"]
        assert sample["hw"]["device_count"] == info["neuron_device_count"]
        assert sample["hw"]["cores_per_device"] == info["neuroncore_per_device_count"]
        assert sample["hw"]["device_type"] == info.get("neuron_device_type")
        assert sample["hw"]["core_version"] == info.get("neuroncore_version")
        assert sample["instance_type"] == raw["instance_info"]["instance_type"]
        assert sample["mem"] == {"total": system["memory_info"]["memory_total_bytes"],
                                 "used": system["memory_info"]["memory_used_bytes"]}
        average = system["vcpu_usage"]["average_usage"]
        assert sample["vcpu"] == {k: average[k] for k in ("user", "system", "idle")}
        per_cpu = system["vcpu_usage"]["usage_data"]
        assert set(sample["per_cpu"]) == set(per_cpu)
        for idx, cpu in per_cpu.items():
            assert sample["per_cpu"][idx] == pytest.approx(100 - cpu["idle"] - cpu["io_wait"], abs=0.01)


@pytest.mark.parametrize("name", SAMPLES)
def test_it_reports_each_runtimes_cores_util_memory_and_counts(name: str) -> None:
    for raw, sample in zip(raw_reports(name), parsed(name)):
        assert len(sample["runtimes"]) == len(raw["neuron_runtime_data"])
        for rt_raw, rt in zip(raw["neuron_runtime_data"], sample["runtimes"]):
            report = rt_raw["report"]
            in_use = report["neuroncore_counters"]["neuroncores_in_use"]
            used = report["memory_used"]["neuron_runtime_used_bytes"]
            stats = report["execution_stats"]
            assert rt["tag"] == rt_raw["neuron_runtime_tag"]
            assert rt["pid"] == rt_raw["pid"]
            assert rt["util"] == {k: v["neuroncore_utilization"] for k, v in in_use.items()}
            assert rt["cores"] == sorted(int(k) for k in in_use)
            assert rt["host_mem"] == used["host"]
            assert rt["device_mem"] == used["neuron_device"]
            assert rt["lat_p50"] == stats["latency_stats"]["total_latency"]["p50"]
            assert rt["lat_p99"] == stats["latency_stats"]["total_latency"]["p99"]
            assert rt["completed"] == stats["execution_summary"]["completed"]
            assert rt["errors"] == 0
            assert rt["vcpu_user"] == report["neuron_runtime_vcpu_usage"]["vcpu_usage"]["user"]
            assert rt["error"] == ""
            for key, parts in used["usage_breakdown"]["neuroncore_memory_usage"].items():
                assert sample["cores"][key]["mem"] == sum(parts.values())
                assert sample["cores"][key]["util"] == in_use[key]["neuroncore_utilization"]


# --- one sample each ---------------------------------------------------------


def test_it_separates_the_two_trn1_jobs_by_tag_and_cores() -> None:
    samples = parsed("trn1.32xlarge-two-jobs.jsonl")

    assert len(samples) == 10
    for sample in samples:
        by_tag = {rt["tag"]: rt for rt in sample["runtimes"]}
        assert set(by_tag) == {"job-41", "job-42"}
        assert by_tag["job-41"]["job_id"] == 41 and by_tag["job-41"]["cores"] == list(range(8))
        assert by_tag["job-42"]["job_id"] == 42 and by_tag["job-42"]["cores"] == [8, 9]
        assert sorted(sample["cores"], key=int) == [str(c) for c in range(10)]
        assert all(core["flops"] > 0 and core["v3d"] is None for core in sample["cores"].values())
        assert sample["ecc"] == {"mem_corrected": 0, "mem_uncorrected": 0,
                                 "sram_corrected": 0, "sram_uncorrected": 0}
        assert sample["hw"] == {"device_count": 16, "cores_per_device": 2,
                                "device_type": "trainium", "core_version": "v2"}
        assert sample["errors"] == []


def test_it_reports_no_runtimes_and_no_cores_on_an_idle_host() -> None:
    for sample in parsed("inf2.xlarge-idle.jsonl"):
        assert sample["runtimes"] == []
        assert sample["cores"] == {}
        assert sample["ecc"] is not None
        assert sample["hw"]["device_count"] == 1


def test_it_keeps_the_pid_as_tag_and_no_job_id_for_an_untagged_runtime() -> None:
    raw = first_raw("inf2.48xlarge-untagged.jsonl")

    runtime = parsed("inf2.48xlarge-untagged.jsonl")[0]["runtimes"][0]

    assert runtime["tag"] == str(runtime_of(raw)["pid"]) == "9120"
    assert runtime["job_id"] is None
    assert runtime["cores"] == [0, 1, 2, 3]


def test_it_accepts_old_tools_without_flops_and_with_minimal_hardware_info() -> None:
    sample = parsed("inf1.xlarge-old-tools.jsonl")[0]

    assert all(core["flops"] is None for core in sample["cores"].values())
    assert sample["hw"] == {"device_count": 1, "cores_per_device": 4,
                            "device_type": None, "core_version": None}
    # The percentile keys come in another order (p100 before p25) on old tools.
    assert sample["runtimes"][0]["lat_p50"] == 0.01265
    assert sample["runtimes"][0]["lat_p99"] == 0.01375


def test_it_reports_ecc_none_and_the_errors_of_a_container_without_driver() -> None:
    sample = parsed("container-no-driver.jsonl")[0]

    assert sample["ecc"] is None
    assert sample["runtimes"] == [] and sample["cores"] == {}
    assert sample["hw"]["device_count"] == 0
    assert "neuron_hw_counters: failed to read hardware counters" in sample["errors"]
    assert "neuron_hardware_info: unable to read device information from the driver" in sample["errors"]
    assert sample["mem"]["total"] == 17179869184  # host metrics still arrive


def test_it_keeps_the_trn2_per_physical_core_v3d_breakdown() -> None:
    raw = first_raw("trn2.48xlarge-v3d.jsonl")
    in_use = runtime_of(raw)["report"]["neuroncore_counters"]["neuroncores_in_use"]

    sample = parsed("trn2.48xlarge-v3d.jsonl")[0]

    assert sample["hw"]["core_version"] == "v3d"
    assert sample["runtimes"][0]["job_id"] == 90
    for key, counter in in_use.items():
        expected = {n: p["neuroncore_utilization"] for n, p in counter["v3d"].items()}
        assert sample["cores"][key]["v3d"] == expected
    assert sample["cores"]["0"]["v3d"] == {"nc_v3.0": 21.01, "nc_v3.1": 63.01}


# --- variations built from the samples ---------------------------------------


def test_it_reports_no_latency_when_no_model_ran() -> None:
    raw = first_raw("trn2.48xlarge-v3d.jsonl")
    stats = runtime_of(raw)["report"]["execution_stats"]
    stats["latency_stats"] = {"total_latency": None, "device_latency": None}
    stats["execution_summary"]["completed"] = 0

    runtime = parse_report(line_of(raw))["runtimes"][0]

    assert (runtime["lat_p50"], runtime["lat_p99"], runtime["completed"]) == (None, None, 0)
    stats["latency_stats"] = None
    assert parse_report(line_of(raw))["runtimes"][0]["lat_p50"] is None


def test_it_takes_the_max_util_and_sums_memory_when_runtimes_share_a_core() -> None:
    raw = first_raw("inf2.48xlarge-untagged.jsonl")
    second = copy.deepcopy(runtime_of(raw))
    second["pid"], second["neuron_runtime_tag"] = 9999, "job-7"
    second["report"]["neuroncore_counters"]["neuroncores_in_use"]["0"]["neuroncore_utilization"] = 99.5
    second["report"]["neuroncore_counters"]["neuroncores_in_use"]["1"]["neuroncore_utilization"] = 1.0
    raw["neuron_runtime_data"].append(second)
    first_in_use = runtime_of(raw)["report"]["neuroncore_counters"]["neuroncores_in_use"]
    mem0 = sum(runtime_of(raw)["report"]["memory_used"]["neuron_runtime_used_bytes"]
               ["usage_breakdown"]["neuroncore_memory_usage"]["0"].values())

    sample = parse_report(line_of(raw))

    assert sample["cores"]["0"]["util"] == 99.5
    assert sample["cores"]["1"]["util"] == first_in_use["1"]["neuroncore_utilization"]
    assert sample["cores"]["0"]["mem"] == 2 * mem0
    assert sample["cores"]["0"]["flops"] == first_in_use["0"]["flops"]
    assert [rt["util"]["0"] for rt in sample["runtimes"]] == [
        first_in_use["0"]["neuroncore_utilization"], 99.5]


def test_it_counts_a_core_holding_memory_but_not_in_use_as_idle() -> None:
    raw = first_raw("trn2.48xlarge-v3d.jsonl")
    del runtime_of(raw)["report"]["neuroncore_counters"]["neuroncores_in_use"]["1"]

    sample = parse_report(line_of(raw))

    assert sample["cores"]["1"]["util"] == 0.0
    assert sample["cores"]["1"]["mem"] > 0
    assert sample["runtimes"][0]["cores"] == [0, 1]  # it still holds core 1


def test_it_counts_executions_that_did_not_complete_cleanly_as_errors() -> None:
    raw = first_raw("trn2.48xlarge-v3d.jsonl")
    summary = runtime_of(raw)["report"]["execution_stats"]["execution_summary"]
    summary.update(completed_with_err=2, timed_out=1, failed_to_queue=3)

    assert parse_report(line_of(raw))["runtimes"][0]["errors"] == 6


def test_it_surfaces_runtime_and_group_errors() -> None:
    raw = first_raw("trn2.48xlarge-v3d.jsonl")
    runtime_of(raw)["report"]["memory_used"]["error"] = "boom"

    assert parse_report(line_of(raw))["runtimes"][0]["error"] == "memory_used: boom"
    runtime_of(raw)["error"] = "runtime went away"
    assert parse_report(line_of(raw))["runtimes"][0]["error"] == "runtime went away"


def test_it_accepts_reports_with_only_some_groups() -> None:
    raw = first_raw("trn1.32xlarge-two-jobs.jsonl")
    del raw["system_data"]["neuron_hw_counters"]
    for runtime in raw["neuron_runtime_data"]:
        del runtime["report"]["memory_used"], runtime["report"]["execution_stats"]

    sample = parse_report(line_of(raw))

    assert sample["ecc"] is None
    assert sample["cores"]["0"]["mem"] is None
    assert sample["runtimes"][0]["device_mem"] is None
    assert sample["runtimes"][0]["completed"] == 0


def test_it_accepts_bytes_and_stamps_the_current_time_by_default() -> None:
    before = time.time()

    sample = parse_report(lines("inf2.xlarge-idle.jsonl")[0].encode() + b"\n")

    assert before <= sample["ts"] <= time.time()


def test_it_returns_none_for_a_blank_line() -> None:
    assert parse_report("  \n") is None
    assert parse_report(b"") is None


# --- malformed lines -----------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "not json at all",
        lines("trn1.32xlarge-two-jobs.jsonl")[0][:500],  # truncated mid-report
        "[1, 2, 3]",
        "42",
        '"neuron_runtime_data"',
        '{"hello": "world"}',
        '{"neuron_runtime_data": {"pid": 1}}',
        '{"neuron_runtime_data": [{"pid": 1, "report": {"neuroncore_counters": '
        '{"neuroncores_in_use": [1, 2]}}}]}',
        '{"neuron_runtime_data": [], "system_data": {"memory_info": '
        '{"memory_total_bytes": "lots"}}}',
        '{"neuron_runtime_data": [], "system_data": {"neuron_hw_counters": '
        '{"neuron_devices": [{"mem_ecc_corrected": 0}, "device 1"]}}}',
        b"\xff\xfe{}",
    ],
)
def test_it_raises_malformed_report_for_lines_that_are_not_reports(line: str | bytes) -> None:
    with pytest.raises(MalformedReport) as excinfo:
        parse_report(line)

    assert isinstance(excinfo.value, ValueError)
    assert str(excinfo.value)


def test_it_names_where_a_report_holds_something_else_than_an_object() -> None:
    raw = first_raw("trn1.32xlarge-two-jobs.jsonl")
    runtime_of(raw, 1)["report"]["neuroncore_counters"]["neuroncores_in_use"] = [8, 9]

    with pytest.raises(MalformedReport, match=r"neuron_runtime_data\[1\]\.report.*\.neuroncores_in_use"):
        parse_report(line_of(raw))


def test_it_skips_and_counts_malformed_lines_while_iterating() -> None:
    good = lines("trn1.32xlarge-two-jobs.jsonl")
    stream = io.StringIO("\n".join([good[0], "garbage", "", good[1], "{}", good[2]]) + "\n")
    bad: list[tuple[str, str | bytes]] = []

    samples = list(iter_reports(stream, on_error=lambda exc, line: bad.append((str(exc), line))))

    assert len(samples) == 3
    assert [line.strip() for _, line in bad] == ["garbage", "{}"]
    assert all(reason for reason, _ in bad)


def test_it_iterates_without_a_callback_and_uses_the_given_clock() -> None:
    ticks = itertools.count(50)

    samples = list(iter_reports(["oops"] + lines("inf2.48xlarge-untagged.jsonl"), clock=lambda: next(ticks)))

    assert [s["ts"] for s in samples] == [51, 52, 53]


# --- job ids and attribution ---------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "job_id"),
    [("job-42", 42), ("job-7", 7), ("job-0042", 42), ("job-", None), ("job-4x", None),
     ("9120", None), ("my_app_1", None), ("xjob-42", None), ("job-42 ", None), (None, None), (42, None)],
)
def test_it_reads_job_ids_only_from_job_tags(tag: object, job_id: int | None) -> None:
    assert job_id_from_tag(tag) == job_id


def test_it_attributes_runtimes_by_tag() -> None:
    raw = first_raw("trn1.32xlarge-two-jobs.jsonl")
    sample = parse_report(line_of(raw))
    jobs = [JobPlacement(41, None, list(range(8))), JobPlacement(42, None, [8, 9])]

    result = attribute(sample, jobs)

    assert set(result["by_job"]) == {41, 42}
    assert sorted(result["by_job"][41]["cores"], key=int) == [str(c) for c in range(8)]
    assert sorted(result["by_job"][42]["cores"], key=int) == ["8", "9"]
    assert result["by_job"][41]["cores"]["0"] == sample["cores"]["0"]
    stats42 = runtime_of(raw, 1)["report"]["execution_stats"]
    assert result["by_job"][42]["completed"] == stats42["execution_summary"]["completed"]
    assert result["by_job"][42]["lat_p99"] == stats42["latency_stats"]["total_latency"]["p99"]
    assert result["by_job"][42]["device_mem"] == sample["runtimes"][1]["device_mem"]
    assert result["by_job"][41]["runtimes"] == 1
    assert result["unattributed"] == []
    assert result["idle_allocated"] == {}
    json.dumps(result)


def test_it_attributes_runtime_by_pid_when_untagged() -> None:
    sample = parsed("inf2.48xlarge-untagged.jsonl")[0]
    # The pid wins even though the job's assigned range does not cover the cores.
    jobs = [JobPlacement(7, 9120, [10, 11]), JobPlacement(8, None, [0, 1, 2, 3])]

    result = attribute(sample, jobs)

    assert set(result["by_job"]) == {7}
    assert sorted(result["by_job"][7]["cores"]) == ["0", "1", "2", "3"]
    assert result["idle_allocated"] == {7: [10, 11]}


def test_it_attributes_an_untagged_runtime_by_core_range_when_the_pid_is_unknown() -> None:
    sample = parsed("inf2.48xlarge-untagged.jsonl")[0]
    jobs = [JobPlacement(5, 1, [4, 5]), JobPlacement(6, 2, [2, 3, 4, 5]), JobPlacement(3, None, [0, 1])]

    result = attribute(sample, jobs)

    # Runtime cores 0-3: job 6 overlaps on 2, job 3 on 2; the tie goes to the lower id.
    assert set(result["by_job"]) == {3}
    assert result["unattributed"] == []
    assert result["idle_allocated"] == {5: [4, 5], 6: [4, 5]}


def test_it_reports_an_untagged_runtime_on_unassigned_cores_as_an_orphan() -> None:
    sample = parsed("inf2.48xlarge-untagged.jsonl")[0]

    result = attribute(sample, [JobPlacement(12, 4242, [20, 21])])

    assert result["by_job"] == {}
    assert result["unattributed"] == [
        {"tag": "9120", "pid": 9120, "job_id": None, "cores": [0, 1, 2, 3], "reason": "no_match"}
    ]
    assert result["idle_allocated"] == {12: [20, 21]}


def test_it_reports_a_runtime_tagged_for_a_job_not_placed_here_as_an_orphan() -> None:
    sample = parsed("trn1.32xlarge-two-jobs.jsonl")[0]
    # job 41 finished; its process still holds cores 0-7, which job 50 now owns.
    jobs = [JobPlacement(50, None, list(range(8))), JobPlacement(42, None, [8, 9])]

    result = attribute(sample, jobs)

    assert set(result["by_job"]) == {42}
    assert result["unattributed"] == [
        {"tag": "job-41", "pid": 48211, "job_id": 41, "cores": list(range(8)), "reason": "unknown_job"}
    ]
    assert result["idle_allocated"] == {}  # the orphan keeps job 50's cores busy


def test_it_lists_allocated_cores_with_zero_util_as_idle() -> None:
    sample = parsed("trn1.32xlarge-two-jobs.jsonl")[0]
    jobs = [JobPlacement(41, 48211, list(range(8))), JobPlacement(42, 48377, [8, 9, 10, 11]),
            JobPlacement(43, None, [12, 13])]

    result = attribute(sample, jobs)

    assert result["idle_allocated"] == {42: [10, 11], 43: [12, 13]}
    assert set(result["by_job"]) == {41, 42}


def test_it_folds_several_runtimes_of_one_job_together() -> None:
    raw = first_raw("trn1.32xlarge-two-jobs.jsonl")
    runtime_of(raw, 1)["neuron_runtime_tag"] = "job-41"  # two data-parallel workers
    sample = parse_report(line_of(raw))
    first, second = sample["runtimes"]

    usage = attribute(sample, [JobPlacement(41, None, list(range(10)))])["by_job"][41]

    assert usage["runtimes"] == 2
    assert len(usage["cores"]) == 10
    assert usage["completed"] == first["completed"] + second["completed"]
    assert usage["device_mem"] == first["device_mem"] + second["device_mem"]
    assert usage["host_mem"] == first["host_mem"] + second["host_mem"]
    assert usage["lat_p99"] == max(first["lat_p99"], second["lat_p99"])


def test_it_attributes_nothing_on_an_idle_host() -> None:
    sample = parsed("inf2.xlarge-idle.jsonl")[0]

    result = attribute(sample, [JobPlacement(1, 123, [0, 1])])

    assert result == {"by_job": {}, "unattributed": [], "idle_allocated": {1: [0, 1]}}


# --- replay ------------------------------------------------------------------------


def test_it_replays_a_recording_at_a_fixed_pace_marked_as_replay() -> None:
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    started = time.monotonic()
    samples = list(replay(DATA / "trn1.32xlarge-two-jobs.jsonl", period=0.02, sleep=sleep))
    elapsed = time.monotonic() - started

    assert len(samples) == 10
    assert all(s["replay"] is True for s in samples)
    assert [rt["tag"] for rt in samples[0]["runtimes"]] == ["job-41", "job-42"]
    # The first report comes at once, then one per period on a fixed schedule: the
    # last is due 9 periods after the start, no single wait exceeds the period, and
    # the waits never add up to more than the schedule (time spent parsing, or lost
    # to a busy machine, is taken off them, not added). Only lower bounds on time:
    # a loaded machine can make any step late.
    assert elapsed >= 9 * 0.02 - 1e-6
    assert all(0 < d <= 0.02 for d in sleeps)
    assert sum(sleeps) <= 9 * 0.02 + 1e-6


def test_it_replays_without_pacing_and_loops_when_asked() -> None:
    stream = replay(DATA / "inf2.48xlarge-untagged.jsonl", pace=False, loop=True,
                    sleep=lambda _: pytest.fail("must not sleep"))

    samples = list(itertools.islice(stream, 7))

    assert len(samples) == 7
    assert samples[0]["runtimes"][0]["completed"] == samples[3]["runtimes"][0]["completed"]


def test_it_replays_in_real_time_a_period_apart() -> None:
    start = time.monotonic()

    samples = list(replay(DATA / "inf2.xlarge-idle.jsonl", period=0.05))

    assert len(samples) == 3
    assert time.monotonic() - start >= 2 * 0.05 - 1e-6
    assert samples[0]["ts"] <= samples[1]["ts"] <= samples[2]["ts"]


def test_it_skips_malformed_lines_during_replay(tmp_path: Path) -> None:
    recording = tmp_path / "rec.jsonl"
    recording.write_text("\n".join([lines("inf2.xlarge-idle.jsonl")[0], "half a rep",
                                    lines("inf2.xlarge-idle.jsonl")[1]]) + "\n")
    bad: list[str | bytes] = []

    samples = list(replay(recording, pace=False, on_error=lambda exc, line: bad.append(line)))

    assert len(samples) == 2 and bad == ["half a rep"]


# --- config --------------------------------------------------------------------


def test_it_builds_the_documented_monitor_config() -> None:
    config = monitor_config()

    assert config["period"] == "1s"
    (selector,) = config["neuron_runtimes"]
    assert selector["tag_filter"] == ".*"
    assert [m["type"] for m in selector["metrics"]] == [
        "neuroncore_counters", "memory_used", "neuron_runtime_vcpu_usage", "execution_stats"]
    assert [m["type"] for m in config["system_metrics"]] == [
        "vcpu_usage", "memory_info", "neuron_hw_counters"]
    assert all("period" not in m for m in config["system_metrics"])
    json.dumps(config)


def test_it_sets_the_period_tag_filter_and_ecc_period() -> None:
    config = monitor_config(period="500ms", tag_filter="job-.*", hw_counters_period="2s")

    assert config["period"] == "500ms"
    assert config["neuron_runtimes"][0]["tag_filter"] == "job-.*"
    assert config["system_metrics"][2] == {"period": "2s", "type": "neuron_hw_counters"}


@pytest.mark.parametrize("period", ["1", "one second", "1 s", "", "-1s"])
def test_it_rejects_periods_that_are_not_durations(period: str) -> None:
    with pytest.raises(ValueError):
        monitor_config(period=period)


# --- purity and speed ---------------------------------------------------------------


def test_the_readers_import_no_django_torch_or_redis() -> None:
    code = (
        "import sys; import neuron_workers.readers, neuron_workers.readers.neuron_ls, "
        "neuron_workers.readers.neuron_monitor, neuron_workers.readers.os_sampler; "
        "print(sorted(m for m in ('django', 'torch', 'redis', 'celery') if m in sys.modules))"
    )

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"


def test_parsing_a_trn1_report_costs_at_most_a_few_json_loads() -> None:
    # A smoke check with a wide margin; the real measurement belongs to bench/. A ratio,
    # not a time, each side's best of rounds taken in turn, so a machine busy with
    # something else slows both sides alike.
    line = lines("trn1.32xlarge-two-jobs.jsonl")[0]
    best = {parse_report: float("inf"), json.loads: float("inf")}

    for _ in range(5):
        for fn in best:
            start = time.perf_counter()
            for _ in range(100):
                fn(line)
            best[fn] = min(best[fn], time.perf_counter() - start)

    assert best[parse_report] < 4 * best[json.loads], best


def test_it_leaves_out_the_per_cpu_breakdown_when_asked_and_keeps_the_rest() -> None:
    line = lines("trn1.32xlarge-two-jobs.jsonl")[0]

    full, lean = parse_report(line, ts=1.0), parse_report(line, ts=1.0, per_cpu=False)

    assert full["per_cpu"] and lean["per_cpu"] is None
    assert {**full, "per_cpu": None} == lean
    assert [s["per_cpu"] for s in iter_reports([line], per_cpu=False)] == [None]
