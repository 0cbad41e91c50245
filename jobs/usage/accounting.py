"""Usage arithmetic: pure functions, no database, no Django.

Usage is derived from allocation intervals (JobAttempt rows: cores held from
`started_at` to `ended_at`, open while the job still holds them) and from the
per-minute utilization roll-up (MetricMinute rows). Everything here works on plain
values so the roll-up (jobs.usage_rollup), the live part of the pages
(jobs.selectors_usage) and the tests share one definition:

* Allocated core-seconds = cores × seconds held, split at midnight in the team's
  time zone. Preempted and requeued attempts count for the time they held cores;
  an open attempt counts up to "now".
* Utilization of a piece of an attempt = the mean `util_mean` of the job's per-core
  minute rows on that host whose midpoint falls in the piece. A piece with no such
  row is *unknown*: it counts as allocated, but neither as used nor as idle.
* used = allocated × measured utilization; idle = allocated − used (measured pieces
  only); cost = allocated core-hours × (instance price / instance cores).
* Queue wait = first start − submit, counted on the day of the first start.
* Job outcomes count on the day the job finished.
"""
from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from neuron_workers.readers.neuron_ls import INSTANCE_TYPES

UTC = timezone.utc
MINUTE = timedelta(minutes=1)
INTERRUPTED_OUTCOMES = frozenset({"requeued", "preempted"})
FINISHED_STATUSES = ("succeeded", "failed", "cancelled")


# --- time zones and days ----------------------------------------------------------

def zone(name: str | None) -> ZoneInfo:
    """The team's time zone; an unknown or empty name falls back to UTC rather than
    breaking a dashboard (the team form is where a bad name gets an error)."""
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def local_day(at: datetime, tz: ZoneInfo) -> date:
    return at.astimezone(tz).date()


def day_start(day: date, tz: ZoneInfo) -> datetime:
    """The instant local midnight starts `day` (a DST day is 23 or 25 hours long)."""
    return datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)


def days_between(first: date, last: date) -> list[date]:
    """Every day from first to last, both included (empty when last < first)."""
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def split_by_day(start: datetime, end: datetime, tz: ZoneInfo) -> list[tuple[date, datetime, datetime]]:
    """[start, end) cut at local midnights: (day, piece start, piece end) in order.
    An empty or negative interval gives no pieces."""
    pieces: list[tuple[date, datetime, datetime]] = []
    if end <= start:
        return pieces
    day = local_day(start, tz)
    cursor = start
    while cursor < end:
        boundary = day_start(day + timedelta(days=1), tz)
        piece_end = min(boundary, end)
        if piece_end > cursor:
            pieces.append((day, cursor, piece_end))
        cursor = max(piece_end, cursor)
        day += timedelta(days=1)
    return pieces


def day_fraction(now: datetime, tz: ZoneInfo) -> float:
    """How much of the local day `now` falls in has passed (0..1)."""
    today = local_day(now, tz)
    start, end = day_start(today, tz), day_start(today + timedelta(days=1), tz)
    return (now - start) / (end - start)


# --- prices -------------------------------------------------------------------------

@dataclass(frozen=True)
class Price:
    instance_type: str
    usd_per_hour: float
    cores: int
    source: str  # "on-demand default" or "admin"

    @property
    def usd_per_core_hour(self) -> float:
        return self.usd_per_hour / max(self.cores, 1)

    @property
    def usd_per_core_second(self) -> float:
        return self.usd_per_core_hour / 3600.0


def default_prices() -> dict[str, Price]:
    """On-demand us-east-1 prices from neuron.md §3 (UNCONFIRMED third-party figures;
    an admin overrides them with InstancePrice rows, e.g. for reserved capacity)."""
    return {name: Price(name, it.on_demand_usd_per_hour, it.cores, "on-demand default")
            for name, it in INSTANCE_TYPES.items() if it.on_demand_usd_per_hour is not None}


def price_table(overrides: Iterable[tuple[str, float, int]]) -> dict[str, Price]:
    """Defaults with (instance_type, usd_per_hour, cores) overrides on top."""
    prices = default_prices()
    for instance_type, usd_per_hour, cores in overrides:
        prices[instance_type] = Price(instance_type, float(usd_per_hour), int(cores), "admin")
    return prices


# --- queue-wait sketch --------------------------------------------------------------

