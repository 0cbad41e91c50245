"""The compile cache page: a team's cached configurations (search, pin) and the
fleet's cache size against its cap."""
from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_POST, require_safe

from jobs import access, pages
from jobs.compile_cache import index
from jobs.models import Role


@login_required
@require_safe
def cache_page(request: HttpRequest, slug: str) -> HttpResponse:
    team = access.get_team(request.user, slug)
    q = request.GET.get("q", "")[:200]
    rows = index.search(index.entries(type(team).objects.filter(pk=team.pk)), q)
    page = Paginator(rows, 50).get_page(request.GET.get("page"))
    return pages.render_page(request, "compile_cache/cache.html", {
        "entries": [index.entry_document(e) for e in page.object_list], "page": page, "q": q,
        "fleet": index.fleet_usage(), "is_manager": access.role_in(request.user, team) == Role.MANAGER,
    }, team=team, nav="compile_cache")


@login_required
@require_POST
def pin(request: HttpRequest, slug: str, entry_id: int) -> HttpResponse:
    team = access.get_team(request.user, slug)
    entry = access.get_model(request.user, entry_id)
    if entry.team_id != team.pk or not entry.compile_key:
        from django.http import Http404

        raise Http404("No such cache entry")
    try:
        access.require_role(request.user, team, Role.MANAGER)
    except access.Forbidden as exc:
        return pages.render_page(request, "403.html", {"sentence": str(exc)}, team=team, status=403)
    index.set_pinned(entry, request.POST.get("pinned") == "1")
    return redirect(f"/teams/{team.slug}/compile-cache/?q={request.POST.get('q', '')}")
