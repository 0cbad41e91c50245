"""The host's job Python: what Neuron software it has, and the NeuronCores a process may use.

    python -m neuron_workers.backends.neuron_env      prints the report as one JSON object

A Neuron host runs its jobs in its own Neuron Python (NEURONDECK_JOB_PYTHON: the
DLAMI virtualenv or the Neuron container), not in the web app's virtualenv
(neuron.md §0). The agent runs this module with that interpreter at registration
(`probe_interpreter`) and stores the report in the host's inventory, where the
submit checks read it (neuron_matrix); the neuron backend reads the same report in
the job process (`probe`).

Standard library only, and it never imports torch, torch_neuronx or torch_xla:
versions come from the installed distributions' metadata, so a probe cannot start
the Neuron runtime, which would reserve every NeuronCore of the host (neuron.md
§4.3). The runtime's version is the installed version of its package
(aws-neuronx-runtime-lib, a deb or rpm on every Neuron AMI and container), asked of
the system's package manager: nothing of the runtime is loaded.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import config
from .neuron_matrix import framework_path

# Report key -> distribution name on the Neuron pip index (neuron.md §4.1).
PACKAGES: dict[str, str] = {
    "torch": "torch",
    "torch_neuronx": "torch-neuronx",
    "torch_xla": "torch-xla",
    "neuronx_cc": "neuronx-cc",
    "libneuronxla": "libneuronxla",
    "neuronx_distributed": "neuronx-distributed",
    "transformers": "transformers",
    "safetensors": "safetensors",
}
# The runtime library aws-neuronx-runtime-lib installs [SDK setup pages: /opt/aws/neuron/lib].
RUNTIME_PACKAGE = "aws-neuronx-runtime-lib"
PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
PROBE_TIMEOUT_S = 120.0


# ---------------------------------------------------------------- versions


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def compiler_identity(torch_neuronx: str | None, neuronx_cc: str | None) -> str:
    """"torch-neuronx-<v>+neuronx-cc-<v>": the compiler identity a compile cache key holds.

    Both change compiled output (neuron.md §4.4). The agent reports it from the
    installed distributions and the backend records it from the same source, so the
    key the web app computes at submit is the key the artifact gets."""
    return f"torch-neuronx-{torch_neuronx or 'unknown'}+neuronx-cc-{neuronx_cc or 'unknown'}"


def installed_compiler_identity() -> str:
    return compiler_identity(dist_version("torch-neuronx"), dist_version("neuronx-cc"))


def runtime_version(package: str = RUNTIME_PACKAGE) -> str | None:
    """The Neuron runtime's version ("2.26.43.0") as its package is installed, from
    dpkg (Ubuntu AMIs and containers) or rpm (Amazon Linux); None when neither knows it."""
    for argv in (["dpkg-query", "-W", "-f=${Version}", package], ["rpm", "-q", "--qf", "%{VERSION}", package]):
        if shutil.which(argv[0]) is None:
            continue
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        version = done.stdout.strip()
        if done.returncode == 0 and version:
            return version.split("-", 1)[0]  # "2.26.43.0-f1a2b3c4d" -> the release
    return None


def installed_framework() -> str | None:
    """"xla" or "native": the Neuron PyTorch path of this interpreter's torch (neuron_matrix)."""
    return framework_path(dist_version("torch"))


def neuronx_cc_path() -> str | None:
    """neuronx-cc as torch_neuronx.trace finds it: on PATH (it runs the first one found)."""
    return shutil.which("neuronx-cc")


