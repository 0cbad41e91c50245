"""Worker-side bookkeeping around one job run: claim, build the runner payload,
supervise the child, record the outcome. Called by the thin Celery task
neuron_workers.run_job on the job's host."""
from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import redis as redis_lib
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs.assets import storage
from jobs.assets.services import model_register
from jobs.lifecycle import states
from jobs.models import Artifact, Host, Job, JobLogChunk, JobMetric, Kind, ModelAsset
from jobs.quotas.backfill import NO_TIME_LIMIT

log = logging.getLogger(__name__)
S = Job.Status
# Export options a compiled artifact records (its static shape and how it was built).
EXPORT_FIELDS = ("task", "tensor_parallel_size", "auto_cast", "auto_cast_type", "height", "width",
                 "num_images_per_prompt")
RETRYABLE = {"crashed"}
# What a job's metrics stream may add to its timeline (neuron_workers.backends.loops
# and finetuning write them); a row with another "event" is dropped.
# An endpoint replica's reports (neuron_workers.backends.serve_handoff): its URL once
# its /health answers, and the start of its drain ({"event": "serve_ready"} or
# {"replica": "ready"} and the like: see jobs.endpoints.replicas.replica_reported).
REPLICA_EVENTS = {"serve_ready", "serve_draining"}
SERVE_EXIT_MARGIN_S = 5  # after its drain, a replica's server closes and exits before SIGKILL
JOB_EVENTS = {"checkpoint", "resumed", "stage"}  # failures worth another attempt; bad input or a compile error is not


def host_name() -> str:
    return settings.HOST_NAME or socket.gethostname()


# This worker's Host pk by name, looked up once per process instead of once per job
# (a query on the hot path). A host re-registered under a new pk is noticed when a
# claim with the cached pk fails: run() looks the pk up again and retries once.
_host_ids: dict[str, int] = {}


def this_host_id(*, fresh: bool = False) -> int | None:
    name = host_name()
    if fresh or name not in _host_ids:
        pk = Host.objects.filter(name=name).values_list("pk", flat=True).first()
        if pk is None:
            _host_ids.pop(name, None)
            return None
        _host_ids[name] = pk
    return _host_ids[name]


def build_payload(job: Job, workdir: Path) -> dict:
    inputs: dict = {}
    if job.model_id:
        inputs["model_path"] = str(storage.abs_path(job.model.path))
        inputs["model_format"] = job.model.format
    if job.dataset_id:
        inputs["dataset_path"] = str(storage.abs_path(job.dataset.path))
        inputs["dataset_format"] = job.dataset.format
    if job.kind == Kind.FINETUNE:
        # One folder for every attempt and rank, on the shared storage: an attempt
        # resumes from what an earlier one (on any host) saved.
        inputs["checkpoint_dir"] = str(storage.job_dir(job.pk) / "checkpoints")
    # The backend learns the host's family from the spec: a compile targets it
    # (neuronx-cc --target), and the neuron backend checks the job against it.
    spec = {**job.spec, "family": job.family}
    if job.kind == Kind.COMPILE:
        spec.setdefault("target", job.family)
    if job.kind == Kind.SERVE:
        spec.update(replica_network(job))
    env = {
        "NEURON_RT_VISIBLE_CORES": job.core_range or "",
        "NEURON_PROCESS_TAG": f"job-{job.pk}",
        # The cpu backend uses as many threads as the job was given cores.
        "OMP_NUM_THREADS": str(job.cores), "NEURONDECK_JOB_CORES": str(job.cores),
    }
    lnc = ((job.host.inventory or {}).get("lnc") if job.host else None)
    if lnc:
        # Trn2: the runtime's logical core size is the one neuron-ls reported for the
        # host (its core ids are numbered at it); the compiler must match it.
        env["NEURON_LOGICAL_NC_CONFIG"] = str(lnc)
    return {
        "job_id": job.pk, "kind": job.kind, "backend": job.host.backend if job.host else "cpu",
        "spec": spec, "workdir": str(workdir), "inputs": inputs, "cores": job.core_range,
        # A warm runner only ever runs one team's jobs (neuron_workers.process.warm).
        "reuse_key": f"team-{job.team_id}",
        "env": env,
    }


