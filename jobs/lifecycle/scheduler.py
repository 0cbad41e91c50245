"""The scheduler: dispatch places pending jobs on hosts; reap recovers from dead
workers, lost messages and silent hosts. Both are safe to run concurrently with
themselves and with workers: dispatchers serialize on the host rows, every status
change is a conditional UPDATE, and the (host, core) unique constraint makes a
double allocation impossible.

Dispatch order is jobs.quotas.fairshare.fair_order (kind priority, then fair share,
then submission). Admission per job is jobs.quotas.policy (budget, hosts, the team's
guaranteed and borrowable cores); a team that needs its guarantee back preempts
other teams' borrowing jobs, newest first, just enough (policy.choose_victims).

EASY backfill (jobs.quotas.backfill): the first job allowed by its quota that finds
no room gets its family's reservation, from the running jobs' time limits; later
jobs of the family start only if they end by their own limit before it, or on cores
it does not need, so a large job's wait is bounded."""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Iterable, TypeVar

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Exists
from django.utils import timezone

from jobs.lifecycle import states
from jobs.models import CoreAllocation, FamilyQuota, Host, Job, Team, TeamQuota
from jobs.quotas.backfill import Reservation, Running, conflicts, masked, reserve
from jobs.quotas.fairshare import QueueItem, fair_order
from jobs.quotas.placement import HostSlots, Placement, core_range, place
from jobs.quotas.policy import (
    Borrower,
    Decision,
    FamilyState,
    backfill_blocked,
    check_budget,
    check_dispatch,
    check_hosts,
    choose_victims,
    n_cores,
    no_room,
)
from jobs.quotas.selectors import core_hours_for_budget, decayed_usage_by_team, kind_priorities, team_shares
from jobs.wake import KICK_FLAG

log = logging.getLogger(__name__)
S = Job.Status
PENDING_SCAN = 5000  # pending jobs ordered per run; beyond that the oldest wait for the next run
T = TypeVar("T")


@dataclass
class DispatchReport:
    placed: list[int]
    waiting: int
    preempted: list[int] = field(default_factory=list)

    def add(self, later: "DispatchReport") -> None:
        """Fold in a later run's report (waiting: as the later run left it)."""
        self.placed += later.placed
        self.preempted += later.preempted
        self.waiting = later.waiting


def send_run(job_id: int, queue: str, producer=None) -> None:
    from webapp.celery import app

    try:
        app.send_task("neuron_workers.run_job", args=[job_id], queue=queue, producer=producer)
    except Exception as exc:  # the job stays queued; the reaper re-sends it
        log.warning("could not send job %s to %s (%s); the reaper will re-send it", job_id, queue, exc)


def send_runs(placed: list[tuple[int, str]]) -> None:
    """send_run for each (job id, host queue), through one broker producer."""
    from webapp.celery import app

    if len(placed) == 1:
        send_run(*placed[0])
        return
    try:
        with app.producer_or_acquire() as producer:
            for job_id, queue in placed:
                send_run(job_id, queue, producer)
    except Exception as exc:  # no producer: the jobs stay queued and the reaper re-sends them
        log.warning("could not send %s jobs (%s); the reaper will re-send them", len(placed), exc)


def pending_order(jobs: Iterable[T], shares: dict[int, float] | None = None,
                  prio: dict[str, int] | None = None) -> list[T]:
    """`jobs` (anything with pk, team_id, kind, family, cores, created_at) in dispatch
    order: kind priority (KindPriority, admin-adjustable), then fair share (decayed
    team usage / share, bursts interleaved), then submission order. `shares` (the
    teams' fair-share weights) and `prio` (kind_priorities()) if the caller has read
    them already."""
    jobs = list(jobs)
    if not jobs:
        return []
    prio = kind_priorities() if prio is None else prio
    items = [QueueItem(j.pk, j.team_id, prio.get(j.kind, 0), j.cores, j.family, j.created_at) for j in jobs]
    by_id = {j.pk: j for j in jobs}
    ordered = fair_order(items, decayed_usage_by_team(), team_shares() if shares is None else shares,
                         float(settings.FAIRSHARE_QUEUE_CHARGE_S))
    return [by_id[i.job_id] for i in ordered]


