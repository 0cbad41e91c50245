"""Reads for the usage pages, their CSV and the usage API: the roll-ups for the
range plus the live part (jobs.usage_rollup.live_usage), shaped into tables.

The database does the summing: a report reads the roll-up rows of its range
already grouped by day, by (group, day) and by kind, plus the wait sketches
merged per kind (the site's from running totals: two rows per kind), so the rows
handled in Python are a few per day whatever the number of jobs. Query count is
fixed (a page with everything cached: 9; a first render: ~15), whatever the size
of the history: the roll-ups hold one row per team / day / user / kind / family /
instance type, and the live part (one SQL statement) covers only what the fold
has not reached yet (a few minutes of the jobs running now).

Reads are cached (Stamp): those of the last few days until the next fold, those
of older ("settled") days until a fold writes one, which normal folds do not.

Every table a page shows or charts is a `Table` built here; the CSV export, the
API and the Plotly figures (jobs.charts_usage) are all made from these tables, so
the numbers cannot drift apart."""
from __future__ import annotations

import hashlib
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import cached_property, reduce
from zoneinfo import ZoneInfo

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.db.models import Max, Q, QuerySet, Sum
from django.utils import timezone

from jobs.models import (
    Family,
    Host,
    Job,
    JobUsage,
    Kind,
    Team,
    TeamQuota,
    UsageDaily,
    UsageSiteDaily,
    UsageSiteWaitTotal,
    UsageTeamDay,
)
from jobs.usage import accounting
from jobs.usage.accounting import Contribution, Price, Totals
from jobs.usage.rollup import LiveUsage, Watermark, live_usage, prices, settled_day, watermark

TOP_JOBS = 10
TOP_TEAMS_STACKED = 7  # the site's "by team" chart stacks this many teams and "other teams"
BURN_WINDOW_DAYS = 7
TEAM_GROUPS = ("kind", "user", "family")
SITE_GROUPS = ("kind", "family", "team")
API_GROUPS = ("kind", "user", "family", "day")
KIND_LABELS = dict(Kind.choices)
FAMILY_LABELS = dict(Family.choices)
_GROUP_FIELD = {"kind": "kind", "user": "user_id", "family": "family"}


@dataclass
class Table:
    """A table as the CSV has it: column names and rows of plain values."""

    columns: list[str]
    rows: list[list] = field(default_factory=list)

    def dicts(self) -> list[dict]:
        return [dict(zip(self.columns, row)) for row in self.rows]


@dataclass
class TopJob:
    job: Job
    totals: Totals
    active: bool


@dataclass(frozen=True)
class TeamRef:
    """A team as the site's team table names it (read per render: 200 model
    instances cost more than the table's sums)."""

    pk: int
    slug: str
    name: str


@dataclass
class TeamShare:
    team: TeamRef
    totals: Totals  # the SHARE_FIELDS (what the teams table shows) over the range; other fields 0


SHARE_FIELDS = ("core_seconds", "measured_core_seconds", "used_core_seconds", "cost_usd", "idle_cost_usd",
                "jobs_succeeded", "jobs_failed", "jobs_cancelled")


@dataclass
class Report:
    """One usage report: a team's (scope "team") or the whole site's ("site").

    by_day covers the range and also this month and the burn-rate window (for the
    burn-down); by_group_day and by_kind cover the range only."""

    scope: str
    team: Team | None
    tz: ZoneInfo
    range_name: str
    first: date
    last: date
    today: date
    now: datetime
    group_by: str
    by_day: dict[date, Totals]
    by_group_day: dict[tuple[str, date], Totals]
    by_kind: dict[str, Totals]
    budget: float | None
    top_jobs: list[TopJob]
    prices: dict[str, Price]
    team_shares: list[TeamShare] = field(default_factory=list)  # site only
    capacity_cores: int = 0  # site only: NeuronCores of the hosts registered now
    by_user: dict[str, Totals] = field(default_factory=dict)  # team only: allocated / measured / used per user

    @property
    def days(self) -> list[date]:
        return accounting.days_between(self.first, self.last)

    @cached_property
    def totals(self) -> Totals:
        total = Totals()
        for day, totals in self.by_day.items():
            if self.first <= day <= self.last:
                total.add(totals)
        total.wait_sketch = {}
        for totals in self.by_kind.values():
            accounting.WaitSketch.merge(total.wait_sketch, totals.wait_sketch)
        return total

    def day(self, day: date) -> Totals:
        return self.by_day.get(day) or Totals()

    def by_group(self) -> dict[str, Totals]:
        """Totals per group label over the range."""
        sums: dict[str, Totals] = {}
        for (label, _), totals in self.by_group_day.items():
            _add_to(sums, label, totals)
        return sums

    @cached_property
    def burn(self) -> accounting.BurnDown:
        return accounting.burn_down({d: t.core_hours for d, t in self.by_day.items()}, today=self.today,
                               fraction_of_today=accounting.day_fraction(self.now, self.tz), budget=self.budget,
                               window_days=BURN_WINDOW_DAYS)


