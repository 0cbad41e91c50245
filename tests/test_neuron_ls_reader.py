"""neuron-ls reader: every sample in tests/data/neuron-ls, family detection,
the instance table and running the tool.

The samples are copies of /work/shared/reference/samples/neuron-ls (built from
the documented `neuron-ls -j` format, not captured on hardware). No Django.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest

from neuron_workers.readers.neuron_ls import (
    GIB,
    INSTANCE_TYPES,
    HostInventory,
    NeuronLsError,
    NeuronProcess,
    cpu_inventory,
    detect_instance_type,
    family_for_instance_type,
    find_tool,
    parse_neuron_ls,
    read_meminfo_total,
    run_neuron_ls,
)

DATA = Path(__file__).parent / "data" / "neuron-ls"
SAMPLES = sorted(p.name for p in DATA.glob("*.json"))


def sample_text(name: str) -> str:
    return (DATA / name).read_text()


def sample_raw(name: str) -> list[dict]:
    return json.loads(sample_text(name))


# The family each sample's device shape implies (no instance type given).
EXPECTED_FAMILY = {
    "inf1.xlarge-old-tools.json": "inf1",
    "inf2.48xlarge.json": "inf2",
    "inf2.xlarge.json": "inf2",
    "trn1.32xlarge.json": "trn1",
}


def test_every_sample_is_covered_by_the_expectations() -> None:
    assert SAMPLES == sorted(EXPECTED_FAMILY)


@pytest.mark.parametrize("name", SAMPLES)
def test_it_counts_devices_cores_and_memory_of_every_sample(name: str) -> None:
    raw = sample_raw(name)
    inv = parse_neuron_ls(sample_text(name))

    assert inv.family == EXPECTED_FAMILY[name]
    assert len(inv.devices) == len(raw)
    assert inv.core_count == sum(d["nc_count"] for d in raw)
    assert inv.core_ids == list(range(inv.core_count))
    assert inv.device_memory_bytes == sum(d["memory_size"] for d in raw)
    assert inv.core_memory_bytes == raw[0]["memory_size"] // raw[0]["nc_count"]
    assert [d.index for d in inv.devices] == [d["neuron_device"] for d in raw]


@pytest.mark.parametrize("name", SAMPLES)
def test_its_inventory_round_trips_through_json(name: str) -> None:
    inv = parse_neuron_ls(sample_text(name), instance_type="x", host_memory_bytes=123)

    restored = HostInventory.from_dict(json.loads(json.dumps(inv.to_dict())))

    assert restored == inv


def test_it_reads_trn1_cores_affinity_numa_links_and_processes() -> None:
    inv = parse_neuron_ls(sample_text("trn1.32xlarge.json"))

    assert inv.core_ids == list(range(32))
    assert inv.core_memory_bytes == 16 * GIB
    dev0, dev4, dev15 = inv.devices[0], inv.devices[4], inv.devices[15]
    assert dev0.core_ids == [0, 1] and dev15.core_ids == [30, 31]
    assert dev0.cpu_affinity == "0-31,64-95" and dev15.cpu_affinity == "32-63,96-127"
    assert (dev0.numa_node, dev15.numa_node) == (0, 1)  # strings in neuron-ls
    assert dev0.connected_to == [1, 3, 4, 12]
    assert dev0.bdf == "10:00.0"
    assert dev0.processes == [
        NeuronProcess(48211, "python -m neuron_workers.runner 41", "2.26.43.0")
    ]
    assert dev4.processes[0].pid == 48377
    job41_devices = [d.index for d in inv.devices if any(p.pid == 48211 for p in d.processes)]
    assert job41_devices == [0, 1, 2, 3]  # job-41 holds cores 0-7
    assert all(not d.processes for d in inv.devices[5:])


def test_it_accepts_a_null_connected_to_on_a_single_device_inf2() -> None:
    inv = parse_neuron_ls(sample_text("inf2.xlarge.json"))

    assert inv.family == "inf2"
    assert inv.devices[0].connected_to == []
    assert inv.core_ids == [0, 1]
    assert inv.core_memory_bytes == 16 * GIB
    assert inv.devices[0].processes == []


def test_it_reads_both_numa_nodes_of_inf2_48xlarge() -> None:
    inv = parse_neuron_ls(sample_text("inf2.48xlarge.json"))

    assert inv.core_ids == list(range(24))
    assert {d.numa_node for d in inv.devices[:6]} == {0}
    assert {d.numa_node for d in inv.devices[6:]} == {1}
    assert inv.devices[11].core_ids == [22, 23]


def test_it_derives_core_ids_from_nc_count_when_old_tools_omit_them() -> None:
    inv = parse_neuron_ls(sample_text("inf1.xlarge-old-tools.json"))

    dev = inv.devices[0]
    assert dev.core_ids == [0, 1, 2, 3]
    assert dev.cpu_affinity is None and dev.numa_node is None
    assert dev.connected_to == []
    assert inv.core_memory_bytes == 2 * GIB  # 8 GiB over 4 NeuronCore-v1


def test_it_numbers_derived_core_ids_in_device_order_not_array_order() -> None:
    devices = [
        {"neuron_device": 1, "nc_count": 4, "memory_size": 8 * GIB},
        {"neuron_device": 0, "nc_count": 4, "memory_size": 8 * GIB},
    ]

    inv = parse_neuron_ls(json.dumps(devices))

    assert [(d.index, d.core_ids) for d in inv.devices] == [(0, [0, 1, 2, 3]), (1, [4, 5, 6, 7])]
    assert inv.family == "inf1"


def test_it_reads_a_trn2_device_with_logical_core_config() -> None:
    # The first element of the neuron.md §2.1 doc example (trn2, LNC=2).
    trn2 = {
        "neuron_device": 0, "bdf": "cc:00.0", "cpu_affinity": "48-95,144-191",
        "numa_node": "1", "connected_to": [12, 3, 4, 1], "nc_count": 4,
        "logical_neuroncore_config": 2, "memory_size": 103079215104,
        "neuroncore_ids": [0, 1, 2, 3],
        "neuron_processes": [{"pid": 113985, "command": "neuron-bench exec",
                              "neuron_runtime_version": "2.0.0"}],
    }

    inv = parse_neuron_ls(json.dumps([trn2]))

    assert inv.family == "trn2"
    assert inv.lnc == 2
    assert inv.core_memory_bytes == 24 * GIB  # one 24 GiB HBM bank per logical core


def test_it_prefers_the_instance_type_over_the_device_shape() -> None:
    text = sample_text("inf2.xlarge.json")

    assert parse_neuron_ls(text, instance_type="trn1.2xlarge").family == "trn1"
    assert parse_neuron_ls(text, instance_type="inf2.xlarge").instance_type == "inf2.xlarge"


def test_it_falls_back_to_the_shape_when_the_instance_type_is_not_neuron() -> None:
    inv = parse_neuron_ls(sample_text("trn1.32xlarge.json"), instance_type="m5.large")

    assert inv.family == "trn1"
    assert inv.instance_type == "m5.large"


def test_it_guesses_trn1_2xlarge_from_eight_vcpus_on_one_device() -> None:
    device = {"neuron_device": 0, "cpu_affinity": "0-7", "connected_to": None,
              "nc_count": 2, "memory_size": 32 * GIB, "neuroncore_ids": [0, 1]}

    assert parse_neuron_ls(json.dumps([device])).family == "trn1"


def test_it_returns_a_cpu_inventory_for_empty_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 3)

    for text in ("", "  \n", b"", "[]"):
        inv = parse_neuron_ls(text, instance_type="inf2.xlarge", host_memory_bytes=16 * GIB)
        assert inv.family == "cpu"
        assert inv.core_ids == [0, 1, 2]
        assert inv.devices == []
        assert inv.device_memory_bytes == 0
        assert inv.host_memory_bytes == 16 * GIB
        assert inv.instance_type == "inf2.xlarge"  # kept for pricing
        assert not inv.is_neuron


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"neuron_device": 0}',
        "[1, 2]",
        '[{"nc',
        '[{"neuron_device": 0, "neuroncore_ids": ["a"]}]',
        '[{"neuron_device": 0, "nc_count": 2, "neuron_processes": [7]}]',
    ],
)
def test_it_rejects_output_that_is_not_a_device_array(text: str) -> None:
    with pytest.raises(NeuronLsError):
        parse_neuron_ls(text)


def test_it_builds_a_cpu_inventory_from_explicit_counts() -> None:
    inv = cpu_inventory(cpu_count=4, host_memory_bytes=8 * GIB)

    assert inv.to_dict() == {
        "family": "cpu", "instance_type": "", "devices": [], "core_ids": [0, 1, 2, 3],
        "device_memory_bytes": 0, "core_memory_bytes": 0,
        "host_memory_bytes": 8 * GIB, "lnc": None,
    }


@pytest.mark.parametrize(
    ("instance_type", "family"),
    [
        ("trn1.32xlarge", "trn1"),
        ("trn1n.32xlarge", "trn1"),
        ("trn1.2xlarge", "trn1"),
        ("inf2.xlarge", "inf2"),
        ("inf2.48xlarge", "inf2"),
        ("inf1.6xlarge", "inf1"),
        ("trn2.48xlarge", "trn2"),
        ("trn2u.48xlarge", "trn2"),
        ("TRN1.32XLARGE", "trn1"),
        ("m5.large", ""),
        ("", ""),
        ("trn3", ""),
    ],
)
def test_it_maps_instance_types_to_families(instance_type: str, family: str) -> None:
    assert family_for_instance_type(instance_type) == family


def test_the_instance_table_has_the_priced_neuron_types() -> None:
    required = {
        "inf2.xlarge", "inf2.8xlarge", "inf2.24xlarge", "inf2.48xlarge",
        "trn1.2xlarge", "trn1.32xlarge", "trn1n.32xlarge", "trn2.48xlarge",
    }

    assert required <= set(INSTANCE_TYPES)
    for name, spec in INSTANCE_TYPES.items():
        assert spec.family == family_for_instance_type(name)
        assert spec.on_demand_usd_per_hour > 0
        assert spec.cores % spec.devices == 0


def test_the_instance_table_matches_the_samples() -> None:
    for name, itype in [("trn1.32xlarge.json", "trn1.32xlarge"),
                        ("inf2.48xlarge.json", "inf2.48xlarge"),
                        ("inf2.xlarge.json", "inf2.xlarge"),
                        ("inf1.xlarge-old-tools.json", "inf1.xlarge")]:
        inv = parse_neuron_ls(sample_text(name))
        spec = INSTANCE_TYPES[itype]
        assert (len(inv.devices), inv.core_count) == (spec.devices, spec.cores)
        assert inv.device_memory_bytes == spec.device_memory_bytes
        assert inv.core_memory_bytes == spec.core_memory_bytes


def test_the_instance_table_prices_trn1_32xlarge_from_neuron_md() -> None:
    spec = INSTANCE_TYPES["trn1.32xlarge"]

    assert spec.on_demand_usd_per_hour == 21.50
    assert spec.ri_effective_usd_per_hour == 8.197
    assert spec.cores_per_device == 2
    assert INSTANCE_TYPES["trn2.48xlarge"].cores == 64  # logical cores at LNC=2


def test_it_detects_the_instance_type_from_the_environment_first(tmp_path: Path) -> None:
    dmi = tmp_path / "product_name"
    dmi.write_text("inf2.xlarge\n")

    found = detect_instance_type({"NEURONDECK_INSTANCE_TYPE": "trn1.2xlarge"}, dmi, tmp_path / "none")

    assert found == "trn1.2xlarge"


def test_it_detects_the_instance_type_from_dmi_on_nitro(tmp_path: Path) -> None:
    dmi = tmp_path / "product_name"
    dmi.write_text("trn1.32xlarge\n")

    assert detect_instance_type({}, dmi, tmp_path / "none") == "trn1.32xlarge"


def test_it_ignores_dmi_names_that_are_not_ec2_types(tmp_path: Path) -> None:
    dmi = tmp_path / "product_name"
    dmi.write_text("HVM domU\n")
    sysfs = tmp_path / "instance_type"
    sysfs.write_text("inf2.8xlarge\n")

    assert detect_instance_type({}, dmi, tmp_path / "none") == ""
    assert detect_instance_type({}, dmi, sysfs) == "inf2.8xlarge"


def test_it_reads_memtotal_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:         1024 kB\n")

    assert read_meminfo_total(meminfo) == 16384 * 1024
    assert read_meminfo_total(tmp_path / "missing") is None


def _fake_tool(tmp_path: Path, body: str) -> str:
    script = tmp_path / "neuron-ls"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_run_returns_a_cpu_inventory_when_the_binary_is_missing(tmp_path: Path) -> None:
    inv = run_neuron_ls(binary=str(tmp_path / "no-such-neuron-ls"), instance_type="")

    assert inv.family == "cpu"
    assert inv.core_count == (os.cpu_count() or 1)


def test_run_returns_a_cpu_inventory_when_no_device_is_found(tmp_path: Path) -> None:
    # neuron.md §2.1: no device or driver -> exit 1, empty stdout.
    binary = _fake_tool(tmp_path, 'echo "Failed to discover neuron devices" >&2; exit 1')

    inv = run_neuron_ls(binary=binary, instance_type="inf2.xlarge")

    assert inv.family == "cpu"
    assert inv.instance_type == "inf2.xlarge"


def test_run_returns_a_cpu_inventory_when_stdout_is_empty(tmp_path: Path) -> None:
    assert run_neuron_ls(binary=_fake_tool(tmp_path, "exit 0"), instance_type="").family == "cpu"


def test_run_parses_the_tool_output_and_passes_json_flag(tmp_path: Path) -> None:
    sample = DATA / "trn1.32xlarge.json"
    binary = _fake_tool(tmp_path, f'[ "$1" = "-j" ] || exit 2\ncat "{sample}"')

    inv = run_neuron_ls(binary=binary, instance_type="trn1.32xlarge")

    assert inv.family == "trn1"
    assert inv.core_count == 32
    assert inv.instance_type == "trn1.32xlarge"


def test_run_raises_when_the_tool_hangs(tmp_path: Path) -> None:
    binary = _fake_tool(tmp_path, "exec sleep 5")

    with pytest.raises(NeuronLsError, match="did not finish"):
        run_neuron_ls(binary=binary, timeout=0.2, instance_type="")


# --------------------------------------------------------------------------
# Where the tools are: PATH, then /opt/aws/neuron/bin (neuron.md §0, §1.1)
# --------------------------------------------------------------------------


def test_a_tool_missing_from_path_is_found_in_the_neuron_bin_dir(tmp_path: Path, monkeypatch) -> None:
    # A systemd service's PATH lacks /opt/aws/neuron/bin; the host must not
    # register as a CPU host because of it.
    neuron_bin = tmp_path / "opt-aws-neuron-bin"
    neuron_bin.mkdir()
    sample = DATA / "inf2.xlarge.json"
    tool = Path(_fake_tool(neuron_bin, f'[ "$1" = "-j" ] || exit 2\n/bin/cat "{sample}"'))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    assert find_tool("neuron-ls", bin_dir=neuron_bin) == str(tool)
    inv = run_neuron_ls(instance_type="inf2.xlarge", bin_dir=neuron_bin)
    assert inv.family == "inf2" and inv.core_ids == [0, 1]


def test_path_wins_over_the_neuron_bin_dir_and_a_missing_tool_is_none(tmp_path: Path, monkeypatch) -> None:
    on_path, neuron_bin = tmp_path / "path", tmp_path / "neuron-bin"
    on_path.mkdir()
    neuron_bin.mkdir()
    first = _fake_tool(on_path, "exit 0")
    _fake_tool(neuron_bin, "exit 0")
    monkeypatch.setenv("PATH", str(on_path))

    assert find_tool("neuron-ls", bin_dir=neuron_bin) == first
    assert find_tool("neuron-monitor", bin_dir=neuron_bin) is None
    assert find_tool(str(tmp_path / "nope")) is None
    assert find_tool(first) == first


def test_the_job_python_report_round_trips_with_the_compiler_version_on_top() -> None:
    inv = parse_neuron_ls((DATA / "inf2.xlarge.json").read_text(), instance_type="inf2.xlarge")
    software = {"torch": "2.9.0", "compiler_version": "torch-neuronx-2.9.0.2.15.32035+neuronx-cc-2.27.5334.0"}
    reported = dataclasses.replace(inv, software=software)

    data = json.loads(json.dumps(reported.to_dict()))
    assert data["compiler_version"] == software["compiler_version"]
    assert HostInventory.from_dict(data) == reported
    assert "compiler_version" not in inv.to_dict()