@dataclass
class PendingRow:
    """What dispatch needs of a pending job (specs and logs are never loaded)."""

    pk: int
    team_id: int
    team_slug: str
    kind: str
    family: str
    cores: int
    created_at: datetime
    reason_code: str
    reason: str
    max_runtime_s: int = 0


PENDING_FIELDS = ("pk", "team_id", "team__slug", "kind", "family", "cores", "created_at", "reason_code", "reason",
                  "max_runtime_s")


def pending_rows(limit: int = PENDING_SCAN) -> list[PendingRow]:
    rows = (Job.objects.filter(status=S.PENDING, cancel_requested=False).order_by("id")
            .values_list(*PENDING_FIELDS)[:limit])
    return [PendingRow(*row) for row in rows]


@dataclass
class RunInputs:
    """Everything a dispatch run reads once the host rows are locked."""

    allocations: list[tuple]  # (host_id, core, job_id, team_id, family, borrowed, since as a timestamp)
    team_quotas: list[tuple]  # (team_id, monthly_core_hours, share)
    family_quotas: list[tuple]  # (team_id, family, guaranteed_cores, borrow_limit)
    priorities: dict[str, int]  # kind -> priority (kind_priorities())
    pending: list[PendingRow]
    limit_ends: dict[int, float] = field(default_factory=dict)  # job holding cores -> when its time limit ends


    @classmethod
    def read(cls, limit: int = PENDING_SCAN) -> "RunInputs":
        return cls(
            [(*row[:6], row[6].timestamp()) for row in CoreAllocation.objects.values_list(
                "host_id", "core", "job_id", "team_id", "family", "borrowed", "since")],
            list(TeamQuota.objects.values_list("team_id", "monthly_core_hours", "share")),
            list(FamilyQuota.objects.values_list("team_id", "family", "guaranteed_cores", "borrow_limit")),
            kind_priorities(), pending_rows(limit), limit_ends())


def limit_ends() -> dict[int, float]:
    """When each job holding cores must give them back: its start (or, queued, the
    time it was placed) plus its time limit, as a Unix timestamp."""
    now = timezone.now()
    return {pk: (started or queued or now).timestamp() + limit
            for pk, started, queued, limit in Job.objects.filter(status__in=Job.ACTIVE).values_list(
                "pk", "started_at", "queued_at", "max_runtime_s")}


def lock_hosts() -> list[Host]:
    """The hosts a run may place on, locked (SELECT … FOR UPDATE: dispatch runs
    serialize here). A replaying agent's host shows recorded metrics only and runs
    nothing; offline hosts get nothing."""
    return list(Host.objects.select_for_update().exclude(state=Host.State.OFFLINE).exclude(replay=True)
                .only("id", "name", "family", "core_ids", "state").order_by("pk"))


