"""A hypothesis state machine over random submit / dispatch / start / finish /
cancel / timeout / reap / preempt / late-worker-report sequences, against real
PostgreSQL through the real services, scheduler and state transitions.

Invariants after every step:
- a team's used cores == Σ cores of its queued + running jobs, ≤ guarantee + borrowing
  cap per family, and its non-borrowed cores ≤ its guarantee;
- no core is held twice, and only queued/running jobs hold cores;
- no job is both running and pending: a pending or finished job holds no cores, no
  host and no open attempt; a running job has exactly one open attempt;
- usage is released exactly once: a closed attempt never changes again, and a worker
  reporting on an attempt that was preempted or requeued changes nothing.
"""
from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Count, Sum
from django.utils import timezone
from hypothesis import HealthCheck, settings as hsettings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from neuron_workers import execution
from jobs.lifecycle import scheduler
from jobs.lifecycle import states
from jobs.lifecycle.forms import InferenceForm
from jobs.models import CoreAllocation, FamilyQuota, Host, Job, JobAttempt, ModelAsset, Role
from jobs.quotas.selectors import clear_usage_cache
from jobs.lifecycle.services import SubmitRefused, job_cancel, job_submit
from jobs.quotas.services import quota_update
from jobs.teams.services import membership_set, team_create

S = Job.Status
# cpu (guaranteed, borrow limit). The fleet has 6 cores: red may borrow all of it, so
# blue's guaranteed jobs often have to preempt red's borrowers.
QUOTAS = {"red": (2, 4), "blue": (3, 1)}


class QuotaMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # Each example runs in a savepoint rolled back at teardown: a fresh world.
        self._atomic = transaction.atomic()
        self._atomic.__enter__()
        clear_usage_cache()
        self.user = get_user_model().objects.create_user("sm-user", password="x")
        self.teams = {}
        self.models = {}
        for slug, (guaranteed, borrow) in QUOTAS.items():
            team = team_create(slug=slug, name=slug)
            membership_set(team=team, user=self.user, role=Role.MANAGER)
            cpu = {"guaranteed_cores": guaranteed, "borrow_limit": borrow}
            quota_update(team=team, values={"max_pending": 6, "families": {"cpu": cpu}})
            self.teams[slug] = team
            self.models[slug] = ModelAsset.objects.create(team=team, name="m", path="models/m")
        now = timezone.now()
        self.hosts = [Host.objects.create(name="sm-a", family="cpu", core_ids=list(range(4)), last_heartbeat=now),
                      Host.objects.create(name="sm-b", family="cpu", core_ids=list(range(2)), last_heartbeat=now)]
        self.closed: dict[int, tuple] = {}  # attempt id -> (ended_at, core_seconds, outcome) once closed
        self.snapshots: list[Job] = []  # jobs as their worker loaded them when it claimed them

    def teardown(self) -> None:
        transaction.set_rollback(True)
        self._atomic.__exit__(None, None, None)

    def pick(self, data, statuses) -> Job | None:
        ids = list(Job.objects.filter(status__in=statuses).order_by("pk").values_list("pk", flat=True))
        return Job.objects.get(pk=data.draw(st.sampled_from(ids))) if ids else None

    # --- steps ------------------------------------------------------------------

    @initialize(red_jobs=st.integers(2, 6))
    def red_borrows(self, red_jobs: int) -> None:
        """Often start from a fleet that red fills beyond its guarantee, so that blue's
        guaranteed work has borrowers to preempt."""
        self.submit("red", 1, red_jobs)
        self.dispatch(start_all=True)

    @rule(team=st.sampled_from(sorted(QUOTAS)), cores=st.integers(1, 3), count=st.integers(1, 3))
    def submit(self, team: str, cores: int, count: int) -> None:
        for _ in range(count):
            form = InferenceForm(data={"model": self.models[team].pk, "prompts": "p", "max_new_tokens": 1,
                                       "temperature": 0, "family": "cpu", "cores": cores}, team=self.teams[team])
            assert form.is_valid(), form.errors
            try:
                job_submit(team=self.teams[team], user=self.user, form=form)
            except SubmitRefused as exc:
                assert exc.code == "too_many_pending"

    @rule(start_all=st.booleans())
    def dispatch(self, start_all: bool) -> None:
        """A dispatch run (which may preempt borrowers); then maybe every worker claims its job."""
        scheduler.dispatch()
        if start_all:
            for job in Job.objects.filter(status=S.QUEUED):
                self.claim(job)

    def claim(self, job: Job) -> None:
        assert states.mark_running(job.pk, job.host_id)
        self.snapshots.append(Job.objects.get(pk=job.pk))

    @rule(cores=st.integers(1, 3))
    def blue_submits_and_dispatches(self, cores: int) -> None:
        """Blue asks for cores within its guarantee: a dispatch that may preempt red."""
        self.submit("blue", cores, 1)
        self.dispatch(start_all=True)

    @rule(data=st.data())
    def start(self, data) -> None:
        job = self.pick(data, [S.QUEUED])
        if job is not None:
            self.claim(job)

    @rule(data=st.data())
    def finish(self, data) -> None:
        job = self.pick(data, [S.RUNNING])
        if job is not None:
            assert states.mark_finished(job.pk, S.SUCCEEDED, message="done")

    @rule(data=st.data())
    def time_out(self, data) -> None:
        job = self.pick(data, [S.RUNNING])
        if job is not None:
            assert states.mark_finished(job.pk, S.FAILED, failure="timed_out", message="timed out")

    @rule(data=st.data())
    def cancel(self, data) -> None:
        job = self.pick(data, [S.PENDING, S.QUEUED, S.RUNNING])
        if job is not None:
            assert job_cancel(job=job, user=self.user)
            if job.status == S.RUNNING:  # its worker sees cancel_requested and stops it
                assert states.mark_finished(job.pk, S.CANCELLED, failure="cancelled", message="stopped on request")

    @rule(data=st.data())
    def reap(self, data) -> None:
        job = self.pick(data, [S.RUNNING])
        if job is not None:
            Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
            scheduler.reap()
            assert Job.objects.get(pk=job.pk).status in (S.PENDING, S.FAILED, S.CANCELLED)

    @rule(data=st.data())
    def preempt(self, data) -> None:
        borrowed = sorted(set(CoreAllocation.objects.filter(borrowed=True).values_list("job_id", flat=True)))
        if borrowed:
            job_id = data.draw(st.sampled_from(borrowed))
            assert states.requeue(job_id, kind="preempted", message="preempted by the state machine")

    @rule(data=st.data(), status=st.sampled_from(["succeeded", "cancelled", "failed", "timed_out"]))
    def late_worker_report(self, data, status: str) -> None:
        """A worker whose attempt was preempted or requeued reports after the fact."""
        stale = [s for s in self.snapshots
                 if not Job.objects.filter(pk=s.pk, status=S.RUNNING, attempts=s.attempts, host_id=s.host_id).exists()]
        if not stale:
            return
        snapshot = data.draw(st.sampled_from(stale))
        before = Job.objects.filter(pk=snapshot.pk).values("status", "attempts", "finished_at").get()
        outcome = SimpleNamespace(status=status, result={}, duration_s=1.0, error_code="crashed", error="boom")
        assert execution.record_outcome(snapshot, outcome, workdir=None) == "superseded"
        assert Job.objects.filter(pk=snapshot.pk).values("status", "attempts", "finished_at").get() == before

    # --- invariants ---------------------------------------------------------------

    @invariant()
    def cores_match_running_reservations_within_limits(self) -> None:
        held = dict(CoreAllocation.objects.values_list("job_id").annotate(n=Count("id")).order_by())
        active = dict(Job.objects.filter(status__in=Job.ACTIVE).values_list("pk", "cores"))
        assert held == active
        limits = {q.team_id: q for q in FamilyQuota.objects.filter(family="cpu")}
        for team in self.teams.values():
            used = CoreAllocation.objects.filter(team=team).count()
            reserved = Job.objects.filter(team=team, status__in=Job.ACTIVE).aggregate(s=Sum("cores"))["s"] or 0
            assert used == reserved <= limits[team.pk].max_cores
            assert CoreAllocation.objects.filter(team=team, borrowed=False).count() <= limits[team.pk].guaranteed_cores

    @invariant()
    def no_core_is_held_twice(self) -> None:
        pairs = list(CoreAllocation.objects.values_list("host_id", "core"))
        assert len(pairs) == len(set(pairs))

    @invariant()
    def no_job_is_both_running_and_pending(self) -> None:
        open_attempts = dict(JobAttempt.objects.filter(ended_at__isnull=True).values_list("job_id")
                             .annotate(n=Count("id")).order_by())
        for pk, status, host_id, core_start in Job.objects.values_list("pk", "status", "host_id", "core_start"):
            if status == S.RUNNING:
                assert open_attempts.get(pk) == 1
            else:
                assert pk not in open_attempts
            if status == S.PENDING:
                assert host_id is None and core_start is None

    @invariant()
    def usage_is_released_exactly_once(self) -> None:
        for pk, ended, seconds, outcome in JobAttempt.objects.filter(ended_at__isnull=False).values_list(
                "pk", "ended_at", "core_seconds", "outcome"):
            assert self.closed.setdefault(pk, (ended, seconds, outcome)) == (ended, seconds, outcome)


@pytest.mark.django_db
def test_quota_invariants_hold_over_random_sequences(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.FAIRSHARE_CACHE_S = 0
    run_state_machine_as_test(QuotaMachine, settings=hsettings(
        max_examples=25, stateful_step_count=40, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]))
