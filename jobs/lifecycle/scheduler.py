"""The scheduler: dispatch places pending jobs on hosts; reap recovers from dead
workers, lost messages and silent hosts. Both are safe to run concurrently with
themselves and with workers: dispatchers serialize on the host rows, every status
change is a conditional UPDATE, and the (host, core) unique constraint makes a
double allocation impossible.

Dispatch order is jobs.quotas.fairshare.fair_order (kind priority, then fair share,
then submission). Admission per job is jobs.quotas.policy (budget, hosts, the team's
guaranteed and borrowable cores); a team that needs its guarantee back preempts
other teams' borrowing jobs, newest first, just enough (policy.choose_victims).

The decision itself is jobs.quotas.backfill.schedule_pass, pure, over the
database's state (DispatchRun): EASY backfill (the first job allowed by its quota
that finds no room gets its family's reservation, from the running jobs' time
limits; later jobs of the family start only if they end by their own limit before
it, or on cores it does not need, so a large job's wait is bounded), gangs (N whole
hosts or nothing; while one waits, its reservation goes to the hosts whose jobs
are expected to end first by their teams' history of actual / requested runtime,
gang_ratios) and preemption. The fleet simulator and the start-time forecast
run the same function; this module only reads, writes and sends."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Iterable, TypeVar

from django.conf import settings
from django.core.cache import caches
from django.db import connection, transaction
from django.db.models import Count, Exists, Min
from django.utils import timezone

from jobs.lifecycle import gangs, signals, states
from jobs.lifecycle.runtimes import median_ratios
from jobs.models import CoreAllocation, EventKind, FamilyQuota, GangMember, Host, Job, Kind, Team, TeamQuota
from jobs.notify import events as notify_events
from jobs.quotas.backfill import FleetState, PassResult, Running, Waiting, schedule_pass, time_limit_s
from jobs.quotas.fairshare import PENDING_SCAN, QueueItem, fair_order
from jobs.quotas.placement import HostSlots, core_range
from jobs.quotas.policy import LIVE_REASONS, n_cores
from jobs.quotas.selectors import core_hours_for_budget, decayed_usage_by_team, kind_priorities, team_shares
from jobs.wake import KICK_FLAG, kick_pending

log = logging.getLogger(__name__)
S = Job.Status
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
    order: jobs pending longer than settings.SCHED_OVERDUE_AFTER_H first (oldest
    first), then kind priority (KindPriority, admin-adjustable), then fair share
    (decayed team usage / share, bursts interleaved), then submission order. `shares` (the
    teams' fair-share weights) and `prio` (kind_priorities()) if the caller has read
    them already."""
    jobs = list(jobs)
    if not jobs:
        return []
    prio = kind_priorities() if prio is None else prio
    items = [QueueItem(j.pk, j.team_id, prio.get(j.kind, 0), j.cores, j.family, j.created_at) for j in jobs]
    by_id = {j.pk: j for j in jobs}
    overdue_h = float(settings.SCHED_OVERDUE_AFTER_H)
    ordered = fair_order(items, decayed_usage_by_team(), team_shares() if shares is None else shares,
                         float(settings.FAIRSHARE_QUEUE_CHARGE_S),
                         overdue_before=timezone.now() - timedelta(hours=overdue_h) if overdue_h > 0 else None)
    return [by_id[i.job_id] for i in ordered]


@dataclass
class PendingRow:
    """What dispatch needs of a pending job (specs and logs are never loaded)."""

    pk: int
    team_id: int
    team_slug: str
    kind: str
    family: str
    cores: int  # in all (a gang's cores over all its hosts)
    created_at: datetime
    reason_code: str
    reason: str
    max_runtime_s: int = 0
    host_count: int = 1
    same_network: bool = False

    def waiting(self) -> Waiting:
        """The job as the pure pass sees it: its time limit is all a dispatch knows of its runtime."""
        limit = time_limit_s(self.max_runtime_s)  # infinite for a replica
        return Waiting(self.pk, self.team_id, self.family, self.cores, limit, limit, self.host_count,
                       self.same_network)


