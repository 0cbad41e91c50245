"""The JSON API for inference endpoints (/api/v1/...).

- GET    /teams/{slug}/endpoints     the team's endpoints
- POST   /teams/{slug}/endpoints     {name, model, family, cores_per_replica, min_replicas,
                                     max_replicas, options: {max_batch_size, max_seq_len,
                                     max_concurrent}}: 201; its replicas start
- GET    /endpoints/{id}             the endpoint, its replicas, revisions and live figures
- PATCH  /endpoints/{id}             the fields to change: min/max rescale; model, options or
                                     cores per replica roll a new revision out
- DELETE /endpoints/{id}             drain and stop its replicas: 202
- GET    /endpoints/{id}/events      the timeline (rollouts, scaling, crashes)

Another team's endpoint is a 404 (jobs.access.get_endpoint); a viewer's write a 403.
Bad input is a 400 naming each field (the same forms as the page)."""
from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from ninja import Router

from jobs import access
from jobs.api.body import json_type_errors, read_json
from jobs.api.schemas import ErrorOut
from jobs.endpoints import selectors, services
from jobs.endpoints.forms import OPTION_FIELDS, EndpointChangeForm, EndpointCreateForm
from jobs.models import Endpoint, Replica

router = Router(tags=["endpoints"])
ERRORS = {400: ErrorOut, 403: ErrorOut, 404: ErrorOut}
CREATE_FIELDS = ("name", "model", "family", "cores_per_replica", "min_replicas", "max_replicas")
CHANGE_FIELDS = ("model", "cores_per_replica", "min_replicas", "max_replicas")
_INT = {"type": "integer", "minimum": 0}
_OPTIONS = {"type": "object", "properties": {
    "max_batch_size": {"type": "integer", "minimum": 1, "maximum": 256, "default": 8},
    "max_seq_len": {"type": "integer", "minimum": 8, "maximum": 32768, "default": 256},
    "max_concurrent": {"type": "integer", "minimum": 1, "maximum": 4096, "default": 16}}}
_CREATE_BODY = {"type": "object", "required": ["name", "model"], "properties": {
    "name": {"type": "string", "pattern": "^[-a-zA-Z0-9_]+$", "maxLength": 63},
    "model": {"type": "integer", "description": "a model id of the team"},
    "family": {"type": "string", "enum": ["cpu", "inf2", "trn1", "trn2"], "default": "cpu"},
    "cores_per_replica": {**_INT, "minimum": 1, "default": 1}, "min_replicas": {**_INT, "default": 1},
    "max_replicas": {**_INT, "minimum": 1, "default": 1}, "options": _OPTIONS},
    "example": {"name": "chat", "model": 3, "min_replicas": 0, "max_replicas": 2, "options": {"max_batch_size": 8}}}
_CHANGE_BODY = {"type": "object", "properties": {
    "model": {"type": "integer"}, "cores_per_replica": {**_INT, "minimum": 1}, "min_replicas": _INT,
    "max_replicas": {**_INT, "minimum": 1}, "options": _OPTIONS}, "example": {"options": {"max_batch_size": 16}}}


def _error(status: int, detail: str, *, code: str, errors: dict[str, list[str]] | None = None) -> JsonResponse:
    body: dict[str, Any] = {"detail": detail, "code": code}
    if errors:
        body["errors"] = errors
    return JsonResponse(body, status=status)


def _invalid(what: str, errors: dict[str, list[str]]) -> JsonResponse:
    return _error(400, f"{what}: " + "; ".join(f"{f}: {' '.join(m)}" for f, m in errors.items()), code="invalid",
                  errors=errors)


