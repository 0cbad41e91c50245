"""The cpu backend: all three job kinds with plain PyTorch, for real, on the host CPU.

compile   = torch.jit.trace of the causal LM (logits only) at a fixed (batch, seq),
            saved as TorchScript: the same artifact shape torch_neuronx.trace
            returns (neuron.md §4.2), so inference code is shared.
finetune  = AdamW steps on the packed dataset, checkpoint via save_pretrained.
inference = KV-cache decoding of an HF model, or fixed-shape decoding of a
            compiled artifact.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from . import hf
from .base import (
    Backend,
    JobContext,
    JobFailed,
    input_path,
    percentile,
    require_model_format,
    spec_float,
    spec_int,
    write_json,
)
from .compiler_options import CompilerOptionError, compile_cache_key, validate_compiler_options
from .data import pack_blocks, read_prompts, read_texts, steps_per_epoch
from .loops import (
    TrainHooks,
    fit_prompt,
    generate_fixed_shape,
    generate_hf,
    inference_result,
    time_forward,
    train_steps,
)
from .tinymodel import model_digest

LATENCY_RUNS = 20
EQUIVALENCE_TOLERANCE = 1e-4


def compiler_version() -> str:
    return f"torch-{torch.__version__}"


class CpuBackend(Backend):
    """Runs every job kind on the CPU with torch; always available where torch imports."""

    name = "cpu"

    @classmethod
    def available(cls) -> bool:
        return True

    @classmethod
    def zygote_preload(cls, kind: str, inputs: dict) -> bool:
        """Inference and fine-tune jobs on an HF folder: its model and tokenizer
        (bounded by hf's cache limits). A fine-tune child trains its own
        copy-on-write copy (hf.owned_hf_model), never the zygote's."""
        path = inputs.get("model_path")
        if kind not in ("inference", "finetune") or (inputs.get("model_format") or "hf") != "hf" or not path:
            return False
        if not Path(path).is_dir():
            return False
        return hf.preload_hf(Path(path))

    def reusable_process(self, kind: str) -> bool:
        """Inference only reads the cached model and tokenizer (hf.cached_hf_model,
        load_compiled) and restores the thread count it changed (hf.torch_threads).
        A fine-tune takes the cached model for itself (hf.take_owned) and a compile
        traces into it, so both end their process."""
        return kind == "inference"

    # ------------------------------------------------------------ compile

    def compile(self, ctx: JobContext) -> dict:
        """Trace to artifacts/model.pt; fail with compile_error unless it matches eager within 1e-4.

        Runs with the thread count inference will use for this model, so the
        reported latency is the latency users will see.
        """
        model_path = input_path(ctx, "model_path")
        with hf.torch_threads(hf.small_model_threads(model_path)):
            return self._compile(ctx)

    def _compile(self, ctx: JobContext) -> dict:
        shape = compile_shape(ctx)
        target = ctx.spec.get("target", "cpu")
        if target != "cpu":
            raise JobFailed(
                "bad_input",
                f"target {target!r} needs the neuron backend (torch-neuronx); this host compiles for cpu only",
            )
        options = checked_options(ctx, target)
        model_path = input_path(ctx, "model_path")
        require_model_format(ctx, ["hf"])
        model = hf.load_causal_lm(model_path).eval()
        tokenizer = hf.load_tokenizer(model_path)
        hf.check_sequence_length(model, shape[1])
        if options:
            ctx.log(f"compiler options {options} are recorded but have no effect on torch.jit.trace")
        ctx.check_stop("before tracing")
        log_lines: list[str] = []
        _, compile_seconds = self._trace(ctx, model, shape, log_lines)
        artifacts = ctx.artifacts_dir
        ctx.check_stop("after tracing")
        loaded = torch.jit.load(str(artifacts / hf.ARTIFACT_NAME))
        diff = max_logit_diff(model, loaded, shape, model.config.vocab_size)
        log_lines.append(f"max |traced - eager| logits on a random input: {diff:.3g}")
        latencies = time_forward(loaded, example_input(shape, model.config.vocab_size, seed=1), LATENCY_RUNS)
        (artifacts / "compile_log.txt").write_text("\n".join(log_lines) + "\n", encoding="utf-8")
        if not diff < EQUIVALENCE_TOLERANCE:  # also catches NaN
            raise JobFailed(
                "compile_error", f"traced logits differ from eager by {diff:.3g} (limit {EQUIVALENCE_TOLERANCE})"
            )
        result = compile_result(shape, compile_seconds, latencies, diff, "cpu", compiler_version())
        meta = compile_meta(ctx, model, tokenizer, model_path, shape, options, target, result)
        hf.save_tokenizer(tokenizer, artifacts / hf.TOKENIZER_DIR)
        write_json(artifacts / hf.META_NAME, meta)
        ctx.log(f"compiled in {compile_seconds:.2f}s; p50 {result['latency_ms_p50']} ms; max logit diff {diff:.3g}")
        return {**result, "cache_key": meta["cache_key"], "model_digest": meta["model_digest"],
                "compiler_options": options, "compile_log": "compile_log.txt", "meta": hf.META_NAME}

    def _trace(self, ctx: JobContext, model: Any, shape: tuple[int, int], log_lines: list[str]) -> tuple[Any, float]:
        """torch.jit.trace + torch.jit.save; returns (traced, seconds) and records warnings in log_lines."""
        wrapper = hf.LogitsOnly(model).eval()
        example = example_input(shape, model.config.vocab_size, seed=0)
        log_lines.append(
            f"torch.jit.trace of {type(model).__name__} with input_ids {list(shape)} ({compiler_version()})"
        )
        started = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # check_trace=False: we compare the saved artifact against eager ourselves.
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
            torch.jit.save(traced, str(ctx.artifacts_dir / hf.ARTIFACT_NAME))
        seconds = time.perf_counter() - started
        # torch 2.13 marks torch.jit.trace deprecated; that warning is noise for
        # users, tracer warnings (data-dependent control flow) are not.
        log_lines.extend(f"warning: {w.message}" for w in caught if "deprecated" not in str(w.message))
        log_lines.append(f"traced and saved in {seconds:.3f}s")
        return traced, seconds

    # ------------------------------------------------------------ finetune

    def finetune(self, ctx: JobContext) -> dict:
        """AdamW on the packed dataset; checkpoint (+ tokenizer) saved to artifacts/checkpoint."""
        plan = finetune_plan(ctx)
        model, tokenizer = hf.owned_hf_model(plan["model_path"])
        blocks, total_steps = prepare_training(ctx, model, tokenizer, plan)
        torch.manual_seed(plan["seed"])
        # Small models train fastest on one thread; for the rest, the job's core
        # allocation is its CPU thread budget. Measured on a busy 2-core host: the
        # tiny model took 28 s for 40 steps with 2 OpenMP threads, 2 s with 1.
        threads = hf.small_model_threads(plan["model_path"]) or spec_int(ctx.spec, "cores", default=None)
        with hf.torch_threads(threads):
            stats = train_steps(ctx, model, blocks, total_steps=total_steps, batch_size=plan["batch_size"],
                                learning_rate=plan["learning_rate"], seed=plan["seed"], hooks=TrainHooks())
        save_checkpoint(ctx, model, tokenizer)
        return {**stats.result(), "checkpoint": "checkpoint", "backend": "cpu"}

    # ------------------------------------------------------------ inference

    def inference(self, ctx: JobContext) -> dict:
        """Generate for every prompt; writes artifacts/outputs.jsonl."""
        fmt = require_model_format(ctx, ["hf", "torchscript", "neuron"])
        if fmt == "neuron":
            raise JobFailed("unavailable", "a Neuron-compiled artifact can only run on a host with the neuron backend")
        settings = generation_settings(ctx)
        prompts = read_prompts(ctx)
        model_path = input_path(ctx, "model_path")
        with hf.torch_threads(hf.small_model_threads(model_path)):
            if fmt == "hf":
                model, tokenizer = hf.cached_hf_model(model_path)
                return run_hf_inference(ctx, model, tokenizer, prompts, settings)
            module, meta, tokenizer = load_compiled(model_path, torch.jit.load)
            # TorchScript's profiling executor spends ~75-160 ms optimising during
            # the first two calls (measured, tiny model); the plain interpreter is
            # as fast afterwards, so short jobs skip the optimisation.
            with torch.jit.optimized_execution(False):
                return run_fixed_shape_inference(ctx, module, meta, tokenizer, prompts, settings)


# ---------------------------------------------------------------- compile helpers (shared with neuron)


def compile_shape(ctx: JobContext) -> tuple[int, int]:
    return spec_int(ctx.spec, "batch_size"), spec_int(ctx.spec, "sequence_length", minimum=2)


def checked_options(ctx: JobContext, target: str) -> list[str]:
    """Allow-listed compiler options, or bad_input carrying the validator's message."""
    try:
        return validate_compiler_options(ctx.spec.get("compiler_options") or [], target)
    except CompilerOptionError as exc:
        raise JobFailed("bad_input", str(exc)) from exc


def example_input(shape: tuple[int, int], vocab_size: int, seed: int) -> torch.Tensor:
    """Deterministic random input_ids of `shape` (int64, like tokenizer output)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, shape, generator=generator, dtype=torch.long)


@torch.inference_mode()
def max_logit_diff(model: Any, compiled: Any, shape: tuple[int, int], vocab_size: int) -> float:
    """max |compiled(x) - model(x).logits| on a fresh random x; compares against the
    unwrapped model so the check also covers LogitsOnly's hand-built mask."""
    x = example_input(shape, vocab_size, seed=12345)
    expected = model(input_ids=x, use_cache=False).logits
    got = compiled(x)
    return float((got.float() - expected.float()).abs().max())


def compile_result(shape, compile_seconds, latencies, diff, backend, version) -> dict:
    """The result fields shared by cpu and neuron compiles."""
    return {
        "artifact": hf.ARTIFACT_NAME,
        "compile_seconds": round(compile_seconds, 4),
        "latency_ms_p50": round(percentile(latencies, 50), 4),
        "latency_ms_p95": round(percentile(latencies, 95), 4),
        "max_abs_logit_diff": diff,
        "backend": backend,
        "compiler_version": version,
        "input_shape": list(shape),
    }


def compile_meta(ctx, model, tokenizer, model_path: Path, shape, options, target, result) -> dict:
    """compile_meta.json: everything inference needs to drive the fixed-shape artifact."""
    eos_id, pad_id = hf.token_ids(tokenizer)
    digest = model_digest(model_path)
    return {
        "artifact": hf.ARTIFACT_NAME,
        "tokenizer": hf.TOKENIZER_DIR,
        "batch_size": shape[0],
        "sequence_length": shape[1],
        "input_shape": list(shape),
        "input_dtype": "int64",
        "vocab_size": int(model.config.vocab_size),
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "model_type": getattr(model.config, "model_type", None),
        "backend": result["backend"],
        "target": target,
        "compiler_version": result["compiler_version"],
        "compiler_options": options,
        "model_digest": digest,
        "cache_key": compile_cache_key(digest, shape[0], shape[1], options, result["backend"],
                                       result["compiler_version"], target),
        "job_id": ctx.job_id,
    }


# ---------------------------------------------------------------- finetune helpers (shared with neuron)


def finetune_plan(ctx: JobContext) -> dict:
    """Checked finetune settings; steps wins over epochs when both are given."""
    require_model_format(ctx, ["hf"])
    plan = {
        "model_path": input_path(ctx, "model_path"),
        "dataset_path": input_path(ctx, "dataset_path"),
        "dataset_format": ctx.inputs.get("dataset_format") or "jsonl",
        "batch_size": spec_int(ctx.spec, "batch_size"),
        "sequence_length": spec_int(ctx.spec, "sequence_length", minimum=2),
        "learning_rate": spec_float(ctx.spec, "learning_rate"),
        "steps": spec_int(ctx.spec, "steps", default=None),
        "epochs": spec_int(ctx.spec, "epochs", default=None),
        "seed": spec_int(ctx.spec, "seed", minimum=0, default=0),
    }
    if plan["learning_rate"] <= 0:
        raise JobFailed("bad_input", "learning_rate must be greater than 0")
    if plan["steps"] is None and plan["epochs"] is None:
        raise JobFailed("bad_input", "a finetune job needs 'steps' or 'epochs'")
    return plan


def prepare_training(ctx: JobContext, model: Any, tokenizer: Any, plan: dict) -> tuple[torch.Tensor, int]:
    """(blocks, total_steps) for a plan; logs the dataset size."""
    hf.check_sequence_length(model, plan["sequence_length"])
    eos_id, _ = hf.token_ids(tokenizer)
    texts = read_texts(plan["dataset_path"], plan["dataset_format"])
    blocks = pack_blocks(tokenizer, texts, plan["sequence_length"], eos_id)
    per_epoch = steps_per_epoch(len(blocks), plan["batch_size"])
    total = plan["steps"] if plan["steps"] is not None else plan["epochs"] * per_epoch
    ctx.log(f"dataset: {len(texts)} texts -> {len(blocks)} blocks of {blocks.shape[1]} tokens; "
            f"{per_epoch} steps/epoch; training {total} steps")
    return blocks, total


def save_checkpoint(ctx: JobContext, model: Any, tokenizer: Any) -> Path:
    """save_pretrained model + tokenizer into artifacts/checkpoint (loadable with from_pretrained)."""
    dest = ctx.artifacts_dir / "checkpoint"
    model.to("cpu").save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    ctx.log(f"checkpoint saved to {dest}")
    return dest


# ---------------------------------------------------------------- inference helpers (shared with neuron)


def generation_settings(ctx: JobContext) -> dict:
    return {
        "max_new_tokens": spec_int(ctx.spec, "max_new_tokens"),
        "temperature": spec_float(ctx.spec, "temperature", default=0.0),
        "seed": spec_int(ctx.spec, "seed", minimum=0, default=0),
    }


def run_hf_inference(ctx: JobContext, model: Any, tokenizer: Any, prompts: list[str], settings: dict) -> dict:
    """One prompt at a time through generate_hf; per-request latency includes tokenization and decode."""
    eos_id, _ = hf.token_ids(tokenizer)
    limit = hf.max_positions(model) or 1 << 30
    generator = torch.Generator().manual_seed(settings["seed"])
    records = []
    started = time.perf_counter()
    for index, prompt in enumerate(prompts):
        ctx.check_stop(f"before prompt {index}")
        t0 = time.perf_counter()
        ids = fit_prompt(hf.encode_prompt(tokenizer, prompt), limit, settings["max_new_tokens"])
        new = generate_hf(model, ids, max_new_tokens=min(settings["max_new_tokens"], limit - len(ids)),
                          temperature=settings["temperature"], generator=generator, eos_id=eos_id)
        output = tokenizer.decode(new, skip_special_tokens=True)
        records.append(_record(index, prompt, output, new, (time.perf_counter() - t0) * 1000))
        ctx.log(f"prompt {index}: {len(ids)} tokens in, {len(new)} out, {records[-1]['latency_ms']:.1f} ms")
    return inference_result(ctx, records, time.perf_counter() - started)


def run_fixed_shape_inference(ctx, module, meta: dict, tokenizer, prompts: list[str], settings: dict) -> dict:
    """Decode prompts through a compiled (batch, seq) artifact in groups of its batch size."""
    seq = meta["sequence_length"]
    ids = [fit_prompt(hf.encode_prompt(tokenizer, p), seq, settings["max_new_tokens"]) for p in prompts]
    generator = torch.Generator().manual_seed(settings["seed"])
    ctx.check_stop("before decoding")
    started = time.perf_counter()
    decoded = generate_fixed_shape(
        module, ids, batch_size=meta["batch_size"], sequence_length=seq, pad_id=meta["pad_token_id"],
        eos_id=meta["eos_token_id"], max_new_tokens=settings["max_new_tokens"],
        temperature=settings["temperature"], generator=generator,
    )
    wall = time.perf_counter() - started
    records = [
        _record(i, prompt, tokenizer.decode(new, skip_special_tokens=True), new, latency)
        for i, (prompt, (new, latency)) in enumerate(zip(prompts, decoded))
    ]
    ctx.log(f"decoded {len(records)} prompts through the compiled ({meta['batch_size']}, {seq}) artifact "
            f"in {wall * 1000:.1f} ms")
    return inference_result(ctx, records, wall)


def load_compiled(model_path: Path, loader: Any, *, use_cache: bool = True,
                  map_error: Any = None) -> tuple[Any, dict, Any]:
    """(module, meta, tokenizer) for a compiled artifact dir or model.pt.

    With use_cache the module is memoised per file (see hf.cached); the neuron
    backend turns that off because a loaded Neuron model occupies a NeuronCore.
    `map_error(exc) -> JobFailed` classifies load failures (default: bad_input).
    """
    artifact, meta_path, tokenizer_dir = hf.artifact_paths(model_path)
    if not artifact.is_file():
        raise JobFailed("bad_input", f"no compiled artifact at {artifact}")
    meta = hf.read_compile_meta(meta_path)
    try:
        module = hf.cached("jit", artifact, lambda p: loader(str(p))) if use_cache else loader(str(artifact))
    except (RuntimeError, ValueError, MemoryError) as exc:
        if map_error is not None:
            raise map_error(exc) from exc
        raise JobFailed("bad_input", f"could not load compiled artifact {artifact.name}: {exc}") from exc
    return module, meta, hf.cached("tokenizer", tokenizer_dir, hf.load_tokenizer)


def _record(index: int, prompt: str, output: str, new: list[int], latency_ms: float) -> dict:
    return {"index": index, "prompt": prompt, "output": output, "new_tokens": len(new),
            "latency_ms": round(latency_ms, 3)}
