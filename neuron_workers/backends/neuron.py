"""The neuron backend: torch-neuronx / TorchNeuron on Inf2, Trn1 and Trn2 hosts.

HONESTY NOTE. Only the pure helpers (compiler_args here, neuron_errors,
neuron_launch, neuron_env, neuron_matrix) and the control flow around the Neuron
calls have run, against stand-in modules that enforce the documented rules in
tests/test_backend_neuron.py. The calls into torch_neuronx, torch_xla and the
native "neuron" device are written against the documented API summarised in
/work/shared/reference/neuron.md and have NOT run on Neuron hardware:

- The job runs in the host's own Neuron Python (NEURONDECK_JOB_PYTHON), and the
  path follows its torch (neuron_matrix): PyTorch <= 2.9 is the XLA torch-neuronx
  (trace, torch-xla training), 2.10 and later native TorchNeuron (Trn2/Trn3).
  A job the interpreter cannot run fails "unavailable" with the reason before
  any Neuron call (the web app refuses it at submit already).
- compile   = torch_neuronx.trace(wrapper, example_inputs, compiler_workdir=...,
              compiler_args=[...]) then torch.jit.save (neuron.md §4.2), run with
              the compile directory as the working directory, where neuronx-cc
              writes its log. trace runs neuronx-cc directly, so no persistent
              compile cache applies (aws-neuron-sdk#865); whole artifacts are
              reused by the web app's compile cache key instead. On trn2 the
              compiler's logical-nc-config is the runtime's NEURON_LOGICAL_NC_CONFIG.
- inference = import torch_neuronx (registers the neuron::Model op), then
              torch.jit.load, which places the model on one NeuronCore; with
              several cores, torch_neuronx.DataParallel copies it onto each
              (api-torch-neuronx-data-parallel.rst).
- finetune  = one core in-process, several under torchrun, one process per core
              (neuron_launch launches, neuron_train trains a rank).

Work that stays on the host CPU (target "cpu", models that are not
Neuron-compiled) runs the cpu backend's functions from compiling / inference.
"""

from __future__ import annotations

import importlib
import json
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
from .compiler_options import compile_cache_key
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
from .diffusion import compile_image_on_cpu, generate_images, image_compile_meta, infer_images_on_cpu
from .export_options import ExportOptionError, check_export_options, optimum_export_call
from .finetuning import finetune_plan, stage
from .inference import check_fits_shape, generation_settings, infer_on_cpu, run_fixed_shape_inference
from .loops import inference_result, time_forward
from .neuron_env import compiler_identity, dist_version, parse_visible_cores, probe
from .neuron_errors import CONSOLE_LOG, console_tail, map_neuron_error
from .neuron_launch import neuron_cc_flags, run_precompile, run_torchrun, training_env
from .neuron_matrix import DEFAULT_TRN2_LNC, NATIVE_FAMILIES, compile_lnc, job_refusal
from .neuron_parallel import ParallelOptionError, check_parallel_options, uses_neuron_trainer
from .neuron_train import train_rank
from .serve_neuron import serve_on_neuron
from .tinymodel import model_digest

__all__ = ["NeuronBackend", "compile_cache_dir", "compiler_args", "import_torch_neuronx", "neuron_cc_flags",
           "neuron_compiler_version", "runtime_lnc"]