class Fleet:
    """The cores of every non-offline host and who holds them, for one dispatch run
    (read after the host rows are locked, so no other dispatcher changes it)."""

    def __init__(self, hosts: list[Host], allocations: list[tuple]):
        self.hosts = {h.pk: h for h in hosts}
        self.used: dict[int, set[int]] = defaultdict(set)
        self.team_use: dict[tuple[int, str], int] = defaultdict(int)
        self.borrowers: dict[int, Borrower] = {}
        self.family_of: dict[int, str] = {}
        self._slots: dict[str, list[HostSlots]] = {}
        self.version = 0  # bumped on every change, to know when a "no room" answer is stale
        self.holders: dict[int, tuple[int, int, str, list[int]]] = {}  # job -> (host, team, family, cores)
        cores: dict[int, list[int]] = defaultdict(list)
        for host_id, core, job_id, team_id, family, borrowed, since in allocations:
            self.used[host_id].add(core)
            self.holders.setdefault(job_id, (host_id, team_id, family, []))[3].append(core)
            self.team_use[(team_id, family)] += 1
            if borrowed:
                cores[job_id].append(core)
                self.borrowers[job_id] = Borrower(job_id, team_id, host_id, (), since)
                self.family_of[job_id] = family
        for job_id, b in self.borrowers.items():
            self.borrowers[job_id] = Borrower(b.job_id, b.team_id, b.host_id, tuple(sorted(cores[job_id])), b.since)

    def slots(self, family: str) -> list[HostSlots]:
        """The family's hosts as placement sees them (rebuilt only after a change)."""
        if family not in self._slots:
            self._slots[family] = [
                HostSlots(h.pk, h.name, h.family, tuple(h.core_ids), frozenset(self.used[h.pk]),
                          h.state == Host.State.DRAINING) for h in self.hosts.values() if h.family == family]
        return self._slots[family]

    def take(self, job: PendingRow, spot: Placement, borrowed: bool) -> None:
        self._slots.pop(job.family, None)
        self.version += 1
        self.used[spot.host_id].update(range(spot.core_start, spot.core_start + job.cores))
        self.team_use[(job.team_id, job.family)] += job.cores
        self.holders[job.pk] = (spot.host_id, job.team_id, job.family,
                                list(range(spot.core_start, spot.core_start + job.cores)))
        if borrowed:
            self.borrowers[job.pk] = Borrower(job.pk, job.team_id, spot.host_id,
                                              tuple(range(spot.core_start, spot.core_start + job.cores)),
                                              timezone.now().timestamp())
            self.family_of[job.pk] = job.family

    def give_back(self, victim: Borrower) -> None:
        self._slots.pop(self.family_of[victim.job_id], None)
        self.version += 1
        self.used[victim.host_id].difference_update(victim.cores)
        self.team_use[(victim.team_id, self.family_of[victim.job_id])] -= len(victim.cores)
        del self.borrowers[victim.job_id]
        self.holders.pop(victim.job_id, None)

    def running(self, family: str, ends: dict[int, float], default_end: float) -> list[Running]:
        """The family's core holders with their time-limit ends (for reservations)."""
        return [Running(job_id, team_id, fam, host_id, tuple(cores), ends.get(job_id, default_end))
                for job_id, (host_id, team_id, fam, cores) in self.holders.items() if fam == family]

    def borrowers_of_others(self, family: str, team_id: int | None = None) -> list[Borrower]:
        return [b for b in self.borrowers.values() if self.family_of[b.job_id] == family and b.team_id != team_id]


@dataclass
class Limits:
    """Every team's quotas, read once per dispatch run."""

    family: dict[tuple[int, str], tuple[int, int]]  # (team, family) -> (guaranteed, borrow_limit)
    budget: dict[int, float]  # team -> monthly NeuronCore-hours
    shares: dict[int, float]  # team -> fair-share weight
    used: dict[int, float]  # team with pending jobs -> NeuronCore-hours this month (core_hours_for_budget)
    slugs: dict[int, str]

    @classmethod
    def load(cls, inputs: RunInputs) -> "Limits":
        budget, shares = {}, {}
        for team_id, hours, share in inputs.team_quotas:
            budget[team_id], shares[team_id] = hours, float(share or 1)
        waiting = {row.team_id for row in inputs.pending}
        used = core_hours_for_budget({team_id: budget[team_id] for team_id in waiting if team_id in budget})
        return cls({(t, f): (g, b) for t, f, g, b in inputs.family_quotas}, budget, shares, used, {})

    def slug(self, team_id: int) -> str:
        if team_id not in self.slugs:
            self.slugs[team_id] = Team.objects.filter(pk=team_id).values_list("slug", flat=True).first() or "?"
        return self.slugs[team_id]


