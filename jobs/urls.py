"""Page URLs, one module per area so each can grow on its own."""
from django.urls import include, path

urlpatterns = [
    path("", include("jobs.urls_pages")),
    path("", include("jobs.urls_live")),
    path("", include("jobs.urls_teams")),
    path("", include("jobs.urls_usage")),
]