class WaitSketch:
    """A mergeable histogram of wait times with log-spaced buckets (DDSketch-style):
    bucket 0 holds waits under a second; bucket b >= 1 holds [γ^(b-1), γ^b) seconds.
    A quantile read from it is within ±(γ-1)/(γ+1) ≈ 2.4 % of a true sample value,
    and merging two days is adding counts, so roll-ups can store one per row.
    Stored as {"bucket": count} (JSON object keys are strings)."""

    GAMMA = 1.05
    _LOG_GAMMA = math.log(GAMMA)

    @classmethod
    def bucket(cls, seconds: float) -> int:
        if seconds < 1.0:
            return 0
        return int(math.floor(math.log(seconds) / cls._LOG_GAMMA)) + 1

    @classmethod
    def value(cls, bucket: int) -> float:
        """The representative of a bucket: the point of least relative error."""
        if bucket <= 0:
            return 0.0
        low = cls.GAMMA ** (bucket - 1)
        return 2.0 * low * cls.GAMMA / (1.0 + cls.GAMMA)

    @classmethod
    def add(cls, sketch: dict[str, int], seconds: float, count: int = 1) -> dict[str, int]:
        key = str(cls.bucket(max(seconds, 0.0)))
        sketch[key] = sketch.get(key, 0) + count
        return sketch

    @staticmethod
    def merge(into: dict[str, int], other: Mapping[str, int]) -> dict[str, int]:
        for key, count in other.items():
            into[key] = into.get(key, 0) + int(count)
        return into

    @classmethod
    def quantile(cls, sketch: Mapping[str, int], q: float) -> float | None:
        """Nearest-rank quantile (the ceil(q·n)-th smallest sample); None when empty."""
        counts = sorted((int(k), int(v)) for k, v in sketch.items() if int(v) > 0)
        total = sum(v for _, v in counts)
        if total == 0:
            return None
        rank = max(1, math.ceil(q * total))
        seen = 0
        for bucket, count in counts:
            seen += count
            if seen >= rank:
                return cls.value(bucket)
        return cls.value(counts[-1][0])


# --- additive totals ----------------------------------------------------------------

@dataclass(slots=True)
class Totals:
    """The additive usage measures; mirrors jobs.models.UsageTotals field by field
    (a test checks that the two lists agree, and that `add` adds every field)."""

    core_seconds: float = 0.0
    measured_core_seconds: float = 0.0
    used_core_seconds: float = 0.0
    cost_usd: float = 0.0
    idle_cost_usd: float = 0.0
    unpriced_core_seconds: float = 0.0
    jobs_succeeded: int = 0
    jobs_failed: int = 0
    jobs_cancelled: int = 0
    attempts_interrupted: int = 0
    wait_count: int = 0
    wait_sum_s: float = 0.0
    wait_sketch: dict[str, int] = field(default_factory=dict)

    def add(self, other: Totals) -> Totals:
        """Add `other` into self (in place) and return self. Spelled out field by
        field: pages add thousands of these, and a getattr loop is 3x slower."""
        self.core_seconds += other.core_seconds
        self.measured_core_seconds += other.measured_core_seconds
        self.used_core_seconds += other.used_core_seconds
        self.cost_usd += other.cost_usd
        self.idle_cost_usd += other.idle_cost_usd
        self.unpriced_core_seconds += other.unpriced_core_seconds
        self.jobs_succeeded += other.jobs_succeeded
        self.jobs_failed += other.jobs_failed
        self.jobs_cancelled += other.jobs_cancelled
        self.attempts_interrupted += other.attempts_interrupted
        self.wait_count += other.wait_count
        self.wait_sum_s += other.wait_sum_s
        if other.wait_sketch:
            WaitSketch.merge(self.wait_sketch, other.wait_sketch)
        return self

    @classmethod
    def from_mapping(cls, row: Mapping) -> Totals:
        """From a roll-up row's values (missing fields are zero)."""
        totals = cls(**{name: row.get(name) or 0 for name in NUMERIC_FIELDS})
        totals.wait_sketch = dict(row.get("wait_sketch") or {})
        return totals

    @property
    def core_hours(self) -> float:
        return self.core_seconds / 3600.0

    @property
    def used_core_hours(self) -> float:
        return self.used_core_seconds / 3600.0

    @property
    def idle_core_hours(self) -> float:
        return max(self.measured_core_seconds - self.used_core_seconds, 0.0) / 3600.0

    @property
    def unknown_core_hours(self) -> float:
        return max(self.core_seconds - self.measured_core_seconds, 0.0) / 3600.0

    @property
    def utilization(self) -> float | None:
        """used / measured (0..1), None when nothing was measured ("unknown", not 0)."""
        if self.measured_core_seconds <= 0:
            return None
        return self.used_core_seconds / self.measured_core_seconds

    @property
    def efficiency(self) -> float | None:
        """used / allocated (0..1): the share of the NeuronCore-hours paid for that did
        work. Unlike `utilization`, hours without a measurement count as not used.
        None when nothing was allocated."""
        if self.core_seconds <= 0:
            return None
        return self.used_core_seconds / self.core_seconds

    @property
    def jobs_finished(self) -> int:
        return self.jobs_succeeded + self.jobs_failed + self.jobs_cancelled

    @property
    def wait_mean_s(self) -> float | None:
        return self.wait_sum_s / self.wait_count if self.wait_count else None


