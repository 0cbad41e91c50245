"""Pure quota policy: limits, usage and a request in; a decision with a reason code
and a sentence out. The admin pages only edit numbers; every rule lives here."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    ok: bool
    code: str = ""
    sentence: str = ""
    borrowed: bool = False  # admitted beyond the guarantee (may be preempted)

    @classmethod
    def admit(cls, borrowed: bool = False) -> "Decision":
        return cls(True, borrowed=borrowed)


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


def check_submit(team: str, kind: str, runtime_s: int, limits: SubmitLimits, state: SubmitState) -> Decision:
    """Hard limits at submit time; a refusal becomes a 4xx with this code and sentence."""
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
    return Decision.admit()


@dataclass(frozen=True)
class FamilyState:
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
            f"needs {cores} {family} cores; team {team} uses {fam.in_use} "
            f"({fam.guaranteed} guaranteed + {fam.borrow_limit} borrowable); {fam.fleet_free} are free in the fleet",
        )
    return Decision(
        False, "waiting_for_quota",
        f"needs {cores} {family} cores; team {team} uses {fam.in_use} of its {fam.guaranteed} guaranteed; "
        f"{fam.fleet_free} are free in the fleet",
    )
