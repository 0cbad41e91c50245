"""Model and dataset pages."""
from django.urls import path

from jobs.assets import views

urlpatterns = [
    path("teams/<slug:slug>/models/", views.model_list, name="model_list"),
    path("models/<dbid:model_id>/", views.model_detail, name="model_detail"),
    path("teams/<slug:slug>/datasets/", views.dataset_list, name="dataset_list"),
]
