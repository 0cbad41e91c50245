"""jobs.execution.run in-process (the Celery task's body) with a real zygote-forked
child: everything a finished job must have on record, and the statement budget of
the worker's hot path (issue #3: every statement costs the worker and PostgreSQL)."""
from __future__ import annotations

import os
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from neuron_workers import execution
from jobs.lifecycle import states
from jobs.models import Artifact, CoreAllocation, Job, JobAttempt, JobEvent, JobLogChunk
from tests.conftest import api_client
from tests.test_api_jobs import finetune_body, inference_body, post_json

pytestmark = pytest.mark.django_db(transaction=True)

# A job over before its first heartbeat (JobRecorder), BEGIN and COMMIT counted:
# the claim's transaction (the job with host, model and dataset, read and locked;
# conditional UPDATE with the log size; event; log header; attempt row), the
# finish's transaction (conditional UPDATE with the child's pid and log size, the
# attempt read and closed, the cores freed, event, the notification outbox's read of the
# team's subscriptions, log, artifacts), then "anything pending to dispatch?".
WORKER_STATEMENTS = 18


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
    # metrics.jsonl: a cpu inference job reports each request's latency (request_ms)
    assert set(Artifact.objects.filter(job=job).values_list("name", flat=True)) == {
        "outputs.jsonl", "log.txt", "metrics.jsonl"}


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
    from jobs import wake
    from jobs.live import store

    settings.HOST_NAME = cpu_host.name
    client = api_client(cast.bob)
    job = queued_job(client, tiny_model, cpu_host)
    if waiting:  # another job of the family, still pending
        assert post_json(client, "/api/v1/jobs", inference_body(tiny_model)).status_code == 201
    assert Job.objects.filter(status="pending", family="cpu").exists() == waiting
    store.redis().delete(wake.KICK_FLAG)  # no kick pending (the submits' kicks set it)
    kicks = []
    monkeypatch.setattr(wake, "kick_dispatch", lambda: kicks.append(1))
    assert execution.run(job.pk) == "succeeded"
    assert len(kicks) == (1 if waiting else 0)


