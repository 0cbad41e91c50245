"""Pure EASY backfill (no Django, no database): reservations for the head of the
queue, the backfill rule, and one scheduling pass that the start-time forecast and
the fleet simulator run forward in virtual time.

The EASY rule of HPC schedulers (Lifka, "The ANL/IBM SP scheduling system", 1995;
Slurm's sched/backfill): when the first job in the order that is allowed by its
team's quota finds no room, it gets a reservation - the earliest time enough
contiguous cores of one host will be free, computed from the running jobs' ends -
and a later job may start now only if it ends (by its own time limit) before that
time, or if it uses none of the cores the reservation needs. Since a job is stopped
at its time limit, the head job then starts by its reservation at the latest (a
preemption or a new job of higher priority can still move it; a reservation is a
promise about backfill, not about the future queue).

Times are plain seconds (any epoch): the dispatcher passes Unix time, the simulator
virtual time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from jobs.quotas.placement import HostSlots, Placement, place
from jobs.quotas.policy import FamilyState, check_dispatch


@dataclass(frozen=True)
class Running:
    """A job holding cores, with the time they are expected back (its start plus its
    time limit for reservations; plus its estimated runtime for forecasts)."""

    job_id: int
    team_id: int
    family: str
    host_id: int
    cores: tuple[int, ...]
    end: float


@dataclass(frozen=True)
class Reservation:
    """The head job's promise: `cores` contiguous cores from `core_start` on
    `host_id`, free at `start` at the latest."""

    job_id: int
    family: str
    start: float
    host_id: int
    core_start: int
    cores: int

    @property
    def core_set(self) -> frozenset[int]:
        return frozenset(range(self.core_start, self.core_start + self.cores))


def reserve(job_id: int, family: str, cores: int, hosts: list[HostSlots], running: Iterable[Running],
            now: float) -> Reservation | None:
    """The earliest time (≥ now) at which `cores` contiguous cores of `family` are
    free on one non-draining host if the running jobs give their cores back at their
    `end`, and where. None if even an empty fleet could not hold the request.

    Ends are taken in order; only the host whose cores were just released can newly
    fit the request, so each step is one placement on one host."""
    by_host = {h.host_id: h for h in hosts if h.family == family and not h.draining}
    spot = place(list(by_host.values()), family, cores)
    if spot is not None:
        return Reservation(job_id, family, now, spot.host_id, spot.core_start, cores)
    used = {h: set(s.used) for h, s in by_host.items()}
    for run in sorted((r for r in running if r.host_id in by_host), key=lambda r: (r.end, r.job_id)):
        used[run.host_id].difference_update(run.cores)
        host = by_host[run.host_id]
        spot = place([HostSlots(host.host_id, host.name, family, host.core_ids, frozenset(used[run.host_id]))],
                     family, cores)
        if spot is not None:
            return Reservation(job_id, family, max(run.end, now), spot.host_id, spot.core_start, cores)
    return None


def conflicts(spot: Placement, end: float, reservation: Reservation) -> bool:
    """Would a job placed at `spot` and gone by `end` delay the reservation? Only if
    it still holds cores at the reserved start and some of them are reserved."""
    if end <= reservation.start or spot.host_id != reservation.host_id:
        return False
    return not reservation.core_set.isdisjoint(range(spot.core_start, spot.core_start + spot.cores))


def masked(hosts: list[HostSlots], reservation: Reservation) -> list[HostSlots]:
    """The hosts with the reserved cores shown as taken."""
    return [HostSlots(h.host_id, h.name, h.family, h.core_ids, h.used | reservation.core_set, h.draining)
            if h.host_id == reservation.host_id else h for h in hosts]


def backfill_spot(hosts: list[HostSlots], family: str, cores: int, end: float,
                  reservation: Reservation | None) -> Placement | None:
    """Where a job that is not the reserved one may start now: anywhere if it is
    gone (by its time limit, `end`) before the reservation starts, else only on
    cores the reservation does not need. None: it must wait."""
    spot = place(hosts, family, cores)
    if spot is None or reservation is None or not conflicts(spot, end, reservation):
        return spot
    return place(masked(hosts, reservation), family, cores)


# --- one pass, for forecasts and the simulator ------------------------------------

@dataclass(frozen=True)
class Waiting:
    """A pending job as a pass sees it: its time limit bounds backfill; `runtime` is
    what the caller expects it to run (the forecast's estimate, the simulator's
    truth) and only sets the end of the Running it becomes."""

    job_id: int
    team_id: int
    family: str
    cores: int
    limit_s: float
    runtime_s: float


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

    def __post_init__(self) -> None:
        self.used: dict[int, set[int]] = {h: set() for h in self.hosts}
        self.team_use: dict[tuple[int, str], int] = {}
        self._slots: dict[str, list[HostSlots]] = {}
        for run in self.running.values():
            self._hold(run)

    def _hold(self, run: Running) -> None:
        self.used[run.host_id].update(run.cores)
        key = (run.team_id, run.family)
        self.team_use[key] = self.team_use.get(key, 0) + len(run.cores)
        self._slots.pop(run.family, None)

    def slots(self, family: str) -> list[HostSlots]:
        if family not in self._slots:
            self._slots[family] = [HostSlots(h.host_id, h.name, h.family, h.core_ids, frozenset(self.used[h.host_id]),
                                             h.draining) for h in self.hosts.values() if h.family == family]
        return self._slots[family]

    def start(self, job: Waiting, spot: Placement, now: float) -> Running:
        run = Running(job.job_id, job.team_id, job.family, spot.host_id,
                      tuple(range(spot.core_start, spot.core_start + job.cores)), now + job.runtime_s)
        self.running[job.job_id] = run
        self.limit_end[job.job_id] = now + job.limit_s
        self._hold(run)
        return run

    def finish(self, job_id: int) -> Running:
        run = self.running.pop(job_id)
        self.limit_end.pop(job_id, None)
        self.used[run.host_id].difference_update(run.cores)
        self.team_use[(run.team_id, run.family)] -= len(run.cores)
        self._slots.pop(run.family, None)
        return run

    def family_state(self, team_id: int, family: str) -> FamilyState:
        slots = self.slots(family)
        guaranteed, borrow = self.quotas.get((team_id, family), (0, 0))
        return FamilyState(guaranteed, borrow, self.team_use.get((team_id, family), 0),
                           sum(s.free for s in slots if not s.draining), sum(len(s.core_ids) for s in slots))

    def limit_running(self, family: str) -> list[Running]:
        """The family's running jobs with their time-limit ends (what reservations use)."""
        return [Running(r.job_id, r.team_id, r.family, r.host_id, r.cores, self.limit_end.get(r.job_id, r.end))
                for r in self.running.values() if r.family == family]


