"""The endpoint's timeline (EndpointEvent rows): created, changed, scaled, rollout
steps, replicas ready / failed / replaced, deleted."""
from __future__ import annotations

from jobs.models import EndpointEvent


def endpoint_event(endpoint_id: int, kind: str, message: str, *, actor=None, revision: int | None = None,
                   **data) -> EndpointEvent:
    return EndpointEvent.objects.create(endpoint_id=endpoint_id, kind=kind, message=message, actor=actor,
                                        revision=revision, data=data)
