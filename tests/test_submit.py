"""Submission, dispatch placement and cancel against real PostgreSQL (no worker)."""
import pytest
from django.core.exceptions import ValidationError

from jobs.lifecycle import scheduler
from jobs.lifecycle.forms import InferenceForm
from jobs.models import CoreAllocation, Job
from jobs.lifecycle.services import SubmitRefused, job_cancel, job_submit


def submit_inference(team, user, model, **extra):
    form = InferenceForm(data={"model": model.pk, "prompts": "hello", "max_new_tokens": 4, "temperature": 0,
                               "family": "cpu", "cores": 1, **extra}, team=team)
    assert form.is_valid(), form.errors
    return job_submit(team=team, user=user, form=form)


def test_it_creates_a_pending_job_with_an_event(cast, tiny_model, cpu_host):
    job = submit_inference(cast.vision, cast.bob, tiny_model)
    assert job.status == Job.Status.PENDING
    assert list(job.events.values_list("kind", flat=True)) == ["pending"]


def test_dispatch_places_jobs_on_distinct_contiguous_cores(cast, tiny_model, cpu_host):
    jobs = [submit_inference(cast.vision, cast.bob, tiny_model, cores=2) for _ in range(3)]
    report = scheduler.dispatch()
    assert len(report.placed) == 2 and report.waiting == 1
    placed = Job.objects.filter(status=Job.Status.QUEUED).order_by("core_start")
    assert [j.core_range for j in placed] == ["0-1", "2-3"]
    assert CoreAllocation.objects.count() == 4
    waiting = Job.objects.get(status=Job.Status.PENDING)
    assert waiting.reason_code == "no_free_cores_of_family"
    assert waiting.pk == jobs[2].pk


def test_it_refuses_a_request_no_host_can_ever_hold(cast, tiny_model, cpu_host):
    with pytest.raises(SubmitRefused) as exc:
        submit_inference(cast.vision, cast.bob, tiny_model, cores=5)
    assert exc.value.code == "request_too_large" and "largest available is 4" in exc.value.message
    assert not Job.objects.exists()


def test_a_viewer_cannot_submit(cast, tiny_model, cpu_host):
    with pytest.raises(SubmitRefused) as exc:
        submit_inference(cast.vision, cast.vera, tiny_model)
    assert exc.value.status == 403


def test_another_teams_model_is_an_unknown_model(cast, tiny_model, cpu_host):
    form = InferenceForm(data={"model": tiny_model.pk, "prompts": "x", "max_new_tokens": 4, "temperature": 0,
                               "family": "cpu", "cores": 1}, team=cast.audio)
    assert not form.is_valid()
    assert "Unknown model" in form.errors["model"][0]


def test_cancel_of_a_queued_job_frees_its_cores_once(cast, tiny_model, cpu_host):
    job = submit_inference(cast.vision, cast.bob, tiny_model)
    scheduler.dispatch()
    job.refresh_from_db()
    assert job.status == Job.Status.QUEUED
    assert job_cancel(job=job, user=cast.bob)
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED and job.cancel_requested
    assert not CoreAllocation.objects.exists()
    assert not job_cancel(job=job, user=cast.bob)


def test_dispatch_places_nothing_on_a_replay_host(cast, tiny_model, cpu_host):
    from jobs.models import Host

    Host.objects.filter(pk=cpu_host.pk).update(replay=True)
    job = submit_inference(cast.vision, cast.bob, tiny_model)
    assert scheduler.dispatch().placed == []
    job.refresh_from_db()
    assert job.status == Job.Status.PENDING


def test_a_silent_draining_host_keeps_its_drain_and_gives_back_queued_jobs(cast, tiny_model, cpu_host, settings):
    from datetime import timedelta

    from django.utils import timezone

    from jobs.models import Host

    job = submit_inference(cast.vision, cast.bob, tiny_model)
    scheduler.dispatch()
    old = timezone.now() - timedelta(seconds=settings.HOST_OFFLINE_AFTER_S + 60)
    Host.objects.filter(pk=cpu_host.pk).update(state=Host.State.DRAINING, last_heartbeat=old)
    Job.objects.filter(pk=job.pk).update(queued_at=old)
    counts = scheduler.reap()
    cpu_host.refresh_from_db()
    job.refresh_from_db()
    assert cpu_host.state == Host.State.DRAINING
    assert counts["requeued"] == 1 and job.status == Job.Status.PENDING and job.host_id is None
    assert not CoreAllocation.objects.filter(job=job).exists()


