"""A tiny offline GPT-2 and a demo dataset, so every job kind runs without downloads.

`model_digest` lives here too because it is the one helper the web app needs for
compile-cache lookups, and this module imports torch/transformers only inside
the functions that create models (importing it is cheap).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

TINY_CONFIG = {
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 64,
    "n_positions": 256,
    # No dropout: the demo loss curve should reflect learning, not noise.
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


def create_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised (seeded) HF GPT-2 causal LM + byte tokenizer to `path`.

    The tokenizer is transformers' ByT5Tokenizer with no extra ids: 3 special
    tokens (pad=0, eos=1, unk=2) + 256 bytes = 259 ids, no vocab files, so
    `AutoTokenizer.from_pretrained(path)` works offline. The model's vocab matches
    it exactly and uses eos as bos (GPT-2's convention). Returns the folder.
    """
    import torch
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = ByT5Tokenizer(extra_ids=0, model_max_length=TINY_CONFIG["n_positions"])
    tokenizer.save_pretrained(path)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    # fork_rng: seeding must not change the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    return path


_SUBJECTS = ["the red fox", "a small robot", "the old sailor", "my neighbour", "the blue bird", "a quiet cat"]
_VERBS = ["jumps over", "looks at", "walks past", "sings to", "waits for", "paints"]
_OBJECTS = ["the lazy dog", "the tall tree", "a green door", "the river", "an empty box", "the moon"]


def create_demo_dataset(path: str | Path, rows: int = 200, seed: int = 0) -> Path:
    """Write `rows` JSONL lines {"text": ...} of repetitive made-up sentences.

    Three small word lists and a fixed template: a byte-level model learns the
    structure within tens of steps, so the demo loss clearly goes down.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            sentences = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}." for _ in range(3)]
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


def model_digest(path: str | Path) -> str:
    """sha256 over sorted relative file names and contents of a model dir (or one file).

    Each file contributes its POSIX relative name, its size and its bytes, with
    separators, so renaming or moving bytes between files changes the digest.
    """
    root = Path(path)
    if root.is_file():
        files = [(root.name, root)]
    elif root.is_dir():
        files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    else:
        raise FileNotFoundError(f"no model at {root}")
    digest = hashlib.sha256()
    for rel, file in files:
        digest.update(rel.encode("utf-8") + b"\0" + str(file.stat().st_size).encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
