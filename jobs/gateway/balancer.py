"""Least outstanding requests among an endpoint's ready replicas. Pure: no I/O.

One Balancer per gateway process; it counts what this process has in flight on
each replica (the gateway is the only way in, so that is the replica's load) and
picks the replica with the fewest, skipping those at the endpoint's max_concurrent
and those this request already tried."""
from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    replica_id: int
    url: str


class Balancer:
    def __init__(self) -> None:
        self.outstanding: defaultdict[int, int] = defaultdict(int)  # replica id -> requests in flight
        self.freed = asyncio.Event()  # set whenever a request finishes (waiters for capacity re-check)

    def choose(self, targets: Iterable[Target], *, max_concurrent: int | None,
               exclude: set[int] = frozenset()) -> Target | None:
        """The least loaded target with room, ties to the first listed; None if all are
        full or excluded."""
        best: Target | None = None
        for target in targets:
            if target.replica_id in exclude:
                continue
            load = self.outstanding[target.replica_id]
            if max_concurrent is not None and load >= max_concurrent:
                continue
            if best is None or load < self.outstanding[best.replica_id]:
                best = target
        return best

    def acquire(self, target: Target) -> None:
        self.outstanding[target.replica_id] += 1

    def release(self, target: Target) -> None:
        left = self.outstanding[target.replica_id] - 1
        if left > 0:
            self.outstanding[target.replica_id] = left
        else:
            self.outstanding.pop(target.replica_id, None)
        self.freed.set()
        self.freed = asyncio.Event()
