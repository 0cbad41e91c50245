"""Suspend and Resume of fine-tunes through the API and the page's forms, and the
fine-tune options checked at submit (field errors). A running job really stopping
and resuming from its checkpoint is in test_train_resume_e2e and test_browser_train."""
from __future__ import annotations

import json

import pytest

from jobs.lifecycle import scheduler, states
from jobs.models import CoreAllocation, Job, JobAttempt, JobEvent
from tests.conftest import api_client
from tests.test_api_jobs import finetune_body, inference_body, post_json, submit
from tests.test_cli import run  # noqa: F401 - the CLI fixture

S = Job.Status


@pytest.fixture
def finetune(bob, tiny_model, dataset, cpu_host) -> dict:
    return submit(bob, finetune_body(tiny_model, dataset))


def test_bob_suspends_his_pending_finetune_and_resumes_it_and_it_is_placed_again(bob, finetune):
    suspended = bob.post(f"/api/v1/jobs/{finetune['id']}/suspend")
    assert suspended.status_code == 200
    doc = suspended.json()
    assert doc["status"] == "suspended" and doc["reason_code"] == "suspended"
    assert doc["events"][-1] | {"at": None} == {**doc["events"][-1], "kind": "suspended", "actor": "bob",
                                                "message": "suspended by bob", "at": None}
    assert scheduler.dispatch().placed == []  # a suspended job is not in the queue

    resumed = bob.post(f"/api/v1/jobs/{finetune['id']}/resume").json()
    assert resumed["status"] == "pending" and resumed["events"][-1]["kind"] == "pending"
    assert "resumed by bob" in resumed["events"][-1]["message"]
    assert scheduler.dispatch().placed == [finetune["id"]]


def test_suspending_a_running_finetune_frees_its_cores_at_once_and_closes_its_attempt(bob, finetune, cpu_host):
    scheduler.dispatch()
    assert states.mark_running(finetune["id"], cpu_host.pk)
    assert CoreAllocation.objects.filter(job_id=finetune["id"]).exists()
    doc = bob.post(f"/api/v1/jobs/{finetune['id']}/suspend").json()
    assert doc["status"] == "suspended" and doc["host"] is None and doc["core_range"] is None
    assert not CoreAllocation.objects.filter(job_id=finetune["id"]).exists()
    assert list(JobAttempt.objects.filter(job_id=finetune["id"]).values_list("outcome", flat=True)) == ["suspended"]
    # The worker's next cancel check sees that the job is no longer its own (and stops it).
    assert not Job.objects.filter(pk=finetune["id"], status=S.RUNNING).exists()


def test_only_finetunes_can_be_suspended(bob, tiny_model, cpu_host):
    doc = submit(bob, inference_body(tiny_model))
    response = bob.post(f"/api/v1/jobs/{doc['id']}/suspend")
    assert response.status_code == 409 and response.json()["code"] == "not_suspendable"
    assert "only fine-tune jobs can be suspended" in response.json()["detail"]
    assert response.json()["detail"].endswith("is of kind inference")  # read "is a inference job"
    assert Job.objects.get(pk=doc["id"]).status == S.PENDING


def test_resuming_a_job_that_is_not_suspended_and_suspending_a_finished_one_are_409s(bob, finetune):
    response = bob.post(f"/api/v1/jobs/{finetune['id']}/resume")
    assert response.status_code == 409 and response.json()["code"] == "not_suspended"
    assert bob.post(f"/api/v1/jobs/{finetune['id']}/cancel").status_code == 200
    response = bob.post(f"/api/v1/jobs/{finetune['id']}/suspend")
    assert response.status_code == 409 and "is cancelled" in response.json()["detail"]


def test_a_suspended_job_can_be_cancelled(bob, finetune):
    bob.post(f"/api/v1/jobs/{finetune['id']}/suspend")
    doc = bob.post(f"/api/v1/jobs/{finetune['id']}/cancel").json()
    assert doc["status"] == "cancelled"
    assert bob.post(f"/api/v1/jobs/{finetune['id']}/resume").status_code == 409


