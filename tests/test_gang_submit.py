"""Submitting a gang: host_count and same_network through the API, the form and the
CLI's body; a field error naming what to change when no set of hosts could ever
hold it; a dry run that creates nothing and agrees with the real submit."""
from __future__ import annotations

import json

import pytest

from jobs.cli.jobfile import job_body
from jobs.lifecycle import scheduler
from jobs.models import GangMember, Job, JobEvent
from tests.conftest import api_client
from tests.test_api_jobs import finetune_body
from tests.test_scheduling import host, set_family


pytestmark = pytest.mark.usefixtures("fresh_scheduler")


@pytest.fixture
def cpu_pair(db):
    return [host(f"cpu-{i}", "cpu", 4, network="efa-a") for i in range(2)] + [host("cpu-2", "cpu", 4, network="efa-b")]


def post(client, payload, dry: bool = False):
    return client.post("/api/v1/jobs" + ("?dry_run=true" if dry else ""), data=json.dumps(payload),
                       content_type="application/json")


def test_a_gang_is_submitted_with_its_host_count(cast, tiny_model, dataset, cpu_pair):
    set_family(cast.vision, "cpu", 12)
    answer = post(api_client(cast.bob), finetune_body(tiny_model, dataset, cores=8, host_count=2, same_network=True))
    assert answer.status_code == 201, answer.content
    job = Job.objects.get(pk=answer.json()["id"])
    assert (job.cores, job.host_count, job.same_network) == (8, 2, True)
    assert "host_count" not in job.spec and "same_network" not in job.spec
    body = job_body({"team": "vision", "kind": "finetune", "family": "cpu", "cores": 8, "host_count": 2,
                     "same_network": True, "spec": {}})
    assert (body["host_count"], body["same_network"]) == (2, True)  # `neurondeck submit -f` sends it again


@pytest.mark.parametrize("extra, field, code", [
    ({"cores": 6, "host_count": 2}, "cores", "gang_whole_hosts"),
    ({"cores": 16, "host_count": 4}, "host_count", "gang_too_large"),
    ({"cores": 12, "host_count": 3, "same_network": True}, "host_count", "gang_too_large"),
    ({"cores": 8, "host_count": 0}, "host_count", "invalid"),
])
def test_a_gang_no_hosts_could_ever_hold_is_refused_naming_the_field(cast, tiny_model, dataset, cpu_pair, extra,
                                                                      field, code):
    answer = post(api_client(cast.bob), finetune_body(tiny_model, dataset, **extra))
    assert answer.status_code == 400, answer.content
    assert answer.json()["field"] == field and answer.json()["code"] == code
    assert not Job.objects.exists()


def test_only_a_finetune_runs_on_several_hosts(cast, tiny_model, cpu_pair):
    body = {"team": "vision", "kind": "inference", "family": "cpu", "cores": 8, "host_count": 2,
            "model": tiny_model.pk, "prompts": ["hi"]}
    answer = post(api_client(cast.bob), body)
    assert answer.status_code == 400 and answer.json()["field"] == "host_count"
    assert "fine-tune" in answer.json()["detail"]


def test_a_gangs_dry_run_creates_nothing_and_names_the_hosts_the_submit_gets(cast, tiny_model, dataset, cpu_pair):
    set_family(cast.vision, "cpu", 12)
    client = api_client(cast.bob)
    before = (Job.objects.count(), JobEvent.objects.count(), GangMember.objects.count())
    dry = post(client, finetune_body(tiny_model, dataset, cores=8, host_count=2, same_network=True), dry=True)
    assert dry.status_code == 200, dry.content
    assert (Job.objects.count(), JobEvent.objects.count(), GangMember.objects.count()) == before
    run = dry.json()["would_run_now"]
    assert run["hosts"] == ["cpu-0", "cpu-1"] and run["cores"] == "0-3"
    assert dry.json()["estimate"]["summary"].startswith("now")
    real = post(client, finetune_body(tiny_model, dataset, cores=8, host_count=2, same_network=True))
    assert scheduler.dispatch().placed == [real.json()["id"]]
    ranks = GangMember.objects.filter(job_id=real.json()["id"]).order_by("rank")
    assert [m.host.name for m in ranks] == run["hosts"]


def test_a_waiting_gangs_dry_run_says_why_and_when(cast, tiny_model, dataset, cpu_pair):
    set_family(cast.vision, "cpu", 16)
    client = api_client(cast.bob)
    small = post(client, finetune_body(tiny_model, dataset, cores=1, max_runtime_s=600))
    assert scheduler.dispatch().placed == [small.json()["id"]]  # one host is no longer idle
    dry = post(client, finetune_body(tiny_model, dataset, cores=12, host_count=3), dry=True).json()
    assert dry["would_run_now"] is None
    assert dry["wait"]["reason_code"] == "no_free_cores_of_family"
    assert "3 whole cpu hosts of 4 cores" in dry["wait"]["reason"]
    assert dry["estimate"]["estimated_start"] is not None  # when the small job's cores come back
    real = post(client, finetune_body(tiny_model, dataset, cores=12, host_count=3))
    scheduler.dispatch()
    job = Job.objects.get(pk=real.json()["id"])
    assert (job.status, job.reason_code, job.reason) == ("pending", dry["wait"]["reason_code"], dry["wait"]["reason"])
