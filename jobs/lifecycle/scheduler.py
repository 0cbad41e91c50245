"""The scheduler: dispatch places pending jobs on hosts; reap recovers from dead
workers, lost messages and silent hosts. Both are safe to run concurrently with
themselves and with workers: dispatchers serialize on the host rows, every status
change is a conditional UPDATE, and the (host, core) unique constraint makes a
double allocation impossible.

Dispatch order is jobs.fairshare.fair_order (kind priority, then fair share, then
submission). Admission per job is jobs.policy (budget, hosts, the team's guaranteed
and borrowable cores); a team that needs its guarantee back preempts other teams'
borrowing jobs, newest first, just enough (jobs.policy.choose_victims)."""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from datetime import timezone as dt_timezone
from typing import Iterable, TypeVar

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from jobs.lifecycle import states
from jobs.lifecycle.services import stale_cutoff
from jobs.models import CoreAllocation, FamilyQuota, Host, Job, Team, TeamQuota
from jobs.quotas.fairshare import QueueItem, fair_order
from jobs.quotas.placement import HostSlots, Placement, core_range, place
from jobs.quotas.policy import (
    Borrower,
    Decision,
    FamilyState,
    check_budget,
    check_dispatch,
    check_hosts,
    choose_victims,
    n_cores,
    no_room,
)
from jobs.quotas.selectors import core_hours_by_team

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
    from jobs.quotas.selectors import decayed_usage_by_team, kind_priorities, team_shares

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


PENDING_FIELDS = ("pk", "team_id", "team__slug", "kind", "family", "cores", "created_at", "reason_code", "reason")


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

    @classmethod
    def read(cls, limit: int = PENDING_SCAN) -> "RunInputs":
        if connection.vendor == "postgresql":
            return cls._read_one_statement(limit)
        from jobs.quotas.selectors import kind_priorities

        return cls(
            [(*row[:6], row[6].timestamp()) for row in CoreAllocation.objects.values_list(
                "host_id", "core", "job_id", "team_id", "family", "borrowed", "since")],
            list(TeamQuota.objects.values_list("team_id", "monthly_core_hours", "share")),
            list(FamilyQuota.objects.values_list("team_id", "family", "guaranteed_cores", "borrow_limit")),
            kind_priorities(), pending_rows(limit))

    @classmethod
    def _read_one_statement(cls, limit: int) -> "RunInputs":
        """The same reads as one statement (one round trip, one snapshot):
        dispatch runs many times a second under a burst, and five ORM queries cost
        more than the dispatching itself. The pending jobs come as rows (building
        JSON for hundreds of them cost PostgreSQL twice as much), after one leading
        row whose last column holds the small tables as JSON arrays: allocations,
        quotas, kind priorities and the slugs of the teams with pending jobs."""
        from jobs.quotas.selectors import DEFAULT_KIND_PRIORITY
        from jobs.models import KindPriority

        def table(model) -> str:
            return connection.ops.quote_name(model._meta.db_table)

        sql = (
            "WITH p AS (SELECT id, team_id, kind, family, cores, created_at, reason_code, reason "
            f"  FROM {table(Job)} WHERE status = %s AND NOT cancel_requested ORDER BY id LIMIT %s) "
            "SELECT 0, NULL::bigint, NULL::bigint, NULL, NULL, NULL::integer, NULL::float8, NULL, NULL, "
            "json_build_array("
            "(SELECT json_agg(json_build_array(host_id, core, job_id, team_id, family, borrowed, "
            f"  EXTRACT(EPOCH FROM since))) FROM {table(CoreAllocation)}), "
            f"(SELECT json_agg(json_build_array(team_id, monthly_core_hours, share)) FROM {table(TeamQuota)}), "
            "(SELECT json_agg(json_build_array(team_id, family, guaranteed_cores, borrow_limit)) "
            f"  FROM {table(FamilyQuota)}), "
            f"(SELECT json_agg(json_build_array(kind, priority)) FROM {table(KindPriority)}), "
            f"(SELECT json_agg(json_build_array(id, slug)) FROM {table(Team)} WHERE id IN (SELECT team_id FROM p))) "
            "UNION ALL "
            "SELECT 1, id, team_id, kind, family, cores, EXTRACT(EPOCH FROM created_at)::float8, reason_code, reason, "
            "NULL FROM p "
            "ORDER BY 1, 2")
        with connection.cursor() as cursor:
            cursor.execute(sql, [S.PENDING, limit])
            rows = cursor.fetchall()
        head = rows[0][-1]
        allocations, team_quotas, family_quotas, kinds, slugs = [
            v or [] for v in (json.loads(head) if isinstance(head, str) else head)]
        priorities = {str(k): v for k, v in DEFAULT_KIND_PRIORITY.items()}
        priorities.update(dict(kinds))
        slug, utc = dict(slugs), dt_timezone.utc
        # created_at as an epoch double: exact to the microsecond, and parsed in C
        # (a timestamptz column is parsed by a Python loader, ~3 µs a row).
        return cls(
            [tuple(row) for row in allocations], [tuple(row) for row in team_quotas],
            [tuple(row) for row in family_quotas], priorities,
            [PendingRow(pk, team_id, slug[team_id], kind, family, cores, datetime.fromtimestamp(created, utc), code,
                        reason)
             for _, pk, team_id, kind, family, cores, created, code, reason, _ in rows[1:]])


