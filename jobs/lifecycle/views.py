"""HTML pages for jobs: the list, the submit forms, a job's page with its live status,
result and artifacts, cancel.

Every view that takes a slug or an id starts with a team-scoped fetch from
jobs.access, so another team's object is a 404. Forms only validate; every write
goes through jobs.lifecycle.services. Bad input re-renders the form with the error
next to its field and a 4xx status, never a 500."""
from __future__ import annotations

import json

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST, require_http_methods, require_safe

from jobs import access, pages
from jobs.assets.artifacts import artifact_response
from jobs.cli import jobfile
from jobs.cli.jobfile import job_body
from jobs.lifecycle import charts, forecasts, selectors, services
from jobs.lifecycle.forms import JOB_FORMS
from jobs.models import Family, Job, JobAttempt, JobEvent, Kind, Team

JOBS_PER_PAGE = 50


# --- shared helpers ---------------------------------------------------------------


# --- home -------------------------------------------------------------------------

@login_required
@require_safe
def home(request: HttpRequest) -> HttpResponse:
    """The first team's job list; a page that says so when the user is in no team."""
    team = access.teams_of(request.user).first()
    if team is None:
        return pages.render_page(request, "jobs/no_team.html", {})
    return redirect("job_list", slug=team.slug)


# --- job list ---------------------------------------------------------------------

class JobFilterForm(forms.Form):
    status = forms.ChoiceField(choices=[("", "any status"), *Job.Status.choices], required=False)
    kind = forms.ChoiceField(choices=[("", "any kind"), *Kind.choices], required=False)


FAILURE_LABELS = {"timed_out": "Timed out", "worker_lost": "Its worker was lost", "crashed": "The job process crashed",
                  "error": "Failed", "cancelled": "Cancelled"}
LIST_POLL_MS = 3000  # the job list asks for its rows' state this often (a hidden tab less often)


def format_duration(seconds: float | None) -> str:
    """A duration for people: "0.8 s", "42 s", "3 min 05 s", "2 h 07 min"."""
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def list_reason(job: Job) -> str:
    """The job list's Reason cell: why a job waits, why it failed, how it ended."""
    S = Job.Status
    if job.status == S.PENDING:
        return job.reason or "Waiting for the scheduler to place it."
    if job.status == S.QUEUED:
        where = f"{job.host.name} cores {job.core_range}" if job.host_id and job.host else "a host"
        return f"Placed on {where}; starting."
    if job.status == S.FAILED:
        return job.reason or FAILURE_LABELS.get(job.failure, "Failed") + (f" ({job.failure})" if job.failure
                                                                          not in FAILURE_LABELS else "")
    if job.status == S.CANCELLED:
        return job.reason or ("Cancelled while running." if job.started_at else "Cancelled before it started.")
    return ""


def list_row(job: Job, now) -> dict:
    """What the job list shows of a job that changes while the page is open: the
    template renders these values and rows.json sends them again."""
    S = Job.Status
    running = job.status == S.RUNNING
    if job.started_at:
        seconds = max(((job.finished_at or now) - job.started_at).total_seconds(), 0.0)
        duration = format_duration(seconds)
    elif job.status in (S.PENDING, S.QUEUED):
        seconds = max((now - job.created_at).total_seconds(), 0.0)
        duration = f"waiting {format_duration(seconds)}"
    else:
        seconds, duration = None, ""
    return {
        "id": job.pk, "status": job.status, "status_label": job.get_status_display(), "running": running,
        "waiting": job.status in (S.PENDING, S.QUEUED), "duration": duration, "duration_s": seconds,
        "finished": pages.format_when(job.finished_at)[:16] if job.finished_at else "",  # as "Created": to the minute
        "finished_iso": job.finished_at.isoformat() if job.finished_at else "",
        "reason": list_reason(job), "reason_code": job.reason_code,
        "where": f"{job.host.name} · cores {job.core_range}" if job.host_id and job.host else f"{job.family} × {job.cores}",
        "placed": bool(job.host_id),
    }


