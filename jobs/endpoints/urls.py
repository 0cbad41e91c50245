from django.urls import path

from jobs.endpoints import views

urlpatterns = [
    path("teams/<slug:slug>/endpoints/", views.endpoint_list, name="endpoint_list"),
    path("endpoints/<dbid:endpoint_id>/", views.endpoint_detail, name="endpoint_detail"),
    path("endpoints/<dbid:endpoint_id>/delete/", views.endpoint_delete, name="endpoint_delete"),
]
