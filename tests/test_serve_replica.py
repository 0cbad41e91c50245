"""The cpu replica server: OpenAI shapes, streaming token by token, errors, dynamic
batching, 429 at max_concurrent, drain on SIGTERM, and the serve job kind through
the real runner. Real servers on localhost, the tiny random-weight model."""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from neuron_workers.backends.serve_handoff import bind_free_port
from tests.polling import wait_until
from tests.serve_support import ROOT, replica, sse_events

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with replica(tiny_model_dir, tmp_path_factory.mktemp("replica"), max_batch_size=16, max_concurrent=64) as r:
        yield r


def reference_text(model_dir, prompt: str, max_tokens: int) -> str:
    """What greedy decoding of `prompt` gives, one sequence alone, in this process."""
    from neuron_workers.backends import hf
    from neuron_workers.backends.loops import generate_hf

    model, tokenizer = hf.cached_hf_model(model_dir)
    eos, _ = hf.token_ids(tokenizer)
    new = generate_hf(model, hf.encode_prompt(tokenizer, prompt), max_new_tokens=max_tokens, temperature=0.0,
                      generator=None, eos_id=eos)
    return tokenizer.decode(new, skip_special_tokens=True)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def test_completion_has_the_openai_shape_and_the_models_greedy_text(server, tiny_model_dir):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hello", "max_tokens": 12, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["text"] == reference_text(tiny_model_dir, "hello", 12)
    assert choice["finish_reason"] in ("length", "stop")
    assert body["usage"]["prompt_tokens"] == 5
    assert body["usage"]["total_tokens"] == 5 + body["usage"]["completion_tokens"]


def test_top_p_samples_only_from_the_likeliest_tokens(server, tiny_model_dir):
    """A tiny top_p leaves only the likeliest token, so a hot sample is the greedy text;
    without it, the same seeds sample other tokens."""
    def text(**options):
        r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                       json={"prompt": "hello", "max_tokens": 12, "temperature": 1.5, "ignore_eos": True, **options})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    greedy = reference_text(tiny_model_dir, "hello", 12)
    assert all(text(seed=seed, top_p=1e-6) == greedy for seed in (1, 2, 3))
    assert any(text(seed=seed) != greedy for seed in (1, 2, 3))


def test_unsupported_options_at_their_defaults_are_accepted(server):
    # what OpenAI's own clients send when nothing was asked for
    r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                   json={"prompt": "hi", "max_tokens": 2, "logprobs": None, "echo": False, "best_of": 1,
                         "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "suffix": None})
    assert r.status_code == 200, r.text


def test_chat_stream_arrives_token_by_token_and_matches_the_whole_answer(server):
    request = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 24, "temperature": 0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=request, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 24 and chunks[-1]["choices"] == []
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    # The tiny model's tokenizer is byte-level: a chunk per token, a byte each (one
    # character may be held back until its last byte arrives).
    assert len([p for p in pieces if p]) >= usage["completion_tokens"] // 2
    whole = httpx.post(f"{server.url}/v1/chat/completions", json={**request, "stream": False}, timeout=60).json()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "".join(pieces)}


