"""Pure scheduling (no Django, no database): reservations for the head of the
queue, the backfill rule, and the one scheduling pass (schedule_pass) that the
dispatcher runs over the database's state and that the start-time forecast and the
fleet simulator run forward in virtual time.

The EASY rule of HPC schedulers (Lifka, "The ANL/IBM SP scheduling system", 1995;
Slurm's sched/backfill): when the first job in the order that is allowed by its
team's quota finds no room, it gets a reservation - the earliest time enough
contiguous cores of one host will be free, computed from the running jobs' ends -
and a later job may start now only if it ends (by its own time limit) before that
time, or if it uses none of the cores the reservation needs. Since a job is stopped
at its time limit, the head job then starts by its reservation at the latest (a
preemption or a new job of higher priority can still move it; a reservation is a
promise about backfill, not about the future queue).

A gang (host_count > 1) is reserved N whole hosts, each free when the last job on
it ends by its limit; backfill on those hosts is held to the same rule, so a large
gang's wait is bounded like any head job's. When the caller knows its teams'
history of actual / requested runtime (FleetState.ratios, expected_end), the gang
gets the hosts whose jobs are expected to end first, and they are kept from
backfill from that expected time on (reserve_gang; a job expected gone by then may
still use them if its limit keeps the promise, see conflicts): otherwise hosts that
empty early are refilled until the limits run out. The
first few gangs after the head hold reservations too (GANG_RESERVATIONS), each
planned around the ones before it: a gang needs all its hosts empty at once, which
the jobs behind it would otherwise never leave.

Times are plain seconds (any epoch): the dispatcher passes Unix time, the simulator
virtual time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from operator import attrgetter
from collections.abc import Mapping
from typing import Iterable, NamedTuple

from jobs.quotas.placement import HostSlots, Placement, place, place_job
from jobs.quotas.policy import (
    NO_ROOM,
    Borrower,
    Decision,
    FamilyState,
    backfill_blocked,
    check_budget,
    check_dispatch,
    check_gang_hosts,
    check_hosts,
    choose_victims,
    draining_victims,
    no_room,
    no_room_gang,
)

Member = tuple[int, tuple[int, ...]]  # (host id, the cores held on it)


# Job.max_runtime_s of a job that runs until it is stopped (an endpoint replica): it
# never gives its cores back by itself, so reservations and forecasts must not count
# on them.
NO_TIME_LIMIT = 0


def time_limit_s(max_runtime_s: float) -> float:
    """A job's time limit in seconds as reservations use it: infinite for NO_TIME_LIMIT."""
    return math.inf if max_runtime_s == NO_TIME_LIMIT else float(max_runtime_s)


@dataclass(frozen=True)
class Running:
    """A job holding cores, with the time they are expected back (its start plus its
    time limit for reservations; plus its estimated runtime for forecasts). A gang
    holds `cores` on `host_id` (rank 0) and the cores of `ranks` on the others."""

    job_id: int
    team_id: int
    family: str
    host_id: int
    cores: tuple[int, ...]
    end: float
    ranks: tuple[Member, ...] = ()
    borrowed: bool = False  # beyond its team's guarantee: may be preempted
    since: float = 0.0  # when it got the cores (newest borrowers are preempted first)
    # Preempting it asks it to drain (an endpoint replica finishing its requests): it
    # keeps its cores until its process has stopped, instead of giving them back at once.
    drains: bool = False
    # Its stop was asked for (a draining replica): its cores come back by `end`. Nobody
    # preempts it again, and a job that needs its cores waits for them.
    stopping: bool = False

    @property
    def members(self) -> tuple[Member, ...]:
        return ((self.host_id, self.cores), *self.ranks)

    @property
    def total(self) -> int:
        return len(self.cores) + sum(len(c) for _, c in self.ranks)


@dataclass(frozen=True)
class Reservation:
    """A waiting job's promise: `cores` contiguous cores from `core_start` on
    `host_id` (and, for a gang, the whole hosts of `ranks`), free at `start` at the
    latest; the job then holds them until `until` at the latest (its start plus its
    time limit), which is what a later reservation must wait for."""

    job_id: int
    family: str
    start: float
    host_id: int
    core_start: int
    cores: int
    ranks: tuple[Placement, ...] = ()
    until: float = math.inf
    # From when its cores are kept from later jobs, if before `start`: a gang's
    # expected start (reserve_gang). A later job gone by then may still use them
    # (by its limit, or expected gone by then and by its limit before `start`).
    hold_from: float | None = None

    @property
    def held_from(self) -> float:
        return self.start if self.hold_from is None else min(self.start, self.hold_from)

    def holding(self) -> Running:
        """The reservation as a job holding its cores from now until `until`: what
        a reservation made after it plans around (from now rather than from its
        start: a later reservation then never counts on them before `until`)."""
        members = [(m.host_id, tuple(range(m.core_start, m.core_start + m.cores))) for m in self.members]
        return Running(self.job_id, -1, self.family, members[0][0], members[0][1], self.until, tuple(members[1:]))

    @cached_property
    def members(self) -> tuple[Placement, ...]:
        return (Placement(self.host_id, self.core_start, self.cores), *self.ranks)

    @property
    def core_set(self) -> frozenset[int]:
        return frozenset(range(self.core_start, self.core_start + self.cores))

    def overlaps(self, spot: Placement) -> bool:
        """Does `spot` take any of the cores reserved on its host?"""
        for m in self.members:
            if m.host_id == spot.host_id:
                return max(m.core_start, spot.core_start) < min(m.core_start + m.cores, spot.core_start + spot.cores)
        return False

    def on(self, host_id: int) -> frozenset[int]:
        """The cores reserved on `host_id` (none if it is not one of the reserved hosts)."""
        for m in self.members:
            if m.host_id == host_id:
                return frozenset(range(m.core_start, m.core_start + m.cores))
        return frozenset()


