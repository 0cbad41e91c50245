"""Reads for quotas, team usage and the scheduler's queue order: the team page, the
admin quota page, the team API and the dispatcher share them. No writes here.

Every function that lists teams runs a fixed number of queries whatever the number
of teams (the quota page is loaded with hundreds of them)."""
from __future__ import annotations

import math
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone

from django.conf import settings
from django.core.cache import cache
from django.db.models import Count, F, OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce, Least, TruncDay, TruncHour
from django.utils import timezone

from jobs.models import (
    AuditEntry,
    CoreAllocation,
    Family,
    FamilyQuota,
    Host,
    Job,
    JobAttempt,
    Kind,
    KindPriority,
    Team,
    TeamQuota,
    UsageDaily,
    UsageRollupState,
    UsageTeamDay,
    UserBudget,
)
from jobs.quotas.fairshare import decayed_usage
from jobs.quotas.policy import UserCap
from jobs.usage import accounting
from jobs.usage.rollup import LAG, _attempt_row, unfolded_attempts

EPOCH = datetime(1970, 1, 1, tzinfo=dt_timezone.utc)
USAGE_HORIZON_HALF_LIVES = 8  # usage older than 8 half-lives weighs < 0.4 %: not worth reading


# --- scheduling inputs -------------------------------------------------------------

# The defaults under the admin's KindPriority rows: endpoint replicas > inference > compile > fine-tune.
DEFAULT_KIND_PRIORITY: dict[str, int] = {Kind.SERVE: 40, Kind.INFERENCE: 30, Kind.COMPILE: 20, Kind.FINETUNE: 10}


def kind_priorities() -> dict[str, int]:
    """Priority per job kind (higher goes first): the admin's KindPriority rows over
    DEFAULT_KIND_PRIORITY. Dispatch and the queue position read it here, when they
    order the queue: a change applies to the jobs already waiting."""
    prio = {str(k): v for k, v in DEFAULT_KIND_PRIORITY.items()}
    prio.update(KindPriority.objects.values_list("kind", "priority"))
    return prio


def team_shares() -> dict[int, float]:
    return {team_id: float(share or 1) for team_id, share in TeamQuota.objects.values_list("team_id", "share")}


def half_life_s() -> float:
    return float(settings.FAIRSHARE_HALF_LIFE_H) * 3600.0


_usage_lock = threading.Lock()
_usage_cache: tuple[float, dict[int, float]] | None = None


def decayed_usage_by_team(*, fresh: bool = False) -> dict[int, float]:
    """Decayed NeuronCore-seconds per team (jobs.fairshare.decayed_usage) from
    JobAttempt rows: closed attempts in hour buckets (by end time), open ones accrued
    up to now. Cached per process for settings.FAIRSHARE_CACHE_S, because dispatch
    runs on every submit burst and a few seconds of staleness cannot change who
    deserves to go next in any way that matters."""
    global _usage_cache
    ttl = float(settings.FAIRSHARE_CACHE_S)
    with _usage_lock:
        if not fresh and _usage_cache is not None and time.monotonic() - _usage_cache[0] < ttl:
            return _usage_cache[1]
    usage = _compute_decayed_usage(timezone.now())
    with _usage_lock:
        _usage_cache = (time.monotonic(), usage)
    return usage


def clear_usage_cache(*, closed_days: bool = True) -> None:
    """Forget the process's decayed usage, and with `closed_days` every cached day and
    hour of closed attempts too (a test that rewrites history, a repair). Without it,
    the next read recomputes as it would once FAIRSHARE_CACHE_S is over."""
    global _usage_cache
    with _usage_lock:
        _usage_cache = None
    if closed_days:
        cache.set(_GENERATION_KEY, uuid.uuid4().hex, None)


# Closed attempts count at their end time, and an attempt ends at the moment it is
# closed (jobs.lifecycle.states), so the sums of a day or an hour never change once
# it is over: they are kept in Django's cache, keyed by its start. An hour is kept
# once it has been over for LAG, by when every attempt stamped within it has
# committed (as for the usage roll-up). The expiry only bounds how long a repair of
# old attempts (an admin's deletion) goes unseen.
CLOSED_CACHE_S = 6 * 3600
_GENERATION_KEY = "fairshare:closed-days:generation"
DAY, HOUR = timedelta(days=1), timedelta(hours=1)

Sums = tuple[tuple[int, float], ...]  # (team id, Σ core_seconds) of the attempts that closed in a bucket


