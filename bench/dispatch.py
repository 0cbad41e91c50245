"""Dispatch benchmark: how fast do short real jobs get through the whole system?

Run as `.venv/bin/python bench/dispatch.py` (PostgreSQL at 127.0.0.1:5432 and Redis
at 127.0.0.1:6379 must be up). It starts everything itself: a fresh PostgreSQL
database (neurondeck_bench_dispatch, dropped at the end), Redis db 14 (flushed),
gunicorn serving the app, a scheduler worker with beat and a CPU host worker with
several job slots, a registered cpu Host and the tiny model.

Jobs are real inference jobs (one short prompt, 1 new token, the tiny model),
submitted through POST /api/v1/jobs with an API token. Times come from the job
rows: submit = the client's clock just before the request; running = started_at
(the worker's claim); finished = finished_at (the outcome recorded). All on one
machine, so the clocks agree.

Phases:
  celery   a bare Celery task (bench.probe, on the host worker's queue) sent one at
           a time (round trip) and then in a burst (tasks/s): the floor any
           Celery-based dispatch pays.
  latency  jobs one at a time with free capacity: submit→running, submit→finished.
  burst    many jobs submitted at once by several client threads: jobs/s from the
           first submit to the last finish, the CPU each service spent per job, and
           how many job processes the jobs ran in (warm runners reuse them).

Also reported: submit_statements, the SQL statements one POST /api/v1/jobs issues
through Django, counted in this process with Django's test client (its transaction's
BEGIN and COMMIT are not among them: Django does not log them).
During the burst: burst_dispatch_runs (the dispatch runs that placed its jobs) and,
sampled from pg_stat_activity, the mean number of backends waiting for a row lock and
of submits among them queued behind their team's quota row (LockSampler).
`--profile DIR` records each service during the burst with py-spy (flame graphs
DIR/<service>.svg, or collapsed stacks with --profile-format raw; the worker's
includes its job processes). Sampling perturbs the CPU figures a little.

The last line is one JSON object (see REPORT_KEYS).
"""
from __future__ import annotations

import argparse
import http.client
import signal
import subprocess
import json
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support.harness import (  # noqa: E402
    PG, PY, Bench, CpuMeter, Processes, bench_run, free_port, log, percentile, redis_url, seed_team,
    start_workers, wait_finished,
)

BENCH = Bench(db_name="neurondeck_bench_dispatch", redis_url=redis_url("dispatch"),
              host="bench-host", workdir=Path())
REPORT_KEYS = ("submit_to_running_p50_ms", "submit_to_running_p95_ms", "submit_to_finished_p50_ms",
               "jobs_per_s", "celery_roundtrip_p50_ms", "celery_tasks_per_s")


# --- the system under test ------------------------------------------------------------

def seed(slots: int) -> dict:
    """The bench team, host and tiny model (bench.support.harness.seed_team) and an API token."""
    from jobs.teams.tokens import token_create

    _, user, model = seed_team(slots, BENCH.host)
    raw, _ = token_create(user=user, name="bench")
    return {"token": raw, "model": model.pk}


def start_system(procs: Processes, port: int, args) -> None:
    """gunicorn (as in webapp/Procfile), the scheduler and the host worker (with the probe)."""
    procs.start("web", [PY, "-m", "gunicorn", "webapp.wsgi", "-b", f"127.0.0.1:{port}", "-w", str(args.web_workers),
                        "--threads", str(args.web_threads), "--log-level", "warning"])
    start_workers(procs, BENCH.host, args.slots, "--include", "bench.support.celery_probe")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/v1/docs")
            if conn.getresponse().status < 500:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("gunicorn did not answer")


# --- clients ----------------------------------------------------------------------------

