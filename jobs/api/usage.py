"""Usage through the JSON API: the same numbers as the usage pages and their CSV
(all three are made from jobs.selectors_usage tables).

- `GET /api/v1/teams/{slug}/usage?from=&to=&group_by=kind|user|family|day`:
  members of the team (any role) and staff; another team is a 404.
- `GET /api/v1/usage?from=&to=&group_by=kind|family|day`: staff only (404 otherwise).

Dates are YYYY-MM-DD days in the team's time zone (the site's for /usage), both
included; without them the last 30 days. Bad input is a 400
`{"detail": ..., "errors": {"from": [...]}}` naming the field."""
from __future__ import annotations

from django.conf import settings
from django.http import Http404, HttpRequest, JsonResponse
from django.utils import timezone
from ninja import Field, Query, Router, Schema

from jobs import access
from jobs.api.schemas import ErrorOut
from jobs.usage import accounting, selectors
from jobs.usage.selectors import Report

router = Router(tags=["usage"])


class TotalsOut(Schema):
    allocated_core_hours: float
    used_core_hours: float
    idle_core_hours: float
    unknown_core_hours: float
    utilization_pct: float | None
    cost_usd: float
    idle_cost_usd: float
    unpriced_core_hours: float
    jobs_succeeded: int
    jobs_failed: int
    jobs_cancelled: int
    attempts_interrupted: int


class GroupOut(TotalsOut):
    key: str


class WaitOut(Schema):
    kind: str
    jobs: int
    p50_s: float | None
    p95_s: float | None
    mean_s: float | None


class OutcomeOut(Schema):
    kind: str
    succeeded: int
    failed: int
    cancelled: int
    success_rate_pct: float | None
    failure_rate_pct: float | None
    cancel_rate_pct: float | None
    interrupted_attempts: int


class TopJobOut(Schema):
    job: int
    team: str
    user: str
    kind: str
    status: str
    core_hours: float
    used_core_hours: float
    idle_core_hours: float
    utilization_pct: float | None
    cost_usd: float
    idle_cost_usd: float


class BurnDownOut(Schema):
    budget_core_hours: float | None
    used_core_hours: float
    rate_core_hours_per_day: float
    status: str
    run_out_day: str | None
    month_end_forecast_core_hours: float


class TeamShareOut(Schema):
    team: str
    core_hours: float
    hours_share_pct: float | None
    cost_usd: float
    cost_share_pct: float | None
    idle_cost_usd: float
    utilization_pct: float | None
    jobs_finished: int


class UsageOut(Schema):
    scope: str
    team: str | None
    time_zone: str
    from_: str = Field(alias="from")
    to: str
    group_by: str
    totals: TotalsOut
    groups: list[GroupOut]
    queue_wait: list[WaitOut]
    outcomes: list[OutcomeOut]
    top_jobs: list[TopJobOut]
    burn_down: BurnDownOut
    teams: list[TeamShareOut] | None = None  # site only


def _bad(errors: dict[str, list[str]]) -> JsonResponse:
    detail = "; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in errors.items())
    return JsonResponse({"detail": detail, "errors": errors}, status=400)


def _parse(params: dict, today, allowed: tuple[str, ...]):
    group_by = params.get("group_by") or allowed[0]
    errors: dict[str, list[str]] = {}
    if group_by not in allowed:
        errors["group_by"] = [f"{group_by!r} is not a grouping; choose {', '.join(allowed)}."]
    try:
        range_name, first, last = accounting.parse_range({k: v for k, v in params.items() if k in ("from", "to")}, today)
    except accounting.RangeError as e:
        errors.update(e.errors)
        return None, group_by, errors
    return (range_name, first, last), group_by, errors


def usage_document(report: Report, group_by: str) -> dict:
    tables = selectors.tables(report)
    burn = report.burn
    doc = {
        "scope": report.scope, "team": report.team.slug if report.team else None, "time_zone": str(report.tz),
        "from": report.first.isoformat(), "to": report.last.isoformat(), "group_by": group_by,
        "totals": selectors.totals_document(report.totals),
        "groups": selectors.groups(report, group_by),
        "queue_wait": tables["wait"].dicts(),
        "outcomes": tables["outcomes"].dicts(),
        "top_jobs": tables["top_jobs"].dicts(),
        "burn_down": {"budget_core_hours": burn.budget, "used_core_hours": round(burn.used, 4),
                      "rate_core_hours_per_day": round(burn.rate_per_day, 4), "status": burn.status,
                      "run_out_day": burn.run_out_day.isoformat() if burn.run_out_day else None,
                      "month_end_forecast_core_hours": round(burn.month_end_forecast, 4)},
    }
    if report.scope == "site":
        doc["teams"] = tables["teams"].dicts()
    return doc


@router.get("/teams/{slug}/usage", response={200: UsageOut, 400: ErrorOut, 404: ErrorOut}, url_name="team_usage",
            by_alias=True, summary="A team's usage")
def team_usage(request: HttpRequest, slug: str,
               from_: str | None = Query(None, alias="from", description="first day, YYYY-MM-DD (team time zone)"),
               to: str | None = Query(None, description="last day, YYYY-MM-DD, included"),
               group_by: str = Query("kind", description="kind, user, family or day")):
    """NeuronCore-hours allocated / used / idle / not measured, cost and idle cost,
    outcomes, queue wait p50/p95 by kind, top jobs by cost and the month's budget
    burn-down, totalled and per group — the numbers of /teams/{slug}/usage/."""
    team = access.get_team(request.auth, slug)
    today = accounting.local_day(timezone.now(), accounting.zone(team.time_zone))
    parsed, group_by, errors = _parse({"from": from_, "to": to, "group_by": group_by}, today,
                                      selectors.API_GROUPS)
    if errors:
        return _bad(errors)
    report = selectors.team_report(team, *parsed, group_by=group_by if group_by != "day" else "kind")
    return usage_document(report, group_by)


@router.get("/usage", response={200: UsageOut, 400: ErrorOut, 404: ErrorOut}, url_name="site_usage",
            by_alias=True, summary="The whole site's usage (staff)")
def site_usage(request: HttpRequest,
               from_: str | None = Query(None, alias="from", description="first day, YYYY-MM-DD"),
               to: str | None = Query(None, description="last day, YYYY-MM-DD, included"),
               group_by: str = Query("kind", description="kind, family or day")):
    """All teams' usage (staff only) with each team's share — the numbers of /usage/."""
    if not request.auth.is_staff:
        raise Http404("No such page")
    today = accounting.local_day(timezone.now(), accounting.zone(settings.TIME_ZONE))
    parsed, group_by, errors = _parse({"from": from_, "to": to, "group_by": group_by}, today, ("kind", "family", "day"))
    if errors:
        return _bad(errors)
    report = selectors.site_report(*parsed, group_by=group_by if group_by != "day" else "kind")
    return usage_document(report, group_by)
