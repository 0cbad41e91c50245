"""The pure quota policy (jobs.quotas.policy) on its own: limits, usage and a request
in, a decision with a reason code and a sentence out. No database: every case is
built from plain values, including the edges at exactly the limit."""
from __future__ import annotations

import pytest

from jobs.quotas.placement import HostSlots, Placement
from jobs.quotas.policy import (
    Borrower,
    Decision,
    FamilyState,
    SubmitLimits,
    SubmitState,
    check_budget,
    check_dispatch,
    check_hosts,
    check_submit,
    choose_victims,
    no_room,
)

LIMITS = SubmitLimits(allowed_kinds=(), max_pending=10, monthly_core_hours=100.0, max_runtime_s=3600)
WITHIN = SubmitState(pending=0, core_hours_used=0.0)


def host(host_id: int, cores: int, used=(), *, family: str = "trn1", draining: bool = False,
         name: str | None = None) -> HostSlots:
    return HostSlots(host_id, name or f"h{host_id}", family, tuple(range(cores)), frozenset(used), draining)


def borrower(job_id: int, host_id: int, cores, since: float, team_id: int = 2) -> Borrower:
    return Borrower(job_id, team_id, host_id, tuple(cores), since)


# --- check_submit: hard limits at submit ----------------------------------------------

def test_a_submit_within_every_limit_is_admitted():
    assert check_submit("vision", "inference", 60, LIMITS, WITHIN) == Decision(True)


def test_a_kind_the_team_may_not_run_is_refused_naming_the_allowed_ones():
    limits = SubmitLimits(("inference", "compile"), 10, 100.0, 3600)
    decision = check_submit("vision", "finetune", 60, limits, WITHIN)
    assert (decision.ok, decision.code) == (False, "kind_not_allowed")
    assert decision.sentence == "team vision may not run finetune jobs (allowed: inference, compile)"


def test_an_empty_allowed_kinds_list_allows_every_kind():
    for kind in ("inference", "compile", "finetune"):
        assert check_submit("vision", kind, 60, LIMITS, WITHIN).ok


def test_a_budget_used_up_exactly_refuses_the_submit():
    decision = check_submit("vision", "inference", 60, LIMITS, SubmitState(0, 100.0))
    assert (decision.ok, decision.code) == (False, "budget_exhausted")
    assert decision.sentence == "team vision has used 100.0 of its 100 NeuronCore-hours this month"


def test_a_budget_just_short_of_used_up_admits_the_submit():
    assert check_submit("vision", "inference", 60, LIMITS, SubmitState(0, 99.99)).ok


def test_a_fractional_budget_is_shown_as_given():
    limits = SubmitLimits((), 10, 1.5, 3600)
    assert check_submit("vision", "inference", 60, limits, SubmitState(0, 2.04)).sentence == (
        "team vision has used 2.0 of its 1.5 NeuronCore-hours this month")


def test_the_pending_limit_refuses_the_submit_that_would_exceed_it():
    decision = check_submit("vision", "inference", 60, LIMITS, SubmitState(10, 0.0))
    assert (decision.ok, decision.code) == (False, "too_many_pending")
    assert decision.sentence == "team vision already has 10 pending jobs (limit 10)"
    assert check_submit("vision", "inference", 60, LIMITS, SubmitState(9, 0.0)).ok


def test_a_runtime_at_the_limit_is_admitted_and_one_second_more_is_refused():
    assert check_submit("vision", "inference", 3600, LIMITS, WITHIN).ok
    decision = check_submit("vision", "inference", 3601, LIMITS, WITHIN)
    assert (decision.ok, decision.code) == (False, "runtime_too_long")
    assert decision.sentence == "max_runtime_s 3601 is above team vision's limit of 3600 s"


def test_submit_limits_are_checked_kind_then_budget_then_pending_then_runtime():
    limits = SubmitLimits(("inference",), 1, 1.0, 60)
    over_all = SubmitState(pending=5, core_hours_used=5.0)
    assert check_submit("vision", "compile", 120, limits, over_all).code == "kind_not_allowed"
    assert check_submit("vision", "inference", 120, limits, over_all).code == "budget_exhausted"
    assert check_submit("vision", "inference", 120, limits, SubmitState(5, 0.0)).code == "too_many_pending"
    assert check_submit("vision", "inference", 120, limits, SubmitState(0, 0.0)).code == "runtime_too_long"


# --- check_dispatch: the team's guaranteed and borrowable cores -----------------------

def fam(guaranteed: int, borrow: int, in_use: int, free: int = 8, total: int = 32) -> FamilyState:
    return FamilyState(guaranteed, borrow, in_use, free, total)


def test_a_job_that_fills_the_guarantee_exactly_is_admitted_without_borrowing():
    assert check_dispatch("vision", "trn1", 8, fam(16, 4, 8)) == Decision(True, borrowed=False)


