"""Usage dashboards: the numbers on the team and site pages, their CSV and the API
against hand-computed expectations on a small fixed history; range validation;
scoping; and the roll-up's incremental, exactly-once folding.

The history (team vision in Asia/Kolkata, UTC+5:30; "now" is 2025-03-12 12:00 UTC,
17:30 local; prices: trn1.32xlarge set by an admin to $16/h for 32 cores =
$0.50/core-h, inf2.48xlarge to $24/h for 24 cores = $1/core-h, inf2.xlarge keeps
its on-demand default $0.7582/h for 2 cores = $0.3791/core-h):

J1 bob finetune trn1 ×4: submitted 18:00Z 10 Mar, held cores 18:10Z–20:10Z
   (23:40 10 Mar – 01:40 11 Mar local): 1⅓ core-h on the 10th, 6⅔ on the 11th,
   $4. Measured 100 % before local midnight, 40 % after: used 1⅓ + 2⅔ = 4,
   idle 4 core-h ($2). Succeeded. Wait 600 s.
J2 alice inference inf2 ×2: attempt 1 on inf2.48xlarge 04:30Z–05:30Z 11 Mar,
   preempted (2 core-h, $2); attempt 2 on inf2.xlarge 06:00Z–07:00Z (2 core-h,
   $0.7582). Succeeded. Not measured. Wait 1800 s. One interrupted attempt.
J3 bob compile inf2.48xlarge ×1: running since 10:00Z 12 Mar: 2 core-h up to now
   ($2); measured 80 %: used 1.6, idle 0.4 ($0.40). Wait 3600 s.
J4 alice finetune trn1 ×8: 02:30Z–03:00Z 12 Mar then cancelled: 4 core-h ($2),
   not measured. Wait 1800 s.
J5 bob inference: cancelled while pending at 10:05Z 11 Mar (no cores).
J6 bob compile inf2.48xlarge ×1: 12:01Z–12:31Z 11 Mar, failed: 0.5 core-h
   ($0.50). Wait 60 s.
A1 charlie (team audio, UTC) compile inf2.48xlarge ×2: 08:00Z–09:00Z 11 Mar:
   2 core-h ($2), succeeded. Never in vision's numbers.

Vision, 10–12 Mar: allocated 18.5 core-h (1⅓ / 11⅙ / 6 per day), used 5.6,
idle 4.4 ($2.40), not measured 8.5, cost $11.2582; 2 succeeded, 1 failed,
2 cancelled; budget 40 core-h → runs out on 21 Mar at the recent burn rate.
"""
from __future__ import annotations

import csv
import io
from datetime import date, datetime, timedelta, timezone as dt_timezone
from unittest import mock

import pytest
from django.core.cache import cache
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.db import connection

from jobs.usage import selectors
from jobs.usage import accounting
from jobs.models import (Host, InstancePrice, Job, JobAttempt, JobUsage, MetricMinute, TeamQuota, UsageDaily,
                         UsageRollupState, UsageSiteDaily, UsageTeamDay)
from jobs.usage.rollup import FOLD_DELAY, fold, live_usage
from tests.conftest import api_client

UTC = dt_timezone.utc
NOW = datetime(2025, 3, 12, 12, 0, tzinfo=UTC)
D10, D11, D12 = date(2025, 3, 10), date(2025, 3, 11), date(2025, 3, 12)
RANGE = {"range": "custom", "from": "2025-03-10", "to": "2025-03-12"}
PRICE_TRN1, PRICE_INF2_48, PRICE_INF2_X = 0.5, 1.0, 0.7582 / 2


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2025, 3, day, hour, minute, tzinfo=UTC)


def _job(team, user, kind, family, cores, created, status, *, finished=None, started=None):
    return Job.objects.create(team=team, user=user, kind=kind, family=family, cores=cores, status=status,
                              created_at=created, started_at=started, finished_at=finished)


def _attempt(job, number, host, started, ended, outcome):
    return JobAttempt.objects.create(
        job=job, team=job.team, user=job.user, kind=job.kind, family=job.family, instance_type=host.instance_type,
        host=host, number=number, cores=job.cores, started_at=started, ended_at=ended, outcome=outcome,
        core_seconds=job.cores * (ended - started).total_seconds() if ended else 0)


