"""Page URLs: each area keeps its own urls module; this one includes them all."""
from django.urls import include, path, register_converter


class DbIdConverter:
    """A primary key that fits a 64-bit integer column: a longer number is a 404 at
    routing time instead of a database "out of range" error (a 500)."""

    regex = "[0-9]{1,18}"

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value: int) -> str:
        return str(value)


register_converter(DbIdConverter, "dbid")

urlpatterns = [
    path("", include(f"jobs.{area}.urls"))
    for area in ("lifecycle", "assets", "teams", "quotas", "live", "usage", "compile_cache", "audit", "endpoints",
                 "notify")
]
