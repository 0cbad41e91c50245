"""Pure quota policy: limits, usage and a request in; a decision with a reason code
and a sentence out. The admin pages only edit numbers; every rule lives here."""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import NamedTuple

from jobs.quotas.placement import HostSlots, Placement, place


def are_free(n: int) -> str:
    return f"{n} {'is' if n == 1 else 'are'} free"


def n_cores(n: int, family: str, adjective: str = "") -> str:
    """"1 trn1 core", "32 contiguous trn1 cores"."""
    return f"{n} {adjective}{family} core{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class Decision:
    ok: bool
    code: str = ""
    sentence: str = ""
    borrowed: bool = False  # admitted beyond the guarantee (may be preempted)
    field: str = ""  # the submitted field a submit-time refusal is about

    @classmethod
    def admit(cls, borrowed: bool = False) -> "Decision":
        return _ADMITTED[borrowed]  # immutable: one of each serves every admission


_ADMITTED = {False: Decision(True), True: Decision(True, borrowed=True)}


@dataclass(frozen=True)
class SubmitLimits:
    allowed_kinds: tuple[str, ...]
    max_pending: int
    monthly_core_hours: float
    max_runtime_s: int


@dataclass(frozen=True)
class SubmitState:
    pending: int
    core_hours_used: float


@dataclass(frozen=True)
class UserCap:
    """A user's hard cap in a team (UserBudget) and what counts against it: the month's
    NeuronCore-hours used, and the most the user's unfinished jobs may still use
    (cores x their remaining max runtime). Counting the unfinished jobs' worst case is
    what makes the cap hard: every admitted job, run to its time limit, fits."""

    user: str
    monthly_core_hours: float
    used: float
    reserved: float


def user_cap_decision(team: str, cap: UserCap, request_core_hours: float) -> Decision:
    """May this user add a job that may use up to `request_core_hours`?"""
    if cap.used >= cap.monthly_core_hours:
        return Decision(False, "user_budget_exhausted",
                        f"{cap.user} has used {cap.used:.1f} of their {cap.monthly_core_hours:g} NeuronCore-hours "
                        f"this month in team {team}")
    left = cap.monthly_core_hours - cap.used - cap.reserved
    if request_core_hours > left + 1e-9:
        return Decision(False, "user_budget_exceeded",
                        f"this job may use up to {request_core_hours:.1f} NeuronCore-hours (cores x max_runtime_s) "
                        f"but {cap.user} has {max(left, 0.0):.1f} left of their {cap.monthly_core_hours:g} this month "
                        f"in team {team} ({cap.used:.1f} used, {cap.reserved:.1f} held by their unfinished jobs); "
                        "ask for fewer cores or a shorter max_runtime_s")
    return Decision.admit()


def check_submit(team: str, kind: str, runtime_s: int, limits: SubmitLimits, state: SubmitState,
                 user_cap: UserCap | None = None, cores: int = 0) -> Decision:
    """Hard limits at submit time; a refusal becomes a 4xx with this code and sentence.
    With `user_cap`, the job (`cores` for up to `runtime_s`) must also fit the user's cap."""
    if limits.allowed_kinds and kind not in limits.allowed_kinds:
        allowed = ", ".join(limits.allowed_kinds)
        return Decision(False, "kind_not_allowed", f"team {team} may not run {kind} jobs (allowed: {allowed})")
    if state.core_hours_used >= limits.monthly_core_hours:
        return Decision(
            False, "budget_exhausted",
            f"team {team} has used {state.core_hours_used:.1f} of its {limits.monthly_core_hours:g} "
            "NeuronCore-hours this month",
        )
    if state.pending >= limits.max_pending:
        return Decision(False, "too_many_pending", f"team {team} already has {state.pending} pending jobs "
                        f"(limit {limits.max_pending})")
    if runtime_s > limits.max_runtime_s:
        return Decision(False, "runtime_too_long", f"max_runtime_s {runtime_s} is above team {team}'s limit "
                        f"of {limits.max_runtime_s} s")
    if user_cap is not None:
        return user_cap_decision(team, user_cap, cores * runtime_s / 3600.0)
    return Decision.admit()


class FamilyState(NamedTuple):
    """A team's standing in one family and the family's free cores, as admission
    sees them (a named tuple: a pass makes one per distinct request it judges)."""

    guaranteed: int
    borrow_limit: int
    in_use: int  # cores the team holds in this family now
    fleet_free: int  # free cores of the family in the fleet (non-draining hosts)
    fleet_total: int


