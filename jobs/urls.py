"""Page URLs, one module per area so each can grow on its own."""
from django.urls import include, path

urlpatterns = [
    path("", include("jobs.lifecycle.urls")),
    path("", include("jobs.live.urls")),
    path("", include("jobs.teams.urls")),
    path("", include("jobs.usage.urls")),
]
