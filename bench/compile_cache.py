"""Compile cache benchmark (issue 19): how fast a cached compile is done, how many real
compilations identical concurrent submissions cause, how good the pre-submit estimate
is, and how fast the pre-submit answer is with 10,000 cached entries.

Run as `.venv/bin/python bench/compile_cache.py` (PostgreSQL at 127.0.0.1:5432 and
Redis at 127.0.0.1:6379 must be up). It starts what it needs: a fresh database
(neurondeck_bench_compile_cache, dropped at the end), Redis db 10 (flushed), a
scheduler worker and a cpu host worker with 4 job slots, the tiny model. Requests
go through the whole Django stack in this process (django.test.Client with an API
token: middleware, auth, the API, the form, submit); jobs run on the real workers.

Measured, each with its baseline from the same run:
  hit_submit_to_done_p50_ms      a compile whose configuration is cached, submit to
                                 succeeded (baseline: the first, uncached compile of it)
  concurrent_identical_compiles  real compilations for 8 identical submissions at
                                 once (baseline: how many of them missed the cache at
                                 submit, i.e. would have compiled without claims)
  estimate_error_median          |estimate - actual| / actual of the dry run's estimate
                                 over cpu compiles of several sizes, actual = start to
                                 finish (baseline: the plain median of past compiles)
  lookup_p95_ms                  GET /api/v1/compile-cache/answer with 10,000 cached
                                 entries of the model, and lookup_cpu_p50_ms this
                                 process's CPU per request (baseline: the same for a
                                 model of the same files with none, interleaved)

Targets: hit_submit_to_done_p50_ms < 100, concurrent_identical_compiles 1,
lookup_p95_ms < 50 (estimate_error_median is reported). The last line is one JSON
object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support.harness import (  # noqa: E402
    Bench, bench_run, log, percentile, redis_url, seed_team, start_workers, wait_finished,
)

BENCH = Bench(db_name="neurondeck_bench_compile_cache",
              redis_url=redis_url("compile_cache"),
              host="bench-cache-host", workdir=Path())
SLOTS = 4


class Api:
    def __init__(self, token: str, model_id: int):
        from django.test import Client

        # X-Forwarded-Proto: https, as the site's TLS-terminating proxy sets it
        # (a DEBUG-off site redirects plain HTTP).
        self.client = Client(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_FORWARDED_PROTO="https")
        self.token, self.model_id = token, model_id

    def body(self, **shape) -> dict:
        return {"team": "bench", "kind": "compile", "family": "cpu", "cores": 1, "model": self.model_id,
                "batch_size": 1, "sequence_length": 16, **shape}

    def submit(self, **shape) -> dict:
        response = self.client.post("/api/v1/jobs", data=json.dumps(self.body(**shape)),
                                    content_type="application/json", secure=True)
        assert response.status_code == 201, (response.status_code, response.content, dict(response.headers))
        return response.json()

    def answer(self, **shape) -> dict:
        query = "&".join(f"{k}={v}" for k, v in self.body(**shape).items() if k != "kind")
        response = self.client.get(f"/api/v1/compile-cache/answer?{query}", secure=True)
        assert response.status_code == 200, response.content
        return response.json()


def run_one(api: Api, **shape) -> tuple[dict, float]:
    """Submit, wait for the end; (job document, submit-to-done ms)."""
    from jobs.models import Job

    started = time.perf_counter()
    doc = api.submit(**shape)
    if doc["status"] not in ("succeeded", "failed", "cancelled"):
        wait_finished([doc["id"]], 300)
    elapsed = (time.perf_counter() - started) * 1000
    job = Job.objects.get(pk=doc["id"])
    assert job.status == "succeeded", (job.reason, job.result)
    return {"id": job.pk, "cache_hit": job.cache_hit, "started_at": job.started_at, "finished_at": job.finished_at}, elapsed


def hit_phase(api: Api, runs: int) -> dict:
    first, miss_ms = run_one(api, sequence_length=16)
    assert not first["cache_hit"]
    hits = []
    for _ in range(runs):
        doc, ms = run_one(api, sequence_length=16)
        assert doc["cache_hit"]
        hits.append(ms)
    return {"hit_submit_to_done_p50_ms": percentile(hits, 50), "hit_submit_to_done_p95_ms": percentile(hits, 95),
            "baseline_miss_submit_to_done_ms": miss_ms}


def concurrent_phase(api: Api, n: int) -> dict:
    from jobs.models import Job

    with ThreadPoolExecutor(n) as pool:
        docs = list(pool.map(lambda _: api.submit(sequence_length=24), range(n)))
    from django.db import connections
    connections.close_all()  # the pool threads' connections
    missed_at_submit = sum(1 for d in docs if d["status"] != "succeeded")
    wait_finished([d["id"] for d in docs], 600)
    jobs = list(Job.objects.filter(pk__in=[d["id"] for d in docs]))
    assert all(j.status == "succeeded" for j in jobs), [(j.status, j.reason) for j in jobs]
    return {"concurrent_identical_compiles": sum(1 for j in jobs if not j.cache_hit),
            "concurrent_submissions": n, "baseline_compiles_without_claims": missed_at_submit}


def estimate_phase(api: Api) -> dict:
    """Compiles of several sizes in an order that mixes them; before each, the dry run's
    estimate (from the compiles so far) and the naive one (their plain median)."""
    from jobs.compile_cache.lookup import compile_history

    shapes = [(1, 8), (1, 32), (2, 16), (1, 64), (1, 12), (2, 48), (1, 96), (1, 40), (2, 32), (1, 128), (1, 20),
              (2, 64)]
    errors, naive = [], []
    for batch, seq in shapes:
        estimate = api.answer(batch_size=batch, sequence_length=seq)
        past = [s for _, s in compile_history("cpu")]
        doc, _ = run_one(api, batch_size=batch, sequence_length=seq)
        actual = (doc["finished_at"] - doc["started_at"]).total_seconds()
        if estimate.get("estimate_s") is not None and past:
            errors.append(abs(estimate["estimate_s"] - actual) / actual)
            naive.append(abs(statistics.median(past) - actual) / actual)
    return {"estimate_error_median": statistics.median(errors), "estimate_samples": len(errors),
            "baseline_naive_median_error": statistics.median(naive)}


def lookup_phase(api: Api, entries: int, runs: int) -> dict:
    """The pre-submit answer for a model with `entries` cached configurations and,
    interleaved with it (so the machine's load hits both alike), for a model of the
    same files with none; wall time and this process's CPU time per request."""
    from jobs.models import ModelAsset

    loaded_model = ModelAsset.objects.get(pk=api.model_id)
    bare = ModelAsset.objects.get(pk=api.model_id)
    bare.pk, bare.name, bare.version = None, f"{loaded_model.name}-bare", 1
    bare.save()
    seed_entries(loaded_model.pk, entries)
    loaded, baseline = Api(api.token, loaded_model.pk), Api(api.token, bare.pk)
    for client in (loaded, baseline):  # warm-up, not timed
        client.answer(sequence_length=16)
        client.answer(sequence_length=99)
    times: dict[str, tuple[list[float], list[float]]] = {"loaded": ([], []), "baseline": ([], [])}
    for i in range(runs):
        # hits and misses of the loaded model's cache; misses for the bare one
        shape = {"sequence_length": 16} if i % 2 else {"sequence_length": 100 + i % 150}
        for name, client in (("loaded", loaded), ("baseline", baseline)) if i % 4 < 2 else \
                (("baseline", baseline), ("loaded", loaded)):
            started, cpu = time.perf_counter(), time.process_time()
            client.answer(**shape)
            times[name][0].append((time.perf_counter() - started) * 1000)
            times[name][1].append((time.process_time() - cpu) * 1000)
    (wall, cpu), (base_wall, base_cpu) = times["loaded"], times["baseline"]
    return {"lookup_p95_ms": percentile(wall, 95), "lookup_p50_ms": percentile(wall, 50),
            "lookup_cpu_p50_ms": percentile(cpu, 50),
            "baseline_lookup_p95_ms_no_entries": percentile(base_wall, 95),
            "baseline_lookup_p50_ms_no_entries": percentile(base_wall, 50),
            "baseline_lookup_cpu_p50_ms_no_entries": percentile(base_cpu, 50), "cached_entries": entries}


def seed_entries(model_id: int, n: int) -> None:
    """`n` cached configurations of the model (rows only: the lookup reads no files)."""
    import hashlib

    from django.utils import timezone

    from jobs.models import ModelAsset

    base = ModelAsset.objects.get(pk=model_id)
    now = timezone.now()
    rows = [ModelAsset(team_id=base.team_id, name=f"{base.name}-seeded", version=i + 1, format="torchscript",
                       parent=base, path=f"seeded/{i}", size_bytes=1 << 20,
                       compile_key=hashlib.sha256(f"seeded-{i}".encode()).hexdigest(),
                       meta={"batch_size": 1 + i % 8, "sequence_length": 16 * (1 + i % 64)}, created_by_id=base.created_by_id,
                       last_used_at=now) for i in range(n)]
    ModelAsset.objects.bulk_create(rows, batch_size=2000)
    # Fresh planner statistics, as autovacuum keeps them for a table that grew over
    # time: right after a bulk insert PostgreSQL still plans for the few rows before.
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {ModelAsset._meta.db_table}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=20)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    with bench_run(BENCH, "bench-compile-cache", keep=args.keep, COMPILE_CACHE_MAX_BYTES="0") as procs:
        from jobs.teams.tokens import token_create

        team, user, model = seed_team(SLOTS, BENCH.host)
        raw, _ = token_create(user=user, name="bench")
        procs.heartbeat(BENCH.host)
        start_workers(procs, BENCH.host, SLOTS)
        api = Api(raw, model.pk)
        log(f"system started (logs in {BENCH.workdir})")
        report = {}
        log("cached compile, end to end …")
        report.update(hit_phase(api, args.hits))
        log("8 identical compiles at once …")
        report.update(concurrent_phase(api, 8))
        log("estimates against actual compile times …")
        report.update(estimate_phase(api))
        log(f"pre-submit lookup with {args.entries} cached entries …")
        report.update(lookup_phase(api, args.entries, args.lookups))
        report["loadavg_1m_at_end"], report["cpus"] = os.getloadavg()[0], os.cpu_count()
        report = {k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}
        print(json.dumps(report))
        return report


if __name__ == "__main__":
    main()