def check_dispatch(team: str, family: str, cores: int, fam: FamilyState) -> Decision:
    """Concurrency at dispatch: may this team take `cores` more of `family` now?
    A refusal keeps the job pending with the reason."""
    after = fam.in_use + cores
    if after <= fam.guaranteed:
        return Decision.admit()
    if after <= fam.guaranteed + fam.borrow_limit:
        return Decision.admit(borrowed=True)
    if fam.borrow_limit:
        return Decision(
            False, "borrowing_limit_reached",
            f"needs {n_cores(cores, family)}; team {team} uses {fam.in_use} "
            f"({fam.guaranteed} guaranteed + {fam.borrow_limit} borrowable); {are_free(fam.fleet_free)} in the fleet",
        )
    if not fam.guaranteed:
        return Decision(
            False, "waiting_for_quota",
            f"needs {n_cores(cores, family)}; team {team} has no {family} cores guaranteed and may not borrow any; "
            f"{are_free(fam.fleet_free)} in the fleet",
        )
    return Decision(
        False, "waiting_for_quota",
        f"needs {n_cores(cores, family)}; team {team} uses {fam.in_use} of its {fam.guaranteed} guaranteed; "
        f"{are_free(fam.fleet_free)} in the fleet",
    )


def check_budget(team: str, core_hours_used: float, monthly_core_hours: float) -> Decision:
    """At dispatch: a team whose monthly NeuronCore-hours are spent starts nothing new
    (jobs already admitted keep waiting rather than being refused after the fact)."""
    if core_hours_used >= monthly_core_hours:
        return Decision(
            False, "budget_exhausted",
            f"team {team} has used {core_hours_used:.1f} of its {monthly_core_hours:g} NeuronCore-hours this month; "
            "the job waits until an admin raises the budget or the month ends",
        )
    return Decision.admit()


# --- preemption of borrowed cores ------------------------------------------------

@dataclass(frozen=True)
class Borrower:
    """A running or queued job of another team that holds cores beyond its guarantee."""

    job_id: int
    team_id: int
    host_id: int
    cores: tuple[int, ...]
    since: float  # when it got the cores (a timestamp); newest is preempted first


def choose_victims(hosts: list[HostSlots], family: str, cores: int,
                   borrowers: list[Borrower]) -> tuple[list[Borrower], Placement] | None:
    """Which borrowing jobs to preempt so that `cores` contiguous cores of `family`
    fit: newest first, just enough. Returns (victims, placement) or None when even
    preempting every borrower would not make room (then nobody is preempted).

    Borrowers are taken newest first until some host has a free run that long; the
    job goes on that host, so only that host's victims are kept, and a pruning pass
    spares each of them (oldest first) whose cores turn out not to be needed.
    Each step looks at one host only, so a dispatch run with many waiting jobs and
    many borrowers stays fast."""
    by_host = {h.host_id: h for h in hosts if h.family == family and not h.draining}
    candidates = [b for b in borrowers if b.host_id in by_host]
    if sum(len(b.cores) for b in candidates) + sum(h.free for h in by_host.values()) < cores:
        return None  # not enough cores even if every borrower went

    def fits(host: HostSlots, victims: list[Borrower]) -> Placement | None:
        freed = frozenset(c for v in victims for c in v.cores)
        return place([HostSlots(host.host_id, host.name, family, host.core_ids, host.used - freed)], family, cores)

    on_host: dict[int, list[Borrower]] = {}
    for victim in sorted(candidates, key=lambda b: (b.since, b.job_id), reverse=True):
        chosen = on_host.setdefault(victim.host_id, [])
        chosen.append(victim)
        host = by_host[victim.host_id]
        spot = fits(host, chosen)
        if spot is None:
            continue
        for spare in sorted(chosen, key=lambda b: (b.since, b.job_id)):
            rest = [c for c in chosen if c is not spare]
            trial = fits(host, rest)
            if trial is not None:
                chosen, spot = rest, trial
        return chosen, spot
    return None


def check_hosts(family: str, cores: int, fleet: list[HostSlots]) -> Decision:
    """Is there any online host of `family` that could hold the request at all?
    (`fleet`: the family's hosts that are not offline.)"""
    if not fleet:
        return Decision(False, "no_hosts_of_family", f"needs {n_cores(cores, family)}; no {family} host is online")
    large = [h for h in fleet if len(h.core_ids) >= cores]
    if large and all(h.draining for h in large):
        names = ", ".join(h.name for h in large[:3]) + (" …" if len(large) > 3 else "")
        return Decision(False, "host_draining",
                        f"needs {n_cores(cores, family)}; every {family} host large enough is draining ({names})")
    return Decision.admit()