PENDING_FIELDS = ("pk", "team_id", "team__slug", "kind", "family", "cores", "created_at", "reason_code", "reason",
                  "max_runtime_s", "host_count", "same_network")


def pending_rows(limit: int | None = PENDING_SCAN) -> list[PendingRow]:
    """The oldest `limit` pending jobs (None: all of them), by id."""
    rows = (Job.objects.filter(status=S.PENDING, cancel_requested=False).order_by("id")
            .values_list(*PENDING_FIELDS)[:limit])
    return [PendingRow(*row) for row in rows]


@dataclass
class RunInputs:
    """Everything a dispatch run reads once the host rows are locked."""

    # (host_id, first core, cores, job_id, team_id, family, borrowed, since as a timestamp): a job's cores on
    # a host are always one contiguous run (placement.place, whole hosts for gangs), so one row per job and host.
    allocations: list[tuple]
    team_quotas: list[tuple]  # (team_id, monthly_core_hours, share)
    family_quotas: list[tuple]  # (team_id, family, guaranteed_cores, borrow_limit)
    priorities: dict[str, int]  # kind -> priority (kind_priorities())
    pending: list[PendingRow]
    limit_ends: dict[int, float] = field(default_factory=dict)  # job holding cores -> when its time limit ends
    drains: set[int] = field(default_factory=set)  # running replicas: a preemption drains them first
    stopping: dict[int, float] = field(default_factory=dict)  # draining replicas -> their cores are back by then
    # team -> its median actual / requested runtime, and job holding cores -> when it is
    # expected to end (its start + its limit × that ratio): where a gang's reservation
    # goes (backfill.reserve_gang). Empty: by the time limits alone.
    ratios: dict[int, float] = field(default_factory=dict)
    expected_ends: dict[int, float] = field(default_factory=dict)
    # waiting gang -> the hosts the last run reserved it (FleetState.gang_hosts); only
    # while expected ends choose them (`ratios`): by time limits alone the choice is stable.
    gang_hosts: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def read(cls, limit: int = PENDING_SCAN, ratios: dict[int, float] | None = None) -> "RunInputs":
        """`ratios`: gang_ratios(), read before the hosts were locked."""
        # The jobs that hold cores are the queued and running ones (a transition out
        # of those releases the cores in its transaction): what holders() needs of
        # them comes with their allocations.
        job_fields = tuple(f"job__{name}" for name in HOLDER_FIELDS[1:])
        rows = list(CoreAllocation.objects
                    .values("host_id", "job_id", "team_id", "family", "borrowed", "since", *job_fields)
                    .annotate(first=Min("core"), count=Count("core")).order_by()
                    .values_list("host_id", "first", "count", "job_id", "team_id", "family", "borrowed", "since",
                                 *job_fields))
        ends, drains, stopping = holding([(row[3], *row[8:]) for row in rows])
        expected = {}
        if ratios:
            for pk, team_id, max_runtime_s in Job.objects.filter(pk__in=list(ends)).values_list(
                    "pk", "team_id", "max_runtime_s"):
                limit_s = time_limit_s(max_runtime_s)
                if team_id in ratios and not math.isinf(limit_s):
                    expected[pk] = ends[pk] - limit_s * (1 - ratios[team_id])
        return cls(
            [(*row[:7], row[7].timestamp()) for row in rows],
            list(TeamQuota.objects.values_list("team_id", "monthly_core_hours", "share")),
            list(FamilyQuota.objects.values_list("team_id", "family", "guaranteed_cores", "borrow_limit")),
            kind_priorities(), pending_rows(limit), ends, drains, stopping, ratios or {}, expected,
            (caches["shared"].get(GANG_HOSTS) or {}) if ratios else {})

    @property
    def shares(self) -> dict[int, float]:
        return {team_id: float(share or 1) for team_id, _, share in self.team_quotas}

    def budgets(self) -> dict[int, tuple[float, float]]:
        """Team with pending jobs -> (NeuronCore-hours used this month, its budget)."""
        budget = {team_id: hours for team_id, hours, _ in self.team_quotas}
        waiting = {row.team_id for row in self.pending if row.team_id in budget}
        used = core_hours_for_budget({team_id: budget[team_id] for team_id in waiting})
        return {team_id: (used.get(team_id, 0.0), budget[team_id]) for team_id in waiting}


