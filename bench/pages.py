"""Page latency and query count at scale: 1,000,000 jobs across 200 teams, a year
of usage roll-ups, endpoints' replica histories and a notification per finished
job, against the same pages on an empty database. Target: every page p95 < 100 ms
with as many queries as on the empty database.

    .venv/bin/python bench/pages.py            # create, fill, measure (a few minutes)
    .venv/bin/python bench/pages.py --reuse    # measure again on the filled database
    .venv/bin/python bench/pages.py --jobs 100000 --requests 20

It uses its own PostgreSQL databases (never the dev or test database):
`neurondeck_bench_pages` (filled, kept for --reuse; another name in BENCH_PAGES_DB) and
`neurondeck_bench_pages_empty` (the baseline: the same teams, users, hosts,
endpoints and subscriptions, one job and its notification, no history; recreated
each run) on the BENCH_PG server, and its Redis db (read, never flushed) on the
BENCH_REDIS server (bench/support/harness.py).

The fill is set-based SQL (generate_series INSERT … SELECT), not the ORM: jobs
with ids in submit order over the last 365 days, their attempts (3 % preempted
and run again, the newest few hundred still running, the newest pending), three
events each, utilization minutes of the running jobs; 3 % of the jobs are endpoint
replicas (kind serve) of their team's two endpoints (a revision a month; the
timeline's rollouts, ready and stopped events); a notification for each job that
succeeded or failed, delivered to the team's webhook (and a failed job's to its
owner's email); a year of usage roll-ups computed in SQL from the attempts (split
at each team's local midnight) up to two hours ago (and the site's running wait
totals rebuilt from them); then the real roll-up (jobs.usage.rollup.fold) folds
the rest, as the Celery task would.

Pages are requested in-process with Django's test client (DEBUG off) under
CaptureQueriesContext, each page's requests alternating in blocks between the
filled and the empty database (the machine is shared: a change of its load falls
on both), all of the busiest team (as its manager) or the site (as staff): the job list, a job page, the team usage page, the site usage page, the
admin quota page (/quotas/), the team page (its fair-share standing), the team's
endpoints, its endpoint with the longest history, the notifications page and the
team webhook's delivery log; the fair-share usage (cached per process for a few
seconds) is recomputed for each request. A page that answers 404 or is not routed
is reported as missing. For a page over the 100 ms target its slowest queries are
printed.
The last line is one JSON object:
{"jobs": N, "pages": {"<page>": {"p50_ms", "p95_ms", "queries", "cpu_p50_ms", "sql_p50_ms", "p95_ms_empty",
"queries_empty", "cpu_p50_ms_empty", "sql_p50_ms_empty"}, ...}, "loadavg": {"start": [1, 5, 15 min],
"end": [...]}} (cpu: the bench process's CPU time per request, Django's side, steadier than
wall time on a shared machine; sql: the time the request waited on its queries, PostgreSQL
and the wire)
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone as dt_timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.support.harness import PG, redis_url  # noqa: E402

DB_FILLED = os.environ.get("BENCH_PAGES_DB", "neurondeck_bench_pages")
DB_EMPTY = f"{DB_FILLED}_empty"
os.environ["DATABASE_URL"] = f"{PG}/{DB_EMPTY}"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
os.environ["DEBUG"] = "0"
os.environ.setdefault("SECRET_KEY", "bench-only-not-secret")
os.environ["REDIS_URL"] = redis_url("pages")
os.environ.setdefault("LOG_LEVEL", "ERROR")

import django  # noqa: E402

django.setup()
import webapp.wsgi  # noqa: E402,F401  (the app as a gunicorn worker loads it: URLconf imported, gc.freeze)

import psycopg  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.cache import cache, caches  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, connections  # noqa: E402
from django.db.models import Count  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402
from django.urls import Resolver404, resolve  # noqa: E402

from jobs.usage import accounting  # noqa: E402
from jobs.models import (Delivery, Endpoint, EndpointEvent, EndpointRevision, EventKind, Host, Job,  # noqa: E402
                         JobAttempt, JobEvent, JobUsage, Membership, MetricMinute, Notification, Replica, Role,
                         Subscription, Team, UsageDaily, UsageRollupState, UsageSiteDaily, UsageSiteWaitTotal,
                         UsageTeamDay)
from jobs.lifecycle import forecasts  # noqa: E402
from jobs.quotas.selectors import clear_usage_cache  # noqa: E402
from jobs.teams.services import team_create  # noqa: E402
from jobs.usage.rollup import fold, rebuild_site_wait_totals  # noqa: E402

TEAMS = 200
USERS_PER_TEAM = 10
TIME_ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Asia/Tokyo", "America/Los_Angeles"]
# (name prefix, instance type, family, cores, how many)
HOSTS = [("trn", "trn1.32xlarge", "trn1", 32, 24), ("inf", "inf2.48xlarge", "inf2", 24, 24),
         ("infx", "inf2.xlarge", "inf2", 2, 8), ("trnx", "trn1.2xlarge", "trn1", 2, 8)]
RUNNING, PENDING = 400, 200  # the newest jobs: pending, and before them running
SERVE_SHARE = 0.03  # jobs that are endpoint replicas (kind serve), spread over each team's endpoints
ENDPOINTS_PER_TEAM = 2
REVISION_DAYS = 30  # a new endpoint revision (rollout) about monthly
HISTORY_LAG = timedelta(hours=2)  # the SQL roll-up stops here; the real fold does the rest
TARGET_MS = 100.0
PAGES = ("job_list", "job_page", "team_usage", "site_usage", "quotas", "team_page", "endpoint_list", "endpoint_page",
         "notifications", "subscription")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- databases ----------------------------------------------------------------------

def admin_sql(sql: str) -> None:
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(sql)


def database_exists(name: str) -> bool:
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is not None


def use_database(name: str) -> None:
    """Point Django's default connection at another database of the same server."""
    connections.close_all()
    settings.DATABASES["default"]["NAME"] = name
    connection.settings_dict["NAME"] = name


