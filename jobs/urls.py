"""Page URLs: each area keeps its own urls module; this one includes them all."""
from django.urls import include, path

import jobs.converters  # noqa: F401 - registers <dbid:...>

urlpatterns = [
    path("", include(f"jobs.{area}.urls"))
    for area in ("lifecycle", "assets", "teams", "quotas", "live", "usage", "compile_cache", "audit", "endpoints",
                 "notify")
]
