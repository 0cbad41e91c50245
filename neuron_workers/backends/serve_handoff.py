"""What every replica does around its server, whatever runs it (our cpu server, vLLM,
optimum-neuron): read the endpoint's serving options, take a free port, probe its
own /health, tell the worker its URL, and tell it when it starts draining.

Torch-free. The hand-off to the worker is one metrics line (the supervisor tails
metrics.jsonl to the worker's JobRecorder.on_metric, which marks the Replica) plus
workdir/serve.json:

  {"replica": "ready", "url": "http://HOST:PORT", "replica_id": R, "endpoint_id": E}
  {"replica": "draining", "replica_id": R}

HOST is the address other machines reach this one at: spec "advertise_host" (the
worker sets it from the host's Host.address), else the bind address. The server binds 127.0.0.1 when that address is loopback, else all
interfaces.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .base import JobContext, JobFailed, spec_int, write_json

REPLICA_EVENT = "replica"  # the metric record's key; its value: READY or DRAINING
READY = "ready"
DRAINING = "draining"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SERVE_FILE = "serve.json"
DEFAULT_BATCH = 8
DEFAULT_DRAIN_S = 30
DEFAULT_STREAM_INTERVAL_MS = 10  # tokens of a running stream are written at most this often
DEFAULT_READY_TIMEOUT_S = 600  # a Neuron model may compile or load for minutes


@dataclass(frozen=True)
class ServeSettings:
    """An endpoint's serving options, as a replica job's spec carries them."""

    max_batch_size: int
    max_seq_len: int | None  # None: the model's own limit
    max_concurrent: int
    stream_interval_ms: int
    drain_s: int
    ready_timeout_s: int
    bind_host: str
    advertise_host: str
    endpoint_id: int | None
    replica_id: int | None


def serve_settings(spec: dict) -> ServeSettings:
    """The options from the job spec, checked (bad_input naming the field)."""
    batch = spec_int(spec, "max_batch_size", maximum=256, default=DEFAULT_BATCH)
    concurrent = spec_int(spec, "max_concurrent", maximum=100_000, default=batch * 4)
    if concurrent < batch:
        raise JobFailed("bad_input", f"spec field 'max_concurrent' ({concurrent}) must be >= max_batch_size ({batch})")
    advertise = spec.get("advertise_host") or spec.get("bind_host") or "127.0.0.1"
    bind = spec.get("bind_host") or ("127.0.0.1" if advertise in LOOPBACK else "0.0.0.0")
    if advertise in ("0.0.0.0", "::"):
        advertise = socket.gethostname()
    for name, value in (("bind_host", bind), ("advertise_host", advertise)):
        if not isinstance(value, str) or len(value) > 253 or any(c in value for c in "/ @?#"):
            raise JobFailed("bad_input", f"spec field {name!r} must be a host name or address, got {value!r}")
    optional = [spec.get(k) for k in ("endpoint_id", "replica_id")]
    return ServeSettings(
        max_batch_size=batch,
        max_seq_len=spec_int(spec, "max_seq_len", minimum=2, default=None),
        max_concurrent=concurrent,
        stream_interval_ms=spec_int(spec, "stream_interval_ms", minimum=0, maximum=1000,
                                    default=DEFAULT_STREAM_INTERVAL_MS),
        drain_s=spec_int(spec, "drain_s", minimum=0, maximum=3600, default=DEFAULT_DRAIN_S),
        ready_timeout_s=spec_int(spec, "ready_timeout_s", maximum=24 * 3600, default=DEFAULT_READY_TIMEOUT_S),
        bind_host=bind, advertise_host=advertise,
        endpoint_id=optional[0] if isinstance(optional[0], int) else None,
        replica_id=optional[1] if isinstance(optional[1], int) else None,
    )


def bind_free_port(host: str) -> socket.socket:
    """A listening TCP socket on a free port of `host` (the server is handed the socket,
    so no other process can take the port between choosing and binding it).

    proto=IPPROTO_TCP matters: asyncio turns Nagle off (TCP_NODELAY) only on accepted
    sockets whose proto says TCP; with proto 0 every answer on a kept-alive connection
    waited ~40 ms for the peer's delayed ACK."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def free_port(host: str) -> int:
    """A port that was free a moment ago (for a server we cannot hand a socket to)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def url_for(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def probe_health(url: str, *, path: str = "/health", timeout_s: float = 2.0) -> bool:
    """True if GET url+path answers 200."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def wait_healthy(url: str, *, timeout_s: float, should_stop: Callable[[], bool],
                 alive: Callable[[], bool] = lambda: True, path: str = "/health") -> bool:
    """Probe until healthy; False if stopped, the server died or the timeout passed."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while time.monotonic() < deadline:
        if should_stop() or not alive():
            return False
        if probe_health(url, path=path):
            return True
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    return False


def announce_ready(ctx: JobContext, settings: ServeSettings, url: str, **extra) -> None:
    record = {REPLICA_EVENT: READY, "url": url, "replica_id": settings.replica_id,
              "endpoint_id": settings.endpoint_id, **extra}
    write_json(ctx.workdir / SERVE_FILE, record)
    ctx.metric(record)
    ctx.log(f"serving at {url}")


def announce_draining(ctx: JobContext, settings: ServeSettings) -> None:
    ctx.metric({REPLICA_EVENT: DRAINING, "replica_id": settings.replica_id})
    ctx.log("stop requested: draining (no new requests; finishing those in progress)")