def n_hosts(n: int, family: str, per_host: int) -> str:
    """"4 whole trn1 hosts of 32 cores"."""
    return f"{n} whole {family} host{'' if n == 1 else 's'} of {per_host} cores"


def check_gang_hosts(family: str, host_count: int, per_host: int, same_network: bool,
                     fleet: list[HostSlots]) -> Decision:
    """Could the fleet (the family's hosts that are not offline) ever hold this gang:
    `host_count` hosts with exactly `per_host` cores, inside one network label when
    `same_network`? Draining hosts count as there but unusable."""
    fitting = [h for h in fleet if len(h.core_ids) == per_host]
    need = n_hosts(host_count, family, per_host) + (" in one network" if same_network else "")
    groups: dict[str, list[HostSlots]] = {}
    for h in fitting:
        groups.setdefault(h.network if same_network else "", []).append(h)
    if same_network:
        groups.pop("", None)
    if not any(len(g) >= host_count for g in groups.values()):
        return Decision(False, "no_hosts_of_family",
                        f"needs {need}; only {len(fitting)} such host{'' if len(fitting) == 1 else 's'} "
                        + ("are online" if not same_network else "are online, "
                           f"at most {max((len(g) for g in groups.values()), default=0)} in one network"))
    if not any(sum(not h.draining for h in g) >= host_count for g in groups.values()):
        return Decision(False, "host_draining", f"needs {need}; too many of them are draining")
    return Decision.admit()


def check_gang_request(family: str, cores: int, host_count: int, same_network: bool,
                       fleet: list[HostSlots]) -> Decision:
    """Submit-time: could the registered hosts of `family` (`fleet`) ever hold this
    gang? A gang takes whole hosts, so `cores` must be host_count × one host size of
    the family, and there must be that many hosts of that size (in one network label
    when `same_network`). The refusal names the field to change."""
    if not fleet:
        return Decision(False, "no_hosts_of_family", f"no {family} host is registered; choose another family",
                        field="family")
    sizes = sorted({len(h.core_ids) for h in fleet})
    per_host, rest = divmod(cores, host_count)
    if rest or per_host not in sizes:
        options = ", ".join(f"{host_count} × {s} = {host_count * s}" for s in sizes)
        return Decision(False, "gang_whole_hosts", f"a job on {host_count} hosts takes whole {family} hosts: "
                        f"cores must be the host count times one host's cores ({options})", field="cores")
    fitting = [h for h in fleet if len(h.core_ids) == per_host]
    groups: dict[str, int] = {}
    for h in fitting:
        if h.network or not same_network:
            label = h.network if same_network else ""
            groups[label] = groups.get(label, 0) + 1
    most = max(groups.values(), default=0)
    if most < host_count:
        where = f", at most {most} of them in one network" if same_network else ""
        return Decision(False, "gang_too_large", f"only {len(fitting)} {family} host"
                        f"{'' if len(fitting) == 1 else 's'} with {per_host} cores {'is' if len(fitting) == 1 else 'are'}"
                        f" registered{where}; host_count {host_count} could never start", field="host_count")
    return Decision.admit()


NO_ROOM = "no_free_cores_of_family"  # the code of no_room and no_room_gang


def no_room_gang(family: str, host_count: int, per_host: int, same_network: bool, idle: int) -> Decision:
    """The quota allows the gang but not enough whole hosts are idle now."""
    return Decision(
        False, NO_ROOM,
        f"needs {n_hosts(host_count, family, per_host)}" + (" in one network" if same_network else "")
        + f", all free at once; {idle} such host{' is' if idle == 1 else 's are'} idle now",
    )


def no_room(team: str, family: str, cores: int, fam: FamilyState) -> Decision:
    """The quota allows the job but no host has a free contiguous run for it now."""
    if fam.fleet_free < cores:
        return Decision(
            False, NO_ROOM,
            f"needs {n_cores(cores, family)}; team {team} uses {fam.in_use} of its {fam.guaranteed} guaranteed"
            + (f" (+{fam.borrow_limit} borrowable)" if fam.borrow_limit else "")
            + f"; only {fam.fleet_free} of {fam.fleet_total} are free in the fleet",
        )
    return Decision(
        False, NO_ROOM,
        f"needs {n_cores(cores, family, 'contiguous ')}; {fam.fleet_free} of {fam.fleet_total} are free in the fleet "
        "but no host has a free run that long",
    )


# Waiting reasons whose sentence holds figures that move with every placement and
# every finished job (the team's cores in use, the family's free cores, its idle
# hosts). The dispatcher stores such a reason when its code changes, not on every
# pass (rewriting thousands of waiting jobs whose count moved by one is most of a
# busy pass); the pages and the API show it with the figures as they are when read
# (waiting_sentence, over jobs.lifecycle.selectors.live_reasons' reads).
LIVE_REASONS = frozenset({"waiting_for_quota", "borrowing_limit_reached", "no_free_cores_of_family"})