# --- reading the roll-ups -----------------------------------------------------------

def _add_to(sums: dict, key, totals: Totals) -> None:
    """sums[key] += totals, starting from zero (setdefault(key, Totals()) would build
    a Totals for every call: thousands per page)."""
    into = sums.get(key)
    if into is None:
        sums[key] = into = Totals()
    into.add(totals)


ROLLUP_CACHE_S = 600  # an upper bound only: the next fold changes the version, which retires the entries
SETTLED_CACHE_S = 6 * 3600  # reads of settled days: retired by a fold that writes one (Stamp), rarely


def rollup_version(mark: Watermark | None = None) -> str | None:
    """A stamp that changes whenever the roll-ups may have changed, or None (do not
    cache): UsageRollupState.stamp, which jobs.usage.rollup.fold renews in the
    transaction that writes the roll-up rows. A cached read keyed by it is
    therefore invalidated by the next fold — legitimate, not stale. Rows written
    some other way (a test inserting roll-up rows directly after a fold, a manual
    repair) are not seen until the next fold; before the first fold nothing is
    cached. `mark` is the watermark when the caller has read it already
    (jobs.usage.rollup.watermark, which the live part needs too)."""
    mark = mark or watermark()
    if mark.stamp is None or mark.cutoff is None:
        return None
    return f"{mark.stamp}:{mark.cutoff.isoformat()}"


@dataclass(frozen=True)
class Stamp:
    """Cache stamps for roll-up reads: `recent` (rollup_version: every fold retires
    it) for reads that may touch days after `settled_day`; `settled` for reads of
    days up to `settled_day` only, which survives folds until one writes such a day
    (UsageRollupState.settled_stamp, see jobs.usage.rollup.settled_day). So the first
    render after a fold re-reads the last few days, not the whole range. Roll-up
    rows of settled days changed some other way (a repair) show once a fold moves
    settled_stamp or after SETTLED_CACHE_S; names (teams, users) are read per render."""

    recent: str | None
    settled: str | None = None
    settled_day: date | None = None


def stamps(mark: Watermark | None) -> Stamp:
    version = rollup_version(mark)
    if version is None or mark is None or mark.settled_stamp is None:
        return Stamp(version)
    return Stamp(version, f"settled:{mark.settled_stamp}", settled_day(mark.cutoff))


def _range_sums(qs: QuerySet, first: date, last: date, *keys: str, stamp: Stamp,
                fields: tuple[str, ...] = accounting.NUMERIC_FIELDS) -> dict[tuple, Totals]:
    """_sums of `qs` from first to last: settled days and recent days read (and
    cached) apart, then added up."""
    if stamp.settled is None or first > stamp.settled_day:
        return _sums(qs.filter(day__gte=first, day__lte=last), *keys, version=stamp.recent, fields=fields)
    sums = _sums(qs.filter(day__gte=first, day__lte=min(last, stamp.settled_day)), *keys, version=stamp.settled,
                 fields=fields)
    if last > stamp.settled_day:
        recent = qs.filter(day__gte=stamp.settled_day + timedelta(days=1), day__lte=last)
        for key, totals in _sums(recent, *keys, version=stamp.recent, fields=fields).items():
            _add_to(sums, key, totals)
    return sums


def _range_sketches(qs: QuerySet, first: date, last: date, stamp: Stamp) -> dict[str, dict[str, int]]:
    """_sketches_by_kind of `qs` from first to last, settled and recent days apart."""
    if stamp.settled is None or first > stamp.settled_day:
        return _sketches_by_kind(qs.filter(day__gte=first, day__lte=last), stamp.recent)
    merged = _sketches_by_kind(qs.filter(day__gte=first, day__lte=min(last, stamp.settled_day)), stamp.settled)
    if last > stamp.settled_day:
        recent = qs.filter(day__gte=stamp.settled_day + timedelta(days=1), day__lte=last)
        for kind, sketch in _sketches_by_kind(recent, stamp.recent).items():
            accounting.WaitSketch.merge(merged.setdefault(kind, {}), sketch)
    return merged