def lock_hosts() -> list[Host]:
    """The hosts a run may place on, locked (SELECT … FOR UPDATE: dispatch runs
    serialize here). A replaying agent's host shows recorded metrics only and runs
    nothing; offline hosts get nothing. On PostgreSQL the Host instances carry only
    what dispatch uses (id, name, family, core_ids, state): compiling the ORM
    query cost more than the rest of a run's reads."""
    if connection.vendor != "postgresql":
        return list(Host.objects.select_for_update().exclude(state=Host.State.OFFLINE).exclude(replay=True)
                    .order_by("pk"))
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT id, name, family, core_ids, state FROM {Host._meta.db_table} "
                       "WHERE state <> %s AND NOT replay ORDER BY id FOR UPDATE", [Host.State.OFFLINE])
        return [Host(id=pk, name=name, family=family, state=state,
                     core_ids=json.loads(core_ids) if isinstance(core_ids, str) else core_ids)
                for pk, name, family, core_ids, state in cursor.fetchall()]


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
        cores: dict[int, list[int]] = defaultdict(list)
        for host_id, core, job_id, team_id, family, borrowed, since in allocations:
            self.used[host_id].add(core)
            self.team_use[(team_id, family)] += 1
            if borrowed:
                cores[job_id].append(core)
                self.borrowers[job_id] = Borrower(job_id, team_id, host_id, (), since)
                self.family_of[job_id] = family
        for job_id, b in self.borrowers.items():
            self.borrowers[job_id] = Borrower(b.job_id, b.team_id, b.host_id, tuple(sorted(cores[job_id])), b.since)

    def cores(self) -> int:
        """Every core that can be running a job now: the hosts' and those still held
        on hosts this run does not place on (offline, replaying)."""
        return sum(len(h.core_ids) for h in self.hosts.values()) + sum(
            len(used) for host_id, used in self.used.items() if host_id not in self.hosts)

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

    def borrowers_of_others(self, family: str, team_id: int | None = None) -> list[Borrower]:
        return [b for b in self.borrowers.values() if self.family_of[b.job_id] == family and b.team_id != team_id]


# A read of the budget measure is reused for settings.FAIRSHARE_CACHE_S; its figures
# grow by at most the fleet's cores × (age + this slack) meanwhile (the slack covers
# an attempt whose start was stamped just before a read but committed after it).
BUDGET_GROWTH_SLACK_S = 60.0


@dataclass(frozen=True)
class UsageRead:
    """core_hours_by_team() as read at `at` (time.monotonic()), by a dispatcher
    that saw `cores` cores in the fleet."""

    hours: dict[int, float]
    at: float
    cores: int


_budget_lock = threading.Lock()
_budget_read: UsageRead | None = None


