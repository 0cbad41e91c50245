"""Start-time estimates at fleet scale: pages read the estimates the periodic task
stored, where they used to replay the whole queue in the request.

    .venv/bin/python bench/estimates.py                      # 1,000 hosts, 1,000 pending (~2 min on a quiet machine)
    .venv/bin/python bench/estimates.py --pending 5000 --dry-run-before   # far longer: minutes per replay

A scratch PostgreSQL database (bench/fleet_sim.fill_db: the simulator's 1,000-host
fleet, every host held by a running job, and N pending jobs of 200 teams from its
trace; then one dispatch pass writes their reasons). As a member of the team with the
most pending jobs, three requests in-process with Django's test client (DEBUG off):
its pending job's page, the team's job list and GET /api/v1/jobs/{id}/pending:
- after: reading what the periodic task stored (jobs.estimate_starts, run once first;
  its own time is store_ms, what the estimator process spends per run);
- before (job page and list; the API reads the same selector as the page): the replay
  in the request, as before the task existed, which each web process ran whenever
  its 5-second cache had expired (forecasts.stored replaced by the three replays over
  the whole queue, forecasts.estimates). Each is a whole replay, so there are few:
  --requests-before, alternating with the after requests in rounds (the machine is
  shared).
Also dry_run_estimate_ms: a dry run's estimate (forecasts.estimate_of: its own
replays of its family, stopped once its job starts or after forecasts.DRY_RUN_STEPS
passes; none once PENDING_SCAN jobs are pending) for a job of that team in its
largest family, which fair share puts behind the team's own pending jobs; with --dry-run-before also without that bound
(dry_run_estimate_ms_before, as before the bound), another whole replay or so.

The last line is one JSON object: hosts, pending; job_page, job_list and api_pending
_p50_ms, _p95_ms and _cpu_p50_ms, the first two also _before; store_ms and
store_cpu_ms, estimated (jobs the task estimated), dry_run_estimate_ms and
dry_run_estimate_cpu_ms (and _before), dry_run_summary, requests, requests_before,
loadavg (1, 5, 15 min at start and end). cpu: this process's CPU time (the replays
are pure Python), steadier than wall time on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.support.harness import Bench, exclusive_run, log, percentile, redis_url  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--pending", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=30, help="timed requests per page, after")
    parser.add_argument("--requests-before", type=int, default=1,
                        help="timed requests per page, before (each a whole replay: tens of seconds)")
    parser.add_argument("--dry-run-before", action="store_true", help="also time a dry run's estimate without its bound")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    lock = exclusive_run("bench-estimates")  # noqa: F841 - held until the process exits
    load_start = os.getloadavg()
    bench = Bench(db_name="neurondeck_bench_estimates", redis_url=redis_url("estimates"), host="bench-estimates",
                  workdir=Path(tempfile.mkdtemp(prefix="nd-bench-estimates-")))
    bench.setup(bench.environment())
    try:
        out = measure(args)
    finally:
        bench.teardown()
    out.update(hosts=args.hosts, pending=args.pending, requests=args.requests, requests_before=args.requests_before,
               loadavg={"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]})
    print(json.dumps(out))


def measure(args) -> dict:
    from django.db.models import Count
    from django.test import Client
    from django.utils import timezone

    from bench.fleet_sim import fill_db
    from jobs.lifecycle import forecasts, scheduler
    from jobs.lifecycle.scheduler import PendingRow
    from jobs.models import Job, Membership, Role, Team
    from jobs.teams.tokens import token_create

    wall = time.perf_counter()
    fill_db(random.Random(args.seed), args.hosts, args.pending)
    scheduler.dispatch(clear=False)
    log(f"filled: {args.hosts} hosts, {args.pending} pending ({time.perf_counter() - wall:.1f} s)")

    busiest = (Job.objects.filter(status=Job.Status.PENDING).values("team_id", "family")
               .annotate(n=Count("pk")).order_by("-n").first())
    team = Team.objects.get(pk=busiest["team_id"])
    user = Job.objects.filter(team=team).first().user
    Membership.objects.create(team=team, user=user, role=Role.MEMBER)
    job = Job.objects.filter(team=team, status=Job.Status.PENDING).order_by("-pk").first()
    browser = Client(HTTP_X_FORWARDED_PROTO="https")  # as the site's TLS-terminating proxy sets it
    browser.force_login(user)
    raw, _ = token_create(user=user, name="bench")
    api = Client(HTTP_X_FORWARDED_PROTO="https", HTTP_AUTHORIZATION=f"Bearer {raw}")
    requests = {"job_page": (browser, f"/jobs/{job.pk}/"), "job_list": (browser, f"/teams/{team.slug}/jobs/"),
                "api_pending": (api, f"/api/v1/jobs/{job.pk}/pending")}

    began, cpu = time.perf_counter(), time.process_time()
    stored = forecasts.store()
    store_ms, store_cpu_ms = (time.perf_counter() - began) * 1000, (time.process_time() - cpu) * 1000
    log(f"stored {stored['estimated']} estimates in {store_ms:.0f} ms")

    def replay_in_request(job_ids):
        every = forecasts.estimates()
        return forecasts.Stored({pk: every[pk] for pk in job_ids if pk in every}, timezone.now(), None)

    def timed(name: str, before: bool) -> float:
        client, url = requests[name]
        reader = forecasts.stored
        if before:
            forecasts.stored = replay_in_request
        try:
            began, cpu = time.perf_counter(), time.process_time()
            response = client.get(url)
            ms = (time.perf_counter() - began) * 1000
            cpu_ms[name + ("_before" if before else "")].append((time.process_time() - cpu) * 1000)
        finally:
            forecasts.stored = reader
        if response.status_code != 200:
            raise SystemExit(f"{url} answered {response.status_code}")
        body = response.content.decode()
        if "being computed" in body or ("estimated " not in body and '"computed_at": "' not in body):
            raise SystemExit(f"{url} shows no stored estimate:\n{body[:2000]}")
        return ms

    before = ("job_page", "job_list")
    times: dict[str, list[float]] = {**{name: [] for name in requests}, **{f"{name}_before": [] for name in before}}
    cpu_ms: dict[str, list[float]] = {name: [] for name in times}
    for name in requests:  # one untimed request first (templates, connections)
        timed(name, False)
        cpu_ms[name].clear()
    for r in range(args.requests_before):
        for name in requests:
            if name in before:
                times[f"{name}_before"].append(timed(name, True))
            for _ in range(args.requests // args.requests_before):
                times[name].append(timed(name, False))
        log(f"round {r + 1}/{args.requests_before}: "
            + ", ".join(f"{k} {statistics.median(v):.0f} ms" for k, v in times.items()))

    row = PendingRow(-1, team.pk, team.slug, "inference", busiest["family"], job.cores, timezone.now(), "submitted", "",
                     job.max_runtime_s, job.host_count, job.same_network)
    out: dict = {}
    for suffix in ("", "_before") if args.dry_run_before else ("",):
        bound = forecasts.DRY_RUN_STEPS
        if suffix:
            forecasts.DRY_RUN_STEPS = 100_000  # backfill.forecast's own default
        try:
            began, cpu = time.perf_counter(), time.process_time()
            estimate = forecasts.estimate_of(row)
            out[f"dry_run_estimate_ms{suffix}"] = round((time.perf_counter() - began) * 1000, 1)
            out[f"dry_run_estimate_cpu_ms{suffix}"] = round((time.process_time() - cpu) * 1000, 1)
        finally:
            forecasts.DRY_RUN_STEPS = bound
        out[f"dry_run_summary{suffix}"] = estimate.summary if estimate else None
        log(f"dry run estimate{suffix}: {out[f'dry_run_summary{suffix}']} in {out[f'dry_run_estimate_ms{suffix}']} ms")
    for key, values in times.items():
        suffix = "_before" if key.endswith("_before") else ""
        name = key.removesuffix("_before")
        out[f"{name}_p50_ms{suffix}"] = round(percentile(values, 50), 1)
        out[f"{name}_p95_ms{suffix}"] = round(percentile(values, 95), 1)
        out[f"{name}_cpu_p50_ms{suffix}"] = round(percentile(cpu_ms[key], 50), 1)
    out.update(store_ms=round(store_ms, 1), store_cpu_ms=round(store_cpu_ms, 1), estimated=stored["estimated"])
    return out


if __name__ == "__main__":
    main()