def _cached(version: str | None, what: str, qs: QuerySet, compute: Callable[[], object]):
    """compute(), cached under (version, what, the query's SQL) when version is set.
    The cache hands back copies (it pickles), so callers may mutate the result."""
    if version is None:
        return compute()
    sql, params = qs.query.sql_with_params()
    key = "usage:" + hashlib.sha1(f"{version}|{what}|{sql}|{params!r}".encode()).hexdigest()
    value = cache.get(key)
    if value is None:
        value = compute()
        cache.set(key, value, SETTLED_CACHE_S if version.startswith("settled:") else ROLLUP_CACHE_S)
    return value


def _sums(qs: QuerySet, *keys: str, version: str | None = None,
          fields: tuple[str, ...] = accounting.NUMERIC_FIELDS) -> dict[tuple, Totals]:
    """Totals of `qs` grouped by `keys`, summed in the database (rows come back as
    tuples: a quarter of a busy team is a few thousand groups); cached per roll-up
    version when one is given. The cache holds the plain rows: unpickling
    thousands of Totals objects cost more than the query. Only `fields` are summed
    (the others stay 0): each sum costs the database a pass over the rows."""
    n = len(keys)
    rows = _cached(version, f"sum-rows:{keys}:{fields}", qs, lambda: _sum_rows(qs, keys, fields))
    if fields == accounting.NUMERIC_FIELDS:
        return {row[:n]: Totals(*row[n:]) for row in rows}
    return {row[:n]: Totals(**dict(zip(fields, row[n:]))) for row in rows}


def _sum_rows(qs: QuerySet, keys: tuple[str, ...], fields: tuple[str, ...]) -> list[tuple]:
    names = [f"s_{f}" for f in fields]
    return list(qs.values(*keys).annotate(**{n: Sum(f) for n, f in zip(names, fields)})
                .order_by().values_list(*keys, *names))


def _sketches_by_kind(qs: QuerySet, version: str | None = None) -> dict[str, dict[str, int]]:
    """The wait sketches of `qs` merged per kind (cached per roll-up version when given)."""
    return _cached(version, "sketches", qs, lambda: _sketches_by_kind_uncached(qs))


def _sketches_by_kind_uncached(qs: QuerySet) -> dict[str, dict[str, int]]:
    """The wait sketches of `qs` merged per kind, in Python (bench/usage.py: as fast as
    merging them in PostgreSQL with jsonb_each, for a quarter of a busy team)."""
    merged: dict[str, dict[str, int]] = defaultdict(dict)
    for row in qs.filter(wait_count__gt=0).values("kind", "wait_sketch"):
        accounting.WaitSketch.merge(merged[row["kind"]], row["wait_sketch"] or {})
    return dict(merged)


def _span(first: date, last: date, today: date) -> tuple[date, date]:
    """Days to read per day: the range, plus this month and the burn-rate window."""
    return min(first, today.replace(day=1), today - timedelta(days=BURN_WINDOW_DAYS)), max(last, today)


def _site_wait_sketches(first: date, last: date, version: str | None = None) -> dict[str, dict[str, int]]:
    """The site's wait sketches per kind from first to last: the running total at
    `last` minus the one before `first` (UsageSiteWaitTotal), two rows per kind
    whatever the range, instead of merging every day's sketch."""
    qs = UsageSiteWaitTotal.objects.filter(day__gte=first, day__lte=last)  # the cache key's query
    return _cached(version, "site-wait-totals", qs, lambda: _site_wait_sketches_uncached(first, last))


def _site_wait_sketches_uncached(first: date, last: date) -> dict[str, dict[str, int]]:
    # Per kind, the day of its latest running total up to `last` and before `first`
    # (one aggregate over the index), then those rows (one read).
    days = list(UsageSiteWaitTotal.objects.values("kind").order_by().annotate(
        upto_last=Max("day", filter=Q(day__lte=last)), before_first=Max("day", filter=Q(day__lt=first)))
        .values_list("kind", "upto_last", "before_first"))
    wanted = [(kind, day) for kind, *pair in days for day in pair if day is not None]
    if not wanted:
        return {}
    rows = UsageSiteWaitTotal.objects.filter(reduce(operator.or_, (Q(kind=k, day=d) for k, d in wanted)))
    sketches = {(kind, day): sketch for kind, day, sketch in rows.values_list("kind", "day", "wait_sketch")}
    out: dict[str, dict[str, int]] = {}
    for kind, upto_last, before_first in days:
        earlier = sketches.get((kind, before_first)) or {}
        sketch = {key: n for key, count in (sketches.get((kind, upto_last)) or {}).items()
                  if (n := int(count) - int(earlier.get(key, 0)))}
        if sketch:
            out[kind] = sketch
    return out


