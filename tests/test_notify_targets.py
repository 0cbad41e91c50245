"""The SSRF guard on webhook and Slack targets (jobs.notify.targets): addresses inside
the site's network are refused when subscribing (a field error) and again when a
delivery connects (a name may resolve elsewhere by then), unless the administrator's
NOTIFY_ALLOWED_NETWORKS allows them."""
from __future__ import annotations

import ipaddress
import json
import socket

import pytest

from jobs.models import Delivery, EventKind, Subscription
from jobs.notify import delivery as notify_delivery
from jobs.notify import targets
from jobs.notify.events import emit
from tests.conftest import api_client
from tests.notify_support import LOCAL_RECEIVERS, Receiver

PUBLIC = "93.184.216.34"  # a global unicast address (never connected to: the tests refuse before)


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def resolver(monkeypatch):
    """Names of our choosing resolve to addresses of our choosing (the network's
    DNS is the one edge faked here); every other name goes to the real resolver."""
    answers: dict[str, str] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in answers:
            family = socket.AF_INET6 if ":" in answers[host] else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (answers[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def subscribe(client, target: str, channel: str = "webhook"):
    return client.post("/api/v1/teams/vision/subscriptions",
                       json.dumps({"scope": "self", "channel": channel, "target": target, "events": ["job.failed"]}),
                       content_type="application/json")


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("10.1.2.3", "private"), ("172.16.0.9", "private"), ("192.168.1.1", "private"), ("fd00::5", "private"),
    ("100.64.0.1", "private"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"), ("192.0.2.7", "private"),
], ids=lambda value: value.replace(":", "_"))
def test_addresses_inside_the_sites_network_are_refused_by_default(settings, address, kind):
    settings.NOTIFY_ALLOWED_NETWORKS = []
    why = targets.why_refused(ipaddress.ip_address(address))
    assert why is not None and why.startswith(kind)


def test_public_addresses_pass_and_the_allow_list_admits_its_networks_only(settings):
    settings.NOTIFY_ALLOWED_NETWORKS = []
    assert targets.why_refused(ipaddress.ip_address(PUBLIC)) is None
    assert targets.why_refused(ipaddress.ip_address("2606:4700::1111")) is None
    settings.NOTIFY_ALLOWED_NETWORKS = ["10.20.0.0/16", LOCAL_RECEIVERS]
    assert targets.why_refused(ipaddress.ip_address("10.20.3.4")) is None
    assert targets.why_refused(ipaddress.ip_address("127.0.0.1")) is None
    assert targets.why_refused(ipaddress.ip_address("10.21.0.1")) == "private"
    assert targets.why_refused(ipaddress.ip_address("127.0.0.2")) == "loopback"


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:8080/hook", "http://localhost/hook", "http://169.254.169.254/latest/meta-data/",
    "https://[::1]/hook", "http://10.0.0.7/hook", "http://0.0.0.0:6379/",
], ids=lambda value: value.replace(":", "_").replace("/", "_"))
def test_subscribing_to_an_inside_address_is_a_field_error_by_default(cast, settings, target):
    settings.NOTIFY_ALLOWED_NETWORKS = []
    r = subscribe(api_client(cast.bob), target)
    assert r.status_code == 400, r.content
    assert "target" in r.json()["errors"]
    assert "address" in r.json()["errors"]["target"][0]
    assert not Subscription.objects.exists()


def test_the_error_names_the_address_a_name_resolves_to(cast, settings, resolver):
    settings.NOTIFY_ALLOWED_NETWORKS = []
    resolver["metadata.example"] = "169.254.169.254"
    r = subscribe(api_client(cast.bob), "https://metadata.example/hook", channel="slack")
    assert r.status_code == 400
    message = r.json()["errors"]["target"][0]
    assert "metadata.example resolves to 169.254.169.254" in message and "link-local" in message


def test_a_name_that_does_not_resolve_is_refused_with_the_reason(cast, settings):
    settings.NOTIFY_ALLOWED_NETWORKS = []
    r = subscribe(api_client(cast.bob), "https://no-such-host.invalid/hook")
    assert r.status_code == 400
    assert "does not resolve" in r.json()["errors"]["target"][0]


def test_the_allow_list_setting_admits_the_local_receiver(cast, settings, receiver):
    settings.NOTIFY_ALLOWED_NETWORKS = [LOCAL_RECEIVERS]
    r = subscribe(api_client(cast.bob), receiver.url())
    assert r.status_code == 201, r.content


def test_a_delivery_rechecks_at_connect_time_and_sends_nothing_inside(cast, settings, receiver):
    """Allowed when subscribed, no longer allowed at delivery: the attempt fails with
    the reason and the receiver sees no request."""
    settings.NOTIFY_ALLOWED_NETWORKS = [LOCAL_RECEIVERS]
    sub = Subscription.objects.create(team=cast.vision, user=cast.bob, scope="team", channel="webhook",
                                      target=receiver.url(), events=[EventKind.QUOTA_CHANGED])
    note = emit(EventKind.QUOTA_CHANGED, team_id=cast.vision.pk, title="quota changed")
    settings.NOTIFY_ALLOWED_NETWORKS = []
    d = Delivery.objects.get(notification=note, subscription=sub)
    assert notify_delivery.attempt(d.pk, d.ticket) == Delivery.Status.PENDING
    d.refresh_from_db()
    assert "refused" in d.last_error and "loopback" in d.last_error
    assert receiver.requests == 0


def test_a_name_that_resolves_inside_after_subscribing_is_refused_at_delivery(cast, settings, receiver, resolver):
    """DNS rebinding: public when checked at subscription, loopback when delivered."""
    settings.NOTIFY_ALLOWED_NETWORKS = []
    resolver["hooks.example"] = PUBLIC
    r = subscribe(api_client(cast.bob), f"http://hooks.example:{receiver.port}/hook")
    assert r.status_code == 201, r.content
    resolver["hooks.example"] = "127.0.0.1"  # the name now points at the site itself
    note = emit(EventKind.JOB_FAILED, team_id=cast.vision.pk, user_id=cast.bob.pk, title="job 1 failed")
    d = Delivery.objects.get(notification=note)
    assert notify_delivery.attempt(d.pk, d.ticket) == Delivery.Status.PENDING
    d.refresh_from_db()
    assert "hooks.example resolves to 127.0.0.1" in d.last_error
    assert receiver.requests == 0


def test_a_name_that_resolves_to_an_allowed_address_is_delivered(cast, settings, receiver,
                                                                                  resolver):
    settings.NOTIFY_ALLOWED_NETWORKS = [LOCAL_RECEIVERS]
    resolver["receiver.example"] = "127.0.0.1"
    sub = Subscription.objects.create(team=cast.vision, user=cast.bob, scope="team", channel="slack",
                                      target=f"http://receiver.example:{receiver.port}/slack",
                                      events=[EventKind.QUOTA_CHANGED])
    note = emit(EventKind.QUOTA_CHANGED, team_id=cast.vision.pk, title="quota changed")
    d = Delivery.objects.get(notification=note, subscription=sub)
    assert notify_delivery.attempt(d.pk, d.ticket) == Delivery.Status.DELIVERED
    assert len(receiver.accepted) == 1
