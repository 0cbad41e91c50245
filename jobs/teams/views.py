"""HTML pages for teams: the team page (share, usage against limits, borrowing and
lending, members, audit trail), member changes (managers), and the user's API tokens."""
from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.utils import timezone
from django.views.decorators.http import require_POST, require_http_methods, require_safe

from jobs import access, pages
from jobs.models import ApiToken, Kind, Role, Team
from jobs.quotas import selectors
from jobs.teams import services as team_services
from jobs.teams import tokens as token_service
from jobs.teams.forms import MemberAddForm, MemberRoleForm, TeamCreateForm
from jobs.teams.logins import client_ip
from jobs.teams.sso import login_context
from jobs.validators import shown_as_is

AUDIT_SHOWN = 100


# --- the team page ----------------------------------------------------------------

@login_required
@require_safe
def team_detail(request: HttpRequest, slug: str) -> HttpResponse:
    """The team page (GET; the member forms' POST views show it again with their answer)."""
    return _team_detail_page(request, slug)


def _team_detail_page(request: HttpRequest, slug: str, *, add_form: MemberAddForm | None = None,
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
        return _team_detail_page(request, slug, error=forbidden, status=403)
    form = MemberAddForm(request.POST)
    if not form.is_valid():
        return _team_detail_page(request, slug, add_form=form, status=400)
    user, role = form.cleaned_data["username"], form.cleaned_data["role"]
    try:
        team_services.membership_change(team=team, user=user, role=role, actor=request.user)
    except team_services.MembershipError as exc:
        return _team_detail_page(request, slug, error=str(exc), status=409)
    messages.success(request, f"{user.username} is now {role} of team {team.slug}.")
    return redirect("team_detail", slug=team.slug)


@login_required
@require_POST
def team_member_role(request: HttpRequest, slug: str) -> HttpResponse:
    team, forbidden = _manager_team(request, slug)
    if forbidden:
        return _team_detail_page(request, slug, error=forbidden, status=403)
    form = MemberRoleForm(request.POST)
    membership = None
    if form.is_valid():
        membership = team.memberships.select_related("user").filter(user_id=form.cleaned_data["user_id"]).first()
    if membership is None:
        return _team_detail_page(request, slug, error="Choose a member of this team and a role.", status=400)
    role = form.cleaned_data["role"]
    try:
        team_services.membership_change(team=team, user=membership.user, role=None if role == "remove" else role,
                                   actor=request.user)
    except team_services.MembershipError as exc:
        return _team_detail_page(request, slug, error=str(exc), status=409)
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



EXPIRY_CHOICES = [("7", "in 7 days"), ("30", "in 30 days"), ("90", "in 90 days"), ("365", "in a year"),
                  ("never", "never")]


class TokenForm(forms.Form):
    name = forms.CharField(max_length=80, validators=[shown_as_is],
                           help_text="What the token is for, e.g. \"laptop\" or \"CI\".")
    scope = forms.ChoiceField(choices=ApiToken.Scope.choices, initial=ApiToken.Scope.SUBMIT, required=False,
                              help_text="What it may do, within your role in each team.")
    expires = forms.ChoiceField(choices=EXPIRY_CHOICES, initial="90", required=False, label="Expires")

    def clean_scope(self) -> str:
        return self.cleaned_data["scope"] or ApiToken.Scope.SUBMIT

    def clean_expires(self) -> str:
        return self.cleaned_data["expires"] or "90"

    def expires_at(self):
        days = self.cleaned_data["expires"]
        return None if days == "never" else timezone.now() + timedelta(days=int(days))


class ServiceTokenForm(TokenForm):
    """A team's service account token (for CI): it acts as a user of its own with
    `role` in that team only, and stays when the person who made it leaves."""

    team = forms.ModelChoiceField(queryset=Team.objects.none(), to_field_name="slug", empty_label=None)
    role = forms.ChoiceField(choices=[(Role.MEMBER, "member: submit and upload"), (Role.VIEWER, "viewer: look only")],
                             initial=Role.MEMBER, help_text="The service account's role in the team.")
    field_order = ["team", "name", "role", "scope", "expires"]

    def __init__(self, *args, teams=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["team"].queryset = teams if teams is not None else Team.objects.none()
        self.fields["name"].help_text = "What it is for, e.g. \"CI nightly\"."
        self.fields["scope"].help_text = "What it may do, within its role."


@login_required
@require_http_methods(["GET", "POST"])
def tokens(request: HttpRequest) -> HttpResponse:
    """Create and list the user's API tokens and the service tokens of the teams they
    manage. A new raw token is in this one response only (not stored, not in a
    redirect), and the response is not cached."""
    teams = token_service.manageable_teams(request.user)
    form, service_form, raw, status = TokenForm(), ServiceTokenForm(prefix="svc", teams=teams), None, 200
    ip = client_ip(request)
    if request.method == "POST" and "svc-team" in request.POST:
        service_form = ServiceTokenForm(request.POST, prefix="svc", teams=teams)
        if service_form.is_valid():
            data = service_form.cleaned_data
            raw, _ = token_service.service_account_create(team=data["team"], name=data["name"], role=data["role"],
                                                          scope=data["scope"], expires_at=service_form.expires_at(),
                                                          actor=request.user, ip=ip)
            service_form = ServiceTokenForm(prefix="svc", teams=teams)
        else:
            status = 400
    elif request.method == "POST":
        form = TokenForm(request.POST)
        if form.is_valid():
            raw, _ = token_service.token_create(user=request.user, name=form.cleaned_data["name"],
                                                scope=form.cleaned_data["scope"], expires_at=form.expires_at(), ip=ip)
            form = TokenForm()
        else:
            status = 400
    response = pages.render_page(request, "jobs/tokens.html", {
        "form": form, "service_form": service_form if teams.exists() else None, "raw_token": raw, "now": timezone.now(),
        "tokens": request.user.api_tokens.filter(team=None).order_by("-created_at"),
        "service_tokens": ApiToken.objects.filter(team__in=teams).select_related("team", "user", "created_by")
                                          .order_by("team__slug", "-created_at"),
    }, nav="tokens", status=status)
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def token_delete(request: HttpRequest, token_id: int) -> HttpResponse:
    """Revoke one of the user's own tokens, or a service token of a team they manage;
    anything else is a 404."""
    mine = Q(user=request.user, team=None) | Q(team__in=token_service.manageable_teams(request.user))
    token = ApiToken.objects.select_related("team", "user").filter(mine, pk=token_id).first()
    if token is None:
        raise Http404("No such token")
    token_service.token_revoke(token=token, actor=request.user, ip=client_ip(request))
    messages.success(request, f"Token {token.name} revoked; clients using it are now refused.")
    return redirect("tokens")


class LoginView(auth_views.LoginView):
    """Django's login view; the page also offers single sign-on when it is configured,
    and hides the password form while password logins are off (jobs.teams.sso)."""

    def get_context_data(self, **kwargs):
        return {**super().get_context_data(**kwargs), **login_context(self.request)}
