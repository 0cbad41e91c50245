"""Host inventory from `neuron-ls -j` (pure, Django-free).

The host agent calls `run_neuron_ls()` once at start-up to register its host
(DESIGN.md §4): instance type, family, Neuron devices, NeuronCore ids, memory.
`parse_neuron_ls()` is the pure part and is what the tests exercise.

Format facts (neuron.md §2.1, "neuron-ls -j"):
- the output is a JSON array with one object per Neuron device;
- every key is optional across tool versions: `neuroncore_ids`, `cpu_affinity`
  and `numa_node` only appear in docs from 2025-07, so older tools (inf1) lack
  them and core ids are derived from `nc_count` in device order;
- `numa_node` is a string; `connected_to` is null on single-device hosts;
- with no device or driver neuron-ls exits 1 with empty stdout, which we turn
  into a CPU-host inventory (cores and memory from the OS).

This module must not import Django, torch or redis.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple

from neuron_workers import config

__all__ = [
    "Device",
    "HostInventory",
    "INSTANCE_TYPES",
    "InstanceType",
    "NeuronLsError",
    "NeuronProcess",
    "cpu_inventory",
    "NEURON_BIN_DIR",
    "detect_instance_type",
    "family_for_instance_type",
    "find_tool",
    "parse_neuron_ls",
    "read_meminfo_total",
    "run_neuron_ls",
]

Family = Literal["inf1", "inf2", "trn1", "trn2", "cpu"]

GIB = 1024**3

# Where aws-neuronx-tools installs neuron-ls, neuron-monitor and neuron-top. The
# setup guides add it to PATH by hand (neuron.md §0, §1.1); a systemd service or a
# container's PATH usually lacks it.
NEURON_BIN_DIR = "/opt/aws/neuron/bin"


class NeuronLsError(ValueError):
    """neuron-ls produced output we cannot trust (garbage JSON, timeout).

    Deliberately not mapped to a CPU inventory: a Neuron host registered as a
    CPU host would silently be given CPU work and never Neuron work.
    """


# --------------------------------------------------------------------------
# Instance types and prices
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceType:
    """Static facts about one EC2 Neuron instance type.

    `cores` is what software sees (logical cores; trn2 at the default LNC=2).
    `on_demand_usd_per_hour` is UNCONFIRMED (third-party tables, us-east-1) —
    verify before billing users. `ri_effective_usd_per_hour` is AWS's
    reserved-instance effective rate from the SDK benchmark CSVs (None where
    AWS publishes none); it is not an on-demand price.
    """

    family: Family
    devices: int
    cores: int
    device_memory_bytes: int  # total over all devices
    vcpus: int
    host_memory_gib: int
    on_demand_usd_per_hour: float
    ri_effective_usd_per_hour: float | None

    @property
    def cores_per_device(self) -> int:
        return self.cores // self.devices

    @property
    def core_memory_bytes(self) -> int:
        return self.device_memory_bytes // self.cores


def _it(
    family: Family,
    devices: int,
    cores: int,
    mem_gib: int,
    vcpus: int,
    host_gib: int,
    on_demand: float,
    ri: float | None,
) -> InstanceType:
    return InstanceType(family, devices, cores, mem_gib * GIB, vcpus, host_gib, on_demand, ri)


# Source: /work/shared/reference/neuron.md §3 "Instance types" (chips, cores,
# device memory, vCPU, host GiB from the SDK arch pages; RI-effective $/h from
# the SDK benchmark price CSVs; on-demand $/h us-east-1 from third-party
# tables, UNCONFIRMED; the trn2 price rests on a single source). Pricing code
# should read `on_demand_usd_per_hour` and say in the UI that it is an estimate.
INSTANCE_TYPES: dict[str, InstanceType] = {
    "inf1.xlarge": _it("inf1", 1, 4, 8, 4, 8, 0.228, 0.110),
    "inf1.2xlarge": _it("inf1", 1, 4, 8, 8, 16, 0.362, 0.174),
    "inf1.6xlarge": _it("inf1", 4, 16, 32, 24, 48, 1.180, 0.567),
    "inf1.24xlarge": _it("inf1", 16, 64, 128, 96, 192, 4.721, 2.269),
    "inf2.xlarge": _it("inf2", 1, 2, 32, 4, 16, 0.7582, 0.328),
    "inf2.8xlarge": _it("inf2", 1, 2, 32, 32, 128, 1.9679, 0.850),
    "inf2.24xlarge": _it("inf2", 6, 12, 192, 96, 384, 6.4906, 2.804),
    "inf2.48xlarge": _it("inf2", 12, 24, 384, 192, 768, 12.9813, 5.608),
    "trn1.2xlarge": _it("trn1", 1, 2, 32, 8, 32, 1.3438, 0.512),
    "trn1.32xlarge": _it("trn1", 16, 32, 512, 128, 512, 21.50, 8.197),
    "trn1n.32xlarge": _it("trn1", 16, 32, 512, 128, 512, 24.78, None),
    # 64 logical cores at LNC=2 (the default); 128 at LNC=1 (neuron.md §3).
    "trn2.48xlarge": _it("trn2", 16, 64, 1536, 192, 2048, 35.7608, None),
}

# trn1n differs from trn1 only in EFA bandwidth; trn2u/trn2n are trn2 variants
# (neuron.md §3), so the family is the leading "inf1|inf2|trn1|trn2".
_FAMILY_RE = re.compile(r"^(inf1|inf2|trn1|trn2)[a-z]*\.")

# An EC2 instance type such as "trn1.32xlarge", "m5.large", "c7gn.metal".
# Rejects DMI strings of Xen guests ("HVM domU") and other vendors.
_EC2_TYPE_RE = re.compile(r"^[a-z][a-z0-9-]*[0-9][a-z0-9-]*\.[a-z0-9-]+$")


def family_for_instance_type(instance_type: str) -> str:
    """Neuron family of an EC2 instance type, or "" when it is not a Neuron type.

    >>> family_for_instance_type("trn1n.32xlarge")
    'trn1'
    """
    match = _FAMILY_RE.match(instance_type.strip().lower())
    return match.group(1) if match else ""


def detect_instance_type(
    environ: Mapping[str, str] | None = None,
    dmi_product_name: str | Path = "/sys/devices/virtual/dmi/id/product_name",
    neuron_sysfs: str | Path = "/sys/devices/virtual/neuron_device/neuron0/info/architecture/instance_type",
) -> str:
    """The EC2 instance type of this host, or "" when unknown. No network access.

    Order: NEURONDECK_INSTANCE_TYPE (config.instance_type, read from `environ`
    or os.environ; an operator override, also how tests and non-EC2 hosts set
    it), then the DMI product name (on Nitro instances it
    is the instance type), then the Neuron driver's sysfs copy (neuron.md §2.3;
    its exact format is unconfirmed, so it must look like an EC2 type too).
    IMDS is not used: it is a network call and can hang inside containers.
    """
    override = config.instance_type(environ)
    if override:
        return override
    for path in (dmi_product_name, neuron_sysfs):
        value = _read_small_file(path).lower()
        if _EC2_TYPE_RE.match(value):
            return value
    return ""


def _read_small_file(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------
# Inventory data
# --------------------------------------------------------------------------


class NeuronProcess(NamedTuple):
    """A process holding a device, as neuron-ls lists it (neuron_processes[])."""

    pid: int
    command: str
    runtime_version: str


@dataclass(frozen=True)
class Device:
    """One Neuron device. Optional fields are None when the tool omits them."""

    index: int
    core_ids: list[int]
    memory_bytes: int
    cpu_affinity: str | None = None  # e.g. "0-31,64-95", as printed by neuron-ls
    numa_node: int | None = None
    connected_to: list[int] = field(default_factory=list)
    bdf: str | None = None
    processes: list[NeuronProcess] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "core_ids": list(self.core_ids),
            "memory_bytes": self.memory_bytes,
            "cpu_affinity": self.cpu_affinity,
            "numa_node": self.numa_node,
            "connected_to": list(self.connected_to),
            "bdf": self.bdf,
            "processes": [p._asdict() for p in self.processes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Device:
        return cls(
            index=data["index"],
            core_ids=list(data["core_ids"]),
            memory_bytes=data["memory_bytes"],
            cpu_affinity=data.get("cpu_affinity"),
            numa_node=data.get("numa_node"),
            connected_to=list(data.get("connected_to") or []),
            bdf=data.get("bdf"),
            processes=[NeuronProcess(**p) for p in data.get("processes") or []],
        )


@dataclass(frozen=True)
class HostInventory:
    """What a host offers, as registered by the host agent.

    Contracts:
    - `family` is one of inf1/inf2/trn1/trn2/cpu; "cpu" iff `devices` is empty.
    - `core_ids` is sorted. On Neuron hosts these are the global NeuronCore ids
      to put in NEURON_RT_VISIBLE_CORES; on CPU hosts they are 0..cpu_count-1.
    - `device_memory_bytes` is the total over devices (0 on CPU hosts);
      `core_memory_bytes` is per NeuronCore (device memory / cores per device).
    - `host_memory_bytes` is the host RAM when known (None from the pure parser).
    - `lnc` is the logical NeuronCore config (trn2 only; None elsewhere).
    - `software` is what the host's job Python reported (versions of the SDK, the
      compiler, the runtime, torch and torch-neuronx; see
      neuron_workers.backends.neuron_env); empty when nothing was probed.
    """

    family: str
    instance_type: str
    devices: list[Device]
    core_ids: list[int]
    device_memory_bytes: int
    core_memory_bytes: int
    host_memory_bytes: int | None = None
    lnc: int | None = None
    software: dict[str, Any] = field(default_factory=dict)

    @property
    def core_count(self) -> int:
        return len(self.core_ids)

    @property
    def is_neuron(self) -> bool:
        return self.family != "cpu"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict; `HostInventory.from_dict` reverses it.

        `software` (and the compiler version at top level, which the web app keys
        a compile cache lookup by: jobs.lifecycle.services.compiler_version) only
        when the job Python was probed."""
        data = {
            "family": self.family,
            "instance_type": self.instance_type,
            "devices": [d.to_dict() for d in self.devices],
            "core_ids": list(self.core_ids),
            "device_memory_bytes": self.device_memory_bytes,
            "core_memory_bytes": self.core_memory_bytes,
            "host_memory_bytes": self.host_memory_bytes,
            "lnc": self.lnc,
        }
        if self.software:
            data["software"] = dict(self.software)
            data["compiler_version"] = self.software.get("compiler_version")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HostInventory:
        return cls(
            family=data["family"],
            instance_type=data.get("instance_type") or "",
            devices=[Device.from_dict(d) for d in data.get("devices") or []],
            core_ids=list(data["core_ids"]),
            device_memory_bytes=data.get("device_memory_bytes") or 0,
            core_memory_bytes=data.get("core_memory_bytes") or 0,
            host_memory_bytes=data.get("host_memory_bytes"),
            lnc=data.get("lnc"),
            software=dict(data.get("software") or {}),
        )


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


