"""HTML pages for teams and quotas: the team page (share, usage against limits,
borrowing and lending, members, audit trail) and the staff-only quota page.

Access: the team page is fetched through jobs.access.get_team (another team is a
404); changing members needs the manager role (a viewer or member gets 403 with
the reason). The quota page is staff only; to anyone else it does not exist (404)."""
from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse
from django.middleware.csrf import get_token
from django.shortcuts import redirect, render
from django.utils.html import format_html
from django.views.decorators.http import require_POST

from jobs.models import Family, Kind, Role, Team
from jobs.quotas import selectors
from jobs.quotas import services as quota_services
from jobs.teams import access
from jobs.teams import services as team_services
from jobs.teams.forms import MemberAddForm, MemberRoleForm, QuotaForm, family_field

AUDIT_SHOWN = 100
TEAMS_PER_QUOTA_PAGE = 25  # a row is a form of a dozen inputs: 200 of them took ~250 ms to render


def _render(request: HttpRequest, template: str, context: dict, *, team: Team | None = None, nav: str = "",
            status: int = 200, teams: list[Team] | None = None) -> HttpResponse:
    """A full page with what base.html needs (the user's teams — `teams` when the
    page has them already — and the current team)."""
    teams = access.nav_teams(request.user) if teams is None else teams
    current = team or (teams[0] if teams else None)
    return render(request, template, {"nav_teams": teams, "team": current, "nav": nav, **context}, status=status)


# --- the team page ----------------------------------------------------------------

@login_required
def team_detail(request: HttpRequest, slug: str, *, add_form: MemberAddForm | None = None,
                error: str = "", status: int = 200) -> HttpResponse:
    team = access.get_team(request.user, slug)
    role = access.role_in(request.user, team)
    usage = selectors.team_usage(team)
    return _render(request, "teams/team_detail.html", {
        "usage": usage, "role": role, "can_manage": role == Role.MANAGER,
        "members": team.memberships.select_related("user").order_by("user__username"),
        "roles": Role.choices, "add_form": add_form or MemberAddForm(), "member_error": error,
        "audit": selectors.team_audit(team, AUDIT_SHOWN),
        "kinds": [label for value, label in Kind.choices if usage.quota.allows(value)],
    }, team=team, nav="team", status=status)


def _manager_team(request: HttpRequest, slug: str) -> tuple[Team, str]:
    """The team if the user may manage its members; else ("", reason) via the team."""
    team = access.get_team(request.user, slug)
    try:
        access.require_role(request.user, team, Role.MANAGER)
    except access.Forbidden as exc:
        return team, str(exc)
    return team, ""


@login_required
@require_POST
def team_member_add(request: HttpRequest, slug: str) -> HttpResponse:
    team, forbidden = _manager_team(request, slug)
    if forbidden:
        return team_detail(request, slug, error=forbidden, status=403)
    form = MemberAddForm(request.POST)
    if not form.is_valid():
        return team_detail(request, slug, add_form=form, status=400)
    user, role = form.cleaned_data["username"], form.cleaned_data["role"]
    try:
        team_services.membership_change(team=team, user=user, role=role, actor=request.user)
    except team_services.MembershipError as exc:
        return team_detail(request, slug, error=str(exc), status=409)
    messages.success(request, f"{user.username} is now {role} of team {team.slug}.")
    return redirect("team_detail", slug=team.slug)


@login_required
@require_POST
def team_member_role(request: HttpRequest, slug: str) -> HttpResponse:
    team, forbidden = _manager_team(request, slug)
    if forbidden:
        return team_detail(request, slug, error=forbidden, status=403)
    form = MemberRoleForm(request.POST)
    membership = None
    if form.is_valid():
        membership = team.memberships.select_related("user").filter(user_id=form.cleaned_data["user_id"]).first()
    if membership is None:
        return team_detail(request, slug, error="Choose a member of this team and a role.", status=400)
    role = form.cleaned_data["role"]
    try:
        team_services.membership_change(team=team, user=membership.user, role=None if role == "remove" else role,
                                   actor=request.user)
    except team_services.MembershipError as exc:
        return team_detail(request, slug, error=str(exc), status=409)
    done = "removed from" if role == "remove" else f"now {role} of"
    messages.success(request, f"{membership.user.username} is {done} team {team.slug}.")
    return redirect("team_detail", slug=team.slug)


# --- the quota page (staff) -------------------------------------------------------

def _require_staff(request: HttpRequest) -> None:
    if not request.user.is_staff:
        raise Http404("No such page")


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
def quota_list(request: HttpRequest, *, bound: tuple[str, QuotaForm] | None = None,
               status: int = 200) -> HttpResponse:
    """Teams by slug, TEAMS_PER_QUOTA_PAGE a page (?page=), optionally searched by slug
    or name (?q=): share, budget used this month (bar), pending, and per family the
    guaranteed / borrowed / in-use cores, each editable in place (one small form per
    team). A fixed number of queries however many teams there are; inputs are plain
    HTML, not form widgets. Re-showing a team's errors (`bound`) shows its page."""
    _require_staff(request)
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
    return _render(request, "teams/quota_list.html", {
        # one CSRF input for every row's form (the tag would mask a new token per row)
        "csrf_input": format_html('<input type="hidden" name="csrfmiddlewaretoken" value="{}">', get_token(request)),
        "rows": rows, "page": page, "search": search, "families": _fleet_rows(capacity, guarantees),
        "kinds": Kind.choices, "warnings": selectors.overcommit_warnings(capacity, guarantees),
    }, nav="quotas", status=status, teams=first_teams)


@login_required
@require_POST
def quota_save(request: HttpRequest, slug: str) -> HttpResponse:
    _require_staff(request)
    team = access.get_team(request.user, slug)
    form = QuotaForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"Team {team.slug}'s quota was not saved: fix the fields marked in its row.")
        return quota_list(request, bound=(team.slug, form), status=400)
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
