"""Folding usage into the roll-up tables, and the shared database reads the live
part of the usage pages needs.

The fold (`fold()`, run every minute by the Celery task jobs.rollup_usage) adds to
UsageDaily / UsageTeamDay / UsageSiteDaily / JobUsage everything that happened up
to `cutoff = now - FOLD_DELAY` (rounded down to the minute):

* attempts: each one past its job's progress (JobUsage.attempt_folded /
  folded_until) is folded up to min(its end, cutoff) — closed attempts completely,
  open ones (jobs still holding cores) up to the cutoff, so a week-long fine-tune
  does not leave a week for the pages to compute live;
* finished jobs: their outcome (succeeded / failed / cancelled), once.

Progress lives per job, so folding is exactly-once however often the task runs or
crashes half-way (all of one run is one transaction). Candidates are found
through indexes: open attempts, plus attempts / jobs that ended after the
previous cutoff minus LAG — the LAG catches a row whose end was stamped before
the previous cutoff but committed after that fold read (transactions here last
milliseconds; LAG is minutes). FOLD_DELAY leaves the utilization roll-up
(jobs.rollup_metrics, every minute) time to write a minute's rows before the
minute is folded.

Besides the day grains, the fold keeps the site's running wait totals
(UsageSiteWaitTotal: a range's wait sketch is the difference of two rows) and
UsageRollupState's stamps: `stamp` changes with every fold, `settled_stamp` only
when a fold writes a day two or more days before its cutoff (settled_day), so pages
cache reads of older days across folds.

Pages read the roll-ups plus `live_usage()`: everything past the progress up to
now, which stays small (a few minutes of the jobs running now); on PostgreSQL it
is one SQL statement with the rules of jobs.usage (live_usage_python is the same
in Python, and the reference a test holds it to)."""
from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone
from itertools import groupby, islice

from django.db import connection, transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from jobs.models import (
    InstancePrice,
    Job,
    JobAttempt,
    JobUsage,
    MetricMinute,
    Team,
    UsageDaily,
    UsageRollupState,
    UsageSiteDaily,
    UsageSiteWaitTotal,
    UsageTeamDay,
)
from jobs.usage import accounting
from jobs.usage.accounting import AttemptRow, Contribution, Dims, MinuteRow, OutcomeRow, Price, Totals

log = logging.getLogger(__name__)

FOLD_DELAY = timedelta(minutes=5)
LAG = timedelta(minutes=10)
CHUNK = 2000  # attempts (or finished jobs) folded per batch

_ATTEMPT_FIELDS = ("job_id", "number", "team_id", "user_id", "kind", "family", "instance_type", "host_id", "cores",
                   "started_at", "ended_at", "outcome", "job__created_at", "team__time_zone",
                   "job__usage__attempt_folded", "job__usage__folded_until")
_OUTCOME_FIELDS = ("id", "team_id", "user_id", "kind", "family", "status", "finished_at", "team__time_zone",
                   "usage__instance_type")


def prices() -> dict[str, Price]:
    """The price table in effect: on-demand defaults with the admin's InstancePrice rows on top."""
    return accounting.price_table(InstancePrice.objects.values_list("instance_type", "usd_per_hour", "cores"))


# --- reads shared by the fold and the live part ---------------------------------------

def _attempt_row(v: dict) -> AttemptRow:
    return AttemptRow(
        job_id=v["job_id"], number=v["number"],
        dims=Dims(v["team_id"], v["user_id"], v["kind"], v["family"], v["instance_type"] or ""),
        host_id=v["host_id"], cores=v["cores"], started_at=v["started_at"], ended_at=v["ended_at"],
        outcome=v["outcome"] or "", job_created_at=v["job__created_at"], time_zone=v["team__time_zone"],
        folded_n=v["job__usage__attempt_folded"] or 0, folded_until=v["job__usage__folded_until"],
    )


_JOB_USAGE_FIELDS = ("job__usage__day", "job__usage__core_seconds", "job__usage__measured_core_seconds",
                     "job__usage__used_core_seconds", "job__usage__cost_usd", "job__usage__idle_cost_usd")