def parse_neuron_ls(
    text: str | bytes,
    instance_type: str = "",
    host_memory_bytes: int | None = None,
) -> HostInventory:
    """Parse `neuron-ls -j` output into a HostInventory.

    Pure apart from one case: empty text (neuron-ls found no device) or an
    empty array returns `cpu_inventory(...)`, which reads the OS core count and,
    if `host_memory_bytes` is None, /proc/meminfo.

    `instance_type` comes from the caller (see `run_neuron_ls`, which uses
    `detect_instance_type()`); neuron-ls -j does not carry it. When it names a
    Neuron family, that wins; otherwise the family is guessed from the device
    shape (`_guess_family`, a heuristic).

    Raises NeuronLsError when the text is not a JSON array of objects.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not text.strip():
        return cpu_inventory(instance_type=instance_type, host_memory_bytes=host_memory_bytes)
    raw = _load_device_list(text)
    if not raw:
        return cpu_inventory(instance_type=instance_type, host_memory_bytes=host_memory_bytes)

    try:
        devices = _devices_from_raw(raw)
    except (TypeError, ValueError, AttributeError) as exc:  # e.g. "nc_count": "two"
        raise NeuronLsError(f"unexpected neuron-ls device entry: {exc}") from None
    core_ids = sorted(c for d in devices for c in d.core_ids)
    lnc = _first_int(raw, "logical_neuroncore_config")
    family = family_for_instance_type(instance_type) or _guess_family(devices, lnc)
    return HostInventory(
        family=family,
        instance_type=instance_type,
        devices=devices,
        core_ids=core_ids,
        device_memory_bytes=sum(d.memory_bytes for d in devices),
        core_memory_bytes=_core_memory(devices),
        host_memory_bytes=host_memory_bytes,
        lnc=lnc,
    )


def _load_device_list(text: str) -> list[dict[str, Any]]:
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise NeuronLsError(f"neuron-ls output is not JSON: {exc}") from None
    if not isinstance(raw, list) or not all(isinstance(d, dict) for d in raw):
        raise NeuronLsError("neuron-ls -j output is not a JSON array of device objects")
    return raw


def _devices_from_raw(raw: list[dict[str, Any]]) -> list[Device]:
    """Build devices in device order, deriving core ids where the tool omits them.

    Old tools print no `neuroncore_ids` (neuron.md §2.1 version drift); the
    documented numbering is consecutive per device in device order, which is
    what SageMaker's toolkit assumed when it summed `nc_count`.
    """
    ordered = sorted(enumerate(raw), key=lambda pair: _int(pair[1].get("neuron_device"), pair[0]))
    devices: list[Device] = []
    next_core = 0
    for position, item in ordered:
        core_ids = _core_ids(item, next_core)
        if core_ids:
            next_core = max(next_core, max(core_ids) + 1)
        devices.append(_device(item, _int(item.get("neuron_device"), position), core_ids))
    return devices


def _core_ids(item: Mapping[str, Any], next_core: int) -> list[int]:
    ids = item.get("neuroncore_ids")
    if isinstance(ids, list):
        return [int(i) for i in ids]
    return list(range(next_core, next_core + _int(item.get("nc_count"), 0)))


def _device(item: Mapping[str, Any], index: int, core_ids: list[int]) -> Device:
    return Device(
        index=index,
        core_ids=core_ids,
        memory_bytes=_int(item.get("memory_size"), 0),
        cpu_affinity=item.get("cpu_affinity") or None,
        numa_node=_optional_int(item.get("numa_node")),  # a string in neuron-ls
        connected_to=[int(i) for i in item.get("connected_to") or []],  # null on 1-device hosts
        bdf=item.get("bdf"),
        processes=[_process(p) for p in item.get("neuron_processes") or []],
    )


def _process(item: Mapping[str, Any]) -> NeuronProcess:
    return NeuronProcess(
        pid=_int(item.get("pid"), 0),
        command=str(item.get("command") or ""),
        runtime_version=str(item.get("neuron_runtime_version") or ""),
    )


def _core_memory(devices: list[Device]) -> int:
    """Per-core device memory: a device's memory split over its cores.

    inf2/trn1: 32 GiB / 2 = 16 GiB; trn2 at LNC=2: 96 GiB / 4 = 24 GiB, one HBM
    bank per logical core (neuron.md §3 notes). Uses the smallest device so a
    mixed answer never over-promises.
    """
    per_core = [d.memory_bytes // len(d.core_ids) for d in devices if d.core_ids]
    return min(per_core) if per_core else 0


def _guess_family(devices: list[Device], lnc: int | None) -> str:
    """Guess the family from device shape when the instance type is unknown.

    HEURISTIC, from the per-chip facts in neuron.md §3:
    - 8 GiB and 4 cores per device: inf1 (Inferentia, 4 x NeuronCore-v1);
    - 96 GiB per device, or an LNC setting (only trn2 has one): trn2;
    - 32 GiB and 2 cores per device is both inf2 and trn1 (the two chips have
      the same memory and core count), so look at the links: trn1 is a 2D
      torus (4 links per device) and has 16 devices; inf2 is a ring (2 links)
      of at most 12. A single device is trn1.2xlarge only when its CPU
      affinity spans exactly 8 vCPUs (inf2.xlarge has 4, inf2.8xlarge 32).
    Set NEURONDECK_INSTANCE_TYPE on the host to skip the guess.
    """
    first = devices[0]
    cores = len(first.core_ids)
    if lnc is not None or first.memory_bytes >= 96 * GIB:
        return "trn2"
    if cores == 4 and first.memory_bytes <= 8 * GIB:
        return "inf1"
    if len(devices) >= 16 or max(len(d.connected_to) for d in devices) >= 3:
        return "trn1"
    if len(devices) == 1 and _cpu_list_size(first.cpu_affinity) == 8:
        return "trn1"
    return "inf2"


def _cpu_list_size(cpu_list: str | None) -> int:
    """Number of CPUs in a Linux cpu list such as "0-31,64-95" (0 if unknown)."""
    if not cpu_list:
        return 0
    total = 0
    for part in cpu_list.split(","):
        low, _, high = part.strip().partition("-")
        try:
            total += (int(high) - int(low) + 1) if high else 1
        except ValueError:
            return 0
    return total


def _first_int(raw: list[dict[str, Any]], key: str) -> int | None:
    for item in raw:
        value = _optional_int(item.get(key))
        if value is not None:
            return value
    return None


def _int(value: Any, default: int) -> int:
    parsed = _optional_int(value)
    return default if parsed is None else parsed


def _optional_int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------
# CPU hosts and running the tool
# --------------------------------------------------------------------------


def read_meminfo_total(path: str | Path = "/proc/meminfo") -> int | None:
    """MemTotal in bytes, or None when the file is unreadable (non-Linux)."""
    for line in _read_small_file(path).splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            try:
                return int(parts[1]) * 1024  # the kernel reports kB
            except (IndexError, ValueError):
                return None
    return None


def cpu_inventory(
    cpu_count: int | None = None,
    host_memory_bytes: int | None = None,
    instance_type: str = "",
) -> HostInventory:
    """Inventory of a host without Neuron devices: cores and memory from the OS.

    Defaults read `os.cpu_count()` and /proc/meminfo. The instance type is kept
    (e.g. an inf2 host whose driver is unreachable still prices as inf2) but the
    family is "cpu": no device is usable, so no Neuron job may be placed here.
    """
    count = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    memory = host_memory_bytes if host_memory_bytes is not None else read_meminfo_total()
    return HostInventory(
        family="cpu",
        instance_type=instance_type,
        devices=[],
        core_ids=list(range(count)),
        device_memory_bytes=0,
        core_memory_bytes=0,
        host_memory_bytes=memory,
    )


def find_tool(name: str, bin_dir: str | Path = NEURON_BIN_DIR) -> str | None:
    """The path of a Neuron tool: `name` on PATH, else in `bin_dir` (/opt/aws/neuron/bin).

    A name with a slash is a path and is returned as it is when it is executable.
    None when the tool is in neither place.
    """
    if os.sep in name:
        return name if os.access(name, os.X_OK) and Path(name).is_file() else None
    return shutil.which(name) or shutil.which(name, path=str(bin_dir))


def run_neuron_ls(
    binary: str = "neuron-ls",
    timeout: float = 10,
    instance_type: str | None = None,
    bin_dir: str | Path = NEURON_BIN_DIR,
) -> HostInventory:
    """Run `neuron-ls -j` and return this host's inventory.

    The tool is looked up on PATH, then in `bin_dir` (find_tool). A missing
    binary, a non-zero exit or empty stdout mean "no usable Neuron device"
    (neuron.md §2.1: exit 1 with empty stdout) and give a CPU inventory. A
    timeout or unparseable output raise NeuronLsError: the devices may be
    there, and registering the host as CPU would hide them. `instance_type`
    defaults to `detect_instance_type()`.
    """
    itype = detect_instance_type() if instance_type is None else instance_type
    memory = read_meminfo_total()
    path = find_tool(binary, bin_dir)
    if path is None:
        return cpu_inventory(instance_type=itype, host_memory_bytes=memory)
    try:
        # argv list, no shell: `binary` may come from configuration.
        done = subprocess.run(
            [path, "-j"], capture_output=True, timeout=timeout, check=False
        )
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        return cpu_inventory(instance_type=itype, host_memory_bytes=memory)
    except subprocess.TimeoutExpired:
        raise NeuronLsError(f"{binary} -j did not finish within {timeout} s") from None
    if done.returncode != 0 or not done.stdout.strip():
        return cpu_inventory(instance_type=itype, host_memory_bytes=memory)
    return parse_neuron_ls(done.stdout, instance_type=itype, host_memory_bytes=memory)
