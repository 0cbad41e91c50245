"""Writes that span models or have side effects: submit, cancel, uploads, outcomes.
Status changes go through jobs.states; messages are sent only after commit."""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from jobs.lifecycle import states
from jobs.lifecycle.forms import JobBaseForm
from jobs.models import (
    Family,
    Host,
    Job,
    JobEvent,
    Kind,
    KindPriority,
    ModelAsset,
    Role,
    Team,
    TeamQuota,
)
from jobs.quotas.placement import HostSlots, largest_request
from jobs.quotas.policy import SubmitLimits, SubmitState, check_submit
from jobs.teams import access

log = logging.getLogger(__name__)

DEFAULT_KIND_PRIORITY = {Kind.INFERENCE: 30, Kind.COMPILE: 20, Kind.FINETUNE: 10}


class SubmitRefused(Exception):
    """A submission refused by a hard limit: a 4xx with a reason code and a sentence."""

    def __init__(self, code: str, message: str, field: str | None = None, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.field, self.status = code, message, field, status


# --- submit -----------------------------------------------------------------------

def core_hours_this_month(team_id: int) -> float:
    """NeuronCore-hours the team used this (team-local) month: the usage roll-up plus
    the not-yet-folded part, open attempts counted up to now. The same measure the
    dispatcher and the quota pages use (jobs.selectors_teams.core_hours_by_team)."""
    from jobs.quotas.selectors import core_hours_by_team

    return core_hours_by_team([team_id]).get(team_id, 0.0)


def kind_priority(kind: str) -> int:
    row = KindPriority.objects.filter(kind=kind).values_list("priority", flat=True).first()
    return row if row is not None else DEFAULT_KIND_PRIORITY.get(kind, 0)


def compiler_version(family: str) -> str:
    """The compiler identity that goes into the compile cache key: torch for the cpu
    backend; for Neuron families, what that family's hosts report (neuronx-cc)."""
    if family == Family.CPU:
        try:
            return f"torch-{metadata.version('torch')}"
        except metadata.PackageNotFoundError:
            return "torch-unknown"
    versions = {(h.inventory or {}).get("compiler_version") for h in Host.objects.filter(family=family)}
    versions.discard(None)
    return sorted(versions)[-1] if versions else "neuronx-cc-unknown"


def compile_cache_key(model: ModelAsset, spec: dict, family: str) -> str:
    from neuron_workers.backends.compiler_options import compile_cache_key as key

    backend = "cpu" if family == Family.CPU else "neuron"
    return key(model.digest, spec["batch_size"], spec["sequence_length"], spec.get("compiler_options") or [],
               backend, compiler_version(family), family)


def _family_hosts(family: str) -> list[HostSlots]:
    return [HostSlots(pk, name, fam, tuple(core_ids)) for pk, name, fam, core_ids
            in Host.objects.filter(family=family).values_list("pk", "name", "family", "core_ids")]


def _check_capacity(family: str, cores: int, hosts: list[HostSlots]) -> None:
    """Refuse a request no registered host of `family` could ever hold."""
    largest = largest_request(hosts, family)
    if cores > largest:
        if not hosts:
            raise SubmitRefused("no_hosts_of_family", f"no {family} host is registered; choose another family", "family")
        raise SubmitRefused("request_too_large",
                            f"no {family} host can ever hold {cores} contiguous cores; the largest available is {largest}",
                            "cores")


# What a submit reads once the team's quota row is locked, in one round trip:
# the family's hosts (can any ever hold the request?), the team's pending jobs,
# the kind's priority (admin override), and an upper bound of the NeuronCore-
# seconds the team used this month: the roll-up's days of the month plus the
# *whole* span of every attempt the fold may not have reached yet (the exact
# measure, jobs.selectors_teams.core_hours_by_team, counts only the unfolded part
# of those attempts within the month, so it is never larger).
_SUBMIT_SNAPSHOT_SQL = """
SELECT
  (SELECT json_agg(json_build_array(id, name, core_ids)) FROM jobs_host WHERE family = %(family)s),
  (SELECT COUNT(*) FROM jobs_job WHERE team_id = %(team)s AND status = %(pending)s),
  (SELECT priority FROM jobs_kindpriority WHERE kind = %(kind)s),
  (SELECT COALESCE(SUM(core_seconds), 0) FROM jobs_usageteamday WHERE team_id = %(team)s AND day >= %(month)s),
  (SELECT COALESCE(SUM(cores * GREATEST(EXTRACT(EPOCH FROM LEAST(COALESCE(ended_at, %(now)s), %(now)s) - started_at),
                                        0)), 0)::float8
     FROM jobs_jobattempt
    WHERE team_id = %(team)s AND started_at < %(now)s
      AND (ended_at IS NULL OR ended_at > COALESCE((SELECT cutoff FROM jobs_usagerollupstate WHERE id = 1),
                                                    '-infinity'::timestamptz) - %(lag)s))
"""


@dataclass(frozen=True)
class _Snapshot:
    hosts: list[HostSlots]  # the family's registered hosts
    pending: int
    priority: int
    core_hours_bound: float  # >= the exact core_hours_this_month


def _lock_and_snapshot(team: Team, kind: str, family: str) -> tuple[TeamQuota, _Snapshot]:
    """The team's quota row, locked until the transaction ends, and what the submit
    check reads, read after the lock is held: in READ COMMITTED each statement sees
    what was committed before it started, so the pending count includes every job
    a concurrent submit of this team committed before releasing the lock.

    PostgreSQL: SELECT … FOR UPDATE, then the snapshot in one statement, the two
    sent together in a pipeline (one round trip while the lock is held instead of
    two; the server still runs the second after the first has the lock). SQLite
    has no row locks: its IMMEDIATE transactions serialize writers."""
    from jobs.usage.accounting import local_day, zone
    from jobs.usage.rollup import LAG

    quote = connection.ops.quote_name
    quota_sql = (f"SELECT {', '.join(quote(f.column) for f in TeamQuota._meta.concrete_fields)} "
                 f"FROM {quote(TeamQuota._meta.db_table)} WHERE team_id = %s")
    if connection.vendor != "postgresql":  # SQLite, the single-machine default: plain queries
        quota = next(iter(TeamQuota.objects.raw(quota_sql, [team.pk])), None)
        if quota is None:
            raise TeamQuota.DoesNotExist(f"team {team.slug} has no quota row")
        return quota, _Snapshot(_family_hosts(family), Job.objects.filter(team=team, status=Job.Status.PENDING).count(),
                                kind_priority(kind), core_hours_this_month(team.pk))
    now = timezone.now()
    connection.ensure_connection()
    with connection.cursor() as lock, connection.cursor() as read:
        with connection.connection.pipeline():  # leaving it waits for both results
            lock.execute(quota_sql + " FOR UPDATE", [team.pk])
            read.execute(_SUBMIT_SNAPSHOT_SQL, {
                "family": family, "team": team.pk, "pending": Job.Status.PENDING, "kind": kind, "now": now,
                "lag": LAG, "month": local_day(now, zone(team.time_zone)).replace(day=1),
            })
        row = lock.fetchone()
        hosts, pending, priority, folded_s, unfolded_bound_s = read.fetchone()
    if row is None:
        raise TeamQuota.DoesNotExist(f"team {team.slug} has no quota row")
    quota = states.row_instance(TeamQuota, row, connection.alias)
    hosts = [HostSlots(pk, name, family, tuple(core_ids)) for pk, name, core_ids in hosts or ()]
    priority = priority if priority is not None else DEFAULT_KIND_PRIORITY.get(kind, 0)
    return quota, _Snapshot(hosts, pending, priority, (float(folded_s) + unfolded_bound_s) / 3600.0)


@contextmanager
def _submit_transaction():
    """transaction.atomic(), or on PostgreSQL outside any atomic block, a psycopg
    transaction in pipeline mode: a statement whose result is read only after the
    block (the job insert, _insert_job) reaches the server with the COMMIT, in one
    round trip. The quota lock taken inside is held for two round trips in all
    (lock + snapshot, insert + commit): it serializes a team's submits, and under
    load every round trip costs a wait for the CPU and the GIL. Run on_commit
    work after the block."""
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        with transaction.atomic():
            yield
        return
    connection.ensure_connection()
    raw = connection.connection
    # Errors as Django's (IntegrityError, OperationalError …), and a connection
    # that failed here is marked for Django to close at the end of the request.
    with connection.wrap_database_errors, raw.pipeline(), raw.transaction():
        yield


@functools.cache
def _job_insert_sql() -> tuple[list, str]:
    """(fields, INSERT of a Job row with all of them), written once per process."""
    quote, meta = connection.ops.quote_name, Job._meta
    fields = [f for f in meta.local_concrete_fields if f is not meta.pk]
    return fields, (f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) "
                    f"VALUES ({', '.join(['%s'] * len(fields))})")


