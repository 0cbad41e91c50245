"""Receivers for the notification tests and the bench: an HTTP receiver that checks
signatures the way the README documents them (written here from that text, not with
jobs.notify.channels), and a real SMTP server (aiosmtpd) on a free port."""
from __future__ import annotations

import hashlib
import hmac
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The receivers below listen on loopback, which the SSRF guard refuses by default:
# tests and the bench allow it through the documented setting NOTIFY_ALLOWED_NETWORKS.
LOCAL_RECEIVERS = "127.0.0.1/32"


def signature_ok(secret: str, headers, body: bytes, tolerance_s: int = 300) -> bool:
    """The documented scheme: v1=hex(HMAC-SHA256(secret, timestamp + "." + body))."""
    timestamp = headers.get("X-NeuronDeck-Timestamp", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance_s:
        return False
    expected = "v1=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers.get("X-NeuronDeck-Signature", ""))


class Receiver:
    """A webhook receiver on 127.0.0.1:<port>. `secrets` maps a path to the secret it
    verifies with (paths without one are Slack-style and unsigned). It answers 500 to
    a `fail_rate` share of requests, refuses everything while `down`, and accepts each
    delivery id at most once (a repeat is answered 200 and counted, not accepted)."""

    def __init__(self, *, fail_rate: float = 0.0, seed: int = 1):
        self.secrets: dict[str, str] = {}
        self.fail_rate, self.rng = fail_rate, random.Random(seed)
        self.accepted: dict[str, dict] = {}  # delivery id -> {"at", "body", "path"}
        self.repeats: dict[str, int] = {}
        self.requests = 0
        self.acceptances = 0  # times a request was taken as new: len(accepted) unless an id got in twice
        self.bad_signatures = 0
        self.fail_first: set[str] = set()  # paths whose first request of each delivery fails
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.port = 0

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                code = receiver.handle(self.path, self.headers, body)
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Down entirely: the port refuses connections until start() again."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def handle(self, path: str, headers, body: bytes) -> int:
        delivery = headers.get("X-NeuronDeck-Delivery", "")
        with self.lock:
            self.requests += 1
            if path in self.secrets and not signature_ok(self.secrets[path], headers, body):
                self.bad_signatures += 1
                return 401
            if self.fail_rate and self.rng.random() < self.fail_rate:
                return 500
            if path in self.fail_first and delivery not in self.repeats:
                self.repeats[delivery] = 0
                return 500
            if delivery in self.accepted:
                self.repeats[delivery] = self.repeats.get(delivery, 0) + 1
                return 200
            self.acceptances += 1
            self.accepted[delivery] = {"at": time.time(), "body": json.loads(body), "path": path,
                                       "event": headers.get("X-NeuronDeck-Event", "")}
            return 200


class SmtpServer:
    """A real SMTP server (aiosmtpd) that keeps every message it receives."""

    def __init__(self):
        from aiosmtpd.controller import Controller

        self.messages: list = []
        server = self

        class Handler:
            async def handle_DATA(self, smtp, session, envelope):
                import email

                server.messages.append(email.message_from_bytes(envelope.original_content))
                return "250 Message accepted for delivery"

        from tests.workers import free_port

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, ready_timeout=30)

    def start(self) -> "SmtpServer":
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()
