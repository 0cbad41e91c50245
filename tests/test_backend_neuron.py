"""The neuron backend at its seams, with stand-in torch_neuronx / torch_xla modules.

No Neuron hardware here: these tests pin down what the backend passes to the
documented API (neuron.md §4.2-4.6), how it maps failures to codes, and the
torchrun launcher; the model work underneath is real (tiny GPT-2 on CPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import neuron_workers.backends as registry
from neuron_workers.backends import JobContext, JobFailed, detect_backend, get_backend
from neuron_workers.backends import detect, neuron, neuron_errors, neuron_launch, neuron_train
from neuron_workers.backends.tinymodel import create_demo_dataset, create_tiny_model

SPEC = {"model_id": 1, "batch_size": 1, "sequence_length": 32, "target": "inf2",
        "compiler_options": ["--auto-cast matmult", "-O1"]}


class StandInNeuronx(types.ModuleType):
    """Records trace() calls; 'compiles' with torch.jit.trace so the artifact is real TorchScript."""

    def __init__(self, error: BaseException | None = None, compiler_says: bytes = b"Compiler status PASS\n"):
        super().__init__("torch_neuronx")
        self.__version__ = "2.9.0.2.15-standin"
        self.calls: list[dict] = []
        self.error = error
        self.compiler_says = compiler_says

    def trace(self, func, example_inputs, *_, compiler_workdir=None, compiler_args=None, **kwargs):
        import os

        self.calls.append({"func": func, "example_inputs": example_inputs, "compiler_workdir": compiler_workdir,
                           "compiler_args": compiler_args, "kwargs": kwargs,
                           "NEURON_CC_FLAGS": os.environ.get("NEURON_CC_FLAGS")})
        workdir = Path(compiler_workdir)
        (workdir / "log-neuron-cc.txt").write_text("neuronx-cc log: 3 passes\n")
        os.write(1, self.compiler_says)  # like the neuronx-cc subprocess writing to the inherited fd
        if self.error is not None:
            raise self.error
        return torch.jit.trace(func, example_inputs, check_trace=False)


class StandInXla:
    """torch_xla.core.xla_model on the CPU: counts optimizer_step / mark_step."""

    def __init__(self) -> None:
        self.optimizer_steps = 0
        self.mark_steps = 0

    def modules(self) -> dict[str, types.ModuleType]:
        xm = types.ModuleType("torch_xla.core.xla_model")
        xm.xla_device = lambda: torch.device("cpu")
        xm.optimizer_step = self._optimizer_step
        xm.mark_step = self._mark_step
        core = types.ModuleType("torch_xla.core")
        core.xla_model = xm
        root = types.ModuleType("torch_xla")
        root.core = core
        return {"torch_xla": root, "torch_xla.core": core, "torch_xla.core.xla_model": xm}

    def _optimizer_step(self, optimizer, *args, **kwargs):
        self.optimizer_steps += 1
        optimizer.step()

    def _mark_step(self):
        self.mark_steps += 1


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-gpt")


@pytest.fixture
def standin(monkeypatch) -> StandInNeuronx:
    fake = StandInNeuronx()
    monkeypatch.setitem(sys.modules, "torch_neuronx", fake)
    return fake


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


def test_compile_traces_with_validated_args_workdir_and_cache_flags(standin, cache_dir, tiny_lm_dir, tmp_path):
    result = get_backend("neuron").run(compile_ctx(tmp_path, tiny_lm_dir))
    (call,) = standin.calls
    assert call["compiler_args"] == ["--target=inf2", "--auto-cast=matmult", "--optlevel=1"]
    assert call["compiler_workdir"] == str(tmp_path / "job" / "compile")
    assert call["NEURON_CC_FLAGS"] == f"--retry_failed_compilation --cache_dir={cache_dir}"
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


def test_compile_defaults_the_cache_to_var_tmp(standin, tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("NEURONDECK_COMPILE_CACHE", raising=False)
    monkeypatch.delenv("NEURON_CC_FLAGS", raising=False)
    get_backend("neuron").run(compile_ctx(tmp_path, tiny_lm_dir))
    assert standin.calls[0]["NEURON_CC_FLAGS"] == "--cache_dir=/var/tmp/neuron-compile-cache"


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
    assert meta["target"] == "inf2" and meta["cache_dir"] == str(cache_dir)
    assert (artifacts / "tokenizer" / "tokenizer_config.json").exists()


def test_compile_log_keeps_compiler_output_and_log_files(standin, cache_dir, tiny_lm_dir, tmp_path):
    ctx = compile_ctx(tmp_path, tiny_lm_dir)
    get_backend("neuron").run(ctx)
    log = (tmp_path / "job" / "artifacts" / "compile_log.txt").read_text()
    assert "Compiler status PASS" in log
    assert "neuronx-cc log: 3 passes" in log
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


def inference_ctx(tmp_path: Path, artifact: Path) -> JobContext:
    spec = {"model_id": 1, "prompts": ["the red fox", "hello"], "max_new_tokens": 4, "temperature": 0.0}
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
    assert [m["step"] for m in ctx.metrics] == [1, 2, 3, 4, 5]
    assert (tmp_path / "job" / "artifacts" / "checkpoint" / "config.json").exists()


def test_the_native_neuron_device_is_preferred_when_present(monkeypatch):
    monkeypatch.setattr(neuron_train, "native_neuron_device_available", lambda: True)
    assert neuron_train.training_mode() == "native"


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
    assert ctx.metrics == [{"step": 1, "loss": 2.5}]
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
    assert [json.loads(line.split(" ", 1)[1])["step"] for line in metric_lines] == [1, 2, 3, 4, 5]


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