def test_the_budget_is_judged_by_the_exact_months_use_when_the_quick_bound_is_over_it(cast, tiny_model, cpu_host):
    """Submit first compares an upper bound of the month's use (whole spans of the
    attempts the roll-up has not folded) with the budget; a team near its budget gets
    the exact measure. An attempt that began last month counts only this month's part."""
    from datetime import timedelta

    from django.utils import timezone

    from jobs.models import JobAttempt, TeamQuota
    from jobs.quotas.selectors import core_hours_by_team

    now = timezone.now()
    old = Job.objects.create(team=cast.vision, user=cast.bob, kind="inference", family="cpu", cores=2,
                             status=Job.Status.SUCCEEDED, finished_at=now - timedelta(minutes=1))
    JobAttempt.objects.create(job=old, team=cast.vision, user=cast.bob, kind="inference", family="cpu", host=cpu_host,
                              number=1, cores=2, started_at=now - timedelta(days=40),
                              ended_at=now - timedelta(minutes=1), outcome="succeeded")
    exact = core_hours_by_team([cast.vision.pk])[cast.vision.pk]
    assert exact < 2 * 31 * 24 < 2 * 40 * 24 - 1  # only this month's part of the 40 days

    TeamQuota.objects.filter(team=cast.vision).update(monthly_core_hours=exact + 0.5)
    assert submit_inference(cast.vision, cast.bob, tiny_model).status == Job.Status.PENDING

    TeamQuota.objects.filter(team=cast.vision).update(monthly_core_hours=exact)
    with pytest.raises(SubmitRefused) as exc:
        submit_inference(cast.vision, cast.bob, tiny_model)
    assert exc.value.code == "budget_exhausted"
    assert exc.value.message.startswith(f"team vision has used {exact:.1f} of its {exact:g} NeuronCore-hours")


def test_a_model_or_dataset_field_accepts_exactly_the_ids_it_lists(cast, tiny_model, dataset, cpu_host):
    """The HTML select (queryset) and the submit-time lookup (one hand-written query)
    are built from the same conditions: team, and for compile / fine-tune bases
    uncompiled models only."""
    from jobs.lifecycle.forms import JOB_FORMS, TeamObjectField
    from jobs.models import Dataset, ModelAsset

    compiled = ModelAsset.objects.create(team=cast.vision, name="tiny-cpu", format=ModelAsset.Format.TORCHSCRIPT,
                                         parent=tiny_model, path=tiny_model.path)
    theirs = ModelAsset.objects.create(team=cast.audio, name="other", path=tiny_model.path)
    their_data = Dataset.objects.create(team=cast.audio, name="other", path=dataset.path)
    candidates = [tiny_model, compiled, theirs, dataset, their_data]
    accepted_by = {}
    for form_class in JOB_FORMS.values():
        form = form_class(team=cast.vision)
        for name, field in form.fields.items():
            if not isinstance(field, TeamObjectField):
                continue
            listed = {obj.pk for obj in field.queryset}
            accepted = set()
            for obj in (c for c in candidates if isinstance(c, field.queryset.model)):
                try:
                    assert field.clean(str(obj.pk)).pk == obj.pk
                    accepted.add(obj.pk)
                except ValidationError:
                    pass
            assert accepted == listed, (form_class, name)
            accepted_by[(form_class.kind, name)] = accepted
    assert accepted_by == {("compile", "model"): {tiny_model.pk}, ("finetune", "model"): {tiny_model.pk},
                           ("finetune", "dataset"): {dataset.pk}, ("inference", "model"): {tiny_model.pk, compiled.pk}}
