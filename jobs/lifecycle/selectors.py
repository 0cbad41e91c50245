"""Reads for pages (and the API where it shares them): querysets with the joins a
page needs, log and event windows, series for charts. No writes here."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

from django.db.models import Count, F, QuerySet
from django.db.models.functions import Mod

from jobs.assets import storage
from jobs.models import (Artifact, CoreAllocation, FamilyQuota, GangMember, Host, Job, JobEvent, JobLogChunk, JobMetric,
                         Team)

LOG_TAIL_BYTES = 64 * 1024  # what the job page shows of a long log before following it
LOG_WINDOW_BYTES = 256 * 1024  # at most this much log per status poll
MAX_CHART_POINTS = 2000  # a loss curve is thinned to about this many points
OUTPUT_ROWS = 100  # rows of outputs.jsonl shown on the job page
OUTPUT_CELL_CHARS = 4000  # a prompt / output longer than this is cut for display


# --- jobs -------------------------------------------------------------------------

def team_jobs(team: Team, *, status: str = "", kind: str = "") -> QuerySet[Job]:
    """The team's jobs, newest first, with every relation the job list shows joined
    in (one query per page, whatever its length)."""
    jobs = Job.objects.filter(team=team).select_related("user", "model", "host")
    if status:
        jobs = jobs.filter(status=status)
    if kind:
        jobs = jobs.filter(kind=kind)
    return jobs.order_by("-id")


@dataclass(frozen=True)
class JobPage:
    """One page of a keyset-paginated job list, newest first. `newer_than` /
    `older_than` are the ids the "Newer" / "Older" links pass as ?after= / ?before=
    (None when there is nothing that way)."""

    jobs: list[Job]
    newer_than: int | None
    older_than: int | None


def job_page(jobs: QuerySet[Job], *, before: int | None = None, after: int | None = None,
             size: int = 50) -> JobPage:
    """`size` jobs of `jobs` (any order; newest first is imposed) by id cursor:
    older than `before`, newer than `after`, else the newest. One query of size+1
    rows (two when a Newer page reaches the newest jobs, which then shows the first
    page): never a COUNT, so the cost does not grow with the team's history."""
    if after is not None:
        rows = list(jobs.filter(pk__gt=after).order_by("id")[:size + 1])
        if len(rows) > size:
            page = rows[:size][::-1]
            return JobPage(page, page[0].pk, page[-1].pk)
        before = None  # reached the newest jobs: show the first page
    if before is not None:
        jobs = jobs.filter(pk__lt=before)
    rows = list(jobs.order_by("-id")[:size + 1])
    page = rows[:size]
    newer = page[0].pk if page and before is not None else None
    older = page[-1].pk if len(rows) > size else None
    return JobPage(page, newer, older)


