"""Reading datasets and prompts, and packing text into training blocks.

File-format errors become JobFailed("bad_input") naming the file and line, because
the web app validated the upload's shape but not every row.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .base import JobContext, JobFailed, input_path

# A CSV field can legitimately hold a whole document; the stdlib default (128 KiB)
# would reject long rows with an obscure error.
csv.field_size_limit(16 * 1024 * 1024)


def read_texts(path: Path, fmt: str) -> list[str]:
    """Non-empty "text" values of a JSONL (one object per line) or CSV (header row) dataset."""
    if fmt == "jsonl":
        texts = _jsonl_texts(path)
    elif fmt == "csv":
        texts = _csv_texts(path)
    else:
        raise JobFailed("bad_input", f"dataset format {fmt!r} is not supported; use jsonl or csv")
    if not texts:
        raise JobFailed("bad_input", f"dataset {path.name} has no non-empty text rows")
    return texts


def _jsonl_field(path: Path, field: str) -> list[str]:
    """The string `field` of every non-blank JSONL line; a bad line is bad input naming it."""
    values = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise JobFailed("bad_input", f"{path.name} line {number} is not valid JSON: {exc}") from exc
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise JobFailed("bad_input", f"{path.name} line {number} has no string field '{field}'")
            values.append(row[field])
    return values


def _jsonl_texts(path: Path) -> list[str]:
    return [text for text in _jsonl_field(path, "text") if text.strip()]


def _csv_texts(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise JobFailed("bad_input", f"{path.name} has no 'text' column (columns: {reader.fieldnames})")
        return [row["text"] for row in reader if (row.get("text") or "").strip()]


def pack_blocks(tokenizer: Any, texts: list[str], sequence_length: int, eos_id: int) -> torch.Tensor:
    """Concatenate texts (each followed by eos) and cut into blocks of sequence_length.

    Returns a LongTensor (n_blocks, L). The ragged tail is dropped; if the whole
    dataset is shorter than one block we train on a single shorter block rather
    than refuse a small demo dataset. Needs at least 2 tokens (one prediction).
    """
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.append(eos_id)
    if len(stream) < 2:
        raise JobFailed("bad_input", "the dataset tokenizes to fewer than 2 tokens")
    length = min(sequence_length, len(stream))
    usable = len(stream) - len(stream) % length
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, length)


def batch_indices(n_blocks: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless stream of full batches of block indices (BatchSampler as an iterator)."""
    sampler = BatchSampler(n_blocks, batch_size, seed)
    while True:
        yield sampler.next_batch()


class BatchSampler:
    """Full batches of block indices, reshuffled every pass, with a resumable position.

    Each pass is a seeded permutation; batches may straddle passes so every batch
    has exactly batch_size rows (static shapes matter on Neuron: a smaller last
    batch would trigger a recompile, neuron.md §4.4). `state_dict()` is the data
    position a checkpoint keeps: the generator's state and the indices drawn but
    not yet used, so a resumed run reads exactly the batches an uninterrupted one
    would have read next.

    Data parallelism: every rank draws the same global batch and trains on its
    `shard(batch, rank, world_size)`, what DistributedSampler does per epoch, but
    with one position for the whole job, so a checkpoint written by rank 0 is the
    position of every rank and the same global batch gives the same loss at any
    world size.
    """

    def __init__(self, n_blocks: int, batch_size: int, seed: int) -> None:
        self.n_blocks, self.batch_size = n_blocks, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.pending = torch.empty(0, dtype=torch.long)

    def next_batch(self) -> torch.Tensor:
        while len(self.pending) < self.batch_size:
            self.pending = torch.cat([self.pending, torch.randperm(self.n_blocks, generator=self.generator)])
        batch, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size:]
        return batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "pending": self.pending.clone(),
                "n_blocks": self.n_blocks, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["n_blocks"], state["batch_size"]) != (self.n_blocks, self.batch_size):
            raise ValueError(f"the checkpoint's data position is for {state['n_blocks']} blocks in batches of "
                             f"{state['batch_size']}, this run has {self.n_blocks} in batches of {self.batch_size}")
        self.generator.set_state(state["generator"])
        self.pending = state["pending"].clone()


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s equal, contiguous share of a global batch (its size divides evenly)."""
    per_rank = len(batch) // world_size
    return batch[rank * per_rank:(rank + 1) * per_rank]


def steps_per_epoch(n_blocks: int, batch_size: int) -> int:
    return max(1, -(-n_blocks // batch_size))


def read_prompts(ctx: JobContext) -> list[str]:
    """Prompts from spec["prompts"], or else inputs["prompts_path"] (JSONL {"prompt": ...})."""
    prompts = ctx.spec.get("prompts")
    if prompts:
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise JobFailed("bad_input", "spec field 'prompts' must be a list of strings")
        return list(prompts)
    if not ctx.inputs.get("prompts_path"):
        raise JobFailed("bad_input", "an inference job needs spec 'prompts' or an uploaded prompts file")
    return _jsonl_prompts(input_path(ctx, "prompts_path"))


def _jsonl_prompts(path: Path) -> list[str]:
    prompts = _jsonl_field(path, "prompt")
    if not prompts:
        raise JobFailed("bad_input", f"prompts file {path.name} has no prompts")
    return prompts
