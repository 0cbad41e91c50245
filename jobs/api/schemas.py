"""Schemas shared by every API router (one OpenAPI component per name)."""
from __future__ import annotations

from ninja import Schema
from pydantic import ConfigDict

# Offsets (rows of a list, bytes of a log) beyond any real count or size, and within
# the databases' 64-bit integers (a larger one was a 500: "bigint out of range").
MAX_OFFSET = 2**53


class ErrorOut(Schema):
    """Every API error: a sentence; a reason code where one applies; the field at
    fault and per-field messages for bad input."""

    detail: str
    code: str | None = None
    field: str | None = None
    errors: dict[str, list[str]] | None = None


class BodyIn(Schema):
    """A request body read by a schema: a field it does not have is refused (a typo
    is not silently ignored), as the bodies the forms read are."""

    model_config = ConfigDict(extra="forbid")
