"""Neuron training beyond data parallelism, torch-free: the options, and the calls they become.

- Tensor parallelism and ZeRO-1 train through Optimum Neuron's NeuronTrainer on
  neuronx-distributed: `NeuronTrainingArguments(tensor_parallel_size=..., zero_1=...,
  ...)`, the model built with `NeuronModelForCausalLM.from_pretrained(path,
  args.trn_config)` (optimum-neuron optimum/neuron/training_args.py,
  training_api/trainer.mdx; neuron.md §4.7). `trainer_arguments` builds the keyword
  arguments; neuron_trainer.optimum_train_rank makes the calls.
- Precompile runs the job's own torchrun command under `neuron_parallel_compile` for
  a few trial steps (graph extraction, NEURON_EXTRACT_GRAPHS_ONLY: their numbers are
  meaningless), which compiles every graph into the fleet-shared cache
  (NEURON_COMPILE_CACHE_URL) before training starts (neuron.md §4.4).

The web app checks the options at submit with `check_parallel_options` (the form's
field errors); the backend checks them again (JobFailed("bad_input")).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..config import TRIAL_STEPS_ENV
from .training_options import PRECOMPILE_TRIAL_STEPS



class ParallelOptionError(ValueError):
    """A Neuron training option that cannot work, with the form field it belongs to."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_parallel_options(family: str, cores: int, tensor_parallel_size: int, zero_1: bool,
                           precompile: bool) -> None:
    """Refuse tensor parallelism or ZeRO-1 off Neuron, a degree that does not divide the
    cores, and ZeRO-1 with a single data-parallel rank. Precompile is allowed on every
    family: the cpu backend shows the stage as skipped."""
    if tensor_parallel_size < 1:
        raise ParallelOptionError("tensor_parallel_size", "tensor_parallel_size must be at least 1")
    neuron = family not in ("", "cpu")
    if tensor_parallel_size > 1 and not neuron:
        raise ParallelOptionError("tensor_parallel_size", "tensor parallelism needs a Neuron family (trn1, trn2); "
                                                          "the cpu backend trains data-parallel only")
    if zero_1 and not neuron:
        raise ParallelOptionError("zero_1", "ZeRO-1 needs a Neuron family (trn1, trn2); the cpu backend keeps "
                                            "the whole optimizer state on every rank")
    if cores % tensor_parallel_size:
        raise ParallelOptionError("tensor_parallel_size", f"tensor_parallel_size {tensor_parallel_size} must divide "
                                                          f"the job's {cores} cores")
    if zero_1 and cores // tensor_parallel_size < 2:
        raise ParallelOptionError("zero_1", f"ZeRO-1 shards the optimizer state over data-parallel ranks, and "
                                            f"{cores} cores / tensor_parallel_size {tensor_parallel_size} leave one; "
                                            f"ask for more cores or turn zero_1 off")


def uses_neuron_trainer(spec: Mapping) -> bool:
    """Tensor parallelism or ZeRO-1 take the NeuronTrainer path; plain data parallelism the own loop."""
    return int(spec.get("tensor_parallel_size") or 1) > 1 or bool(spec.get("zero_1"))


def trainer_arguments(plan: Mapping, *, output_dir: str, world_size: int, tensor_parallel_size: int,
                      zero_1: bool) -> dict:
    """Keyword arguments of NeuronTrainingArguments for a plan (finetuning.finetune_plan).

    The trainer saves every checkpoint_every steps into output_dir, a staging folder
    from which neuron_trainer moves each finished checkpoint into the job's checkpoint
    folder (and keeps the newest keep_checkpoints there), so no save_total_limit. The
    plan's batch is the global one: per device it is divided by the data-parallel
    degree (world_size / tensor_parallel_size)."""
    data_parallel = max(1, world_size // tensor_parallel_size)
    if plan["batch_size"] % data_parallel:
        raise ParallelOptionError("batch_size", f"batch_size {plan['batch_size']} must divide evenly over "
                                                f"{data_parallel} data-parallel ranks")
    steps = plan["steps"] if plan.get("steps") is not None else -1
    return {
        "output_dir": output_dir,
        "tensor_parallel_size": tensor_parallel_size,
        "zero_1": zero_1,
        "per_device_train_batch_size": plan["batch_size"] // data_parallel,
        "learning_rate": plan["learning_rate"],
        "lr_scheduler_type": plan.get("lr_schedule") or "constant",
        "max_steps": steps,
        "num_train_epochs": plan.get("epochs") or 1,
        "seed": plan["seed"],
        "save_strategy": "steps",
        "save_steps": plan["checkpoint_every"],
        "logging_steps": 1,
        "bf16": True,
        "report_to": [],
    }


def precompile_command(train_argv: list[str], cache_url: str,
                       trial_steps: int = PRECOMPILE_TRIAL_STEPS) -> tuple[list[str], dict[str, str]]:
    """(argv, added environment) of the precompile stage: `neuron_parallel_compile` in
    front of the job's own torchrun command, the trial length for the ranks, and the
    fleet's compile cache (NEURON_COMPILE_CACHE_URL; the training run reads the same)."""
    if trial_steps < 1:
        raise ValueError("trial_steps must be >= 1")
    return ["neuron_parallel_compile", *train_argv], {"NEURON_COMPILE_CACHE_URL": cache_url,
                                                      TRIAL_STEPS_ENV: str(trial_steps)}
