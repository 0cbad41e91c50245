"""The JSON API for jobs, models, datasets and the caller's teams (/api/v1/...).

Contracts that hold for every endpoint here:
- The caller is `request.auth` (a Bearer API token or a session; anything else is
  a 401 from the NinjaAPI's auth).
- Every id is fetched through jobs.access, so another team's job, log, artifact,
  model or dataset is a 404, never a 403 or a leak.
- Bad input is a 4xx JSON `{"detail": "<sentence>", "errors": {"<field>": ["<message>"]}}`
  naming the field, and changes nothing. Job bodies are validated by the very forms
  the HTML pages use (jobs.forms.JOB_FORMS), so the messages are identical; that is
  why the body is parsed here rather than by a typed ninja Schema, whose errors
  would come out in another shape (the Schema below documents it in OpenAPI).
- Business rules live in jobs.services; this module only translates HTTP.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable, Literal

from django.conf import settings
from django.db.models import QuerySet
from django.http import HttpRequest, JsonResponse, QueryDict
from django.urls import reverse
from django.utils.datastructures import MultiValueDict
from ninja import Query, Router, Schema, Status

from jobs import access
from jobs.api import body
from jobs.api.schemas import MAX_OFFSET, ErrorOut
from jobs.assets.artifacts import artifact_response
from jobs.assets.forms import DatasetUploadForm, ModelUploadForm
from jobs.assets.services import dataset_upload, model_upload
from jobs.assets.uploads import UploadError
from jobs.lifecycle import selectors
from jobs.lifecycle.forms import JOB_FORMS
from jobs.lifecycle.services import (
    NotSuspendable,
    SubmitRefused,
    job_cancel,
    job_dry_run,
    job_resume,
    job_submit,
    job_suspend,
)
from jobs.models import Dataset, Job, JobLogChunk, Kind, Membership, ModelAsset, Role, Team

router = Router(tags=["jobs"])

MAX_PAGE = 200
LOG_MAX_BYTES = 4 * 1024 * 1024
# Hard submit refusals that depend on the team's current state (retrying later may
# succeed) are conflicts; services.SubmitRefused carries 400 for all of them.
CONFLICT_CODES = {"too_many_pending", "budget_exhausted", "user_budget_exhausted"}
FORM_KEYS = {"csrfmiddlewaretoken"}  # sent by browsers posting multipart; not a job field


# --- schemas (the OpenAPI contract) -------------------------------------------------

class ArtifactOut(Schema):
    name: str
    size_bytes: int
    is_dir: bool
    url: str


class EventOut(Schema):
    at: datetime
    kind: str
    message: str
    actor: str | None


class ModelRef(Schema):
    id: int
    name: str
    version: int
    format: str


class JobSummaryOut(Schema):
    id: int
    url: str
    team: str
    user: str
    kind: str
    status: str
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    host: str | None
    family: str
    cores: int
    core_range: str | None
    model_id: int | None
    dataset_id: int | None
    output_model_id: int | None
    cache_hit: bool
    reason_code: str | None
    reason: str | None
    failure: str | None


class JobSubmitOut(JobSummaryOut):
    """What POST /jobs answers: the job as created (summary, validated spec, limits).
    Its timeline, artifacts and queue position are in the full document at `url`."""

    max_runtime_s: int
    spec: dict[str, Any]
    result: dict[str, Any]
    attempts: int
    max_attempts: int
    cancel_requested: bool
    logs_url: str


class RankOut(Schema):
    """One host of a multi-host job: its rank (0 = the rendezvous host) and that rank's run."""

    rank: int
    host: str | None
    cores: str
    state: str
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    detail: str


class JobOut(JobSubmitOut):
    ranks: list[RankOut]
    artifacts: list[ArtifactOut]
    output_model: ModelRef | None
    queue_position: int | None
    events: list[EventOut]


class JobPage(Schema):
    count: int
    limit: int
    offset: int
    next: str | None
    previous: str | None
    items: list[JobSummaryOut]


class LogOut(Schema):
    offset: int
    next_offset: int
    text: str
    finished: bool


class ModelOut(Schema):
    id: int
    url: str
    team: str
    name: str
    version: int
    format: str
    parent_id: int | None
    lineage: list[ModelRef]
    source_job_id: int | None
    meta: dict[str, Any]
    size_bytes: int
    digest: str
    created_by: str | None
    created_at: datetime


