"""Middleware of the jobs app."""
from __future__ import annotations

from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, HttpResponseNotFound, JsonResponse
from django.urls import reverse


class RefuseNulInUrl:
    """No URL of this site carries a NUL character (U+0000, %00), and PostgreSQL cannot
    even compare text holding one: a lookup by such a slug, host name, artifact name
    or filter value was a 500. Refused here, once, before any view: a NUL in the
    path is a 404 (nothing has that name), a NUL in a query parameter a 400 naming
    the parameter. JSON under the API, text elsewhere."""

    def __init__(self, get_response):
        self.get_response = get_response
        self.api_prefix: str | None = None

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if "\x00" in request.path:
            return self._refuse(request, 404, "Not Found", None)
        if "%00" in request.META.get("QUERY_STRING", "") or "\x00" in request.META.get("QUERY_STRING", ""):
            for key, values in request.GET.lists():
                if "\x00" in key or any("\x00" in value for value in values):
                    name = key.replace("\x00", "\\0")
                    return self._refuse(request, 400, f"{name}: contains a NUL character (U+0000)", name)
        return self.get_response(request)

    def _refuse(self, request: HttpRequest, status: int, detail: str, field: str | None) -> HttpResponse:
        if self.api_prefix is None:
            self.api_prefix = reverse("api:api-root")
        if request.path.startswith(self.api_prefix):
            body: dict = {"detail": detail, "code": "not_found" if status == 404 else "invalid"}
            if field is not None:
                body["field"], body["errors"] = field, {field: [detail.partition(": ")[2]]}
            return JsonResponse(body, status=status)
        response_class = HttpResponseNotFound if status == 404 else HttpResponseBadRequest
        return response_class(detail, content_type="text/plain; charset=utf-8")
