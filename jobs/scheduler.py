"""The scheduler: dispatch places pending jobs on hosts; reap recovers from dead
workers, lost messages and silent hosts. Both are safe to run concurrently with
themselves and with workers: dispatchers serialize on the host rows, every status
change is a conditional UPDATE, and the (host, core) unique constraint makes a
double allocation impossible."""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs import states
from jobs.models import CoreAllocation, FamilyQuota, Host, Job
from jobs.placement import HostSlots, core_range, place
from jobs.policy import FamilyState, check_dispatch
from jobs.services import stale_cutoff

log = logging.getLogger(__name__)
S = Job.Status
DISPATCH_BATCH = 500


@dataclass
class DispatchReport:
    placed: list[int]
    waiting: int


def send_run(job_id: int, queue: str) -> None:
    from webapp.celery import app

    try:
        app.send_task("neuron_workers.run_job", args=[job_id], queue=queue)
    except Exception as exc:  # the job stays queued; the reaper re-sends it
        log.warning("could not send job %s to %s (%s); the reaper will re-send it", job_id, queue, exc)


def pending_order(jobs: list[Job]) -> list[Job]:
    """Priority first (by kind, admin-adjustable), then submission order."""
    return sorted(jobs, key=lambda j: (-j.priority, j.pk))


def dispatch() -> DispatchReport:
    from jobs import live

    try:
        live.redis().delete("nd:dispatch:kick")
    except Exception:
        pass
    placed: list[tuple[int, str]] = []
    waiting = 0
    with transaction.atomic():
        hosts = list(Host.objects.select_for_update().exclude(state=Host.State.OFFLINE).order_by("pk"))
        used: dict[int, set[int]] = defaultdict(set)
        team_use: dict[tuple[int, str], int] = defaultdict(int)
        for host_id, core, team_id, family in CoreAllocation.objects.values_list("host_id", "core", "team_id", "family"):
            used[host_id].add(core)
            team_use[(team_id, family)] += 1
        quotas = {(q.team_id, q.family): q for q in FamilyQuota.objects.all()}
        by_id = {h.pk: h for h in hosts}
        pending = pending_order(list(Job.objects.filter(status=S.PENDING, cancel_requested=False)
                                     .select_related("team")[:DISPATCH_BATCH]))
        for job in pending:
            slots = [HostSlots(h.pk, h.name, h.family, tuple(h.core_ids), frozenset(used[h.pk]),
                               h.state == Host.State.DRAINING) for h in hosts]
            fleet = [s for s in slots if s.family == job.family]
            fleet_free = sum(s.free for s in fleet if not s.draining)
            quota = quotas.get((job.team_id, job.family))
            fam = FamilyState(quota.guaranteed_cores if quota else 0, quota.borrow_limit if quota else 0,
                              team_use[(job.team_id, job.family)], fleet_free, sum(len(s.core_ids) for s in fleet))
            decision = check_dispatch(job.team.slug, job.family, job.cores, fam)
            spot = place(slots, job.family, job.cores) if decision.ok else None
            if spot is None:
                waiting += 1
                code, reason = (decision.code, decision.sentence) if not decision.ok else _no_room(job, fleet, fam)
                if (job.reason_code, job.reason) != (code, reason):
                    Job.objects.filter(pk=job.pk, status=S.PENDING).update(reason_code=code, reason=reason)
                continue
            host = by_id[spot.host_id]
            rows = [CoreAllocation(host=host, core=c, job=job, team_id=job.team_id, family=job.family,
                                   borrowed=decision.borrowed) for c in range(spot.core_start, spot.core_start + job.cores)]
            CoreAllocation.objects.bulk_create(rows)
            if states.mark_queued(job, host.pk, spot.core_start,
                                  f"placed on {host.name} cores {core_range(spot.core_start, job.cores)}"
                                  + (" (borrowed)" if decision.borrowed else "")):
                used[host.pk].update(range(spot.core_start, spot.core_start + job.cores))
                team_use[(job.team_id, job.family)] += job.cores
                placed.append((job.pk, host.queue))
            else:  # cancelled meanwhile: give the cores back
                CoreAllocation.objects.filter(job=job).delete()
        transaction.on_commit(lambda: [send_run(job_id, queue) for job_id, queue in placed])
    return DispatchReport([p[0] for p in placed], waiting)


def _no_room(job: Job, fleet: list[HostSlots], fam: FamilyState) -> tuple[str, str]:
    if not fleet:
        return "no_hosts_of_family", f"needs {job.cores} {job.family} cores; no {job.family} host is online"
    if all(s.draining for s in fleet if len(s.core_ids) >= job.cores):
        return "host_draining", f"needs {job.cores} {job.family} cores; every host large enough is draining"
    return ("no_free_cores_of_family",
            f"needs {job.cores} contiguous {job.family} cores; {fam.fleet_free} of {fam.fleet_total} are free in "
            "the fleet but no host has a free run that long")


# --- reaping ---------------------------------------------------------------------

def reap() -> dict:
    """Recover from faults; returns counts. Never leaves a job running forever."""
    counts = {"hosts_offline": 0, "requeued": 0, "failed": 0, "cancelled": 0, "resent": 0}
    counts["hosts_offline"] = Host.objects.filter(
        state__in=[Host.State.ONLINE, Host.State.DRAINING], last_heartbeat__lt=stale_cutoff(settings.HOST_OFFLINE_AFTER_S)
    ).update(state=Host.State.OFFLINE)
    for job in Job.objects.filter(status=S.RUNNING, heartbeat_at__lt=stale_cutoff(settings.JOB_LEASE_S)):
        counts[_reap_running(job)] += 1
    for job in Job.objects.filter(status=S.QUEUED, queued_at__lt=stale_cutoff(settings.QUEUED_RESEND_AFTER_S)).select_related("host"):
        if job.host is None or job.host.state == Host.State.OFFLINE:
            if states.requeue(job.pk, sources=(S.QUEUED,), message="its host went offline before it started",
                              kind="host_offline"):
                counts["requeued"] += 1
        else:
            # The run message may have been lost (Redis flushed or restarted): send it
            # again. A duplicate is harmless; the worker's claim is conditional.
            Job.objects.filter(pk=job.pk, status=S.QUEUED).update(queued_at=timezone.now())
            send_run(job.pk, job.host.queue)
            counts["resent"] += 1
    return counts


def _reap_running(job: Job) -> str:
    lease = settings.JOB_LEASE_S
    if job.cancel_requested:
        states.mark_finished(job.pk, S.CANCELLED, message="cancelled (its worker stopped responding)", failure="cancelled")
        return "cancelled"
    if job.attempts < job.max_attempts:
        if states.requeue(job.pk, sources=(S.RUNNING,), kind="worker_lost",
                          message=f"worker lost: no heartbeat for {lease} s; requeued (attempt {job.attempts} of {job.max_attempts})"):
            return "requeued"
        return "requeued"
    states.mark_finished(job.pk, S.FAILED, failure="worker_lost",
                         message=f"worker lost: no heartbeat for {lease} s after {job.attempts} attempts",
                         reason=f"worker lost on attempt {job.attempts} of {job.max_attempts}")
    return "failed"