class Api:
    """A keep-alive HTTP client for POST /api/v1/jobs (one per thread)."""

    def __init__(self, port: int, token: str, model: int):
        self.port, self.token, self.model = port, token, model
        self.local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        return conn

    def submit(self) -> tuple[int, float]:
        """Submit one inference job; returns (job id, submit time as unix seconds)."""
        body = json.dumps({"team": "bench", "kind": "inference", "model": self.model, "prompts": ["Hi"],
                           "max_new_tokens": 1, "temperature": 0, "family": "cpu", "cores": 1})
        # X-Forwarded-Proto as the TLS-terminating proxy in front of a DEBUG-off site
        # sets it (otherwise the site redirects plain HTTP to HTTPS).
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
                   "X-Forwarded-Proto": "https"}
        for attempt in (1, 2):
            submitted = time.time()
            try:
                conn = self._conn()
                conn.request("POST", "/api/v1/jobs", body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, OSError):
                self.local.conn = None  # gunicorn closed the keep-alive connection: reconnect once
                if attempt == 2:
                    raise
        if response.status != 201:
            raise RuntimeError(f"submit failed: {response.status} {data[:500]!r}")
        return json.loads(data)["id"], submitted


def submit_statements(fixture: dict) -> tuple[int, list[int]]:
    """(statements, job ids) of one submit through the Django stack in this process."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(HTTP_AUTHORIZATION=f"Bearer {fixture['token']}", HTTP_X_FORWARDED_PROTO="https")
    body = json.dumps({"team": "bench", "kind": "inference", "model": fixture["model"], "prompts": ["Hi"],
                       "max_new_tokens": 1, "temperature": 0, "family": "cpu", "cores": 1})
    ids = []
    for _ in range(2):  # the first also records the token's last use (then at most once a minute)
        with CaptureQueriesContext(connection) as queries:
            response = client.post("/api/v1/jobs", data=body, content_type="application/json")
        if response.status_code != 201:
            raise RuntimeError(f"submit failed: {response.status_code} {response.content[:500]!r}")
        ids.append(response.json()["id"])
    return len(queries), ids


def start_profilers(directory: Path, groups: dict[str, int], fmt: str) -> list[subprocess.Popen]:
    """py-spy on each service's process (and its children) until stop_profilers."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = "svg" if fmt == "flamegraph" else "txt"
    return [subprocess.Popen(["py-spy", "record", "--nonblocking", "--subprocesses", "-r", "100", "-p", str(pid),
                              "-f", fmt, "-o", str(directory / f"{name}.{suffix}")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in groups.items()]


def stop_profilers(profilers: list[subprocess.Popen]) -> None:
    for proc in profilers:
        proc.send_signal(signal.SIGINT)  # py-spy writes its flame graph on SIGINT
    for proc in profilers:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def celery_phase(args) -> dict:
    """The bare Celery baseline: sequential round trips, then a burst."""
    import redis

    from webapp.celery import app

    client = redis.Redis.from_url(BENCH.redis_url)
    queue = f"host.{BENCH.host}"
    key = f"bench:probe:{uuid.uuid4().hex}"
    trips = []
    for _ in range(args.probes):
        sent = time.time()
        app.send_task("bench.probe", args=[key], queue=queue)
        _, stamp = client.blpop(key, timeout=30)
        trips.append((float(stamp) - sent) * 1000)
    burst_key = f"{key}:burst"
    started = time.time()
    for _ in range(args.probe_burst):
        app.send_task("bench.probe", args=[burst_key], queue=queue)
    send_s = time.time() - started
    while client.llen(burst_key) < args.probe_burst:
        time.sleep(0.005)
    stamps = sorted(float(s) for s in client.lrange(burst_key, 0, -1))
    last = stamps[-1]
    gaps = sorted(((b - a) * 1000, i) for i, (a, b) in enumerate(zip(stamps, stamps[1:])))[-3:]
    log(f"probe burst: largest gaps between completions (ms, index): {[(round(g, 1), i) for g, i in gaps]}")
    client.delete(key, burst_key)
    return {"celery_roundtrip_p50_ms": percentile(trips, 50), "celery_roundtrip_p95_ms": percentile(trips, 95),
            "celery_tasks_per_s": args.probe_burst / (last - started), "celery_burst_send_s": send_s}


def latency_phase(api: Api, args) -> dict:
    """One job at a time (free capacity): submit→running and submit→finished."""
    to_running, to_finished, submit_ms = [], [], []
    for _ in range(args.latency_jobs):
        job_id, submitted = api.submit()
        submit_ms.append((time.time() - submitted) * 1000)
        status, started, finished, _ = wait_finished([job_id], 60)[job_id]
        if status != "succeeded":
            raise RuntimeError(f"job {job_id} ended {status}")
        to_running.append((started.timestamp() - submitted) * 1000)
        to_finished.append((finished.timestamp() - submitted) * 1000)
    return {"submit_to_running_p50_ms": percentile(to_running, 50),
            "submit_to_running_p95_ms": percentile(to_running, 95),
            "submit_to_finished_p50_ms": percentile(to_finished, 50),
            "submit_to_finished_p95_ms": percentile(to_finished, 95),
            "submit_request_p50_ms": percentile(submit_ms, 50)}


class LockSampler(threading.Thread):
    """Every 20 ms until stop(): how many of the bench database's backends wait for a
    row lock, and how many of those are submits queued behind their team's quota row
    (job_submit holds it from its check of the limits to its commit, so submits of
    one team run that part one at a time)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.samples = self.waiting = self.on_quota = 0

    def run(self) -> None:
        import psycopg

        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            while not self.done.wait(0.02):
                waiting, on_quota = conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE query LIKE '%%jobs_teamquota%%') FROM pg_stat_activity "
                    "WHERE datname = %s AND wait_event_type = 'Lock'", [BENCH.db_name]).fetchone()
                self.samples += 1
                self.waiting += waiting
                self.on_quota += on_quota

    def stop(self) -> dict:
        self.done.set()
        self.join()
        n = max(self.samples, 1)
        return {"burst_lock_waiters": self.waiting / n, "burst_submits_waiting_for_quota_row": self.on_quota / n}


def burst_phase(api: Api, args, groups: dict[str, int]) -> dict:
    """Many jobs submitted at once by several client threads: end-to-end jobs/s, and
    the CPU each service spent per job (where the time goes)."""
    profilers = start_profilers(Path(args.profile), groups, args.profile_format) if args.profile else []
    try:
        cpu = CpuMeter(groups, BENCH.db_name)
        cpu.start()
        locks = LockSampler()
        locks.start()
        with ThreadPoolExecutor(args.clients) as pool:
            submitted = list(pool.map(lambda _: api.submit(), range(args.burst_jobs)))
        submit_done = time.time()
        waits = locks.stop()
        first = min(t for _, t in submitted)
        # Timestamps come from the job rows, so polling slowly costs no accuracy and
        # leaves the CPU to the system under test.
        rows = wait_finished([pk for pk, _ in submitted], 600, interval=0.5)
        spent = cpu.stop()
    finally:
        stop_profilers(profilers)
    failed = [pk for pk, r in rows.items() if r[0] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} burst jobs did not succeed, e.g. {failed[:5]}")
    last = max(r[2].timestamp() for r in rows.values())
    at = dict(submitted)
    per_job = {f"cpu_ms_per_job_{name.replace(' ', '_')}": seconds * 1000 / len(submitted)
               for name, seconds in spent.items()}
    from jobs.models import Job, JobEvent

    # Warm runners (neuron_workers.process.zygote_server): how many processes the burst's jobs ran in.
    processes = Job.objects.filter(pk__in=list(at)).values("worker_pid").distinct().count()
    # A dispatch run that places jobs writes all their "queued" events at one time.
    runs = JobEvent.objects.filter(job_id__in=list(at), kind=Job.Status.QUEUED).values("at").distinct().count()
    return {**per_job, **waits, "burst_dispatch_runs": runs, "jobs_per_s": len(submitted) / (last - first),
            "burst_submits_per_s": len(submitted) / (submit_done - first),
            "burst_submit_to_finished_p50_ms": percentile([(r[2].timestamp() - at[pk]) * 1000 for pk, r in rows.items()], 50),
            "burst_jobs": len(submitted), "burst_job_processes": processes}


# --- main -------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=8, help="job slots (cores) of the cpu host and worker threads")
    parser.add_argument("--latency-jobs", type=int, default=40)
    parser.add_argument("--burst-jobs", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8, help="client threads submitting the burst")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--probe-burst", type=int, default=1000)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--web-threads", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the logs directory")
    parser.add_argument("--profile", metavar="DIR", help="py-spy profiles of each service during the burst")
    parser.add_argument("--profile-format", choices=["flamegraph", "raw"], default="flamegraph",
                        help="flame graph SVGs, or collapsed stacks (text) for scripts")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with bench_run(BENCH, "bench-dispatch", keep=args.keep) as procs:
        fixture = seed(args.slots)
        procs.heartbeat(BENCH.host)
        port = free_port()
        start_system(procs, port, args)
        api = Api(port, fixture["token"], fixture["model"])
        # Workers log at WARNING (no per-task lines), so "ready" is proven by the
        # warm-up jobs: they need the web, the scheduler and the host worker.
        log(f"system started (logs in {BENCH.workdir}); warming up")
        warm = [api.submit()[0] for _ in range(args.slots)]
        statements, counted = submit_statements(fixture)
        wait_finished([*warm, *counted], 180)  # the worker's zygote preloads torch on first use
        report = {"submit_statements": statements}
        load_at_start = os.getloadavg()[0]
        log("celery baseline …")
        report.update(celery_phase(args))
        log("latency (one job at a time) …")
        report.update(latency_phase(api, args))
        log(f"burst ({args.burst_jobs} jobs, {args.clients} clients) …")
        report.update(burst_phase(api, args, {name: proc.pid for name, proc in procs.procs.items()}))
        report["slots"], report["cpus"], report["clients"] = args.slots, os.cpu_count(), args.clients
        # Other work on the machine skews every figure; say how busy it was.
        report["loadavg_1m_at_start"], report["loadavg_1m_at_end"] = load_at_start, os.getloadavg()[0]
        report["running_vs_celery_roundtrip"] = report["submit_to_running_p50_ms"] / report["celery_roundtrip_p50_ms"]
        report["finished_vs_celery_roundtrip"] = report["submit_to_finished_p50_ms"] / report["celery_roundtrip_p50_ms"]
        report["jobs_vs_celery_throughput"] = report["jobs_per_s"] / report["celery_tasks_per_s"]
        report = {k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}
        print_table(report)
        print(json.dumps(report))
        return report


def print_table(report: dict) -> None:
    rows = [
        ("submit→running p50 / p95", f"{report['submit_to_running_p50_ms']:.1f} / {report['submit_to_running_p95_ms']:.1f} ms",
         "target p50 < 50 ms; Ray job API ≈ 800 ms"),
        ("submit→finished p50 / p95", f"{report['submit_to_finished_p50_ms']:.1f} / {report['submit_to_finished_p95_ms']:.1f} ms", ""),
        ("submit request p50", f"{report['submit_request_p50_ms']:.1f} ms", "POST /api/v1/jobs round trip"),
        ("statements per submit", f"{report['submit_statements']}", "SQL of one POST /api/v1/jobs (+ BEGIN/COMMIT)"),
        ("jobs/s (burst)", f"{report['jobs_per_s']:.1f}", "target ≥ 60; Ray job API ≈ 1.5"),
        ("job processes (burst)", f"{report['burst_job_processes']}", f"for {report['burst_jobs']} jobs (warm runners)"),
        ("dispatch runs (burst)", f"{report['burst_dispatch_runs']}", "runs that placed jobs"),
        ("submits waiting for quota row", f"{report['burst_submits_waiting_for_quota_row']:.1f}",
         f"mean during the burst, of {report['clients']} clients"),
        ("celery round trip p50", f"{report['celery_roundtrip_p50_ms']:.2f} ms", "bare task, same worker"),
        ("celery tasks/s", f"{report['celery_tasks_per_s']:.0f}", ""),
        ("running / celery round trip", f"{report['running_vs_celery_roundtrip']:.1f}×", ""),
        ("jobs/s / celery tasks/s", f"{report['jobs_vs_celery_throughput']:.3f}", ""),
    ]
    for name, value, note in rows:
        print(f"{name:<30} {value:>22}   {note}")


if __name__ == "__main__":
    main()