def _job_filters(request: HttpRequest, team: Team):
    filters = JobFilterForm(request.GET)
    wanted = filters.cleaned_data if filters.is_valid() else {}
    return filters, selectors.team_jobs(team, status=wanted.get("status", ""), kind=wanted.get("kind", ""))


@login_required
@require_safe
def job_list(request: HttpRequest, slug: str) -> HttpResponse:
    team = access.get_team(request.user, slug)
    filters, jobs = _job_filters(request, team)
    # Keyset pages (?before=<id> / ?after=<id>) rather than numbered ones: a count of
    # a big team's jobs costs more than the whole page. A bad cursor shows the newest.
    cursors, _ = _query_ints(request.GET, "before", "after")
    page = selectors.job_page(jobs, before=cursors.get("before") if "before" in request.GET else None,
                              after=cursors.get("after") if "after" in request.GET else None, size=JOBS_PER_PAGE)
    now = timezone.now()
    selectors.show_live_reasons(page.jobs)
    rows = [(job, list_row(job, now)) for job in page.jobs]
    filtered = bool(request.GET.get("status") or request.GET.get("kind"))
    live = {"url": reverse("job_rows", kwargs={"slug": team.slug}), "poll_ms": LIST_POLL_MS,
            "ids": [job.pk for job in page.jobs],
            # only the newest page looks out for new jobs (an older page stays put)
            "newest": page.jobs[0].pk if page.jobs and page.newer_than is None else (0 if not page.jobs else None),
            "status": request.GET.get("status", ""), "kind": request.GET.get("kind", "")}
    return pages.render_page(request, "jobs/job_list.html", {
        "filters": filters, "page": page, "rows": rows, "filtered": filtered,
        "estimates": forecasts.estimates_for(page.jobs),
        # the kinds a user submits (endpoint replicas are started by their endpoint)
        "kinds": [(value, label) for value, label in Kind.choices if value in JOB_FORMS],
        "writable": pages.can_write(request.user, team), "live": live,
        "has_models": team.models.exists() if not page.jobs and not filtered else True,
    }, team=team, nav="jobs", status=200 if filters.is_valid() else 400)


MAX_ROWS_ASKED = 100


@login_required
@require_safe
def job_rows(request: HttpRequest, slug: str) -> JsonResponse:
    """What the job list polls: the current state of the jobs it shows (?ids=1,2,3,
    the team's jobs only) and, with ?newest=<id>, how many jobs matching its filters
    (?status=, ?kind=) arrived since."""
    team = access.get_team(request.user, slug)
    filters, jobs = _job_filters(request, team)
    if not filters.is_valid():
        return JsonResponse({"detail": "bad filters", "errors": filters.errors}, status=400)
    raw_ids = [part for part in request.GET.get("ids", "").split(",") if part]
    not_an_id = next((p for p in raw_ids if not (p.isascii() and p.isdigit() and len(p) <= 18)), None)
    if not_an_id is not None or len(raw_ids) > MAX_ROWS_ASKED:
        why = f"{not_an_id[:40]!r} is not a job id" if not_an_id is not None else f"{len(raw_ids)} ids"
        return JsonResponse({"detail": "bad query parameters", "errors": {
            "ids": [f"{why}: give at most {MAX_ROWS_ASKED} comma-separated job ids"]}}, status=400)
    cursors, errors = _query_ints(request.GET, "newest")
    if errors:
        return JsonResponse({"detail": "bad query parameters", "errors": errors}, status=400)
    now = timezone.now()
    shown = list(selectors.team_jobs(team).filter(pk__in=[int(p) for p in raw_ids])) if raw_ids else []
    selectors.show_live_reasons(shown)
    newer = 0
    if "newest" in request.GET:
        newer = len(jobs.filter(pk__gt=cursors["newest"]).values_list("pk", flat=True)[:MAX_ROWS_ASKED])
    return JsonResponse({"jobs": [list_row(job, now) for job in shown], "newer": newer, "poll_ms": LIST_POLL_MS},
                        headers={"Cache-Control": "no-store"})


# --- submit -----------------------------------------------------------------------

