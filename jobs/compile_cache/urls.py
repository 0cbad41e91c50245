from django.urls import path

from jobs.compile_cache import views

urlpatterns = [
    path("teams/<slug:slug>/compile-cache/", views.cache_page, name="compile_cache"),
    path("teams/<slug:slug>/compile-cache/<dbid:entry_id>/pin/", views.pin, name="compile_cache_pin"),
]
