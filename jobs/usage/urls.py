"""Usage pages: a team's usage, the site's usage and its price table."""
from django.urls import path

from jobs.usage import views

urlpatterns = [
    path("teams/<slug:slug>/usage/", views.team_usage, name="team_usage"),
    path("usage/", views.site_usage, name="site_usage"),
    path("usage/prices/", views.price_set, name="usage_price_set"),
    path("usage/prices/<int:price_id>/delete/", views.price_delete, name="usage_price_delete"),
]
