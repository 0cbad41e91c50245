"""Helpers shared by the live-metrics tests: clean streams, running jobs placed on
exact cores, and neuron-monitor reports rewritten for the jobs of a test."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from jobs.lifecycle import states
from jobs.live.store import redis
from jobs.models import CoreAllocation, Host, Job

DATA = Path(__file__).resolve().parent / "data"
MONITOR = DATA / "neuron-monitor"
TRN1 = MONITOR / "trn1.32xlarge-two-jobs.jsonl"


def drop_streams() -> None:
    r = redis()
    keys = list(r.scan_iter(match="nd:m:*", count=1000))
    if keys:
        r.delete(*keys)


@pytest.fixture
def clean_streams():
    """No metric stream, roll-up cursor or lock left over from another test."""
    drop_streams()
    yield redis()
    drop_streams()


def neuron_host(name: str = "trn-a", cores: int = 32, family: str = "trn1", **fields) -> Host:
    from django.utils import timezone

    fields = {"last_heartbeat": timezone.now(), "instance_type": "trn1.32xlarge", **fields}
    return Host.objects.create(name=name, family=family, device_count=cores // 2, core_ids=list(range(cores)),
                               backend="neuron", **fields)


def running_job(team, user, host: Host, start: int, cores: int, pid: int | None = None) -> Job:
    """A job placed on cores start..start+cores-1 of `host` and claimed (running),
    through jobs.states like the scheduler and worker do."""
    job = Job.objects.create(team=team, user=user, kind="inference", family=host.family, cores=cores)
    CoreAllocation.objects.bulk_create([CoreAllocation(host=host, core=c, job=job, team=team, family=host.family)
                                        for c in range(start, start + cores)])
    assert states.mark_queued(job, host.pk, start)
    assert states.mark_running(job.pk, host.pk, pid=pid)
    if pid is not None:
        Job.objects.filter(pk=job.pk).update(worker_pid=pid)
    job.refresh_from_db()
    return job


def raw_lines(path: Path = TRN1) -> list[str]:
    return path.read_text().splitlines()


def report(line: str | None = None, runtimes: list[dict] | None = None) -> str:
    """A trn1 report line; `runtimes` replaces neuron_runtime_data (see `runtime`)."""
    data = json.loads(line or raw_lines()[0])
    if runtimes is not None:
        data["neuron_runtime_data"] = runtimes
    return json.dumps(data)


def runtime(tag: str | None, pid: int, cores: dict[int, float], template_line: str | None = None) -> dict:
    """A runtime entry built from the sample's first runtime, on `cores` with the
    given utilization each; tag None = untagged (neuron-monitor then uses the pid)."""
    base = json.loads(template_line or raw_lines()[0])["neuron_runtime_data"][0]
    rt = copy.deepcopy(base)
    rt["pid"] = pid
    rt["neuron_runtime_tag"] = tag if tag is not None else str(pid)
    counters = rt["report"]["neuroncore_counters"]
    counters["neuroncores_in_use"] = {str(c): {"neuroncore_utilization": u, "flops": 1} for c, u in cores.items()}
    usage = rt["report"]["memory_used"]["neuron_runtime_used_bytes"]["usage_breakdown"]
    one = next(iter(usage["neuroncore_memory_usage"].values()))
    usage["neuroncore_memory_usage"] = {str(c): dict(one) for c in cores}
    return rt
