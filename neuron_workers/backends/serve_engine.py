"""Dynamic (continuous) batching of text generation for the cpu replica server.

One engine thread owns the model. Requests arrive at any time (`submit`); between
two forward passes the engine admits waiting ones up to `max_batch_size`, so
requests that arrive together share every forward pass:

- admitted requests are prefilled together (prompts left-padded into one batch),
  each getting its first token from that one pass;
- their KV caches are merged into the running batch (left-padding the shorter
  cache along the time axis, masked out);
- then one decode pass steps every active sequence by one token.

A finished (or cancelled) sequence leaves the batch by dropping its row, and
columns that have become padding for every row are trimmed off the left.
Left padding keeps each row's newest token in the last column, so a decode pass
is a plain (batch, 1) forward with the cache, the mask and per-row positions.

The engine reports tokens through `deliver(events)`, called from its thread once
per pass with every (request, token, finish) of that pass; the HTTP side
forwards them to its event loop in one hop per pass instead of one per token.

A decode pass hands the model its attention mask ready-made, (B, 1, 1, T) additive
(0 where a row attends, the dtype's minimum on its padding): transformers takes a
4D mask as it is, where a 2D mask with padding in it would be expanded through
vmap'ed mask functions on every pass, costing more than the forward itself at
batch 16 on a small model. Models with a sliding window keep the 2D mask (their
window is applied while expanding it).

The cache is HF's DynamicCache; merging, dropping rows and trimming write the
layers' `keys`/`values` tensors directly (transformers is pinned; see
requirements.txt).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

FINISH_LENGTH = "length"  # max_tokens reached
FINISH_STOP = "stop"  # the model produced end-of-sequence
FINISH_CANCELLED = "cancelled"  # the client went away
FINISH_ERROR = "error"  # the engine failed; every request in flight gets it


class Saturated(Exception):
    """max_concurrent requests are already in the engine (waiting or generating)."""


class Draining(Exception):
    """The engine takes no new requests: the replica is stopping."""


_ids = itertools.count(1)


@dataclass(eq=False)
class Generation:
    """One request's generation: its prompt, its limits and how far it got."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    top_p: float = 1.0  # nucleus sampling: only the most likely tokens whose probabilities sum to top_p
    id: int = field(default_factory=lambda: next(_ids))
    submitted_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    new_ids: list[int] = field(default_factory=list)
    finish: str | None = None
    cancelled: bool = False
    streaming: bool = False  # its first tokens were handed to the HTTP side (serve_app)
    generator: torch.Generator | None = None

    @property
    def queue_s(self) -> float:
        """Time from submit to the start of its prefill."""
        return (self.admitted_at or time.perf_counter()) - self.submitted_at


Event = tuple[Generation, "int | None", "str | None"]  # (request, new token or None, finish reason or None)