def replica_network(job: Job) -> dict:
    """Where an endpoint replica's server listens and the address the gateway uses
    (the host's Host.address, else loopback: a one-machine install), and how long
    it drains on SIGTERM (inside the kill grace _run_claimed gives it)."""
    address = (job.host.address if job.host else "") or "127.0.0.1"
    loopback = address in ("127.0.0.1", "localhost", "::1")
    return {"advertise_host": address, "bind_host": "127.0.0.1" if loopback else "0.0.0.0",
            "drain_s": settings.ENDPOINT_DRAIN_S}


def store_log_chunks(job_id: int, chunks: list[tuple[int, str]]) -> None:
    """Insert (offset, text) chunks of the job's log. A chunk already stored at its
    offset is kept, so storing a chunk twice (a retry) is harmless."""
    JobLogChunk.objects.bulk_create([JobLogChunk(job_id=job_id, offset=at, text=text) for at, text in chunks],
                                    ignore_conflicts=True)


class JobRecorder:
    """The supervisor's callbacks: heartbeats, cancel checks, log and metric sinks.

    The log and the child's pid are stored as they come, except until the first
    heartbeat (FIRST_HEARTBEAT_S) and after the child exited: most jobs on a warm
    cpu host are over by then, and what was held is stored in the transaction that
    records a success (record_outcome) instead of in statements of its own. A
    longer job's log reaches the page at most FIRST_HEARTBEAT_S late at its start."""

    FIRST_HEARTBEAT_S = 0.25

    def __init__(self, job: Job, host_id: int):
        self.job_id, self.host_id = job.pk, host_id
        # The attempt number pins "ours": a job preempted and placed again on this
        # same host is running here, but as another attempt that is not ours.
        self.attempt = job.attempts
        self.log_base = job.log_bytes
        self.log_end = job.log_bytes
        self.metrics: list[JobMetric] = []
        self.requests: list[float] = []  # request_ms not yet pushed to Redis
        self.holding = True
        self.held: list[tuple[int, str]] = []  # (offset, text) not yet stored
        self.pid: int | None = None
        self.pid_stored = False
        self.serves = job.kind == Kind.SERVE  # an endpoint replica: it reports its URL and readiness

    def heartbeat(self) -> None:
        """Renew the lease of our attempt, storing what is held (log chunks, log size,
        pid) with it: one UPDATE of the job's row. A job that is no longer ours gets
        no heartbeat, but its log is kept all the same, as flush_log keeps it."""
        self.holding = False
        chunks, fields = self.pending()
        with transaction.atomic():
            store_log_chunks(self.job_id, chunks)
            renewed = Job.objects.filter(pk=self.job_id, status=S.RUNNING, host_id=self.host_id,
                                         attempts=self.attempt).update(heartbeat_at=timezone.now(), **fields)
            if not renewed and (chunks or "worker_pid" in fields):
                Job.objects.filter(pk=self.job_id).update(**fields)
        self.stored()
        self.flush_metrics()

    def should_cancel(self) -> bool:
        # Stop when cancelled, and also when the job is no longer ours (reaped and
        # requeued after a long stall): it must never run twice at once.
        return not Job.objects.filter(pk=self.job_id, status=S.RUNNING, host_id=self.host_id,
                                      attempts=self.attempt, cancel_requested=False).exists()

    def on_start(self, pid: int) -> None:
        self.pid = pid
        if not self.holding:
            self.flush_log()

    def on_log(self, offset: int, text: str) -> None:
        """A chunk of the child's log.txt at `offset`; stored now unless held.
        A NUL (binary output) becomes U+FFFD, as undecodable bytes do: PostgreSQL
        text cannot hold it, and one would make every write of the job fail."""
        text = text.replace("\x00", "\ufffd")
        at = self.log_base + offset
        self.log_end = max(self.log_end, at + len(text.encode("utf-8")))
        self.held.append((at, text))
        if not self.holding:
            self.flush_log()

    def on_exit(self) -> None:
        self.holding = True  # the rest goes with the outcome

    def pending(self) -> tuple[list[tuple[int, str]], dict]:
        """The held chunks and the job fields that go with them (log_bytes, and the
        child's pid if it is not stored yet)."""
        fields: dict = {"log_bytes": self.log_end}
        if self.pid is not None and not self.pid_stored:
            fields["worker_pid"] = self.pid
        return self.held, fields

    def stored(self) -> None:
        """What pending() returned is in the database."""
        self.held = []
        self.pid_stored = self.pid is not None

    def flush_log(self) -> None:
        """Store the held chunks (and the pid) now, chunks and log size together."""
        chunks, fields = self.pending()
        if not chunks and "worker_pid" not in fields:
            return
        with transaction.atomic():
            store_log_chunks(self.job_id, chunks)
            Job.objects.filter(pk=self.job_id).update(**fields)
        self.stored()

    def on_metric(self, row: dict) -> None:
        if self.serves and (row.get("event") in REPLICA_EVENTS or "replica" in row):
            self.on_replica(row)
            return
        if "event" in row:
            if row["event"] in JOB_EVENTS:
                self.on_event(row)
            return
        latency = row.get("request_ms")
        if isinstance(latency, (int, float)) and not isinstance(latency, bool):
            self.requests.append(float(latency))  # a finished request (jobs.live.requests)
        step = row.get("step")
        if not isinstance(step, int):
            return
        for name, value in row.items():
            # "ts" is when the runner wrote the line, not a measurement: storing it
            # would make every training step cost one more row.
            if name not in ("step", "ts") and isinstance(value, (int, float)):
                self.metrics.append(JobMetric(job_id=self.job_id, step=step, name=name[:40], value=float(value)))
        if len(self.metrics) >= 200:
            self.flush_metrics()

    def on_event(self, row: dict) -> None:
        """A fact the job reports for its timeline (a checkpoint, a resume, a stage),
        stored as a JobEvent at once, with its step and details as the event's data.
        The metrics before it are stored first, so the page's curve reaches its step."""
        self.flush_metrics()
        data = {k: v for k, v in row.items() if k not in ("event", "message", "ts") and
                isinstance(v, (int, float, str, bool))}
        states.event(self.job_id, row["event"], str(row.get("message") or row["event"])[:500],
                     attempt=self.attempt, **data)

    def on_replica(self, row: dict) -> None:
        """An endpoint replica's server is ready (its URL) or has begun draining."""
        from jobs.endpoints.reconcile import reconcile_endpoint
        from jobs.endpoints.replicas import replica_reported

        endpoint_id = replica_reported(self.job_id, self.attempt, self.host_id, row)
        if endpoint_id is not None:
            reconcile_endpoint(endpoint_id)  # a rollout's traffic may shift, a cold start end, now

    def flush_metrics(self) -> None:
        if self.metrics:
            JobMetric.objects.bulk_create(self.metrics)
            self.metrics = []
        if self.requests:
            from jobs.live import requests

            try:
                requests.push(self.job_id, host_name(), self.requests)
            except redis_lib.RedisError as exc:  # live charts only: never fail the job
                log.warning("job %s: %s request latencies not published (%s)", self.job_id, len(self.requests), exc)
            self.requests = []


