"""The live part of the usage pages computed in one SQL statement
(jobs.usage_rollup.live_usage on PostgreSQL) against the Python reference
(live_usage_python, the rules of jobs.usage): the same contributions, per-job
totals and running jobs, on a random history of multi-day attempts across
daylight-saving changes (an ambiguous local midnight in the Azores, New York's
fall back), a half-hour zone, a zone PostgreSQL reads as an abbreviation (CET),
an unknown and an empty zone name, requeued attempts, unpriced hosts and
utilization minutes on both sides of local midnights — before any fold, between
folds and after them. And the site's running wait totals (UsageSiteWaitTotal)
against merging the daily sketches, through folds and a wait landing on an old day."""
from __future__ import annotations

import importlib
import random
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
from django.apps import apps as django_apps
from django.db import connection

from jobs.usage import selectors
from jobs.usage import accounting
from jobs.models import (Host, InstancePrice, Job, JobAttempt, MetricMinute, Team, UsageSiteDaily,
                         UsageSiteWaitTotal)
from jobs.usage.rollup import fold, live_usage, live_usage_python, rebuild_site_wait_totals

UTC = dt_timezone.utc
# Around the end of daylight-saving time in Europe and the Azores (26 Oct 2025: the
# Azores' local midnight happens twice) and in New York (2 Nov 2025).
START = datetime(2025, 10, 23, 0, 0, tzinfo=UTC)
NOW = datetime(2025, 11, 3, 12, 7, 30, tzinfo=UTC)
ZONES = ["Asia/Kolkata", "America/New_York", "Atlantic/Azores", "CET", "Mars/Olympus", "", "UTC"]


def _close(a: accounting.Totals, b: accounting.Totals) -> bool:
    return (all(getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-12, abs=1e-9) for f in accounting.NUMERIC_FIELDS)
            and a.wait_sketch == b.wait_sketch)


def _assert_same(team_id: int | None, now: datetime) -> None:
    sql, py = live_usage(team_id=team_id, now=now), live_usage_python(team_id=team_id, now=now)
    assert len(sql.contributions) == len(py.contributions)
    for s, p in zip(sql.contributions, py.contributions):
        assert (s.day, s.dims, s.job_id) == (p.day, p.dims, p.job_id)
        assert _close(s.totals, p.totals), (s, p)
    assert sql.job_totals.keys() == py.job_totals.keys()
    assert all(_close(sql.job_totals[j], py.job_totals[j]) for j in py.job_totals)
    assert sql.job_folded.keys() == py.job_folded.keys()
    assert all(sql.job_folded[j][0] == py.job_folded[j][0] and _close(sql.job_folded[j][1], py.job_folded[j][1])
               for j in py.job_folded)
    assert sql.active_jobs == py.active_jobs


@pytest.fixture
def random_history(cast):
    rng = random.Random(6)
    InstancePrice.objects.create(instance_type="trn1.32xlarge", usd_per_hour=16.0, cores=32)
    hosts = [Host.objects.create(name="trn", instance_type="trn1.32xlarge", family="trn1", core_ids=list(range(32))),
             Host.objects.create(name="inf", instance_type="inf2.48xlarge", family="inf2", core_ids=list(range(24))),
             Host.objects.create(name="odd", instance_type="x9.unpriced", family="inf2", core_ids=list(range(8)))]
    teams = []
    for i, zone in enumerate(ZONES):
        team = Team.objects.create(slug=f"t{i}", name=f"T{i}", time_zone=zone)
        teams.append(team)
    users = [cast.alice, cast.bob, cast.charlie]
    minutes = []
    for n in range(90):
        team, user, host = teams[n % len(teams)], rng.choice(users), rng.choice(hosts)
        kind = rng.choice(["compile", "inference", "finetune"])
        created = START + timedelta(seconds=rng.randrange(int((NOW - START).total_seconds()) - 600))
        cores = rng.choice([1, 2, 4])
        if rng.random() < 0.08:  # cancelled while pending: an outcome, no attempt
            finished = created + timedelta(minutes=3)
            Job.objects.create(team=team, user=user, kind=kind, family=host.family, cores=cores,
                               status="cancelled", created_at=created, finished_at=min(finished, NOW))
            continue
        started = created + timedelta(seconds=rng.randrange(1, 4 * 3600))
        length = timedelta(seconds=rng.choice([rng.randrange(60, 3600), rng.randrange(3600, 3 * 86400)]))
        ended = started + length
        running = ended >= NOW - timedelta(minutes=1) or rng.random() < 0.1
        status = "running" if running else rng.choice(["succeeded", "succeeded", "failed", "cancelled"])
        job = Job.objects.create(team=team, user=user, kind=kind, family=host.family, cores=cores, status=status,
                                 created_at=created, started_at=started, finished_at=None if running else ended)
        spans = [(started, None if running else ended, "" if running else status)]
        if rng.random() < 0.25 and (not running or started < NOW - timedelta(hours=2)):
            cut = started + (min(ended, NOW) - started) / 3
            spans = [(started, cut, rng.choice(["preempted", "requeued"])),
                     (cut + timedelta(minutes=5), spans[0][1], spans[0][2])]
        for number, (begin, end, outcome) in enumerate(spans, 1):
            JobAttempt.objects.create(job=job, team=team, user=user, kind=kind, family=host.family,
                                      instance_type=host.instance_type, host=host, number=number, cores=cores,
                                      started_at=begin, ended_at=end, outcome=outcome)
            if rng.random() < 0.7:  # measured: a sample of minutes, both sides of midnights included
                minute = begin.replace(second=0, microsecond=0)
                stop = min(end or NOW, NOW)
                while minute < stop:
                    util = rng.uniform(0, 110)  # above 100 is clamped
                    minutes += [MetricMinute(host=host, job=job, minute=minute, core=c, util_mean=util, samples=60)
                                for c in range(min(cores, 2))]
                    minutes.append(MetricMinute(host=host, job=job, minute=minute, core=-1, util_mean=1.0, samples=60))
                    minute += timedelta(minutes=rng.choice([1, 1, 7, 29, 61]))
    MetricMinute.objects.bulk_create(minutes, batch_size=2000)
    return teams


