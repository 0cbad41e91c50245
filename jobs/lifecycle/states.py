"""The one module that changes Job.status.

Every transition is a conditional UPDATE (`WHERE id = … AND status IN (…)`) so two
processes racing on the same job cannot both win: the loser sees 0 rows changed
and does nothing. Each successful transition writes a JobEvent in the same
transaction. Releasing a job's cores happens here too, exactly once, in the same
transaction as the transition that ends its attempt.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, NamedTuple

from django.db import connection, transaction
from django.db.models import F
from django.db.models.sql import UpdateQuery
from django.utils import timezone

from jobs.models import CoreAllocation, Host, Job, JobAttempt, JobEvent, JobLogChunk

S = Job.Status

# from-state(s) -> to-state; the closed set of legal moves.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    S.PENDING: (S.QUEUED, S.CANCELLED, S.FAILED, S.SUCCEEDED),  # succeeded: a compile cache hit
    S.QUEUED: (S.RUNNING, S.PENDING, S.CANCELLED, S.FAILED),
    S.RUNNING: (S.SUCCEEDED, S.FAILED, S.CANCELLED, S.PENDING),
    S.SUCCEEDED: (),
    S.FAILED: (),
    S.CANCELLED: (),
}


class IllegalTransition(ValueError):
    pass


def _check(sources: Iterable[str], target: str) -> tuple[str, ...]:
    sources = tuple(sources)
    for source in sources:
        if target not in TRANSITIONS[source]:
            raise IllegalTransition(f"{source} -> {target} is not a job transition")
    return sources


def event(job_id: int, kind: str, message: str = "", actor=None, **data: Any) -> JobEvent:
    return JobEvent.objects.create(job_id=job_id, kind=kind, message=message, actor=actor, data=data)


def transition(
    job_id: int,
    sources: Iterable[str],
    target: str,
    *,
    message: str = "",
    actor=None,
    event_data: dict | None = None,
    extra_filter: dict | None = None,
    **fields: Any,
) -> bool:
    """Move job `job_id` from any of `sources` to `target`, setting `fields`.

    Returns True if this call made the change (exactly one row updated), False if
    the job was not in a source state (someone else got there first)."""
    sources = _check(sources, target)
    if connection.vendor == "postgresql":
        return _transition_statement(job_id, sources, target, message, actor, event_data, extra_filter, fields) is not None
    # savepoint=False: callers (claim, record_outcome, requeue) nest this in their own
    # transaction, and a savepoint costs two extra round trips per transition on the
    # job hot path. Nothing here is worth a partial rollback: if a statement fails,
    # the caller's whole transaction must roll back anyway.
    with transaction.atomic(savepoint=False):
        changed = Job.objects.filter(pk=job_id, status__in=sources, **(extra_filter or {})).update(
            status=target, **fields
        )
        if not changed:
            return False
        if target in Job.FINISHED or target == S.PENDING:
            _release(job_id, outcome=target if target in Job.FINISHED else "requeued")
        event(job_id, target, message, actor, **(event_data or {}))
    return True


def _transition_statement(job_id: int, sources: tuple[str, ...], target: str, message: str, actor,
                          event_data: dict | None, extra_filter: dict | None, fields: dict,
                          attempt: tuple[int, Any] | None = None, waiting_family: str | None = None,
                          load_job: bool = False, rows: Iterable[tuple[type, tuple[str, ...], list]] = (),
                          more: Iterable[tuple[str, list]] = ()) -> tuple | None:
    """PostgreSQL: the whole transition as ONE statement (so one round trip, and
    atomic even outside a transaction): the conditional UPDATE of the job, and
    only for the row it changed, the release of its cores and attempt (_release),
    the JobEvent and, with `attempt` = (host_id, started_at), the new JobAttempt
    (the claim). Data-modifying CTEs all see the UPDATE's RETURNING: if it changed
    no row (another process got there first, or the job is not in a source
    state), nothing else happens. Returns the changed row's (id, attempts), or None;
    with `waiting_family`, (id, attempts, whether jobs of that family are pending);
    with `load_job`, the changed job's columns (as the UPDATE left them) followed by
    those of its host, model and dataset (see _LOADED). `rows`: (model, columns,
    tuples) to insert for the changed job only, its job_id column first; `more`:
    further (CTE body, params) that read j.

    The job UPDATE is _job_update's, with RETURNING added."""
    update_sql, params = _job_update(job_id, sources, extra_filter or {}, {"status": target, **fields})
    job_table = connection.ops.quote_name(Job._meta.db_table)
    returning = (f"{job_table}.*" if load_job else f"{job_table}.id, {job_table}.team_id, {job_table}.user_id, "
                 f"{job_table}.kind, {job_table}.family, {job_table}.cores, {job_table}.attempts")
    ctes = [f"j AS ({update_sql} RETURNING {returning})"]
    now = timezone.now()
    if target in Job.FINISHED or target == S.PENDING:
        outcome = target if target in Job.FINISHED else "requeued"
        ctes.append(f"a AS (UPDATE {JobAttempt._meta.db_table} SET ended_at = %s, outcome = %s, "
                    "core_seconds = cores * GREATEST(EXTRACT(EPOCH FROM (%s - started_at)), 0) "
                    "WHERE job_id IN (SELECT id FROM j) AND ended_at IS NULL)")
        ctes.append(f"d AS (DELETE FROM {CoreAllocation._meta.db_table} WHERE job_id IN (SELECT id FROM j))")
        params += [now, outcome, now]
    if attempt is not None:
        host_id, started_at = attempt
        ctes.append(f"n AS (INSERT INTO {JobAttempt._meta.db_table} (job_id, team_id, user_id, kind, family, "
                    "instance_type, host_id, number, cores, started_at, ended_at, core_seconds, outcome) "
                    "SELECT j.id, j.team_id, j.user_id, j.kind, j.family, COALESCE(h.instance_type, ''), %s, "
                    "j.attempts, j.cores, %s, NULL, 0, '' "
                    f"FROM j LEFT JOIN {Host._meta.db_table} h ON h.id = %s)")
        params += [host_id, started_at, host_id]
    ctes.append(f"e AS (INSERT INTO {JobEvent._meta.db_table} (job_id, at, actor_id, kind, message, data) "
                "SELECT id, %s, %s, %s, %s, %s::jsonb FROM j)")
    params += [now, getattr(actor, "pk", actor), target, message, json.dumps(event_data or {})]
    for index, (model, columns, values) in enumerate(rows):
        if values:
            sql, row_params = insert_for_job(model, columns, values)
            ctes.append(f"r{index} AS ({sql})")
            params += row_params
    for index, (sql, more_params) in enumerate(more):
        ctes.append(f"m{index} AS ({sql})")
        params += more_params
    select = "SELECT id, attempts FROM j"
    if load_job:
        select = _loaded_select()
    elif waiting_family is not None:
        select = (f"SELECT id, attempts, EXISTS (SELECT 1 FROM {job_table} w WHERE w.status = %s AND w.family = %s "
                  "AND NOT w.cancel_requested) FROM j")
        params += [S.PENDING, waiting_family]
    with connection.cursor() as cursor:
        cursor.execute(f"WITH {', '.join(ctes)} {select}", params)
        return cursor.fetchone()


