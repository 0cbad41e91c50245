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

from .base import JobContext, JobFailed, downsample, percentile
from .checkpoints import CheckpointStore, rng_state, set_rng_state
from .data import BatchSampler, shard

MAX_LOSS_POINTS = 2000
THROUGHPUT_EVERY = 10  # steps between throughput metrics


def _single_process_step(loss: float, stop: bool) -> tuple[float, bool]:
    return loss, stop


@dataclass
class TrainHooks:
    """How one training step touches the device and the other ranks.

    `optimizer_step` is `optimizer.step` on CPU / native Neuron and
    `xm.optimizer_step` under torch-xla (which also all-reduces gradients across
    data-parallel ranks, neuron.md §4.6). `end_step` is `xm.mark_step` under
    torch-xla: it cuts the lazy graph so each step compiles once and is reused.
    `reduce_step(loss, stop)` turns a rank's loss and stop request into the job's
    (distributed.reduce_step under DDP); `gather(obj)` returns every rank's `obj` in
    rank order (distributed.gather_objects); `barrier` waits for every rank. With
    `shard_batches` each rank trains on its share of one global batch (data.shard).
    """

    device: Any = "cpu"
    optimizer_step: Callable[[torch.optim.Optimizer], None] = lambda opt: opt.step()
    end_step: Callable[[], None] = lambda: None
    is_main: bool = True  # only rank 0 emits metrics and log lines, and writes checkpoints
    rank: int = 0
    world_size: int = 1
    shard_batches: bool = False
    reduce_step: Callable[[float, bool], tuple[float, bool]] = _single_process_step
    gather: Callable[[Any], list[Any]] = lambda obj: [obj]
    barrier: Callable[[], None] = lambda: None


@dataclass
class Checkpointing:
    """Where and how often the loop checkpoints (see checkpoints.CheckpointStore)."""

    store: CheckpointStore
    every: int


@dataclass
class TrainStats:
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens: int = 0
    resumed_from: int = 0  # the step this attempt started after (0: from scratch)
    checkpoints: int = 0  # written by this attempt

    def result(self) -> dict:
        """The loss part of a finetune result (losses capped at MAX_LOSS_POINTS)."""
        return {
            "steps": len(self.losses),
            "first_loss": self.losses[0],
            "final_loss": self.losses[-1],
            "losses": downsample(self.losses, MAX_LOSS_POINTS),
            "train_seconds": round(self.train_seconds, 4),
            "tokens_per_s": round(self.tokens / self.train_seconds, 2) if self.train_seconds > 0 else 0.0,
            "resumed_from_step": self.resumed_from,
        }


def lr_lambda(schedule: str, total_steps: int) -> Callable[[int], float]:
    """The LR multiplier per completed step: "constant", or "linear" decay to 0 at total_steps."""
    if schedule == "linear":
        return lambda done: max(0.0, 1.0 - done / total_steps)
    return lambda done: 1.0