@dataclass
class PassResult:
    started: list[Running] = field(default_factory=list)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)  # job id -> reason code


POLICIES = ("easy", "greedy", "fifo")


def schedule_pass(order: list[Waiting], state: FleetState, now: float, policy: str = "easy") -> PassResult:
    """Start what may start now, in `order`, and say why the rest waits.

    - "easy": EASY backfill: the first job allowed by quota that finds no room in
      its family gets that family's reservation; later jobs of the family start
      only where backfill_spot allows (the dispatcher's rule);
    - "greedy": first fit, no reservation (the dispatcher before reservations);
    - "fifo": strict order per family: the first job of a family that cannot
      start blocks every later one of that family.
    A job held back by its team's quota blocks nothing (its cores would not be
    used by it anyway). Same (family, cores, fleet) searches are answered once."""
    result = PassResult()
    blocked: set[str] = set()
    failed: dict[tuple[str, int, bool], int] = {}  # (family, cores, masked) -> fleet version of a failed search
    version = 0
    for job in order:
        if job.family in blocked:
            result.reasons[job.job_id] = "fifo_blocked"
            continue
        if not state.unlimited:
            decision = check_dispatch("", job.family, job.cores, state.family_state(job.team_id, job.family))
            if not decision.ok:
                result.reasons[job.job_id] = decision.code
                continue
        reservation = result.reservations.get(job.family) if policy == "easy" else None
        key = (job.family, job.cores, reservation is not None)
        if failed.get(key) == version:
            spot = None
        elif reservation is None:
            spot = place(state.slots(job.family), job.family, job.cores)
        else:
            spot = backfill_spot(state.slots(job.family), job.family, job.cores, now + job.limit_s, reservation)
        if spot is None:
            failed[key] = version
            if reservation is not None:
                result.reasons[job.job_id] = "backfill_blocked"
                continue
            result.reasons[job.job_id] = "no_free_cores_of_family"
            if policy == "fifo":
                blocked.add(job.family)
            elif policy == "easy":
                held = reserve(job.job_id, job.family, job.cores, state.slots(job.family),
                               state.limit_running(job.family), now)
                if held is not None:
                    result.reservations[job.family] = held
            continue
        result.started.append(state.start(job, spot, now))
        version += 1
    return result


@dataclass(frozen=True)
class Forecast:
    start: float | None  # None: not within the horizon (or never, under the current quotas)
    reserved: bool  # the start is the job's own reservation at some point of the replay


def forecast(order: list[Waiting], state: FleetState, now: float, *, horizon_s: float = 30 * 86400,
             max_steps: int = 100_000) -> dict[int, Forecast]:
    """Replay the queue forward with schedule_pass ("easy") until every job has
    started: after each pass, time moves to the next expected end (Running.end).
    `state` is consumed. Runtimes come only from the Waiting and Running records the
    caller built (time limits corrected by history): this function never sees how
    long a job really runs. The order is kept as it is now (no new arrivals, no
    change of fair share as usage accrues)."""
    left = list(order)
    out: dict[int, Forecast] = {}
    reserved: set[int] = set()
    t, steps = now, 0
    while left and steps < max_steps and t - now <= horizon_s:
        steps += 1
        result = schedule_pass(left, state, t)
        reserved.update(r.job_id for r in result.reservations.values())
        if result.started:
            ids = {r.job_id for r in result.started}
            for r in result.started:
                out[r.job_id] = Forecast(t, r.job_id in reserved)
            left = [j for j in left if j.job_id not in ids]
        if not left or not state.running:
            break
        t_next = min(r.end for r in state.running.values())
        t = max(t_next, t)
        for job_id in [r.job_id for r in state.running.values() if r.end <= t]:
            state.finish(job_id)
    for job in left:
        out[job.job_id] = Forecast(None, job.job_id in reserved)
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

