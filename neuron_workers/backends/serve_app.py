"""The replica's OpenAI-compatible HTTP API (Starlette) over a BatchingEngine.

Routes:
  POST /v1/completions        {"prompt", "max_tokens"=16, "temperature"=1, "top_p"=1, "seed", "stream",
                               "stream_options": {"include_usage"}, "stop", "ignore_eos"}
  POST /v1/chat/completions   {"messages": [{"role", "content"}], same options; max_tokens
                               defaults to the room left in max_seq_len}
  GET  /v1/models             the one model this replica serves
  GET  /health                200 {"status": "ok", engine counters}; 503 while draining

Streaming answers are server-sent events in OpenAI's chunk format, one chunk per
token as the engine produces it, ending with `data: [DONE]`. Errors use OpenAI's
shape {"error": {"message", "type", "param", "code"}}: 400 for a bad field (named in
"param"), 400 when prompt + max_tokens exceed max_seq_len, 429 + Retry-After when
max_concurrent requests are in progress, 503 + Retry-After + `X-Replica-State:
draining` once the replica is stopping (a gateway may send it elsewhere: nothing
was started).

`ignore_eos` is vLLM's extension: generate exactly max_tokens (benchmarks). OpenAI's
options it does not implement (logprobs, echo, best_of, suffix, penalties, logit_bias,
tools, response_format) are a 400 naming the option when set to anything but their
default, rather than ignored.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .serve_engine import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    BatchingEngine,
    Draining,
    Event,
    Generation,
    Saturated,
)

RETRY_AFTER_S = 1
DRAINING_HEADER = "X-Replica-State"
MAX_STOP_STRINGS = 4
# OpenAI options this server does not implement, with the values that mean "not asked
# for". Any other value is a 400 naming the option, so no client reads an answer made
# without what it asked for (no log probabilities, no penalties, ...).
UNSUPPORTED_OPTIONS: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "tools": (None, []), "response_format": (None, {"type": "text"}),
}


class BadRequest(Exception):
    """A request field is wrong: answered 400 naming the field."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param, self.message = param, message


@dataclass
class Limits:
    """The endpoint's serving options, as the replica enforces them."""

    max_batch_size: int
    max_seq_len: int
    max_concurrent: int
    stream_interval_s: float = 0.0  # see ServingModel._deliver


