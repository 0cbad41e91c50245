"""The endpoints gateway (jobs.gateway): token auth and scopes, another team's
endpoint is 404, least-outstanding routing, streaming without buffering, retry only
before the first byte, 429 / 503 with Retry-After, the cold start's demand, the
load it publishes, the playground's session, and a real replica end to end.

The gateway runs under uvicorn in a thread of the test process (it reads the test
database); replicas are stand-ins on localhost (tests.gateway_support) or the real
cpu replica server."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.auth_support import MALFORMED_AUTHORIZATION
from tests.gateway_support import Dropper, FakeReplica, ThreadServer, fake_replicas
from tests.polling import wait_until
from tests.serve_support import replica as real_replica
from tests.serve_support import sse_events

pytestmark = [pytest.mark.timeout(180), pytest.mark.django_db(transaction=True)]


@pytest.fixture
def redis_db():
    from jobs.live.store import redis

    redis().flushdb()
    return redis()


@pytest.fixture
def gateway(redis_db):
    from jobs.gateway.app import Gateway

    app = Gateway(cold_start_wait_s=0.6, queue_wait_s=0.3)
    with ThreadServer(app, lifespan="on") as server:
        server.app = app
        yield server


@pytest.fixture
def endpoint(cast):
    from jobs.models import Endpoint

    return Endpoint.objects.create(team=cast.vision, name="chat", options={"max_concurrent": 2}, serving_revision=1)


def token(user, scope="submit", team=None) -> str:
    from jobs.teams.tokens import service_account_create, token_create

    if team is not None:
        return service_account_create(team=team, name="ci", role="member", scope=scope, expires_at=None,
                                      actor=user)[0]
    return token_create(user=user, name="t", scope=scope)[0]


def publish_routes(redis_db, endpoint, *replicas) -> None:
    """What jobs.endpoints publishes: the routable replicas of the endpoint."""
    from jobs.gateway.directory import routes_key

    redis_db.set(routes_key(endpoint.pk), json.dumps({
        "serving_revision": 1, "state": "active",
        "replicas": [{"id": r.replica_id if hasattr(r, "replica_id") else r[0],
                      "url": r.url if hasattr(r, "url") else r[1]} for r in replicas]}))


def post(gateway, raw_token, path="vision/chat", body=None, **kw):
    headers = {"Authorization": f"Bearer {raw_token}"} if raw_token else {}
    return httpx.post(f"{gateway.url}/endpoints/{path}/v1/completions", headers=headers,
                      json=body or {"prompt": "hi", "stream": True}, timeout=30, **kw)


def stream(gateway, raw_token, path="vision/chat"):
    return httpx.stream("POST", f"{gateway.url}/endpoints/{path}/v1/completions",
                        headers={"Authorization": f"Bearer {raw_token}"}, json={"prompt": "hi", "stream": True},
                        timeout=30)


# ---------------------------------------------------------------- who may call


def test_credentials_scopes_and_team_isolation(gateway, endpoint, cast, redis_db):
    with fake_replicas(FakeReplica(1)) as (replica,):
        replica.release.set()
        publish_routes(redis_db, endpoint, replica)
        assert post(gateway, None).status_code == 401
        refused = post(gateway, "nd_" + "x" * 43)
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        read_only = post(gateway, token(cast.bob, "read"))
        assert read_only.status_code == 403 and "submit scope" in read_only.json()["error"]["message"]
        assert post(gateway, token(cast.vera)).status_code == 403  # a viewer looks, does not call
        other_team = post(gateway, token(cast.charlie))
        unknown = post(gateway, token(cast.bob), path="vision/nope")
        assert other_team.status_code == unknown.status_code == 404
        assert other_team.json() == unknown.json()
        assert post(gateway, token(cast.charlie), path="audio/chat").status_code == 404
        assert post(gateway, token(cast.bob)).status_code == 200
        assert post(gateway, token(cast.alice, team=cast.vision)).status_code == 200  # the team's service account
        assert post(gateway, token(cast.charlie, team=cast.audio)).status_code == 404
        assert replica.requests == 2


def test_every_answer_carries_the_sites_nosniff_and_referrer_policy(gateway, endpoint, cast, redis_db, client):
    """The gateway sent neither; its answers now carry the values the console's own
    answers carry (the same settings): a refusal, a 404 and a streamed replica answer."""
    console = client.get("/login/")
    expected = {name: console.headers[name] for name in ("X-Content-Type-Options", "Referrer-Policy")}
    assert expected["X-Content-Type-Options"] == "nosniff" and expected["Referrer-Policy"]
    with fake_replicas(FakeReplica(1)) as (replica,):
        publish_routes(redis_db, endpoint, replica)
        refused = post(gateway, None)
        not_found = httpx.get(f"{gateway.url}/nowhere", timeout=30)
        with stream(gateway, token(cast.bob)) as streamed:
            events = sse_events(streamed.iter_lines())
            first = next(events)  # the headers came before the replica finished: still streamed
            assert first["choices"][0]["text"] == "r1-first" and not replica.release.is_set()
            replica.release.set()
            assert list(events)[-1] == "[DONE]"
    assert (refused.status_code, not_found.status_code, streamed.status_code) == (401, 404, 200)
    for answer in (refused, not_found, streamed):
        assert {name: answer.headers.get(name) for name in expected} == expected, answer.request.url


@pytest.mark.parametrize("header, wrong", MALFORMED_AUTHORIZATION)
def test_the_authorization_header_is_read_as_the_api_reads_it(gateway, endpoint, cast, redis_db, header, wrong):
    """A working token sent with two spaces (or a tab) was accepted by the gateway
    while the API refused it; both now say the form expected, in the same words."""
    from django.test import Client

    raw = token(cast.bob)
    with fake_replicas(FakeReplica(1)) as (replica,):
        replica.release.set()
        publish_routes(redis_db, endpoint, replica)
        sent = header.format(token=raw)
        refused = httpx.post(f"{gateway.url}/endpoints/vision/chat/v1/completions", json={"prompt": "hi"},
                             headers={"Authorization": sent}, timeout=30)
        assert refused.status_code == 401, refused.text
        error = refused.json()["error"]
        assert error["code"] == "authorization_malformed" and wrong in error["message"]
        assert raw[3:] not in error["message"]  # the secret is not echoed
        assert error["message"] == Client(HTTP_AUTHORIZATION=sent).get("/api/v1/jobs").json()["detail"]
        assert post(gateway, raw).status_code == 200
        lower = httpx.post(f"{gateway.url}/endpoints/vision/chat/v1/completions", json={"prompt": "hi"},
                           headers={"Authorization": f"bearer {raw}"}, timeout=30)
        assert lower.status_code == 200
        assert replica.requests == 2


def test_a_body_that_is_not_a_safe_json_object_is_400_before_any_replica_or_cold_start(gateway, endpoint, cast,
                                                                                        redis_db):
    """Refused by the gateway with the field at fault (jobs.safe_json's rules): a body
    nested 100,000 deep was a 500 from the replica, and garbage woke a scaled-to-zero
    endpoint and waited for its cold start."""
    from jobs.gateway import load

    raw = token(cast.bob)
    bodies = [(b"[" * 100_000 + b"]" * 100_000, None), (b"[1]", None), (b"{nope", None), (b"", None),
              (json.dumps({"prompt": "hi\u0000"}).encode(), "prompt"),
              (json.dumps({"prompt": "hi", "stop": "\ud800"}).encode(), "stop")]

    def send(content: bytes):
        return httpx.post(f"{gateway.url}/endpoints/vision/chat/v1/completions", content=content, timeout=30,
                          headers={"Authorization": f"Bearer {raw}", "Content-Type": "application/json"})

    for content, param in bodies:  # no replica: none of these may ask for one
        answer = send(content)
        assert answer.status_code == 400, (content[:20], answer.text)
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert redis_db.get(load.demand_key(endpoint.pk)) is None
    with fake_replicas(FakeReplica(1)) as (replica,):
        replica.release.set()
        publish_routes(redis_db, endpoint, replica)
        assert [send(content).status_code for content, _ in bodies] == [400] * len(bodies)
        assert replica.requests == 0
        assert send(json.dumps({"prompt": "hi", "stream": True}).encode()).status_code == 200


def test_an_expired_token_is_401_saying_so(gateway, endpoint, cast):
    from datetime import timedelta

    from django.utils import timezone

    from jobs.teams.tokens import token_create

    raw, _ = token_create(user=cast.bob, name="old", scope="submit", expires_at=timezone.now() - timedelta(minutes=1))
    r = post(gateway, raw)
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


def test_the_playground_session_needs_a_trusted_origin_and_the_csrf_token(gateway, endpoint, cast, redis_db,
                                                                          client):
    client.force_login(cast.bob)
    client.get("/")  # sets nothing we rely on: the CSRF cookie is made below
    from django.middleware.csrf import _get_new_csrf_string

    csrf = _get_new_csrf_string()
    session = client.cookies["sessionid"].value
    with fake_replicas(FakeReplica(1)) as (replica,):
        replica.release.set()
        publish_routes(redis_db, endpoint, replica)
        cookies = f"sessionid={session}; csrftoken={csrf}"
        url = f"{gateway.url}/endpoints/vision/chat/v1/completions"
        ok = httpx.post(url, json={"prompt": "hi"}, timeout=30,
                        headers={"Cookie": cookies, "Origin": "http://127.0.0.1:8000", "X-CSRFToken": csrf})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "http://127.0.0.1:8000"
        no_csrf = httpx.post(url, json={"prompt": "hi"}, timeout=30,
                             headers={"Cookie": cookies, "Origin": "http://127.0.0.1:8000"})
        foreign = httpx.post(url, json={"prompt": "hi"}, timeout=30,
                             headers={"Cookie": cookies, "Origin": "http://evil.example", "X-CSRFToken": csrf})
        assert no_csrf.status_code == foreign.status_code == 401
        preflight = httpx.options(url, headers={"Origin": "http://127.0.0.1:8000",
                                                "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 204 and "x-csrftoken" in preflight.headers["access-control-allow-headers"]


# ---------------------------------------------------------------- where requests go


def test_least_outstanding_routing(gateway, endpoint, cast, redis_db):
    raw = token(cast.bob)
    with fake_replicas(FakeReplica(1), FakeReplica(2)) as (a, b):
        publish_routes(redis_db, endpoint, a, b)
        with stream(gateway, raw) as first:
            assert first.headers["x-neurondeck-replica"] == "1"  # a tie goes to the first listed
            with stream(gateway, raw) as second:
                assert second.headers["x-neurondeck-replica"] == "2"  # 1 has one in flight, 2 none
                a.release.set()
                list(first.iter_lines())
                with stream(gateway, raw) as third:
                    assert third.headers["x-neurondeck-replica"] == "1"  # 1 is free again, 2 still busy
                    b.release.set()
                    list(third.iter_lines())
                list(second.iter_lines())
        assert (a.requests, b.requests) == (2, 1)


def test_the_stream_is_not_buffered(gateway, endpoint, cast, redis_db):
    """The first chunk reaches the client while the replica has not yet produced the last."""
    with fake_replicas(FakeReplica(1)) as (replica,):
        publish_routes(redis_db, endpoint, replica)
        with stream(gateway, token(cast.bob)) as r:
            events = sse_events(r.iter_lines())
            first = next(events)
            assert first["choices"][0]["text"] == "r1-first"
            assert not replica.release.is_set()
            replica.release.set()
            assert [e if e == "[DONE]" else e["choices"][0]["text"] for e in events] == ["last", "[DONE]"]


def test_a_replica_that_fails_before_any_byte_is_retried_on_another(gateway, endpoint, cast, redis_db):
    dropper = Dropper()
    try:
        with fake_replicas(FakeReplica(2), FakeReplica(3, mode="draining")) as (good, draining):
            good.release.set()
            publish_routes(redis_db, endpoint, (1, dropper.url), draining)
            with stream(gateway, token(cast.bob)) as r:
                pass
            # Both routable replicas refused: nothing left to try.
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            publish_routes(redis_db, endpoint, (1, dropper.url), draining, (4, "http://127.0.0.1:9"), good)
            gateway.app.directory.routes_cache.clear()
            with stream(gateway, token(cast.bob)) as r:
                assert r.status_code == 200 and r.headers["x-neurondeck-replica"] == "2"
                assert list(sse_events(r.iter_lines()))[-1] == "[DONE]"
            assert dropper.dropped == 2 and draining.requests == 2 and good.requests == 1
    finally:
        dropper.close()


def test_a_replica_breaking_off_mid_stream_is_not_retried(gateway, endpoint, cast, redis_db):
    with fake_replicas(FakeReplica(1, mode="break"), FakeReplica(2)) as (breaking, other):
        other.release.set()
        publish_routes(redis_db, endpoint, breaking, other)
        with pytest.raises(httpx.RemoteProtocolError):
            with stream(gateway, token(cast.bob)) as r:
                assert r.status_code == 200
                list(r.iter_lines())
        assert breaking.requests == 1 and other.requests == 0


def test_saturated_is_429_and_no_ready_replica_is_503_with_retry_after(gateway, endpoint, cast, redis_db):
    from jobs.gateway import load

    raw = token(cast.bob)
    with fake_replicas(FakeReplica(1)) as (replica,):
        publish_routes(redis_db, endpoint, replica)
        with stream(gateway, raw), stream(gateway, raw):  # max_concurrent 2 per replica
            full = post(gateway, raw)
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["type"] == "rate_limit_error"
            wait_until(lambda: redis_db.hgetall(load.inflight_key(endpoint.pk)),
                       until=lambda h: h.get(b"1") == b"2" and h.get(b"waiting") == b"0",
                       message="2 in flight on replica 1, none waiting")
            replica.release.set()
    publish_routes(redis_db, endpoint)
    gateway.app.directory.routes_cache.clear()
    cold = post(gateway, raw)
    assert cold.status_code == 503 and cold.headers["retry-after"] == "10"
    assert "no replica of this endpoint is ready" in cold.json()["error"]["message"]
    assert float(redis_db.get(load.demand_key(endpoint.pk))) > time.time() - 60


def test_a_request_during_a_cold_start_waits_for_the_first_replica(gateway, endpoint, cast, redis_db):
    from jobs.gateway import load

    gateway.app.cold_start_wait_s = 30
    pubsub = redis_db.pubsub()
    pubsub.subscribe(load.DEMAND_CHANNEL)
    with fake_replicas(FakeReplica(1)) as (replica,):
        replica.release.set()
        answers = []
        caller = threading.Thread(target=lambda: answers.append(post(gateway, token(cast.bob))))
        caller.start()
        # The demand reaches the control plane: the key, the channel, the waiting count.
        wait_until(lambda: redis_db.get(load.demand_key(endpoint.pk)), message="the demand key")
        wait_until(lambda: redis_db.hget(load.inflight_key(endpoint.pk), "waiting"), until=lambda v: v == b"1",
                   message="one request waiting")
        assert wait_until(lambda: pubsub.get_message(timeout=0.1), until=lambda m: m and m["type"] == "message",
                          message="the demand message")["data"] == str(endpoint.pk).encode()
        assert not answers
        publish_routes(redis_db, endpoint, replica)  # the control plane started one
        caller.join(timeout=60)
    assert answers[0].status_code == 200 and replica.requests == 1


def test_routes_come_from_the_database_when_none_are_published(gateway, endpoint, cast, redis_db):
    from jobs.models import Job, Kind, Replica

    with fake_replicas(FakeReplica(1)) as (replica,):
        replica.release.set()
        for state, revision in (("ready", 1), ("draining", 1), ("ready", 0)):
            job = Job.objects.create(team=cast.vision, user=cast.bob, kind=Kind.SERVE, spec={})
            row = Replica.objects.create(endpoint=endpoint, job=job, revision=revision, state=state, url=replica.url)
        r = post(gateway, token(cast.bob))
        assert r.status_code == 200 and r.headers["x-neurondeck-replica"] == str(
            Replica.objects.get(state="ready", revision=1).pk)
        assert row.pk != int(r.headers["x-neurondeck-replica"])


def test_finished_requests_are_published_for_the_autoscaler_and_the_page(gateway, endpoint, cast, redis_db):
    from jobs.gateway import load

    with fake_replicas(FakeReplica(7)) as (replica,):
        replica.release.set()
        publish_routes(redis_db, endpoint, replica)
        assert post(gateway, token(cast.bob)).status_code == 200
        entries = wait_until(lambda: redis_db.xrange(load.requests_key(endpoint.pk)), message="a request entry")
    entry = entries[0][1]
    assert entry[b"replica"] == b"7" and entry[b"status"] == b"200" and entry[b"tokens"] == b"2"
    assert float(entry[b"ttft_ms"]) >= 0 and float(entry[b"duration_ms"]) >= float(entry[b"ttft_ms"])
    assert float(redis_db.get(load.last_request_key(endpoint.pk))) > time.time() - 60


# ---------------------------------------------------------------- a real replica


def test_a_real_replica_streams_token_by_token_through_the_gateway(gateway, endpoint, cast, redis_db,
                                                                   tiny_model_dir, tmp_path):
    with real_replica(tiny_model_dir, tmp_path, max_batch_size=4) as r:
        publish_routes(redis_db, endpoint, (11, r.url))
        request = {"prompt": "hello", "max_tokens": 20, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{gateway.url}/endpoints/vision/chat/v1/completions", json=request, timeout=60,
                          headers={"Authorization": f"Bearer {token(cast.bob)}"}) as s:
            events = list(sse_events(s.iter_lines()))
        direct = httpx.post(f"{r.url}/v1/completions", json={**request, "stream": False}, timeout=60).json()
        bad = post(gateway, token(cast.bob), body={"prompt": "hi", "max_tokens": 999})
    assert events[-1] == "[DONE]"
    assert len(events) == 21  # one chunk per token
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == direct["choices"][0]["text"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"  # the replica's answer, passed on


# ---------------------------------------------------------------- the client to replicas


def test_the_upstream_pool_reuses_connections_and_survives_one_the_replica_closed():
    """Answers on one kept-alive connection; a replica that closed an idle connection
    costs a fresh one, not a failed request; a refused connection says nothing was sent."""
    import asyncio

    from jobs.gateway.upstream import Pool, UpstreamError

    async def scenario() -> tuple[list, int, bool]:
        accepted = []

        async def handle(reader, writer):
            accepted.append(writer)
            for _ in range(2 if len(accepted) == 1 else 10):  # the first connection closes after 2 answers
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                body = await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
                             b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = Pool(connect_timeout=2, read_timeout=10, keepalive_expiry=20)
        answers = []
        try:
            for n in range(4):
                response = await pool.request(url, "POST", "/echo", b"body-%d" % n, [("content-type", "text/plain")])
                answers.append((response.status_code, response.header(b"content-type"), await response.read()))
                response.close()
            try:
                await pool.request("http://127.0.0.1:9", "POST", "/echo", b"", [])
                refused_sent_nothing = False
            except UpstreamError as exc:
                refused_sent_nothing = exc.sent_nothing
        finally:
            pool.close()
            server.close()
        return answers, len(accepted), refused_sent_nothing

    answers, connections, refused_sent_nothing = asyncio.run(scenario())
    assert answers == [(200, "text/plain", b"body-%d" % n) for n in range(4)]
    assert connections == 2  # two answers on the first connection, the rest on a second one
    assert refused_sent_nothing
