"""A careless client or an attacker at the stable URL: the gateway (in a thread of
this test) in front of a real cpu replica of the tiny model. Bad bodies, bad fields,
bad paths, methods and credentials are each a 4xx in the OpenAI error shape, naming
the field when one field is wrong; never a 5xx, never a hang; another team's
endpoint is the same 404 as no endpoint at all."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.gateway_support import ThreadServer
from tests.serve_support import replica as real_replica

pytestmark = [pytest.mark.timeout(300), pytest.mark.django_db(transaction=True)]

GOOD = {"prompt": "hi", "max_tokens": 4, "temperature": 0}
GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
# (path, one field made bad): the replica answers 400 naming that field
BAD_FIELDS = [
    ("completions", "prompt", None), ("completions", "prompt", 12), ("completions", "prompt", {"a": 1}),
    ("completions", "max_tokens", -1), ("completions", "max_tokens", 2 ** 80),
    ("completions", "max_tokens", "4"), ("completions", "max_tokens", 1.5), ("completions", "max_tokens", True),
    ("completions", "max_tokens", 10 ** 6), ("completions", "temperature", "hot"), ("completions", "temperature", -1),
    ("completions", "temperature", 1e308), ("completions", "stream", "yes"),
    ("chat/completions", "messages", []), ("chat/completions", "messages", "hi"),
    ("chat/completions", "messages", [{"role": "user"}]), ("chat/completions", "messages", [{"content": 3}]),
    ("chat/completions", "messages", [{"role": "wizard", "content": "hi"}]),
    ("chat/completions", "max_tokens", -5), ("completions", "prompt", "\ud800"),
    ("chat/completions", "messages", [{"role": "user", "content": "x\udfff"}]),
]
BAD_BODIES = [b"", b"null", b"[]", b"42", b'"text"', b"{", b"\xff\xfe{}", b"[" * 100_000, b'{"prompt": "\\ud800"}',
              b'{"prompt": "hi", "max_tokens": NaN}', b'{"prompt": "hi", "max_tokens": 1e999}',
              json.dumps({"prompt": "x" * 200_000}).encode()]


@pytest.fixture
def setup(cast, tiny_model_dir, tmp_path):
    from jobs.gateway.app import Gateway
    from jobs.gateway.directory import routes_key
    from jobs.live.store import redis
    from jobs.models import Endpoint
    from jobs.teams.tokens import token_create

    redis().flushdb()
    vision = Endpoint.objects.create(team=cast.vision, name="chat", options={"max_concurrent": 8},
                                     serving_revision=1)
    Endpoint.objects.create(team=cast.audio, name="speech", options={"max_concurrent": 8}, serving_revision=1)
    with real_replica(tiny_model_dir, tmp_path, max_batch_size=4, max_seq_len=64) as r:
        redis().set(routes_key(vision.pk), json.dumps({"serving_revision": 1, "state": "active",
                                                        "replicas": [{"id": 1, "url": r.url}]}))
        with ThreadServer(Gateway(cold_start_wait_s=0.5, queue_wait_s=0.3), lifespan="on") as gateway:
            yield gateway.url, token_create(user=cast.bob, name="t", scope="submit")[0], cast


def call(url: str, method: str, path: str, token: str | None, *, content: bytes | None = None,
         body=None, headers: dict | None = None) -> httpx.Response:
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {}),
            **(headers or {})}
    if body is not None:
        content = json.dumps(body).encode()
    return httpx.request(method, f"{url}{path}", content=content, headers=sent, timeout=60)


def assert_refused(response: httpx.Response, what: str, status: int | None = None) -> dict:
    assert 400 <= response.status_code < 500, f"{what} -> {response.status_code} {response.text[:200]}"
    if status is not None:
        assert response.status_code == status, f"{what} -> {response.status_code} {response.text[:200]}"
    error = response.json()["error"]
    assert error["message"] and error["type"], (what, error)
    return error


def test_a_bad_field_is_a_400_naming_it(setup):
    url, token, _ = setup
    wrong = []
    for path, field, value in BAD_FIELDS:
        body = {**(GOOD_CHAT if path.startswith("chat") else GOOD), field: value}
        response = call(url, "POST", f"/endpoints/vision/chat/v1/{path}", token, body=body)
        param = response.json().get("error", {}).get("param") if response.status_code == 400 else None
        if response.status_code != 400 or not (param == field or (param or "").startswith((f"{field}[", f"{field}."))):
            wrong.append((path, field, str(value)[:40], response.status_code, response.text[:160]))
    assert wrong == []
    assert call(url, "POST", "/endpoints/vision/chat/v1/completions", token, body=GOOD).status_code == 200


def test_a_body_that_is_not_a_json_object_is_a_400(setup):
    url, token, _ = setup
    wrong = []
    for raw in BAD_BODIES:
        response = call(url, "POST", "/endpoints/vision/chat/v1/completions", token, content=raw)
        if not 400 <= response.status_code < 500 or "error" not in response.json():
            wrong.append((raw[:30], len(raw), response.status_code, response.text[:160]))
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        response = call(url, "POST", "/endpoints/vision/chat/v1/completions", token, content=b"prompt=hi",
                        headers={"Content-Type": content_type})
        if not 400 <= response.status_code < 500:
            wrong.append((content_type, response.status_code, response.text[:160]))
    assert wrong == []
    huge = call(url, "POST", "/endpoints/vision/chat/v1/completions", token, content=b" " * (5 << 20))
    assert_refused(huge, "a 5 MB body", 413)


def test_a_json_body_sent_as_another_content_type_is_a_415_naming_the_header(setup):
    """As in the API, a body is read as JSON only when its Content-Type says so: a valid
    JSON body sent as text/plain or a form was a 200. Without the header it is read as
    JSON, as OpenAI-compatible servers read it."""
    url, token, _ = setup
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/xml"):
        response = call(url, "POST", "/endpoints/vision/chat/v1/completions", token, body=GOOD,
                        headers={"Content-Type": content_type})
        error = assert_refused(response, content_type, 415)
        assert error["param"] == "Content-Type" and content_type.split(";")[0] in error["message"], error
    for content_type in ("application/json; charset=utf-8", "Application/JSON", None):
        sent = {"Authorization": f"Bearer {token}", **({"Content-Type": content_type} if content_type else {})}
        response = httpx.post(f"{url}/endpoints/vision/chat/v1/completions", content=json.dumps(GOOD).encode(),
                              headers=sent, timeout=60)
        assert response.status_code == 200, (content_type, response.text[:200])


def test_bad_paths_methods_and_credentials_are_4xx(setup):
    url, token, cast = setup
    from jobs.teams.tokens import token_create

    for path in ("/endpoints/vision/chat/v1/nothing", "/endpoints/vision/chat/v2/completions",
                 "/endpoints/vision/" + "c" * 300 + "/v1/completions", "/endpoints/vision/ch%00at/v1/completions",
                 "/endpoints/vis%C3%A9ion/chat/v1/completions", "/endpoints/vision/chat/v1/completions%00",
                 "/endpoints/../admin/v1/completions", "/endpoints//chat/v1/completions", "/endpoints"):
        assert_refused(call(url, "POST", path, token, body=GOOD), path, 404)
    assert_refused(call(url, "GET", "/endpoints/vision/chat/v1/completions", token), "GET completions", 405)
    assert_refused(call(url, "DELETE", "/endpoints/vision/chat/v1/models", token), "DELETE models", 405)
    for header in ("Bearer", "Bearer x y", "Basic dXNlcjpwYXNz", "Bearer nd_" + "x" * 5000, "bearer nd_\u00e9t\u00e9",
                   "Token abc"):
        response = httpx.post(f"{url}/endpoints/vision/chat/v1/completions", json=GOOD, timeout=30,
                              headers={"Authorization": header.encode("utf-8")})
        assert_refused(response, f"Authorization: {header[:30]}", 401)
    other = token_create(user=cast.charlie, name="t", scope="submit")[0]
    theirs = call(url, "POST", "/endpoints/vision/chat/v1/completions", other, body=GOOD)
    missing = call(url, "POST", "/endpoints/vision/nope/v1/completions", token, body=GOOD)
    assert theirs.status_code == missing.status_code == 404 and theirs.json() == missing.json()
    assert call(url, "POST", "/endpoints/audio/speech/v1/completions", token, body=GOOD).status_code == 404
    # a session cookie without a trusted origin and the CSRF echo counts for nothing
    forged = {"Cookie": "sessionid=\u00ff; csrftoken=x".encode("latin-1"), "Origin": "https://evil.example"}
    response = httpx.post(f"{url}/endpoints/vision/chat/v1/completions", json=GOOD, timeout=30, headers=forged)
    assert_refused(response, "a forged session", 401)
