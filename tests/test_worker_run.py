"""jobs.execution.run in-process (the Celery task's body) with a real zygote-forked
child: everything a finished job must have on record, and the statement budget of
the worker's hot path (issue #3: every statement costs the worker and PostgreSQL)."""
from __future__ import annotations

import os

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from jobs import execution, states
from jobs.models import Artifact, CoreAllocation, Job, JobAttempt, JobEvent, JobLogChunk
from tests.conftest import api_client
from tests.test_api_jobs import inference_body, post_json

pytestmark = pytest.mark.django_db(transaction=True)

# claim (1 statement: update + event + attempt), read the job, header + child pid,
# one log chunk + log size, BEGIN / finish (update + release + event) / artifacts /
# COMMIT (the finish also answers "anything pending to dispatch?").
WORKER_STATEMENTS = 8


def queued_job(client, model, host) -> Job:
    response = post_json(client, "/api/v1/jobs", inference_body(model, prompts=["Hi"], max_new_tokens=1))
    assert response.status_code == 201, response.content
    job = Job.objects.get(pk=response.json()["id"])
    CoreAllocation.objects.create(host=host, core=0, job=job, team=job.team, family=host.family)
    assert states.mark_queued(job, host.pk, 0)
    return job


def test_a_job_run_by_the_worker_is_fully_recorded_in_a_few_statements(cast, tiny_model, cpu_host, settings):
    settings.HOST_NAME = cpu_host.name
    client = api_client(cast.bob)
    assert execution.run(queued_job(client, tiny_model, cpu_host).pk) == "succeeded"  # starts the zygote
    job = queued_job(client, tiny_model, cpu_host)
    with CaptureQueriesContext(connection) as queries:
        assert execution.run(job.pk) == "succeeded"
    assert len(queries.captured_queries) <= WORKER_STATEMENTS, "\n".join(q["sql"][:120] for q in queries)

    job.refresh_from_db()
    assert job.status == "succeeded" and job.result["requests"] == 1 and job.attempts == 1
    assert job.started_at <= job.finished_at
    assert job.worker_pid and job.worker_pid != os.getpid()  # the job's child, not the worker
    assert [e.kind for e in JobEvent.objects.filter(job=job)][-3:] == ["queued", "running", "succeeded"]
    (attempt,) = JobAttempt.objects.filter(job=job)
    assert (attempt.number, attempt.outcome, attempt.host_id, attempt.cores) == (1, "succeeded", cpu_host.pk, 1)
    assert attempt.ended_at is not None and attempt.core_seconds > 0
    assert not CoreAllocation.objects.filter(job=job).exists()
    chunks = list(JobLogChunk.objects.filter(job=job).order_by("offset"))
    text = "".join(c.text for c in chunks)
    assert text.startswith(f"=== attempt 1 on {cpu_host.name} cores 0 ===\n") and "prompt 0:" in text
    assert job.log_bytes == len(text.encode())
    assert all(c.offset == sum(len(p.text.encode()) for p in chunks[:i]) for i, c in enumerate(chunks))
    # (no metrics.jsonl: an inference job reports no step metrics, and the file is
    # only created with the first one)
    assert set(Artifact.objects.filter(job=job).values_list("name", flat=True)) == {"outputs.jsonl", "log.txt"}


def test_a_second_delivery_of_a_claimed_job_changes_nothing(cast, tiny_model, cpu_host, settings):
    settings.HOST_NAME = cpu_host.name
    job = queued_job(api_client(cast.bob), tiny_model, cpu_host)
    assert execution.run(job.pk) == "succeeded"
    before = (JobEvent.objects.filter(job=job).count(), JobAttempt.objects.filter(job=job).count())
    assert execution.run(job.pk) == "not_claimed"
    assert (JobEvent.objects.filter(job=job).count(), JobAttempt.objects.filter(job=job).count()) == before


def test_a_cancelled_queued_job_is_not_claimed(cast, tiny_model, cpu_host, settings):
    settings.HOST_NAME = cpu_host.name
    job = queued_job(api_client(cast.bob), tiny_model, cpu_host)
    Job.objects.filter(pk=job.pk).update(cancel_requested=True)
    assert states.claim(job.pk, cpu_host.pk) is None
    assert Job.objects.get(pk=job.pk).status == "queued" and not JobAttempt.objects.filter(job=job).exists()


@pytest.mark.parametrize("waiting", [True, False])
def test_a_finished_run_wakes_the_scheduler_only_if_jobs_of_its_family_wait(cast, tiny_model, cpu_host, settings,
                                                                            monkeypatch, waiting):
    from jobs import services

    settings.HOST_NAME = cpu_host.name
    client = api_client(cast.bob)
    job = queued_job(client, tiny_model, cpu_host)
    if waiting:  # another job of the family, still pending
        assert post_json(client, "/api/v1/jobs", inference_body(tiny_model)).status_code == 201
    assert Job.objects.filter(status="pending", family="cpu").exists() == waiting
    kicks = []
    monkeypatch.setattr(services, "kick_dispatch", lambda: kicks.append(1))
    assert execution.run(job.pk) == "succeeded"
    assert len(kicks) == (1 if waiting else 0)