def _insert_job(job: Job, message: str, actor) -> Callable[[], Job]:
    """Insert `job` and its "pending" event; on PostgreSQL in one statement (the
    job's INSERT, _job_insert_sql, and the event's in a CTE reading its id).
    Returns a function that gives the saved job: in a pipeline, call it after the
    transaction (see _submit_transaction)."""
    if connection.vendor != "postgresql":
        job.save(force_insert=True)
        states.event(job.pk, "pending", message, actor=actor)
        return lambda: job
    fields, insert_sql = _job_insert_sql()
    # What Django's insert compiler does per value (~0.2 ms of CPU to compile it all).
    params = [field.get_db_prep_save(field.pre_save(job, True), connection) for field in fields]
    cursor = connection.cursor()
    cursor.execute(
        f"WITH j AS ({insert_sql} RETURNING id), "
        f"e AS (INSERT INTO {JobEvent._meta.db_table} (job_id, at, actor_id, kind, message, data) "
        "SELECT id, %s, %s, %s, %s, '{}'::jsonb FROM j) SELECT id FROM j",
        [*params, timezone.now(), getattr(actor, "pk", actor), Job.Status.PENDING, message])

    def saved() -> Job:
        if job.pk is None:
            with cursor:
                job.pk = cursor.fetchone()[0]
            job._state.adding, job._state.db = False, connection.alias
        return job

    return saved