@login_required
@require_http_methods(["GET", "POST"])
def job_new(request: HttpRequest, slug: str, kind: str) -> HttpResponse:
    team = access.get_team(request.user, slug)
    form_class = JOB_FORMS.get(kind)
    if form_class is None:
        raise Http404("No such job kind")
    writable = pages.can_write(request.user, team)
    if request.method == "GET":
        prefill = _again_prefill(request, team, kind)
        prefill.update({k: v for k, v in request.GET.items() if k in form_class.base_fields and k != "prompts_file"})
        return _job_form_page(request, team, form_class(team=team, initial=prefill), writable)
    form = form_class(request.POST, request.FILES, team=team)
    if not writable:
        form.add_error(None, pages.viewer_sentence(team))
        return _job_form_page(request, team, form, writable, status=403)
    if not form.is_valid():
        return _job_form_page(request, team, form, writable, status=400)
    try:
        job = services.job_submit(team=team, user=request.user, form=form)
    except services.SubmitRefused as exc:
        form.add_error(None, exc.message)
        if exc.field in form.fields:
            form.add_error(exc.field, exc.message)
        return _job_form_page(request, team, form, writable, status=exc.status)
    messages.success(request, f"Job #{job.pk} submitted.")
    return redirect("job_detail", job_id=job.pk)


def _again_prefill(request: HttpRequest, team: Team, kind: str) -> dict:
    """?again=<job id>: the form's initial values from that job ("Run again"), as the
    API body that submits it again (jobs.cli.jobfile.job_body); none when the job is
    not of this team and kind."""
    raw = request.GET.get("again", "")
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        return {}
    job = Job.objects.filter(pk=int(raw), team=team, kind=kind).first()
    if job is None:
        return {}
    prefill = job_body(_job_as_document(job))
    prefill.pop("team"), prefill.pop("kind")
    if isinstance(prefill.get("prompts"), list):
        prefill["prompts"] = "\n".join(prefill["prompts"])  # the text field: one prompt per line
    return prefill


GANG_FIELDS = ("host_count", "same_network")  # fine-tunes only: the other kinds run on one host
RESOURCE_FIELDS = ("family", "cores", *GANG_FIELDS, "max_runtime_s")  # shown after what the job does
PROMPT_FIELDS = ("prompts", "prompts_file")  # inference: one choice of the two, shown together


def _number_limit(field) -> str:
    """ "1–64" from a number field's validators ("" when it has none)."""
    low = getattr(field, "min_value", None)
    high = getattr(field, "max_value", None)

    def fmt(value) -> str:
        return f"{value:,}" if isinstance(value, int) else f"{value:g}"

    if low is not None and high is not None:
        return f"{fmt(low)}–{fmt(high)}"
    if high is not None:
        return f"at most {fmt(high)}"
    if low is not None:
        return f"at least {fmt(low)}"
    return ""


def _family_facts(team: Team) -> dict[str, dict]:
    """Per family: online hosts and their largest core count, and the team's quota
    (guaranteed + borrowing limit), for the family choice and the cores limit."""
    from jobs.models import FamilyQuota, Host

    facts = {value: {"label": label, "hosts": 0, "host_cores": 0, "guaranteed": 0, "borrow": 0}
             for value, label in Family.choices}
    for family, core_ids in Host.objects.filter(state=Host.State.ONLINE).values_list("family", "core_ids"):
        if family in facts:
            facts[family]["hosts"] += 1
            facts[family]["host_cores"] = max(facts[family]["host_cores"], len(core_ids or ()))
    for family, guaranteed, borrow in FamilyQuota.objects.filter(team=team).values_list(
            "family", "guaranteed_cores", "borrow_limit"):
        if family in facts:
            facts[family].update(guaranteed=guaranteed, borrow=borrow)
    return facts


