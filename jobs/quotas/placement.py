"""Pure NeuronCore placement: which host and which contiguous core range.

Neuron requires a job's cores to be a contiguous set (NEURON_RT_VISIBLE_CORES takes
a range; neuron.md §5.2 "Neuron cores are not contiguous"). We place best-fit: the
smallest free run that holds the request, preferring hosts that are already busy,
so large requests are not starved by fragments spread across the fleet.

A gang (a multi-host job, host_count > 1) takes N whole hosts: idle, not draining,
of its family and exactly cores // N cores each, inside one network label
(Host.network: a placement group / EFA domain) when it asks for that. Among the
choices it takes hosts from the label with the fewest idle hosts that still fits, so
large idle groups stay whole for larger gangs (best fit on groups, as for cores).

On trn1 a group of 2, 8 or 32 cores starts at a core id that is a multiple of its
size: collectives run best on such aligned groups [SDK
archive/nxd-training/torch-neuron-envvars.rst, neuron.md §4.3]. Placement does not
know the job's kind, so every trn1 request of those sizes is aligned; submit
refuses trn1 fine-tunes of other sizes (neuron_workers.backends.neuron_matrix).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True)
class HostSlots:
    host_id: int
    name: str
    family: str
    core_ids: tuple[int, ...]
    used: frozenset[int] = field(default_factory=frozenset)
    draining: bool = False
    network: str = ""  # placement-group / EFA-domain label; "" = none

    @property
    def idle(self) -> bool:
        return not self.used and not self.draining

    @cached_property
    def free(self) -> int:
        return len(self.core_ids) - len(self.used)

    @cached_property
    def runs(self) -> list[tuple[int, int]]:
        """free_runs(self), computed once (a HostSlots never changes)."""
        return free_runs(self)


@dataclass(frozen=True)
class Placement:
    host_id: int
    core_start: int
    cores: int


def free_runs(host: HostSlots) -> list[tuple[int, int]]:
    """Maximal runs of consecutive free core ids as (start, length)."""
    runs: list[tuple[int, int]] = []
    start, length, prev = None, 0, None
    for core in sorted(host.core_ids):
        if core in host.used:
            if start is not None:
                runs.append((start, length))
            start, length, prev = None, 0, None
            continue
        if start is not None and prev is not None and core == prev + 1:
            length += 1
        else:
            if start is not None:
                runs.append((start, length))
            start, length = core, 1
        prev = core
    if start is not None:
        runs.append((start, length))
    return runs


TRN1_ALIGNED_SIZES = (2, 8, 32)


def alignment(family: str, cores: int) -> int:
    """The multiple a request's first core must be: its size for trn1 groups of 2, 8 or 32."""
    return cores if family == "trn1" and cores in TRN1_ALIGNED_SIZES else 1


def place(hosts: list[HostSlots], family: str, cores: int) -> Placement | None:
    """Best-fit contiguous placement on a non-draining host of `family`, or None."""
    align = alignment(family, cores)
    best: tuple[tuple, Placement] | None = None
    for host in hosts:
        if host.family != family or host.draining or host.free < cores:
            continue
        for run_start, length in host.runs:
            start = -(-run_start // align) * align  # the run's first aligned core
            if start + cores > run_start + length:
                continue
            # Smallest fitting run first, then the busiest host, then the lowest core.
            score = (length, host.free, host.host_id, start)
            if best is None or score < best[0]:
                best = (score, Placement(host.host_id, start, cores))
    return best[1] if best else None


def place_gang(hosts: list[HostSlots], family: str, host_count: int, per_host: int,
               same_network: bool = False) -> tuple[Placement, ...] | None:
    """`host_count` whole idle hosts of `family` with exactly `per_host` cores each
    (all of them, from core 0), rank 0 first; inside one network label when
    `same_network` (hosts without a label never qualify then). None if they are not
    all free now."""
    groups: dict[str, list[HostSlots]] = {}
    for host in hosts:
        if host.family == family and host.idle and len(host.core_ids) == per_host:
            groups.setdefault(host.network, []).append(host)
    if same_network:
        fits = [(len(g), label) for label, g in groups.items() if label and len(g) >= host_count]
        if not fits:
            return None
        chosen = sorted(groups[min(fits)[1]], key=lambda h: h.host_id)[:host_count]
    else:
        # Smallest idle groups first: keeps large idle groups whole for gangs that need one label.
        pool = sorted((h for g in groups.values() for h in g),
                      key=lambda h: (len(groups[h.network]), h.network, h.host_id))
        if len(pool) < host_count:
            return None
        chosen = pool[:host_count]
    return tuple(Placement(h.host_id, min(h.core_ids), per_host) for h in chosen)


def gang_hosts(hosts: list[HostSlots], family: str, per_host: int) -> list[HostSlots]:
    """The hosts that could ever take one rank of a gang of `family` with `per_host` cores."""
    return [h for h in hosts if h.family == family and len(h.core_ids) == per_host]


def place_job(hosts: list[HostSlots], family: str, cores: int, host_count: int = 1,
              same_network: bool = False) -> tuple[Placement, ...] | None:
    """Where a job (one host, or a gang of `host_count` whole hosts holding `cores`
    in all) may start now: one Placement per rank, or None."""
    if host_count > 1:
        return place_gang(hosts, family, host_count, cores // host_count, same_network)
    spot = place(hosts, family, cores)
    return (spot,) if spot is not None else None


def largest_request(hosts: list[HostSlots], family: str) -> int:
    """The largest contiguous request any (non-offline) host of `family` could ever hold."""
    sizes = [max((n for _, n in free_runs(HostSlots(h.host_id, h.name, h.family, h.core_ids))), default=0)
             for h in hosts if h.family == family]
    return max(sizes, default=0)


def core_range(start: int, count: int) -> str:
    return str(start) if count == 1 else f"{start}-{start + count - 1}"