class Dispatcher:
    """One dispatch run inside one transaction (see dispatch())."""

    def __init__(self, fleet: Fleet, limits: Limits, limit_ends: dict[int, float] | None = None, *,
                 dry: bool = False):
        self.fleet, self.limits = fleet, limits
        self.dry = dry  # a what-if run (jobs.lifecycle.whatif): decide everything, write nothing
        self.now = timezone.now().timestamp()
        self.limit_ends = dict(limit_ends or {})
        self.reservations: dict[str, Reservation] = {}  # family -> its head job's reservation (EASY)
        self.masked_fail: dict[tuple[str, int], int] = {}  # (family, cores) -> fleet version of a failed backfill search
        self.starts: list[tuple[PendingRow, Placement, bool]] = []
        self.placed: list[tuple[int, str]] = []  # (job id, host queue) once committed
        self.preempted: list[int] = []
        self.reasons: dict[int, tuple[str, str]] = {}
        # family -> (fleet version, smallest request for which even preempting every
        # borrower could not make room): later jobs as large skip the search.
        self.hopeless: dict[str, tuple[int, int]] = {}
        # (team, family, cores) -> (fleet version, admission answer): a long queue
        # is mostly the same few requests, whose answers change only with the fleet.
        self.answers: dict[tuple[int, str, int], tuple[int, tuple[Decision, list[HostSlots], FamilyState]]] = {}
        # (team, family, cores) -> (fleet version, reason) of an admitted request
        # that found no room and no cores to reclaim.
        self.no_room: dict[tuple[int, str, int], tuple[int, tuple[str, str]]] = {}

    def family_state(self, job: PendingRow, slots: list[HostSlots]) -> FamilyState:
        guaranteed, borrow = self.limits.family.get((job.team_id, job.family), (0, 0))
        return FamilyState(guaranteed, borrow, self.fleet.team_use[(job.team_id, job.family)],
                           sum(s.free for s in slots if not s.draining), sum(len(s.core_ids) for s in slots))

    def admission(self, job: PendingRow) -> tuple[Decision, list[HostSlots], FamilyState]:
        """May the job start now as far as budget, hosts and quota go? (The answer
        depends only on the team, the request and the fleet.)"""
        key = (job.team_id, job.family, job.cores)
        known = self.answers.get(key)
        if known is not None and known[0] == self.fleet.version:
            return known[1]
        answer = self._admission(job)
        self.answers[key] = (self.fleet.version, answer)
        return answer

    def _admission(self, job: PendingRow) -> tuple[Decision, list[HostSlots], FamilyState]:
        self.limits.slugs.setdefault(job.team_id, job.team_slug)
        slots = self.fleet.slots(job.family)
        fam = self.family_state(job, slots)
        budget = self.limits.budget.get(job.team_id)
        checks = (
            lambda: check_budget(job.team_slug, self.limits.used.get(job.team_id, 0.0), budget)
            if budget is not None else Decision.admit(),
            lambda: check_hosts(job.family, job.cores, slots),
            lambda: check_dispatch(job.team_slug, job.family, job.cores, fam),
        )
        decision = Decision.admit()
        for check in checks:
            decision = check()
            if not decision.ok:
                break
        return decision, slots, fam

    def run(self, order: list[PendingRow]) -> None:
        # Jobs within their team's guarantee go first; borrowing jobs only get what is
        # left, so a borrower is never placed in the same run that would preempt it.
        deferred = []
        for job in order:
            decision, slots, fam = self.admission(job)
            if decision.ok and decision.borrowed:
                deferred.append(job)
            else:
                self.handle(job, decision, slots, fam)
        for job in deferred:
            self.handle(job, *self.admission(job))

    def handle(self, job: PendingRow, decision: Decision, slots: list[HostSlots], fam: FamilyState) -> None:
        if not decision.ok:
            self.reasons[job.pk] = (decision.code, decision.sentence)
            return
        key, version = (job.team_id, job.family, job.cores), self.fleet.version
        known = self.no_room.get(key)
        if known is not None and known[0] == version:
            self.reasons[job.pk] = known[1]  # the same search on the same fleet: the same answer
            return
        reservation = self.reservations.get(job.family)
        end = self.now + job.max_runtime_s
        spot = place(slots, job.family, job.cores)
        if spot is not None and reservation is not None and conflicts(spot, end, reservation):
            spot = None
            if self.masked_fail.get((job.family, job.cores)) != version:
                spot = place(masked(slots, reservation), job.family, job.cores)
            if spot is None:
                self.masked_fail[(job.family, job.cores)] = version
                refusal = backfill_blocked(job.family, job.cores, job.max_runtime_s, reservation.job_id,
                                           reservation.start - self.now)
                self.reasons[job.pk] = (refusal.code, refusal.sentence)
                return
        if spot is None and not decision.borrowed:
            spot = self.reclaim(job, slots, end)
        if spot is None:
            fam = self.family_state(job, self.fleet.slots(job.family))
            refusal = no_room(job.team_slug, job.family, job.cores, fam)
            self.reasons[job.pk] = (refusal.code, refusal.sentence)
            if reservation is None:
                self.reserve(job)
            elif self.fleet.version == version:
                self.no_room[key] = (version, self.reasons[job.pk])
            return
        self.start(job, spot, decision.borrowed)

    def reserve(self, job: PendingRow) -> None:
        """The job heads its family's queue and finds no room: it gets the
        reservation (jobs.quotas.backfill.reserve, from time limits). Its reason
        stays the no-room sentence; the start-time estimate shows the reservation."""
        held = reserve(job.pk, job.family, job.cores, self.fleet.slots(job.family),
                       self.fleet.running(job.family, self.limit_ends, self.now), self.now)
        if held is not None:
            self.reservations[job.family] = held

    def reclaim(self, job: PendingRow, slots: list[HostSlots], end: float | None = None) -> Placement | None:
        """The job is within its team's guarantee but there is no room: preempt other
        teams' borrowing jobs (newest first, just enough), then place it."""
        version, smallest = self.hopeless.get(job.family, (-1, 0))
        if version == self.fleet.version and job.cores >= smallest:
            return None
        choice = choose_victims(slots, job.family, job.cores, self.fleet.borrowers_of_others(job.family, job.team_id))
        if choice is None:
            if choose_victims(slots, job.family, job.cores, self.fleet.borrowers_of_others(job.family)) is None:
                self.hopeless[job.family] = (self.fleet.version, job.cores)  # smaller than any earlier failure
            return None
        victims, spot = choice
        reservation = self.reservations.get(job.family)
        if reservation is not None and conflicts(spot, self.now + job.max_runtime_s if end is None else end,
                                                 reservation):
            return None  # the freed cores are the head job's: preempting for them would delay it
        guaranteed, _ = self.limits.family.get((job.team_id, job.family), (0, 0))
        for victim in victims:
            owner = self.limits.slug(victim.team_id)
            message = (f"preempted: team {job.team_slug} reclaimed {n_cores(len(victim.cores), job.family)} for its "
                       f"job #{job.pk}, which needs {job.cores} of its {guaranteed} guaranteed {job.family} cores; "
                       f"this job was borrowing them beyond team {owner}'s guarantee and is back in the queue")
            # Whoever wins the conditional UPDATE (this requeue, or the worker
            # finishing / the owner cancelling at the same moment), the cores are
            # free once it commits: states releases them inside the transition.
            if self.dry:
                self.preempted.append(victim.job_id)
            elif states.requeue(victim.job_id, kind="preempted", message=message,
                              event_data={"by_team": job.team_slug, "by_job": job.pk, "cores": len(victim.cores),
                                          "family": job.family}):
                self.preempted.append(victim.job_id)
            self.fleet.give_back(victim)
        return place(self.fleet.slots(job.family), job.family, job.cores)

    def start(self, job: PendingRow, spot: Placement, borrowed: bool) -> None:
        """Reserve the cores for this run; commit() writes all placements at once."""
        self.fleet.take(job, spot, borrowed)
        self.limit_ends[job.pk] = self.now + job.max_runtime_s
        self.starts.append((job, spot, borrowed))

    def commit(self) -> None:
        """Move the placed jobs to queued with their core allocations (a job
        cancelled since it was read is skipped, and its cores stay free)."""
        notes = []
        for job, spot, borrowed in self.starts:
            host = self.fleet.hosts[spot.host_id]
            notes.append((job.pk, host.pk, spot.core_start, f"placed on {host.name} cores "
                          f"{core_range(spot.core_start, job.cores)}" + (" (borrowed)" if borrowed else ""), borrowed))
        moved = states.mark_queued_many(notes)
        self.placed = [(job.pk, self.fleet.hosts[spot.host_id].queue)
                       for job, spot, _ in self.starts if job.pk in moved]

    def save_reasons(self, rows: list[PendingRow]) -> None:
        """Write the changed waiting reasons (guarded by status, so a job cancelled
        meanwhile keeps its own reason)."""
        changed: dict[tuple[str, str], list[int]] = defaultdict(list)
        for row in rows:
            if row.pk in self.reasons and (row.reason_code, row.reason) != self.reasons[row.pk]:
                changed[self.reasons[row.pk]].append(row.pk)
        # Jobs that wait for the same request of the same team share one sentence:
        # one UPDATE per distinct reason, however many jobs have it.
        for (code, reason), ids in changed.items():
            Job.objects.filter(pk__in=ids, status=S.PENDING).update(reason_code=code, reason=reason)


