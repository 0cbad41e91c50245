"""The gateway's HTTP/1.1 client to replicas: keep-alive connections pooled per
replica, responses parsed by httptools (uvicorn's parser), bodies streamed.

A request costs one write and a response's body arrives as it is read: whatever
the replica sent since the last read comes out as one piece, so a busy gateway
relays several of a stream's events per write instead of one write per event.
No Django, no I/O beyond the replica's sockets.

Errors: UpstreamError for any transport failure (connection refused, reset, a
timeout, a malformed answer); `sent_nothing` says whether the replica had sent no
byte of its answer yet, which is when the gateway may send the request elsewhere.
A connection taken from the pool that turns out to be closed before any answer is
retried once on a fresh connection to the same replica (the replica closed an
idle connection; it never saw the request).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from urllib.parse import urlsplit

import httptools

PAUSE_AT = 256 << 10  # stop reading a replica while this many body bytes wait for the client


class UpstreamError(Exception):
    def __init__(self, message: str, *, sent_nothing: bool) -> None:
        super().__init__(message)
        self.sent_nothing = sent_nothing


class _Connection(asyncio.Protocol):
    """One connection to a replica, carrying one request at a time."""

    def __init__(self, origin: tuple[str, int]) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.until_close = False  # the body ends when the replica closes (no length, not chunked)
        self.received_any = False
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.error: str | None = None
        self._waiter: asyncio.Future | None = None

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = f"malformed answer: {exc}"
            self.transport.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.until_close and exc is None and self.error is None:
            self.complete = True
        if not self.complete and self.error is None:
            self.error = f"connection closed ({exc!r})" if exc else "connection closed"
        self._wake()

    # ------------------------------------------------------------ httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        framing = {k.lower() for k, _ in self.headers} & {b"content-length", b"transfer-encoding"}
        self.until_close = not framing and self.status not in (204, 304) and self.status >= 200
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > PAUSE_AT and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    # ------------------------------------------------------------ the gateway's side

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until the connection has news (bytes, an end, an error), at most `timeout`."""
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(timeout, self._timed_out, self._waiter, timeout)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _timed_out(self, waiter: asyncio.Future, timeout: float) -> None:
        if not waiter.done():
            self.error = self.error or f"no answer for {timeout:g} s"
            waiter.set_result(None)

    def take_body(self) -> bytes:
        data = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        self.buffered = 0
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True


class Response:
    """A replica's answer: status, raw headers, and the body as it arrives."""

    def __init__(self, pool: "Pool", conn: _Connection, read_timeout: float) -> None:
        self._pool, self._conn, self._read_timeout = pool, conn, read_timeout
        self.status_code = conn.status
        self.headers = conn.headers

    def header(self, name: bytes) -> str:
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return ""

    async def next_chunk(self) -> bytes | None:
        """What has arrived since the last call (waiting for something), or None at
        the end of the body. UpstreamError if the replica broke off."""
        conn = self._conn
        while True:
            if conn.body:
                return conn.take_body()
            if conn.complete:
                return None
            if conn.error is not None:
                raise UpstreamError(conn.error, sent_nothing=False)
            await conn.wait(self._read_timeout)

    async def read(self) -> bytes:
        pieces = []
        while (chunk := await self.next_chunk()) is not None:
            pieces.append(chunk)
        return b"".join(pieces)

    def close(self) -> None:
        """Back to the pool after a complete answer; closed otherwise (a request cut
        short: closing it is how the replica learns the client went away)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.complete and conn.keep_alive and not conn.closed and conn.error is None:
            self._pool._release(conn)
        else:
            conn.close()


class Pool:
    def __init__(self, *, connect_timeout: float, read_timeout: float, keepalive_expiry: float,
                 max_idle_per_origin: int = 256) -> None:
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.keepalive_expiry, self.max_idle = keepalive_expiry, max_idle_per_origin
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def request(self, base_url: str, method: str, path: str, body: bytes,
                      headers: list[tuple[str, str]]) -> Response:
        """Send the request, wait for the answer's status and headers."""
        origin, prefix = _origin(base_url)
        head = [f"{method} {prefix}{path} HTTP/1.1\r\nhost: {origin[0]}:{origin[1]}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in headers]
        if body or method == "POST":
            head.append(f"content-length: {len(body)}\r\n")
        payload = "".join(head).encode("latin-1") + b"\r\n" + body
        while True:
            conn = self._take(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin)
            conn.transport.write(payload)
            while not conn.headers_done and conn.error is None:
                await conn.wait(self.read_timeout)
            if conn.headers_done:
                return Response(self, conn, self.read_timeout)
            conn.close()
            if reused and not conn.received_any and not conn.error.startswith("no answer"):
                continue  # the replica had closed this idle connection: a fresh one
            raise UpstreamError(conn.error, sent_nothing=not conn.received_any)

    async def _connect(self, origin: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(origin), origin[0], origin[1]), self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {origin[0]}:{origin[1]}: {exc!r}", sent_nothing=True) from exc
        return conn

    def _take(self, origin: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        deadline = time.monotonic() - self.keepalive_expiry
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since > deadline:
                conn._reset()
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _origin(base_url: str) -> tuple[tuple[str, int], str]:
    """("host", port) and the path prefix of a replica's URL (http only: replicas
    are reached inside the cluster)."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        raise UpstreamError(f"a replica URL must be http://host:port, got {base_url!r}", sent_nothing=True)
    return (parts.hostname, parts.port or 80), parts.path.rstrip("/")