class ModelPage(Schema):
    count: int
    limit: int
    offset: int
    next: str | None
    previous: str | None
    items: list[ModelOut]


class DatasetOut(Schema):
    id: int
    url: str
    team: str
    name: str
    format: str
    rows: int
    size_bytes: int
    created_by: str | None
    created_at: datetime


class DatasetPage(Schema):
    count: int
    limit: int
    offset: int
    next: str | None
    previous: str | None
    items: list[DatasetOut]


class TeamRoleOut(Schema):
    slug: str
    name: str
    role: str


class JobSubmitIn(Schema):
    """Documentation of POST /jobs. Which fields apply depends on `kind` (see
    jobs.forms); unknown fields are refused."""

    team: str
    kind: Literal["compile", "finetune", "inference"]
    family: Literal["inf2", "trn1", "trn2", "cpu"] = "cpu"
    cores: int = 1
    host_count: int = 1
    same_network: bool = False
    max_runtime_s: int | None = None
    model: int | None = None
    dataset: int | None = None
    batch_size: int | None = None
    sequence_length: int | None = None
    compiler_options: list[str] | str | None = None
    steps: int | None = None
    epochs: int | None = None
    learning_rate: float | None = None
    seed: int | None = None
    prompts: list[str] | str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None


def _multipart(properties: dict[str, dict], required: list[str]) -> dict:
    return {"multipart/form-data": {"schema": {"type": "object", "properties": properties, "required": required}}}


_BINARY = {"type": "string", "format": "binary"}
DRY_RUN_YES, DRY_RUN_NO = ("true", "1", "yes"), ("false", "0", "no", "")
SUBMIT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": JobSubmitIn.model_json_schema()},
    **_multipart({**JobSubmitIn.model_json_schema()["properties"], "prompts_file": _BINARY}, ["team", "kind"]),
}}, "parameters": [{"name": "dry_run", "in": "query", "required": False, "schema": {
    "type": "string", "enum": [*DRY_RUN_YES, *DRY_RUN_NO], "default": "false"},
    "description": "true: validate and answer what would happen (where and when it would run, its cost, "
                   "a compile's cache answer) without creating anything (200)."}]}
UPLOAD_BODY = {"requestBody": {"required": True, "content": _multipart(
    {"team": {"type": "string"}, "name": {"type": "string"}, "file": _BINARY}, ["team", "name", "file"])}}
FILE_RESPONSE = {"responses": {200: {"description": "The artifact file (a directory comes as a zip)",
                                     "content": {"application/octet-stream": {"schema": _BINARY}}}}}
ERRORS = {400: ErrorOut, 403: ErrorOut, 404: ErrorOut}


# --- error responses ----------------------------------------------------------------

def _error(status: int, detail: str, *, code: str | None = None, field: str | None = None,
           errors: dict[str, list[str]] | None = None) -> JsonResponse:
    body: dict[str, Any] = {"detail": detail}
    if code:
        body["code"] = code
    if field:
        body["field"] = field
    if errors:
        body["errors"] = errors
    return JsonResponse(body, status=status)


def _field_errors(errors: dict[str, list[str]], what: str) -> JsonResponse:
    """400 naming every bad field; the detail sentence repeats the first message of each."""
    summary = "; ".join(f"{field}: {msgs[0]}" if field != "__all__" else msgs[0] for field, msgs in errors.items())
    return _error(400, f"{what}: {summary}", code="invalid", field=next(iter(errors)), errors=errors)


def _forbidden(exc: access.Forbidden) -> JsonResponse:
    return _error(403, str(exc), code="forbidden")


def _too_large(upload, field: str) -> JsonResponse | None:
    if upload is not None and upload.size > settings.MAX_UPLOAD_BYTES:
        message = f"{field} is {upload.size} bytes; the limit is {settings.MAX_UPLOAD_BYTES}"
        return _error(413, message, code="too_large", field=field, errors={field: [message]})
    return None


# --- documents ----------------------------------------------------------------------

def _job_url(job_id: int) -> str:
    return reverse("api:job_detail", kwargs={"job_id": job_id})