def _cpu(value: Any) -> Any:
    """`value` with every tensor copied to the host CPU (a checkpoint must not hold device tensors)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


class _Run:
    """One attempt's training state and the checkpoint it can be saved to or resumed from."""

    def __init__(self, ctx: JobContext, model: torch.nn.Module, blocks: torch.Tensor, total_steps: int,
                 batch_size: int, learning_rate: float, seed: int, hooks: TrainHooks, lr_schedule: str,
                 checkpointing: Checkpointing | None) -> None:
        self.ctx, self.model, self.blocks, self.hooks = ctx, model, blocks, hooks
        self.total_steps, self.checkpointing = total_steps, checkpointing
        self.plain = getattr(model, "module", model)  # under DDP, the wrapped model holds the weights
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(lr_schedule, total_steps))
        self.sampler = BatchSampler(len(blocks), batch_size, seed)
        self.stats = TrainStats()
        self.step = 0
        self.saved_step = 0

    def resume(self) -> None:
        """Continue from the newest complete checkpoint, if there is one."""
        if self.checkpointing is None:
            return
        loaded = self.checkpointing.store.latest()
        if loaded is None:
            return
        state = loaded.state
        try:
            self.sampler.load_state_dict(state["data"])
        except ValueError as exc:
            raise JobFailed("bad_input", f"cannot resume from checkpoint {loaded.path.name}: {exc}") from exc
        self.plain.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.restore_rng(state["rng"], loaded.path.name)
        self.stats.losses = list(state["losses"])
        self.step = self.saved_step = self.stats.resumed_from = loaded.step
        if self.hooks.is_main:
            self.ctx.log(f"resumed from step {loaded.step} (checkpoint {loaded.path.name})")
            self.ctx.metric({"event": "resumed", "step": loaded.step,
                             "message": f"resumed from step {loaded.step} of {self.total_steps}"})

    def restore_rng(self, saved: list[dict] | dict, name: str) -> None:
        """Continue this rank's random draws (dropout) from where it saved them: `saved`
        holds every rank's RNG states in rank order. A checkpoint written before ranks
        saved their own holds rank 0's alone, which every rank takes."""
        if isinstance(saved, dict):
            set_rng_state(saved)
        elif self.hooks.rank < len(saved):
            set_rng_state(saved[self.hooks.rank])
        else:  # the checkpoint was written by fewer ranks than this attempt has
            self.ctx.log(f"{name} has no RNG state for rank {self.hooks.rank}: "
                         f"random draws (dropout) differ from an uninterrupted run")

    def save(self) -> None:
        """Every rank hands rank 0 its RNG states; rank 0 writes the checkpoint of the
        current step and prunes old ones."""
        if self.checkpointing is None or self.step == self.saved_step:
            return
        rng = self.hooks.gather(rng_state())  # a collective: every rank saves at the same steps
        self.saved_step = self.step
        if not self.hooks.is_main:
            return
        started = time.perf_counter()
        state = {"step": self.step, "model": _cpu(self.plain.state_dict()),
                 "optimizer": _cpu(self.optimizer.state_dict()), "scheduler": self.scheduler.state_dict(),
                 "rng": rng, "data": self.sampler.state_dict(), "losses": list(self.stats.losses)}
        store = self.checkpointing.store
        folder = store.save(self.step, state)
        store.prune()
        seconds = time.perf_counter() - started
        self.stats.checkpoints += 1
        self.ctx.metric({"event": "checkpoint", "step": self.step, "seconds": round(seconds, 4),
                         "message": f"checkpoint at step {self.step} ({folder.name}, {seconds:.2f} s)"})

    def one_step(self) -> float:
        hooks = self.hooks
        batch = self.sampler.next_batch()
        if hooks.shard_batches:
            batch = shard(batch, hooks.rank, hooks.world_size)
        batch = self.blocks[batch].to(hooks.device)
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        hooks.optimizer_step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        hooks.end_step()
        self.stats.tokens += batch.numel()
        self.step += 1
        return float(loss.detach().to("cpu"))


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
    checkpointing: Checkpointing | None = None,
    lr_schedule: str = "constant",
) -> TrainStats:
    """Run AdamW steps of causal-LM loss on `blocks` up to `total_steps`; poll should_stop between steps.

    With `checkpointing`, the run first resumes from the newest complete checkpoint
    (model, optimizer, LR scheduler, each rank's RNG states, data position, loss history), saves
    one every `every` steps, and, asked to stop, saves the step it reached before
    raising JobFailed("cancelled"), so the next attempt loses nothing. `batch_size`
    is the global batch: with hooks.shard_batches each of world_size ranks trains on
    its share. Loss is read back every step because the contract reports a per-step
    curve; under torch-xla this `.item()` comes after mark_step, so it waits for the
    step's result but adds no graph.
    """
    model.train()
    model.to(hooks.device)
    run = _Run(ctx, model, blocks, total_steps, batch_size, learning_rate, seed, hooks, lr_schedule, checkpointing)
    run.resume()
    stats = run.stats
    log_every = max(1, total_steps // 20)
    every = checkpointing.every if checkpointing is not None else 0
    per_rank = batch_size // hooks.world_size if hooks.shard_batches else batch_size
    started = time.perf_counter()
    window = (started, run.step)
    if hooks.world_size == 1:
        ctx.check_stop(f"before training step {run.step + 1} of {total_steps}")
    while run.step < total_steps:
        value, stop = hooks.reduce_step(run.one_step(), ctx.should_stop())
        step = run.step
        stats.losses.append(value)
        if hooks.is_main:
            ctx.metric({"step": step, "loss": value, "total_steps": total_steps})
            if step == 1 or step % log_every == 0 or step == total_steps:
                ctx.log(f"step {step}/{total_steps} loss {value:.4f}")
        if step % THROUGHPUT_EVERY == 0 or step == total_steps:
            now = time.perf_counter()
            rate = per_rank * (step - window[1]) / max(now - window[0], 1e-9)
            ctx.metric({"step": step, f"samples_per_s.r{hooks.rank}": round(rate, 3)})
            window = (now, step)
        if stop and step < total_steps:
            run.save()
            hooks.barrier()  # no rank leaves while rank 0 still writes
            raise JobFailed("cancelled", f"job {ctx.job_id} was stopped after step {step} of {total_steps}"
                                         + (f"; checkpoint saved at step {step}" if checkpointing else ""))
        if every and step % every == 0 and step < total_steps:
            run.save()
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