def _read(qs: QuerySet, first: date, last: date, today: date, group_field: str | None,
          label: Callable[[object], str], stamp: Stamp,
          sketches: Callable[[], dict[str, dict[str, int]]] | None = None) -> tuple[dict, dict, dict]:
    """by_day (span), by_group_day and by_kind (range, with sketches) of a roll-up:
    one pass grouped by (day, kind) — a few hundred rows — one by (group, day) when
    the group is not the kind, and one for the sketches (merged from the range's
    rows, or by `sketches()` when given)."""
    span_first, span_last = _span(first, last, today)
    by_day: dict[date, Totals] = {}
    by_group_day: dict[tuple[str, date], Totals] = {}
    by_kind: dict[str, Totals] = {}
    for (day, kind), totals in _range_sums(qs, span_first, span_last, "day", "kind", stamp=stamp).items():
        _add_to(by_day, day, totals)
        if first <= day <= last:
            _add_to(by_kind, kind, totals)
            if group_field == "kind":
                by_group_day[(label(kind), day)] = totals
    if group_field and group_field != "kind":
        for (value, day), totals in _range_sums(qs, first, last, group_field, "day", stamp=stamp).items():
            _add_to(by_group_day, (label(value), day), totals)
    for kind, sketch in (sketches() if sketches else _range_sketches(qs, first, last, stamp)).items():
        by_kind.setdefault(kind, Totals()).wait_sketch = sketch
    return by_day, by_group_day, by_kind


def _add_live(contribs: Iterable[Contribution], first: date, last: date, by_day: dict, by_group_day: dict,
              by_kind: dict, label: Callable[[Contribution], str] | None) -> None:
    for c in contribs:
        _add_to(by_day, c.day, c.totals)
        if first <= c.day <= last:
            _add_to(by_kind, c.dims.kind, c.totals)
            if label is not None:
                _add_to(by_group_day, (label(c), c.day), c.totals)


def _labeller(group_by: str, names: dict[int, str]) -> Callable[[object], str]:
    if group_by == "user":
        # A user id without a user: deleted since a cached read of settled days (the
        # rows say NULL now, which reads the same)
        return lambda user_id: names.get(user_id, "(deleted user)") if user_id else "(deleted user)"
    if group_by == "family":
        return lambda family: FAMILY_LABELS.get(family, family)
    return lambda kind: KIND_LABELS.get(kind, kind)


# --- team --------------------------------------------------------------------------

def team_report(team: Team, range_name: str, first: date, last: date, *, now: datetime | None = None,
                group_by: str = "kind") -> Report:
    """The team's usage from first to last (days in the team's time zone), its
    stacked series grouped by kind, user or family."""
    now = now or timezone.now()
    tz = accounting.zone(team.time_zone)
    today = accounting.local_day(now, tz)
    table = prices()
    mark = watermark()
    stamp = stamps(mark)
    live = live_usage(team_id=team.pk, now=now, price_table=table, mark=mark)
    names: dict[int, str] = {}
    if group_by == "user":
        users = UsageDaily.objects.filter(team=team, day__gte=first, day__lte=last).values_list(
            "user_id", flat=True).distinct()
        ids = set(_cached(stamp.recent, "users", users, lambda: list(users))) | {
            c.dims.user_id for c in live.contributions}
        ids.discard(None)
        names = dict(get_user_model().objects.filter(pk__in=ids).values_list("pk", "username")) if ids else {}
    label = _labeller(group_by, names)
    field_name = _GROUP_FIELD.get(group_by, "kind")
    by_day, by_group_day, by_kind = _read(UsageDaily.objects.filter(team=team), first, last, today, field_name, label,
                                          stamp)
    _add_live(live.contributions, first, last, by_day, by_group_day, by_kind,
              lambda c: label(getattr(c.dims, field_name)))
    budget = TeamQuota.objects.filter(team=team).values_list("monthly_core_hours", flat=True).first()
    return Report("team", team, tz, range_name, first, last, today, now, group_by, by_day, by_group_day, by_kind,
                  budget, _top_jobs(live, first, last, team=team, version=stamp.recent), table,
                  by_user=_by_user(team, first, last, live.contributions, stamp))


EFFICIENCY_FIELDS = ("core_seconds", "measured_core_seconds", "used_core_seconds")


