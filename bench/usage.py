"""Usage reads and roll-up: hand-written PostgreSQL against the ORM, on the same data.

    .venv/bin/python bench/usage.py             # create and fill, then measure (minutes)
    .venv/bin/python bench/usage.py --reuse     # measure again on the filled database
    .venv/bin/python bench/usage.py --jobs 200000

The rule (issue #12): raw SQL stays only for a roll-up or read that a bench shows at
least 2x faster than the plain ORM version, on a figure a user sees. This bench
measures each place jobs.usage used hand-written SQL, both ways, in the same run and
on the same data: bench/pages.py's fill (1,000,000 jobs across 200 teams, a year of
roll-ups, the running jobs' utilization minutes, then the real fold) in its own
database, `neurondeck_bench_usage` (kept for --reuse; another name in BENCH_USAGE_DB,
e.g. bench/pages.py's filled database, which holds the same fill).

Cases (each variant run --repeat times, the two interleaved; medians in ms):
  live_site / live_team   the live part of the site's / the busiest team's usage page
                          (every render): jobs.usage.rollup.live_usage (one SQL
                          statement) vs live_usage_python (ORM reads, rules in Python)
  fold_measure            the utilization a fold matches to the pieces it folds, for
                          the running jobs' last two hours (a fold catching up): one
                          SQL statement (LATERAL per piece) vs the ORM's minute rows
                          matched in Python
  team_sketches_90d       the busiest team's wait sketches merged per kind over 90
                          days (the first render of its usage page after a fold):
                          jsonb_each in the database (the SQL it used) vs merged in
                          Python (jobs.usage.selectors, now on both databases)
  site_wait_sketches      the site's wait sketches from its running totals (the
                          first render of the site usage page after a fold): one SQL
                          statement with LATERAL probes (the SQL it used) vs two ORM
                          reads (jobs.usage.selectors, now on both databases)

Each pair is checked to give the same answer. The last line is one JSON object:
{"jobs": N, "cases": {case: {"sql_ms", "orm_ms", "orm_over_sql"}}, "loadavg": {...}}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import pages  # noqa: E402  (sets up Django on its own databases; its fill is reused here)

from django.db import connection  # noqa: E402
from django.db.models import Count  # noqa: E402
from django.utils import timezone  # noqa: E402

from jobs.models import Job, JobAttempt, Kind, UsageDaily, UsageSiteWaitTotal  # noqa: E402
from jobs.usage import accounting  # noqa: E402
from jobs.usage import rollup  # noqa: E402
from jobs.usage import selectors  # noqa: E402

DB = os.environ.get("BENCH_USAGE_DB", "neurondeck_bench_usage")


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return (time.perf_counter() - t0) * 1000, result


def compare(name: str, sql, orm, repeat: int, same) -> dict:
    """Run sql() and orm() `repeat` times each, interleaved; medians and the ratio."""
    sql_ms, orm_ms = [], []
    for _ in range(repeat):
        ms, a = timed(sql)
        sql_ms.append(ms)
        ms, b = timed(orm)
        orm_ms.append(ms)
    if not same(a, b):
        raise RuntimeError(f"{name}: the SQL and ORM versions disagree")
    row = {"sql_ms": round(statistics.median(sql_ms), 2), "orm_ms": round(statistics.median(orm_ms), 2)}
    row["orm_over_sql"] = round(row["orm_ms"] / row["sql_ms"], 2) if row["sql_ms"] else None
    pages.log(f"{name:<20} sql {row['sql_ms']:>9} ms   orm {row['orm_ms']:>9} ms   orm/sql {row['orm_over_sql']}")
    return row


def same_live(a: rollup.LiveUsage, b: rollup.LiveUsage) -> bool:
    """Same totals per (day, dims) and per job, and the same jobs holding cores."""
    def by_key(live):
        sums = defaultdict(accounting.Totals)
        for c in live.contributions:
            sums[(c.day, c.dims)].add(c.totals)
        return {k: round(t.core_seconds, 3) for k, t in sums.items()}
    return by_key(a) == by_key(b) and a.active_jobs == b.active_jobs


def running_pieces(now) -> list[accounting.Piece]:
    """A piece per running attempt over its last two hours, where its minutes are."""
    pieces = []
    for v in rollup.unfolded_attempts(since=now, before=now).filter(ended_at__isnull=True):
        row = rollup._attempt_row(v)
        pieces.append(accounting.Piece(row.job_id, row.number, row.dims, row.host_id, row.cores, now.date(),
                                       max(row.started_at, now - timedelta(hours=2)), now))
    return pieces


def measure_orm(pieces):
    return accounting.measure(pieces, rollup.minute_rows(pieces))


# The hand-written SQL that jobs.usage.selectors used before the bench showed the ORM
# as fast (kept here as the baseline the ORM versions are measured against).

def sketches_sql(qs) -> dict:
    inner, params = qs.filter(wait_count__gt=0).values("kind", "wait_sketch").query.sql_with_params()
    merged: dict[str, dict[str, int]] = defaultdict(dict)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT u.kind, e.key, SUM(e.value::bigint) FROM ({inner}) u, "
                       f"jsonb_each_text(u.wait_sketch) e GROUP BY u.kind, e.key", params)
        for kind, key, count in cursor.fetchall():
            merged[kind][key] = int(count)
    return dict(merged)


def site_wait_sketches_sql(first, last) -> dict:
    kinds = [k for k, _ in Kind.choices]
    pick = (f"SELECT t.wait_sketch FROM {UsageSiteWaitTotal._meta.db_table} t WHERE t.kind = k.kind "
            f"AND t.day {{}} %s ORDER BY t.day DESC LIMIT 1")
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT k.kind, hi.wait_sketch, lo.wait_sketch FROM unnest(%s::text[]) k(kind) "
                       f"LEFT JOIN LATERAL ({pick.format('<=')}) hi ON true "
                       f"LEFT JOIN LATERAL ({pick.format('<')}) lo ON true", [kinds, last, first])
        rows = cursor.fetchall()
    out = {}
    for kind, upto_last, before_first in rows:  # jsonb comes back as text through this cursor
        upto_last, before_first = (json.loads(v) if isinstance(v, str) else v for v in (upto_last, before_first))
        before_first = before_first or {}
        sketch = {key: n for key, count in (upto_last or {}).items()
                  if (n := int(count) - int(before_first.get(key, 0)))}
        if sketch:
            out[kind] = sketch
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--reuse", action="store_true", help="measure the filled database from an earlier run")
    args = parser.parse_args()
    load_start = [round(x, 2) for x in os.getloadavg()]

    if args.reuse and pages.database_exists(DB):
        pages.use_database(DB)
        pages.call_command("migrate", verbosity=0, interactive=False)
        pages.log(f"reusing {DB} ({Job.objects.count()} jobs); folding what happened since")
        rollup.fold()
    else:
        pages.log(f"filling {DB} with {args.jobs} jobs (bench/pages.py's fill)")
        pages.recreate(DB)
        pages.create_cast()
        pages.fill(args.jobs)

    now = timezone.now()
    busiest = (JobAttempt.objects.filter(ended_at__isnull=True).values("team_id").annotate(n=Count("id"))
               .order_by("-n").values_list("team_id", flat=True).first())
    mark = rollup.watermark()
    table = rollup.prices()
    cases = {}
    cases["live_site"] = compare(
        "live_site", lambda: rollup.live_usage(now=now, price_table=table, mark=mark),
        lambda: rollup.live_usage_python(now=now, price_table=table, mark=mark), args.repeat, same_live)
    cases["live_team"] = compare(
        "live_team", lambda: rollup.live_usage(team_id=busiest, now=now, price_table=table, mark=mark),
        lambda: rollup.live_usage_python(team_id=busiest, now=now, price_table=table, mark=mark), args.repeat,
        same_live)
    pieces = running_pieces(now)
    pages.log(f"fold_measure: {len(pieces)} pieces")
    cases["fold_measure"] = compare("fold_measure", lambda: rollup.measure(pieces), lambda: measure_orm(pieces),
                                    args.repeat, lambda a, b: [(n, round(s, 3)) for n, s in a] ==
                                    [(n, round(s, 3)) for n, s in b])
    today = now.date()
    team_days = UsageDaily.objects.filter(team_id=busiest, day__gte=today - timedelta(days=90), day__lte=today)
    cases["team_sketches_90d"] = compare("team_sketches_90d", lambda: sketches_sql(team_days),
                                         lambda: selectors._sketches_by_kind_uncached(team_days), args.repeat,
                                         lambda a, b: a == b)
    first = today - timedelta(days=90)
    cases["site_wait_sketches"] = compare("site_wait_sketches", lambda: site_wait_sketches_sql(first, today),
                                          lambda: selectors._site_wait_sketches_uncached(first, today), args.repeat,
                                          lambda a, b: a == b)
    print(json.dumps({"jobs": Job.objects.count(), "cases": cases,
                      "loadavg": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}}))


if __name__ == "__main__":
    main()