def unfolded_attempts(*, since: datetime | None, before: datetime, team_id: int | None = None,
                      with_job_usage: bool = False):
    """Attempts that may hold unfolded usage: open ones and those that ended after
    `since` (all of them when since is None), started before `before`, with their
    job's progress (and, if asked, its folded totals) joined in; sorted by (job, number)."""
    qs = JobAttempt.objects.filter(started_at__lt=before)
    if since is not None:
        qs = qs.filter(Q(ended_at__isnull=True) | Q(ended_at__gt=since))
    if team_id is not None:
        qs = qs.filter(team_id=team_id)
    return qs.order_by("job_id", "number").values(*_ATTEMPT_FIELDS, *(_JOB_USAGE_FIELDS if with_job_usage else ()))


def unfolded_outcomes(*, since: datetime | None, upto: datetime, team_id: int | None = None):
    """Jobs that finished after `since` (ever, when None) and by `upto` whose
    outcome is not yet folded."""
    qs = Job.objects.filter(finished_at__isnull=False, finished_at__lte=upto)
    if since is not None:
        qs = qs.filter(finished_at__gt=since)
    if team_id is not None:
        qs = qs.filter(team_id=team_id)
    qs = qs.filter(Q(usage__isnull=True) | Q(usage__outcome_folded=False))
    return qs.order_by("id").values(*_OUTCOME_FIELDS)


def _outcome_row(v: dict, instance_types: dict[int, str]) -> OutcomeRow:
    instance_type = instance_types.get(v["id"], v["usage__instance_type"] or "")
    return OutcomeRow(v["id"], Dims(v["team_id"], v["user_id"], v["kind"], v["family"], instance_type),
                      v["status"], v["finished_at"], v["team__time_zone"])


def measure(pieces: Sequence[accounting.Piece]) -> list[tuple[int, float]]:
    """(per-core minute rows, sum of util_mean) of each piece, by the rule of
    jobs.usage.measure (a minute belongs to the piece holding its midpoint).

    On PostgreSQL the database matches minutes to pieces and sums them (one query
    returning a row per measured piece: bench/usage.py's fold_measure, the fold of
    every minute and a fold catching up); elsewhere the minutes are fetched and
    matched here."""
    if not pieces:
        return []
    if connection.vendor != "postgresql":
        return accounting.measure(pieces, minute_rows(pieces))
    half = accounting.MINUTE / 2
    # midpoint m + 30 s in [start, end)  <=>  m in [start - 30 s, end - 30 s). The
    # pieces go as five arrays (five parameters, not five per piece: composing
    # thousands of parameters costs more than the query).
    # Bounds go as epoch seconds: float arrays are adapted in C, timestamps through
    # Django's Python-level time zone adapters.
    params = [list(range(len(pieces))), [p.job_id for p in pieces], [p.host_id for p in pieces],
              [(p.start - half).timestamp() for p in pieces], [(p.end - half).timestamp() for p in pieces]]
    # LATERAL: one index range scan per piece; a plain join lets the planner hash
    # the whole minute table.
    sql = (f"SELECT p.i, x.n, x.s FROM unnest(%s::int[], %s::bigint[], %s::bigint[], %s::float8[], "
           f"%s::float8[]) AS q(i, job_id, host_id, lo_s, hi_s), LATERAL (SELECT q.i, q.job_id, q.host_id, "
           f"to_timestamp(q.lo_s) AS lo, to_timestamp(q.hi_s) AS hi) p, LATERAL ("
           f"SELECT COUNT(*) AS n, SUM(m.util_mean) AS s FROM {MetricMinute._meta.db_table} m "
           f"WHERE m.job_id = p.job_id AND m.minute >= p.lo AND m.minute < p.hi AND m.host_id = p.host_id "
           f"AND m.core >= 0) x WHERE x.n > 0")
    result = [(0, 0.0)] * len(pieces)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        for i, count, total in cursor.fetchall():
            result[i] = (int(count), float(total or 0.0))
    return result


def minute_rows(pieces: Sequence[accounting.Piece]) -> list[MinuteRow]:
    """The per-core utilization minutes of these pieces' jobs over their span, summed
    per (job, host, minute) in the database (one query)."""
    if not pieces:
        return []
    job_ids = sorted({p.job_id for p in pieces})
    start = min(p.start for p in pieces) - accounting.MINUTE
    end = max(p.end for p in pieces)
    rows = (MetricMinute.objects.filter(job_id__in=job_ids, core__gte=0, minute__gte=start, minute__lt=end)
            .values("job_id", "host_id", "minute").annotate(n=Count("id"), s=Sum("util_mean")).order_by())
    return [MinuteRow(r["job_id"], r["host_id"], r["minute"], r["n"], r["s"] or 0.0) for r in rows]