def _by_user(team: Team, first: date, last: date, live: list[Contribution], stamp: Stamp) -> dict[str, Totals]:
    """Allocated, measured and used core-seconds per user of the team over the range
    (the efficiency table): one grouped read of the roll-up plus the live part."""
    sums: dict[object, Totals] = {}
    for (user_id,), totals in _range_sums(UsageDaily.objects.filter(team=team), first, last, "user",
                                          stamp=stamp, fields=EFFICIENCY_FIELDS).items():
        _add_to(sums, user_id, totals)
    for c in live:
        if first <= c.day <= last:
            _add_to(sums, c.dims.user_id, c.totals)
    ids = [user_id for user_id in sums if user_id is not None]
    names = dict(get_user_model().objects.filter(pk__in=ids).values_list("pk", "username")) if ids else {}
    label = _labeller("user", names)
    by_user: dict[str, Totals] = {}
    for user_id, totals in sums.items():
        _add_to(by_user, label(user_id), totals)
    return by_user


# --- site --------------------------------------------------------------------------

def site_report(range_name: str, first: date, last: date, *, now: datetime | None = None,
                group_by: str = "kind", price_table: dict[str, Price] | None = None) -> Report:
    """All teams' usage from first to last. Days are each team's own local days, so
    a team's line in the site's team table equals its own usage page. `price_table`:
    the prices in effect, when the caller has read them (jobs.usage_rollup.prices)."""
    now = now or timezone.now()
    tz = accounting.zone(settings.TIME_ZONE)
    today = accounting.local_day(now, tz)
    table = price_table if price_table is not None else prices()
    mark = watermark()
    stamp = stamps(mark)
    live = live_usage(now=now, price_table=table, mark=mark)
    field_name = "family" if group_by == "family" else "kind"
    label = _labeller(field_name, {})
    by_day, by_group_day, by_kind = _read(UsageSiteDaily.objects.all(), first, last, today,
                                          None if group_by == "team" else field_name, label, stamp,
                                          sketches=lambda: _site_wait_sketches(first, last, stamp.recent))
    _add_live(live.contributions, first, last, by_day, by_group_day, by_kind,
              None if group_by == "team" else (lambda c: label(getattr(c.dims, field_name))))
    budget = TeamQuota.objects.aggregate(s=Sum("monthly_core_hours"))["s"]
    in_range = [c for c in live.contributions if first <= c.day <= last]
    shares = _team_shares(first, last, in_range, stamp)
    report = Report("site", None, tz, range_name, first, last, today, now, group_by, by_day, by_group_day, by_kind,
                    budget, _top_jobs(live, first, last, team=None, version=stamp.recent), table, team_shares=shares,
                    capacity_cores=_capacity_cores())
    if group_by == "team":
        report.by_group_day = _team_daily(report, shares[:TOP_TEAMS_STACKED], in_range, stamp)
    return report


def _team_shares(first: date, last: date, live: list[Contribution], stamp: Stamp) -> list[TeamShare]:
    """Every team with usage in the range, most NeuronCore-hours first (summed in
    the database over UsageTeamDay, plus one query for the teams as they are now:
    the sums of settled days are cached for hours, and a team may have been renamed
    or deleted since)."""
    per_team = {k[0]: t for k, t in _range_sums(UsageTeamDay.objects.all(), first, last, "team_id", stamp=stamp,
                                                fields=SHARE_FIELDS).items()}
    for c in live:
        _add_to(per_team, c.dims.team_id, c.totals)
    teams = {pk: TeamRef(pk, slug, name) for pk, slug, name in Team.objects.values_list("id", "slug", "name")}
    shares = [TeamShare(teams[t], totals) for t, totals in per_team.items() if t in teams]
    shares.sort(key=lambda s: (-s.totals.core_seconds, s.team.slug))
    return shares


def _team_daily(report: Report, top: list[TeamShare], live: list[Contribution],
                stamp: Stamp) -> dict[tuple[str, date], Totals]:
    """(team, day) NeuronCore-seconds and cost of the top teams, and of all other
    teams together: what the stacked chart and its CSV show (TEAM_DAILY_FIELDS;
    the other fields stay 0)."""
    slugs = {s.team.pk: s.team.slug for s in top}
    out: dict[tuple[str, date], Totals] = {}
    rows = _range_sums(UsageTeamDay.objects.filter(team_id__in=list(slugs)), report.first, report.last,
                       "team_id", "day", stamp=stamp, fields=TEAM_DAILY_FIELDS)
    for (team_id, day), totals in rows.items():
        out[(slugs[team_id], day)] = totals
    for c in live:
        if c.dims.team_id in slugs:
            _add_to(out, (slugs[c.dims.team_id], c.day), c.totals)
    for day in report.days:
        total = report.day(day)
        core_seconds, cost = total.core_seconds, total.cost_usd
        for slug in slugs.values():
            t = out.get((slug, day))
            if t is not None:
                core_seconds, cost = core_seconds - t.core_seconds, cost - t.cost_usd
        if abs(core_seconds) > 1e-6:
            out[("other teams", day)] = Totals(core_seconds=core_seconds, cost_usd=cost)
    return out


