"""The live charts in real headless Chromium (Playwright + live_server): a running
job's charts gain points as samples are published, without a reload and without
redrawing the figures; a 32-core job with an hour of history loads downsampled and
is extended in place; the host page follows its cores.

Samples are published by the agent's own code path (Agent.handle), in the test
process, against the same database and Redis as the live server."""
from __future__ import annotations

import json
import time

import pytest

from conftest import SHOTS, log_in
from jobs.live import metrics
from live_support import clean_streams, neuron_host, report, running_job, runtime  # noqa: F401
from neuron_workers.agent import Agent
from neuron_workers.readers.neuron_monitor import parse_report

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


# Counts every full (re)draw a page makes after it loaded; extending must not add any.
COUNT_REDRAWS = """
window.__redraws = 0;
for (const name of ["newPlot", "react", "redraw"]) {
  const original = window.Plotly[name];
  window.Plotly[name] = function () { window.__redraws += 1; return original.apply(this, arguments); };
}
window.__sameDocument = true;
"""


def publish(host, job, util: dict[int, float]) -> None:
    line = report(runtimes=[runtime(f"job-{job.pk}", 100, util)])
    assert Agent(host, placements_ttl=0).handle(parse_report(line))


def trace_length(page, chart: str, axis: str = "x") -> int:
    return page.evaluate(f"document.getElementById('{chart}').data[0].{axis}.length")


def test_a_running_jobs_chart_gains_points_without_a_reload(cast, clean_streams, live_server, browser):
    host = neuron_host("browser-host")
    job = running_job(cast.vision, cast.bob, host, start=0, cores=4)
    for _ in range(2):
        publish(host, job, {0: 10.0, 1: 20.0, 2: 30.0, 3: 40.0})
    page = log_in(browser, live_server.url, "bob")
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    page.wait_for_function("() => document.getElementById('job-chart-util').data")
    assert trace_length(page, "job-chart-util") == 2
    page.evaluate(COUNT_REDRAWS)

    # The page polls every second; the waits' deadline (the page's 15 s default) is
    # only there so a page that stopped following fails instead of hanging.
    publish(host, job, {0: 97.5, 1: 20.0, 2: 30.0, 3: 40.0})
    page.wait_for_function("() => document.getElementById('job-chart-util').data[0].x.length === 3")
    for _ in range(2):
        publish(host, job, {0: 55.0, 1: 20.0, 2: 30.0, 3: 40.0})
    page.wait_for_function("() => document.getElementById('job-chart-util').data[0].x.length === 5")

    assert page.evaluate("window.__sameDocument") is True  # no reload
    assert page.evaluate("window.__redraws") == 0  # extended in place
    assert page.evaluate("document.getElementById('job-chart-util').data[0].y") == [10.0, 10.0, 97.5, 55.0, 55.0]
    for chart in ("job-chart-mem", "job-chart-lat", "job-chart-exec"):
        assert trace_length(page, chart) == 5, chart
    assert "following live" in page.inner_text("[data-live-state]")
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "live-job-charts.png"), full_page=True)


def test_a_32_core_job_with_an_hour_of_history_loads_downsampled_and_extends_in_place(cast, clean_streams,
                                                                                       live_server, browser):
    host = neuron_host("browser-32")
    job = running_job(cast.vision, cast.bob, host, start=0, cores=32)
    start = time.time() - 3600
    pipe = clean_streams.pipeline(transaction=False)
    for i in range(3600):
        point = {"ts": start + i, "kind": "neuron", "host": host.name,
                 "util": {str(c): float((i + c) % 100) for c in range(32)},
                 "mem": {str(c): 1 << 31 for c in range(32)}, "device_mem": 1 << 36, "host_mem": 1 << 33,
                 "lat_p50": 0.012, "lat_p99": 0.015, "completed": 80, "errors": 0, "idle": []}
        pipe.xadd(metrics.job_key(job.pk), {"d": json.dumps(point)})
    pipe.execute()
    page = log_in(browser, live_server.url, "bob")
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    page.wait_for_function("() => document.getElementById('job-chart-util').data")
    assert page.evaluate("document.getElementById('job-chart-util').data[0].type") == "heatmap"
    rows = trace_length(page, "job-chart-util", "z")
    assert rows <= metrics.MAX_POINTS
    page.evaluate(COUNT_REDRAWS)

    publish(host, job, {c: 99.0 for c in range(32)})
    page.wait_for_function(f"() => document.getElementById('job-chart-util').data[0].z.length === {rows + 1}")

    assert page.evaluate("document.getElementById('job-chart-util').data[0].z.at(-1)") == [99.0] * 32
    assert page.evaluate("window.__redraws") == 0 and page.evaluate("window.__sameDocument") is True


def test_the_host_page_follows_its_cores_and_marks_a_replay(cast, clean_streams, live_server, browser):
    host = neuron_host("browser-replay", replay=True)
    job = running_job(cast.vision, cast.bob, host, start=0, cores=2)
    publish(host, job, {0: 50.0, 1: 60.0})
    page = log_in(browser, live_server.url, "bob")
    page.goto(f"{live_server.url}/hosts/{host.name}/")
    page.wait_for_function("() => document.getElementById('host-chart-heat').data")
    page.evaluate(COUNT_REDRAWS)

    publish(host, job, {0: 70.0, 1: 80.0})
    page.wait_for_function("() => document.getElementById('host-chart-heat').data[0].z.length === 2")

    assert page.evaluate("document.getElementById('host-chart-heat').data[0].z[1].slice(0, 3)") == [70.0, 80.0, 0.0]
    assert page.evaluate("window.__redraws") == 0
    assert page.locator(".badge.replay").first.is_visible()
    row = page.locator("#host-cores tr[data-core='1']")
    assert "80.0 %" in row.inner_text() and f"job {job.pk}" in row.inner_text()


def test_a_job_page_opened_while_pending_starts_charting_when_the_job_runs(cast, clean_streams, live_server,
                                                                          browser):
    from jobs.lifecycle import states
    from jobs.models import CoreAllocation, Job

    host = neuron_host("browser-pending")
    job = Job.objects.create(team=cast.vision, user=cast.bob, kind="inference", family="trn1", cores=16)
    page = log_in(browser, live_server.url, "bob")
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    page.wait_for_function("() => document.getElementById('job-chart-util').data")
    assert page.evaluate("document.getElementById('job-chart-util').data[0].type") == "heatmap"
    page.evaluate(COUNT_REDRAWS)

    CoreAllocation.objects.bulk_create([CoreAllocation(host=host, core=c, job=job, team=cast.vision, family="trn1")
                                        for c in range(16)])
    assert states.mark_queued(job, host.pk, 0) and states.mark_running(job.pk, host.pk)
    publish(host, job, {c: 60.0 + c for c in range(16)})
    page.wait_for_function("() => document.getElementById('job-chart-util').data[0].z.length === 1")

    assert page.evaluate("document.getElementById('job-chart-util').data[0].y") == [str(c) for c in range(16)]
    assert page.evaluate("document.getElementById('job-chart-util').data[0].z[0]") == [60.0 + c for c in range(16)]
    assert page.evaluate("window.__redraws") == 0 and page.evaluate("window.__sameDocument") is True