@dataclass
class LiveUsage:
    """Usage not yet in the roll-ups, up to now."""

    contributions: list[Contribution] = field(default_factory=list)
    job_totals: dict[int, Totals] = field(default_factory=dict)  # per job: live part of its attempts
    job_folded: dict[int, tuple] = field(default_factory=dict)  # per job: (day, Totals) already folded
    active_jobs: set[int] = field(default_factory=set)  # jobs holding cores now


@dataclass(frozen=True)
class Watermark:
    """Where the fold stands: its cutoff (None before the first fold) and its cache
    stamps (UsageRollupState.stamp and settled_stamp; None before the first fold)."""

    cutoff: datetime | None
    stamp: str | None
    settled_stamp: str | None = None


def watermark() -> Watermark:
    """The fold's watermark (one query)."""
    cutoff, stamp, settled = UsageRollupState.objects.filter(pk=1).values_list(
        "cutoff", "stamp", "settled_stamp").first() or (None, "", "")
    return Watermark(cutoff, stamp or None, settled or None)


def live_usage(*, team_id: int | None = None, now: datetime | None = None,
               price_table: dict[str, Price] | None = None, mark: Watermark | None = None) -> LiveUsage:
    """Everything past the fold's progress, up to now, for one team or all teams,
    whatever the history size. On PostgreSQL three queries (the watermark unless
    `mark` brings it, the teams' time zones, then `_live_sql()`, which plans, splits
    and measures the unfolded attempts and finds the unfolded outcomes in the
    database: bench/usage.py's live_site and live_team, every usage page render);
    elsewhere the same through jobs.usage in Python (`live_usage_python`, also the
    reference the tests hold the SQL to)."""
    if connection.vendor != "postgresql":
        return live_usage_python(team_id=team_id, now=now, price_table=price_table, mark=mark)
    now = now or timezone.now()
    table = price_table if price_table is not None else prices()
    mark = mark or watermark()
    since = mark.cutoff - LAG if mark.cutoff else None
    names = sorted(Team.objects.order_by().values_list("time_zone", flat=True).distinct())
    params = {"now": now, "since": since, "team": team_id, "tz_names": names,
              "tz_zones": [_pg_zone(name) for name in names]}
    with connection.cursor() as cursor:
        cursor.execute(_live_sql(since is not None, team_id is not None), params)
        rows = cursor.fetchall()
    live = LiveUsage()
    contribs = live.contributions
    dims_of: dict[tuple, Dims] = {}
    for (section, job_id, _, sub, day, team, user, kind, family, instance_type, cores, seconds, samples, util_sum,
         wait_s, status, folded_day, *folded, held) in rows:
        key = (team, user, kind, family, instance_type)
        dims = dims_of.get(key)
        if dims is None:
            dims = dims_of[key] = Dims(*key)
        if section == 0:  # a piece of an attempt on one local day
            totals = accounting.allocation_totals(cores * seconds, instance_type,
                                             (int(samples), float(util_sum or 0.0)) if samples else (0, 0.0), table)
            contribs.append(Contribution(day, dims, totals, job_id))
            if totals.core_seconds:
                into = live.job_totals.get(job_id)
                if into is None:
                    live.job_totals[job_id] = into = Totals()
                into.add(totals)
                if folded_day is not None:
                    live.job_folded[job_id] = (folded_day, Totals(*folded))
        elif section == 1 and sub == 0:  # the first attempt's queue wait
            contribs.append(Contribution(day, dims, Totals(wait_count=1, wait_sum_s=wait_s,
                                                           wait_sketch=accounting.WaitSketch.add({}, wait_s))))
        elif section == 1:  # an attempt ended requeued or preempted
            contribs.append(Contribution(day, dims, Totals(attempts_interrupted=1)))
        elif section == 2:  # a finished job's outcome
            contribs.append(Contribution(day, dims, Totals(**{f"jobs_{status}": 1}), job_id))
        else:  # the jobs holding cores now
            live.active_jobs.update(held or ())
    return live


