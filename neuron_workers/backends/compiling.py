"""Compiling a causal LM into the fixed-shape artifact: the steps every target shares,
and the host-CPU compile with torch.jit.trace.

Shared steps: the (batch, seq) shape and the checked compiler options from the
spec, the example input, the compiled-vs-eager logit check and the result dict.
`compile_on_cpu` is the whole cpu compile; the cpu backend runs it for every
compile job and the neuron backend for target "cpu".
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from . import hf
from .artifacts import ARTIFACT_NAME, META_NAME, TOKENIZER_DIR, LogitsOnly, compile_meta, save_tokenizer
from .base import JobContext, JobFailed, input_path, percentile, require_model_format, spec_int, write_json
from .compiler_options import CompilerOptionError, validate_compiler_options
from .loops import time_forward

LATENCY_RUNS = 20
EQUIVALENCE_TOLERANCE = 1e-4


def compile_shape(ctx: JobContext) -> tuple[int, int]:
    """(batch_size, sequence_length) the artifact is compiled for."""
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


def compile_result(shape: tuple[int, int], compile_seconds: float, latencies: list[float], diff: float,
                   backend: str, version: str) -> dict:
    """The result fields shared by cpu and neuron compiles."""
    return {
        "artifact": ARTIFACT_NAME,
        "compile_seconds": round(compile_seconds, 4),
        "latency_ms_p50": round(percentile(latencies, 50), 4),
        "latency_ms_p95": round(percentile(latencies, 95), 4),
        "max_abs_logit_diff": diff,
        "backend": backend,
        "compiler_version": version,
        "input_shape": list(shape),
    }


# ---------------------------------------------------------------- the host-CPU compile


def cpu_compiler_version() -> str:
    return f"torch-{torch.__version__}"


def compile_on_cpu(ctx: JobContext) -> dict:
    """Trace to artifacts/model.pt; fail with compile_error unless it matches eager within 1e-4.

    Runs with the thread count inference will use for this model, so the
    reported latency is the latency users will see.
    """
    model_path = input_path(ctx, "model_path")
    with hf.torch_threads(hf.small_model_threads(model_path)):
        return _compile_on_cpu(ctx)


def _compile_on_cpu(ctx: JobContext) -> dict:
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
    compile_seconds = _jit_trace(ctx, model, shape, log_lines)
    artifacts = ctx.artifacts_dir
    ctx.check_stop("after tracing")
    loaded = torch.jit.load(str(artifacts / ARTIFACT_NAME))
    diff = max_logit_diff(model, loaded, shape, model.config.vocab_size)
    log_lines.append(f"max |traced - eager| logits on a random input: {diff:.3g}")
    latencies = time_forward(loaded, example_input(shape, model.config.vocab_size, seed=1), LATENCY_RUNS)
    (artifacts / "compile_log.txt").write_text("\n".join(log_lines) + "\n", encoding="utf-8")
    if not diff < EQUIVALENCE_TOLERANCE:  # also catches NaN
        raise JobFailed(
            "compile_error", f"traced logits differ from eager by {diff:.3g} (limit {EQUIVALENCE_TOLERANCE})"
        )
    result = compile_result(shape, compile_seconds, latencies, diff, "cpu", cpu_compiler_version())
    meta = compile_meta(ctx, model, tokenizer, model_path, shape, options, target, result)
    save_tokenizer(tokenizer, artifacts / TOKENIZER_DIR)
    write_json(artifacts / META_NAME, meta)
    ctx.log(f"compiled in {compile_seconds:.2f}s; p50 {result['latency_ms_p50']} ms; max logit diff {diff:.3g}")
    return {**result, "cache_key": meta["cache_key"], "model_digest": meta["model_digest"],
            "compiler_options": options, "compile_log": "compile_log.txt", "meta": META_NAME}


def _jit_trace(ctx: JobContext, model: Any, shape: tuple[int, int], log_lines: list[str]) -> float:
    """torch.jit.trace + torch.jit.save into artifacts/; returns the seconds taken and
    records the tracer's warnings in log_lines."""
    wrapper = LogitsOnly(model).eval()
    example = example_input(shape, model.config.vocab_size, seed=0)
    log_lines.append(
        f"torch.jit.trace of {type(model).__name__} with input_ids {list(shape)} ({cpu_compiler_version()})"
    )
    started = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # check_trace=False: we compare the saved artifact against eager ourselves.
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        torch.jit.save(traced, str(ctx.artifacts_dir / ARTIFACT_NAME))
    seconds = time.perf_counter() - started
    # torch 2.13 marks torch.jit.trace deprecated; that warning is noise for
    # users, tracer warnings (data-dependent control flow) are not.
    log_lines.extend(f"warning: {w.message}" for w in caught if "deprecated" not in str(w.message))
    log_lines.append(f"traced and saved in {seconds:.3f}s")
    return seconds
