"""The rank table of a multi-host job on a phone (headless Chromium, 390 px)."""
from __future__ import annotations

import pytest

from conftest import SHOTS, log_in
from jobs.lifecycle import gangs
from jobs.models import GangMember, Job
from tests.test_gang_launch import gang, place, trn1

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_the_rank_table_fits_a_phone_and_follows_the_gang(cast, live_server, browser, _storage):
    from playwright.sync_api import expect

    hosts = [trn1("trn1-a", ""), trn1("trn1-b", "")]
    job = gang(cast, hosts)
    place(job, hosts)
    gangs.claim_rank(job.pk, hosts[0].pk)
    page = log_in(browser, live_server.url, "bob", 390, 844)
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    table = page.locator("#gang-ranks")
    expect(table.locator("tbody tr")).to_have_count(2)
    expect(table.locator("tr[data-rank='1'] .badge")).to_have_text("placed")
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    box = page.locator("#gang").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    gangs.claim_rank(job.pk, hosts[1].pk)  # the second host starts: the page follows without a reload
    expect(table.locator("tr[data-rank='1'] .badge")).to_have_text("running")
    (SHOTS / "gang").mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "gang" / "ranks-phone.png"), full_page=True)
    assert Job.objects.get(pk=job.pk).status == Job.Status.RUNNING
    assert GangMember.objects.filter(job=job, state=GangMember.State.RUNNING).count() == 2


def test_the_per_host_utilization_chart_draws_every_host_and_follows_new_samples(cast, live_server, browser,
                                                                                 _storage):
    import time

    from playwright.sync_api import expect

    from jobs.live import metrics
    from tests.live_support import drop_streams

    drop_streams()
    hosts = [trn1("trn1-a", ""), trn1("trn1-b", "")]
    job = gang(cast, hosts)
    place(job, hosts)
    for host in hosts:
        gangs.claim_rank(job.pk, host.pk)

    def sample(host, util: float) -> None:
        metrics.publish(host.name, {"ts": time.time(), "kind": "neuron", "util": {str(c): util for c in range(32)},
                                    "mem": {}, "job": {}}, {})

    sample(hosts[0], 70.0)
    sample(hosts[1], 30.0)
    violations: list[str] = []
    page = log_in(browser, live_server.url, "bob", 390, 844)
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    chart = page.locator("#gang-util-chart")
    expect(chart.locator("g.trace.scatter")).to_have_count(2)
    expect(chart.locator(".legendtext")).to_have_text(["rank 0 · trn1-a", "rank 1 · trn1-b"])
    expect(page.locator("#gang-ranks tr[data-rank='1'] .util-now")).to_have_text("30 %")
    sample(hosts[1], 90.0)  # a new sample: the chart and the table follow without a reload
    expect(page.locator("#gang-ranks tr[data-rank='1'] .util-now")).to_have_text("90 %")
    page.wait_for_function("() => document.getElementById('gang-util-chart').data[1].y.length === 2")
    box = chart.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    (SHOTS / "gang").mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "gang" / "utilization-phone.png"), full_page=True)
    assert violations == []
    drop_streams()
