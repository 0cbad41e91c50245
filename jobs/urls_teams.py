"""Team and quota pages."""
from django.urls import path

from jobs import views_teams

urlpatterns = [
    path("teams/<slug:slug>/", views_teams.team_detail, name="team_detail"),
    path("teams/<slug:slug>/members/", views_teams.team_member_add, name="team_member_add"),
    path("teams/<slug:slug>/members/role/", views_teams.team_member_role, name="team_member_role"),
    path("quotas/", views_teams.quota_list, name="quota_list"),
    path("quotas/<slug:slug>/", views_teams.quota_save, name="quota_save"),
]
