"""A console with something on every page, for the browser tests of what pages show
(tests/test_browser_walk.py, tests/test_browser_console.py): team vision with jobs in
every state (succeeded inference with outputs, fine-tune with a loss curve, compile,
pending, failed, cancelled, and one running on a Neuron host with live samples), a
CPU host and a Neuron host, a model and a dataset; team audio with one job.

Built through the same code paths as production where it matters (jobs.states for
state changes, the agent's Agent.handle for live samples)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from django.utils import timezone

from jobs.assets import storage
from jobs.lifecycle import states
from jobs.models import Artifact, Host, Job, JobLogChunk, JobMetric
from live_support import neuron_host, report, running_job, runtime
from neuron_workers.agent import Agent
from neuron_workers.readers.neuron_monitor import parse_report

S = Job.Status


@dataclass
class Console:
    cast: type
    model: object
    dataset: object
    cpu_host: Host
    trn_host: Host
    jobs: dict[str, Job]


def _job(team, user, model, *, kind="inference", status=S.PENDING, **fields) -> Job:
    job = Job.objects.create(team=team, user=user, kind=kind, status=status, model=model,
                             spec=fields.pop("spec", {"prompts": ["hello"], "max_new_tokens": 4}), **fields)
    states.event(job.pk, "pending", f"submitted by {user.username}", actor=user)
    return job


def _log(job: Job, *pieces: str) -> None:
    offset = 0
    for text in pieces:
        JobLogChunk.objects.create(job=job, offset=offset, text=text)
        offset += len(text.encode())
    Job.objects.filter(pk=job.pk).update(log_bytes=offset)


def publish(host: Host, job: Job, util: dict[int, float]) -> None:
    line = report(runtimes=[runtime(f"job-{job.pk}", 100, util)])
    assert Agent(host, placements_ttl=0).handle(parse_report(line))


def build_console(cast, model, dataset) -> Console:
    now = timezone.now()
    ago = lambda s: now - timezone.timedelta(seconds=s)  # noqa: E731
    cpu = Host.objects.create(name="test-host", family="cpu", core_ids=list(range(4)), backend="cpu",
                              memory_bytes=8 << 30, last_heartbeat=now)
    trn = neuron_host("trn-walk", cores=8)
    jobs: dict[str, Job] = {}

    inference = _job(cast.vision, cast.bob, model, status=S.SUCCEEDED, host=cpu, core_start=0, created_at=ago(300),
                     queued_at=ago(299), started_at=ago(298), finished_at=ago(290), attempts=1,
                     result={"requests": 2, "latency_ms_p50": 12.5, "latency_ms_p90": 20.25,
                             "latency_ms_p99": 21.0, "requests_per_s": 3.25, "tokens_per_s": 40.0})
    states.event(inference.pk, "succeeded", "succeeded in 8.0 s")
    artifacts = storage.job_dir(inference.pk) / "attempt-1" / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "outputs.jsonl").write_text(
        json.dumps({"index": 0, "prompt": "hello", "output": "world and a longer answer that wraps on a phone",
                    "new_tokens": 3, "latency_ms": 12.5}) + "\n")
    Artifact.objects.create(job=inference, name="outputs.jsonl", path=storage.rel_path(artifacts / "outputs.jsonl"),
                            size_bytes=(artifacts / "outputs.jsonl").stat().st_size)
    _log(inference, "=== attempt 1 on test-host cores 0 ===\n", "loading model\n", "generated 1 output\n")
    jobs["inference"] = inference

    finetune = _job(cast.vision, cast.alice, model, kind="finetune", status=S.SUCCEEDED, dataset=dataset, host=cpu,
                    core_start=1, created_at=ago(250), started_at=ago(248), finished_at=ago(240), attempts=1,
                    spec={"steps": 5, "learning_rate": 0.001},
                    result={"steps": 5, "first_loss": 5.5, "final_loss": 3.25, "train_seconds": 1.5,
                            "tokens_per_s": 900.0})
    JobMetric.objects.bulk_create([JobMetric(job=finetune, step=s, name="loss", value=6 - s * 0.5)
                                   for s in range(1, 6)])
    jobs["finetune"] = finetune

    jobs["compile"] = _job(cast.vision, cast.bob, model, kind="compile", status=S.SUCCEEDED, host=cpu, core_start=2,
                           created_at=ago(200), started_at=ago(199), finished_at=ago(195), attempts=1,
                           spec={"batch_size": 1, "sequence_length": 16, "compiler_options": ["--model-type=transformer"]},
                           result={"compile_seconds": 1.234, "latency_ms_p50": 0.8123, "latency_ms_p95": 1.1,
                                   "max_abs_logit_diff": 2.5e-06, "input_shape": [1, 16]})
    jobs["failed"] = _job(cast.vision, cast.bob, model, status=S.FAILED, host=cpu, core_start=0, created_at=ago(150),
                          started_at=ago(149), finished_at=ago(148), attempts=1, failure="error", reason_code="error",
                          reason="RuntimeError: the model's config.json names an unknown architecture")
    states.event(jobs["failed"].pk, "failed", "RuntimeError: the model's config.json names an unknown architecture")
    jobs["cancelled"] = _job(cast.vision, cast.alice, model, status=S.CANCELLED, created_at=ago(120),
                             finished_at=ago(100), reason_code="cancelled", reason="cancelled by alice")
    jobs["pending"] = _job(cast.vision, cast.bob, model, family="trn2", cores=4, created_at=ago(60),
                           reason_code="no_capacity",
                           reason="no trn2 host is online: the job waits until one registers")
    running = running_job(cast.vision, cast.bob, trn, start=0, cores=2)
    Job.objects.filter(pk=running.pk).update(model=model, started_at=ago(30))
    for u in (35.0, 60.0, 82.5):
        publish(trn, running, {0: u, 1: u / 2})
    running.refresh_from_db()
    jobs["running"] = running
    jobs["audio"] = _job(cast.audio, cast.charlie, None, created_at=ago(90))
    return Console(cast, model, dataset, cpu, trn, jobs)
