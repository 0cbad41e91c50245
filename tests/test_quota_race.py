"""Quotas cannot be raced: real PostgreSQL, real concurrent transactions (threads,
each with its own database connection), a sampler watching from outside.

- 100 concurrent submissions at a team with room for exactly 10 pending jobs admit
  exactly 10, and usage is never seen above the limit;
- concurrent dispatch runs hand out exactly the cores the team may hold;
- finish / cancel / timeout / reap / preempt racing on one running job: exactly one
  wins, and the job's cores and attempt are released exactly once.
"""
from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection

from jobs.lifecycle import scheduler
from jobs.lifecycle import states
from jobs.lifecycle.forms import InferenceForm
from jobs.models import CoreAllocation, Host, Job, JobAttempt, JobEvent, TeamQuota, UserBudget
from jobs.quotas.selectors import clear_usage_cache
from jobs.lifecycle.services import SubmitRefused, job_submit
from jobs.quotas.services import quota_update

S = Job.Status
# PostgreSQL allows 100 connections; at most this many threads hold one at once
# (each still its own), leaving room for the sampler, the test and anything else.
MAX_CONNECTIONS = 48

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _settings(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.FAIRSHARE_CACHE_S = 0
    clear_usage_cache()


class Sampler(threading.Thread):
    """Polls `measure()` on its own connection until stopped; keeps the maximum."""

    def __init__(self, measure):
        super().__init__(daemon=True)
        self.measure, self.stop, self.seen, self.samples = measure, threading.Event(), 0, 0

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.seen = max(self.seen, self.measure())
                self.samples += 1
        finally:
            connection.close()

    def __enter__(self) -> "Sampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(10)


def in_threads(count: int, work) -> list:
    """Run work(i) for i in range(count) on `count` threads released together; each
    thread uses (and closes) its own database connection."""
    go = threading.Event()
    gate = threading.Semaphore(MAX_CONNECTIONS)

    def call(i: int):
        go.wait()
        with gate:
            try:
                return work(i)
            finally:
                connection.close()

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(call, i) for i in range(count)]
        go.set()
        return [f.result(timeout=120) for f in futures]


def test_100_concurrent_submissions_admit_exactly_the_10_that_fit(cast, tiny_model, cpu_host):
    TeamQuota.objects.filter(team=cast.vision).update(max_pending=10)

    def submit(i: int) -> str:
        form = InferenceForm(data={"model": tiny_model.pk, "prompts": f"prompt {i}", "max_new_tokens": 2,
                                   "temperature": 0, "family": "cpu", "cores": 1}, team=cast.vision)
        assert form.is_valid(), form.errors
        try:
            job_submit(team=cast.vision, user=cast.bob, form=form)
        except SubmitRefused as exc:
            return exc.code
        return "admitted"

    with Sampler(lambda: Job.objects.filter(team=cast.vision, status=S.PENDING).count()) as sampler:
        outcomes = Counter(in_threads(100, submit))
    assert outcomes == {"admitted": 10, "too_many_pending": 90}
    assert Job.objects.filter(team=cast.vision).count() == 10
    assert sampler.samples > 0 and sampler.seen <= 10


def test_concurrent_dispatch_runs_hand_out_exactly_the_cores_the_team_may_hold(cast, cpu_host):
    Host.objects.filter(pk=cpu_host.pk).update(core_ids=list(range(16)))
    quota_update(team=cast.vision, values={"families": {"cpu": {"guaranteed_cores": 4, "borrow_limit": 2}}})
    Job.objects.bulk_create([Job(team=cast.vision, user=cast.bob, kind="inference", family="cpu", cores=1)
                             for _ in range(30)])

    def used() -> int:
        return CoreAllocation.objects.filter(team=cast.vision).count()

    with Sampler(used) as sampler:
        placed = in_threads(8, lambda i: scheduler.dispatch().placed)
    assert sum(len(p) for p in placed) == 6
    assert used() == 6 and Job.objects.filter(status=S.QUEUED).count() == 6
    assert CoreAllocation.objects.filter(borrowed=True).count() == 2
    cores = list(CoreAllocation.objects.values_list("core", flat=True))
    assert len(set(cores)) == 6
    assert sampler.seen <= 6


RACERS = {
    "finish": lambda pk: states.mark_finished(pk, S.SUCCEEDED, message="done"),
    "cancel": lambda pk: states.mark_finished(pk, S.CANCELLED, failure="cancelled", message="stopped on request"),
    "timeout": lambda pk: states.mark_finished(pk, S.FAILED, failure="timed_out", message="timed out"),
    "reap": lambda pk: states.requeue(pk, sources=(S.RUNNING,), kind="worker_lost", message="worker lost"),
    "preempt": lambda pk: states.requeue(pk, kind="preempted", message="preempted by team audio"),
}


