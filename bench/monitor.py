"""Live-metrics throughput and lag, each beside a baseline measured in the same run.

    .venv/bin/python bench/monitor.py [--hosts 200] [--lag-samples 60]

What it measures, with trn1.32xlarge-sized neuron-monitor reports (32 NeuronCores
busy under 4 tagged runtimes of 8 cores, 128 vCPUs, 16 devices' ECC counters;
built from tests/data/neuron-monitor/trn1.32xlarge-two-jobs.jsonl):

* json_loads_reports_per_s — baseline: plain json.loads of the same lines;
* parse_publish_reports_per_s — the agent's whole per-report path on one core
  (parse_report as the agent calls it, then neuron_workers.agent.Agent.handle:
  attribute to the host's 4 running jobs, build the host and job points, XADD
  them in one pipeline; placements re-read every 5 simulated seconds), as
  reports per second of wall time in that path — best of --passes passes, since
  the machine may be shared — and per CPU-second of this process;
* redis_roundtrip_p50_ms — baseline: a bare PING;
* rollup_reports_per_s — jobs.metrics.rollup absorbing the first pass's reports
  (each one host entry + 4 job entries) into MetricMinute: a fleet of --hosts
  hosts at 1 report/s for a minute, the real ratio of entries to rows;
* sample_to_endpoint_p50/p95_ms — a real agent process (`manage.py agent`) reads a
  stand-in neuron-monitor that writes a report every 0.25 s; the time from that
  write to the sample's first appearance in GET /api/v1/jobs/<id>/metrics?since=
  (called through Django's test client, polled every 20 ms).

Targets: parse_publish_reports_per_s >= 2,000, rollup_reports_per_s >= 2,000,
sample_to_endpoint_p95_ms < 1,000.

It starts what it needs: its own PostgreSQL database (neurondeck_bench_monitor, plus
BENCH_DB_SUFFIX; dropped at the end — never the dev or test database) on the BENCH_PG
server, its Redis db (flushed) on the BENCH_REDIS server, the agent subprocess;
settings are the project's defaults. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "neuron-monitor" / "trn1.32xlarge-two-jobs.jsonl"
NEURON_LS = ROOT / "tests" / "data" / "neuron-ls" / "trn1.32xlarge.json"
sys.path.insert(0, str(ROOT))
from bench.support.harness import DB_SUFFIX, PG, redis_url  # noqa: E402

REDIS_URL = redis_url("monitor")
# With BENCH_DB_SUFFIX, runs that share the PostgreSQL server do not drop each other's database.
BENCH_DB = "neurondeck_bench_monitor" + DB_SUFFIX
TAG = "job-{}"

# DEBUG off, as deployed (and as the other benches run): no per-query bookkeeping.
os.environ.update(DATABASE_URL=f"{PG}/{BENCH_DB}", REDIS_URL=REDIS_URL, DJANGO_SETTINGS_MODULE="webapp.settings",
                  LOG_LEVEL="WARNING", DEBUG="0")
os.environ.setdefault("SECRET_KEY", "bench-only-not-secret")


# --- reports -----------------------------------------------------------------------

def full_size_report(base: dict, variant: int) -> dict:
    """A trn1.32xlarge report: the sample's job-41 runtime copied onto 4 runtimes of 8
    cores (0-7, 8-15, 16-23, 24-31), usage for 128 vCPUs, ECC for 16 devices.
    `variant` perturbs the numbers so consecutive lines differ."""
    data = copy.deepcopy(base)
    template = data["neuron_runtime_data"][0]
    runtimes = []
    for r in range(4):
        rt = copy.deepcopy(template)
        rt["pid"] = 50000 + r
        rt["neuron_runtime_tag"] = "{tag%d}" % r
        in_use = rt["report"]["neuroncore_counters"]["neuroncores_in_use"]
        one_core = next(iter(in_use.values()))
        rt["report"]["neuroncore_counters"]["neuroncores_in_use"] = {
            str(8 * r + c): {**one_core, "neuroncore_utilization": round(40 + (variant * 7 + c * 13 + r) % 60, 2)}
            for c in range(8)}
        usage = rt["report"]["memory_used"]["neuron_runtime_used_bytes"]["usage_breakdown"]
        mem = next(iter(usage["neuroncore_memory_usage"].values()))
        usage["neuroncore_memory_usage"] = {str(8 * r + c): {**mem, "tensors": mem["tensors"] + variant}
                                            for c in range(8)}
        runtimes.append(rt)
    data["neuron_runtime_data"] = runtimes
    vcpu = data["system_data"]["vcpu_usage"]
    cpu = next(iter(vcpu["usage_data"].values()))
    vcpu["usage_data"] = {str(i): {**cpu, "user": round((i * 3 + variant) % 90, 2)} for i in range(128)}
    hw = data["system_data"]["neuron_hw_counters"]
    dev = hw["neuron_devices"][0]
    hw["neuron_devices"] = [{**dev, "neuron_device_index": d} for d in range(16)]
    return data


def report_templates(count: int = 60) -> list[str]:
    base = json.loads(SAMPLE.read_text().splitlines()[0])
    return [json.dumps(full_size_report(base, v), separators=(", ", ": ")) for v in range(count)]


def for_jobs(template: str, job_ids: list[int]) -> str:
    line = template
    for r, job_id in enumerate(job_ids):
        line = line.replace("{tag%d}" % r, TAG.format(job_id))
    return line


# --- setup -------------------------------------------------------------------------

def create_database() -> None:
    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {BENCH_DB}")


def drop_database() -> None:
    import psycopg
    from django.db import connections

    connections.close_all()
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")


def setup_django() -> None:
    import django
    from django.core.management import call_command

    django.setup()
    call_command("ensure_redis", stdout=open(os.devnull, "w"))
    call_command("migrate", verbosity=0)
    from jobs.live.store import redis

    redis().flushdb()


def make_fleet(hosts: int):
    """`hosts` trn1.32xlarge hosts, each with 4 running jobs of 8 cores. Rows are
    inserted directly: this is a fixture for the bench, not a state change."""
    from django.contrib.auth.models import User
    from django.db import connection
    from django.utils import timezone

    from jobs.models import CoreAllocation, Host, Job, Membership, Team

    user = User.objects.create_user("bench", password="bench-password-1")
    team = Team.objects.create(slug="bench", name="Bench")
    Membership.objects.create(team=team, user=user, role="member")
    now = timezone.now()
    rows = Host.objects.bulk_create([
        Host(name=f"bench-{i:04d}", family="trn1", instance_type="trn1.32xlarge", device_count=16,
             core_ids=list(range(32)), backend="neuron", last_heartbeat=now) for i in range(hosts)])
    jobs = Job.objects.bulk_create([
        Job(team=team, user=user, kind="inference", status="running", family="trn1", cores=8, host=host,
            core_start=8 * r, started_at=now, heartbeat_at=now) for host in rows for r in range(4)])
    CoreAllocation.objects.bulk_create([
        CoreAllocation(host_id=job.host_id, core=job.core_start + c, job=job, team=team, family="trn1")
        for job in jobs for c in range(8)])
    # Statistics for the new rows, as a deployed database has them from autovacuum (off
    # on some bench servers, and a minute or more late on others): without them PostgreSQL
    # plans each agent's placements re-read as a scan of every running job of the fleet.
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    by_host: dict[int, list[int]] = {}
    for job in jobs:
        by_host.setdefault(job.host_id, []).append(job.pk)
    return user, team, rows, by_host


# --- measurements ------------------------------------------------------------------

def bench_json_loads(lines: list[str], rounds: int, passes: int) -> list[float]:
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        for i in range(rounds):
            json.loads(lines[i % len(lines)])
        rates.append(rounds / (time.perf_counter() - start))
    return rates


class PublishBench:
    """The agent's path on one core for a fleet: one Agent per host, each seeing one
    report per simulated second, as on a host — so each re-reads its placements as
    often as it would there (every 5 s)."""

    def __init__(self, templates: list[str], hosts, by_host) -> None:
        from neuron_workers.agent import Agent

        self.templates, self.by_host = templates, by_host
        self.now = [0.0]
        self.agents = [Agent(host, clock=lambda: self.now[0]) for host in hosts]
        self.passes = 0

    def run_pass(self) -> tuple[float, float, int]:
        """Every host's reports for one minute. Returns reports/s of the wall time
        spent in the path, reports/s of this process's CPU time in it, and the count."""
        from neuron_workers.readers.neuron_monitor import parse_report

        spent = cpu = 0.0
        for minute_second in range(60):
            self.now[0] = float(60 * self.passes + minute_second)
            template = self.templates[minute_second % len(self.templates)]
            for agent in self.agents:
                line = for_jobs(template, self.by_host[agent.host_id])  # outside the timed path
                start, cpu0 = time.perf_counter(), time.process_time()
                agent.handle(parse_report(line, per_cpu=False))  # as neuron_workers.agent.monitor_samples
                spent += time.perf_counter() - start
                cpu += time.process_time() - cpu0
        self.passes += 1
        reports = 60 * len(self.agents)
        return reports / spent, reports / cpu, reports


