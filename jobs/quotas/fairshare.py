"""Pure fair-share ordering of the pending queue (no Django, no database).

The dispatcher and the "why is my job waiting" page both call `fair_order`, so the
position a user is shown is the order the scheduler works in.

Order, in the spirit of Slurm's fair-share factor and KAI's priority by job kind:

1. kind priority (higher first; admins set it per kind);
2. fair share: the team whose decayed recent usage, divided by its share, is lowest
   goes next. Usage decays exponentially with a half-life, so last month's big run
   weighs little today;
3. submission order.

A starvation guard comes before all three: a job pending since before
`overdue_before` (the dispatcher passes now - settings.SCHED_OVERDUE_AFTER_H) goes
ahead of every job that is not, oldest first. Fair share alone can keep a job
behind forever while less-served teams keep submitting; once it is first, the EASY
reservation (jobs.quotas.backfill) bounds the rest of its wait - what makes a large
gang's wait bounded at all.

A burst from one team cannot jump the queue: every job the order hands out charges
its team `cores × charge_s / share` core-seconds of *expected* usage before the next
pick, so a team's 100 jobs interleave with the other teams' jobs instead of taking
the first 100 places (Slurm would only notice the burst after it had run).
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from datetime import datetime
from typing import Iterable, NamedTuple, Sequence

# A dispatch run orders (and decides for) the oldest this many pending jobs, by id;
# newer ones are looked at once older ones have left the queue. The fleet simulator
# applies the same cap to its passes.
PENDING_SCAN = 5000


class QueueItem(NamedTuple):
    """One pending job as the ordering sees it (a named tuple: the dispatcher makes
    one per pending job on every run)."""

    job_id: int
    team_id: int
    priority: int  # the job's kind priority (higher goes first)
    cores: int
    family: str = ""
    submitted: datetime | None = None  # tie-break before job_id; None sorts by job_id only


def decay_weight(age_s: float, half_life_s: float) -> float:
    """Weight of usage that is `age_s` old: 1 now, 1/2 one half-life ago."""
    if half_life_s <= 0:
        return 1.0
    return 0.5 ** (max(age_s, 0.0) / half_life_s)


def decayed_usage(buckets: Iterable[tuple[int, datetime, float]], now: datetime,
                  half_life_s: float) -> dict[int, float]:
    """Σ core_seconds × 2^(−age / half_life) per team.

    `buckets` are (team_id, when, core_seconds): usage accrued around `when` (an
    hour bucket's middle, or "now" for attempts still holding cores)."""
    usage: dict[int, float] = defaultdict(float)
    weights: dict[datetime, float] = {}  # every team's bucket of an hour or a day has the same weight
    for team_id, when, core_seconds in buckets:
        weight = weights.get(when)
        if weight is None:
            weight = weights[when] = decay_weight((now - when).total_seconds(), half_life_s)
        usage[team_id] += (core_seconds or 0.0) * weight
    return dict(usage)


def _arrival(item: QueueItem) -> tuple:
    return (item.submitted is None, item.submitted or datetime.min, item.job_id)


def fair_order(items: Sequence[QueueItem], usage: dict[int, float], shares: dict[int, float],
               charge_s: float, *, overdue_before: datetime | None = None) -> list[QueueItem]:
    """The pending queue in dispatch order (see the module docstring).

    `usage`: decayed core-seconds per team (missing = 0); `shares`: fair-share weight
    per team (missing or ≤ 0 = 1); `charge_s`: expected core-seconds charged per
    core of every job handed out, which is what interleaves bursts;
    `overdue_before`: the starvation guard's line. O(n log teams)."""
    if overdue_before is not None:
        overdue = [i for i in items if i.submitted is not None and i.submitted < overdue_before]
        if overdue:
            late = {i.job_id for i in overdue}
            return sorted(overdue, key=_arrival) + fair_order([i for i in items if i.job_id not in late], usage,
                                                              shares, charge_s)
    # Each item's arrival is computed once; every team's queue is a list of indexes
    # into `items` in arrival order, served from `served[team]` on.
    arrivals = [_arrival(item) for item in items]
    by_priority: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for k in sorted(range(len(items)), key=arrivals.__getitem__):
        item = items[k]
        by_priority[item.priority][item.team_id].append(k)
    key: dict[int, float] = {}
    weights: dict[int, float] = {}

    def share(team_id: int) -> float:
        value = shares.get(team_id, 1.0)
        return value if value and value > 0 else 1.0

    ordered: list[QueueItem] = []
    for priority in sorted(by_priority, reverse=True):
        queues = by_priority[priority]
        served = dict.fromkeys(queues, 0)
        heap: list[tuple[float, tuple, int]] = []
        for team_id, queue in queues.items():
            weights.setdefault(team_id, share(team_id))
            key.setdefault(team_id, usage.get(team_id, 0.0) / weights[team_id])
            heapq.heappush(heap, (key[team_id], arrivals[queue[0]], team_id))
        while heap:
            _, _, team_id = heapq.heappop(heap)
            queue, at, weight = queues[team_id], served[team_id], weights[team_id]
            if not heap:  # the only team left at this level: the rest of its queue as it is
                for k in queue[at:]:
                    ordered.append(items[k])
                    key[team_id] += items[k].cores * charge_s / weight
                break
            item = items[queue[at]]
            ordered.append(item)
            # The charge carries over to lower priority levels: a team that just got
            # ten inference jobs ahead is not also first in line for fine-tunes.
            key[team_id] += item.cores * charge_s / weight
            served[team_id] = at = at + 1
            if at < len(queue):
                heapq.heappush(heap, (key[team_id], arrivals[queue[at]], team_id))
    return ordered