NUMERIC_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Totals) if f.name != "wait_sketch")
TOTAL_FIELDS: tuple[str, ...] = NUMERIC_FIELDS + ("wait_sketch",)


def outcome_rates(totals: Totals) -> dict[str, float | None]:
    """Share of finished jobs that succeeded / failed / were cancelled (None if none finished)."""
    n = totals.jobs_finished
    return {
        "success": totals.jobs_succeeded / n if n else None,
        "failure": totals.jobs_failed / n if n else None,
        "cancel": totals.jobs_cancelled / n if n else None,
    }


# --- attempts into pieces -----------------------------------------------------------

@dataclass(frozen=True)
class Dims:
    """What a usage row is keyed by, besides its day."""

    team_id: int
    user_id: int | None
    kind: str
    family: str
    instance_type: str


@dataclass(frozen=True)
class AttemptRow:
    """An attempt as the roll-up sees it, with the job's fold progress."""

    job_id: int
    number: int
    dims: Dims
    host_id: int | None
    cores: int
    started_at: datetime
    ended_at: datetime | None
    outcome: str
    job_created_at: datetime
    time_zone: str
    folded_n: int = 0  # attempts of this job numbered <= folded_n are fully folded
    folded_until: datetime | None = None  # attempt folded_n + 1 is folded up to here


@dataclass(frozen=True)
class Piece:
    """Part of one attempt on one local day: [start, end)."""

    job_id: int
    number: int
    dims: Dims
    host_id: int | None
    cores: int
    day: date
    start: datetime
    end: datetime

    @property
    def core_seconds(self) -> float:
        return self.cores * (self.end - self.start).total_seconds()


@dataclass
class Progress:
    """Where the fold of one job stands after a plan (see JobUsage)."""

    team_id: int
    attempt_folded: int
    folded_until: datetime | None
    instance_type: str
    last_day: date | None  # local day of the latest folded piece (or of the attempt's start)


@dataclass
class Plan:
    pieces: list[Piece] = field(default_factory=list)
    events: list[tuple[date, Dims, Totals]] = field(default_factory=list)  # waits, interruptions
    progress: dict[int, Progress] = field(default_factory=dict)


def plan_attempts(rows: Iterable[AttemptRow], upto: datetime) -> Plan:
    """What is not yet folded of these attempts, up to `upto`.

    For each attempt past the job's progress: the piece from where the fold stopped
    (or its start) to min(end, upto), split at local midnights; its queue wait when
    it is the job's first attempt and untouched; an interruption when it ended
    requeued or preempted. `progress` says how far each job is folded afterwards:
    an attempt that ended by `upto` is fully folded, an open one up to `upto`.
    Rows must come sorted by (job_id, number)."""
    plan = Plan()
    for row in rows:
        state = plan.progress.get(row.job_id) or Progress(
            row.dims.team_id, row.folded_n, row.folded_until, row.dims.instance_type, None)
        if row.number <= state.attempt_folded:
            continue
        tz = zone(row.time_zone)
        state.last_day = state.last_day or local_day(row.started_at, tz)
        touched = row.number == state.attempt_folded + 1 and state.folded_until is not None
        begin = state.folded_until if touched else row.started_at
        end = min(row.ended_at or upto, upto)
        for day, start, stop in split_by_day(begin, end, tz):
            plan.pieces.append(Piece(row.job_id, row.number, row.dims, row.host_id, row.cores, day, start, stop))
            state.last_day = day
        if row.number == 1 and not touched and row.started_at < upto:
            wait = max((row.started_at - row.job_created_at).total_seconds(), 0.0)
            plan.events.append((local_day(row.started_at, tz), row.dims, Totals(
                wait_count=1, wait_sum_s=wait, wait_sketch=WaitSketch.add({}, wait))))
        done = row.ended_at is not None and row.ended_at <= upto
        if done and row.outcome in INTERRUPTED_OUTCOMES:
            plan.events.append((local_day(row.ended_at, tz), row.dims, Totals(attempts_interrupted=1)))
        if done:
            state.attempt_folded, state.folded_until = row.number, None
        elif end > begin:
            state.attempt_folded, state.folded_until = row.number - 1, end
        state.instance_type = row.dims.instance_type
        plan.progress[row.job_id] = state
    return plan


