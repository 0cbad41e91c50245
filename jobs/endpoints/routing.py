"""The routing table the gateway reads: which replicas of an endpoint take new
requests. The database is the record; Redis holds a copy (republished on every
change and every reconcile tick) so the gateway's request path never queries it.

Rule: the ready replicas of the serving revision of an active endpoint. Draining
replicas are never listed (their in-flight requests finish; nothing new goes there)."""
from __future__ import annotations

import json
import logging

import redis as redis_lib

from jobs.gateway.directory import routes_key
from jobs.models import Endpoint, Replica

log = logging.getLogger(__name__)
ROUTES_TTL_S = 30  # a table nobody republished (control plane down) expires; the gateway then asks the database


def routes(endpoint_id: int) -> dict | None:
    """{"endpoint_id", "team", "name", "state", "serving_revision", "replicas": [{"id", "url"}]},
    or None for an endpoint that does not exist."""
    endpoint = (Endpoint.objects.filter(pk=endpoint_id).select_related("team")
                .only("pk", "name", "state", "serving_revision", "team__slug").first())
    if endpoint is None:
        return None
    replicas = []
    if endpoint.state == Endpoint.State.ACTIVE and endpoint.serving_revision:
        replicas = [{"id": pk, "url": url} for pk, url in Replica.objects.filter(
            endpoint_id=endpoint_id, state=Replica.State.READY, revision=endpoint.serving_revision)
            .exclude(url="").order_by("pk").values_list("pk", "url")]
    return {"endpoint_id": endpoint.pk, "team": endpoint.team.slug, "name": endpoint.name, "state": endpoint.state,
            "serving_revision": endpoint.serving_revision, "replicas": replicas}


def publish(endpoint_id: int) -> dict | None:
    """Write the endpoint's table to Redis (best effort: a Redis outage must not fail
    the state change that called this; the next tick republishes)."""
    table = routes(endpoint_id)
    from jobs.live import store

    try:
        if table is None:
            store.redis().delete(routes_key(endpoint_id))
        else:
            store.redis().set(routes_key(endpoint_id), json.dumps(table), ex=ROUTES_TTL_S)
    except redis_lib.RedisError as exc:
        log.warning("endpoint %s: routes not published (%s)", endpoint_id, exc)
    return table


def publish_on_commit(endpoint_id: int) -> None:
    from django.db import transaction

    transaction.on_commit(lambda: publish(endpoint_id))
