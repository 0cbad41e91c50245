"""The one module that changes Job.status.

Every transition is a conditional UPDATE through the ORM,
``Job.objects.filter(pk=…, status__in=<sources>, …).update(status=<target>, …)``,
and is made only if exactly one row changed: two processes racing on the same job
cannot both win, the loser sees 0 rows changed and does nothing. Each transition
writes a JobEvent in the same transaction. Releasing a job's cores (and closing its
attempt) happens here too, exactly once, in the same transaction as the transition
that ends the attempt.
"""
from __future__ import annotations

from typing import Any, Iterable

from django.db import transaction
from django.db.models import Case, F, IntegerField, Value, When
from django.utils import timezone

from jobs.models import CoreAllocation, GangMember, Job, JobAttempt, JobEvent, JobLogChunk
from jobs.notify import events as notify_events

S = Job.Status

# from-state(s) -> to-state; the closed set of legal moves.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    S.PENDING: (S.QUEUED, S.CANCELLED, S.FAILED, S.SUCCEEDED, S.SUSPENDED),  # succeeded: a compile cache hit
    S.QUEUED: (S.RUNNING, S.PENDING, S.CANCELLED, S.FAILED, S.SUSPENDED),
    S.RUNNING: (S.SUCCEEDED, S.FAILED, S.CANCELLED, S.PENDING, S.SUSPENDED),
    # A user's suspend: the job holds no cores and waits, until resumed (back to
    # pending; a fine-tune then resumes from its checkpoint) or cancelled.
    S.SUSPENDED: (S.PENDING, S.CANCELLED),
    S.SUCCEEDED: (),
    S.FAILED: (),
    S.CANCELLED: (),
}


class IllegalTransition(ValueError):
    pass


def _check(sources: Iterable[str], target: str) -> tuple[str, ...]:
    sources = tuple(sources)
    for source in sources:
        if target not in TRANSITIONS[source]:
            raise IllegalTransition(f"{source} -> {target} is not a job transition")
    return sources


def event(job_id: int, kind: str, message: str = "", actor=None, **data: Any) -> JobEvent:
    return JobEvent.objects.create(job_id=job_id, kind=kind, message=message, actor=actor, data=data)


def transition(
    job_id: int,
    sources: Iterable[str],
    target: str,
    *,
    message: str = "",
    actor=None,
    event_data: dict | None = None,
    extra_filter: dict | None = None,
    **fields: Any,
) -> bool:
    """Move job `job_id` from any of `sources` to `target`, setting `fields` (values
    or expressions such as F("attempts") + 1).

    Returns True if this call made the change (exactly one row updated), False if
    the job was not in a source state or did not match `extra_filter` (someone else
    got there first)."""
    sources = _check(sources, target)
    # savepoint=False: callers (claim, the worker's outcome, requeue) nest this in
    # their own transaction, and nothing here is worth a partial rollback: if a
    # statement fails, the caller's whole transaction must roll back anyway.
    with transaction.atomic(savepoint=False):
        changed = Job.objects.filter(pk=job_id, status__in=sources, **(extra_filter or {})).update(
            status=target, **fields
        )
        if changed != 1:
            return False
        if target in Job.FINISHED or target in (S.PENDING, S.SUSPENDED):
            _release(job_id, outcome="requeued" if target == S.PENDING else target)
        event(job_id, target, message, actor, **(event_data or {}))
        if target in (S.SUCCEEDED, S.FAILED):  # the outbox, in this transaction
            notify_events.job_transition(job_id, target, failure=fields.get("failure", ""), message=message)
    return True


def _release(job_id: int, outcome: str) -> None:
    """Free the job's cores and close its open attempt. Runs inside the transition's
    transaction, after the job's row was updated (and so locked), so it happens
    exactly once per attempt whichever of finish, cancel, timeout, preemption or
    reaping gets there first."""
    now = timezone.now()
    open_attempts = JobAttempt.objects.filter(job_id=job_id, ended_at__isnull=True)
    for pk, cores, started_at in open_attempts.values_list("pk", "cores", "started_at"):
        JobAttempt.objects.filter(pk=pk).update(
            ended_at=now, outcome=outcome, core_seconds=cores * max((now - started_at).total_seconds(), 0.0))
    CoreAllocation.objects.filter(job_id=job_id).delete()
    if outcome in ("requeued", S.CANCELLED, S.SUSPENDED):
        # A gang's next placement writes new ranks, and a rank still running from this
        # attempt sees its row gone and stops; a finished gang keeps its rank table.
        GangMember.objects.filter(job_id=job_id).delete()


def mark_queued(job: Job, host_id: int, core_start: int, reason: str = "") -> bool:
    now = timezone.now()
    return transition(
        job.pk, [S.PENDING], S.QUEUED,
        message=reason or "placed",
        host_id=host_id, core_start=core_start, queued_at=now, reason_code="", reason="",
    )