def _reason(job: Job) -> tuple[str | None, str | None]:
    """The reason is shown while pending (why it waits), suspended (by whom) and when
    failed (why it failed)."""
    if job.status in (Job.Status.PENDING, Job.Status.FAILED, Job.Status.SUSPENDED):
        return job.reason_code or None, job.reason or None
    return None, None


def job_summary(job: Job) -> dict[str, Any]:
    """A job row for lists: needs only team, user and host joined (no extra queries)."""
    reason_code, reason = _reason(job)
    return {
        "id": job.pk, "url": _job_url(job.pk), "team": job.team.slug, "user": job.user.username,
        "kind": job.kind, "status": job.status, "created_at": job.created_at, "queued_at": job.queued_at,
        "started_at": job.started_at, "finished_at": job.finished_at, "host": job.host.name if job.host else None,
        "family": job.family, "cores": job.cores, "host_count": job.host_count, "same_network": job.same_network,
        "core_range": job.core_range, "model_id": job.model_id, "dataset_id": job.dataset_id, "output_model_id": job.output_model_id, "cache_hit": job.cache_hit,
        "reason_code": reason_code, "reason": reason, "failure": job.failure or None,
    }


def _model_ref(model: ModelAsset) -> dict[str, Any]:
    return {"id": model.pk, "name": model.name, "version": model.version, "format": model.format}


def job_submitted(job: Job) -> dict[str, Any]:
    """The submit answer (JobSubmitOut): only what the job row holds, so a job just
    created (team and user in hand, no host yet) costs no query. The full document
    adds the timeline, artifacts and queue position, which cost several queries
    (the queue position orders the family's whole pending queue) — a burst of
    submits would pay them for every job."""
    return {
        **job_summary(job), "max_runtime_s": job.max_runtime_s, "spec": job.spec, "result": job.result or {},
        "attempts": job.attempts, "max_attempts": job.max_attempts, "cancel_requested": job.cancel_requested,
        "logs_url": reverse("api:job_logs", kwargs={"job_id": job.pk}),
    }


def job_document(job: Job) -> dict[str, Any]:
    """The full job: summary + spec, result, artifacts, timeline and queue position."""
    selectors.show_live_reasons([job])
    artifacts = [{"name": a.name, "size_bytes": a.size_bytes, "is_dir": a.is_dir,
                  "url": reverse("api:job_artifact", kwargs={"job_id": job.pk, "name": a.name})}
                 for a in job.artifacts.all()]
    events = [{"at": e.at, "kind": e.kind, "message": e.message, "actor": e.actor.username if e.actor else None}
              for e in selectors.job_events(job)]
    return {
        **job_submitted(job), "artifacts": artifacts,
        "output_model": _model_ref(job.output_model) if job.output_model else None,
        "queue_position": selectors.queue_position(job), "events": events, "ranks": selectors.gang_ranks(job),
    }


def _lineages(models: list[ModelAsset]) -> dict[int, list[ModelAsset]]:
    """Each model's chain root → … → itself, within its own team. Ancestors are loaded
    a generation at a time (queries grow with lineage depth, not with the page size)."""
    known = {m.pk: m for m in models}
    missing = {m.parent_id for m in models if m.parent_id and m.parent_id not in known}
    while missing:
        found = list(ModelAsset.objects.filter(pk__in=missing))
        known.update((m.pk, m) for m in found)
        missing = {m.parent_id for m in found if m.parent_id and m.parent_id not in known}
    chains: dict[int, list[ModelAsset]] = {}
    for model in models:
        chain, node, seen = [], model, set()
        while node is not None and node.pk not in seen and node.team_id == model.team_id:
            seen.add(node.pk)
            chain.append(node)
            node = known.get(node.parent_id) if node.parent_id else None
        chains[model.pk] = chain[::-1]
    return chains


def model_document(model: ModelAsset, lineage: list[ModelAsset]) -> dict[str, Any]:
    return {
        **_model_ref(model), "url": reverse("api:model_detail", kwargs={"model_id": model.pk}),
        "team": model.team.slug, "parent_id": model.parent_id, "lineage": [_model_ref(m) for m in lineage],
        "source_job_id": model.source_job_id, "meta": model.meta or {}, "size_bytes": model.size_bytes,
        "digest": model.digest, "created_by": model.created_by.username if model.created_by else None,
        "created_at": model.created_at,
    }