def recreate(name: str) -> None:
    connections.close_all()
    admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin_sql(f'CREATE DATABASE "{name}"')
    use_database(name)
    call_command("migrate", verbosity=0, interactive=False)


# --- the cast (ORM: a few thousand rows) ----------------------------------------------

def create_cast() -> None:
    """200 teams with 10 members each (the first a manager), a staff admin, the hosts."""
    User = get_user_model()
    users = [User(username=f"u{t:03d}-{i}", email=f"u{t:03d}-{i}@example.com", password="!")
             for t in range(TEAMS) for i in range(USERS_PER_TEAM)]
    User.objects.bulk_create(users, batch_size=1000)
    User.objects.create(username="admin", email="admin@example.com", password="!", is_staff=True,
                        is_superuser=True)
    by_name = dict(User.objects.values_list("username", "pk"))
    memberships = []
    for t in range(TEAMS):
        team = team_create(slug=f"team-{t:03d}", name=f"Team {t:03d}")
        team.time_zone = TIME_ZONES[t % len(TIME_ZONES)]
        team.save(update_fields=["time_zone"])
        memberships += [Membership(team=team, user_id=by_name[f"u{t:03d}-{i}"],
                                   role=Role.MANAGER if i == 0 else Role.MEMBER) for i in range(USERS_PER_TEAM)]
    Membership.objects.bulk_create(memberships, batch_size=1000)
    hosts = [Host(name=f"{prefix}-{i:02d}", instance_type=it, family=family, core_ids=list(range(cores)),
                  backend="neuron", last_heartbeat=now())
             for prefix, it, family, cores, count in HOSTS for i in range(count)]
    Host.objects.bulk_create(hosts)
    teams = list(Team.objects.order_by("pk"))
    endpoints = Endpoint.objects.bulk_create(
        [Endpoint(team=team, name=f"ep-{i}", options={"max_batch_size": 4, "max_seq_len": 128, "max_concurrent": 8},
                  serving_revision=1) for team in teams for i in range(ENDPOINTS_PER_TEAM)])
    EndpointRevision.objects.bulk_create([EndpointRevision(endpoint=e, number=1, state=EndpointRevision.State.LIVE)
                                          for e in endpoints])
    # Each team's manager has the team's job outcomes sent to a signed webhook; every
    # member has their own failed jobs emailed.
    managers = {m.team_id: m.user_id for m in Membership.objects.filter(role=Role.MANAGER)}
    subs = [Subscription(team=team, user_id=managers[team.pk], scope=Subscription.Scope.TEAM,
                         channel=Subscription.Channel.WEBHOOK, target=f"https://hooks.example.com/{team.slug}",
                         events=[EventKind.JOB_SUCCEEDED, EventKind.JOB_FAILED]) for team in teams]
    subs += [Subscription(team_id=m.team_id, user_id=m.user_id, scope=Subscription.Scope.SELF,
                          channel=Subscription.Channel.EMAIL, target=f"{m.user_id}@example.com",
                          events=[EventKind.JOB_FAILED]) for m in memberships]
    Subscription.objects.bulk_create(subs, batch_size=1000)


def now() -> datetime:
    return datetime.now(dt_timezone.utc)


# --- the fill (set-based SQL) -------------------------------------------------------

def _defaults(model, given: dict[str, str]) -> tuple[list[str], list[str], list]:
    """Columns, SQL expressions and parameters for an INSERT … SELECT into `model`:
    `given` maps columns to expressions; every other concrete column gets its
    Python default as a parameter, so fields other engineers add keep working."""
    columns, exprs, params = [], [], []
    for f in model._meta.concrete_fields:
        column = f.column
        columns.append(column)
        if column in given:
            exprs.append(given[column])
        elif f.primary_key:
            columns.pop()
        else:
            default = f.get_default()
            exprs.append("%s")
            params.append(f.get_db_prep_save(default, connection))
    return columns, exprs, params


def insert_select(cursor, model, given: dict[str, str], from_sql: str, params: list | None = None) -> int:
    columns, exprs, default_params = _defaults(model, given)
    # Parameters appear in the SELECT list (defaults, in column order) before FROM's.
    sql = (f'INSERT INTO {model._meta.db_table} ({", ".join(columns)}) '
           f'SELECT {", ".join(exprs)} {from_sql}')
    cursor.execute(sql, default_params + (params or []))
    return cursor.rowcount


