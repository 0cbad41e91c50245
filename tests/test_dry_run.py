"""What-if before submitting: a dry run creates nothing (no row, no file) and agrees
with what a real submit and the next dispatch then do: the same refusal (code and
sentence), the same host and cores, the same waiting reason."""
from __future__ import annotations

import json
import os

import pytest

from jobs.lifecycle import scheduler
from jobs.models import Job, JobEvent
from jobs.quotas.services import quota_update
from tests.conftest import api_client
from tests.test_backfill import running_job
from tests.test_scheduling import set_family


pytestmark = pytest.mark.usefixtures("fresh_scheduler")


def body(model, **extra) -> dict:
    return {"team": "vision", "kind": "inference", "family": "cpu", "cores": 1, "model": model.pk,
            "prompts": ["hello"], **extra}


def post(client, payload, dry: bool):
    return client.post("/api/v1/jobs" + ("?dry_run=true" if dry else ""), data=json.dumps(payload),
                       content_type="application/json")


def files(root) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


def test_a_dry_run_creates_nothing_and_says_where_the_job_would_run(cast, tiny_model, cpu_host, settings):
    set_family(cast.vision, "cpu", 4)
    client = api_client(cast.bob)
    before = (Job.objects.count(), JobEvent.objects.count(), files(settings.STORAGE_ROOT))
    answer = post(client, body(tiny_model, cores=2, max_runtime_s=600), dry=True)
    assert answer.status_code == 200, answer.content
    answer = answer.json()
    assert (Job.objects.count(), JobEvent.objects.count(), files(settings.STORAGE_ROOT)) == before
    assert answer["would_run_now"] == {"host": "test-host", "cores": "0-1", "borrowed": False, "preempts": 0}
    assert answer["estimate"]["summary"].startswith("now")
    # No finished job of the team yet: said as a sentence (it read "time limits × the no finished jobs...").
    assert "runtimes = the time limits (the team has no finished jobs yet" in answer["estimate"]["basis"]
    assert "× the no" not in answer["estimate"]["basis"] and "over the 0 jobs holding" in answer["estimate"]["basis"]
    assert answer["cost"]["core_hours_at_most"] == pytest.approx(2 * 600 / 3600, abs=1e-3)
    assert answer["cost"]["fits_budget"] is True
    real = post(client, body(tiny_model, cores=2, max_runtime_s=600), dry=False)
    assert real.status_code == 201
    placed = scheduler.dispatch()
    job = Job.objects.get(pk=placed.placed[0])
    assert (job.host.name, job.core_start, job.cores) == ("test-host", 0, 2)


def test_a_dry_run_that_would_wait_gives_the_reason_the_dispatcher_then_writes(cast, tiny_model, cpu_host):
    set_family(cast.vision, "cpu", 8)
    running_job(cast.vision, cast.bob, 3, 3600, 60)
    client = api_client(cast.bob)
    answer = post(client, body(tiny_model, cores=2), dry=True).json()
    assert answer["would_run_now"] is None
    assert answer["wait"]["reason_code"] == "no_free_cores_of_family"
    assert answer["estimate"]["in_s"] > 3000  # the running job's time limit, no history yet
    created = post(client, body(tiny_model, cores=2), dry=False).json()
    scheduler.dispatch()
    job = Job.objects.get(pk=created["id"])
    assert (job.reason_code, job.reason) == (answer["wait"]["reason_code"], answer["wait"]["reason"])


def test_a_dry_run_refuses_with_the_code_and_message_of_a_real_submit(cast, tiny_model, cpu_host):
    quota_update(team=cast.vision, values={"max_runtime_s": 100})
    client = api_client(cast.bob)
    dry = post(client, body(tiny_model, max_runtime_s=500), dry=True)
    real = post(client, body(tiny_model, max_runtime_s=500), dry=False)
    assert dry.status_code == real.status_code >= 400
    assert dry.json() == real.json()
    assert Job.objects.count() == 0


def test_charlie_cannot_dry_run_for_vision(cast, tiny_model, cpu_host):
    assert post(api_client(cast.charlie), body(tiny_model), dry=True).status_code == 404


def test_every_submit_form_has_a_check_button_whose_multipart_post_answers(cast, tiny_model, cpu_host):
    from django.test import Client

    set_family(cast.vision, "cpu", 4)
    browser = Client()
    browser.force_login(cast.bob)
    for kind in ("compile", "finetune", "inference"):
        page = browser.get(f"/teams/vision/jobs/new/{kind}/").content.decode()
        assert 'id="whatif-check"' in page and f'data-kind="{kind}"' in page and "jobs/whatif.js" in page
    # What whatif.js sends: the form's fields as multipart, plus team and kind.
    answer = browser.post("/api/v1/jobs?dry_run=true", {"team": "vision", "kind": "inference", "family": "cpu",
                                                         "cores": "1", "model": str(tiny_model.pk),
                                                         "prompts": "hello"})
    assert answer.status_code == 200, answer.content
    assert answer.json()["would_run_now"]["host"] == "test-host"
    assert Job.objects.count() == 0
