"""Reads for the usage pages, their CSV and the usage API: the roll-ups for the
range plus the live part (jobs.usage_rollup.live_usage), shaped into tables.

Query count is fixed: a team report is ~8 queries, a site report ~11, whatever the
size of the history (the roll-ups hold one row per team / day / user / kind /
family / instance type; the live part covers only what the fold has not reached).

Every table a page shows or charts is a `Table` built here; the CSV export, the
API and the Plotly figures (jobs.charts_usage) are all made from these tables, so
the numbers cannot drift apart."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Sum
from django.utils import timezone

from jobs import usage
from jobs.models import Family, Host, Job, JobUsage, Kind, Team, TeamQuota, UsageDaily, UsageSiteDaily, UsageTeamDay
from jobs.usage import Price, Totals
from jobs.usage_rollup import LiveUsage, live_usage, prices

TOP_JOBS = 10
TOP_TEAMS_STACKED = 7  # the site's "by team" chart stacks this many teams and "other teams"
BURN_WINDOW_DAYS = 7
TEAM_GROUPS = ("kind", "user", "family")
SITE_GROUPS = ("kind", "family", "team")
API_GROUPS = ("kind", "user", "family", "day")
KIND_LABELS = dict(Kind.choices)
FAMILY_LABELS = dict(Family.choices)


@dataclass(frozen=True)
class Row:
    """Usage of one day and one combination of dimensions (None = not split by it)."""

    day: date
    team_id: int | None
    user_id: int | None
    kind: str
    family: str
    instance_type: str
    totals: Totals


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


@dataclass
class TeamShare:
    team: Team
    totals: Totals


@dataclass
class Report:
    """One usage report: a team's (scope "team") or the whole site's ("site")."""

    scope: str
    team: Team | None
    tz: ZoneInfo
    range_name: str
    first: date
    last: date
    today: date
    now: datetime
    rows: list[Row]  # within [first, last]
    month_daily_hours: dict[date, float]
    budget: float | None
    top_jobs: list[TopJob]
    prices: dict[str, Price]
    user_names: dict[int, str] = field(default_factory=dict)
    team_shares: list[TeamShare] = field(default_factory=list)  # site only
    team_daily: dict[str, dict[date, float]] = field(default_factory=dict)  # site only: hours by team label
    capacity_cores: int = 0  # site only: NeuronCores of the hosts registered now

    @property
    def days(self) -> list[date]:
        return usage.days_between(self.first, self.last)

    @property
    def totals(self) -> Totals:
        total = Totals()
        for row in self.rows:
            total.add(row.totals)
        return total

    def by(self, key: Callable[[Row], object]) -> dict:
        return _sum_rows(self.rows, key)

    def burn(self) -> usage.BurnDown:
        return usage.burn_down(self.month_daily_hours, today=self.today,
                               fraction_of_today=usage.day_fraction(self.now, self.tz), budget=self.budget,
                               window_days=BURN_WINDOW_DAYS)


def _sum_rows(rows: Iterable[Row], key: Callable[[Row], object]) -> dict:
    sums: dict = {}
    for row in rows:
        k = key(row)
        if k not in sums:
            sums[k] = Totals()
        sums[k].add(row.totals)
    return sums


def _span(first: date, last: date, today: date) -> tuple[date, date]:
    """Days to read: the range, plus this month and the burn-rate window."""
    return min(first, today.replace(day=1), today - timedelta(days=BURN_WINDOW_DAYS)), max(last, today)


def _live_rows(live: LiveUsage, *, keep_team: bool, keep_user: bool) -> list[Row]:
    return [Row(c.day, c.dims.team_id if keep_team else None, c.dims.user_id if keep_user else None, c.dims.kind,
                c.dims.family, c.dims.instance_type, c.totals) for c in live.contributions]


def _split(rows: list[Row], first: date, last: date) -> tuple[list[Row], dict[date, float]]:
    """Rows within the range, and NeuronCore-hours per day over all rows (burn-down)."""
    daily: dict[date, float] = defaultdict(float)
    for row in rows:
        daily[row.day] += row.totals.core_hours
    return [r for r in rows if first <= r.day <= last], dict(daily)


# --- team --------------------------------------------------------------------------

def team_report(team: Team, range_name: str, first: date, last: date, *, now: datetime | None = None) -> Report:
    """The team's usage from first to last (days in the team's time zone)."""
    now = now or timezone.now()
    tz = usage.zone(team.time_zone)
    today = usage.local_day(now, tz)
    span_first, span_last = _span(first, last, today)
    table = prices()
    rolled = UsageDaily.objects.filter(team=team, day__gte=span_first, day__lte=span_last).values(
        "day", "user_id", "kind", "family", "instance_type", *usage.TOTAL_FIELDS)
    rows = [Row(v["day"], team.pk, v["user_id"], v["kind"], v["family"], v["instance_type"],
                Totals.from_mapping(v)) for v in rolled]
    live = live_usage(team_id=team.pk, now=now, price_table=table)
    rows.extend(_live_rows(live, keep_team=True, keep_user=True))
    in_range, daily = _split(rows, first, last)
    budget = TeamQuota.objects.filter(team=team).values_list("monthly_core_hours", flat=True).first()
    user_ids = {r.user_id for r in in_range if r.user_id is not None}
    names = dict(get_user_model().objects.filter(pk__in=user_ids).values_list("pk", "username")) if user_ids else {}
    return Report("team", team, tz, range_name, first, last, today, now, in_range, daily, budget,
                  _top_jobs(live, first, last, team=team), table, user_names=names)


# --- site --------------------------------------------------------------------------

def site_report(range_name: str, first: date, last: date, *, now: datetime | None = None,
                group_by: str = "kind") -> Report:
    """All teams' usage from first to last. Days are each team's own local days, so
    a team's line in the site's team table equals its own usage page."""
    now = now or timezone.now()
    tz = usage.zone(settings.TIME_ZONE)
    today = usage.local_day(now, tz)
    span_first, span_last = _span(first, last, today)
    table = prices()
    rolled = UsageSiteDaily.objects.filter(day__gte=span_first, day__lte=span_last).values(
        "day", "kind", "family", "instance_type", *usage.TOTAL_FIELDS)
    rows = [Row(v["day"], None, None, v["kind"], v["family"], v["instance_type"], Totals.from_mapping(v))
            for v in rolled]
    live = live_usage(now=now, price_table=table)
    live_rows = _live_rows(live, keep_team=True, keep_user=False)
    rows.extend(live_rows)
    in_range, daily = _split(rows, first, last)
    budget = TeamQuota.objects.aggregate(s=Sum("monthly_core_hours"))["s"]
    shares = _team_shares(first, last, [r for r in live_rows if first <= r.day <= last])
    report = Report("site", None, tz, range_name, first, last, today, now, in_range, daily, budget,
                    _top_jobs(live, first, last, team=None), table, team_shares=shares,
                    capacity_cores=_capacity_cores())
    if group_by == "team":
        report.team_daily = _team_daily(report, shares[:TOP_TEAMS_STACKED], live_rows)
    return report


def _team_shares(first: date, last: date, live_rows: list[Row]) -> list[TeamShare]:
    """Every team with usage in the range, most NeuronCore-hours first (one query
    over UsageTeamDay, summed in the database, plus one for the teams)."""
    numeric = [f for f in usage.NUMERIC_FIELDS]
    sums = (UsageTeamDay.objects.filter(day__gte=first, day__lte=last).values("team_id")
            .annotate(**{f"s_{f}": Sum(f) for f in numeric}).order_by())
    per_team = {v["team_id"]: Totals(**{f: v[f"s_{f}"] or 0 for f in numeric}) for v in sums}
    for team_id, totals in _sum_rows(live_rows, lambda r: r.team_id).items():
        per_team.setdefault(team_id, Totals()).add(totals)
    teams = Team.objects.in_bulk(list(per_team))
    shares = [TeamShare(teams[t], totals) for t, totals in per_team.items() if t in teams]
    shares.sort(key=lambda s: (-s.totals.core_seconds, s.team.slug))
    return shares


def _team_daily(report: Report, top: list[TeamShare], live_rows: list[Row]) -> dict[str, dict[date, float]]:
    """Hours per day of the top teams, and of all others together."""
    ids = [s.team.pk for s in top]
    slugs = {s.team.pk: s.team.slug for s in top}
    series: dict[str, dict[date, float]] = {s.team.slug: defaultdict(float) for s in top}
    for v in UsageTeamDay.objects.filter(team_id__in=ids, day__gte=report.first, day__lte=report.last).values(
            "team_id", "day", "core_seconds"):
        series[slugs[v["team_id"]]][v["day"]] += v["core_seconds"] / 3600.0
    for row in live_rows:
        if row.team_id in slugs and report.first <= row.day <= report.last:
            series[slugs[row.team_id]][row.day] += row.totals.core_hours
    other: dict[date, float] = defaultdict(float)
    for day, totals in report.by(lambda r: r.day).items():
        other[day] = totals.core_hours - sum(s.get(day, 0.0) for s in series.values())
    if any(abs(v) > 1e-9 for v in other.values()):
        series["other teams"] = other
    return series


def _capacity_cores() -> int:
    """NeuronCores (CPU hosts: job slots) of the hosts that are not offline."""
    return sum(len(ids or []) for ids in Host.objects.exclude(state=Host.State.OFFLINE).values_list("core_ids", flat=True))


# --- top jobs ----------------------------------------------------------------------

def _top_jobs(live: LiveUsage, first: date, last: date, *, team: Team | None) -> list[TopJob]:
    """The most expensive jobs whose latest usage falls in the range, with their
    whole cost (folded + live). Three queries: the folded top, the folded part of
    the jobs holding cores now, and the jobs themselves."""
    folded = JobUsage.objects.filter(day__gte=first, day__lte=last, core_seconds__gt=0)
    if team is not None:
        folded = folded.filter(team=team)
    candidates: dict[int, tuple[date, Totals]] = {}
    for u in folded.order_by("-cost_usd", "-job_id")[:TOP_JOBS]:
        candidates[u.job_id] = (u.day, _job_totals(u))
    live_days: dict[int, date] = {}
    for c in live.contributions:
        if c.job_id in live.job_totals:
            live_days[c.job_id] = max(live_days.get(c.job_id, c.day), c.day)
    if live.job_totals:
        base = {u.job_id: u for u in JobUsage.objects.filter(job_id__in=list(live.job_totals))}
        for job_id, extra in live.job_totals.items():
            u = base.get(job_id)
            totals = (_job_totals(u) if u else Totals()).add(extra)
            day = max(u.day, live_days[job_id]) if u else live_days[job_id]
            candidates[job_id] = (day, totals)
    ranked = sorted(((t.cost_usd, t.core_seconds, job_id) for job_id, (day, t) in candidates.items()
                     if first <= day <= last), reverse=True)[:TOP_JOBS]
    jobs = Job.objects.select_related("user", "team").in_bulk([job_id for _, _, job_id in ranked])
    return [TopJob(jobs[job_id], candidates[job_id][1], job_id in live.active_jobs)
            for _, _, job_id in ranked if job_id in jobs]


def _job_totals(u: JobUsage) -> Totals:
    return Totals(core_seconds=u.core_seconds, measured_core_seconds=u.measured_core_seconds,
                  used_core_seconds=u.used_core_seconds, cost_usd=u.cost_usd, idle_cost_usd=u.idle_cost_usd)


# --- tables ------------------------------------------------------------------------

def _h(seconds: float) -> float:
    return round(seconds / 3600.0, 4)


def _usd(value: float) -> float:
    return round(value, 4)


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else round(100.0 * fraction, 2)


def _s(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def group_label(report: Report, group_by: str, row: Row) -> str:
    if group_by == "user":
        return report.user_names.get(row.user_id, f"user {row.user_id}") if row.user_id else "(deleted user)"
    if group_by == "family":
        return FAMILY_LABELS.get(row.family, row.family)
    return KIND_LABELS.get(row.kind, row.kind)


def hours_table(report: Report, group_by: str) -> Table:
    """NeuronCore-hours per day and group, zero-filled: every day × every group
    seen in the range (the stacked chart's data)."""
    table = Table(["day", group_by, "core_hours", "cost_usd"])
    if group_by == "team":
        for label, series in report.team_daily.items():
            for day in report.days:
                table.rows.append([day.isoformat(), label, round(series.get(day, 0.0), 4), None])
        return table
    sums = report.by(lambda r: (group_label(report, group_by, r), r.day))
    labels = sorted({label for label, _ in sums})
    for label in labels:
        for day in report.days:
            t = sums.get((label, day), Totals())
            table.rows.append([day.isoformat(), label, _h(t.core_seconds), _usd(t.cost_usd)])
    return table


def allocation_table(report: Report) -> Table:
    """Allocated vs used per day, with idle (allocated, measured, not busy) and
    unknown (not measured) hours, cost and idle cost (the allocation and cost charts)."""
    table = Table(["day", "allocated_core_hours", "used_core_hours", "idle_core_hours", "unknown_core_hours",
                   "utilization_pct", "cost_usd", "idle_cost_usd", "unpriced_core_hours"])
    by_day = report.by(lambda r: r.day)
    for day in report.days:
        t = by_day.get(day, Totals())
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
    burn = report.burn()
    table = Table(["day", "cumulative_core_hours", "forecast_core_hours", "budget_core_hours"])
    for day, actual, forecast in zip(burn.days, burn.actual, burn.forecast):
        table.rows.append([day.isoformat(), None if actual is None else round(actual, 4),
                           None if forecast is None else round(forecast, 4), burn.budget])
    return table


def wait_table(report: Report) -> Table:
    """Queue wait (first start − submit) by kind: p50 / p95 from the merged sketches."""
    table = Table(["kind", "jobs", "p50_s", "p95_s", "mean_s"])
    by_kind = report.by(lambda r: r.kind)
    for kind, label in Kind.choices:
        t = by_kind.get(kind, Totals())
        table.rows.append([kind, t.wait_count, _s(usage.WaitSketch.quantile(t.wait_sketch, 0.5)),
                           _s(usage.WaitSketch.quantile(t.wait_sketch, 0.95)), _s(t.wait_mean_s)])
    return table


def outcomes_table(report: Report) -> Table:
    table = Table(["kind", "succeeded", "failed", "cancelled", "success_rate_pct", "failure_rate_pct",
                   "cancel_rate_pct", "interrupted_attempts"])
    by_kind = report.by(lambda r: r.kind)
    every = Totals()
    for kind, _ in Kind.choices:
        t = by_kind.get(kind, Totals())
        every.add(t)
        table.rows.append(_outcome_row(kind, t))
    table.rows.append(_outcome_row("all", every))
    return table


def _outcome_row(name: str, t: Totals) -> list:
    rates = usage.outcome_rates(t)
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
    by_day = report.by(lambda r: r.day)
    capacity = report.capacity_cores * 24.0
    for day in report.days:
        t = by_day.get(day, Totals())
        table.rows.append([day.isoformat(), _h(t.core_seconds), _h(t.used_core_seconds), _pct(t.utilization),
                           capacity, _pct(t.core_hours / capacity if capacity else None)])
    return table


def prices_table(report: Report) -> Table:
    table = Table(["instance_type", "usd_per_hour", "cores", "usd_per_core_hour", "source"])
    for name in sorted(report.prices):
        p = report.prices[name]
        table.rows.append([name, p.usd_per_hour, p.cores, round(p.usd_per_core_hour, 6), p.source])
    return table


def tables(report: Report, group_by: str) -> dict[str, Table]:
    """Every table of the report by its CSV name (`?format=csv&table=<name>`)."""
    out = {
        "summary": summary_table(report),
        "hours": hours_table(report, group_by),
        "allocation": allocation_table(report),
        "burndown": burndown_table(report),
        "wait": wait_table(report),
        "outcomes": outcomes_table(report),
        "top_jobs": top_jobs_table(report),
        "prices": prices_table(report),
    }
    if report.scope == "site":
        out["teams"] = teams_table(report)
        out["fleet"] = fleet_table(report)
    return out


def groups(report: Report, group_by: str) -> list[dict]:
    """Totals per group (kind / user / family / day) for the API, largest first
    (days in order)."""
    if group_by == "day":
        sums = report.by(lambda r: r.day)
        keys = report.days
    else:
        sums = report.by(lambda r: group_label(report, group_by, r))
        keys = sorted(sums, key=lambda k: (-sums[k].core_seconds, k))
    out = []
    for key in keys:
        t = sums.get(key, Totals())
        out.append({"key": key.isoformat() if isinstance(key, date) else key, **totals_document(t)})
    return out


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