def reserve(job_id: int, family: str, cores: int, hosts: list[HostSlots], running: Iterable[Running],
            now: float, host_count: int = 1, same_network: bool = False,
            reserved: Iterable[Reservation] = (), expected: Mapping[int, float] | None = None,
            ends: HostEnds | None = None, kept: tuple[int, ...] = ()) -> Reservation | None:
    """The earliest time (≥ now) at which the request fits if the running jobs give
    their cores back at their `end`, and where: `cores` contiguous cores of `family`
    on one non-draining host, or for a gang `host_count` whole hosts (see
    reserve_gang). None if even an empty fleet could not hold the request.
    `reserved`: reservations made before this one, each holding its cores from now
    until its `until` (whoever holds them first). `expected`: running job -> when it
    is expected to end (a gang's choice of hosts and its hold_from; see reserve_gang).
    `ends`: HostEnds.of(running, expected), if the caller keeps it (a gang's
    reservation then reads it instead of going over `running`). `kept`: the hosts a
    gang's earlier reservation named (see reserve_gang).

    Ends are taken in order; only the hosts whose cores were just released can newly
    fit the request, so each step is one placement per such host."""
    reserved = list(reserved)
    if host_count > 1:
        holdings = [r.holding() for r in reserved]
        if ends is None:
            return reserve_gang(job_id, family, host_count, cores // host_count, same_network, hosts,
                                [*running, *holdings], now, expected, kept=kept)
        return reserve_gang(job_id, family, host_count, cores // host_count, same_network, hosts,
                            holdings, now, expected, ends, kept)
    by_host = {h.host_id: h for h in hosts if h.family == family and not h.draining}
    held_back: dict[int, dict[int, float]] = {}  # host -> core -> until when a reservation holds it
    for r in reserved:
        for m in r.members:
            if m.host_id in by_host:
                until = held_back.setdefault(m.host_id, {})
                for core in range(m.core_start, m.core_start + m.cores):
                    until[core] = max(until.get(core, now), r.until)

    def busy(host_id: int, used: set[int] | frozenset[int], t: float) -> frozenset[int]:
        back = held_back.get(host_id)
        return frozenset(used) if not back else frozenset(used) | {c for c, u in back.items() if u > t}

    spot = place([h if h.host_id not in held_back else
                  HostSlots(h.host_id, h.name, family, h.core_ids, busy(h.host_id, h.used, now), h.draining, h.network)
                  for h in by_host.values()], family, cores)
    if spot is not None:
        return Reservation(job_id, family, now, spot.host_id, spot.core_start, cores)
    used = {h: set(s.used) for h, s in by_host.items()}
    holdings = [r.holding() for r in reserved]
    pseudo = {id(h) for h in holdings}
    for run in sorted([*running, *holdings] if holdings else running, key=attrgetter("end", "job_id")):
        members = [(host_id, held) for host_id, held in run.members if host_id in by_host]
        if not members:
            continue  # holds nothing this request could use
        if math.isinf(run.end):
            return None  # only jobs without a time limit are left: no start can be promised
        for host_id, held in members:
            if id(run) not in pseudo:
                used[host_id].difference_update(held)
            host = by_host[host_id]
            spot = place([HostSlots(host.host_id, host.name, family, host.core_ids,
                                    busy(host_id, used[host_id], run.end))], family, cores)
            if spot is not None:
                return Reservation(job_id, family, max(run.end, now), spot.host_id, spot.core_start, cores)
    return None


class HostEnds:
    """Per host, what a set of running jobs says about when it empties: the latest
    of their time-limit ends (`free_at`), the latest of their expected ends
    (`likely`: the job's entry in `expected`, never after its limit) and the cores
    they hold (`covered`). What a gang's reservation reads of the running jobs;
    FleetState keeps one per family while the family is unchanged."""

    def __init__(self) -> None:
        self.free_at: dict[int, float] = {}
        self.likely: dict[int, float] = {}
        self.covered: dict[int, set[int]] = {}

    @classmethod
    def of(cls, running: Iterable[Running], expected: Mapping[int, float] | None = None,
           base: HostEnds | None = None) -> HostEnds:
        """`base`'s figures (left unchanged) with `running` added."""
        out = cls()
        if base is not None:
            out.free_at, out.likely, out.covered = dict(base.free_at), dict(base.likely), dict(base.covered)
        expected = expected or {}
        copied: set[int] = set()  # hosts whose covered set is out's own (the others may be base's)
        for run in running:
            guess = min(expected.get(run.job_id, run.end), run.end)
            for host_id, held in run.members:
                out.free_at[host_id] = max(out.free_at.get(host_id, -math.inf), run.end)
                out.likely[host_id] = max(out.likely.get(host_id, -math.inf), guess)
                if host_id not in copied:
                    out.covered[host_id] = set(out.covered.get(host_id, ()))
                    copied.add(host_id)
                out.covered[host_id].update(held)
        return out


def reserve_gang(job_id: int, family: str, host_count: int, per_host: int, same_network: bool,
                 hosts: list[HostSlots], running: Iterable[Running], now: float,
                 expected: Mapping[int, float] | None = None, ends: HostEnds | None = None,
                 kept: tuple[int, ...] = ()) -> Reservation | None:
    """A gang's reservation: `host_count` hosts of `family` with exactly `per_host`
    cores (inside one network label when `same_network`), each free when the last
    job on it ends. A host holding cores that no running job accounts for is never
    counted free. `ends`: HostEnds of running jobs already summed up (then
    `running` lists only the jobs beyond those).

    Which hosts: those whose jobs are expected to be gone first (`expected`: job ->
    its expected end, e.g. its limit × its team's observed runtime ratio; a job not
    listed is expected at its `end`), the time limits breaking ties. The
    reservation's start is when the chosen hosts are free by the time limits (the
    promise); its hold_from is when they are expected free: from then on no later
    job may hold them (but one expected gone by then, see conflicts), so hosts that
    empty one by one are not refilled past the time the gang can expect to start.

    `kept`: the hosts the gang's reservation named in an earlier pass. Expected ends
    move as teams' histories grow, and hosts chosen by them may be promised later
    than the ones named before - which backfill, keeping off only the new ones, may
    then fill past the earlier promise. So the gang keeps those hosts unless the new
    choice promises it a start no later: its promise never moves back."""
    fitting = {h.host_id: h for h in hosts if h.family == family and not h.draining and len(h.core_ids) == per_host}
    ends = HostEnds.of(running, expected, ends)
    free_at = {h: max(now, ends.free_at.get(h, now)) for h in fitting}
    likely = {h: max(now, ends.likely.get(h, now)) for h in fitting}
    covered = {h: ends.covered.get(h, set()) for h in fitting}
    groups: dict[str, list[int]] = {}
    for host_id, host in fitting.items():
        if not host.used <= covered[host_id]:
            continue  # held by something the caller did not list: no promise can be made on it
        label = host.network if same_network else ""
        if same_network and not label:
            continue
        groups.setdefault(label, []).append(host_id)
    best: tuple | None = None
    for label, members in groups.items():
        if len(members) < host_count:
            continue
        chosen = sorted(members, key=lambda h: (likely[h], free_at[h], h))[:host_count]
        key = (max(likely[h] for h in chosen), max(free_at[h] for h in chosen), len(members), label)
        if best is None or key < best[0]:
            best = (key, chosen)
    if len(kept) == host_count and any(set(kept) <= set(members) for members in groups.values()):
        kept_start = max(free_at[h] for h in kept)
        if best is None or kept_start < best[0][1]:
            best = ((max(likely[h] for h in kept), kept_start), list(kept))
    if best is None:
        return None
    (hold_from, start, *_), chosen = best
    if math.isinf(start):
        return None  # a host it needs is held by a job without a time limit
    spots = [Placement(h, min(fitting[h].core_ids), per_host) for h in chosen]
    return Reservation(job_id, family, max(start, now), spots[0].host_id, spots[0].core_start, per_host,
                       tuple(spots[1:]), hold_from=max(hold_from, now))


