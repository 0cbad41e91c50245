"""Tensor parallelism / ZeRO-1: one rank of Optimum Neuron's NeuronTrainer, stopped and resumed by NeuronDeck.

The trainer is built as the Optimum Neuron docs show (neuron.md §4.7):
`NeuronTrainingArguments(**neuron_parallel.trainer_arguments(...))`, the model from
`optimum.neuron.models.training.NeuronModelForCausalLM.from_pretrained(path,
args.trn_config)`, and NeuronDeck's part is one transformers `TrainerCallback`
(`NeuronDeckCallback`), which both generations of NeuronTrainer call:

- **Stop.** After every optimizer step the ranks agree (an all-reduce of the stop
  flag, so all stop after the same step: a save is collective) whether any was asked
  to stop (SIGTERM: preemption, time limit, Suspend, cancel); if so the callback sets
  `control.should_save` and `control.should_training_stop`, the trainer saves that
  step and returns, and the attempt ends "cancelled" with its checkpoint saved.
- **Checkpoints.** The trainer writes into a staging folder; `on_save` (after every
  rank finished) the world's rank 0 makes it step-<N> in the job's checkpoint folder,
  complete or ignored (trainer_checkpoints), prunes, and reports the checkpoint.
- **Resume**, restored by the callback itself on every release: what optimum-neuron
  offers does not work for these jobs (read in huggingface/optimum-neuron):
  * from 0.4.0 (0.4.0 ... 0.4.5 and main, 0.4.6.dev4) NeuronTrainer is a loop of its
    own whose `train()` raises ValueError("`resume_from_checkpoint` is not supported by
    the NeuronTrainer.") for any folder (optimum/neuron/trainers/transformers.py,
    `_train`); `NeuronTrainingArguments.resume_from_checkpoint` only lands in
    `trn_config.checkpoint_dir`, which nothing loads;
  * up to 0.3.x NeuronTrainer is a transformers `Trainer` and takes
    `train(resume_from_checkpoint=...)`, but with tensor parallelism it loads neither
    the model's shards (`_load_from_checkpoint` returns: "handled during model
    parallelization", which nothing does) nor its optimizer (it reads optimizer.pt,
    which is not written then: the optimizer is in the shards).
  Both releases' checkpoints hold what a resume needs: the model (with tensor
  parallelism also the optimizer) written by `neuronx_distributed.trainer.
  save_checkpoint(folder, tag="shards", ...)`, else optimizer.pt, and scheduler.pt and
  trainer_state.json. The callback loads them in `on_train_begin`, where both pass
  the model, the optimizer and the scheduler just built (0.3 loaded its optimizer
  at the same point): `neuronx_distributed.trainer.load_checkpoint(folder,
  tag="shards", model=..., optimizer=...)`, `lr_scheduler.load_state_dict`,
  `state.global_step`. The data position: the trainer reads the rows in NeuronDeck's
  order (`in_order`: a sequential sampler over data.BatchSampler's global batches,
  which Accelerate splits over the data-parallel ranks) and is handed the rows from
  the resumed step on, so step S trains on the same rows in every attempt.
- **RNG.** 0.4 saves no RNG state (0.3 did, as transformers' Trainer), so the callback
  saves and restores it as `Trainer._save_rng_state` / `_load_rng_state` do: every
  rank writes rng_state_<rank>.pth (rng_state.pth for one process) into the
  checkpoint before it is adopted (Python, numpy, torch CPU, and the XLA device's
  running seed through `xm.get_rng_state`), and restores its own file right before
  the first step it trains (where transformers' `rng_to_sync` loads it: after the
  epoch's iterator drew its seed). It saves in `on_save`, which 0.4 runs as a step
  closure after the step's last `xm.mark_step`: the device seed moves on at each
  mark_step, and the next step draws from the one after it. (0.4 marks one step more
  when it saves, so a run's device draws after step S depend on whether it saved at
  S; a resumed run draws what the attempt it resumes would have drawn next.) The run
  starts from the job's seed (transformers' Trainer calls set_seed; 0.4 does not), so
  a resumed run draws the same dropout masks as an uninterrupted one.

NOT RUN ON HARDWARE: tested against stand-ins that drive the callback as the real
trainers do (tests/test_train_neuron_seams.py).
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from . import hf
from .base import JobContext, JobFailed
from .checkpoints import rng_state, seed_rng, set_rng_state
from .data import BatchSampler
from .distributed import reduce_step, xla_barrier
from .finetuning import prepare_training
from .neuron_errors import CONSOLE_LOG, console_tail, map_neuron_error
from .neuron_parallel import ParallelOptionError, trainer_arguments
from .trainer_checkpoints import TrainerCheckpoints

SHARDS_TAG = "shards"  # optimum's MODEL_PARALLEL_SHARDS_DIR_NAME: the tag it saves under


def rng_file(folder: Path, rank: int, world_size: int) -> Path:
    """A rank's RNG state in a checkpoint, named as transformers' Trainer names it."""
    return folder / ("rng_state.pth" if world_size <= 1 else f"rng_state_{rank}.pth")


def xla_any_rank(flag: bool) -> bool:
    """Whether `flag` is up on any rank: distributed.reduce_step's rule, on the XLA device
    through the "xla" process group optimum-neuron joins under torchrun. Not
    xm.mesh_reduce: its CPU rendezvous fails under torch-neuronx (Neuron's
    troubleshooting guide replaces it with an all_gather for that reason)."""
    xm = importlib.import_module("torch_xla.core.xla_model")
    return reduce_step(0.0, flag, device=xm.xla_device())[1]


class NeuronDeckCallback(TrainerCallback):
    """Stop-and-save on request, complete-or-ignored checkpoints, and the resume.

    `agree(flag)` says whether any rank's flag is up (xla_any_rank; the identity for
    one process); `barrier()` waits for every rank (distributed.xla_barrier). `restore_from` is
    the checkpoint folder this callback loads in on_train_begin, and whose RNG state
    it loads before the first step (None: training starts from the model as loaded).
    `rank` / `world_size`: this process's place in the world, which names its RNG file."""

    def __init__(self, ctx: JobContext, store: TrainerCheckpoints, total_steps: int, *,
                 agree: Callable[[bool], bool], barrier: Callable[[], None] = lambda: None,
                 rank: int = 0, world_size: int = 1, restore_from: Path | None = None) -> None:
        self.ctx, self.store, self.total_steps, self.agree = ctx, store, total_steps, agree
        self.barrier, self.rank, self.world_size = barrier, rank, world_size
        self.restore_from = restore_from
        self.rng_from = restore_from  # cleared once the RNG state is loaded
        self.stopped_at: int | None = None
        self.losses: list[float] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.restore_from is not None:
            state.global_step = restore(self.restore_from, args, model, optimizer, lr_scheduler)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.rng_from is not None:
            path = rng_file(self.rng_from, self.rank, self.world_size)
            if path.is_file():
                # Our own file, in a checkpoint whose marker was checked (python and numpy
                # states are not tensors, which weights_only refuses).
                set_rng_state(torch.load(path, map_location="cpu", weights_only=False))
            else:
                self.ctx.log(f"{self.rng_from.name} has no RNG state for rank {self.rank}: "
                             f"random draws (dropout) differ from an uninterrupted run")
            self.rng_from = None
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            # No checkpoint of the last step (transformers' DefaultFlowCallback asks for
            # one): the model is saved next, and an attempt that dies before recording
            # it resumes from the checkpoint before, rather than from one with no step left.
            control.should_save = False
        elif self.agree(self.ctx.should_stop()):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def on_save(self, args, state, control, **kwargs):
        # Every rank's RNG state goes into the staged checkpoint before rank 0 adopts it.
        staged = self.store.staging / f"checkpoint-{state.global_step}"
        staged.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), rng_file(staged, self.rank, self.world_size))
        self.barrier()
        if state.is_world_process_zero:
            started = time.perf_counter()
            folder = self.store.adopt(state.global_step)
            self.store.prune()
            seconds = time.perf_counter() - started
            self.ctx.metric({"event": "checkpoint", "step": state.global_step, "seconds": round(seconds, 4),
                             "message": f"checkpoint at step {state.global_step} ({folder.name})"})
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            self.ctx.metric({"step": state.global_step, "loss": float(logs["loss"]), "total_steps": self.total_steps})
        return control


