"""When an endpoint is unhealthy: a replica crashed, or a rollout's new replicas
failed. Each writes the timeline entry and raises notify's endpoint.unhealthy in
the caller's transaction (one notification per crash / failed rollout)."""
from __future__ import annotations

from django.utils import timezone

from jobs.endpoints.selectors import stats
from jobs.endpoints.timeline import endpoint_event
from jobs.models import Endpoint, EndpointRevision, Replica
from jobs.notify import events as notify_events


def _figures(endpoint_id: int) -> dict | None:
    """The endpoint's last minute at the gateway, for the notification (None if Redis cannot say)."""
    figures = stats(endpoint_id)
    return figures.as_dict() if figures is not None else None


def _name(endpoint_id: int) -> tuple[int, str]:
    row = Endpoint.objects.filter(pk=endpoint_id).values("team_id", "team__slug", "name").get()
    return row["team_id"], f"{row['team__slug']}/{row['name']}"


def replica_failed(replica: Replica, reason: str) -> None:
    team_id, name = _name(replica.endpoint_id)
    endpoint_event(replica.endpoint_id, "replica_failed",
                   f"replica {replica.pk} failed: {reason or 'its process ended'}; a new replica replaces it",
                   revision=replica.revision, replica=replica.pk, job=replica.job_id)
    notify_events.endpoint_unhealthy(team_id=team_id, endpoint=name,
                                     reason=f"replica {replica.pk} failed: {reason or 'its process ended'}",
                                     since=replica.stopped_at or timezone.now(),
                                     figures=_figures(replica.endpoint_id))


def rollout_failed(endpoint: Endpoint, revision: EndpointRevision, reason: str, *, rolled_back_to: int | None) -> None:
    team_id, name = _name(endpoint.pk)
    if rolled_back_to is not None:
        message = f"revision {revision.number} failed ({reason}): rolled back to revision {rolled_back_to}"
        kind = "rolled_back"
    else:
        message = f"revision {revision.number} failed ({reason}); no earlier revision to roll back to"
        kind = "rollout_failed"
    endpoint_event(endpoint.pk, kind, message, revision=revision.number, rolled_back_to=rolled_back_to)
    notify_events.endpoint_unhealthy(team_id=team_id, endpoint=name, reason=message, since=revision.created_at,
                                     figures=_figures(endpoint.pk))