def clear_budget_cache() -> None:
    global _budget_read
    with _budget_lock:
        _budget_read = None


class BudgetUsage:
    """This month's NeuronCore-hours per team, as the budget check needs them.

    The exact measure (jobs.selectors_teams.core_hours_by_team) reads every attempt
    the usage roll-up has not folded yet (the last quarter of an hour), which on a
    busy fleet is thousands of rows; dispatch runs many times a second under a
    burst. So one exact read is reused for FAIRSHARE_CACHE_S: meanwhile no team can
    have used more than that read plus every core of the fleet for the time since,
    and while that upper bound is below a team's budget the team is certainly
    within it. A team whose bound reaches its budget is read exactly in the run
    (as are all teams once the read is too old), so every refusal — and the figure
    in its sentence — is exact, and no job starts past its team's budget."""

    def __init__(self, fleet_cores: int):
        self.fleet_cores = fleet_cores
        self.exact: dict[int, float] = {}  # teams read exactly in this run

    def prepare(self, budgets: dict[int, float], team_ids: Iterable[int]) -> None:
        """Make hours() answer for `team_ids` (the teams with pending jobs)."""
        global _budget_read
        team_ids = {t for t in team_ids if t in budgets}
        if not team_ids:
            return
        now = time.monotonic()
        with _budget_lock:
            read = _budget_read
        ttl = float(settings.FAIRSHARE_CACHE_S)
        if read is None or now - read.at >= ttl or ttl <= 0:
            read = UsageRead(core_hours_by_team(), now, self.fleet_cores)
            with _budget_lock:
                _budget_read = read
            self.exact = read.hours
            return
        cores = max(read.cores, self.fleet_cores)
        if cores > read.cores:
            with _budget_lock:
                _budget_read = UsageRead(read.hours, read.at, cores)
        growth = cores * (now - read.at + BUDGET_GROWTH_SLACK_S) / 3600.0
        near = sorted(t for t in team_ids if read.hours.get(t, 0.0) + growth >= budgets[t])
        if near:
            exact = core_hours_by_team(near)
            self.exact = {t: exact.get(t, 0.0) for t in near}
        # An upper bound below the budget admits; check_budget never shows it.
        self.exact.update({t: read.hours.get(t, 0.0) + growth for t in team_ids if t not in self.exact})

    def hours(self, team_id: int) -> float:
        return self.exact.get(team_id, 0.0)


@dataclass
class Limits:
    """Every team's quotas, read once per dispatch run."""

    family: dict[tuple[int, str], tuple[int, int]]  # (team, family) -> (guaranteed, borrow_limit)
    budget: dict[int, float]  # team -> monthly NeuronCore-hours
    shares: dict[int, float]  # team -> fair-share weight
    usage: BudgetUsage  # team -> NeuronCore-hours used this month (see BudgetUsage)
    slugs: dict[int, str]

    @classmethod
    def load(cls, inputs: RunInputs, fleet_cores: int) -> "Limits":
        budget, shares = {}, {}
        for team_id, hours, share in inputs.team_quotas:
            budget[team_id], shares[team_id] = hours, float(share or 1)
        return cls({(t, f): (g, b) for t, f, g, b in inputs.family_quotas}, budget, shares,
                   BudgetUsage(fleet_cores), {})

    def slug(self, team_id: int) -> str:
        if team_id not in self.slugs:
            self.slugs[team_id] = Team.objects.filter(pk=team_id).values_list("slug", flat=True).first() or "?"
        return self.slugs[team_id]