def restore(folder: Path, args: Any, model: Any, optimizer: Any, lr_scheduler: Any) -> int:
    """Load a NeuronTrainer checkpoint into the trainer's model, optimizer and
    scheduler; returns its step. The files are the ones its _save_checkpoint writes."""
    nxd = importlib.import_module("neuronx_distributed.trainer")
    model_parallel = bool(args.trn_config.model_parallelism_enabled)
    # With model parallelism save_pretrained(optimizer=...) put the optimizer's shards
    # beside the model's; otherwise it went to optimizer.pt.
    nxd.load_checkpoint(str(folder), tag=SHARDS_TAG, model=model, optimizer=optimizer if model_parallel else None)
    if not model_parallel:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu"))
    lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu"))
    return int(json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])


def in_order(trainer_cls: type) -> type:
    """`trainer_cls` reading its dataset in order (both generations shuffle with a
    RandomSampler from `_get_train_sampler`; the order here is NeuronDeck's own)."""

    class InOrder(trainer_cls):  # type: ignore[misc, valid-type]
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> torch.utils.data.Sampler:
            return torch.utils.data.SequentialSampler(self.train_dataset)

    return InOrder


def ordered_rows(blocks: torch.Tensor, total_steps: int, batch_size: int, seed: int, start: int = 0) -> list[dict]:
    """The training rows of steps start+1 ... total_steps, one global batch after another
    (data.BatchSampler: the order the own loop reads)."""
    sampler = BatchSampler(len(blocks), batch_size, seed)
    batches = [sampler.next_batch() for _ in range(total_steps)][start:]
    return [{"input_ids": blocks[i], "labels": blocks[i]} for batch in batches for i in batch.tolist()]