def bench_redis_roundtrip(n: int = 2000) -> float:
    from jobs.live.store import redis

    r = redis()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        r.ping()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def bench_rollup(reports: int) -> tuple[float, dict]:
    from dataclasses import asdict

    from jobs.live.metrics import MINUTE_MS, redis_ms, rollup

    upto = (redis_ms() // MINUTE_MS + 1) * MINUTE_MS  # every entry published so far, in whole minutes
    start = time.perf_counter()
    report = rollup(upto_ms=upto)
    elapsed = time.perf_counter() - start
    return reports / elapsed, asdict(report)


def bench_lag(user, team, samples: int, period: float) -> list[float]:
    """Run the real agent against a stand-in neuron-monitor; return the lags (ms) from
    each report's write to its first appearance in the job metrics endpoint."""
    from django.test import Client
    from django.utils import timezone

    from jobs.models import Host, Job
    from jobs.teams.tokens import token_create

    host = Host.objects.create(name="bench-lag", family="trn1", instance_type="trn1.32xlarge", device_count=16,
                               core_ids=list(range(32)), backend="neuron", last_heartbeat=timezone.now())
    job = Job.objects.create(team=team, user=user, kind="inference", status="running", family="trn1", cores=8,
                             host=host, core_start=0, started_at=timezone.now())
    base = json.loads(SAMPLE.read_text().splitlines()[0])
    line = for_jobs(json.dumps(full_size_report(base, 0)), [job.pk, 900001, 900002, 900003])
    with tempfile.TemporaryDirectory(prefix="nd-bench-") as tmp:
        tmpdir = Path(tmp)
        bin_dir = tmpdir / "bin"
        bin_dir.mkdir()
        writes = tmpdir / "writes.log"
        (tmpdir / "report.json").write_text(line)
        _stand_in(bin_dir / "neuron-ls", f"sys.stdout.write(open({str(NEURON_LS)!r}).read())")
        # The sequence number rides in the runtime's host-memory field, which the job
        # point carries as host_mem; the write time of each goes to `writes`.
        _stand_in(bin_dir / "neuron-monitor", f"""
report = json.loads(open({str(tmpdir / 'report.json')!r}).read())
log = open({str(writes)!r}, "a", buffering=1)
for seq in range(1, {samples} + 1):
    report["neuron_runtime_data"][0]["report"]["memory_used"]["neuron_runtime_used_bytes"]["host"] = seq
    text = json.dumps(report)
    log.write(f"{{seq}} {{time.time()}}\\n")
    sys.stdout.write(text + "\\n")
    sys.stdout.flush()
    time.sleep({period})
time.sleep(3600)
""")
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "NEURONDECK_INSTANCE_TYPE": "trn1.32xlarge"}
        agent_log = tmpdir / "agent.log"
        with open(agent_log, "wb") as log_file:
            agent = subprocess.Popen([sys.executable, "manage.py", "agent", "--name", host.name], cwd=ROOT, env=env,
                                     stdout=log_file, stderr=subprocess.STDOUT)
        try:
            # X-Forwarded-Proto: https, as the site's TLS-terminating proxy sets it.
            seen = _poll_endpoint(Client(HTTP_AUTHORIZATION=f"Bearer {token_create(user=user, name='bench')[0]}",
                                         HTTP_X_FORWARDED_PROTO="https"),
                                  job.pk, samples, timeout=samples * period + 60)
        finally:
            agent.terminate()
            agent.wait(10)
        written = {int(s): float(t) for s, t in (row.split() for row in writes.read_text().splitlines())}
        missing = sorted(set(written) - set(seen))
        if missing:
            print(f"lag: {len(missing)} samples never reached the endpoint: {missing[:10]}; agent log:\n"
                  + agent_log.read_text()[-2000:], flush=True)
    return [(seen[seq] - written[seq]) * 1000 for seq in sorted(seen) if seq in written]