def _spots(spot: Placement | tuple[Placement, ...]) -> tuple[Placement, ...]:
    return (spot,) if isinstance(spot, Placement) else tuple(spot)


def conflicts(spot: Placement | tuple[Placement, ...], end: float, reservation: Reservation,
              expected: float | None = None) -> bool:
    """Would a job placed at `spot` (one Placement per rank) and gone by `end` (its
    time limit) delay the reservation? Only if it still holds cores when the
    reservation keeps them (its start, or a gang's expected start) and some of them
    are reserved. A job `expected` to end before a gang's expected start, and gone
    by its limit before the gang's promised start, delays neither the promise nor,
    as far as anyone can tell, the expected start: it may use the gang's hosts."""
    if end <= reservation.held_from:
        return False
    if expected is not None and expected <= reservation.held_from and end <= reservation.start:
        return False
    return any(reservation.overlaps(p) for p in _spots(spot))


def masked(hosts: list[HostSlots], *reservations: Reservation) -> list[HostSlots]:
    """The hosts with the reserved cores shown as taken."""
    reserved: dict[int, frozenset[int]] = {}
    for r in reservations:
        for m in r.members:
            reserved[m.host_id] = reserved.get(m.host_id, frozenset()) | r.on(m.host_id)
    return [HostSlots(h.host_id, h.name, h.family, h.core_ids, h.used | reserved[h.host_id], h.draining,
                      h.network) if h.host_id in reserved else h for h in hosts]


def backfill_spot(hosts: list[HostSlots], family: str, cores: int, end: float, reservation: Reservation | None,
                  host_count: int = 1, same_network: bool = False) -> tuple[Placement, ...] | None:
    """Where a job that is not the reserved one may start now (one Placement per
    rank): anywhere if it is gone (by its time limit, `end`) before the reservation
    starts, else only on cores the reservation does not need. None: it must wait."""
    spot = place_job(hosts, family, cores, host_count, same_network)
    if spot is None or reservation is None or not conflicts(spot, end, reservation):
        return spot
    return place_job(masked(hosts, reservation), family, cores, host_count, same_network)


# --- one pass: the dispatcher's decision, the forecast's and the simulator's step ---

class Waiting(NamedTuple):
    """A pending job as a pass sees it: its time limit bounds backfill; `runtime_s`
    is what the caller expects it to run (the forecast's estimate, the simulator's
    truth; the dispatcher passes the limit) and only sets the end of the Running it
    becomes. `cores` is the total: a gang's cores over all its `host_count` hosts.
    (A named tuple: the dispatcher makes one per pending job on every run.)"""

    job_id: int
    team_id: int
    family: str
    cores: int
    limit_s: float
    runtime_s: float
    host_count: int = 1
    same_network: bool = False

    @property
    def request(self) -> tuple[str, int, int, bool]:
        return self.family, self.cores, self.host_count, self.same_network

    @property
    def asked(self) -> tuple[int, str, int, int, bool]:
        """(team, request): what a pass answers once while the family is unchanged."""
        return self.team_id, self.family, self.cores, self.host_count, self.same_network


