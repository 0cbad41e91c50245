"""bob suspends a running fine-tune from its page and resumes it; it continues from its
checkpoint. Real headless Chromium, the live server, a real Celery worker running the
cpu backend; the page is also checked at phone width."""
from __future__ import annotations

import pytest

from conftest import SHOTS, log_in
from jobs.lifecycle import states
from jobs.models import CoreAllocation, Job, JobEvent, JobMetric, Kind
from tests.polling import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# Long enough that the run is still going when the page is open and bob clicks Suspend.
STEPS = 3000
SPEC = {"steps": STEPS, "learning_rate": 3e-3, "batch_size": 4, "sequence_length": 32, "seed": 1,
        "checkpoint_every": 2 * STEPS, "keep_checkpoints": 3, "lr_schedule": "constant"}


def test_bob_suspends_a_running_finetune_from_its_page_and_resumes_it_from_its_checkpoint(
        cast, tiny_model, dataset, cpu_host, celery_worker_proc, live_server, browser):
    from playwright.sync_api import expect

    job = Job.objects.create(team=cast.vision, user=cast.bob, kind=Kind.FINETUNE, spec=SPEC, family="cpu", cores=1,
                             model=tiny_model, dataset=dataset, reason_code="submitted",
                             reason="waiting for the scheduler")
    states.event(job.pk, "pending", "submitted by bob", actor=cast.bob)
    from jobs.wake import kick_dispatch

    kick_dispatch()
    wait_until(lambda: JobMetric.objects.filter(job=job, name="loss").exists(), 120,
               message="the fine-tune to report its first losses")

    page = log_in(browser, live_server.url, "bob", width=390, height=844)  # a phone
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    expect(page.locator("#job-status")).to_have_text("running")
    suspend = page.locator("#suspend-form button")
    expect(suspend).to_be_visible()
    assert suspend.bounding_box()["x"] + suspend.bounding_box()["width"] <= 390
    suspend.click()
    expect(page.locator("#job-status")).to_have_text("suspended")
    assert not CoreAllocation.objects.filter(job=job).exists()
    # The stopped attempt saves its step in the kill grace (after the status changed:
    # the worker stops the process then); the timeline shows it.
    wait_until(lambda: JobEvent.objects.filter(job=job, kind="checkpoint").exists(), 60,
               message="the suspended attempt to save its checkpoint")
    page.reload()
    expect(page.locator("#timeline")).to_contain_text("checkpoint at step")
    saved = JobEvent.objects.get(job=job, kind="checkpoint").data["step"]
    expect(page.locator("#resume-form button")).to_be_visible()
    expect(page.locator("#suspend-form")).to_be_hidden()
    page.screenshot(path=str(SHOTS / "job-suspended-phone.png"), full_page=True)

    page.locator("#resume-form button").click()
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=300_000)
    expect(page.locator("#timeline")).to_contain_text(f"resumed from step {saved} of {STEPS}")
    job.refresh_from_db()
    assert job.result["resumed_from_step"] == saved and job.result["steps"] == STEPS
    assert job.attempts == 2