def dataset_document(dataset: Dataset) -> dict[str, Any]:
    return {
        "id": dataset.pk, "url": reverse("api:dataset_detail", kwargs={"dataset_id": dataset.pk}),
        "team": dataset.team.slug, "name": dataset.name, "format": dataset.format, "rows": dataset.rows,
        "size_bytes": dataset.size_bytes, "created_by": dataset.created_by.username if dataset.created_by else None,
        "created_at": dataset.created_at,
    }


def _page(request: HttpRequest, queryset: QuerySet, limit: int, offset: int) -> tuple[list, dict[str, Any]]:
    """One page of `queryset` and its envelope: total count and absolute next/previous links."""
    count = queryset.count()
    items = list(queryset[offset:offset + limit])

    def link(at: int) -> str:
        query = request.GET.copy()
        query["offset"], query["limit"] = str(at), str(limit)
        return request.build_absolute_uri(f"{request.path}?{query.urlencode()}")

    envelope = {"count": count, "limit": limit, "offset": offset,
                "next": link(offset + limit) if offset + limit < count else None,
                "previous": link(max(offset - limit, 0)) if offset > 0 else None}
    return items, envelope


def _choice(value: str | None, choices: Iterable[str], field: str) -> JsonResponse | None:
    choices = list(choices)
    if value and value not in choices:
        return _field_errors({field: [f"{value!r} is not one of {', '.join(choices)}"]}, f"Bad {field} filter")
    return None


def _teams_filter(user, team: str | None) -> QuerySet[Team]:
    """The caller's teams, or just `team` (a 404 when the caller is not in it)."""
    return Team.objects.filter(pk=access.get_team(user, team).pk) if team else access.teams_of(user)


# --- teams --------------------------------------------------------------------------

@router.get("/teams", response={200: list[TeamRoleOut]}, tags=["teams"], summary="The caller's teams and roles")
def list_teams(request: HttpRequest):
    """Teams the caller belongs to with their role in each (site admins: every team,
    as manager) — the slugs to pass as `team` elsewhere."""
    user = request.auth
    roles = dict(Membership.objects.filter(user=user).values_list("team_id", "role"))
    return [{"slug": t.slug, "name": t.name, "role": Role.MANAGER if user.is_staff else roles[t.pk]}
            for t in access.teams_of(user).order_by("slug")]


# --- jobs ---------------------------------------------------------------------------

def _submission(request: HttpRequest) -> tuple[QueryDict | dict, MultiValueDict | None] | JsonResponse:
    """The submitted fields and files: multipart/form (for a prompts_file upload) or
    JSON (jobs.api.body: the content type, depth, NUL and lone surrogates checked),
    whose values must also be of their field's JSON type (body.json_type_errors)."""
    if request.content_type in body.FORM_TYPES:
        return request.POST, request.FILES
    data, refused = body.read_json(request, "The job was not submitted",
                                   accepted="application/json, or multipart/form-data with a prompts_file")
    if refused is not None:
        return refused
    if not isinstance(data, dict):
        return _error(400, "the body must be a JSON object with team, kind and the job's fields", code="invalid_json")
    if "prompts_file" in data:
        message = "upload prompts_file as multipart/form-data, or send prompts as a list"
        return _field_errors({"prompts_file": [message]}, "The job was not submitted")
    if isinstance(data.get("compiler_options"), list) and all(isinstance(o, str) for o in data["compiler_options"]):
        # The form field is text (what the HTML form sends); joining keeps every
        # option's tokens, so a list is judged exactly like the same text typed in.
        data["compiler_options"] = " ".join(data["compiler_options"])
    return data, None


def _dry_run(request: HttpRequest) -> bool | JsonResponse:
    """?dry_run: true, 1 or yes validate only; false, 0, no or absent submit. Anything
    else, or the parameter twice, is a 400: a misspelt dry run must not submit."""
    values = request.GET.getlist("dry_run")
    value = values[0].strip().lower() if len(values) == 1 else None
    if not values or value in DRY_RUN_NO:
        return False
    if value in DRY_RUN_YES:
        return True
    message = ("give dry_run once" if len(values) > 1 else
               f"dry_run must be one of {', '.join(DRY_RUN_YES)} (validate only) or {', '.join(DRY_RUN_NO[:-1])}")
    return _field_errors({"dry_run": [message]}, "The job was not submitted")