# --- measurements -------------------------------------------------------------------

@dataclass(frozen=True)
class MinuteRow:
    """Per-core utilization of one job on one host, summed over one minute."""

    job_id: int
    host_id: int
    minute: datetime
    samples: int  # per-core minute rows
    util_sum: float  # sum of their util_mean (percent)


def measure(pieces: Sequence[Piece], minutes: Iterable[MinuteRow]) -> list[tuple[int, float]]:
    """(per-core minute rows, sum of util_mean) for each piece, in order.

    A minute row belongs to the piece of its job and host that contains the
    minute's midpoint, so consecutive pieces never count a minute twice."""
    by_attempt: dict[tuple[int, int | None], list[int]] = defaultdict(list)
    for i, piece in enumerate(pieces):
        by_attempt[(piece.job_id, piece.host_id)].append(i)
    starts = {key: [pieces[i].start for i in idx] for key, idx in by_attempt.items()}
    result = [(0, 0.0)] * len(pieces)
    half = MINUTE / 2
    for row in minutes:
        key = (row.job_id, row.host_id)
        idx = by_attempt.get(key)
        if not idx:
            continue
        mid = row.minute + half
        pos = bisect.bisect_right(starts[key], mid) - 1
        if pos < 0:
            continue
        i = idx[pos]
        if not (pieces[i].start <= mid < pieces[i].end):
            continue
        samples, total = result[i]
        result[i] = (samples + row.samples, total + row.util_sum)
    return result


def piece_totals(piece: Piece, measurement: tuple[int, float], prices: Mapping[str, Price]) -> Totals:
    """Allocated, measured, used core-seconds and cost of one piece."""
    return allocation_totals(piece.core_seconds, piece.dims.instance_type, measurement, prices)


def allocation_totals(core_seconds: float, instance_type: str, measurement: tuple[int, float],
                      prices: Mapping[str, Price]) -> Totals:
    """Allocated, measured, used core-seconds and cost of `core_seconds` held on
    `instance_type`, measured as (per-core minute rows, sum of util_mean)."""
    price = prices.get(instance_type)
    totals = Totals(core_seconds=core_seconds)
    if price is None:
        totals.unpriced_core_seconds = core_seconds
    else:
        totals.cost_usd = core_seconds * price.usd_per_core_second
    samples, util_sum = measurement
    if samples > 0:
        utilization = min(max(util_sum / samples / 100.0, 0.0), 1.0)
        totals.measured_core_seconds = core_seconds
        totals.used_core_seconds = core_seconds * utilization
        if price is not None:
            totals.idle_cost_usd = (core_seconds - totals.used_core_seconds) * price.usd_per_core_second
    return totals


@dataclass(frozen=True)
class Contribution:
    """Usage to add to the row keyed (day, dims); job_id says whose (None for
    job-less events such as outcome counts that need no per-job total)."""

    day: date
    dims: Dims
    totals: Totals
    job_id: int | None = None


def contributions(plan: Plan, measurements: Sequence[tuple[int, float]],
                  prices: Mapping[str, Price]) -> list[Contribution]:
    out = [Contribution(p.day, p.dims, piece_totals(p, m, prices), p.job_id)
           for p, m in zip(plan.pieces, measurements)]
    out.extend(Contribution(day, dims, totals) for day, dims, totals in plan.events)
    return out


@dataclass(frozen=True)
class OutcomeRow:
    """A finished job whose outcome is not yet counted."""

    job_id: int
    dims: Dims
    status: str
    finished_at: datetime
    time_zone: str


def outcome_contributions(rows: Iterable[OutcomeRow]) -> list[Contribution]:
    out = []
    for row in rows:
        if row.status not in FINISHED_STATUSES:
            continue
        totals = Totals(**{f"jobs_{row.status}": 1})
        out.append(Contribution(local_day(row.finished_at, zone(row.time_zone)), row.dims, totals, row.job_id))
    return out


def group(contribs: Iterable[Contribution], key) -> dict:
    """Sum contributions by key(contribution) -> Totals."""
    sums: dict = {}
    for c in contribs:
        k = key(c)
        if k not in sums:
            sums[k] = Totals()
        sums[k].add(c.totals)
    return sums


# --- ranges, series, burn-down ------------------------------------------------------

RANGE_CHOICES = {"7d": 7, "30d": 30, "90d": 90}
DEFAULT_RANGE = "30d"
MAX_RANGE_DAYS = 366


