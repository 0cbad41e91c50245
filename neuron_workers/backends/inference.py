"""Inference steps both backends share, and the host-CPU inference job.

Shared steps: the generation settings from the spec, decoding a list of prompts
through an HF model (KV cache) or through a compiled fixed-shape artifact, with
one record per prompt. `infer_on_cpu` is the whole cpu inference job; the cpu
backend runs it for every inference job and the neuron backend for models that
are not Neuron-compiled.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import hf
from .artifacts import load_compiled
from .base import JobContext, JobFailed, input_path, require_model_format, spec_float, spec_int
from .data import read_prompts
from .loops import fit_prompt, generate_fixed_shape, generate_hf, inference_result


def generation_settings(ctx: JobContext) -> dict:
    """max_new_tokens, temperature (0: greedy) and seed, checked."""
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
        report_request(ctx, records[-1])
        ctx.log(f"prompt {index}: {len(ids)} tokens in, {len(new)} out, {records[-1]['latency_ms']:.1f} ms")
    return inference_result(ctx, records, time.perf_counter() - started)


def run_fixed_shape_inference(ctx: JobContext, module: Any, meta: dict, tokenizer: Any, prompts: list[str],
                              settings: dict) -> dict:
    """Decode prompts through a compiled (batch, seq) artifact in groups of its batch size."""
    seq = meta["sequence_length"]
    ids = [hf.encode_prompt(tokenizer, p) for p in prompts]
    check_fits_shape(ids, seq, settings["max_new_tokens"])
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
    for record in records:
        report_request(ctx, record)
    ctx.log(f"decoded {len(records)} prompts through the compiled ({meta['batch_size']}, {seq}) artifact "
            f"in {wall * 1000:.1f} ms")
    return inference_result(ctx, records, wall)


def check_fits_shape(ids: list[list[int]], sequence_length: int, max_new_tokens: int) -> None:
    """Static shapes, as on Neuron: prompt + new tokens must fit the compiled sequence
    length (optimum-neuron export_model.mdx). Refused, never silently truncated."""
    for index, prompt_ids in enumerate(ids, 1):
        if len(prompt_ids) + max_new_tokens > sequence_length:
            raise JobFailed("bad_input", f"prompt {index} is {len(prompt_ids)} tokens; with max_new_tokens "
                                         f"{max_new_tokens} it does not fit the compiled sequence_length "
                                         f"{sequence_length}")


def report_request(ctx: JobContext, record: dict) -> None:
    """One finished request into the job's metrics (request_ms, no step): a CPU host's
    agent publishes them as the job's latency and completions, which a Neuron host
    reads from neuron-monitor instead."""
    if ctx.metric is not None:
        ctx.metric({"request_ms": record["latency_ms"]})


def _record(index: int, prompt: str, output: str, new: list[int], latency_ms: float) -> dict:
    return {"index": index, "prompt": prompt, "output": output, "new_tokens": len(new),
            "latency_ms": round(latency_ms, 3)}


# ---------------------------------------------------------------- the host-CPU inference job


def infer_on_cpu(ctx: JobContext) -> dict:
    """Generate for every prompt from an HF folder or a cpu-traced artifact; writes artifacts/outputs.jsonl."""
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
        # TorchScript's profiling executor spends its first two calls optimising
        # the graph, which costs more than a short job's whole decode; the plain
        # interpreter is as fast afterwards, so we skip the optimisation.
        with torch.jit.optimized_execution(False):
            return run_fixed_shape_inference(ctx, module, meta, tokenizer, prompts, settings)
