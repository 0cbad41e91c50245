"""HTML pages for teams: the team page (share, usage against limits, borrowing and
lending, members, audit trail), member changes (managers), and the user's API tokens."""
from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_POST

from jobs import access, pages
from jobs.models import ApiToken, Kind, Role, Team
from jobs.quotas import selectors
from jobs.teams import services as team_services
from jobs.teams.forms import MemberAddForm, MemberRoleForm, TeamCreateForm
from jobs.teams.tokens import token_create

AUDIT_SHOWN = 100


# --- the team page ----------------------------------------------------------------

@login_required
def team_detail(request: HttpRequest, slug: str, *, add_form: MemberAddForm | None = None,
                error: str = "", status: int = 200) -> HttpResponse:
    team = access.get_team(request.user, slug)
    role = access.role_in(request.user, team)
    usage = selectors.team_usage(team)
    return pages.render_page(request, "teams/team_detail.html", {
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


# --- a new team (staff) -----------------------------------------------------------

@login_required
@require_http_methods(["GET", "POST"])
def team_new(request: HttpRequest) -> HttpResponse:
    """Staff create a team here (with its quota rows, like any new team) and,
    optionally, its first manager; members are added on the team page."""
    pages.require_staff(request)
    form, status = TeamCreateForm(), 200
    if request.method == "POST":
        form = TeamCreateForm(request.POST)
        if form.is_valid():
            data = form.cleaned_data
            with transaction.atomic():
                team = team_services.team_create(slug=data["slug"], name=data["name"], time_zone=data["time_zone"],
                                                 actor=request.user)
                if data["manager"] is not None:
                    team_services.membership_set(team=team, user=data["manager"], role=Role.MANAGER,
                                                 actor=request.user)
            manager = f" and {data['manager'].username} as its manager" if data["manager"] else ""
            messages.success(request, f"Team {team.slug} created with the default quota{manager}. "
                                      "Add members below; set its quota on the quota page.")
            return redirect("team_detail", slug=team.slug)
        status = 400
    return pages.render_page(request, "teams/team_new.html", {"form": form}, nav="team_new", status=status)



class TokenForm(forms.Form):
    name = forms.CharField(max_length=80, help_text="What the token is for, e.g. \"laptop\" or \"CI\".")


@login_required
@require_http_methods(["GET", "POST"])
def tokens(request: HttpRequest) -> HttpResponse:
    """Create and list the user's API tokens. A new raw token is in this one response
    only (not stored, not in a redirect), and the response is not cached."""
    form, raw, status = TokenForm(), None, 200
    if request.method == "POST":
        form = TokenForm(request.POST)
        if form.is_valid():
            raw, _ = token_create(user=request.user, name=form.cleaned_data["name"])
            form = TokenForm()
        else:
            status = 400
    response = pages.render_page(request, "jobs/tokens.html", {"form": form, "raw_token": raw,
                                                   "tokens": request.user.api_tokens.order_by("-created_at")},
                     nav="tokens", status=status)
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def token_delete(request: HttpRequest, token_id: int) -> HttpResponse:
    deleted, _ = ApiToken.objects.filter(pk=token_id, user=request.user).delete()
    if not deleted:
        raise Http404("No such token")
    messages.success(request, "Token deleted; clients using it are now refused.")
    return redirect("tokens")
