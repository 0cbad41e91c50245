"""Issue 19, part 3, for real: two identical compiles submitted at once on two hosts
(two Celery workers, one core each) compile once; the other waits for it and becomes
a cache hit on the same artifact. The claim is a database row, so it holds across hosts."""
from __future__ import annotations

import json

import pytest
from django.utils import timezone

from jobs.models import CompileClaim, Host, Job, ModelAsset
from tests.conftest import api_client
from tests.polling import wait_until
from tests.workers import Worker, process_env

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def second_worker(celery_worker_proc, _storage, tmp_path):
    worker = Worker(tmp_path / "worker2.log", process_env(storage_root=_storage, host="test-host-2"),
                    queues="host.test-host-2", name="test2")
    worker.start()
    yield worker
    worker.close()


def test_two_identical_compiles_on_two_hosts_compile_once(cast, tiny_model, celery_worker_proc, second_worker):
    for name in ("test-host", "test-host-2"):
        Host.objects.create(name=name, family="cpu", core_ids=[0], backend="cpu", memory_bytes=8 << 30,
                            last_heartbeat=timezone.now())
    client = api_client(cast.bob)
    body = {"team": "vision", "kind": "compile", "family": "cpu", "cores": 1, "model": tiny_model.pk,
            "batch_size": 1, "sequence_length": 16}
    ids = [client.post("/api/v1/jobs", data=json.dumps(body), content_type="application/json").json()["id"]
           for _ in range(2)]
    jobs = wait_until(lambda: list(Job.objects.filter(pk__in=ids).order_by("pk")), 180, "both compiles to finish",
                      until=lambda rows: all(j.is_finished for j in rows), interval=0.2)
    assert [j.status for j in jobs] == ["succeeded", "succeeded"], [(j.reason, j.result) for j in jobs]
    compiled = [j for j in jobs if not j.cache_hit]
    hits = [j for j in jobs if j.cache_hit]
    assert len(compiled) == 1 and len(hits) == 1
    assert {j.host.name for j in jobs} == {"test-host", "test-host-2"}
    (artifact,) = ModelAsset.objects.filter(compile_key=jobs[0].spec["compile_key"])
    assert hits[0].output_model_id == artifact.pk == compiled[0].output_model_id
    assert not CompileClaim.objects.exists()
