"""The staff quota page."""
from django.urls import path

from jobs.quotas import views

urlpatterns = [
    path("quotas/", views.quota_list, name="quota_list"),
    path("quotas/<slug:slug>/", views.quota_save, name="quota_save"),
]