def _compute_decayed_usage(now: datetime) -> dict[int, float]:
    half = half_life_s()
    # Closed attempts summed per team in buckets, each counted at its middle: by the
    # hour since the start of yesterday, by the day from the horizon's day on, so
    # that a long horizon is not read as one row per team and hour. A day's bucket
    # moves the weight of usage at least a day old by at most 2^(12 h / half life):
    # ±5 % at the default half-life of a week. Buckets are UTC days and hours (the
    # decay has no use for a local calendar, and UTC has no repeated hour). Buckets
    # that are over come from the cache (_closed_sums); each recompute reads the
    # hours since the last one kept, and the attempts still open.
    today = datetime.combine(now.astimezone(dt_timezone.utc).date(), datetime.min.time(), tzinfo=dt_timezone.utc)
    hourly_from = today - DAY
    horizon = today - DAY * math.ceil(half * USAGE_HORIZON_HALF_LIVES / DAY.total_seconds())
    settled_hours = _steps(hourly_from, now - LAG, HOUR)
    days = _closed_sums(_steps(horizon, hourly_from, DAY), DAY)
    hours = _closed_sums(settled_hours, HOUR)
    buckets = []
    for sums, middle in ((days, DAY / 2), (hours, HOUR / 2)):
        for start, rows in sums.items():
            when = start + middle
            buckets.extend((team_id, when, s) for team_id, s in rows)
    recent = hourly_from + HOUR * len(settled_hours)
    for team_id, start, s in (JobAttempt.objects.filter(ended_at__gte=recent)
                              .annotate(start=TruncHour("ended_at", tzinfo=dt_timezone.utc))
                              .values_list("team_id", "start").annotate(s=Sum("core_seconds"))):
        buckets.append((team_id, min(start + HOUR / 2, now), s))
    for team_id, cores, started in JobAttempt.objects.filter(ended_at__isnull=True).values_list(
            "team_id", "cores", "started_at"):
        buckets.append((team_id, now, cores * max((now - started).total_seconds(), 0.0)))
    return decayed_usage(buckets, now, half)


def _steps(since: datetime, until: datetime, step: timedelta) -> list[datetime]:
    """The starts of the buckets of length `step` from `since` that end by `until`."""
    starts = []
    while since + step <= until:
        starts.append(since)
        since += step
    return starts


def _closed_sums(starts: list[datetime], step: timedelta) -> dict[datetime, Sums]:
    """Sums of the attempts that closed in each bucket [start, start + step) of
    `starts` (whole UTC days or hours that are over, oldest first): from the cache,
    the missing ones read in one query and cached."""
    if not starts:
        return {}
    generation = cache.get(_GENERATION_KEY)
    if generation is None:
        generation = uuid.uuid4().hex
        cache.add(_GENERATION_KEY, generation, None)
        generation = cache.get(_GENERATION_KEY, generation)
    unit, trunc = ("day", TruncDay) if step == DAY else ("hour", TruncHour)
    keys = {start: f"fairshare:closed-{unit}:{generation}:{start.isoformat()}" for start in starts}
    cached = cache.get_many(keys.values())
    found = {start: cached[key] for start, key in keys.items() if key in cached}
    missing = [start for start in starts if start not in found]
    if missing:
        sums: dict[datetime, list[tuple[int, float]]] = {start: [] for start in missing}
        rows = (JobAttempt.objects.filter(ended_at__gte=missing[0], ended_at__lt=missing[-1] + step)
                .annotate(start=trunc("ended_at", tzinfo=dt_timezone.utc))
                .values_list("team_id", "start").annotate(s=Sum("core_seconds")))
        for team_id, start, s in rows:
            if start in sums:
                sums[start].append((team_id, s))
        fresh = {start: tuple(sorted(sums[start])) for start in missing}
        cache.set_many({keys[start]: value for start, value in fresh.items()}, CLOSED_CACHE_S)
        found.update(fresh)
    return found


# --- usage against limits ----------------------------------------------------------

