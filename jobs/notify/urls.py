"""The notifications pages of a team."""
from django.urls import path

from jobs.notify import views

urlpatterns = [
    path("teams/<slug:slug>/notifications/", views.notifications, name="notifications"),
    path("teams/<slug:slug>/notifications/subscribe/", views.subscribe, name="notify_subscribe"),
    path("teams/<slug:slug>/notifications/policy/", views.policy_update, name="notify_policy"),
    path("teams/<slug:slug>/notifications/subscriptions/<dbid:sub_id>/", views.subscription_detail,
         name="notify_subscription"),
    path("teams/<slug:slug>/notifications/subscriptions/<dbid:sub_id>/delete/", views.subscription_delete,
         name="notify_subscription_delete"),
    path("teams/<slug:slug>/notifications/deliveries/<dbid:delivery_id>/resend/", views.delivery_resend,
         name="notify_resend"),
]
