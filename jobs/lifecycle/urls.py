"""Job pages: the team's list, the submit forms, a job's page and what hangs off it."""
from django.urls import path

from jobs.lifecycle import views

urlpatterns = [
    path("", views.home, name="home"),
    path("teams/<slug:slug>/jobs/", views.job_list, name="job_list"),
    path("teams/<slug:slug>/jobs/rows.json", views.job_rows, name="job_rows"),
    path("teams/<slug:slug>/jobs/new/<str:kind>/", views.job_new, name="job_new"),
    path("jobs/<dbid:job_id>/", views.job_detail, name="job_detail"),
    path("jobs/<dbid:job_id>/status.json", views.job_status, name="job_status"),
    path("jobs/<dbid:job_id>/result/", views.job_result, name="job_result"),
    path("jobs/<dbid:job_id>/cancel/", views.job_cancel, name="job_cancel"),
    path("jobs/<dbid:job_id>/suspend/", views.job_suspend, name="job_suspend"),
    path("jobs/<dbid:job_id>/resume/", views.job_resume, name="job_resume"),
    path("jobs/<dbid:job_id>/artifacts/<path:name>", views.job_artifact, name="job_artifact"),
]
