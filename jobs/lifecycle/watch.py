"""The once-a-minute scan (beat: jobs.notify_scan): jobs waiting too long, running jobs
whose cores sit idle (and the team's stop policy: fine-tunes are suspended with their
checkpoint, other jobs stopped, endpoint replicas only flagged), budget thresholds and the
forecast run-out. Each fact fires once: its Notification carries a dedup key
(jobs.notify.events.emit), so a repeated or concurrent scan adds nothing."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Max
from django.utils import timezone

from jobs.lifecycle import states
from jobs.models import (
    EventKind,
    Job,
    Kind,
    MetricMinute,
    Notification,
    Subscription,
    Team,
    TeamAlertPolicy,
    TeamQuota,
    UserBudget,
)
from jobs.notify.events import emit
from jobs.wake import kick_dispatch

S = Job.Status


def scan(now: datetime | None = None) -> dict:
    now = now or timezone.now()
    return {"waiting": scan_waiting(now), **scan_idle(now), "budget": scan_budgets(now),
            "user_budget": scan_user_budgets(now)}


def _teams_wanting(kind: str) -> set[int]:
    return {team_id for team_id, events in Subscription.objects.filter(active=True).values_list("team_id", "events")
            if kind in events}


def scan_waiting(now: datetime) -> int:
    """job.waiting for each pending job older than NOTIFY_WAIT_THRESHOLD_S, once per wait."""
    teams = _teams_wanting(EventKind.JOB_WAITING)
    if not teams:
        return 0
    cutoff = now - timedelta(seconds=settings.NOTIFY_WAIT_THRESHOLD_S)
    fired = 0
    for job in Job.objects.filter(status=S.PENDING, team_id__in=teams, created_at__lte=cutoff).only(
            "pk", "team_id", "user_id", "kind", "attempts", "created_at", "reason"):
        minutes = int((now - job.created_at).total_seconds() // 60)
        with transaction.atomic():
            fired += emit(EventKind.JOB_WAITING, team_id=job.team_id, job_id=job.pk, user_id=job.user_id,
                          title=f"{job.kind} job {job.pk} has waited {minutes} minutes",
                          message=job.reason, dedup_key=f"waiting:{job.pk}:{job.attempts}") is not None
    return fired


# --- idle cores -------------------------------------------------------------------------

@dataclass
class Policy:
    util_below: float  # fraction of a core
    minutes: int
    action: str
    grace_minutes: int


def policy_of(team_id: int, policies: dict[int, TeamAlertPolicy]) -> Policy:
    p = policies.get(team_id) or TeamAlertPolicy()
    return Policy(p.idle_util_below, max(p.idle_minutes, 1), p.idle_action, p.idle_grace_minutes)


def idle_for(job_id: int, cores: int, minutes: int, util_below: float, now: datetime) -> bool:
    """True if each of the last `minutes` whole minutes has a roll-up row for every
    core the job holds and none of them reached `util_below` (a fraction of a core).
    A minute without measurements is not idle: no data is not evidence."""
    end = now.replace(second=0, microsecond=0)
    start = end - timedelta(minutes=minutes)
    per_minute = (MetricMinute.objects.filter(job_id=job_id, minute__gte=start, minute__lt=end, core__gte=0)
                  .values("minute").annotate(n=Count("core", distinct=True), peak=Max("util_mean")))
    rows = list(per_minute)
    return (len(rows) == minutes and all(r["n"] >= cores for r in rows)
            and all(r["peak"] < util_below * 100.0 for r in rows))


def scan_idle(now: datetime) -> dict:
    """Flag running jobs whose cores stayed under the team's threshold for its idle
    minutes (a timeline event on the job page and job.idle), and with the team's
    "stop" policy, stop one still idle a grace period after its flag (cancel
    requested: the worker ends it; timeline event idle_stopped)."""
    policies = {p.team_id: p for p in TeamAlertPolicy.objects.all()}
    flagged = stopped = 0
    for job in Job.objects.filter(status=S.RUNNING).only("pk", "team_id", "user_id", "kind", "cores", "attempts",
                                                         "started_at", "team__slug").select_related("team"):
        policy = policy_of(job.team_id, policies)
        if job.started_at is None or job.started_at > now - timedelta(minutes=policy.minutes):
            continue
        key = f"idle:{job.pk}:{job.attempts}"
        flag = Notification.objects.filter(dedup_key=key).values_list("created_at", flat=True).first()
        if flag is None:
            if idle_for(job.pk, job.cores, policy.minutes, policy.util_below, now):
                flagged += _flag_idle(job, policy, key)
        elif (policy.action == TeamAlertPolicy.IdleAction.STOP and job.kind != Kind.SERVE
              and flag <= now - timedelta(minutes=policy.grace_minutes)
              and idle_for(job.pk, job.cores, max(policy.grace_minutes, 1), policy.util_below, now)):
            stopped += _stop_idle(job, policy)
    return {"idle_flagged": flagged, "idle_stopped": stopped}


def _flag_idle(job: Job, policy: Policy, key: str) -> int:
    sentence = (f"its {job.cores} core(s) stayed under {policy.util_below:.0%} utilization for "
                f"{policy.minutes} minutes")
    if policy.action == TeamAlertPolicy.IdleAction.STOP and job.kind == Kind.FINETUNE:
        sentence += (f"; team {job.team.slug} suspends idle fine-tunes (checkpointed, resumable) after "
                     f"{policy.grace_minutes} more minutes")
    elif policy.action == TeamAlertPolicy.IdleAction.STOP and job.kind != Kind.SERVE:
        sentence += f"; team {job.team.slug} stops idle jobs after {policy.grace_minutes} more minutes"
    with transaction.atomic():
        note = emit(EventKind.JOB_IDLE, team_id=job.team_id, job_id=job.pk, user_id=job.user_id,
                    title=f"{job.kind} job {job.pk} holds idle cores", message=sentence, dedup_key=key)
        if note is None:
            return 0
        states.event(job.pk, "idle", f"idle cores: {sentence}", minutes=policy.minutes, util_below=policy.util_below)
    return 1


def _stop_idle(job: Job, policy: Policy) -> int:
    """The team's stop policy, a grace period after the flag: a fine-tune is
    suspended (states.suspend, as its Suspend button does: it saves a checkpoint in
    its kill grace and resumes from it), any other job is cancelled. Endpoint
    replicas are never stopped here (scan_idle): their endpoint's scaling owns them."""
    if job.kind == Kind.FINETUNE:
        return _suspend_idle(job, policy)
    with transaction.atomic():
        if not Job.objects.filter(pk=job.pk, status=S.RUNNING, cancel_requested=False).update(cancel_requested=True):
            return 0
        sentence = (f"stopped by team {job.team.slug}'s idle policy: still idle {policy.grace_minutes} minutes "
                    "after it was flagged")
        states.event(job.pk, "idle_stopped", sentence)
        emit(EventKind.JOB_IDLE_STOPPED, team_id=job.team_id, job_id=job.pk, user_id=job.user_id,
             title=f"{job.kind} job {job.pk} was stopped for idle cores", message=sentence,
             dedup_key=f"idle_stop:{job.pk}:{job.attempts}")
    return 1


