"""Logins: the client's address, the answer to a locked-out login (django-axes calls
`lockout_response`), and an AuditEntry for every login, failure and lockout."""
from __future__ import annotations

import ipaddress

from axes.signals import user_locked_out
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from jobs.models import AuditEntry
from jobs.teams.sso import login_context


def client_ip(request: HttpRequest) -> str | None:
    """The client's address: REMOTE_ADDR, or with TRUSTED_PROXY_COUNT = n proxies in
    front, the n-th address from the right of X-Forwarded-For (the one the outermost
    trusted proxy saw; what lies left of it the client wrote itself). None when that
    is not an address."""
    addr = request.META.get("REMOTE_ADDR", "")
    hops = settings.TRUSTED_PROXY_COUNT
    if hops > 0:
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if part.strip()]
        if len(forwarded) >= hops:
            addr = forwarded[-hops]
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        return None


def lockout_username(request: HttpRequest, credentials: dict | None) -> str | None:
    """The username axes counts failures for, cut to a username's longest (150):
    Django's login forms do not limit its length, and axes stores it in 255
    characters (a longer one was a 500)."""
    username = (credentials or {}).get("username") or request.POST.get("username")
    return str(username)[:150] if username else None


def lockout_sentence() -> str:
    minutes = settings.LOGIN_LOCKOUT_MINUTES
    return (f"Too many failed logins for this username or from this address: logins are refused for "
            f"{minutes} minute{'s' if minutes != 1 else ''}. Try again later, or ask a site admin to unlock it.")


def wants_json(request: HttpRequest) -> bool:
    accept = request.headers.get("Accept", "")
    return (request.path.startswith("/api/") or request.headers.get("X-Requested-With") == "XMLHttpRequest"
            or ("application/json" in accept and "text/html" not in accept))


def lockout_response(request: HttpRequest, original_response=None, credentials=None) -> HttpResponse:
    """429 with the reason and when to retry: JSON for API clients, else the login
    page with the sentence above the form."""
    retry_after = settings.LOGIN_LOCKOUT_MINUTES * 60
    if wants_json(request):
        response: HttpResponse = JsonResponse({"detail": lockout_sentence(), "code": "login_locked_out",
                                               "retry_after_s": retry_after}, status=429)
    else:
        response = render(request, "registration/login.html",
                          {"form": AuthenticationForm(request), "locked_out": lockout_sentence(),
                           "next": request.POST.get("next", ""), **login_context(request)}, status=429)
    response["Retry-After"] = str(retry_after)
    return response


def _audit(request: HttpRequest | None, subject: str, username: str, user=None) -> None:
    if user is None and username:
        user = get_user_model().objects.filter(username=username).first()
    AuditEntry.objects.create(team=None, actor=user, subject=subject, new=username[:200],
                              ip=client_ip(request) if request is not None else None)


@receiver(user_logged_in, dispatch_uid="jobs.audit.login")
def _logged_in(sender, request, user, **kwargs) -> None:
    _audit(request, "login.succeeded", user.get_username(), user)


@receiver(user_login_failed, dispatch_uid="jobs.audit.login_failed")
def _login_failed(sender, credentials: dict, request=None, **kwargs) -> None:
    _audit(request, "login.failed", str(credentials.get("username") or ""))


@receiver(user_locked_out, dispatch_uid="jobs.audit.locked_out")
def _locked_out(sender, request, username, ip_address, **kwargs) -> None:
    _audit(request, "login.locked_out", str(username or ""))