def dispatch(*, clear: bool = True) -> DispatchReport:
    """Place what can start now, preempt borrowed cores a guarantee needs back, and
    write every waiting job's reason. Safe to run concurrently: runs serialize on
    the host rows (SELECT … FOR UPDATE), so two runs never hand out the same room.
    `clear`: clear the kick flag first (see clear_kick)."""
    if clear:
        clear_kick()
    with transaction.atomic():
        hosts = lock_hosts()
        inputs = RunInputs.read()
        fleet = Fleet(hosts, inputs.allocations)
        limits = Limits.load(inputs)
        rows = inputs.pending
        dispatcher = Dispatcher(fleet, limits, inputs.limit_ends)
        dispatcher.run(pending_order(rows, limits.shares, inputs.priorities))
        dispatcher.commit()
        dispatcher.save_reasons(rows)
        placed = list(dispatcher.placed)
        if placed:
            transaction.on_commit(lambda: send_runs(placed))
    return DispatchReport([p[0] for p in placed], len(dispatcher.reasons), dispatcher.preempted)


def stale_cutoff(seconds: int):
    """The moment `seconds` ago: a heartbeat older than this is stale."""
    return timezone.now() - timedelta(seconds=seconds)


# Kicks and runs. kick_dispatch (jobs.wake) sets the kick flag and sends a
# jobs.dispatch task only if the flag was not set; a run clears the flag before it
# reads anything. So every kick is followed by a task whose run starts after it (the
# kick's change was committed before it), and a kicked task that finds the flag
# cleared has been served by such a run already: it does nothing.
#
# Under a burst the fleet is full, every finishing job and every submit kicks, and
# each run would place the one job whose cores just freed, paying a whole run and a
# Celery task per job. So a run that follows a run which left jobs waiting starts
# BUSY_RUN_GAP_S after it (kicks meanwhile coalesce), and while runs keep placing
# jobs and leaving others waiting, the task itself dispatches again after each gap
# for up to BUSY_LOOP_S, without clearing the flag (kicks meanwhile send no task; the
# one task the first of them sent runs afterwards). When every online core is held
# and none is borrowed, a run could change nothing: one small statement says so.
# With free capacity (a run left nothing waiting) a kick runs at once, once:
# submit → running stays a Celery round trip.
BUSY_RUN_GAP_S = 0.02
BUSY_LOOP_S = 1.0  # then the task ends, so reaping and roll-ups are never held up long
_last_run = {"ended": 0.0, "waiting": 0}


