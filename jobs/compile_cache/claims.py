"""Two identical compiles at once compile once, across hosts.

A CompileClaim row per (team, compile key) is the lock. The worker whose job
inserts it compiles; a worker that finds it held by another *active* job waits
(heartbeating its own job) until that compile's artifact is registered, then
finishes its job as a cache hit. A claim whose holder is no longer active (it
failed, was cancelled, requeued, or its host died) is taken over by a conditional
UPDATE (holder unchanged -> one row), so exactly one waiter compiles next.

No torn entry: the artifact becomes visible to waiters only when the holder's
success is recorded, in the transaction that registers the ModelAsset (the files
are complete before that), and the claim is released after it.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from django.db import IntegrityError, transaction
from django.utils import timezone

from jobs.models import CompileClaim, Job, ModelAsset

ACTIVE = (Job.Status.QUEUED, Job.Status.RUNNING)
POLL_S = 0.05
MAX_POLL_S = 1.0


def claim_key(job: Job) -> str:
    return f"{job.team_id}:{job.spec.get('compile_key', '')}"


def cached(job: Job) -> ModelAsset | None:
    key = job.spec.get("compile_key")
    return ModelAsset.objects.filter(team_id=job.team_id, compile_key=key).first() if key else None


def try_claim(job: Job) -> bool:
    """True if `job` now holds its configuration's claim (inserted, already its own, or
    taken over from a holder that is no longer active)."""
    key = claim_key(job)
    try:
        with transaction.atomic():
            CompileClaim.objects.create(key=key, job=job)
        return True
    except IntegrityError:
        pass
    holder = CompileClaim.objects.filter(key=key).values_list("job_id", flat=True).first()
    if holder is None:
        return try_claim(job)  # released meanwhile
    if holder == job.pk:
        return True
    # The holder's attempt must be the one running: a job requeued and running again
    # later is another attempt, but the same job id keeps its claim (it compiles again).
    if Job.objects.filter(pk=holder, status__in=ACTIVE).exists():
        return False
    return CompileClaim.objects.filter(key=key, job_id=holder).update(job=job, claimed_at=timezone.now()) == 1


def release(job: Job) -> None:
    CompileClaim.objects.filter(key=claim_key(job), job=job).delete()


def await_turn(job: Job, *, heartbeat: Callable[[], None], should_cancel: Callable[[], bool],
               timeout_s: float) -> ModelAsset | None:
    """Wait until `job` may compile (returns None, holding the claim) or its
    configuration is cached (returns the artifact). Gives up on cancel or after
    `timeout_s` (returns None without the claim: the job compiles anyway, which is
    safe, only duplicate work)."""
    deadline = time.monotonic() + timeout_s
    delay = POLL_S
    while True:
        hit = cached(job)
        if hit is not None:
            return hit
        if try_claim(job):
            # Checked again: the holder may have registered its artifact and released
            # the claim between our two reads.
            hit = cached(job)
            if hit is not None:
                release(job)
            return hit
        if should_cancel() or time.monotonic() > deadline:
            return None
        heartbeat()
        time.sleep(delay)
        delay = min(MAX_POLL_S, delay * 1.5)
