"""Reads for quotas, team usage and the scheduler's queue order: the team page, the
admin quota page, the team API and the dispatcher share them. No writes here.

Every function that lists teams runs a fixed number of queries whatever the number
of teams (the quota page is loaded with hundreds of them)."""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone

from django.conf import settings
from django.db.models import Count, Sum
from django.db.models.functions import TruncHour
from django.utils import timezone

from jobs.models import (
    AuditEntry,
    CoreAllocation,
    Family,
    FamilyQuota,
    Host,
    Job,
    JobAttempt,
    KindPriority,
    Team,
    TeamQuota,
    UsageRollupState,
    UsageTeamDay,
)
from jobs.quotas.fairshare import decayed_usage

USAGE_HORIZON_HALF_LIVES = 8  # usage older than 8 half-lives weighs < 0.4 %: not worth reading


# --- scheduling inputs -------------------------------------------------------------

def kind_priorities() -> dict[str, int]:
    """Priority per job kind: the admin's KindPriority rows over the defaults
    (inference > compile > fine-tune)."""
    from jobs.lifecycle.services import DEFAULT_KIND_PRIORITY

    prio = {str(k): v for k, v in DEFAULT_KIND_PRIORITY.items()}
    prio.update(dict(KindPriority.objects.values_list("kind", "priority")))
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


def clear_usage_cache() -> None:
    global _usage_cache
    with _usage_lock:
        _usage_cache = None


def _compute_decayed_usage(now: datetime) -> dict[int, float]:
    half = half_life_s()
    horizon = now - timedelta(seconds=half * USAGE_HORIZON_HALF_LIVES)
    closed = (JobAttempt.objects.filter(ended_at__gte=horizon).annotate(hour=TruncHour("ended_at"))
              .values_list("team_id", "hour").annotate(s=Sum("core_seconds")))
    buckets = [(team_id, min(hour + timedelta(minutes=30), now), s) for team_id, hour, s in closed]
    for team_id, cores, started in JobAttempt.objects.filter(ended_at__isnull=True).values_list(
            "team_id", "cores", "started_at"):
        buckets.append((team_id, now, cores * max((now - started).total_seconds(), 0.0)))
    return decayed_usage(buckets, now, half)


# --- usage against limits ----------------------------------------------------------

def month_start(now: datetime | None = None) -> datetime:
    now = timezone.localtime(now or timezone.now())
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def core_hours_by_team(team_ids: list[int] | None = None, *, now: datetime | None = None) -> dict[int, float]:
    """NeuronCore-hours used this month per team: the budget's measure, shared by
    submit (jobs.services.core_hours_this_month), dispatch and the quota pages.

    "This month" is the team's local calendar month, and usage is counted by the
    day it happened (an attempt across midnight is split) — the same numbers as the
    team's usage page and its burn-down. Read from the UsageTeamDay roll-up plus
    what the fold has not reached yet (open attempts and the last few minutes, via
    jobs.usage_rollup.unfolded_attempts): three queries, whatever the history."""
    from jobs.usage import accounting
    from jobs.usage.rollup import LAG, _attempt_row, unfolded_attempts

    now = now or timezone.now()
    starts: dict[str, date] = {}

    def month_of(tz_name: str) -> date:
        if tz_name not in starts:
            starts[tz_name] = accounting.local_day(now, accounting.zone(tz_name)).replace(day=1)
        return starts[tz_name]

    # Every zone's local date is within a day of UTC's: a bound that holds for all teams.
    earliest = (now.astimezone(dt_timezone.utc).date() - timedelta(days=1)).replace(day=1)
    used: dict[int, float] = defaultdict(float)
    for team_id, tz_name, day, s in _filtered(UsageTeamDay.objects.filter(day__gte=earliest), team_ids).values_list(
            "team_id", "team__time_zone", "day", "core_seconds"):
        if day >= month_of(tz_name):
            used[team_id] += s or 0.0
    state = UsageRollupState.objects.filter(pk=1).values("cutoff").first()
    since = state["cutoff"] - LAG if state and state["cutoff"] else None
    rows = [_attempt_row(v) for v in _filtered(unfolded_attempts(since=since, before=now), team_ids)]
    zones = {row.dims.team_id: row.time_zone for row in rows}
    for piece in accounting.plan_attempts(rows, now).pieces:
        if piece.day >= month_of(zones[piece.dims.team_id]):
            used[piece.dims.team_id] += piece.core_seconds
    return {team_id: s / 3600.0 for team_id, s in used.items()}


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


def _filtered(qs, team_ids):
    return qs if team_ids is None else qs.filter(team_id__in=team_ids)


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