def _stand_in(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\nimport sys, json, time\n{body}\n")
    path.chmod(0o755)


def _poll_endpoint(client, job_id: int, samples: int, timeout: float) -> dict[int, float]:
    url = f"/api/v1/jobs/{job_id}/metrics"
    cursor = client.get(url).json()["cursor"]
    seen: dict[int, float] = {}
    deadline = time.time() + timeout
    while len(seen) < samples and time.time() < deadline:
        page = client.get(url, {"since": cursor}).json()
        now = time.time()
        for seq in page["host_mem"]:
            if seq is not None:
                seen.setdefault(seq, now)
        cursor = page["cursor"]
        time.sleep(0.02)
    return seen


def _rates(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=200, help="fleet size for publish and roll-up (60 reports each)")
    parser.add_argument("--lag-samples", type=int, default=60)
    parser.add_argument("--passes", type=int, default=3, help="throughput passes; the best counts (shared machines)")
    args = parser.parse_args()

    create_database()
    try:
        setup_django()
        templates = report_templates()
        user, team, hosts, by_host = make_fleet(args.hosts)
        sample_line = for_jobs(templates[0], by_host[hosts[0].pk])
        print(f"report size: {len(sample_line)} bytes; fleet: {args.hosts} hosts x 4 jobs", flush=True)

        load_before = os.getloadavg()[0]
        loads = bench_json_loads([for_jobs(t, by_host[hosts[0].pk]) for t in templates], 3000, args.passes)
        print(f"json.loads:      {max(loads):8.0f} reports/s (best of {args.passes}; all {_rates(loads)})", flush=True)
        bench = PublishBench(templates, hosts, by_host)
        wall, cpu = [], []
        for p in range(args.passes):
            wall_rate, cpu_rate, reports = bench.run_pass()
            wall.append(wall_rate)
            cpu.append(cpu_rate)
            if p == 0:
                # Roll up the first minute's worth alone: 60 reports per host per
                # minute is the real ratio of entries to MetricMinute rows.
                rollup_rate, rollup_report = bench_rollup(reports)
        print(f"parse+publish:   {max(wall):8.0f} reports/s wall, {max(cpu):.0f} per CPU-second "
              f"(best of {args.passes} passes of {reports}; all {_rates(wall)})", flush=True)
        print(f"roll-up:         {rollup_rate:8.0f} reports/s ({rollup_report})", flush=True)
        roundtrip = bench_redis_roundtrip()
        print(f"redis PING p50:  {roundtrip:8.3f} ms", flush=True)
        lags = bench_lag(user, team, args.lag_samples, 0.25)
        p50, p95 = percentile(lags, 50), percentile(lags, 95)
        print(f"sample->endpoint: p50 {p50:.1f} ms, p95 {p95:.1f} ms over {len(lags)} samples", flush=True)
    finally:
        drop_database()
        try:
            from jobs.live.store import redis

            redis().flushdb()
        except Exception:  # Django never came up: nothing to flush
            pass
    publish, loads_best = max(wall), max(loads)
    result = {
        "report_bytes": len(sample_line),
        "hosts": args.hosts,
        "reports_per_pass": reports,
        "passes": args.passes,
        "json_loads_reports_per_s": round(loads_best),
        "parse_publish_reports_per_s": round(publish),
        "parse_publish_reports_per_cpu_s": round(max(cpu)),
        "parse_publish_vs_json_loads": round(publish / loads_best, 3),
        "rollup_reports_per_s": round(rollup_rate),
        "rollup_vs_json_loads": round(rollup_rate / loads_best, 3),
        "rollup_rows": rollup_report["rows"],
        "rollup_entries": rollup_report["entries"],
        "redis_roundtrip_p50_ms": round(roundtrip, 3),
        "sample_to_endpoint_p50_ms": round(p50, 1),
        "sample_to_endpoint_p95_ms": round(p95, 1),
        "sample_to_endpoint_p95_vs_redis_roundtrip": round(p95 / roundtrip, 1),
        "lag_samples": len(lags),
        "lag_poll_interval_ms": 20,
        "load_average_1m": round(load_before, 2),
        "cpu_count": os.cpu_count(),
        "targets_met": publish >= 2000 and rollup_rate >= 2000 and p95 < 1000,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
