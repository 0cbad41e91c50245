"""Pure NeuronCore placement: contiguous ranges, best fit, no core held twice."""
import random

from jobs.quotas.placement import HostSlots, alignment, core_range, free_runs, largest_request, place


def host(host_id, cores=32, used=(), family="trn1", draining=False):
    return HostSlots(host_id, f"h{host_id}", family, tuple(range(cores)), frozenset(used), draining)


def test_free_runs_are_maximal_consecutive_free_cores():
    assert free_runs(host(1, 8, used={2, 3, 6})) == [(0, 2), (4, 2), (7, 1)]


def test_it_places_on_a_contiguous_range():
    spot = place([host(1, 8, used={0, 1, 5})], "trn1", 2)
    # Free runs are 2-4 (three cores) and 6-7 (two): best fit takes the run that fits exactly.
    assert (spot.core_start, spot.cores) == (6, 2)


def test_best_fit_keeps_large_runs_for_large_requests():
    # h1 has a hole of exactly 2; h2 is empty. A 2-core job goes into the hole so
    # that h2 stays whole for a 32-core request.
    hosts = [host(1, 32, used=set(range(0, 30))), host(2, 32)]
    small = place(hosts, "trn1", 2)
    assert (small.host_id, small.core_start) == (1, 30)
    assert place(hosts, "trn1", 32).host_id == 2


def test_it_never_places_on_a_draining_host_or_another_family():
    assert place([host(1, draining=True)], "trn1", 1) is None
    assert place([host(1, family="inf2")], "trn1", 1) is None


def test_fragmented_free_cores_do_not_fit_a_contiguous_request():
    hosts = [host(1, 8, used={1, 3, 5, 7})]
    assert place(hosts, "trn1", 2) is None
    assert place(hosts, "trn1", 1) is not None


def test_largest_request_ignores_current_use():
    assert largest_request([host(1, 32, used={0}), host(2, 2, family="trn1")], "trn1") == 32
    assert largest_request([], "trn1") == 0


def test_random_placements_never_overlap():
    rng = random.Random(7)
    used = {1: set(), 2: set()}
    held = []
    for _ in range(300):
        if held and rng.random() < 0.4:
            host_id, start, n = held.pop(rng.randrange(len(held)))
            used[host_id] -= set(range(start, start + n))
            continue
        n = rng.choice([1, 2, 4, 8, 16])
        hosts = [host(h, 32, used=frozenset(u)) for h, u in used.items()]
        spot = place(hosts, "trn1", n)
        if spot is None:
            # trn1 groups of 2 and 8 start at a multiple of their size.
            align = n if n in (2, 8) else 1
            assert all(not any(set(range(s, s + n)) <= set(range(start, start + length))
                               for start, length in free_runs(h) for s in range(0, 32, align)) for h in hosts)
            continue
        cores = set(range(spot.core_start, spot.core_start + n))
        assert not cores & used[spot.host_id] and max(cores) < 32
        assert n not in (2, 8) or spot.core_start % n == 0
        used[spot.host_id] |= cores
        held.append((spot.host_id, spot.core_start, n))


def test_core_range_is_the_neuron_rt_visible_cores_form():
    assert core_range(4, 1) == "4" and core_range(0, 8) == "0-7"


def test_trn1_collective_groups_start_at_a_multiple_of_their_size():
    # Free cores 1-7: a 2-core group goes to 2-3 (not 1-2), an 8-core group does not fit.
    hosts = [host(1, 8, used={0})]
    assert place(hosts, "trn1", 2).core_start == 2
    assert place(hosts, "trn1", 8) is None
    assert place(hosts, "trn1", 4).core_start == 1  # not a collective size: unaligned best fit
    assert place([host(1, 32, used={0})], "trn1", 8).core_start == 8
    assert place([host(1, 32, used=set(range(0, 16)))], "trn1", 32) is None


def test_other_families_are_not_aligned():
    assert place([host(1, 8, used={0}, family="inf2")], "inf2", 2).core_start == 1
    assert alignment("trn1", 8) == 8 and alignment("trn1", 4) == 1 and alignment("trn2", 8) == 1
