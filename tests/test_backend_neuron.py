"""The neuron backend at its seams, with stand-in torch_neuronx / torch_xla modules.

No Neuron hardware here: these tests pin down what the backend passes to the
documented API (neuron.md §4.2-4.6), how it maps failures to codes, and the
torchrun launcher; the model work underneath is real (tiny GPT-2 on CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import neuron_workers.backends as registry
from neuron_workers.backends import JobContext, JobFailed, detect_backend, get_backend
from neuron_workers.backends import detect, neuron, neuron_env, neuron_errors, neuron_launch, neuron_train
from neuron_workers.backends.tinymodel import create_demo_dataset, create_tiny_model

SPEC = {"model_id": 1, "batch_size": 1, "sequence_length": 32, "target": "inf2",
        "compiler_options": ["--auto-cast matmult", "-O1"]}

# What a host's job Python has installed (neuron_env reads distribution metadata):
# the XLA torch-neuronx environment of Inf2/Trn1 (PyTorch 2.9), or native
# TorchNeuron (PyTorch 2.13) of Trn2/Trn3.
XLA_PYTHON = {"torch": "2.9.0", "torch-neuronx": "2.9.0.2.15-standin", "torch-xla": "2.9.0",
              "neuronx-cc": "2.27.5334.0", "libneuronxla": "2.2.14584.0", "transformers": "4.57.6"}
NATIVE_PYTHON = {"torch": "2.13.0", "torch-neuronx": "2.13.0.1.0", "neuronx-cc": "2.28.1.0",
                 "transformers": "4.57.6"}
# The Neuron XLA plugin's fixed default root-comm port (pytorch/xla torch_xla/_internal/neuron.py).
XLA_DEFAULT_ROOT_PORT = 62182


@pytest.fixture(autouse=True)
def installed(monkeypatch) -> dict:
    """The job Python's installed distributions (default: the XLA environment)."""
    versions = dict(XLA_PYTHON)
    monkeypatch.setattr(neuron_env, "dist_version", lambda name: versions.get(name))
    return versions


# What a job's launch puts in its process's environment. Tests that start job processes
# in-process (the supervisor's) may leave them behind; a backend test starts without.
JOB_VARIABLES = ("NEURON_RT_VISIBLE_CORES", "NEURON_PROCESS_TAG", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "WORLD_SIZE",
                 "RANK", "NEURON_RT_ROOT_COMM_ID", "NEURONDECK_TRIAL_STEPS", "NEURONDECK_JOB_CORES")