# PostgreSQL reads these zone names as abbreviations (a fixed offset) in AT TIME
# ZONE; the copies under posix/ are the same zone files under a name it does not.
_PG_AMBIGUOUS_ZONES = frozenset({"CET", "EET", "MET", "WET"})


def _pg_zone(name: str | None) -> str:
    """The zone PostgreSQL is to use for a team's time_zone: the one jobs.usage.zone
    picks (UTC for an unknown name)."""
    key = accounting.zone(name).key
    return f"posix/{key}" if key in _PG_AMBIGUOUS_ZONES else key


def _day_start(day: str, zone: str) -> str:
    """SQL for the instant local midnight starts `day` in `zone`, as jobs.usage.day_start
    has it: where midnight happens twice (a DST fall-back at 01:00), PostgreSQL takes
    the later one and Python (fold=0) the earlier, so take the earlier of midnight
    and an hour after 23:00 the day before."""
    return (f"least(({day})::timestamp AT TIME ZONE {zone}, "
            f"((({day})::timestamp - interval '1 hour') AT TIME ZONE {zone}) + interval '1 hour')")


def _live_sql(with_since: bool, with_team: bool) -> str:
    """The live part in one statement, by the rules of jobs.usage.plan_attempts and
    measure (see live_usage_python): rows (section, job, attempt, sub, day, dims,
    cores, seconds, minute rows, util sum, wait, status, the job's folded day and
    totals, held), ordered as plan_attempts emits them: pieces (0), then each
    attempt's wait and interruption (1), then outcomes (2), then one row (3) whose
    `held` lists the jobs holding cores now."""
    since_attempts = "AND (at.ended_at IS NULL OR at.ended_at > %(since)s)" if with_since else ""
    since_jobs = "AND j.finished_at > %(since)s" if with_since else ""
    team_attempts = "AND at.team_id = %(team)s" if with_team else ""
    team_jobs = "AND j.team_id = %(team)s" if with_team else ""
    attempt, job, team, job_usage = (JobAttempt._meta.db_table, Job._meta.db_table, Team._meta.db_table,
                                     JobUsage._meta.db_table)
    statuses = ", ".join(f"'{s}'" for s in accounting.FINISHED_STATUSES)
    interrupted = ", ".join(f"'{s}'" for s in sorted(accounting.INTERRUPTED_OUTCOMES))
    dims = "team_id, user_id, kind, family, it"
    none = "NULL::float8, NULL::bigint, NULL::float8"
    return f"""
WITH tz(name, zone) AS (SELECT * FROM unnest(%(tz_names)s::text[], %(tz_zones)s::text[])),
a AS MATERIALIZED (
    SELECT at.job_id, at.number, at.team_id, at.user_id, at.kind, at.family, at.instance_type AS it, at.host_id,
           at.cores, at.started_at, at.ended_at, at.outcome, j.created_at, coalesce(tz.zone, 'UTC') AS zone,
           coalesce(u.attempt_folded, 0) AS fn, u.folded_until AS fu, u.day AS u_day,
           u.core_seconds AS u_cs, u.measured_core_seconds AS u_mcs, u.used_core_seconds AS u_ucs,
           u.cost_usd AS u_cost, u.idle_cost_usd AS u_idle
    FROM {attempt} at JOIN {job} j ON j.id = at.job_id JOIN {team} t ON t.id = at.team_id
         LEFT JOIN tz ON tz.name = t.time_zone LEFT JOIN {job_usage} u ON u.job_id = at.job_id
    WHERE at.started_at < %(now)s {since_attempts} {team_attempts}
),
p AS MATERIALIZED (
    SELECT q.*, (q.b AT TIME ZONE q.zone)::date AS lb, (q.e AT TIME ZONE q.zone)::date AS le
    FROM (SELECT a.*, (a.number = a.fn + 1 AND a.fu IS NOT NULL) AS touched,
                 CASE WHEN a.number = a.fn + 1 AND a.fu IS NOT NULL THEN a.fu ELSE a.started_at END AS b,
                 least(coalesce(a.ended_at, %(now)s), %(now)s) AS e
          FROM a WHERE a.number > a.fn) q
),
pc AS (
    SELECT p.*, p.lb AS day, p.b AS ps, p.e AS pe FROM p WHERE p.lb >= p.le
    UNION ALL
    SELECT p.*, d.day, CASE WHEN d.day = p.lb THEN p.b ELSE {_day_start("d.day", "p.zone")} END,
           CASE WHEN d.day = p.le THEN p.e ELSE {_day_start("d.day + 1", "p.zone")} END
    FROM p, LATERAL unnest(ARRAY(SELECT p.lb + i FROM generate_series(0, p.le - p.lb) i)) d(day)
    WHERE p.lb < p.le
),
latest AS (SELECT DISTINCT ON (job_id) job_id, it FROM p ORDER BY job_id, number DESC)
SELECT 0 AS section, pc.job_id, pc.number, 0 AS sub, pc.day, {dims}, pc.cores,
       extract(epoch FROM pc.pe - pc.ps)::float8, m.n, m.s, NULL::float8, NULL::text,
       u_day, u_cs, u_mcs, u_ucs, u_cost, u_idle, NULL::bigint[]
FROM pc, LATERAL (SELECT count(*) AS n, sum(mm.util_mean) AS s FROM {MetricMinute._meta.db_table} mm
                  WHERE mm.job_id = pc.job_id AND mm.minute >= pc.ps - interval '30 seconds'
                        AND mm.minute < pc.pe - interval '30 seconds' AND mm.host_id = pc.host_id
                        AND mm.core >= 0) m
WHERE pc.pe > pc.ps
UNION ALL
SELECT 1, job_id, number, 0, (started_at AT TIME ZONE zone)::date, {dims}, cores, {none},
       greatest(extract(epoch FROM started_at - created_at), 0)::float8, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL
FROM p WHERE number = 1 AND NOT touched
UNION ALL
SELECT 1, job_id, number, 1, (ended_at AT TIME ZONE zone)::date, {dims}, cores, {none},
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM p WHERE ended_at <= %(now)s AND outcome IN ({interrupted})
UNION ALL
SELECT 2, j.id, 0, 0, (j.finished_at AT TIME ZONE coalesce(tz.zone, 'UTC'))::date, j.team_id, j.user_id, j.kind,
       j.family, coalesce(latest.it, u.instance_type, ''), 0, {none}, NULL, j.status,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM {job} j JOIN {team} t ON t.id = j.team_id LEFT JOIN tz ON tz.name = t.time_zone
     LEFT JOIN {job_usage} u ON u.job_id = j.id LEFT JOIN latest ON latest.job_id = j.id
WHERE j.finished_at IS NOT NULL AND j.finished_at <= %(now)s {since_jobs} {team_jobs}
      AND (u.job_id IS NULL OR NOT u.outcome_folded) AND j.status IN ({statuses})
UNION ALL
SELECT 3, 0, 0, 0, NULL::date, NULL::bigint, NULL::int, NULL, NULL, NULL, 0, {none}, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, (SELECT array_agg(DISTINCT job_id) FROM a WHERE ended_at IS NULL)
ORDER BY 1, 2, 3, 4, 5"""


