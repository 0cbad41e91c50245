"""Fleet simulator: the project's real scheduling function in virtual time over a
seeded synthetic fleet and trace, with the two baselines in the same run, and one
real dispatch pass against PostgreSQL.

What runs is jobs.quotas.backfill.schedule_pass - the function the dispatcher
(jobs.lifecycle.scheduler.DispatchRun) calls with the database's state - in the
order of jobs.quotas.fairshare.fair_order, under three policies: "easy" (the
project's: EASY reservations and backfill; gangs are reserved whole hosts, the
first few waiting gangs of a family besides its head too), "greedy"
(first fit without reservations: the dispatcher before reservations) and "fifo"
(per family the head blocks everything). The scheduler is told each team's
observed actual/requested runtime ratio as its jobs finish (FleetState.ratios:
where a gang's reservation goes). Start-time estimates at submit are
jobs.quotas.backfill.forecast over what the scheduler would know (time limits ×
the team's observed actual/requested ratio), never the true runtimes. A pass looks
at what a dispatch run reads: the oldest jobs.quotas.fairshare.PENDING_SCAN
pending jobs (`--scan`; 0: the whole queue), newer ones waiting until older ones
have left. The estimate replays the whole queue as jobs.lifecycle.forecasts does:
each of its passes looks at the oldest `--scan` jobs still waiting in the replay,
so a job submitted behind PENDING_SCAN others (eta_unscanned counts them) comes
into view as they start; it steps to each next expected end near now and further
ahead by forecast's step (`--eta-step`, a fraction of the time looked ahead).

The trace (seeded; every size is a flag):
- Fleet: `--hosts` hosts of the instance types in the Neuron reference
  (neuron.md, instance table; neuron_workers.readers.neuron_ls.INSTANCE_TYPES):
  inf2.xlarge / inf2.8xlarge 2 NeuronCores, inf2.24xlarge 12, inf2.48xlarge 24,
  trn1.2xlarge 2, trn1.32xlarge 32, trn2.48xlarge 64 (LNC=2, the default). Hosts:
  35 % inf2, 45 % trn1, 20 % trn2. trn1.32xlarge hosts sit in placement groups of
  16 and trn2.48xlarge in groups of 8 (Host.network labels: EFA domains).
- Teams: `--teams` teams with Zipf-like shares (a few large, many small); each is
  guaranteed its share of every family and may borrow the rest (what the admin
  page makes easy).
- Sizes, after the three trace studies: in Microsoft's Philly trace (Jeon et al.,
  "Analysis of Large-Scale Multi-Tenant GPU Clusters for DNN Training Workloads",
  USENIX ATC'19; the public trace holds 117,325 jobs, Aug-Dec 2017) and in
  SenseTime's Helios (Hu et al., "Characterization and Prediction of Deep Learning
  Workloads in Large-Scale GPU Datacenters", SC'21; 3.36 M jobs over 6 months in 4
  clusters) single-accelerator jobs are the large majority of jobs while the few
  multi-node jobs take a large share of accelerator time; Alibaba PAI (Weng et
  al., "MLaaS in the Wild", NSDI'22) reports the same skew of requests and a
  heavy tail of durations. Here: 1-2 cores 58 %, 4-12 cores 22 %, one whole host
  12 %, and on trn1 / trn2 gangs of 2, 4 or 8 whole hosts 8 % (60/30/10), half of
  them asking for one network label. These percentages are this simulator's
  choices shaped after those studies, not figures copied from them.
- Durations: log-normal, median 10 min, sigma 1.8 (seconds to days: the heavy
  tail all three report), capped at 3 days; gangs (training) 4x longer.
- Time limits: users over-ask: limit = true duration × U(1, 5) (the issue's rule).
- Arrivals: Poisson with day waves (1.5x the mean rate by day, 0.5x by night),
  mixed per family so each family is offered `--load` times its own capacity
  (a family's jobs can only use that family's cores), plus `--bursts` submission
  rushes of `--burst-jobs` jobs within half an hour each (a deadline, a sweep: the
  bursty submission the studies describe), which is what builds the backlog of
  over 10,000 pending jobs that dispatch_pass_p95_ms is measured at (a pass then
  decides for the oldest PENDING_SCAN of them, as a dispatch run does).

What it leaves out: preemption of borrowers (every team may borrow the whole
fleet, so the passes run without preempt), budgets, host failures and drains, job
failures and retries, kind priorities (every job is of one kind), the Celery and
database latency between passes (a pass runs every TICK_S of virtual time, where
the dispatcher runs one soon after each submit and each end: a job's cores sit
idle until the next tick, and that idle time counts against utilization;
`dispatch_pass_db_ms` measures one real pass separately), fair-share decay (usage
is the trace's total so far), and new arrivals in the estimate (a forecast replays the queue as it is:
estimates are early for jobs that later arrivals of less-served teams overtake).

Prints one JSON object (the last line): per policy (suffixes _fifo, _greedy for
the baselines) utilization (the issue's definition: busy core-seconds / capacity
core-seconds over the periods when pending demand exceeds free cores - ticks
where the pending jobs' cores, all families together, exceed the fleet's free
cores; a core is busy from its job's start to its true end),
utilization_family (the same per family: a family's busy / capacity over the
ticks where its own pending demand exceeds its own free cores, summed over
families - its jobs can use no other family's cores), wait_p50_s, wait_p95_s,
multihost_wait_max_s (gangs), jct_mean_s, jain_fairness (usage / share over the teams with demand, over busy
ticks); for "easy" dispatch_pass_p95_ms (fair_order + schedule_pass wall time at
ticks with >= --peak-pending pending, or the busiest tenth if the trace never gets
there), eta_error_median and eta_within_2x (estimates made at submit for a sample
of jobs; eta_unscanned of them were submitted behind PENDING_SCAN others; a replay
that has not started its job after ETA_MAX_STEPS passes counts as an error of inf;
eta_cpu_s: the CPU time of all the estimates); dispatch_pass_db_ms (one scheduler.dispatch() against PostgreSQL loaded
with --db-hosts hosts and --db-pending pending jobs, in a scratch database created
and dropped here; wall time, and dispatch_pass_db_cpu_ms: the CPU time of this
process and of its PostgreSQL backend during the pass); hosts, jobs; per policy
sim_wall_s and sim_cpu_s (this process's CPU time: what the wall time is on a
quiet machine).

With --idle-breakdown, per policy, why cores were idle over the ticks that count
for utilization, as fractions of the same capacity core-seconds (utilization plus
these sums to 1): idle_no_backlog (free cores of a family whose own pending cores
do not exceed them: its jobs cannot use another family's cores; what separates
utilization from utilization_family), idle_reserved_head / idle_reserved_gang
(free cores a reservation of that pass keeps: the family head's, a gang's behind
it), idle_nofit (free cores on which no scanned pending job of the family would
fit, by size, contiguity and alignment, or as a gang's rank on one of enough
idle hosts of its size),
idle_quota (one would fit but its team's quota refuses it), idle_fit_other (one
would fit but waits for another reason) and idle_tick (cores between a job's true
end and the next tick's pass, which the dispatcher would run right after the end).
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from itertools import islice
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.quotas.backfill import (  # noqa: E402
    FORECAST_STEP,
    FleetState,
    Running,
    Waiting,
    estimated_end,
    forecast,
    runtime_ratio,
    schedule_pass,
)
from jobs.quotas.fairshare import PENDING_SCAN, QueueItem, fair_order  # noqa: E402
from jobs.quotas.placement import HostSlots, place  # noqa: E402

HOST_MIX = {  # family -> [(instance type, NeuronCores, weight)] (neuron.md's instance table)
    "inf2": [("inf2.xlarge", 2, 3), ("inf2.8xlarge", 2, 2), ("inf2.24xlarge", 12, 2), ("inf2.48xlarge", 24, 3)],
    "trn1": [("trn1.2xlarge", 2, 3), ("trn1.32xlarge", 32, 7)],
    "trn2": [("trn2.48xlarge", 64, 1)],
}
FAMILY_HOSTS = {"inf2": 0.35, "trn1": 0.45, "trn2": 0.20}
GROUP_SIZE = {"trn1.32xlarge": 16, "trn2.48xlarge": 8}  # hosts per placement group (network label)
GANG_SIZES = ([2, 4, 8], [0.6, 0.3, 0.1])
GANG_SHARE = 0.08  # of trn1 / trn2 jobs
TICK_S = 30.0  # virtual seconds between passes (--tick)
BURST_S = 1800.0  # a submission rush lasts half an hour
ETA_MAX_STEPS = 2000  # a replay that has not started the job by then counts as no estimate (an error of inf)
FAIR_CHARGE_S = 3600.0  # settings.FAIRSHARE_QUEUE_CHARGE_S
OVERDUE_H = 0.5  # settings.SCHED_OVERDUE_AFTER_H (--overdue-h)
EPOCH = datetime(2026, 1, 1, tzinfo=dt_timezone.utc)  # virtual time 0


@dataclass(frozen=True)
class TraceJob:
    job_id: int
    team_id: int
    family: str
    cores: int
    host_count: int
    same_network: bool
    duration: float
    limit: float
    arrival: float

    def waiting(self) -> Waiting:
        """What the scheduler is told (its runtime is the truth: it sets when it ends)."""
        return Waiting(self.job_id, self.team_id, self.family, self.cores, self.limit, self.duration,
                       self.host_count, self.same_network)


def make_fleet(rng: random.Random, n_hosts: int) -> dict[int, HostSlots]:
    hosts, groups = {}, {}
    for i in range(n_hosts):
        family = rng.choices(list(FAMILY_HOSTS), weights=list(FAMILY_HOSTS.values()))[0]
        name, cores, _ = rng.choices(HOST_MIX[family], weights=[w for *_, w in HOST_MIX[family]])[0]
        network = ""
        if name in GROUP_SIZE:
            n = groups.get(name, 0)
            groups[name] = n + 1
            network = f"{name.split('.')[0]}-pg{n // GROUP_SIZE[name]}"
        hosts[i] = HostSlots(i, f"{name}-{i}", family, tuple(range(cores)), network=network)
    return hosts


def make_teams(n_teams: int, hosts: dict[int, HostSlots]):
    shares = {t: 1.0 / (t + 1) ** 0.8 for t in range(n_teams)}
    total = sum(shares.values())
    capacity = family_capacity(hosts)
    quotas = {}
    for t, share in shares.items():
        for f, cap in capacity.items():
            guaranteed = int(cap * share / total)
            quotas[(t, f)] = (guaranteed, cap - guaranteed)
    return shares, quotas


def family_capacity(hosts: dict[int, HostSlots]) -> dict[str, int]:
    capacity: dict[str, int] = {}
    for h in hosts.values():
        capacity[h.family] = capacity.get(h.family, 0) + len(h.core_ids)
    return capacity


def draw_job(rng: random.Random, family: str, sizes: dict[str, list[int]]) -> tuple[int, int, bool, float]:
    """(cores, host_count, same_network, true duration) of one job of `family`."""
    largest = sizes[family][-1]
    u = rng.random()
    host_count, same_network, stretch = 1, False, 1.0
    if u < 0.58:
        cores = rng.choice([1, 2])
    elif u < 0.80:
        cores = min(rng.choice([4, 8, 12]), largest)
    elif u < 1 - GANG_SHARE or family == "inf2":
        cores = rng.choice([s for s in sizes[family] if s >= 12] or sizes[family])
    else:
        host_count = rng.choices(*GANG_SIZES)[0]
        cores, same_network, stretch = largest * host_count, rng.random() < 0.5, 4.0
    duration = min(max(stretch * math.exp(rng.gauss(math.log(600), 1.8)), 10.0), 3 * 86400)
    return cores, host_count, same_network, duration


def make_jobs(rng: random.Random, n_jobs: int, hosts: dict[int, HostSlots], shares: dict[int, float],
              load: float, bursts: int = 0, burst_jobs: int = 0) -> list[TraceJob]:
    sizes = {f: sorted({len(h.core_ids) for h in hosts.values() if h.family == f}) for f in FAMILY_HOSTS}
    capacity = family_capacity(hosts)
    # Each family gets jobs in proportion to its capacity / its mean job's work, so
    # every family is offered the same load (a pilot sample sets the mean).
    pilot = random.Random(rng.random())
    mean_work = {f: statistics.fmean(c * d for c, _, _, d in (draw_job(pilot, f, sizes) for _ in range(20000)))
                 for f in FAMILY_HOSTS}
    fam_rate = {f: load * capacity[f] / mean_work[f] for f in FAMILY_HOSTS}  # jobs per second
    rate = sum(fam_rate.values())
    teams, weights = list(shares), list(shares.values())
    steady = n_jobs - bursts * burst_jobs
    span = steady / rate  # about: the day waves average out
    rush = sorted(span * (b + 1) / (bursts + 1) + rng.uniform(0, BURST_S) for b in range(bursts)
                  for _ in range(burst_jobs))
    times, t = [], 0.0
    for _ in range(steady):
        t += rng.expovariate(rate * (1 + 0.5 * math.sin(2 * math.pi * t / 86400)))
        times.append(t)
    jobs = []
    for i, t in enumerate(sorted(times + rush)):
        family = rng.choices(list(fam_rate), weights=list(fam_rate.values()))[0]
        cores, host_count, same_network, duration = draw_job(rng, family, sizes)
        jobs.append(TraceJob(i, rng.choices(teams, weights=weights)[0], family, cores, host_count, same_network,
                             duration, duration * rng.uniform(1, 5), t))
    return jobs


class Sim:
    """One policy over the trace."""

    def __init__(self, policy: str, jobs: list[TraceJob], hosts, shares, quotas, *, eta_ids: set[int] = frozenset(),
                 peak_pending: int = 10_000, scan: int = PENDING_SCAN, idle_breakdown: bool = False,
                 eta_step: float = FORECAST_STEP):
        self.policy, self.jobs, self.hosts, self.shares, self.scan = policy, jobs, hosts, shares, scan
        self.idle_breakdown, self.eta_step = idle_breakdown, eta_step
        self.state = FleetState(dict(hosts), quotas=quotas)
        self.eta_ids, self.peak_pending = eta_ids, peak_pending
        self.capacity = family_capacity(hosts)
        self.queue: dict[int, Waiting] = {}  # by job id: the trace's ids are in arrival order, like the database's
        self.items: dict[int, QueueItem] = {}  # job id -> what fair_order sees (made once, at arrival)
        self.now = 0.0
        self.demand = {f: 0 for f in self.capacity}  # pending cores per family
        self.start: dict[int, float] = {}
        self.usage = {t: 0.0 for t in shares}  # core-seconds so far (fair share's measure, undecayed)
        self.busy_usage = {t: 0.0 for t in shares}
        self.history: dict[int, list[tuple[float, float]]] = {t: [] for t in shares}
        self.util = {"family": [0.0, 0.0], "fleet": [0.0, 0.0]}  # [busy, capacity] core-seconds
        self.busy_tick: dict = {"family": {}, "fleet": False}  # whether the last tick counted, per family / fleet
        self.pass_ms: list[tuple[int, float]] = []
        self.idle: dict[str, float] = {}  # cause -> idle core-seconds over fleet-busy ticks (breakdown())
        self.eta: dict[int, float] = {}
        self.eta_unscanned = 0  # estimates asked for a job beyond the scan
        self.eta_cpu_s = 0.0  # CPU time of the estimates

    def run(self) -> dict:
        jobs, state = self.jobs, self.state
        ends: list[tuple[float, int]] = []
        k, t, done = 0, 0.0, 0
        while done < len(jobs):
            t_next = t + TICK_S
            while ends and ends[0][0] <= t_next:
                end, job_id = heapq.heappop(ends)
                run = state.finish(job_id)
                done += 1
                j = jobs[job_id]
                self.history[j.team_id].append((j.duration, j.limit))
                state.ratios[j.team_id] = runtime_ratio(self.history[j.team_id][-200:])[1]
                self.unbusy(run, t_next - end)
            first = k
            while k < len(jobs) and jobs[k].arrival <= t_next:
                j = jobs[k]
                self.queue[j.job_id] = j.waiting()
                self.items[j.job_id] = QueueItem(j.job_id, j.team_id, 0, j.cores, j.family,
                                                 EPOCH + timedelta(seconds=j.arrival))
                self.demand[j.family] += j.cores
                k += 1
            self.now = t_next
            for j in jobs[first:k]:
                if j.job_id in self.eta_ids:
                    cpu = time.process_time()
                    self.eta[j.job_id] = self.estimate(j.job_id, t_next)
                    self.eta_cpu_s += time.process_time() - cpu
            t = self.now = t_next
            cpu, wall = time.process_time(), time.perf_counter()
            order = self.ordered()
            result = schedule_pass(order, state, t, self.policy)
            self.pass_ms.append((len(self.queue), (time.process_time() - cpu) * 1000,
                                 (time.perf_counter() - wall) * 1000))
            for r in result.started:
                self.start[r.job_id] = t
                heapq.heappush(ends, (r.end, r.job_id))
                w = self.queue.pop(r.job_id)
                del self.items[r.job_id]
                self.demand[w.family] -= w.cores
            self.account()
            if self.idle_breakdown and self.busy_tick["fleet"]:
                self.breakdown(order, result)
            if k == len(jobs) and not state.running and self.queue:
                stuck = list(self.queue.values())[:3]
                raise SystemExit(f"{self.policy}: {len(self.queue)} pending jobs can never start on this fleet, "
                                 f"e.g. {stuck} (a gang needs that many hosts of its size): use more --hosts")
        return self.figures()

    def ordered(self, whole: bool = False) -> list[Waiting]:
        """The jobs a dispatch run looks at - the oldest `scan` pending (PENDING_SCAN:
        the dispatcher reads them by id; 0: the whole queue), or with `whole` every
        pending job - in the order it works in."""
        scanned = list(islice(self.queue, self.scan)) if self.scan and not whole else list(self.queue)
        if self.policy == "fifo":
            return [self.queue[job_id] for job_id in scanned]
        items = [self.items[job_id] for job_id in scanned]
        line = EPOCH + timedelta(seconds=self.now - OVERDUE_H * 3600) if OVERDUE_H > 0 else None
        return [self.queue[i.job_id] for i in fair_order(items, self.usage, self.shares, FAIR_CHARGE_S,
                                                         overdue_before=line)]

    def account(self) -> None:
        """One tick's usage and utilization (free cores are the pass's own counters).
        Cores held over the whole tick are counted busy; unbusy() takes back the part
        after a job's true end (its cores stay held until the next pass)."""
        state = self.state
        for (team_id, _), cores in state.team_use.items():
            self.usage[team_id] += cores * TICK_S
        busy_family = self.busy_tick["family"] = {}
        for f, cap in self.capacity.items():
            free = state.free[f]
            if self.demand[f] > free:
                self.util["family"][0] += (cap - free) * TICK_S
                self.util["family"][1] += cap * TICK_S
                busy_family[f] = True
        free_all, cap_all = sum(state.free.values()), sum(self.capacity.values())
        self.busy_tick["fleet"] = sum(self.demand.values()) > free_all
        if self.busy_tick["fleet"]:
            self.util["fleet"][0] += (cap_all - free_all) * TICK_S
            self.util["fleet"][1] += cap_all * TICK_S
        if busy_family:
            for (team_id, _), cores in state.team_use.items():
                self.busy_usage[team_id] += cores * TICK_S

    def unbusy(self, run: Running, idle_s: float) -> None:
        """A job that ended `idle_s` before the pass that frees its cores: the last
        tick counted its cores busy for that time, which they were not."""
        if self.busy_tick["fleet"]:
            self.util["fleet"][0] -= run.total * idle_s
            self.idle["tick"] = self.idle.get("tick", 0.0) + run.total * idle_s  # (reported with --idle-breakdown)
        if self.busy_tick["family"].get(run.family):
            self.util["family"][0] -= run.total * idle_s

    def breakdown(self, order: list[Waiting], result) -> None:
        """Why the free cores of a fleet-busy tick are free, in core-seconds per cause
        (--idle-breakdown; the docstring at the top lists the causes)."""
        state = self.state
        add = lambda cause, n: self.idle.__setitem__(cause, self.idle.get(cause, 0.0) + n * TICK_S)  # noqa: E731
        waiting: dict[str, list[Waiting]] = {}
        for w in order:
            if w.job_id in result.reasons:
                waiting.setdefault(w.family, []).append(w)
        for f in self.capacity:
            if self.demand[f] <= state.free[f]:
                add("no_backlog", state.free[f])
                continue
            reserved: dict[int, tuple[str, frozenset[int]]] = {}  # host -> (cause, the cores reservations keep)
            for r in result.held(f):
                cause = "reserved_head" if result.reservations.get(f) is r else "reserved_gang"
                for m in r.members:
                    reserved[m.host_id] = (cause, reserved.get(m.host_id, ("", frozenset()))[1] | r.on(m.host_id))
            sizes: dict[tuple[int, int], set[str]] = {}  # (cores, host_count) -> reasons
            for w in waiting.get(f, ()):
                sizes.setdefault((w.cores // w.host_count, w.host_count), set()).add(result.reasons[w.job_id])
            rests = []  # the free hosts with the reserved cores shown as taken
            for h in state.slots(f):
                if h.free == 0 or h.draining:
                    continue
                cause, held = reserved.get(h.host_id, ("", frozenset()))
                held = held - h.used
                if held:
                    add(cause, len(held))
                rest = HostSlots(h.host_id, h.name, f, h.core_ids, h.used | held)
                if rest.free:
                    rests.append(rest)
            idle = {}  # host size -> unreserved idle hosts of that size (a gang needs host_count of them)
            for rest in rests:
                if rest.idle:
                    idle[len(rest.core_ids)] = idle.get(len(rest.core_ids), 0) + 1
            for rest in rests:
                reasons = set()
                for (cores, count), why in sizes.items():
                    if (count > 1 and rest.idle and cores == len(rest.core_ids) and idle[cores] >= count) or (
                            count == 1 and place([rest], f, cores) is not None):
                        reasons |= why
                if not reasons:
                    add("nofit", rest.free)
                elif reasons & {"waiting_for_quota", "borrowing_limit_reached"}:
                    add("quota", rest.free)
                else:
                    add("fit_other", rest.free)

    def estimate(self, job_id: int, now: float) -> float:
        """The estimate a user would see at submit: forecast over a copy of what the
        scheduler knows - running jobs' starts and limits, the queue's limits - with
        runtimes corrected by each team's finished history. True runtimes are not
        passed: a running job's expected end comes from its start and limit only.
        The replay stops once the job has started (the jobs behind it in the order
        are in it: they may backfill around it). Like jobs.lifecycle.forecasts, it
        replays the whole queue in fair-share order with each pass looking at the
        oldest `scan` jobs still waiting in the replay, as a dispatch run does: a job
        submitted behind `scan` older ones comes into view as they start
        (eta_unscanned counts those)."""
        if self.scan and job_id not in set(islice(self.queue, self.scan)):
            self.eta_unscanned += 1
        scanned = self.ordered(whole=True)
        ratio = {t: runtime_ratio(h[-200:])[1] for t, h in self.history.items()}
        running = {}
        for r in self.state.running.values():
            limit = self.jobs[r.job_id].limit  # what the scheduler knows: the limit, and when it started
            started = self.state.limit_end[r.job_id] - limit
            running[r.job_id] = Running(r.job_id, r.team_id, r.family, r.host_id, r.cores,
                                        estimated_end(started, limit, ratio[r.team_id], now), r.ranks)
        copy = FleetState(dict(self.hosts), running, self.state.quotas, limit_end=dict(self.state.limit_end),
                          ratios=ratio, expected_end={job_id: r.end for job_id, r in running.items()})
        order = [Waiting(w.job_id, w.team_id, w.family, w.cores, w.limit_s, w.limit_s * ratio[w.team_id],
                         w.host_count, w.same_network) for w in scanned]
        got = forecast(order, copy, now, until=job_id, max_steps=ETA_MAX_STEPS,
                       scan=self.scan or None, step=self.eta_step).get(job_id)
        return got.start if got and got.start is not None else math.inf

    def figures(self) -> dict:
        jobs = self.jobs
        waits = sorted(self.start[j.job_id] - j.arrival for j in jobs)
        gangs = [self.start[j.job_id] - j.arrival for j in jobs if j.host_count > 1]
        end = {j.job_id: self.start[j.job_id] + j.duration for j in jobs}
        demand = [t for t in self.shares if self.busy_usage[t] > 0]
        xs = [self.busy_usage[t] / self.shares[t] for t in demand]
        ratio = lambda pair: round(pair[0] / pair[1], 4) if pair[1] else None  # noqa: E731
        out = {
            "utilization": ratio(self.util["fleet"]),
            "utilization_family": ratio(self.util["family"]),
            "wait_p50_s": round(waits[len(waits) // 2], 1),
            "wait_p95_s": round(waits[int(len(waits) * 0.95)], 1),
            "multihost_wait_max_s": round(max(gangs, default=0.0), 1),
            "jct_mean_s": round(statistics.fmean(end[j.job_id] - j.arrival for j in jobs), 1),
            "jain_fairness": round(sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)), 4) if xs else None,
            "span_h": round(max(end.values()) / 3600, 1),
        }
        if self.idle_breakdown:
            for cause in ("no_backlog", "reserved_head", "reserved_gang", "nofit", "quota", "fit_other", "tick"):
                out[f"idle_{cause}"] = ratio([self.idle.get(cause, 0.0), self.util["fleet"][1]])
        if self.policy == "easy":
            peak = max(q for q, *_ in self.pass_ms)
            heavy = [p for p in self.pass_ms if p[0] >= self.peak_pending]
            if not heavy:  # the trace never got that far: its busiest tenth
                heavy = sorted(self.pass_ms)[-max(1, len(self.pass_ms) // 10):]
            p95 = lambda xs: round(sorted(xs)[int(len(xs) * 0.95)], 2)  # noqa: E731
            out["dispatch_pass_p95_ms"] = p95([cpu for _, cpu, _ in heavy])
            out["dispatch_pass_p95_wall_ms"] = p95([wall for *_, wall in heavy])
            out["dispatch_passes_measured"] = len(heavy)
            out["peak_pending"] = peak
            errors, within = [], []
            for job_id, est in self.eta.items():
                actual = self.start[job_id] - jobs[job_id].arrival
                guess = est - jobs[job_id].arrival
                errors.append(abs(guess - actual) / max(actual, 60.0))
                a, g = max(actual, 60.0), max(guess, 60.0)
                within.append(g <= 2 * a and a <= 2 * g)
            out["eta_error_median"] = round(statistics.median(errors), 3) if errors else None
            out["eta_within_2x"] = round(sum(within) / len(within), 3) if within else None
            out["eta_samples"] = len(errors)
            out["eta_unscanned"] = self.eta_unscanned
            out["eta_cpu_s"] = round(self.eta_cpu_s, 1)
        return out


# --- one real dispatch pass on PostgreSQL ------------------------------------------

def dispatch_pass_db(n_hosts: int, n_pending: int, seed: int) -> dict:
    """One scheduler.dispatch() at peak backlog, reads and writes included, in a
    scratch database: `n_hosts` hosts (the simulator's fleet) all held by running
    jobs, `n_pending` pending jobs of 200 teams from the trace. A first pass writes
    every job's waiting reason (timed too: dispatch_pass_db_first_ms); then 2 % of
    the running jobs finish and the next pass - the one a finishing job's kick
    starts - is timed: it locks the hosts, reads the fleet and the queue, runs the
    pure pass, places what fits (core allocations, GangMember rows, events) and
    writes the reasons that changed, then sends the run messages after commit (to a
    scratch Redis db)."""
    from bench.support.harness import Bench, exclusive_run, redis_url

    lock = exclusive_run("bench-fleet-sim")  # noqa: F841 - held until the process exits
    with tempfile.TemporaryDirectory(prefix="nd-bench-fleet-sim-") as workdir:
        bench = Bench(db_name="neurondeck_bench_fleet_sim", redis_url=redis_url("fleet_sim"),
                      host="bench-fleet-sim", workdir=Path(workdir))
        bench.setup(bench.environment())
        try:
            return _timed_dispatch(n_hosts, n_pending, seed)
        finally:
            bench.teardown()


def _timed_dispatch(n_hosts: int, n_pending: int, seed: int) -> dict:
    from django.db import transaction

    from jobs.lifecycle import scheduler, states
    from jobs.models import Job

    rng = random.Random(seed)
    running = fill_db(rng, n_hosts, n_pending)
    wall = time.perf_counter()
    first = scheduler.dispatch(clear=False)
    first_ms = (time.perf_counter() - wall) * 1000
    with transaction.atomic():
        for job in rng.sample(running, len(running) // 50):
            states.mark_finished(job.pk, Job.Status.SUCCEEDED)
    backend = _backend_cpu_s()
    cpu, wall = time.process_time(), time.perf_counter()
    report = scheduler.dispatch(clear=False)
    ms = (time.perf_counter() - wall) * 1000
    cpu_ms = (time.process_time() - cpu + _backend_cpu_s() - backend) * 1000
    return {"dispatch_pass_db_ms": round(ms, 1), "dispatch_pass_db_cpu_ms": round(cpu_ms, 1),
            "dispatch_pass_db_first_ms": round(first_ms, 1),
            "db_placed": len(report.placed), "db_waiting": report.waiting, "db_first_waiting": first.waiting,
            "db_pending_read": min(n_pending, scheduler.PENDING_SCAN)}


def fill_db(rng: random.Random, n_hosts: int, n_pending: int) -> list:
    """The scratch database at peak backlog: `n_hosts` hosts of the simulator's fleet,
    each held whole by a running job (returned), and `n_pending` pending jobs of 200
    teams (the simulator's shares and quotas) from the trace, all of user "sim"."""
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from jobs.models import CoreAllocation, FamilyQuota, Host, Job, Team, TeamQuota

    hosts = make_fleet(rng, n_hosts)
    shares, quotas = make_teams(200, hosts)
    user = get_user_model().objects.create_user("sim", "sim@example.com", "sim-password")
    teams = Team.objects.bulk_create([Team(slug=f"team-{t}", name=f"Team {t}") for t in shares])
    TeamQuota.objects.bulk_create([TeamQuota(team=team, monthly_core_hours=1e9, max_pending=1_000_000,
                                             share=round(shares[t], 4)) for t, team in enumerate(teams)],
                                  ignore_conflicts=True)
    FamilyQuota.objects.bulk_create([FamilyQuota(team=teams[t], family=f, guaranteed_cores=g, borrow_limit=b)
                                     for (t, f), (g, b) in quotas.items()], ignore_conflicts=True)
    now = timezone.now()
    rows = Host.objects.bulk_create([Host(name=h.name, family=h.family, core_ids=list(h.core_ids), network=h.network,
                                          instance_type=h.name.rsplit("-", 1)[0], last_heartbeat=now)
                                     for h in hosts.values()])
    running = Job.objects.bulk_create([
        Job(team=teams[i % len(teams)], user=user, kind="finetune", family=host.family, cores=len(host.core_ids),
            status=Job.Status.RUNNING, host=host, core_start=0, started_at=now, heartbeat_at=now,
            max_runtime_s=rng.randint(600, 86400)) for i, host in enumerate(rows)])
    CoreAllocation.objects.bulk_create([CoreAllocation(host=job.host, core=c, job=job, team_id=job.team_id,
                                                       family=job.family, since=now)
                                        for job in running for c in range(job.cores)], batch_size=5000)
    trace = make_jobs(rng, n_pending, hosts, shares, 1.0)
    Job.objects.bulk_create([Job(team=teams[j.team_id], user=user, kind="inference", family=j.family, cores=j.cores,
                                 host_count=j.host_count, same_network=j.same_network, max_runtime_s=int(j.limit),
                                 reason_code="submitted") for j in trace], batch_size=2000)
    return running


def _backend_cpu_s() -> float:
    """CPU seconds used so far by the PostgreSQL backend serving this process's connection
    (the server is local): with the client's own CPU time, what a pass costs whatever
    else the machine is running."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def set_globals(tick: float, gang_share: float, overdue_h: float) -> None:
    global TICK_S, GANG_SHARE, OVERDUE_H
    TICK_S, GANG_SHARE, OVERDUE_H = tick, gang_share, overdue_h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--teams", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--load", type=float, default=1.05, help="offered work / capacity, per family")
    parser.add_argument("--bursts", type=int, default=2)
    parser.add_argument("--burst-jobs", type=int, default=12_000)
    parser.add_argument("--eta-samples", type=int, default=200, help="jobs whose start is estimated at submit")
    parser.add_argument("--peak-pending", type=int, default=10_000,
                        help="dispatch_pass_p95_ms is measured over ticks with at least this many pending")
    parser.add_argument("--db-hosts", type=int, default=1000)
    parser.add_argument("--db-pending", type=int, default=10_000)
    parser.add_argument("--no-db", action="store_true", help="skip dispatch_pass_db_ms (no PostgreSQL)")
    parser.add_argument("--policies", default="easy,greedy,fifo")
    parser.add_argument("--scan", type=int, default=PENDING_SCAN,
                        help="pending jobs a pass looks at, the oldest first (the dispatcher's PENDING_SCAN); "
                             "0: the whole queue")
    parser.add_argument("--eta-step", type=float, default=FORECAST_STEP,
                        help="the estimates' time step, a fraction of how far ahead (backfill.forecast's step)")
    parser.add_argument("--tick", type=float, default=TICK_S, help="virtual seconds between dispatch passes")
    parser.add_argument("--gang-share", type=float, default=GANG_SHARE, help="share of trn1/trn2 jobs that are gangs")
    parser.add_argument("--overdue-h", type=float, default=OVERDUE_H,
                        help="starvation guard (settings.SCHED_OVERDUE_AFTER_H); 0: off")
    parser.add_argument("--idle-breakdown", action="store_true",
                        help="idle_* keys: why the cores of fleet-busy ticks were idle (slows the run)")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    set_globals(args.tick, args.gang_share, args.overdue_h)
    rng = random.Random(args.seed)
    hosts = make_fleet(rng, args.hosts)
    shares, quotas = make_teams(args.teams, hosts)
    jobs = make_jobs(rng, args.jobs, hosts, shares, args.load, args.bursts, min(args.burst_jobs, args.jobs // 4))
    eta_ids = set(random.Random(args.seed + 1).sample(range(args.jobs), min(args.eta_samples, args.jobs)))
    out: dict = {}
    wall = time.perf_counter()
    for policy in [p for p in args.policies.split(",") if p]:
        began, began_cpu = time.perf_counter(), time.process_time()
        sim = Sim(policy, jobs, hosts, shares, quotas, eta_ids=eta_ids if policy == "easy" else set(),
                  peak_pending=args.peak_pending, scan=args.scan, idle_breakdown=args.idle_breakdown,
                  eta_step=args.eta_step)
        suffix = "" if policy == "easy" else f"_{policy}"
        out.update({f"{key}{suffix}": value for key, value in sim.run().items()})
        out[f"sim_wall_s{suffix}"] = round(time.perf_counter() - began, 1)
        out[f"sim_cpu_s{suffix}"] = round(time.process_time() - began_cpu, 1)  # its wall time on a quiet machine
        print(f"{policy}: {json.dumps({k: v for k, v in out.items() if k.endswith(suffix) or not suffix})}",
              file=sys.stderr, flush=True)
    if not args.no_db:
        out.update(dispatch_pass_db(args.db_hosts, args.db_pending, args.seed))
    gang_jobs = sum(j.host_count > 1 for j in jobs)
    out.update(hosts=args.hosts, teams=args.teams, jobs=args.jobs, gang_jobs=gang_jobs, load=args.load,
               scan=args.scan, eta_step=args.eta_step, seed=args.seed, wall_s=round(time.perf_counter() - wall, 1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