def mark_queued_many(placements: list[tuple[int, int, int, str, bool]],
                     gangs: dict[int, list[tuple[int, int, int]]] | None = None) -> set[int]:
    """pending → queued for many jobs at once, each taking its cores: (job_id,
    host_id, core_start, message, borrowed) each; the job's cores are
    core_start … core_start + job.cores - 1 on that host. A gang (a job in `gangs`)
    takes instead, for each rank in order, (host_id, core_start, cores) - rank 0 is
    the job's host - and gets its GangMember rows: all of its hosts or, if it does
    not move, none. Returns the ids that moved (a job cancelled meanwhile stays as
    it is and takes no cores).

    The dispatcher places up to hundreds of jobs per run, so this is a fixed number
    of statements whatever their number: the jobs still pending are locked (in id
    order, so concurrent runs cannot deadlock on them), moved by one UPDATE, and
    their events and core allocations inserted in bulk. A cancel racing with us
    either committed before (the job is not pending and is skipped) or waits for
    our commit and then cancels the queued job, releasing its cores. A core already
    held violates the (host, core) constraint and fails the caller's whole
    transaction."""
    if not placements:
        return set()
    _check([S.PENDING], S.QUEUED)
    by_id = {p[0]: p for p in placements}
    now = timezone.now()
    with transaction.atomic(savepoint=False):  # inside dispatch's transaction: see transition()
        moving = {pk: (team_id, family, cores) for pk, team_id, family, cores
                  in Job.objects.select_for_update().filter(pk__in=list(by_id), status=S.PENDING).order_by("pk")
                  .values_list("pk", "team_id", "family", "cores")}
        if not moving:
            return set()
        Job.objects.filter(pk__in=list(moving), status=S.PENDING).update(
            status=S.QUEUED, queued_at=now, reason_code="", reason="",
            host_id=_per_job({pk: by_id[pk][1] for pk in moving}),
            core_start=_per_job({pk: by_id[pk][2] for pk in moving}),
        )
        JobEvent.objects.bulk_create([JobEvent(job_id=pk, kind=S.QUEUED, message=by_id[pk][3], at=now)
                                      for pk in moving])
        allocations, members = [], []
        for pk, (team_id, family, cores) in moving.items():
            _, host_id, core_start, _, borrowed = by_id[pk]
            ranks = (gangs or {}).get(pk) or [(host_id, core_start, cores)]
            for rank, (rank_host, rank_start, rank_cores) in enumerate(ranks):
                allocations += [CoreAllocation(host_id=rank_host, core=core, job_id=pk, team_id=team_id,
                                               family=family, borrowed=borrowed, since=now)
                                for core in range(rank_start, rank_start + rank_cores)]
                if len(ranks) > 1:
                    members.append(GangMember(job_id=pk, rank=rank, host_id=rank_host, core_start=rank_start,
                                              cores=rank_cores))
        CoreAllocation.objects.bulk_create(allocations)
        GangMember.objects.bulk_create(members)
    return set(moving)


def _per_job(values: dict[int, int]) -> Case:
    """An UPDATE value that differs per job: values[job id]."""
    return Case(*[When(pk=pk, then=Value(value)) for pk, value in values.items()], output_field=IntegerField())


def attempt_header(attempt: int, host_name: str, core_range: str | None) -> str:
    """The log line that opens each attempt."""
    return f"=== attempt {attempt} on {host_name} cores {core_range} ===\n"


def mark_running(job_id: int, host_id: int, pid: int | None = None) -> bool:
    """The worker's claim: queued → running for this host only. A second delivery of
    the same run message (or a delivery to another host) changes nothing."""
    return claim(job_id, host_id, pid) is not None


def claim(job_id: int, host_id: int, pid: int | None = None, host_name: str | None = None) -> Job | None:
    """mark_running that also returns the claimed job, loaded with what the worker
    needs (host, model, dataset; team and user load lazily), or None if not claimed.
    With `host_name` the attempt's log header (attempt_header) is stored with the
    claim, so the log says where every attempt ran even if the worker dies right
    after. Claim, event, header and the JobAttempt row commit together."""
    now = timezone.now()
    claimable = {"host_id": host_id, "cancel_requested": False, "host_count": 1}  # a gang starts through start_gang
    with transaction.atomic():
        # The job's row is read and locked first (only its own row, not its host's or
        # model's), so the header and the attempt are built from what cannot change
        # until commit, and the claim's one UPDATE also carries the header's size.
        try:
            job = Job.objects.select_related("host", "model", "dataset").select_for_update(of=("self",)).get(
                pk=job_id, status=S.QUEUED, **claimable)
        except Job.DoesNotExist:
            return None
        header = attempt_header(job.attempts + 1, host_name, job.core_range) if host_name is not None else ""
        claimed = {"attempts": job.attempts + 1, "started_at": now, "heartbeat_at": now, "worker_pid": pid,
                   "log_bytes": job.log_bytes + len(header.encode("utf-8"))}
        if not transition(job_id, [S.QUEUED], S.RUNNING, extra_filter=claimable, **claimed):
            return None
        if header:
            _store_log_chunk(job_id, job.log_bytes, header)
        for name, value in {**claimed, "status": S.RUNNING}.items():
            setattr(job, name, value)
        JobAttempt.objects.create(
            job=job, team_id=job.team_id, user_id=job.user_id, kind=job.kind, family=job.family,
            instance_type=job.host.instance_type if job.host else "", host_id=host_id,
            number=job.attempts, cores=job.cores, started_at=now,
        )
    return job