# Where the runs pass FleetState.gang_hosts on (written under the host rows' lock, so
# the next run reads what the last one left).
GANG_HOSTS = "dispatch:gang_hosts"
GANG_HOSTS_KEEP_S = 3600


def gang_ratios() -> dict[int, float]:
    """While a gang waits: the runtime ratio (runtimes.median_ratios, cached) of every
    team with jobs waiting or holding cores; else nothing. Read before the hosts are
    locked: a team whose ratio is not cached costs a query over its history."""
    if not Job.objects.filter(status=S.PENDING, host_count__gt=1, cancel_requested=False).exists():
        return {}
    teams = set(Job.objects.filter(status__in=[S.PENDING, *Job.ACTIVE]).values_list("team_id", flat=True)
                .distinct().order_by())
    return median_ratios(teams)


# What holders() reads of each job that holds cores.
HOLDER_FIELDS = ("pk", "started_at", "queued_at", "max_runtime_s", "kind", "status", "cancel_requested",
                 "replica__state", "replica__draining_at")


def holders(jobs=None) -> tuple[dict[int, float], set[int], dict[int, float]]:
    """Of the jobs holding cores (queued or running; `jobs`: a narrower queryset to
    read): see holding()."""
    return holding((Job.objects if jobs is None else jobs).filter(status__in=Job.ACTIVE)
                   .values_list(*HOLDER_FIELDS))


def holding(rows: Iterable[tuple]) -> tuple[dict[int, float], set[int], dict[int, float]]:
    """Of the jobs holding cores, rows of HOLDER_FIELDS (a job may come more than
    once): when each must give them back (its start, or, queued, the time it was
    placed, plus its time limit, as a Unix timestamp; infinite for a job without
    one: a replica); the running endpoint replicas (a preemption drains them before
    their cores go); and those of them already draining, with the time their cores
    are back by at the latest."""
    now = timezone.now()
    ends, drains, stopping = {}, set(), {}
    bound = replica_stop_s()
    for pk, started, queued, limit, kind, status, stop_asked, replica, draining_at in rows:
        ends[pk] = (started or queued or now).timestamp() + time_limit_s(limit)
        if kind != Kind.SERVE or status != S.RUNNING:
            continue
        if stop_asked or replica == "draining":
            stopping[pk] = (draining_at or now).timestamp() + bound
        else:
            drains.add(pk)
    return ends, drains, stopping


def stopping_replicas() -> dict[int, float]:
    """Draining replicas that still hold cores -> when they are back at the latest."""
    return holders(Job.objects.filter(kind=Kind.SERVE))[2]


def replica_stop_s() -> float:
    """How long a draining replica may still hold its cores: the routing grace
    before its stop, a reconcile tick, its drain, the worker's margin before SIGKILL."""
    from neuron_workers.execution import SERVE_EXIT_MARGIN_S

    return (settings.ENDPOINT_DRAIN_ROUTE_GRACE_S + settings.ENDPOINT_RECONCILE_S + settings.ENDPOINT_DRAIN_S
            + SERVE_EXIT_MARGIN_S)


def lock_hosts() -> list[Host]:
    """The hosts a run may place on, locked (SELECT … FOR UPDATE: dispatch runs
    serialize here). A replaying agent's host shows recorded metrics only and runs
    nothing; offline hosts get nothing."""
    return list(Host.objects.select_for_update().exclude(state=Host.State.OFFLINE).exclude(replay=True)
                .only("id", "name", "family", "core_ids", "state", "network").order_by("pk"))


def host_slots(hosts: Iterable[Host]) -> dict[int, HostSlots]:
    return {h.pk: HostSlots(h.pk, h.name, h.family, tuple(h.core_ids or ()), frozenset(),
                            h.state == Host.State.DRAINING, h.network) for h in hosts}


