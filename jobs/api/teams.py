"""The JSON API for teams, quotas and why a job waits (/api/v1/...).

- GET  /jobs/{id}/pending    reason code, sentence, queue position, who is ahead
- GET  /teams/{slug}         the team, its quota and its usage against it
- PATCH /teams/{slug}/quota  staff only: change quota numbers (audited)

Every id or slug is fetched through jobs.access, so another team's job or team is
a 404. Bad input is a 400 `{"detail", "errors": {field: [message]}}` from the same
form the admin quota page uses; a team member who is not staff gets 403 on PATCH."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from django.http import HttpRequest, JsonResponse
from ninja import Router, Schema

from jobs import access
from jobs.api.body import json_type_errors, read_json
from jobs.api.schemas import ErrorOut
from jobs.lifecycle import selectors
from jobs.quotas import selectors as quota_selectors
from jobs.quotas import services as quota_services
from jobs.quotas.forms import QuotaForm, flatten_quota_body

router = Router(tags=["teams"])


class AheadOut(Schema):
    id: int | None  # null for another team's job
    team: str
    kind: str | None  # null for another team's job
    cores: int
    mine: bool


class PendingOut(Schema):
    status: str
    reason_code: str
    reason: str
    hint: str
    family: str
    position: int | None
    queue_length: int
    ahead: list[AheadOut]
    # estimated_start, earliest, latest, in_s, summary, reserved, basis; computed_at and age_s: when the periodic
    # run computed it (computed_at null: not computed yet, the summary says "estimate being computed")
    estimate: dict[str, Any] | None = None


class AuditOut(Schema):
    at: datetime
    actor: str | None
    subject: str
    old: str
    new: str


class TeamOut(Schema):
    team: dict[str, Any]
    quota: dict[str, Any]
    usage: dict[str, Any]


class QuotaChangeOut(TeamOut):
    changes: list[AuditOut]
    warnings: list[str]


ERRORS = {400: ErrorOut, 403: ErrorOut, 404: ErrorOut}


def _error(status: int, detail: str, *, code: str, errors: dict[str, list[str]] | None = None) -> JsonResponse:
    body: dict[str, Any] = {"detail": detail, "code": code}
    if errors:
        body["errors"] = errors
    return JsonResponse(body, status=status)


@router.get("/jobs/{dbid:job_id}/pending", response={200: PendingOut, **ERRORS}, summary="Why a job waits")
def job_pending(request: HttpRequest, job_id: int):
    """The dispatcher's reason code and sentence for a pending job, its 1-based place
    in its family's queue, and the first jobs ahead of it (another team's jobs show
    only team and cores). For a job that is not pending: position null, ahead []."""
    job = access.get_job(request.auth, job_id)
    return selectors.pending_explanation(job)


@router.get("/teams/{slug}", response={200: TeamOut, **ERRORS}, summary="A team, its quota and usage")
def team_detail(request: HttpRequest, slug: str):
    team = access.get_team(request.auth, slug)
    return quota_selectors.team_usage(team).as_dict()


@router.patch("/teams/{slug}/quota", response={200: QuotaChangeOut, **ERRORS}, summary="Change a team's quota (staff)",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "type": "object", "example": {"max_pending": 20, "families": {"trn1": {"guaranteed_cores": 32}}},
                  "properties": {
                      "share": {"type": "integer", "minimum": 1},
                      "monthly_core_hours": {"type": "number", "minimum": 0},
                      "max_runtime_s": {"type": "integer", "minimum": 1},
                      "max_pending": {"type": "integer", "minimum": 0},
                      "allowed_kinds": {"type": "array", "items": {"type": "string"}},
                      "families": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                          "guaranteed_cores": {"type": "integer", "minimum": 0},
                          "borrow_limit": {"type": "integer", "minimum": 0}}}},
                  }}}}}})
def quota_patch(request: HttpRequest, slug: str):
    """Only the fields given change; each change is an AuditEntry (who, when, old →
    new) shown on the team page. Guarantees beyond the fleet's capacity are saved
    with a warning. Pending jobs are re-dispatched right after."""
    team = access.get_team(request.auth, slug)
    if not request.auth.is_staff:
        return _error(403, "Only site admins change quotas.", code="forbidden")
    body, refused = read_json(request, "The quota was not changed", empty={})
    if refused is not None:
        return refused
    if not isinstance(body, dict) or not body:
        return _error(400, "Send a JSON object with the quota fields to change.", code="empty")
    data, errors = flatten_quota_body(body)
    errors.update(json_type_errors(data, QuotaForm(partial=True).fields))
    form = QuotaForm(data=data, partial=True)
    if not form.is_valid():
        errors.update({field: list(messages) for field, messages in form.errors.items() if field not in errors})
    if errors:
        return _error(400, "The quota was not changed: " + "; ".join(
            f"{field}: {' '.join(messages)}" for field, messages in errors.items()), code="invalid", errors=errors)
    entries = quota_services.quota_update(team=team, values=form.quota_values(), actor=request.auth)
    return {**quota_selectors.team_usage(team).as_dict(),
            "changes": [{"at": e.at, "actor": request.auth.username, "subject": e.subject, "old": e.old, "new": e.new}
                        for e in entries],
            "warnings": quota_selectors.overcommit_warnings()}