def run(job_id: int) -> str:
    """Claim and run `job_id` on this host. Returns what happened (for logs/tests)."""
    host_id = this_host_id()
    if host_id is None:
        log.error("job %s: this worker's host %s is not registered (is the agent running?)", job_id, host_name())
        return "no_host"
    # No pid yet: worker_pid is the job's own process (JobRecorder stores it), which
    # the agent reads the job's CPU and memory from; never this worker's.
    job = states.claim(job_id, host_id, host_name=host_name())
    if job is None and this_host_id(fresh=True) not in (host_id, None):
        # the cached pk was stale
        host_id = this_host_id()
        job = states.claim(job_id, host_id, host_name=host_name())
    if job is None:
        # A multi-host job's rank on this host, or nothing: a duplicate delivery, a
        # cancelled job, or another host's job ("not_claimed").
        from neuron_workers.gang_execution import run_rank

        return run_rank(job_id, host_id)
    host = job.host
    workdir = storage.job_dir(job.pk) / f"attempt-{job.attempts}"
    workdir.mkdir(parents=True, exist_ok=True)
    recorder = JobRecorder(job, host.pk)  # the claim stored the attempt's log header
    if job.kind == Kind.COMPILE and job.spec.get("compile_key"):
        hit = _await_compile_turn(job, recorder)
        if hit is not None:
            return _finish_as_cache_hit(job, hit, recorder)
    try:
        return _run_claimed(job, host, workdir, recorder)
    finally:
        if job.kind == Kind.COMPILE:
            from jobs.compile_cache import claims

            claims.release(job)  # after the outcome (and its artifact) is recorded


