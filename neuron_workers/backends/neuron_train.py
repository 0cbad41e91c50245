"""Fine-tuning on NeuronCores, one rank per process; also the torchrun entry point.

    torchrun --standalone --nproc_per_node=N -m neuron_workers.backends.neuron_train --job-dir DIR

DIR holds train_job.json ({"job_id", "spec", "inputs"}) written by
neuron_launch.run_torchrun. Rank 0 prints metrics as "@@neurondeck-metric {json}"
lines (relayed by the launcher to ctx.metric), saves the checkpoint and writes
train_result.json, or train_error.json ({"code", "message"}) on a JobFailed; the
protocol's names live in neuron_launch. A one-core fine-tune runs train_rank in
the job's own process.

NOT RUN ON HARDWARE. The path follows the installed torch (neuron_matrix): PyTorch
<= 2.9 trains through torch-xla (neuron.md §4.6, unsupported from Neuron 2.30),
PyTorch >= 2.10 through native TorchNeuron (torch.device("neuron"), Trn2/Trn3, public
from Neuron 2.33; process group backend "neuron", docs torch/guides/torch-distributed).
The loop itself is the same one the cpu backend runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from .. import config
from . import distributed, hf
from .base import JobContext, JobFailed, write_json
from .checkpoints import seed_rng
from .detect import native_neuron_device_available
from .finetuning import checkpointing, finetune_plan, prepare_training, save_checkpoint
from .loops import TrainHooks, train_steps
from .neuron_env import installed_framework, rank_core
from .neuron_errors import CONSOLE_LOG, console_tail, map_neuron_error
from .neuron_launch import ERROR_FILE, JOB_FILE, METRIC_PREFIX, RESULT_FILE
from .neuron_matrix import NATIVE, XLA
from .neuron_parallel import uses_neuron_trainer


def training_mode(framework: str | None = None) -> str:
    """"xla" or "native": the path the installed torch takes (neuron_matrix), checked usable.

    Not "whatever imports": the host's report (the same interpreter's versions) is
    what the web app admitted the job on. native needs torch_neuronx (its import
    registers the device and the "neuron" process group backend) and the device;
    xla needs torch-xla."""
    framework = framework or installed_framework()
    if framework == NATIVE:
        try:
            importlib.import_module("torch_neuronx")
        except Exception as exc:
            raise JobFailed("unavailable", f"native TorchNeuron: torch_neuronx does not import here: {exc}") from exc
        if not native_neuron_device_available():
            raise JobFailed("unavailable", "native TorchNeuron: torch.device('neuron') is not usable here")
        return NATIVE
    if framework == XLA:
        try:
            importlib.import_module("torch_xla.core.xla_model")
        except Exception as exc:
            raise JobFailed("unavailable", f"PyTorch/XLA training: torch-xla is not usable here: {exc}") from exc
        return XLA
    raise JobFailed("unavailable", "this interpreter has no torch to train with")


def prepare_rank_environment(framework: str, environ: dict[str, str] | None = None) -> None:
    """Give a native rank of a multi-rank run its one NeuronCore: cores[LOCAL_RANK].

    Must run before the runtime starts (TorchNeuron reads NEURON_RT_VISIBLE_CORES at
    process group initialisation; neuron_env.rank_core says why). torch-xla keeps the
    job's range: its plugin remaps it to cores[LOCAL_RANK] itself and refuses a
    single core with LOCAL_WORLD_SIZE > 1 (pytorch/xla torch_xla/_internal/neuron_utils.py)."""
    environ = os.environ if environ is None else environ
    world = int(environ.get("LOCAL_WORLD_SIZE") or "1")
    if framework == NATIVE and world > 1:
        environ["NEURON_RT_VISIBLE_CORES"] = rank_core(environ.get("NEURON_RT_VISIBLE_CORES"),
                                                       int(environ.get("LOCAL_RANK") or "0"), world)


def native_device() -> Any:
    return torch.device("neuron")


def make_hooks(mode: str, rank: int, world_size: int = 1) -> TrainHooks:
    """Device and step hooks for a training mode (see loops.TrainHooks).

    Several ranks, under torch-xla or native TorchNeuron, follow the cpu backend's gloo
    ranks' rule (distributed.agreement): they agree after every step whether any was
    asked to stop, hand rank 0 their RNG states for each checkpoint so each resumes its
    own, and wait for rank 0's checkpoint before leaving. A stop saves the step every
    rank reached, and no rank waits in a gradient all-reduce for a peer that left."""
    if mode == XLA:
        xm = importlib.import_module("torch_xla.core.xla_model")
        device = xm.xla_device()
        # xm.optimizer_step all-reduces gradients across ranks, then steps;
        # xm.mark_step ends the lazy graph for this step (neuron.md §4.6).
        steps = {"optimizer_step": xm.optimizer_step, "end_step": xm.mark_step}
    else:
        device, steps = native_device(), {}
    agreement = ranks_agreement(mode, device) if world_size > 1 else {}
    return TrainHooks(device=device, is_main=rank == 0, rank=rank, world_size=world_size, **steps, **agreement)


def ranks_agreement(mode: str, device: Any) -> dict:
    """distributed.agreement on this mode's process group. The stop flag is all-reduced
    on the device by both groups. torch-xla's "xla" group gathers objects too (as
    xm.all_gather), but its barrier returns at once, so xm.rendezvous waits instead
    (distributed.xla_barrier). TorchNeuron's "neuron" group runs its collectives on
    neuron tensors and its barrier only on the default group (a public copy of
    torch-neuronx's distributed/backend.py; unconfirmed on hardware), so the RNG states,
    Python objects, and the wait go over a gloo group on the host beside it, as on the
    cpu backend."""
    if mode == XLA:
        return distributed.agreement(device, wait=distributed.xla_barrier)
    return distributed.agreement(device, objects=distributed.host_group())


def init_distributed(mode: str) -> None:
    """Join the torchrun process group for data-parallel training.

    xla: the 'xla' backend after importing torch_xla.distributed.xla_backend
    (neuron.md §4.6). native: backend "neuron", which importing torch_neuronx
    registers (docs torch/guides/torch-distributed).
    """
    import torch.distributed as dist

    if mode == XLA:
        importlib.import_module("torch_xla.distributed.xla_backend")
        dist.init_process_group("xla")
    else:
        importlib.import_module("torch_neuronx")
        dist.init_process_group(backend="neuron", init_method="env://")


def wrap_for_data_parallel(mode: str, model: Any, hooks: TrainHooks, world_size: int) -> Any:
    """Native multi-rank runs use DDP; under xla, xm.optimizer_step does the all-reduce."""
    if mode != NATIVE or world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model.to(hooks.device))


def trial_steps(environ: dict[str, str] | None = None) -> int | None:
    """The precompile stage's trial length (neuron_parallel.precompile_command), else None."""
    return config.trial_steps(environ)


def train_rank(ctx: JobContext, plan: dict, *, rank: int, world_size: int, framework: str | None = None) -> dict:
    """Train this rank's share; rank 0 saves the checkpoints and the model. Returns the finetune result.

    Each rank draws its own batches (seed + rank), so N ranks see N different
    batches per step. Reported losses are the ranks' mean (make_hooks); tokens_per_s
    counts all ranks. Checkpoints,
    stop and resume as on the cpu backend (loops.train_steps), the state moved to the
    host CPU before it is written. Under neuron_parallel_compile (trial_steps)
    the run is a graph extraction: a few steps, no checkpoint, no model.
    """
    if uses_neuron_trainer(ctx.spec):
        from .neuron_trainer import optimum_train_rank, xla_any_rank  # transformers' Trainer API

        several = world_size > 1
        return optimum_train_rank(ctx, plan, world_size=world_size, trial=trial_steps(),
                                  agree=xla_any_rank if several else bool,
                                  barrier=distributed.xla_barrier if several else lambda: None)
    mode = training_mode(framework)
    if world_size > 1:
        init_distributed(mode)
    hooks = make_hooks(mode, rank, world_size)
    ctx.log(f"training on {mode} device {hooks.device} (rank {rank}/{world_size})")
    model = hf.load_causal_lm(plan["model_path"])
    tokenizer = hf.load_tokenizer(plan["model_path"])
    blocks, total_steps = prepare_training(ctx, model, tokenizer, plan)
    trial = trial_steps()
    if trial is not None:
        total_steps = min(total_steps, trial)
    seed_rng(plan["seed"])  # every generator a checkpoint saves
    trained = wrap_for_data_parallel(mode, model, hooks, world_size)
    try:
        stats = train_steps(ctx, trained, blocks, total_steps=total_steps, batch_size=plan["batch_size"],
                            learning_rate=plan["learning_rate"], seed=plan["seed"] + rank, hooks=hooks,
                            checkpointing=None if trial is not None else checkpointing(ctx, plan),
                            lr_schedule=plan["lr_schedule"])
    except (RuntimeError, MemoryError) as exc:
        # The runtime's own lines (allocation failures, busy cores) are on the console.
        raise map_neuron_error(exc, "training", console_tail(ctx.workdir / CONSOLE_LOG)) from exc
    stats.tokens *= world_size
    if rank == 0 and trial is None:
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
    framework = installed_framework()
    try:
        prepare_rank_environment(framework or XLA)
    except ValueError as exc:
        print(f"rank {rank}: {exc}", file=sys.stderr, flush=True)
        return 1
    job = json.loads((args.job_dir / JOB_FILE).read_text(encoding="utf-8"))
    main_rank = rank == 0
    # A precompile trial's numbers are meaningless (graph extraction): it reports none.
    reports = main_rank and trial_steps() is None
    ctx = JobContext(job_id=job["job_id"], kind="finetune", spec=job["spec"], workdir=args.job_dir,
                     inputs=job["inputs"], log=_print_log if main_rank else _quiet,
                     metric=_print_metric if reports else _quiet)
    # torchrun forwards the launcher's SIGTERM (a stop of the job) to every rank: the ranks
    # agree on it after a step and save that step (make_hooks; NeuronTrainer: neuron_trainer).
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    ctx.should_stop = stop.is_set
    try:
        result = train_rank(ctx, finetune_plan(ctx), rank=rank, world_size=world_size, framework=framework)
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