def core_hours_by_team(team_ids: Iterable[int] | None = None, *, now: datetime | None = None) -> dict[int, float]:
    """NeuronCore-hours used this month per team: the budget's measure. The quota
    pages show it; submit and dispatch judge budgets by it (core_hours_for_budget).

    "This month" is the team's local calendar month, and usage is counted by the
    day it happened (an attempt across midnight is split) — the same numbers as the
    team's usage page and its burn-down. Read from the UsageTeamDay roll-up plus
    what the fold has not reached yet (open attempts and the last few minutes, via
    jobs.usage.rollup.unfolded_attempts): three queries, whatever the history."""
    now = now or timezone.now()
    month = _Month(now)
    used = _folded_this_month(month, team_ids)
    cutoff = UsageRollupState.objects.filter(pk=1).values_list("cutoff", flat=True).first()
    attempts = unfolded_attempts(since=cutoff - LAG if cutoff else None, before=now)
    rows = [_attempt_row(v) for v in _filtered(attempts, team_ids)]
    zones = {row.dims.team_id: row.time_zone for row in rows}
    for piece in accounting.plan_attempts(rows, now).pieces:
        if piece.day >= month.start(zones[piece.dims.team_id]):
            used[piece.dims.team_id] += piece.core_seconds
    return {team_id: s / 3600.0 for team_id, s in used.items()}


def core_hours_for_budget(budgets: dict[int, float], *, now: datetime | None = None,
                          bounds: dict[int, float] | None = None) -> dict[int, float]:
    """This month's NeuronCore-hours of each team in `budgets` (team id -> its monthly
    budget), as a budget check needs them: exact (core_hours_by_team) for a team that
    may have reached its budget, the upper bound (core_hours_bound, or `bounds` if
    the caller measured it already) for the others.

    The exact measure splits the attempts the fold has not reached by day in Python
    (thousands of rows on a busy fleet), and submit and dispatch judge budgets many
    times a second; only a team near its budget pays for it, so every refusal, and
    the figure in its sentence, is exact."""
    if not budgets:
        return {}
    now = now or timezone.now()
    hours = dict(core_hours_bound(budgets, now=now) if bounds is None else bounds)
    near = [team_id for team_id, budget in budgets.items() if hours[team_id] >= budget]
    if near:
        exact = core_hours_by_team(near, now=now)
        hours.update({team_id: exact.get(team_id, 0.0) for team_id in near})
    return hours


LOOK_UP = object()  # user_cap's monthly_core_hours when the caller has not read the UserBudget row


def user_budget_hours(user) -> Subquery:
    """The user's cap in the row's team, as an annotation (submit reads it with the
    locked quota row: no query of its own for the users who have none)."""
    return Subquery(UserBudget.objects.filter(team_id=OuterRef("team_id"), user=user)
                    .values("monthly_core_hours")[:1])


def user_cap(team: Team, user, *, now: datetime | None = None, monthly_core_hours=LOOK_UP) -> UserCap | None:
    """The user's hard cap in `team` (UserBudget) with what counts against it, or None
    without one (one query then). Read inside submit's quota lock: the reserved part
    counts every job of the user committed before, so concurrent submits add up.

    used: the user's NeuronCore-hours this month (the team's local month; the
    UsageDaily roll-up plus what the fold has not reached, split by day as the budget
    measure does). reserved: the most the user's unfinished jobs may still use -
    pending and queued ones cores x max_runtime_s, running ones cores x what is left
    of their max runtime (their time so far is already in used)."""
    cap = monthly_core_hours
    if cap is LOOK_UP:
        cap = UserBudget.objects.filter(team=team, user=user).values_list("monthly_core_hours", flat=True).first()
    if cap is None:
        return None
    now = now or timezone.now()
    start = accounting.local_day(now, accounting.zone(team.time_zone)).replace(day=1)
    folded = (UsageDaily.objects.filter(team=team, user=user, day__gte=start)
              .aggregate(s=Sum("core_seconds"))["s"] or 0.0)
    cutoff = UsageRollupState.objects.filter(pk=1).values_list("cutoff", flat=True).first()
    rows = [_attempt_row(v) for v in unfolded_attempts(since=cutoff - LAG if cutoff else None, before=now,
                                                       team_id=team.pk).filter(user=user)]
    unfolded = sum(p.core_seconds for p in accounting.plan_attempts(rows, now).pieces if p.day >= start)
    reserved = 0.0
    for status, cores, runtime, started in Job.objects.filter(
            team=team, user=user, status__in=[Job.Status.PENDING, *Job.ACTIVE]).values_list(
            "status", "cores", "max_runtime_s", "started_at"):
        elapsed = (now - started).total_seconds() if status == Job.Status.RUNNING and started else 0.0
        reserved += cores * max(runtime - elapsed, 0.0)
    return UserCap(user.username, cap, (folded + unfolded) / 3600.0, reserved / 3600.0)


