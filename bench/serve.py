"""Inference endpoints, data plane: dynamic batching, time to first token, the
gateway's overhead, a rollout and a replica crash under load.

Starts what the figures are about and nothing else: cpu replicas of the tiny
model (`python -m neuron_workers.backends.serve_cpu`, as a serve job runs them) and
the gateway (`uvicorn jobs.gateway.app:app`, as the Procfile runs it) against a
throw-away database (a team, a token, an Endpoint) and Redis db. Clients stream
through the gateway's stable URL with an API token. The replica set the gateway
sees is driven through the routes key the control plane publishes
(nd:endpoint:<id>:routes), in the order its rollout and crash handling use:
new replicas ready -> routes switch -> old ones out of the routes for
DRAIN_ROUTE_GRACE_S -> SIGTERM (drain) / a crashed one removed after a worker's
detection delay.

Figures (last line, one JSON object):
- batching_gain: tokens/s with 16 concurrent streaming clients over tokens/s one
  request at a time, same replica, same run (baseline: tokens_per_s_sequential); the
  two alternate in halves (--sequential and --rounds are split in two).
  Beside it engine_batching_gain: the batching engine alone, in-process, no HTTP (the
  limit the end-to-end gain approaches as the HTTP path's CPU per token shrinks), and
  cpu_ms_per_token by process (replica, gateway, client): per-token HTTP work does not
  batch, and on a shared 2-core machine every process competes for the same CPUs.
- ttft_p50_ms / ttft_p95_ms: time to first token at 16 concurrent, through the gateway.
- proxy_overhead_p50_ms: p50 TTFT through the gateway minus p50 TTFT direct to the
  replica, requests one at a time, gateway and direct interleaved.
- rollout_failed_requests: requests that failed (not 200, stream cut, tokens missing)
  while 16 clients ran through a rollout (replica A -> replica C).
- replica_kill_failed_requests / replica_kill_started_on_killed: failures when one of
  two replicas is killed with SIGKILL under 16-client load, and how many requests that
  replica had started (in flight) at the kill: only those may fail.

Usage: .venv/bin/python bench/serve.py [--tokens 64] [--sequential 8] [--rounds 4]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support.harness import (  # noqa: E402
    PY, ROOT, Bench, exclusive_run, free_port, log, percentile, redis_url,
)

BENCH = Bench(db_name="neurondeck_bench_serve",
              redis_url=redis_url("serve"),
              host="bench-serve", workdir=Path(tempfile.mkdtemp(prefix="nd-bench-serve-")))
CLIENTS = 16
DRAIN_ROUTE_GRACE_S = 3.0  # what jobs.endpoints waits between taking a replica out of the routes and stopping it
CRASH_DETECTION_S = 1.0  # a worker notices its job process died and the routes are republished


@dataclass
class Result:
    ok: bool
    status: int
    replica: str
    started: float
    ended: float
    ttft_ms: float | None
    tokens: int
    error: str = ""


@dataclass
class Stack:
    token: str
    endpoint_id: int
    gateway: str
    gateway_pid: int
    replicas: dict[str, "Replica"] = field(default_factory=dict)


@dataclass
class Replica:
    rid: int
    url: str
    proc: subprocess.Popen


def start_replica(rid: int, model: Path, env: dict) -> Replica:
    ready = BENCH.workdir / f"replica-{rid}.json"
    log_file = (BENCH.workdir / f"replica-{rid}.log").open("wb")
    proc = subprocess.Popen([PY, "-m", "neuron_workers.backends.serve_cpu", "--model", str(model),
                             "--max-batch-size", "16", "--max-concurrent", "64", "--drain-s", "60",
                             "--ready-file", str(ready)], stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"replica {rid} did not start: {(BENCH.workdir / f'replica-{rid}.log').read_text()}")
        time.sleep(0.1)
    return Replica(rid, json.loads(ready.read_text())["url"], proc)


def start_gateway(env: dict) -> tuple[str, subprocess.Popen]:
    port = free_port()
    out = (BENCH.workdir / "gateway.log").open("wb")
    proc = subprocess.Popen([PY, "-m", "uvicorn", "jobs.gateway.app:app", "--host", "127.0.0.1", "--port", str(port),
                             "--http", "httptools", "--no-access-log", "--log-level", "warning"],
                            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url, proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the gateway did not start: {(BENCH.workdir / 'gateway.log').read_text()}")
        time.sleep(0.1)


ROUTES: dict[int, list[Replica]] = {}


def publish_routes(endpoint_id: int, replicas: list[Replica]) -> None:
    """Set the routable replicas, as the control plane does on a change; republish_routes
    repeats it, as the control plane's reconcile tick does."""
    import redis

    from jobs.gateway.directory import routes_key

    ROUTES[endpoint_id] = list(replicas)
    redis.Redis.from_url(BENCH.redis_url).set(routes_key(endpoint_id), json.dumps({
        "serving_revision": 1, "state": "active", "replicas": [{"id": r.rid, "url": r.url} for r in replicas]}))


