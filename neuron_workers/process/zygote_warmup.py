"""A warm-up the cpu zygote runs once after its imports, before it forks any job.

Importing torch and transformers is not all a job's start costs: a fresh process
still pays first-use costs when it loads its first model (transformers' lazily
imported model module, torch's per-operator first-call set-up, the safetensors
loading path). Running a throw-away tiny model once here, through the very
functions a job uses (backends.hf), leaves that done in every forked job process.

Fork safety: torch runs here with one intra-op thread, so OpenMP starts no pool
threads that a fork would copy in a held state; the previous thread count is put
back (setting it starts no threads), so jobs see torch's usual default.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def native_threads() -> int:
    """Threads of this process, native ones included (1 if /proc cannot tell)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def warm_up() -> None:
    """Load and run a tiny causal LM once through backends.hf (a few hundred ms)."""
    import torch

    from neuron_workers.backends import hf
    from neuron_workers.backends.loops import generate_hf
    from neuron_workers.backends.tinymodel import create_tiny_model

    threads_before, previous = native_threads(), torch.get_num_threads()
    folder = Path(tempfile.mkdtemp(prefix="nd-zygote-warmup-"))
    torch.set_num_threads(1)
    try:
        path = create_tiny_model(folder / "tiny")
        model, tokenizer = hf.load_causal_lm(path).eval(), hf.load_tokenizer(path)
        eos_id, _ = hf.token_ids(tokenizer)
        generate_hf(model, hf.encode_prompt(tokenizer, "warm up"), max_new_tokens=2, temperature=0.0,
                    generator=torch.Generator().manual_seed(0), eos_id=eos_id)
        del model, tokenizer
    finally:
        torch.set_num_threads(previous)
        shutil.rmtree(folder, ignore_errors=True)
    if native_threads() > threads_before:
        # Reported, not fatal: the zygote's hello carries preload problems to the worker.
        raise RuntimeError(f"warm-up left {native_threads() - threads_before} extra native threads; "
                           "forked jobs may inherit locks held by them")