def optimum_train_rank(ctx: JobContext, plan: dict, *, world_size: int,
                       agree: Callable[[bool], bool] = xla_any_rank,
                       barrier: Callable[[], None] = xla_barrier, trial: int | None = None) -> dict:
    """Train this rank under NeuronTrainer; rank 0 saves the final model into
    artifacts/checkpoint. A stop request ends it with JobFailed("cancelled") once the
    step it reached is saved. `agree` and `barrier` are the ranks' collectives (see
    NeuronDeckCallback). `trial`: the precompile stage's few steps (no checkpoints)."""
    try:
        optimum = importlib.import_module("optimum.neuron")
        training_models = importlib.import_module("optimum.neuron.models.training")
    except Exception as exc:
        raise JobFailed("unavailable", f"optimum-neuron is not usable on this host: {exc}") from exc
    store = TrainerCheckpoints(ctx.inputs.get("checkpoint_dir") or ctx.workdir / "checkpoints",
                               keep=plan["keep_checkpoints"], log=ctx.log)
    try:
        kwargs = trainer_arguments(plan, output_dir=str(store.staging), world_size=world_size,
                                   tensor_parallel_size=int(ctx.spec.get("tensor_parallel_size") or 1),
                                   zero_1=bool(ctx.spec.get("zero_1")))
    except ParallelOptionError as exc:
        raise JobFailed("bad_input", str(exc)) from exc
    if trial is not None:
        kwargs.update(max_steps=trial, save_strategy="no")
    tokenizer = hf.load_tokenizer(plan["model_path"])
    resumed = None if trial is not None else store.latest()
    rank = int(os.environ.get("RANK") or 0)
    main = rank == 0
    if main and trial is None:
        store.clear_staging()  # what a stopped attempt left half-written
    args = optimum.NeuronTrainingArguments(**kwargs)
    model = training_models.NeuronModelForCausalLM.from_pretrained(str(plan["model_path"]), args.trn_config,
                                                                  dtype=torch.bfloat16)
    blocks, total_steps = prepare_training(ctx, model, tokenizer, plan)
    total_steps = trial or total_steps
    args.max_steps = total_steps  # known once the dataset is packed (a plan may give epochs)
    callback = NeuronDeckCallback(ctx, store, total_steps, agree=agree, barrier=barrier, rank=rank,
                                  world_size=world_size, restore_from=resumed and resumed[1])
    rows = ordered_rows(blocks, total_steps, plan["batch_size"], plan["seed"], start=resumed[0] if resumed else 0)
    seed_rng(plan["seed"])  # a resumed attempt then loads the checkpoint's state before its first step
    trainer = in_order(optimum.NeuronTrainer)(model=model, args=args, train_dataset=rows, callbacks=[callback])
    if resumed and main:
        ctx.log(f"resuming NeuronTrainer from step {resumed[0]} ({resumed[1].name})")
        ctx.metric({"event": "resumed", "step": resumed[0],
                    "message": f"resumed from step {resumed[0]} of {total_steps}"})
    try:
        outcome = trainer.train()
    except (RuntimeError, MemoryError) as exc:
        raise map_neuron_error(exc, "training", console_tail(ctx.workdir / CONSOLE_LOG)) from exc
    if callback.stopped_at is not None:
        raise JobFailed("cancelled", f"job {ctx.job_id} was stopped after step {callback.stopped_at} of "
                                     f"{total_steps}; checkpoint saved at step {callback.stopped_at}")
    if trial is None:
        trainer.save_model(str(ctx.artifacts_dir / "checkpoint"))
        tokenizer.save_pretrained(str(ctx.artifacts_dir / "checkpoint"))
    losses = callback.losses or [float(getattr(outcome, "training_loss", float("nan")))]
    return {"steps": int(getattr(outcome, "global_step", total_steps)), "final_loss": losses[-1],
            "first_loss": losses[0], "losses": losses, "checkpoint": "checkpoint", "backend": "neuron",
            "training_mode": "neuron-trainer", "world_size": world_size,
            "tensor_parallel_size": kwargs["tensor_parallel_size"], "zero_1": kwargs["zero_1"],
            "resumed_from_step": resumed[0] if resumed else 0}
