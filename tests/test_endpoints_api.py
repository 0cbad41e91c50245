"""The endpoints API: create / change / scale / delete with clear field errors, roles,
team isolation (another team's endpoint is a 404), the OpenAPI schema; and replicas
as jobs: placed within the team's quota and counted in its usage. No worker here:
replicas stay pending or are claimed by hand (tests/test_endpoints_e2e.py runs them)."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.api.endpoints import router
from jobs.endpoints.reconcile import reconcile_endpoint
from jobs.lifecycle import scheduler, states
from jobs.models import (CoreAllocation, Endpoint, EndpointRevision, FamilyQuota, Host, Job, Kind, Notification, Replica, Subscription,
                         TeamQuota)
from tests.conftest import api_client
from tests.endpoint_support import make_model

ID_URLS: dict[tuple[str, str], str] = {
    ("GET", "/endpoints/{endpoint_id}"): "/api/v1/endpoints/{id}",
    ("PATCH", "/endpoints/{endpoint_id}"): "/api/v1/endpoints/{id}",
    ("DELETE", "/endpoints/{endpoint_id}"): "/api/v1/endpoints/{id}",
    ("GET", "/endpoints/{endpoint_id}/events"): "/api/v1/endpoints/{id}/events",
}


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def model(cast):
    return make_model(cast.vision, cast.alice, "tiny-v1")


def post(client, url: str, body) -> "HttpResponse":  # noqa: F821
    return client.post(url, data=json.dumps(body), content_type="application/json")


def patch(client, url: str, body):
    return client.patch(url, data=json.dumps(body), content_type="application/json")


def create(client, served, **fields):
    body = {"name": "chat", "model": served.pk, "min_replicas": 1, "max_replicas": 2,
            "options": {"max_batch_size": 4, "max_concurrent": 8}, **fields}
    return post(client, "/api/v1/teams/vision/endpoints", body)


def test_a_member_creates_an_endpoint_and_its_first_replica_is_a_pending_serve_job(cast, cpu_host, model):
    response = create(api_client(cast.bob), model)
    assert response.status_code == 201, response.content
    doc = response.json()
    assert doc["name"] == "chat" and doc["revision"] == 1 and doc["serving_revision"] is None
    assert doc["url"].endswith("/endpoints/vision/chat/v1") and doc["health"] == "starting"
    assert doc["options"] == {"max_batch_size": 4, "max_seq_len": 256, "max_concurrent": 8}
    (replica,) = doc["replicas"]
    job = Job.objects.get(pk=replica["job_id"])
    assert (job.kind, job.status, job.cores, job.max_runtime_s, job.model_id) == (Kind.SERVE, "pending", 1, 0, model.pk)
    assert job.spec["max_batch_size"] == 4 and job.spec["replica_id"] == replica["id"]
    listed = api_client(cast.vera).get("/api/v1/teams/vision/endpoints").json()["endpoints"]
    assert [e["name"] for e in listed] == ["chat"]


@pytest.mark.parametrize("fields, field", [
    ({"name": "no spaces"}, "name"),
    ({"name": ""}, "name"),
    ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
    ({"max_replicas": 65}, "max_replicas"),
    ({"min_replicas": -1}, "min_replicas"),
    ({"cores_per_replica": 0}, "cores_per_replica"),
    ({"cores_per_replica": 64}, "cores_per_replica"),  # no cpu host can hold it
    ({"family": "tpu"}, "family"),
    ({"family": "inf2"}, "family"),  # no inf2 host is registered
    ({"options": {"max_batch_size": 0}}, "options.max_batch_size"),
    ({"options": {"max_seq_len": "long"}}, "options.max_seq_len"),
    ({"options": {"beam": 4}}, "options.beam"),
    ({"options": [1]}, "options"),
    ({"replicas": 3}, "replicas"),
    ({"min_replicas": True}, "min_replicas"),
    ({"model": 2**31 - 1}, "model"),
    # A JSON body is typed (jobs.api.body.json_type_errors): int() read "2", 1.5 and "١" (an Arabic-Indic one)
    ({"cores_per_replica": "2"}, "cores_per_replica"),
    ({"max_replicas": "١"}, "max_replicas"),
    ({"min_replicas": 1.0}, "min_replicas"),
    ({"name": 12345}, "name"),
    ({"options": {"max_batch_size": "4"}}, "options.max_batch_size"),
    ({"options": {"max_concurrent": 2.5}}, "options.max_concurrent"),
])
def test_bad_input_is_a_400_naming_the_field(cast, cpu_host, model, fields, field):
    response = create(api_client(cast.bob), model, **fields)
    assert response.status_code == 400, response.content
    body = response.json()
    assert field in body["errors"], body
    assert body["detail"].startswith("No endpoint was created") and not Endpoint.objects.exists()


def test_a_model_id_is_an_integer_not_a_float_or_a_string(cast, cpu_host, model):
    for written in (float(model.pk) + 0.5, str(model.pk)):
        response = create(api_client(cast.bob), model, model=written)
        assert response.status_code == 400 and "model" in response.json()["errors"], response.content
    assert not Endpoint.objects.exists()


def test_a_text_to_image_pipeline_cannot_be_served(cast, cpu_host, model):
    """Its replicas failed three times ("could not load a causal LM") and the rollout failed."""
    pipeline = make_model(cast.vision, cast.alice, "tiny-sd")
    pipeline.meta = {"diffusers": True}
    pipeline.save(update_fields=["meta"])
    response = create(api_client(cast.bob), pipeline)
    assert response.status_code == 400 and "does not generate text" in response.json()["errors"]["model"][0]
    endpoint = create(api_client(cast.bob), model).json()
    change = patch(api_client(cast.bob), f"/api/v1/endpoints/{endpoint['id']}", {"model": pipeline.pk})
    assert change.status_code == 400 and "model" in change.json()["errors"]
    assert Endpoint.objects.get().revision == 1


def test_another_teams_model_cannot_be_served(cast, cpu_host, model):
    theirs = make_model(cast.audio, cast.charlie, "audio-model")
    response = create(api_client(cast.bob), model, model=theirs.pk)
    assert response.status_code == 400 and "model" in response.json()["errors"]


def test_a_name_is_taken_until_its_endpoint_is_deleted(cast, cpu_host, model):
    client = api_client(cast.bob)
    first = create(client, model).json()
    again = create(client, model)
    assert again.status_code == 400 and "already has an endpoint named chat" in again.json()["errors"]["name"][0]
    assert client.delete(f"/api/v1/endpoints/{first['id']}").status_code == 202
    assert create(client, model).status_code == 201  # a deleting endpoint frees its name


def test_a_deleted_endpoints_revisions_read_as_stopped(cast, cpu_host, model):
    client = api_client(cast.bob)
    endpoint = create(client, model).json()
    assert client.delete(f"/api/v1/endpoints/{endpoint['id']}").status_code == 202
    reconcile_endpoint(endpoint["id"])  # its replica never started: nothing to drain
    assert Endpoint.objects.get(pk=endpoint["id"]).state == Endpoint.State.DELETED
    states = set(EndpointRevision.objects.filter(endpoint_id=endpoint["id"]).values_list("state", flat=True))
    assert states == {EndpointRevision.State.STOPPED}


def test_a_viewer_may_look_but_not_create_change_or_delete(cast, cpu_host, model):
    endpoint = create(api_client(cast.bob), model).json()
    vera = api_client(cast.vera)
    assert create(vera, model, name="other").status_code == 403
    assert patch(vera, f"/api/v1/endpoints/{endpoint['id']}", {"min_replicas": 2}).status_code == 403
    assert vera.delete(f"/api/v1/endpoints/{endpoint['id']}").status_code == 403
    assert vera.get(f"/api/v1/endpoints/{endpoint['id']}").status_code == 200


def test_a_team_not_allowed_to_serve_gets_a_clear_refusal(cast, cpu_host, model):
    TeamQuota.objects.filter(team=cast.vision).update(allowed_kinds=["inference"])
    response = create(api_client(cast.bob), model)
    assert response.status_code == 400
    assert "may not run serve jobs" in response.json()["detail"]
    assert list(response.json()["errors"]) == ["team"]  # the body has no kind field to name


def test_every_id_url_of_the_endpoints_api_is_in_this_files_scoping_table():
    with_ids = {(method, path.replace("{dbid:", "{")) for path, view in router.path_operations.items()
                if "endpoint_id}" in path for op in view.operations for method in op.methods}
    assert with_ids == set(ID_URLS)


@pytest.mark.parametrize("method,template", [(m, url) for (m, _), url in ID_URLS.items()],
                         ids=[f"{m} {p}" for m, p in ID_URLS])
def test_charlie_gets_404_for_visions_endpoint_and_changes_nothing(cast, cpu_host, model, method, template):
    endpoint = create(api_client(cast.bob), model).json()
    charlie = api_client(cast.charlie)

    def call(url):
        if method == "PATCH":
            return patch(charlie, url, {"min_replicas": 0})
        return getattr(charlie, method.lower())(url)

    response = call(template.format(id=endpoint["id"]))
    missing = call(template.format(id=2**31 - 1))
    assert response.status_code == 404 and response.json() == missing.json()
    assert b"chat" not in response.content
    row = Endpoint.objects.get(pk=endpoint["id"])
    assert (row.state, row.min_replicas) == ("active", 1)
    assert api_client(cast.charlie).get("/api/v1/teams/vision/endpoints").status_code == 404


def test_a_change_of_limits_rescales_and_a_change_of_options_starts_a_new_revision(cast, cpu_host, model):
    client = api_client(cast.bob)
    endpoint = create(client, model).json()
    url = f"/api/v1/endpoints/{endpoint['id']}"
    scaled = patch(client, url, {"min_replicas": 2})
    assert scaled.status_code == 200 and scaled.json()["desired_replicas"] == 2 and scaled.json()["revision"] == 1
    assert Replica.objects.filter(endpoint_id=endpoint["id"], revision=1).count() == 2
    assert patch(client, url, {"min_replicas": 3}).json()["errors"]["min_replicas"]
    rolled = patch(client, url, {"options": {"max_seq_len": 512}})
    assert rolled.status_code == 200 and rolled.json()["revision"] == 2
    assert rolled.json()["options"]["max_seq_len"] == 512
    new = Replica.objects.filter(endpoint_id=endpoint["id"], revision=2)
    assert new.count() == 2 and all(r.job.spec["max_seq_len"] == 512 for r in new)
    assert patch(client, url, {}).status_code == 400
    kinds = [e["kind"] for e in client.get(f"{url}/events").json()["events"]]
    assert kinds[0] == "rollout_started" and "limits_changed" in kinds and kinds[-1] == "created"


def test_the_endpoints_api_is_in_the_openapi_schema(cast):
    schema = api_client(cast.bob).get("/api/v1/openapi.json").json()
    assert {"/api/v1/teams/{slug}/endpoints", "/api/v1/endpoints/{endpoint_id}",
            "/api/v1/endpoints/{endpoint_id}/events"} <= set(schema["paths"])
    body = schema["paths"]["/api/v1/teams/{slug}/endpoints"]["post"]["requestBody"]["content"]["application/json"]
    assert "options" in body["schema"]["properties"]


def test_replicas_count_against_the_teams_quota_and_wait_beyond_it(cast, cpu_host, model):
    FamilyQuota.objects.filter(team=cast.vision, family="cpu").update(guaranteed_cores=1, borrow_limit=0)
    endpoint = create(api_client(cast.bob), model, min_replicas=2).json()
    scheduler.dispatch()
    jobs = Job.objects.filter(replica__endpoint_id=endpoint["id"]).order_by("pk")
    assert [j.status for j in jobs] == ["queued", "pending"]
    assert jobs[1].reason_code == "waiting_for_quota", jobs[1].reason


def test_a_replicas_core_hours_cost_and_idle_time_appear_in_the_teams_usage_under_its_kind(cast, cpu_host, model):
    from jobs.models import InstancePrice, MetricMinute

    InstancePrice.objects.create(instance_type="c7i.xlarge", usd_per_hour=4.0, cores=4)  # $1 a core-hour
    Host.objects.filter(pk=cpu_host.pk).update(instance_type="c7i.xlarge")
    endpoint = create(api_client(cast.bob), model).json()
    scheduler.dispatch()
    job = Job.objects.get(replica__endpoint_id=endpoint["id"])
    assert states.claim(job.pk, cpu_host.pk) is not None
    start = timezone.now().replace(second=0, microsecond=0) - timedelta(hours=2)
    Job.objects.filter(pk=job.pk).update(started_at=start)
    job.attempt_rows.update(started_at=start)
    # its one core measured 25 % busy every minute: 3/4 of its allocation idle
    MetricMinute.objects.bulk_create([MetricMinute(host=cpu_host, job=job, minute=start + timedelta(minutes=m),
                                                   core=job.core_start, util_mean=25.0, samples=60)
                                      for m in range(120)])
    Job.objects.filter(pk=job.pk).update(heartbeat_at=start + timedelta(hours=2))
    assert states.mark_finished(job.pk, "cancelled", message="drained", failure="cancelled")
    job.attempt_rows.update(ended_at=start + timedelta(hours=2), core_seconds=2 * 3600)
    today, since = timezone.localdate().isoformat(), timezone.localdate(start).isoformat()
    usage = api_client(cast.bob).get("/api/v1/teams/vision/usage", {"from": since, "to": today,
                                                                      "group_by": "kind"}).json()
    group = {g["key"]: g for g in usage["groups"]}["Endpoint replica"]
    assert group["allocated_core_hours"] == pytest.approx(2.0, abs=0.01), usage["groups"]
    assert group["cost_usd"] == pytest.approx(2.0, abs=0.02)
    assert group["idle_core_hours"] == pytest.approx(1.5, abs=0.02)
    assert group["idle_cost_usd"] == pytest.approx(1.5, abs=0.02)
    reconcile_endpoint(endpoint["id"])
    assert Replica.objects.get(job=job).state == "stopped"


def _running_ready_replica(cast, cpu_host, model, **fields) -> Replica:
    """Create the endpoint, place its replica, claim it as the worker would, and let it
    report ready (what the worker does with the server's report)."""
    from jobs.endpoints.replicas import replica_reported

    endpoint = create(api_client(cast.bob), model, **fields).json()
    scheduler.dispatch()
    replica = Replica.objects.get(endpoint_id=endpoint["id"])
    job = states.claim(replica.job_id, cpu_host.pk)
    assert job is not None
    replica_reported(job.pk, job.attempts, cpu_host.pk, {"replica": "ready", "url": "http://127.0.0.1:9"})
    reconcile_endpoint(endpoint["id"])
    replica.refresh_from_db()
    assert replica.state == "ready" and Endpoint.objects.get(pk=endpoint["id"]).serving_revision == 1
    return replica


def _audio_job(cast, cores: int) -> Job:
    job = Job.objects.create(team=cast.audio, user=cast.charlie, kind=Kind.INFERENCE, family="cpu", cores=cores,
                             spec={}, max_runtime_s=600, reason_code="submitted", reason="waiting")
    states.event(job.pk, "pending", "submitted by charlie")
    return job


def test_a_borrowed_replica_is_drained_before_its_cores_go_to_another_teams_guarantee(cast, cpu_host, model,
                                                                                     settings):
    """The scheduler's side of a replica's preemption (no worker: its exit is recorded
    by hand, as the worker records it): out of the routes at once, its cores kept
    until its process has ended, the preempting job waiting with the reason, nobody
    else preempted or placed on those cores meanwhile, then the cores to that job."""
    from jobs.endpoints.replicas import replica_exited
    from jobs.endpoints.routing import routes

    settings.ENDPOINT_DRAIN_ROUTE_GRACE_S = 0
    FamilyQuota.objects.filter(team=cast.vision, family="cpu").update(guaranteed_cores=0, borrow_limit=4)
    FamilyQuota.objects.filter(team=cast.audio, family="cpu").update(guaranteed_cores=4, borrow_limit=0)
    replica = _running_ready_replica(cast, cpu_host, model, min_replicas=1, max_replicas=1, cores_per_replica=2)
    cores = set(CoreAllocation.objects.filter(job_id=replica.job_id).values_list("core", flat=True))
    Subscription.objects.create(team=cast.vision, user=cast.bob, scope="team", channel="webhook",
                                target="https://hooks.example.com/x", events=["job.preempted"])
    audio = _audio_job(cast, 4)
    report = scheduler.dispatch()
    assert replica.job_id in report.preempted and audio.pk not in report.placed
    replica.refresh_from_db()
    assert replica.state == "draining" and routes(replica.endpoint_id)["replicas"] == []
    assert Job.objects.get(pk=replica.job_id).status == "running"
    assert set(CoreAllocation.objects.filter(job_id=replica.job_id).values_list("core", flat=True)) == cores
    audio.refresh_from_db()
    assert audio.status == "pending" and audio.reason_code == "preempting"
    assert f"#{replica.job_id}" in audio.reason, audio.reason
    from jobs.lifecycle.forecasts import estimates
    from jobs.lifecycle.scheduler import replica_stop_s

    start = estimates()[audio.pk].start  # by the drain's bound, not never
    assert start is not None and start <= timezone.now() + timedelta(seconds=replica_stop_s() + 5)
    events = {e.kind: e for e in replica.endpoint.events.all()}
    assert f"job #{audio.pk}" in events["replica_preempted"].message
    told = Notification.objects.get(kind="job.preempted", team=cast.vision)  # the team's subscribers hear of it
    assert told.job_id == replica.job_id and f"job #{audio.pk}" in json.dumps(told.payload)
    # The reconciler stops the drained replica (its worker sends SIGTERM: the server
    # finishes its requests) and asks for a replacement; until the process has ended,
    # passes preempt nothing more and place nothing on the cores the job waits for.
    reconcile_endpoint(replica.endpoint_id)
    assert Job.objects.get(pk=replica.job_id).cancel_requested
    replacement = Replica.objects.exclude(pk=replica.pk).get(endpoint_id=replica.endpoint_id)
    for _ in range(3):
        again = scheduler.dispatch()
        assert again.preempted == [] and again.placed == []
        reconcile_endpoint(replica.endpoint_id)
    assert Job.objects.get(pk=replacement.job_id).status == "pending"
    assert Replica.objects.filter(endpoint_id=replica.endpoint_id).count() == 2  # no churn of replicas
    # The worker records the end of the drained process.
    assert states.mark_finished(replica.job_id, "cancelled", message="stopped on request", failure="cancelled")
    replica_exited(replica.job_id)
    replica.refresh_from_db()
    assert replica.state == "stopped"
    assert audio.pk in scheduler.dispatch().placed
    assert set(CoreAllocation.objects.filter(job_id=audio.pk).values_list("core", flat=True)) >= cores
    assert Job.objects.get(pk=replacement.job_id).status == "pending"  # borrowed: waits for room, not these cores
    kinds = list(replica.endpoint.events.order_by("at", "id").values_list("kind", flat=True))
    assert kinds.index("replica_preempted") < kinds.index("replica_stopped")
    assert f"job #{audio.pk}" in replica.endpoint.events.get(kind="replica_stopped").message


def test_a_replica_that_is_placed_but_not_started_is_requeued_at_once(cast, cpu_host, model):
    FamilyQuota.objects.filter(team=cast.vision, family="cpu").update(guaranteed_cores=0, borrow_limit=4)
    FamilyQuota.objects.filter(team=cast.audio, family="cpu").update(guaranteed_cores=4, borrow_limit=0)
    endpoint = create(api_client(cast.bob), model, min_replicas=1, max_replicas=1, cores_per_replica=2).json()
    scheduler.dispatch()
    replica = Replica.objects.get(endpoint_id=endpoint["id"])
    assert Job.objects.get(pk=replica.job_id).status == "queued"
    audio = _audio_job(cast, 4)
    report = scheduler.dispatch()
    assert replica.job_id in report.preempted and audio.pk in report.placed  # nothing to drain
    assert Job.objects.get(pk=replica.job_id).status == "pending"


def test_a_replica_within_its_teams_guarantee_is_never_preempted(cast, cpu_host, model):
    FamilyQuota.objects.filter(team=cast.vision, family="cpu").update(guaranteed_cores=2, borrow_limit=0)
    FamilyQuota.objects.filter(team=cast.audio, family="cpu").update(guaranteed_cores=2, borrow_limit=2)
    replica = _running_ready_replica(cast, cpu_host, model, min_replicas=1, max_replicas=1, cores_per_replica=2)
    audio = _audio_job(cast, 4)
    report = scheduler.dispatch()
    assert replica.job_id not in report.preempted and audio.pk not in report.placed
    assert Job.objects.get(pk=replica.job_id).status == "running"
