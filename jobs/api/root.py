"""The JSON API (/api/v1/), documented by the OpenAPI schema at /api/v1/openapi.json
and browsable at /api/v1/docs. One NinjaAPI; each area adds its own Router."""
from __future__ import annotations

from django.http import HttpRequest
from ninja import NinjaAPI
from ninja.errors import ValidationError
from ninja.security import HttpBearer, django_auth

from jobs.teams.tokens import token_user


class TokenAuth(HttpBearer):
    """`Authorization: Bearer nd_…` with a per-user API token."""

    def authenticate(self, request: HttpRequest, token: str):
        user = token_user(token)
        if user is not None:
            request.user = user
        return user


api = NinjaAPI(title="NeuronDeck API", version="1", urls_namespace="api", auth=[TokenAuth(), django_auth],
               docs_url="/docs")


@api.exception_handler(ValidationError)
def validation_error(request: HttpRequest, exc: ValidationError):
    """Ninja's own 422s (a bad query value, a malformed body) in the API's error shape:
    a sentence naming the field, plus {field: [messages]}."""
    errors: dict[str, list[str]] = {}
    for err in exc.errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "body", "path", "form", "payload")]
        errors.setdefault(".".join(loc) or "body", []).append(err.get("msg", "invalid"))
    detail = "; ".join(f"{field}: {', '.join(msgs)}" for field, msgs in errors.items())
    return api.create_response(request, {"detail": detail, "code": "invalid", "errors": errors}, status=422)


def _add_routers() -> None:
    from jobs.api import jobs, live, teams, usage

    api.add_router("", jobs.router)
    api.add_router("", live.router)
    api.add_router("", teams.router)
    api.add_router("", usage.router)


_add_routers()
