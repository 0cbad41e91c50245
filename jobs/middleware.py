"""Middleware of the jobs app."""
from __future__ import annotations

from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, HttpResponseNotFound, JsonResponse
from django.urls import reverse


def api_prefix() -> str:
    return reverse("api:api-root")


class HttpBasics:
    """Two rules of HTTP that neither Django nor gunicorn keeps for us, outside all
    but the security headers' middleware so they hold for every answer:

    - A response to HEAD has no body (RFC 9110 9.3.2). Django answers HEAD with the
      GET response and leaves removing the body to the server; gunicorn sends it, and
      a client reading the next response on that connection reads the body instead.
      The headers stay (Content-Length too: what GET would send). An API operation
      answers HEAD as its GET (ninja itself has no HEAD).
    - The API speaks JSON even when no operation answered: a path it does not have
      (404) or a method an operation does not take (405, with Allow) is a JSON error
      like every other, not Django's HTML page."""

    def __init__(self, get_response):
        self.get_response = get_response
        self.prefix: str | None = None

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if self.prefix is None:
            self.prefix = api_prefix()
        is_api = request.path.startswith(self.prefix)
        head = request.method == "HEAD"
        if head and is_api:
            request.method = "GET"
        response = self.get_response(request)
        if is_api and response.status_code in (404, 405) and not response.get("Content-Type", "").startswith(
                "application/json"):
            response = self._json_error(request, response)
        if head:
            if response.streaming:
                closing = getattr(response, "streaming_content", None)
                response.streaming_content = []
                if hasattr(closing, "close"):
                    closing.close()
            else:
                length = response.get("Content-Length")
                response.content = b""
                if length is not None:
                    response["Content-Length"] = length
        return response

    @staticmethod
    def _json_error(request: HttpRequest, response: HttpResponse) -> JsonResponse:
        if response.status_code == 404:
            prefix = api_prefix()
            answer = JsonResponse({"detail": f"Not Found: the API has no {request.path}; its operations are "
                                             f"listed at {prefix}docs ({prefix}openapi.json)", "code": "not_found"},
                                  status=404)
        else:
            allowed = response.get("Allow", "")
            answer = JsonResponse({"detail": f"Method Not Allowed: {request.method} {request.path} takes {allowed}",
                                   "code": "method_not_allowed"}, status=405)
            answer["Allow"] = allowed
        if "Vary" in response:
            answer["Vary"] = response["Vary"]
        return answer


class PageMethodNotAllowed:
    """A page address sent a method it does not take (GET of a button's POST address)
    answers the styled 405 page saying which methods it takes, instead of Django's
    empty body. Inside the session, CSRF and authentication middleware, so the page
    has the user's navigation as every page does; the API's 405 is HttpBasics'."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if response.status_code == 405 and not response.content and not request.path.startswith(api_prefix()):
            from jobs.pages import method_not_allowed  # pages import the models: not at app loading

            return method_not_allowed(request, response.get("Allow", ""))
        return response


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
            self.api_prefix = api_prefix()
        if request.path.startswith(self.api_prefix):
            body: dict = {"detail": detail, "code": "not_found" if status == 404 else "invalid"}
            if field is not None:
                body["field"], body["errors"] = field, {field: [detail.partition(": ")[2]]}
            return JsonResponse(body, status=status)
        response_class = HttpResponseNotFound if status == 404 else HttpResponseBadRequest
        return response_class(detail, content_type="text/plain; charset=utf-8")