def _suspend_idle(job: Job, policy: Policy) -> int:
    sentence = (f"suspended by team {job.team.slug}'s idle policy: still idle {policy.grace_minutes} minutes "
                "after it was flagged; its checkpoint is kept: Resume puts it back in the queue")
    with transaction.atomic():
        if not states.suspend(job.pk, message=sentence):
            return 0
        states.event(job.pk, "idle_stopped", sentence)
        emit(EventKind.JOB_IDLE_STOPPED, team_id=job.team_id, job_id=job.pk, user_id=job.user_id,
             title=f"{job.kind} job {job.pk} was suspended for idle cores", message=sentence,
             dedup_key=f"idle_stop:{job.pk}:{job.attempts}", action="suspended")
        transaction.on_commit(kick_dispatch)  # its cores are free for the queue
    return 1


# --- budgets ------------------------------------------------------------------------------

def scan_budgets(now: datetime) -> int:
    """budget.threshold once per team, month and threshold crossed; budget.forecast
    once per month when the month-to-date rate runs the budget out before the month
    ends (the day it would)."""
    from jobs.quotas.selectors import core_hours_by_team
    from jobs.usage import accounting

    budgets = dict(TeamQuota.objects.filter(monthly_core_hours__gt=0).values_list("team_id", "monthly_core_hours"))
    if not budgets:
        return 0
    used = core_hours_by_team(list(budgets), now=now)
    thresholds = {p.team_id: p.budget_thresholds for p in TeamAlertPolicy.objects.exclude(budget_thresholds=[])}
    teams = dict(Team.objects.filter(pk__in=list(budgets)).values_list("pk", "time_zone"))
    slugs = dict(Team.objects.filter(pk__in=list(budgets)).values_list("pk", "slug"))
    fired = 0
    for team_id, budget in budgets.items():
        hours = used.get(team_id, 0.0)
        tz = accounting.zone(teams.get(team_id))
        today = accounting.local_day(now, tz)
        month = today.strftime("%Y-%m")
        percent = 100.0 * hours / budget
        for threshold in sorted(thresholds.get(team_id) or settings.BUDGET_THRESHOLDS):
            if percent >= threshold:
                with transaction.atomic():
                    fired += emit(EventKind.BUDGET_THRESHOLD, team_id=team_id,
                                  title=f"team {slugs[team_id]} used {threshold}% of its monthly budget",
                                  message=f"{hours:.1f} of {budget:g} NeuronCore-hours in {month}",
                                  threshold=threshold, used_core_hours=round(hours, 3), budget=budget,
                                  dedup_key=f"budget:{team_id}:{month}:{threshold}") is not None
        run_out = forecast_run_out(hours, budget, today, accounting.day_fraction(now, tz))
        if run_out is not None and percent < 100:
            with transaction.atomic():
                fired += emit(EventKind.BUDGET_FORECAST, team_id=team_id,
                              title=f"team {slugs[team_id]} is forecast to run out of budget on {run_out}",
                              message=f"{hours:.1f} of {budget:g} NeuronCore-hours used so far in {month}",
                              run_out_day=run_out.isoformat(), used_core_hours=round(hours, 3), budget=budget,
                              dedup_key=f"forecast:{team_id}:{month}") is not None
    return fired


