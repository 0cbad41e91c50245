"""What every HTML page shares: rendering with the navigation base.html needs, the
viewer / staff checks pages make before showing a form, and how times are shown."""
from __future__ import annotations

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import dateformat, timezone

from jobs import access
from jobs.models import Role, Team

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


# --- error pages (webapp.urls handler404 / handler403; 500 is Django's own view with templates/500.html) ---

def _error_page(request: HttpRequest, template: str, status: int, exception) -> HttpResponse:
    """A styled error page with the user's navigation. The sentence is the
    exception's own when a view wrote one for people (PermissionDenied("Only site
    admins can ...")); Django's internal messages (the resolver's) are not shown."""
    sentence = ""
    if exception is not None and exception.args and isinstance(exception.args[0], str) and status == 403:
        sentence = exception.args[0]
    try:
        return render_page(request, template, {"sentence": sentence}, status=status)
    except Exception:  # the navigation needs the database: never turn a 404 into a 500
        return render(request, template, {"sentence": sentence, "nav_teams": [], "team": None, "nav": ""},
                      status=status)


def page_not_found(request: HttpRequest, exception=None) -> HttpResponse:
    # Under the API, jobs.middleware.HttpBasics turns this page into a JSON error.
    return _error_page(request, "404.html", 404, exception)


def permission_denied(request: HttpRequest, exception=None) -> HttpResponse:
    return _error_page(request, "403.html", 403, exception)


def format_when(value) -> str:
    return dateformat.format(timezone.localtime(value), TIME_FORMAT) if value else ""
