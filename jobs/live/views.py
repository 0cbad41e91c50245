"""Live pages: the hosts list, a host's page (every core, who holds it, vCPU,
memory, ECC; drain/undrain for staff) and the fleet heatmap. The job page's
charts are the `job_live_charts` template tag (jobs/templatetags/live_charts.py).

Each page renders its figures server-side (jobs.metrics series -> jobs.charts_live
figure -> json_script); jobs/static/live/live.js draws them and keeps them current
from the JSON API (jobs/api_live.py) without reloading.
"""
from __future__ import annotations

import redis as redis_lib
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.views.decorators.http import require_POST, require_safe

from jobs import pages
from jobs.live import charts, metrics
from jobs.live.services import host_set_state
from jobs.models import Family, Host

FLEET_POLL_MS = 5000


def _host(name: str) -> Host:
    host = Host.objects.filter(name=name).first()
    if host is None:
        raise Http404("No such host")
    return host


@login_required
@require_safe
def host_list(request: HttpRequest) -> HttpResponse:
    try:
        hosts, unavailable = metrics.host_list(), False
    except redis_lib.RedisError:
        hosts, unavailable = [metrics.host_info(h) for h in Host.objects.all()], True
    return pages.render_page(request, "live/hosts.html", {"hosts": hosts, "unavailable": unavailable}, nav="hosts")


@login_required
@require_safe
def host_detail(request: HttpRequest, name: str) -> HttpResponse:
    host = _host(name)
    context = {"host": host, "can_drain": request.user.is_staff}
    try:
        series = metrics.host_series(host, None, request.user)
    except redis_lib.RedisError:
        return pages.render_page(request, "live/host.html", {**context, "unavailable": True}, nav="hosts")
    config = {"url": reverse("api:host_metrics", kwargs={"name": host.name}), "cursor": series["cursor"],
              "cores": series["cores"], "figures": charts.host_figures(series),
              "latest": _latest_table(series)}
    return pages.render_page(request, "live/host.html", {**context, "series": series, "config": config}, nav="hosts")


def _latest_table(series: dict) -> dict:
    """What the per-core table shows first; live.js rebuilds it from each poll."""
    return {key: series[key] for key in ("cores", "util", "mem", "used_by", "allocations", "ecc", "orphans",
                                          "host_mem_total", "errors")}


@login_required
@require_POST
def host_drain(request: HttpRequest, name: str) -> HttpResponse:
    """Staff only: drain (no new jobs; running ones finish) or undrain the host."""
    if not request.user.is_staff:
        raise PermissionDenied("Only site admins can drain or undrain a host.")
    host = _host(name)
    action = request.POST.get("action", "")
    if action not in ("drain", "undrain"):
        messages.error(request, f"action: must be drain or undrain, got {action!r}")
        return redirect("host_detail", name=host.name)
    state = Host.State.DRAINING if action == "drain" else Host.State.ONLINE
    host_set_state(host=host, state=state, actor=request.user)
    now = "draining: it takes no new jobs" if action == "drain" else "online"
    messages.success(request, f"Host {host.name} is {now}.")
    return redirect("host_detail", name=host.name)


def _family(request: HttpRequest) -> tuple[str, str]:
    """The ?family= filter and an error sentence when it is not a family."""
    family = request.GET.get("family", "")
    if family and family not in Family.values:
        return "", f"family: unknown family {family!r}; showing all hosts"
    return family, ""


@login_required
@require_safe
def fleet_page(request: HttpRequest) -> HttpResponse:
    family, error = _family(request)
    try:
        data = metrics.fleet(request.user, family)
    except redis_lib.RedisError:
        return pages.render_page(request, "live/fleet.html", {"unavailable": True, "families": Family.choices}, nav="fleet")
    config = {"figure": charts.fleet_figure(data), "poll_ms": FLEET_POLL_MS,
              "figure_url": reverse("fleet_figure") + (f"?family={family}" if family else "")}
    context = {"fleet": data, "config": config, "family": family, "families": Family.choices, "error": error,
               "summary": fleet_summary(data), "poll_s": FLEET_POLL_MS // 1000}
    return pages.render_page(request, "live/fleet.html", context, nav="fleet", status=400 if error else 200)


@login_required
@require_safe
def fleet_figure(request: HttpRequest) -> JsonResponse:
    """The fleet heatmap, rebuilt: the fleet page swaps it in every few seconds."""
    family, error = _family(request)
    if error:
        return JsonResponse({"detail": error, "errors": {"family": [error]}}, status=400)
    try:
        data = metrics.fleet(request.user, family)
    except redis_lib.RedisError:
        response = JsonResponse({"detail": "Live data is unavailable: Redis (the live metrics store) cannot be "
                                           "reached. Try again shortly.", "code": "live_data_unavailable"}, status=503)
        response["Retry-After"] = "10"
        return response
    return JsonResponse({"figure": charts.fleet_figure(data), "summary": fleet_summary(data)})


def fleet_summary(data: dict) -> dict:
    cores = sum(len(h["cores"]) for h in data["hosts"])
    held = sum(sum(h["held"]) for h in data["hosts"])
    idle = sum(sum(h["idle"]) for h in data["hosts"])
    busy = [u for h in data["hosts"] for u in h["util"] if u is not None]
    return {"hosts": len(data["hosts"]), "cores": cores, "held": held, "idle": idle,
            "orphans": sum(h["orphans"] for h in data["hosts"]),
            "util_mean": round(sum(busy) / len(busy), 1) if busy else None}
