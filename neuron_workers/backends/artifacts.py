"""The compiled artifact: model.pt + compile_meta.json + tokenizer/, written by compile, read by inference.

Both backends produce the same shape of artifact (a TorchScript module taking
input_ids of a fixed (batch, seq) and returning logits; torch_neuronx.trace
returns that shape too, neuron.md §4.2), so one module owns its file names,
the wrapper the tracers record, the meta file and loading it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import hf
from .base import JobContext, JobFailed
from .compiler_options import compile_cache_key
from .export_options import check_export_options
from .tinymodel import model_digest

ARTIFACT_NAME = "model.pt"
META_NAME = "compile_meta.json"
TOKENIZER_DIR = "tokenizer"


class LogitsOnly(torch.nn.Module):
    """Wrap a causal LM so forward(input_ids) -> logits, a shape both tracers accept.

    We build the causal attention mask here as an explicit 4-D additive float mask.
    Left to itself, transformers >= 4.5x builds the mask with torch.vmap, which
    torch.jit.trace in torch 2.13 cannot record ("unordered_map::at"); a 4-D mask
    is passed through as-is by transformers' masking utils. Inputs are never
    padded on the left, so a pure causal mask is exact: logits at position i only
    depend on tokens 0..i, which is what lets fixed-shape inference right-pad.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        allowed = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        mask = torch.zeros(length, length, dtype=torch.float32, device=input_ids.device)
        mask = mask.masked_fill(~allowed, torch.finfo(torch.float32).min)
        mask = mask[None, None].expand(batch, 1, length, length)
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False, return_dict=True).logits


# ---------------------------------------------------------------- writing


def compile_meta(ctx: JobContext, model: Any, tokenizer: Any, model_path: Path, shape: tuple[int, int],
                 options: list[str], target: str, result: dict) -> dict:
    """compile_meta.json: everything inference needs to drive the fixed-shape artifact."""
    eos_id, pad_id = hf.token_ids(tokenizer)
    digest = model_digest(model_path)
    return {
        "artifact": ARTIFACT_NAME,
        "tokenizer": TOKENIZER_DIR,
        "batch_size": shape[0],
        "sequence_length": shape[1],
        "input_shape": list(shape),
        "input_dtype": "int64",
        "vocab_size": int(model.config.vocab_size),
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "model_type": getattr(model.config, "model_type", None),
        "backend": result["backend"],
        "target": target,
        "compiler_version": result["compiler_version"],
        "compiler_options": options,
        "model_digest": digest,
        "cache_key": compile_cache_key(digest, shape[0], shape[1], options, result["backend"],
                                       result["compiler_version"], target,
                                       check_export_options(ctx.spec, target).key_extras()),
        "job_id": ctx.job_id,
    }


def save_tokenizer(tokenizer: Any, dest: Path) -> None:
    """Save the tokenizer files so inference can decode without the source model."""
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dest)


# ---------------------------------------------------------------- reading


def artifact_paths(model_path: Path) -> tuple[Path, Path, Path]:
    """(model.pt, compile_meta.json, tokenizer/) for an artifact dir or a model.pt file.

    Accepting the file as well lets the web app point at either; the meta and
    tokenizer are always expected beside the artifact, where compile wrote them.
    """
    artifact = model_path / ARTIFACT_NAME if model_path.is_dir() else model_path
    folder = artifact.parent
    return artifact, folder / META_NAME, folder / TOKENIZER_DIR


def read_compile_meta(meta_path: Path) -> dict:
    """Parse compile_meta.json, checking the fields inference relies on."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise JobFailed("bad_input", f"compiled artifact has no readable {META_NAME} at {meta_path}: {exc}") from exc
    for key in ("batch_size", "sequence_length", "eos_token_id", "pad_token_id"):
        if not isinstance(meta.get(key), int):
            raise JobFailed("bad_input", f"{meta_path} lacks integer field {key!r}")
    return meta


def load_compiled(model_path: Path, loader: Any, *, use_cache: bool = True,
                  map_error: Any = None) -> tuple[Any, dict, Any]:
    """(module, meta, tokenizer) for a compiled artifact dir or model.pt.

    With use_cache the module is memoised per file (see hf.cached); the neuron
    backend turns that off because a loaded Neuron model occupies a NeuronCore.
    `map_error(exc) -> JobFailed` classifies load failures (default: bad_input).
    """
    artifact, meta_path, tokenizer_dir = artifact_paths(model_path)
    if not artifact.is_file():
        raise JobFailed("bad_input", f"no compiled artifact at {artifact}")
    meta = read_compile_meta(meta_path)
    try:
        module = hf.cached("jit", artifact, lambda p: loader(str(p))) if use_cache else loader(str(artifact))
    except (RuntimeError, ValueError, MemoryError) as exc:
        if map_error is not None:
            raise map_error(exc) from exc
        raise JobFailed("bad_input", f"could not load compiled artifact {artifact.name}: {exc}") from exc
    return module, meta, hf.cached("tokenizer", tokenizer_dir, hf.load_tokenizer)
