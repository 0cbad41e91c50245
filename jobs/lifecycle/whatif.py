"""What-if before submitting (POST /api/v1/jobs?dry_run=true, the forms' Check
button): would the job start now, where, or why would it wait; its estimated start;
its cost against the team's budget. Creating nothing: the dispatcher's own run
(jobs.lifecycle.scheduler.Dispatcher, in its dry mode: no preemption written, no
placement committed) over the current fleet and queue with the job added, and the
start-time replay of jobs.lifecycle.forecasts with it."""
from __future__ import annotations

from django.utils import timezone

from jobs.lifecycle.forecasts import estimate_of
from jobs.lifecycle.runtimes import team_ratios
from jobs.lifecycle.scheduler import DispatchRun, PendingRow, RunInputs, pending_order
from jobs.models import Host, Team, TeamQuota
from jobs.quotas.placement import core_range
from jobs.quotas.policy import REASON_HINTS
from jobs.quotas.selectors import core_hours_for_budget

DRY_RUN_ID = -1  # the would-be job's id in the run (no real job has it)


def placement_answer(*, team: Team, kind: str, family: str, cores: int, runtime_s: int, host_count: int = 1,
                     same_network: bool = False) -> dict:
    """The "would it run" part of a dry run (see the module docstring)."""
    row = PendingRow(DRY_RUN_ID, team.pk, team.slug, kind, family, cores, timezone.now(), "submitted", "", runtime_s,
                     host_count, same_network)
    hosts = list(Host.objects.exclude(state=Host.State.OFFLINE).exclude(replay=True)
                 .only("id", "name", "family", "core_ids", "state", "instance_type", "network").order_by("pk"))
    inputs = RunInputs.read()
    inputs.pending = [*inputs.pending, row]
    run = DispatchRun(hosts, inputs, dry=True)
    result = run.decide()
    run.write()
    order = pending_order(inputs.pending, inputs.shares, inputs.priorities)
    position = next(i for i, r in enumerate((r for r in order if r.family == family), 1) if r.pk == DRY_RUN_ID)
    start = next((r for r in result.started if r.job_id == DRY_RUN_ID), None)
    answer: dict = {"queue_position": position}
    if start is not None:
        host = run.hosts[start.host_id]
        answer["would_run_now"] = {"host": host.name, "cores": core_range(start.cores[0], len(start.cores)),
                                   "borrowed": start.borrowed, "preempts": len(run.preempted)}
        if start.ranks:
            answer["would_run_now"]["hosts"] = [run.hosts[h].name for h, _ in start.members]
        answer["wait"] = None
        instance = host.instance_type
    else:
        code, sentence = run.reason(DRY_RUN_ID) or ("submitted", "waiting for the scheduler")
        answer["would_run_now"] = None
        answer["wait"] = {"reason_code": code, "reason": sentence, "hint": REASON_HINTS.get(code, "")}
        instance = next((h.instance_type for h in hosts if h.family == family and h.instance_type), "")
    estimate = estimate_of(row)
    answer["estimate"] = estimate.as_dict() if estimate else None
    answer["cost"] = _cost(team, cores, runtime_s, instance)
    return answer


def _cost(team: Team, cores: int, runtime_s: int, instance_type: str) -> dict:
    """NeuronCore-hours (expected from the team's history, and at most: the time
    limit) against what is left of the month's budget, and in dollars where the
    instance type has a price."""
    from jobs.usage.rollup import prices

    (_, ratio, _), n = team_ratios({team.pk})[team.pk]
    budget = TeamQuota.objects.values_list("monthly_core_hours", flat=True).get(team=team)
    used = core_hours_for_budget({team.pk: budget})[team.pk]
    expected, most = cores * runtime_s * ratio / 3600, cores * runtime_s / 3600
    price = prices().get(instance_type)
    left = max(budget - used, 0.0)
    return {
        "core_hours_expected": round(expected, 3), "core_hours_at_most": round(most, 3),
        "budget_core_hours": budget, "budget_used_core_hours": round(used, 3),
        "budget_left_core_hours": round(left, 3),
        "budget_share_expected": round(expected / budget, 4) if budget else None,
        "fits_budget": most <= left,
        "usd_expected": round(expected * price.usd_per_core_hour, 2) if price else None,
        "usd_at_most": round(most * price.usd_per_core_hour, 2) if price else None,
        "instance_type": instance_type or None,
        "basis": (f"{cores} core{'s' if cores != 1 else ''} × the time limit {runtime_s} s" + (f" × {ratio:.0%}, the team's median "
                  f"actual/requested runtime over its last {n} finished jobs" if n else "")),
    }
