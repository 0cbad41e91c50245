"""Bug 4's rest: a cpu inference job reports its own request latency and
completions (jobs.live.requests), which the host agent publishes as the job's
points, so the job page's latency and executions charts have data on CPU hosts."""
from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.live import requests
from jobs.live.store import redis
from jobs.models import Job
from tests.conftest import ROOT, api_client
from tests.polling import wait_until
from tests.workers import process_env

PROMPTS = ["one", "two", "three", "four", "five", "six", "seven"]


def test_stats_are_seconds_and_a_drain_counts_each_request_once(settings):
    r = redis()
    r.delete(requests.key(901), requests.key(902), requests.host_set("req-host"))
    requests.push(901, "req-host", [10.0, 30.0, 20.0])
    requests.push(902, "req-host", [5.0])
    drained = requests.drain("req-host")
    assert drained[901] == {"lat_p50": 0.02, "lat_p99": 0.03, "completed": 3}
    assert drained[902]["completed"] == 1
    assert requests.drain("req-host") == {}  # drained once
    requests.push(901, "req-host", [7.0])
    assert requests.drain("req-host") == {901: {"lat_p50": 0.007, "lat_p99": 0.007, "completed": 1}}
    assert requests.stats([]) == {"lat_p50": None, "lat_p99": None, "completed": 0}


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_cpu_inference_job_of_n_prompts_shows_n_completions_and_latency(
        cast, tiny_model, cpu_host, celery_worker_proc, _storage, tmp_path):
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen([sys.executable, "manage.py", "agent", "--name", "test-host"], cwd=ROOT,
                                 env=process_env(storage_root=_storage), stdout=out, stderr=subprocess.STDOUT)
    try:
        client = api_client(cast.bob)
        response = client.post("/api/v1/jobs", {"team": "vision", "kind": "inference", "model": tiny_model.pk,
                                                "prompts": PROMPTS, "max_new_tokens": 8},
                               content_type="application/json")
        assert response.status_code == 201, response.content
        job_id = response.json()["id"]
        wait_until(lambda: Job.objects.get(pk=job_id).status, 120, f"job {job_id} to end",
                   until=lambda status: status in ("succeeded", "failed", "cancelled"), interval=0.2)
        assert Job.objects.get(pk=job_id).status == "succeeded", celery_worker_proc.log_path.read_text()[-3000:]

        def series() -> dict:
            return client.get(f"/api/v1/jobs/{job_id}/metrics").json()

        # the agent drains what the worker pushed within a sample or two of the end
        page = wait_until(series, 30, f"{len(PROMPTS)} completions in the job's points (agent log: {log})",
                          until=lambda s: sum(c or 0 for c in s["completed"]) >= len(PROMPTS), interval=0.3)
    finally:
        agent.terminate()
        agent.wait(30)
    assert sum(c or 0 for c in page["completed"]) == len(PROMPTS)
    latencies = [v for v in page["lat_p50_ms"] if v is not None]
    assert latencies and all(v > 0 for v in latencies)
    assert max(v for v in page["lat_p99_ms"] if v is not None) >= max(latencies)
    result = Job.objects.get(pk=job_id).result
    assert result["requests"] == len(PROMPTS)