def fill(n_jobs: int) -> dict:
    t0 = time.time()
    stamp = now().replace(microsecond=0)
    cutoff0 = (stamp - HISTORY_LAG).replace(second=0)
    timings = {}
    with connection.cursor() as cur:
        cur.execute("SELECT setseed(0.42)")
        cur.execute("SELECT min(id), max(id) FROM jobs_team")
        team_lo, _ = cur.fetchone()
        cur.execute("SELECT min(id) FROM auth_user WHERE username LIKE 'u%%'")
        user_lo = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM jobs_host")
        n_hosts = cur.fetchone()[0]
        cur.execute("SELECT min(id) FROM jobs_host")
        host_lo = cur.fetchone()[0]
        # One row per job with everything the inserts below derive from it. Teams are
        # skewed (power law: the biggest has ~8x the smallest); ids follow submit time.
        cur.execute(f"""
            CREATE TEMP TABLE bj AS
            WITH base AS (
                SELECT g,
                       floor({TEAMS} * power(random(), 1.6))::int AS ti,
                       floor(random() * {USERS_PER_TEAM})::int AS ui,
                       CASE WHEN random() < {SERVE_SHARE} THEN 'serve'
                            ELSE (ARRAY['compile','inference','finetune'])[1 + floor(random() * 3)::int] END AS kind,
                       {host_lo} + floor(random() * {n_hosts})::int AS host_id,
                       %(start)s::timestamptz + (g::float8 / {n_jobs}) * interval '365 days'
                           - (random() * interval '20 minutes') AS created_at,
                       -ln(1 - random()) * 90 AS wait_s,
                       -ln(1 - random()) AS run_f,
                       random() AS r_status, random() AS r_req, random() AS r_util, random() AS r_cores
                FROM generate_series(1, {n_jobs}) g
            )
            SELECT b.g, {team_lo} + b.ti AS team_id, {user_lo} + b.ti * {USERS_PER_TEAM} + b.ui AS user_id,
                   b.kind, h.family, h.instance_type, b.host_id,
                   least(jsonb_array_length(h.core_ids),
                         CASE b.kind WHEN 'compile' THEN 1 WHEN 'inference' THEN 1 + (b.r_cores * 2)::int
                              ELSE (ARRAY[2,4,8,16,32])[1 + floor(b.r_cores * 5)::int] END) AS cores,
                   b.created_at,
                   b.created_at + b.wait_s * interval '1 second' AS started_at,
                   b.created_at + b.wait_s * interval '1 second'
                       + b.run_f * CASE b.kind WHEN 'compile' THEN 600 WHEN 'inference' THEN 1200 ELSE 7200 END
                         * interval '1 second' AS ended_at,
                   CASE WHEN b.g > {n_jobs - PENDING} THEN 'pending'
                        WHEN b.g > {n_jobs - PENDING - RUNNING} THEN 'running'
                        WHEN b.r_status < 0.85 THEN 'succeeded' WHEN b.r_status < 0.94 THEN 'failed'
                        ELSE 'cancelled' END AS status,
                   b.r_status >= 0.98 AS cancelled_pending, b.r_req < 0.03 AS requeued, b.r_util
            FROM base b JOIN jobs_host h ON h.id = b.host_id
        """, {"start": stamp - timedelta(days=365)})
        # Running jobs started a little while ago and still hold cores; a cancel
        # before the start holds none.
        # One statement per execute(): several in one work only with client-side
        # parameter binding.
        for sql in (
            "UPDATE bj SET started_at = %(now)s - (random() * interval '4 hours') - interval '5 minutes', "
            "ended_at = NULL WHERE status = 'running'",
            "UPDATE bj SET started_at = NULL, ended_at = NULL WHERE status = 'pending'",
            "UPDATE bj SET started_at = NULL, ended_at = created_at + interval '3 minutes' "
            "WHERE status = 'cancelled' AND cancelled_pending",
            "UPDATE bj SET created_at = least(created_at, started_at - interval '1 second') WHERE status = 'running'",
            "UPDATE bj SET ended_at = least(ended_at, %(now)s - interval '1 minute') "
            "WHERE ended_at > %(now)s - interval '1 minute'",
        ):
            cur.execute(sql, {"now": stamp})
        cur.execute("ALTER TABLE bj ADD PRIMARY KEY (g)")
        cur.execute("ANALYZE bj")
        timings["plan"] = time.time() - t0
        insert_select(cur, Job, job_columns(stamp), "FROM bj ORDER BY g")
        cur.execute("SELECT setval(pg_get_serial_sequence('jobs_job', 'id'), (SELECT max(id) FROM jobs_job))")
        timings["jobs"] = time.time() - t0
        # Attempts: a requeued job's first attempt held its cores for the first third
        # of the run and was preempted; it ran again 5 minutes later.
        attempt = {"job_id": "g", "team_id": "team_id", "user_id": "user_id", "kind": "kind", "family": "family",
                   "instance_type": "instance_type", "host_id": "host_id", "cores": "cores"}
        first_end = "CASE WHEN requeued AND ended_at IS NOT NULL THEN started_at + (ended_at - started_at) / 3 " \
                    "ELSE ended_at END"
        insert_select(cur, JobAttempt, {**attempt, "number": "1", "started_at": "started_at", "ended_at": first_end,
                                        "core_seconds": f"coalesce(cores * extract(epoch FROM ({first_end}) - "
                                                        f"started_at), 0)",
                                        "outcome": "CASE WHEN status = 'running' THEN '' WHEN requeued THEN "
                                                   "'preempted' ELSE status END"},
                      "FROM bj WHERE started_at IS NOT NULL")
        insert_select(cur, JobAttempt, {**attempt, "number": "2",
                                        "started_at": "started_at + (ended_at - started_at) / 3 + interval '5 minutes'",
                                        "ended_at": "ended_at + interval '5 minutes'",
                                        "core_seconds": "cores * extract(epoch FROM (ended_at - started_at) * 2 / 3)",
                                        "outcome": "status"},
                      "FROM bj WHERE started_at IS NOT NULL AND requeued AND ended_at IS NOT NULL")
        timings["attempts"] = time.time() - t0
        ev = {"job_id": "g", "actor_id": "NULL", "message": "''", "data": "'{}'::jsonb"}
        insert_select(cur, JobEvent, {**ev, "at": "created_at", "kind": "'pending'"}, "FROM bj")
        insert_select(cur, JobEvent, {**ev, "at": "started_at", "kind": "'running'"},
                      "FROM bj WHERE started_at IS NOT NULL")
        insert_select(cur, JobEvent, {**ev, "at": "ended_at", "kind": "status"},
                      "FROM bj WHERE status IN ('succeeded','failed','cancelled')")
        timings["events"] = time.time() - t0
        fill_endpoints(cur)
        timings["endpoints"] = time.time() - t0
        fill_notifications(cur)
        timings["notifications"] = time.time() - t0
        # Utilization minutes of the running jobs over their last two hours, per core
        # and the job-level (core -1) row the metrics roll-up also writes.
        insert_select(cur, MetricMinute, {
            "host_id": "host_id", "job_id": "g", "minute": "m", "core": "c",
            "util_mean": "CASE WHEN c < 0 THEN 50 ELSE round((100 * r_util)::numeric, 1)::float8 END",
            "util_peak": "100", "samples": "60"},
            "FROM bj, generate_series(date_trunc('minute', greatest(started_at, %s::timestamptz - interval '2 hours')),"
            " %s::timestamptz - interval '2 minutes', interval '1 minute') m, generate_series(-1, cores - 1) c "
            "WHERE status = 'running'", [stamp, stamp])
        timings["metric_minutes"] = time.time() - t0
        history_rollups(cur, cutoff0)
        timings["rollups"] = time.time() - t0
    rebuild_site_wait_totals()  # the site's running wait totals, from the SQL-written daily rows
    timings["wait_totals"] = time.time() - t0
    with connection.cursor() as cur:
        cur.execute("ANALYZE")
    UsageRollupState.objects.update_or_create(pk=1, defaults={"cutoff": cutoff0, "ran_at": cutoff0})
    t1 = time.time()
    stats = fold()
    timings["fold"] = time.time() - t1
    log(f"real fold after the SQL history: {stats.as_dict()} in {timings['fold']:.1f} s")
    return timings


