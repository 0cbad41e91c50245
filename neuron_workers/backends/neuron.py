"""The neuron backend: torch-neuronx / TorchNeuron on Inf2, Trn1 and Trn2 hosts.

HONESTY NOTE. Only the pure helpers (compiler_args and neuron_cc_flags here,
neuron_errors.classify_neuron_error, neuron_launch.torchrun_argv) and the control
flow around the Neuron calls have run, against stand-in modules in
tests/test_backend_neuron.py. The calls into torch_neuronx, torch_xla and the
native "neuron" device are written against the documented API summarised in
/work/shared/reference/neuron.md and have NOT run on Neuron hardware:

- compile   = torch_neuronx.trace(wrapper, example_inputs, compiler_workdir=...,
              compiler_args=[...]) then torch.jit.save (neuron.md §4.2); the
              compile cache goes through NEURON_CC_FLAGS="--cache_dir=..." (§4.4).
- inference = import torch_neuronx (registers the neuron::Model op), then
              torch.jit.load, which places the model on a NeuronCore among those
              in NEURON_RT_VISIBLE_CORES, set by the runner (§4.2, §4.3).
- finetune  = native torch.device("neuron") when present (Neuron SDK >= 2.32,
              details UNCONFIRMED, §4.6) else torch-xla: xm.xla_device(),
              xm.optimizer_step, xm.mark_step (legacy, documented to 2.31, §4.6);
              cores > 1 run under torchrun, one process per NeuronCore
              (neuron_launch launches, neuron_train trains a rank).

Work that stays on the host CPU (target "cpu", models that are not
Neuron-compiled) runs the cpu backend's functions from compiling / inference.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .. import config
from . import hf
from .artifacts import ARTIFACT_NAME, META_NAME, TOKENIZER_DIR, LogitsOnly, compile_meta, load_compiled, save_tokenizer
from .base import Backend, JobContext, JobFailed, input_path, require_model_format, spec_int, write_json
from .compiling import (
    LATENCY_RUNS,
    checked_options,
    compile_on_cpu,
    compile_result,
    compile_shape,
    example_input,
    max_logit_diff,
)
from .data import read_prompts
from .detect import neuron_devices_present, neuron_stack_importable
from .finetuning import finetune_plan
from .inference import generation_settings, infer_on_cpu, run_fixed_shape_inference
from .loops import time_forward
from .neuron_errors import map_neuron_error
from .neuron_launch import run_torchrun
from .neuron_train import train_rank

# Above this we warn (not fail): with --auto-cast or bf16 matmuls the compiled
# model legitimately differs from fp32 eager by more than the cpu backend's 1e-4.
NEURON_DIFF_WARN = 1e-2


class NeuronBackend(Backend):
    """Runs jobs on NeuronCores; see the module docstring for what has been verified."""

    name = "neuron"

    @classmethod
    def available(cls) -> bool:
        return neuron_devices_present() and neuron_stack_importable()

    # ------------------------------------------------------------ compile

    def compile(self, ctx: JobContext) -> dict:
        """torch_neuronx.trace to artifacts/model.pt; target "cpu" is compiled as the cpu backend does.

        Unlike the cpu backend, a logit difference above 1e-4 is not a failure:
        --auto-cast legitimately changes numerics. Non-finite logits are.
        """
        target = ctx.spec.get("target", "inf2")
        if target == "cpu":
            return compile_on_cpu(ctx)
        shape = compile_shape(ctx)
        options = checked_options(ctx, target)
        model_path = input_path(ctx, "model_path")
        require_model_format(ctx, ["hf"])
        torch_neuronx = import_torch_neuronx()
        # The eager reference model runs on the host CPU, with the thread count
        # the cpu backend would use for it.
        with hf.torch_threads(hf.small_model_threads(model_path)):
            return self._compile(ctx, torch_neuronx, model_path, shape, target, options)

    def _compile(self, ctx: JobContext, torch_neuronx: Any, model_path: Path, shape: tuple[int, int], target: str,
                 options: list[str]) -> dict:
        model = hf.load_causal_lm(model_path).eval()
        tokenizer = hf.load_tokenizer(model_path)
        hf.check_sequence_length(model, shape[1])
        ctx.check_stop("before compiling")
        traced, seconds = self._trace(ctx, torch_neuronx, model, shape, compiler_args(target, options))
        version = neuron_compiler_version(torch_neuronx)
        artifacts = ctx.artifacts_dir
        try:
            example = example_input(shape, model.config.vocab_size, seed=1)
            latencies = time_forward(traced, example, LATENCY_RUNS)
            diff = max_logit_diff(model, traced, shape, model.config.vocab_size)
        except (RuntimeError, MemoryError) as exc:
            raise map_neuron_error(exc, "run the compiled model") from exc
        if not math.isfinite(diff):
            raise JobFailed("compile_error", "the compiled model produced non-finite logits")
        if diff > NEURON_DIFF_WARN:
            ctx.log(f"warning: compiled logits differ from fp32 eager by {diff:.3g} (expected with --auto-cast)")
        result = compile_result(shape, seconds, latencies, diff, "neuron", version)
        meta = compile_meta(ctx, model, tokenizer, model_path, shape, options, target, result)
        save_tokenizer(tokenizer, artifacts / TOKENIZER_DIR)
        write_json(artifacts / META_NAME, {**meta, "cache_dir": compile_cache_dir()})
        ctx.log(f"compiled for {target} in {seconds:.1f}s; p50 {result['latency_ms_p50']} ms")
        return {**result, "cache_key": meta["cache_key"], "model_digest": meta["model_digest"],
                "compiler_options": options, "compile_log": "compile_log.txt", "meta": META_NAME,
                "target": target}

    def _trace(self, ctx: JobContext, torch_neuronx: Any, model: Any, shape: tuple[int, int],
               args: list[str]) -> tuple[Any, float]:
        """Run torch_neuronx.trace with the cache flags, capture compiler output, save model.pt."""
        workdir = ctx.workdir / "compile"
        workdir.mkdir(parents=True, exist_ok=True)
        captured = workdir / "compiler_output.txt"
        flags = neuron_cc_flags(os.environ.get("NEURON_CC_FLAGS"), compile_cache_dir())
        wrapper = LogitsOnly(model).eval()
        example = example_input(shape, model.config.vocab_size, seed=0)
        header = [f"torch_neuronx.trace input_ids {list(shape)}", f"compiler_args: {args}", f"NEURON_CC_FLAGS: {flags}"]
        ctx.log(header[1])
        started = time.perf_counter()
        try:
            with env_overrides({"NEURON_CC_FLAGS": flags}), capture_output(captured):
                traced = torch_neuronx.trace(wrapper, (example,), compiler_workdir=str(workdir), compiler_args=args)
        except Exception as exc:
            log_text = write_compile_log(ctx, header + [f"FAILED: {exc}"], workdir, captured)
            raise map_neuron_error(exc, "compile", log_text) from exc
        finally:
            replay_tail(ctx, captured)
        seconds = time.perf_counter() - started
        with warnings.catch_warnings():
            # torch 2.13 marks torch.jit deprecated, but TorchScript is the artifact
            # format torch-neuronx documents (neuron.md §4.2); the warning is noise.
            warnings.filterwarnings("ignore", message=".*deprecated.*", category=DeprecationWarning)
            torch.jit.save(traced, str(ctx.artifacts_dir / ARTIFACT_NAME))
        write_compile_log(ctx, header + [f"compiled in {seconds:.3f}s"], workdir, captured)
        return traced, seconds

    # ------------------------------------------------------------ finetune

    def finetune(self, ctx: JobContext) -> dict:
        """One NeuronCore in-process; several under torchrun (see neuron_launch.run_torchrun)."""
        plan = finetune_plan(ctx)
        cores = spec_int(ctx.spec, "cores", default=1)
        if cores > 1:
            return run_torchrun(ctx, cores)
        return train_rank(ctx, plan, rank=0, world_size=1)

    # ------------------------------------------------------------ inference

    def inference(self, ctx: JobContext) -> dict:
        """Fixed-shape decoding through a compiled artifact on the job's NeuronCores."""
        fmt = require_model_format(ctx, ["hf", "torchscript", "neuron"])
        if fmt != "neuron":
            # An HF folder or a cpu-traced TorchScript file runs on the host CPU;
            # only Neuron-compiled artifacts execute on NeuronCores.
            ctx.log(f"model format {fmt!r} runs on the host CPU; compile it for NeuronCore inference")
            return infer_on_cpu(ctx)
        settings = generation_settings(ctx)
        prompts = read_prompts(ctx)
        model_path = input_path(ctx, "model_path")
        import_torch_neuronx()  # must precede torch.jit.load so neuron::Model is registered (§4.2)
        ctx.log(f"NEURON_RT_VISIBLE_CORES={os.environ.get('NEURON_RT_VISIBLE_CORES', '(all)')}")
        try:
            # No in-process cache: a loaded model holds its NeuronCore (§4.2), and
            # a later job in this process may have been given other cores.
            module, meta, tokenizer = load_compiled(model_path, torch.jit.load, use_cache=False,
                                                    map_error=lambda exc: map_neuron_error(exc, "load the model"))
            return run_fixed_shape_inference(ctx, module, meta, tokenizer, prompts, settings)
        except (RuntimeError, MemoryError) as exc:
            raise map_neuron_error(exc, "inference") from exc