OPTIMUM_DIR = "neuron_model"  # what an Optimum Neuron model's save_pretrained writes, under artifacts/

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
        target = ctx.spec.get("target") or ctx.spec.get("family") or "inf2"
        if target == "cpu":
            return compile_image_on_cpu(ctx) if ctx.spec.get("task") == "text-to-image" else compile_on_cpu(ctx)
        shape = compile_shape(ctx)
        options = checked_options(ctx, target)
        model_path = input_path(ctx, "model_path")
        require_model_format(ctx, ["hf"])
        check_runnable(ctx, target, compiler_options=options)
        if ctx.spec.get("task"):
            # A spec with export options (task, tensor-parallel size, auto-cast, image
            # shape) is exported the way optimum-cli export neuron does it.
            return optimum_export(ctx, model_path, target, options)
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
        lnc = runtime_lnc(target)
        args = compiler_args(target, options)
        if lnc is not None and compile_lnc(options) is None:
            # Compile for the logical core size the runtime will load it at.
            args.append(f"--logical-nc-config={lnc}")
        traced, seconds = self._trace(ctx, torch_neuronx, model, shape, args)
        version = neuron_compiler_version(torch_neuronx)
        artifacts = ctx.artifacts_dir
        try:
            example = example_input(shape, model.config.vocab_size, seed=1)
            latencies = time_forward(traced, example, LATENCY_RUNS)
            diff = max_logit_diff(model, traced, shape, model.config.vocab_size)
        except (RuntimeError, MemoryError) as exc:
            raise map_neuron_error(exc, "run the compiled model", console_tail(ctx.workdir / CONSOLE_LOG)) from exc
        if not math.isfinite(diff):
            raise JobFailed("compile_error", "the compiled model produced non-finite logits")
        if diff > NEURON_DIFF_WARN:
            ctx.log(f"warning: compiled logits differ from fp32 eager by {diff:.3g} (expected with --auto-cast)")
        result = {**compile_result(shape, seconds, latencies, diff, "neuron", version), "logical_nc_config": lnc}
        meta = compile_meta(ctx, model, tokenizer, model_path, shape, options, target, result)
        save_tokenizer(tokenizer, artifacts / TOKENIZER_DIR)
        write_json(artifacts / META_NAME, {**meta, "logical_nc_config": lnc})
        ctx.log(f"compiled for {target} in {seconds:.1f}s; p50 {result['latency_ms_p50']} ms")
        return {**result, "cache_key": meta["cache_key"], "model_digest": meta["model_digest"],
                "compiler_options": options, "compile_log": "compile_log.txt", "meta": META_NAME,
                "target": target}

    def _trace(self, ctx: JobContext, torch_neuronx: Any, model: Any, shape: tuple[int, int],
               args: list[str]) -> tuple[Any, float]:
        """Run torch_neuronx.trace in the compile directory, capture compiler output, save model.pt.

        The compile directory is also the working directory: neuronx-cc writes
        log-neuron-cc.txt (--logfile's default) into its working directory, which
        trace does not set (neuron.md §0, §4.5). NEURON_CC_FLAGS is left alone:
        trace runs neuronx-cc directly, without the wrapper that reads it."""
        workdir = ctx.workdir / "compile"
        workdir.mkdir(parents=True, exist_ok=True)
        captured = workdir / "compiler_output.txt"
        wrapper = LogitsOnly(model).eval()
        example = example_input(shape, model.config.vocab_size, seed=0)
        header = [f"torch_neuronx.trace input_ids {list(shape)}", f"compiler_args: {args}",
                  f"NEURON_LOGICAL_NC_CONFIG: {os.environ.get('NEURON_LOGICAL_NC_CONFIG', '(unset)')}"]
        ctx.log(header[1])
        started = time.perf_counter()
        try:
            with working_directory(workdir), capture_output(captured):
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
        """One NeuronCore in-process; several under torchrun (see neuron_launch.run_torchrun);
        inside a gang's torchrun (WORLD_SIZE set by it), this process is one rank.
        With the precompile option, neuron_parallel_compile runs a few trial steps
        first (its own stage); tensor parallelism and ZeRO-1 train through Optimum
        Neuron's NeuronTrainer (neuron_trainer.optimum_train_rank)."""
        plan = finetune_plan(ctx)
        cores = spec_int(ctx.spec, "cores", default=1)
        try:
            check_parallel_options(ctx.spec.get("family") or "trn1", cores,
                                   spec_int(ctx.spec, "tensor_parallel_size", default=1), bool(ctx.spec.get("zero_1")),
                                   plan["precompile"])
        except ParallelOptionError as exc:
            raise JobFailed("bad_input", str(exc)) from exc
        report = check_runnable(ctx, ctx.spec.get("family") or "", cores=cores)
        framework = report.get("framework")
        world_size = int(os.environ.get("WORLD_SIZE") or "1")
        if world_size > 1 and os.environ.get("RANK") is not None:
            # One rank of a gang's torchrun (neuron_workers.process.gang, which ran the
            # precompile stage first): it reads the same fleet compile cache.
            os.environ.update(training_env(framework or "xla", os.environ.get("NEURON_RT_VISIBLE_CORES"),
                                           compile_cache_dir(), os.environ))
            return train_rank(ctx, plan, rank=int(os.environ["RANK"]), world_size=world_size, framework=framework)
        if plan["precompile"]:
            stage(ctx, "precompile", "started")
            seconds = run_precompile(ctx, cores, compile_cache_dir(), framework)
            stage(ctx, "precompile", "done", f"precompile: done in {seconds:.1f} s (neuron_parallel_compile)")
        else:
            stage(ctx, "precompile", "skipped", "precompile: off (the first steps compile as they go)")
        stage(ctx, "train", "started")
        if cores > 1 or uses_neuron_trainer(ctx.spec):
            result = run_torchrun(ctx, cores, compile_cache_dir(), framework)
        else:
            os.environ.update(training_env(framework or "xla", os.environ.get("NEURON_RT_VISIBLE_CORES"),
                                           compile_cache_dir(), os.environ))
            result = train_rank(ctx, plan, rank=0, world_size=1, framework=framework)
        stage(ctx, "train", "done")
        return result

    # ------------------------------------------------------------ inference

    def inference(self, ctx: JobContext) -> dict:
        """Fixed-shape decoding through a compiled artifact on the job's NeuronCores."""
        fmt = require_model_format(ctx, ["hf", "torchscript", "neuron"])
        image_meta = image_compile_meta(input_path(ctx, "model_path")) if fmt != "hf" else None
        if image_meta is not None and image_meta.get("exporter") == "optimum-neuron":
            return optimum_images(ctx, input_path(ctx, "model_path"), image_meta)
        if image_meta is not None:
            return infer_images_on_cpu(ctx, input_path(ctx, "model_path"), image_meta)
        exported = optimum_meta(input_path(ctx, "model_path")) if fmt == "neuron" else None
        if exported is not None:
            return optimum_generate(ctx, input_path(ctx, "model_path"), exported)
        if fmt != "neuron":
            # An HF folder or a cpu-traced TorchScript file runs on the host CPU;
            # only Neuron-compiled artifacts execute on NeuronCores.
            ctx.log(f"model format {fmt!r} runs on the host CPU; compile it for NeuronCore inference")
            return infer_on_cpu(ctx)
        settings = generation_settings(ctx)
        prompts = read_prompts(ctx)
        model_path = input_path(ctx, "model_path")
        check_runnable(ctx, ctx.spec.get("family") or "", model_format=fmt)
        check_artifact_lnc(model_path)
        torch_neuronx = import_torch_neuronx()  # before torch.jit.load: registers neuron::Model (§4.2)
        visible = os.environ.get("NEURON_RT_VISIBLE_CORES")
        cores = len(parse_visible_cores(visible)) or 1
        ctx.log(f"NEURON_RT_VISIBLE_CORES={visible or '(all)'}")

        def load_error(exc: BaseException) -> JobFailed:
            return map_neuron_error(exc, "load the model", console_tail(ctx.workdir / CONSOLE_LOG))

        try:
            # No in-process cache: a loaded model holds its NeuronCore (§4.2), and
            # a later job in this process may have been given other cores.
            module, meta, tokenizer = load_compiled(model_path, torch.jit.load, use_cache=False, map_error=load_error)
            if cores > 1:
                module, meta = data_parallel(torch_neuronx, module, meta, cores)
                ctx.log(f"torch_neuronx.DataParallel over {cores} NeuronCores, batch {meta['batch_size']}")
            return run_fixed_shape_inference(ctx, module, meta, tokenizer, prompts, settings)
        except (RuntimeError, MemoryError) as exc:
            # The runtime's own lines (allocation failures, busy cores) are on the console.
            raise map_neuron_error(exc, "inference", console_tail(ctx.workdir / CONSOLE_LOG)) from exc