def fill_endpoints(cur) -> None:
    """The serve jobs as replicas of their team's endpoints (running: ready, pending:
    starting, finished: stopped or failed), a revision about every REVISION_DAYS of
    each endpoint's history, and the timeline: a rollout and its traffic shift per
    revision, each replica's ready and stopped / failed events."""
    cur.execute(f"""
        CREATE TEMP TABLE br AS
        SELECT g, e.id AS endpoint_id, status, created_at, started_at, ended_at,
               1 + floor(extract(epoch FROM created_at - (SELECT min(created_at) FROM bj))
                         / {REVISION_DAYS * 86400})::int AS revision,
               20 + 60 * r_util AS cold_s
        FROM bj JOIN (SELECT id, team_id, row_number() OVER (PARTITION BY team_id ORDER BY id) - 1 AS k
                      FROM jobs_endpoint) e ON e.team_id = bj.team_id AND e.k = bj.g % {ENDPOINTS_PER_TEAM}
        WHERE kind = 'serve'
    """)
    insert_select(cur, Replica, {
        "endpoint_id": "endpoint_id", "job_id": "g", "revision": "revision",
        "state": "CASE status WHEN 'running' THEN 'ready' WHEN 'pending' THEN 'starting' "
                 "WHEN 'failed' THEN 'failed' ELSE 'stopped' END",
        "url": "CASE WHEN status = 'running' THEN 'http://10.0.0.1:' || (9000 + g %% 1000) ELSE '' END",
        "created_at": "created_at",
        "ready_at": "CASE WHEN started_at IS NOT NULL THEN started_at + cold_s * interval '1 second' END",
        "stopped_at": "ended_at"}, "FROM br")
    cur.execute("""
        UPDATE jobs_endpoint e SET revision = r.n, serving_revision = r.n, created_at = r.first
        FROM (SELECT endpoint_id, max(revision) AS n, min(created_at) AS first FROM br GROUP BY endpoint_id) r
        WHERE r.endpoint_id = e.id
    """)
    insert_select(cur, EndpointRevision, {
        "endpoint_id": "e.id", "number": "n", "cores_per_replica": "e.cores_per_replica",
        "state": "CASE WHEN n = e.revision THEN 'live' ELSE 'superseded' END",
        "created_at": f"e.created_at + (n - 1) * interval '{REVISION_DAYS} days'",
        "options": "e.options"}, "FROM jobs_endpoint e, generate_series(2, e.revision) n")
    event = {"endpoint_id": "endpoint_id", "actor_id": "NULL"}
    insert_select(cur, EndpointEvent, {
        **event, "at": "min(created_at)", "kind": "'rollout_started'", "revision": "revision",
        "message": "'revision ' || revision", "data": "'{}'::jsonb"},
        "FROM br WHERE revision > 1 GROUP BY endpoint_id, revision")
    insert_select(cur, EndpointEvent, {
        **event, "at": "min(started_at) + interval '1 minute'", "kind": "'traffic_shifted'", "revision": "revision",
        "message": "'traffic on revision ' || revision", "data": "'{}'::jsonb"},
        "FROM br WHERE revision > 1 AND started_at IS NOT NULL GROUP BY endpoint_id, revision")
    insert_select(cur, EndpointEvent, {
        **event, "at": "started_at + cold_s * interval '1 second'", "kind": "'replica_ready'", "revision": "revision",
        "message": "'replica ' || g || ' ready'",
        "data": "jsonb_build_object('replica', g, 'cold_start_s', round(cold_s::numeric, 3), "
                "'load_s', round((cold_s / 2)::numeric, 3))"},
        "FROM br WHERE started_at IS NOT NULL")
    insert_select(cur, EndpointEvent, {
        **event, "at": "ended_at",
        "kind": "CASE WHEN status = 'failed' THEN 'replica_failed' ELSE 'replica_stopped' END",
        "revision": "revision", "message": "'replica ' || g || ' ' || status",
        "data": "jsonb_build_object('replica', g)"},
        "FROM br WHERE ended_at IS NOT NULL")