def dispatch_kicked(periodic: bool = False) -> DispatchReport:
    """What the jobs.dispatch task runs (see above). `periodic`: the beat's run
    every DISPATCH_EVERY_S, always a full run: a kick while jobs wait and the fleet
    is full (nothing to preempt either) costs one small statement instead of a run,
    so only the periodic run writes those new jobs' reasons."""
    if periodic:
        return _record(lambda: dispatch())
    if _pace_wait() > 0:
        if not kick_pending():
            return DispatchReport([], _last_run["waiting"])
        _pace()
    # Cleared before any read: a change committed after this kicks again.
    if not take_kick():
        return DispatchReport([], _last_run["waiting"])
    if _last_run["waiting"] and fleet_is_full():
        return DispatchReport([], _last_run["waiting"])
    report = _record(lambda: dispatch(clear=False))
    total = DispatchReport(list(report.placed), report.waiting, list(report.preempted))
    deadline = time.monotonic() + BUSY_LOOP_S
    while report.placed and report.waiting and time.monotonic() < deadline:
        _pace()
        if fleet_is_full():
            break
        # The flag is not cleared: the first kick since the clear above sent the
        # next task, which runs after this one and serves every kick meanwhile.
        report = _record(lambda: dispatch(clear=False))
        total.add(report)
    return total


