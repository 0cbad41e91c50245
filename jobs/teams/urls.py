"""Team pages, member changes, API tokens, login and logout."""
from django.contrib.auth import views as auth_views
from django.urls import path

from jobs.teams import views

urlpatterns = [
    path("login/", views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("teams/new/", views.team_new, name="team_new"),  # before teams/<slug>/: "new" is a reserved slug
    path("teams/<slug:slug>/", views.team_detail, name="team_detail"),
    path("teams/<slug:slug>/members/", views.team_member_add, name="team_member_add"),
    path("teams/<slug:slug>/members/role/", views.team_member_role, name="team_member_role"),
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/<dbid:token_id>/delete/", views.token_delete, name="token_delete"),
]
