"""What every HTML page shares: rendering with the navigation base.html needs, the
viewer / staff checks pages make before showing a form, and how times are shown."""
from __future__ import annotations

from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import DisallowedHost, RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import dateformat, timezone
from django.utils.http import url_has_allowed_host_and_scheme

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


# --- error pages (webapp.urls handler404 / handler403, CSRF_FAILURE_VIEW; 500 is Django's own view with
#     templates/500.html) ---

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


def bad_request(request: HttpRequest, exception=None) -> HttpResponse:
    """A body Django refused before any view read it: a form larger than it reads
    at once (a long prompt list pasted in), or too many fields; or a host name not in
    ALLOWED_HOSTS. The styled 400 saying which, instead of Django's bare "Bad Request (400)"."""
    if isinstance(exception, RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE // 2**20
        sentence = (f"The form is larger than the {limit} MiB this site reads at once, so nothing was saved. "
                    "Go back: a long list of prompts goes in as a prompts file.")
    elif isinstance(exception, DisallowedHost):
        sentence = ("It was sent to a host name this site does not answer to; its operator lists the names "
                    "people use in ALLOWED_HOSTS.")
    else:
        sentence = "The request could not be read (malformed, or more fields than a form of this site has)."
    try:
        return render_page(request, "400.html", {"sentence": sentence}, status=400)
    except Exception:  # the navigation needs the database: never turn a 400 into a 500
        return render(request, "400.html", {"sentence": sentence, "nav_teams": [], "team": None, "nav": ""},
                      status=400)


def page_not_found(request: HttpRequest, exception=None) -> HttpResponse:
    # Under the API, jobs.middleware.HttpBasics turns this page into a JSON error.
    return _error_page(request, "404.html", 404, exception)


def permission_denied(request: HttpRequest, exception=None) -> HttpResponse:
    return _error_page(request, "403.html", 403, exception)


def method_not_allowed(request: HttpRequest, allowed: str) -> HttpResponse:
    """The styled 405 for a page address sent a method it does not take (Django's is an
    empty body): which methods it takes, and for a button's address (POST only), where
    to go instead."""
    sentence = f"{request.path} takes {allowed}, not {request.method}."
    if "GET" not in allowed:
        sentence += " It is what a button on another page sends: go back to that page and use the button."
    try:
        response = render_page(request, "405.html", {"sentence": sentence, "method": request.method}, status=405)
    except Exception:  # the navigation needs the database: never turn a 405 into a 500
        response = render(request, "405.html", {"sentence": sentence, "method": request.method, "nav_teams": [],
                                                "team": None, "nav": ""}, status=405)
    response["Allow"] = allowed
    return response


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """settings.CSRF_FAILURE_VIEW: a form sent with a stale token (signed in or out in
    another tab since it was loaded) or without the site's cookie. The styled 403 with
    what to do, instead of Django's bare page, whose inline <style> the CSP refuses."""
    heading = "The form could not be checked"
    if "origin" in reason.lower() or "referer" in reason.lower():
        sentence = (f"The form came from an address this site does not trust ({reason}). The site's operator "
                    "adds the address people use to CSRF_TRUSTED_ORIGINS.")
    elif "cookie" in reason.lower():
        sentence = ("Your browser did not send this site's cookie with the form. "
                    "Allow cookies for this site, reload the page and send the form again.")
    else:
        heading = "This form has expired"
        sentence = ("You signed in or out in another tab since this form was loaded. "
                    "Reload the page and send the form again.")
    context = {"sentence": sentence, "heading": heading, "form_page": _form_page(request)}
    try:
        return render_page(request, "403.html", context, status=403)
    except Exception:  # as _error_page: the navigation needs the database
        return render(request, "403.html", {**context, "nav_teams": [], "team": None, "nav": ""}, status=403)


def _form_page(request: HttpRequest) -> str:
    """The page the form was sent from (its Referer) when it is one of this site's, as a
    path; else ""."""
    referer = request.headers.get("Referer", "")
    if not url_has_allowed_host_and_scheme(referer, {request.get_host()}, request.is_secure()):
        return ""
    parts = urlsplit(referer)
    if not parts.path.startswith("/") or parts.path.startswith("//"):
        return ""
    return parts.path + (f"?{parts.query}" if parts.query else "")


def format_when(value) -> str:
    return dateformat.format(timezone.localtime(value), TIME_FORMAT) if value else ""
