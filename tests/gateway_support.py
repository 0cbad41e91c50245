"""The gateway under test: jobs.gateway.app.Gateway served by uvicorn in a thread of
the test process (so it reads the test database), and stand-in replicas on
localhost whose behaviour the test controls: hold a stream open, refuse as
draining, break off mid-stream, or drop the connection before answering."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import uvicorn

from tests.polling import wait_until


class ThreadServer:
    """An ASGI app under uvicorn on a free localhost port, in a daemon thread."""

    def __init__(self, app, lifespan: str = "off") -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, lifespan=lifespan, log_level="warning", access_log=False, http="httptools")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=30, message="the server to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@dataclass
class FakeReplica:
    """A stand-in replica. mode: "ok" streams two SSE chunks, the second only once
    `release` is set; "draining" answers 503 draining; "break" sends one chunk and
    then drops the connection."""

    replica_id: int
    mode: str = "ok"
    release: threading.Event = field(default_factory=threading.Event)
    requests: int = 0
    server: ThreadServer | None = None

    @property
    def url(self) -> str:
        return self.server.url

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests += 1
        if self.mode == "draining":
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"x-replica-state", b"draining"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": _chunk(f"r{self.replica_id}-first"), "more_body": True})
        if self.mode == "break":
            raise RuntimeError("replica broke off")
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": _chunk("last") + b"data: [DONE]\n\n", "more_body": False})


def _chunk(text: str) -> bytes:
    payload = {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": None}]}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


@contextmanager
def fake_replicas(*replicas: FakeReplica) -> Iterator[tuple[FakeReplica, ...]]:
    servers = [ThreadServer(r) for r in replicas]
    for replica, server in zip(replicas, servers):
        replica.server = server.__enter__()
    try:
        yield replicas
    finally:
        for replica in replicas:
            replica.release.set()
        for server in servers:
            server.__exit__()


class Dropper:
    """A TCP server that reads a request and closes the connection without a byte:
    a replica that died after accepting. Counts the connections it dropped."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.dropped = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(65536)
            self.dropped += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()
