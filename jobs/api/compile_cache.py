"""The compile cache's JSON API: the answer before the queue for the submit form, the
cache's configurations (search, pin), the fleet's size against its cap, and the
team's "cached configurations only" option."""
from __future__ import annotations

from typing import Any

from django.http import Http404, HttpRequest
from ninja import Query, Router, Status
from pydantic import StrictBool

from jobs import access
from jobs.api.schemas import MAX_OFFSET, BodyIn, ErrorOut
from jobs.compile_cache import index
from jobs.compile_cache.lookup import compile_answer
from jobs.lifecycle.forms import CompileForm
from jobs.lifecycle.services import compile_cache_key
from jobs.models import ModelAsset, Role

router = Router(tags=["compile cache"])
ERRORS = {400: ErrorOut, 401: ErrorOut, 403: ErrorOut, 404: ErrorOut}
PAGE = 50


class PinIn(BodyIn):
    pinned: StrictBool  # JSON true or false: pydantic would read "yes", "0" and 1


class PolicyIn(BodyIn):
    cached_configurations_only: StrictBool


def _error(status: int, detail: str, **extra) -> Status:
    return Status(status, {"detail": detail, **extra})


@router.get("/compile-cache/answer", response={200: dict[str, Any], **ERRORS},
            summary="Is this compile cached? (before submitting)")
def cache_answer(request: HttpRequest, team: str):
    """The compile form's fields as query parameters; answers "cached: done at once" or
    "not cached: about N minutes" with the sample size, and the cached configurations
    of the same model. Creates nothing."""
    owner = access.get_team(request.auth, team)
    data = {k: v for k, v in request.GET.items() if k in CompileForm.base_fields}
    form = CompileForm(data=data, team=owner)
    if not form.is_valid():
        errors = {f: list(m) for f, m in form.errors.items()}
        return _error(400, "; ".join(f"{f}: {' '.join(m)}" for f, m in errors.items()), code="invalid", errors=errors)
    spec, model, family = form.spec(), form.cleaned_data["model"], form.cleaned_data["family"]
    return compile_answer(owner, model, spec, family, compile_cache_key(model, spec, family))


@router.get("/compile-cache", response={200: dict[str, Any], **ERRORS}, summary="The compile cache")
def list_entries(request: HttpRequest, team: str | None = None, q: str = "", offset: int = Query(0, ge=0, le=MAX_OFFSET)):
    """Every cached configuration of the caller's teams (staff: the fleet), most
    recently used first; `q` searches model, builder, key prefix, compiler version, task."""
    teams = access.teams_of(request.auth)
    if team:
        teams = teams.filter(slug=team)
    rows = index.search(index.entries(teams), q)
    page = list(rows[offset:offset + PAGE + 1])
    return {"entries": [index.entry_document(e) for e in page[:PAGE]], "offset": offset,
            "more": len(page) > PAGE, "fleet": index.fleet_usage()}


def _entry(request: HttpRequest, entry_id: int) -> ModelAsset:
    try:
        entry = access.get_model(request.auth, entry_id)
    except Http404:
        entry = None  # another team's, or none: the same answer
    if entry is None or not entry.compile_key:
        raise Http404("No such cache entry")
    return entry


@router.get("/compile-cache/{dbid:entry_id}", response={200: dict[str, Any], **ERRORS}, summary="One cache entry")
def get_entry(request: HttpRequest, entry_id: int):
    return index.entry_document(_entry(request, entry_id))


@router.put("/compile-cache/{dbid:entry_id}/pin", response={200: dict[str, Any], **ERRORS},
            summary="Pin or unpin a cache entry (team managers)")
def pin_entry(request: HttpRequest, entry_id: int, body: PinIn):
    entry = _entry(request, entry_id)
    try:
        access.require_role(request.auth, entry.team, Role.MANAGER)
    except access.Forbidden as exc:
        return _error(403, f"You cannot pin cache entries: {exc}.", code="forbidden")
    index.set_pinned(entry, body.pinned)
    return index.entry_document(entry)


@router.put("/teams/{slug}/compile-cache-policy", response={200: dict[str, Any], **ERRORS},
            summary="Cached configurations only, for inference (team managers)")
def set_policy(request: HttpRequest, slug: str, body: PolicyIn):
    team = access.get_team(request.auth, slug)
    try:
        access.require_role(request.auth, team, Role.MANAGER)
    except access.Forbidden as exc:
        return _error(403, f"You cannot change the team's compile cache policy: {exc}.", code="forbidden")
    type(team).objects.filter(pk=team.pk).update(cached_configurations_only=body.cached_configurations_only)
    return {"team": team.slug, "cached_configurations_only": body.cached_configurations_only}