# ---------------------------------------------------------------- Optimum Neuron export


def import_optimum_neuron() -> Any:
    """optimum.neuron, or JobFailed("unavailable") (installed from PyPI as optimum-neuron,
    on top of the host's Neuron SDK)."""
    try:
        return importlib.import_module("optimum.neuron")
    except Exception as exc:
        raise JobFailed("unavailable", f"optimum-neuron is not usable on this host: {exc}") from exc


def optimum_export(ctx: JobContext, model_path: Path, target: str, options: list[str]) -> dict:
    """Export with Optimum Neuron's Python API into artifacts/neuron_model (save_pretrained).

    Decoders: `NeuronModelForCausalLM.get_neuron_config(...)` then `.export(model,
    neuron_config=..., load_weights=False)`; encoders and Stable Diffusion:
    `NeuronModelFor....from_pretrained(model, export=True, **compiler_args,
    **input_shapes)` (export_options.optimum_export_call). On a CPU-only compile
    host neuronx_distributed needs NEURON_PLATFORM_TARGET_OVERRIDE before import
    (export_model.mdx), so it is set to the target first."""
    try:
        export = check_export_options(ctx.spec, target)
    except ExportOptionError as exc:
        raise JobFailed("bad_input", str(exc)) from exc
    os.environ.setdefault("NEURON_PLATFORM_TARGET_OVERRIDE", target)
    optimum = import_optimum_neuron()
    cls_name, method, kwargs = optimum_export_call(export, target, options)
    cls = getattr(optimum, cls_name)
    out = ctx.artifacts_dir / OPTIMUM_DIR
    ctx.log(f"optimum-neuron {cls_name}.{method}({model_path.name}, {kwargs})")
    ctx.check_stop("before exporting")
    started = time.perf_counter()
    try:
        with working_directory(ctx.artifacts_dir.parent):
            if method == "export":
                neuron_config = cls.get_neuron_config(str(model_path), **kwargs)
                model = cls.export(str(model_path), neuron_config=neuron_config, load_weights=False)
            else:
                model = cls.from_pretrained(str(model_path), **kwargs)
            model.save_pretrained(str(out))
        if not export.is_image:
            hf.load_tokenizer(model_path).save_pretrained(str(out))  # inference reads it beside the model
    except Exception as exc:
        raise map_neuron_error(exc, "export", "") from exc
    seconds = time.perf_counter() - started
    version = neuron_compiler_version(import_torch_neuronx())  # the identity the web app keys on
    digest = model_digest(model_path)
    key = compile_cache_key(digest, export.batch_size, export.sequence_length, options, "neuron", version, target,
                            export.key_extras())
    meta = {"exporter": "optimum-neuron", "optimum_class": cls_name, "artifact": OPTIMUM_DIR, "task": export.task,
            **export.shape(), "tensor_parallel_size": export.tensor_parallel_size, "auto_cast": export.auto_cast,
            "auto_cast_type": export.auto_cast_type, "backend": "neuron", "target": target,
            "compiler_version": version, "compiler_options": options, "model_digest": digest, "cache_key": key,
            "job_id": ctx.job_id}
    write_json(ctx.artifacts_dir / META_NAME, meta)
    ctx.log(f"exported for {target} in {seconds:.1f}s")
    return {"artifact": OPTIMUM_DIR, "compile_seconds": round(seconds, 4), "backend": "neuron",
            "compiler_version": version, "input_shape": export.shape(), "cache_key": key, "model_digest": digest,
            "compiler_options": options, "meta": META_NAME, "target": target, "task": export.task,
            "exporter": "optimum-neuron"}


