"""Page URLs for jobs, models, datasets, API tokens and login."""
from django.contrib.auth import views as auth_views
from django.urls import path, register_converter

from jobs.lifecycle import views


class DbIdConverter:
    """A primary key that fits a PostgreSQL bigint: a longer number is a 404 at
    routing time instead of a database "out of range" error (a 500)."""

    regex = "[0-9]{1,18}"

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value: int) -> str:
        return str(value)


register_converter(DbIdConverter, "dbid")

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", views.home, name="home"),
    path("teams/<slug:slug>/jobs/", views.job_list, name="job_list"),
    path("teams/<slug:slug>/jobs/new/<str:kind>/", views.job_new, name="job_new"),
    path("jobs/<dbid:job_id>/", views.job_detail, name="job_detail"),
    path("jobs/<dbid:job_id>/status.json", views.job_status, name="job_status"),
    path("jobs/<dbid:job_id>/result/", views.job_result, name="job_result"),
    path("jobs/<dbid:job_id>/cancel/", views.job_cancel, name="job_cancel"),
    path("jobs/<dbid:job_id>/artifacts/<path:name>", views.job_artifact, name="job_artifact"),
    path("teams/<slug:slug>/models/", views.model_list, name="model_list"),
    path("models/<dbid:model_id>/", views.model_detail, name="model_detail"),
    path("teams/<slug:slug>/datasets/", views.dataset_list, name="dataset_list"),
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/<dbid:token_id>/delete/", views.token_delete, name="token_delete"),
]