def _prepare_job_form(form, team: Team) -> dict:
    """What the form page states beside its fields: a lone model or dataset chosen
    already, each number's accepted range, the team's limits, and which families
    have no host online (marked in the family choice)."""
    from jobs.lifecycle.forms import MAX_PROMPT_CHARS, MAX_PROMPTS, TeamObjectField

    if not form.is_bound:
        for name, field in form.fields.items():
            if isinstance(field, TeamObjectField) and not form.initial.get(name):
                first_two = list(field.queryset.values_list("pk", flat=True)[:2])
                if len(first_two) == 1:
                    form.initial[name] = first_two[0]
    facts = _family_facts(team)
    if "family" in form.fields:
        form.fields["family"].choices = [
            (value, label if facts[value]["hosts"] else f"{label} (no host online)")
            for value, label in form.fields["family"].choices]
    labels = {"max_runtime_s": "Max runtime (seconds)", "prompts": "Prompt text", "prompts_file": "JSONL file"}
    for name, label in labels.items():
        if name in form.fields:
            form.fields[name].label = label
    limits: dict[str, str] = {}
    for name, field in form.fields.items():
        if isinstance(field, (forms.IntegerField, forms.FloatField)):
            limits[name] = _number_limit(field)
    quota = getattr(team, "quota", None)
    if "max_runtime_s" in form.fields and quota is not None:
        limits["max_runtime_s"] = f"1–{quota.max_runtime_s:,} s (the team's limit)"
    if "prompts" in form.fields:
        limits["prompts"] = f"up to {MAX_PROMPTS:,} prompts of {MAX_PROMPT_CHARS:,} characters"
    if "prompts_file" in form.fields:
        limits["prompts_file"] = "JSONL, up to 10 MiB"
    cores = {value: {"max": f["guaranteed"] + f["borrow"], "guaranteed": f["guaranteed"], "borrow": f["borrow"],
                     "host_cores": f["host_cores"], "online": bool(f["hosts"])} for value, f in facts.items()}
    return {"limits": limits, "family_cores": cores}


def _job_form_page(request: HttpRequest, team: Team, form, writable: bool, status: int = 200) -> HttpResponse:
    extra = _prepare_job_form(form, team)
    limits = extra["limits"]
    fields = []
    for bound in form:
        if bound.name in GANG_FIELDS and form.kind != Kind.FINETUNE:
            continue
        bound.limit = limits.get(bound.name, "")
        fields.append(bound)
    context = {"form": form, "kind": form.kind, "kind_label": Kind(form.kind).label, "writable": writable,
               "viewer_sentence": pages.viewer_sentence(team),
               "job_fields": [f for f in fields if f.name not in RESOURCE_FIELDS and f.name not in PROMPT_FIELDS],
               "prompt_fields": [f for f in fields if f.name in PROMPT_FIELDS],
               "prompt_choice": "file" if form.is_bound and request.FILES.get("prompts_file")
               and not form.data.get("prompts") else "text",
               "resource_fields": [f for f in fields if f.name in RESOURCE_FIELDS],
               "family_cores": extra["family_cores"]}
    if form.kind == Kind.COMPILE:
        context["allow_list"] = selectors.compiler_allow_list()
    return pages.render_page(request, "jobs/job_new.html", context, team=team, nav="jobs", status=status)


# --- job page ---------------------------------------------------------------------

@login_required
@require_safe
def job_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    job = access.get_job(request.user, job_id)
    selectors.show_live_reasons([job])
    events = selectors.job_events(job)
    log = selectors.log_tail(job)
    spec = json.dumps(job.spec, indent=2, sort_keys=True)
    if len(spec) > pages.SPEC_SHOWN_CHARS:
        spec = spec[:pages.SPEC_SHOWN_CHARS] + "\n… (cut; the API has the whole spec)"
    live = {"statusUrl": f"/jobs/{job.pk}/status.json", "resultUrl": f"/jobs/{job.pk}/result/",
            "eventsAfter": events[-1].pk if events else 0, "logOffset": log.end, "finished": job.is_finished}
    return pages.render_page(request, "jobs/job_detail.html", {
        "job": job, "events": events, "log": log, "live": live,
        # an endpoint's replica is started by its endpoint, never submitted again
        "spec_json": spec, "again": _again_forms(request, job) if job.kind != Kind.SERVE else None,
        "can_submit": pages.can_write(request.user, job.team),
        "can_cancel": not job.is_finished and access.can_cancel(request.user, job),
        **_suspend_flags(request.user, job),
        "queue_position": _queue_position(job), **_result_context(job), **_gang_context(job),
    }, team=job.team, nav="jobs")


