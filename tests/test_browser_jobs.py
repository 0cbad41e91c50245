"""A person's path through the job pages in real headless Chromium: bob logs in,
submits an inference job from the form, watches the job page reach "succeeded" in
place (no reload), and reads the output; charlie, of another team, gets a 404.

Runs the whole system: pytest-django's live_server (the web app), a real Celery
worker subprocess (scheduler + host.test-host queues, cpu backend) and Chromium via
Playwright's sync API. A screenshot of the finished job page is saved under
test-artifacts/ for a human to look at."""
from __future__ import annotations

import re

import pytest

from conftest import SHOTS, log_in
from jobs.lifecycle import selectors
from jobs.models import Job

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PROMPT = "Hello from the browser test"


def test_bob_watches_an_inference_job_succeed_in_place_and_charlie_gets_404(
        cast, tiny_model, cpu_host, celery_worker_proc, live_server, browser):
    from playwright.sync_api import expect

    page = log_in(browser, live_server.url, "bob")
    page.click("text=New job")
    page.click("a[role=menuitem]:has-text('Inference')")
    page.wait_for_url(re.compile(r"/teams/vision/jobs/new/inference/$"))
    page.select_option("#id_model", str(tiny_model.pk))
    page.fill("#id_prompts", PROMPT)
    page.fill("#id_max_new_tokens", "8")
    page.fill("#id_temperature", "0")
    page.click("button:has-text('Submit inference job')")
    page.wait_for_url(re.compile(r"/jobs/\d+/$"))
    job_id = int(re.search(r"/jobs/(\d+)/$", page.url).group(1))

    # Mark this document: a reload (by hand or by script) would lose the mark.
    page.evaluate("window.__sameDocument = true; window.__statusElement = document.getElementById('job-status')")
    status = page.locator("#job-status")
    assert status.inner_text() in ("pending", "queued", "running")
    try:
        expect(status).to_have_text("succeeded", timeout=120_000)
    except AssertionError:
        job = Job.objects.get(pk=job_id)
        raise AssertionError(f"job {job_id} is {job.status} ({job.reason_code}: {job.reason}); worker log:\n"
                             + celery_worker_proc.log_path.read_text()[-4000:]) from None
    assert page.evaluate("window.__sameDocument === true"), "the page was reloaded"
    assert page.evaluate("document.getElementById('job-status') === window.__statusElement"), "badge was replaced"

    # The timeline, log and result section were filled in while we watched.
    expect(page.locator("#timeline")).to_contain_text("running")
    expect(page.locator("#timeline")).to_contain_text("succeeded")
    expect(page.locator("#log")).to_contain_text("attempt 1 on test-host")
    expect(page.locator("#outputs")).to_be_visible()
    rows = selectors.inference_outputs(Job.objects.get(pk=job_id))
    assert [r.prompt for r in rows] == [PROMPT]
    expect(page.locator("#outputs tbody tr").first.locator("td.output")).to_have_text(rows[0].output)
    expect(page.locator("#result")).to_contain_text("Latency p50")
    expect(page.locator("#cancel-form")).to_have_count(0)

    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "browser-inference-job.png"), full_page=True)
    page.context.close()

    intruder = log_in(browser, live_server.url, "charlie")
    response = intruder.goto(f"{live_server.url}/jobs/{job_id}/")
    assert response.status == 404
    assert PROMPT not in intruder.content()
    intruder.context.close()