def _minutes(job, host, start, end, util_for):
    """Per-core minute rows (plus the job-level core -1 row the metrics roll-up also
    writes, which usage must ignore) for every minute in [start, end)."""
    rows, minute = [], start
    while minute < end:
        util = util_for(minute)
        rows += [MetricMinute(host=host, job=job, minute=minute, core=c, util_mean=util, samples=60)
                 for c in range(job.cores)]
        rows.append(MetricMinute(host=host, job=job, minute=minute, core=-1, util_mean=3.0, samples=60))
        minute += timedelta(minutes=1)
    MetricMinute.objects.bulk_create(rows)


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    """The cast's five password hashes are most of a test's setup; these tests never
    check passwords (clients use force_login or API tokens)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def history(cast):
    cast.vision.time_zone = "Asia/Kolkata"
    cast.vision.save(update_fields=["time_zone"])
    TeamQuota.objects.filter(team=cast.vision).update(monthly_core_hours=40)
    InstancePrice.objects.create(instance_type="trn1.32xlarge", usd_per_hour=16.0, cores=32)
    InstancePrice.objects.create(instance_type="inf2.48xlarge", usd_per_hour=24.0, cores=24)
    trn = Host.objects.create(name="trn-a", instance_type="trn1.32xlarge", family="trn1", core_ids=list(range(32)))
    inf = Host.objects.create(name="inf-a", instance_type="inf2.48xlarge", family="inf2", core_ids=list(range(24)))
    small = Host.objects.create(name="inf-s", instance_type="inf2.xlarge", family="inf2", core_ids=[0, 1])
    v, a, b = cast.vision, cast.alice, cast.bob
    j1 = _job(v, b, "finetune", "trn1", 4, at(10, 18), "succeeded", finished=at(10, 20, 10))
    _attempt(j1, 1, trn, at(10, 18, 10), at(10, 20, 10), "succeeded")
    _minutes(j1, trn, at(10, 18, 10), at(10, 20, 10), lambda m: 100.0 if m < at(10, 18, 30) else 40.0)
    j2 = _job(v, a, "inference", "inf2", 2, at(11, 4), "succeeded", finished=at(11, 7))
    _attempt(j2, 1, inf, at(11, 4, 30), at(11, 5, 30), "preempted")
    _attempt(j2, 2, small, at(11, 6), at(11, 7), "succeeded")
    j3 = _job(v, b, "compile", "inf2", 1, at(12, 9), "running", started=at(12, 10))
    _attempt(j3, 1, inf, at(12, 10), None, "")
    _minutes(j3, inf, at(12, 10), NOW, lambda m: 80.0)
    j4 = _job(v, a, "finetune", "trn1", 8, at(12, 2), "cancelled", finished=at(12, 3))
    _attempt(j4, 1, trn, at(12, 2, 30), at(12, 3), "cancelled")
    j5 = _job(v, b, "inference", "inf2", 1, at(11, 10), "cancelled", finished=at(11, 10, 5))
    j6 = _job(v, b, "compile", "inf2", 1, at(11, 12), "failed", finished=at(11, 12, 31))
    _attempt(j6, 1, inf, at(11, 12, 1), at(11, 12, 31), "failed")
    a1 = _job(cast.audio, cast.charlie, "compile", "inf2", 2, at(11, 7, 30), "succeeded", finished=at(11, 9))
    _attempt(a1, 1, inf, at(11, 8), at(11, 9), "succeeded")
    cast.jobs = {"j1": j1, "j2": j2, "j3": j3, "j4": j4, "j5": j5, "j6": j6, "a1": a1}
    return cast


@pytest.fixture
def frozen():
    with mock.patch("django.utils.timezone.now", return_value=NOW):
        yield NOW


def _report(team, first=D10, last=D12):
    return selectors.team_report(team, "custom", first, last, now=NOW)


def _by_day(report):
    return {day: report.day(day) for day in report.days}


# --- pure functions -----------------------------------------------------------------

def test_an_interval_is_split_at_local_midnight_in_a_half_hour_time_zone():
    tz = accounting.zone("Asia/Kolkata")
    pieces = accounting.split_by_day(at(10, 18, 10), at(10, 20, 10), tz)
    assert [(d, s, e) for d, s, e in pieces] == [(D10, at(10, 18, 10), at(10, 18, 30)),
                                                 (D11, at(10, 18, 30), at(10, 20, 10))]


def test_a_dst_day_is_23_hours_long_and_nothing_is_lost():
    tz = accounting.zone("America/New_York")
    start, end = datetime(2025, 3, 8, 12, tzinfo=UTC), datetime(2025, 3, 10, 12, tzinfo=UTC)
    pieces = accounting.split_by_day(start, end, tz)
    hours = {d: (e - s).total_seconds() / 3600 for d, s, e in pieces}
    assert hours[date(2025, 3, 9)] == 23
    assert sum(hours.values()) == 48


def test_an_unknown_time_zone_falls_back_to_utc():
    assert str(accounting.zone("Mars/Olympus")) == "UTC"


def test_totals_mirror_the_roll_up_fields_and_add_every_one():
    from jobs.models import UsageTotals

    model_fields = [f.name for f in UsageTotals._meta.get_fields()]
    assert list(accounting.TOTAL_FIELDS) == model_fields
    one = accounting.Totals(**{f: 1 for f in accounting.NUMERIC_FIELDS}, wait_sketch={"3": 1})
    two = accounting.Totals(**{f: 2 for f in accounting.NUMERIC_FIELDS}, wait_sketch={"3": 2, "9": 1})
    one.add(two)
    assert all(getattr(one, f) == 3 for f in accounting.NUMERIC_FIELDS)
    assert one.wait_sketch == {"3": 3, "9": 1}


def test_the_wait_sketch_reads_quantiles_within_its_relative_error():
    sketch: dict[str, int] = {}
    samples = [3.0 * 1.37 ** i for i in range(40)]
    for s in samples:
        accounting.WaitSketch.add(sketch, s)
    ordered = sorted(samples)
    for q in (0.5, 0.95):
        exact = ordered[max(1, -(-int(q * 1000) * len(ordered) // 1000)) - 1]
        assert accounting.WaitSketch.quantile(sketch, q) == pytest.approx(exact, rel=0.025)
    assert accounting.WaitSketch.quantile({}, 0.5) is None
    assert accounting.WaitSketch.quantile(accounting.WaitSketch.add({}, 0.2), 0.5) == 0.0


def test_burn_down_forecasts_the_day_the_budget_runs_out():
    daily = {date(2025, 3, 5): 10.0, date(2025, 3, 12): 4.0}
    burn = accounting.burn_down(daily, today=date(2025, 3, 12), fraction_of_today=0.5, budget=50.0, window_days=7)
    assert burn.used == 14.0
    assert burn.rate_per_day == pytest.approx(14.0 / 7.5)
    # 36 h left at 1.8667 h/day = 19.29 days after now (day 12.5) -> day 31.79 -> 31 Mar
    assert burn.run_out_day == date(2025, 3, 31) and burn.status == "runs_out"
    assert burn.actual[:5] == [0.0, 0.0, 0.0, 0.0, 10.0] and burn.actual[12] is None
    assert burn.forecast[10] is None and burn.forecast[11] == pytest.approx(14.0 + 0.5 * 14.0 / 7.5)


def test_burn_down_reports_an_exhausted_budget_and_no_budget():
    daily = {date(2025, 3, 2): 30.0, date(2025, 3, 4): 30.0}
    burn = accounting.burn_down(daily, today=date(2025, 3, 6), fraction_of_today=0.1, budget=50.0)
    assert burn.status == "exhausted" and burn.run_out_day == date(2025, 3, 4)
    assert accounting.burn_down(daily, today=date(2025, 3, 6), fraction_of_today=0.1, budget=None).status == "no_budget"
    assert accounting.burn_down({}, today=date(2025, 3, 6), fraction_of_today=0.1, budget=5.0).status == "within_budget"


def test_burn_down_of_a_trickle_against_a_large_budget_names_no_day():
    # One second of one core this week against 1,000 h: the run-out day would be
    # ~19 million years away (past date.max; the usage page answered 500 for it).
    burn = accounting.burn_down({date(2026, 11, 27): 1 / 3600}, today=date(2026, 11, 27), fraction_of_today=0.4,
                           budget=1000.0)
    assert burn.status == "within_budget" and burn.run_out_day is None
    # Beyond the month but within the horizon, the day is still given.
    burn = accounting.burn_down({date(2026, 11, 27): 10.0}, today=date(2026, 11, 27), fraction_of_today=0.4,
                           budget=1000.0)
    assert burn.status == "within_budget" and burn.run_out_day is not None
    assert burn.run_out_day > date(2026, 11, 30)


@pytest.mark.parametrize("params, field, words", [
    ({"range": "12d"}, "range", "not a range"),
    ({"range": "custom"}, "from", "first day"),
    ({"from": "2025-13-01"}, "from", "not a date"),
    ({"from": "2025-03-01", "to": "yesterday"}, "to", "not a date"),
    ({"from": "2025-03-05", "to": "2025-03-01"}, "to", "on or after from"),
    ({"from": "2025-03-01", "to": "2025-03-13"}, "to", "after today"),
    ({"from": "2023-01-01", "to": "2025-03-01"}, "from", "at most 366"),
])
def test_a_bad_range_is_an_error_naming_the_field(params, field, words):
    with pytest.raises(accounting.RangeError) as caught:
        accounting.parse_range(params, D12)
    assert field in caught.value.errors and words in " ".join(caught.value.errors[field])


def test_named_ranges_end_today_and_include_it():
    assert accounting.parse_range({"range": "7d"}, D12) == ("7d", date(2025, 3, 6), D12)
    assert accounting.parse_range({}, D12) == ("30d", date(2025, 2, 11), D12)
    assert accounting.parse_range({"from": "2025-03-01"}, D12) == ("custom", date(2025, 3, 1), D12)


# --- the numbers --------------------------------------------------------------------

def _expect_vision_numbers(report, jobs):
    total = report.totals
    assert total.core_hours == pytest.approx(18.5)
    assert total.used_core_hours == pytest.approx(5.6)
    assert total.idle_core_hours == pytest.approx(4.4)
    assert total.unknown_core_hours == pytest.approx(8.5)
    assert total.cost_usd == pytest.approx(4.0 + 2.0 + 2 * PRICE_INF2_X + 2.0 + 2.0 + 0.5)
    assert total.idle_cost_usd == pytest.approx(2.4)
    assert (total.jobs_succeeded, total.jobs_failed, total.jobs_cancelled) == (2, 1, 2)
    assert total.attempts_interrupted == 1
    by_day = _by_day(report)
    assert by_day[D10].core_hours == pytest.approx(4 / 3)
    assert by_day[D11].core_hours == pytest.approx(20 / 3 + 4 + 0.5)
    assert by_day[D12].core_hours == pytest.approx(6.0)
    assert by_day[D10].used_core_hours == pytest.approx(4 / 3) and by_day[D10].idle_core_hours == pytest.approx(0)
    assert by_day[D11].used_core_hours == pytest.approx(8 / 3) and by_day[D11].idle_cost_usd == pytest.approx(2.0)
    assert by_day[D12].used_core_hours == pytest.approx(1.6)
    waits = {r["kind"]: r for r in selectors.wait_table(report).dicts()}
    assert waits["finetune"]["jobs"] == 2
    assert waits["finetune"]["p50_s"] == pytest.approx(600, rel=0.025)
    assert waits["finetune"]["p95_s"] == pytest.approx(1800, rel=0.025)
    assert waits["compile"]["p50_s"] == pytest.approx(60, rel=0.025)
    assert waits["compile"]["p95_s"] == pytest.approx(3600, rel=0.025)
    assert waits["inference"]["p50_s"] == pytest.approx(1800, rel=0.025)
    outcomes = {r["kind"]: r for r in selectors.outcomes_table(report).dicts()}
    assert outcomes["all"]["success_rate_pct"] == 40.0 and outcomes["all"]["cancel_rate_pct"] == 40.0
    assert outcomes["all"]["failure_rate_pct"] == 20.0
    assert (outcomes["compile"]["succeeded"], outcomes["compile"]["failed"]) == (0, 1)
    assert outcomes["inference"]["interrupted_attempts"] == 1
    top = [(t.job.pk, round(t.totals.cost_usd, 4), t.active) for t in report.top_jobs]
    j = {k: v.pk for k, v in jobs.items()}
    assert top == [(j["j1"], 4.0, False), (j["j2"], round(2 + 2 * PRICE_INF2_X, 4), False),
                   (j["j4"], 2.0, False), (j["j3"], 2.0, True), (j["j6"], 0.5, False)]
    assert j["a1"] not in {t.job.pk for t in report.top_jobs}
    burn = report.burn
    assert burn.used == pytest.approx(18.5) and burn.budget == 40
    assert burn.rate_per_day == pytest.approx(18.5 / (7 + 17.5 / 24))
    assert burn.status == "runs_out" and burn.run_out_day == date(2025, 3, 21)


def test_the_team_numbers_match_the_hand_computed_history_before_any_fold(history):
    assert not UsageDaily.objects.exists()
    _expect_vision_numbers(_report(history.vision), history.jobs)


def test_the_team_numbers_are_the_same_after_the_fold(history):
    stats = fold(NOW)
    assert stats.cutoff == NOW - FOLD_DELAY and not stats.skipped
    assert UsageDaily.objects.filter(team=history.vision).exists()
    _expect_vision_numbers(_report(history.vision), history.jobs)


def test_folding_again_or_in_steps_counts_everything_exactly_once(history):
    for step in (at(11, 0), at(11, 6, 15), at(12, 10, 30), at(12, 11, 0), NOW, NOW, NOW + timedelta(seconds=30)):
        fold(step)
    # Everything up to the last cutoff is in the roll-ups; only a few minutes are live.
    # (cutoffs are whole minutes: the last one is NOW - FOLD_DELAY, J3 is live after it)
    assert UsageRollupState.objects.get(pk=1).cutoff == NOW - FOLD_DELAY
    assert sum(r.core_seconds for r in UsageDaily.objects.filter(team=history.vision)) / 3600 == pytest.approx(
        18.5 - FOLD_DELAY.total_seconds() / 3600)
    _expect_vision_numbers(_report(history.vision), history.jobs)
    assert UsageSiteDaily.objects.count() > 0 and UsageTeamDay.objects.filter(team=history.audio).count() == 1


def test_the_budget_measure_is_the_burn_downs_used_hours_before_between_and_after_folds(history):
    from jobs.quotas.selectors import core_hours_by_team

    teams = [history.vision.pk, history.audio.pk]
    for cutoff in (None, at(11, 6, 15), NOW):
        if cutoff is not None:
            fold(cutoff)
        hours = core_hours_by_team(teams, now=NOW)
        assert hours[history.vision.pk] == pytest.approx(_report(history.vision).burn.used) == pytest.approx(18.5)
        assert hours[history.audio.pk] == pytest.approx(2.0)
        assert core_hours_by_team(now=NOW) == pytest.approx(hours)


def test_the_budget_counts_only_the_part_of_an_attempt_inside_the_teams_local_month(history):
    from jobs.quotas.selectors import core_hours_by_team

    host = Host.objects.get(name="inf-s")
    start = datetime(2025, 2, 28, 18, 0, tzinfo=UTC)  # 23:30 on 28 Feb in Kolkata
    end = start + timedelta(hours=1.5)
    job = _job(history.vision, history.bob, "compile", "inf2", 2, start, "succeeded", finished=end)
    _attempt(job, 1, host, start, end, "succeeded")  # 1 h of it on 1 March
    assert core_hours_by_team([history.vision.pk], now=NOW)[history.vision.pk] == pytest.approx(18.5 + 2.0)
    fold(NOW)
    assert core_hours_by_team([history.vision.pk], now=NOW)[history.vision.pk] == pytest.approx(18.5 + 2.0)


def test_the_running_job_is_folded_up_to_the_cutoff_and_counted_live_after_it(history):
    fold(NOW)
    j3 = JobUsage.objects.get(job=history.jobs["j3"])
    assert j3.attempt_folded == 0 and j3.folded_until == NOW - FOLD_DELAY
    assert j3.core_seconds == pytest.approx((NOW - FOLD_DELAY - at(12, 10)).total_seconds())
    live = live_usage(team_id=history.vision.pk, now=NOW)
    assert live.active_jobs == {history.jobs["j3"].pk}
    assert sum(c.totals.core_seconds for c in live.contributions) == pytest.approx(FOLD_DELAY.total_seconds())
    assert JobUsage.objects.get(job=history.jobs["j2"]).attempt_folded == 2


def test_the_database_and_python_measure_minutes_by_the_same_rule(history):
    from jobs.usage.rollup import measure, minute_rows

    # Every attempt as the roll-up reads it, nothing folded yet.
    attempts = JobAttempt.objects.filter(started_at__lt=NOW).select_related("job", "team").order_by("job_id", "number")
    rows = [accounting.AttemptRow(job_id=a.job_id, number=a.number,
                                  dims=accounting.Dims(a.team_id, a.user_id, a.kind, a.family, a.instance_type or ""),
                                  host_id=a.host_id, cores=a.cores, started_at=a.started_at, ended_at=a.ended_at,
                                  outcome=a.outcome or "", job_created_at=a.job.created_at, time_zone=a.team.time_zone)
            for a in attempts]
    plan = accounting.plan_attempts(rows, NOW)
    in_db = measure(plan.pieces)
    in_python = accounting.measure(plan.pieces, minute_rows(plan.pieces))
    assert [n for n, _ in in_db] == [n for n, _ in in_python]
    assert [s for _, s in in_db] == pytest.approx([s for _, s in in_python])
    assert sum(n for n, _ in in_db) == 120 * 4 + 120  # J1's and J3's per-core minutes, no core -1 rows


def test_an_hour_without_utilization_rows_is_unknown_not_zero(history):
    report = _report(history.vision)
    j2_day = _by_day(report)[D11]
    assert j2_day.utilization is not None  # J1's measured hours
    only_j4 = selectors.team_report(history.vision, "custom", D12, D12, now=at(12, 3, 30))
    assert only_j4.totals.utilization is None and only_j4.totals.unknown_core_hours == pytest.approx(4.0)
    row = selectors.allocation_table(only_j4).dicts()[0]
    assert row["utilization_pct"] is None and row["used_core_hours"] == 0 and row["unknown_core_hours"] == 4.0


def test_a_price_change_applies_to_usage_folded_after_it(history):
    fold(at(11, 0))  # folds J1 at $0.50/core-h
    InstancePrice.objects.filter(instance_type="trn1.32xlarge").update(usd_per_hour=32.0)
    report = _report(history.vision)
    assert report.totals.cost_usd == pytest.approx(4.0 + 2 + 2 * PRICE_INF2_X + 2.0 + 4.0 + 0.5)


def test_the_site_report_shares_hours_and_cost_between_teams(history):
    fold(NOW)
    report = selectors.site_report("custom", D10, D12, now=NOW, group_by="team")
    assert report.totals.core_hours == pytest.approx(20.5)
    shares = {r["team"]: r for r in selectors.teams_table(report).dicts()}
    assert shares["vision"]["core_hours"] == pytest.approx(18.5)
    assert shares["audio"]["core_hours"] == pytest.approx(2.0) and shares["audio"]["cost_usd"] == pytest.approx(2.0)
    assert shares["vision"]["hours_share_pct"] == pytest.approx(100 * 18.5 / 20.5, abs=0.01)
    assert shares["audio"]["cost_share_pct"] == pytest.approx(100 * 2 / (2 + report.totals.cost_usd - 2), abs=0.01)
    hours = selectors.hours_table(report).dicts()
    assert sum(r["core_hours"] for r in hours if r["team"] == "audio") == pytest.approx(2.0)
    assert sum(r["core_hours"] for r in hours) == pytest.approx(20.5, abs=1e-3)
    assert report.capacity_cores == 32 + 24 + 2


# --- pages, CSV and API -------------------------------------------------------------

def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _csv(response) -> list[dict]:
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(response.content.decode())))


def test_the_team_page_shows_the_numbers_and_every_chart(history, frozen):
    fold(NOW)
    response = _client(history.bob).get("/teams/vision/usage/", RANGE)
    assert response.status_code == 200
    html = response.content.decode()
    for name in ("hours", "allocation", "cost", "burndown", "wait", "outcomes"):
        assert f'data-figure="fig-{name}"' in html and f'id="fig-{name}"' in html
    assert "/static/plotly/plotly.min.js" in html and "cdn" not in html.lower()
    assert 'data-metric="allocated">18.5 NeuronCore-h' in html
    assert 'data-metric="idle">4.4 NeuronCore-h · $2.40' in html
    assert 'data-burn="runs_out"' in html and "2025-03-21" in html
    fig = response.context["figures"]["fig-hours"]
    assert [t["name"] for t in fig["data"]] == ["Compile", "Fine-tune", "Inference"]
    assert fig["data"][1]["y"] == [round(4 / 3, 4), round(20 / 3, 4), 4.0]
    assert all(t["marker"]["color"] in {"#0072B2", "#E69F00", "#009E73"} for t in fig["data"])


def test_the_csv_has_the_page_and_api_numbers(history, frozen):
    fold(NOW)
    client = _client(history.alice)
    page = client.get("/teams/vision/usage/", RANGE).context
    allocation = _csv(client.get("/teams/vision/usage/", {**RANGE, "format": "csv", "table": "allocation"}))
    assert [r["day"] for r in allocation] == ["2025-03-10", "2025-03-11", "2025-03-12"]
    # the page shows the CSV's numbers, rounded for people
    assert [f"{float(r['allocated_core_hours']):,.2f}" for r in allocation] == [
        r["allocated_core_hours"] for r in page["tables"]["allocation"]] == ["1.33", "11.17", "6.00"]
    assert [f"${float(r['cost_usd']):,.2f}" for r in allocation] == [r["cost_usd"] for r in page["tables"]["allocation"]]
    assert sum(float(r["allocated_core_hours"]) for r in allocation) == pytest.approx(18.5, abs=1e-3)
    assert allocation[0]["utilization_pct"] == "100.0" and allocation[2]["used_core_hours"] == "1.6"
    top = _csv(client.get("/teams/vision/usage/", {**RANGE, "format": "csv", "table": "top_jobs"}))
    assert [int(r["job"]) for r in top] == [r["job"] for r in page["tables"]["top_jobs"]]
    api = api_client(history.alice).get("/api/v1/teams/vision/usage", {"from": "2025-03-10", "to": "2025-03-12"}).json()
    assert api["totals"]["allocated_core_hours"] == pytest.approx(18.5)
    assert api["totals"]["cost_usd"] == float(_csv(client.get(
        "/teams/vision/usage/", {**RANGE, "format": "csv", "table": "summary"}))[0]["cost_usd"])
    assert [t["cost_usd"] for t in api["top_jobs"]] == [float(r["cost_usd"]) for r in top]
    by_user = _csv(client.get("/teams/vision/usage/", {**RANGE, "group_by": "user", "format": "csv",
                                                       "table": "hours"}))
    per_user = {}
    for r in by_user:
        per_user[r["user"]] = per_user.get(r["user"], 0) + float(r["core_hours"])
    api_users = api_client(history.bob).get("/api/v1/teams/vision/usage", {
        "from": "2025-03-10", "to": "2025-03-12", "group_by": "user"}).json()["groups"]
    assert {g["key"]: g["allocated_core_hours"] for g in api_users} == pytest.approx(per_user, abs=1e-3)
    assert per_user == pytest.approx({"bob": 8 + 2 + 0.5, "alice": 4 + 4}, abs=1e-3)


def test_the_api_groups_by_kind_family_and_day(history, frozen):
    client = api_client(history.vera)
    body = client.get("/api/v1/teams/vision/usage", {"from": "2025-03-10", "to": "2025-03-12",
                                                     "group_by": "family"}).json()
    assert {g["key"]: g["allocated_core_hours"] for g in body["groups"]} == pytest.approx(
        {"Trainium": 12.0, "Inferentia2": 6.5})
    days = client.get("/api/v1/teams/vision/usage", {"from": "2025-03-10", "to": "2025-03-12",
                                                     "group_by": "day"}).json()
    assert [g["key"] for g in days["groups"]] == ["2025-03-10", "2025-03-11", "2025-03-12"]
    assert days["time_zone"] == "Asia/Kolkata" and days["from"] == "2025-03-10"
    assert days["burn_down"]["run_out_day"] == "2025-03-21"
    assert {w["kind"]: w["jobs"] for w in days["queue_wait"]} == {"compile": 2, "finetune": 2, "inference": 1, "serve": 0}


@pytest.mark.parametrize("params, field", [
    ({"from": "2025-02-30"}, "from"),
    ({"from": "2025-03-10", "to": "2025-03-01"}, "to"),
    ({"from": "2025-03-10", "to": "2025-04-01"}, "to"),
    ({"group_by": "planet"}, "group_by"),
])
def test_the_api_refuses_bad_input_naming_the_field(history, frozen, params, field):
    response = api_client(history.alice).get("/api/v1/teams/vision/usage", params)
    assert response.status_code == 400
    assert field in response.json()["errors"] and field in response.json()["detail"]


def test_the_page_refuses_a_bad_range_naming_the_field(history, frozen):
    response = _client(history.alice).get("/teams/vision/usage/", {"range": "custom", "from": "soon"})
    assert response.status_code == 400
    assert "<strong>from</strong>" in response.content.decode() and "not a date" in response.content.decode()
    bad_table = _client(history.alice).get("/teams/vision/usage/", {"format": "csv", "table": "secrets"})
    assert bad_table.status_code == 400 and b"table" in bad_table.content


def test_another_teams_usage_is_a_404_in_pages_csv_and_api(history, frozen):
    charlie = _client(history.charlie)
    assert charlie.get("/teams/vision/usage/").status_code == 404
    assert charlie.get("/teams/vision/usage/", {"format": "csv", "table": "summary"}).status_code == 404
    assert api_client(history.charlie).get("/api/v1/teams/vision/usage").status_code == 404
    audio = api_client(history.charlie).get("/api/v1/teams/audio/usage", {"from": "2025-03-11", "to": "2025-03-11"})
    assert audio.json()["totals"]["allocated_core_hours"] == pytest.approx(2.0)
    assert _client(history.vera).get("/teams/vision/usage/").status_code == 200  # viewers see usage


def test_the_site_page_is_for_staff_only(history, frozen):
    assert _client(history.alice).get("/usage/").status_code == 404
    assert api_client(history.alice).get("/api/v1/usage").status_code == 404
    assert _client(history.alice).post("/usage/prices/", {"instance_type": "x.large"}).status_code == 404
    response = _client(history.admin).get("/usage/", RANGE)
    assert response.status_code == 200
    assert 'data-figure="fig-fleet"' in response.content.decode()
    teams = _csv(_client(history.admin).get("/usage/", {**RANGE, "format": "csv", "table": "teams"}))
    assert [r["team"] for r in teams] == ["vision", "audio"]
    api = api_client(history.admin).get("/api/v1/usage", {"from": "2025-03-10", "to": "2025-03-12"}).json()
    assert {t["team"]: t["core_hours"] for t in api["teams"]} == {
        r["team"]: float(r["core_hours"]) for r in teams}


def test_an_admin_sets_and_removes_a_price_with_errors_naming_the_field(history, frozen):
    admin = _client(history.admin)
    bad = admin.post("/usage/prices/", {"instance_type": "trn2.48xlarge", "usd_per_hour": "-3", "cores": "0"})
    assert bad.status_code == 400
    html = bad.content.decode()
    assert "usd_per_hour:" in html and "cores:" in html
    ok = admin.post("/usage/prices/", {"instance_type": "trn2.48xlarge", "usd_per_hour": "20", "cores": "64"})
    assert ok.status_code == 302
    price = InstancePrice.objects.get(instance_type="trn2.48xlarge")
    assert price.usd_per_core_hour == pytest.approx(20 / 64)
    assert admin.post(f"/usage/prices/{price.pk}/delete/").status_code == 302
    assert not InstancePrice.objects.filter(instance_type="trn2.48xlarge").exists()


def test_the_page_query_count_does_not_grow_with_history(history, frozen, django_user_model):
    fold(NOW)
    client = _client(history.alice)
    client.get("/teams/vision/usage/", {"range": "90d"})

    def count(url, params):
        # A first render: the roll-up reads are cached per fold (selectors.rollup_version).
        cache.clear()
        with CaptureQueriesContext(connection) as ctx:
            assert client.get(url, params).status_code == 200
        return len(ctx.captured_queries)

    before = count("/teams/vision/usage/", {"range": "90d"})
    host = Host.objects.get(name="trn-a")
    for i in range(60):
        job = _job(history.vision, history.bob if i % 2 else history.alice, "compile", "trn1", 2, at(1, 0) + timedelta(hours=i),
                   "succeeded", finished=at(1, 1) + timedelta(hours=i))
        _attempt(job, 1, host, at(1, 0, 30) + timedelta(hours=i), at(1, 1) + timedelta(hours=i), "succeeded")
    fold(NOW)
    assert count("/teams/vision/usage/", {"range": "90d"}) == before
    history.admin.is_staff = True
    admin = _client(history.admin)
    admin.get("/usage/")
    with CaptureQueriesContext(connection) as ctx:
        admin.get("/usage/", {"group_by": "team"})
    assert len(ctx.captured_queries) < 25


def test_the_rollup_task_is_scheduled_every_minute():
    from webapp.celery import app

    entry = app.conf.beat_schedule["rollup-usage"]
    assert entry["task"] == "jobs.rollup_usage" and entry["schedule"] == 60.0
    assert "jobs.rollup_usage" in app.tasks


def test_the_rollup_task_folds_and_a_concurrent_fold_is_skipped(history, frozen):
    from jobs.tasks import rollup_usage_task

    result = rollup_usage_task()
    assert result["skipped"] is False and result["pieces"] > 0
    assert UsageRollupState.objects.get(pk=1).cutoff == NOW - FOLD_DELAY


def test_a_fold_retires_the_cached_rollup_reads_so_the_page_never_loses_folded_usage(history, frozen):
    fold(NOW)
    client = _client(history.alice)
    params = {**RANGE, "format": "csv", "table": "summary"}
    before = float(_csv(client.get("/teams/vision/usage/", params))[0]["allocated_core_hours"])
    host = Host.objects.get(name="trn-a")
    job = _job(history.vision, history.bob, "compile", "trn1", 2, NOW - timedelta(hours=2), "succeeded",
               finished=NOW - timedelta(minutes=6))
    _attempt(job, 1, host, NOW - timedelta(hours=1, minutes=6), NOW - timedelta(minutes=6), "succeeded")
    fold(NOW)  # the new hour moves from the live part into the roll-ups: a stale cache would drop it
    after = float(_csv(client.get("/teams/vision/usage/", params))[0]["allocated_core_hours"])
    assert after == pytest.approx(before + 2.0, abs=1e-3)


def test_reads_of_settled_days_survive_folds_of_recent_ones_and_retire_when_an_old_day_changes(history):
    """Roll-up reads of days up to two days before the fold's cutoff are cached across
    folds (selectors.Stamp); a fold writing such a day retires them."""
    client = _client(history.alice)
    params = {"range": "custom", "from": "2025-03-01", "to": "2025-03-12", "group_by": "user"}
    host = Host.objects.get(name="trn-a")

    def render(now):
        with mock.patch("django.utils.timezone.now", return_value=now), CaptureQueriesContext(connection) as ctx:
            response = client.get("/teams/vision/usage/", {**params, "format": "csv", "table": "hours"})
        return _csv(response), len(ctx.captured_queries)

    def uncached(now):
        cache.clear()
        return render(now)[0]

    fold(NOW)
    settled = UsageRollupState.objects.get().settled_stamp
    assert settled
    cache.clear()
    _, cold = render(NOW)
    fold(NOW + timedelta(minutes=1))  # only recent days change: settled reads stay cached
    assert UsageRollupState.objects.get().settled_stamp == settled
    rows, after_recent_fold = render(NOW + timedelta(minutes=1))
    assert after_recent_fold < cold
    assert rows == uncached(NOW + timedelta(minutes=1))
    # a job whose attempt started on the 8th turns up: the fold writes old days
    late = _job(history.vision, history.alice, "compile", "trn1", 2, at(8, 9), "running", started=at(8, 10))
    _attempt(late, 1, host, at(8, 10), None, "")
    fold(NOW + timedelta(minutes=2))
    assert UsageRollupState.objects.get().settled_stamp != settled
    rows, _ = render(NOW + timedelta(minutes=2))
    assert rows == uncached(NOW + timedelta(minutes=2))
    alice_8th = [r for r in rows if r["day"] == "2025-03-08" and r["user"] == "alice"]
    assert float(alice_8th[0]["core_hours"]) == pytest.approx(2 * 8.5, abs=1e-3)  # 15:30-24:00 local (UTC+5:30)


def test_the_site_team_table_names_teams_as_they_are_now_though_sums_are_cached(history, frozen):
    fold(NOW)
    history.admin.is_staff = True
    admin = _client(history.admin)
    params = {"range": "custom", "from": "2025-03-01", "to": "2025-03-12", "format": "csv", "table": "teams"}
    assert {r["team"] for r in _csv(admin.get("/usage/", params))} == {"vision", "audio"}
    history.vision.slug = "vision-renamed"
    history.vision.save(update_fields=["slug"])
    rows = _csv(admin.get("/usage/", params))  # no fold since: the sums come from the cache
    assert {r["team"] for r in rows} == {"vision-renamed", "audio"}
    assert float(next(r for r in rows if r["team"] == "vision-renamed")["core_hours"]) == pytest.approx(18.5, abs=1e-3)


# --- efficiency: used / allocated per team, user and kind -----------------------------

def _efficiency(report) -> dict[tuple[str, str], dict]:
    return {(r["group"], r["name"]): r for r in selectors.efficiency_table(report).dicts()}


@pytest.mark.parametrize("folded", [False, True])
def test_efficiency_is_used_over_allocated_per_user_and_kind(history, folded):
    """By hand: bob's J1 (8 core-h, 4 used), J3 (2 core-h at 80 %: 1.6 used) and J6 (0.5,
    not measured); alice's J2 (4) and J4 (4), neither measured."""
    if folded:
        fold(NOW)
    rows = _efficiency(_report(history.vision))
    assert rows[("all", "all")]["efficiency_pct"] == pytest.approx(100 * 5.6 / 18.5, abs=0.05)
    assert rows[("all", "all")]["utilization_pct"] == pytest.approx(56.0)
    bob, alice = rows[("user", "bob")], rows[("user", "alice")]
    assert bob["allocated_core_hours"] == pytest.approx(10.5) and bob["used_core_hours"] == pytest.approx(5.6)
    assert bob["efficiency_pct"] == pytest.approx(100 * 5.6 / 10.5, abs=0.05) and bob["utilization_pct"] == 56.0
    assert alice["allocated_core_hours"] == pytest.approx(8.0) and alice["efficiency_pct"] == 0.0
    assert alice["utilization_pct"] is None and alice["unknown_core_hours"] == pytest.approx(8.0)
    assert rows[("kind", "finetune")]["efficiency_pct"] == pytest.approx(100 * 4 / 12, abs=0.05)
    assert rows[("kind", "compile")]["efficiency_pct"] == pytest.approx(64.0)
    assert rows[("kind", "inference")]["efficiency_pct"] == 0.0
    assert [k for g, k in rows if g == "user"] == ["bob", "alice"]  # largest allocation first


