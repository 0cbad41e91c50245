"""A user's hard cap in a team (UserBudget): over it, or with a job that could take
them over it (cores x max_runtime_s counted for every unfinished job), a user cannot
submit, with the reason; the team's other members are not affected. The race (many
submits at once) is in test_quota_race.py."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.lifecycle import states
from jobs.models import Job, JobAttempt, UserBudget
from jobs.quotas.policy import UserCap, user_cap_decision
from jobs.quotas.selectors import user_cap
from tests.conftest import api_client
from tests.test_submit import submit_inference
from jobs.lifecycle.services import SubmitRefused

S = Job.Status


def test_the_cap_policy_refuses_when_used_up_or_when_the_job_could_exceed_it():
    assert user_cap_decision("vision", UserCap("bob", 10, 2, 3), 5).ok
    over = user_cap_decision("vision", UserCap("bob", 10, 10.2, 0), 0.1)
    assert over.code == "user_budget_exhausted" and over.sentence == (
        "bob has used 10.2 of their 10 NeuronCore-hours this month in team vision")
    held = user_cap_decision("vision", UserCap("bob", 10, 2, 3), 5.5)
    assert held.code == "user_budget_exceeded"
    assert "has 5.0 left of their 10" in held.sentence and "3.0 held by their unfinished jobs" in held.sentence


def test_a_job_that_fits_the_cap_is_admitted_and_the_next_that_does_not_is_refused(cast, tiny_model, cpu_host):
    UserBudget.objects.create(team=cast.vision, user=cast.bob, monthly_core_hours=1.5)
    submit_inference(cast.vision, cast.bob, tiny_model, max_runtime_s=3600)
    with pytest.raises(SubmitRefused) as exc:
        submit_inference(cast.vision, cast.bob, tiny_model, max_runtime_s=3600)
    assert exc.value.code == "user_budget_exceeded" and exc.value.field == "max_runtime_s"
    assert "bob has 0.5 left of their 1.5" in exc.value.message
    submit_inference(cast.vision, cast.bob, tiny_model, max_runtime_s=1800)  # a shorter limit fits
    submit_inference(cast.vision, cast.alice, tiny_model, max_runtime_s=3600)  # alice has no cap
    assert Job.objects.filter(user=cast.bob).count() == 2


def test_a_user_over_their_cap_this_month_cannot_submit(cast, tiny_model, cpu_host):
    UserBudget.objects.create(team=cast.vision, user=cast.bob, monthly_core_hours=2)
    job = Job.objects.create(team=cast.vision, user=cast.bob, kind="inference", family="cpu", cores=2,
                             status=S.SUCCEEDED)
    start = timezone.now() - timedelta(minutes=61)
    JobAttempt.objects.create(job=job, team=cast.vision, user=cast.bob, kind="inference", family="cpu", number=1,
                              cores=2, started_at=start, ended_at=start + timedelta(minutes=60), core_seconds=7200)
    cap = user_cap(cast.vision, cast.bob)
    assert cap.used == pytest.approx(2.0) and cap.reserved == 0
    with pytest.raises(SubmitRefused) as exc:
        submit_inference(cast.vision, cast.bob, tiny_model, max_runtime_s=60)
    assert exc.value.code == "user_budget_exhausted"
    assert exc.value.message == "bob has used 2.0 of their 2 NeuronCore-hours this month in team vision"


def test_a_running_job_holds_only_what_is_left_of_its_max_runtime(cast, cpu_host):
    UserBudget.objects.create(team=cast.vision, user=cast.bob, monthly_core_hours=100)
    Job.objects.create(team=cast.vision, user=cast.bob, kind="inference", family="cpu", cores=2,
                       status=S.RUNNING, max_runtime_s=7200, started_at=timezone.now() - timedelta(hours=1))
    Job.objects.create(team=cast.vision, user=cast.bob, kind="inference", family="cpu", cores=1,
                       status=S.PENDING, max_runtime_s=1800)
    Job.objects.create(team=cast.vision, user=cast.bob, kind="inference", family="cpu", cores=4, status=S.SUCCEEDED)
    assert user_cap(cast.vision, cast.bob).reserved == pytest.approx(2 * 1 + 0.5, abs=0.01)
    assert user_cap(cast.vision, cast.alice) is None


def test_a_finished_job_gives_its_reservation_back(cast, tiny_model, cpu_host):
    UserBudget.objects.create(team=cast.vision, user=cast.bob, monthly_core_hours=1)
    job = submit_inference(cast.vision, cast.bob, tiny_model, max_runtime_s=3600)
    with pytest.raises(SubmitRefused):
        submit_inference(cast.vision, cast.bob, tiny_model, max_runtime_s=3600)
    assert states.mark_finished(job.pk, S.CANCELLED, sources=(S.PENDING,), failure="cancelled")
    submit_inference(cast.vision, cast.bob, tiny_model, max_runtime_s=3600)


def test_the_api_and_the_dry_run_give_the_reason(cast, tiny_model, cpu_host):
    UserBudget.objects.create(team=cast.vision, user=cast.bob, monthly_core_hours=0.5)
    body = {"team": "vision", "kind": "inference", "model": tiny_model.pk, "prompts": ["hi"], "max_new_tokens": 2,
            "family": "cpu", "cores": 1, "max_runtime_s": 3600}
    bob = api_client(cast.bob)
    for url in ("/api/v1/jobs?dry_run=true", "/api/v1/jobs"):
        r = bob.post(url, json.dumps(body), content_type="application/json")
        assert r.status_code == 400, r.content
        assert r.json()["code"] == "user_budget_exceeded" and "bob has 0.5 left" in r.json()["detail"]
    assert not Job.objects.exists()


def test_a_user_without_a_cap_costs_submit_no_query_of_its_own(cast, tiny_model, cpu_host):
    """The cap is read with the locked quota row: the statements of a submit are the
    same with no UserBudget in the team as before caps existed (no UserBudget query)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    submit_inference(cast.vision, cast.bob, tiny_model)
    with CaptureQueriesContext(connection) as queries:
        submit_inference(cast.vision, cast.bob, tiny_model)
    assert not any(q["sql"].startswith('SELECT "jobs_userbudget"') for q in queries)  # only the quota row's subquery
    assert any('FROM "jobs_userbudget"' in q["sql"] for q in queries)
    UserBudget.objects.create(team=cast.vision, user=cast.bob, monthly_core_hours=0.01)
    with pytest.raises(SubmitRefused) as exc:
        submit_inference(cast.vision, cast.bob, tiny_model, max_runtime_s=3600)
    assert exc.value.code == "user_budget_exceeded"
