"""Device-agnostic loops: the training step loop, the two decode loops, latency timing.

The cpu and neuron backends differ only in the hooks they pass in (device,
optimizer step, end-of-step barrier), so the loss curve, metrics, cancellation and
result shapes are identical on both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import JobContext, downsample, percentile
from .data import batch_indices

MAX_LOSS_POINTS = 2000


@dataclass
class TrainHooks:
    """How one training step touches the device.

    `optimizer_step` is `optimizer.step` on CPU / native Neuron and
    `xm.optimizer_step` under torch-xla (which also all-reduces gradients across
    data-parallel ranks, neuron.md §4.6). `end_step` is `xm.mark_step` under
    torch-xla: it cuts the lazy graph so each step compiles once and is reused.
    """

    device: Any = "cpu"
    optimizer_step: Callable[[torch.optim.Optimizer], None] = lambda opt: opt.step()
    end_step: Callable[[], None] = lambda: None
    is_main: bool = True  # only rank 0 emits metrics and log lines


@dataclass
class TrainStats:
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens: int = 0

    def result(self) -> dict:
        """The loss part of a finetune result (losses capped at MAX_LOSS_POINTS)."""
        return {
            "steps": len(self.losses),
            "first_loss": self.losses[0],
            "final_loss": self.losses[-1],
            "losses": downsample(self.losses, MAX_LOSS_POINTS),
            "train_seconds": round(self.train_seconds, 4),
            "tokens_per_s": round(self.tokens / self.train_seconds, 2) if self.train_seconds > 0 else 0.0,
        }


def train_steps(
    ctx: JobContext,
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    total_steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    hooks: TrainHooks,
) -> TrainStats:
    """Run `total_steps` AdamW steps of causal-LM loss on `blocks`; poll should_stop between steps.

    Raises JobFailed("cancelled") if asked to stop. Loss is read back every step
    because the contract reports a per-step curve; under torch-xla this `.item()`
    comes after mark_step, so it waits for the step's result but adds no graph.
    """
    model.train()
    model.to(hooks.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    batches = batch_indices(len(blocks), batch_size, seed)
    stats = TrainStats()
    log_every = max(1, total_steps // 20)
    started = time.perf_counter()
    for step in range(1, total_steps + 1):
        ctx.check_stop(f"before training step {step} of {total_steps}")
        batch = blocks[next(batches)].to(hooks.device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        hooks.optimizer_step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        hooks.end_step()
        value = float(loss.detach().to("cpu"))
        stats.losses.append(value)
        stats.tokens += batch.numel()
        if hooks.is_main:
            ctx.metric({"step": step, "loss": value, "total_steps": total_steps})
            if step == 1 or step % log_every == 0 or step == total_steps:
                ctx.log(f"step {step}/{total_steps} loss {value:.4f}")
    stats.train_seconds = time.perf_counter() - started
    return stats


# ---------------------------------------------------------------- decoding


def pick_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy when temperature == 0, else sample softmax(logits / T) with `generator`."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_hf(
    model: Any,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None,
    eos_id: int,
) -> list[int]:
    """Decode with an HF causal LM using its KV cache; returns new token ids (eos excluded).

    A hand-written loop rather than `model.generate`: it takes a seeded
    torch.Generator for reproducible sampling, and for tiny models it avoids
    generate()'s per-call setup, which costs more than the forward passes.
    The caller has already cut the prompt so prompt + new tokens fit the model.
    """
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    past = None
    new: list[int] = []
    for _ in range(max_new_tokens):
        out = model(input_ids=input_ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = pick_token(out.logits[0, -1], temperature, generator)
        if token == eos_id:
            break
        new.append(token)
        input_ids = torch.tensor([[token]], dtype=torch.long)
    return new


@torch.inference_mode()
def generate_fixed_shape(
    module: Any,
    prompts: list[list[int]],
    *,
    batch_size: int,
    sequence_length: int,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None,
) -> list[tuple[list[int], float]]:
    """Decode with a traced module whose input is fixed at (batch_size, sequence_length).

    Up to batch_size prompts share each forward pass; each row is right-padded and
    we read logits at its last real position (valid because the traced model is
    causal, see hf.LogitsOnly). No KV cache: each new token costs a full forward,
    the price of a static-shape artifact. Prompts must be 1..sequence_length-1
    tokens. Returns (new ids, latency ms) per prompt, latency measured from the
    start of its group.
    """
    results: list[tuple[list[int], float]] = []
    for start in range(0, len(prompts), batch_size):
        results.extend(
            _decode_group(module, prompts[start : start + batch_size], batch_size, sequence_length, pad_id, eos_id,
                          max_new_tokens, temperature, generator)
        )
    return results


def _decode_group(module, group, batch_size, sequence_length, pad_id, eos_id, max_new_tokens, temperature, generator):
    started = time.perf_counter()
    buffer = torch.full((batch_size, sequence_length), pad_id, dtype=torch.long)
    lengths = [len(ids) for ids in group]
    for row, ids in enumerate(group):
        buffer[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    new: list[list[int]] = [[] for _ in group]
    latency: list[float | None] = [None] * len(group)
    active = set(range(len(group))) if max_new_tokens > 0 else set()
    for row in set(range(len(group))) - active:
        latency[row] = 0.0
    while active:
        logits = module(buffer)
        for row in sorted(active):
            token = pick_token(logits[row, lengths[row] - 1], temperature, generator)
            if token != eos_id:
                buffer[row, lengths[row]] = token
                lengths[row] += 1
                new[row].append(token)
            if token == eos_id or len(new[row]) >= max_new_tokens or lengths[row] >= sequence_length:
                active.discard(row)
                latency[row] = (time.perf_counter() - started) * 1000
    return [(new[row], latency[row]) for row in range(len(group))]


def fit_prompt(ids: list[int], limit: int, max_new_tokens: int) -> list[int]:
    """Keep the last tokens of a prompt so at least one new token (ideally all) fits in `limit`."""
    keep = max(1, limit - max_new_tokens)
    return ids[-keep:] if len(ids) > keep else ids


# ---------------------------------------------------------------- timing and results


@torch.inference_mode()
def time_forward(module: Any, example: torch.Tensor, runs: int, warmup: int = 2) -> list[float]:
    """Wall-clock milliseconds of `runs` forward passes after `warmup` untimed ones."""
    for _ in range(warmup):
        module(example)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        module(example)
        times.append((time.perf_counter() - started) * 1000)
    return times


def inference_result(ctx: JobContext, records: list[dict], wall_seconds: float) -> dict:
    """Write artifacts/outputs.jsonl and return the inference result dict.

    `records` are {"index", "prompt", "output", "new_tokens", "latency_ms"} in
    prompt order. Throughput uses the job's whole decode wall time, so
    requests_per_s reflects batching on fixed-shape artifacts.
    """
    path = ctx.artifacts_dir / "outputs.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    latencies = [r["latency_ms"] for r in records]
    tokens = sum(r["new_tokens"] for r in records)
    wall = max(wall_seconds, 1e-9)
    return {
        "requests": len(records),
        "latency_ms_p50": round(percentile(latencies, 50), 3),
        "latency_ms_p90": round(percentile(latencies, 90), 3),
        "latency_ms_p99": round(percentile(latencies, 99), 3),
        "tokens_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(records) / wall, 2),
        "new_tokens": tokens,
        "outputs": "outputs.jsonl",
    }
