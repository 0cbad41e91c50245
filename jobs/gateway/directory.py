"""Who may call which endpoint, and where its ready replicas are: read from the
database (and the routes key endpoints publishes in Redis), cached briefly so that
a request costs no query.

- A token's grant is cached by its digest for TOKEN_TTL_S: a revoked token stops
  working within that time (its expiry is checked on every request).
- An endpoint by (team slug, name) is cached for ENDPOINT_TTL_S.
- An endpoint's routes (ready replicas of its serving revision) for ROUTES_TTL_S:
  endpoints keeps a draining replica up DRAIN_ROUTE_GRACE_S (3 s) after it leaves
  the routes, longer than this, so no new request reaches a replica that is stopping.

The ORM runs in one thread of the directory's own (its database connection lives
there and is closed with the gateway); concurrent misses of one key share one load."""
from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from django.db import close_old_connections, connections

from jobs.gateway.balancer import Target
from jobs.models import ApiToken, Endpoint, Membership, Replica, Role
from jobs.teams import tokens

TOKEN_TTL_S = 5.0
ENDPOINT_TTL_S = 1.0
ROUTES_TTL_S = 0.5
CALLER_ROLES = (Role.MEMBER, Role.MANAGER)  # a viewer only looks; calling spends the team's cores


def routes_key(endpoint_id: int) -> str:
    """JSON {"serving_revision", "state", "replicas": [{"id", "url"}]}, written by jobs.endpoints."""
    return f"nd:endpoint:{endpoint_id}:routes"


@dataclass(frozen=True)
class Grant:
    """What a credential may do: the teams whose endpoints it may call, and its scope."""

    user_id: int
    is_staff: bool
    team_ids: frozenset[int]
    viewer_team_ids: frozenset[int]  # teams it may see but not call (role viewer): 403, not 404
    scope: str
    expires_at: float | None  # unix time

    def may_call(self, team_id: int) -> bool:
        return self.is_staff or team_id in self.team_ids


@dataclass(frozen=True)
class EndpointInfo:
    id: int
    team_id: int
    max_concurrent: int | None


class TtlCache:
    """key -> value for `ttl` seconds; one load at a time per key."""

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl, self.max_entries = ttl, max_entries
        self._values: dict[Any, tuple[float, Any]] = {}
        self._loading: dict[Any, asyncio.Future] = {}

    async def get(self, key: Any, load: Callable[[], Awaitable[Any]]) -> Any:
        hit = self._values.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            value = await load()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must log it
            raise
        else:
            future.set_result(value)
        finally:
            self._loading.pop(key, None)
        if len(self._values) >= self.max_entries:
            self._values.clear()
        self._values[key] = (time.monotonic() + self.ttl, value)
        return value

    def clear(self) -> None:
        self._values.clear()


# ---------------------------------------------------------------- database reads (worker threads)


def grant_for_token(raw: str, ip: str | None) -> Grant | None:
    """The grant of API token `raw`, or None if it is unknown or its user inactive.
    Raises tokens.TokenExpired for an expired token."""
    close_old_connections()
    token = tokens.token_authenticate(raw, ip=ip)
    if token is None:
        return None
    user = token.user
    memberships = Membership.objects.filter(user_id=user.pk)
    if token.team_id is not None:  # a service account: its own team only
        memberships = memberships.filter(team_id=token.team_id)
    callers, viewers = _split_roles(memberships)
    return Grant(user_id=user.pk, is_staff=user.is_staff and token.team_id is None, team_ids=callers,
                 viewer_team_ids=viewers, scope=token.scope,
                 expires_at=token.expires_at.timestamp() if token.expires_at else None)


def _split_roles(memberships) -> tuple[frozenset[int], frozenset[int]]:
    rows = list(memberships.values_list("team_id", "role"))
    return (frozenset(t for t, role in rows if role in CALLER_ROLES),
            frozenset(t for t, role in rows if role not in CALLER_ROLES))


def grant_for_session(session_key: str) -> Grant | None:
    """A signed-in browser session's grant (the endpoint page's playground): the
    user's teams, with the manage scope (a session is the person)."""
    from importlib import import_module

    from django.conf import settings
    from django.contrib.auth import get_user_model

    close_old_connections()
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key=session_key)
    user_id = store.get("_auth_user_id")
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first() if user_id else None
    if user is None:
        return None
    callers, viewers = _split_roles(Membership.objects.filter(user_id=user.pk))
    return Grant(user_id=user.pk, is_staff=user.is_staff, team_ids=callers, viewer_team_ids=viewers,
                 scope=ApiToken.Scope.MANAGE, expires_at=None)


def endpoint_by_name(team_slug: str, name: str) -> EndpointInfo | None:
    close_old_connections()
    row = Endpoint.objects.filter(team__slug=team_slug, name=name, state=Endpoint.State.ACTIVE).values(
        "pk", "team_id", "options").first()
    if row is None:
        return None
    limit = (row["options"] or {}).get("max_concurrent")
    return EndpointInfo(id=row["pk"], team_id=row["team_id"],
                        max_concurrent=limit if isinstance(limit, int) and limit > 0 else None)


def routes_from_db(endpoint_id: int) -> list[Target]:
    """Ready replicas of the serving revision of an active endpoint (the same rule as
    the routes key)."""
    close_old_connections()
    endpoint = Endpoint.objects.filter(pk=endpoint_id, state=Endpoint.State.ACTIVE).values("serving_revision").first()
    if endpoint is None:
        return []
    rows = Replica.objects.filter(endpoint_id=endpoint_id, state=Replica.State.READY,
                                  revision=endpoint["serving_revision"]).exclude(url="").order_by("pk")
    return [Target(pk, url) for pk, url in rows.values_list("pk", "url")]


def parse_routes(raw: bytes | str | None) -> list[Target] | None:
    """The routes key's replicas; None if the key is missing or unreadable."""
    if not raw:
        return None
    try:
        data = json.loads(raw)
        if data.get("state", "active") != "active":
            return []
        return [Target(int(r["id"]), str(r["url"])) for r in data.get("replicas", []) if r.get("url")]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


class Directory:
    """The cached lookups the gateway makes per request."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-db")
        self.grants = TtlCache(TOKEN_TTL_S)
        self.sessions = TtlCache(TOKEN_TTL_S)
        self.endpoints = TtlCache(ENDPOINT_TTL_S)
        self.routes_cache = TtlCache(ROUTES_TTL_S)

    def _orm(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    async def close(self) -> None:
        await self._orm(connections.close_all)
        self._db.shutdown(wait=False)

    async def grant(self, raw: str, ip: str | None) -> Grant | None:
        grant = await self.grants.get(ApiToken.hash(raw), lambda: self._orm(grant_for_token, raw, ip))
        if grant is not None and grant.expires_at is not None and grant.expires_at <= time.time():
            self.grants.clear()
            return await self._orm(grant_for_token, raw, ip)  # raises TokenExpired
        return grant

    async def session(self, session_key: str) -> Grant | None:
        return await self.sessions.get(session_key, lambda: self._orm(grant_for_session, session_key))

    async def endpoint(self, team_slug: str, name: str) -> EndpointInfo | None:
        return await self.endpoints.get((team_slug, name), lambda: self._orm(endpoint_by_name, team_slug, name))

    async def routes(self, endpoint_id: int, *, fresh: bool = False) -> list[Target]:
        async def load() -> list[Target]:
            published = parse_routes(await self.redis.get(routes_key(endpoint_id)))
            if published is not None:
                return published
            return await self._orm(routes_from_db, endpoint_id)

        if fresh:
            return await load()
        return await self.routes_cache.get(endpoint_id, load)
