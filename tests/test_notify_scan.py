"""The minute scan on recorded data: idle cores flagged from MetricMinute roll-ups and
stopped by a team's policy after its grace period; budget thresholds fire once each
per month; the forecast run-out warns early; long waits notify once."""
from __future__ import annotations

from datetime import date, timedelta

import pytest
from django.utils import timezone

from jobs.lifecycle import watch as notify_scan
from jobs.models import (
    Delivery,
    EventKind,
    Host,
    Job,
    JobEvent,
    MetricMinute,
    Notification,
    Subscription,
    TeamAlertPolicy,
    TeamQuota,
    UsageTeamDay,
)

S = Job.Status


@pytest.fixture
def host(db):
    return Host.objects.create(name="h1", family="cpu", core_ids=list(range(8)), last_heartbeat=timezone.now())


def minute(now, ago: int):
    return now.replace(second=0, microsecond=0) - timedelta(minutes=ago)


def running(cast, host, *, cores=2, started_min_ago=60, kind="finetune") -> Job:
    now = timezone.now()
    return Job.objects.create(team=cast.vision, user=cast.bob, kind=kind, status=S.RUNNING, cores=cores,
                              host=host, core_start=0, attempts=1, started_at=now - timedelta(minutes=started_min_ago))


def record(job, host, now, minutes: range, util: float, cores=(0, 1)):
    MetricMinute.objects.bulk_create([MetricMinute(host=host, job=job, minute=minute(now, ago), core=c,
                                                   util_mean=util, util_peak=util, samples=60)
                                      for ago in minutes for c in cores])


def team_subscription(cast, events) -> Subscription:
    return Subscription.objects.create(team=cast.vision, user=cast.alice, scope="team", channel="webhook",
                                       target="http://127.0.0.1:9/hook", events=[str(e) for e in events])


def test_a_job_idle_for_the_policy_minutes_is_flagged_once_on_its_timeline_and_to_subscribers(cast, host):
    TeamAlertPolicy.objects.create(team=cast.vision, idle_minutes=20, idle_util_below=0.05)
    sub = team_subscription(cast, [EventKind.JOB_IDLE])
    job, now = running(cast, host), timezone.now()
    record(job, host, now, range(1, 25), util=1.5)
    assert notify_scan.scan_idle(now)["idle_flagged"] == 1
    assert JobEvent.objects.filter(job=job, kind="idle").count() == 1
    assert Delivery.objects.get(subscription=sub).notification.job_id == job.pk
    assert notify_scan.scan_idle(now)["idle_flagged"] == 0  # once per attempt
    assert JobEvent.objects.filter(job=job, kind="idle").count() == 1


def test_a_busy_minute_or_a_minute_without_data_is_not_idle(cast, host):
    TeamAlertPolicy.objects.create(team=cast.vision, idle_minutes=20)
    busy, gap, one_core = running(cast, host), running(cast, host), running(cast, host)
    now = timezone.now()
    record(busy, host, now, range(1, 21), util=1.0)
    MetricMinute.objects.filter(job=busy, minute=minute(now, 7), core=1).update(util_mean=40.0)
    record(gap, host, now, [*range(1, 5), *range(6, 21)], util=0.0)  # minute 5 has no roll-up
    record(one_core, host, now, range(1, 21), util=0.0, cores=(0,))  # the second core is not measured
    assert notify_scan.scan_idle(now)["idle_flagged"] == 0
    assert not JobEvent.objects.filter(kind="idle").exists()


def test_a_job_younger_than_the_idle_window_is_not_judged(cast, host):
    TeamAlertPolicy.objects.create(team=cast.vision, idle_minutes=30)
    job, now = running(cast, host, started_min_ago=10), timezone.now()
    record(job, host, now, range(1, 11), util=0.0)
    assert notify_scan.scan_idle(now)["idle_flagged"] == 0


def test_the_stop_policy_stops_a_job_still_idle_after_the_grace_period_with_a_timeline_event(cast, host):
    TeamAlertPolicy.objects.create(team=cast.vision, idle_minutes=10, idle_action="stop", idle_grace_minutes=15)
    sub = team_subscription(cast, [EventKind.JOB_IDLE_STOPPED])
    job, now = running(cast, host, kind="inference"), timezone.now()
    record(job, host, now, range(1, 40), util=0.0)
    assert notify_scan.scan_idle(now)["idle_flagged"] == 1
    assert notify_scan.scan_idle(now)["idle_stopped"] == 0  # within the grace period
    later = now + timedelta(minutes=16)
    record(job, host, later, range(1, 17), util=0.0)
    assert notify_scan.scan_idle(later)["idle_stopped"] == 1
    job.refresh_from_db()
    assert job.cancel_requested
    assert "idle policy" in JobEvent.objects.get(job=job, kind="idle_stopped").message
    assert Delivery.objects.filter(subscription=sub).count() == 1
    assert notify_scan.scan_idle(later)["idle_stopped"] == 0