def live_usage_python(*, team_id: int | None = None, now: datetime | None = None,
                      price_table: dict[str, Price] | None = None, mark: Watermark | None = None) -> LiveUsage:
    """live_usage through jobs.usage in Python: 4 queries (the watermark unless `mark`
    brings it, attempts with their jobs' folded totals, minutes, outcomes), whatever
    the history size."""
    now = now or timezone.now()
    cutoff = (mark or watermark()).cutoff
    since = cutoff - LAG if cutoff else None
    table = price_table if price_table is not None else prices()
    values = list(unfolded_attempts(since=since, before=now, team_id=team_id, with_job_usage=True))
    rows = [_attempt_row(v) for v in values]
    plan = accounting.plan_attempts(rows, now)
    contribs = accounting.contributions(plan, measure(plan.pieces), table)
    instance_types = {job_id: p.instance_type for job_id, p in plan.progress.items()}
    outcomes = [_outcome_row(v, instance_types) for v in unfolded_outcomes(since=since, upto=now, team_id=team_id)]
    contribs.extend(accounting.outcome_contributions(outcomes))
    live = LiveUsage(contributions=contribs)
    for c in contribs:
        if c.job_id is not None and c.totals.core_seconds:
            live.job_totals.setdefault(c.job_id, Totals()).add(c.totals)
    live.active_jobs = {r.job_id for r in rows if r.ended_at is None}
    for v in values:
        if v["job_id"] in live.job_totals and v["job__usage__day"] is not None:
            live.job_folded[v["job_id"]] = (v["job__usage__day"], Totals(
                core_seconds=v["job__usage__core_seconds"], measured_core_seconds=v["job__usage__measured_core_seconds"],
                used_core_seconds=v["job__usage__used_core_seconds"], cost_usd=v["job__usage__cost_usd"],
                idle_cost_usd=v["job__usage__idle_cost_usd"]))
    return live