def test_the_site_efficiency_has_each_team(history):
    fold(NOW)
    rows = _efficiency(selectors.site_report("custom", D10, D12, now=NOW))
    assert rows[("team", "vision")]["efficiency_pct"] == pytest.approx(100 * 5.6 / 18.5, abs=0.05)
    assert rows[("team", "audio")]["efficiency_pct"] == 0.0 and rows[("team", "audio")]["utilization_pct"] is None
    assert rows[("all", "all")]["efficiency_pct"] == pytest.approx(100 * 5.6 / 20.5, abs=0.05)
    assert not any(g == "user" for g, _ in rows)


def test_the_usage_pages_show_the_efficiency_table_and_its_csv(history, frozen):
    fold(NOW)
    html = _client(history.bob).get("/teams/vision/usage/", RANGE).content.decode()
    assert 'id="table-efficiency"' in html
    assert 'data-group="user" data-name="bob"' in html and 'data-group="kind" data-name="compile"' in html
    assert '<td data-metric="efficiency">64.0 %</td>' in html
    rows = _csv(_client(history.bob).get("/teams/vision/usage/", {**RANGE, "format": "csv", "table": "efficiency"}))
    assert {r["name"]: r["efficiency_pct"] for r in rows if r["group"] == "user"} == {"bob": "53.33", "alice": "0.0"}
    site = _client(history.admin).get("/usage/", RANGE).content.decode()
    assert 'data-group="team" data-name="vision"' in site