def test_the_stop_policy_suspends_an_idle_fine_tune_so_it_resumes_from_its_checkpoint(cast, host):
    from jobs.models import CoreAllocation

    TeamAlertPolicy.objects.create(team=cast.vision, idle_minutes=10, idle_action="stop", idle_grace_minutes=15)
    sub = team_subscription(cast, [EventKind.JOB_IDLE, EventKind.JOB_IDLE_STOPPED])
    job, now = running(cast, host), timezone.now()
    CoreAllocation.objects.create(host=host, core=0, job=job, team=cast.vision, family="cpu")
    record(job, host, now, range(1, 40), util=0.0)
    assert notify_scan.scan_idle(now)["idle_flagged"] == 1
    assert "suspends idle fine-tunes" in JobEvent.objects.get(job=job, kind="idle").message
    later = now + timedelta(minutes=16)
    record(job, host, later, range(1, 17), util=0.0)
    assert notify_scan.scan_idle(later)["idle_stopped"] == 1
    job.refresh_from_db()
    assert job.status == S.SUSPENDED and not job.cancel_requested and job.reason_code == "suspended"
    assert not CoreAllocation.objects.filter(job=job).exists()  # its cores are free at once
    assert "checkpoint is kept" in JobEvent.objects.get(job=job, kind="idle_stopped").message
    stopped = Notification.objects.get(kind=EventKind.JOB_IDLE_STOPPED)
    assert "suspended" in stopped.title and stopped.payload["action"] == "suspended"
    assert Delivery.objects.filter(subscription=sub).count() == 2
    assert notify_scan.scan_idle(later)["idle_stopped"] == 0


def test_an_idle_endpoint_replica_is_flagged_but_never_stopped(cast, host):
    TeamAlertPolicy.objects.create(team=cast.vision, idle_minutes=10, idle_action="stop", idle_grace_minutes=0)
    replica, now = running(cast, host, kind="serve"), timezone.now()
    record(replica, host, now, range(1, 40), util=0.0)
    assert notify_scan.scan_idle(now)["idle_flagged"] == 1
    assert notify_scan.scan_idle(now + timedelta(minutes=5))["idle_stopped"] == 0
    replica.refresh_from_db()
    assert replica.status == S.RUNNING and not replica.cancel_requested


def test_the_notify_policy_never_stops(cast, host):
    TeamAlertPolicy.objects.create(team=cast.vision, idle_minutes=10, idle_grace_minutes=0)
    job, now = running(cast, host), timezone.now()
    record(job, host, now, range(1, 40), util=0.0)
    notify_scan.scan_idle(now)
    assert notify_scan.scan_idle(now + timedelta(minutes=5))["idle_stopped"] == 0
    job.refresh_from_db()
    assert not job.cancel_requested


def _use(team, hours: float, now):
    UsageTeamDay.objects.update_or_create(team=team, day=now.date(), defaults={"core_seconds": hours * 3600})


def test_budget_thresholds_fire_once_each_per_month(cast):
    TeamQuota.objects.filter(team=cast.vision).update(monthly_core_hours=10)
    TeamQuota.objects.filter(team=cast.audio).update(monthly_core_hours=0)  # no budget: never judged
    sub = team_subscription(cast, [EventKind.BUDGET_THRESHOLD])
    now = timezone.now()

    def fired():
        return sorted(Notification.objects.filter(kind=EventKind.BUDGET_THRESHOLD, team=cast.vision)
                      .values_list("payload__threshold", flat=True))

    _use(cast.vision, 4, now)
    notify_scan.scan_budgets(now)
    assert fired() == []
    _use(cast.vision, 5.5, now)
    notify_scan.scan_budgets(now)
    notify_scan.scan_budgets(now)
    assert fired() == [50]
    _use(cast.vision, 10.5, now)
    notify_scan.scan_budgets(now)
    notify_scan.scan_budgets(now)
    assert fired() == [50, 80, 100]
    assert Delivery.objects.filter(subscription=sub).count() == 3


def test_a_teams_own_thresholds_replace_the_sites(cast):
    TeamQuota.objects.filter(team=cast.vision).update(monthly_core_hours=10)
    TeamAlertPolicy.objects.create(team=cast.vision, budget_thresholds=[25, 90])
    now = timezone.now()
    _use(cast.vision, 9.5, now)
    notify_scan.scan_budgets(now)
    assert sorted(Notification.objects.filter(kind=EventKind.BUDGET_THRESHOLD)
                  .values_list("payload__threshold", flat=True)) == [25, 90]