@dataclass
class FleetState:
    """Hosts, what holds their cores, and every team's quota, mutated by passes."""

    hosts: dict[int, HostSlots]  # host id -> the host with no cores used
    running: dict[int, Running] = field(default_factory=dict)
    quotas: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)  # (team, family) -> (guaranteed, borrow)
    # Without quotas (the simulator's FIFO / greedy baselines are about order only) every team may use the fleet.
    unlimited: bool = False
    # Time-limit ends of the running jobs (reservations use limits, never estimates).
    limit_end: dict[int, float] = field(default_factory=dict)
    # team -> (NeuronCore-hours used this month, monthly budget); a team not listed is not checked.
    budgets: dict[int, tuple[float, float]] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)  # team -> its name in reasons
    # team -> its finished jobs' actual / requested runtime (runtime_ratio's median), and
    # running job -> when it is expected to end: where a gang's reservation goes
    # (reserve_gang). A job started by a pass is expected at its limit × its team's
    # ratio; without these, at its time limit.
    ratios: dict[int, float] = field(default_factory=dict)
    expected_end: dict[int, float] = field(default_factory=dict)
    # waiting gang -> the hosts its reservation named in the last pass, which it keeps
    # while no others promise an earlier start (reserve_gang); each pass replaces it.
    gang_hosts: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.used: dict[int, set[int]] = {h: set() for h in self.hosts}
        self.team_use: dict[tuple[int, str], int] = {}
        self.free: dict[str, int] = {}  # family -> free cores on non-draining hosts
        self.capacity: dict[str, int] = {}  # family -> all cores
        for h in self.hosts.values():
            self.capacity[h.family] = self.capacity.get(h.family, 0) + len(h.core_ids)
            self.free[h.family] = self.free.get(h.family, 0) + (0 if h.draining else len(h.core_ids))
        self.version = 0  # bumped on every change: a "no room" answer of an older version is stale
        self._slots: dict[str, list[HostSlots]] = {}
        self._pos: dict[int, int] = {}  # host id -> its index in its family's slots
        # family -> [host ids of non-draining hosts with k free cores for each k]: a
        # full fleet's placement looks only at the few hosts that could hold a request.
        self._by_free: dict[str, list[set[int]]] = {}
        for h in self.hosts.values():
            if not h.draining:
                buckets = self._by_free.setdefault(h.family, [])
                buckets.extend(set() for _ in range(len(h.core_ids) + 1 - len(buckets)))
                buckets[len(h.core_ids)].add(h.host_id)
        self._family_runs: dict[str, dict[int, Running]] = {}
        # job -> (its Running, the same with its time-limit end) where the two ends
        # differ (the simulator's, the forecast's): made once per job, not per pass.
        self._limit_views: dict[int, tuple[Running, Running]] = {}
        self._limit_running: dict[str, tuple[int, list[Running]]] = {}  # family -> (its version, limit_running)
        self._host_ends: dict[str, tuple[int, HostEnds]] = {}  # family -> (its version, host_ends)
        self._stopping: dict[str, int] = {}  # family -> how many of its running jobs are stopping
        # (family, cores) -> ids of the idle non-draining hosts of that size: where gangs go.
        self._idle: dict[tuple[str, int], set[int]] = {}
        for h in self.hosts.values():
            if not h.draining:
                self._idle.setdefault((h.family, len(h.core_ids)), set()).add(h.host_id)
        self.fversion: dict[str, int] = {}  # family -> bumped on every change of its hosts or its holders
        for run in self.running.values():
            self._hold(run)

    def _change(self, run: Running, sign: int) -> None:
        family_runs = self._family_runs.setdefault(run.family, {})
        if sign > 0:
            family_runs[run.job_id] = run
        else:
            family_runs.pop(run.job_id, None)
            self._limit_views.pop(run.job_id, None)
        if run.stopping:
            self._stopping[run.family] = self._stopping.get(run.family, 0) + sign
        for host_id, cores in run.members:
            host = self.hosts.get(host_id)
            if host is None:
                continue  # a host the caller left out (offline): its cores are nobody's room
            used = self.used[host_id]
            before = len(host.core_ids) - len(used)
            if sign > 0:
                used.update(cores)
            else:
                used.difference_update(cores)
            if not host.draining:
                self.free[host.family] -= sign * len(cores)
                buckets = self._by_free[host.family]
                buckets[before].discard(host_id)
                buckets[len(host.core_ids) - len(used)].add(host_id)
                idle = self._idle[(host.family, len(host.core_ids))]
                if used:
                    idle.discard(host_id)
                else:
                    idle.add(host_id)
            slots = self._slots.get(host.family)
            if slots is not None:
                slots[self._pos[host_id]] = HostSlots(host.host_id, host.name, host.family, host.core_ids,
                                                      frozenset(self.used[host_id]), host.draining, host.network)
        key = (run.team_id, run.family)
        self.team_use[key] = self.team_use.get(key, 0) + sign * run.total
        self.version += 1
        self.fversion[run.family] = self.fversion.get(run.family, 0) + 1

    def _hold(self, run: Running) -> None:
        self._change(run, +1)

    def slots(self, family: str) -> list[HostSlots]:
        """The family's hosts as placement sees them (kept current as jobs start and end)."""
        if family not in self._slots:
            slots = []
            for h in self.hosts.values():
                if h.family == family:
                    self._pos[h.host_id] = len(slots)
                    slots.append(HostSlots(h.host_id, h.name, h.family, h.core_ids, frozenset(self.used[h.host_id]),
                                           h.draining, h.network))
            self._slots[family] = slots
        return self._slots[family]

    def candidates(self, family: str, cores: int, whole: bool = False) -> list[HostSlots]:
        """The family's non-draining hosts with at least `cores` free cores, or with
        `whole` its idle hosts of exactly `cores` cores (in no particular order:
        placement breaks ties by host id)."""
        slots = self.slots(family)
        if whole:
            return [slots[self._pos[h]] for h in self._idle.get((family, cores), ())]
        buckets = self._by_free.get(family, [])
        return [slots[self._pos[h]] for k in range(max(cores, 1), len(buckets)) for h in buckets[k]]

    def idle_count(self, family: str, cores: int) -> int:
        return len(self._idle.get((family, cores), ()))

    def start(self, job: Waiting, spot: Placement | tuple[Placement, ...], now: float,
              borrowed: bool = False) -> Running:
        spots = _spots(spot)
        held = [(p.host_id, tuple(range(p.core_start, p.core_start + p.cores))) for p in spots]
        run = Running(job.job_id, job.team_id, job.family, held[0][0], held[0][1], now + job.runtime_s,
                      tuple(held[1:]), borrowed, now)
        self.running[job.job_id] = run
        self.limit_end[job.job_id] = now + job.limit_s
        if job.team_id in self.ratios:
            self.expected_end[job.job_id] = self.expected_by(job, now)
        self._hold(run)
        return run

    def expected_by(self, job: Waiting, now: float) -> float:
        """When the job, started at `now`, is expected to end: its time limit × its
        team's runtime ratio (by its limit if the team has none)."""
        return now + job.limit_s * min(self.ratios.get(job.team_id, 1.0), 1.0)

    def started_at(self, job_id: int, at: float) -> Running:
        """A job started by the last pass counts as started at `at` instead (earlier):
        its ends move with it (a forecast's coarse step, see forecast)."""
        run = self.running[job_id]
        shift = run.since - at
        moved = replace(run, end=run.end - shift, since=at)
        self.running[job_id] = moved
        self._family_runs[run.family][job_id] = moved
        self.limit_end[job_id] -= shift
        if job_id in self.expected_end:
            self.expected_end[job_id] -= shift
        self.version += 1
        self.fversion[run.family] = self.fversion.get(run.family, 0) + 1
        return moved

    def stop(self, job_id: int, until: float) -> Running:
        """The job was asked to drain and stop by `until`: it keeps its cores till then."""
        run = replace(self.running[job_id], stopping=True, end=until)
        if not self.running[job_id].stopping:
            self._stopping[run.family] = self._stopping.get(run.family, 0) + 1
        self.running[job_id] = run
        self._family_runs.setdefault(run.family, {})[job_id] = run
        self.limit_end[job_id] = until
        self.version += 1
        self.fversion[run.family] = self.fversion.get(run.family, 0) + 1
        return run

    def stopping_jobs(self, family: str) -> list[Running]:
        return [run for run in self._family_runs.get(family, {}).values() if run.stopping] \
            if self._stopping.get(family) else []

    def stopping_cores(self, family: str) -> dict[int, frozenset[int]]:
        """host id -> the cores of the family's stopping jobs there (soon free)."""
        out: dict[int, set[int]] = {}
        for run in self.stopping_jobs(family):
            for host_id, cores in run.members:
                out.setdefault(host_id, set()).update(cores)
        return {h: frozenset(c) for h, c in out.items()}

    def finish(self, job_id: int) -> Running:
        run = self.running.pop(job_id)
        self.limit_end.pop(job_id, None)
        self.expected_end.pop(job_id, None)
        self._change(run, -1)
        return run

    def family_state(self, team_id: int, family: str) -> FamilyState:
        guaranteed, borrow = self.quotas.get((team_id, family), (0, 0))
        return FamilyState(guaranteed, borrow, self.team_use.get((team_id, family), 0), self.free.get(family, 0),
                           self.capacity.get(family, 0))

    def limit_running(self, family: str) -> list[Running]:
        """The family's running jobs with their time-limit ends (what reservations use),
        by (end, job id): made once per change of the family, since a pass reserves
        for several jobs of a family that has not changed in between (read only)."""
        version = self.fversion.get(family, 0)
        known = self._limit_running.get(family)
        if known is not None and known[0] == version:
            return known[1]
        out = []
        for r in self._family_runs.get(family, {}).values():
            end = self.limit_end.get(r.job_id, r.end)
            if end != r.end:
                view = self._limit_views.get(r.job_id)
                if view is None or view[0] is not r or view[1].end != end:
                    view = self._limit_views[r.job_id] = (r, Running(r.job_id, r.team_id, r.family, r.host_id,
                                                                     r.cores, end, r.ranks))
                r = view[1]
            out.append(r)
        out.sort(key=attrgetter("end", "job_id"))
        self._limit_running[family] = (version, out)
        return out

    def host_ends(self, family: str) -> HostEnds:
        """HostEnds of the family's limit_running with its jobs' expected ends: made
        once per change of the family, like limit_running (read only)."""
        version = self.fversion.get(family, 0)
        known = self._host_ends.get(family)
        if known is None or known[0] != version:
            known = self._host_ends[family] = (version, HostEnds.of(self.limit_running(family), self.expected_end))
        return known[1]

    def borrowers(self, family: str, but_team: int | None = None) -> list[Borrower]:
        """Other teams' borrowing jobs of `family`, one Borrower per host they hold
        (preempting any of a gang's hosts preempts the whole gang)."""
        return [Borrower(r.job_id, r.team_id, host_id, cores, r.since) for r in self.running.values()
                if r.borrowed and not r.stopping and r.family == family and r.team_id != but_team
                for host_id, cores in r.members]

    def name(self, team_id: int) -> str:
        return self.names.get(team_id, str(team_id))