def start_gang(job_id: int, host_names: list[str]) -> bool:
    """queued → running for a multi-host job, on the first of its ranks' claims
    (jobs.lifecycle.gangs.claim_rank, which holds the job's row): a new attempt over
    all its hosts' cores, with its log header naming them. False if it is not queued
    any more (another rank started it, or it was cancelled)."""
    now = timezone.now()
    with transaction.atomic():
        started = transition(
            job_id, [S.QUEUED], S.RUNNING, extra_filter={"host_count__gt": 1, "cancel_requested": False},
            message=f"started on {len(host_names)} hosts: {', '.join(host_names)}",
            attempts=F("attempts") + 1, started_at=now, heartbeat_at=now,
        )
        if not started:
            return False
        job = Job.objects.select_related("host").get(pk=job_id)
        _append_log(job, f"=== attempt {job.attempts} on {len(host_names)} hosts {', '.join(host_names)} "
                         f"({job.cores} cores in all) ===\n")
        JobAttempt.objects.create(
            job=job, team_id=job.team_id, user_id=job.user_id, kind=job.kind, family=job.family,
            instance_type=job.host.instance_type if job.host else "", host_id=job.host_id,
            number=job.attempts, cores=job.cores, started_at=now,
        )
    return True


def _append_log(job: Job, text: str) -> None:
    """Add `text` at the end of `job`'s log (the row and the instance)."""
    _store_log_chunk(job.pk, job.log_bytes, text)
    size = len(text.encode("utf-8"))
    Job.objects.filter(pk=job.pk).update(log_bytes=F("log_bytes") + size)
    job.log_bytes += size


def _store_log_chunk(job_id: int, offset: int, text: str) -> None:
    """A chunk of the job's log at `offset`. A chunk already stored at that offset (a
    superseded attempt's recorder still flushing) is kept."""
    JobLogChunk.objects.bulk_create([JobLogChunk(job_id=job_id, offset=offset, text=text)], ignore_conflicts=True)


def mark_finished(job_id: int, target: str, *, sources=(S.RUNNING,), message: str = "", actor=None,
                  failure: str = "", result: dict | None = None, reason: str = "",
                  extra_filter: dict | None = None, **fields: Any) -> bool:
    """`extra_filter` narrows the conditional UPDATE, e.g. to one host's attempt, so
    a worker recording a run that was preempted meanwhile changes nothing."""
    return transition(
        job_id, sources, target, message=message, actor=actor, extra_filter=extra_filter,
        finished_at=timezone.now(), failure=failure, reason=reason,
        reason_code=failure, **({"result": result} if result is not None else {}), **fields,
    )


# What a job leaving its placement clears (requeue and suspend): the next placement sets them again.
UNPLACED = {"host_id": None, "core_start": None, "queued_at": None, "started_at": None, "heartbeat_at": None,
            "worker_pid": None}


def suspend(job_id: int, *, actor=None, message: str) -> bool:
    """pending, queued or running -> suspended: its cores are freed at once (a running
    job's worker sees the job is no longer its own and stops the process with SIGTERM
    and the kill grace, in which a fine-tune saves a checkpoint)."""
    return transition(job_id, [S.PENDING, S.QUEUED, S.RUNNING], S.SUSPENDED, message=message, actor=actor,
                      extra_filter={"cancel_requested": False}, reason_code="suspended", reason=message,
                      **UNPLACED)


def resume(job_id: int, *, actor=None, message: str) -> bool:
    """suspended -> pending: back in the queue; a fine-tune resumes from its newest checkpoint."""
    return transition(job_id, [S.SUSPENDED], S.PENDING, message=message, actor=actor,
                      reason_code="resumed", reason="waiting for the scheduler")


def requeue(job_id: int, *, sources=(S.RUNNING, S.QUEUED), message: str, kind: str = "requeued",
            actor=None, event_data: dict | None = None, extra_filter: dict | None = None) -> bool:
    """Back to pending (worker lost with attempts left, preempted, lost message)."""
    with transaction.atomic():
        moved = transition(
            job_id, sources, S.PENDING, message=message, actor=actor, event_data=event_data,
            extra_filter=extra_filter, **UNPLACED, reason_code=kind, reason=message,
        )
        if moved and kind != "requeued":
            event(job_id, kind, message, actor, **(event_data or {}))
        if moved:
            notify_events.job_requeued(job_id, kind, message)
    return moved
