"""What the endpoint tests share: a cpu host whose replicas run the stand-in server
(tests.fake_backends:ServeBackend), a real worker serving it, models to serve, and a
loop that runs the reconciler (the beat's job) until a condition holds."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import timezone

from jobs.assets.services import model_register
from jobs.endpoints.forms import EndpointChangeForm, EndpointCreateForm
from jobs.endpoints.reconcile import reconcile_endpoint
from jobs.endpoints.services import endpoint_change, endpoint_create
from jobs.models import Endpoint, Host, Replica
from tests.polling import wait_until
from tests.workers import Worker, process_env

SERVE = "tests.fake_backends:ServeBackend"
R = Replica.State


@pytest.fixture
def serve_settings(settings):
    settings.ENDPOINT_DRAIN_ROUTE_GRACE_S = 0.2
    settings.ENDPOINT_ROLLOUT_DEADLINE_S = 120
    return settings


@pytest.fixture
def serve_host(transactional_db):
    return Host.objects.create(name="test-host", family="cpu", core_ids=list(range(4)), backend=SERVE,
                               memory_bytes=8 << 30, last_heartbeat=timezone.now())


@pytest.fixture
def serve_worker(transactional_db, _storage, tmp_path, serve_host, serve_settings):
    """A real worker for the scheduler queue and host.test-host, with a fast drain."""
    from jobs.live.store import redis

    redis().flushdb()
    worker = Worker(tmp_path / "worker.log", process_env(
        storage_root=_storage, NEURONDECK_ZYGOTE_PRELOAD="", JOB_KILL_GRACE_S="1", ENDPOINT_DRAIN_S="2"),
        queues="scheduler,host.test-host", name="serve")
    worker.start()
    yield worker
    worker.close()


def make_model(team, user, name: str):
    """A registered model folder (the stand-in server only reads its path)."""
    dest = Path(settings.STORAGE_ROOT) / "models" / team.slug / name
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text("{}")
    return model_register(team=team, user=user, name=name, path=dest, meta={})


def create(team, user, **fields) -> Endpoint:
    data = {"name": "chat", "family": "cpu", "cores_per_replica": 1, "min_replicas": 1, "max_replicas": 2,
            "max_batch_size": 8, "max_seq_len": 256, "max_concurrent": 4, **fields}
    if hasattr(data.get("model"), "pk"):
        data["model"] = data["model"].pk
    form = EndpointCreateForm(data, team=team)
    assert form.is_valid(), form.errors
    return endpoint_create(team=team, user=user, form=form)


def change(endpoint: Endpoint, user, **fields) -> Endpoint:
    data = {k: (v.pk if hasattr(v, "pk") else v) for k, v in fields.items()}
    form = EndpointChangeForm(data, endpoint=endpoint)
    assert form.is_valid(), form.errors
    return endpoint_change(endpoint=endpoint, user=user, form=form)


def replicas(endpoint: Endpoint, *states: str) -> list[Replica]:
    qs = Replica.objects.filter(endpoint=endpoint).order_by("pk")
    return list(qs.filter(state__in=states) if states else qs)


def reconcile_until(endpoint: Endpoint, probe, timeout: float = 60, message: str = "endpoint state"):
    """Run the reconciler (as the beat does every few seconds) until `probe()` holds."""
    def step():
        reconcile_endpoint(endpoint.pk)
        return probe()

    return wait_until(step, timeout, message, interval=0.2)


def ready(endpoint: Endpoint, revision: int | None = None, count: int = 1):
    def probe():
        rows = [r for r in replicas(endpoint, R.READY) if revision is None or r.revision == revision]
        return rows if len(rows) >= count else None

    return probe