# ---------------------------------------------------------------- imports and versions


def import_torch_neuronx() -> Any:
    """Import torch_neuronx or raise JobFailed("unavailable").

    The PyPI package of that name is a placeholder that raises ImportError on
    import (neuron.md §4.1); the real one comes from AWS's pip index.
    """
    try:
        return importlib.import_module("torch_neuronx")
    except Exception as exc:
        raise JobFailed("unavailable", f"torch-neuronx is not usable on this host: {exc}") from exc


def neuron_compiler_version(torch_neuronx: Any) -> str:
    """"torch-neuronx-<v>+neuronx-cc-<v>": both change compiled output (neuron.md §4.4)."""
    try:
        cc_version = getattr(importlib.import_module("neuronxcc"), "__version__", "unknown")
    except Exception:
        cc_version = "unknown"
    return f"torch-neuronx-{getattr(torch_neuronx, '__version__', 'unknown')}+neuronx-cc-{cc_version}"


# ---------------------------------------------------------------- compiler plumbing (pure)


def compiler_args(target: str, options: list[str]) -> list[str]:
    """argv pieces for torch_neuronx.trace(compiler_args=...): the target, then validated options.

    We always pass --target: it matches what torch-neuronx passes itself
    (`--target=trn1`, neuron.md §4.5) and is required for CPU-side tracing.
    """
    return [f"--target={target}", *options]


