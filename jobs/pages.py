"""What every HTML page shares: rendering with the navigation base.html needs, the
viewer / staff checks pages make before showing a form, and how times are shown."""
from __future__ import annotations

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import dateformat, timezone

from jobs.models import Role, Team
from jobs.teams import access

TIME_FORMAT = "Y-m-d H:i:s"
SPEC_SHOWN_CHARS = 20_000  # a spec with a thousand prompts is cut on the page (the API has it whole)


def render_page(request: HttpRequest, template: str, context: dict, *, team: Team | None = None, nav: str = "",
                status: int = 200, teams: list[Team] | None = None) -> HttpResponse:
    """Render a full page with what base.html needs: the user's teams for the switcher
    (`teams` when the page has read them already) and the current team for the nav
    links (the first team when the page has none)."""
    teams = access.nav_teams(request.user) if teams is None else teams
    current = team or (teams[0] if teams else None)
    return render(request, template, {"nav_teams": teams, "team": current, "nav": nav, **context}, status=status)


def require_staff(request: HttpRequest) -> None:
    """Site-wide pages exist only for staff: anyone else gets the same 404 as a
    page that does not exist."""
    if not request.user.is_staff:
        raise Http404("No such page")


def can_write(user, team: Team) -> bool:
    """Members and managers may submit and upload; viewers only look."""
    try:
        access.require_role(user, team, Role.MEMBER)
    except access.Forbidden:
        return False
    return True


def viewer_sentence(team: Team) -> str:
    return (f"You are a viewer in team {team.slug}: you can see its jobs, models and datasets, "
            "but submitting and uploading need the member role. Ask a team manager.")


def format_when(value) -> str:
    return dateformat.format(timezone.localtime(value), TIME_FORMAT) if value else ""
