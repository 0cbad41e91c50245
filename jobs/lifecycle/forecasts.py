"""Start-time estimates: the database's queue and running jobs, handed to the pure
jobs.quotas.backfill.forecast (the dispatcher's own placement and backfill rules,
run forward in virtual time).

What the replay is told about runtimes: each job's time limit, times its team's
history of actual / requested runtime (jobs.lifecycle.runtimes.team_ratios over the
team's last finished jobs). The point estimate uses the median ratio; the range
runs the replay again with the 10th percentile (early) and with the time limits
themselves (late: no job runs longer than its limit, so with no new arrivals of
higher priority this is the latest start). A running job's true end is never read:
it is not known, and a forecast that could see it would only be tested against
itself.

The replay covers every pending job: like a dispatch run, each of its passes looks
at the oldest PENDING_SCAN jobs still waiting in it, and newer ones come into view
as those start (backfill.forecast's `scan`); further ahead it steps in stretches of
a fraction of the time looked ahead (backfill.FORECAST_STEP), so its cost grows
about linearly with the queue. That is still too long for a request at fleet
scale, so no page or API request does it: the periodic task jobs.estimate_starts
(its own Celery queue, every settings.ESTIMATES_EVERY_S) computes every pending job's estimate (`store`) and keeps
them in the cache every process shares (Redis); pages and the API read them with
their age (`stored`, `estimates_for`). A dry run's estimate is its own replay,
stopped once its job starts or after DRY_RUN_STEPS passes (`estimate_of`).

Families are scheduled independently: a host belongs to one family, a quota to a
team and a family, and a pass decides for each family from its own hosts, holders,
jobs and reservations (a team's budget spans families but does not change within a
pass). So each family is replayed on its own, its passes at its own jobs' ends and
steps whatever the other families do, and a dry run reads and replays only its
job's family. The one link between families is the pending scan: with more than
PENDING_SCAN jobs waiting, starts in one family bring another's jobs into view, and
the queue is replayed as one. The queue's order is always that of every pending job
(fair share charges a team for its jobs of every family)."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from datetime import timezone as dt_timezone

from django.conf import settings
from django.core.cache import caches
from django.utils import timezone

from jobs.lifecycle.runtimes import team_ratios
from jobs.models import CoreAllocation, FamilyQuota, Host, Job
from jobs.quotas.backfill import (FORECAST_STEP, FleetState, Member, Running, Waiting, estimated_end, forecast,
                                  time_limit_s)
from jobs.quotas.fairshare import PENDING_SCAN
from jobs.quotas.placement import HostSlots

log = logging.getLogger(__name__)

# Stored estimates (in the "shared" cache): one entry per job and one saying when the
# last run computed them. An entry older than that run is not shown (its job was not
# in the run); nothing is shown once the task has not run for KEEP_S.
STORED_RUN = "forecasts:run"
KICK_FLAG = "forecasts:kick"  # set by a page that found nothing stored: one kick per interval
# The last run's estimated starts (timestamps, sorted): when the queue's window will
# have moved by k jobs, which a dry run behind the pending scan is told (estimate_of).
STORED_STARTS = "forecasts:starts"
KEEP_S = 900
NO_ESTIMATE = "no estimate"
# A dry run's replays run in its request: they run at most this many passes (each at
# the next expected job end, or further ahead a stretch of backfill.FORECAST_STEP of the
# time looked ahead), so the request's work is bounded however long the queue is.
DRY_RUN_STEPS = 30
# Reasons no replay can end: they wait for an admin or a host, not for cores.
NOT_FOR_CORES = ("budget_exhausted", "no_hosts_of_family", "host_draining")


@dataclass(frozen=True)
class Estimate:
    start: datetime | None
    earliest: datetime | None
    latest: datetime | None
    reserved: bool  # the dispatcher's reservation rule holds its start (EASY)
    basis: str
    computed_at: datetime | None = None  # when the replay ran (None: not computed yet)
    missing: str = NO_ESTIMATE  # the summary when there is no start

    def as_dict(self) -> dict:
        iso = lambda t: t.isoformat() if t else None  # noqa: E731
        return {"estimated_start": iso(self.start), "earliest": iso(self.earliest), "latest": iso(self.latest),
                "in_s": _in_s(self.start), "summary": self.summary, "reserved": self.reserved, "basis": self.basis,
                "computed_at": iso(self.computed_at), "age_s": self.age_s, "age": self.age}

    @property
    def age_s(self) -> int | None:
        return max(0, int((timezone.now() - self.computed_at).total_seconds())) if self.computed_at else None

    @property
    def age(self) -> str:
        """"estimated 20 s ago", or "" before it is computed."""
        return f"estimated {_span(self.age_s)} ago" if self.computed_at else ""

    @property
    def summary(self) -> str:
        """"in about 12 min (5 min to 40 min)", "now", or why there is none."""
        if self.start is None:
            return self.missing
        point, low, high = _in_s(self.start), _in_s(self.earliest), _in_s(self.latest)
        text = "now" if point < 30 else f"in about {_span(point)}"
        if high is not None and low is not None and high - low >= 60:
            text += f" ({_span(low)} to {_span(high)})"
        return text + (", held by a reservation" if self.reserved else "")


@dataclass
class Snapshot:
    """What a replay starts from (read once): hosts, holders, the ordered queue."""

    hosts: dict[int, HostSlots]
    holders: dict[int, tuple[int, str, list[Member]]]  # job -> (team, family, (host, cores) per host it holds)
    active: dict[int, tuple[float, int]]  # job holding cores -> (start timestamp, time limit)
    order: list  # PendingRow-like, in dispatch order
    quotas: dict[tuple[int, str], tuple[int, int]]
    # More than PENDING_SCAN jobs are pending: the last of the oldest PENDING_SCAN (a
    # dispatch run's scan); the jobs after it come into the replay's view as older ones start.
    scanned_through: int | None = None

    @classmethod
    def read(cls, extra=None, family: str | None = None, rows: list | None = None) -> "Snapshot":
        """`extra`: a PendingRow-like job not in the database (a dry run), ordered with the rest.
        `family`: the snapshot of that family only (`only`), and only its hosts and holders read.
        `rows`: the pending rows, if the caller has read them (default: every pending job)."""
        from jobs.lifecycle.scheduler import host_slots, pending_order, pending_rows, stopping_replicas

        hosts = Host.objects.exclude(state=Host.State.OFFLINE).exclude(replay=True)
        allocations = CoreAllocation.objects.all()
        if family is not None:
            hosts, allocations = hosts.filter(family=family), allocations.filter(family=family)
        hosts = host_slots(hosts.only("id", "name", "family", "core_ids", "state", "network"))
        cores: dict[int, tuple[int, str, dict[int, list[int]]]] = {}
        for host_id, core, job_id, team_id, job_family in allocations.values_list(
                "host_id", "core", "job_id", "team_id", "family"):
            cores.setdefault(job_id, (team_id, job_family, {}))[2].setdefault(host_id, []).append(core)
        holders = {job_id: (team_id, job_family, [(h, tuple(sorted(c))) for h, c in sorted(by_host.items())])
                   for job_id, (team_id, job_family, by_host) in cores.items()}
        now = timezone.now()
        active = {pk: ((started or queued or now).timestamp(), limit) for pk, started, queued, limit in
                  Job.objects.filter(pk__in=list(holders)).values_list("pk", "started_at", "queued_at",
                                                                         "max_runtime_s")}
        for pk, back_by in stopping_replicas().items():
            if pk in active:  # a draining replica: its cores are back by then, not never
                active[pk] = (now.timestamp(), max(int(back_by - now.timestamp()), 1))
        rows = pending_rows(None) if rows is None else list(rows)
        scanned_through = rows[PENDING_SCAN - 1].pk if len(rows) > PENDING_SCAN else None
        rows += [extra] if extra is not None else []
        quotas = {(t, f): (g, b) for t, f, g, b in FamilyQuota.objects.values_list(
            "team_id", "family", "guaranteed_cores", "borrow_limit")}
        snap = cls(hosts, holders, active, pending_order(rows), quotas, scanned_through)
        return snap if family is None else snap.only(family)

    def only(self, family: str) -> "Snapshot":
        """What a replay of `family` reads: its hosts, the jobs holding its cores, its
        pending jobs in the whole queue's order, its teams' quotas."""
        holders = {pk: held for pk, held in self.holders.items() if held[1] == family}
        return Snapshot({pk: h for pk, h in self.hosts.items() if h.family == family}, holders,
                        {pk: a for pk, a in self.active.items() if pk in holders},
                        [r for r in self.order if r.family == family],
                        {key: q for key, q in self.quotas.items() if key[1] == family}, self.scanned_through)

    @property
    def in_view(self) -> bool:
        """Every job a replay starts is in a pass's view from the first pass (no more
        than PENDING_SCAN of them): then no family's starts bring another's jobs into
        view, and each family can be replayed on its own."""
        return sum(r.reason_code not in NOT_FOR_CORES for r in self.order) <= PENDING_SCAN


def replay(snap: Snapshot, ratios: dict[int, tuple[tuple[float, float, float], int]], which: int,
           now: float, until: int | None = None, max_steps: int = 100_000) -> dict:
    """One forecast with the ratio of index `which` (0 low, 1 median, None: time
    limits); `until`: only that job's start is wanted; `max_steps`: how many passes it
    may run (see backfill.forecast). Each pass looks at the oldest PENDING_SCAN jobs
    still waiting in the replay, as a dispatch run does."""
    def ratio(team_id: int) -> float:
        return 1.0 if which is None else ratios.get(team_id, ((1.0, 1.0, 1.0), 0))[0][which]

    running = {}
    limit_end = {}
    for job_id, (team_id, family, members) in snap.holders.items():
        started, limit = snap.active.get(job_id, (now, 1))  # no row: gone by now
        limit = time_limit_s(limit)  # infinite for a replica: it holds its cores until stopped
        running[job_id] = Running(job_id, team_id, family, members[0][0], members[0][1],
                                  estimated_end(started, limit, ratio(team_id), now), tuple(members[1:]))
        limit_end[job_id] = max(started + limit, now)
    # The replay's ratios also steer its gangs' reservations and the backfill around
    # them, as the dispatcher's do (scheduler.gang_ratios).
    teams = {r.team_id for r in snap.order} | {team_id for team_id, *_ in snap.holders.values()}
    state = FleetState(dict(snap.hosts), running, dict(snap.quotas), limit_end=limit_end,
                       ratios={team_id: ratio(team_id) for team_id in teams},
                       expected_end={job_id: run.end for job_id, run in running.items()})
    order = [Waiting(r.pk, r.team_id, r.family, r.cores, time_limit_s(r.max_runtime_s),
                     time_limit_s(r.max_runtime_s) * ratio(r.team_id),
                     r.host_count, r.same_network)
             for r in snap.order if r.reason_code not in NOT_FOR_CORES]
    return forecast(order, state, now, until=until, max_steps=max_steps, scan=PENDING_SCAN)


def estimates() -> dict[int, Estimate]:
    """Every pending job's estimated start, computed now (three whole replays: the
    periodic task's work, never a request's)."""
    return _estimates(Snapshot.read())


def store() -> dict:
    """Compute every pending job's estimate and store them for pages and the API
    (the periodic task jobs.estimate_starts)."""
    started = timezone.now()  # each estimate's own computed_at is a little later
    snap = Snapshot.read()
    out = _estimates(snap)
    cache = caches["shared"]
    cache.set_many({_key(pk): estimate for pk, estimate in out.items()}, timeout=KEEP_S)
    cache.set(STORED_STARTS, sorted(e.start.timestamp() for e in out.values() if e.start), timeout=KEEP_S)
    cache.set(STORED_RUN, (started, snap.scanned_through), timeout=KEEP_S)  # last: the run is complete
    return {"estimated": len(out), "scanned_through": snap.scanned_through}


@dataclass(frozen=True)
class Stored:
    estimates: dict[int, Estimate]  # of the jobs asked for that the last run estimated
    computed_at: datetime | None  # when the last run started (None: nothing stored)
    scanned_through: int | None  # that run's Snapshot.scanned_through


def stored(job_ids: list[int]) -> Stored:
    """The last run's estimates of `job_ids` (one cache read). Nothing when the
    cache cannot be read: a page says the estimate is being computed rather than fail."""
    try:
        got = caches["shared"].get_many([STORED_RUN, *(_key(pk) for pk in job_ids)])
    except Exception as exc:
        log.warning("could not read the stored start-time estimates (%s)", exc)
        return Stored({}, None, None)
    if STORED_RUN not in got:
        return Stored({}, None, None)
    computed_at, scanned_through = got[STORED_RUN]
    estimates = {pk: got[_key(pk)] for pk in job_ids
                 if _key(pk) in got and got[_key(pk)].computed_at >= computed_at}
    return Stored(estimates, computed_at, scanned_through)


def estimates_for(jobs) -> dict[int, Estimate]:
    """The stored estimate of each pending job of `jobs` (job id -> Estimate); a job
    the last run did not estimate (submitted since) gets one saying it is being
    computed. Nothing stored at all (a fresh start, or the task has not run for
    KEEP_S): the task is kicked."""
    pending = [job for job in jobs if job.status == Job.Status.PENDING and not job.cancel_requested]
    if not pending:
        return {}
    got = stored([job.pk for job in pending])
    if got.computed_at is None:
        kick()
    return {job.pk: got.estimates.get(job.pk) or _not_estimated() for job in pending}


def estimate_for(job: Job) -> Estimate | None:
    return estimates_for([job]).get(job.pk)


def kick() -> None:
    """Ask for a run now (the task is sent by name; at most once per interval)."""
    from webapp.celery import app

    try:
        if caches["shared"].add(KICK_FLAG, 1, timeout=settings.ESTIMATES_EVERY_S):
            app.send_task("jobs.estimate_starts")
    except Exception as exc:  # the periodic run computes them anyway
        log.warning("could not ask for start-time estimates now (%s)", exc)


def clear_cache() -> None:
    """Forget the stored estimates (tests, benches): pages show none until the next run."""
    caches["shared"].delete_many([STORED_RUN, STORED_STARTS, KICK_FLAG])


def _key(job_id: int) -> str:
    return f"forecasts:job:{job_id}"


def _not_estimated() -> Estimate:
    return Estimate(None, None, None, False, (
        f"the scheduler estimates every pending job every {settings.ESTIMATES_EVERY_S} s; "
        "this job's is not computed yet"), None, missing="estimate being computed")


def estimate_of(extra) -> Estimate | None:
    """The estimated start of `extra`, a PendingRow-like job not in the database (a
    dry run), ordered with the rest. Only its family is read and replayed (families
    are scheduled independently: see the module docstring), and only its start is
    wanted: the replays stop once it has started (the jobs behind it in the order are
    in them: they may backfill around it), or after DRY_RUN_STEPS passes, which bounds
    a request's work. It gets a start only if all three replays started it, so its
    start and range are those of the whole replays; else it gets how long it waits
    at least (the time the replays had reached) and says why there is no more. With
    PENDING_SCAN jobs pending already, the job would be behind the scan (`_behind_scan`;
    at most PENDING_SCAN - 1 pending rows are read)."""
    from jobs.lifecycle.scheduler import pending_rows

    waiting = Job.objects.filter(status=Job.Status.PENDING, cancel_requested=False).count()
    if waiting >= PENDING_SCAN:
        return _behind_scan(waiting)
    snap = Snapshot.read(extra, family=extra.family, rows=pending_rows(PENDING_SCAN - 1))
    estimate = _estimates(snap, until=extra.pk, max_steps=DRY_RUN_STEPS).get(extra.pk)
    if (estimate is None or estimate.latest is not None or extra.reason_code in NOT_FOR_CORES
            or estimate.missing != NO_ESTIMATE):  # every replay started it, or it already says why there is no start
        return estimate
    at_least = _in_s(estimate.earliest)
    missing = (f"in more than {_span(at_least)} (as far as a dry run looks)" if at_least is not None
               else "no estimate (later than a dry run looks)")
    return Estimate(None, estimate.earliest, None, False, (
        f"no estimate in a dry run: the replays (by the median, the 10th percentile and the time limits) would "
        f"not all start the job within the {DRY_RUN_STEPS} steps a dry run replays "
        f"(each to the next expected job end, or further ahead {FORECAST_STEP:.0%} of the time looked ahead); "
        f"once submitted, the periodic estimates (every {settings.ESTIMATES_EVERY_S} s) replay the whole queue"),
        estimate.computed_at, missing=missing)


def _behind_scan(waiting: int) -> Estimate:
    """A dry run's answer when `waiting` >= PENDING_SCAN jobs are pending: its job
    would come into view only once waiting - PENDING_SCAN + 1 of them have started, as
    jobs of any family start, which a request does not replay. The last periodic run's
    estimated starts say when that many will have (STORED_STARTS): the job starts no
    earlier, by those estimates. Without them (none stored, or fewer starts) there is
    no figure."""
    ahead = waiting - PENDING_SCAN + 1
    try:
        starts = caches["shared"].get(STORED_STARTS) or []
    except Exception as exc:
        log.warning("could not read the stored start-time estimates (%s)", exc)
        starts = []
    in_view = _when(starts[ahead - 1]) if len(starts) >= ahead else None
    basis = (f"no estimate in a dry run: {waiting} jobs are pending and the scheduler looks at the oldest "
             f"{PENDING_SCAN}; this job would come into view once {ahead} of them have started, which a dry run "
             f"does not replay")
    if in_view is not None and _in_s(in_view) > 0:
        return Estimate(None, in_view, None, False, (
            f"{basis}; by the periodic estimates (every {settings.ESTIMATES_EVERY_S} s) that many will have "
            f"started {_span(_in_s(in_view))} from now, and once submitted they estimate this job too"),
            timezone.now(), missing=f"in more than about {_span(_in_s(in_view))} "
                                    f"(behind the oldest {PENDING_SCAN} pending jobs)")
    return Estimate(None, None, None, False, (
        f"{basis}; once submitted, the periodic estimates (every {settings.ESTIMATES_EVERY_S} s) replay the "
        f"whole queue"), timezone.now(),
        missing=f"no estimate in a dry run (behind the oldest {PENDING_SCAN} pending jobs)")


def _estimates(snap: Snapshot, until: int | None = None, max_steps: int = 100_000) -> dict[int, Estimate]:
    """Each job's estimate from three replays of `snap`, of each family on its own
    while the whole queue is in view (Snapshot.in_view); `until`: of that job only,
    and the range's replays only if the median one started it. The range is every
    replay's start; without one of them it has no end (`latest`)."""
    ratios = team_ratios({r.team_id for r in snap.order} | {h[0] for h in snap.holders.values()})
    computed_at = timezone.now()
    now = computed_at.timestamp()
    families = sorted({r.family for r in snap.order if until is None or r.pk == until})
    mid, low, high = {}, {}, {}
    for part in [snap.only(family) for family in families] if snap.in_view else [snap]:
        mid.update(replay(part, ratios, 1, now, until, max_steps))
        started = until in mid and mid[until].start is not None
        if until is not None and not started:
            continue  # a dry run's job the median does not start gets no start (estimate_of), whatever the range
        low.update(replay(part, ratios, 0, now, until, max_steps))
        high.update(replay(part, ratios, None, now, until, max_steps))
    holding = Counter(family for _, family, _ in snap.holders.values())
    out = {}
    for row in snap.order:
        if until is not None and row.pk != until:
            continue
        starts = [f.start for f in (mid.get(row.pk), low.get(row.pk), high.get(row.pk)) if f and f.start is not None]
        point = mid.get(row.pk)
        if point and point.behind_unlimited and row.reason_code not in NOT_FOR_CORES:
            out[row.pk] = Estimate(None, None, None, point.reserved, (
                "no estimate: the job waits for cores held by endpoint replicas, which have no time limit: "
                "they run until their endpoint is scaled down or stopped"), computed_at,
                missing="no estimate (waiting for endpoint replicas to stop)")
            continue
        not_before = point.not_before if point else None  # no start: the replay stopped before one
        out[row.pk] = Estimate(_when(point.start if point else None), _when(min(starts, default=not_before)),
                               _when(max(starts)) if len(starts) == 3 else None, bool(point and point.reserved),
                               _basis(row, ratios, holding[row.family], snap.scanned_through), computed_at)
    return out


