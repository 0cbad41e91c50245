"""A cpu replica: the OpenAI-compatible server (serve_app) for an HF causal LM, run by
uvicorn on a free port until asked to stop, then drained.

As a job (`serve_on_cpu(ctx)`, the cpu backend's serve kind): announces its URL once
its own /health answers, polls ctx.should_stop() (the runner's STOP file or SIGTERM),
then drains: new requests get 503 draining, those in progress finish (at most
drain_s), uvicorn closes its connections, and the job succeeds with what it served.

Standalone (tests, the bench, `make run` without Celery):
  python -m neuron_workers.backends.serve_cpu --model DIR [--port 0] [--ready-file F]
    [--max-batch-size 8] [--max-seq-len N] [--max-concurrent N] [--drain-s 30]
    [--stream-interval-ms 10]
SIGTERM drains the same way; the ready file gets {"url", "pid"} once healthy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from . import hf
from .base import JobContext, JobFailed, input_path, require_model_format
from .serve_app import Limits, ServingModel, create_app
from .serve_handoff import (
    ServeSettings,
    announce_draining,
    announce_ready,
    bind_free_port,
    probe_health,
    serve_settings,
    url_for,
)

STOP_POLL_S = 0.1


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the replica decides when to stop
    (after draining), from its job's stop flag."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def load_serving(model_path: Path, settings: ServeSettings, model_name: str) -> ServingModel:
    model, tokenizer = hf.cached_hf_model(model_path)
    eos, pad = hf.token_ids(tokenizer)
    limit = hf.max_positions(model)
    seq = settings.max_seq_len or limit or 2048
    if limit is not None and seq > limit:
        raise JobFailed("bad_input", f"max_seq_len {seq} exceeds the model's {limit} positions")
    limits = Limits(max_batch_size=settings.max_batch_size, max_seq_len=seq, max_concurrent=settings.max_concurrent,
                    stream_interval_s=settings.stream_interval_ms / 1000)
    return ServingModel(model=model, tokenizer=tokenizer, model_name=model_name, limits=limits, eos_id=eos,
                        pad_id=pad)


async def serve_until_stopped(serving: ServingModel, settings: ServeSettings, *, should_stop: Callable[[], bool],
                              on_ready: Callable[[str], None], on_draining: Callable[[], None]) -> dict:
    """Run the server on a free port until should_stop(), then drain; returns counters."""
    sock = bind_free_port(settings.bind_host)
    url = url_for(settings.advertise_host, sock.getsockname()[1])
    config = uvicorn.Config(create_app(serving), lifespan="off", log_level="warning", access_log=False,
                            http="httptools", timeout_keep_alive=30,
                            timeout_graceful_shutdown=max(1, settings.drain_s))
    server = _Server(config)
    serving.start(asyncio.get_running_loop())
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise JobFailed("runtime_error", "the HTTP server stopped before it started")
            await asyncio.sleep(0.005)
        loop = asyncio.get_running_loop()
        while not await loop.run_in_executor(None, probe_health, url):
            if should_stop() or task.done():
                break
            await asyncio.sleep(0.05)
        else:
            on_ready(url)
        while not should_stop() and not task.done():
            await asyncio.sleep(STOP_POLL_S)
        drained = await _drain(serving, settings.drain_s, on_draining)
        server.should_exit = True
        await task
    finally:
        serving.engine.stop()
        sock.close()
    return {**serving.engine.stats(), "url": url, "drained": drained}


async def _drain(serving: ServingModel, drain_s: float, on_draining: Callable[[], None]) -> bool:
    """Refuse new requests, wait for those in progress; True if they all finished."""
    serving.engine.drain()
    on_draining()
    deadline = time.monotonic() + drain_s
    while serving.engine.outstanding and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    # A finished request's last chunks are still being written: give them a moment.
    await asyncio.sleep(0.05)
    return serving.engine.outstanding == 0


def serve_on_cpu(ctx: JobContext) -> dict:
    """The cpu backend's serve kind: see the module docstring."""
    if require_model_format(ctx, ["hf", "torchscript", "neuron"]) != "hf":
        raise JobFailed("bad_input", "a cpu replica serves an HF model folder (a compiled artifact has a fixed "
                                     "batch shape, which dynamic batching cannot use)")
    settings = serve_settings(ctx.spec)
    model_path = input_path(ctx, "model_path")
    with hf.torch_threads(hf.small_model_threads(model_path)):
        serving = load_serving(model_path, settings, str(ctx.spec.get("model_name") or model_path.name))
        stats = asyncio.run(serve_until_stopped(
            serving, settings, should_stop=ctx.should_stop,
            on_ready=lambda url: announce_ready(ctx, settings, url),
            on_draining=lambda: announce_draining(ctx, settings)))
    ctx.log(f"stopped: {stats['finished_requests']} requests, {stats['generated_tokens']} tokens served")
    return {"served_requests": stats["finished_requests"], "generated_tokens": stats["generated_tokens"],
            "forward_passes": stats["forward_passes"], "largest_batch": stats["largest_batch"],
            "drained": stats["drained"], "url": stats["url"], "backend": "cpu"}


# ---------------------------------------------------------------- standalone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-batch-size", type=int)
    parser.add_argument("--max-seq-len", type=int)
    parser.add_argument("--max-concurrent", type=int)
    parser.add_argument("--drain-s", type=int, default=30)
    parser.add_argument("--stream-interval-ms", type=int)
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    spec: dict[str, Any] = {"max_batch_size": args.max_batch_size, "max_seq_len": args.max_seq_len,
                            "max_concurrent": args.max_concurrent, "drain_s": args.drain_s, "bind_host": args.host,
                            "stream_interval_ms": args.stream_interval_ms}
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))

    def ready(url: str) -> None:
        if args.ready_file:
            tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
            tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
            os.replace(tmp, args.ready_file)
        print(f"serving at {url}", flush=True)

    try:
        settings = serve_settings({k: v for k, v in spec.items() if v is not None})
        with hf.torch_threads(args.threads):
            serving = load_serving(args.model, settings, args.model.name)
            stats = asyncio.run(serve_until_stopped(serving, settings, should_stop=lambda: stop["flag"],
                                                    on_ready=ready, on_draining=lambda: print("draining", flush=True)))
    except JobFailed as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(json.dumps(stats), flush=True)
    return 0 if stats["drained"] else 1


if __name__ == "__main__":
    sys.exit(main())