def fill_notifications(cur) -> None:
    """A notification for every job that succeeded or failed (the team webhook wants
    both), delivered to the team's webhook and, for a failed job, to its owner's
    email; the last hour's deliveries still pending, 2 % given up."""
    cur.execute("CREATE TEMP TABLE bn (id bigint, g int, team_id int, user_id int, status text, at timestamptz)")
    insert_select(cur, Notification, {
        "team_id": "team_id", "job_id": "g", "user_id": "user_id", "kind": "'job.' || status",
        "title": "'Job ' || g || ' ' || status", "created_at": "ended_at",
        "payload": "jsonb_build_object('kind', 'job.' || status, 'team_id', team_id, 'job_id', g)",
        "dedup_key": "NULL"},
        "FROM bj WHERE status IN ('succeeded', 'failed') ORDER BY ended_at, g")
    cur.execute("INSERT INTO bn SELECT n.id, n.job_id, n.team_id, n.user_id, bj.status, n.created_at "
                "FROM jobs_notification n JOIN bj ON bj.g = n.job_id")
    delivery = {
        "notification_id": "bn.id", "subscription_id": "s.id", "delivery_id": "gen_random_uuid()",
        "status": "CASE WHEN bn.at > %s - interval '1 hour' THEN 'pending' "
                  "WHEN abs(hashint8(bn.id)) %% 50 = 0 THEN 'failed' ELSE 'delivered' END",
        "attempts": "CASE WHEN abs(hashint8(bn.id)) %% 50 = 0 THEN 8 ELSE 1 END",
        "ticket": "1", "next_attempt_at": "bn.at", "created_at": "bn.at",
        "delivered_at": "CASE WHEN abs(hashint8(bn.id)) %% 50 <> 0 THEN bn.at + interval '2 seconds' END",
        "last_error": "CASE WHEN abs(hashint8(bn.id)) %% 50 = 0 THEN 'HTTP 500' ELSE '' END"}
    # In the order the service writes them, a notification's deliveries together: each
    # subscription's deliveries spread over the table's ids as they would be.
    insert_select(cur, Delivery, delivery,
                  "FROM bn JOIN jobs_subscription s ON s.team_id = bn.team_id AND (s.scope = 'team' "
                  "OR (s.scope = 'self' AND s.user_id = bn.user_id AND bn.status = 'failed')) ORDER BY bn.id, s.id",
                  [now()])


def job_columns(stamp: datetime) -> dict[str, str]:
    """The job insert's columns from the plan table bj (no placeholders: the
    defaults' parameters are bound by position)."""
    return {
        "id": "g", "team_id": "team_id", "user_id": "user_id", "kind": "kind", "status": "status",
        "family": "family", "cores": "cores", "created_at": "created_at",
        "queued_at": "started_at",  # every job that started keeps its first start, finished or not
        "started_at": "started_at",
        "finished_at": "CASE WHEN status IN ('succeeded','failed','cancelled') THEN ended_at END",
        "heartbeat_at": f"CASE WHEN status = 'running' THEN '{stamp.isoformat()}'::timestamptz END",
        "host_id": "CASE WHEN status = 'running' THEN host_id END",
        "core_start": "CASE WHEN status = 'running' THEN 0 END",
        "attempts": "CASE WHEN started_at IS NULL THEN 0 WHEN requeued AND status <> 'running' THEN 2 ELSE 1 END",
        "failure": "CASE WHEN status = 'failed' THEN 'error' ELSE '' END",
    }