def _await_compile_turn(job: Job, recorder: "JobRecorder") -> ModelAsset | None:
    """An identical compile (same team and cache key) running elsewhere: wait for its
    artifact instead of compiling again (jobs.compile_cache.claims)."""
    from jobs.compile_cache import claims

    last = [time.monotonic()]

    def heartbeat() -> None:
        if time.monotonic() - last[0] >= settings.HEARTBEAT_S:
            last[0] = time.monotonic()
            recorder.heartbeat()

    return claims.await_turn(job, heartbeat=heartbeat, should_cancel=recorder.should_cancel,
                             timeout_s=job.max_runtime_s)


def _finish_as_cache_hit(job: Job, artifact: ModelAsset, recorder: "JobRecorder") -> str:
    """The identical compile this job waited for is done: a cache hit, as at submit."""
    from jobs.compile_cache.index import record_hit

    recorder.flush_log()
    result = {"cache_hit": True, "artifact_model_id": artifact.pk, "artifact": str(artifact),
              "source_job_id": artifact.source_job_id, "waited_for_identical_compile": True,
              **{k: v for k, v in (artifact.meta or {}).items() if k in ("compile_seconds", "latency_ms_p50")}}
    done = states.mark_finished(job.pk, S.SUCCEEDED, extra_filter={"host_id": job.host_id, "attempts": job.attempts},
                                message=f"compile cache hit after waiting for the identical compile of job "
                                        f"{artifact.source_job_id}: {artifact}",
                                result=result, cache_hit=True, output_model=artifact)
    if not done:
        _log_superseded(job)
        return "superseded"
    record_hit(artifact.pk)
    _cores_freed(job)
    return "cache_hit"


def _run_claimed(job: Job, host, workdir: Path, recorder: "JobRecorder") -> str:
    from neuron_workers.process import supervise

    payload = build_payload(job, workdir)
    mode = settings.RUNNER_MODE or ("exec" if payload["backend"] == "neuron" else "fork")
    try:
        outcome = supervise(
            payload, mode=mode, heartbeat=recorder.heartbeat, should_cancel=recorder.should_cancel,
            on_log=recorder.on_log, on_metric=recorder.on_metric,
            max_runtime_s=None if job.max_runtime_s == NO_TIME_LIMIT else job.max_runtime_s,
            # A replica's server finishes its in-flight requests (drain_s) between SIGTERM and SIGKILL.
            grace_s=settings.ENDPOINT_DRAIN_S + SERVE_EXIT_MARGIN_S if job.kind == Kind.SERVE
            else settings.JOB_KILL_GRACE_S,
            # The lease the reaper checks is JOB_LEASE_S; heartbeating at the configured
            # HEARTBEAT_S (not the supervisor's own default) keeps a healthy job well
            # inside it when deployments shorten the lease.
            heartbeat_s=settings.HEARTBEAT_S,
            first_heartbeat_s=min(JobRecorder.FIRST_HEARTBEAT_S, settings.HEARTBEAT_S),
            on_start=recorder.on_start, on_exit=recorder.on_exit,
        )
    except BaseException:
        recorder.flush_log()
        raise
    recorder.flush_metrics()
    result = record_outcome(job, outcome, workdir, recorder)
    if job.kind == Kind.SERVE:
        from jobs.endpoints.replicas import replica_exited

        replica_exited(job.pk)  # out of the routes now, not at the next reconcile
    if result != "superseded":
        _cores_freed(job)
    if result == "succeeded" and job.kind == Kind.COMPILE:
        from jobs.compile_cache.index import enforce_cap

        enforce_cap()  # a new entry may take the fleet's cache over its cap
    return result