# --- the fold -------------------------------------------------------------------------

@dataclass
class FoldStats:
    cutoff: datetime | None = None
    attempts: int = 0
    pieces: int = 0
    outcomes: int = 0
    rows_written: int = 0
    skipped: bool = False  # another fold holds the lock

    def as_dict(self) -> dict:
        return {"cutoff": self.cutoff.isoformat() if self.cutoff else None, "attempts": self.attempts,
                "pieces": self.pieces, "outcomes": self.outcomes, "rows_written": self.rows_written,
                "skipped": self.skipped}


def _chunks(values: Iterable[dict], key: str, size: int) -> Iterator[list[dict]]:
    """Batches of about `size` rows that never split one job's rows."""
    batch: list[dict] = []
    for _, rows in groupby(values, key=lambda v: v[key]):
        batch.extend(rows)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def fold(now: datetime | None = None) -> FoldStats:
    """Fold everything up to now − FOLD_DELAY into the roll-ups (see the module doc).
    Safe to run concurrently: a second run finds the watermark row locked and skips."""
    now = now or timezone.now()
    # Whole minutes: a minute's utilization row then always lands in the piece that
    # holds its midpoint, never in a sliver between two folds (which would be "unknown").
    cutoff = (now - FOLD_DELAY).replace(second=0, microsecond=0)
    stats = FoldStats(cutoff=cutoff)
    UsageRollupState.objects.get_or_create(pk=1)
    with transaction.atomic():
        state = UsageRollupState.objects.select_for_update(skip_locked=True).filter(pk=1).first()
        if state is None:
            stats.skipped = True
            return stats
        since = state.cutoff - LAG if state.cutoff else None
        if state.cutoff and cutoff < state.cutoff:
            cutoff = state.cutoff  # the clock went back: never fold less than last time
        table = prices()
        instance_types: dict[int, str] = {}
        oldest: date | None = None  # the earliest day this fold writes to
        attempts = unfolded_attempts(since=since, before=cutoff).iterator(chunk_size=CHUNK)
        for batch in _chunks(attempts, "job_id", CHUNK):
            batch = _with_gaps(batch)
            stats.attempts += len(batch)
            plan = accounting.plan_attempts((_attempt_row(v) for v in batch), cutoff)
            stats.pieces += len(plan.pieces)
            contribs = accounting.contributions(plan, measure(plan.pieces), table)
            stats.rows_written += _write(contribs, plan.progress, outcome_jobs=set())
            oldest = _earliest(oldest, contribs)
            instance_types.update({job_id: p.instance_type for job_id, p in plan.progress.items()})
        outcomes = unfolded_outcomes(since=since, upto=cutoff).iterator(chunk_size=CHUNK)
        while batch := list(islice(outcomes, CHUNK)):
            rows = [_outcome_row(v, instance_types) for v in batch]
            stats.outcomes += len(rows)
            contribs = accounting.outcome_contributions(rows)
            stats.rows_written += _write(contribs, {}, outcome_jobs={r.job_id for r in rows})
            oldest = _earliest(oldest, contribs)
        state.cutoff, state.ran_at = cutoff, now
        state.folded_pieces += stats.pieces
        state.stamp = uuid.uuid4().hex  # a new state of the roll-ups: the pages' cached reads retire
        fields = ["cutoff", "ran_at", "folded_pieces", "stamp"]
        if not state.settled_stamp or (oldest is not None and oldest <= settled_day(cutoff)):
            state.settled_stamp = state.stamp
            fields.append("settled_stamp")
        state.save(update_fields=fields)
    return stats


