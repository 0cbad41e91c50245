"""Endpoints end to end: real PostgreSQL, Redis and a Celery worker whose replicas
run tests.fake_backends:ServeBackend (a real HTTP server on a free port). The test
drives the reconciler itself, as the beat would every few seconds."""
from __future__ import annotations

import json
import urllib.request

import pytest

from jobs.endpoints import routing
from jobs.endpoints.services import endpoint_delete
from jobs.live.store import redis
from jobs.models import Endpoint, EndpointEvent, EndpointRevision, Job, JobAttempt, Kind
from tests.polling import wait_until
from tests.endpoint_support import (R, change, create, make_model, ready, reconcile_until, replicas,  # noqa: F401
                                    serve_host, serve_settings, serve_worker)

pytestmark = [pytest.mark.e2e]


def routes_in_redis(endpoint) -> dict:
    raw = redis().get(routing.routes_key(endpoint.pk))
    return json.loads(raw) if raw else {}


def health(url: str) -> int:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
        return response.status


def test_an_endpoint_is_created_scaled_rolled_out_and_deleted(cast, serve_worker):
    v1 = make_model(cast.vision, cast.alice, "tiny-v1")
    v2 = make_model(cast.vision, cast.alice, "tiny-v2")
    endpoint = create(cast.vision, cast.bob, model=v1)

    first = reconcile_until(endpoint, lambda: Endpoint.objects.get(pk=endpoint.pk).serving_revision == 1
                            and ready(endpoint, revision=1)(), message="the first replica ready and serving")[0]
    assert health(first.url) == 200
    job = Job.objects.get(pk=first.job_id)
    assert job.kind == Kind.SERVE and job.status == "running" and job.max_runtime_s == 0
    assert job.host.name == "test-host" and job.core_range is not None
    endpoint.refresh_from_db()
    assert endpoint.serving_revision == 1
    assert routes_in_redis(endpoint)["replicas"] == [{"id": first.pk, "url": first.url}]

    endpoint = change(endpoint, cast.bob, min_replicas=2)
    assert endpoint.revision == 1 and endpoint.desired_replicas == 2
    both = reconcile_until(endpoint, ready(endpoint, revision=1, count=2), message="two replicas ready")
    assert len({r.job.core_start for r in both}) == 2  # each on its own cores
    assert len(routes_in_redis(endpoint)["replicas"]) == 2

    endpoint = change(endpoint, cast.bob, model=v2, max_batch_size=4)
    assert endpoint.revision == 2 and endpoint.serving_revision == 1  # old replicas serve until new ones are ready
    assert {r["id"] for r in routes_in_redis(endpoint)["replicas"]} == {r.pk for r in both}
    new = reconcile_until(endpoint, lambda: Endpoint.objects.get(pk=endpoint.pk).serving_revision == 2
                          and ready(endpoint, revision=2, count=2)(), message="traffic shifted to revision 2")
    assert {r["id"] for r in routes_in_redis(endpoint)["replicas"]} == {r.pk for r in new}
    reconcile_until(endpoint, lambda: all(r.state == R.STOPPED for r in replicas(endpoint) if r.revision == 1),
                    message="revision 1 drained and stopped")
    assert all(Job.objects.get(pk=r.job_id).status == "cancelled" for r in replicas(endpoint) if r.revision == 1)
    assert Job.objects.get(pk=new[0].job_id).spec["max_batch_size"] == 4
    assert EndpointRevision.objects.get(endpoint=endpoint, number=2).state == "live"
    kinds = list(EndpointEvent.objects.filter(endpoint=endpoint).order_by("at", "id").values_list("kind", flat=True))
    assert kinds.index("rollout_started") < kinds.index("traffic_shifted", kinds.index("rollout_started"))

    endpoint_delete(endpoint=endpoint, user=cast.bob)
    reconcile_until(endpoint, lambda: Endpoint.objects.get(pk=endpoint.pk).state == Endpoint.State.DELETED,
                    message="the endpoint deleted")
    assert all(r.state == R.STOPPED for r in replicas(endpoint))
    assert routes_in_redis(endpoint)["replicas"] == []
    # every replica's cores were held and released like any job's: closed attempts with core-seconds
    attempts = JobAttempt.objects.filter(job__replica__endpoint=endpoint)
    assert attempts.count() == len(replicas(endpoint)) and all(a.ended_at and a.core_seconds > 0 for a in attempts)
    assert all(a.kind == Kind.SERVE for a in attempts)