def _flatten(body: Any, allowed: tuple[str, ...]) -> tuple[dict, dict[str, list[str]]]:
    """The form data of a JSON body: top-level fields plus options.* flattened; an
    unknown field or a non-object options is an error naming it."""
    if not isinstance(body, dict):
        return {}, {"body": ["send a JSON object"]}
    errors: dict[str, list[str]] = {}
    data = {k: v for k, v in body.items() if k in allowed}
    for key in sorted(set(body) - set(allowed) - {"options"} - set(OPTION_FIELDS)):
        errors[key] = [f"unknown field; the fields are {', '.join((*allowed, 'options'))}"]
    options = body.get("options", {})
    if not isinstance(options, dict):
        errors["options"] = ["must be an object with " + ", ".join(OPTION_FIELDS)]
        options = {}
    for key in sorted(set(options) - set(OPTION_FIELDS)):
        errors[f"options.{key}"] = [f"unknown option; the options are {', '.join(OPTION_FIELDS)}"]
    data.update({k: body[k] for k in OPTION_FIELDS if k in body})
    data.update({k: v for k, v in options.items() if k in OPTION_FIELDS})
    for key, value in data.items():
        if value is None:
            errors[_field(key, body)] = [f"must be a {'string' if key in ('name', 'family') else 'number'}, not null"]
    return data, errors


def _typed(data: dict, form_class: type, body: dict) -> dict[str, list[str]]:
    """The JSON types of the fields (jobs.api.body.json_type_errors: ids and counts are
    integers, names strings), each error named as the body has the field."""
    present = {k: v for k, v in data.items() if v is not None}
    return json_type_errors(present, form_class.base_fields, names={k: _field(k, body) for k in present})


def _field(name: str, body: dict) -> str:
    """The name a field's error carries: options.x when it came inside options."""
    return f"options.{name}" if name in OPTION_FIELDS and name in (body.get("options") or {}) else name


def _form_errors(form, body: dict) -> dict[str, list[str]]:
    return {_field(f, body): list(m) for f, m in form.errors.items()}


def endpoint_document(endpoint: Endpoint, *, detail: bool = False) -> dict:
    doc = {
        "id": endpoint.pk, "team": endpoint.team.slug, "name": endpoint.name, "state": endpoint.state,
        "url": selectors.public_url(endpoint),
        "model": {"id": endpoint.model_id, "name": str(endpoint.model)} if endpoint.model_id else None,
        "family": endpoint.family, "cores_per_replica": endpoint.cores_per_replica,
        "min_replicas": endpoint.min_replicas, "max_replicas": endpoint.max_replicas,
        "desired_replicas": endpoint.desired_replicas, "options": endpoint.options,
        "revision": endpoint.revision, "serving_revision": endpoint.serving_revision or None,
        "created_by": endpoint.created_by.username if endpoint.created_by else None,
        "created_at": endpoint.created_at.isoformat(), "updated_at": endpoint.updated_at.isoformat(),
    }
    rows = selectors.replica_rows(endpoint) if detail else None
    ready = (sum(1 for r in rows if r.state == Replica.State.READY and r.revision == endpoint.serving_revision)
             if rows is not None else getattr(endpoint, "ready", 0))
    doc["health"] = selectors.health(endpoint, ready)
    if detail:
        stats = selectors.stats(endpoint.pk)
        doc.update({
            "replicas": [r.as_dict() for r in rows],
            "revisions": [{"number": v.number, "state": v.state, "model": str(v.model) if v.model else None,
                           "options": v.options, "cores_per_replica": v.cores_per_replica,
                           "created_at": v.created_at.isoformat(),
                           "finished_at": v.finished_at.isoformat() if v.finished_at else None}
                          for v in selectors.revisions(endpoint)],
            "stats": stats.as_dict() if stats else None,
            "cold_starts": selectors.cold_starts(endpoint),
        })
    return doc


@router.get("/teams/{slug}/endpoints", summary="A team's endpoints")
def endpoint_list(request: HttpRequest, slug: str):
    team = access.get_team(request.auth, slug)
    return {"endpoints": [endpoint_document(e) for e in selectors.endpoints_of(team)]}