def _earliest(day: date | None, contribs: list[Contribution]) -> date | None:
    return min([c.day for c in contribs] + ([day] if day else []), default=None)


SETTLED_DAYS = 2


def settled_day(cutoff: datetime) -> date:
    """The last day a fold up to `cutoff` normally leaves alone: it folds the minutes
    since the previous cutoff, whose local days (any zone) are the cutoff's UTC date
    or the day before or after, and outcomes and waits of the same minutes. A fold
    that writes a day up to this one (a wait of an attempt started days ago, a fold
    after days without one) moves UsageRollupState.settled_stamp, which retires the
    pages' cached reads of settled days (jobs.selectors_usage.Stamp)."""
    return cutoff.astimezone(dt_timezone.utc).date() - timedelta(days=SETTLED_DAYS)


def _with_gaps(batch: list[dict]) -> list[dict]:
    """Add the attempts a job's progress skipped over (an attempt that ended before
    the scan window without being folded — only possible if a fold was lost), so a
    later attempt never marks an earlier one folded without counting it."""
    first: dict[int, dict] = {}
    for v in batch:
        first.setdefault(v["job_id"], v)
    gaps = [job_id for job_id, v in first.items() if v["number"] > (v["job__usage__attempt_folded"] or 0) + 1]
    if not gaps:
        return batch
    extra = {(v["job_id"], v["number"]): v for v in
             JobAttempt.objects.filter(job_id__in=gaps).order_by("job_id", "number").values(*_ATTEMPT_FIELDS)}
    merged = {(v["job_id"], v["number"]): v for v in batch}
    for key, v in extra.items():
        merged.setdefault(key, v)
    return [merged[key] for key in sorted(merged)]


# --- writes ---------------------------------------------------------------------------

_GRAINS = (
    (UsageDaily, ("team_id", "day", "user_id", "kind", "family", "instance_type"),
     lambda c: (c.dims.team_id, c.day, c.dims.user_id, c.dims.kind, c.dims.family, c.dims.instance_type)),
    (UsageTeamDay, ("team_id", "day"), lambda c: (c.dims.team_id, c.day)),
    (UsageSiteDaily, ("day", "kind", "family"), lambda c: (c.day, c.dims.kind, c.dims.family)),
)
_JOB_FIELDS = ("core_seconds", "measured_core_seconds", "used_core_seconds", "cost_usd", "idle_cost_usd")


def _write(contribs: list[Contribution], progress: dict[int, accounting.Progress], outcome_jobs: set[int]) -> int:
    written = 0
    for model, key_fields, key in _GRAINS:
        written += _add_to_rows(model, key_fields, accounting.group(contribs, key))
    written += _add_to_wait_totals(contribs)
    written += _write_jobs(contribs, progress, outcome_jobs)
    return written


def _add_to_wait_totals(contribs: list[Contribution]) -> int:
    """Add the waits among `contribs` to the site's running totals (UsageSiteWaitTotal):
    every row of the kind from the earliest day added on gains them (normally the
    last row or two: waits are counted on the day of the first start), and a day
    without a row gets one, continuing the row before it."""
    added: dict[str, dict] = {}
    for c in contribs:
        if c.totals.wait_count:
            by_day = added.setdefault(c.dims.kind, {})
            n, sketch = by_day.get(c.day, (0, {}))
            by_day[c.day] = (n + c.totals.wait_count, accounting.WaitSketch.merge(sketch, c.totals.wait_sketch))
    written = 0
    for kind, by_day in added.items():
        first = min(by_day)
        rows = {r.day: r for r in UsageSiteWaitTotal.objects.filter(kind=kind, day__gte=first)}
        before = UsageSiteWaitTotal.objects.filter(kind=kind, day__lt=first).order_by("-day").first()
        old_count, old_sketch = (before.wait_count, before.wait_sketch) if before else (0, {})
        plus_count, plus_sketch = 0, {}
        created, changed = [], []
        for day in sorted(set(rows) | set(by_day)):
            if day in by_day:
                plus_count += by_day[day][0]
                accounting.WaitSketch.merge(plus_sketch, by_day[day][1])
            row = rows.get(day)
            if row is None:
                row = UsageSiteWaitTotal(day=day, kind=kind)
                created.append(row)
            else:
                old_count, old_sketch = row.wait_count, row.wait_sketch
                changed.append(row)
            row.wait_count = old_count + plus_count
            row.wait_sketch = accounting.WaitSketch.merge(dict(old_sketch), plus_sketch)
        UsageSiteWaitTotal.objects.bulk_create(created, batch_size=500)
        UsageSiteWaitTotal.objects.bulk_update(changed, ["wait_count", "wait_sketch"], batch_size=500)
        written += len(created) + len(changed)
    return written