def _submit_target(user, data) -> tuple[Team, str] | JsonResponse:
    """The team (404 unless the caller belongs to it; 403 for a viewer) and a valid kind."""
    errors: dict[str, list[str]] = {}
    slug, kind = data.get("team"), data.get("kind")
    if not slug or not isinstance(slug, str):
        errors["team"] = ["This field is required: the slug of one of your teams."]
    elif "\x00" in slug:
        errors["team"] = ["team must be the slug of one of your teams (it contains a NUL character)"]
    if not isinstance(kind, str) or kind not in JOB_FORMS:
        errors["kind"] = [f"kind must be one of {', '.join(JOB_FORMS)}"]
    if errors:
        return _field_errors(errors, "The job was not submitted")
    team = access.get_team(user, slug)
    try:
        access.require_role(user, team, Role.MEMBER)
    except access.Forbidden as exc:
        return _error(403, f"You cannot submit jobs: {exc}.", code="forbidden")
    return team, kind


@router.post("/jobs", response={200: dict[str, Any], 201: JobSubmitOut, 409: ErrorOut, 413: ErrorOut, **ERRORS}, openapi_extra=SUBMIT_BODY,
             summary="Submit a job")
def submit_job(request: HttpRequest):
    """Validate with the HTML form of the kind, check the team's hard limits, and
    create a pending job (the scheduler places it). 201 with the job as created;
    GET its `url` for the timeline, artifacts and queue position."""
    dry_run = _dry_run(request)
    if isinstance(dry_run, JsonResponse):
        return dry_run
    parsed = _submission(request)
    if isinstance(parsed, JsonResponse):
        return parsed
    data, files = parsed
    target = _submit_target(request.auth, data)
    if isinstance(target, JsonResponse):
        return target
    team, kind = target
    form_class = JOB_FORMS[kind]
    unknown = sorted(set(data) - set(form_class.base_fields) - {"team", "kind"} - FORM_KEYS)
    if unknown:
        errors = {key: [f"unknown field for {kind} jobs"] for key in unknown}
        return _field_errors(errors, f"The {kind} job was not submitted")
    if files is None:
        typed = body.json_type_errors(data, form_class.base_fields)
        if typed:
            return _field_errors(typed, f"The {kind} job was not submitted")
    form = form_class(data=data, files=files, team=team)
    if not form.is_valid():
        return _field_errors({f: list(msgs) for f, msgs in form.errors.items()}, f"The {kind} job was not submitted")
    try:
        if dry_run:
            # Validate and answer (a compile: the cache's answer), creating nothing.
            return Status(200, job_dry_run(team=team, user=request.auth, form=form))
        job = job_submit(team=team, user=request.auth, form=form)
    except SubmitRefused as exc:
        status = 409 if exc.status == 400 and exc.code in CONFLICT_CODES else exc.status
        return _error(status, exc.message, code=exc.code, field=exc.field,
                      errors={exc.field: [exc.message]} if exc.field else None)
    return Status(201, job_submitted(job))


@router.get("/jobs", response={200: JobPage, **ERRORS}, summary="List jobs")
def list_jobs(request: HttpRequest, team: str | None = None, status: str | None = None, kind: str | None = None,
              user: str | None = Query(None, description="username of the submitter"),
              limit: int = Query(50, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=MAX_OFFSET)):
    """The caller's teams' jobs (or one team's), newest first, with filters and a
    total count; one query for the page whatever its length."""
    bad = _choice(status, Job.Status.values, "status") or _choice(kind, Kind.values, "kind")
    if bad:
        return bad
    jobs = Job.objects.filter(team__in=_teams_filter(request.auth, team)).select_related("team", "user", "host")
    if status:
        jobs = jobs.filter(status=status)
    if kind:
        jobs = jobs.filter(kind=kind)
    if user:
        jobs = jobs.filter(user__username=user)
    items, envelope = _page(request, jobs.order_by("-id"), limit, offset)
    selectors.show_live_reasons(items)
    return {**envelope, "items": [job_summary(j) for j in items]}


