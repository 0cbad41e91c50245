"""How a notification leaves: small channel classes behind a registry.

Signed webhooks (the scheme GitHub and Stripe use): the body is the JSON document;
headers carry

  X-NeuronDeck-Delivery:   the delivery id (a UUID, the same on every retry: de-duplicate on it)
  X-NeuronDeck-Event:      the event kind, e.g. job.failed
  X-NeuronDeck-Timestamp:  Unix seconds when this attempt was signed
  X-NeuronDeck-Signature:  v1=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>

A receiver recomputes the HMAC over the timestamp, a dot and the raw body bytes with
the subscription's secret, compares in constant time, and refuses timestamps older
than a few minutes (replays). `verify` below is that receiver's check.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from typing import Protocol

import requests
from django.conf import settings
from django.core.mail import EmailMessage

from jobs.notify.targets import UnsafeTarget, guarded_session

SIGNATURE_HEADER = "X-NeuronDeck-Signature"
TIMESTAMP_HEADER = "X-NeuronDeck-Timestamp"
DELIVERY_HEADER = "X-NeuronDeck-Delivery"
EVENT_HEADER = "X-NeuronDeck-Event"


class DeliveryError(Exception):
    """This attempt failed; the sentence is shown in the delivery log."""


class Outgoing(Protocol):
    delivery_id: str
    kind: str
    title: str
    document: dict


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(secret: str, headers, body: bytes, *, tolerance_s: int = 300, now: float | None = None) -> bool:
    """A receiver's check of a signed webhook (see the module docstring)."""
    try:
        timestamp = int(headers[TIMESTAMP_HEADER])
    except (KeyError, ValueError):
        return False
    if abs((now or time.time()) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), headers.get(SIGNATURE_HEADER, ""))


_local = threading.local()  # a session per worker thread: requests' sessions are not thread-safe


def _session() -> requests.Session:
    if not hasattr(_local, "session"):
        _local.session = guarded_session()
    return _local.session


def _post(url: str, body: bytes, headers: dict) -> None:
    """POST to a subscriber's URL through the SSRF guard (jobs.notify.targets): the
    address connected to is checked at connect time; redirects are not followed."""
    try:
        response = _session().post(url, data=body, headers={"Content-Type": "application/json", **headers},
                                   timeout=settings.NOTIFY_HTTP_TIMEOUT_S, allow_redirects=False)
    except UnsafeTarget as exc:
        raise DeliveryError(f"refused: {exc}"[:500]) from None
    except requests.RequestException as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}"[:500]) from None
    if not 200 <= response.status_code < 300:
        raise DeliveryError(f"HTTP {response.status_code}: {response.text[:200]}")


class WebhookChannel:
    def send(self, target: str, secret: str, out: Outgoing) -> None:
        body = json.dumps(out.document, separators=(",", ":"), sort_keys=True).encode()
        timestamp = int(time.time())
        _post(target, body, {DELIVERY_HEADER: out.delivery_id, EVENT_HEADER: out.kind,
                             TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(secret, timestamp, body)})


class SlackChannel:
    """A Slack (or Mattermost / Rocket.Chat) incoming webhook: {"text": ...}."""

    def send(self, target: str, secret: str, out: Outgoing) -> None:
        text = f"*NeuronDeck* {out.title}"
        if out.document.get("message"):
            text += f"\n{out.document['message']}"
        body = json.dumps({"text": text}).encode()
        _post(target, body, {DELIVERY_HEADER: out.delivery_id})


class EmailChannel:
    """Django's configured mail backend (SMTP by EMAIL_* settings)."""

    def send(self, target: str, secret: str, out: Outgoing) -> None:
        lines = [out.title, ""] + [f"{k}: {v}" for k, v in sorted(out.document.items()) if v not in (None, "")]
        message = EmailMessage(subject=f"[NeuronDeck] {out.title}", body="\n".join(lines),
                               from_email=settings.DEFAULT_FROM_EMAIL, to=[target],
                               headers={DELIVERY_HEADER: out.delivery_id, EVENT_HEADER: out.kind})
        try:
            message.send(fail_silently=False)
        except Exception as exc:  # noqa: BLE001 - smtplib and socket errors alike are this attempt's failure
            raise DeliveryError(f"{type(exc).__name__}: {exc}"[:500]) from None


CHANNELS = {"email": EmailChannel(), "slack": SlackChannel(), "webhook": WebhookChannel()}
