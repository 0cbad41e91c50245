"""The JSON API (/api/v1/), documented by the OpenAPI schema at /api/v1/openapi.json
and browsable at /api/v1/docs. One NinjaAPI; each area adds its own Router."""
from __future__ import annotations

import logging

import redis
from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.http import Http404, HttpRequest
from django.http.multipartparser import MultiPartParserError
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.security import HttpBearer, SessionAuth

import jobs.converters  # noqa: F401 - registers {dbid:...}, the ids in the API's paths
from jobs.api.body import SafeJsonParser, parse_failure
from jobs.teams import tokens
from jobs.teams.logins import client_ip
from jobs.teams.tokens import TokenRefused

log = logging.getLogger("jobs.api")


class TokenAuth(HttpBearer):
    """`Authorization: Bearer nd_…` with an API token (a person's or a team service
    account's). An expired token is a 401 saying so; a token whose scope does not
    cover the request (reads: read; writes: submit; team settings: manage) a 403
    naming the scope it lacks; a revoked token, and one never issued, a 401 that
    tells which (jobs.teams.tokens). A header not of that form (another scheme, no
    token, two spaces) is a 401 saying the form expected."""

    def __call__(self, request: HttpRequest):
        header = request.headers.get("Authorization")
        if not header:
            return None
        return self.authenticate(request, tokens.bearer_token(header))

    def authenticate(self, request: HttpRequest, token: str):
        found = tokens.token_authenticate(token, ip=client_ip(request))
        if found is None:
            return None
        tokens.require_scope(found, tokens.scope_needed(request.method, request.path))
        request.user = found.user
        request.api_token = found
        return found.user


class BrowserSessionAuth(SessionAuth):
    """A signed-in browser session, CSRF-checked. Only a request that has a signed-in
    session and no Authorization header is judged as one: ninja's SessionAuth checks
    CSRF first, so a client with no credentials, or with a token that no longer works,
    was answered 403 "CSRF check Failed" instead of the 401 that says why."""

    def __call__(self, request: HttpRequest):
        if "Authorization" in request.headers or not request.user.is_authenticated:
            return None
        return super().__call__(request)


def _read_only(view):
    """The schema and docs pages answer GET and HEAD; any other method is the API's
    JSON 405 (HttpBasics), not the CSRF 403 page an unsafe method without a session
    would get, nor the page itself."""
    return csrf_exempt(require_safe(view))


api = NinjaAPI(title="NeuronDeck API", version="1", urls_namespace="api",
               auth=[TokenAuth(), BrowserSessionAuth()], docs_url="/docs", parser=SafeJsonParser(),
               docs_decorator=_read_only)


@_read_only
def home(request: HttpRequest):
    """/api/v1/ itself (in front of ninja's root view, which the CSRF check reached
    first for an unsafe method without a session): a JSON 404 naming where the API's
    documentation and schema are."""
    return not_found(request, Http404(f"No API call at {request.path}: the API's documentation is at "
                                      f"{request.path}docs, its schema at {request.path}openapi.json"))


@api.exception_handler(HttpError)
def http_error(request: HttpRequest, exc: HttpError):
    """Ninja's HttpError as ninja answers it ({"detail"}), except a body our parser
    refused: 415 for a content type that is not JSON, 400 naming the field for JSON
    too deep or holding a NUL (ninja's own message names neither)."""
    refused = parse_failure(request, exc.__cause__) if exc.__cause__ is not None else None
    return refused or api.create_response(request, {"detail": str(exc)}, status=exc.status_code)


@api.exception_handler(Http404)
def not_found(request: HttpRequest, exc: Http404):
    """What was not found ("No such job"), where ninja answered "Not Found" alone. The
    sentence is the same for another team's object as for one that does not exist."""
    return api.create_response(request, {"detail": str(exc) or "Not Found", "code": "not_found"}, status=404)


@api.exception_handler(AuthenticationError)
def unauthenticated(request: HttpRequest, exc: AuthenticationError):
    """401 with what to do: no credentials, or a token that does not work."""
    scheme = request.headers.get("Authorization", "").partition(" ")[0]
    if not scheme:
        detail = ("Authentication required: send Authorization: Bearer <token> with an API token "
                  "(from the Tokens page), or sign in.")
    else:
        detail = "Unauthorized: send Authorization: Bearer <token> with an API token from the Tokens page (nd_…)."
    response = api.create_response(request, {"detail": detail}, status=401)
    response["WWW-Authenticate"] = 'Bearer realm="api"'
    return response


@api.exception_handler(TokenRefused)
def token_refused(request: HttpRequest, exc: TokenRefused):
    """An expired, revoked or never issued token (401) or one without the scope the
    request needs (403), with the reason and what to do."""
    response = api.create_response(request, {"detail": str(exc), "code": exc.code}, status=exc.status)
    if exc.status == 401:
        response["WWW-Authenticate"] = f'Bearer realm="api", error="invalid_token", error_description="{exc.code}"'
    return response


@api.exception_handler(MultiPartParserError)
def unreadable_body(request: HttpRequest, exc: MultiPartParserError):
    """A body that says multipart/form-data but cannot be read as one (no boundary, cut
    short): 400 in the API's shape, not Django's HTML page."""
    message = f"the {request.content_type or 'request'} body cannot be read ({exc})"
    return api.create_response(request, {"detail": f"Bad request: {message}", "code": "unreadable_body",
                                         "field": "Content-Type", "errors": {"Content-Type": [message]}}, status=400)


@api.exception_handler(RequestDataTooBig)
def body_too_large(request: HttpRequest, exc: RequestDataTooBig):
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE // 2**20
    detail = (f"The body is larger than the {limit} MiB the API reads at once; send long prompt lists as a "
              "prompts_file (multipart/form-data), and models and datasets as file uploads")
    return api.create_response(request, {"detail": detail, "code": "too_large"}, status=413)


@api.exception_handler(SuspiciousOperation)
def suspicious_body(request: HttpRequest, exc: SuspiciousOperation):
    """Django's own refusals of a body (too many fields or files): its 400, as JSON."""
    return api.create_response(request, {"detail": f"Bad request: {exc}", "code": "bad_request"}, status=400)


@api.exception_handler(redis.RedisError)
def live_data_unavailable(request: HttpRequest, exc: redis.RedisError):
    """Redis (live metrics, log tails) down: 503 with the reason, not a 500. The
    connection details stay in the server log."""
    log.warning("Redis unavailable for %s: %r", request.path, exc)
    reason = "cannot be reached" if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) else "refused a request"
    response = api.create_response(request, {
        "detail": f"Live data is unavailable: Redis (the live metrics store) {reason}. Try again shortly.",
        "code": "live_data_unavailable"}, status=503)
    response["Retry-After"] = "10"
    return response


@api.exception_handler(ValidationError)
def validation_error(request: HttpRequest, exc: ValidationError):
    """Ninja's own 422s (a bad query value, a malformed body) in the API's error shape:
    a sentence naming the field, plus {field: [messages]}."""
    errors: dict[str, list[str]] = {}
    for err in exc.errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "body", "path", "form", "payload")]
        message = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
        errors.setdefault(".".join(loc) or "body", []).append(message)
    detail = "; ".join(f"{field}: {', '.join(msgs)}" for field, msgs in errors.items())
    return api.create_response(request, {"detail": detail, "code": "invalid", "errors": errors}, status=422)


def _add_routers() -> None:
    from jobs.api import compile_cache, endpoints, jobs, live, notify, teams, usage

    for area in (jobs, live, teams, usage, notify, compile_cache, endpoints):
        api.add_router("", area.router)


_add_routers()
