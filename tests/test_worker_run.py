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
from tests.test_api_jobs import finetune_body, inference_body, post_json

pytestmark = pytest.mark.django_db(transaction=True)

# claim (1 statement: update + event + attempt + the job with host, model and
# dataset), header + child pid, one log chunk + log size, BEGIN / finish (update +
# release + event, and "anything pending to dispatch?") / artifacts / COMMIT.
WORKER_STATEMENTS = 7


def queued_job(client, model, host, body: dict | None = None) -> Job:
    body = body or inference_body(model, prompts=["Hi"], max_new_tokens=1)
    response = post_json(client, "/api/v1/jobs", body)
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


def _fields(obj) -> dict:
    return {f.attname: getattr(obj, f.attname) for f in type(obj)._meta.concrete_fields}


@pytest.mark.parametrize("kind", ["inference", "finetune"])
def test_the_claimed_job_is_loaded_exactly_as_the_orm_would(cast, tiny_model, dataset, cpu_host, kind):
    """claim() builds the job and its host, model and dataset from the claiming
    statement's own row: every field must equal what select_related reads."""
    client = api_client(cast.bob)
    body = finetune_body(tiny_model, dataset) if kind == "finetune" else None
    job = queued_job(client, tiny_model, cpu_host, body)
    claimed = states.claim(job.pk, cpu_host.pk, pid=4321)
    assert claimed is not None
    orm = Job.objects.select_related("host", "model", "dataset", "team", "user").get(pk=job.pk)
    assert _fields(claimed) == _fields(orm)
    assert (claimed.status, claimed.attempts, claimed.worker_pid) == ("running", 1, 4321)
    assert isinstance(claimed.spec, dict) and claimed.spec == orm.spec
    assert _fields(claimed.host) == _fields(orm.host) and isinstance(claimed.host.core_ids, list)
    assert _fields(claimed.model) == _fields(orm.model)
    if kind == "finetune":
        assert _fields(claimed.dataset) == _fields(orm.dataset)
    else:
        assert claimed.dataset is None
    assert claimed.team == orm.team and claimed.user == orm.user  # lazily loaded
    assert not claimed._state.adding and claimed._state.db == orm._state.db
    (attempt,) = JobAttempt.objects.filter(job=job)
    assert (attempt.number, attempt.host_id, attempt.team_id, attempt.user_id) == (
        1, cpu_host.pk, orm.team_id, orm.user_id)
