"""A borrowed replica preempted for another team's guarantee, for real: PostgreSQL,
Redis, a Celery worker (the scheduler's dispatch and the host's jobs) whose replicas
are tests.fake_backends:ServeBackend servers, the gateway in a thread of this test,
and the reconciler run here as the beat would. A stream that the test holds open on
the borrowed replica completes while the replica is preempted; the other team's
replica gets the cores only once the drained process has ended."""
from __future__ import annotations

import json
import threading

import httpx
import pytest
from django.db import connections
from django.utils import timezone

from jobs.endpoints import routing
from jobs.endpoints.reconcile import reconcile_all
from jobs.live.store import redis
from jobs.models import CoreAllocation, Endpoint, FamilyQuota, Host, Job, Replica
from jobs.teams.tokens import token_create
from tests.endpoint_support import SERVE, create, make_model, replicas
from tests.gateway_support import ThreadServer
from tests.polling import wait_until
from tests.workers import Worker, process_env

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]
R = Replica.State
DRAIN_S = 60  # the replica's drain bound: far longer than the test holds its stream


@pytest.fixture
def worker(request, transactional_db, _storage, tmp_path, settings):
    """A worker whose replicas drain for DRAIN_S (or the test's parameter) before SIGKILL."""
    redis().flushdb()
    settings.ENDPOINT_DRAIN_ROUTE_GRACE_S = 0.5
    Host.objects.create(name="test-host", family="cpu", core_ids=list(range(4)), backend=SERVE,
                        memory_bytes=8 << 30, last_heartbeat=timezone.now())
    drain_s = getattr(request, "param", DRAIN_S)
    worker = Worker(tmp_path / "worker.log", process_env(
        storage_root=_storage, NEURONDECK_ZYGOTE_PRELOAD="", ENDPOINT_DRAIN_S=str(drain_s),
        ENDPOINT_DRAIN_ROUTE_GRACE_S="0.5"), queues="scheduler,host.test-host", name="preempt")
    worker.start()
    yield worker
    worker.close()