def fleet_state(hosts: list[Host], inputs: RunInputs, now: float) -> FleetState:
    """The database's fleet as the pure pass sees it: every core holder as a Running
    whose end is its time limit (a dispatch knows no better), quotas, budgets."""
    held: dict[int, tuple[int, str, bool, float, dict[int, tuple[int, ...]]]] = {}
    for host_id, first, count, job_id, team_id, family, borrowed, since in inputs.allocations:
        held.setdefault(job_id, (team_id, family, borrowed, since, {}))[4][host_id] = tuple(range(first, first + count))
    running = {}
    for job_id, (team_id, family, borrowed, since, by_host) in held.items():
        members = sorted(by_host.items())
        stop_by = inputs.stopping.get(job_id)
        running[job_id] = Running(job_id, team_id, family, members[0][0], members[0][1],
                                  inputs.limit_ends.get(job_id, now) if stop_by is None else stop_by,
                                  tuple(members[1:]), borrowed, since, drains=job_id in inputs.drains,
                                  stopping=stop_by is not None)
    return FleetState(host_slots(hosts), running,
                      {(t, f): (g, b) for t, f, g, b in inputs.family_quotas},
                      limit_end={job_id: run.end for job_id, run in running.items()},
                      budgets=inputs.budgets(), names={row.team_id: row.team_slug for row in inputs.pending},
                      ratios=inputs.ratios, expected_end=inputs.expected_ends, gang_hosts=dict(inputs.gang_hosts))