def scan_user_budgets(now: datetime) -> int:
    """budget.threshold once per capped user (UserBudget), month and threshold of the
    team's thresholds crossed, about that user: their own self-scoped subscriptions
    and the team-scoped ones hear it. "Used" is the cap's measure at submit
    (jobs.quotas.selectors.user_cap)."""
    from jobs.quotas.selectors import user_cap
    from jobs.usage import accounting

    thresholds = {p.team_id: p.budget_thresholds for p in TeamAlertPolicy.objects.exclude(budget_thresholds=[])}
    fired = 0
    for ub in UserBudget.objects.filter(monthly_core_hours__gt=0).select_related("team", "user"):
        cap = user_cap(ub.team, ub.user, now=now)
        month = accounting.local_day(now, accounting.zone(ub.team.time_zone)).strftime("%Y-%m")
        percent = 100.0 * cap.used / cap.monthly_core_hours
        for threshold in sorted(thresholds.get(ub.team_id) or settings.BUDGET_THRESHOLDS):
            if percent >= threshold:
                with transaction.atomic():
                    fired += emit(EventKind.BUDGET_THRESHOLD, team_id=ub.team_id, user_id=ub.user_id,
                                  title=f"{ub.user.username} used {threshold}% of their monthly cap in team "
                                        f"{ub.team.slug}",
                                  message=f"{cap.used:.1f} of {cap.monthly_core_hours:g} NeuronCore-hours in {month}; "
                                          "at the cap new jobs are refused",
                                  threshold=threshold, used_core_hours=round(cap.used, 3),
                                  budget=cap.monthly_core_hours, user=ub.user.username,
                                  dedup_key=f"user_budget:{ub.team_id}:{ub.user_id}:{month}:{threshold}") is not None
    return fired


def forecast_run_out(hours: float, budget: float, today, fraction_of_today: float):
    """The day this month's linear burn (month to date) reaches `budget`, if before
    the month ends; else None."""
    from datetime import date

    elapsed_days = (today.day - 1) + fraction_of_today
    if hours <= 0 or elapsed_days <= 0 or hours >= budget:
        return None
    rate = hours / elapsed_days
    days_to_go = (budget - hours) / rate
    next_month = date(today.year + (today.month == 12), today.month % 12 + 1, 1)
    # Compared before a date is made: a sliver of use against a large budget runs out
    # millions of years on, past the last date Python can hold.
    if days_to_go + fraction_of_today >= (next_month - today).days:
        return None
    return today + timedelta(days=int(days_to_go + fraction_of_today))
