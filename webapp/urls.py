from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic.base import RedirectView

from jobs.api.root import api, home as api_home
from jobs.monitoring.csp_reports import csp_report
from jobs.monitoring.prometheus import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", api_home),  # before ninja's own root view: see jobs.api.root.home
    path("api/v1/", api.urls),
    path("metrics", metrics_view, name="metrics"),  # Prometheus; guarded in the view
    path("csp-report", csp_report, name="csp_report"),  # the browsers' CSP violation reports, logged
    path("sso/", include("mozilla_django_oidc.urls")),  # OpenID Connect sign-in (jobs.teams.sso)
    # Browsers ask for /favicon.ico on pages that name no icon (the admin, the API docs).
    path("favicon.ico", RedirectView.as_view(url=static("jobs/favicon.svg"), permanent=True)),
    path("", include("jobs.urls")),
]

# Styled error pages with the user's navigation (500 is Django's own view: templates/500.html).
handler400 = "jobs.pages.bad_request"
handler404 = "jobs.pages.page_not_found"
handler403 = "jobs.pages.permission_denied"
