"""The endpoint pages: a team's endpoints with the form that creates one, and an
endpoint's page (replicas, live figures, timeline, change / scale / delete, the
playground and code examples). Every fetch is team-scoped (jobs.access); the live
parts refresh from GET /api/v1/endpoints/<id>."""
from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_POST

from jobs import access, pages
from jobs.endpoints import selectors, services
from jobs.endpoints.forms import EndpointChangeForm, EndpointCreateForm
from jobs.models import Endpoint, Replica


def _refused(form, exc: Exception) -> None:
    """A service refusal onto the form: each field's message on its field."""
    if isinstance(exc, services.EndpointInvalid):
        for field, msgs in exc.errors.items():
            for msg in msgs:
                form.add_error(field if field in form.fields else None, msg)
    else:
        form.add_error(None, str(exc))


@login_required
@require_http_methods(["GET", "POST"])
def endpoint_list(request: HttpRequest, slug: str) -> HttpResponse:
    team = access.get_team(request.user, slug)
    form, status = EndpointCreateForm(team=team), 200
    if request.method == "POST":
        form = EndpointCreateForm(request.POST, team=team)
        if not pages.can_write(request.user, team):
            form.add_error(None, pages.viewer_sentence(team))
            status = 403
        elif form.is_valid():
            try:
                endpoint = services.endpoint_create(team=team, user=request.user, form=form)
            except (services.EndpointInvalid, access.Forbidden) as exc:
                _refused(form, exc)
            else:
                messages.success(request, f"Endpoint {endpoint.name} created: its replicas are starting.")
                return redirect("endpoint_detail", endpoint_id=endpoint.pk)
        status = status if status != 200 else 400
    rows = selectors.endpoints_of(team)
    return pages.render_page(request, "endpoints/list.html", {
        "rows": [{"endpoint": e, "health": selectors.health(e, e.ready), "url": selectors.public_url(e)} for e in rows],
        "form": form, "can_write": pages.can_write(request.user, team), "open_form": request.method == "POST",
    }, team=team, nav="endpoints", status=status)


@login_required
@require_http_methods(["GET", "POST"])
def endpoint_detail(request: HttpRequest, endpoint_id: int) -> HttpResponse:
    endpoint = access.get_endpoint(request.user, endpoint_id)
    form, status = EndpointChangeForm(endpoint=endpoint), 200
    if request.method == "POST":
        form = EndpointChangeForm(request.POST, endpoint=endpoint)
        if not pages.can_write(request.user, endpoint.team):
            form.add_error(None, pages.viewer_sentence(endpoint.team))
            status = 403
        elif form.is_valid() and not form.changes():
            form.add_error(None, "Nothing to change: fill in the fields to change.")
            status = 400
        elif form.is_valid():
            try:
                endpoint = services.endpoint_change(endpoint=endpoint, user=request.user, form=form)
            except (services.EndpointInvalid, access.Forbidden) as exc:
                _refused(form, exc)
                status = 400
            else:
                messages.success(request, f"Endpoint {endpoint.name} changed (revision {endpoint.revision}).")
                return redirect("endpoint_detail", endpoint_id=endpoint.pk)
        else:
            status = 400
    rows = selectors.replica_rows(endpoint)
    ready = sum(1 for r in rows if r.state == Replica.State.READY and r.revision == endpoint.serving_revision)
    return pages.render_page(request, "endpoints/detail.html", {
        "endpoint": endpoint, "health": selectors.health(endpoint, ready), "url": selectors.public_url(endpoint),
        "replicas": rows, "stats": selectors.stats(endpoint.pk), "timeline": selectors.timeline(endpoint),
        "revisions": selectors.revisions(endpoint), "cold": selectors.cold_starts(endpoint), "form": form,
        "can_write": pages.can_write(request.user, endpoint.team) and endpoint.state == Endpoint.State.ACTIVE,
    }, team=endpoint.team, nav="endpoints", status=status)


@login_required
@require_POST
def endpoint_delete(request: HttpRequest, endpoint_id: int) -> HttpResponse:
    endpoint = access.get_endpoint(request.user, endpoint_id)
    try:
        services.endpoint_delete(endpoint=endpoint, user=request.user)
    except access.Forbidden as exc:
        return pages.render_page(request, "403.html", {"sentence": str(exc)}, team=endpoint.team, status=403)
    messages.success(request, f"Endpoint {endpoint.name} is being deleted: its replicas drain and stop.")
    return redirect("endpoint_list", slug=endpoint.team.slug)
