"""The worker side of one host's rank of a multi-host job (a gang): claim the rank,
run this host's share under torchrun (neuron_workers.process.gang), heartbeat the
rank, stop when the gang stops, report how the rank ended. The gang's rules (when it
stops, succeeds, is requeued or fails, and who is named) are jobs.lifecycle.gangs'.

Each host works in its own folder of the attempt: rank 0 in attempt-<n> (its log is
the job's log, its result and artifacts the job's, recorded once), rank r in
attempt-<n>/rank-<r> (its log.txt becomes the job's artifact rank-<r>-attempt-<n>-log.txt).
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from django.conf import settings

from jobs.assets import storage
from jobs.lifecycle import gangs, states
from jobs.models import Artifact, GangMember, Job
from neuron_workers.execution import JobRecorder, _cores_freed, build_payload, register_outputs
from neuron_workers.process.gang import gang_env
from neuron_workers.process.workdir import RESULT_FILE

log = logging.getLogger(__name__)
S = Job.Status
PER_RANK = re.compile(r"\.r[0-9]+$")  # a metric of one torch rank, e.g. samples_per_s.r3


def rank_workdir(job_id: int, attempt: int, rank: int) -> Path:
    base = storage.job_dir(job_id) / f"attempt-{attempt}"
    return base if rank == 0 else base / f"rank-{rank}"


class RankRecorder(JobRecorder):
    """JobRecorder for one rank: the heartbeat renews the rank's lease (and the
    job's); the stop check reads the whole gang's state. Only rank 0's log and
    metrics are the job's; another rank's log stays in its own folder."""

    def __init__(self, job: Job, member: GangMember, rank_0_result: Path):
        super().__init__(job, job.host_id)
        self.rank, self.member_id = member.rank, member.pk
        self.rank_0_result = rank_0_result
        self.stop: str | None = None  # why the gang asked this rank to stop

    def heartbeat(self) -> None:
        self.holding = False
        if self.rank == 0:
            self.flush_log()
        gangs.heartbeat(self.job_id, self.attempt, self.member_id)
        self.flush_metrics()

    def should_cancel(self) -> bool:
        self.stop = (gangs.stop_reason(self.job_id, self.attempt, self.member_id)
                     or gangs.training_over(self.rank_0_done_at(), time.time()))
        return self.stop is not None

    def rank_0_done_at(self) -> float | None:
        """When rank 0's process wrote an ok result (its workdir is on shared storage)."""
        from neuron_workers.process.workdir import read_result

        try:
            written = self.rank_0_result.stat().st_mtime
        except FileNotFoundError:
            return None
        return written if (read_result(self.rank_0_result.parent) or {}).get("ok") else None

    def on_start(self, pid: int) -> None:
        GangMember.objects.filter(pk=self.member_id).update(worker_pid=pid)
        if self.rank == 0:
            super().on_start(pid)

    def on_log(self, offset: int, text: str) -> None:
        if self.rank == 0:
            super().on_log(offset, text)

    def on_metric(self, row: dict) -> None:
        """Rank 0's metrics and timeline reports are the job's; another host's ranks
        add only their own progress figures, named "<name>.r<torch rank>"
        (e.g. samples_per_s.r3), so the page can show each rank's step and throughput."""
        if self.rank == 0:
            super().on_metric(row)
        elif "event" not in row:
            own = {name: value for name, value in row.items() if PER_RANK.search(name)}
            if own:
                super().on_metric({**own, "step": row.get("step")})


def rank_payload(job: Job, member: GangMember, members: list[GangMember], workdir: Path) -> dict:
    """The runner payload of this host's share: the job's payload with this host's cores
    and the gang's torchrun plan (payload["gang"], read by neuron_workers.process.gang)."""
    payload = build_payload(job, workdir)
    host = member.host
    backend = host.backend or "cpu"
    port, _ = gangs.ports(job.pk, job.attempts)
    rank0 = next(m for m in members if m.rank == 0)
    gang = {
        "nnodes": len(members), "node_rank": member.rank,
        # neuron: one process per NeuronCore of the host; cpu: one per host, with its cores as threads.
        "nproc_per_node": member.cores if backend == "neuron" else 1,
        "cores_per_host": member.cores,
        "endpoint": rank0.host.reach if rank0.host else "", "port": port,
        "rdzv_id": gangs.rdzv_id(job.pk, job.attempts), "local_addr": host.reach,
        "hosts": [m.host.reach if m.host else "" for m in members],
        "join_timeout_s": settings.GANG_JOIN_TIMEOUT_S, "backend": backend,
        # neuron: neuron_parallel_compile over every host first (the cpu backend compiles nothing ahead).
        "precompile": backend == "neuron" and bool(job.spec.get("precompile")),
    }
    payload.update(backend=backend, cores=member.core_range, gang=gang)
    payload.pop("reuse_key", None)  # a gang's processes are never warm runners
    payload["env"].update({"NEURON_RT_VISIBLE_CORES": member.core_range, "NEURONDECK_JOB_CORES": str(member.cores)})
    payload["env"].update(gang_env(gang, member.core_range))
    return payload