async def republish_routes(every_s: float = 1.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        for endpoint_id, replicas in list(ROUTES.items()):
            await asyncio.to_thread(publish_routes, endpoint_id, replicas)


def seed() -> tuple[str, int, Path]:
    """Team "bench" with a member, a submit-scope token, the tiny model and an Endpoint."""
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from jobs.models import Endpoint, Role
    from jobs.teams.services import membership_set, team_create
    from jobs.teams.tokens import token_create
    from neuron_workers.backends.tinymodel import create_tiny_model

    user = get_user_model().objects.create_user("bench", "bench@example.com", "bench-password")
    team = team_create(slug="bench", name="Bench")
    membership_set(team=team, user=user, role=Role.MEMBER)
    raw, _ = token_create(user=user, name="bench", scope="submit")
    endpoint = Endpoint.objects.create(team=team, name="chat", serving_revision=1, max_replicas=2,
                                       options={"max_batch_size": 16, "max_concurrent": 64})
    model = create_tiny_model(Path(settings.STORAGE_ROOT) / "models" / "bench" / "tiny")
    return raw, endpoint.pk, model


# ---------------------------------------------------------------- clients


async def one_request(client, url: str, token: str | None, tokens: int) -> Result:
    body = {"prompt": "the quick brown fox", "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    started = time.perf_counter()
    ttft, got, done, status, replica = None, 0, False, 0, ""
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            status, replica = r.status_code, r.headers.get("x-neurondeck-replica", "")
            if status != 200:
                message = json.loads(await r.aread()).get("error", {}).get("message", "")
                return Result(False, status, replica, started, time.perf_counter(), None, 0,
                              f"status {status}: {message[:60]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                if ttft is None:
                    ttft = (time.perf_counter() - started) * 1000
                got += 1
    except Exception as exc:  # noqa: BLE001 - a failed request is a figure here
        return Result(False, status, replica, started, time.perf_counter(), ttft, got, repr(exc))
    ok = done and got == tokens
    return Result(ok, status, replica, started, time.perf_counter(), ttft, got, "" if ok else "stream incomplete")


async def closed_loop(url: str, token: str | None, tokens: int, clients: int, *, rounds: int | None = None,
                      stop: asyncio.Event | None = None) -> tuple[list[Result], float]:
    """`clients` clients, each sending its next request when the last one ends, for
    `rounds` requests each or until `stop` is set. Returns (results, wall seconds)."""
    import httpx

    results: list[Result] = []
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        async def worker() -> None:
            n = 0
            while (rounds is None or n < rounds) and not (stop is not None and stop.is_set()):
                results.append(await one_request(client, url, token, tokens))
                n += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return results, time.perf_counter() - started


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_of(stack: "Stack") -> dict[str, float]:
    return {"replica": cpu_s(stack.replicas["a"].proc.pid), "gateway": cpu_s(stack.gateway_pid),
            "client": cpu_s(os.getpid())}


def cpu_ms_per_token(before: dict, after: dict, results: list[Result]) -> dict[str, float]:
    tokens = max(1, sum(r.tokens for r in results))
    return {name: round((after[name] - before[name]) * 1000 / tokens, 4) for name in before}


def pct(values: list[float], q: float) -> float | None:
    """A percentile rounded for the report; None when nothing was measured."""
    return round(percentile(values, q), 3) if values else None


def errors(results: list[Result]) -> dict[str, int]:
    """How the failed requests failed (the three most common reasons)."""
    counts: dict[str, int] = {}
    for r in results:
        if not r.ok:
            reason = f"{r.error[:80]} after {r.tokens} tokens"
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:3])


def tokens_per_s(results: list[Result], wall: float) -> float:
    return sum(r.tokens for r in results) / wall


async def overhead(stack: Stack, replica: Replica, pairs: int) -> tuple[float | None, float | None]:
    """p50 TTFT through the gateway and direct, one request at a time, interleaved."""
    import httpx

    through, direct = [], []
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(3):  # warm both paths' connections
            await one_request(client, f"{stack.gateway}{PATH}", stack.token, 2)
            await one_request(client, f"{replica.url}/v1/completions", None, 2)
        for _ in range(pairs):
            g = await one_request(client, f"{stack.gateway}{PATH}", stack.token, 2)
            d = await one_request(client, f"{replica.url}/v1/completions", None, 2)
            if g.ok and d.ok:
                through.append(g.ttft_ms)
                direct.append(d.ttft_ms)
    return pct(through, 50), pct(direct, 50)


PATH = "/endpoints/bench/chat/v1/completions"


async def under_load(stack: Stack, tokens: int, action) -> tuple[list[Result], dict]:
    """16 clients through the gateway while `action()` runs (it returns facts)."""
    stop = asyncio.Event()
    load = asyncio.create_task(closed_loop(f"{stack.gateway}{PATH}", stack.token, tokens, CLIENTS, stop=stop))
    await asyncio.sleep(2.0)
    facts = await action()
    await asyncio.sleep(2.0)
    stop.set()
    results, _ = await load
    return results, facts


def engine_gain(model: Path, tokens: int, requests: int) -> dict:
    """The batching engine alone, in this process, no HTTP: tokens/s of 16 requests at
    once over the same requests one at a time. What dynamic batching itself gives on
    this machine now, beside which the end-to-end gain shows what the HTTP path costs."""
    import threading

    import torch

    from neuron_workers.backends import hf
    from neuron_workers.backends.serve_engine import BatchingEngine, Generation

    torch.set_num_threads(1)
    lm, tokenizer = hf.cached_hf_model(model)
    eos, pad = hf.token_ids(tokenizer)
    done = threading.Semaphore(0)
    engine = BatchingEngine(lm, eos_id=eos, pad_id=pad, max_batch_size=CLIENTS, max_concurrent=64,
                            deliver=lambda events: [done.release() for _, _, finish in events if finish])
    engine.start()
    prompt = hf.encode_prompt(tokenizer, "the quick brown fox")

    def run(at_once: int) -> float:
        started = time.perf_counter()
        for _ in range(requests // at_once):
            for _ in range(at_once):
                engine.submit(Generation(prompt, tokens, ignore_eos=True))
            for _ in range(at_once):
                done.acquire()
        return requests * tokens / (time.perf_counter() - started)

    try:
        run(CLIENTS)  # warm-up
        alone, batched = run(1), run(CLIENTS)
    finally:
        engine.stop()
    return {"engine_batching_gain": round(batched / alone, 2), "engine_tokens_per_s_sequential": round(alone, 1),
            "engine_tokens_per_s_batched": round(batched, 1)}


def stop_replica(replica: Replica, sig: int) -> None:
    replica.proc.send_signal(sig)
    replica.proc.wait(timeout=120)


async def run(args, stack: Stack, model: Path, env: dict) -> dict:
    a = stack.replicas["a"]
    publish_routes(stack.endpoint_id, [a])
    republisher = asyncio.create_task(republish_routes())
    url = f"{stack.gateway}{PATH}"
    log("warming up")
    await closed_loop(url, stack.token, args.tokens, CLIENTS, rounds=1)
    await closed_loop(url, stack.token, args.tokens, 1, rounds=2)

    # One at a time and 16 at once alternate, in halves, so that a change in the
    # shared machine's load between the two phases does not make the ratio.
    seq, conc, seq_wall, conc_wall = [], [], 0.0, 0.0
    seq_cpu, conc_cpu = dict.fromkeys(cpu_of(stack), 0.0), dict.fromkeys(cpu_of(stack), 0.0)
    for half in (1, 2):
        log(f"one request at a time ({half}/2): {args.sequential // 2} requests of {args.tokens} tokens")
        cpu0 = cpu_of(stack)
        results, wall = await closed_loop(url, stack.token, args.tokens, 1, rounds=args.sequential // 2)
        cpu1 = cpu_of(stack)
        seq, seq_wall = seq + results, seq_wall + wall
        log(f"{CLIENTS} concurrent clients ({half}/2): {args.rounds // 2} requests each")
        results, wall = await closed_loop(url, stack.token, args.tokens, CLIENTS, rounds=args.rounds // 2)
        cpu2 = cpu_of(stack)
        conc, conc_wall = conc + results, conc_wall + wall
        for name in seq_cpu:
            seq_cpu[name] += cpu1[name] - cpu0[name]
            conc_cpu[name] += cpu2[name] - cpu1[name]
    seq_rate, conc_rate = tokens_per_s(seq, seq_wall), tokens_per_s(conc, conc_wall)
    ttfts = [r.ttft_ms for r in conc if r.ttft_ms is not None]

    log("gateway overhead: TTFT through the gateway vs direct, interleaved")
    via, direct = await overhead(stack, a, args.pairs)

    log("rollout under load: replica a -> replica c")

    async def rollout() -> dict:
        c = await asyncio.to_thread(start_replica, 3, model, env)
        stack.replicas["c"] = c
        publish_routes(stack.endpoint_id, [c])  # the new revision is ready: traffic shifts
        await asyncio.sleep(DRAIN_ROUTE_GRACE_S)  # the old one is out of the routes, still up
        await asyncio.to_thread(stop_replica, a, signal.SIGTERM)  # drain: in-flight requests finish
        return {"old_replica_exit": a.proc.returncode}

    rolled, rollout_facts = await under_load(stack, args.tokens, rollout)

    log("replica crash under load: two replicas, one killed with SIGKILL")
    b = await asyncio.to_thread(start_replica, 2, model, env)
    stack.replicas["b"] = b
    c = stack.replicas["c"]
    publish_routes(stack.endpoint_id, [b, c])
    kill_at: list[float] = []

    async def crash() -> dict:
        await asyncio.sleep(1.0)
        kill_at.append(time.perf_counter())
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait()
        await asyncio.sleep(CRASH_DETECTION_S)
        publish_routes(stack.endpoint_id, [c])  # the worker saw the job die; the control plane republished
        return {}

    crashed, _ = await under_load(stack, args.tokens, crash)
    republisher.cancel()
    log("the batching engine alone, no HTTP")
    engine = await asyncio.to_thread(engine_gain, model, args.tokens, CLIENTS)
    started_on_killed = [r for r in crashed if r.replica == str(b.rid) and r.started <= kill_at[0] <= r.ended]
    failed_kill = [r for r in crashed if not r.ok]

    return {
        "batching_gain": round(conc_rate / seq_rate, 2),
        "tokens_per_s_concurrent": round(conc_rate, 1),
        "tokens_per_s_sequential": round(seq_rate, 1),
        **engine,
        "cpu_ms_per_token_sequential": cpu_ms_per_token(dict.fromkeys(seq_cpu, 0.0), seq_cpu, seq),
        "cpu_ms_per_token_concurrent": cpu_ms_per_token(dict.fromkeys(conc_cpu, 0.0), conc_cpu, conc),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "ttft_p50_ms": pct(ttfts, 50),
        "ttft_p95_ms": pct(ttfts, 95),
        "proxy_overhead_p50_ms": round(via - direct, 3) if via is not None and direct is not None else None,
        "ttft_gateway_p50_ms": via,
        "ttft_direct_p50_ms": direct,
        "rollout_failed_requests": sum(not r.ok for r in rolled),
        "rollout_requests": len(rolled),
        "rollout_errors": errors(rolled),
        "rollout_old_replica_exit": rollout_facts["old_replica_exit"],
        "replica_kill_failed_requests": len(failed_kill),
        "replica_kill_started_on_killed": len(started_on_killed),
        "replica_kill_failed_not_on_killed": sum(1 for r in failed_kill if r not in started_on_killed),
        "replica_kill_requests": len(crashed),
        "replica_kill_errors": errors(crashed),
        "failed_in_throughput_runs": sum(not r.ok for r in seq + conc),
        "clients": CLIENTS, "tokens_per_request": args.tokens,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sequential", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (replica and gateway logs)")
    args = parser.parse_args()
    _lock = exclusive_run("bench-serve")  # noqa: F841 - held until exit
    env = BENCH.environment(ENDPOINT_COLD_START_WAIT_S="5", ENDPOINT_QUEUE_WAIT_S="1")
    BENCH.setup(env)
    procs: list[subprocess.Popen] = []
    try:
        token, endpoint_id, model = seed()
        log("starting replica a and the gateway")
        a = start_replica(1, model, env)
        procs.append(a.proc)
        gateway, gproc = start_gateway(env)
        procs.append(gproc)
        stack = Stack(token=token, endpoint_id=endpoint_id, gateway=gateway, gateway_pid=gproc.pid, replicas={"a": a})
        try:
            figures = asyncio.run(run(args, stack, model, env))
        finally:
            procs += [r.proc for r in stack.replicas.values()]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        BENCH.teardown()
        if not args.keep:
            shutil.rmtree(BENCH.workdir, ignore_errors=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