def test_a_finished_run_leaves_a_pending_kick_to_serve_its_freed_cores(cast, tiny_model, cpu_host, settings,
                                                                    monkeypatch):
    """A kick no dispatch run has served yet (the burst case) brings a run that starts
    after the outcome's commit: the run neither asks for waiting jobs nor kicks again."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from jobs import wake
    from jobs.live import store

    settings.HOST_NAME = cpu_host.name
    client = api_client(cast.bob)
    job = queued_job(client, tiny_model, cpu_host)
    assert post_json(client, "/api/v1/jobs", inference_body(tiny_model)).status_code == 201
    store.redis().set(wake.KICK_FLAG, 1, ex=5)
    kicks = []
    monkeypatch.setattr(wake, "kick_dispatch", lambda: kicks.append(1))
    try:
        with CaptureQueriesContext(connection) as queries:
            assert execution.run(job.pk) == "succeeded"
    finally:
        store.redis().delete(wake.KICK_FLAG)
    assert kicks == []
    assert not [q for q in queries.captured_queries if "LIMIT 1" in q["sql"] and "'pending'" in q["sql"]]


def _fields(obj) -> dict:
    return {f.attname: getattr(obj, f.attname) for f in type(obj)._meta.concrete_fields}


@pytest.mark.parametrize("kind", ["inference", "finetune"])
def test_the_claimed_job_is_loaded_exactly_as_the_orm_would(cast, tiny_model, dataset, cpu_host, kind):
    """claim() returns the job as the claim left it, with its host, model and
    dataset: every field must equal what a fresh select_related reads."""
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


@pytest.mark.parametrize("core_start, cores, host_name", [(0, 1, "inf2-a"), (4, 2, "trn1-ü")])
def test_the_claim_stores_the_attempt_header_as_python_writes_it(cast, tiny_model, cpu_host, core_start, cores,
                                                                  host_name):
    client = api_client(cast.bob)
    job = queued_job(client, tiny_model, cpu_host)
    Job.objects.filter(pk=job.pk).update(core_start=core_start, cores=cores, log_bytes=7)
    claimed = states.claim(job.pk, cpu_host.pk, host_name=host_name)
    header = states.attempt_header(1, host_name, claimed.core_range)
    assert claimed.core_range == (f"{core_start}-{core_start + 1}" if cores == 2 else str(core_start))
    (chunk,) = JobLogChunk.objects.filter(job=job)
    assert (chunk.offset, chunk.text) == (7, header)
    assert claimed.log_bytes == Job.objects.get(pk=job.pk).log_bytes == 7 + len(header.encode())
    # A second attempt's header follows the first attempt's log.
    assert states.requeue(job.pk, message="test")
    Job.objects.filter(pk=job.pk).update(status="queued", host=cpu_host, core_start=core_start)
    again = states.claim(job.pk, cpu_host.pk, host_name=host_name)
    assert again.attempts == 2
    last = JobLogChunk.objects.filter(job=job).order_by("offset").last()
    assert (last.offset, last.text) == (claimed.log_bytes, states.attempt_header(2, host_name, claimed.core_range))
    assert again.log_bytes == claimed.log_bytes + len(last.text.encode())


def test_the_recorder_holds_the_log_until_the_first_heartbeat_and_after_the_child_exited(cast, tiny_model, cpu_host):
    job = queued_job(api_client(cast.bob), tiny_model, cpu_host)
    claimed = states.claim(job.pk, cpu_host.pk, pid=1, host_name="h")
    recorder = execution.JobRecorder(claimed, cpu_host.pk)
    base = claimed.log_bytes

    def stored():
        row = Job.objects.get(pk=job.pk)
        texts = list(JobLogChunk.objects.filter(job=job, offset__gte=base).order_by("offset").values_list("text", flat=True))
        return texts, row.worker_pid, row.log_bytes - base

    recorder.on_start(4242)
    recorder.on_log(0, "one\n")
    assert stored() == ([], 1, 0)  # held: a short job stores it with its outcome
    recorder.heartbeat()
    assert stored() == (["one\n"], 4242, 4)
    recorder.on_log(4, "two \x00\n")  # a NUL (binary output) cannot go into PostgreSQL text
    assert stored() == (["one\n", "two \ufffd\n"], 4242, 4 + len("two \ufffd\n".encode()))
    recorder.on_exit()
    recorder.on_log(10, "three\n")
    chunks, fields = recorder.pending()
    assert chunks == [(base + 10, "three\n")] and fields == {"log_bytes": base + 16}
    assert stored()[0] == ["one\n", "two \ufffd\n"]
    recorder.flush_log()
    assert stored()[0] == ["one\n", "two \ufffd\n", "three\n"] and recorder.pending()[0] == []


def _recording(cast, tiny_model, cpu_host, log: str):
    """A claimed job whose recorder has started pid 4242 and read `log` from it."""
    job = queued_job(api_client(cast.bob), tiny_model, cpu_host)
    claimed = states.claim(job.pk, cpu_host.pk, host_name="h")
    recorder = execution.JobRecorder(claimed, cpu_host.pk)
    recorder.on_start(4242)
    recorder.on_log(0, log)
    return job, claimed, recorder


def test_a_heartbeat_stores_the_held_log_with_the_lease_in_one_update(cast, tiny_model, cpu_host):
    job, claimed, recorder = _recording(cast, tiny_model, cpu_host, "one\n")
    Job.objects.filter(pk=job.pk).update(heartbeat_at=None)
    with CaptureQueriesContext(connection) as queries:
        recorder.heartbeat()
    writes = [q["sql"].split()[0] for q in queries.captured_queries if q["sql"].split()[0] in ("INSERT", "UPDATE")]
    assert writes == ["INSERT", "UPDATE"]
    row = Job.objects.get(pk=job.pk)
    assert (row.worker_pid, row.log_bytes - claimed.log_bytes) == (4242, 4) and row.heartbeat_at is not None
    assert JobLogChunk.objects.filter(job=job, offset=claimed.log_bytes, text="one\n").exists()


def test_a_heartbeat_of_an_attempt_no_longer_ours_keeps_its_log_but_renews_nothing(cast, tiny_model, cpu_host):
    job, claimed, recorder = _recording(cast, tiny_model, cpu_host, "late\n")
    assert states.requeue(job.pk, message="preempted")
    recorder.heartbeat()
    row = Job.objects.get(pk=job.pk)
    assert row.status == "pending" and row.heartbeat_at is None and row.log_bytes - claimed.log_bytes == 5
    assert JobLogChunk.objects.filter(job=job, offset=claimed.log_bytes, text="late\n").exists()


def test_a_superseded_success_keeps_its_log_but_records_nothing_else(cast, tiny_model, cpu_host):
    from jobs.assets import storage
    from neuron_workers.process import Outcome

    job, claimed, recorder = _recording(cast, tiny_model, cpu_host, "done\n")
    recorder.on_exit()
    assert states.requeue(job.pk, message="preempted")
    workdir = storage.job_dir(job.pk) / "attempt-1"
    (workdir / "artifacts").mkdir(parents=True)
    (workdir / "artifacts" / "out.txt").write_text("x")
    outcome = Outcome(status="succeeded", exit_code=0, signal=None, result={"ok": 1}, error_code=None, error=None,
                      log_bytes=5, duration_s=0.1, pid=4242)
    assert execution.record_outcome(claimed, outcome, workdir, recorder) == "superseded"
    row = Job.objects.get(pk=job.pk)
    assert row.status == "pending" and row.result == {} and not Artifact.objects.filter(job=job).exists()
    assert JobLogChunk.objects.filter(job=job, text="done\n").exists()


def test_a_transition_takes_model_instances_none_filters_and_expressions(cast, tiny_model, cpu_host):
    """A related model is stored by its key, a None filter matches NULL (and only
    NULL), and an expression is computed by the database."""
    from django.db.models import F

    client = api_client(cast.bob)
    first, second = (post_json(client, "/api/v1/jobs", inference_body(tiny_model)).json()["id"] for _ in range(2))
    assert not states.mark_finished(first, "succeeded", sources=("pending",), extra_filter={"host_id": cpu_host.pk})
    assert states.mark_finished(first, "succeeded", sources=("pending",), extra_filter={"host_id": None},
                                output_model=tiny_model, cache_hit=True, result={"cache_hit": True})
    job = Job.objects.get(pk=first)
    assert (job.status, job.output_model_id, job.cache_hit, job.result) == ("succeeded", tiny_model.pk, True,
                                                                           {"cache_hit": True})
    assert job.finished_at is not None and not CoreAllocation.objects.filter(job=job).exists()
    assert list(JobEvent.objects.filter(job=job).values_list("kind", flat=True)) == ["pending", "succeeded"]
    before = Job.objects.get(pk=second).max_attempts
    assert states.transition(second, ["pending"], "cancelled", max_attempts=F("max_attempts") + 5)
    assert Job.objects.get(pk=second).max_attempts == before + 5


def test_a_finished_attempt_is_charged_its_cores_times_its_duration(cast, tiny_model, cpu_host):
    """Closing the attempt charges its cores times the time from its start to its end."""
    job = queued_job(api_client(cast.bob), tiny_model, cpu_host)
    assert states.claim(job.pk, cpu_host.pk) is not None
    JobAttempt.objects.filter(job=job).update(started_at=timezone.now() - timedelta(seconds=100.25), cores=3)
    assert states.mark_finished(job.pk, "succeeded")
    attempt = JobAttempt.objects.get(job=job)
    assert attempt.outcome == "succeeded"
    assert attempt.core_seconds == pytest.approx(3 * (attempt.ended_at - attempt.started_at).total_seconds(), abs=0.01)
    assert attempt.core_seconds == pytest.approx(3 * 100.25, abs=3)
