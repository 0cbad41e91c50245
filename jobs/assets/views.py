"""HTML pages for a team's models and datasets: the lists with their upload forms, and
a model's page with its lineage. Every fetch is team-scoped (jobs.access)."""
from __future__ import annotations

import json
from collections.abc import Callable

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_safe

from jobs import access, pages
from jobs.assets import selectors
from jobs.assets import services as asset_services
from jobs.assets.forms import DatasetUploadForm, ModelUploadForm
from jobs.assets.uploads import UploadError
from jobs.models import Job, ModelAsset, Team


def _size(n: int) -> str:
    """512 MiB, 1 GiB: the upload limit as people read it."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} TiB"


def _upload(request: HttpRequest, team: Team, form_class: type[forms.Form],
            save: Callable) -> tuple[forms.Form, int, object | None]:
    """Validate and save an upload POST: (form, HTTP status, saved object or None).
    An UploadError from the service becomes an error on the field it names."""
    form = form_class(request.POST, request.FILES)
    if not pages.can_write(request.user, team):
        form.add_error(None, pages.viewer_sentence(team))
        return form, 403, None
    if not form.is_valid():
        return form, 400, None
    try:
        saved = save(team=team, user=request.user, name=form.cleaned_data["name"], upload=form.cleaned_data["file"])
    except UploadError as exc:
        form.add_error(exc.field if exc.field in form.fields else None, exc.message)
        return form, 400, None
    return form, 200, saved


@login_required
@require_http_methods(["GET", "POST"])
def model_list(request: HttpRequest, slug: str) -> HttpResponse:
    team = access.get_team(request.user, slug)
    form, status = ModelUploadForm(), 200
    if request.method == "POST":
        form, status, model = _upload(request, team, ModelUploadForm, asset_services.model_upload)
        if model is not None:
            messages.success(request, f"Model {model} uploaded.")
            return redirect("model_detail", model_id=model.pk)
    return pages.render_page(request, "jobs/model_list.html", {"rows": selectors.model_lineage(team), "form": form,
                                                   "upload_limit": f"a .zip, up to {_size(settings.MAX_UPLOAD_BYTES)}",
                                                   "writable": pages.can_write(request.user, team),
                                                   "viewer_sentence": pages.viewer_sentence(team)},
                 team=team, nav="models", status=status)


@login_required
@require_safe
def model_detail(request: HttpRequest, model_id: int) -> HttpResponse:
    model = access.get_model(request.user, model_id)
    same_team = ModelAsset.objects.filter(team=model.team)  # lineage never crosses teams, even if rows say so
    same_team_jobs = Job.objects.filter(team=model.team)
    return pages.render_page(request, "jobs/model_detail.html", {
        "model": model,
        "parent": same_team.filter(pk=model.parent_id).first() if model.parent_id else None,
        "children": list(same_team.filter(parent=model).order_by("name", "version")),
        "source_job": same_team_jobs.filter(pk=model.source_job_id).first() if model.source_job_id else None,
        "used_by": list(same_team_jobs.filter(model=model).select_related("user").order_by("-id")[:20]),
        "meta_json": json.dumps(model.meta or {}, indent=2, sort_keys=True)[:pages.SPEC_SHOWN_CHARS],
        "writable": pages.can_write(request.user, model.team),
    }, team=model.team, nav="models")


@login_required
@require_http_methods(["GET", "POST"])
def dataset_list(request: HttpRequest, slug: str) -> HttpResponse:
    team = access.get_team(request.user, slug)
    form, status = DatasetUploadForm(), 200
    if request.method == "POST":
        form, status, dataset = _upload(request, team, DatasetUploadForm, asset_services.dataset_upload)
        if dataset is not None:
            messages.success(request, f"Dataset {dataset.name} uploaded: {dataset.rows} rows.")
            return redirect("dataset_list", slug=team.slug)
    datasets = team.datasets.select_related("created_by").order_by("-created_at")
    return pages.render_page(request, "jobs/dataset_list.html", {"datasets": datasets, "form": form,
                                                     "upload_limit": f".jsonl or .csv, up to "
                                                                     f"{_size(settings.MAX_UPLOAD_BYTES)}",
                                                     "writable": pages.can_write(request.user, team),
                                                     "viewer_sentence": pages.viewer_sentence(team)},
                 team=team, nav="datasets", status=status)