def test_finish_cancel_timeout_reap_and_preempt_release_a_job_exactly_once(cast, cpu_host):
    jobs = Job.objects.bulk_create([Job(team=cast.vision, user=cast.bob, kind="inference", family="cpu", cores=1)
                                    for _ in range(4)])
    scheduler.dispatch()
    for job in jobs:
        assert states.mark_running(job.pk, cpu_host.pk)
    names = list(RACERS)
    for job in jobs:
        wins = in_threads(len(names), lambda i: (names[i], RACERS[names[i]](job.pk)))
        winners = [name for name, won in wins if won]
        assert len(winners) == 1, wins
        attempt = JobAttempt.objects.get(job=job)
        assert attempt.ended_at is not None and attempt.core_seconds >= 0
        expected = {"finish": "succeeded", "cancel": "cancelled", "timeout": "failed"}.get(winners[0], "requeued")
        assert attempt.outcome == expected
        assert not CoreAllocation.objects.filter(job=job).exists()
        ends = JobEvent.objects.filter(job=job, kind__in=[S.SUCCEEDED, S.CANCELLED, S.FAILED, S.PENDING])
        assert ends.count() == 1  # one transition out of running, one event


def test_a_submit_wakes_the_scheduler_only_after_its_job_is_committed(cast, tiny_model, cpu_host, monkeypatch):
    """The kick must come after the COMMIT (the scheduler reads from its own
    connection), and a refused submit must leave nothing behind and the connection
    usable."""
    import psycopg

    from jobs.lifecycle import services

    assert not connection.in_atomic_block
    db = connection.settings_dict
    seen = []

    def kick():  # what the scheduler would see, from its own connection
        with psycopg.connect(host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"]) as other:
            seen.append(other.execute("SELECT count(*) FROM jobs_job WHERE team_id = %s",
                                      [cast.vision.pk]).fetchone()[0])

    monkeypatch.setattr(services, "kick_dispatch", kick)
    TeamQuota.objects.filter(team=cast.vision).update(max_pending=1)

    def submit():
        form = InferenceForm(data={"model": tiny_model.pk, "prompts": "hi", "max_new_tokens": 2, "temperature": 0,
                                   "family": "cpu", "cores": 1}, team=cast.vision)
        assert form.is_valid(), form.errors
        return job_submit(team=cast.vision, user=cast.bob, form=form)

    job = submit()
    assert seen == [1]
    assert job.pk and Job.objects.get(pk=job.pk).status == S.PENDING
    assert list(JobEvent.objects.filter(job=job).values_list("kind", "actor_id")) == [("pending", cast.bob.pk)]
    with pytest.raises(SubmitRefused) as refused:
        submit()
    assert refused.value.code == "too_many_pending" and seen == [1]
    assert Job.objects.filter(team=cast.vision).count() == 1  # the connection still works
    TeamQuota.objects.filter(team=cast.vision).update(max_pending=2)
    assert submit().pk != job.pk and seen == [1, 2]


def test_a_submit_that_fails_in_the_database_raises_django_s_error_and_leaves_nothing(cast, tiny_model, cpu_host,
                                                                                     monkeypatch):
    """The job's event points at a job that does not exist: PostgreSQL checks the
    foreign key at COMMIT, so the error comes with the end of the transaction,
    after the job was inserted. Nothing of the submit may remain, no kick may be
    sent, and the connection must go on working."""
    from django.db import utils

    from jobs.lifecycle import services

    def dangling_event(job_id: int, kind: str, message: str = "", actor=None, **data):
        return JobEvent.objects.create(job_id=job_id + 1_000_000, kind=kind, message=message, actor=actor, data=data)

    kicks = []
    monkeypatch.setattr(states, "event", dangling_event)
    monkeypatch.setattr(services, "kick_dispatch", lambda: kicks.append(1))
    form = InferenceForm(data={"model": tiny_model.pk, "prompts": "hi", "max_new_tokens": 2, "temperature": 0,
                               "family": "cpu", "cores": 1}, team=cast.vision)
    assert form.is_valid(), form.errors
    with pytest.raises(utils.IntegrityError):
        job_submit(team=cast.vision, user=cast.bob, form=form)
    assert kicks == []
    assert not Job.objects.filter(team=cast.vision).exists() and not JobEvent.objects.exists()


def test_concurrent_submissions_of_one_user_admit_only_what_fits_their_hard_cap(cast, tiny_model, cpu_host):
    """bob's cap is 5 NeuronCore-hours; each job may use 1 core for 1 hour: of 20 at
    once, exactly 5 are admitted (each admitted job's worst case counts against the cap)."""
    UserBudget.objects.create(team=cast.vision, user=cast.bob, monthly_core_hours=5)

    def submit(i: int) -> str:
        form = InferenceForm(data={"model": tiny_model.pk, "prompts": f"prompt {i}", "max_new_tokens": 2,
                                   "temperature": 0, "family": "cpu", "cores": 1, "max_runtime_s": 3600},
                             team=cast.vision)
        assert form.is_valid(), form.errors
        try:
            job_submit(team=cast.vision, user=cast.bob, form=form)
        except SubmitRefused as exc:
            return exc.code
        return "admitted"

    outcomes = Counter(in_threads(20, submit))
    assert outcomes == {"admitted": 5, "user_budget_exceeded": 15}
    assert Job.objects.filter(team=cast.vision, user=cast.bob).count() == 5