TEAM_DAILY_FIELDS = ("core_seconds", "cost_usd")


def _capacity_cores() -> int:
    """NeuronCores (CPU hosts: job slots) of the hosts that are not offline."""
    return sum(len(ids or []) for ids in Host.objects.exclude(state=Host.State.OFFLINE).values_list("core_ids", flat=True))


# --- top jobs ----------------------------------------------------------------------

def _top_jobs(live: LiveUsage, first: date, last: date, *, team: Team | None,
              version: str | None = None) -> list[TopJob]:
    """The most expensive jobs whose latest usage falls in the range, with their
    whole cost (folded + live). Two queries: the folded top, and the jobs (the
    folded part of the live jobs came with the live attempts)."""
    folded = JobUsage.objects.filter(day__gte=first, day__lte=last, core_seconds__gt=0)
    if team is not None:
        folded = folded.filter(team=team)
    folded = folded.order_by("-cost_usd", "-job_id")[:TOP_JOBS]
    candidates: dict[int, tuple[date, Totals]] = {
        job_id: (day, Totals(*numbers)) for job_id, day, *numbers in _cached(
            version, "top-job-rows", folded, lambda: list(folded.values_list("job_id", "day", *_JOB_FIELDS)))}
    live_days: dict[int, date] = {}
    for c in live.contributions:
        if c.job_id in live.job_totals:
            live_days[c.job_id] = max(live_days.get(c.job_id, c.day), c.day)
    keys = [(t.cost_usd, t.core_seconds, job_id) for job_id, (day, t) in candidates.items() if first <= day <= last]
    for job_id, extra in live.job_totals.items():
        folded_day, folded_totals = live.job_folded.get(job_id, (None, None))
        day = max(folded_day, live_days[job_id]) if folded_day else live_days[job_id]
        if job_id in candidates:  # a folded top job that is running: ranked by its whole cost below
            keys = [k for k in keys if k[2] != job_id]
        candidates[job_id] = (day, None)
        if first <= day <= last:  # the sums Totals().add(folded).add(extra) would hold, in the same order
            f = folded_totals or _ZERO
            keys.append((0.0 + f.cost_usd + extra.cost_usd, 0.0 + f.core_seconds + extra.core_seconds, job_id))
    ranked = sorted(keys, reverse=True)[:TOP_JOBS]
    top = []
    for _, _, job_id in ranked:
        day, totals = candidates[job_id]
        if totals is None:  # whole totals only for the jobs shown
            folded_totals = live.job_folded.get(job_id, (None, None))[1]
            totals = Totals().add(folded_totals or Totals()).add(live.job_totals[job_id])
        top.append((job_id, totals))
    jobs = Job.objects.select_related("user", "team").in_bulk([job_id for job_id, _ in top])
    return [TopJob(jobs[job_id], totals, job_id in live.active_jobs) for job_id, totals in top if job_id in jobs]


# JobUsage's totals, in the order of Totals' first fields
_JOB_FIELDS = ("core_seconds", "measured_core_seconds", "used_core_seconds", "cost_usd", "idle_cost_usd")
assert accounting.NUMERIC_FIELDS[:len(_JOB_FIELDS)] == _JOB_FIELDS


# --- tables ------------------------------------------------------------------------

def _h(seconds: float) -> float:
    return round(seconds / 3600.0, 4)


def _usd(value: float) -> float:
    return round(value, 4)


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else round(100.0 * fraction, 2)


