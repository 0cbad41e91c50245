"""End to end: a recorded neuron-monitor file replayed by the real agent process
(`manage.py agent --replay FILE --name NAME --once`, against the test database)
through Redis to the JSON endpoints, followed with cursors while it plays.

tests/data/live/trn1.32xlarge-4s.jsonl is the first four reports of
tests/data/neuron-monitor/trn1.32xlarge-two-jobs.jsonl (job-41 on cores 0-7,
job-42 on cores 8-9 when recorded)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from django.utils import timezone

from conftest import ROOT, api_client
from jobs.models import Host
from live_support import clean_streams, neuron_host, running_job  # noqa: F401
from tests.polling import wait_until
from tests.workers import process_env

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

RECORDING = Path(__file__).resolve().parent / "data" / "live" / "trn1.32xlarge-4s.jsonl"


def recorded_util(core: int) -> list[float]:
    """Core `core`'s utilization in each report of the recording (job-41's runtime)."""
    return [json.loads(line)["neuron_runtime_data"][0]["report"]["neuroncore_counters"]["neuroncores_in_use"]
            [str(core)]["neuroncore_utilization"] for line in RECORDING.read_text().splitlines()]


def test_a_replayed_recording_flows_through_the_agent_and_redis_to_the_endpoints(cast, clean_streams, _storage,
                                                                                  tmp_path):
    # The host is known before the agent starts, so a job can already hold cores 0-7.
    host = neuron_host("e2e-replay", last_heartbeat=timezone.now() - timezone.timedelta(minutes=5))
    job = running_job(cast.vision, cast.bob, host, start=0, cores=8)
    client = api_client(cast.bob)
    url = f"/api/v1/jobs/{job.pk}/metrics"
    cursor = client.get(url).json()["cursor"]
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "manage.py", "agent", "--replay", str(RECORDING), "--name", "e2e-replay", "--once"],
            cwd=ROOT, env=process_env(storage_root=_storage), stdout=out, stderr=subprocess.STDOUT)
    points, batches = [], []

    def follow() -> int:
        nonlocal cursor
        page = client.get(url, {"since": cursor}).json()
        if page["t"]:
            batches.append(page["t"])
            points.extend(zip(page["t"], zip(*page["util"])))
        cursor = page["cursor"]
        return len(points)

    try:
        wait_until(follow, 60, "4 points at the job's endpoint", until=lambda count: count >= 4, interval=0.1)
        assert agent.wait(30) == 0, log.read_text()
    finally:
        if agent.poll() is None:
            agent.kill()

    assert "published 4 samples" in log.read_text()
    assert len(points) == 4, log.read_text()
    assert len(batches) >= 2, batches  # the points arrived while the recording played, not all at the end
    # Paced at the recording's 1 s (a lower bound: a loaded machine only delays).
    times = [t for t, _ in points]
    assert times == sorted(times) and times[-1] - times[0] >= 2000, times
    # The recorded job-41 ran on cores 0-7: by core range it is this job's activity.
    for core in range(8):
        assert [util[core] for _, util in points] == recorded_util(core)

    final = client.get(url).json()
    assert final["replay"] is True and final["cores"] == list(range(8)) and len(final["t"]) == 4
    host.refresh_from_db()
    assert host.replay is True and host.instance_type == "trn1.32xlarge" and len(host.core_ids) == 32
    assert host.last_heartbeat > timezone.now() - timezone.timedelta(seconds=30)
    view = client.get(f"/api/v1/hosts/{host.name}/metrics").json()
    assert view["host"]["replay"] is True and len(view["t"]) == 4
    assert view["used_by"] == {str(c): job.pk for c in range(8)}
    assert [(o["tag"], o["cores"]) for o in view["orphans"]] == [("job-42", [8, 9])]
    assert Host.objects.filter(name="e2e-replay").count() == 1
