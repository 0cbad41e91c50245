"""Live pages: hosts, a host, the fleet heatmap (the JSON behind them is in api_live)."""
from django.urls import path

from jobs import views_live

urlpatterns = [
    path("hosts/", views_live.host_list, name="host_list"),
    path("hosts/<str:name>/", views_live.host_detail, name="host_detail"),
    path("hosts/<str:name>/drain/", views_live.host_drain, name="host_drain"),
    path("fleet/", views_live.fleet_page, name="fleet"),
    path("fleet/figure.json", views_live.fleet_figure, name="fleet_figure"),
]