@pytest.fixture(autouse=True)
def restore_environ():
    """The backend sets its process's environment for the job (the job process is its own)."""
    saved = dict(os.environ)
    for name in JOB_VARIABLES:
        os.environ.pop(name, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


def visible_cores() -> list[int]:
    return neuron_env.parse_visible_cores(os.environ.get("NEURON_RT_VISIBLE_CORES"))


class StandInNeuronx(types.ModuleType):
    """torch_neuronx as the runtime would see it, on the CPU.

    trace() "compiles" with torch.jit.trace (the artifact is real TorchScript) and
    records the call. As neuronx-cc does, it writes log-neuron-cc.txt into the
    process's working directory and its output to the inherited descriptors. The
    artifact remembers the logical core size it was compiled for (trn2: the
    --logical-nc-config given, else 2) and its batch. DataParallel enforces the
    documented rules: device ids count from 0 within NEURON_RT_VISIBLE_CORES, and
    without dynamic batching each core gets exactly the compiled batch.
    """

    def __init__(self, error: BaseException | None = None, compiler_says: bytes = b"Compiler status PASS\n"):
        super().__init__("torch_neuronx")
        self.__version__ = "2.9.0.2.15-standin"
        self.calls: list[dict] = []
        self.error = error
        self.compiler_says = compiler_says
        self.parallel_runs: list[int] = []  # device id of each chunk run

    def trace(self, func, example_inputs, *_, compiler_workdir=None, compiler_args=None, **kwargs):
        self.calls.append({"func": func, "example_inputs": example_inputs, "compiler_workdir": compiler_workdir,
                           "compiler_args": compiler_args, "kwargs": kwargs, "cwd": os.getcwd(),
                           "NEURON_CC_FLAGS": os.environ.get("NEURON_CC_FLAGS")})
        Path("log-neuron-cc.txt").write_text("neuronx-cc log: 3 passes\n")  # --logfile's default, in the cwd
        os.write(1, self.compiler_says)  # like the neuronx-cc subprocess writing to the inherited fd
        if self.error is not None:
            raise self.error
        args = dict(arg.partition("=")[::2] for arg in compiler_args)
        lnc = int(args.get("--logical-nc-config", 2)) if args.get("--target") == "trn2" else 0
        return torch.jit.trace(CompiledFor(func, lnc, example_inputs[0].shape[0]), example_inputs, check_trace=False)

    def DataParallel(self, module, device_ids=None, dim=0, set_dynamic_batching=True):  # noqa: N802 (the API's name)
        cores = visible_cores()
        ids = list(range(len(cores))) if device_ids is None else device_ids
        assert all(0 <= i < len(cores) for i in ids), f"device ids {ids} outside the {len(cores)} visible cores"
        batch = int(module._standin_batch)

        def run(x):
            assert not set_dynamic_batching and dim == 0
            assert x.shape[0] == batch * len(ids), f"batch {x.shape[0]} is not {len(ids)} x the compiled {batch}"
            outputs = []
            for device, chunk in zip(ids, x.split(batch)):
                self.parallel_runs.append(device)
                outputs.append(module(chunk))
            return torch.cat(outputs)

        return run


class CompiledFor(torch.nn.Module):
    """The traced model plus what the stand-in compiler recorded in its NEFF."""

    def __init__(self, inner, lnc: int, batch: int):
        super().__init__()
        self.inner = inner
        self.register_buffer("_standin_lnc", torch.tensor(lnc))
        self.register_buffer("_standin_batch", torch.tensor(batch))

    def forward(self, x):
        return self.inner(x)


class StandInRuntime:
    """torch.jit.load of a Neuron artifact as the runtime does it: a trn2 NEFF loads only
    when NEURON_LOGICAL_NC_CONFIG (default 2) equals the size it was compiled for, and a
    loaded model runs on one NeuronCore (the first one the process sees)."""

    def __init__(self, real_load):
        self.real_load = real_load
        self.loaded_on: list[int | None] = []

    def __call__(self, path, *args, **kwargs):
        module = self.real_load(path, *args, **kwargs)
        compiled = int(getattr(module, "_standin_lnc", 0))
        running = int(os.environ.get("NEURON_LOGICAL_NC_CONFIG") or 2)
        if compiled and compiled != running:
            raise RuntimeError(f"nrt_load failed: NEFF compiled for logical NeuronCore size {compiled}, "
                               f"runtime is {running}")
        self.loaded_on.append((visible_cores() or [None])[0])
        return module


class StandInXla:
    """torch_xla on the CPU: counts optimizer_step / mark_step, and on the first device
    touch configures PJRT as the Neuron plugin does (pytorch/xla
    torch_xla/_internal/neuron.py): NEURON_RT_ROOT_COMM_ID defaults to
    MASTER_ADDR:62182, and under torchrun a range in NEURON_RT_VISIBLE_CORES is
    remapped to cores[LOCAL_RANK], refused unless it has LOCAL_WORLD_SIZE cores."""

    def __init__(self) -> None:
        self.optimizer_steps = 0
        self.mark_steps = 0
        self.device_env: dict | None = None
        self.rng_seed = 101

    def modules(self) -> dict[str, types.ModuleType]:
        xm = types.ModuleType("torch_xla.core.xla_model")
        xm.xla_device = self._xla_device
        xm.optimizer_step = self._optimizer_step
        xm.mark_step = self._mark_step
        xm.get_rng_state = lambda device=None: self.rng_seed
        xm.set_rng_state = lambda seed, device=None: setattr(self, "rng_seed", seed)
        core = types.ModuleType("torch_xla.core")
        core.xla_model = xm
        backend = types.ModuleType("torch_xla.distributed.xla_backend")
        distributed = types.ModuleType("torch_xla.distributed")
        distributed.xla_backend = backend
        root = types.ModuleType("torch_xla")
        root.core, root.distributed = core, distributed
        return {"torch_xla": root, "torch_xla.core": core, "torch_xla.core.xla_model": xm,
                "torch_xla.distributed": distributed, "torch_xla.distributed.xla_backend": backend}

    def _xla_device(self):
        if self.device_env is None:
            os.environ.setdefault("NEURON_RT_ROOT_COMM_ID",
                                  f"{os.environ.get('MASTER_ADDR', 'localhost')}:{XLA_DEFAULT_ROOT_PORT}")
            world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            cores = visible_cores()
            if len(cores) > 1 or world > 1:
                if world != len(cores):
                    raise ValueError(f"LOCAL_WORLD_SIZE (torchrun) value of {world} is not equal to count "
                                     f"{len(cores)} from NEURON_RT_VISIBLE_CORES {cores}")
                os.environ["NEURON_RT_VISIBLE_CORES"] = str(cores[int(os.environ.get("LOCAL_RANK", "0"))])
            self.device_env = dict(os.environ)
        return torch.device("cpu")

    def _optimizer_step(self, optimizer, *args, **kwargs):
        self.optimizer_steps += 1
        optimizer.step()

    def _mark_step(self):
        self.mark_steps += 1


class StandInProcessGroups:
    """torch.distributed.init_process_group as the Neuron backends take it: "xla" or
    "neuron" only, and TorchNeuron asserts one device per process, so a native rank
    must see exactly one core. Joins a real one-process gloo group on the CPU."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.calls: list[tuple[str, str | None]] = []
        self.real_init = dist.init_process_group

    def __call__(self, backend=None, init_method=None, **kwargs):
        import torch.distributed as dist

        self.calls.append((backend, os.environ.get("NEURON_RT_VISIBLE_CORES")))
        assert backend in ("xla", "neuron"), f"process group backend {backend!r}"
        if backend == "neuron" and len(visible_cores()) != 1:
            raise AssertionError(f"TorchNeuron: one device per process, NEURON_RT_VISIBLE_CORES="
                                 f"{os.environ.get('NEURON_RT_VISIBLE_CORES')!r}")
        self.real_init("gloo", store=dist.HashStore(), rank=0, world_size=1)


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-gpt")


@pytest.fixture
def standin(monkeypatch) -> StandInNeuronx:
    fake = StandInNeuronx()
    monkeypatch.setitem(sys.modules, "torch_neuronx", fake)
    return fake


@pytest.fixture
def runtime(monkeypatch) -> StandInRuntime:
    fake = StandInRuntime(torch.jit.load)
    monkeypatch.setattr(torch.jit, "load", fake)
    return fake


@pytest.fixture
def process_groups(monkeypatch):
    import torch.distributed as dist

    fake = StandInProcessGroups()
    monkeypatch.setattr(dist, "init_process_group", fake)
    yield fake
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "neuron-cache"
    monkeypatch.setenv("NEURONDECK_COMPILE_CACHE", str(path))
    monkeypatch.setenv("NEURON_CC_FLAGS", "--retry_failed_compilation --cache_dir=/old/cache")
    return path


def make_ctx(workdir: Path, kind: str, spec: dict, inputs: dict, **kwargs) -> JobContext:
    lines: list[str] = []
    metrics: list[dict] = []
    ctx = JobContext(job_id=11, kind=kind, spec=spec, workdir=workdir, inputs=inputs, log=lines.append,
                     metric=metrics.append, **kwargs)
    ctx.lines, ctx.metrics = lines, metrics  # type: ignore[attr-defined]
    return ctx


def compile_ctx(tmp_path: Path, model_dir: Path, **change) -> JobContext:
    inputs = {"model_path": str(model_dir), "model_format": "hf"}
    return make_ctx(tmp_path / "job", "compile", {**SPEC, **change}, inputs)


# ---------------------------------------------------------------- compile


def test_compile_traces_with_validated_args_in_the_compile_dir_leaving_neuron_cc_flags_alone(
        standin, cache_dir, tiny_lm_dir, tmp_path):
    result = get_backend("neuron").run(compile_ctx(tmp_path, tiny_lm_dir))
    (call,) = standin.calls
    assert call["compiler_args"] == ["--target=inf2", "--auto-cast=matmult", "--optlevel=1"]
    assert call["compiler_workdir"] == call["cwd"] == str(tmp_path / "job" / "compile")
    # trace runs neuronx-cc directly: NEURON_CC_FLAGS' --cache_dir would do nothing
    # there (aws-neuron-sdk#865), so the backend does not pretend it does.
    assert call["NEURON_CC_FLAGS"] == "--retry_failed_compilation --cache_dir=/old/cache"
    (example,) = call["example_inputs"]
    assert example.shape == (1, 32) and example.dtype == torch.long
    assert result["backend"] == "neuron" and result["input_shape"] == [1, 32]
    assert result["compiler_version"].startswith("torch-neuronx-2.9.0.2.15-standin+neuronx-cc-")
    assert result["compiler_options"] == ["--auto-cast=matmult", "--optlevel=1"]
    assert result["max_abs_logit_diff"] < 1e-4  # the stand-in "compiles" exactly


def test_compile_restores_neuron_cc_flags_afterwards(standin, cache_dir, tiny_lm_dir, tmp_path):
    import os

    get_backend("neuron").run(compile_ctx(tmp_path, tiny_lm_dir))
    assert os.environ["NEURON_CC_FLAGS"] == "--retry_failed_compilation --cache_dir=/old/cache"


def test_the_compile_target_defaults_to_the_hosts_family(standin, cache_dir, tiny_lm_dir, tmp_path):
    # The worker passes the host's family; a trn1 host compiled for inf2 before.
    spec = {key: value for key, value in SPEC.items() if key != "target"}
    ctx = make_ctx(tmp_path / "job", "compile", {**spec, "family": "trn1"},
                   {"model_path": str(tiny_lm_dir), "model_format": "hf"})
    assert get_backend("neuron").run(ctx)["target"] == "trn1"
    assert standin.calls[0]["compiler_args"][0] == "--target=trn1"


def test_compile_saves_the_traced_module_with_torch_jit_save(standin, cache_dir, tiny_lm_dir, tmp_path, monkeypatch):
    saved = []
    real_save = torch.jit.save

    def recording_save(module, path, *args, **kwargs):
        saved.append((module, path))
        return real_save(module, path, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "save", recording_save)
    get_backend("neuron").run(compile_ctx(tmp_path, tiny_lm_dir))
    artifacts = tmp_path / "job" / "artifacts"
    ((module, path),) = saved
    assert path == str(artifacts / "model.pt") and isinstance(module, torch.jit.ScriptModule)
    meta = json.loads((artifacts / "compile_meta.json").read_text())
    # No cache directory is recorded: none was used (trace ignores NEURON_CC_FLAGS).
    assert meta["target"] == "inf2" and "cache_dir" not in meta and meta["logical_nc_config"] is None
    assert (artifacts / "tokenizer" / "tokenizer_config.json").exists()


def test_compile_log_keeps_compiler_output_and_log_files(standin, cache_dir, tiny_lm_dir, tmp_path, monkeypatch):
    # neuronx-cc writes its log into the working directory, not compiler_workdir.
    elsewhere = tmp_path / "process-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ctx = compile_ctx(tmp_path, tiny_lm_dir)
    get_backend("neuron").run(ctx)
    log = (tmp_path / "job" / "artifacts" / "compile_log.txt").read_text()
    assert "Compiler status PASS" in log
    assert "neuronx-cc log: 3 passes" in log
    assert list(elsewhere.iterdir()) == [] and os.getcwd() == str(elsewhere)
    assert "--target=inf2" in log
    assert "Compiler status PASS" in ctx.lines  # replayed into the job log too


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RuntimeError("Failed to allocate 172.000MB (usage: tensors) on ND 0:NC 0"), "oom"),
        (RuntimeError("TDRV:dmem_alloc_internal Failed to alloc DEVICE memory"), "oom"),
        (RuntimeError('nrt_tensor_allocate status=4 "Allocation Failure"'), "oom"),
        (RuntimeError("nrt_load failed with NRT status 11"), "oom"),
        (MemoryError(), "oom"),
        (subprocess.CalledProcessError(-9, ["neuronx-cc", "compile"]), "oom"),
        (RuntimeError("ERROR NRT:nrt_allocate_neuron_cores NeuronCore(s) not available - Requested:nc1-nc1 "
                      "Available:0"), "cores_unavailable"),
        (RuntimeError("nrt_load_collectives status=9"), "cores_unavailable"),
        (RuntimeError("neuronx-cc compilation failed with 70 at tp_barrier"), "compile_error"),
        (subprocess.CalledProcessError(1, ["neuronx-cc", "compile"]), "compile_error"),
    ],
)
def test_compile_failures_map_to_job_failed_codes(monkeypatch, cache_dir, tiny_lm_dir, tmp_path, error, code):
    monkeypatch.setitem(sys.modules, "torch_neuronx", StandInNeuronx(error=error))
    with pytest.raises(JobFailed) as info:
        get_backend("neuron").run(compile_ctx(tmp_path, tiny_lm_dir))
    assert info.value.code == code
    assert info.value.message.startswith("compile failed")
    assert "Compiler status PASS" in (tmp_path / "job" / "artifacts" / "compile_log.txt").read_text()


def test_a_killed_compiler_is_oom_even_when_only_its_log_says_so(monkeypatch, cache_dir, tiny_lm_dir, tmp_path):
    fake = StandInNeuronx(error=RuntimeError("neuronx-cc exited with an error"), compiler_says=b"Killed\n")
    monkeypatch.setitem(sys.modules, "torch_neuronx", fake)
    with pytest.raises(JobFailed) as info:
        get_backend("neuron").run(compile_ctx(tmp_path, tiny_lm_dir))
    assert info.value.code == "oom"


def test_bad_options_are_refused_before_torch_neuronx_is_touched(monkeypatch, tiny_lm_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_neuronx", None)  # importing would raise
    ctx = compile_ctx(tmp_path, tiny_lm_dir, compiler_options=["--logfile=/etc/passwd"])
    with pytest.raises(JobFailed) as info:
        get_backend("neuron").run(ctx)
    assert info.value.code == "bad_input" and "'--logfile=/etc/passwd'" in info.value.message


def test_lnc_is_accepted_for_trn2_only(standin, cache_dir, tiny_lm_dir, tmp_path):
    get_backend("neuron").run(compile_ctx(tmp_path, tiny_lm_dir, target="trn2", compiler_options=["-lnc", "2"]))
    assert standin.calls[0]["compiler_args"] == ["--target=trn2", "--logical-nc-config=2"]
    with pytest.raises(JobFailed, match="only applies to target trn2"):
        get_backend("neuron").run(compile_ctx(tmp_path / "b", tiny_lm_dir, target="trn1", compiler_options=["-lnc 2"]))


def test_without_torch_neuronx_compile_is_unavailable(monkeypatch, tiny_lm_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_neuronx", None)
    with pytest.raises(JobFailed) as info:
        get_backend("neuron").run(compile_ctx(tmp_path, tiny_lm_dir))
    assert info.value.code == "unavailable"


def test_a_cpu_target_is_compiled_by_the_cpu_backend(standin, tiny_lm_dir, tmp_path):
    result = get_backend("neuron").run(compile_ctx(tmp_path, tiny_lm_dir, target="cpu", compiler_options=[]))
    assert result["backend"] == "cpu" and standin.calls == []


# ---------------------------------------------------------------- inference


@pytest.fixture
def neuron_artifact(standin, cache_dir, tiny_lm_dir, tmp_path) -> Path:
    get_backend("neuron").run(compile_ctx(tmp_path / "compile", tiny_lm_dir))
    return tmp_path / "compile" / "job" / "artifacts"


def inference_ctx(tmp_path: Path, artifact: Path, prompts: list[str] | None = None, **spec) -> JobContext:
    spec = {"model_id": 1, "prompts": prompts or ["the red fox", "hello"], "max_new_tokens": 4, "temperature": 0.0,
            **spec}
    return make_ctx(tmp_path / "infer", "inference", spec, {"model_path": str(artifact), "model_format": "neuron"})


def test_inference_imports_torch_neuronx_before_loading_the_artifact(neuron_artifact, tmp_path, monkeypatch):
    order = []
    real_import, real_load = neuron.import_torch_neuronx, torch.jit.load
    monkeypatch.setattr(neuron, "import_torch_neuronx", lambda: order.append("import") or real_import())
    monkeypatch.setattr(torch.jit, "load", lambda path, *a, **k: order.append("load") or real_load(path, *a, **k))
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "2-3")
    ctx = inference_ctx(tmp_path, neuron_artifact)
    result = get_backend("neuron").run(ctx)
    assert order == ["import", "load"]
    assert result["requests"] == 2
    assert len((tmp_path / "infer" / "artifacts" / "outputs.jsonl").read_text().splitlines()) == 2
    assert "NEURON_RT_VISIBLE_CORES=2-3" in ctx.lines


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("nrt_allocate_neuron_cores NeuronCore(s) not available", "cores_unavailable"),
        ("Failed to allocate 2.000GB on ND 0:NC 0", "oom"),
        ("NEFF version mismatch", "runtime_error"),
    ],
)
def test_inference_load_failures_map_to_codes(neuron_artifact, tmp_path, monkeypatch, message, code):
    def failing_load(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(torch.jit, "load", failing_load)
    with pytest.raises(JobFailed) as info:
        get_backend("neuron").run(inference_ctx(tmp_path, neuron_artifact))
    assert info.value.code == code


def test_hf_inference_on_a_neuron_host_runs_on_the_cpu(standin, tiny_lm_dir, tmp_path):
    spec = {"model_id": 1, "prompts": ["hi"], "max_new_tokens": 2, "temperature": 0.0}
    ctx = make_ctx(tmp_path, "inference", spec, {"model_path": str(tiny_lm_dir), "model_format": "hf"})
    assert get_backend("neuron").run(ctx)["requests"] == 1
    assert any("runs on the host CPU" in line for line in ctx.lines)


# ---------------------------------------------------------------- finetune


@pytest.fixture
def finetune_inputs(tiny_lm_dir, tmp_path) -> dict:
    dataset = create_demo_dataset(tmp_path / "demo.jsonl", rows=20)
    return {"model_path": str(tiny_lm_dir), "model_format": "hf", "dataset_path": str(dataset),
            "dataset_format": "jsonl"}


FINETUNE_SPEC = {"model_id": 1, "dataset_id": 1, "steps": 5, "epochs": None, "learning_rate": 1e-3,
                 "batch_size": 2, "sequence_length": 32, "cores": 1}


def test_single_core_finetune_uses_the_torch_xla_step_hooks(monkeypatch, finetune_inputs, tmp_path):
    xla = StandInXla()
    for name, module in xla.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(neuron_train, "native_neuron_device_available", lambda: False)
    ctx = make_ctx(tmp_path / "job", "finetune", FINETUNE_SPEC, finetune_inputs)
    result = get_backend("neuron").run(ctx)
    assert (xla.optimizer_steps, xla.mark_steps) == (5, 5)
    assert result["training_mode"] == "xla" and result["steps"] == 5 and result["backend"] == "neuron"
    assert [m["step"] for m in ctx.metrics if "loss" in m] == [1, 2, 3, 4, 5]
    assert (tmp_path / "job" / "artifacts" / "checkpoint" / "config.json").exists()


def test_the_training_path_follows_the_installed_torch_not_what_happens_to_import(installed, standin, monkeypatch):
    # XLA torch-neuronx (PyTorch 2.9): torch-xla, even when a neuron device answers.
    for name, module in StandInXla().modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(neuron_train, "native_neuron_device_available", lambda: True)
    assert neuron_train.training_mode() == "xla"
    # Native TorchNeuron (PyTorch >= 2.10): torch.device("neuron"), and torch-xla unused.
    installed.clear()
    installed.update(NATIVE_PYTHON)
    assert neuron_train.training_mode() == "native"
    monkeypatch.setattr(neuron_train, "native_neuron_device_available", lambda: False)
    with pytest.raises(JobFailed, match="not usable"):
        neuron_train.training_mode()


def test_finetune_without_any_neuron_training_stack_is_unavailable(monkeypatch, finetune_inputs, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_xla.core.xla_model", None)
    monkeypatch.setattr(neuron_train, "native_neuron_device_available", lambda: False)
    with pytest.raises(JobFailed) as info:
        get_backend("neuron").run(make_ctx(tmp_path, "finetune", FINETUNE_SPEC, finetune_inputs))
    assert info.value.code == "unavailable"


def test_torchrun_argv_runs_one_process_per_core():
    argv = neuron_launch.torchrun_argv(4, Path("/jobs/12"), torchrun="/venv/bin/torchrun")
    assert argv == ["/venv/bin/torchrun", "--standalone", "--nproc_per_node=4", "-m",
                    "neuron_workers.backends.neuron_train", "--job-dir", "/jobs/12"]
    with pytest.raises(ValueError):
        neuron_launch.torchrun_argv(0, Path("/jobs/12"))


def fake_launcher(monkeypatch, script: str) -> None:
    """Make run_torchrun start `python -c script <job_dir>` instead of torchrun."""
    monkeypatch.setattr(neuron_launch, "torchrun_argv",
                        lambda cores, job_dir: [sys.executable, "-c", textwrap.dedent(script), str(job_dir),
                                                str(cores)])


def test_multi_core_finetune_relays_rank0_metrics_logs_and_result(monkeypatch, finetune_inputs, tmp_path):
    fake_launcher(monkeypatch, """
        import json, sys, pathlib
        job = pathlib.Path(sys.argv[1])
        spec = json.loads((job / "train_job.json").read_text())["spec"]
        print("rank 0 of", sys.argv[2], "steps", spec["steps"], flush=True)
        print("@@neurondeck-metric " + json.dumps({"step": 1, "loss": 2.5}), flush=True)
        (job / "train_result.json").write_text(json.dumps({"steps": 1, "final_loss": 2.5}))
    """)
    ctx = make_ctx(tmp_path / "job", "finetune", {**FINETUNE_SPEC, "cores": 2}, finetune_inputs)
    result = get_backend("neuron").run(ctx)
    assert result == {"steps": 1, "final_loss": 2.5}
    assert [m for m in ctx.metrics if "event" not in m] == [{"step": 1, "loss": 2.5}]
    assert "rank 0 of 2 steps 5" in ctx.lines


def test_multi_core_finetune_reports_rank0_job_failure(monkeypatch, finetune_inputs, tmp_path):
    fake_launcher(monkeypatch, """
        import json, sys, pathlib
        pathlib.Path(sys.argv[1], "train_error.json").write_text(json.dumps({"code": "oom", "message": "boom"}))
        sys.exit(1)
    """)
    ctx = make_ctx(tmp_path / "job", "finetune", {**FINETUNE_SPEC, "cores": 2}, finetune_inputs)
    with pytest.raises(JobFailed) as info:
        get_backend("neuron").run(ctx)
    assert (info.value.code, info.value.message) == ("oom", "boom")


def test_multi_core_finetune_classifies_a_crash_from_its_output(monkeypatch, finetune_inputs, tmp_path):
    fake_launcher(monkeypatch, """
        import sys
        print("ERROR NRT:nrt_allocate_neuron_cores NeuronCore(s) not available", flush=True)
        sys.exit(1)
    """)
    ctx = make_ctx(tmp_path / "job", "finetune", {**FINETUNE_SPEC, "cores": 2}, finetune_inputs)
    with pytest.raises(JobFailed) as info:
        get_backend("neuron").run(ctx)
    assert info.value.code == "cores_unavailable"


def test_cancelling_a_multi_core_finetune_stops_the_launcher(monkeypatch, finetune_inputs, tmp_path):
    fake_launcher(monkeypatch, """
        import time
        print("started", flush=True)
        time.sleep(60)
    """)
    ctx = make_ctx(tmp_path / "job", "finetune", {**FINETUNE_SPEC, "cores": 2}, finetune_inputs)
    ctx.should_stop = lambda: "started" in ctx.lines
    launched = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        launched.append(real_popen(*args, **kwargs))
        return launched[-1]

    monkeypatch.setattr(neuron_launch.subprocess, "Popen", recording_popen)
    with pytest.raises(JobFailed) as info:
        get_backend("neuron").run(ctx)
    assert info.value.code == "cancelled"
    assert launched[0].poll() is not None  # the launcher's process group was terminated


def test_the_torchrun_entry_point_trains_and_writes_its_result(monkeypatch, finetune_inputs, tmp_path, capsys):
    xla = StandInXla()
    for name, module in xla.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(neuron_train, "native_neuron_device_available", lambda: False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "train_job.json").write_text(json.dumps({"job_id": 3, "spec": FINETUNE_SPEC, "inputs": finetune_inputs}))
    assert neuron_train.main(["--job-dir", str(job_dir)]) == 0
    result = json.loads((job_dir / "train_result.json").read_text())
    assert result["steps"] == 5 and result["world_size"] == 1
    metric_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("@@neurondeck-metric ")]
    rows = [json.loads(line.split(" ", 1)[1]) for line in metric_lines]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- pure helpers


def test_neuron_cc_flags_appends_our_cache_dir_and_drops_older_ones():
    assert neuron.neuron_cc_flags(None, "/c") == "--cache_dir=/c"
    assert neuron.neuron_cc_flags("--model-type transformer", "/c") == "--model-type transformer --cache_dir=/c"
    assert neuron.neuron_cc_flags("--cache_dir=s3://old --no_cache", "/c") == "--no_cache --cache_dir=/c"
    with pytest.raises(ValueError):
        neuron.neuron_cc_flags("", "/path with space")


@pytest.mark.parametrize(
    ("text", "phase", "code"),
    [
        ("nrt_tensor_allocate status=4 \"Allocation Failure\"", "inference", "oom"),
        ("NRT_FAIL_HOST_MEM_ALLOC", "inference", "oom"),
        ("NRT_LOAD_NOT_ENOUGH_NC", "inference", "cores_unavailable"),
        ("Neuron cores are not contiguous", "inference", "cores_unavailable"),
        ("Compiler status FAIL", "compile", "compile_error"),
        ("Compiler generated too many instructions (6888787)", "compile", "compile_error"),
        ("execution timed out", "inference", "runtime_error"),
        # The core is locked by another process [nrt_status.h NRT_EXEC_NC_BUSY = 1005].
        ("nrt_execute status=1005", "inference", "cores_unavailable"),
        ("NRT_EXEC_NC_BUSY", "inference", "cores_unavailable"),
        # torch-neuronx when another process holds the cores (aws-neuron-samples#44).
        ("Neuron runtime cannot be initialized; cannot determine the number of available NeuronCores",
         "inference", "cores_unavailable"),
    ],
)
def test_classify_neuron_error(text, phase, code):
    assert neuron_errors.classify_neuron_error(text, phase) == code


# ---------------------------------------------------------------- registry and detection


def test_detect_backend_is_cpu_without_dev_neuron_even_if_torch_neuronx_imports(standin, monkeypatch):
    monkeypatch.setattr(detect.glob, "glob", lambda pattern: [])
    assert detect_backend() == "cpu"
    assert not neuron.NeuronBackend.available()


def test_detect_backend_is_neuron_with_a_device_and_torch_neuronx(standin, monkeypatch):
    monkeypatch.setattr(detect.glob, "glob", lambda pattern: ["/dev/neuron0"] if pattern == "/dev/neuron*" else [])
    assert detect_backend() == "neuron"
    assert neuron.NeuronBackend.available()


def test_detect_backend_is_cpu_with_a_device_but_only_the_pypi_placeholder(monkeypatch, tmp_path):
    # The PyPI torch-neuronx is a stub whose __init__ raises ImportError (neuron.md §4.1).
    package = tmp_path / "torch_neuronx"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("WRONG PACKAGE. Please install the package from '
                                         'Neuron Repository - pip.repos.neuron.amazonaws.com")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_neuronx", raising=False)
    monkeypatch.setattr(detect.glob, "glob", lambda pattern: ["/dev/neuron0"])
    assert detect_backend() == "cpu"


def test_this_host_detects_cpu():
    assert detect_backend() == "cpu"


def test_the_registry_resolves_backends_lazily_by_dotted_path():
    assert registry.BACKENDS == {"cpu": "neuron_workers.backends.cpu:CpuBackend",
                                 "neuron": "neuron_workers.backends.neuron:NeuronBackend"}
    assert get_backend("cpu").name == "cpu" and get_backend("neuron").name == "neuron"
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        get_backend("tpu")


def test_importing_the_registry_pulls_in_neither_torch_nor_django():
    code = ("import sys, neuron_workers.backends, neuron_workers.backends.compiler_options, "
            "neuron_workers.backends.tinymodel; "
            "bad = [m for m in ('torch', 'transformers', 'torch_neuronx', 'django') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- Trn2 logical cores (compiler == runtime)


def trn2_ctx(tmp_path: Path, model_dir: Path, options: list[str]) -> JobContext:
    return compile_ctx(tmp_path, model_dir, target="trn2", compiler_options=options)


def test_a_trn2_compile_asking_for_another_lnc_than_the_runtime_is_refused(standin, cache_dir, tiny_lm_dir,
                                                                           tmp_path, monkeypatch):
    monkeypatch.delenv("NEURON_LOGICAL_NC_CONFIG", raising=False)  # the runtime's default: 2
    with pytest.raises(JobFailed) as info:
        get_backend("neuron").run(trn2_ctx(tmp_path, tiny_lm_dir, ["--lnc", "1"]))
    assert info.value.code == "bad_input" and "NEURON_LOGICAL_NC_CONFIG=2" in info.value.message
    assert standin.calls == []


def test_a_trn2_compile_is_made_for_the_runtimes_lnc_and_loads_only_at_it(standin, runtime, cache_dir, tiny_lm_dir,
                                                                          tmp_path, monkeypatch):
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "1")
    result = get_backend("neuron").run(trn2_ctx(tmp_path / "c", tiny_lm_dir, []))
    assert standin.calls[0]["compiler_args"] == ["--target=trn2", "--logical-nc-config=1"]
    assert result["logical_nc_config"] == 1
    artifact = tmp_path / "c" / "job" / "artifacts"
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "5")
    assert get_backend("neuron").run(inference_ctx(tmp_path / "i1", artifact, family="trn2"))["requests"] == 2
    assert runtime.loaded_on == [5]
    # On a host at LNC=2 the runtime would refuse the NEFF; the backend says why first.
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "2")
    with pytest.raises(JobFailed) as info:
        get_backend("neuron").run(inference_ctx(tmp_path / "i2", artifact, family="trn2"))
    assert info.value.code == "bad_input" and "logical-nc-config=1" in info.value.message
    assert runtime.loaded_on == [5]


# ---------------------------------------------------------------- several cores for inference


def test_inference_on_several_cores_runs_data_parallel_over_all_of_them(standin, runtime, neuron_artifact, tmp_path,
                                                                        monkeypatch):
    # One torch.jit.load uses one core; without DataParallel the other would idle.
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "6-7")
    ctx = inference_ctx(tmp_path, neuron_artifact, prompts=["a", "b", "c", "d", "e"])
    result = get_backend("neuron").run(ctx)
    assert result["requests"] == 5
    assert set(standin.parallel_runs) == {0, 1}  # process-relative device ids, both cores used
    assert any("DataParallel over 2 NeuronCores, batch 2" in line for line in ctx.lines)


def test_inference_on_one_core_loads_the_model_once_without_data_parallel(standin, runtime, neuron_artifact, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "3")
    assert get_backend("neuron").run(inference_ctx(tmp_path, neuron_artifact))["requests"] == 2
    assert runtime.loaded_on == [3] and standin.parallel_runs == []


def test_an_allocation_failure_the_runtime_printed_on_the_console_is_oom(neuron_artifact, tmp_path, monkeypatch):
    # The runtime writes TDRV lines to the console (the job's log.txt); the
    # exception itself only says the load failed.
    def failing_load(*args, **kwargs):
        raise RuntimeError("nrt_load failed")

    monkeypatch.setattr(torch.jit, "load", failing_load)
    ctx = inference_ctx(tmp_path, neuron_artifact)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    (ctx.workdir / "log.txt").write_text("2026-Dec-05 ERROR TDRV:dmem_alloc_internal Failed to alloc DEVICE memory\n")
    with pytest.raises(JobFailed) as info:
        get_backend("neuron").run(ctx)
    assert info.value.code == "oom"


# ---------------------------------------------------------------- what the job Python can run


def test_a_native_torchneuron_python_cannot_compile_and_says_why(standin, installed, cache_dir, tiny_lm_dir,
                                                                 tmp_path):
    installed.clear()
    installed.update(NATIVE_PYTHON)
    with pytest.raises(JobFailed) as info:
        get_backend("neuron").run(compile_ctx(tmp_path, tiny_lm_dir, target="trn2"))
    assert info.value.code == "unavailable" and "torch_neuronx.trace" in info.value.message
    assert standin.calls == []


def test_native_training_on_a_trn1_host_is_unavailable_with_the_reason(installed, finetune_inputs, tmp_path):
    installed.clear()
    installed.update(NATIVE_PYTHON)
    ctx = make_ctx(tmp_path, "finetune", {**FINETUNE_SPEC, "family": "trn1"}, finetune_inputs)
    with pytest.raises(JobFailed) as info:
        get_backend("neuron").run(ctx)
    assert info.value.code == "unavailable" and "Trn2/Trn3 only" in info.value.message


# ---------------------------------------------------------------- ranks, cores and collectives


def rank_job_dir(tmp_path: Path, finetune_inputs: dict) -> Path:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "train_job.json").write_text(json.dumps({"job_id": 3, "spec": FINETUNE_SPEC, "inputs": finetune_inputs}))
    return job_dir


def as_rank(monkeypatch, rank: int, world: int, cores: str) -> None:
    for name, value in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world,
                        "NEURON_RT_VISIBLE_CORES": cores}.items():
        monkeypatch.setenv(name, str(value))


def test_a_native_rank_gets_the_one_core_of_its_local_rank(installed, standin, process_groups, monkeypatch,
                                                           finetune_inputs, tmp_path):
    installed.clear()
    installed.update(NATIVE_PYTHON)
    monkeypatch.setattr(neuron_train, "native_neuron_device_available", lambda: True)
    monkeypatch.setattr(neuron_train, "native_device", lambda: torch.device("cpu"))
    as_rank(monkeypatch, rank=1, world=2, cores="8-9")
    assert neuron_train.main(["--job-dir", str(rank_job_dir(tmp_path, finetune_inputs))]) == 0
    assert process_groups.calls == [("neuron", "9")]


def test_an_xla_rank_keeps_the_jobs_range_for_torch_xla_to_remap(process_groups, monkeypatch, finetune_inputs,
                                                                 tmp_path):
    xla = StandInXla()
    for name, module in xla.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    as_rank(monkeypatch, rank=1, world=2, cores="8-9")
    assert neuron_train.main(["--job-dir", str(rank_job_dir(tmp_path, finetune_inputs))]) == 0
    assert process_groups.calls == [("xla", "8-9")]
    assert xla.device_env["NEURON_RT_VISIBLE_CORES"] == "9"


def test_rank_core_splits_the_range_one_core_per_local_rank():
    assert [neuron_env.rank_core("4-7", rank, 4) for rank in range(4)] == ["4", "5", "6", "7"]
    with pytest.raises(ValueError, match="2 ranks need as many cores"):
        neuron_env.rank_core("4-7", 0, 2)
    with pytest.raises(ValueError):
        neuron_env.rank_core("3,5", 0, 2)  # the runtime refuses gaps as well


class StandInHostPorts:
    """A host's TCP ports, as the root-comm listener of each multi-core job binds them."""

    def __init__(self) -> None:
        self.bound: set[int] = set()

    def bind(self, comm_id: str) -> None:
        port = int(comm_id.rpartition(":")[2])
        if port in self.bound:
            raise OSError(f"bind {comm_id}: Address already in use")
        self.bound.add(port)

    def free(self, port: int) -> bool:
        return port not in self.bound


def xla_root_comm_id(env: dict) -> str:
    """What the Neuron XLA plugin uses: NEURON_RT_ROOT_COMM_ID, else MASTER_ADDR:62182."""
    return env.get("NEURON_RT_ROOT_COMM_ID") or f"{env.get('MASTER_ADDR', 'localhost')}:{XLA_DEFAULT_ROOT_PORT}"


def test_two_multi_core_jobs_on_one_host_get_root_comm_ports_of_their_own():
    host = StandInHostPorts()
    # Without an address of their own both jobs take the plugin's fixed default.
    host.bind(xla_root_comm_id({}))
    with pytest.raises(OSError, match="Address already in use"):
        host.bind(xla_root_comm_id({}))
    host = StandInHostPorts()
    for cores in ("0-1", "2-3", "4-11"):
        env = neuron_launch.training_env("xla", cores, "/c", {}, port_free=host.free)
        host.bind(xla_root_comm_id(env))
    assert XLA_DEFAULT_ROOT_PORT not in host.bound and len(host.bound) == 3
    # One core needs no collective root; an address the operator set is kept.
    assert "NEURON_RT_ROOT_COMM_ID" not in neuron_launch.training_env("xla", "5", "/c", {})
    assert "NEURON_RT_ROOT_COMM_ID" not in neuron_launch.training_env(
        "xla", "0-1", "/c", {"NEURON_RT_ROOT_COMM_ID": "10.0.0.1:7000"})


def test_a_taken_root_comm_port_falls_back_to_a_free_one():
    env = neuron_launch.training_env("native", "2-3", "/c", {}, port_free=lambda port: False)
    port = int(env["NEURON_RT_ROOT_COMM_ID"].rpartition(":")[2])
    assert port != XLA_DEFAULT_ROOT_PORT + 3 and 0 < port < 65536


def test_the_torchrun_ranks_inherit_the_jobs_root_comm_id_and_compile_cache(monkeypatch, finetune_inputs, cache_dir,
                                                                            tmp_path):
    fake_launcher(monkeypatch, """
        import json, os, sys, pathlib
        keys = ("NEURON_RT_ROOT_COMM_ID", "NEURON_CC_FLAGS", "NEURON_RT_VISIBLE_CORES")
        pathlib.Path(sys.argv[1], "train_result.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
    """)
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "4-5")
    ctx = make_ctx(tmp_path / "job", "finetune", {**FINETUNE_SPEC, "cores": 2}, finetune_inputs)
    seen = get_backend("neuron").run(ctx)
    assert seen["NEURON_RT_VISIBLE_CORES"] == "4-5"
    assert seen["NEURON_RT_ROOT_COMM_ID"].startswith("localhost:")
    assert not seen["NEURON_RT_ROOT_COMM_ID"].endswith(f":{XLA_DEFAULT_ROOT_PORT}")
    assert seen["NEURON_CC_FLAGS"] == f"--retry_failed_compilation --cache_dir={cache_dir}"


def test_training_uses_the_compile_cache_of_its_framework(monkeypatch, installed, standin, process_groups,
                                                          finetune_inputs, cache_dir, tmp_path):
    xla = StandInXla()
    for name, module in xla.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "0")
    get_backend("neuron").run(make_ctx(tmp_path / "x", "finetune", FINETUNE_SPEC, finetune_inputs))
    assert xla.device_env["NEURON_CC_FLAGS"] == f"--retry_failed_compilation --cache_dir={cache_dir}"
    # Native TorchNeuron keeps its NEFFs in TORCH_NEURONX_NEFF_CACHE_DIR (docs torch/reference/env-vars).
    installed.clear()
    installed.update(NATIVE_PYTHON)
    monkeypatch.setattr(neuron_train, "native_neuron_device_available", lambda: True)
    seen = []
    monkeypatch.setattr(neuron_train, "native_device",
                        lambda: seen.append(os.environ.get("TORCH_NEURONX_NEFF_CACHE_DIR")) or torch.device("cpu"))
    get_backend("neuron").run(make_ctx(tmp_path / "n", "finetune", FINETUNE_SPEC, finetune_inputs))
    assert seen == [str(cache_dir)]