def insert_for_job(model, columns: tuple[str, ...], values: list[tuple]) -> tuple[str, list]:
    """INSERT of `values` (tuples of `columns` after job_id) for the job CTE j
    returned, as one array per column through unnest: one statement whatever the
    number of rows, and none inserted if j is empty. Duplicates are skipped."""
    quote = connection.ops.quote_name
    fields = [model._meta.get_field(name) for name in columns]
    types = [field.db_type(connection) for field in fields]
    arrays = ", ".join(f"%s::{kind}[]" for kind in types)
    names = ", ".join(quote(field.column) for field in fields)
    sql = (f"INSERT INTO {quote(model._meta.db_table)} (job_id, {names}) SELECT j.id, u.* FROM j, "
           f"unnest({arrays}) AS u ON CONFLICT DO NOTHING")
    return sql, [list(column) for column in zip(*values)]


class Raw(NamedTuple):
    """An UPDATE value (_job_update) as SQL over the row's columns before the update."""
    sql: str
    params: tuple = ()


def _job_update(job_id: int, sources: tuple[str, ...], filters: dict, values: dict) -> tuple[str, list]:
    """SQL and params of Job.objects.filter(pk=job_id, status__in=sources,
    **filters).update(**values), for plain values and Raw ones, written out
    directly: Django's compiler spent ~0.2 ms of CPU on each, twice per job on the
    worker. Any other expression goes through Django's compiler."""
    if any(hasattr(value, "resolve_expression") for value in values.values()):
        qs = Job.objects.filter(pk=job_id, status__in=sources, **filters)
        query = qs.query.chain(UpdateQuery)
        query.add_update_values(values)
        sql, params = query.get_compiler(qs.db).as_sql()
        return sql, list(params)
    quote, meta = connection.ops.quote_name, Job._meta
    sets, params = [], []
    for name, value in values.items():
        field = meta.get_field(name)
        if isinstance(value, Raw):
            sets.append(f"{quote(field.column)} = ({value.sql})")
            params.extend(value.params)
        else:
            if field.remote_field and hasattr(value, "prepare_database_save"):
                value = value.prepare_database_save(field)  # a model instance: its key, as Django does
            sets.append(f"{quote(field.column)} = %s")
            params.append(field.get_db_prep_save(value, connection))
    where = [f"{quote(meta.pk.column)} = %s",
             f"{quote(meta.get_field('status').column)} IN ({', '.join(['%s'] * len(sources))})"]
    params += [job_id, *sources]
    for name, value in filters.items():
        field = meta.get_field(name)
        if value is None:
            where.append(f"{quote(field.column)} IS NULL")
        else:
            where.append(f"{quote(field.column)} = %s")
            params.append(field.get_db_prep_value(value, connection, prepared=False))
    return f"UPDATE {quote(meta.db_table)} SET {', '.join(sets)} WHERE {' AND '.join(where)}", params