# Besides the head, this many waiting gangs of each family hold a reservation that
# the jobs behind them respect. A single-host job behind the head starts as soon as
# one host has its cores, and cores free up all the time; a gang needs N hosts empty
# at the same moment, which a busy family never has by chance: without hosts kept
# for it, the hosts that empty one by one are refilled by the jobs behind it, and it
# only starts collecting them once it is the head - one gang after another. Every
# reservation costs some idle time, so only the first few gangs hold one.
GANG_RESERVATIONS = 4


class Sentences(Mapping[int, str]):
    """Job id -> the sentence of its reason, worded when first read: a pass over a
    long backlog refuses thousands of jobs, and its callers read few sentences (the
    dispatcher those whose code changed, the simulator none). `by_job` holds, per
    job, the refusal (a Decision or a _Refusal) whose `sentence` it reads."""

    def __init__(self) -> None:
        self.by_job: dict[int, Decision | _Refusal] = {}

    def __getitem__(self, job_id: int) -> str:
        return self.by_job[job_id].sentence

    def __iter__(self):
        return iter(self.by_job)

    def __len__(self) -> int:
        return len(self.by_job)


class _Refusal:
    """A refusal of the policy function `word` (no_room, no_room_gang,
    backfill_blocked): its code now, its sentence worded on first read (the code is
    known without the figures the sentence names)."""

    def __init__(self, code: str, word, *args) -> None:
        self.code, self._word, self._args, self._sentence = code, word, args, None

    @property
    def sentence(self) -> str:
        if self._sentence is None:
            self._sentence = self._word(*self._args).sentence
        return self._sentence


@dataclass
class PassResult:
    started: list[Running] = field(default_factory=list)
    reservations: dict[str, Reservation] = field(default_factory=dict)  # family -> the head's reservation
    gang_reservations: dict[str, list[Reservation]] = field(default_factory=dict)  # family -> gangs' after it
    reasons: dict[int, str] = field(default_factory=dict)  # job id -> reason code
    sentences: Sentences = field(default_factory=Sentences)  # job id -> the reason for its owner
    preempted: list[tuple[Running, int]] = field(default_factory=list)  # (victim, the job it made room for)
    # job id -> the draining victims it waits for (preempted in this pass or earlier)
    awaiting: dict[int, tuple[int, ...]] = field(default_factory=dict)
    made: dict[str, list[Reservation]] = field(default_factory=dict)  # family -> all of them, in the order made

    def held(self, family: str) -> list[Reservation]:
        """The family's reservations in the order they were made."""
        return self.made.get(family, [])

    def reserved_jobs(self) -> set[int]:
        return {r.job_id for held in self.made.values() for r in held}


POLICIES = ("easy", "greedy", "fifo")
FIFO_BLOCKED = Decision(False, "fifo_blocked", "an earlier job of the family waits for room")