def _gang_context(job: Job) -> dict:
    """A gang's rank table, each rank with its host's latest utilization of its cores
    ("util_now"), and the per-host utilization chart."""
    ranks = selectors.gang_ranks(job)
    if job.host_count <= 1:
        return {"gang_ranks": ranks}
    rows = selectors.gang_utilization(job)
    now = {row["rank"]: row["now"] for row in rows or []}
    for rank in ranks:
        rank["util_now"] = now.get(rank["rank"])
    unit = "CPU" if job.family == "cpu" else "NeuronCore"
    return {"gang_ranks": ranks, "gang_util_figure": charts.host_util_figure(rows or [], unit),
            "gang_util_unit": unit}


def _job_as_document(job: Job) -> dict:
    """The keys of the API's job document that jobs.cli.jobfile.job_body reads."""
    return {"team": job.team.slug, "kind": job.kind, "family": job.family, "cores": job.cores,
            "max_runtime_s": job.max_runtime_s, "spec": job.spec}


AGAIN_SHOWN_CHARS = 20_000  # a job with more prompts than this is shown as `neurondeck clone` only


def _again_forms(request: HttpRequest, job: Job) -> dict:
    """The same job as a CLI command, a job file and a curl call (each submits an
    equal job), and the "Run again" link: the submit form prefilled with it."""
    body = job_body(_job_as_document(job))
    shown = len(json.dumps(body)) <= AGAIN_SHOWN_CHARS
    return {
        "clone": f"neurondeck clone {job.pk}",
        "command": jobfile.submit_command(body) if shown else None,
        "file": jobfile.job_file(body) if shown else None,
        "curl": jobfile.curl_command(body, request.build_absolute_uri(reverse("api:submit_job"))) if shown else None,
        "run_again": reverse("job_new", kwargs={"slug": job.team.slug, "kind": job.kind}) + f"?again={job.pk}",
    }


def _suspend_flags(user, job: Job) -> dict[str, bool]:
    """Which of Suspend / Resume the page offers: fine-tunes only, to whoever may cancel."""
    allowed = job.kind == Kind.FINETUNE and access.can_cancel(user, job)
    return {"can_suspend": allowed and not job.cancel_requested and job.status in (
                Job.Status.PENDING, Job.Status.QUEUED, Job.Status.RUNNING),
            "can_resume": allowed and job.status == Job.Status.SUSPENDED}


def _queue_position(job: Job) -> int | None:
    """1-based place among pending jobs of its family (None unless pending)."""
    return selectors.queue_position(job) if job.status == Job.Status.PENDING else None


def _show_reason(job: Job) -> bool:
    return bool(job.reason_code or job.reason) and job.status in (Job.Status.PENDING, Job.Status.FAILED,
                                                                  Job.Status.CANCELLED, Job.Status.SUSPENDED)


def _result_context(job: Job) -> dict:
    """What the result fragment shows: key figures, the loss chart or the outputs, artifacts."""
    context: dict = {"result_facts": result_facts(job), "artifacts": list(job.artifacts.all()),
                     "result_json": json.dumps(job.result or {}, indent=2, sort_keys=True)[:pages.SPEC_SHOWN_CHARS],
                     "show_reason": _show_reason(job)}
    if job.kind == Kind.FINETUNE and (job.is_finished or job.attempts > 0):
        steps, losses = selectors.loss_series(job)
        context["loss_figure"] = charts.loss_figure(steps, losses, resumes=selectors.resume_steps(job)) \
            if steps else None
        context["stages"] = selectors.training_stages(job)
        context["ranks"] = _rank_rows(job, selectors.rank_progress(job))
    if job.kind == Kind.INFERENCE and job.status == Job.Status.SUCCEEDED:
        context["outputs"] = selectors.inference_outputs(job)
    return context


