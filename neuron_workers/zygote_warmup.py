"""Warm-up run once in the supervisor's zygote, before it forks any job.

Importing torch and transformers is not enough to make a forked job start fast:
a fresh process still pays first-use costs when it loads its first model — the
lazily imported model module (transformers' GPT-2 code), torch's per-operator
first-call set-up (tril/ones/normal_ took ~14 ms each in a forked child) and the
safetensors loading path. Doing all of that once here, on a throw-away tiny model
through the very functions a job uses (backends.hf), leaves it done in every
forked child: the child's model load went from ~60 ms to ~25 ms on the dispatch
bench (bench/dispatch.py), the largest single cost of a short job.

Fork safety: torch runs here with one intra-op thread, so OpenMP starts no pool
threads that a fork would copy in a held state; the previous thread count is put
back (setting it starts no threads), so children see torch's usual default.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def native_threads() -> int:
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