class Dispatcher:
    """One dispatch run inside one transaction (see dispatch())."""

    def __init__(self, fleet: Fleet, limits: Limits):
        self.fleet, self.limits = fleet, limits
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
            lambda: check_budget(job.team_slug, self.limits.usage.hours(job.team_id), budget)
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
        spot = place(slots, job.family, job.cores)
        if spot is None and not decision.borrowed:
            spot = self.reclaim(job, slots)
        if spot is None:
            fam = self.family_state(job, self.fleet.slots(job.family))
            refusal = no_room(job.team_slug, job.family, job.cores, fam)
            self.reasons[job.pk] = (refusal.code, refusal.sentence)
            if self.fleet.version == version:
                self.no_room[key] = (version, self.reasons[job.pk])
            return
        self.start(job, spot, decision.borrowed)

    def reclaim(self, job: PendingRow, slots: list[HostSlots]) -> Placement | None:
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
        victims, _ = choice
        guaranteed, _ = self.limits.family.get((job.team_id, job.family), (0, 0))
        for victim in victims:
            owner = self.limits.slug(victim.team_id)
            message = (f"preempted: team {job.team_slug} reclaimed {n_cores(len(victim.cores), job.family)} for its "
                       f"job #{job.pk}, which needs {job.cores} of its {guaranteed} guaranteed {job.family} cores; "
                       f"this job was borrowing them beyond team {owner}'s guarantee and is back in the queue")
            # Whoever wins the conditional UPDATE (this requeue, or the worker
            # finishing / the owner cancelling at the same moment), the cores are
            # free once it commits: states releases them inside the transition.
            if states.requeue(victim.job_id, kind="preempted", message=message,
                              event_data={"by_team": job.team_slug, "by_job": job.pk, "cores": len(victim.cores),
                                          "family": job.family}):
                self.preempted.append(victim.job_id)
            self.fleet.give_back(victim)
        return place(self.fleet.slots(job.family), job.family, job.cores)

    def start(self, job: PendingRow, spot: Placement, borrowed: bool) -> None:
        """Reserve the cores for this run; commit() writes all placements at once."""
        self.fleet.take(job, spot, borrowed)
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
        changed = [(r.pk, *self.reasons[r.pk]) for r in rows
                   if r.pk in self.reasons and (r.reason_code, r.reason) != self.reasons[r.pk]]
        if connection.vendor == "postgresql":
            # Thousands of waiting jobs get new numbers in their sentences on a busy
            # run: one UPDATE … FROM (VALUES …) per chunk instead of one per job.
            table = Job._meta.db_table
            for i in range(0, len(changed), 1000):
                chunk = changed[i:i + 1000]
                values = ", ".join(["(%s::bigint, %s, %s)"] * len(chunk))
                with connection.cursor() as cursor:
                    cursor.execute(
                        f"UPDATE {table} AS j SET reason_code = v.code, reason = v.reason "
                        f"FROM (VALUES {values}) AS v(id, code, reason) WHERE j.id = v.id AND j.status = %s",
                        [x for row in chunk for x in row] + [S.PENDING])
            return
        for pk, code, reason in changed:
            Job.objects.filter(pk=pk, status=S.PENDING).update(reason_code=code, reason=reason)


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
        limits = Limits.load(inputs, fleet.cores())
        rows = inputs.pending
        limits.usage.prepare(limits.budget, {r.team_id for r in rows})
        dispatcher = Dispatcher(fleet, limits)
        dispatcher.run(pending_order(rows, limits.shares, inputs.priorities))
        dispatcher.commit()
        dispatcher.save_reasons(rows)
        placed = list(dispatcher.placed)
        if placed:
            transaction.on_commit(lambda: send_runs(placed))
    return DispatchReport([p[0] for p in placed], len(dispatcher.reasons), dispatcher.preempted)


# Kicks and runs. kick_dispatch (jobs.services) sets the kick flag and sends a
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
    held, and none of them is borrowed. (A draining or offline host takes nothing.)"""
    if connection.vendor != "postgresql":
        return False
    host, alloc = Host._meta.db_table, CoreAllocation._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT NOT EXISTS (SELECT 1 FROM {alloc} WHERE borrowed) AND "
            f"(SELECT COALESCE(SUM(jsonb_array_length(core_ids)), 0) FROM {host} WHERE state = %s AND NOT replay) "
            f"<= (SELECT COUNT(*) FROM {alloc} a JOIN {host} h ON h.id = a.host_id "
            "WHERE h.state = %s AND NOT h.replay)", [Host.State.ONLINE, Host.State.ONLINE])
        return bool(cursor.fetchone()[0])


KICK_FLAG = "nd:dispatch:kick"


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
