"""Fine-tuning on NeuronCores, one rank per process; also the torchrun entry point.

    torchrun --standalone --nproc_per_node=N -m neuron_workers.backends.neuron_train --job-dir DIR

DIR holds train_job.json ({"job_id", "spec", "inputs"}) written by
neuron_launch.run_torchrun. Rank 0 prints metrics as "@@neurondeck-metric {json}"
lines (relayed by the launcher to ctx.metric), saves the checkpoint and writes
train_result.json, or train_error.json ({"code", "message"}) on a JobFailed; the
protocol's names live in neuron_launch. A one-core fine-tune runs train_rank in
the job's own process.

NOT RUN ON HARDWARE: the device paths follow neuron.md §4.6 (torch-xla, legacy
up to Neuron 2.31) and the 2.32 TorchNeuron native device, whose distributed
details are UNCONFIRMED; the loop itself is the same one the cpu backend runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from . import hf
from .base import JobContext, JobFailed, write_json
from .detect import native_neuron_device_available
from .finetuning import finetune_plan, prepare_training, save_checkpoint
from .loops import TrainHooks, train_steps
from .neuron_errors import map_neuron_error
from .neuron_launch import ERROR_FILE, JOB_FILE, METRIC_PREFIX, RESULT_FILE


def training_mode() -> str:
    """"native" (torch.device("neuron"), SDK >= 2.32) if present, else "xla", else unavailable.

    Native first: Neuron 2.32 ended support for the XLA training flow
    (neuron.md, big-picture caveat), so an SDK that has both should use native.
    """
    if native_neuron_device_available():
        return "native"
    try:
        importlib.import_module("torch_xla.core.xla_model")
        return "xla"
    except Exception as exc:
        raise JobFailed("unavailable", f"neither torch.device('neuron') nor torch-xla is usable here: {exc}") from exc


def make_hooks(mode: str, rank: int) -> TrainHooks:
    """Device and step hooks for a training mode (see loops.TrainHooks)."""
    if mode == "xla":
        xm = importlib.import_module("torch_xla.core.xla_model")
        # xm.optimizer_step all-reduces gradients across ranks, then steps;
        # xm.mark_step ends the lazy graph for this step (neuron.md §4.6).
        return TrainHooks(device=xm.xla_device(), optimizer_step=xm.optimizer_step, end_step=xm.mark_step,
                          is_main=rank == 0)
    return TrainHooks(device=torch.device("neuron"), is_main=rank == 0)


def init_distributed(mode: str) -> None:
    """Join the torchrun process group for data-parallel training.

    xla: the 'xla' backend after importing torch_xla.distributed.xla_backend
    (neuron.md §4.6). native: torch's default backend for the registered device;
    UNCONFIRMED which collective backend TorchNeuron registers.
    """
    import torch.distributed as dist

    if mode == "xla":
        importlib.import_module("torch_xla.distributed.xla_backend")
        dist.init_process_group("xla")
    else:
        dist.init_process_group()


def wrap_for_data_parallel(mode: str, model: Any, hooks: TrainHooks, world_size: int) -> Any:
    """Native multi-rank runs use DDP; under xla, xm.optimizer_step does the all-reduce."""
    if mode != "native" or world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model.to(hooks.device))


def train_rank(ctx: JobContext, plan: dict, *, rank: int, world_size: int) -> dict:
    """Train this rank's share; rank 0 saves the checkpoint. Returns the finetune result.

    Each rank draws its own batches (seed + rank), so N ranks see N different
    batches per step. Reported losses are rank 0's; tokens_per_s counts all ranks.
    """
    mode = training_mode()
    if world_size > 1:
        init_distributed(mode)
    hooks = make_hooks(mode, rank)
    ctx.log(f"training on {mode} device {hooks.device} (rank {rank}/{world_size})")
    model = hf.load_causal_lm(plan["model_path"])
    tokenizer = hf.load_tokenizer(plan["model_path"])
    blocks, total_steps = prepare_training(ctx, model, tokenizer, plan)
    torch.manual_seed(plan["seed"])
    trained = wrap_for_data_parallel(mode, model, hooks, world_size)
    try:
        stats = train_steps(ctx, trained, blocks, total_steps=total_steps, batch_size=plan["batch_size"],
                            learning_rate=plan["learning_rate"], seed=plan["seed"] + rank, hooks=hooks)
    except (RuntimeError, MemoryError) as exc:
        raise map_neuron_error(exc, "training") from exc
    stats.tokens *= world_size
    if rank == 0:
        save_checkpoint(ctx, model, tokenizer)
    return {**stats.result(), "checkpoint": "checkpoint", "backend": "neuron", "training_mode": mode,
            "world_size": world_size}


def _print_metric(metric: dict) -> None:
    print(METRIC_PREFIX + json.dumps(metric, separators=(",", ":")), flush=True)


def _print_log(line: str) -> None:
    print(line, flush=True)


def _quiet(_: Any) -> None:
    return None


def main(argv: list[str] | None = None) -> int:
    """torchrun entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    # Set by torchrun for every rank; absent when run by hand as a single rank.
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    job = json.loads((args.job_dir / JOB_FILE).read_text(encoding="utf-8"))
    main_rank = rank == 0
    ctx = JobContext(job_id=job["job_id"], kind="finetune", spec=job["spec"], workdir=args.job_dir,
                     inputs=job["inputs"], log=_print_log if main_rank else _quiet,
                     metric=_print_metric if main_rank else _quiet)
    try:
        result = train_rank(ctx, finetune_plan(ctx), rank=rank, world_size=world_size)
    except JobFailed as exc:
        if main_rank:
            write_json(args.job_dir / ERROR_FILE, exc.to_dict())
        print(f"rank {rank}: {exc.code}: {exc.message}", file=sys.stderr, flush=True)
        return 1
    if main_rank:
        write_json(args.job_dir / RESULT_FILE, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