def job_submit(*, team: Team, user, form: JobBaseForm) -> Job:
    """Create a pending job from a valid form, or raise SubmitRefused.

    The team's quota row is locked for the check-and-insert, so concurrent
    submissions of the same team are serialized and cannot together exceed
    max_pending or the budget (PostgreSQL: SELECT … FOR UPDATE; SQLite: IMMEDIATE
    transactions)."""
    try:
        access.require_role(user, team, Role.MEMBER)
    except access.Forbidden as exc:
        raise SubmitRefused("forbidden", str(exc), status=403) from None
    data = form.cleaned_data
    kind, family, cores = form.kind, data["family"], data["cores"]
    spec = form.spec()
    cache_hit = None
    if kind == Kind.COMPILE:
        spec["compile_key"] = compile_cache_key(data["model"], spec, family)
        cache_hit = ModelAsset.objects.filter(team=team, compile_key=spec["compile_key"]).first()

    with _submit_transaction():
        quota, snap = _lock_and_snapshot(team, kind, family)
        runtime = data.get("max_runtime_s") or quota.max_runtime_s
        _check_capacity(family, cores, snap.hosts)
        # The bound decides alone when it is under the budget (then so is the exact
        # use); only a team near its budget pays for the exact measure.
        used = snap.core_hours_bound
        if used >= quota.monthly_core_hours:
            used = core_hours_this_month(team.pk)
        decision = check_submit(
            team.slug, kind, runtime,
            SubmitLimits(tuple(quota.allowed_kinds or ()), quota.max_pending, quota.monthly_core_hours, quota.max_runtime_s),
            SubmitState(snap.pending, used),
        )
        if not decision.ok:
            raise SubmitRefused(decision.code, decision.sentence,
                                "max_runtime_s" if decision.code == "runtime_too_long" else None)
        saved = _insert_job(Job(
            team=team, user=user, kind=kind, spec=spec, family=family, cores=cores,
            priority=snap.priority, model=data.get("model"), dataset=data.get("dataset"),
            max_runtime_s=runtime, max_attempts=_max_attempts(), reason_code="submitted",
            reason="waiting for the scheduler",
        ), f"submitted by {user.username}", user)
        if cache_hit is not None:
            _finish_as_cache_hit(saved(), cache_hit)
    job = saved()
    if cache_hit is None:
        transaction.on_commit(kick_dispatch)  # now, or when the caller's transaction commits
    else:
        # Only a cache hit changed the row after create(); otherwise the instance
        # already holds what was inserted (one query less per submit).
        job.refresh_from_db()
    return job