def _rank_rows(job: Job, progress: list[dict]) -> list[dict]:
    """Each torch rank's host beside its progress: node rank 0 ran on the job's host
    (where it last ran, if it is not placed now); a gang's other nodes on their
    GangMember hosts."""
    host = job.host
    if host is None:  # not placed now (suspended, requeued, finished): where it last ran
        last = JobAttempt.objects.filter(job=job).select_related("host").order_by("-number").first()
        host = last.host if last else None
    hosts = {0: host.name if host else "—"}
    for member in job.gang.select_related("host"):
        hosts[member.rank] = member.host.name if member.host else "—"
    # A torch rank's host: a cpu gang runs one process per host, a Neuron gang one per core.
    per_host = 1 if job.family == Family.CPU else max(job.cores // max(job.host_count, 1), 1)
    return [{**row, "host": hosts.get(row["rank"] // per_host, "—")} for row in progress]


def _num(value, fmt: str, unit: str = "") -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return f"{value:{fmt}}{unit}"


def result_facts(job: Job) -> list[tuple[str, str]]:
    """(label, value) pairs of a finished job's result, by kind; missing values are left out."""
    r = job.result or {}
    by_kind = {
        Kind.COMPILE: [("Compile time", _num(r.get("compile_seconds"), ".2f", " s")),
                       ("Latency p50", _num(r.get("latency_ms_p50"), ".3f", " ms")),
                       ("Latency p95", _num(r.get("latency_ms_p95"), ".3f", " ms")),
                       ("Max logit difference", _num(r.get("max_abs_logit_diff"), ".3g")),
                       ("Input shape", " × ".join(map(str, r["input_shape"])) if r.get("input_shape") else None),
                       ("Compiler", r.get("compiler_version")),
                       ("Cache hit", "yes" if r.get("cache_hit") else None)],
        Kind.FINETUNE: [("Final loss", _num(r.get("final_loss"), ".4f")),
                        ("First loss", _num(r.get("first_loss"), ".4f")),
                        ("Steps", _num(r.get("steps"), "d")),
                        ("Training time", _num(r.get("train_seconds"), ".1f", " s")),
                        ("Resumed from step", _num(r.get("resumed_from_step"), "d") if r.get("resumed_from_step")
                         else None),
                        ("Data-parallel ranks", _num(r.get("world_size"), "d") if (r.get("world_size") or 1) > 1
                         else None),
                        ("Tokens per second", _num(r.get("tokens_per_s"), ".1f"))],
        Kind.INFERENCE: [("Requests", _num(r.get("requests"), "d")),
                         ("Latency p50", _num(r.get("latency_ms_p50"), ".1f", " ms")),
                         ("Latency p90", _num(r.get("latency_ms_p90"), ".1f", " ms")),
                         ("Latency p99", _num(r.get("latency_ms_p99"), ".1f", " ms")),
                         ("Throughput", _num(r.get("requests_per_s"), ".2f", " requests/s")),
                         ("Tokens per second", _num(r.get("tokens_per_s"), ".1f"))],
    }
    return [(label, value) for label, value in by_kind.get(job.kind, []) if value is not None]


# --- live updates -----------------------------------------------------------------

def _query_ints(query, *names: str) -> tuple[dict[str, int], dict[str, list[str]]]:
    values: dict[str, int] = {}
    errors: dict[str, list[str]] = {}
    for name in names:
        raw = query.get(name, "0")
        if raw.isascii() and raw.isdigit() and len(raw) <= 18:  # fits a bigint
            values[name] = int(raw)
        else:
            errors[name] = [f"{name} must be a non-negative integer, got {raw[:40]!r}"]
    return values, errors


def _event_json(event: JobEvent) -> dict:
    return {"id": event.pk, "at": event.at.isoformat(), "at_display": pages.format_when(event.at), "kind": event.kind,
            "actor": event.actor.username if event.actor else "system", "message": event.message}


@login_required
@require_safe
def job_status(request: HttpRequest, job_id: int) -> JsonResponse:
    """What the job page polls: status, reason, events after `events_after`, log from
    `log_offset` (follow with log.offset), and the result once the job has finished."""
    job = access.get_job(request.user, job_id)
    query, errors = _query_ints(request.GET, "events_after", "log_offset")
    if errors:
        return JsonResponse({"detail": "bad query parameters", "errors": errors}, status=400)
    log = selectors.log_since(job, query["log_offset"])
    # Why a pending job waits goes with the same answer as its status, so the page's
    # explanation and badge change together (the queue is ordered once for both).
    pending = selectors.pending_explanation(job) if job.status == Job.Status.PENDING else None
    return JsonResponse({
        "id": job.pk, "status": job.status, "status_label": job.get_status_display(), "finished": job.is_finished,
        "reason_code": job.reason_code, "reason": job.reason, "show_reason": _show_reason(job),
        "queue_position": pending["position"] if pending else None, "pending": pending,
        "host": job.host.name if job.host else None,
        "core_range": job.core_range, "attempts": job.attempts, "started_at": pages.format_when(job.started_at),
        "finished_at": pages.format_when(job.finished_at),
        "events": [_event_json(e) for e in selectors.job_events(job, after_id=query["events_after"])],
        "log": {"text": log.text, "offset": log.end, "more": log.end < job.log_bytes},
        "can_cancel": not job.is_finished and access.can_cancel(request.user, job),
        **_suspend_flags(request.user, job),
        "result": job.result if job.is_finished else None,
        "ranks": [{**rank, **{key: pages.format_when(rank[key]) for key in ("started_at", "heartbeat_at", "finished_at")}}
                  for rank in selectors.gang_ranks(job)],
        # Every gang host's utilization of its rank's cores, for the per-host chart (null: none to show).
        "gang_util": selectors.gang_utilization(job) if job.host_count > 1 else None,
    }, headers={"Cache-Control": "no-store"})


@login_required
@require_safe
def job_result(request: HttpRequest, job_id: int) -> HttpResponse:
    """The result + artifacts section alone, fetched by the job page when the job finishes.
    A browser opening the address itself (a navigation, by the Fetch metadata header) is
    sent to the job page: the section alone has no page around it."""
    job = access.get_job(request.user, job_id)
    if request.headers.get("Sec-Fetch-Mode") == "navigate":
        return redirect(f"{reverse('job_detail', args=[job.pk])}#result")
    return render(request, "jobs/_result.html", {"job": job, **_result_context(job)})


# --- cancel -----------------------------------------------------------------------

@login_required
@require_POST
def job_cancel(request: HttpRequest, job_id: int) -> HttpResponse:
    job = access.get_job(request.user, job_id)
    try:
        cancelled = services.job_cancel(job=job, user=request.user)
    except access.Forbidden as exc:
        return pages.render_page(request, "jobs/refused.html", {"sentence": str(exc), "back": f"/jobs/{job.pk}/"},
                     team=job.team, nav="jobs", status=403)
    if cancelled:
        messages.success(request, f"Cancel of job #{job.pk} requested.")
    else:
        messages.info(request, f"Job #{job.pk} had already finished.")
    return redirect("job_detail", job_id=job.pk)


# --- suspend and resume ------------------------------------------------------------

@login_required
@require_POST
def job_suspend(request: HttpRequest, job_id: int) -> HttpResponse:
    return _suspend_or_resume(request, job_id, services.job_suspend,
                              "Job #{pk} suspended: its cores are free; resume it to continue from its checkpoint.")


@login_required
@require_POST
def job_resume(request: HttpRequest, job_id: int) -> HttpResponse:
    return _suspend_or_resume(request, job_id, services.job_resume, "Job #{pk} resumed: it is back in the queue.")


def _suspend_or_resume(request: HttpRequest, job_id: int, action, done: str) -> HttpResponse:
    job = access.get_job(request.user, job_id)
    try:
        action(job=job, user=request.user)
    except access.Forbidden as exc:
        return pages.render_page(request, "jobs/refused.html", {"sentence": str(exc), "back": f"/jobs/{job.pk}/"},
                                 team=job.team, nav="jobs", status=403)
    except services.NotSuspendable as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, done.format(pk=job.pk))
    return redirect("job_detail", job_id=job.pk)


# --- artifacts --------------------------------------------------------------------

@login_required
@require_safe
def job_artifact(request: HttpRequest, job_id: int, name: str) -> HttpResponse:
    """Download an artifact: a file is streamed, a directory is streamed as a zip; a
    path inside a directory artifact is served too, never anything outside it."""
    return artifact_response(access.get_job(request.user, job_id), name)


# --- models and datasets ----------------------------------------------------------


# --- API tokens -------------------------------------------------------------------