def history_rollups(cur, cutoff0: datetime) -> None:
    """A year of roll-ups in SQL, by the same rules as jobs.usage (split at the
    team's local midnight, priced per instance type, 70 % of attempts measured),
    for everything that ended by cutoff0; JobUsage progress says so, so the real
    fold picks up exactly the rest."""
    prices = accounting.default_prices()
    values = ", ".join(f"('{p.instance_type}', {p.usd_per_core_second!r})" for p in prices.values()
                       if p.instance_type.replace(".", "").isalnum())
    log_gamma = math.log(accounting.WaitSketch.GAMMA)
    cur.execute("CREATE TEMP TABLE price (instance_type text PRIMARY KEY, per_s float8)")
    cur.execute(f"INSERT INTO price VALUES {values}")
    cur.execute(f"""
        CREATE TEMP TABLE facts AS
        SELECT u.*, coalesce(u.cs * p.per_s, 0) AS cost,
               CASE WHEN u.measured THEN coalesce(u.cs * (1 - u.util) * p.per_s, 0) ELSE 0 END AS idle,
               CASE WHEN p.per_s IS NULL THEN u.cs ELSE 0 END AS unpriced
        FROM (
            -- attempt pieces per local day
            SELECT a.team_id, d.day::date AS day, a.user_id, a.kind, a.family, a.instance_type, a.job_id,
                   a.cores * extract(epoch FROM least(a.ended_at, (d.day + interval '1 day') AT TIME ZONE t.time_zone)
                                               - greatest(a.started_at, d.day AT TIME ZONE t.time_zone))::float8 AS cs,
                   abs(hashint8(a.id)) %% 10 < 7 AS measured,
                   0.2 + 0.7 * (abs(hashint8(a.id * 7)) %% 1000) / 1000.0 AS util,
                   0 AS succ, 0 AS fail, 0 AS canc, (a.outcome IN ('preempted', 'requeued'))::int AS intr,
                   NULL::int AS bucket, 0::float8 AS wait_s, 0 AS wait_n
            FROM jobs_jobattempt a JOIN jobs_team t ON t.id = a.team_id,
                 generate_series(date_trunc('day', a.started_at AT TIME ZONE t.time_zone),
                                 date_trunc('day', (a.ended_at - interval '1 microsecond') AT TIME ZONE t.time_zone),
                                 interval '1 day') d(day)
            WHERE a.ended_at IS NOT NULL AND a.ended_at <= %(cutoff)s
            UNION ALL
            -- queue waits, on the day of the first start
            SELECT a.team_id, (a.started_at AT TIME ZONE t.time_zone)::date, a.user_id, a.kind, a.family,
                   a.instance_type, NULL, 0, false, 0, 0, 0, 0, 0,
                   CASE WHEN x.w < 1 THEN 0 ELSE floor(ln(x.w) / {log_gamma})::int + 1 END, x.w, 1
            FROM jobs_jobattempt a JOIN jobs_team t ON t.id = a.team_id JOIN jobs_job j ON j.id = a.job_id,
                 LATERAL (SELECT greatest(extract(epoch FROM a.started_at - j.created_at), 0)::float8 AS w) x
            WHERE a.number = 1 AND a.ended_at IS NOT NULL AND a.ended_at <= %(cutoff)s
            UNION ALL
            -- outcomes, on the day the job finished
            SELECT j.team_id, (j.finished_at AT TIME ZONE t.time_zone)::date, j.user_id, j.kind, j.family,
                   coalesce(h.instance_type, ''), NULL, 0, false, 0,
                   (j.status = 'succeeded')::int, (j.status = 'failed')::int, (j.status = 'cancelled')::int, 0,
                   NULL, 0, 0
            FROM jobs_job j JOIN jobs_team t ON t.id = j.team_id JOIN bj ON bj.g = j.id
                 LEFT JOIN jobs_host h ON h.id = bj.host_id AND bj.started_at IS NOT NULL
            WHERE j.finished_at IS NOT NULL AND j.finished_at <= %(cutoff)s
        ) u LEFT JOIN price p USING (instance_type);
    """, {"cutoff": cutoff0})
    measures = """sum(cs) AS cs, sum(CASE WHEN measured THEN cs ELSE 0 END) AS mcs,
                  sum(CASE WHEN measured THEN cs * util ELSE 0 END) AS ucs, sum(cost) AS cost, sum(idle) AS idle,
                  sum(unpriced) AS unpriced, sum(succ) AS succ, sum(fail) AS fail, sum(canc) AS canc,
                  sum(intr) AS intr, sum(wait_n) AS wn, sum(wait_s) AS ws"""
    outer = """coalesce(sum(cs), 0), coalesce(sum(mcs), 0), coalesce(sum(ucs), 0), coalesce(sum(cost), 0),
               coalesce(sum(idle), 0), coalesce(sum(unpriced), 0), sum(succ), sum(fail), sum(canc), sum(intr),
               sum(wn), sum(ws),
               coalesce(jsonb_object_agg(bucket::text, wn) FILTER (WHERE bucket IS NOT NULL), '{}'::jsonb)"""
    totals = ("core_seconds, measured_core_seconds, used_core_seconds, cost_usd, idle_cost_usd, "
              "unpriced_core_seconds, jobs_succeeded, jobs_failed, jobs_cancelled, attempts_interrupted, "
              "wait_count, wait_sum_s, wait_sketch")
    for table, key in ((UsageDaily._meta.db_table, "team_id, day, user_id, kind, family, instance_type"),
                       (UsageTeamDay._meta.db_table, "team_id, day"),
                       (UsageSiteDaily._meta.db_table, "day, kind, family")):
        cur.execute(f"""
            INSERT INTO {table} ({key}, {totals})
            SELECT {key}, {outer} FROM (SELECT {key}, bucket, {measures} FROM facts GROUP BY {key}, bucket) x
            GROUP BY {key}
        """)
    cur.execute(f"""
        INSERT INTO {JobUsage._meta.db_table} (job_id, team_id, day, instance_type, core_seconds,
            measured_core_seconds, used_core_seconds, cost_usd, idle_cost_usd, attempt_folded, folded_until,
            outcome_folded)
        SELECT j.id, j.team_id, coalesce(f.day, (j.finished_at AT TIME ZONE t.time_zone)::date),
               coalesce(f.instance_type, ''), coalesce(f.cs, 0), coalesce(f.mcs, 0), coalesce(f.ucs, 0),
               coalesce(f.cost, 0), coalesce(f.idle, 0), coalesce(c.n, 0), NULL,
               j.finished_at IS NOT NULL AND j.finished_at <= %(cutoff)s
        FROM jobs_job j JOIN jobs_team t ON t.id = j.team_id
             LEFT JOIN (SELECT job_id, count(*) AS n FROM jobs_jobattempt WHERE ended_at <= %(cutoff)s
                        GROUP BY job_id) c ON c.job_id = j.id
             LEFT JOIN (SELECT job_id, max(day) AS day, max(instance_type) AS instance_type, sum(cs) AS cs,
                               sum(CASE WHEN measured THEN cs ELSE 0 END) AS mcs,
                               sum(CASE WHEN measured THEN cs * util ELSE 0 END) AS ucs,
                               sum(cost) AS cost, sum(idle) AS idle
                        FROM facts WHERE job_id IS NOT NULL GROUP BY job_id) f ON f.job_id = j.id
        WHERE (j.finished_at IS NOT NULL AND j.finished_at <= %(cutoff)s) OR c.n IS NOT NULL
    """, {"cutoff": cutoff0})


# --- measuring ------------------------------------------------------------------------

def pages_to_measure() -> dict[str, tuple[str, object]]:
    """(url, user) per page: the manager of the busiest team (teams are skewed, so
    its pages are the worst case), and the staff admin."""
    User = get_user_model()
    with connection.cursor() as cur:
        cur.execute("SELECT team_id FROM jobs_job GROUP BY team_id ORDER BY count(*) DESC, team_id LIMIT 1")
        team_id = cur.fetchone()[0]
    membership = Membership.objects.select_related("team", "user").filter(team_id=team_id, role=Role.MANAGER).first()
    job = Job.objects.filter(team_id=team_id, status="succeeded").exclude(kind="serve").order_by("-id").first()
    admin = User.objects.get(username="admin")
    slug = membership.team.slug
    # the team's endpoint with the longest history, and its webhook subscription
    endpoint = (Endpoint.objects.filter(team_id=team_id).annotate(n=Count("replicas")).order_by("-n", "pk").first())
    webhook = Subscription.objects.filter(team_id=team_id, scope=Subscription.Scope.TEAM).first()
    return {
        "job_list": (f"/teams/{slug}/jobs/", membership.user),
        "job_page": (f"/jobs/{job.pk}/", membership.user),
        "team_usage": (f"/teams/{slug}/usage/", membership.user),
        "site_usage": ("/usage/", admin),
        "quotas": ("/quotas/", admin),
        "team_page": (f"/teams/{slug}/", membership.user),
        "endpoint_list": (f"/teams/{slug}/endpoints/", membership.user),
        "endpoint_page": (f"/endpoints/{endpoint.pk}/", membership.user),
        "notifications": (f"/teams/{slug}/notifications/", membership.user),
        "subscription": (f"/teams/{slug}/notifications/subscriptions/{webhook.pk}/", membership.user),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


ONLY: set[str] = set()  # --only: measure just these pages (quicker iterations)
COLD = False  # --cold: empty Django's cache before every timed request (no roll-up read cached at all)
AFTER_FOLD = False  # --after-fold: a real fold (another process) before every timed request


def _fold_worker(conn, database: str) -> None:
    """--after-fold: folds in a process of their own, as the Celery worker runs them
    (the fold's garbage and CPU are not the web process's)."""
    use_database(database)
    while conn.recv():
        conn.send(fold().as_dict())


class Folder:
    def __init__(self, database: str):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_fold_worker, args=(child, database), daemon=True)
        self.process.start()

    def fold(self) -> dict:
        self.conn.send(True)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(False)
        self.process.join(30)


