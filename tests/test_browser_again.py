""""Run again" and the same job from a terminal, in real headless Chromium: bob opens
a job's page, copies its command, and Run again submits an equal job from the
prefilled form."""
from __future__ import annotations

import re

import pytest

from conftest import log_in
from jobs.models import Job
from tests.conftest import api_client

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_run_again_submits_an_equal_job_and_the_commands_copy(cast, tiny_model, cpu_host, live_server, browser):
    from playwright.sync_api import expect

    response = api_client(cast.bob).post(
        "/api/v1/jobs", {"team": "vision", "kind": "inference", "model": tiny_model.pk,
                         "prompts": ["first prompt", "second 'quoted' prompt"], "max_new_tokens": 5,
                         "temperature": 0.25, "seed": 9, "max_runtime_s": 900}, content_type="application/json")
    assert response.status_code == 201, response.content
    original = Job.objects.get(pk=response.json()["id"])

    page = log_in(browser, live_server.url, "bob")
    page.goto(f"{live_server.url}/jobs/{original.pk}/")
    page.click("#same-job summary")
    command = page.locator("#again-command")
    expect(command).to_contain_text("neurondeck submit inference --team vision")
    expect(page.locator("#again-curl")).to_contain_text(f"{live_server.url}/api/v1/jobs")
    expect(page.locator("#again-file")).to_contain_text("kind: inference")
    copy = page.locator("button[data-copy=again-command]")
    expect(copy).to_be_visible()
    copy.click()
    expect(page.locator("button[data-copy=again-command] + .copied")).to_have_text(re.compile(r"Copied|Selected"))

    page.click("#run-again")
    page.wait_for_url(re.compile(rf"/teams/vision/jobs/new/inference/\?again={original.pk}$"))
    expect(page.locator("#id_prompts")).to_have_value("first prompt\nsecond 'quoted' prompt")
    expect(page.locator("#id_model")).to_have_value(str(tiny_model.pk))
    expect(page.locator("#id_max_new_tokens")).to_have_value("5")
    expect(page.locator("#id_max_runtime_s")).to_have_value("900")
    page.click("button:has-text('Submit inference job')")
    page.wait_for_url(re.compile(r"/jobs/\d+/$"))
    again = Job.objects.get(pk=int(re.search(r"/jobs/(\d+)/$", page.url).group(1)))
    assert again.pk != original.pk and again.user == cast.bob
    assert (again.kind, again.family, again.cores, again.max_runtime_s, again.model_id, again.spec) == \
           (original.kind, original.family, original.cores, original.max_runtime_s, original.model_id, original.spec)