@router.get("/jobs/{dbid:job_id}", response={200: JobOut, **ERRORS}, url_name="job_detail", summary="Get a job")
def get_job(request: HttpRequest, job_id: int):
    return job_document(access.get_job(request.auth, job_id))


@router.get("/jobs/{dbid:job_id}/logs", response={200: LogOut, **ERRORS}, url_name="job_logs", summary="Follow a job's log")
def job_logs(request: HttpRequest, job_id: int, offset: int = Query(0, ge=0, le=MAX_OFFSET),
             max_bytes: int = Query(selectors.LOG_WINDOW_BYTES, ge=1, le=LOG_MAX_BYTES)):
    """Log text from byte `offset`; ask again from `next_offset` to follow. `finished`
    is true once the job has ended and everything it logged has been returned."""
    job = access.get_job(request.auth, job_id)
    # Status is read before the log: a worker writes all of a job's log before it
    # records the end, so a finished job's log is complete at this point.
    ended = job.is_finished
    window = selectors.log_since(job, offset, max_bytes=max_bytes)
    more = JobLogChunk.objects.filter(job=job, offset__gte=window.end).exists()
    return {"offset": offset, "next_offset": window.end, "text": window.text, "finished": ended and not more}


@router.post("/jobs/{dbid:job_id}/cancel", response={200: JobOut, 409: ErrorOut, **ERRORS}, summary="Cancel a job")
def cancel_job(request: HttpRequest, job_id: int):
    """A member may cancel their own job, a manager any job of the team. Pending and
    queued jobs end at once; a running job is stopped by its worker. 409 if it had
    already finished."""
    job = access.get_job(request.auth, job_id)
    try:
        cancelled = job_cancel(job=job, user=request.auth)
    except access.Forbidden as exc:
        return _forbidden(exc)
    if not cancelled:
        job.refresh_from_db(fields=["status"])
        return _error(409, f"job {job.pk} already finished ({job.status}); nothing to cancel", code="already_finished")
    return job_document(access.get_job(request.auth, job_id))


@router.post("/jobs/{dbid:job_id}/suspend", response={200: JobOut, 409: ErrorOut, **ERRORS}, summary="Suspend a fine-tune")
def suspend_job(request: HttpRequest, job_id: int):
    """Whoever may cancel a fine-tune may suspend it: it frees its cores (a running one
    saves a checkpoint first) and waits as "suspended" until resumed. 409 if it is not
    a pending, queued or running fine-tune."""
    job = access.get_job(request.auth, job_id)
    try:
        job_suspend(job=job, user=request.auth)
    except access.Forbidden as exc:
        return _forbidden(exc)
    except NotSuspendable as exc:
        return _error(409, exc.message, code=exc.code)
    return job_document(access.get_job(request.auth, job_id))


@router.post("/jobs/{dbid:job_id}/resume", response={200: JobOut, 409: ErrorOut, **ERRORS}, summary="Resume a suspended job")
def resume_job(request: HttpRequest, job_id: int):
    """Back in the queue; a fine-tune resumes from its newest complete checkpoint. 409 if
    the job is not suspended."""
    job = access.get_job(request.auth, job_id)
    try:
        job_resume(job=job, user=request.auth)
    except access.Forbidden as exc:
        return _forbidden(exc)
    except NotSuspendable as exc:
        return _error(409, exc.message, code=exc.code)
    return job_document(access.get_job(request.auth, job_id))


@router.get("/jobs/{dbid:job_id}/artifacts/{path:name}", response={**ERRORS}, url_name="job_artifact",
            openapi_extra=FILE_RESPONSE, summary="Download an artifact")
def download_artifact(request: HttpRequest, job_id: int, name: str):
    return artifact_response(access.get_job(request.auth, job_id), name)


# --- models and datasets --------------------------------------------------------------