def test_a_job_beyond_the_guarantee_is_admitted_as_borrowing():
    assert check_dispatch("vision", "trn1", 9, fam(16, 4, 8)) == Decision(True, borrowed=True)


def test_a_job_that_reaches_the_borrowing_limit_exactly_is_admitted_as_borrowing():
    assert check_dispatch("vision", "trn1", 12, fam(16, 4, 8)) == Decision(True, borrowed=True)


def test_one_core_past_the_borrowing_limit_waits_with_both_numbers():
    decision = check_dispatch("vision", "trn1", 13, fam(16, 4, 8))
    assert (decision.ok, decision.code) == (False, "borrowing_limit_reached")
    assert decision.sentence == ("needs 13 trn1 cores; team vision uses 8 (16 guaranteed + 4 borrowable); "
                                 "8 are free in the fleet")


def test_a_team_with_no_guarantee_and_no_borrowing_waits_for_quota():
    decision = check_dispatch("vision", "cpu", 1, fam(0, 0, 0, free=1))
    assert (decision.ok, decision.code) == (False, "waiting_for_quota")
    assert decision.sentence == ("needs 1 cpu core; team vision has no cpu cores guaranteed and may not borrow any; "
                                 "1 is free in the fleet")


def test_a_team_past_its_guarantee_without_borrowing_waits_for_quota_with_its_use():
    decision = check_dispatch("vision", "trn1", 32, fam(32, 0, 24, free=4))
    assert (decision.ok, decision.code) == (False, "waiting_for_quota")
    assert decision.sentence == "needs 32 trn1 cores; team vision uses 24 of its 32 guaranteed; 4 are free in the fleet"


def test_a_team_with_only_a_borrowing_limit_borrows_up_to_it():
    assert check_dispatch("vision", "cpu", 2, fam(0, 2, 0)) == Decision(True, borrowed=True)
    assert check_dispatch("vision", "cpu", 1, fam(0, 2, 2)).code == "borrowing_limit_reached"


# --- check_budget: at dispatch --------------------------------------------------------

def test_a_team_below_its_budget_starts_jobs():
    assert check_budget("vision", 1.49, 1.5) == Decision(True)


def test_a_team_exactly_at_its_budget_starts_nothing():
    decision = check_budget("vision", 1.5, 1.5)
    assert (decision.ok, decision.code) == (False, "budget_exhausted")
    assert decision.sentence == ("team vision has used 1.5 of its 1.5 NeuronCore-hours this month; "
                                 "the job waits until an admin raises the budget or the month ends")


def test_a_zero_budget_starts_nothing():
    assert check_budget("vision", 0.0, 0).code == "budget_exhausted"


# --- check_hosts: can any online host hold the request? -------------------------------

def test_no_host_of_the_family_online():
    decision = check_hosts("trn2", 8, [])
    assert (decision.ok, decision.code) == (False, "no_hosts_of_family")
    assert decision.sentence == "needs 8 trn2 cores; no trn2 host is online"


def test_every_host_large_enough_draining_names_them():
    fleet = [host(1, 32, draining=True, name="trn-a"), host(2, 8, name="trn-small")]
    decision = check_hosts("trn1", 16, fleet)
    assert (decision.ok, decision.code) == (False, "host_draining")
    assert decision.sentence == "needs 16 trn1 cores; every trn1 host large enough is draining (trn-a)"


def test_a_draining_host_list_shows_three_names_and_an_ellipsis():
    fleet = [host(i, 32, draining=True, name=f"trn-{i}") for i in range(1, 5)]
    assert check_hosts("trn1", 1, fleet).sentence == (
        "needs 1 trn1 core; every trn1 host large enough is draining (trn-1, trn-2, trn-3 …)")


def test_a_host_exactly_as_large_as_the_request_counts_as_large_enough():
    assert check_hosts("trn1", 32, [host(1, 32), host(2, 64, draining=True)]).ok
    assert check_hosts("trn1", 32, [host(1, 32, draining=True), host(2, 31)]).code == "host_draining"


def test_one_large_enough_host_online_admits_even_if_it_is_busy():
    assert check_hosts("trn1", 16, [host(1, 32, used=range(32)), host(2, 32, draining=True)]).ok


def test_hosts_too_small_for_the_request_are_not_a_draining_reason():
    # Capacity beyond any host is refused at submit; here nothing is "draining".
    assert check_hosts("trn1", 64, [host(1, 32, draining=True)]).ok


# --- no_room: admitted by quota, but no free contiguous run ---------------------------

def test_no_room_when_too_few_cores_are_free_says_how_many():
    decision = no_room("vision", "cpu", 2, fam(8, 0, 4, free=0, total=4))
    assert (decision.ok, decision.code) == (False, "no_free_cores_of_family")
    assert decision.sentence == ("needs 2 cpu cores; team vision uses 4 of its 8 guaranteed; "
                                 "only 0 of 4 are free in the fleet")