def _max_attempts() -> int:
    return settings.JOB_MAX_ATTEMPTS


def _finish_as_cache_hit(job: Job, artifact: ModelAsset) -> None:
    result = {"cache_hit": True, "artifact_model_id": artifact.pk, "artifact": str(artifact),
              "source_job_id": artifact.source_job_id, **{k: v for k, v in (artifact.meta or {}).items()
                                                            if k in ("compile_seconds", "latency_ms_p50", "latency_ms_p95")}}
    states.mark_finished(job.pk, Job.Status.SUCCEEDED, sources=(Job.Status.PENDING,),
                         message=f"compile cache hit: {artifact} (from job {artifact.source_job_id})",
                         result=result, cache_hit=True, output_model=artifact)


def kick_dispatch() -> None:
    """Wake the scheduler. Bursts of submissions coalesce into one dispatch run via a
    short-lived Redis flag; if Redis is down the periodic dispatch picks the job up."""
    from jobs.live import store
    from webapp.celery import app

    try:
        if store.redis().set("nd:dispatch:kick", 1, nx=True, ex=5):
            app.send_task("jobs.dispatch", queue="scheduler")
    except Exception as exc:  # the job row is committed; losing the wake-up only delays it
        log.warning("could not wake the scheduler (%s); the periodic dispatch will place the job", exc)


# --- cancel -----------------------------------------------------------------------

def job_cancel(*, job: Job, user) -> bool:
    """Cancel is a database fact: pending/queued jobs end now; a running job's worker
    sees cancel_requested and stops it (or the reaper does, if the worker is gone).
    Works with Redis down. Returns False if the job had already finished."""
    if not access.can_cancel(user, job):
        raise access.Forbidden("only the job's owner or a team manager can cancel it")
    with transaction.atomic():
        updated = Job.objects.filter(pk=job.pk, status__in=[*Job.ACTIVE, Job.Status.PENDING]).update(cancel_requested=True)
        if not updated:
            return False
        done = states.mark_finished(job.pk, Job.Status.CANCELLED, sources=(Job.Status.PENDING, Job.Status.QUEUED),
                                    message=f"cancelled by {user.username}", actor=user, failure="cancelled")
        if not done:
            states.event(job.pk, "cancel_requested", f"cancel requested by {user.username}", actor=user)
    return True


def host_set_state(*, host: Host, state: str, actor=None) -> None:
    Host.objects.filter(pk=host.pk).update(state=state)
    log.info("host %s set to %s by %s", host.name, state, actor)


def stale_cutoff(seconds: int):
    return timezone.now() - timedelta(seconds=seconds)