class DispatchRun:
    """One dispatch run: the database's state handed to the pure
    jobs.quotas.backfill.schedule_pass (the scheduler's whole decision: admission,
    EASY reservations and backfill, gangs, preemption), then its outcome written in
    the caller's transaction - or, `dry` (jobs.lifecycle.whatif), nothing written."""

    def __init__(self, hosts: list[Host], inputs: RunInputs, *, dry: bool = False):
        self.hosts = {h.pk: h for h in hosts}
        self.inputs = inputs
        self.dry = dry
        self.now = timezone.now().timestamp()
        self.state = fleet_state(hosts, inputs, self.now)
        self.result = PassResult()
        self.placed: list[tuple[int, str]] = []  # (job id, host queue) once committed: every host of a gang
        self.preempted: list[int] = []

    def decide(self) -> PassResult:
        order = pending_order(self.inputs.pending, self.inputs.shares, self.inputs.priorities)
        self.result = schedule_pass([row.waiting() for row in order], self.state, self.now, "easy", preempt=True,
                                    drain_s=replica_stop_s())
        return self.result

    def reason(self, pk: int) -> tuple[str, str] | None:
        """(code, sentence) of a job the run left waiting; None if it was placed or not looked at."""
        code = self.result.reasons.get(pk)
        return None if code is None else (code, self.result.sentences[pk])

    def write(self) -> None:
        """Preempt the victims (their cores are released by the transition), move the
        placed jobs to queued with their cores (and a gang's ranks), write reasons."""
        if self.dry:
            self.preempted = [victim.job_id for victim, _ in self.result.preempted]
            return
        self.preempt()
        self.commit()
        self.save_reasons()
        if self.inputs.ratios and self.state.gang_hosts != self.inputs.gang_hosts:
            caches["shared"].set(GANG_HOSTS, self.state.gang_hosts, timeout=GANG_HOSTS_KEEP_S)

    def preempt(self) -> None:
        rows = {row.pk: row for row in self.inputs.pending}
        slugs = dict(Team.objects.filter(pk__in={v.team_id for v, _ in self.result.preempted})
                     .values_list("pk", "slug")) if self.result.preempted else {}
        # Draining victims first: their owners lock their endpoints' rows, which must
        # come before any job row this run changes (the reconciler's lock order).
        for victim, by_job in sorted(self.result.preempted, key=lambda p: not p[0].stopping):
            job = rows[by_job]
            guaranteed, _ = self.state.quotas.get((job.team_id, job.family), (0, 0))
            message = (f"preempted: team {job.team_slug} reclaimed {n_cores(victim.total, job.family)} for its "
                       f"job #{job.pk}, which needs {job.cores} of its {guaranteed} guaranteed {job.family} cores; "
                       f"this job was borrowing them beyond team {slugs.get(victim.team_id, '?')}'s guarantee")
            if victim.stopping:
                self.drain(victim, job, message)
                continue
            message += " and is back in the queue"
            # Whoever wins the conditional UPDATE (this requeue, or the worker
            # finishing / the owner cancelling at the same moment), the cores are
            # free once it commits: states releases them inside the transition.
            if states.requeue(victim.job_id, kind="preempted", message=message,
                              event_data={"by_team": job.team_slug, "by_job": job.pk, "cores": victim.total,
                                          "family": job.family}):
                self.preempted.append(victim.job_id)

    def drain(self, victim: Running, by: PendingRow, message: str) -> None:
        """A running replica preempted: it keeps its cores while it drains. Its owner
        (jobs.endpoints, through the drain_requested signal) takes it out of the routes
        and stops it once its requests have finished; the job that preempted it waits
        (reason "preempting") and gets the cores in the first run after it stopped."""
        answers = signals.drain_requested.send(sender=Job, job_id=victim.job_id, message=message, by_job=by.pk,
                                               by_team=by.team_slug)
        said = f"{message}: it finishes what it is doing, then stops, and its cores go to job #{by.pk}"
        states.event(victim.job_id, "preempting", said, by_team=by.team_slug, by_job=by.pk, cores=victim.total)
        notify_events.job_transition(victim.job_id, EventKind.JOB_PREEMPTED, message=said)
        if not any(handled for _, handled in answers):
            # Nobody owns its drain: stop it now (SIGTERM and the kill grace); its cores
            # are freed when its worker records the end.
            Job.objects.filter(pk=victim.job_id, status__in=Job.ACTIVE).update(cancel_requested=True)
        self.preempted.append(victim.job_id)

    def commit(self) -> None:
        """Move the placed jobs to queued with their core allocations (a job
        cancelled since it was read is skipped, and its cores stay free)."""
        notes, gangs = [], {}
        for run in self.result.started:
            if run.ranks:
                gangs[run.job_id] = [(host_id, cores[0], len(cores)) for host_id, cores in run.members]
            notes.append((run.job_id, run.host_id, run.cores[0], self.placed_on(run), run.borrowed))
        moved = states.mark_queued_many(notes, gangs)
        self.placed = [(run.job_id, self.hosts[host_id].queue) for run in self.result.started if run.job_id in moved
                       for host_id, _ in run.members]

    def placed_on(self, run: Running) -> str:
        borrowed = " (borrowed)" if run.borrowed else ""
        if not run.ranks:
            return f"placed on {self.hosts[run.host_id].name} cores {core_range(run.cores[0], len(run.cores))}{borrowed}"
        names = ", ".join(self.hosts[h].name for h, _ in run.members)
        return f"placed on {len(run.members)} hosts ({names}), cores {core_range(run.cores[0], len(run.cores))} " \
               f"of each{borrowed}"

    def save_reasons(self) -> None:
        """Write the changed waiting reasons (guarded by status, so a job cancelled
        meanwhile keeps its own reason). A reason of policy.LIVE_REASONS is written
        when its code changes only: its figures move with every placement, and the
        pages and the API show them as they are when read (selectors.live_reasons)."""
        codes, sentences = self.result.reasons, self.result.sentences
        changed = []
        for row in self.inputs.pending:
            code = codes.get(row.pk)
            if code is None or (code == row.reason_code and code in LIVE_REASONS):
                continue
            if code != row.reason_code or sentences[row.pk] != row.reason:
                changed.append((code, sentences[row.pk], row.pk, S.PENDING))
        # Raw SQL: one UPDATE run for every changed row, which psycopg pipelines
        # (executemany); composing bulk_update's UPDATE … CASE for thousands of rows
        # cost several times more CPU than running it.
        with connection.cursor() as cursor:
            cursor.executemany(f"UPDATE {Job._meta.db_table} SET reason_code = %s, reason = %s "
                               f"WHERE id = %s AND status = %s", changed)