def rebuild_site_wait_totals() -> int:
    """UsageSiteWaitTotal rebuilt from the UsageSiteDaily rows (after roll-up rows
    were written some other way than by fold(), e.g. a bulk load or a repair)."""
    with transaction.atomic():
        UsageSiteWaitTotal.objects.all().delete()
        daily = (UsageSiteDaily.objects.filter(wait_count__gt=0).order_by("day")
                 .values_list("day", "kind", "wait_count", "wait_sketch"))
        return _add_to_wait_totals([Contribution(day, Dims(0, None, kind, "", ""), Totals(
            wait_count=n, wait_sketch=dict(sketch or {}))) for day, kind, n, sketch in daily])


def _add_to_rows(model, key_fields: tuple[str, ...], sums: dict[tuple, Totals]) -> int:
    """Add each Totals to the row with its key, creating missing rows. Read-modify-
    write is safe because the fold holds the watermark lock (one writer)."""
    if not sums:
        return 0
    days = {k[key_fields.index("day")] for k in sums}
    qs = model.objects.filter(day__in=days)
    if "team_id" in key_fields:
        qs = qs.filter(team_id__in={k[key_fields.index("team_id")] for k in sums})
    existing = {tuple(getattr(row, f) for f in key_fields): row for row in qs}
    changed, created = [], []
    for k, totals in sums.items():
        row = existing.get(k)
        if row is None:
            row = model(**dict(zip(key_fields, k)))
            created.append(row)
        else:
            changed.append(row)
        current = Totals.from_mapping({f: getattr(row, f) for f in accounting.TOTAL_FIELDS}).add(totals)
        for f in accounting.TOTAL_FIELDS:
            setattr(row, f, getattr(current, f))
    model.objects.bulk_create(created, batch_size=1000)
    model.objects.bulk_update(changed, list(accounting.TOTAL_FIELDS), batch_size=500)
    return len(created) + len(changed)


def _write_jobs(contribs: list[Contribution], progress: dict[int, accounting.Progress], outcome_jobs: set[int]) -> int:
    per_job: dict[int, Totals] = {}
    days: dict[int, tuple] = {}
    teams: dict[int, int] = {}
    for c in contribs:
        if c.job_id is None:
            continue
        per_job.setdefault(c.job_id, Totals()).add(c.totals)
        days[c.job_id] = max(days.get(c.job_id, (c.day,)), (c.day,))
        teams[c.job_id] = c.dims.team_id
    job_ids = set(per_job) | set(progress) | outcome_jobs
    if not job_ids:
        return 0
    existing = JobUsage.objects.in_bulk(list(job_ids))
    changed, created = [], []
    for job_id in job_ids:
        row = existing.get(job_id)
        p = progress.get(job_id)
        day = days.get(job_id, (None,))[0] or (p.last_day if p else None)
        if row is None:
            row = JobUsage(job_id=job_id, team_id=teams.get(job_id) or p.team_id, day=day)
            created.append(row)
        else:
            changed.append(row)
        totals = per_job.get(job_id)
        if totals is not None:
            for f in _JOB_FIELDS:
                setattr(row, f, getattr(row, f) + getattr(totals, f))
        if day is not None and (row.day is None or day > row.day):
            row.day = day
        if p is not None:
            row.attempt_folded, row.folded_until, row.instance_type = p.attempt_folded, p.folded_until, p.instance_type
        if job_id in outcome_jobs:
            row.outcome_folded = True
    JobUsage.objects.bulk_create(created, batch_size=1000)
    JobUsage.objects.bulk_update(changed, [*_JOB_FIELDS, "day", "attempt_folded", "folded_until", "instance_type",
                                           "outcome_folded"], batch_size=500)
    return len(created) + len(changed)