def core_hours_bound(team_ids: Iterable[int], *, now: datetime | None = None) -> dict[int, float]:
    """An upper bound of this month's NeuronCore-hours of each team: the roll-up's
    days of the month plus the whole span of every attempt the fold may not have
    reached, summed by the database (two queries)."""
    team_ids = list(team_ids)
    now = now or timezone.now()
    used = _folded_this_month(_Month(now), team_ids)
    for team_id, cores, span in _unfolded_spans(team_ids, now):
        used[team_id] += cores * span.total_seconds()
    return {team_id: used.get(team_id, 0.0) / 3600.0 for team_id in team_ids}


class _Month:
    """The first day of "this month" in each team's time zone, at `now`."""

    def __init__(self, now: datetime):
        self.now = now
        self.starts: dict[str, date] = {}
        # Every zone's local date is within a day of UTC's: a bound that holds for all teams.
        self.earliest = (now.astimezone(dt_timezone.utc).date() - timedelta(days=1)).replace(day=1)

    def start(self, tz_name: str) -> date:
        if tz_name not in self.starts:
            self.starts[tz_name] = accounting.local_day(self.now, accounting.zone(tz_name)).replace(day=1)
        return self.starts[tz_name]


def _folded_this_month(month: _Month, team_ids: Iterable[int] | None) -> dict[int, float]:
    """NeuronCore-seconds per team in the roll-up's days of this month."""
    used: dict[int, float] = defaultdict(float)
    days = _filtered(UsageTeamDay.objects.filter(day__gte=month.earliest), team_ids)
    for team_id, tz_name, day, s in days.values_list("team_id", "team__time_zone", "day", "core_seconds"):
        if day >= month.start(tz_name):
            used[team_id] += s or 0.0
    return used


def _unfolded_spans(team_ids: Iterable[int], now: datetime) -> QuerySet:
    """(team, cores, summed duration) of the attempts that may hold usage the fold has
    not reached (those of unfolded_attempts, up to `now`), whole spans: never less
    than their unfolded part within the month. Grouped by cores because SQLite's
    backend cannot multiply a duration in SQL."""
    cutoff = Subquery(UsageRollupState.objects.filter(pk=1).values("cutoff"))
    since = Coalesce(cutoff, Value(EPOCH)) - Value(LAG)  # no roll-up yet: every attempt
    end = Least(Coalesce("ended_at", Value(now)), Value(now))
    return (JobAttempt.objects.filter(Q(ended_at__isnull=True) | Q(ended_at__gt=since),
                                      team_id__in=list(team_ids), started_at__lt=now)
            .values_list("team_id", "cores").annotate(span=Sum(end - F("started_at"))).order_by())


def fleet_capacity() -> dict[str, int]:
    """NeuronCores per family on hosts that are not offline."""
    cap: dict[str, int] = defaultdict(int)
    for family, core_ids in Host.objects.exclude(state=Host.State.OFFLINE).values_list("family", "core_ids"):
        cap[family] += len(core_ids or ())
    return dict(cap)


@dataclass
class FamilyUsage:
    family: str
    guaranteed: int = 0
    borrow_limit: int = 0
    in_use: int = 0
    borrowed: int = 0  # cores held beyond the guarantee (preemptible)
    lent: int = 0  # of the team's idle guarantee, how much other teams' borrowing uses now

    @property
    def max_cores(self) -> int:
        return self.guaranteed + self.borrow_limit

    @property
    def label(self) -> str:
        return Family(self.family).label if self.family in Family.values else self.family


@dataclass
class TeamUsage:
    team: Team
    quota: TeamQuota
    families: list[FamilyUsage]
    core_hours: float
    pending: int
    running: int
    share_total: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def budget_percent(self) -> float:
        budget = self.quota.monthly_core_hours
        return min(100.0, 100.0 * self.core_hours / budget) if budget > 0 else 100.0

    @property
    def share_percent(self) -> float:
        return 100.0 * self.quota.share / max(self.share_total, 1)

    @property
    def over_budget(self) -> bool:
        return self.core_hours >= self.quota.monthly_core_hours

    def family(self, family: str) -> FamilyUsage:
        return next(f for f in self.families if f.family == family)

    def as_dict(self) -> dict:
        q = self.quota
        return {
            "team": {"slug": self.team.slug, "name": self.team.name},
            "quota": {
                "share": q.share, "monthly_core_hours": q.monthly_core_hours, "max_runtime_s": q.max_runtime_s,
                "max_pending": q.max_pending, "allowed_kinds": list(q.allowed_kinds or []),
                "families": {f.family: {"guaranteed_cores": f.guaranteed, "borrow_limit": f.borrow_limit}
                             for f in self.families},
            },
            "usage": {
                "core_hours_this_month": round(self.core_hours, 3),
                "budget_percent": round(self.budget_percent, 1),
                "pending": self.pending, "running": self.running,
                "share_percent": round(self.share_percent, 1),
                "families": {f.family: {"in_use": f.in_use, "borrowed": f.borrowed, "lent": f.lent}
                             for f in self.families},
            },
        }