def _cores_freed(job: Job) -> None:
    """This job's cores are free again: wake the scheduler if jobs of the family wait.
    Otherwise they would wait for the periodic dispatch (DISPATCH_EVERY_S), which
    caps a busy host at slots / DISPATCH_EVERY_S short jobs a second. Kicks coalesce
    (kick_dispatch): while one is pending (a burst), a run that starts after this
    commit is due anyway, and the query for waiting jobs is skipped."""
    from jobs.wake import kick_dispatch, kick_pending

    if kick_pending():
        return
    if Job.objects.filter(status=S.PENDING, family=job.family, cancel_requested=False).exists():
        kick_dispatch()


def record_outcome(job: Job, outcome, workdir: Path, recorder: JobRecorder | None = None) -> str:
    """Record how this attempt ended; returns what happened: succeeded, superseded,
    cancelled, timed_out, requeued (a retry, or a fine-tune's time-limit requeue) or failed. What `recorder` still holds (log,
    pid) is stored with a success, in its transaction; otherwise first."""
    # Record only over this very attempt. A job preempted (or reaped and requeued)
    # while its child ran is no longer ours: it is pending again, or already queued
    # or running as a later attempt, and whatever this child did must not finish it.
    # `mine` in every conditional UPDATE below is that check.
    mine = {"host_id": job.host_id, "attempts": job.attempts}
    if outcome.status == "succeeded":
        return _record_success(job, outcome, workdir, recorder, mine)
    if recorder is not None:
        recorder.flush_log()
    # One read serves both the "still ours?" check and the failure paths below.
    fresh = Job.objects.filter(pk=job.pk, status=S.RUNNING, **mine).values(
        "cancel_requested", "attempts", "max_attempts").first()
    if fresh is None:
        _log_superseded(job)
        return "superseded"
    if outcome.status == "cancelled" or fresh["cancel_requested"]:
        states.mark_finished(job.pk, S.CANCELLED, failure="cancelled", message="stopped on request", extra_filter=mine)
        return "cancelled"
    if outcome.status == "timed_out":
        # A fine-tune that saved a checkpoint goes back to the queue to resume from it
        # (jobs.lifecycle.time_limits has the rule); anything else fails.
        from jobs.lifecycle import time_limits

        happened = time_limits.reached(job, job.attempts, extra_filter={"host_id": job.host_id})
        return {"failed": "timed_out"}.get(happened, happened)
    code = outcome.error_code or "error"
    reason = outcome.error or "the job failed"
    if code in RETRYABLE and fresh["attempts"] < fresh["max_attempts"]:
        states.requeue(job.pk, sources=(S.RUNNING,), kind="retry", extra_filter=mine,
                       message=f"attempt {fresh['attempts']} {code}: {reason}; retrying")
        from jobs.wake import kick_dispatch

        transaction.on_commit(kick_dispatch)
        return "requeued"
    if code in RETRYABLE:
        reason = f"{reason} (gave up after {fresh['attempts']} attempts)"
    states.mark_finished(job.pk, S.FAILED, failure=code, reason=reason, message=reason, extra_filter=mine)
    return "failed"