# What the claim returns with the job: (relation, alias, model), joined on the FK.
_LOADED = (("host", "h"), ("model", "m"), ("dataset", "d"))


def _loaded_select() -> str:
    """SELECT of the claimed row (CTE j) and its related rows, columns in model order."""
    quote = connection.ops.quote_name
    columns = [f"j.{quote(f.column)}" for f in Job._meta.concrete_fields]
    joins = []
    for name, alias in _LOADED:
        field = Job._meta.get_field(name)
        related = field.related_model._meta
        columns += [f"{alias}.{quote(f.column)}" for f in related.concrete_fields]
        joins.append(f"LEFT JOIN {quote(related.db_table)} {alias} ON {alias}.{quote(related.pk.column)} = "
                     f"j.{quote(field.column)}")
    return f"SELECT {', '.join(columns)} FROM j {' '.join(joins)}"


def row_instance(model, values: list, db: str):
    """A model instance from raw column values in concrete-field order, converted as
    Django's compiler would (from_db_value: JSON fields)."""
    fields = model._meta.concrete_fields
    values = list(values)
    for index, field in enumerate(fields):
        for converter in field.get_db_converters(connection):
            values[index] = converter(values[index], field.get_col(model._meta.db_table), connection)
    return model.from_db(db, [f.attname for f in fields], values)


def _loaded_job(row: tuple, db: str) -> Job:
    """The Job (with host, model and dataset cached, like select_related) from a
    row of _loaded_select."""
    width = len(Job._meta.concrete_fields)
    job = row_instance(Job, row[:width], db)
    at = width
    for name, _alias in _LOADED:
        field = Job._meta.get_field(name)
        related = field.related_model
        count = len(related._meta.concrete_fields)
        values = row[at:at + count]
        at += count
        obj = row_instance(related, values, db) if getattr(job, field.attname) is not None else None
        field.set_cached_value(job, obj)
    return job