def probe(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """This interpreter's Neuron software, as a JSON-able report (see the module docstring)."""
    packages = {key: dist_version(dist) for key, dist in PACKAGES.items()}
    try:
        # The job's entry point must import in this interpreter (by name: importing
        # it is the check, not a dependency of this module).
        importlib.import_module("neuron_workers.process.runner")
        runner_error = None
    except Exception as exc:  # a missing module, a syntax this Python lacks
        runner_error = f"{type(exc).__name__}: {exc}"
    return {
        "executable": sys.executable,
        "python": platform.python_version(),
        "packages": packages,
        "framework": framework_path(packages["torch"]),
        "sdk_version": config.neuron_sdk(env),
        "runtime_version": runtime_version(),
        "compiler_version": compiler_identity(packages["torch_neuronx"], packages["neuronx_cc"]),
        "neuronx_cc": neuronx_cc_path(),
        "runner_error": runner_error,
    }


def probe_interpreter(python: str, timeout: float = PROBE_TIMEOUT_S,
                      env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run `python -m neuron_workers.backends.neuron_env` and return its report.

    On any failure (no such interpreter, an exit status, no JSON) the report is
    {"executable": python, "error": "..."}: the host still registers, and the error
    is shown with it. The environment is the job's: this project first on PYTHONPATH,
    the interpreter's bin directory first on PATH (job_path)."""
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join([PROJECT_ROOT, *filter(None, [child_env.get("PYTHONPATH")])])
    child_env["PATH"] = job_path(python, child_env.get("PATH"))
    try:
        done = subprocess.run([python, "-m", "neuron_workers.backends.neuron_env"], capture_output=True, text=True,
                              timeout=timeout, env=child_env, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"executable": python, "error": f"cannot run {python}: {exc}"}
    lines = done.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else None
    except ValueError:
        report = None
    if done.returncode != 0 or not isinstance(report, dict):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"executable": python, "error": f"{python} -m neuron_workers.backends.neuron_env exited "
                                               f"{done.returncode}: {tail}"}
    return report


def job_path(python: str, path: str | None) -> str:
    """PATH for a job started by `python`: its bin directory first (as activating its
    virtualenv would: torch_neuronx.trace runs the neuronx-cc found on PATH), then
    /opt/aws/neuron/bin, then the rest."""
    first = [str(Path(python).parent), "/opt/aws/neuron/bin"]
    rest = [part for part in (path or "").split(os.pathsep) if part and part not in first]
    return os.pathsep.join([*first, *rest])


# ---------------------------------------------------------------- NeuronCores of a process


def parse_visible_cores(text: str | None) -> list[int]:
    """The cores NEURON_RT_VISIBLE_CORES names ("3", "0-2", "3-5,6"), in order; [] when unset.

    The runtime takes a single index, a range, a comma list or a mix, contiguous and
    ascending (neuron.md §4.3). ValueError on anything else."""
    cores: list[int] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"NEURON_RT_VISIBLE_CORES={text!r} is not a core, a range or a list of them")
        start, end = int(low), int(high) if dash else int(low)
        if end < start:
            raise ValueError(f"NEURON_RT_VISIBLE_CORES={text!r} has a descending range")
        cores.extend(range(start, end + 1))
    if cores and cores != list(range(cores[0], cores[0] + len(cores))):
        raise ValueError(f"NEURON_RT_VISIBLE_CORES={text!r} is not contiguous and ascending")
    return cores


def rank_core(visible: str | None, local_rank: int, local_world_size: int) -> str:
    """The one core a native TorchNeuron rank gets: cores[LOCAL_RANK] of the job's range.

    TorchNeuron asserts one device per process and, when NEURON_RT_VISIBLE_CORES is
    unset, takes the local rank as a global core id (docs torch/guides/torch-distributed;
    neuron.md §0): every rank inheriting the job's whole range breaks it, and an unset
    variable would put a job on cores 0..n-1 whatever it was given. optimum-neuron's
    vllm server_manager does the same split."""
    cores = parse_visible_cores(visible)
    if len(cores) != local_world_size:
        raise ValueError(f"{local_world_size} ranks need as many cores; NEURON_RT_VISIBLE_CORES={visible!r} "
                         f"names {len(cores)}")
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"LOCAL_RANK {local_rank} is outside 0..{local_world_size - 1}")
    return str(cores[local_rank])


def main() -> int:
    print(json.dumps(probe(), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