@dataclass
class Parsed:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    seed: int | None
    stream: bool
    include_usage: bool
    stop: list[str]
    ignore_eos: bool
    top_p: float


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ServingModel:
    """The tokenizer, the engine and the bridge from the engine thread to the event loop."""

    def __init__(self, *, model: Any, tokenizer: Any, model_name: str, limits: Limits, eos_id: int,
                 pad_id: int) -> None:
        self.tokenizer = tokenizer
        self.token_bytes = token_bytes_table(tokenizer)
        self.model_name = model_name
        self.limits = limits
        self.engine = BatchingEngine(model, eos_id=eos_id, pad_id=pad_id, max_batch_size=limits.max_batch_size,
                                     max_concurrent=limits.max_concurrent, deliver=self._deliver)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[int, asyncio.Queue] = {}
        self.started_at = time.time()
        self._held: list[Event] = []  # delivered by the engine, not yet handed to the loop
        self._held_lock = threading.Lock()
        self._flush_at: float | None = None  # when the scheduled hand-over runs (monotonic)
        self._last_flush = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.engine.start()

    def _deliver(self, events: list[Event]) -> None:
        """Engine thread: hand a pass's tokens to the event loop. Tokens of requests
        already streaming are handed over at most every stream_interval_s, so under
        load each connection writes several tokens (still one SSE event each) per
        system call, here, in the gateway and in the client (vLLM's stream interval).
        A request's first token and every finish go at once: time to first token and
        the end of an answer are never delayed."""
        if self.loop is None:
            return
        urgent = False
        for gen, _, finish in events:
            urgent = urgent or finish is not None or not gen.streaming
            gen.streaming = True
        now = time.monotonic()
        with self._held_lock:
            self._held.extend(events)
            if urgent:
                due = now
            else:
                due = max(now, self._last_flush + self.limits.stream_interval_s)
            if self._flush_at is not None and self._flush_at <= due:
                return  # an earlier hand-over takes these too
            self._flush_at = due
        self.loop.call_soon_threadsafe(self._schedule_flush, due - now)

    def _schedule_flush(self, delay: float) -> None:
        if delay <= 0:
            self._flush()
        else:
            self.loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        with self._held_lock:
            events, self._held = self._held, []
            self._flush_at = None
            self._last_flush = time.monotonic()
        self._dispatch(events)

    def _dispatch(self, events: list[Event]) -> None:
        for gen, token, finish in events:
            queue = self._queues.get(gen.id)
            if queue is not None:
                queue.put_nowait((token, finish))

    def has_pending(self, gen: Generation) -> bool:
        """Whether tokens of `gen` have arrived that generate() has not yielded yet."""
        queue = self._queues.get(gen.id)
        return queue is not None and not queue.empty()

    async def generate(self, parsed: Parsed) -> AsyncIterator[tuple[str, str | None, Generation]]:
        """Yield (text delta, finish reason or None, generation) as tokens arrive.
        Saturated / Draining propagate before anything is yielded."""
        gen = Generation(parsed.prompt_ids, parsed.max_tokens, parsed.temperature, parsed.seed,
                         ignore_eos=parsed.ignore_eos, top_p=parsed.top_p)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[gen.id] = queue
        detok = _Detokenizer(self.tokenizer, self.token_bytes)
        text_so_far = ""
        try:
            self.engine.submit(gen)
            while True:
                token, finish = await queue.get()
                delta = detok.push(token) if token is not None else ""
                if finish is not None and finish != FINISH_CANCELLED:
                    delta += detok.flush()
                if parsed.stop and delta:
                    cut = _first_stop(text_so_far, delta, parsed.stop)
                    if cut is not None:
                        self.engine.cancel(gen)
                        yield delta[:cut], FINISH_STOP, gen
                        return
                text_so_far += delta
                if finish == FINISH_ERROR:
                    raise RuntimeError("the model failed while generating")
                if delta or finish is not None:
                    yield delta, finish, gen
                if finish is not None:
                    return
        finally:
            self._queues.pop(gen.id, None)
            if gen.finish is None:
                self.engine.cancel(gen)  # the client went away mid-stream

    # ------------------------------------------------------------ request parsing

    def parse(self, body: Any, *, chat: bool) -> Parsed:
        if not isinstance(body, dict):
            raise BadRequest(None, "the body must be a JSON object")
        if chat:
            prompt = self._chat_prompt(body.get("messages"))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise BadRequest("prompt", "prompt must be a string (or a list of one string)")
        try:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] or [self.engine.eos_id]
        except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): not text
            raise BadRequest("prompt" if not chat else "messages",
                             "the text holds a lone surrogate (\\ud800-\\udfff), which is not a character") from None
        room = self.limits.max_seq_len - len(ids)
        if room < 1:
            raise BadRequest("prompt" if not chat else "messages",
                             f"the prompt is {len(ids)} tokens; this endpoint's max_seq_len is "
                             f"{self.limits.max_seq_len}, which leaves no room to generate")
        max_tokens = _int_field(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                                default=room if chat else 16)
        if len(ids) + max_tokens > self.limits.max_seq_len:
            raise BadRequest("max_tokens", f"the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceed this "
                                           f"endpoint's max_seq_len ({self.limits.max_seq_len}); at most {room} "
                                           f"new tokens fit")
        temperature = body.get("temperature", 1.0)
        if temperature is None:
            temperature = 1.0
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or not 0 <= temperature <= 2:
            raise BadRequest("temperature", "temperature must be a number from 0 to 2")
        top_p = body.get("top_p", 1.0)
        if top_p is None:
            top_p = 1.0
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) \
                or not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise BadRequest("top_p", "top_p must be a number greater than 0 and at most 1")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise BadRequest("seed", "seed must be a non-negative integer")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream", "stream must be true or false")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise BadRequest("stream_options", "stream_options must be an object")
        for name, unset in UNSUPPORTED_OPTIONS.items():
            value = body.get(name)
            if not any(value is u or (type(value) is type(u) and value == u) for u in unset):
                raise BadRequest(name, f"{name} is not supported by this server; leave it out")
        if body.get("n", 1) not in (1, None):
            raise BadRequest("n", "this server generates one choice per request (n = 1)")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise BadRequest("ignore_eos", "ignore_eos must be true or false")
        return Parsed(ids, max_tokens, float(temperature), seed, stream, bool(options.get("include_usage")),
                      _stop_strings(body.get("stop")), ignore_eos, float(top_p))

    def _chat_prompt(self, messages: Any) -> str:
        """The conversation as the model's chat template renders it, or as
        "role: content" lines ending with "assistant:" for a model without one."""
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages", "messages must be a non-empty list of {role, content}")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                    or message.get("role") not in ("system", "user", "assistant", "tool", "developer"):
                raise BadRequest(f"messages[{index}]", "each message needs a role (system, user, assistant) and "
                                                       "a string content")
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _int_field(body: dict, name: str, *, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(name, f"{name} must be a positive integer")
    return value


def _stop_strings(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS \
            or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop", f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS}")
    return stops


def _first_stop(before: str, delta: str, stops: list[str]) -> int | None:
    """Where in `delta` the text must end because a stop string completed in it."""
    text = before + delta
    best = None
    for stop in stops:
        at = text.find(stop, max(0, len(before) - len(stop) + 1))
        if at != -1 and (best is None or at < best):
            best = at
    return None if best is None else max(0, best - len(before))


def token_bytes_table(tokenizer: Any) -> list[bytes] | None:
    """Each token id's bytes, for tokenizers whose tokens are bytes (ByT5) or byte-level
    BPE (GPT-2's byte_decoder): their text is the UTF-8 decoding of the concatenated
    bytes, so a stream decodes incrementally at the cost of a table lookup. None for
    other tokenizers (sentencepiece and friends), which decode through the tokenizer."""
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    byte_decoder = getattr(tokenizer, "byte_decoder", None)
    table = []
    for index, token in enumerate(tokens):
        if index in special or token is None:
            table.append(b"")
        elif byte_decoder is not None:
            try:
                table.append(bytes(byte_decoder[c] for c in token))
            except KeyError:
                return None
        elif len(token) == 1 and ord(token) < 256 and type(tokenizer).__name__ == "ByT5Tokenizer":
            table.append(bytes([ord(token)]))
        else:
            return None
    return table


class _Detokenizer:
    """Incremental decoding: text appears once its bytes form whole characters
    (a byte-level tokenizer may split one character over several tokens)."""

    def __init__(self, tokenizer: Any, table: list[bytes] | None) -> None:
        self.tokenizer = tokenizer
        self.table = table
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def push(self, token: int) -> str:
        if self.table is not None:
            return self.utf8.decode(self.table[token] if 0 <= token < len(self.table) else b"")
        self.ids.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        if self.table is not None:
            return self.utf8.decode(b"", final=True)
        return self._delta(final=True)

    def _delta(self, *, final: bool) -> str:
        """vLLM's approach for other tokenizers: decode a short window again and emit
        what it added, unless it ends in an incomplete character."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


# ---------------------------------------------------------------- the ASGI app


def create_app(serving: ServingModel) -> Starlette:
    async def health(request: Request) -> Response:
        stats = serving.engine.stats()
        if serving.engine.draining:
            return JSONResponse({"status": "draining", **stats}, status_code=503,
                                headers={DRAINING_HEADER: "draining"})
        return JSONResponse({"status": "ok", "model": serving.model_name, **stats})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": serving.model_name, "object": "model",
                                                         "created": int(serving.started_at),
                                                         "owned_by": "neurondeck",
                                                         "max_model_len": serving.limits.max_seq_len}]})

    async def completions(request: Request) -> Response:
        return await _complete(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await _complete(request, chat=True)

    async def _complete(request: Request, *, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
            return JSONResponse(error_body("the body is not valid JSON", "invalid_request_error"), status_code=400)
        try:
            parsed = serving.parse(body, chat=chat)
        except BadRequest as exc:
            return JSONResponse(error_body(exc.message, "invalid_request_error", exc.param), status_code=400)
        stream = serving.generate(parsed)
        try:
            first = await stream.__anext__()
        except Saturated as exc:
            return JSONResponse(error_body(f"this replica is at its max_concurrent ({exc})", "rate_limit_error",
                                           code="saturated"),
                                status_code=429, headers={"Retry-After": str(RETRY_AFTER_S)})
        except Draining:
            return JSONResponse(error_body("this replica is draining", "unavailable", code="draining"),
                                status_code=503, headers={"Retry-After": str(RETRY_AFTER_S),
                                                          DRAINING_HEADER: "draining"})
        except RuntimeError as exc:
            return JSONResponse(error_body(str(exc), "server_error"), status_code=500)
        shape = _ChatShape(serving.model_name) if chat else _CompletionShape(serving.model_name)
        if parsed.stream:
            return StreamingResponse(_sse(shape, first, stream, parsed, serving), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, finish, gen = first
        pieces = [text]
        try:
            async for text, finish, gen in stream:
                pieces.append(text)
        except RuntimeError as exc:
            return JSONResponse(error_body(str(exc), "server_error"), status_code=500)
        return JSONResponse(shape.whole("".join(pieces), _finish_reason(finish), _usage(parsed, gen)))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes)


async def _sse(shape: Any, first: tuple, stream: AsyncIterator, parsed: Parsed,
               serving: ServingModel) -> AsyncIterator[bytes]:
    """The SSE body: an event per token. Tokens that are already waiting when one is
    written (a slow reader, a busy machine) go out in the same write, still one
    event each: fewer system calls exactly when the machine has least time for them."""

    def render(text: str, finish: str | None) -> bytes:
        if finish is None and text:
            return shape.text_event(text)  # the common case, one per token: pre-encoded framing
        return _event(shape.chunk(text, _finish_reason(finish) if finish else None))

    opening = shape.opening()
    text, finish, gen = first
    out = [_event(opening)] if opening is not None else []
    try:
        out.append(render(text, finish))
        while finish is None:
            if not serving.has_pending(gen):
                yield b"".join(out)
                out = []
            try:
                text, finish, gen = await stream.__anext__()
            except StopAsyncIteration:
                break
            out.append(render(text, finish))
    except RuntimeError as exc:
        out.append(_event(error_body(str(exc), "server_error")))
    if parsed.include_usage:
        out.append(_event({**shape.chunk("", None), "choices": [], "usage": _usage(parsed, gen)}))
    out.append(b"data: [DONE]\n\n")
    yield b"".join(out)


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _framing(sample: dict) -> tuple[bytes, bytes]:
    """The SSE event of `sample` split around its one text value (a NUL placeholder)."""
    before, after = _event(sample).split(b'"\\u0000"')
    return before, after


def _finish_reason(finish: str | None) -> str | None:
    return {FINISH_LENGTH: "length", FINISH_STOP: "stop"}.get(finish, finish)


def _usage(parsed: Parsed, gen: Generation) -> dict:
    prompt, completion = len(parsed.prompt_ids), len(gen.new_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _CompletionShape:
    def __init__(self, model: str) -> None:
        self.id, self.model, self.created = f"cmpl-{uuid.uuid4().hex}", model, int(time.time())
        self._framing = _framing(self.chunk("\0", None))

    def text_event(self, text: str) -> bytes:
        """`_event(self.chunk(text, None))`, without building and encoding the whole dict."""
        return self._framing[0] + json.dumps(text).encode() + self._framing[1]

    def opening(self) -> dict | None:
        return None

    def chunk(self, text: str, finish: str | None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    def whole(self, text: str, finish: str | None, usage: dict) -> dict:
        return {**self.chunk(text, finish), "usage": usage}


class _ChatShape:
    def __init__(self, model: str) -> None:
        self.id, self.model, self.created = f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time())
        self._framing = _framing(self.chunk("\0", None))

    def text_event(self, text: str) -> bytes:
        return self._framing[0] + json.dumps(text).encode() + self._framing[1]

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def opening(self) -> dict | None:
        return {**self._base("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}

    def chunk(self, text: str, finish: str | None) -> dict:
        delta = {"content": text} if text else {}
        return {**self._base("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def whole(self, text: str, finish: str | None, usage: dict) -> dict:
        return {**self._base("chat.completion"), "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}]}