def _release(job_id: int, outcome: str) -> int:
    """Free the job's cores and close its open attempt. Runs inside the transition's
    transaction, so it happens exactly once per attempt whichever of finish, cancel,
    timeout, preemption or reaping gets there first."""
    now = timezone.now()
    if connection.vendor == "postgresql":
        # One UPDATE instead of a SELECT and an UPDATE per open attempt (hot path:
        # every job ends here). Same arithmetic as the loop below, done by the database.
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {JobAttempt._meta.db_table} SET ended_at = %s, outcome = %s, "
                "core_seconds = cores * GREATEST(EXTRACT(EPOCH FROM (%s - started_at)), 0) "
                "WHERE job_id = %s AND ended_at IS NULL", [now, outcome, now, job_id])
        deleted, _ = CoreAllocation.objects.filter(job_id=job_id).delete()
        return deleted
    for attempt in JobAttempt.objects.filter(job_id=job_id, ended_at__isnull=True):
        attempt.ended_at = now
        attempt.outcome = outcome
        attempt.core_seconds = attempt.cores * max((now - attempt.started_at).total_seconds(), 0.0)
        attempt.save(update_fields=["ended_at", "outcome", "core_seconds"])
    deleted, _ = CoreAllocation.objects.filter(job_id=job_id).delete()
    return deleted


def mark_queued(job: Job, host_id: int, core_start: int, reason: str = "") -> bool:
    now = timezone.now()
    return transition(
        job.pk, [S.PENDING], S.QUEUED,
        message=reason or "placed",
        host_id=host_id, core_start=core_start, queued_at=now, reason_code="", reason="",
    )


def mark_queued_many(placements: list[tuple[int, int, int, str, bool]]) -> set[int]:
    """pending → queued for many jobs at once, each taking its cores: (job_id,
    host_id, core_start, message, borrowed) each; the job's cores are
    core_start … core_start + job.cores - 1 on that host. Returns the ids that moved
    (a job cancelled meanwhile stays as it is and takes no cores).

    The dispatcher places hundreds of jobs per run; one transition each would cost
    five statements per job. On PostgreSQL one statement moves the jobs that are
    still pending, writes their JobEvents and their CoreAllocations: the UPDATE
    locks each row and re-checks its status under the lock, so a cancel racing with
    us either committed before (the row no longer matches) or waits for our commit
    and then cancels the queued job, releasing its cores. A core already held
    violates the (host, core) constraint and fails the caller's whole transaction."""
    from django.db.models import Case, IntegerField, Value, When

    if not placements:
        return set()
    _check([S.PENDING], S.QUEUED)
    by_id = {p[0]: p for p in placements}
    ids = sorted(by_id)
    now = timezone.now()
    if connection.vendor == "postgresql":
        # UPDATE … FROM (VALUES …) (a CASE with hundreds of branches costs more to
        # compile than to run); events and allocations inserted from its RETURNING.
        rows = ", ".join(["(%s::bigint, %s::bigint, %s::integer, %s::text, %s::boolean)"] * len(ids))
        with connection.cursor() as cursor:
            cursor.execute(
                f"WITH moved AS (UPDATE {Job._meta.db_table} AS j SET status = %s, queued_at = %s, reason_code = '', "
                "reason = '', host_id = v.host_id, core_start = v.core_start "
                f"FROM (VALUES {rows}) AS v(id, host_id, core_start, message, borrowed) "
                "WHERE j.id = v.id AND j.status = %s "
                "RETURNING j.id, j.team_id, j.family, j.cores, v.host_id, v.core_start, v.message, v.borrowed), "
                f"events AS (INSERT INTO {JobEvent._meta.db_table} (job_id, at, kind, message, data) "
                "SELECT id, %s, %s, message, '{}'::jsonb FROM moved), "
                f"cores AS (INSERT INTO {CoreAllocation._meta.db_table} "
                "(host_id, core, job_id, team_id, family, borrowed, since) "
                "SELECT host_id, core, id, team_id, family, borrowed, %s FROM moved, "
                "generate_series(core_start, core_start + cores - 1) AS core) "
                "SELECT id FROM moved",
                [S.QUEUED, now, *[x for i in ids for x in by_id[i][:5]], S.PENDING, now, S.QUEUED, now])
            return {row[0] for row in cursor.fetchall()}
    with transaction.atomic(savepoint=False):  # inside dispatch's transaction: see transition()
        moving = {pk: (team_id, family, cores) for pk, team_id, family, cores in Job.objects.select_for_update()
                  .filter(pk__in=ids, status=S.PENDING).values_list("pk", "team_id", "family", "cores")}
        if not moving:
            return set()
        ids = sorted(moving)
        Job.objects.filter(pk__in=ids).update(
            status=S.QUEUED, queued_at=now, reason_code="", reason="",
            host_id=Case(*[When(pk=i, then=Value(by_id[i][1])) for i in ids], output_field=IntegerField()),
            core_start=Case(*[When(pk=i, then=Value(by_id[i][2])) for i in ids], output_field=IntegerField()),
        )
        JobEvent.objects.bulk_create([JobEvent(job_id=i, kind=S.QUEUED, message=by_id[i][3], at=now) for i in ids])
        CoreAllocation.objects.bulk_create([
            CoreAllocation(host_id=by_id[i][1], core=c, job_id=i, team_id=moving[i][0], family=moving[i][1],
                           borrowed=by_id[i][4], since=now)
            for i in ids for c in range(by_id[i][2], by_id[i][2] + moving[i][2])])
    return set(moving)


