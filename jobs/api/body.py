"""Reading a request body in the API: the content type first (a `text/plain` body is
not read as JSON: 415 naming the type), then the JSON through jobs.safe_json, the
parser every place hostile JSON arrives shares (depth, NUL, lone surrogates).
Errors are JsonResponses in the API's error shape, ready to return."""
from __future__ import annotations

from typing import Any

from django import forms
from django.http import HttpRequest, JsonResponse
from ninja.parser import Parser

from jobs import safe_json
from jobs.safe_json import is_json_type

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


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


def json_kind(value: Any) -> str:
    """What a JSON value is, for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return f"a number with a fraction ({value!r})" if not value.is_integer() else f"a decimal number ({value!r})"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def json_type_errors(data: dict, fields: dict[str, forms.Field], *,
                     names: dict[str, str] | None = None) -> dict[str, list[str]]:
    """A JSON body read by a form is typed: each field's value must be of its field's
    JSON type (null stands for "not given"). Ids, counts and sizes are JSON integers
    only: not true (which the form's int() would read as 1), not 1.0 or 1.5, not "1"
    nor "١" (int() reads other scripts' digits; a form-encoded body, which is all
    text, sends "1"). Numbers take an integer or a decimal; text and choices a string,
    several choices a list of strings; yes/no fields true or false (the form would read any non-empty value as yes). A
    field may state its own JSON type with `json_type = (check, wanted)`. `names`
    maps a field to the name its error carries (e.g. options.max_batch_size)."""
    errors: dict[str, list[str]] = {}
    for name, value in data.items():
        field = fields.get(name)
        if field is None or value is None:
            continue
        own_type = getattr(field, "json_type", None)
        if own_type is not None:
            check, wanted = own_type
            ok = check(value)
        elif isinstance(field, forms.FloatField):  # before IntegerField: FloatField is one
            ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif isinstance(field, (forms.IntegerField, forms.ModelChoiceField)):
            ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
            if isinstance(field, forms.ModelChoiceField):
                wanted = "an id (an integer)"
        elif isinstance(field, forms.BooleanField):
            ok, wanted = isinstance(value, bool), "true or false"
        elif isinstance(field, forms.MultipleChoiceField):  # before ChoiceField: it is one
            ok, wanted = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
        elif isinstance(field, (forms.CharField, forms.ChoiceField)):
            ok, wanted = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            # The form's own sentence first (what the HTML form would say), then the type.
            own = field.error_messages.get("invalid_choice" if isinstance(field, forms.ModelChoiceField) else "invalid")
            own = f"{own} " if own and "%(" not in own else ""
            shown = (names or {}).get(name, name)
            errors[shown] = [f"{own}{shown} must be {wanted}, not {json_kind(value)}."]
    return errors