def test_a_crashed_replica_is_replaced_and_the_team_is_told(cast, serve_worker):
    import os
    import signal

    from jobs.models import Notification

    endpoint = create(cast.vision, cast.bob, model=make_model(cast.vision, cast.alice, "tiny-v1"))
    first = reconcile_until(endpoint, ready(endpoint, revision=1), message="the first replica ready")[0]
    pid = wait_until(lambda: Job.objects.get(pk=first.job_id).worker_pid, 30, "the replica's pid")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: replicas(endpoint, R.FAILED), 60, "the replica marked failed")
    assert first.pk not in [r["id"] for r in routes_in_redis(endpoint).get("replicas", [])]
    replacement = reconcile_until(endpoint, lambda: [r for r in ready(endpoint)() or [] if r.pk != first.pk],
                                  message="a replacement ready")[0]
    assert health(replacement.url) == 200
    assert Job.objects.get(pk=first.job_id).status == "failed"
    kinds = set(EndpointEvent.objects.filter(endpoint=endpoint).values_list("kind", flat=True))
    assert {"replica_failed", "replica_ready"} <= kinds
    told = Notification.objects.filter(kind="endpoint.unhealthy", team=cast.vision)
    assert told.count() == 1 and "vision/chat" in told.get().title


def test_a_revision_whose_replicas_fail_is_rolled_back_while_the_old_one_keeps_serving(cast, serve_worker):
    good = make_model(cast.vision, cast.alice, "tiny-v1")
    broken = make_model(cast.vision, cast.alice, "broken-v2")
    endpoint = create(cast.vision, cast.bob, model=good)
    old = reconcile_until(endpoint, lambda: Endpoint.objects.get(pk=endpoint.pk).serving_revision == 1
                          and ready(endpoint, revision=1)(), message="revision 1 serving")[0]
    change(endpoint, cast.bob, model=broken)
    seen_routes = []

    def rolled_back():
        seen_routes.append([r["id"] for r in routes_in_redis(endpoint).get("replicas", [])])
        return EndpointRevision.objects.get(endpoint=endpoint, number=2).state == "rolled_back"

    reconcile_until(endpoint, rolled_back, timeout=120, message="revision 2 rolled back")
    assert all(ids == [old.pk] for ids in seen_routes)  # traffic never left the good replica
    endpoint.refresh_from_db()
    assert (endpoint.revision, endpoint.serving_revision, endpoint.model_id) == (1, 1, good.pk)
    assert replicas(endpoint, R.READY) == [old]
    assert len(replicas(endpoint, R.FAILED)) >= 3
    assert EndpointEvent.objects.filter(endpoint=endpoint, kind="rolled_back").exists()


def test_an_idle_endpoint_with_min_zero_scales_to_zero_and_a_request_wakes_it(cast, serve_worker, settings):
    from jobs.endpoints.reconcile import wake

    endpoint = create(cast.vision, cast.bob, model=make_model(cast.vision, cast.alice, "tiny-v1"), min_replicas=0)
    first = reconcile_until(endpoint, ready(endpoint), message="the first replica ready")[0]
    settings.ENDPOINT_IDLE_TO_ZERO_S = 1  # no request came: idle from now on
    settings.ENDPOINT_SCALE_DOWN_COOLDOWN_S = 0
    reconcile_until(endpoint, lambda: Endpoint.objects.get(pk=endpoint.pk).desired_replicas == 0
                    and all(r.state == R.STOPPED for r in replicas(endpoint)), message="scaled to zero")
    assert Job.objects.get(pk=first.job_id).status == "cancelled"
    assert routes_in_redis(endpoint)["replicas"] == []
    # What the gateway does when a request arrives and no replica is ready (serve's
    # jobs.gateway): it counts the request as waiting, stamps the arrival, wakes the endpoint.
    import time

    from jobs.gateway.load import inflight_key, last_request_key

    redis().hset(inflight_key(endpoint.pk), "waiting", 1)
    redis().set(last_request_key(endpoint.pk), time.time())
    assert wake(endpoint.pk)
    woken = reconcile_until(endpoint, ready(endpoint), message="a replica after the wake-up")[0]
    assert woken.pk != first.pk and health(woken.url) == 200
    colds = EndpointEvent.objects.filter(endpoint=endpoint, kind="replica_ready")
    assert colds.count() == 2 and all(e.data["cold_start_s"] > 0 for e in colds)