def _in_s(t: datetime | None) -> int | None:
    return max(0, int((t - timezone.now()).total_seconds())) if t else None


def _span(seconds: int) -> str:
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _when(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, tz=dt_timezone.utc) if ts is not None else None


def _basis(row, ratios, running: int, scanned_through: int | None = None) -> str:
    if row.reason_code in NOT_FOR_CORES:
        return "no estimate: the job waits for an admin or a host, not for cores"
    (low, mid, _), n = ratios.get(row.team_id, ((1.0, 1.0, 1.0), 0))
    replayed = (f"the scheduler's own placement and backfill rules replayed over the {running} "
                f"job{'s' if running != 1 else ''} holding {row.family} cores and the queue ahead")
    if scanned_through is not None and (row.pk < 0 or row.pk > scanned_through):
        replayed += (f" (more than {PENDING_SCAN} older jobs are pending and the scheduler looks at the oldest "
                     f"{PENDING_SCAN}: in the replay this job comes into view as they start)")
    if not n:
        return (f"{replayed}; runtimes = the time limits (the team has no finished jobs yet to scale them by); "
                "new jobs of higher priority can still move it")
    return (f"{replayed}; runtimes = time limits × the {mid:.0%} the team's jobs ran of their time limit (median "
            f"of the last {n} finished; {low:.0%} at the 10th percentile); range: that 10th percentile to the "
            "time limits themselves; new jobs of higher priority can still move it")