class Beat(threading.Thread):
    """The reconciler's periodic pass over every endpoint, as the beat runs it."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.wait(0.3):
                reconcile_all()
        finally:
            connections.close_all()


class HeldStream(threading.Thread):
    """One streaming completion through the stable URL whose replica sends the first
    token, then the rest only once `hold_file` exists."""

    def __init__(self, url: str, token: str, hold_file: str):
        super().__init__(daemon=True)
        self.url, self.token, self.hold_file = url, token, hold_file
        self.events: list[str] = []
        self.status: int | None = None
        self.error: str | None = None
        self.done = threading.Event()

    def run(self) -> None:
        body = {"prompt": "hi", "max_tokens": 3, "stream": True, "hold_file": self.hold_file}
        try:
            with httpx.stream("POST", f"{self.url}/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {self.token}"}) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
        except httpx.HTTPError as exc:
            self.error = repr(exc)
        finally:
            self.done.set()


def routes_in_redis(endpoint_id: int) -> list[int]:
    raw = redis().get(routing.routes_key(endpoint_id))
    return [r["id"] for r in json.loads(raw)["replicas"]] if raw else []


def test_a_long_stream_on_a_preempted_borrowed_replica_completes_before_its_cores_change_hands(
        cast, worker, tmp_path):
    from jobs.gateway.app import Gateway

    FamilyQuota.objects.filter(team=cast.vision, family="cpu").update(guaranteed_cores=0, borrow_limit=4)
    FamilyQuota.objects.filter(team=cast.audio, family="cpu").update(guaranteed_cores=4, borrow_limit=0)
    vision = create(cast.vision, cast.bob, model=make_model(cast.vision, cast.alice, "tiny-v1"),
                    cores_per_replica=2, min_replicas=1, max_replicas=1)
    hold = tmp_path / "release"
    beat = Beat()
    beat.start()
    try:
        with ThreadServer(Gateway(), lifespan="on") as gateway:
            borrowed = wait_until(lambda: [r for r in replicas(vision, R.READY)], 120, "vision's replica ready")[0]
            assert CoreAllocation.objects.filter(job_id=borrowed.job_id, borrowed=True).count() == 2
            token = token_create(user=cast.bob, name="stream", scope="submit")[0]
            stream = HeldStream(f"{gateway.url}/endpoints/vision/chat/v1", token, str(hold))
            stream.start()
            wait_until(lambda: stream.events or stream.done.is_set(), 60, "the stream's first token")
            assert stream.events and not stream.done.is_set(), (stream.status, stream.error)

            # Audio's endpoint wants its guaranteed cores: the dispatcher preempts vision's replica.
            audio = create(cast.audio, cast.charlie, model=make_model(cast.audio, cast.charlie, "tiny-a"),
                           cores_per_replica=4, min_replicas=1, max_replicas=1)
            audio_job = wait_until(lambda: Job.objects.filter(replica__endpoint=audio, reason_code="preempting")
                                   .first(), 60, "audio's replica waiting for the preempted one")
            assert f"#{borrowed.job_id}" in audio_job.reason
            # no new request goes there (the table is republished after the dispatcher's commit)
            wait_until(lambda: borrowed.pk not in routes_in_redis(vision.pk), 10, "the replica out of the routes")
            # The replica is asked to stop (after the routing grace) and its server starts
            # draining, while the held stream is still open.
            drained_metrics = Job.objects.get(pk=borrowed.job_id)
            wait_until(lambda: Job.objects.get(pk=borrowed.job_id).cancel_requested, 60, "the replica stopped")
            wait_until(lambda: "serve_draining" in _metrics(drained_metrics), 60, "the replica's server draining")
            assert not stream.done.is_set()
            assert Job.objects.get(pk=borrowed.job_id).status == "running"  # still holding its cores
            assert Job.objects.get(pk=audio_job.pk).status == "pending"
            assert not CoreAllocation.objects.filter(job_id=audio_job.pk).exists()

            hold.touch()  # the long request may finish now
            assert stream.done.wait(60)
            assert stream.status == 200 and stream.error is None
            assert stream.events[-1] == "[DONE]" and len(stream.events) == 4  # three tokens, then the end

            audio_replica = wait_until(lambda: replicas(audio, R.READY), 120, "audio's replica ready")[0]
    finally:
        beat.stop.set()
        beat.join(timeout=30)
    victim = Job.objects.get(pk=borrowed.job_id)
    started = Job.objects.get(pk=audio_replica.job_id)
    assert victim.status == "cancelled" and Replica.objects.get(pk=borrowed.pk).state == R.STOPPED
    assert started.pk == audio_job.pk and started.queued_at >= victim.finished_at
    assert started.core_range == "0-3"
    kinds = list(vision.events.order_by("at", "id").values_list("kind", flat=True))
    assert kinds.index("replica_preempted") < kinds.index("replica_stopped")
    assert f"job #{audio_job.pk}" in vision.events.get(kind="replica_stopped").message
    # No loop: vision's replacement waits for room instead of taking the cores back.
    reconcile_all()
    replacement = Replica.objects.get(endpoint=vision, state=R.STARTING)
    assert Job.objects.get(pk=replacement.job_id).status == "pending"
    assert Replica.objects.filter(endpoint=vision).count() == 2
    assert Endpoint.objects.get(pk=vision.pk).desired_replicas == 1


@pytest.mark.parametrize("worker", [1], indirect=True)
def test_a_request_longer_than_the_drain_does_not_keep_the_cores_from_the_guarantee(cast, worker, tmp_path):
    """The drain is bounded: a stream that never ends is cut when the drain time (1 s
    here) and the worker's exit margin have passed, and the cores go to the waiting job."""
    from jobs.gateway.app import Gateway

    FamilyQuota.objects.filter(team=cast.vision, family="cpu").update(guaranteed_cores=0, borrow_limit=4)
    FamilyQuota.objects.filter(team=cast.audio, family="cpu").update(guaranteed_cores=4, borrow_limit=0)
    vision = create(cast.vision, cast.bob, model=make_model(cast.vision, cast.alice, "tiny-v1"),
                    cores_per_replica=2, min_replicas=1, max_replicas=1)
    beat = Beat()
    beat.start()
    try:
        with ThreadServer(Gateway(), lifespan="on") as gateway:
            borrowed = wait_until(lambda: [r for r in replicas(vision, R.READY)], 120, "vision's replica ready")[0]
            token = token_create(user=cast.bob, name="stream", scope="submit")[0]
            stream = HeldStream(f"{gateway.url}/endpoints/vision/chat/v1", token, str(tmp_path / "never"))
            stream.start()
            wait_until(lambda: stream.events or stream.done.is_set(), 60, "the stream's first token")
            audio = create(cast.audio, cast.charlie, model=make_model(cast.audio, cast.charlie, "tiny-a"),
                           cores_per_replica=4, min_replicas=1, max_replicas=1)
            audio_replica = wait_until(lambda: replicas(audio, R.READY), 120, "audio's replica ready")[0]
            assert stream.done.wait(60)
    finally:
        beat.stop.set()
        beat.join(timeout=30)
    assert stream.events[-1:] != ["[DONE]"]  # cut off at the drain's end
    victim = Job.objects.get(pk=borrowed.job_id)
    assert victim.status == "cancelled" and Replica.objects.get(pk=borrowed.pk).state == R.STOPPED
    assert Job.objects.get(pk=audio_replica.job_id).queued_at >= victim.finished_at


def _metrics(job: Job) -> str:
    from jobs.assets import storage

    path = storage.job_dir(job.pk) / f"attempt-{job.attempts}" / "metrics.jsonl"
    return path.read_text() if path.exists() else ""
