"""Path converters shared by the pages and the API (registered on import)."""
from django.urls import register_converter


class DbIdConverter:
    """A primary key as a URL writes it: 1 to 18 ASCII digits, nothing else (no sign,
    space, `_` or another script's digits, which int() would read). A longer number
    is a 404 at routing time instead of a database "out of range" error (a 500)."""

    regex = "[0-9]{1,18}"

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value: int) -> str:
        return str(value)


register_converter(DbIdConverter, "dbid")
