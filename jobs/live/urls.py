"""Live pages: hosts, a host, the fleet heatmap (the JSON behind them is in api_live)."""
from django.urls import path

from jobs.live import views

urlpatterns = [
    path("hosts/", views.host_list, name="host_list"),
    path("hosts/<str:name>/", views.host_detail, name="host_detail"),
    path("hosts/<str:name>/drain/", views.host_drain, name="host_drain"),
    path("fleet/", views.fleet_page, name="fleet"),
    path("fleet/figure.json", views.fleet_figure, name="fleet_figure"),
]
