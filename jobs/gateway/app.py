"""The gateway: `/endpoints/<team>/<endpoint>/v1/{completions,chat/completions,models}`
proxied to one of the endpoint's ready replicas. A plain ASGI app run by uvicorn
(webapp/Procfile `gateway`); see README "Inference endpoints" for why.

Per request:
1. Credentials: `Authorization: Bearer nd_…` (an API token; POST needs the submit
   scope, GET read), or the signed-in session of the endpoint page's playground
   (session cookie + `X-CSRFToken` equal to the csrftoken cookie + a trusted Origin).
   None or unknown: 401; a header not of the form `Bearer <token>` a 401 saying the
   form expected (tokens.bearer_token, the API's rule). A scope too small: 403. An endpoint the caller's teams do
   not own (or no such endpoint): 404, the same answer, so names do not leak.
2. A replica: the least outstanding among the ready replicas of the serving revision
   (balancer), below the endpoint's max_concurrent. All at max_concurrent: wait up
   to ENDPOINT_QUEUE_WAIT_S for one to free up, then 429 + Retry-After. None ready:
   publish the demand (a cold start), wait up to ENDPOINT_COLD_START_WAIT_S for one,
   then 503 + Retry-After.
3. Forward, and wait for the replica's first body bytes before answering the client.
   A replica that fails before sending anything (connection refused or reset, it
   died, it answered 503 draining or 429) is skipped and the request goes to another;
   once bytes have gone to the client it is never retried: a replica dying mid-stream
   breaks the client's stream (the connection closes without the end of the chunked
   body, which HTTP clients report as an error).
4. Stream the body through chunk by chunk as it arrives (no buffering); a client
   that goes away closes the upstream request, which cancels the generation.

Every answer (the gateway's own, a replica's, a stream) carries the site's
X-Content-Type-Options and Referrer-Policy headers, from the same Django settings
the console's SecurityMiddleware reads.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from http.cookies import CookieError, SimpleCookie
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
django.setup()

import redis.asyncio as aioredis  # noqa: E402
from django.conf import settings  # noqa: E402

from jobs import safe_json  # noqa: E402
from jobs.gateway.balancer import Balancer, Target  # noqa: E402
from jobs.gateway.directory import Directory, EndpointInfo, Grant  # noqa: E402
from jobs.gateway.load import LoadBoard  # noqa: E402
from jobs.gateway.upstream import Pool, Response, UpstreamError  # noqa: E402
from jobs.teams import tokens  # noqa: E402

log = logging.getLogger("jobs.gateway")

PATH = re.compile(r"^/endpoints/(?P<team>[A-Za-z0-9_-]{1,100})/(?P<name>[A-Za-z0-9_-]{1,100})"
                  r"/(?P<rest>v1/(?:chat/completions|completions|models))/?$")
METHODS = {"v1/completions": "POST", "v1/chat/completions": "POST", "v1/models": "GET"}
MAX_BODY = 4 << 20
TEXT_FIELD = re.compile(rb'"(?:text|content)":\s*"(?!")')  # a non-empty text in a completion or chat chunk
COLD_RETRY_AFTER_S = 10
ROUTE_POLL_S = 0.2
FORWARD_HEADERS = {b"content-type", b"accept", b"user-agent"}
RETURN_HEADERS = {b"content-type", b"content-length", b"cache-control", b"x-accel-buffering"}
CORS_ALLOW_HEADERS = "authorization, content-type, x-csrftoken"
CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 300.0  # for the answer's headers, then between two pieces of its body
KEEPALIVE_S = 20.0  # an idle connection to a replica is reused this long (replicas keep it 30 s)


def _security_headers() -> list[tuple[bytes, bytes]]:
    """The headers Django's SecurityMiddleware gives the console's answers that also
    apply to an API answer, with the values of the same settings."""
    headers = []
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        headers.append((b"x-content-type-options", b"nosniff"))
    policy = settings.SECURE_REFERRER_POLICY
    if policy:
        value = policy if isinstance(policy, str) else ",".join(policy)
        headers.append((b"referrer-policy", value.encode()))
    return headers


SECURITY_HEADERS = _security_headers()


class Refusal(Exception):
    """An answer the gateway gives itself (OpenAI's error shape)."""

    def __init__(self, status: int, message: str, kind: str, *, code: str | None = None,
                 headers: dict[str, str] | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}


class _FirstByteFailure(Exception):
    """The replica failed before sending anything: another one may take the request."""


def _with_security_headers(send: Any) -> Any:
    """`send` adding SECURITY_HEADERS to the start of every answer."""

    async def secured(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
        await send(message)

    return secured


def _headers(scope: dict) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers", [])}


def _client_ip(scope: dict) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


class Gateway:
    def __init__(self, *, redis: Any = None, cold_start_wait_s: float | None = None,
                 queue_wait_s: float | None = None) -> None:
        self.redis = redis or aioredis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=2)
        self.directory = Directory(self.redis)
        self.balancer = Balancer()
        self.board = LoadBoard(self.redis)
        self.cold_start_wait_s = settings.ENDPOINT_COLD_START_WAIT_S if cold_start_wait_s is None \
            else cold_start_wait_s
        self.queue_wait_s = settings.ENDPOINT_QUEUE_WAIT_S if queue_wait_s is None else queue_wait_s
        self.trusted_origins = {o.rstrip("/") for o in settings.CSRF_TRUSTED_ORIGINS}
        self.client: Pool | None = None
        self._flusher: asyncio.Task | None = None

    # ------------------------------------------------------------ ASGI

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, _with_security_headers(send))

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def start(self) -> None:
        if self.client is None:
            self.client = Pool(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                               keepalive_expiry=KEEPALIVE_S)
            self._flusher = asyncio.get_running_loop().create_task(self.board.run())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        await self.board.flush()
        if self.client is not None:
            self.client.close()
        await self.directory.close()
        await self.redis.aclose()

    async def _http(self, scope: dict, receive: Any, send: Any) -> None:
        if self.client is None:
            self.start()
        headers = _headers(scope)
        cors = self._cors(headers)
        if scope["path"] == "/health":
            await _send_json(send, 200, {"status": "ok"})
            return
        match = PATH.match(scope["path"])
        try:
            if match is None:
                raise Refusal(404, "No such endpoint", "not_found")
            if scope["method"] == "OPTIONS" and cors:
                await _send(send, 204, b"", {**cors, "access-control-allow-methods": "GET, POST",
                                             "access-control-allow-headers": CORS_ALLOW_HEADERS,
                                             "access-control-max-age": "600"})
                return
            if scope["method"] != METHODS[match["rest"]]:
                raise Refusal(405, f"use {METHODS[match['rest']]} for /{match['rest']}", "invalid_request_error",
                              headers={"allow": METHODS[match["rest"]]})
            grant = await self._authenticate(scope, headers)
            needed = tokens.Scope.READ if scope["method"] == "GET" else tokens.Scope.SUBMIT
            if tokens.SCOPE_RANK[grant.scope] < tokens.SCOPE_RANK[needed]:
                raise Refusal(403, f"This API token has the {grant.scope} scope; calling an endpoint needs the "
                                   f"{needed} scope.", "permission_error", code="token_scope")
            endpoint = await self.directory.endpoint(match["team"], match["name"])
            if endpoint is not None and endpoint.team_id in grant.viewer_team_ids and not grant.is_staff:
                raise Refusal(403, "your role in this endpoint's team is viewer; calling it needs member",
                              "permission_error", code="role")
            if endpoint is None or not grant.may_call(endpoint.team_id):
                raise Refusal(404, "No such endpoint", "not_found")
            body = await _read_body(receive)
            if scope["method"] == "POST":
                _check_content_type(headers)
                _check_json_object(body)
            await self._forward(scope, receive, send, endpoint, match["rest"], body, headers, cors)
        except Refusal as refusal:
            await _send_json(send, refusal.status, {"error": {"message": refusal.message, "type": refusal.kind,
                                                              "param": refusal.param, "code": refusal.code}},
                             {**cors, **refusal.headers})

    def _cors(self, headers: dict[bytes, bytes]) -> dict[str, str]:
        origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/")
        if origin and origin in self.trusted_origins:
            return {"access-control-allow-origin": origin, "access-control-allow-credentials": "true",
                    "vary": "Origin"}
        return {}

    async def _authenticate(self, scope: dict, headers: dict[bytes, bytes]) -> Grant:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        try:
            if auth:
                grant = await self.directory.grant(tokens.bearer_token(auth), _client_ip(scope))
            else:
                grant = await self._session_grant(headers)
        except tokens.TokenRefused as exc:
            raise Refusal(401, str(exc), "authentication_error", code=exc.code,
                          headers={"www-authenticate": 'Bearer realm="endpoints", error="invalid_token"'}) from exc
        if grant is None:
            message = ("Unauthorized: this token is not valid" if auth else
                       "Authentication required: send Authorization: Bearer <token> with an API token of the "
                       "endpoint's team (from the Tokens page)")
            raise Refusal(401, message, "authentication_error",
                          headers={"www-authenticate": 'Bearer realm="endpoints"'})
        return grant

    async def _session_grant(self, headers: dict[bytes, bytes]) -> Grant | None:
        """The playground: a session cookie counts only with a trusted Origin and the
        CSRF cookie's value echoed in X-CSRFToken (what a cross-site form cannot send)."""
        if not self._cors(headers):
            return None
        try:
            cookies = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
        except CookieError:
            return None
        session = cookies.get(settings.SESSION_COOKIE_NAME)
        csrf = cookies.get(settings.CSRF_COOKIE_NAME)
        echoed = headers.get(b"x-csrftoken", b"").decode("latin-1")
        if session is None or csrf is None or not echoed or echoed != csrf.value:
            return None
        return await self.directory.session(session.value)

    # ------------------------------------------------------------ forwarding

    async def _forward(self, scope: dict, receive: Any, send: Any, endpoint: EndpointInfo, rest: str, body: bytes,
                       headers: dict[bytes, bytes], cors: dict[str, str]) -> None:
        arrived = time.perf_counter()
        self.board.arrived(endpoint.id)
        tried: set[int] = set()
        while True:
            target = await self._pick(endpoint, tried)
            queue_ms = (time.perf_counter() - arrived) * 1000
            self.balancer.acquire(target)
            self.board.started(endpoint.id, target.replica_id)
            try:
                upstream, first = await self._open(target, scope["method"], rest, body, headers)
            except _FirstByteFailure as exc:
                self.balancer.release(target)
                self.board.ended(endpoint.id, target.replica_id)
                log.info("endpoint %s: replica %s refused or failed before answering (%s); trying another",
                         endpoint.id, target.replica_id, exc)
                tried.add(target.replica_id)
                self.directory.routes_cache.clear()
                continue
            first_at: list[float] = []
            status, tokens_out = 0, 0
            try:
                status, tokens_out = await self._relay(receive, send, upstream, first, target, cors, first_at)
            finally:
                upstream.close()
                self.balancer.release(target)
                self.board.ended(endpoint.id, target.replica_id)
                now = time.perf_counter()
                self.board.finished(endpoint.id, replica_id=target.replica_id, status=status,
                                    ttft_ms=(first_at[0] - arrived) * 1000 if first_at else None,
                                    duration_ms=(now - arrived) * 1000, queue_ms=queue_ms, tokens=tokens_out)
            return

    async def _pick(self, endpoint: EndpointInfo, tried: set[int]) -> Target:
        """A replica for this request, waiting for a cold start or for capacity (see
        the module docstring); raises Refusal when none comes in time."""
        targets = await self.directory.routes(endpoint.id)
        if not targets:
            targets = await self._await_cold_start(endpoint)
        deadline = time.monotonic() + self.queue_wait_s
        waiting = False
        try:
            while True:
                target = self.balancer.choose(targets, max_concurrent=endpoint.max_concurrent, exclude=tried)
                if target is not None:
                    return target
                if targets and all(t.replica_id in tried for t in targets):
                    fresh = await self.directory.routes(endpoint.id, fresh=True)
                    if not [t for t in fresh if t.replica_id not in tried]:
                        raise Refusal(503, "no replica of this endpoint could take the request", "unavailable",
                                      code="no_replica", headers={"retry-after": "1"})
                    targets = fresh
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Refusal(429, "every replica of this endpoint is at its max_concurrent requests",
                                  "rate_limit_error", code="saturated", headers={"retry-after": "1"})
                if not waiting:
                    waiting = True
                    self.board.waiting(endpoint.id, +1)
                try:
                    await asyncio.wait_for(self.balancer.freed.wait(), timeout=min(left, ROUTE_POLL_S))
                except asyncio.TimeoutError:
                    targets = await self.directory.routes(endpoint.id)
        finally:
            if waiting:
                self.board.waiting(endpoint.id, -1)

    async def _await_cold_start(self, endpoint: EndpointInfo) -> list[Target]:
        """No replica is ready: tell the control plane (demand), wait for one."""
        deadline = time.monotonic() + self.cold_start_wait_s
        self.board.waiting(endpoint.id, +1)
        try:
            while True:
                if self.board.no_replica(endpoint.id):
                    _wake(endpoint.id)
                targets = await self.directory.routes(endpoint.id, fresh=True)
                if targets:
                    return targets
                if time.monotonic() >= deadline:
                    raise Refusal(503, f"no replica of this endpoint is ready (waited {self.cold_start_wait_s:g} s "
                                       f"for one to start)", "unavailable", code="no_ready_replica",
                                  headers={"retry-after": str(COLD_RETRY_AFTER_S)})
                await asyncio.sleep(ROUTE_POLL_S)
        finally:
            self.board.waiting(endpoint.id, -1)

    async def _open(self, target: Target, method: str, rest: str, body: bytes,
                    headers: dict[bytes, bytes]) -> tuple[Response, bytes]:
        """Send the request and read its first body bytes; _FirstByteFailure if the
        replica fails before any, or refuses (draining, at max_concurrent)."""
        forwarded = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers.items() if k in FORWARD_HEADERS]
        try:
            upstream = await self.client.request(target.url, method, f"/{rest}", body, forwarded)
        except UpstreamError as exc:
            raise _FirstByteFailure(str(exc)) from exc
        if upstream.status_code == 429 or (upstream.status_code == 503
                                           and upstream.header(b"x-replica-state") == "draining"):
            upstream.close()
            raise _FirstByteFailure(f"HTTP {upstream.status_code}")
        try:
            first = await upstream.next_chunk() or b""
        except UpstreamError as exc:
            upstream.close()
            raise _FirstByteFailure(str(exc)) from exc
        return upstream, first

    async def _relay(self, receive: Any, send: Any, upstream: Response, first: bytes, target: Target,
                     cors: dict[str, str], first_at: list[float]) -> tuple[int, int]:
        """Stream the replica's answer to the client; returns (status recorded, tokens).
        Appends the time the first bytes went out to `first_at`. Raises if the replica
        broke off mid-answer (status 0 is recorded then)."""
        out_headers = [(k, v) for k, v in upstream.headers if k.lower() in RETURN_HEADERS]
        out_headers.append((b"x-neurondeck-replica", str(target.replica_id).encode()))
        out_headers += [(k.encode(), v.encode()) for k, v in cors.items()]
        await send({"type": "http.response.start", "status": upstream.status_code, "headers": out_headers})
        streaming = upstream.header(b"content-type").startswith("text/event-stream")
        counter = _TokenCounter(streaming)
        first_at.append(time.perf_counter())
        if first:
            counter.see(first)
            await send({"type": "http.response.body", "body": first, "more_body": True})

        async def pump() -> None:
            while (chunk := await upstream.next_chunk()) is not None:
                counter.see(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(_disconnected(receive))
        await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        watching.cancel()
        if not pumping.done():  # the client went away: stop reading (closing cancels the generation)
            pumping.cancel()
            return 499, counter.tokens()
        error = pumping.exception()
        if error is not None:
            # The replica broke off mid-answer: the client must see a failed response,
            # not a short one; raising makes uvicorn drop the connection.
            log.warning("replica %s broke off a response: %r", target.replica_id, error)
            raise error
        return upstream.status_code, counter.tokens()


class _TokenCounter:
    """Tokens of an answer: text chunks of a stream (one per token on our servers),
    or usage.completion_tokens of a whole answer."""

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self.events = 0
        self.body = bytearray()

    def see(self, chunk: bytes) -> None:
        if self.streaming:
            self.events += len(TEXT_FIELD.findall(chunk))
        elif len(self.body) < 1 << 20:
            self.body += chunk

    def tokens(self) -> int:
        if self.streaming:
            return self.events
        try:
            return int(json.loads(bytes(self.body))["usage"]["completion_tokens"])
        except (ValueError, KeyError, TypeError):
            return 0


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_body(receive: Any) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refusal(400, "the client went away", "invalid_request_error")
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            raise Refusal(413, f"the body is larger than {MAX_BODY >> 20} MB", "invalid_request_error")
        if not message.get("more_body"):
            return bytes(body)


def _check_content_type(headers: dict[bytes, bytes]) -> None:
    """A body is read as JSON only when its Content-Type says so, as in the API: a
    form's or text/plain body is a 415 naming the header. A request without the
    header is read as JSON, as OpenAI-compatible servers read it."""
    raw = headers.get(b"content-type", b"").decode("latin-1")
    media_type = raw.split(";", 1)[0].strip().lower()
    if media_type and not safe_json.is_json_type(media_type):
        raise Refusal(415, f"the body's Content-Type is {media_type}; send application/json",
                      "invalid_request_error", param="Content-Type")


def _check_json_object(body: bytes) -> None:
    """A request body is a JSON object, read by the one parser hostile JSON meets
    everywhere (jobs.safe_json: depth, NUL, lone surrogates, NaN): refused here with
    the field at fault, before a replica is chosen or a cold start asked for, so
    garbage never wakes an endpoint nor reaches a replica. The replica checks the
    request's fields itself."""
    try:
        value = safe_json.loads(body)
    except safe_json.JSONInputError as exc:
        raise Refusal(400, exc.sentence("the body"), "invalid_request_error", param=exc.field) from None
    if not isinstance(value, dict):
        raise Refusal(400, "the body must be a JSON object", "invalid_request_error")


async def _send(send: Any, status: int, body: bytes, headers: dict[str, str]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Any, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
    await _send(send, status, json.dumps(payload).encode(), {"content-type": "application/json", **(headers or {})})


def _wake(endpoint_id: int) -> None:
    """Ask the control plane to start a replica now (Celery task jobs.endpoint_wake),
    in a thread: sending is network I/O. The demand key is the fallback it polls."""

    def send_task() -> None:
        try:
            from webapp.celery import app as celery_app

            celery_app.send_task("jobs.endpoint_wake", args=[endpoint_id])
        except Exception as exc:  # noqa: BLE001 - the demand key still says it
            log.warning("endpoint %s: waking the control plane failed: %r", endpoint_id, exc)

    asyncio.get_running_loop().run_in_executor(None, send_task)


app = Gateway()
