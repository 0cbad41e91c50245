"""Hugging Face models and tokenizers in a job process: loading, the in-process cache, the thread count.

This is a backend module, so it imports torch at module level; the registry in
`__init__.py` never imports it eagerly. Loading failures become
`JobFailed("bad_input")` because a model path that does not load is a user input
problem, not a crash. The cache's bounds come from neuron_workers.config
(NEURONDECK_MODEL_CACHE_ENTRIES / _MB), read once at import.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

# Imported at module level on purpose. The worker's fork server preloads the cpu
# backend (which imports this module) and forks one child per job; transformers
# resolves these names lazily, and the first access is slow (it pulls in
# generation utils, masking utils and torch._dynamo). Paying that once in the
# parent keeps it out of every job. Only imports here: running torch ops before
# fork would start OpenMP threads that deadlock the forked children.
from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer, GPT2LMHeadModel  # noqa: F401

from .. import config
from .base import JobFailed


def load_causal_lm(path: Path) -> Any:
    """Load a fresh float32 HF causal LM from a local folder (never remote code, never the network)."""
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as exc:
        raise JobFailed("bad_input", f"could not load a causal LM from {path}: {exc}") from exc


def load_tokenizer(path: Path) -> Any:
    """Load the tokenizer stored with a model (or in an artifact's tokenizer/ folder)."""
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise JobFailed("bad_input", f"could not load a tokenizer from {path}: {exc}") from exc


def max_positions(model: Any) -> int | None:
    """The model's maximum sequence length, if its config states one."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if value else None


def check_sequence_length(model: Any, sequence_length: int) -> None:
    """bad_input if sequence_length exceeds the model's position table."""
    limit = max_positions(model)
    if limit is not None and sequence_length > limit:
        raise JobFailed("bad_input", f"sequence_length {sequence_length} exceeds the model's {limit} positions")


def token_ids(tokenizer: Any) -> tuple[int, int]:
    """(eos_id, pad_id) for a tokenizer; pad falls back to eos like HF generate does."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise JobFailed("bad_input", "the model's tokenizer defines no end-of-sequence token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(eos), int(pad)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt without special tokens; an empty prompt starts from eos.

    add_special_tokens=False matters: ByT5-style tokenizers append eos, and a
    causal LM prompted with a trailing eos would start a new document.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids) or [token_ids(tokenizer)[0]]


# ---------------------------------------------------------------- in-process cache

# Inference jobs on small models are dominated by load time, and a host worker
# runs many of them in a row. We keep a few loaded models keyed by path + file
# signature, so an edited model is loaded again. On a cpu host the cache lives in
# the zygote, the process that forks job processes (see preload_hf): it loads the
# model a job needs before forking it, so the job child inherits it copy-on-write
# and loads nothing. Bounded by entries (a model and its
# tokenizer are two) and by bytes of tensors; either bound at 0 turns it off.
CACHE_ENTRIES_ENV = config.MODEL_CACHE_ENTRIES_ENV
CACHE_MB_ENV = config.MODEL_CACHE_MB_ENV

_cache_entries = config.model_cache_entries()
_cache_bytes = config.model_cache_mb() << 20
_cache: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()  # key -> (value, bytes)
_cache_lock = threading.Lock()
# Bumped whenever an entry is added or dropped: the zygote compares it to know
# whether its pre-forked spares still hold the same cache.
_cache_version = 0
# True in a process that runs exactly one job (a child forked from the zygote):
# take_owned() may then hand out the cached object itself (see there).
_one_job_process = False


def configure_cache(*, entries: int | None = None, max_bytes: int | None = None) -> None:
    """Change the bounds (tests); shrinking evicts at once."""
    global _cache_entries, _cache_bytes
    with _cache_lock:
        if entries is not None:
            _cache_entries = max(0, entries)
        if max_bytes is not None:
            _cache_bytes = max(0, max_bytes)
        _evict_locked()


def _signature(path: Path) -> tuple:
    """(name, size, mtime_ns) of the files directly in `path` (or of `path` itself).

    One scandir and one stat per file: the zygote computes this for every job."""
    try:
        with os.scandir(path) as entries:
            stats = sorted((entry.name, entry.stat()) for entry in entries if entry.is_file())
    except NotADirectoryError:
        stats = [(path.name, path.stat())]
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)


def _cache_key(kind: str, path: Path) -> tuple:
    return (kind, os.path.realpath(path), _signature(path))


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.nn.Module):
        tensors = [*value.parameters(), *value.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)
    return 0


def _evict_locked() -> None:
    global _cache_version
    while _cache and (len(_cache) > _cache_entries or sum(size for _, size in _cache.values()) > _cache_bytes):
        _cache.popitem(last=False)
        _cache_version += 1


def cached(kind: str, path: Path, loader: Any) -> Any:
    """Return loader(path), memoised per (kind, path, file signature); LRU bounded by
    entries and tensor bytes (an object larger than the byte bound is not kept).

    Only for objects used read-only (eval-mode models under inference_mode, jit
    modules, tokenizers); code that mutates a model uses take_owned().
    """
    return _cached(_cache_key(kind, path), path, loader)


def _cached(key: tuple, path: Path, loader: Any) -> Any:
    global _cache_version
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key][0]
    value = loader(path)
    size = _tensor_bytes(value)
    with _cache_lock:
        if _cache_entries and size <= _cache_bytes:
            # The same file under an older signature is stale: drop it now rather
            # than let it hold memory until it ages out.
            for stale in [k for k in _cache if k[:2] == key[:2] and k != key]:
                del _cache[stale]
            _cache[key] = (value, size)
            _cache_version += 1
            _evict_locked()
    return value


def is_cached(kind: str, path: Path) -> bool:
    """True if `path`'s current files are in the cache as `kind` (tests, diagnostics)."""
    key = _cache_key(kind, path)
    with _cache_lock:
        return key in _cache


def cache_info() -> dict:
    """Entries, tensor bytes and the bounds of the cache."""
    with _cache_lock:
        return {"entries": len(_cache), "bytes": sum(size for _, size in _cache.values()),
                "max_entries": _cache_entries, "max_bytes": _cache_bytes, "version": _cache_version}


def clear_cache() -> None:
    """Drop every cached model (tests; memory pressure)."""
    global _cache_version
    with _cache_lock:
        _cache.clear()
        _cache_version += 1


def mark_one_job_process() -> None:
    """Called in a job child forked from the zygote: this process runs exactly one
    job and then exits, so take_owned() may hand over the inherited cached objects."""
    global _one_job_process
    _one_job_process = True


def take_owned(kind: str, path: Path, loader: Any) -> Any:
    """An object the caller may mutate (a model to fine-tune): the cached one,
    removed from the cache, when this process runs only this job; else a fresh load.

    In a job child forked from the zygote the cached object is the child's own
    copy-on-write copy: training it changes the child's pages, never the zygote's,
    so the next job forked gets the pristine weights. Removing it from the child's
    cache means nothing later in the same process can mistake it for the file's
    contents. Elsewhere (exec mode, an in-process runner) the cache is shared by
    jobs, so a mutable object is always loaded fresh.
    """
    global _cache_version
    if _one_job_process:
        key = _cache_key(kind, path)
        with _cache_lock:
            entry = _cache.pop(key, None)
            if entry is not None:
                _cache_version += 1
                return entry[0]
    return loader(path)


def _own_storage(model: Any) -> Any:
    """Copy tensors that still live in the weights file's private mapping (safetensors
    loads by mmap) into the process's own memory. A cached model must not change,
    or fault with SIGBUS, when its file is rewritten in place later; the key's new
    signature makes jobs load the new file, but the old entry may still be in use."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    return model


def _load_eval_model(path: Path) -> Any:
    return _own_storage(load_causal_lm(path).eval())


def cached_hf_model(path: Path) -> tuple[Any, Any]:
    """(eval model, tokenizer) for an HF folder, from the in-process cache."""
    # Both come from the same folder: one realpath + scandir for the two keys.
    real, signature = os.path.realpath(path), _signature(path)
    return (_cached(("hf-model", real, signature), path, _load_eval_model),
            _cached(("tokenizer", real, signature), path, load_tokenizer))


def owned_hf_model(path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) for an HF folder that the caller may train (see take_owned).

    The model is in eval mode, as from_pretrained returns it; training code calls
    model.train() itself."""
    return take_owned("hf-model", path, _load_eval_model), take_owned("tokenizer", path, load_tokenizer)


def preload_hf(path: Path) -> bool:
    """Load `path`'s model and tokenizer into the cache (the zygote, before forking a
    job that needs them). Returns True if the cache changed.

    Runs torch with one intra-op thread, so loading starts no OpenMP pool threads
    that the following forks would copy in a held state.
    """
    if not _cache_entries or weights_bytes(path) > _cache_bytes:
        return False  # would not be kept: the job loads it itself, once
    before = _cache_version
    with torch_threads(1):
        cached_hf_model(path)
    return _cache_version != before


# ---------------------------------------------------------------- thread count


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None: leave it alone).

    Tiny models run faster on one thread (no OpenMP fan-out per matmul), and
    restoring the old value keeps an in-process runner's other work unaffected.
    """
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    count = max(1, min(count, os.cpu_count() or 1))
    if count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != previous:
            torch.set_num_threads(previous)


# ~5M float32 parameters. Below this, one thread beats OpenMP fan-out for decode
# steps, and a freshly forked job that never starts the OpenMP pool skips its
# start-up cost on the first torch op.
SMALL_MODEL_BYTES = 20 * 1024 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_bytes(path: Path) -> int:
    """Total size of the weight files at `path` (a folder or one file)."""
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES]
    return sum(p.stat().st_size for p in files if p.is_file())


def small_model_threads(path: Path) -> int | None:
    """1 if the weight files at `path` (dir or file) total < SMALL_MODEL_BYTES, else None.

    Decided from file sizes so it can be applied before loading, which is
    exactly when the thread pool would otherwise start.
    """
    return 1 if weights_bytes(path) < SMALL_MODEL_BYTES else None
