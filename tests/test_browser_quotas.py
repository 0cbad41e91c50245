"""An admin raises a team's quota on the quota page in real headless Chromium; the
team's pending job starts (a real Celery worker runs the dispatch that the change
kicks), and the audit trail on the team page shows the change.

Runs the whole system: pytest-django's live_server, a real Celery worker subprocess
(scheduler + host.test-host queues) and Chromium via Playwright's sync API.
Screenshots land in test-artifacts/ for a human to look at."""
from __future__ import annotations

import re

import pytest

from conftest import SHOTS, log_in
from jobs.lifecycle.forms import InferenceForm
from jobs.models import AuditEntry, Job, JobEvent
from jobs.lifecycle.services import job_submit
from jobs.quotas.services import quota_update
from tests.polling import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.django_db(transaction=True)]



def test_an_admin_raises_a_quota_and_the_waiting_job_starts(cast, tiny_model, cpu_host, celery_worker_proc,
                                                            live_server, browser):
    from playwright.sync_api import expect

    quota_update(team=cast.vision, values={"families": {"cpu": {"guaranteed_cores": 0, "borrow_limit": 0}}})
    form = InferenceForm(data={"model": tiny_model.pk, "prompts": "hello", "max_new_tokens": 2, "temperature": 0,
                               "family": "cpu", "cores": 1}, team=cast.vision)
    assert form.is_valid(), form.errors
    job = job_submit(team=cast.vision, user=cast.bob, form=form)
    wait_until(lambda: Job.objects.get(pk=job.pk).reason_code, 30, "the worker's dispatch to explain the wait",
               until=lambda code: code == "waiting_for_quota")

    page = log_in(browser, live_server.url, "admin", width=1600)

    page.goto(f"{live_server.url}/quotas/")
    row = page.locator("#team-vision")
    expect(row.locator('[data-family="cpu"] .in-use')).to_have_text("0")
    row.locator('[name="cpu_guaranteed_cores"]').fill("2")
    row.locator("button:has-text('Save')").click()
    page.wait_for_url(re.compile(r"/quotas/#team-vision$"))
    expect(page.locator(".message-success")).to_contain_text("family.cpu.guaranteed_cores 0 → 2")
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "quotas.png"), full_page=True)

    wait_until(lambda: Job.objects.get(pk=job.pk).status, 60, "the pending job to start after the quota change",
               until=lambda status: status != Job.Status.PENDING)
    started = Job.objects.get(pk=job.pk)
    assert JobEvent.objects.filter(job=started, kind="queued", message__startswith="placed on test-host").exists()
    assert AuditEntry.objects.filter(team=cast.vision, actor=cast.admin, subject="family.cpu.guaranteed_cores",
                                     old="0", new="2").exists()

    page.goto(f"{live_server.url}/teams/vision/")
    audit = page.locator("#audit tbody tr").first
    expect(audit).to_contain_text("admin")
    expect(audit).to_contain_text("family.cpu.guaranteed_cores")
    expect(audit.locator("td").nth(3)).to_have_text("0")
    expect(audit.locator("td").nth(5)).to_have_text("2")
    page.screenshot(path=str(SHOTS / "team-vision.png"), full_page=True)
