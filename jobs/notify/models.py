"""Notification records: subscriptions, the outbox (Notification + its Delivery
rows, written in the same transaction as the state change they report), and the
team policies that raise notifications (idle cores, budgets). Imported by
jobs.models, so they belong to the jobs app."""
from __future__ import annotations

import secrets
import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class EventKind(models.TextChoices):
    JOB_SUCCEEDED = "job.succeeded", "Job succeeded"
    JOB_FAILED = "job.failed", "Job failed"
    JOB_TIMED_OUT = "job.timed_out", "Job timed out"
    JOB_PREEMPTED = "job.preempted", "Job preempted"
    JOB_REQUEUED = "job.requeued", "Job requeued"
    JOB_WAITING = "job.waiting", "Job waiting longer than the threshold"
    JOB_IDLE = "job.idle", "Job's cores idle"
    JOB_IDLE_STOPPED = "job.idle_stopped", "Job stopped for idle cores"
    ENDPOINT_UNHEALTHY = "endpoint.unhealthy", "Endpoint unhealthy"
    BUDGET_THRESHOLD = "budget.threshold", "Budget threshold reached"
    BUDGET_FORECAST = "budget.forecast", "Budget forecast to run out this month"
    QUOTA_CHANGED = "quota.changed", "Quota changed"


# Events about one job go to its owner's "self" subscriptions; every event goes to the
# team's "team" subscriptions (managers only may create those).
JOB_EVENTS = frozenset({EventKind.JOB_SUCCEEDED, EventKind.JOB_FAILED, EventKind.JOB_TIMED_OUT,
                        EventKind.JOB_PREEMPTED, EventKind.JOB_REQUEUED, EventKind.JOB_WAITING,
                        EventKind.JOB_IDLE, EventKind.JOB_IDLE_STOPPED})


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


class Subscription(models.Model):
    class Scope(models.TextChoices):
        SELF = "self", "My jobs"
        TEAM = "team", "The whole team"

    class Channel(models.TextChoices):
        EMAIL = "email", "Email"
        SLACK = "slack", "Slack incoming webhook"
        WEBHOOK = "webhook", "Signed webhook"

    team = models.ForeignKey("jobs.Team", on_delete=models.CASCADE, related_name="subscriptions")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="subscriptions")
    scope = models.CharField(max_length=8, choices=Scope.choices, default=Scope.SELF)
    events = models.JSONField(default=list)  # EventKind values
    channel = models.CharField(max_length=8, choices=Channel.choices)
    target = models.CharField(max_length=500)  # an email address or an https URL
    secret = models.CharField(max_length=80, default=new_secret)  # HMAC key of signed webhooks
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    # The last delivery that was given up: shown to the subscriber until one succeeds.
    failing_since = models.DateTimeField(null=True, blank=True)
    last_failure = models.TextField(blank=True)

    class Meta:
        indexes = [models.Index(fields=["team", "active"], name="sub_team_active")]

    def __str__(self) -> str:
        return f"{self.channel} {self.target} ({self.scope} of {self.team_id})"


class Notification(models.Model):
    """One event (the outbox entry). `dedup_key` makes "fires once" facts (a budget
    threshold per month, a job's idle flag) race-free: a second insert fails."""

    team = models.ForeignKey("jobs.Team", on_delete=models.CASCADE, related_name="+")
    job = models.ForeignKey("jobs.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="+")  # whose job / whom it concerns ("self" subscribers)
    kind = models.CharField(max_length=40, choices=EventKind.choices)
    title = models.CharField(max_length=300)
    payload = models.JSONField(default=dict)
    dedup_key = models.CharField(max_length=200, null=True, blank=True, unique=True)
    created_at = models.DateTimeField(default=timezone.now)


class Delivery(models.Model):
    """One notification to one subscription. `delivery_id` is sent with every attempt
    (receivers de-duplicate on it). `ticket` is bumped by every claim: a send is
    recorded only by the claim that made it, so a stale Celery message or a worker
    that died mid-send cannot record over a newer attempt."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Gave up"

    notification = models.ForeignKey(Notification, on_delete=models.CASCADE, related_name="deliveries")
    subscription = models.ForeignKey(Subscription, on_delete=models.CASCADE, related_name="deliveries")
    delivery_id = models.UUIDField(default=uuid.uuid4, unique=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    ticket = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["next_attempt_at"], name="delivery_due", condition=Q(status="pending")),
            models.Index(fields=["subscription", "-id"], name="delivery_sub_recent"),
        ]


class TeamAlertPolicy(models.Model):
    """Per team: what idle cores lead to, and budget alerting switches."""

    class IdleAction(models.TextChoices):
        NOTIFY = "notify", "Flag and notify only"
        STOP = "stop", "Stop the job after the grace period"

    team = models.OneToOneField("jobs.Team", on_delete=models.CASCADE, related_name="alert_policy")
    idle_util_below = models.FloatField(default=0.05)  # fraction 0..1 of a core
    idle_minutes = models.PositiveIntegerField(default=30)
    idle_action = models.CharField(max_length=8, choices=IdleAction.choices, default=IdleAction.NOTIFY)
    idle_grace_minutes = models.PositiveIntegerField(default=15)
    budget_thresholds = models.JSONField(default=list)  # percents; empty = the site's (50, 80, 100)


class UserBudget(models.Model):
    """An optional hard cap on one user's NeuronCore-hours per month in a team."""

    team = models.ForeignKey("jobs.Team", on_delete=models.CASCADE, related_name="user_budgets")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    monthly_core_hours = models.FloatField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "user"], name="uniq_user_budget")]