def run_rank(job_id: int, host_id: int) -> str:
    """Claim and run this host's rank of gang `job_id`; what happened (for logs and tests)."""
    from neuron_workers.process import supervise

    claimed = gangs.claim_rank(job_id, host_id)
    if claimed is None:
        return "not_claimed"
    job, member = claimed
    attempt = job.attempts
    members = gangs.members_of(job.pk)
    workdir = rank_workdir(job.pk, attempt, member.rank)
    workdir.mkdir(parents=True, exist_ok=True)
    recorder = RankRecorder(job, member, rank_workdir(job.pk, attempt, 0) / RESULT_FILE)
    payload = rank_payload(job, member, members, workdir)
    try:
        outcome = supervise(
            payload, mode="exec", heartbeat=recorder.heartbeat, should_cancel=recorder.should_cancel,
            on_log=recorder.on_log, on_metric=recorder.on_metric, max_runtime_s=job.max_runtime_s,
            grace_s=settings.JOB_KILL_GRACE_S, heartbeat_s=settings.HEARTBEAT_S,
            first_heartbeat_s=min(JobRecorder.FIRST_HEARTBEAT_S, settings.HEARTBEAT_S),
            on_start=recorder.on_start, on_exit=recorder.on_exit,
        )
    finally:
        recorder.flush_log()
    recorder.flush_metrics()
    if member.rank > 0:
        keep_log(job.pk, attempt, member.rank, workdir)
    ending = ending_of(outcome, recorder.stop, workdir)
    happened = gangs.rank_ended(job.pk, attempt, member.pk, ending,
                                on_success=lambda locked: record_success(locked, attempt, len(members)))
    if happened in ("succeeded", "failed", "requeued", "cancelled"):
        _cores_freed(job)
    log.info("job %s rank %s on host %s: %s (%s)", job.pk, member.rank, member.host_id, happened, ending.code)
    return f"rank {member.rank}: {happened}"


def keep_log(job_id: int, attempt: int, rank: int, workdir: Path) -> None:
    """Another host's log is not the job's log (rank 0's is): it becomes one of the
    job's artifacts, rank-<r>-attempt-<n>-log.txt, downloadable however the job ends."""
    path = workdir / "log.txt"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    Artifact.objects.create(job_id=job_id, name=f"rank-{rank}-attempt-{attempt}-log.txt",
                            path=storage.rel_path(path), size_bytes=size)


def ending_of(outcome, stop: str | None, workdir: Path | None = None) -> gangs.Ending:
    """How this rank ended, for jobs.lifecycle.gangs: its process's outcome, and why
    the gang stopped it if it did. A rank that had already failed by itself when the
    gang stopped it (torchrun was still shutting down) ends with its own failure."""
    from neuron_workers.process.workdir import read_result

    exit_code = outcome.exit_code if outcome.exit_code is not None else (
        128 + outcome.signal if outcome.signal is not None else None)
    if outcome.status == "cancelled" and workdir is not None:
        verdict = read_result(workdir) or {}
        if verdict.get("ok") is False and verdict.get("code") not in (None, "cancelled"):
            return gangs.Ending(str(verdict["code"]), str(verdict.get("error") or ""), exit_code)
        if (stop or "").startswith(gangs.TRAINING_OVER) and verdict.get("ok") is not False:
            # The training was over (rank 0's result); this host hung on its way out.
            return gangs.Ending("ok", f"stopped: {stop}", exit_code)
    if outcome.status == "succeeded":
        if exit_code == 0:
            return gangs.Ending("ok", exit_code=0)
        # Rank 0 of this host wrote an ok verdict, but torchrun says a process of the host failed.
        return gangs.Ending("crashed", f"torchrun exited with status {exit_code}: a process of this host failed",
                            exit_code)
    if outcome.status == "cancelled":
        if stop == "cancelled on request":
            return gangs.Ending("cancelled", "stopped on request", exit_code)
        return gangs.Ending(gangs.STOPPED, stop or "stopped", exit_code)
    if outcome.status == "timed_out":
        return gangs.Ending("timed_out", outcome.error or "timed out", exit_code)
    return gangs.Ending(outcome.error_code or "error", outcome.error or "the rank failed", exit_code)


def record_success(job: Job, attempt: int, hosts: int) -> bool:
    """Every rank exited 0: the job succeeded with rank 0's result and artifacts (in
    jobs.lifecycle.gangs.rank_ended's transaction, once)."""
    from neuron_workers.process.workdir import read_result

    workdir = rank_workdir(job.pk, attempt, 0)
    result = dict(((read_result(workdir) or {}).get("result")) or {})
    result["hosts"] = hosts
    stopped = [f"rank {m.rank} on {m.host.name if m.host else '?'} {m.detail}"
               for m in gangs.members_of(job.pk) if m.state == GangMember.State.EXITED and m.detail]
    message = (f"succeeded: every rank of the {hosts} hosts exited 0" if not stopped else
               f"succeeded: the training finished (rank 0's result); {'; '.join(stopped)}")
    done = states.mark_finished(job.pk, S.SUCCEEDED, extra_filter={"attempts": attempt}, result=result,
                                message=message)
    if done:
        output = register_outputs(job, result, workdir)
        if output is not None:
            Job.objects.filter(pk=job.pk).update(output_model=output)
    return done