class RangeError(ValueError):
    """Bad range input: errors maps each field (range, from, to) to its messages."""

    def __init__(self, errors: dict[str, list[str]]):
        super().__init__("; ".join(f"{k}: {' '.join(v)}" for k, v in errors.items()))
        self.errors = errors


def _parse_day(text: str) -> date | None:
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        return None


def parse_range(params: Mapping[str, str], today: date) -> tuple[str, date, date]:
    """(range name, first day, last day) from `range` (7d/30d/90d/custom) and
    `from` / `to` (YYYY-MM-DD, both included). from/to without a range name mean
    custom; neither means the default 30 days ending today. Raises RangeError."""
    name = (params.get("range") or "").strip()
    raw_from, raw_to = (params.get("from") or "").strip(), (params.get("to") or "").strip()
    if not name:
        name = "custom" if raw_from or raw_to else DEFAULT_RANGE
    if name in RANGE_CHOICES:
        return name, today - timedelta(days=RANGE_CHOICES[name] - 1), today
    if name != "custom":
        raise RangeError({"range": [f"{name!r} is not a range; choose 7d, 30d, 90d or custom."]})
    errors: dict[str, list[str]] = {}
    first = _parse_day(raw_from) if raw_from else None
    last = _parse_day(raw_to) if raw_to else today
    if not raw_from:
        errors["from"] = ["Enter the first day of the range (YYYY-MM-DD)."]
    elif first is None:
        errors["from"] = [f"{raw_from!r} is not a date; use YYYY-MM-DD."]
    if last is None:
        errors["to"] = [f"{raw_to!r} is not a date; use YYYY-MM-DD."]
    elif last > today:
        errors["to"] = [f"must not be after today ({today.isoformat()} in the team's time zone)."]
    if first and last and not errors:
        if first > last:
            errors["to"] = [f"must be on or after from ({first.isoformat()})."]
        elif (last - first).days + 1 > MAX_RANGE_DAYS:
            errors["from"] = [f"the range is {(last - first).days + 1} days; at most {MAX_RANGE_DAYS} are shown."]
    if errors:
        raise RangeError(errors)
    return "custom", first, last


@dataclass
class BurnDown:
    """The month's NeuronCore-hour budget against cumulative use, with a forecast.

    `actual` is cumulative use at the end of each day up to today (today: so far),
    None after; `forecast` continues it linearly from now at `rate_per_day` (the
    mean burn of the last `window_days` days plus today so far), None before today.
    status: "no_budget", "exhausted" (run_out_day is when it was crossed),
    "runs_out" (forecast crosses the budget this month on run_out_day),
    "within_budget" (it does not, at this rate)."""

    days: list[date]
    actual: list[float | None]
    forecast: list[float | None]
    budget: float | None
    used: float
    rate_per_day: float
    run_out_day: date | None
    status: str
    month_end_forecast: float


FORECAST_HORIZON_DAYS = 3660


def burn_down(daily_hours: Mapping[date, float], *, today: date, fraction_of_today: float,
              budget: float | None, window_days: int = 7) -> BurnDown:
    month_start = today.replace(day=1)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    days = days_between(month_start, next_month - timedelta(days=1))
    actual: list[float | None] = []
    running = 0.0
    crossed: date | None = None
    for day in days:
        if day > today:
            actual.append(None)
            continue
        running += daily_hours.get(day, 0.0)
        actual.append(running)
        if budget is not None and crossed is None and running >= budget > 0:
            crossed = day
    used = running
    window = days_between(today - timedelta(days=window_days), today)
    elapsed_days = window_days + fraction_of_today
    rate = sum(daily_hours.get(day, 0.0) for day in window) / elapsed_days if elapsed_days > 0 else 0.0
    forecast: list[float | None] = []
    for day in days:
        if day < today:
            forecast.append(None)
        else:
            forecast.append(used + rate * ((day - today).days + 1 - fraction_of_today))
    month_end = forecast[-1] if forecast and forecast[-1] is not None else used
    run_out: date | None = None
    if budget is None or budget <= 0:
        status = "no_budget"
    elif crossed is not None:
        status, run_out = "exhausted", crossed
    elif rate > 0:
        days_left = math.floor(fraction_of_today + (budget - used) / rate)
        # A trickle against a large budget runs out centuries away (past date.max):
        # beyond FORECAST_HORIZON_DAYS there is no day worth naming.
        run_out = today + timedelta(days=days_left) if days_left <= FORECAST_HORIZON_DAYS else None
        status = "runs_out" if run_out is not None and run_out < next_month else "within_budget"
    else:
        status = "within_budget"
    return BurnDown(days, actual, forecast, budget, used, rate, run_out, status, month_end)
