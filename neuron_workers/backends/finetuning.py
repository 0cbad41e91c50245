"""Fine-tune steps both backends share: the checked plan, the dataset packed into blocks, the checkpoint.

The step loop itself is loops.train_steps; what differs between the backends
(device, optimizer step, ranks) is passed to it as TrainHooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import hf
from .base import JobContext, JobFailed, input_path, require_model_format, spec_float, spec_int
from .checkpoints import CheckpointStore
from .data import pack_blocks, read_texts, steps_per_epoch
from .loops import Checkpointing
from .training_options import DEFAULT_CHECKPOINT_EVERY, DEFAULT_KEEP_CHECKPOINTS, LR_SCHEDULES, MAX_KEEP_CHECKPOINTS

CHECKPOINTS_DIR = "checkpoints"


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
        "checkpoint_every": spec_int(ctx.spec, "checkpoint_every", default=DEFAULT_CHECKPOINT_EVERY),
        "keep_checkpoints": spec_int(ctx.spec, "keep_checkpoints", maximum=MAX_KEEP_CHECKPOINTS,
                                     default=DEFAULT_KEEP_CHECKPOINTS),
        "lr_schedule": ctx.spec.get("lr_schedule") or "constant",
        "precompile": bool(ctx.spec.get("precompile")),
    }
    if plan["lr_schedule"] not in LR_SCHEDULES:
        raise JobFailed("bad_input", f"spec field 'lr_schedule' must be one of {', '.join(LR_SCHEDULES)}, "
                                     f"got {plan['lr_schedule']!r}")
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


def checkpointing(ctx: JobContext, plan: dict) -> Checkpointing:
    """The job's checkpoint store: inputs["checkpoint_dir"] (the job's folder on shared
    storage, the same for every attempt and rank), else the attempt's own folder."""
    root = ctx.inputs.get("checkpoint_dir") or ctx.workdir / CHECKPOINTS_DIR
    return Checkpointing(CheckpointStore(root, keep=plan["keep_checkpoints"], log=ctx.log), plan["checkpoint_every"])


def stage(ctx: JobContext, name: str, state: str, message: str = "") -> None:
    """A fine-tune's stage (prepare, precompile, train, save) starting, done or skipped,
    for the job page's stage strip and timeline."""
    ctx.metric({"event": "stage", "stage": name, "state": state, "message": message or f"{name}: {state}"})


def save_checkpoint(ctx: JobContext, model: Any, tokenizer: Any) -> Path:
    """save_pretrained model + tokenizer into artifacts/checkpoint (loadable with from_pretrained)."""
    dest = ctx.artifacts_dir / "checkpoint"
    model.to("cpu").save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    ctx.log(f"checkpoint saved to {dest}")
    return dest
