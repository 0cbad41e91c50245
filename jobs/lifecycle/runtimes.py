"""The teams' runtime history: how long their jobs really ran against the time
limits they asked for (jobs.quotas.backfill.runtime_ratio over each team's last
HISTORY_JOBS finished jobs). Start-time estimates (forecasts) and the dispatcher's
gang reservations (scheduler.gang_ratios) both read it; only finished jobs are read."""
from __future__ import annotations

from django.core.cache import cache
from django.db.models import DurationField, ExpressionWrapper, F, OuterRef, Q, Subquery

from jobs.models import Job, Team
from jobs.quotas.backfill import runtime_ratio

HISTORY_JOBS = 200  # a team's last finished jobs that set its runtime ratio


def team_ratios(team_ids: set[int]) -> dict[int, tuple[tuple[float, float, float], int]]:
    """Per team: (low, median, high) actual / requested runtime and how many jobs
    it comes from (jobs.quotas.backfill.runtime_ratio) over its last HISTORY_JOBS
    finished jobs. Two queries however many teams: when each team's history starts
    (its HISTORY_JOBS-th newest finish), then the runtimes of the jobs since."""
    finished = Job.objects.filter(status=Job.Status.SUCCEEDED, started_at__isnull=False, finished_at__isnull=False,
                                  cache_hit=False)
    nth_newest = (finished.filter(team_id=OuterRef("pk")).order_by("-finished_at")
                  .values("finished_at")[HISTORY_JOBS - 1:HISTORY_JOBS])
    since = dict(Team.objects.filter(pk__in=team_ids).annotate(since=Subquery(nth_newest)).values_list("pk", "since"))
    histories: dict[int, list[tuple[float, int | None]]] = {team_id: [] for team_id in team_ids}
    if since:
        recent = Q()
        for team_id, first in since.items():
            recent |= Q(team_id=team_id, finished_at__gte=first) if first else Q(team_id=team_id)
        runtime = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
        rows = (finished.filter(recent).order_by("team_id", "-finished_at")
                .values_list("team_id", runtime, "max_runtime_s"))
        for team_id, ran, limit in rows:
            if len(histories[team_id]) < HISTORY_JOBS:  # jobs that finished at the same moment as the first
                histories[team_id].append((ran.total_seconds(), limit))
    return {team_id: (runtime_ratio(history), len(history)) for team_id, history in histories.items()}


RATIO_CACHE_S = 600  # the dispatcher's per-team runtime ratios are read again after this (they move slowly)


def median_ratios(team_ids: set[int]) -> dict[int, float]:
    """Per team: its median actual / requested runtime (team_ratios; 1 without
    history: its time limits), kept in Django's cache for RATIO_CACHE_S: what the
    dispatcher expects a running job to end by when it chooses a gang's hosts."""
    keys = {f"runtime-ratio:{team_id}": team_id for team_id in team_ids}
    out = {keys[key]: value for key, value in cache.get_many(list(keys)).items()}
    missing = set(team_ids) - set(out)
    if missing:
        fresh = {team_id: mid for team_id, ((_, mid, _), _) in team_ratios(missing).items()}
        cache.set_many({f"runtime-ratio:{team_id}": mid for team_id, mid in fresh.items()}, RATIO_CACHE_S)
        out.update(fresh)
    return out