def test_stream_chunks_leave_before_generation_ends(server):
    """The first chunk reaches the client while the engine is still generating this request."""
    request = {"prompt": "hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    before = health(server.url)["generated_tokens"]
    with httpx.stream("POST", f"{server.url}/v1/completions", json=request, timeout=60) as r:
        events = sse_events(r.iter_lines())
        first = next(e for e in events if e != "[DONE]" and e["choices"][0]["text"])
        at_first = health(server.url)["generated_tokens"] - before
        rest = list(events)
    assert first["object"] == "text_completion"
    assert at_first < 200, "the first chunk arrived only after all 200 tokens were generated"
    assert rest[-1] == "[DONE]"


@pytest.mark.parametrize(("path", "body", "param", "says"), [
    ("/v1/completions", {"max_tokens": 4}, "prompt", "prompt must be a string"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "positive integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 300}, "max_tokens", "max_seq_len (256)"),
    ("/v1/completions", {"prompt": "x" * 300}, "prompt", "max_seq_len is 256"),
    ("/v1/completions", {"prompt": "hi", "temperature": 9}, "temperature", "from 0 to 2"),
    ("/v1/completions", {"prompt": "hi", "top_p": 7}, "top_p", "greater than 0 and at most 1"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p", "greater than 0 and at most 1"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, "n", "one choice"),
    # options it does not implement were accepted and ignored ("logprobs": null in the answer)
    ("/v1/completions", {"prompt": "hi", "logprobs": 5}, "logprobs", "not supported"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 0}, "logprobs", "not supported"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, "echo", "not supported"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 1.5}, "presence_penalty", "not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 2}, "logprobs", "not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream", "true or false"),
    ("/v1/chat/completions", {"messages": []}, "messages", "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0]", "role"),
    ("/v1/completions", {"prompt": "a\ud800"}, "prompt", "lone surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}, "messages", "lone surrogate"),
])
def test_bad_requests_are_400_naming_the_field(server, path, body, param, says):
    # json.dumps escapes a lone surrogate as \udxxx, as a careless client's JSON would carry it
    r = httpx.post(f"{server.url}{path}", content=json.dumps(body), headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert says in error["message"]


def test_a_body_that_is_not_json_is_400(server):
    r = httpx.post(f"{server.url}/v1/completions", content=b"{nope", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    deep = httpx.post(f"{server.url}/v1/completions", content=b"[" * 100_000 + b"]" * 100_000, timeout=30)
    assert deep.status_code == 400 and "not valid JSON" in deep.json()["error"]["message"]  # was a 500


def test_concurrent_requests_share_forward_passes(server):
    """16 requests at once: far fewer forward passes than 16 requests alone would take."""
    before = health(server.url)
    barrier = threading.Barrier(16)

    def one(_):
        barrier.wait()
        return httpx.post(f"{server.url}/v1/completions", timeout=120,
                          json={"prompt": "abc", "max_tokens": 32, "temperature": 0, "ignore_eos": True}).json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    after = health(server.url)
    assert all(a["usage"]["completion_tokens"] == 32 for a in answers)
    passes = after["forward_passes"] - before["forward_passes"]
    alone = 16 * 32  # one prefill + 31 decodes each, one request at a time
    assert passes < alone / 3, f"{passes} forward passes for 16 x 32 tokens: not batched"
    assert after["largest_batch"] > 1
    # Batched decoding gives each request exactly what it gets alone (greedy).
    assert len({a["choices"][0]["text"] for a in answers}) == 1


def test_requests_joining_a_running_batch_get_their_text_alone(server, tiny_model_dir):
    """Prompts of different lengths sent together share passes (rows left-padded to a
    common length, later arrivals merged into the running batch) and each still gets
    exactly its greedy text alone: padding never leaks into a row's attention."""
    prompts = ["a", "hello there", "the quick brown fox jumps over", "lorem ipsum dolor sit amet, consectetur adipisci"]
    before = health(server.url)["forward_passes"]

    async def together() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(prompt: str) -> str:
                r = await client.post(f"{server.url}/v1/completions",
                                      json={"prompt": prompt, "max_tokens": 40, "temperature": 0})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            return await asyncio.gather(*(one(p) for p in prompts * 2))

    texts = asyncio.run(together())
    assert health(server.url)["forward_passes"] - before < len(texts) * 40
    for prompt, text in zip(prompts * 2, texts):
        assert text == reference_text(tiny_model_dir, prompt, 40)


def test_max_concurrent_answers_429_with_retry_after(tiny_model_dir, tmp_path):
    with replica(tiny_model_dir, tmp_path, max_batch_size=1, max_concurrent=1) as r:
        long = {"prompt": "hi", "max_tokens": 250, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{r.url}/v1/completions", json=long, timeout=60) as first:
            events = sse_events(first.iter_lines())
            next(events)  # in progress
            refused = httpx.post(f"{r.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert list(events)[-1] == "[DONE]"


def test_sigterm_drains_in_flight_requests_then_exits(tiny_model_dir, tmp_path):
    with replica(tiny_model_dir, tmp_path, max_batch_size=4, drain_s=60) as r:
        long = {"prompt": "hi", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{r.url}/v1/completions", json=long, timeout=60) as stream:
            events = sse_events(stream.iter_lines())
            next(events)
            r.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: httpx.get(f"{r.url}/health").status_code == 503, timeout=30,
                       message="health answering 503 draining")
            refused = httpx.post(f"{r.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
            assert refused.status_code == 503 and refused.headers["x-replica-state"] == "draining"
            assert refused.headers["retry-after"] == "1"
            rest = list(events)
        assert rest[-1] == "[DONE]"
        assert rest[-2]["choices"][0]["finish_reason"] == "length"
        assert r.proc.wait(timeout=60) == 0
        summary = json.loads(r.log.read_text().strip().splitlines()[-1])
        assert summary["drained"] is True and summary["generated_tokens"] >= 200


def test_the_serve_job_announces_its_url_serves_and_drains_on_stop(tiny_model_dir, tmp_path):
    """The serve kind through the real runner (exec mode): the ready record in
    metrics.jsonl and serve.json, a request served, STOP + SIGTERM, a drained success."""
    workdir = tmp_path / "job"
    payload = {"job_id": 7, "kind": "serve", "backend": "cpu", "workdir": str(workdir),
               "spec": {"max_batch_size": 4, "max_seq_len": 128, "endpoint_id": 3, "replica_id": 9,
                        "advertise_host": "127.0.0.1"},
               "inputs": {"model_path": str(tiny_model_dir), "model_format": "hf"}}
    workdir.mkdir()
    (tmp_path / "payload.json").write_text(json.dumps(payload))
    with (workdir / "log.txt").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "neuron_workers.process.runner", str(tmp_path / "payload.json")],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
    try:
        def ready():
            path = workdir / "metrics.jsonl"
            lines = path.read_text().splitlines() if path.exists() else []
            return [json.loads(line) for line in lines if '"replica": "ready"' in line] or proc.poll() is not None

        records = wait_until(ready, timeout=120, message="the replica-ready metric")
        assert proc.poll() is None, (workdir / "log.txt").read_text()
        record = records[0]
        assert record["replica_id"] == 9 and record["endpoint_id"] == 3
        assert json.loads((workdir / "serve.json").read_text())["url"] == record["url"]
        r = httpx.post(f"{record['url']}/v1/completions", json={"prompt": "hi", "max_tokens": 200}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # max_seq_len 128 from the spec
        assert httpx.post(f"{record['url']}/v1/completions", json={"prompt": "hi", "max_tokens": 5},
                          timeout=60).status_code == 200
        (workdir / "STOP").touch()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (workdir / "log.txt").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    verdict = json.loads((workdir / "result.json").read_text())
    assert verdict["ok"] is True
    assert verdict["result"]["served_requests"] == 1 and verdict["result"]["drained"] is True
    assert '"replica": "draining"' in (workdir / "metrics.jsonl").read_text()


def test_incremental_decoding_keeps_multibyte_characters_whole(tiny_model_dir):
    """A character split over several byte tokens appears once, whole, in both the
    byte-table path and the tokenizer's window path."""
    from neuron_workers.backends import hf
    from neuron_workers.backends.serve_app import _Detokenizer, token_bytes_table

    _, tokenizer = hf.cached_hf_model(tiny_model_dir)
    text = "héllo wörld ✓ 日本"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    for table in (token_bytes_table(tokenizer), None):
        detok = _Detokenizer(tokenizer, table)
        pieces = [detok.push(token) for token in ids] + [detok.flush()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in piece for piece in pieces)
    assert token_bytes_table(tokenizer) is not None


def test_the_replicas_connections_send_without_waiting_for_acks():
    """Nagle off on every accepted connection: asyncio sets TCP_NODELAY only when the
    listening socket says it is TCP, and without it each answer on a kept-alive
    connection (the gateway's) waited for the peer's delayed ACK."""
    async def accepted_nodelay() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_connect(reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        sock = bind_free_port("127.0.0.1")
        server = await asyncio.start_server(on_connect, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        try:
            return await asyncio.wait_for(seen, timeout=10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) == 1