def compile_cache_dir(env: Mapping[str, str] | None = None) -> str:
    """The neuronx-cc cache directory: config.compile_cache_dir (NEURONDECK_COMPILE_CACHE,
    else the Neuron default /var/tmp/neuron-compile-cache)."""
    return config.compile_cache_dir(env)


def neuron_cc_flags(existing: str | None, cache_dir: str) -> str:
    """NEURON_CC_FLAGS with our --cache_dir appended and any earlier --cache_dir dropped.

    neuron_cc_wrapper reads this variable and consumes --cache_dir itself
    (neuron.md §4.4). Caveat: neuron.md §4.2 says traced graphs with frozen
    weights are not stored in the persistent cache, so for torch_neuronx.trace
    this mainly helps torch-xla training; whole-artifact reuse is the web app's
    job, keyed by compile_cache_key (returned as "cache_key"). The value is a
    whitespace-separated flag string read by the wrapper, never a shell command,
    so a cache path containing whitespace cannot be represented and is refused.
    """
    if not cache_dir or any(c.isspace() for c in cache_dir):
        raise ValueError(f"compile cache dir {cache_dir!r} must be non-empty and contain no whitespace")
    kept = [flag for flag in (existing or "").split() if not flag.startswith("--cache_dir")]
    return " ".join([*kept, f"--cache_dir={cache_dir}"])


# ---------------------------------------------------------------- compile process plumbing


@contextmanager
def env_overrides(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore them.

    In-process because torch_neuronx.trace runs neuronx-cc as a child that
    inherits os.environ; no shell is involved.
    """
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextmanager
def capture_output(path: Path) -> Iterator[None]:
    """Redirect file descriptors 1 and 2 into `path` for the block.

    fd-level, not sys.stdout: neuronx-cc runs as a subprocess writing straight to
    the inherited descriptors, which a Python-level redirect would miss.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("ab") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def replay_tail(ctx: JobContext, captured: Path, lines: int = 50) -> None:
    """Echo the last lines of captured compiler output into the job log."""
    if captured.exists():
        for line in captured.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]:
            ctx.log(line)


def write_compile_log(ctx: JobContext, header: list[str], workdir: Path, captured: Path) -> str:
    """Assemble artifacts/compile_log.txt: our header, captured output, neuronx-cc log files."""
    parts = ["\n".join(header)]
    if captured.exists():
        parts.append("== compiler output ==\n" + captured.read_text(encoding="utf-8", errors="replace"))
    # neuronx-cc writes log-neuron-cc.txt by default (--logfile, neuron.md §4.5).
    for log_file in sorted(workdir.rglob("log-neuron-cc*.txt")):
        text = log_file.read_text(encoding="utf-8", errors="replace")
        parts.append(f"== {log_file.relative_to(workdir)} ==\n{text}")
    text = "\n".join(parts) + "\n"
    (ctx.artifacts_dir / "compile_log.txt").write_text(text, encoding="utf-8")
    return text