def attempt_header(attempt: int, host_name: str, core_range: str | None) -> str:
    """The log line that opens each attempt; _header_sql is the same in SQL."""
    return f"=== attempt {attempt} on {host_name} cores {core_range} ===\n"


def _header_sql(row: str, attempt: str) -> str:
    """attempt_header() of a job row (`row`: its alias and a dot, or "") in SQL,
    `attempt` being the SQL of its attempt number; one %s: the host's name."""
    return (f"('=== attempt ' || ({attempt}) || ' on ' || %s || ' cores ' || "
            f"CASE WHEN {row}core_start IS NULL THEN 'None' WHEN {row}cores = 1 THEN {row}core_start::text "
            f"ELSE {row}core_start || '-' || ({row}core_start + {row}cores - 1) END || E' ===\\n')")


def mark_running(job_id: int, host_id: int, pid: int | None = None) -> bool:
    """The worker's claim: queued → running for this host only. A second delivery of
    the same run message (or a delivery to another host) changes nothing."""
    return claim(job_id, host_id, pid) is not None


def claim(job_id: int, host_id: int, pid: int | None = None, host_name: str | None = None) -> Job | None:
    """mark_running that also returns the claimed job, loaded with everything the
    worker needs (host, model, dataset), or None if not claimed. With `host_name`
    the attempt's log header (attempt_header) is stored with the claim, so the log
    says where every attempt ran even if the worker dies right after.

    The row is read once, inside the claiming transaction, for both the JobAttempt
    and the caller: the worker used to read it a second time right after. On
    PostgreSQL all of it is one statement: the claim, its event, the attempt row,
    and the claimed row as the UPDATE left it, joined with its host, model and
    dataset (what select_related would load; team and user, which only a run that
    registers a model needs, load lazily)."""
    now = timezone.now()
    fields = {"started_at": now, "heartbeat_at": now, "worker_pid": pid}
    if connection.vendor == "postgresql":
        more = []
        if host_name is not None:
            # The UPDATE sees the row before it (attempts not yet counted up); j, after.
            fields["log_bytes"] = Raw(f"log_bytes + octet_length({_header_sql('', 'attempts + 1')})", (host_name,))
            header = _header_sql("j.", "j.attempts")
            more.append((f'INSERT INTO {JobLogChunk._meta.db_table} (job_id, "offset", text) '
                         f"SELECT j.id, j.log_bytes - octet_length(h.text), h.text FROM j, "
                         f"LATERAL (SELECT {header} AS text) h ON CONFLICT DO NOTHING", [host_name]))
        row = _transition_statement(
            job_id, _check([S.QUEUED], S.RUNNING), S.RUNNING, "", None, None,
            {"host_id": host_id, "cancel_requested": False}, {**fields, "attempts": Raw("attempts + 1")},
            attempt=(host_id, now), load_job=True, more=more)
        return None if row is None else _loaded_job(row, Job.objects.db)
    with transaction.atomic():
        claimed = transition(
            job_id, [S.QUEUED], S.RUNNING,
            extra_filter={"host_id": host_id, "cancel_requested": False}, attempts=F("attempts") + 1, **fields,
        )
        if not claimed:
            return None
        job = Job.objects.select_related("host", "model", "dataset", "team", "user").get(pk=job_id)
        if host_name is not None:
            header = attempt_header(job.attempts, host_name, job.core_range)
            JobLogChunk.objects.bulk_create([JobLogChunk(job=job, offset=job.log_bytes, text=header)],
                                            ignore_conflicts=True)
            job.log_bytes += len(header.encode("utf-8"))
            Job.objects.filter(pk=job_id).update(log_bytes=job.log_bytes)
        JobAttempt.objects.create(
            job=job, team_id=job.team_id, user_id=job.user_id, kind=job.kind, family=job.family,
            instance_type=job.host.instance_type if job.host else "", host_id=host_id,
            number=job.attempts, cores=job.cores, started_at=now,
        )
    return job


