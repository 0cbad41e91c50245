"""The self-check for a first real Neuron host (`manage.py neuron_selfcheck`).

What has only ever run against stand-ins here is tried on the host itself, and the
open questions of neuron.md §0 / §6 get an answer:

1. tools: where neuron-ls / neuron-monitor are and which Neuron packages are installed;
2. devices and cores from neuron-ls (no device: "not a Neuron host", and stop);
3. the job Python (NEURONDECK_JOB_PYTHON): its versions, and which job kinds this
   host's family can run with them (neuron_matrix);
4. a tiny trace + load + run on one core (native: a tiny model on the neuron
   device), while neuron-monitor watches: are neuroncores_in_use keys global core
   ids or relative to NEURON_RT_VISIBLE_CORES? (the job runs on a core other than 0);
5. two concurrent two-core collective jobs, each with its own root-comm port (as
   NeuronDeck runs them), then the same with the plugin's default port, recording
   what that produces;
6. a compile cache hit: the same tiny graph compiled twice into one cache;
7. native TorchNeuron only: what a multi-rank fine-tune relies on, on two ranks through
   the backend's own calls: the stop all-reduce on the device over the "neuron" group,
   the gloo group beside it (objects to rank 0, the wait), torch.neuron's RNG state.

Django-free and torch-free at import: the checks on the device run as child
processes of the job Python (`python -m neuron_workers.backends.neuron_selfcheck
child <name>`), one NeuronCore range each, so the self-check itself never holds a core.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import config
from ..readers.neuron_ls import NEURON_BIN_DIR, HostInventory, NeuronLsError, find_tool, run_neuron_ls
from ..readers.neuron_monitor import monitor_config
from .neuron_env import PROJECT_ROOT, job_path, probe_interpreter, rank_core
from .neuron_launch import training_env
from .neuron_matrix import NATIVE, XLA, job_refusal

# OS packages of the Neuron SDK (neuron.md §4.1; the bug template lists them with
# `apt list --installed | grep neuron`).
OS_PACKAGES = ("aws-neuronx-dkms", "aws-neuronx-runtime-lib", "aws-neuronx-collectives", "aws-neuronx-tools")
# A cache hit in the XLA flow's log (neuron.md §4.4).
CACHED_NEFF = "Using a cached neff"

OK, FAIL, SKIP, INFO = "ok", "fail", "skip", "info"
DEVICE_CHECKS = ("one-core", "two-jobs", "cache", "native-ranks")


@dataclass
class Check:
    name: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelfCheck:
    neuron_host: bool
    summary: str
    checks: list[Check] = field(default_factory=list)
    answers: dict[str, Any] = field(default_factory=dict)  # the open questions of neuron.md §0 / §6

    @property
    def failed(self) -> bool:
        return any(check.status == FAIL for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"neuron_host": self.neuron_host, "summary": self.summary, "failed": self.failed,
                "answers": self.answers, "checks": [asdict(check) for check in self.checks]}

    def table(self) -> str:
        width = max((len(check.name) for check in self.checks), default=4)
        lines = [self.summary, ""]
        lines += [f"{check.name:<{width}}  {check.status:<4}  {check.detail}" for check in self.checks]
        if self.answers:
            lines += ["", "answers to the open questions (neuron.md §0, §6):"]
            lines += [f"  {key}: {value}" for key, value in self.answers.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------- pure parts


def core_key_answer(reports: Iterable[dict], tag: str, core: int) -> tuple[str, list[str]]:
    """Whether neuron-monitor's neuroncores_in_use keys are "global" core ids or
    "relative" to NEURON_RT_VISIBLE_CORES, from reports taken while a runtime tagged
    `tag` ran on the one core `core` (> 0, or the two readings look alike).
    "unknown" when no report showed the runtime busy."""
    keys: set[str] = set()
    for report in reports:
        for runtime in report.get("neuron_runtime_data") or []:
            if runtime.get("neuron_runtime_tag") != tag:
                continue
            counters = ((runtime.get("report") or {}).get("neuroncore_counters") or {})
            keys.update((counters.get("neuroncores_in_use") or {}).keys())
    found = sorted(keys, key=lambda k: (len(k), k))
    if not keys:
        return "unknown", found
    if core == 0:
        return "ambiguous (ran on core 0)", found
    if keys == {str(core)}:
        return "global", found
    if keys == {"0"}:
        return "relative", found
    return "unexpected", found


def cache_hit(first_neffs: int, second_neffs: int, second_output: str) -> bool:
    """A second compile of the same graph into the same cache was served from it: the
    XLA flow logs CACHED_NEFF; either flow leaves no new NEFF behind."""
    return CACHED_NEFF in second_output or (first_neffs > 0 and second_neffs == first_neffs)


def count_neffs(cache_dir: Path) -> int:
    return sum(1 for _ in cache_dir.rglob("*.neff")) if cache_dir.is_dir() else 0


# ---------------------------------------------------------------- running children


@dataclass
class Child:
    returncode: int
    output: str
    result: dict[str, Any]


class JobPython:
    """The job Python, and how the self-check starts children in it (the job's own
    environment: the project on PYTHONPATH, its bin directory on PATH)."""

    def __init__(self, python: str, timeout_s: float) -> None:
        self.python, self.timeout_s = python, timeout_s

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([PROJECT_ROOT, *filter(None, [env.get("PYTHONPATH")])])
        env["PATH"] = job_path(self.python, env.get("PATH"))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def argv(self, name: str, *args: str) -> list[str]:
        return [self.python, "-m", "neuron_workers.backends.neuron_selfcheck", "child", name, *args]

    def torchrun_argv(self, nproc: int, name: str, *args: str) -> list[str]:
        torchrun = Path(self.python).with_name("torchrun")
        launcher = [str(torchrun)] if torchrun.exists() else [self.python, "-m", "torch.distributed.run"]
        return [*launcher, "--standalone", f"--nproc_per_node={nproc}", "-m", "neuron_workers.backends.neuron_selfcheck",
                "child", name, *args]

    def start(self, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=cwd, stdin=subprocess.DEVNULL, start_new_session=True, errors="replace")

    def finish(self, proc: subprocess.Popen) -> Child:
        try:
            output, _ = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            output, _ = proc.communicate()
            output += f"\n(killed after {self.timeout_s:g} s)"
        return Child(proc.returncode, output, last_json(output))

    def run(self, argv: list[str], env: dict[str, str], cwd: Path) -> Child:
        return self.finish(self.start(argv, env, cwd))


def last_json(output: str) -> dict[str, Any]:
    """The last JSON object a child printed."""
    found = json_objects(output)
    return found[-1] if found else {}


def json_objects(output: str) -> list[dict[str, Any]]:
    """Every JSON object a child printed, in order. Ranks print at once, so two objects
    can share a line ('{...}{...}'): every object on a line is read."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    for line in output.strip().splitlines():
        at = line.find("{")
        while at != -1:
            try:
                value, end = decoder.raw_decode(line, at)
            except ValueError:
                at = line.find("{", at + 1)
                continue
            if isinstance(value, dict):
                found.append(value)
            at = line.find("{", end)
    return found


def tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def describe(child: Child) -> str:
    """What went wrong in a child: the error a rank reported, else its output's tail."""
    errors = []
    for line in child.output.splitlines():
        if line.startswith("{") and '"error"' in line:
            error = last_json(line).get("error")
            if error and error not in errors:
                errors.append(error)
    return f"exit {child.returncode}: " + ("; ".join(errors) if errors else tail(child.output, 3))


class Monitor:
    """neuron-monitor with a config for one tag, its reports collected in a thread."""

    def __init__(self, binary: str, workdir: Path, tag: str) -> None:
        config_path = workdir / "selfcheck-monitor.json"
        config_path.write_text(json.dumps(monitor_config(period="1s", tag_filter=f"^{re.escape(tag)}$")))
        self.proc = subprocess.Popen([binary, "-c", str(config_path)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, errors="replace")
        self.reports: list[dict] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if isinstance(report, dict):
                self.reports.append(report)

    def stop(self) -> list[dict]:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(5)
        return self.reports


# ---------------------------------------------------------------- the checks


def package_versions(runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> dict[str, str | None]:
    """Installed versions of the Neuron OS packages (dpkg, else rpm), None when absent."""
    versions: dict[str, str | None] = {}
    for package in OS_PACKAGES:
        version = None
        for argv in (["dpkg-query", "-W", "-f=${Version}", package], ["rpm", "-q", "--qf", "%{VERSION}", package]):
            try:
                done = runner(argv, capture_output=True, text=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if done.returncode == 0 and done.stdout.strip():
                version = done.stdout.strip()
                break
        versions[package] = version
    return versions


def run_selfcheck(*, job_python: str | None = None, neuron_ls: str = "neuron-ls",
                  neuron_monitor: str = "neuron-monitor", bin_dir: str | Path = NEURON_BIN_DIR,
                  hold_s: float = 8.0, timeout_s: float = 1800.0, device_checks: Iterable[str] = DEVICE_CHECKS,
                  workdir: Path | None = None) -> SelfCheck:
    """Run the checks (the device ones named in `device_checks`); never raises for what
    it finds (a failure is a check's status)."""
    with tempfile.TemporaryDirectory(prefix="nd-selfcheck-") as scratch:
        return _run(job_python or config.job_python() or sys.executable, neuron_ls, neuron_monitor, Path(bin_dir),
                    hold_s, timeout_s, set(device_checks), workdir or Path(scratch))


def _run(python: str, neuron_ls: str, neuron_monitor: str, bin_dir: Path, hold_s: float, timeout_s: float,
         device_checks: set[str], workdir: Path) -> SelfCheck:
    tools = {name: find_tool(binary, bin_dir) for name, binary in
             (("neuron-ls", neuron_ls), ("neuron-monitor", neuron_monitor), ("neuron-top", "neuron-top"))}
    packages = package_versions()
    missing = [name for name in ("neuron-ls", "neuron-monitor") if not tools[name]]
    checks = [Check("tools", FAIL if missing else OK,
                    (f"not found on PATH or in {bin_dir}: {', '.join(missing)}; " if missing else "")
                    + ", ".join(f"{k}={v or '-'}" for k, v in {**tools, **packages}.items()),
                    {"paths": tools, "packages": packages})]
    try:
        inventory = run_neuron_ls(binary=neuron_ls, bin_dir=bin_dir)
    except NeuronLsError as exc:
        checks.append(Check("devices", FAIL, f"neuron-ls: {exc}"))
        return SelfCheck(True, "neuron-ls answered with something unreadable; see the devices check", checks)
    if not inventory.is_neuron:
        checks[0].status = INFO  # missing tools are expected where there is no device
        checks.append(Check("devices", SKIP, "neuron-ls found no Neuron device (no neuron-ls, no driver, or none "
                                             "attached)"))
        return SelfCheck(False, "No Neuron device on this host: it is not a Neuron host, nothing else to check.",
                         checks)
    checks.append(Check("devices", OK, f"{inventory.family} {inventory.instance_type or '(instance type unknown)'}: "
                                        f"{len(inventory.devices)} devices, {inventory.core_count} cores "
                                        f"{_ranges(inventory.core_ids)}"
                                        + (f", LNC={inventory.lnc}" if inventory.lnc else ""),
                        {"inventory": inventory.to_dict()}))
    report = probe_interpreter(python)
    checks.append(_software_check(inventory, report))
    result = SelfCheck(True, f"Neuron host: {inventory.family}, {inventory.core_count} NeuronCores; job Python "
                             f"{python} ({report.get('framework') or 'no torch'})", checks)
    if not device_checks:
        return result
    if report.get("error") or report.get("framework") not in (XLA, NATIVE):
        checks.append(Check("device checks", SKIP, "the job Python cannot run Neuron jobs; fix it first"))
        return result
    runner = JobPython(python, timeout_s)
    extra = {"NEURON_LOGICAL_NC_CONFIG": str(inventory.lnc)} if inventory.lnc else {}
    framework = report["framework"]
    if "one-core" in device_checks:
        result.answers["neuroncores_in_use_keys"] = _one_core_check(runner, inventory, tools["neuron-monitor"],
                                                                    framework, hold_s, workdir, extra, checks)
    if "two-jobs" in device_checks:
        result.answers["default_root_comm_port"] = _two_jobs_check(runner, inventory, framework, workdir, extra,
                                                                   checks)
    if "cache" in device_checks:
        _cache_check(runner, inventory, framework, workdir, extra, checks)
    if "native-ranks" in device_checks:
        _native_ranks_check(runner, inventory, framework, workdir, extra, checks)
    return result


def _ranges(cores: list[int]) -> str:
    return f"{cores[0]}-{cores[-1]}" if cores and cores == list(range(cores[0], cores[-1] + 1)) else str(cores)


def _software_check(inventory: HostInventory, report: dict) -> Check:
    if report.get("error"):
        return Check("job python", FAIL, report["error"], report)
    packages = report.get("packages") or {}
    kinds = {"compile": {}, "inference (compiled)": {"model_format": "neuron"}, "finetune": {}}
    verdicts = {}
    for label, extra in kinds.items():
        refusal = job_refusal(label.split()[0], inventory.family, 1, report, host_lnc=inventory.lnc, **extra)
        verdicts[label] = "yes" if refusal is None else f"no: {refusal.message}"
    problems = [f"runner does not import: {report['runner_error']}"] if report.get("runner_error") else []
    problems += [f"no {name}" for name in ("transformers", "safetensors") if not packages.get(name)]
    problems += ["neuronx-cc is not on the job's PATH"] if report.get("framework") == XLA and not report.get(
        "neuronx_cc") else []
    detail = (f"{report.get('executable')}: Python {report.get('python')}, torch {packages.get('torch')}, "
              f"torch-neuronx {packages.get('torch_neuronx')}, torch-xla {packages.get('torch_xla')}, neuronx-cc "
              f"{packages.get('neuronx_cc')}, runtime {report.get('runtime_version')}, Neuron SDK "
              f"{report.get('sdk_version') or 'not stated (NEURONDECK_NEURON_SDK)'}; can run: "
              + "; ".join(f"{k}: {v}" for k, v in verdicts.items()) + ("; " + "; ".join(problems) if problems else ""))
    runnable = any(v == "yes" for v in verdicts.values())
    return Check("job python", FAIL if problems or not runnable else OK, detail, {**report, "can_run": verdicts})


def _one_core_check(runner: JobPython, inventory: HostInventory, monitor: str | None, framework: str, hold_s: float,
                    workdir: Path, extra: dict[str, str], checks: list[Check]) -> str:
    core = inventory.core_ids[1] if len(inventory.core_ids) > 1 else inventory.core_ids[0]
    tag = f"neurondeck-selfcheck-{os.getpid()}"
    run_dir = workdir / "one-core"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = runner.env({**extra, "NEURON_RT_VISIBLE_CORES": str(core), "NEURON_PROCESS_TAG": tag})
    watching = Monitor(monitor, workdir, tag) if monitor else None
    started = time.monotonic()
    child = runner.run(runner.argv("tiny", "--workdir", str(run_dir), "--hold", f"{hold_s:g}"), env, run_dir)
    reports = watching.stop() if watching else []
    result = child.result
    what = "trace + load + run" if framework == XLA else "a tiny model on torch.device('neuron')"
    if child.returncode == 0 and result.get("ok"):
        checks.append(Check("one core", OK, f"{what} on core {core}: max |neuron - cpu| {result.get('max_diff'):.3g}, "
                                            f"{result.get('runs')} runs in {time.monotonic() - started:.1f} s",
                            {"core": core, **result}))
    else:
        checks.append(Check("one core", FAIL, f"{what} on core {core} failed: {describe(child)}", {"core": core}))
    if watching is None:
        checks.append(Check("monitor keys", SKIP, "neuron-monitor not found"))
        return "unknown (no neuron-monitor)"
    answer, keys = core_key_answer(reports, tag, core)
    checks.append(Check("monitor keys", INFO if answer in ("global", "relative") else FAIL,
                        f"neuroncores_in_use keys while the job ran on core {core} (NEURON_RT_VISIBLE_CORES={core}): "
                        f"{keys or 'none seen'} -> {answer}", {"core": core, "keys": keys, "reports": len(reports)}))
    return answer


def _collective_pair(runner: JobPython, framework: str, pairs: list[str], workdir: Path, extra: dict[str, str],
                     own_ports: bool, label: str) -> list[Child]:
    procs = []
    for index, cores in enumerate(pairs):
        run_dir = workdir / f"{label}-{index}"
        run_dir.mkdir(parents=True, exist_ok=True)
        env = runner.env({**extra, "NEURON_RT_VISIBLE_CORES": cores, "NEURON_PROCESS_TAG": f"{label}-{index}"})
        env.pop("NEURON_RT_ROOT_COMM_ID", None)
        if own_ports:
            env.update(training_env(framework, cores, str(workdir / "cache"), env))
        procs.append(runner.start(runner.torchrun_argv(2, "allreduce"), env, run_dir))
    return [runner.finish(proc) for proc in procs]


def _two_jobs_check(runner: JobPython, inventory: HostInventory, framework: str, workdir: Path,
                    extra: dict[str, str], checks: list[Check]) -> str:
    cores = inventory.core_ids
    if len(cores) < 4:
        checks.append(Check("two 2-core jobs", SKIP, f"needs 4 NeuronCores, this host has {len(cores)}"))
        return "not tried (fewer than 4 cores)"
    pairs = [f"{cores[0]}-{cores[1]}", f"{cores[2]}-{cores[3]}"]
    children = _collective_pair(runner, framework, pairs, workdir, extra, own_ports=True, label="own-port")
    good = all(c.returncode == 0 and c.result.get("sum") == 3 for c in children)
    checks.append(Check("two 2-core jobs", OK if good else FAIL,
                        f"all-reduce on {pairs[0]} and {pairs[1]} at once, each with its own NEURON_RT_ROOT_COMM_ID: "
                        + ("both summed 1 + 2 = 3" if good else
                           "; ".join(f"{p}: {describe(c)}" for p, c in zip(pairs, children)))))
    default = _collective_pair(runner, framework, pairs, workdir, extra, own_ports=False, label="default-port")
    outcome = ("both succeeded" if all(c.returncode == 0 and c.result.get("sum") == 3 for c in default) else
               "; ".join(f"{p}: {'ok' if c.returncode == 0 else describe(c)}" for p, c in zip(pairs, default)))
    checks.append(Check("default root port", INFO, f"the same two jobs with NEURON_RT_ROOT_COMM_ID unset "
                                                   f"(the plugin's fixed default): {outcome}"))
    return outcome


def _cache_check(runner: JobPython, inventory: HostInventory, framework: str, workdir: Path, extra: dict[str, str],
                 checks: list[Check]) -> None:
    cache = workdir / "compile-cache"
    env = runner.env({**extra, "NEURON_RT_VISIBLE_CORES": str(inventory.core_ids[0])})
    env.update(training_env(framework, str(inventory.core_ids[0]), str(cache), env))
    run_dir = workdir / "cache-run"
    run_dir.mkdir(parents=True, exist_ok=True)
    first = runner.run(runner.argv("graph"), env, run_dir)
    first_neffs = count_neffs(cache)
    second = runner.run(runner.argv("graph"), env, run_dir)
    second_neffs = count_neffs(cache)
    where = "NEURON_CC_FLAGS --cache_dir" if framework == XLA else "TORCH_NEURONX_NEFF_CACHE_DIR"
    if first.returncode or second.returncode:
        bad = first if first.returncode else second
        checks.append(Check("compile cache", FAIL, f"the graph run failed: {describe(bad)}"))
        return
    hit = cache_hit(first_neffs, second_neffs, second.output)
    checks.append(Check("compile cache", OK if hit else FAIL,
                        f"the same graph twice into {where}={cache}: {first_neffs} NEFF(s) after the first run, "
                        f"{second_neffs} after the second; " + ("served from the cache" if hit else "compiled again"),
                        {"first_neffs": first_neffs, "second_neffs": second_neffs}))


# Each part of the native-ranks child: (its key in a rank's result, the check's name,
# what native multi-rank fine-tunes lose when it fails).
NATIVE_RANK_PARTS = (
    ("allreduce", "native all-reduce",
     'native multi-rank fine-tunes cannot agree on a stop after a step (distributed.reduce_step on the "neuron" '
     "group's device all-reduce): they fail at their first step and cannot save on SIGTERM"),
    ("host_group", "native host group",
     "native multi-rank fine-tunes cannot hand rank 0 each rank's RNG states nor wait for its checkpoint write "
     "(the gloo group of distributed.host_group): they cannot start, checkpoint, or save on SIGTERM"),
    ("rng", "native rng",
     "native checkpoints cannot save and restore the neuron device's RNG state (checkpoints.rng_state / "
     "set_rng_state / seed_rng): a resumed run's device draws (dropout) differ from an uninterrupted run's"),
)


def _native_ranks_check(runner: JobPython, inventory: HostInventory, framework: str, workdir: Path,
                        extra: dict[str, str], checks: list[Check]) -> None:
    if framework != NATIVE:
        checks.append(Check("native ranks", SKIP, "the job Python is torch-xla's: its runs use neither the "
                                                  '"neuron" process group nor torch.neuron'))
        return
    cores = inventory.core_ids
    if len(cores) < 2:
        checks.append(Check("native ranks", SKIP, f"needs 2 NeuronCores, this host has {len(cores)}"))
        return
    pair = f"{cores[0]}-{cores[1]}"
    run_dir = workdir / "native-ranks"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = runner.env({**extra, "NEURON_RT_VISIBLE_CORES": pair})
    env.update(training_env(framework, pair, str(workdir / "cache"), env))
    child = runner.run(runner.torchrun_argv(2, "native-ranks"), env, run_dir)
    ranks = sorted((r for r in json_objects(child.output) if "rank" in r), key=lambda r: r["rank"])
    for key, name, loss in NATIVE_RANK_PARTS:
        parts = [rank.get(key) or {} for rank in ranks]
        if len(parts) == 2 and all(part.get("ok") for part in parts):
            checks.append(Check(name, OK, f"2 ranks on cores {pair}: {parts[0].get('detail')}"))
            continue
        found = "; ".join(f"rank {rank['rank']}: {part.get('detail')}" for rank, part in zip(ranks, parts)
                          if not part.get("ok"))
        checks.append(Check(name, FAIL, f"{loss}. 2 ranks on cores {pair}: {found or describe(child)}"))


# ---------------------------------------------------------------- children (run in the job Python)


def _child_tiny(workdir: Path, hold_s: float) -> dict:
    import torch

    from .neuron_env import installed_framework

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    example = torch.rand(2, 8)
    expected = model(example)
    if installed_framework() == XLA:
        import torch_neuronx

        os.chdir(workdir)
        traced = torch_neuronx.trace(model, (example,), compiler_workdir=str(workdir / "compile"))
        torch.jit.save(traced, str(workdir / "tiny.pt"))
        loaded = torch.jit.load(str(workdir / "tiny.pt"))

        def run() -> Any:
            return loaded(example)
    else:
        import torch_neuronx  # noqa: F401 - registers the "neuron" device

        device = torch.device("neuron")
        on_device = model.to(device)

        def run() -> Any:
            return on_device(example.to(device)).cpu()

    got, runs, until = run(), 1, time.monotonic() + hold_s
    while time.monotonic() < until:  # keep the core busy while neuron-monitor samples it
        run()
        runs += 1
    return {"ok": True, "max_diff": float((got - expected).abs().max()), "runs": runs}


def _child_allreduce() -> dict:
    import torch
    import torch.distributed as dist

    from .neuron_env import installed_framework

    rank = int(os.environ.get("RANK", "0"))
    if installed_framework() == XLA:
        import torch_xla.core.xla_model as xm
        import torch_xla.distributed.xla_backend  # noqa: F401 - registers the "xla" backend

        dist.init_process_group("xla")
        device = xm.xla_device()
        value = torch.tensor([float(rank + 1)], device=device)
        dist.all_reduce(value)
        xm.mark_step()
    else:
        world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        os.environ["NEURON_RT_VISIBLE_CORES"] = rank_core(os.environ.get("NEURON_RT_VISIBLE_CORES"),
                                                          int(os.environ.get("LOCAL_RANK", "0")), world)
        import torch_neuronx  # noqa: F401 - registers the device and the "neuron" backend

        dist.init_process_group(backend="neuron", init_method="env://")
        value = torch.tensor([float(rank + 1)], device=torch.device("neuron"))
        dist.all_reduce(value)
    total = float(value.cpu().item())
    dist.destroy_process_group()
    return {"ok": True, "rank": rank, "sum": total}


def _child_native_ranks() -> dict:
    """One of two native TorchNeuron ranks, through the calls a multi-rank fine-tune
    makes: its one core and the "neuron" group (neuron_train), the stop all-reduced with
    the loss on the device and the gloo group beside it gathering RNG states and waiting
    (distributed), torch.neuron's RNG state saved, restored and seeded (checkpoints).
    Each part is reported on its own: {"ok", "detail"}."""
    from . import distributed, neuron_train

    rank = int(os.environ.get("RANK", "0"))
    neuron_train.prepare_rank_environment(NATIVE)
    result: dict[str, Any] = {"ok": True, "rank": rank}
    try:
        import torch_neuronx  # noqa: F401 - registers the device, torch.neuron and the "neuron" backend

        device = neuron_train.native_device()
    except Exception as exc:
        failed = {"ok": False, "detail": f"torch_neuronx or the neuron device: {type(exc).__name__}: {exc}"}
        return {**result, "allreduce": failed, "host_group": failed, "rng": failed}
    result["rng"] = _part(_native_rng, device, rank)
    try:
        neuron_train.init_distributed(NATIVE)
    except Exception as exc:
        result["allreduce"] = {"ok": False, "detail": f'the "neuron" process group: {type(exc).__name__}: {exc}'}
        result["host_group"] = {"ok": False, "detail": 'not tried: the "neuron" process group did not start'}
        return result
    result["allreduce"] = _part(_native_allreduce, device, rank)
    result["host_group"] = _part(_native_host_group)
    distributed.shutdown()
    return result


def _part(run: Callable[..., dict], *args: Any) -> dict:
    try:
        return run(*args)
    except Exception as exc:
        return {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}


def _native_allreduce(device: Any, rank: int) -> dict:
    from . import distributed

    loss, stop = distributed.reduce_step(float(rank + 1), rank == 1, device=device)
    return {"ok": loss == 1.5 and stop, "detail": f'reduce_step on {device} over the "neuron" group: losses 1 and 2 '
                                                 f"gave mean {loss:g} (1.5 expected), rank 1's stop gave {stop}"}


def _native_host_group() -> dict:
    from . import distributed
    from .checkpoints import rng_state

    group = distributed.host_group()
    gathered = distributed.gather_objects(rng_state(), group)
    distributed.barrier(group)
    good = len(gathered) == 2 and all(isinstance(state, dict) and "cpu" in state for state in gathered)
    return {"ok": good, "detail": f"distributed.host_group (gloo) gathered {len(gathered)} ranks' RNG states "
                                  f"(2 expected) and passed its barrier"}


def _native_rng(device: Any, rank: int) -> dict:
    import torch

    from .checkpoints import rng_state, seed_rng, set_rng_state

    neuron = getattr(torch, "neuron", None)
    missing = [name for name in ("get_rng_state", "set_rng_state", "manual_seed") if not hasattr(neuron, name)]
    if neuron is None or missing:
        return {"ok": False, "detail": "no torch.neuron" if neuron is None else
                f"torch.neuron has no {', '.join(missing)}"}
    seed = 1234 + rank
    seed_rng(seed)
    seeded = neuron.get_rng_state()
    saved = rng_state()
    first = torch.rand(4, device=device).cpu()
    seed_rng(seed + 2)  # moves the state away from the saved one
    moved = not torch.equal(neuron.get_rng_state(), saved["neuron"])
    set_rng_state(saved)
    restored = torch.equal(neuron.get_rng_state(), saved["neuron"])
    repeats = torch.equal(first, torch.rand(4, device=device).cpu())
    seed_rng(seed)
    reseeded = torch.equal(neuron.get_rng_state(), seeded)
    return {"ok": moved and restored and reseeded and repeats,
            "detail": f"torch.neuron get_rng_state / set_rng_state / manual_seed: another seed moved the state "
                      f"{moved}, the saved state restored {restored}, the first seed its state again {reseeded}, "
                      f"device draws repeat after a restore {repeats}"}


def _child_graph() -> dict:
    import torch

    from .neuron_env import installed_framework

    a = torch.arange(64, dtype=torch.float32).reshape(8, 8) / 64
    if installed_framework() == XLA:
        import torch_xla.core.xla_model as xm

        device = xm.xla_device()
        out = (a.to(device) @ a.to(device) + 1).relu()
        xm.mark_step()
    else:
        import torch_neuronx  # noqa: F401

        device = torch.device("neuron")
        out = (a.to(device) @ a.to(device) + 1).relu()
    return {"ok": True, "sum": float(out.cpu().sum())}


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="neuron_selfcheck child")
    parser.add_argument("name", choices=["tiny", "allreduce", "graph", "native-ranks"])
    parser.add_argument("--workdir", type=Path, default=Path.cwd())
    parser.add_argument("--hold", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        if args.name == "tiny":
            result = _child_tiny(args.workdir, args.hold)
        elif args.name == "allreduce":
            result = _child_allreduce()
        elif args.name == "native-ranks":
            result = _child_native_ranks()
        else:
            result = _child_graph()
    except Exception as exc:  # reported to the parent as the check's failure
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        sys.exit(child_main(sys.argv[2:]))
    print("usage: python -m neuron_workers.backends.neuron_selfcheck child {tiny,allreduce,graph,native-ranks}",
          file=sys.stderr)
    sys.exit(2)
