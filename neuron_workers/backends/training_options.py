"""Fine-tune options and their defaults, torch-free: the backends read them from the
spec (finetuning.finetune_plan) and the web app's form offers and checks the same ones."""

from __future__ import annotations

DEFAULT_CHECKPOINT_EVERY = 100  # steps between checkpoints
DEFAULT_KEEP_CHECKPOINTS = 3
MAX_KEEP_CHECKPOINTS = 100
LR_SCHEDULES = ("constant", "linear")
PRECOMPILE_TRIAL_STEPS = 3  # steps neuron_parallel_compile runs to extract the training graphs