def test_vera_the_viewer_cannot_suspend_and_charlie_gets_404(cast, finetune):
    vera, charlie = api_client(cast.vera), api_client(cast.charlie)
    assert vera.post(f"/api/v1/jobs/{finetune['id']}/suspend").status_code == 403
    assert charlie.post(f"/api/v1/jobs/{finetune['id']}/suspend").status_code == 404
    assert charlie.post(f"/api/v1/jobs/{finetune['id']}/resume").status_code == 404
    assert Job.objects.get(pk=finetune["id"]).status == S.PENDING


def test_the_page_suspends_and_resumes_with_its_forms(client, cast, finetune):
    client.force_login(cast.bob)
    page = client.get(f"/jobs/{finetune['id']}/").content.decode()
    assert 'id="suspend-form"' in page and 'id="resume-form"' in page
    response = client.post(f"/jobs/{finetune['id']}/suspend/", follow=True)
    assert "suspended: its cores are free" in response.content.decode()
    assert Job.objects.get(pk=finetune["id"]).status == S.SUSPENDED
    status = client.get(f"/jobs/{finetune['id']}/status.json").json()
    assert (status["status"], status["can_suspend"], status["can_resume"]) == ("suspended", False, True)
    client.post(f"/jobs/{finetune['id']}/resume/")
    assert Job.objects.get(pk=finetune["id"]).status == S.PENDING
    assert JobEvent.objects.filter(job_id=finetune["id"], kind="suspended", actor=cast.bob).exists()


@pytest.mark.parametrize(("extra", "field", "words"), [
    ({"checkpoint_every": 0}, "checkpoint_every", "greater than or equal to 1"),
    ({"keep_checkpoints": 1000}, "keep_checkpoints", "less than or equal to 100"),
    ({"lr_schedule": "cubic"}, "lr_schedule", "cubic"),
    ({"tensor_parallel_size": 2}, "tensor_parallel_size", "needs a Neuron family"),
    ({"zero_1": True}, "zero_1", "needs a Neuron family"),
])
def test_bad_training_options_are_refused_naming_the_field(bob, tiny_model, dataset, cpu_host, extra, field, words):
    response = post_json(bob, "/api/v1/jobs", finetune_body(tiny_model, dataset, **extra))
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["field"] == field and words in " ".join(body["errors"][field])


def test_a_finetune_spec_carries_its_checkpoint_options_with_their_defaults(bob, tiny_model, dataset, cpu_host):
    doc = submit(bob, finetune_body(tiny_model, dataset, checkpoint_every=7))
    spec = Job.objects.get(pk=doc["id"]).spec
    assert (spec["checkpoint_every"], spec["keep_checkpoints"], spec["lr_schedule"]) == (7, 3, "constant")


@pytest.mark.django_db(transaction=True)
def test_the_command_line_suspends_and_resumes_a_finetune(cast, tiny_model, dataset, cpu_host, run):
    job_id = json.loads(run(cast.bob, "submit", "finetune", "--model", str(tiny_model.pk), "--dataset",
                            str(dataset.pk), "--steps", "5", "--checkpoint-every", "2", "--json").output)["id"]
    assert Job.objects.get(pk=job_id).spec["checkpoint_every"] == 2
    suspended = run(cast.bob, "suspend", str(job_id))
    assert suspended.exit_code == 0 and f"job {job_id}: suspended" in suspended.output
    listed = run(cast.bob, "list", "--status", "suspended", "--json")
    assert [row["id"] for row in json.loads(listed.output)["items"]] == [job_id]
    resumed = run(cast.bob, "resume", str(job_id))
    assert resumed.exit_code == 0 and "pending (back in the queue)" in resumed.output
    again = run(cast.bob, "resume", str(job_id))
    assert again.exit_code != 0 and "not suspended" in again.output