class BatchingEngine:
    """Continuous batching over a HF causal LM with a KV cache; see the module docstring."""

    def __init__(self, model: Any, *, eos_id: int, pad_id: int, max_batch_size: int, max_concurrent: int,
                 deliver: Callable[[list[Event]], None]) -> None:
        self.model = model
        self.eos_id, self.pad_id = eos_id, pad_id
        self.max_batch_size, self.max_concurrent = max_batch_size, max_concurrent
        self.deliver = deliver
        self._dtype = next(model.parameters()).dtype
        self._masked = torch.finfo(self._dtype).min
        self._ready_mask = getattr(getattr(model, "config", None), "sliding_window", None) is None
        self._cv = threading.Condition()
        self._waiting: deque[Generation] = deque()
        self._active: list[Generation] = []
        self._draining = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        # The running batch: one row per active generation.
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, T) 1 where the cache holds a real token
        self._last: torch.Tensor | None = None  # (B,) the token each row feeds next
        # Counters (read by /health, the tests and the bench).
        self.forward_passes = 0
        self.prefill_passes = 0
        self.decode_passes = 0
        self.generated_tokens = 0
        self.finished_requests = 0
        self.largest_batch = 0

    # ------------------------------------------------------------ the caller's side

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="batching-engine", daemon=True)
        self._thread.start()

    def submit(self, gen: Generation) -> None:
        """Queue `gen`; Saturated at max_concurrent, Draining once drain() was called."""
        with self._cv:
            if self._draining:
                raise Draining("the replica is draining")
            if len(self._waiting) + len(self._active) >= self.max_concurrent:
                raise Saturated(f"{self.max_concurrent} requests are already in progress")
            if gen.temperature > 0:
                gen.generator = torch.Generator().manual_seed(gen.seed if gen.seed is not None else gen.id)
            self._waiting.append(gen)
            self._cv.notify()

    def cancel(self, gen: Generation) -> None:
        """The client went away: drop `gen` before its next pass."""
        with self._cv:
            gen.cancelled = True
            self._cv.notify()

    @property
    def outstanding(self) -> int:
        with self._cv:
            return len(self._waiting) + len(self._active)

    def drain(self) -> None:
        """Refuse new requests from now on; those in progress run to the end."""
        with self._cv:
            self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def stats(self) -> dict:
        with self._cv:
            return {"forward_passes": self.forward_passes, "prefill_passes": self.prefill_passes,
                    "decode_passes": self.decode_passes, "generated_tokens": self.generated_tokens,
                    "finished_requests": self.finished_requests, "largest_batch": self.largest_batch,
                    "waiting": len(self._waiting), "active": len(self._active), "draining": self._draining,
                    "max_batch_size": self.max_batch_size, "max_concurrent": self.max_concurrent}

    # ------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and not self._waiting and not self._active:
                    self._cv.wait()
                if self._stopped:
                    return
                admitted = []
                while self._waiting and len(self._active) + len(admitted) < self.max_batch_size:
                    gen = self._waiting.popleft()
                    if gen.cancelled:
                        self.deliver([(gen, None, FINISH_CANCELLED)])
                        continue
                    admitted.append(gen)
            try:
                with torch.inference_mode():
                    self._step(admitted)
            except Exception as exc:  # noqa: BLE001 - every request in flight must learn it failed
                self._fail_all(admitted, exc)

    def _step(self, admitted: list[Generation]) -> None:
        events: list[Event] = []
        if admitted:
            now = time.perf_counter()
            for gen in admitted:
                gen.admitted_at = now
            self._prefill(admitted, events)
        self._drop_finished(events)
        if self._active:
            self._decode(events)
            self._drop_finished(events)
        if events:
            self.deliver(events)

    def _prefill(self, admitted: list[Generation], events: list[Event]) -> None:
        width = max(len(g.prompt_ids) for g in admitted)
        ids = torch.full((len(admitted), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(admitted), width), dtype=torch.long)
        for row, gen in enumerate(admitted):
            ids[row, width - len(gen.prompt_ids):] = torch.tensor(gen.prompt_ids, dtype=torch.long)
            mask[row, width - len(gen.prompt_ids):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True)
        self.forward_passes += 1
        self.prefill_passes += 1
        tokens = self._pick(out.logits[:, -1, :], admitted)
        self._merge(out.past_key_values, mask, tokens)
        self._active.extend(admitted)
        self.largest_batch = max(self.largest_batch, len(self._active))
        self._record(admitted, tokens, events)

    def _decode(self, events: list[Event]) -> None:
        mask = torch.cat([self._mask, torch.ones((self._mask.shape[0], 1), dtype=torch.long)], dim=1)
        positions = self._mask.sum(dim=1, keepdim=True)
        out = self.model(input_ids=self._last[:, None], attention_mask=self._decode_mask(mask),
                         position_ids=positions, past_key_values=self._cache, use_cache=True)
        self.forward_passes += 1
        self.decode_passes += 1
        self._cache, self._mask = out.past_key_values, mask
        tokens = self._pick(out.logits[:, -1, :], self._active)
        self._last = tokens
        self._record(self._active, tokens, events)

    def _decode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """`mask` (B, T) as the (B, 1, 1, T) additive mask of a one-token query (see the
        module docstring), or as it is for a model with a sliding window."""
        if not self._ready_mask:
            return mask
        additive = torch.zeros(mask.shape, dtype=self._dtype)
        additive.masked_fill_(mask == 0, self._masked)
        return additive[:, None, None, :]

    def _pick(self, logits: torch.Tensor, gens: list[Generation]) -> torch.Tensor:
        """Greedy for temperature 0, else a sample from each row's own seeded generator
        (from the smallest set of likeliest tokens whose probabilities reach top_p)."""
        tokens = logits.argmax(dim=-1)
        for row, gen in enumerate(gens):
            if gen.temperature > 0:
                probs = torch.softmax(logits[row] / gen.temperature, dim=-1)
                if gen.top_p < 1:
                    sorted_probs, order = probs.sort(descending=True)
                    outside = sorted_probs.cumsum(-1) - sorted_probs >= gen.top_p  # the likeliest token always stays
                    probs = probs.scatter(0, order[outside], 0.0)
                tokens[row] = torch.multinomial(probs, 1, generator=gen.generator)[0]
        return tokens

    def _record(self, gens: list[Generation], tokens: torch.Tensor, events: list[Event]) -> None:
        for gen, token in zip(gens, tokens.tolist()):
            if token == self.eos_id and not gen.ignore_eos:
                gen.finish = FINISH_STOP
                events.append((gen, None, FINISH_STOP))
                continue
            gen.new_ids.append(token)
            self.generated_tokens += 1
            if len(gen.new_ids) >= gen.max_new_tokens:
                gen.finish = FINISH_LENGTH
            events.append((gen, token, gen.finish))

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, last: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding the shorter side in time."""
        if self._cache is None or not self._active:
            self._cache, self._mask, self._last = cache, mask, last
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0)
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0)
        self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)], dim=0)
        self._last = torch.cat([self._last, last])

    def _drop_finished(self, events: list[Event]) -> None:
        """Remove finished and cancelled rows; trim columns that are padding in every row."""
        keep = [row for row, gen in enumerate(self._active) if gen.finish is None and not gen.cancelled]
        if len(keep) == len(self._active):
            return
        for row, gen in enumerate(self._active):
            if gen.cancelled and gen.finish is None:
                gen.finish = FINISH_CANCELLED
                events.append((gen, None, FINISH_CANCELLED))
            if gen.finish is not None:
                self.finished_requests += 1
        self._active = [self._active[row] for row in keep]
        if not keep:
            self._cache = self._mask = self._last = None
            return
        index = torch.tensor(keep, dtype=torch.long)
        mask = self._mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:, :]
            layer.values = layer.values.index_select(0, index)[:, :, start:, :]
        self._mask = mask[:, start:]
        self._last = self._last.index_select(0, index)

    def _fail_all(self, admitted: list[Generation], exc: Exception) -> None:
        gens = [*self._active, *(g for g in admitted if g not in self._active)]
        for gen in gens:
            gen.finish = FINISH_ERROR
        self._active = []
        self._cache = self._mask = self._last = None
        self.deliver([(gen, None, FINISH_ERROR) for gen in gens])


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, width, D) with zeros on the left of the time axis."""
    missing = width - tensor.shape[2]
    if missing <= 0:
        return tensor
    pad = torch.zeros((*tensor.shape[:2], missing, tensor.shape[3]), dtype=tensor.dtype)
    return torch.cat([pad, tensor], dim=2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    if missing <= 0:
        return mask
    return torch.cat([torch.zeros((mask.shape[0], missing), dtype=mask.dtype), mask], dim=1)