def _record_success(job: Job, outcome, workdir: Path, recorder: JobRecorder | None, mine: dict) -> str:
    """The conditional UPDATE is the "still ours?" check: the held log, the
    artifacts and the model a fine-tune or compile made are stored only after it
    matched, in the same transaction, so a job superseded meanwhile gets nothing
    registered and nothing is half-recorded."""
    chunks, fields = recorder.pending() if recorder is not None else ([], {})
    try:
        with transaction.atomic():
            done = states.mark_finished(job.pk, S.SUCCEEDED, extra_filter=mine, result=outcome.result or {},
                                        message=f"succeeded in {outcome.duration_s:.1f} s", **fields)
            if done:
                store_log_chunks(job.pk, chunks)
                output = register_outputs(job, outcome.result or {}, workdir)
                if output is not None:
                    Job.objects.filter(pk=job.pk).update(output_model=output)
    except Exception as exc:  # never leave a finished child's job running
        log.exception("job %s: recording the outcome failed", job.pk)
        if recorder is not None:
            try:
                recorder.flush_log()
            except Exception:  # the outcome matters more than the log's tail
                log.exception("job %s: storing the log failed", job.pk)
        states.mark_finished(job.pk, S.FAILED, failure="error", reason=f"recording outputs failed: {exc}",
                             message=f"recording outputs failed: {exc}", extra_filter=mine)
        return "failed"
    if recorder is not None:
        if done:
            recorder.stored()
        else:
            recorder.flush_log()  # the attempt's log is kept even when its outcome is not
    if done:
        return "succeeded"
    _log_superseded(job)
    return "superseded"


def _log_superseded(job: Job) -> None:
    log.info("job %s attempt %s: no longer running here (preempted or requeued); recording nothing",
             job.pk, job.attempts)


def artifact_rows(workdir: Path) -> list[tuple[str, str, int, bool]]:
    """(name, path, size_bytes, is_dir) of each entry of the attempt's artifacts
    folder, and of its log.txt and metrics.jsonl."""
    artifacts = workdir / "artifacts"
    # Stored paths are the workdir's (resolved once) + the entry's name: resolving
    # each entry cost two realpath walks apiece on the job hot path, and an entry
    # that is a symlink is recorded where it sits, inside the job folder.
    prefix = storage.rel_path(workdir)
    rows = []
    try:
        with os.scandir(artifacts) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        entries = []
    for entry in entries:
        is_dir = entry.is_dir()
        path = Path(entry.path)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if is_dir else entry.stat().st_size
        rows.append((entry.name, f"{prefix}/artifacts/{entry.name}", size, is_dir))
    for extra in ("log.txt", "metrics.jsonl"):
        try:
            st = os.stat(workdir / extra)
        except FileNotFoundError:
            continue
        rows.append((extra, f"{prefix}/{extra}", st.st_size, False))
    return rows


def register_outputs(job: Job, result: dict, workdir: Path) -> ModelAsset | None:
    """The attempt's Artifact rows, and the model a fine-tune or compile made."""
    Artifact.objects.bulk_create([Artifact(job=job, name=name, path=path, size_bytes=size, is_dir=is_dir)
                                  for name, path, size, is_dir in artifact_rows(workdir)])
    artifacts = workdir / "artifacts"
    base = job.model
    if job.kind == Kind.FINETUNE and (artifacts / "checkpoint").is_dir():
        from jobs.assets.uploads import model_meta

        name = job.spec.get("output_name") or f"{base.name}-ft"
        return model_register(team=job.team, user=job.user, name=name, path=artifacts / "checkpoint",
                              meta={**model_meta(artifacts / "checkpoint"), "final_loss": result.get("final_loss"),
                                    "steps": result.get("steps")},
                              parent=base, source_job=job)
    if job.kind == Kind.COMPILE and artifacts.is_dir():
        fmt = ModelAsset.Format.TORCHSCRIPT if job.family == "cpu" else ModelAsset.Format.NEURON
        meta = {**(base.meta or {}), "batch_size": job.spec.get("batch_size"),
                "sequence_length": job.spec.get("sequence_length"), "target": job.family,
                "compiler_options": job.spec.get("compiler_options", []),
                **{k: job.spec[k] for k in EXPORT_FIELDS if k in job.spec},
                **{k: result.get(k) for k in ("compile_seconds", "latency_ms_p50", "latency_ms_p95", "compiler_version",
                                              "logical_nc_config")}}
        return model_register(team=job.team, user=job.user, name=f"{base.name}-{job.family}", path=artifacts,
                              meta=meta, fmt=fmt, parent=base, source_job=job,
                              compile_key=job.spec.get("compile_key", ""))
    return None