def team_usages(teams: list[Team] | None = None) -> list[TeamUsage]:
    """Every team (or `teams`) with quotas and usage, in a constant number of queries."""
    if teams is None:
        teams = list(Team.objects.select_related("quota").order_by("slug"))
    ids = [t.pk for t in teams]
    only = None if len(ids) > 50 else ids  # filtering by hundreds of ids costs more than reading all rows
    quotas: dict[tuple[int, str], FamilyQuota] = {
        (q.team_id, q.family): q for q in _filtered(FamilyQuota.objects.all(), only)}
    allocs: dict[tuple[int, str, bool], int] = {}
    borrowed_by_family: dict[str, int] = defaultdict(int)
    for team_id, family, borrowed, n in (CoreAllocation.objects.values_list("team_id", "family", "borrowed")
                                         .annotate(n=Count("id")).order_by()):
        allocs[(team_id, family, borrowed)] = n
        if borrowed:
            borrowed_by_family[family] += n
    status_counts: dict[tuple[int, str], int] = {
        (team_id, status): n for team_id, status, n in _filtered(
            Job.objects.filter(status__in=[Job.Status.PENDING, Job.Status.QUEUED, Job.Status.RUNNING]), only)
        .values_list("team_id", "status").annotate(n=Count("id")).order_by()}
    hours = core_hours_by_team(only)
    share_total = sum(TeamQuota.objects.values_list("share", flat=True)) or 1
    rows = []
    for team in teams:
        families = []
        for family in Family.values:
            q = quotas.get((team.pk, family))
            own = allocs.get((team.pk, family, False), 0)
            borrowed = allocs.get((team.pk, family, True), 0)
            fam = FamilyUsage(family, q.guaranteed_cores if q else 0, q.borrow_limit if q else 0,
                              own + borrowed, borrowed)
            idle = max(fam.guaranteed - own, 0)
            fam.lent = min(idle, borrowed_by_family[family] - borrowed)
            families.append(fam)
        quota = _quota_of(team)
        rows.append(TeamUsage(team, quota, families, hours.get(team.pk, 0.0),
                              status_counts.get((team.pk, Job.Status.PENDING), 0),
                              status_counts.get((team.pk, Job.Status.RUNNING), 0)
                              + status_counts.get((team.pk, Job.Status.QUEUED), 0),
                              share_total))
    return rows


def _filtered(qs: QuerySet, team_ids: Iterable[int] | None) -> QuerySet:
    return qs if team_ids is None else qs.filter(team_id__in=list(team_ids))


def _quota_of(team: Team) -> TeamQuota:
    try:
        return team.quota
    except TeamQuota.DoesNotExist:  # a team made outside team_create: show the defaults
        return TeamQuota(team=team)


def team_usage(team: Team) -> TeamUsage:
    return team_usages([team])[0]


def guarantee_totals() -> dict[str, int]:
    """Σ guaranteed cores per family over all teams (to warn when beyond the fleet)."""
    return dict(FamilyQuota.objects.values_list("family").annotate(s=Sum("guaranteed_cores")).order_by())


def overcommit_warnings(capacity: dict[str, int] | None = None, guarantees: dict[str, int] | None = None) -> list[str]:
    """One sentence per family whose guarantees add up to more than its fleet
    (`capacity` and `guarantees`: fleet_capacity() and guarantee_totals(), when the
    caller has them already)."""
    cap = fleet_capacity() if capacity is None else capacity
    guarantees = guarantee_totals() if guarantees is None else guarantees
    warnings = []
    for family, total in sorted(guarantees.items()):
        if total and total > cap.get(family, 0):
            warnings.append(f"{family} guarantees add up to {total} cores but the fleet has {cap.get(family, 0)} "
                            f"online; not every team can get its guarantee at once")
    return warnings


def team_audit(team: Team, limit: int = 100) -> list[AuditEntry]:
    return list(AuditEntry.objects.filter(team=team).select_related("actor").order_by("-at", "-id")[:limit])