def test_the_forecast_run_out_day_is_linear_in_the_months_burn():
    # 10 of 30 hours in the first 5 days: 2 h/day, 20 h to go: runs out on day 16
    assert notify_scan.forecast_run_out(10, 30, date(2025, 4, 6), 0.0) == date(2025, 4, 16)
    assert notify_scan.forecast_run_out(1, 30, date(2025, 4, 6), 0.0) is None  # not this month
    assert notify_scan.forecast_run_out(30, 30, date(2025, 4, 6), 0.0) is None  # already out
    assert notify_scan.forecast_run_out(0, 30, date(2025, 4, 6), 0.0) is None
    assert notify_scan.forecast_run_out(20, 29, date(2025, 4, 21), 0.0) == date(2025, 4, 30)  # the last day
    assert notify_scan.forecast_run_out(20, 30, date(2025, 4, 21), 0.0) is None  # May 1
    # a sliver of use against a large budget: its day is past the last date Python holds
    assert notify_scan.forecast_run_out(0.0005, 1000, date(2025, 4, 6), 0.01) is None


def test_a_sliver_of_use_against_a_large_budget_forecasts_nothing(cast):
    # the first minute of `make run` after a one-second demo job: the scan raised on it
    TeamQuota.objects.filter(team=cast.vision).update(monthly_core_hours=1000)
    now = timezone.now()
    _use(cast.vision, 0.0005, now)
    notify_scan.scan_budgets(now)
    assert not Notification.objects.filter(kind=EventKind.BUDGET_FORECAST, team=cast.vision).exists()


def test_the_forecast_warns_once_a_month_before_the_budget_runs_out(cast):
    TeamQuota.objects.filter(team=cast.vision).update(monthly_core_hours=1000)
    now = timezone.now()
    if now.day < 2 or now.day > 27:
        pytest.skip("the linear forecast needs a day behind and a few ahead")
    _use(cast.vision, 1000 * (now.day - 1) / 30 * 0.9 + 5 * (now.day - 1) + 100, now)
    notify_scan.scan_budgets(now)
    notify_scan.scan_budgets(now)
    notes = Notification.objects.filter(kind=EventKind.BUDGET_FORECAST, team=cast.vision)
    assert notes.count() <= 1  # fires at most once a month
    if notes:
        assert date.fromisoformat(notes.get().payload["run_out_day"]).month == now.month


def test_a_job_waiting_past_the_threshold_notifies_once(cast, settings):
    settings.NOTIFY_WAIT_THRESHOLD_S = 600
    sub = team_subscription(cast, [EventKind.JOB_WAITING])
    now = timezone.now()
    old = Job.objects.create(team=cast.vision, user=cast.bob, kind="inference", created_at=now - timedelta(hours=1))
    Job.objects.create(team=cast.vision, user=cast.bob, kind="inference", created_at=now - timedelta(minutes=2))
    assert notify_scan.scan_waiting(now) == 1
    assert notify_scan.scan_waiting(now) == 0
    assert Delivery.objects.get(subscription=sub).notification.job_id == old.pk


def test_a_capped_users_thresholds_fire_once_each_to_them_and_the_team(cast):
    from jobs.models import JobAttempt, UserBudget

    UserBudget.objects.create(team=cast.vision, user=cast.bob, monthly_core_hours=2)
    bobs = Subscription.objects.create(team=cast.vision, user=cast.bob, scope="self", channel="email",
                                       target="bob@example.com", events=[EventKind.BUDGET_THRESHOLD])
    alices = Subscription.objects.create(team=cast.vision, user=cast.alice, scope="self", channel="email",
                                         target="alice@example.com", events=[EventKind.BUDGET_THRESHOLD])
    team = team_subscription(cast, [EventKind.BUDGET_THRESHOLD])
    now = timezone.now()
    job = Job.objects.create(team=cast.vision, user=cast.bob, kind="inference", status=S.SUCCEEDED, cores=1)
    start = now - timedelta(minutes=80)
    JobAttempt.objects.create(job=job, team=cast.vision, user=cast.bob, kind="inference", family="cpu", number=1,
                              cores=1, started_at=start, ended_at=start + timedelta(minutes=72), core_seconds=72 * 60)
    assert notify_scan.scan_user_budgets(now) == 1  # 1.2 of 2 h: 50 %, not yet 80 %
    note = Notification.objects.get(kind=EventKind.BUDGET_THRESHOLD)
    assert note.user_id == cast.bob.pk and note.payload["threshold"] == 50 and "bob used 50%" in note.title
    assert set(Delivery.objects.values_list("subscription_id", flat=True)) == {bobs.pk, team.pk}
    assert notify_scan.scan_user_budgets(now) == 0
    assert alices.pk not in set(Delivery.objects.values_list("subscription_id", flat=True))


def test_a_self_subscription_hears_the_teams_own_facts(cast):
    from jobs.notify.events import quota_changed

    bobs = Subscription.objects.create(team=cast.vision, user=cast.bob, scope="self", channel="email",
                                       target="bob@example.com", events=[EventKind.QUOTA_CHANGED])
    quota_changed(cast.vision, [("quota.max_pending", "10", "20")], actor=cast.admin)
    assert Delivery.objects.get().subscription_id == bobs.pk
