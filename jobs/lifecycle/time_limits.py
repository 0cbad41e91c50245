"""What happens when a running attempt reaches its time limit (Job.max_runtime_s).

The limit bounds each attempt. The worker stops the attempt like a preemption:
SIGTERM, then JOB_KILL_GRACE_S seconds in which a fine-tune saves the step it
reached, then SIGKILL. Then, one rule:

- a **fine-tune whose attempt saved a checkpoint** (one of its every-K-steps
  checkpoints or the one saved in the grace period) and **with attempts left**
  (Job.max_attempts counts every attempt, whatever ended it) goes back to the queue
  and resumes from its newest checkpoint: the timeline says "reached its time limit
  … requeued to resume from step S (attempt n of m)";
- anything else fails as ``timed_out``: another kind (it would only start over), a
  fine-tune that saved nothing in the attempt (it made no progress a next attempt
  could keep), or its last attempt (the reason names its newest checkpoint).

The checkpoints an attempt saved are its "checkpoint" JobEvents (the worker records
each one as the job reports it, tagged with the attempt), all stored before the
outcome is recorded. Called by the single-host worker (neuron_workers.execution) and
by a gang's decision (jobs.lifecycle.gangs), with the job's attempt pinned.
"""
from __future__ import annotations

from django.db import transaction

from jobs.lifecycle import states
from jobs.models import Job, JobEvent, Kind

S = Job.Status
KIND = "time_limit"  # the requeue's reason code and timeline event


def saved_step(job_id: int, attempt: int) -> int | None:
    """The newest step attempt `attempt` saved a checkpoint at, or None."""
    steps = [data.get("step") for data in JobEvent.objects.filter(job_id=job_id, kind="checkpoint",
                                                                   data__attempt=attempt)
             .values_list("data", flat=True)]
    steps = [step for step in steps if isinstance(step, int)]
    return max(steps) if steps else None


def newest_checkpoint(job_id: int) -> int | None:
    """The newest step any attempt saved a checkpoint at, or None."""
    steps = [data.get("step") for data in JobEvent.objects.filter(job_id=job_id, kind="checkpoint")
             .values_list("data", flat=True)]
    steps = [step for step in steps if isinstance(step, int)]
    return max(steps) if steps else None


def reached(job: Job, attempt: int, *, where: str = "", extra_filter: dict | None = None,
            event_data: dict | None = None) -> str:
    """Attempt `attempt` of `job` (running) was stopped at its time limit: requeue it to
    resume or fail it, by the rule above. `where` names the rank of a gang that hit it
    ("rank 1 on trn-b"). Returns "requeued", "failed", or "superseded" (the attempt
    was no longer running)."""
    limit = job.max_runtime_s
    at = f" ({where})" if where else ""
    mine = {"attempts": attempt, **(extra_filter or {})}
    saved = saved_step(job.pk, attempt) if job.kind == Kind.FINETUNE else None
    if saved is not None and attempt < job.max_attempts:
        moved = states.requeue(
            job.pk, sources=(S.RUNNING,), kind=KIND, extra_filter=mine,
            event_data={**(event_data or {}), "step": saved, "attempt": attempt},
            message=f"reached its time limit of {limit} s{at}; stopped with its checkpoint at step {saved} "
                    f"saved; requeued to resume from it (attempt {attempt + 1} of {job.max_attempts} next)")
        if moved:
            from jobs.wake import kick_dispatch

            transaction.on_commit(kick_dispatch)
        return "requeued" if moved else "superseded"
    reason = f"exceeded max runtime of {limit} s"
    if job.kind == Kind.FINETUNE:
        newest = newest_checkpoint(job.pk)
        if saved is None:
            reason += ("; this attempt saved no checkpoint, so another would not get further (a shorter "
                       "checkpoint_every or a longer max_runtime_s would)")
        else:
            reason += f" on its last attempt ({attempt} of {job.max_attempts})"
        if newest is not None:
            reason += f"; its newest checkpoint is at step {newest}"
    done = states.mark_finished(job.pk, S.FAILED, failure="timed_out", reason=reason[:500], extra_filter=mine,
                                message=f"timed out after {limit} s{at}: SIGTERM, then SIGKILL; {reason}",
                                event_data=event_data)
    return "failed" if done else "superseded"