class Side:
    """One database's pages: its targets, logged-in clients and its fold process
    (--after-fold). Django's caches are given a key prefix per database, and the
    per-process caches are emptied on each switch, so neither database reads what
    the other computed. The start-time estimates are stored once per database, as
    the periodic task (jobs.estimate_starts) does."""

    def __init__(self, database: str):
        self.database = database
        self.switch()
        forecasts.store()
        targets = pages_to_measure()
        self.targets = {**targets, **extra_pages(targets)}
        self.clients: dict[int, Client] = {}
        self.folder = Folder(database) if AFTER_FOLD else None

    def switch(self) -> None:
        use_database(self.database)
        cache.key_prefix = caches["shared"].key_prefix = self.database
        clear_usage_cache(closed_days=False)
        connection.ensure_connection()

    def client(self, user) -> Client:
        client = self.clients.get(user.pk)
        if client is None:
            # X-Forwarded-Proto: https, as the site's TLS-terminating proxy sets it
            # (a DEBUG-off site redirects plain HTTP).
            client = self.clients[user.pk] = Client(HTTP_X_FORWARDED_PROTO="https")
            client.force_login(user)
        return client

    def close(self) -> None:
        if self.folder:
            self.folder.close()


ROUNDS = 3  # each page's timed requests alternate between the databases in this many blocks each