def _pace_wait() -> float:
    """Seconds until a run may start: BUSY_RUN_GAP_S after a run that left jobs waiting."""
    return _last_run["ended"] + BUSY_RUN_GAP_S - time.monotonic() if _last_run["waiting"] else 0.0


def _pace() -> None:
    wait = _pace_wait()
    if wait > 0:
        time.sleep(wait)


def _record(run) -> DispatchReport:
    try:
        report = run()
    except Exception:
        _last_run.update(ended=time.monotonic(), waiting=0)
        raise
    _last_run.update(ended=time.monotonic(), waiting=report.waiting)
    return report


def fleet_is_full() -> bool:
    """No run could place or preempt anything now: every core of the online hosts is
    held, and none of them is borrowed. (A draining or offline host takes nothing.)
    One query: each online host's cores and allocations, and whether any core is
    borrowed."""
    hosts = list(Host.objects.filter(state=Host.State.ONLINE, replay=False)
                 .annotate(held=Count("allocations"), borrowing=Exists(CoreAllocation.objects.filter(borrowed=True)))
                 .values_list("core_ids", "held", "borrowing"))
    if not hosts:
        return not CoreAllocation.objects.filter(borrowed=True).exists()
    return not hosts[0][2] and all(held >= len(core_ids or ()) for core_ids, held, _ in hosts)


def kick_pending() -> bool:
    """Is the kick flag set (a kick since the last run started)? True if Redis cannot say."""
    from jobs.live import store

    try:
        return bool(store.redis().exists(KICK_FLAG))
    except Exception:
        return True


def take_kick() -> bool:
    """Clear the kick flag; was it set? (True if Redis cannot say.)"""
    from jobs.live import store

    try:
        return bool(store.redis().delete(KICK_FLAG))
    except Exception:
        return True


def clear_kick() -> None:
    """Clear the kick flag: kicks from now on send a new task, so none made after
    this point is lost."""
    from jobs.live import store

    try:
        store.redis().delete(KICK_FLAG)
    except Exception:
        pass


# --- reaping ---------------------------------------------------------------------

def reap() -> dict:
    """Recover from faults; returns counts. Never leaves a job running forever."""
    counts = {"hosts_offline": 0, "requeued": 0, "failed": 0, "cancelled": 0, "resent": 0}
    silent_since = stale_cutoff(settings.HOST_OFFLINE_AFTER_S)
    # Only online hosts turn offline: a draining host keeps its drain (an admin's
    # decision) when it goes silent; the scheduler places nothing on it either way.
    counts["hosts_offline"] = Host.objects.filter(state=Host.State.ONLINE, last_heartbeat__lt=silent_since
                                                  ).update(state=Host.State.OFFLINE)
    for job in Job.objects.filter(status=S.RUNNING, heartbeat_at__lt=stale_cutoff(settings.JOB_LEASE_S)):
        counts[_reap_running(job)] += 1
    for job in Job.objects.filter(status=S.QUEUED, queued_at__lt=stale_cutoff(settings.QUEUED_RESEND_AFTER_S)).select_related("host"):
        if job.host is None or job.host.state == Host.State.OFFLINE or (
                job.host.last_heartbeat is not None and job.host.last_heartbeat < silent_since):
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
