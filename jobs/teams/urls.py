"""Team and quota pages."""
from django.urls import path

from jobs.teams import views

urlpatterns = [
    path("teams/<slug:slug>/", views.team_detail, name="team_detail"),
    path("teams/<slug:slug>/members/", views.team_member_add, name="team_member_add"),
    path("teams/<slug:slug>/members/role/", views.team_member_role, name="team_member_role"),
    path("quotas/", views.quota_list, name="quota_list"),
    path("quotas/<slug:slug>/", views.quota_save, name="quota_save"),
]