def live_reasons(jobs: Iterable[Job]) -> dict[int, str]:
    """The waiting sentence of each pending job whose reason is one of
    policy.LIVE_REASONS, with the figures as they are now (the dispatcher stores those
    sentences only when the code changes). A fixed number of queries however many
    jobs; none when no job needs it."""
    from jobs.quotas.policy import LIVE_REASONS, FamilyState, waiting_sentence

    waiting = [j for j in jobs if j.status == Job.Status.PENDING and j.reason_code in LIVE_REASONS]
    if not waiting:
        return {}
    families = {j.family for j in waiting}
    teams = {j.team_id for j in waiting}
    free: dict[str, int] = dict.fromkeys(families, 0)
    total: dict[str, int] = dict.fromkeys(families, 0)
    idle: dict[tuple[str, int], int] = {}
    # The hosts a dispatch places on (not offline, not replaying); draining hosts count in the total only.
    for family, core_ids, state, held in (Host.objects.filter(family__in=families).exclude(state=Host.State.OFFLINE)
                                          .exclude(replay=True).annotate(held=Count("allocations"))
                                          .values_list("family", "core_ids", "state", "held")):
        size = len(core_ids or ())
        total[family] += size
        if state != Host.State.DRAINING:
            free[family] += size - held
            if not held:
                idle[(family, size)] = idle.get((family, size), 0) + 1
    in_use = {(t, f): n for t, f, n in CoreAllocation.objects.filter(team_id__in=teams, family__in=families)
              .values_list("team_id", "family").annotate(n=Count("id")).order_by()}
    quotas = {(t, f): (g, b) for t, f, g, b in FamilyQuota.objects.filter(team_id__in=teams, family__in=families)
              .values_list("team_id", "family", "guaranteed_cores", "borrow_limit")}
    slugs = dict(Team.objects.filter(pk__in=teams).values_list("pk", "slug"))
    out = {}
    for job in waiting:
        guaranteed, borrow = quotas.get((job.team_id, job.family), (0, 0))
        fam = FamilyState(guaranteed, borrow, in_use.get((job.team_id, job.family), 0), free[job.family],
                          total[job.family])
        sentence = waiting_sentence(job.reason_code, slugs.get(job.team_id, str(job.team_id)), job.family, job.cores,
                                    job.host_count, job.same_network, fam,
                                    idle.get((job.family, job.cores // max(job.host_count, 1)), 0))
        if sentence is not None:
            out[job.pk] = sentence
    return out


def show_live_reasons(jobs: Iterable[Job]) -> None:
    """Set each pending job's `reason` (in memory, never saved) to live_reasons' sentence:
    what every page and API answer that shows a waiting job's reason calls first."""
    jobs = list(jobs)
    live = live_reasons(jobs)
    for job in jobs:
        if job.pk in live:
            job.reason = live[job.pk]


def _family_queue(job: Job) -> list:
    """The pending jobs of `job`'s family in the order the dispatcher works
    (jobs.scheduler.pending_order over the same rows dispatch reads). The whole
    queue is ordered, since fair share charges a team across families."""
    from jobs.lifecycle.scheduler import pending_order, pending_rows

    return [row for row in pending_order(pending_rows()) if row.family == job.family]


def queue_position(job: Job, queue: list | None = None) -> int | None:
    """1-based place of a pending job among the pending jobs of its family, in
    dispatch order (kind priority, fair share, submission); None unless the job is
    pending (or when it is beyond the rows one dispatch run looks at)."""
    if job.status != Job.Status.PENDING:
        return None
    queue = _family_queue(job) if queue is None else queue
    return next((i for i, row in enumerate(queue, 1) if row.pk == job.pk), None)


def queue_ahead(job: Job, limit: int = 5, queue: list | None = None) -> list[dict]:
    """The first `limit` jobs ahead of a pending job in its family's queue, next to
    run first. The job's own team's jobs show id, kind and cores; another team's
    show only its team slug and cores (a user may see who is ahead, not what they
    run)."""
    if job.status != Job.Status.PENDING:
        return []
    queue = _family_queue(job) if queue is None else queue
    ahead = []
    for row in queue:
        if row.pk == job.pk or len(ahead) >= limit:
            break
        mine = row.team_id == job.team_id
        ahead.append({"id": row.pk if mine else None, "team": row.team_slug, "kind": row.kind if mine else None,
                      "cores": row.cores, "mine": mine})
    return ahead


def pending_explanation(job: Job, limit: int = 5) -> dict:
    """Why a job waits, for the job page and GET /api/v1/jobs/{id}/pending: the
    dispatcher's last reason code and sentence, the job's place in the queue and who
    is ahead (the queue is ordered once for both)."""
    pending = job.status == Job.Status.PENDING
    show_live_reasons([job])
    queue = _family_queue(job) if pending else []
    position = queue_position(job, queue) if pending else None
    from jobs.quotas.policy import REASON_HINTS

    return {
        "status": job.status, "reason_code": job.reason_code if pending else "",
        "reason": job.reason if pending else "", "hint": REASON_HINTS.get(job.reason_code, "") if pending else "",
        "family": job.family, "position": position,
        "queue_length": len(queue), "ahead": queue_ahead(job, limit, queue) if pending else [],
        "estimate": _estimate(job) if pending else None,
    }


def _estimate(job: Job) -> dict | None:
    """The job's estimated start, range and what it is based on (jobs.lifecycle.forecasts)."""
    from jobs.lifecycle.forecasts import estimate_for

    estimate = estimate_for(job)
    return estimate.as_dict() if estimate else None


def job_events(job: Job, *, after_id: int = 0) -> list[JobEvent]:
    """The job's timeline (events with id > after_id), oldest first, actor joined."""
    return list(JobEvent.objects.filter(job=job, pk__gt=after_id).select_related("actor").order_by("at", "id"))


@dataclass(frozen=True)
class LogWindow:
    text: str
    start: int  # byte offset of text[0] in the whole log
    end: int  # byte offset just past the text: the next poll asks from here
    truncated: bool  # True when bytes before `start` exist that are not shown


def log_since(job: Job, offset: int, max_bytes: int = LOG_WINDOW_BYTES) -> LogWindow:
    """Log bytes from `offset` on (at most max_bytes, whole chunks after the first).

    Chunks are stored with their byte offset; an offset inside a chunk is honoured by
    slicing that chunk's bytes, so a client that follows with `end` never sees a
    line twice. Bytes cut in the middle of a UTF-8 character are replaced."""
    offset = max(offset, 0)
    first = (JobLogChunk.objects.filter(job=job, offset__lte=offset).order_by("-offset")
             .values_list("offset", flat=True).first())
    chunks = JobLogChunk.objects.filter(job=job, offset__gte=first if first is not None else offset).order_by("offset")
    parts: list[bytes] = []
    end = offset
    size = 0
    for chunk_offset, text in chunks.values_list("offset", "text").iterator():
        data = text.encode("utf-8")
        if chunk_offset + len(data) <= offset:
            continue
        data = data[max(offset - chunk_offset, 0):]
        if parts and size + len(data) > max_bytes:
            break
        parts.append(data)
        size += len(data)
        end = max(chunk_offset, offset) + len(data)
    return LogWindow(b"".join(parts).decode("utf-8", errors="replace"), offset, end, offset > 0)


def log_tail(job: Job, max_bytes: int = LOG_TAIL_BYTES) -> LogWindow:
    """The last ~max_bytes of the log (from a chunk boundary), for the first page load."""
    start = max(job.log_bytes - max_bytes, 0)
    window = log_since(job, start, max_bytes=max(job.log_bytes - start, max_bytes))
    cut = window.text.find("\n") if start > 0 else -1
    if cut < 0:
        return window
    # Begin on a whole line; the bytes dropped count as "before the window".
    dropped = len(window.text[:cut + 1].encode("utf-8"))
    return LogWindow(window.text[cut + 1:], window.start + dropped, window.end, True)


# --- results ----------------------------------------------------------------------

def loss_series(job: Job, max_points: int = MAX_CHART_POINTS) -> tuple[list[int], list[float]]:
    """(steps, losses) of a fine-tune from its JobMetric rows, thinned in the database
    to about max_points by keeping every n-th step; falls back to the loss list in the
    job's result when no rows were recorded (e.g. an old job).

    One curve across attempts: a resumed attempt trains again the steps after its
    checkpoint, so a step may have a row from each; the later row (the attempt that
    went on) wins."""
    rows = JobMetric.objects.filter(job=job, name="loss")
    count = rows.count()
    if count == 0:
        losses = [v for v in (job.result or {}).get("losses") or [] if isinstance(v, (int, float))]
        return list(range(1, len(losses) + 1)), [float(v) for v in losses]
    stride = max(count // max_points, 1)
    if stride > 1:
        rows = rows.annotate(keep=Mod(F("step"), stride)).filter(keep=0)
    by_step: dict[int, float] = {}
    for step, value in rows.order_by("step", "id").values_list("step", "value"):
        by_step[step] = value
    return list(by_step), list(by_step.values())


def resume_steps(job: Job) -> list[int]:
    """The steps later attempts resumed from (the "resumed" events a fine-tune reports)."""
    return [data.get("step") for data in JobEvent.objects.filter(job=job, kind="resumed").order_by("id")
            .values_list("data", flat=True) if isinstance(data.get("step"), int)]


TRAINING_STAGES = ("prepare", "precompile", "train", "save")


def training_stages(job: Job) -> list[dict]:
    """The fine-tune's stages in the latest attempt that reported any: each stage's
    name, state (waiting, started, done, skipped) and message."""
    rows = list(JobEvent.objects.filter(job=job, kind="stage").order_by("id").values_list("data", "message"))
    if not rows:
        return []
    latest = max((data.get("attempt") or 0) for data, _ in rows)
    state = {name: {"name": name, "state": "waiting", "message": ""} for name in TRAINING_STAGES}
    for data, message in rows:
        name = data.get("stage")
        if (data.get("attempt") or 0) == latest and name in state:
            state[name] = {"name": name, "state": data.get("state") or "", "message": message}
    return list(state.values())


RANK_METRIC_PREFIX = "samples_per_s.r"


def rank_progress(job: Job) -> list[dict]:
    """Each rank's last reported step and throughput (samples/s), from the rows every
    rank writes every few steps (name "samples_per_s.r<rank>")."""
    names = (JobMetric.objects.filter(job=job, name__startswith=RANK_METRIC_PREFIX).values_list("name", flat=True)
             .distinct())
    progress = []
    for name in sorted(names):
        row = (JobMetric.objects.filter(job=job, name=name).order_by("-step", "-id").values("step", "value").first())
        rank = name[len(RANK_METRIC_PREFIX):]
        if row and rank.isdigit():
            progress.append({"rank": int(rank), "step": row["step"], "samples_per_s": row["value"]})
    return sorted(progress, key=lambda p: p["rank"])


@dataclass(frozen=True)
class OutputRow:
    index: int | str
    prompt: str
    output: str
    new_tokens: int | str
    latency_ms: float | str


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= OUTPUT_CELL_CHARS else text[:OUTPUT_CELL_CHARS] + "…"


def _output_rows(lines: Iterator[str]) -> Iterator[OutputRow]:
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            yield OutputRow(number, "", f"(line {number} of outputs.jsonl is not a JSON object)", "", "")
            continue
        yield OutputRow(row.get("index", number - 1), _cell(row.get("prompt", "")), _cell(row.get("output", "")),
                        row.get("new_tokens", ""), row.get("latency_ms", ""))


def inference_outputs(job: Job, limit: int = OUTPUT_ROWS) -> list[OutputRow]:
    """The first `limit` rows of the job's outputs.jsonl artifact ([] when absent)."""
    artifact = Artifact.objects.filter(job=job, name="outputs.jsonl", is_dir=False).first()
    if artifact is None:
        return []
    try:
        with storage.abs_path(artifact.path).open(encoding="utf-8", errors="replace") as f:
            return list(islice(_output_rows(line for line in f if line.strip()), limit))
    except (OSError, ValueError):  # file gone from shared storage, or a bad stored path
        return []


# --- models -----------------------------------------------------------------------


def compiler_allow_list() -> list[tuple[str, str]]:
    """(flag, accepted values) of the neuronx-cc options a compile job may pass, for
    the compile form's help. Read from the validator's own tables so the help can
    never drift from what is enforced."""
    from neuron_workers.backends import compiler_options as co

    rows = [(flag, " | ".join(values)) for flag, values in getattr(co, "_VALUED_FLAGS", {}).items()]
    rows.append(("-O1, -O2, -O3", "short for --optlevel"))
    rows.extend((alias, f"short for {flag}") for alias, flag in getattr(co, "_ALIASES", {}).items())
    rows.extend((flag, "on/off switch") for flag in getattr(co, "_BOOLEAN_FLAGS", ()))
    only = getattr(co, "_TARGET_ONLY", {})
    return [(flag, f"{values} (only for {', '.join(only[flag])})" if flag in only else values)
            for flag, values in rows]


def gang_utilization(job: Job) -> list[dict] | None:
    """Every host of a placed gang, its rank's cores' utilization over the attempt
    (jobs.live.metrics.gang_host_util: rank, host, t, util, now), for the job page's
    per-host chart and its rank table. None for a one-host job, a gang not placed or
    not started, or when Redis does not answer (the page then says so)."""
    if job.host_count <= 1 or job.started_at is None:
        return None
    import redis as redis_lib

    from jobs.live.metrics import RankCores, gang_host_util

    ranks = [RankCores(rank, host, list(range(start, start + cores))) for rank, host, start, cores in
             GangMember.objects.filter(job=job, host__isnull=False).order_by("rank").values_list(
                 "rank", "host__name", "core_start", "cores")]
    if not ranks:
        return None
    end = int(job.finished_at.timestamp() * 1000) if job.finished_at else None
    try:
        return gang_host_util(ranks, int(job.started_at.timestamp() * 1000), end)
    except redis_lib.RedisError:
        return None


def gang_ranks(job: Job) -> list[dict]:
    """A multi-host job's ranks, rank order: host, cores, state, last heartbeat, exit
    (for the job page, its status poll and the API). [] for a one-host job, and for a
    gang between a requeue and its next placement (its ranks belong to a placement)."""
    if job.host_count <= 1:
        return []
    rows = GangMember.objects.filter(job=job).order_by("rank").values_list(
        "rank", "host__name", "core_start", "cores", "state", "started_at", "heartbeat_at", "finished_at",
        "exit_code", "detail")
    return [{"rank": rank, "host": host, "cores": GangMember(core_start=start, cores=cores).core_range,
             "state": state, "started_at": started, "heartbeat_at": beat, "finished_at": finished,
             "exit_code": exit_code, "detail": detail}
            for rank, host, start, cores, state, started, beat, finished, exit_code, detail in rows]
