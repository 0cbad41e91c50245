"""The whole serving path under load, for real: an endpoint whose replicas are the cpu
backend's server of the tiny model, run by a real Celery worker as jobs of kind serve,
reached through the gateway (jobs.gateway, in a thread of this process) by clients
streaming completions with a team token, while the reconciler (the beat's work, in a
thread here) rolls out a new revision: no request fails."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
from django.db import connections
from django.utils import timezone

from jobs.endpoints.reconcile import reconcile_endpoint
from jobs.models import Endpoint, EndpointRevision, Host, Replica
from jobs.teams.tokens import token_create
from tests.endpoint_support import change, create, replicas
from tests.gateway_support import ThreadServer
from tests.polling import wait_until
from tests.workers import Worker, process_env

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(600)]
CLIENTS = 4
R = Replica.State


@pytest.fixture
def cpu_serve_worker(transactional_db, _storage, tmp_path, settings):
    from jobs.live.store import redis

    redis().flushdb()
    settings.ENDPOINT_DRAIN_ROUTE_GRACE_S = 1
    Host.objects.create(name="test-host", family="cpu", core_ids=list(range(4)), backend="cpu",
                        memory_bytes=8 << 30, last_heartbeat=timezone.now())
    worker = Worker(tmp_path / "worker.log", process_env(storage_root=_storage, ENDPOINT_DRAIN_S="10"),
                    queues="scheduler,host.test-host", name="serve-cpu")
    worker.start()
    yield worker
    worker.close()


class Beat(threading.Thread):
    """The reconciler's periodic pass for one endpoint, as the beat runs it."""

    def __init__(self, endpoint_id: int):
        super().__init__(daemon=True)
        self.endpoint_id, self.stop = endpoint_id, threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.wait(0.5):
                reconcile_endpoint(self.endpoint_id)
        finally:
            connections.close_all()


class Clients:
    """CLIENTS threads streaming completions through the stable URL until stopped."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url, token
        self.stop, self.ok, self.failed = threading.Event(), 0, []
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(CLIENTS)]

    def loop(self) -> None:
        body = {"prompt": "hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}
        while not self.stop.is_set():
            try:
                with httpx.stream("POST", f"{self.url}/completions", json=body, timeout=120,
                                  headers={"Authorization": f"Bearer {self.token}"}) as response:
                    lines = [line for line in response.iter_lines() if line.startswith("data: ")]
                if response.status_code == 200 and lines and lines[-1] == "data: [DONE]":
                    self.ok += 1
                else:
                    self.failed.append((response.status_code, lines[-1:] if lines else response.read()[:200]))
            except httpx.HTTPError as exc:
                self.failed.append(("error", repr(exc)))

    def __enter__(self) -> "Clients":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)


def test_a_rollout_under_streaming_load_fails_no_request(cast, tiny_model, cpu_serve_worker, settings):
    from jobs.gateway.app import Gateway

    endpoint = create(cast.vision, cast.bob, model=tiny_model, min_replicas=1, max_replicas=1, max_batch_size=4,
                      max_concurrent=8, max_seq_len=128)
    beat = Beat(endpoint.pk)
    beat.start()
    try:
        with ThreadServer(Gateway(), lifespan="on") as gateway:
            url = f"{gateway.url}/endpoints/vision/chat/v1"
            wait_until(lambda: Endpoint.objects.get(pk=endpoint.pk).serving_revision == 1, 240,
                       "revision 1 serving")
            token = token_create(user=cast.bob, name="load", scope="submit")[0]
            with Clients(url, token) as clients:
                wait_until(lambda: clients.ok >= CLIENTS, 120, "requests through revision 1")
                change(endpoint, cast.bob, max_batch_size=2)
                wait_until(lambda: EndpointRevision.objects.get(endpoint=endpoint, number=2).state == "live"
                           and all(r.state == R.STOPPED for r in replicas(endpoint) if r.revision == 1),
                           300, "revision 2 live and revision 1 stopped")
                served_before = clients.ok
                wait_until(lambda: clients.ok >= served_before + CLIENTS, 120, "requests through revision 2")
    finally:
        beat.stop.set()
        beat.join(timeout=30)
    assert clients.failed == [], clients.failed[:5]
    assert clients.ok >= 2 * CLIENTS
    kinds = list(endpoint.events.order_by("at", "id").values_list("kind", flat=True))
    assert kinds.index("rollout_started") < kinds.index("traffic_shifted", kinds.index("rollout_started"))