def test_no_room_mentions_the_borrowable_cores_when_there_are_some():
    assert no_room("vision", "trn1", 4, fam(8, 4, 10, free=3, total=64)).sentence == (
        "needs 4 trn1 cores; team vision uses 10 of its 8 guaranteed (+4 borrowable); only 3 of 64 are free in the fleet")


def test_no_room_with_enough_free_cores_blames_fragmentation():
    decision = no_room("vision", "cpu", 2, fam(8, 0, 2, free=2, total=4))
    assert (decision.ok, decision.code) == (False, "no_free_cores_of_family")
    assert decision.sentence == ("needs 2 contiguous cpu cores; 2 of 4 are free in the fleet "
                                 "but no host has a free run that long")


# --- choose_victims: preempting borrowed cores ----------------------------------------

def test_victims_are_the_newest_borrowers_just_enough():
    slots = [host(1, 4, used=range(4), family="cpu")]
    borrowers = [borrower(10 + i, 1, [i], since=float(i)) for i in range(4)]
    victims, spot = choose_victims(slots, "cpu", 2, borrowers)
    assert sorted(v.job_id for v in victims) == [12, 13]
    assert spot == Placement(1, 2, 2)


def test_free_cores_count_before_anyone_is_preempted():
    slots = [host(1, 4, used=[0, 1, 2], family="cpu")]
    borrowers = [borrower(10 + i, 1, [i], since=float(i)) for i in range(3)]
    victims, spot = choose_victims(slots, "cpu", 2, borrowers)
    assert [v.job_id for v in victims] == [12] and spot == Placement(1, 2, 2)


def test_an_older_borrower_is_spared_when_the_newest_suffice_after_pruning():
    # The newest borrower sits on core 0, which does not help a 2-core run at 2-3;
    # it is taken first, then spared by the pruning pass.
    slots = [host(1, 4, used=range(4), family="cpu")]
    borrowers = [borrower(20, 1, [0], since=3.0), borrower(21, 1, [2, 3], since=2.0), borrower(22, 1, [1], since=1.0)]
    victims, spot = choose_victims(slots, "cpu", 2, borrowers)
    assert [v.job_id for v in victims] == [21] and spot == Placement(1, 2, 2)


def test_nobody_is_preempted_when_every_borrower_together_would_not_make_room():
    slots = [host(1, 4, used=range(4), family="cpu")]
    borrowers = [borrower(10, 1, [0], since=1.0), borrower(11, 1, [1], since=2.0)]
    assert choose_victims(slots, "cpu", 3, borrowers) is None


def test_exactly_enough_borrowed_and_free_cores_make_room():
    slots = [host(1, 4, used=[0, 1, 2], family="cpu")]
    borrowers = [borrower(10, 1, [0, 1, 2], since=1.0)]
    victims, spot = choose_victims(slots, "cpu", 4, borrowers)
    assert [v.job_id for v in victims] == [10] and spot == Placement(1, 0, 4)


def test_borrowers_on_draining_hosts_or_of_another_family_are_never_victims():
    slots = [host(1, 2, used=range(2), family="cpu", draining=True), host(2, 2, used=range(2), family="trn1")]
    borrowers = [borrower(10, 1, [0, 1], since=1.0), borrower(11, 2, [0, 1], since=2.0)]
    assert choose_victims(slots, "cpu", 1, borrowers) is None


def test_victims_come_from_the_one_host_the_job_goes_to():
    slots = [host(1, 2, used=range(2), family="cpu"), host(2, 2, used=range(2), family="cpu")]
    borrowers = [borrower(10, 1, [0], since=4.0), borrower(11, 2, [0], since=3.0),
                 borrower(12, 1, [1], since=2.0), borrower(13, 2, [1], since=1.0)]
    victims, spot = choose_victims(slots, "cpu", 2, borrowers)
    assert sorted(v.job_id for v in victims) == [10, 12] and spot == Placement(1, 0, 2)


def test_ties_in_age_are_broken_by_job_id_newest_first():
    slots = [host(1, 2, used=range(2), family="cpu")]
    borrowers = [borrower(10, 1, [0], since=1.0), borrower(11, 1, [1], since=1.0)]
    victims, _ = choose_victims(slots, "cpu", 1, borrowers)
    assert [v.job_id for v in victims] == [11]


@pytest.mark.parametrize("cores", [1, 2, 3, 4])
def test_victims_free_a_contiguous_run_of_the_size_asked(cores):
    slots = [host(1, 4, used=range(4), family="cpu")]
    borrowers = [borrower(10 + i, 1, [i], since=float(i)) for i in range(4)]
    victims, spot = choose_victims(slots, "cpu", cores, borrowers)
    freed = {c for v in victims for c in v.cores}
    assert len(victims) == cores and set(range(spot.core_start, spot.core_start + cores)) == freed