def _upload_target(request: HttpRequest, form) -> tuple[Team, str, Any] | JsonResponse:
    """Checks shared by model and dataset uploads: fields present and valid, the
    caller a member of the team (404 otherwise, 403 for a viewer), size within limit."""
    if request.content_type != "multipart/form-data":
        return body.unsupported(request, "multipart/form-data with team, name and file")
    errors = {f: list(msgs) for f, msgs in form.errors.items()} if not form.is_valid() else {}
    slug = request.POST.get("team")
    if not slug:
        errors = {"team": ["This field is required: the slug of one of your teams."], **errors}
    elif "\x00" in slug:
        errors = {"team": ["team must be the slug of one of your teams (it contains a NUL character)"], **errors}
    if errors:
        return _field_errors(errors, "The upload was refused")
    team = access.get_team(request.auth, slug)
    try:
        access.require_role(request.auth, team, Role.MEMBER)
    except access.Forbidden as exc:
        return _error(403, f"You cannot upload to team {team.slug}: {exc}.", code="forbidden")
    upload = form.cleaned_data["file"]
    return _too_large(upload, "file") or (team, form.cleaned_data["name"], upload)


def _upload_refused(exc: UploadError) -> JsonResponse:
    return _error(400, f"The upload was refused: {exc.message}", code="invalid_upload", field=exc.field,
                  errors={exc.field: [exc.message]})


@router.get("/models", response={200: ModelPage, **ERRORS}, summary="List models")
def list_models(request: HttpRequest, team: str | None = None, name: str | None = None,
                limit: int = Query(50, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=MAX_OFFSET)):
    """Registered model versions with their lineage (base → fine-tuned → compiled)."""
    models = ModelAsset.objects.filter(team__in=_teams_filter(request.auth, team)).select_related("team", "created_by")
    if name:
        models = models.filter(name=name)
    items, envelope = _page(request, models.order_by("team__slug", "name", "-version", "-id"), limit, offset)
    chains = _lineages(items)
    return {**envelope, "items": [model_document(m, chains[m.pk]) for m in items]}


@router.get("/models/{dbid:model_id}", response={200: ModelOut, **ERRORS}, url_name="model_detail", summary="Get a model")
def get_model(request: HttpRequest, model_id: int):
    model = access.get_model(request.auth, model_id)
    return model_document(model, _lineages([model])[model.pk])


@router.post("/models", response={201: ModelOut, 413: ErrorOut, **ERRORS}, openapi_extra=UPLOAD_BODY,
             summary="Upload a model (zip of a Hugging Face folder)")
def upload_model(request: HttpRequest):
    """Register a zip of a Hugging Face-format folder as the next version of `name`.
    A refused upload registers nothing and leaves no files."""
    target = _upload_target(request, ModelUploadForm(data=request.POST, files=request.FILES))
    if isinstance(target, JsonResponse):
        return target
    team, name, upload = target
    try:
        model = model_upload(team=team, user=request.auth, name=name, upload=upload)
    except UploadError as exc:
        return _upload_refused(exc)
    model = access.get_model(request.auth, model.pk)
    return Status(201, model_document(model, _lineages([model])[model.pk]))


@router.get("/datasets", response={200: DatasetPage, **ERRORS}, summary="List datasets")
def list_datasets(request: HttpRequest, team: str | None = None,
                  limit: int = Query(50, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=MAX_OFFSET)):
    datasets = Dataset.objects.filter(team__in=_teams_filter(request.auth, team)).select_related("team", "created_by")
    items, envelope = _page(request, datasets.order_by("-created_at", "-id"), limit, offset)
    return {**envelope, "items": [dataset_document(d) for d in items]}


@router.get("/datasets/{dbid:dataset_id}", response={200: DatasetOut, **ERRORS}, url_name="dataset_detail",
            summary="Get a dataset")
def get_dataset(request: HttpRequest, dataset_id: int):
    return dataset_document(access.get_dataset(request.auth, dataset_id))


@router.post("/datasets", response={201: DatasetOut, 413: ErrorOut, **ERRORS}, openapi_extra=UPLOAD_BODY,
             summary="Upload a dataset (JSONL or CSV)")
def upload_dataset(request: HttpRequest):
    """Store a JSONL ("text" field per line) or CSV ("text" column) file. A malformed
    line refuses the whole file, naming the line; nothing is stored."""
    target = _upload_target(request, DatasetUploadForm(data=request.POST, files=request.FILES))
    if isinstance(target, JsonResponse):
        return target
    team, name, upload = target
    try:
        dataset = dataset_upload(team=team, user=request.auth, name=name, upload=upload)
    except UploadError as exc:
        return _upload_refused(exc)
    return Status(201, dataset_document(access.get_dataset(request.auth, dataset.pk)))
