"""The rules of a multi-host job (a gang, Job.host_count > 1): all its hosts run it
together, or none does.

The dispatcher places a gang whole (a GangMember row per host, rank 0 = Job.host) and
sends the run message to every one of its hosts. Here:

- **claim_rank**: a host's worker claims its rank (placed → running, once: a
  duplicate delivery changes nothing); the first claim starts the job (queued →
  running, states.start_gang).
- **stop_reason**: what every rank's supervisor asks once a second: is the gang still
  going? It stops when the job was cancelled, requeued or finished, when its own rank
  was given up, or when another rank failed. So no rank waits in a collective for a
  peer that is gone; torchrun's rendezvous timeout and gloo's or the Neuron runtime's collective timeouts are only the backstop.
- **training_over**: once rank 0's process wrote its ok result, the training is over
  (rank 0 gets there only past the last collective); a host whose processes have not
  exited GANG_EXIT_WINDOW_S later hangs on its way out (a rank in its teardown, or
  torchrun waiting in its exit barrier for that rank's host) and is stopped by its
  worker, counted as exited unless it reported a failure of its own: the gang ends
  then instead of at its time limit.
- **rank_ended**: a rank's process ended; the gang is decided once every rank ended
  (or one was lost): it succeeds only if every rank exited 0; otherwise the job is
  requeued (attempts left, and the culprit died rather than reported an error) or
  failed, the culprit's host and rank named on its timeline.
- **reap**: (scheduler.reap) a rank whose worker stopped heartbeating (lease
  expiry), whose host went offline, or that no worker took (JOB_LEASE_S +
  QUEUED_RESEND_AFTER_S after the first rank started) is lost: the gang is requeued
  or failed at once and the other ranks stop; a rank whose run message may have been
  lost gets it again first.

Job statuses change only through jobs.lifecycle.states; its cores (every host's)
are released together there, in the transition.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs.lifecycle import states
from jobs.models import GangMember, Host, Job

log = logging.getLogger(__name__)
S = Job.Status
M = GangMember.State

# How a rank ended, most telling first: when several ranks fail, the one that died or
# reported a failure of its own (a backend's code: bad_input, compile_error, ...) is
# named, not the peers whose collectives then broke (an unexpected exception, "error")
# or that were stopped. Ties go to the rank that ended first.
LOST = "worker_lost"  # its worker or host stopped heartbeating
STOPPED = "stopped"  # stopped because the gang was stopping
TRAINING_OVER = "the training finished"  # how training_over's reasons start
SEVERITY = {LOST: 0, "crashed": 1, "oom": 2, "timed_out": 3, "error": 5, STOPPED: 9}  # any other code: 4
RETRYABLE = {LOST, "crashed"}  # a death is worth another attempt; a reported error is not


def ports(job_id: int, attempt: int) -> tuple[int, int]:
    """(rendezvous port, Neuron collectives' root port) of one attempt, on rank 0's
    host: a pair of GANG_PORT_BASE … +999 that every rank computes alike. Another
    attempt gets another pair, so a late process of an earlier attempt never joins."""
    slot = (job_id * 8 + attempt) % 500
    return settings.GANG_PORT_BASE + 2 * slot, settings.GANG_PORT_BASE + 2 * slot + 1


def rdzv_id(job_id: int, attempt: int) -> str:
    return f"job-{job_id}-{attempt}"


def claim_rank(job_id: int, host_id: int) -> tuple[Job, GangMember] | None:
    """This host's rank of gang `job_id`, claimed (placed → running), and the job
    (running: this claim started it, or an earlier rank's did). None if this host has
    no placed rank in it (a duplicate or stale delivery, a cancelled or requeued job)."""
    now = timezone.now()
    with transaction.atomic():
        # The job's row serializes its ranks' claims (and the start) against each other.
        job = (Job.objects.select_for_update().filter(pk=job_id, host_count__gt=1, cancel_requested=False,
                                                       status__in=(S.QUEUED, S.RUNNING)).first())
        if job is None:
            return None
        claimed = GangMember.objects.filter(job_id=job_id, host_id=host_id, state=M.PLACED).update(
            state=M.RUNNING, started_at=now, heartbeat_at=now)
        if not claimed:
            return None
        if job.status == S.QUEUED:
            names = list(GangMember.objects.filter(job_id=job_id).order_by("rank").values_list("host__name", flat=True))
            states.start_gang(job_id, [name or "?" for name in names])
        job = Job.objects.select_related("host", "model", "dataset").get(pk=job_id)
        member = GangMember.objects.select_related("host").get(job_id=job_id, host_id=host_id)
    return job, member


def members_of(job_id: int) -> list[GangMember]:
    return list(GangMember.objects.filter(job_id=job_id).select_related("host").order_by("rank"))


def heartbeat(job_id: int, attempt: int, member_id: int) -> None:
    """A rank is alive: its row's lease, and the job's (which some rank always renews
    while the gang runs)."""
    now = timezone.now()
    GangMember.objects.filter(pk=member_id, state=M.RUNNING).update(heartbeat_at=now)
    Job.objects.filter(pk=job_id, status=S.RUNNING, attempts=attempt).update(heartbeat_at=now)


def stop_reason(job_id: int, attempt: int, member_id: int) -> str | None:
    """Why this rank must stop now, or None while the gang goes on. One query."""
    rows = list(GangMember.objects.filter(job_id=job_id).values_list(
        "pk", "rank", "state", "host__name", "job__status", "job__attempts", "job__cancel_requested"))
    mine = [row for row in rows if row[0] == member_id]
    if not mine:
        return "its placement was given up (the job was requeued)"
    _, _, state, _, status, attempts, cancel = mine[0]
    if cancel:
        return "cancelled on request"
    if status != S.RUNNING or attempts != attempt:
        return "the job is no longer running this attempt"
    if state != M.RUNNING:
        return "this rank was given up"
    for _, rank, other_state, host, *_ in rows:
        if other_state == M.FAILED:
            return f"rank {rank} on {host or '?'} failed"
    return None


def training_over(rank_0_done_at: float | None, now: float) -> str | None:
    """Why a rank still running must stop although nothing failed: rank 0 wrote its ok
    result at `rank_0_done_at` (unix seconds; None: not yet) and GANG_EXIT_WINDOW_S
    have passed since."""
    window = settings.GANG_EXIT_WINDOW_S
    if rank_0_done_at is None or now - rank_0_done_at < window:
        return None
    return f"{TRAINING_OVER} (rank 0's result) {window} s before and this host's processes had not exited"


@dataclass
class Ending:
    """How one rank's process ended, as its worker reports it."""

    code: str  # "ok", or why it failed (the runner's code, "crashed", STOPPED, "cancelled", "timed_out")
    message: str = ""
    exit_code: int | None = None


def rank_ended(job_id: int, attempt: int, member_id: int, ending: Ending,
               on_success: Callable[[Job], bool]) -> str:
    """Record that this rank's process ended and decide the gang if it can be decided.

    `on_success(job)` records the job's success (rank 0's result and artifacts) and
    runs only when every rank exited 0, inside this transaction, once. Returns what
    happened to the job: succeeded, failed, requeued, cancelled, waiting (other ranks
    still run) or superseded (the attempt was over already)."""
    now = timezone.now()
    with transaction.atomic():
        job = Job.objects.select_for_update().filter(pk=job_id, status=S.RUNNING, attempts=attempt).first()
        ok = ending.code == "ok"
        GangMember.objects.filter(pk=member_id, state=M.RUNNING).update(
            state=M.EXITED if ok else M.FAILED, finished_at=now, exit_code=ending.exit_code,
            detail=(ending.message if ok else f"{ending.code}: {ending.message}")[:2000])
        if job is None:
            return "superseded"
        member = GangMember.objects.select_related("host").filter(pk=member_id).first()
        if member is not None and not ok:
            where = f"rank {member.rank} on {_name(member)}"
            if ending.code == "cancelled" and job.cancel_requested:
                states.mark_finished(job_id, S.CANCELLED, failure="cancelled", message=f"stopped on request ({where})",
                                     extra_filter={"attempts": attempt})
                return "cancelled"
        return _decide(job, attempt, on_success)


def _decide(job: Job, attempt: int, on_success: Callable[[Job], bool] | None) -> str:
    """The gang's fate once it can be told (the job's row is locked by the caller)."""
    members = members_of(job.pk)
    failed = [m for m in members if m.state == M.FAILED]
    lost = [m for m in failed if _code(m) == LOST]
    if lost:  # a lost rank decides at once: nobody will report for it
        return _give_up(job, attempt, lost[0], failed)
    if any(m.state in (M.PLACED, M.RUNNING) for m in members):
        return "waiting"
    if all(m.state == M.EXITED for m in members):
        if on_success is None:
            return "waiting"  # a rank's worker records the success, with rank 0's outputs
        return "succeeded" if on_success(job) else "superseded"
    culprit = min(failed, key=lambda m: (SEVERITY.get(_code(m), 4), m.finished_at or timezone.now(), m.rank))
    return _give_up(job, attempt, culprit, failed)


def _give_up(job: Job, attempt: int, culprit: GangMember, failed: list[GangMember]) -> str:
    """Requeue or fail the whole gang because of `culprit`; its cores are freed
    together and the other ranks stop (their rows are gone, or the job is over)."""
    code = _code(culprit)
    where = f"rank {culprit.rank} on {_name(culprit)}"
    what = culprit.detail.partition(": ")[2] or code
    others = [f"rank {m.rank} on {_name(m)}: {m.detail}" for m in failed
              if m.pk != culprit.pk and _code(m) != STOPPED]
    story = f"{where} {'was lost' if code == LOST else 'failed'}: {what}"
    if others:
        story += f" (then {'; '.join(others)})"
    data = {"rank": culprit.rank, "host": _name(culprit), "code": code}
    if code == "timed_out":
        # Decided once every rank has ended, so rank 0's checkpoint saved in the grace
        # period is on the timeline when the rule reads it.
        from jobs.lifecycle import time_limits

        return time_limits.reached(job, attempt, where=where, event_data=data)
    if code in RETRYABLE and job.attempts < job.max_attempts:
        states.requeue(job.pk, sources=(S.RUNNING,), kind="worker_lost" if code == LOST else "retry",
                       extra_filter={"attempts": attempt}, event_data=data,
                       message=f"{story}; the whole gang stopped and is requeued "
                               f"(attempt {job.attempts} of {job.max_attempts})")
        from jobs.wake import kick_dispatch

        transaction.on_commit(kick_dispatch)
        return "requeued"
    if code in RETRYABLE:
        story += f" (gave up after {job.attempts} attempts)"
    states.mark_finished(job.pk, S.FAILED, failure=code if code != STOPPED else "error", reason=story[:500],
                         message=f"{story}; the whole gang stopped", extra_filter={"attempts": attempt},
                         event_data=data)
    return "failed"


def _code(member: GangMember) -> str:
    return member.detail.partition(":")[0] if member.state == M.FAILED else ""


def _name(member: GangMember) -> str:
    return member.host.name if member.host is not None else "a removed host"


# --- reaping ---------------------------------------------------------------------------

def reap(counts: dict, send_run: Callable[[int, str], None]) -> None:
    """scheduler.reap's part for gangs: lost ranks of running gangs; queued gangs whose
    run messages were lost or whose hosts went offline. Adds to `counts`; messages go
    out through `send_run(job_id, queue)` (the scheduler's)."""
    lease = settings.JOB_LEASE_S
    lease_cutoff = timezone.now() - timedelta(seconds=lease)
    silent_since = timezone.now() - timedelta(seconds=settings.HOST_OFFLINE_AFTER_S)
    resend_cutoff = timezone.now() - timedelta(seconds=settings.QUEUED_RESEND_AFTER_S)
    for job in Job.objects.filter(status=S.RUNNING, host_count__gt=1):
        outcome = _reap_running(job, lease, lease_cutoff, silent_since, resend_cutoff, send_run)
        if outcome:
            counts[outcome] = counts.get(outcome, 0) + 1
    for job in Job.objects.filter(status=S.QUEUED, host_count__gt=1, queued_at__lt=resend_cutoff):
        members = members_of(job.pk)
        gone = [m for m in members if _host_gone(m.host, silent_since)]
        if gone or not members:
            where = ", ".join(f"rank {m.rank} on {_name(m)}" for m in gone) or "its ranks"
            if states.requeue(job.pk, sources=(S.QUEUED,), kind="host_offline",
                              message=f"a host of the gang went offline before it started ({where})"):
                counts["requeued"] += 1
            continue
        Job.objects.filter(pk=job.pk, status=S.QUEUED).update(queued_at=timezone.now())
        _send(send_run, job.pk, [m.host for m in members if m.state == M.PLACED])
        counts["resent"] += 1


def _reap_running(job: Job, lease: int, lease_cutoff, silent_since, resend_cutoff,
                  send_run: Callable[[int, str], None]) -> str | None:
    if job.cancel_requested and job.heartbeat_at is not None and job.heartbeat_at < lease_cutoff:
        states.mark_finished(job.pk, S.CANCELLED, failure="cancelled", extra_filter={"attempts": job.attempts},
                             message="cancelled (its workers stopped responding)")
        return "cancelled"
    now = timezone.now()
    with transaction.atomic():
        if not Job.objects.select_for_update().filter(pk=job.pk, status=S.RUNNING, attempts=job.attempts).exists():
            return None
        members = members_of(job.pk)
        # A rank not taken this long after the first one was (its message was sent
        # again after QUEUED_RESEND_AFTER_S) has no worker to run it: the other ranks
        # would only wait for it in the rendezvous.
        take_by = timedelta(seconds=lease + settings.QUEUED_RESEND_AFTER_S)
        lost = []
        for m in members:
            if m.state == M.RUNNING and (m.heartbeat_at or m.started_at or now) < lease_cutoff:
                lost.append((m, f"no heartbeat from its worker for {lease} s"))
            elif m.state == M.PLACED and _host_gone(m.host, silent_since):
                lost.append((m, "its host went offline before this rank started"))
            elif m.state == M.PLACED and job.started_at is not None and job.started_at < now - take_by:
                lost.append((m, f"its worker did not start it within {take_by.seconds} s of the first rank"))
        if not lost:
            late = [m.host for m in members if m.state == M.PLACED]
            if late and job.started_at is not None and job.started_at < resend_cutoff:
                # Its run message may have been lost: send it again (a duplicate is harmless).
                transaction.on_commit(lambda: _send(send_run, job.pk, late))
            return None
        for m, why in lost:
            GangMember.objects.filter(pk=m.pk, state__in=(M.PLACED, M.RUNNING)).update(
                state=M.FAILED, finished_at=now, detail=f"{LOST}: {why}")
        job.refresh_from_db()
        outcome = _decide(job, job.attempts, None)
    return outcome if outcome in ("requeued", "failed") else None


def _host_gone(host: Host | None, silent_since) -> bool:
    return host is None or host.state == Host.State.OFFLINE or (
        host.last_heartbeat is not None and host.last_heartbeat < silent_since)


def _send(send_run: Callable[[int, str], None], job_id: int, hosts: list[Host | None]) -> None:
    for host in hosts:
        if host is not None:
            send_run(job_id, host.queue)