@router.post("/teams/{slug}/endpoints", response={201: dict, **ERRORS}, summary="Create an endpoint",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _CREATE_BODY}}}})
def endpoint_create(request: HttpRequest, slug: str):
    """Its first revision's replicas start at once (placed by the scheduler like any
    job, within the team's quota)."""
    team = access.get_team(request.auth, slug)
    body, refused = read_json(request, "No endpoint was created", empty={})
    if refused is not None:
        return refused
    data, errors = _flatten(body, CREATE_FIELDS)
    errors.update(_typed(data, EndpointCreateForm, body))
    form = EndpointCreateForm(data, team=team)
    if not form.is_valid():
        errors.update({f: m for f, m in _form_errors(form, body).items() if f not in errors})
    if errors:
        return _invalid("No endpoint was created", errors)
    try:
        endpoint = services.endpoint_create(team=team, user=request.auth, form=form)
    except access.Forbidden as exc:
        return _error(403, str(exc), code="forbidden")
    except services.EndpointInvalid as exc:
        return _invalid("No endpoint was created", exc.errors)
    return JsonResponse(endpoint_document(endpoint, detail=True), status=201)


@router.get("/endpoints/{dbid:endpoint_id}", response={200: dict, **ERRORS}, summary="An endpoint")
def endpoint_detail(request: HttpRequest, endpoint_id: int):
    return endpoint_document(access.get_endpoint(request.auth, endpoint_id), detail=True)


@router.patch("/endpoints/{dbid:endpoint_id}", response={200: dict, **ERRORS}, summary="Change or scale an endpoint",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _CHANGE_BODY}}}})
def endpoint_patch(request: HttpRequest, endpoint_id: int):
    """Only the fields given change. min / max rescale at once; a new model, options
    or cores per replica start a rollout (new replicas; traffic moves once they are
    ready; the old ones drain; rolled back if the new ones fail)."""
    endpoint = access.get_endpoint(request.auth, endpoint_id)
    body, refused = read_json(request, "The endpoint was not changed", empty={})
    if refused is not None:
        return refused
    data, errors = _flatten(body, CHANGE_FIELDS)
    if not errors and not data:
        return _error(400, "Send a JSON object with the fields to change.", code="empty")
    errors.update(_typed(data, EndpointChangeForm, body))
    form = EndpointChangeForm(data, endpoint=endpoint)
    if not form.is_valid():
        errors.update({f: m for f, m in _form_errors(form, body).items() if f not in errors})
    if errors:
        return _invalid("The endpoint was not changed", errors)
    try:
        endpoint = services.endpoint_change(endpoint=endpoint, user=request.auth, form=form)
    except access.Forbidden as exc:
        return _error(403, str(exc), code="forbidden")
    except services.EndpointInvalid as exc:
        return _invalid("The endpoint was not changed", exc.errors)
    return endpoint_document(endpoint, detail=True)


@router.delete("/endpoints/{dbid:endpoint_id}", response={202: dict, **ERRORS}, summary="Delete an endpoint")
def endpoint_remove(request: HttpRequest, endpoint_id: int):
    endpoint = access.get_endpoint(request.auth, endpoint_id)
    try:
        endpoint = services.endpoint_delete(endpoint=endpoint, user=request.auth)
    except access.Forbidden as exc:
        return _error(403, str(exc), code="forbidden")
    return JsonResponse(endpoint_document(endpoint), status=202)


@router.get("/endpoints/{dbid:endpoint_id}/events", response={200: dict, **ERRORS}, summary="An endpoint's timeline")
def endpoint_events(request: HttpRequest, endpoint_id: int):
    endpoint = access.get_endpoint(request.auth, endpoint_id)
    return {"events": [{"at": e.at.isoformat(), "kind": e.kind, "revision": e.revision, "message": e.message,
                        "actor": e.actor.username if e.actor else None, "data": e.data}
                       for e in selectors.timeline(endpoint)]}
