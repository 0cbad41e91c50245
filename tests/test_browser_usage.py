"""The team usage page in real headless Chromium: with a month of history folded
into the roll-ups, every chart is drawn by the locally served Plotly.js (a
`.js-plotly-plot` with SVG traces), the stacked chart switches to "by user", and a
screenshot is saved under test-artifacts/ for a human to look at."""
from __future__ import annotations

import random
import re
from datetime import timedelta

import pytest
from django.utils import timezone

from conftest import PASSWORD, SHOTS, browser_page
from jobs.models import Host, InstancePrice, Job, JobAttempt, MetricMinute, TeamQuota
from jobs.usage.rollup import fold

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHARTS = ("hours", "allocation", "cost", "burndown", "wait", "outcomes")


@pytest.fixture
def month_of_usage(cast):
    """About 120 jobs of vision over the last 30 days on trn1 and inf2 hosts, some
    with utilization rows, a running one, a requeued one, failures and cancels."""
    rng = random.Random(6)
    now = timezone.now().replace(microsecond=0)
    cast.vision.time_zone = "Europe/Berlin"
    cast.vision.save(update_fields=["time_zone"])
    TeamQuota.objects.filter(team=cast.vision).update(monthly_core_hours=1500)
    InstancePrice.objects.create(instance_type="trn1.32xlarge", usd_per_hour=16.0, cores=32)
    hosts = [Host.objects.create(name="trn-a", instance_type="trn1.32xlarge", family="trn1", core_ids=list(range(32))),
             Host.objects.create(name="inf-a", instance_type="inf2.48xlarge", family="inf2", core_ids=list(range(24)))]
    users = [cast.alice, cast.bob, cast.vera]
    minutes = []
    for i in range(120):
        host = hosts[i % 2]
        kind = ("finetune", "inference", "compile")[rng.randrange(3) if host.family == "inf2" else rng.choice([0, 0, 2])]
        cores = rng.choice([1, 2, 4, 8])
        created = now - timedelta(days=30) + timedelta(hours=6 * i + rng.random() * 3)
        start = created + timedelta(minutes=rng.expovariate(1 / 12))
        end = start + timedelta(minutes=rng.uniform(20, 300))
        status = rng.choices(["succeeded", "failed", "cancelled"], [8, 1, 1])[0]
        running = i == 119
        if running:
            start, end, status = now - timedelta(hours=3), None, "running"
        job = Job.objects.create(team=cast.vision, user=users[i % 3], kind=kind, family=host.family, cores=cores,
                                 status=status, created_at=created, finished_at=end)
        number = 1
        if i % 17 == 0 and end is not None:  # preempted, then run again on the same host
            mid = start + (end - start) / 3
            JobAttempt.objects.create(job=job, team=job.team, user=job.user, kind=kind, family=host.family,
                                      instance_type=host.instance_type, host=host, number=1, cores=cores,
                                      started_at=start, ended_at=mid, outcome="preempted")
            start, number = mid + timedelta(minutes=10), 2
        JobAttempt.objects.create(job=job, team=job.team, user=job.user, kind=kind, family=host.family,
                                  instance_type=host.instance_type, host=host, number=number, cores=cores,
                                  started_at=start, ended_at=end, outcome="" if running else status)
        if i % 3 == 0:  # measured jobs: per-core util around a job-specific level
            level, minute = rng.uniform(20, 95), start.replace(second=0)
            while minute < (end or now) and minute < start + timedelta(hours=2):
                minutes += [MetricMinute(host=host, job=job, minute=minute, core=c, samples=60,
                                         util_mean=max(0.0, min(100.0, rng.gauss(level, 8)))) for c in range(cores)]
                minute += timedelta(minutes=1)
    MetricMinute.objects.bulk_create(minutes, batch_size=5000)
    fold()
    return cast


def test_the_team_usage_page_draws_every_chart(month_of_usage, live_server, browser):
    page = browser_page(browser, 1360, 1000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{live_server.url}/login/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/teams/[\w-]+/jobs/$"))
    page.goto(f"{live_server.url}/teams/vision/usage/?range=30d")
    for name in CHARTS:
        chart = page.locator(f"#chart-{name}.js-plotly-plot")
        chart.wait_for()
        assert chart.locator("svg.main-svg").count() >= 1
        traces = chart.locator("g.trace")
        assert traces.count() >= 1, f"chart {name} has no traces"
    # Bars and lines are really drawn: the stacked chart has one bar trace per kind,
    # with paths of non-zero size; the burn-down has its lines.
    hours = page.locator("#chart-hours g.trace.bars")
    assert hours.count() == 3
    assert page.locator("#chart-hours g.trace.bars path").count() > 20
    assert page.locator("#chart-burndown g.trace.scatter path.js-line").count() >= 2
    assert sorted(page.locator("#chart-hours .legendtext").all_text_contents()) == ["Compile", "Fine-tune",
                                                                                   "Inference"]
    assert not errors, errors
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "usage-team.png"), full_page=True)
    page.click("nav.tabs a:has-text('by user')")
    page.wait_for_url(re.compile(r"group_by=user"))
    page.locator("#chart-hours.js-plotly-plot").wait_for()
    assert sorted(page.locator("#chart-hours .legendtext").all_text_contents()) == ["alice", "bob", "vera"]
    page.screenshot(path=str(SHOTS / "usage-team-by-user.png"), full_page=False)


def test_the_site_usage_page_draws_the_fleet_and_team_charts_for_staff(month_of_usage, live_server, browser):
    page = browser_page(browser, 1360, 1000)
    page.goto(f"{live_server.url}/login/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state()
    page.goto(f"{live_server.url}/usage/?range=30d&group_by=team")
    for name in ("fleet", *CHARTS):
        page.locator(f"#chart-{name}.js-plotly-plot g.trace").first.wait_for()
    assert page.locator("#table-teams tbody tr").count() == 1  # only vision has usage
    assert page.locator("#chart-hours .legendtext").all_text_contents() == ["vision"]
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "usage-site.png"), full_page=True)