def _s(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


_ZERO = Totals()  # read-only: a day with nothing in the zero-filled tables


def hours_table(report: Report) -> Table:
    """NeuronCore-hours per day and group, zero-filled: every day × every group
    seen in the range (the stacked chart's data)."""
    table = Table(["day", report.group_by, "core_hours", "cost_usd"])
    labels = sorted({label for label, _ in report.by_group_day}, key=lambda l: (l == "other teams", l))
    if report.group_by == "team":
        order = {s.team.slug: i for i, s in enumerate(report.team_shares)}
        labels.sort(key=lambda l: order.get(l, len(order)))
    for label in labels:
        for day in report.days:
            t = report.by_group_day.get((label, day)) or _ZERO
            table.rows.append([day.isoformat(), label, _h(t.core_seconds), _usd(t.cost_usd)])
    return table


def allocation_table(report: Report) -> Table:
    """Allocated vs used per day, with idle (allocated, measured, not busy) and
    unknown (not measured) hours, cost and idle cost (the allocation and cost charts)."""
    table = Table(["day", "allocated_core_hours", "used_core_hours", "idle_core_hours", "unknown_core_hours",
                   "utilization_pct", "cost_usd", "idle_cost_usd", "unpriced_core_hours"])
    for day in report.days:
        t = report.day(day)
        table.rows.append([day.isoformat(), _h(t.core_seconds), _h(t.used_core_seconds),
                           _h(max(t.measured_core_seconds - t.used_core_seconds, 0.0)),
                           _h(max(t.core_seconds - t.measured_core_seconds, 0.0)), _pct(t.utilization),
                           _usd(t.cost_usd), _usd(t.idle_cost_usd), _h(t.unpriced_core_seconds)])
    return table


def summary_table(report: Report) -> Table:
    t = report.totals
    table = Table(["from", "to", "time_zone", "allocated_core_hours", "used_core_hours", "idle_core_hours",
                   "unknown_core_hours", "utilization_pct", "cost_usd", "idle_cost_usd", "unpriced_core_hours",
                   "jobs_succeeded", "jobs_failed", "jobs_cancelled", "attempts_interrupted"])
    table.rows.append([report.first.isoformat(), report.last.isoformat(), str(report.tz), _h(t.core_seconds),
                       _h(t.used_core_seconds), _h(max(t.measured_core_seconds - t.used_core_seconds, 0.0)),
                       _h(max(t.core_seconds - t.measured_core_seconds, 0.0)), _pct(t.utilization),
                       _usd(t.cost_usd), _usd(t.idle_cost_usd), _h(t.unpriced_core_seconds), t.jobs_succeeded,
                       t.jobs_failed, t.jobs_cancelled, t.attempts_interrupted])
    return table


def burndown_table(report: Report) -> Table:
    burn = report.burn
    table = Table(["day", "cumulative_core_hours", "forecast_core_hours", "budget_core_hours"])
    for day, actual, forecast in zip(burn.days, burn.actual, burn.forecast):
        table.rows.append([day.isoformat(), None if actual is None else round(actual, 4),
                           None if forecast is None else round(forecast, 4), burn.budget])
    return table


def wait_table(report: Report) -> Table:
    """Queue wait (first start − submit) by kind: p50 / p95 from the merged sketches."""
    table = Table(["kind", "jobs", "p50_s", "p95_s", "mean_s"])
    for kind, label in Kind.choices:
        t = report.by_kind.get(kind) or Totals()
        table.rows.append([kind, t.wait_count, _s(accounting.WaitSketch.quantile(t.wait_sketch, 0.5)),
                           _s(accounting.WaitSketch.quantile(t.wait_sketch, 0.95)), _s(t.wait_mean_s)])
    return table


def outcomes_table(report: Report) -> Table:
    table = Table(["kind", "succeeded", "failed", "cancelled", "success_rate_pct", "failure_rate_pct",
                   "cancel_rate_pct", "interrupted_attempts"])
    every = Totals()
    for kind, _ in Kind.choices:
        t = report.by_kind.get(kind) or Totals()
        every.add(t)
        table.rows.append(_outcome_row(kind, t))
    table.rows.append(_outcome_row("all", every))
    return table


def _outcome_row(name: str, t: Totals) -> list:
    rates = accounting.outcome_rates(t)
    return [name, t.jobs_succeeded, t.jobs_failed, t.jobs_cancelled, _pct(rates["success"]),
            _pct(rates["failure"]), _pct(rates["cancel"]), t.attempts_interrupted]


def top_jobs_table(report: Report) -> Table:
    table = Table(["job", "team", "user", "kind", "status", "core_hours", "used_core_hours", "idle_core_hours",
                   "utilization_pct", "cost_usd", "idle_cost_usd"])
    for top in report.top_jobs:
        t, job = top.totals, top.job
        table.rows.append([job.pk, job.team.slug, job.user.username, job.kind, job.status, _h(t.core_seconds),
                           _h(t.used_core_seconds), _h(max(t.measured_core_seconds - t.used_core_seconds, 0.0)),
                           _pct(t.utilization), _usd(t.cost_usd), _usd(t.idle_cost_usd)])
    return table


def teams_table(report: Report) -> Table:
    """Site only: each team's NeuronCore-hours and cost with its share of the total."""
    table = Table(["team", "core_hours", "hours_share_pct", "cost_usd", "cost_share_pct", "idle_cost_usd",
                   "utilization_pct", "jobs_finished"])
    hours = sum(s.totals.core_seconds for s in report.team_shares)
    cost = sum(s.totals.cost_usd for s in report.team_shares)
    for share in report.team_shares:
        t = share.totals
        table.rows.append([share.team.slug, _h(t.core_seconds), _pct(t.core_seconds / hours if hours else None),
                           _usd(t.cost_usd), _pct(t.cost_usd / cost if cost else None), _usd(t.idle_cost_usd),
                           _pct(t.utilization), t.jobs_finished])
    return table


def fleet_table(report: Report) -> Table:
    """Site only: measured utilization of allocated cores per day, and allocated
    hours as a share of the capacity registered now (hosts have no history)."""
    table = Table(["day", "allocated_core_hours", "used_core_hours", "utilization_pct", "capacity_core_hours",
                   "allocated_share_pct"])
    capacity = report.capacity_cores * 24.0
    for day in report.days:
        t = report.day(day)
        table.rows.append([day.isoformat(), _h(t.core_seconds), _h(t.used_core_seconds), _pct(t.utilization),
                           capacity, _pct(t.core_hours / capacity if capacity else None)])
    return table


def efficiency_table(report: Report) -> Table:
    """Efficiency = used / allocated NeuronCore-hours (unmeasured hours count as not
    used; utilization is used / measured): the whole range, then each team (site) or
    each user (team), then each job kind; largest allocation first."""
    table = Table(["group", "name", "allocated_core_hours", "used_core_hours", "unknown_core_hours",
                   "efficiency_pct", "utilization_pct"])

    def row(group: str, name: str, t: Totals) -> None:
        table.rows.append([group, name, _h(t.core_seconds), _h(t.used_core_seconds),
                           _h(max(t.core_seconds - t.measured_core_seconds, 0.0)), _pct(t.efficiency),
                           _pct(t.utilization)])

    row("all", "all", report.totals)
    if report.scope == "site":
        for share in report.team_shares:
            row("team", share.team.slug, share.totals)
    for name in sorted(report.by_user, key=lambda n: (-report.by_user[n].core_seconds, n)):
        row("user", name, report.by_user[name])
    for kind in sorted(report.by_kind, key=lambda k: (-report.by_kind[k].core_seconds, k)):
        if report.by_kind[kind].core_seconds > 0:
            row("kind", kind, report.by_kind[kind])
    return table


def prices_table(report: Report) -> Table:
    table = Table(["instance_type", "usd_per_hour", "cores", "usd_per_core_hour", "source"])
    for name in sorted(report.prices):
        p = report.prices[name]
        table.rows.append([name, p.usd_per_hour, p.cores, round(p.usd_per_core_hour, 6), p.source])
    return table


def tables(report: Report) -> dict[str, Table]:
    """Every table of the report by its CSV name (`?format=csv&table=<name>`)."""
    out = {
        "summary": summary_table(report),
        "hours": hours_table(report),
        "allocation": allocation_table(report),
        "burndown": burndown_table(report),
        "wait": wait_table(report),
        "outcomes": outcomes_table(report),
        "top_jobs": top_jobs_table(report),
        "efficiency": efficiency_table(report),
        "prices": prices_table(report),
    }
    if report.scope == "site":
        out["teams"] = teams_table(report)
        out["fleet"] = fleet_table(report)
    return out


def groups(report: Report, group_by: str) -> list[dict]:
    """Totals per group (kind / user / family / day) for the API, largest first
    (days in order). The report must have been built with this group_by (or any,
    for "day")."""
    if group_by == "day":
        sums = {day: report.day(day) for day in report.days}
        keys = report.days
    else:
        sums = report.by_group()
        keys = sorted(sums, key=lambda k: (-sums[k].core_seconds, k))
    return [{"key": key.isoformat() if isinstance(key, date) else key, **totals_document(sums[key])}
            for key in keys]


def totals_document(t: Totals) -> dict:
    return {
        "allocated_core_hours": _h(t.core_seconds), "used_core_hours": _h(t.used_core_seconds),
        "idle_core_hours": _h(max(t.measured_core_seconds - t.used_core_seconds, 0.0)),
        "unknown_core_hours": _h(max(t.core_seconds - t.measured_core_seconds, 0.0)),
        "utilization_pct": _pct(t.utilization), "cost_usd": _usd(t.cost_usd), "idle_cost_usd": _usd(t.idle_cost_usd),
        "unpriced_core_hours": _h(t.unpriced_core_seconds), "jobs_succeeded": t.jobs_succeeded,
        "jobs_failed": t.jobs_failed, "jobs_cancelled": t.jobs_cancelled,
        "attempts_interrupted": t.attempts_interrupted,
    }