def waiting_sentence(code: str, team: str, family: str, cores: int, host_count: int, same_network: bool,
                     fam: FamilyState, idle_hosts: int) -> str | None:
    """The sentence of a LIVE_REASONS code over the figures as they are now (`fam`;
    `idle_hosts`: idle non-draining hosts of the family with a gang rank's size), as
    the dispatcher's pass would word it. None when the figures no longer give that
    code (the next pass decides again; the stored sentence stands until then)."""
    if code == "no_free_cores_of_family":
        if host_count > 1:
            return no_room_gang(family, host_count, cores // host_count, same_network, idle_hosts).sentence
        return no_room(team, family, cores, fam).sentence
    if code in ("waiting_for_quota", "borrowing_limit_reached"):
        decision = check_dispatch(team, family, cores, fam)
        return decision.sentence if decision.code == code else None
    return None


def backfill_blocked(family: str, cores: int, limit_s: float, head_job: int, start_in_s: float) -> Decision:
    """Room exists now, but only on cores reserved for the head of the queue, and the
    job's time limit would run past the reserved start (EASY backfill)."""
    length = "with no time limit" if math.isinf(limit_s) else f"for up to {_duration(limit_s)}"
    return Decision(
        False, "backfill_blocked",
        f"needs {n_cores(cores, family)} {length}; the free cores that fit it are reserved "
        f"for job #{head_job}, which starts within {_duration(start_in_s)} at the latest; a shorter time limit "
        "could start it now",
    )


def draining_victims(family: str, cores: int, jobs: tuple[int, ...], within_s: float) -> Decision:
    """The job preempted borrowers for its guarantee, and they are draining (endpoint
    replicas finishing their requests): it starts once they have stopped."""
    which = ", ".join(f"#{j}" for j in jobs) or "?"
    return Decision(
        False, "preempting",
        f"needs {n_cores(cores, family)} of its team's guarantee, held by borrowing job{'s' if len(jobs) > 1 else ''} "
        f"{which}; {'they are' if len(jobs) > 1 else 'it is'} finishing {'their' if len(jobs) > 1 else 'its'} "
        f"requests and stopping (within {_duration(within_s)}), then this job gets the cores",
    )


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


# What each waiting reason means for the user, and what ends the wait.
REASON_HINTS: dict[str, str] = {
    "submitted": "The scheduler has not looked at it yet; it does within seconds.",
    "waiting_for_quota": "The team is using its guaranteed cores of this family and may not borrow more. "
                         "It starts when an admin raises the guarantee, when one of the team's jobs ends, or, for "
                         "cores held by the team's inference-endpoint replicas (which have no time limit), when "
                         "those are scaled down or stopped.",
    "borrowing_limit_reached": "The team already borrows as many idle cores beyond its guarantee as it may. "
                               "It starts when an admin raises the limit, when one of the team's jobs ends, or, for "
                               "cores held by the team's inference-endpoint replicas (which have no time limit), "
                               "when those are scaled down or stopped.",
    "no_free_cores_of_family": "The team's quota allows it, but no host has that many free cores in a row "
                               "right now. It starts when other jobs end, or, for cores held by inference-endpoint "
                               "replicas (which have no time limit), when those are scaled down or stopped.",
    "backfill_blocked": "Smaller jobs may use cores reserved for the job at the head of the queue only if they end "
                        "before it starts. It starts when other cores free up, or at once with a shorter time limit.",
    "budget_exhausted": "The team has spent this month's NeuronCore-hours. It starts when an admin raises the "
                        "budget or the next month begins.",
    "host_draining": "Every host that could hold it is being drained for maintenance. It starts when one is "
                     "back online.",
    "no_hosts_of_family": "No host of this instance family is online. It starts when one registers.",
    "preempting": "The cores it needs are guaranteed to its team but borrowed by another team's endpoint "
                  "replica, which was asked to stop: it takes no new requests and finishes those in progress. "
                  "It starts as soon as that replica has stopped.",
    "preempted": "Its cores were taken back by the team they are guaranteed to. It runs again when cores are free.",
    "worker_lost": "Its worker stopped responding; it was put back in the queue and runs again.",
    "retry": "Its last attempt crashed; it was put back in the queue and runs again.",
    "time_limit": "Its last attempt reached the time limit and saved a checkpoint; it was put back in the queue "
                  "and resumes from that checkpoint.",
}