def dispatch(*, clear: bool = True) -> DispatchReport:
    """Place what can start now (a gang on all its hosts or not at all), preempt
    borrowed cores a guarantee needs back, and write every waiting job's reason.
    Safe to run concurrently: runs serialize on the host rows (SELECT … FOR UPDATE),
    so two runs never hand out the same room. `clear`: clear the kick flag first
    (see clear_kick)."""
    if clear:
        clear_kick()
    ratios = gang_ratios()
    with transaction.atomic():
        run = DispatchRun(lock_hosts(), RunInputs.read(ratios=ratios))
        run.decide()
        run.write()
        placed = list(run.placed)
        if placed:
            transaction.on_commit(lambda: send_runs(placed))
    return DispatchReport(list(dict.fromkeys(p[0] for p in placed)), len(run.result.reasons), run.preempted)


def stale_cutoff(seconds: int):
    """The moment `seconds` ago: a heartbeat older than this is stale."""
    return timezone.now() - timedelta(seconds=seconds)


# Kicks and runs. kick_dispatch (jobs.wake) sets the kick flag and sends a
# jobs.dispatch task only if the flag was not set; a run clears the flag before it
# reads anything. So every kick is followed by a task whose run starts after it (the
# kick's change was committed before it), and a kicked task that finds the flag
# cleared has been served by such a run already: it does nothing.
#
# Under a burst every submit and every finishing job kicks, and a run per kick would
# place one job each, paying a whole run (a dozen statements) and a Celery task per
# job. So a kicked run starts at least RUN_GAP_S after the previous run ended (kicks
# meanwhile coalesce into it), and while runs keep placing jobs and leaving others
# waiting, the task itself dispatches again after each gap for up to BUSY_LOOP_S,
# without clearing the flag (kicks meanwhile send no task; the one task the first of
# them sent runs afterwards). When every online core is held and none is borrowed, a
# run could change nothing: one small statement says so. A kick that comes later
# than RUN_GAP_S after the last run (one submit at a time) runs at once: submit →
# running stays a Celery round trip.
RUN_GAP_S = 0.05
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
    """Seconds until a kicked run may start: RUN_GAP_S after the previous run."""
    return _last_run["ended"] + RUN_GAP_S - time.monotonic()


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
    # A multi-host job's ranks have a lease each (jobs.lifecycle.gangs); the rest here is one host's job.
    gangs.reap(counts, send_run)
    for job in Job.objects.filter(status=S.RUNNING, host_count=1, heartbeat_at__lt=stale_cutoff(settings.JOB_LEASE_S)):
        counts[_reap_running(job)] += 1
    for job in Job.objects.filter(status=S.QUEUED, host_count=1,
                                  queued_at__lt=stale_cutoff(settings.QUEUED_RESEND_AFTER_S)).select_related("host"):
        if job.host is None or job.host.state == Host.State.OFFLINE or (
                job.host.last_heartbeat is not None and job.host.last_heartbeat < silent_since):
            if states.requeue(job.pk, sources=(S.QUEUED,), message="its host went offline before it started",
                              kind="host_offline"):
                counts["requeued"] += 1
        else:
            # The run message may have been lost (Redis flushed or restarted): send it
            # again. A duplicate is harmless; the worker's claim is conditional.
            Job.objects.filter(pk=job.pk, status=S.QUEUED).update(queued_at=timezone.now())
            for queue in run_queues(job):
                send_run(job.pk, queue)
            counts["resent"] += 1
    return counts


def run_queues(job: Job) -> list[str]:
    """Where a queued job's run message goes: its host's queue, or every rank's host's for a gang."""
    if job.host_count > 1:
        return [h.queue for h in Host.objects.filter(pk__in=GangMember.objects.filter(job=job).values("host_id"))]
    return [job.host.queue]


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