def test_the_sql_live_part_equals_the_python_rules_before_between_and_after_folds(random_history):
    if connection.vendor != "postgresql":
        pytest.skip("the SQL live part is PostgreSQL's; elsewhere live_usage is the Python one")
    teams = random_history
    assert JobAttempt.objects.count() > 80
    everything = live_usage(now=NOW)  # the history covers the DST changes with multi-day attempts
    azores = {c.day for c in everything.contributions if c.dims.team_id == teams[2].pk and c.job_id}
    assert azores >= {START.date() + timedelta(days=d) for d in range(2, 5)}
    assert sum(c.totals.measured_core_seconds > 0 for c in everything.contributions) > 20
    for now in (NOW, NOW - timedelta(days=4, hours=3)):  # before any fold: everything is live
        _assert_same(None, now)
    _assert_same(teams[2].pk, NOW)
    fold(now=NOW - timedelta(days=6))
    fold(now=NOW - timedelta(days=2, minutes=17))
    between = live_usage(now=NOW)
    assert between.job_folded and sum(c.totals.measured_core_seconds > 0 for c in between.contributions) > 5
    for now in (NOW - timedelta(days=2), NOW):
        _assert_same(None, now)
        for team in teams:
            _assert_same(team.pk, now)
    fold(now=NOW)
    for now in (NOW + timedelta(seconds=1), NOW + timedelta(minutes=3), NOW + timedelta(hours=30)):
        _assert_same(None, now)
    assert live_usage(now=NOW + timedelta(hours=30)).active_jobs


def _daily_sketches(first, last):
    return selectors._sketches_by_kind_uncached(UsageSiteDaily.objects.filter(day__gte=first, day__lte=last))


def _wait_totals():
    return sorted(UsageSiteWaitTotal.objects.values_list("kind", "day", "wait_count", "wait_sketch"))


def test_the_sites_running_wait_totals_equal_the_merged_daily_sketches_through_folds(random_history, cast):
    teams = random_history
    days = [START.date() + timedelta(days=d) for d in range(-2, 14)]
    ranges = [(f, l) for f in days[::3] for l in days[1::4] if f <= l]
    fold(now=NOW - timedelta(days=6))
    fold(now=NOW - timedelta(days=2, minutes=17))
    fold(now=NOW)
    # a job whose first attempt started days ago turns up: its wait lands on an old day
    late = Job.objects.create(team=teams[0], user=cast.bob, kind="compile", family="inf2", cores=1, status="running",
                              created_at=NOW - timedelta(days=5, hours=2), started_at=NOW - timedelta(days=5))
    JobAttempt.objects.create(job=late, team=teams[0], user=cast.bob, kind="compile", family="inf2",
                              instance_type="inf2.48xlarge", host=Host.objects.get(name="inf"), number=1, cores=1,
                              started_at=NOW - timedelta(days=5))
    fold(now=NOW + timedelta(minutes=10))
    assert UsageSiteWaitTotal.objects.count() > 10
    for first, last in ranges:
        assert selectors._site_wait_sketches_uncached(first, last) == _daily_sketches(first, last), (first, last)
    incremental = _wait_totals()
    assert rebuild_site_wait_totals() == len(incremental)
    assert _wait_totals() == incremental
    migration = importlib.import_module("jobs.migrations.0010_usage_site_wait_totals")
    migration.build(django_apps, None)  # what the migration builds from the rows already folded
    assert _wait_totals() == incremental