def schedule_pass(order: list[Waiting], state: FleetState, now: float, policy: str = "easy", *,
                  preempt: bool = False, drain_s: float = 0.0) -> PassResult:
    """The scheduler's decision: start what may start now, in `order`, on `state`
    (mutated), and say why the rest waits. The dispatcher runs exactly this over the
    database's state and writes the result; forecasts and the simulator run it
    forward in virtual time.

    Admission per job: the team's budget (state.budgets), whether any host could
    hold it at all, its team's quota (unless state.unlimited). Jobs within their
    team's guarantee go first; borrowing jobs that fit get what is left afterwards,
    so a borrower is never placed in the pass that would preempt it (one that does
    not fit even now waits in its place in the order, and may be the head). Then, by `policy`:
    - "easy": EASY backfill: the first admitted job that finds no room in its
      family gets that family's reservation (the head's), and so do the first
      GANG_RESERVATIONS gangs after it that find no room, each planned around the
      reservations made before it; a job starts only where it delays none of the
      reservations made before it in the pass (backfill_spot's rule);
    - "greedy": first fit, no reservation;
    - "fifo": strict order per family: the first job of a family that finds no
      room blocks every later one of that family.
    With `preempt`, a single-host job within its guarantee that finds no room
    preempts other teams' borrowers (policy.choose_victims), unless the cores it
    would take are reserved past its end. A victim that drains (Running.drains) keeps
    its cores for up to `drain_s` while it finishes its work; the job waits for it (reason
    "preempting") and gets the cores in the first pass after it stopped. A job held back by its quota blocks nothing.
    Same requests on the same fleet are answered once (a long queue is mostly a
    few distinct requests)."""
    run = _Pass(state, now, policy, preempt, drain_s)
    deferred = []
    for job in order:
        if run.fifo_blocked(job) or run.repeated(job):
            continue
        decision = run.admission(job)
        # A borrower that finds no room even now is handled in its place in the
        # order, so that it can be the family's head and get the reservation.
        if decision.ok and decision.borrowed and run.fits_now(job):
            deferred.append(job)
        else:
            run.handle(job, decision)
    for job in deferred:
        if not run.fifo_blocked(job) and not run.repeated(job):
            run.handle(job, run.admission(job))
    state.gang_hosts = {r.job_id: tuple(m.host_id for m in r.members)
                        for held in run.result.made.values() for r in held if r.ranks}
    return run.result


