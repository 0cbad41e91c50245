"""Usage pages: a team's usage, the site's usage and its price table."""
from django.urls import path

from jobs import views_usage

urlpatterns = [
    path("teams/<slug:slug>/usage/", views_usage.team_usage, name="team_usage"),
    path("usage/", views_usage.site_usage, name="site_usage"),
    path("usage/prices/", views_usage.price_set, name="usage_price_set"),
    path("usage/prices/<int:price_id>/delete/", views_usage.price_delete, name="usage_price_delete"),
]