def mark_finished(job_id: int, target: str, *, sources=(S.RUNNING,), message: str = "", actor=None,
                  failure: str = "", result: dict | None = None, reason: str = "",
                  extra_filter: dict | None = None, **fields: Any) -> bool:
    """`extra_filter` narrows the conditional UPDATE, e.g. to one host's attempt, so
    a worker recording a run that was preempted meanwhile changes nothing."""
    return transition(
        job_id, sources, target, message=message, actor=actor, extra_filter=extra_filter,
        finished_at=timezone.now(), failure=failure, reason=reason,
        reason_code=failure, **({"result": result} if result is not None else {}), **fields,
    )


def finish_run(job_id: int, target: str, *, family: str, extra_filter: dict, message: str = "",
               failure: str = "", result: dict | None = None, reason: str = "", fields: dict | None = None,
               rows: Iterable[tuple[type, tuple[str, ...], list]] = ()) -> tuple[bool, bool | None]:
    """mark_finished for a worker ending its run: (finished, jobs of `family` pending?).

    The second answer is the worker's cue to wake the scheduler for the cores it
    just freed; on PostgreSQL it comes from the finishing statement itself (None
    where it is not known: ask separately). `fields`: more job columns to set;
    `rows`: rows of the job to insert with it (the last log chunks, artifacts; see
    _transition_statement), only if it finished: on PostgreSQL in the same
    statement, elsewhere in the same transaction."""
    fields = {"finished_at": timezone.now(), "failure": failure, "reason": reason, "reason_code": failure,
              **({"result": result} if result is not None else {}), **(fields or {})}
    if connection.vendor != "postgresql":
        with transaction.atomic():
            done = transition(job_id, (S.RUNNING,), target, message=message, extra_filter=extra_filter, **fields)
            if done:
                for model, columns, values in rows:
                    model.objects.bulk_create([model(job_id=job_id, **dict(zip(columns, value))) for value in values],
                                              ignore_conflicts=True)
        return done, None
    row = _transition_statement(job_id, _check((S.RUNNING,), target), target, message, None, None, extra_filter,
                                fields, waiting_family=family, rows=rows)
    return (True, bool(row[2])) if row is not None else (False, None)


def requeue(job_id: int, *, sources=(S.RUNNING, S.QUEUED), message: str, kind: str = "requeued",
            actor=None, event_data: dict | None = None, extra_filter: dict | None = None) -> bool:
    """Back to pending (worker lost with attempts left, preempted, lost message)."""
    with transaction.atomic():
        moved = transition(
            job_id, sources, S.PENDING, message=message, actor=actor, event_data=event_data,
            extra_filter=extra_filter,
            host_id=None, core_start=None, queued_at=None, started_at=None, heartbeat_at=None,
            worker_pid=None, reason_code=kind, reason=message,
        )
        if moved and kind != "requeued":
            event(job_id, kind, message, actor, **(event_data or {}))
    return moved
