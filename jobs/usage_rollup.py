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

Pages read the roll-ups plus `live_usage()`: everything past the progress up to
now, which stays small (a few minutes of the jobs running now)."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import groupby, islice

from django.db import connection, transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from jobs import usage
from jobs.models import (InstancePrice, Job, JobAttempt, JobUsage, MetricMinute, UsageDaily, UsageRollupState,
                         UsageSiteDaily, UsageTeamDay)
from jobs.usage import AttemptRow, Contribution, Dims, MinuteRow, OutcomeRow, Price, Totals

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
    return usage.price_table(InstancePrice.objects.values_list("instance_type", "usd_per_hour", "cores"))


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


def measure(pieces: Sequence[usage.Piece]) -> list[tuple[int, float]]:
    """(per-core minute rows, sum of util_mean) of each piece, by the rule of
    jobs.usage.measure (a minute belongs to the piece holding its midpoint).

    On PostgreSQL the database matches minutes to pieces and sums them (one query
    returning a row per measured piece); elsewhere the minutes are fetched and
    matched here."""
    if not pieces:
        return []
    if connection.vendor != "postgresql":
        return usage.measure(pieces, minute_rows(pieces))
    half = usage.MINUTE / 2
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


def minute_rows(pieces: Sequence[usage.Piece]) -> list[MinuteRow]:
    """The per-core utilization minutes of these pieces' jobs over their span, summed
    per (job, host, minute) in the database (one query)."""
    if not pieces:
        return []
    job_ids = sorted({p.job_id for p in pieces})
    start = min(p.start for p in pieces) - usage.MINUTE
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


def live_usage(*, team_id: int | None = None, now: datetime | None = None,
               price_table: dict[str, Price] | None = None) -> LiveUsage:
    """Everything past the fold's progress, up to now, for one team or all teams:
    4 queries (watermark, attempts with their jobs' folded totals, minutes,
    outcomes), whatever the history size."""
    now = now or timezone.now()
    state = UsageRollupState.objects.filter(pk=1).values("cutoff").first()
    since = state["cutoff"] - LAG if state and state["cutoff"] else None
    table = price_table if price_table is not None else prices()
    values = list(unfolded_attempts(since=since, before=now, team_id=team_id, with_job_usage=True))
    rows = [_attempt_row(v) for v in values]
    plan = usage.plan_attempts(rows, now)
    contribs = usage.contributions(plan, measure(plan.pieces), table)
    instance_types = {job_id: p.instance_type for job_id, p in plan.progress.items()}
    outcomes = [_outcome_row(v, instance_types) for v in unfolded_outcomes(since=since, upto=now, team_id=team_id)]
    contribs.extend(usage.outcome_contributions(outcomes))
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
        attempts = unfolded_attempts(since=since, before=cutoff).iterator(chunk_size=CHUNK)
        for batch in _chunks(attempts, "job_id", CHUNK):
            batch = _with_gaps(batch)
            stats.attempts += len(batch)
            plan = usage.plan_attempts((_attempt_row(v) for v in batch), cutoff)
            stats.pieces += len(plan.pieces)
            contribs = usage.contributions(plan, measure(plan.pieces), table)
            stats.rows_written += _write(contribs, plan.progress, outcome_jobs=set())
            instance_types.update({job_id: p.instance_type for job_id, p in plan.progress.items()})
        outcomes = unfolded_outcomes(since=since, upto=cutoff).iterator(chunk_size=CHUNK)
        while batch := list(islice(outcomes, CHUNK)):
            rows = [_outcome_row(v, instance_types) for v in batch]
            stats.outcomes += len(rows)
            stats.rows_written += _write(usage.outcome_contributions(rows), {}, outcome_jobs={r.job_id for r in rows})
        state.cutoff, state.ran_at = cutoff, now
        state.folded_pieces += stats.pieces
        state.save(update_fields=["cutoff", "ran_at", "folded_pieces"])
    return stats


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


def _write(contribs: list[Contribution], progress: dict[int, usage.Progress], outcome_jobs: set[int]) -> int:
    written = 0
    for model, key_fields, key in _GRAINS:
        written += _add_to_rows(model, key_fields, usage.group(contribs, key))
    written += _write_jobs(contribs, progress, outcome_jobs)
    return written


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
        current = Totals.from_mapping({f: getattr(row, f) for f in usage.TOTAL_FIELDS}).add(totals)
        for f in usage.TOTAL_FIELDS:
            setattr(row, f, getattr(current, f))
    model.objects.bulk_create(created, batch_size=1000)
    model.objects.bulk_update(changed, list(usage.TOTAL_FIELDS), batch_size=500)
    return len(created) + len(changed)


def _write_jobs(contribs: list[Contribution], progress: dict[int, usage.Progress], outcome_jobs: set[int]) -> int:
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