class _Pass:
    def __init__(self, state: FleetState, now: float, policy: str, preempt: bool, drain_s: float = 0.0):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        self.state, self.now, self.policy, self.preempt = state, now, policy, preempt
        self.drain_s = drain_s
        self.result = PassResult()
        self.reasons, self.why, self.fversion = self.result.reasons, self.result.sentences.by_job, state.fversion
        self.promised: dict[int, frozenset[int]] = {}  # host -> stopping jobs' cores a job of this pass waits for
        self.blocked: set[str] = set()  # fifo: families whose head found no room
        # Answers reused while what they depend on is unchanged (a long queue is
        # mostly the same few requests): admission depends on the team's use (and a
        # refusal's sentence on the family's free cores), placement on the family's version.
        self.hosts_ok: dict[tuple, Decision] = {}  # request -> could any host hold it (fixed within a pass)
        # (team, request, its use) -> admission; (team, request, its use, family's free) -> refusal
        self.answers: dict[tuple, Decision] = {}
        # (request, masks) -> (family version, where it fits or None): a pass places the
        # same request again and again while its family is unchanged.
        self.spots: dict[tuple, tuple[int, tuple[Placement, ...] | None]] = {}
        self.refusals: dict[tuple, tuple[int, _Refusal]] = {}  # (team, request) -> (family version, no-room reason)
        self.hopeless: dict[str, tuple[int, int]] = {}  # family -> (version, smallest request no preemption helps)
        self.refused: dict[tuple, tuple[int, Decision | _Refusal]] = {}  # (team, request) -> (family version, its refusal)

    def admission(self, job: Waiting) -> Decision:
        state = self.state
        # An admission depends on the team's use only; a refusal's sentence also names
        # the family's free cores.
        key = (job.team_id, job.request, state.team_use.get((job.team_id, job.family), 0))
        known = self.answers.get(key)
        if known is None:
            known = self.answers.get((*key, state.free.get(job.family, 0)))
        if known is not None:
            return known
        decision = Decision.admit()
        budget = state.budgets.get(job.team_id)
        if budget is not None:
            decision = check_budget(state.name(job.team_id), *budget)
        if decision.ok:
            decision = self.hosts_check(job)
        if decision.ok and not state.unlimited:
            decision = check_dispatch(state.name(job.team_id), job.family, job.cores,
                                      state.family_state(job.team_id, job.family))
        self.answers[key if decision.ok else (*key, state.free.get(job.family, 0))] = decision
        return decision

    def hosts_check(self, job: Waiting) -> Decision:
        if job.request not in self.hosts_ok:
            slots = self.state.slots(job.family)
            self.hosts_ok[job.request] = (
                check_gang_hosts(job.family, job.host_count, job.cores // job.host_count, job.same_network, slots)
                if job.host_count > 1 else check_hosts(job.family, job.cores, slots))
        return self.hosts_ok[job.request]

    def refuse(self, job: Waiting, decision: Decision | _Refusal) -> None:
        self.reasons[job.job_id] = decision.code
        self.why[job.job_id] = decision
        # backfill_blocked depends on the job's own time limit, preempting on the cores
        # promised to it: the same team's same request may get another answer.
        if decision.code not in ("backfill_blocked", "preempting"):
            self.refused[job.asked] = (self.fversion.get(job.family, 0), decision)

    def repeated(self, job: Waiting) -> bool:
        """Refuse the job as the same team's same request was refused earlier in this
        pass, if nothing of its family has changed since (the answer would be the
        same: admission, placement and preemption depend only on the family's hosts
        and holders, the team and the request). What keeps a pass over a backlog
        of thousands cheap."""
        seen = self.refused.get(job.asked)
        if seen is None or seen[0] != self.fversion.get(job.family, 0):
            return False
        self.reasons[job.job_id] = seen[1].code
        self.why[job.job_id] = seen[1]
        return True

    def place(self, job: Waiting, masks: tuple[Reservation, ...] = ()) -> tuple[Placement, ...] | None:
        """Where the job fits now (on cores none of `masks` needs)."""
        key = (job.request, tuple(r.job_id for r in masks) if masks else ())  # one reservation per job in a pass
        version = self.state.fversion.get(job.family, 0)
        known = self.spots.get(key)
        if known is not None and known[0] == version:
            return known[1]
        hosts = self.state.candidates(job.family, job.cores // job.host_count, whole=job.host_count > 1)
        if self.promised:
            hosts = self.unpromised(hosts)
        if masks:
            hosts = masked(hosts, *masks)
        spot = place_job(hosts, *job.request)
        self.spots[key] = (version, spot)
        return spot

    def unpromised(self, hosts: list[HostSlots], soon: dict[int, frozenset[int]] | None = None) -> list[HostSlots]:
        """The hosts with the cores an earlier job of this pass waits for shown as
        taken, and the `soon` free cores (of stopping jobs) shown as free."""
        if not self.promised and not soon:
            return hosts
        soon = soon or {}
        return [h if h.host_id not in self.promised and h.host_id not in soon else
                HostSlots(h.host_id, h.name, h.family, h.core_ids,
                          (h.used - soon.get(h.host_id, frozenset())) | self.promised.get(h.host_id, frozenset()),
                          h.draining, h.network) for h in hosts]

    def fits_now(self, job: Waiting) -> bool:
        return self.place(job) is not None

    def in_way(self, job: Waiting) -> tuple[Reservation, ...]:
        """The family's reservations (made so far in the pass) that the job would
        still be running at."""
        end = self.now + job.limit_s
        return tuple(r for r in self.result.held(job.family) if r.held_from < end)

    def reserve(self, job: Waiting) -> None:
        """The job finds no room: its reservation if it is the family's first (the
        head), or one of the first GANG_RESERVATIONS gangs after it, planned around
        the family's reservations made before it."""
        result, family = self.result, job.family
        head = family not in result.reservations
        if not head and (job.host_count == 1 or len(result.gang_reservations.get(family, ())) >= GANG_RESERVATIONS):
            return
        state = self.state
        held = reserve(job.job_id, family, job.cores, state.slots(family), state.limit_running(family),
                       self.now, job.host_count, job.same_network, result.held(family), state.expected_end,
                       state.host_ends(family) if job.host_count > 1 else None, state.gang_hosts.get(job.job_id, ()))
        if held is None:
            return
        held = replace(held, until=held.start + job.limit_s)
        if head:
            result.reservations[family] = held
        else:
            result.gang_reservations.setdefault(family, []).append(held)
        result.made.setdefault(family, []).append(held)

    def fifo_blocked(self, job: Waiting) -> bool:
        """"fifo": refuse the job if an earlier job of its family found no room
        (before admission or placement: nothing else about the job matters then)."""
        if job.family not in self.blocked:
            return False
        self.reasons[job.job_id] = FIFO_BLOCKED.code
        self.why[job.job_id] = FIFO_BLOCKED
        return True

    def handle(self, job: Waiting, decision: Decision) -> None:
        state, now = self.state, self.now
        if not decision.ok:
            self.refuse(job, decision)
            return
        end = now + job.limit_s
        in_way = self.in_way(job) if self.policy == "easy" else ()
        spot = self.place(job)
        if spot is not None and in_way:
            expected = state.expected_by(job, now)
            delayed = next((r for r in in_way if conflicts(spot, end, r, expected)), None)
            if delayed is not None:
                spot = self.place(job, in_way)
                if spot is None:
                    self.refuse(job, _Refusal("backfill_blocked", backfill_blocked, job.family, job.cores,
                                              job.limit_s, delayed.job_id, delayed.start - now))
                    return
        waits = None
        if spot is None and self.preempt and not decision.borrowed and job.host_count == 1:
            spot = self.reclaim(job, end, in_way)
            if isinstance(spot, Decision):
                waits, spot = spot, None
        if spot is None:
            self.refuse(job, waits or self.no_room(job))
            if self.policy == "fifo":
                self.blocked.add(job.family)
            elif self.policy == "easy":
                self.reserve(job)
            return
        self.result.started.append(state.start(job, spot, now, borrowed=decision.borrowed))

    def no_room(self, job: Waiting) -> _Refusal:
        state = self.state
        version = state.fversion.get(job.family, 0)
        key = (0 if job.host_count > 1 else job.team_id, job.request)
        known = self.refusals.get(key)
        if known is not None and known[0] == version:
            return known[1]
        if job.host_count > 1:
            per_host = job.cores // job.host_count
            decision = _Refusal(NO_ROOM, no_room_gang, job.family, job.host_count, per_host, job.same_network,
                                state.idle_count(job.family, per_host))
        else:
            decision = _Refusal(NO_ROOM, no_room, state.name(job.team_id), job.family, job.cores,
                                state.family_state(job.team_id, job.family))
        self.refusals[key] = (version, decision)
        return decision

    def reclaim(self, job: Waiting, end: float,
                reservations: tuple[Reservation, ...]) -> tuple[Placement, ...] | Decision | None:
        """The job is within its team's guarantee but finds no room: preempt other
        teams' borrowing jobs (newest first, just enough), then place it. Cores of
        jobs already stopping count as free (they come back soon), unless an earlier
        job of this pass waits for them. A victim that drains keeps its cores until it
        has stopped: the job then waits for it (a Decision saying so) instead of
        starting now."""
        state = self.state
        version, smallest = self.hopeless.get(job.family, (-1, 0))
        if version == state.version and job.cores >= smallest:
            return None
        stopping = {h: cores - self.promised.get(h, frozenset())
                    for h, cores in state.stopping_cores(job.family).items()}
        slots = self.unpromised(state.slots(job.family), stopping)
        spot = place(slots, job.family, job.cores) if any(stopping.values()) else None
        victims: list[Borrower] = []
        if spot is None:
            choice = choose_victims(slots, job.family, job.cores, state.borrowers(job.family, job.team_id))
            if choice is None:
                if choose_victims(slots, job.family, job.cores, state.borrowers(job.family)) is None:
                    self.hopeless[job.family] = (state.version, job.cores)  # smaller than any earlier failure
                return None
            victims, spot = choice
        if any(conflicts(spot, end, r) for r in reservations):
            return None  # the freed cores are reserved: preempting for them would delay that job
        for victim_id in dict.fromkeys(v.job_id for v in victims):
            run = state.running[victim_id]
            if run.drains:
                self.result.preempted.append((state.stop(victim_id, self.now + self.drain_s), job.job_id))
            else:
                self.result.preempted.append((state.finish(victim_id), job.job_id))
        placed = place_job(self.unpromised(state.slots(job.family)), job.family, job.cores)
        if placed is not None:
            return placed
        # The spot's cores are still held by stopping jobs: wait for them (and keep
        # them from later jobs of this pass).
        wanted = frozenset(range(spot.core_start, spot.core_start + spot.cores))
        self.promised[spot.host_id] = self.promised.get(spot.host_id, frozenset()) | wanted
        # Placements and refusals found before the promise do not hold now.
        state.version += 1
        state.fversion[job.family] = state.fversion.get(job.family, 0) + 1
        awaited = tuple(sorted(r.job_id for r in state.stopping_jobs(job.family) if any(
            h == spot.host_id and wanted.intersection(c) for h, c in r.members)))
        self.result.awaiting[job.job_id] = awaited
        until = max((state.running[j].end for j in awaited), default=self.now)
        return draining_victims(job.family, job.cores, awaited, until - self.now)


@dataclass(frozen=True)
class Forecast:
    start: float | None  # None: not within the horizon (or never, under the current quotas)
    reserved: bool  # the start is the job's own reservation at some point of the replay
    # No start because every job still holding cores has no time limit (endpoint
    # replicas, which run until stopped): no end in the replay frees what it waits for.
    behind_unlimited: bool = False
    # No start because the replay stopped first (max_steps, horizon_s): it had not
    # started by this time, so it starts no earlier.
    not_before: float | None = None


# A forecast's time step, as a fraction of how far ahead of now it has got (see forecast).
FORECAST_STEP = 0.05


def forecast(order: list[Waiting], state: FleetState, now: float, *, horizon_s: float = 30 * 86400,
             max_steps: int = 100_000, until: int | None = None, scan: int | None = None,
             step: float = FORECAST_STEP) -> dict[int, Forecast]:
    """Replay the queue forward with schedule_pass ("easy") until every job has
    started. `state` is consumed. Runtimes come only from the Waiting and Running
    records the caller built (time limits corrected by history): this function never
    sees how long a job really runs. The order is kept as it is now (no new
    arrivals, no change of fair share as usage accrues). `until`: stop once that job
    has started (the jobs not started by then get no forecast). `max_steps`: at most
    that many passes.

    `scan`: each pass looks at the oldest `scan` jobs still waiting in the replay (by
    job id, the order jobs were submitted in; a negative id, a job not submitted yet
    such as a dry run's, counts as the newest), in `order`'s order among them - what a
    dispatch run reads (PENDING_SCAN). As jobs start, newer ones come into view, so a
    job behind the scan gets a start too (a pass at the same time looks at them, as
    the next dispatch run would). None: every pass looks at the whole order.

    Time: after a pass at t, time moves to max(the next expected end (Running.end),
    t + step × (t - now)), and every job expected to end by then gives its cores
    back before the next pass. Near now that is each next end; further ahead a step
    spans `step` of the time looked ahead, and a replay over a horizon takes a few
    hundred passes (about log(horizon / first step) / step) instead of one per job
    end. A job that a pass starts at the end of a step counts as started when the
    cores it got came back (the latest expected end among their holders in the
    step; not before the step's first end, which is what could let it start), and
    if it is then expected to end within the step too, it gives them back and the
    pass runs again: the fleet's cores are not left idle for the rest of a step, and
    a start is off by about `step` of its wait at most. step=0: a pass at every
    expected end.

    A pass decides for each family on its own (its hosts, holders and jobs), and a
    family where nothing started or ended since its last pass would start nothing
    now either (a later time only makes backfill harder): each step passes only
    the jobs of the families that changed (or that got jobs into view)."""
    left = list(order)
    out: dict[int, Forecast] = {}
    reserved: set[int] = set()
    t, steps, never = now, 0, False
    changed: set[str] | None = None  # families with a start or an end since their last pass (None: all)
    # The window: job ids by age; those before `edge` are in view (all but started ones still waiting).
    by_age = sorted((j.job_id for j in order), key=lambda job_id: (job_id < 0, job_id))
    edge = len(by_age) if scan is None else min(scan, len(by_age))
    in_view = set(by_age[:edge])
    family = {j.job_id: j.family for j in order}
    back: dict[int, dict[int, float]] = {}  # host -> core -> its expected end in the step that ended at t
    first_end = t  # the step's first expected end (not before the pass before it)
    while left and steps < max_steps and t - now <= horizon_s:
        steps += 1
        result = schedule_pass([j for j in left if j.job_id in in_view and (changed is None or j.family in changed)],
                               state, t)
        reserved.update(result.reserved_jobs())
        changed = {r.family for r in result.started}
        if result.started:
            ids = {r.job_id for r in result.started}
            again = False  # a pass at the same time: something came into view or gave its cores back
            for r in result.started:
                at = max([first_end, *(back[h][c] for h, cores in r.members if h in back
                                       for c in cores if c in back[h])])
                if at < t:
                    r = state.started_at(r.job_id, at)
                out[r.job_id] = Forecast(at, r.job_id in reserved)
                if r.end <= t:  # started that early, it is expected to end within the step too
                    state.finish(r.job_id)
                    for host_id, cores in r.members:
                        back.setdefault(host_id, {}).update(dict.fromkeys(cores, r.end))
                    again = True
            left = [j for j in left if j.job_id not in ids]
            if until in ids:
                break
            seen = by_age[edge:edge + len(ids)]  # as many come into view as started
            if seen:  # a dispatch run soon after looks at them
                edge += len(seen)
                in_view.update(seen)
                changed.update(family[job_id] for job_id in seen)
                again = True
            if again and left:
                continue
        if not left or not state.running:
            never = bool(left)  # no job holds cores: no end can start those left
            break
        first_end = max(min(r.end for r in state.running.values()), t)
        t = max(first_end, t + step * (t - now))
        back = {}
        for job_id in [r.job_id for r in state.running.values() if r.end <= t]:
            run = state.finish(job_id)
            changed.add(run.family)
            for host_id, cores in run.members:
                back.setdefault(host_id, {}).update(dict.fromkeys(cores, run.end))
    for job in left:
        out[job.job_id] = Forecast(None, job.job_id in reserved, behind_unlimited=math.isinf(t),
                                   not_before=None if never or math.isinf(t) else t)
    return out


def runtime_ratio(history: Iterable[tuple[float, float]], *, floor: float = 0.02) -> tuple[float, float, float]:
    """(low, median, high) of actual / requested runtime over a team's finished jobs
    (`history`: (actual_s, limit_s) pairs), each in [floor, 1]; (1, 1, 1) without
    history: the time limit itself. Low and high are the 10th and 90th percentiles."""
    ratios = sorted(min(max(a / lim, floor), 1.0) for a, lim in history if lim and lim > 0 and a is not None)
    if not ratios:
        return 1.0, 1.0, 1.0

    def q(p: float) -> float:
        return ratios[min(len(ratios) - 1, int(p * len(ratios)))]

    return q(0.1), q(0.5), q(0.9)


def estimated_end(started: float, limit_s: float, ratio: float, now: float) -> float:
    """A running job's expected end: its start plus its limit × the ratio, never in
    the past (it is still running) and never past its time limit."""
    return min(max(started + limit_s * ratio, now), started + limit_s)