def optimum_meta(model_path: Path) -> dict | None:
    """compile_meta.json of an artifact exported with Optimum Neuron, else None."""
    root = model_path if model_path.is_dir() else model_path.parent
    try:
        meta = json.loads((root / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if meta.get("exporter") == "optimum-neuron" else None


def optimum_generate(ctx: JobContext, model_path: Path, meta: dict) -> dict:
    """Text generation from an Optimum Neuron export: NeuronModelForCausalLM.from_pretrained
    (the exported folder) then generate() (optimum-neuron export_model.mdx). Static
    shapes: a prompt plus max_new_tokens must fit the exported sequence length."""
    if meta.get("task") != "text-generation":
        raise JobFailed("bad_input", f"a {meta.get('task')} artifact is not run by inference jobs "
                                     f"(text-generation and text-to-image artifacts are)")
    settings = generation_settings(ctx)
    prompts = read_prompts(ctx)
    check_runnable(ctx, ctx.spec.get("family") or "", model_format="neuron")
    root = model_path if model_path.is_dir() else model_path.parent
    folder = root / meta.get("artifact", OPTIMUM_DIR)
    tokenizer = hf.load_tokenizer(folder)
    ids = [hf.encode_prompt(tokenizer, prompt) for prompt in prompts]
    check_fits_shape(ids, meta["sequence_length"], settings["max_new_tokens"])
    optimum = import_optimum_neuron()
    try:
        model = optimum.NeuronModelForCausalLM.from_pretrained(str(folder))
    except Exception as exc:
        raise map_neuron_error(exc, "load the model", console_tail(ctx.workdir / CONSOLE_LOG)) from exc
    sampling = {"do_sample": True, "temperature": settings["temperature"]} if settings["temperature"] > 0 else \
        {"do_sample": False}
    torch.manual_seed(settings["seed"])
    records, started = [], time.perf_counter()
    for index, (prompt, prompt_ids) in enumerate(zip(prompts, ids)):
        ctx.check_stop(f"before prompt {index}")
        t0 = time.perf_counter()
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        try:
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=settings["max_new_tokens"], **sampling)
        except (RuntimeError, MemoryError) as exc:
            raise map_neuron_error(exc, "inference", console_tail(ctx.workdir / CONSOLE_LOG)) from exc
        new = [int(t) for t in out[0, len(prompt_ids):].tolist()]
        records.append({"index": index, "prompt": prompt, "output": tokenizer.decode(new, skip_special_tokens=True),
                        "new_tokens": len(new), "latency_ms": round((time.perf_counter() - t0) * 1000, 3)})
    return inference_result(ctx, records, time.perf_counter() - started)


def optimum_images(ctx: JobContext, model_path: Path, meta: dict) -> dict:
    """Text-to-image on NeuronCores: NeuronStableDiffusionPipeline.from_pretrained(the
    exported folder) then pipeline(prompt, ...).images (optimum-neuron
    model_doc/diffusers/stable_diffusion.mdx). Height, width and images per prompt
    are compiled into the NEFFs, so the call passes none of them."""
    root = model_path if model_path.is_dir() else model_path.parent
    check_runnable(ctx, ctx.spec.get("family") or "", model_format="neuron")
    optimum = import_optimum_neuron()
    try:
        pipeline = optimum.NeuronStableDiffusionPipeline.from_pretrained(str(root / meta.get("artifact", OPTIMUM_DIR)))
    except Exception as exc:
        raise map_neuron_error(exc, "load the model", console_tail(ctx.workdir / CONSOLE_LOG)) from exc
    return generate_images(ctx, pipeline, meta, {})


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
    """"torch-neuronx-<v>+neuronx-cc-<v>" from the installed distributions, as the agent
    reports it for the host (neuron_env.compiler_identity), so the artifact's cache key
    is the key the web app computes at submit. A module without distribution metadata
    (a stand-in) falls back to its __version__."""
    cc_version = dist_version("neuronx-cc")
    if cc_version is None:
        try:
            cc_version = getattr(importlib.import_module("neuronxcc"), "__version__", None)
        except Exception:
            cc_version = None
    return compiler_identity(dist_version("torch-neuronx") or getattr(torch_neuronx, "__version__", None), cc_version)


def check_runnable(ctx: JobContext, family: str, *, cores: int = 1, model_format: str = "hf",
                   compiler_options: list[str] | tuple[str, ...] = ()) -> dict:
    """This interpreter's report (neuron_env.probe); JobFailed("unavailable") with the
    reason when it cannot run the job (neuron_matrix: the same rules as at submit)."""
    report = probe()
    refusal = job_refusal(ctx.kind, family, cores, report, model_format=model_format,
                          compiler_options=compiler_options, host_lnc=runtime_lnc(family))
    # Core counts and placement were settled at submit and dispatch.
    if refusal is not None and refusal.code != "collective_size":
        raise JobFailed("unavailable" if refusal.code == "neuron_env" else "bad_input", refusal.message)
    return report


def runtime_lnc(target: str) -> int | None:
    """The runtime's logical NeuronCore size on trn2 (NEURON_LOGICAL_NC_CONFIG, default 2;
    the worker sets it from the host's neuron-ls), None on other targets."""
    if target not in NATIVE_FAMILIES:
        return None
    raw = os.environ.get("NEURON_LOGICAL_NC_CONFIG", "").strip()
    return int(raw) if raw.isdigit() else DEFAULT_TRN2_LNC


def check_artifact_lnc(model_path: Path) -> None:
    """A trn2 artifact loads only at the logical core size it was compiled for (the
    runtime's NEURON_LOGICAL_NC_CONFIG must equal the compiler's, neuron.md §4.3)."""
    meta_path = (model_path if model_path.is_dir() else model_path.parent) / META_NAME
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # load_compiled reports a missing or broken meta file
    compiled, target = meta.get("logical_nc_config"), meta.get("target") or ""
    running = runtime_lnc(target)
    if isinstance(compiled, int) and running is not None and compiled != running:
        raise JobFailed("bad_input", f"the artifact was compiled for logical-nc-config={compiled} but this host "
                                     f"runs NEURON_LOGICAL_NC_CONFIG={running}; compile it again on this host")


def data_parallel(torch_neuronx: Any, module: Any, meta: dict, cores: int) -> tuple[Any, dict]:
    """The traced module on every visible core, fed cores x its compiled batch at once.

    torch_neuronx.DataParallel copies the module onto each core the process sees
    (device ids count from 0 within NEURON_RT_VISIBLE_CORES) and splits the input
    along dim 0; with dynamic batching off the batch must be len(device_ids) x the
    compiled batch (api-torch-neuronx-data-parallel.rst, neuron.md §4.2)."""
    parallel = torch_neuronx.DataParallel(module, device_ids=list(range(cores)), dim=0, set_dynamic_batching=False)
    return parallel, {**meta, "batch_size": meta["batch_size"] * cores}


# ---------------------------------------------------------------- compiler plumbing (pure)


def compiler_args(target: str, options: list[str]) -> list[str]:
    """argv pieces for torch_neuronx.trace(compiler_args=...): the target, then validated options.

    We always pass --target: it matches what torch-neuronx passes itself
    (`--target=trn1`, neuron.md §4.5) and is required for CPU-side tracing.
    """
    return [f"--target={target}", *options]


def compile_cache_dir(env: Mapping[str, str] | None = None) -> str:
    """The Neuron compile cache directory for training: config.compile_cache_dir
    (NEURONDECK_COMPILE_CACHE, else the Neuron default /var/tmp/neuron-compile-cache);
    neuron_launch.training_env hands it to the framework."""
    return config.compile_cache_dir(env)


# ---------------------------------------------------------------- compile process plumbing


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """chdir into `path` for the block, then back (the compiler's children inherit it)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


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
    # neuronx-cc writes log-neuron-cc.txt into its working directory by default
    # (--logfile, neuron.md §4.5); _trace makes that the compile directory.
    for log_file in sorted(workdir.rglob("log-neuron-cc*.txt")):
        text = log_file.read_text(encoding="utf-8", errors="replace")
        parts.append(f"== {log_file.relative_to(workdir)} ==\n{text}")
    text = "\n".join(parts) + "\n"
    (ctx.artifacts_dir / "compile_log.txt").write_text(text, encoding="utf-8")
    return text
