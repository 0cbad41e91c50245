"""An admin raises a team's quota on the quota page in real headless Chromium; the
team's pending job starts (a real Celery worker runs the dispatch that the change
kicks), and the audit trail on the team page shows the change.

Runs the whole system: pytest-django's live_server, a real Celery worker subprocess
(scheduler + host.test-host queues) and Chromium via Playwright's sync API.
Screenshots land in test-artifacts/ for a human to look at."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.db import connections

from conftest import PASSWORD, ROOT, wait_for
from jobs.forms import InferenceForm
from jobs.models import AuditEntry, Job, JobEvent
from jobs.services import job_submit, quota_update

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-gpu"]
SHOTS = ROOT / "test-artifacts"


@pytest.fixture(autouse=True)
def _settings(monkeypatch, settings):
    # Playwright's sync API runs an asyncio loop in this thread; the test's own ORM
    # calls (fixtures, assertions) are still plain synchronous code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
        connections.close_all()  # see test_browser_jobs: the loop hides the connection from teardown


def test_an_admin_raises_a_quota_and_the_waiting_job_starts(cast, tiny_model, cpu_host, celery_worker_proc,
                                                            live_server, browser):
    from playwright.sync_api import expect

    quota_update(team=cast.vision, values={"families": {"cpu": {"guaranteed_cores": 0, "borrow_limit": 0}}})
    form = InferenceForm(data={"model": tiny_model.pk, "prompts": "hello", "max_new_tokens": 2, "temperature": 0,
                               "family": "cpu", "cores": 1}, team=cast.vision)
    assert form.is_valid(), form.errors
    job = job_submit(team=cast.vision, user=cast.bob, form=form)
    wait_for(lambda: Job.objects.get(pk=job.pk).reason_code == "waiting_for_quota", timeout=30,
             message="the worker's dispatch to explain the wait")

    page = browser.new_context(viewport={"width": 1600, "height": 900}).new_page()
    page.set_default_timeout(15_000)
    page.goto(f"{live_server.url}/login/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/teams/[\w-]+/jobs/$"))

    page.goto(f"{live_server.url}/quotas/")
    row = page.locator("#team-vision")
    expect(row.locator('[data-family="cpu"] .in-use')).to_have_text("0")
    row.locator('[name="cpu_guaranteed_cores"]').fill("2")
    row.locator("button:has-text('Save')").click()
    page.wait_for_url(re.compile(r"/quotas/#team-vision$"))
    expect(page.locator(".message-success")).to_contain_text("family.cpu.guaranteed_cores 0 → 2")
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "quotas.png"), full_page=True)

    started = wait_for(lambda: Job.objects.filter(pk=job.pk).exclude(status=Job.Status.PENDING).first(),
                       timeout=60, message="the pending job to start after the quota change")
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
