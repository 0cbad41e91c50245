"""The staff-only quota page (/quotas/): every team's limits per family beside the
fleet's capacity, edited row by row; each change is audited. To anyone but staff it
does not exist (404)."""
from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import get_token
from django.shortcuts import redirect
from django.utils.html import format_html
from django.views.decorators.http import require_POST, require_safe

from jobs import access, pages
from jobs.models import Family, Kind, Team
from jobs.quotas import selectors
from jobs.quotas import services as quota_services
from jobs.quotas.forms import QuotaForm, family_field

TEAMS_PER_QUOTA_PAGE = 25  # a row is a form of a dozen inputs: a page of them must render quickly


def _row_values(usage, form: QuotaForm | None) -> dict:
    """What the row's inputs show: the submitted values when re-showing errors."""
    values = QuotaForm.initial_for(usage)
    if form is not None:
        for name in values:
            if name == "allowed_kinds":
                values[name] = form.data.getlist(name)
            elif name in form.data:
                values[name] = form.data[name]
    return values


class _Errors(dict):
    """A row's errors by field; a field without errors reads as none, not as a
    failed template lookup (three exceptions each, a dozen cells a row)."""

    def __missing__(self, key):
        return ()


def _quota_row(usage, form: QuotaForm | None) -> dict:
    """One team's row, with every shown value computed here: the page renders 200
    of them, and template filters per cell would cost more than the queries."""
    values = _row_values(usage, form)
    errors = _Errors(form.errors if form is not None else {})
    percent = f"{usage.budget_percent:.1f}"
    return {
        "slug": usage.team.slug, "values": values, "errors": errors, "pending": usage.pending,
        "core_hours": f"{usage.core_hours:.1f}", "percent": percent,
        "kinds": [(value, label, value in values["allowed_kinds"]) for value, label in Kind.choices],
        "families": [{
            "family": f.family, "in_use": f.in_use, "borrowed": f.borrowed,
            "g_name": family_field(f.family, "guaranteed_cores"), "b_name": family_field(f.family, "borrow_limit"),
            "guaranteed": values[family_field(f.family, "guaranteed_cores")],
            "borrow": values[family_field(f.family, "borrow_limit")],
            "errors": [f"guaranteed: {m}" for m in errors.get(family_field(f.family, "guaranteed_cores"), [])]
            + [f"borrow: {m}" for m in errors.get(family_field(f.family, "borrow_limit"), [])],
        } for f in usage.families],
    }


def _fleet_rows(capacity: dict[str, int], guarantees: dict[str, int]) -> list[tuple[str, int, int]]:
    """(family label, online cores, cores guaranteed to teams) per family."""
    return [(label, capacity.get(value, 0), guarantees.get(value, 0)) for value, label in Family.choices]


def _quota_teams(search: str):
    """The teams the quota page lists, by slug: those whose slug or name contains
    `search` (all when empty), with their quota joined."""
    teams = Team.objects.select_related("quota").order_by("slug")
    if search:
        teams = teams.filter(Q(slug__icontains=search) | Q(name__icontains=search))
    return teams


def _page_of(slug: str) -> int:
    """The unfiltered quota page that lists team `slug`."""
    return Team.objects.filter(slug__lt=slug).count() // TEAMS_PER_QUOTA_PAGE + 1


@login_required
@require_safe
def quota_list(request: HttpRequest) -> HttpResponse:
    """The quotas page (GET; the quota form's POST view shows it again with its errors)."""
    return _quota_list_page(request)


def _quota_list_page(request: HttpRequest, *, bound: tuple[str, QuotaForm] | None = None,
                     status: int = 200) -> HttpResponse:
    """Teams by slug, TEAMS_PER_QUOTA_PAGE a page (?page=), optionally searched by slug
    or name (?q=): share, budget used this month (bar), pending, and per family the
    guaranteed / borrowed / in-use cores, each editable in place (one small form per
    team). A fixed number of queries however many teams there are; inputs are plain
    HTML, not form widgets. Re-showing a team's errors (`bound`) shows its page."""
    pages.require_staff(request)
    search = request.GET.get("q", "").strip()[:100] if bound is None else ""
    number = _page_of(bound[0]) if bound else request.GET.get("page")
    page = Paginator(_quota_teams(search), TEAMS_PER_QUOTA_PAGE).get_page(number)
    rows = []
    for usage in selectors.team_usages(list(page.object_list)):
        form = bound[1] if bound and bound[0] == usage.team.slug else None
        rows.append(_quota_row(usage, form))
    capacity, guarantees = selectors.fleet_capacity(), selectors.guarantee_totals()
    # The unfiltered first page starts with the teams the staff switcher lists (all teams by slug).
    listed = list(page.object_list)
    first_teams = listed[:access.NAV_TEAMS_STAFF + 1] if (
        not search and page.number == 1 and len(listed) > access.NAV_TEAMS_STAFF and request.user.is_staff) else None
    return pages.render_page(request, "teams/quota_list.html", {
        # one CSRF input for every row's form (the tag would mask a new token per row)
        "csrf_input": format_html('<input type="hidden" name="csrfmiddlewaretoken" value="{}">', get_token(request)),
        "rows": rows, "page": page, "search": search, "families": _fleet_rows(capacity, guarantees),
        "kinds": Kind.choices, "warnings": selectors.overcommit_warnings(capacity, guarantees),
    }, nav="quotas", status=status, teams=first_teams)


@login_required
@require_POST
def quota_save(request: HttpRequest, slug: str) -> HttpResponse:
    pages.require_staff(request)
    team = access.get_team(request.user, slug)
    form = QuotaForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"Team {team.slug}'s quota was not saved: fix the fields marked in its row.")
        return _quota_list_page(request, bound=(team.slug, form), status=400)
    entries = quota_services.quota_update(team=team, values=form.quota_values(), actor=request.user)
    if entries:
        changes = "; ".join(f"{e.subject} {e.old} → {e.new}" for e in entries)
        messages.success(request, f"Saved team {team.slug}: {changes}.")
    else:
        messages.info(request, f"Team {team.slug}: nothing changed.")
    for warning in selectors.overcommit_warnings():
        messages.warning(request, f"Saved, but {warning}.")
    number = _page_of(team.slug)
    return redirect(f"/quotas/{'' if number == 1 else f'?page={number}'}#team-{team.slug}")
