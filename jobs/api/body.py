"""Reading a request body in the API: the content type first (a `text/plain` body is
not read as JSON: 415 naming the type), then the JSON through jobs.safe_json, the
parser every place hostile JSON arrives shares (depth, NUL, lone surrogates).
Errors are JsonResponses in the API's error shape, ready to return."""
from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from ninja.parser import Parser

from jobs import safe_json

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def is_json_type(content_type: str) -> bool:
    """application/json, or a structured +json type (application/merge-patch+json)."""
    return content_type == "application/json" or (content_type.startswith("application/")
                                                    and content_type.endswith("+json"))


def unsupported(request: HttpRequest, accepted: str) -> JsonResponse:
    content_type = request.content_type or "none"
    message = f"the body's Content-Type is {content_type}; send {accepted}"
    return JsonResponse({"detail": f"Unsupported media type: {message}", "code": "unsupported_media_type",
                         "field": "Content-Type", "errors": {"Content-Type": [message]}}, status=415)


def json_error(exc: safe_json.JSONInputError, what: str) -> JsonResponse:
    """400 for refused JSON; names the top-level field when the fault lies inside one."""
    message = exc.sentence("the body")
    body: dict[str, Any] = {"detail": f"{what}: {message}", "code": "invalid_json"}
    if exc.field:
        body["field"] = exc.field
        body["errors"] = {exc.field: [message.removeprefix("the body: ")]}
    return JsonResponse(body, status=400)


def read_json(request: HttpRequest, what: str, *, empty: Any = None,
              accepted: str = "application/json") -> tuple[Any, JsonResponse | None]:
    """(the parsed body, None) or (None, the error response). `what` starts the error
    sentence ("The job was not submitted"), `accepted` the 415's advice. A body-less
    request without a content type reads as `empty`."""
    if not request.content_type and not request.body:
        return empty, None
    if not is_json_type(request.content_type or ""):
        return None, unsupported(request, accepted)
    if not request.body:
        return empty, None
    try:
        return safe_json.loads(request.body), None
    except safe_json.JSONInputError as exc:
        return None, json_error(exc, what)


class UnsupportedMediaType(ValueError):
    """A body sent with a content type that is not JSON, to an operation that reads JSON."""


class SafeJsonParser(Parser):
    """The NinjaAPI's parser for operations whose body is a typed Schema: the same
    content-type check and safe_json as read_json. Ninja wraps whatever this raises
    in a 400 "Cannot parse request body"; jobs.api.root's HttpError handler answers
    with the cause instead (415, or 400 naming the field)."""

    def parse_body(self, request: HttpRequest):
        if request.content_type and not is_json_type(request.content_type):
            raise UnsupportedMediaType(request.content_type)
        return safe_json.loads(request.body)


def parse_failure(request: HttpRequest, cause: BaseException) -> JsonResponse | None:
    """The answer for a body SafeJsonParser refused, or None for another failure."""
    if isinstance(cause, UnsupportedMediaType):
        return unsupported(request, "application/json")
    if isinstance(cause, safe_json.JSONInputError):
        return json_error(cause, "Bad request")
    return None
