"""`manage.py neuron_selfcheck` on a host without Neuron, and on a stand-in Neuron host.

The stand-in host: neuron-ls and neuron-monitor in a stand-in /opt/aws/neuron/bin,
and a job Python (this virtualenv's interpreter) whose path holds stand-in
torch_neuronx / torch_xla packages and the distribution metadata of the XLA
environment (PyTorch 2.9). The stand-ins keep the documented rules that the checks
depend on: the XLA plugin's fixed default root-comm port, held by each job's rank 0;
torch-xla's remapping of a core range to cores[LOCAL_RANK]; the compile cache's
"Using a cached neff" on a second compile of one graph. The stand-in neuron-monitor
reports a runtime's busy core from the process's own NEURON_RT_VISIBLE_CORES,
either as the global id or as 0 (relative), so both answers reach the report.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from django.core.management import call_command

from neuron_workers.backends import neuron_selfcheck
from neuron_workers.backends.neuron_selfcheck import cache_hit, core_key_answer, run_selfcheck

ROOT = Path(__file__).resolve().parent.parent
NEURON_LS = ROOT / "tests" / "data" / "neuron-ls"


def write(path: Path, text: str, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    if mode is not None:
        path.chmod(mode)
    return path


STAND_IN_TORCH_NEURONX = '''
    """Stand-in torch_neuronx: trace compiles with torch.jit.trace and, like neuronx-cc,
    writes its log into the working directory."""
    import torch

    __version__ = "2.9.0.2.15-standin"


    def trace(func, example_inputs, *_, compiler_workdir=None, compiler_args=None, **kwargs):
        with open("log-neuron-cc.txt", "w") as log:
            log.write("Compiler status PASS\\n")
        return torch.jit.trace(func, example_inputs, check_trace=False)
'''

STAND_IN_XLA_MODEL = '''
    """Stand-in torch_xla.core.xla_model on the CPU, configuring PJRT as the Neuron plugin
    does (pytorch/xla torch_xla/_internal/neuron.py): the root-comm address defaults to
    MASTER_ADDR:62182 and the job's rank 0 listens there; a core range is remapped to
    cores[LOCAL_RANK] and must have LOCAL_WORLD_SIZE cores. mark_step "compiles" the
    graph into NEURON_CC_FLAGS' --cache_dir (neuronxcc-<v>/MODULE_<hash>/model.neff) and
    logs a hit as the wrapper does."""
    import hashlib
    import os
    import socket
    import time

    import torch

    _root = None
    _graphs = []


    def xla_device():
        global _root
        addr = os.environ.setdefault("NEURON_RT_ROOT_COMM_ID", f"{os.environ.get('MASTER_ADDR', 'localhost')}:62182")
        world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        visible = os.environ.get("NEURON_RT_VISIBLE_CORES", "")
        low, _, high = visible.partition("-")
        cores = list(range(int(low), int(high or low) + 1)) if low else []
        if len(cores) > 1 or world > 1:
            if len(cores) != world:
                raise ValueError(f"LOCAL_WORLD_SIZE {world} is not the count {len(cores)} of {visible}")
            os.environ["NEURON_RT_VISIBLE_CORES"] = str(cores[int(os.environ.get("LOCAL_RANK", "0"))])
        if world > 1 and os.environ.get("LOCAL_RANK", "0") == "0" and _root is None:
            _root = socket.socket()
            try:
                _root.bind(("127.0.0.1", int(addr.rpartition(":")[2])))
            except OSError as exc:
                raise RuntimeError(f"nrt: cannot listen on NEURON_RT_ROOT_COMM_ID={addr}: {exc}") from None
            _root.listen()
            time.sleep(1.0)  # the runtime's bootstrap takes a while; the address is held meanwhile
        return torch.device("cpu")


    def mark_step():
        flags = os.environ.get("NEURON_CC_FLAGS", "").split()
        cache = next((f.split("=", 1)[1] for f in flags if f.startswith("--cache_dir=")), None)
        if cache is None:
            return
        module = os.path.join(cache, "neuronxcc-standin", "MODULE_" + hashlib.sha256(b"graph").hexdigest()[:20])
        neff = os.path.join(module, "model.neff")
        if os.path.exists(neff):
            print(f"Using a cached neff at {neff}. Exiting with a successfully compiled graph.", flush=True)
            return
        os.makedirs(module, exist_ok=True)
        with open(neff, "wb") as f:
            f.write(b"NEFF")
'''

STAND_IN_XLA_BACKEND = '''
    """Stand-in torch_xla.distributed.xla_backend: the "xla" process group, on gloo."""
    import torch.distributed as dist


    def _create(store, rank, size, timeout):
        return dist.ProcessGroupGloo(store, rank, size, timeout)


    if "xla" not in dist.Backend.backend_list:
        dist.Backend.register_backend("xla", _create, devices=["cpu"])
'''

STAND_IN_MONITOR = '''
    #!{python}
    """Stand-in neuron-monitor: every 0.3 s a report with one runtime per process whose
    NEURON_PROCESS_TAG matches the config's tag_filter, busy on its visible core, keyed
    {mode}."""
    import json, os, re, sys, time

    config = json.load(open(sys.argv[sys.argv.index("-c") + 1]))
    pattern = re.compile(config["neuron_runtimes"][0]["tag_filter"])
    while True:
        runtimes = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                raw = open(f"/proc/{{pid}}/environ", "rb").read().split(b"\\0")
            except OSError:
                continue
            env = dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)
            tag = env.get("NEURON_PROCESS_TAG")
            if not tag or not pattern.search(tag) or "NEURON_RT_VISIBLE_CORES" not in env:
                continue
            core = env["NEURON_RT_VISIBLE_CORES"].split("-")[0]
            key = core if "{mode}" == "global" else "0"
            runtimes.append({{"pid": int(pid), "neuron_runtime_tag": tag, "error": "", "report": {{
                "neuroncore_counters": {{"period": 1.0, "error": "",
                                         "neuroncores_in_use": {{key: {{"neuroncore_utilization": 55.0}}}}}}}}}})
        print(json.dumps({{"neuron_runtime_data": runtimes, "system_data": {{}}, "instance_info": {{}},
                          "neuron_hardware_info": {{}}}}), flush=True)
        time.sleep(0.3)
'''

STAND_IN_NATIVE_TORCH_NEURONX = '''
    """Stand-in native torch_neuronx on the CPU. Importing it registers the "neuron"
    process group backend (gloo, which all-reduces host tensors as ProcessGroupNeuron
    does device ones; one core per process, as TorchNeuron asserts) and torch.neuron,
    the device's generator (a CPU generator); the neuron device is the CPU
    (neuron_train.native_device). STANDIN_BROKEN=1: no "neuron" backend, and
    torch.neuron.set_rng_state does nothing."""
    import os
    import types

    import torch
    import torch.distributed as dist

    from neuron_workers.backends import neuron_train

    __version__ = "2.10.0.2.33-standin"
    _broken = os.environ.get("STANDIN_BROKEN") == "1"
    _generator = torch.Generator()
    torch.neuron = types.SimpleNamespace(
        get_rng_state=_generator.get_state, manual_seed=_generator.manual_seed,
        set_rng_state=(lambda state: None) if _broken else _generator.set_state)
    neuron_train.native_device = lambda: torch.device("cpu")


    def _create(store, rank, size, timeout):
        cores = os.environ["NEURON_RT_VISIBLE_CORES"]
        if not cores.isdigit():
            raise RuntimeError(f"one NeuronCore per process, got NEURON_RT_VISIBLE_CORES={cores}")
        return dist.ProcessGroupGloo(store, rank, size, timeout)


    if not _broken and "neuron" not in dist.Backend.backend_list:
        dist.Backend.register_backend("neuron", _create, devices=["cpu"])
'''

XLA_METADATA = {"torch": "2.9.0", "torch-neuronx": "2.9.0.2.15.32035", "torch-xla": "2.9.0",
                "neuronx-cc": "2.27.5334.0"}
NATIVE_METADATA = {"torch": "2.10.0", "torch-neuronx": "2.10.0.2.33.0"}


def job_python(tmp_path: Path, site: Path, metadata: dict[str, str]) -> Path:
    """A job Python (this interpreter with `site` first on its path, holding `metadata`'s
    distributions) and its torchrun; returns the python."""
    for name, version in metadata.items():
        write(site / f"{name.replace('-', '_')}-{version}.dist-info" / "METADATA",
              f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    venv = tmp_path / "neuron-venv" / "bin"
    write(venv / "python", f'#!/bin/sh\nPYTHONPATH="{site}:$PYTHONPATH" exec {sys.executable} "$@"\n', 0o755)
    write(venv / "torchrun",
          f'#!/bin/sh\nPYTHONPATH="{site}:$PYTHONPATH" exec {sys.executable} -m torch.distributed.run "$@"\n', 0o755)
    return venv / "python"


def stand_in_tools(tmp_path: Path, monkeypatch) -> Path:
    """neuron-ls of a trn1.32xlarge in a stand-in Neuron bin directory; returns the directory."""
    bin_dir = tmp_path / "opt-aws-neuron-bin"
    write(bin_dir / "neuron-ls", f"#!/bin/sh\n/bin/cat {NEURON_LS / 'trn1.32xlarge.json'}\n", 0o755)
    monkeypatch.setenv("NEURONDECK_INSTANCE_TYPE", "trn1.32xlarge")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    return bin_dir


@pytest.fixture
def stand_in_host(tmp_path, monkeypatch):
    """A stand-in Neuron host (trn1.32xlarge) with an XLA job Python; returns a
    function making its neuron-monitor report global or relative keys."""
    bin_dir = stand_in_tools(tmp_path, monkeypatch)
    site = tmp_path / "site"
    write(site / "torch_neuronx" / "__init__.py", STAND_IN_TORCH_NEURONX)
    write(site / "torch_xla" / "__init__.py", "")
    write(site / "torch_xla" / "core" / "__init__.py", "")
    write(site / "torch_xla" / "core" / "xla_model.py", STAND_IN_XLA_MODEL)
    write(site / "torch_xla" / "distributed" / "__init__.py", "")
    write(site / "torch_xla" / "distributed" / "xla_backend.py", STAND_IN_XLA_BACKEND)
    python = job_python(tmp_path, site, XLA_METADATA)
    write(python.with_name("neuronx-cc"), "#!/bin/sh\nexit 0\n", 0o755)  # a console script of the venv, on PATH

    def host(mode: str) -> dict:
        write(bin_dir / "neuron-monitor", STAND_IN_MONITOR.format(python=sys.executable, mode=mode), 0o755)
        return {"job_python": str(python), "bin_dir": bin_dir, "hold_s": 2.0, "timeout_s": 240.0}

    return host


# ---------------------------------------------------------------- no Neuron here


def test_on_a_host_without_neuron_it_says_so_and_exits_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    call_command("neuron_selfcheck", "--json", "--neuron-bin-dir", str(tmp_path / "none"))
    report = json.loads(capsys.readouterr().out)
    assert report["neuron_host"] is False and report["failed"] is False
    assert "not a Neuron host" in report["summary"]
    call_command("neuron_selfcheck", "--neuron-bin-dir", str(tmp_path / "none"))
    assert "No Neuron device on this host" in capsys.readouterr().out


# ---------------------------------------------------------------- a stand-in Neuron host


def test_on_a_neuron_host_it_runs_every_check_and_answers_the_open_questions(stand_in_host, tmp_path):
    result = run_selfcheck(**stand_in_host("global"), workdir=tmp_path / "work")
    checks = {check.name: check for check in result.checks}
    assert result.neuron_host and not result.failed, result.table()
    assert checks["devices"].detail.startswith("trn1 trn1.32xlarge: 16 devices, 32 cores 0-31")
    assert "torch 2.9.0" in checks["job python"].detail and "compile: yes" in checks["job python"].detail
    assert checks["one core"].status == "ok" and checks["one core"].data["core"] == 1
    assert result.answers["neuroncores_in_use_keys"] == "global"
    assert checks["two 2-core jobs"].status == "ok" and "1 + 2 = 3" in checks["two 2-core jobs"].detail
    # The stand-in plugin holds its fixed default port: whichever job comes second fails on it.
    assert checks["default root port"].status == "info"
    assert "both succeeded" in result.answers["default_root_comm_port"] or \
        "cannot listen on NEURON_RT_ROOT_COMM_ID" in result.answers["default_root_comm_port"]
    assert checks["compile cache"].status == "ok" and "served from the cache" in checks["compile cache"].detail
    assert (tmp_path / "work" / "one-core" / "log-neuron-cc.txt").exists()  # the compile log where it ran


def test_relative_monitor_keys_are_reported_as_such(stand_in_host, tmp_path, capsys):
    options = stand_in_host("relative")
    call_command("neuron_selfcheck", "--json", "--job-python", options["job_python"], "--neuron-bin-dir",
                 str(options["bin_dir"]), "--hold-seconds", "2", "--no-device-checks")
    quick = json.loads(capsys.readouterr().out)
    assert quick["neuron_host"] and [c["name"] for c in quick["checks"]] == ["tools", "devices", "job python"]
    result = run_selfcheck(**options, workdir=tmp_path / "work", device_checks=["one-core"])
    assert result.answers["neuroncores_in_use_keys"] == "relative"
    assert [c.name for c in result.checks][-2:] == ["one core", "monitor keys"]


def test_native_ranks_check_the_neuron_group_the_gloo_group_beside_it_and_the_device_rng(tmp_path, monkeypatch):
    """A native TorchNeuron job Python: two ranks all-reduce the stop on the device over
    the "neuron" group, gather RNG states and wait over distributed.host_group, and
    round-trip torch.neuron's RNG state. (The stand-in device listing is a trn1's; this
    check does not look at the family.)"""
    site = tmp_path / "site"
    write(site / "torch_neuronx" / "__init__.py", STAND_IN_NATIVE_TORCH_NEURONX)
    options = {"job_python": str(job_python(tmp_path, site, NATIVE_METADATA)),
               "bin_dir": stand_in_tools(tmp_path, monkeypatch), "timeout_s": 240.0}
    result = run_selfcheck(**options, workdir=tmp_path / "work", device_checks=["native-ranks"])
    checks = {check.name: check for check in result.checks}
    assert [c.name for c in result.checks][-3:] == ["native all-reduce", "native host group", "native rng"]
    assert all(checks[name].status == "ok" for name in ("native all-reduce", "native host group", "native rng")), \
        result.table()
    assert "gave mean 1.5" in checks["native all-reduce"].detail and "cores 0-1" in checks["native all-reduce"].detail
    assert "gathered 2 ranks' RNG states" in checks["native host group"].detail

    monkeypatch.setenv("STANDIN_BROKEN", "1")  # no "neuron" backend; torch.neuron.set_rng_state does nothing
    broken = run_selfcheck(**options, workdir=tmp_path / "broken", device_checks=["native-ranks"])
    checks = {check.name: check for check in broken.checks}
    assert broken.failed and all(checks[name].status == "fail" for name in
                                 ("native all-reduce", "native host group", "native rng"))
    assert "cannot save on SIGTERM" in checks["native all-reduce"].detail
    assert '"neuron" process group' in checks["native all-reduce"].detail
    assert "cannot start, checkpoint, or save on SIGTERM" in checks["native host group"].detail
    assert "device draws (dropout) differ" in checks["native rng"].detail
    assert "the saved state restored False" in checks["native rng"].detail


def test_an_xla_job_python_skips_the_native_ranks_check(stand_in_host, tmp_path):
    result = run_selfcheck(**stand_in_host("global"), workdir=tmp_path / "work", device_checks=["native-ranks"])
    assert result.checks[-1].name == "native ranks" and result.checks[-1].status == "skip"


# ---------------------------------------------------------------- the pure parts


def report(tag: str, keys: list[str]) -> dict:
    return {"neuron_runtime_data": [{"neuron_runtime_tag": tag, "report": {"neuroncore_counters": {
        "neuroncores_in_use": {key: {"neuroncore_utilization": 10.0} for key in keys}}}}]}


def test_core_keys_answer_global_relative_or_unknown():
    assert core_key_answer([report("t", ["5"])], "t", 5) == ("global", ["5"])
    assert core_key_answer([report("t", ["0"]), report("other", ["5"])], "t", 5) == ("relative", ["0"])
    assert core_key_answer([report("other", ["5"])], "t", 5) == ("unknown", [])
    assert core_key_answer([report("t", ["0"])], "t", 0)[0].startswith("ambiguous")
    assert core_key_answer([report("t", ["3", "5"])], "t", 5)[0] == "unexpected"


def test_a_cache_hit_is_the_logged_hit_or_no_new_neff():
    assert cache_hit(0, 0, "... Using a cached neff at /c/x/model.neff ...")
    assert cache_hit(1, 1, "")
    assert not cache_hit(1, 2, "") and not cache_hit(0, 0, "")


def test_the_selfcheck_module_is_django_and_torch_free_at_import():
    import subprocess

    code = ("import sys, neuron_workers.backends.neuron_selfcheck; "
            "print([m for m in ('django', 'jobs', 'torch') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "[]", done.stderr
    assert neuron_selfcheck.OS_PACKAGES[-1] == "aws-neuronx-tools"


def test_a_child_s_result_is_read_when_ranks_print_on_one_line():
    from neuron_workers.backends.neuron_selfcheck import last_json

    assert last_json('log\n{"ok": true, "rank": 0, "sum": 3.0}{"ok": true, "rank": 1, "sum": 3.0}\n') == \
        {"ok": True, "rank": 1, "sum": 3.0}
    assert last_json('{"a": 1}\nnoise {"b": 2} tail\n') == {"b": 2}
    assert last_json("no result") == {}