def measure(requests: int, sides: dict[str, Side]) -> dict[str, dict[str, dict]]:
    """Per page and database: p50 / p95 latency, this process's CPU time, the time
    its SQL took, and the query count. A page's requests alternate between the
    databases in blocks (ROUNDS per database, 2 warm-up requests after each switch),
    so a change of the shared machine's load falls on both alike."""
    results: dict[str, dict[str, dict]] = {side: {} for side in sides}
    names = [n for n in next(iter(sides.values())).targets if not ONLY or n in ONLY]
    for name in names:
        live = {}
        for key, side in sides.items():
            url, user = side.targets[name]
            try:
                resolve(url.split("?")[0])
            except Resolver404:
                results[key][name] = {"missing": f"{url} is not routed"}
                continue
            side.switch()
            status = side.client(user).get(url).status_code
            if status != 200:
                results[key][name] = {"missing": f"{url} answered {status}"}
                continue
            live[key] = {"times": [], "cpu": [], "sql": [], "counts": [], "slowest": []}
        if len(live) < len(sides):
            continue
        block = max(1, requests // ROUNDS)
        for round_ in range(ROUNDS):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for key in order:
                side, into = sides[key], live[key]
                url, user = side.targets[name]
                side.switch()
                client = side.client(user)
                for _ in range(2):
                    client.get(url)
                for _ in range(block if round_ < ROUNDS - 1 else requests - block * (ROUNDS - 1)):
                    _timed_request(side, client, url, into)
        for key, into in live.items():
            times, cpu, sql = into["times"], into["cpu"], into["sql"]
            # cpu: this process's CPU time (Django's side; PostgreSQL's is not in it);
            # sql: the time Django waited on its queries (PostgreSQL and the wire)
            results[key][name] = {
                "url": sides[key].targets[name][0], "p50_ms": round(statistics.median(times), 1),
                "p95_ms": round(percentile(times, 0.95), 1), "cpu_p50_ms": round(statistics.median(cpu), 1),
                "sql_p50_ms": round(statistics.median(sql), 1), "sql_p95_ms": round(percentile(sql, 0.95), 1),
                "queries": max(into["counts"]),
                "slowest": [(round(float(q["time"]) * 1000, 1), q["sql"][:400]) for q in into["slowest"]]}
    return results


def _timed_request(side: Side, client: Client, url: str, into: dict) -> None:
    # The fair-share usage is cached per process for FAIRSHARE_CACHE_S (5 s): views
    # of a team page are further apart than that, so each recomputes it (the closed
    # days it keeps in Django's cache stay, as they do between views).
    clear_usage_cache(closed_days=False)
    if COLD:
        cache.clear()
    if side.folder:
        side.folder.fold()
    with CaptureQueriesContext(connection) as ctx:
        t0, c0 = time.perf_counter(), time.process_time()
        response = client.get(url)
        into["times"].append((time.perf_counter() - t0) * 1000)
        into["cpu"].append((time.process_time() - c0) * 1000)
    assert response.status_code == 200, (url, response.status_code)
    into["sql"].append(sum(float(q["time"]) for q in ctx.captured_queries) * 1000)
    into["counts"].append(len(ctx.captured_queries))
    into["slowest"] = sorted(ctx.captured_queries, key=lambda q: -float(q["time"]))[:3]


def seed_one_job() -> None:
    """The empty database's only job, so the job page has something to show."""
    membership = Membership.objects.filter(role=Role.MANAGER).select_related("team").first()
    t = now()
    job = Job.objects.create(team=membership.team, user_id=membership.user_id, kind="compile", family="inf2", cores=1,
                             status="succeeded", created_at=t - timedelta(minutes=5), finished_at=t)
    # and its notification, delivered to the team's webhook (the history's page reads its deliveries)
    notification = Notification.objects.create(team=membership.team, job=job, user_id=membership.user_id,
                                               kind=EventKind.JOB_SUCCEEDED, title=f"Job {job.pk} succeeded")
    webhook = Subscription.objects.get(team=membership.team, scope=Subscription.Scope.TEAM)
    Delivery.objects.create(notification=notification, subscription=webhook, status=Delivery.Status.DELIVERED,
                            attempts=1, delivered_at=t)


def extra_pages(targets: dict) -> dict[str, tuple[str, object]]:
    """Usage variants reported besides the five (not in the JSON): the longest named
    range, by user, and the site's by-team stacking."""
    member, admin = targets["team_usage"][1], targets["site_usage"][1]
    return {"team_usage_90d_by_user": (targets["team_usage"][0] + "?range=90d&group_by=user", member),
            "site_usage_90d_by_team": ("/usage/?range=90d&group_by=team", admin)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=30, help="timed requests per page")
    parser.add_argument("--reuse", action="store_true", help="measure the filled database from an earlier run")
    parser.add_argument("--only", default="", help="comma-separated page names to measure (e.g. site_usage)")
    parser.add_argument("--cold", action="store_true",
                        help="clear Django's cache before each timed request (roll-up reads uncached)")
    parser.add_argument("--after-fold", action="store_true",
                        help="run the roll-up fold before each timed request (the first render after a fold; "
                             "slow: a fold per request)")
    args = parser.parse_args()
    ONLY.update(n for n in args.only.split(",") if n)
    global COLD, AFTER_FOLD
    COLD, AFTER_FOLD = args.cold, args.after_fold

    load_start = [round(x, 2) for x in os.getloadavg()]  # the machine is shared: say how busy it was
    log(f"empty baseline database {DB_EMPTY}")
    recreate(DB_EMPTY)
    create_cast()
    seed_one_job()

    timings: dict = {}
    reused = False
    if args.reuse and database_exists(DB_FILLED):
        use_database(DB_FILLED)
        call_command("migrate", verbosity=0, interactive=False)  # migrations added since the fill
        have = Job.objects.count()
        if have >= args.jobs:
            reused = True
            log(f"reusing {DB_FILLED} with {have} jobs; folding what happened since the last run")
            t0 = time.time()
            log(f"fold: {fold().as_dict()} in {time.time() - t0:.1f} s")
        else:
            log(f"{DB_FILLED} has {have} jobs, not {args.jobs}: filling it again")
    if not reused:
        log(f"filling {DB_FILLED} with {args.jobs} jobs across {TEAMS} teams")
        recreate(DB_FILLED)
        create_cast()
        t0 = time.time()
        timings = fill(args.jobs)
        log("fill steps (cumulative s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
        log(f"fill took {time.time() - t0:.1f} s")
    counts = {"jobs": Job.objects.count(), "attempts": JobAttempt.objects.count(),
              "events": JobEvent.objects.count(), "usage_daily": UsageDaily.objects.count(),
              "usage_team_day": UsageTeamDay.objects.count(), "usage_site_daily": UsageSiteDaily.objects.count(),
              "usage_site_wait_totals": UsageSiteWaitTotal.objects.count(),
              "job_usage": JobUsage.objects.count(), "metric_minutes": MetricMinute.objects.count(),
              "replicas": Replica.objects.count(), "endpoint_events": EndpointEvent.objects.count(),
              "notifications": Notification.objects.count(), "deliveries": Delivery.objects.count()}
    log("rows: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    sides = {"filled": Side(DB_FILLED), "empty": Side(DB_EMPTY)}
    try:
        results = measure(args.requests, sides)
    finally:
        for side in sides.values():
            side.close()
    use_database("postgres")
    admin_sql(f'DROP DATABASE IF EXISTS "{DB_EMPTY}" WITH (FORCE)')
    filled, empty = results["filled"], results["empty"]

    report = {}
    print()
    print(f"{'page':<24} {'p50 ms':>7} {'p95 ms':>7} {'cpu p50':>7} {'sql p50':>7} {'queries':>7} "
          f"{'p95 empty':>9} {'cpu empty':>9} {'sql empty':>9} {'q empty':>7}  url")
    for name in [*PAGES, *(n for n in filled if n not in PAGES)]:
        f, e = filled.get(name, {}), empty.get(name, {})
        if ONLY and name not in ONLY:
            continue
        if "missing" in f or "missing" in e:
            if name in PAGES:
                report[name] = {"missing": f.get("missing") or e.get("missing")}
            print(f"{name:<24} missing: {f.get('missing') or e.get('missing')}")
            continue
        if name in PAGES:
            report[name] = {"p50_ms": f["p50_ms"], "p95_ms": f["p95_ms"], "queries": f["queries"],
                            "p95_ms_empty": e["p95_ms"], "queries_empty": e["queries"], "cpu_p50_ms": f["cpu_p50_ms"],
                            "cpu_p50_ms_empty": e["cpu_p50_ms"], "sql_p50_ms": f["sql_p50_ms"],
                            "sql_p50_ms_empty": e["sql_p50_ms"]}
        flag = "" if f["p95_ms"] < TARGET_MS else "  << over the 100 ms target"
        print(f"{name:<24} {f['p50_ms']:>7} {f['p95_ms']:>7} {f['cpu_p50_ms']:>7} {f['sql_p50_ms']:>7} "
              f"{f['queries']:>7} {e['p95_ms']:>9} {e['cpu_p50_ms']:>9} {e['sql_p50_ms']:>9} {e['queries']:>7}  "
              f"{f['url']}{flag}")
    for name, f in filled.items():
        if "p95_ms" in f and f["p95_ms"] >= TARGET_MS:
            print(f"\nslowest queries of {name} ({f['url']}) on the filled database, one request:")
            for ms, sql in f["slowest"]:
                print(f"  {ms:>7} ms  {sql}")
    print()
    print(json.dumps({"jobs": counts["jobs"], "pages": report,
                      "loadavg": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}}))


if __name__ == "__main__":
    main()
