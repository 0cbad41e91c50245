"""The notification API: subscribe, the delivery log per subscription (status,
attempts, last error), re-send; charlie gets 404 for vision's subscriptions."""
from __future__ import annotations

import json

import pytest

from jobs.models import Delivery, EventKind, Subscription
from jobs.notify import delivery as notify_delivery
from jobs.notify import events as notify_events
from tests.conftest import api_client
from tests.notify_support import LOCAL_RECEIVERS, Receiver


@pytest.fixture
def receiver(settings):
    settings.NOTIFY_ALLOWED_NETWORKS = [LOCAL_RECEIVERS]  # the receiver is on loopback, refused by default
    r = Receiver().start()
    yield r
    r.stop()


def post(client, url, body):
    return client.post(url, json.dumps(body), content_type="application/json")


def test_a_member_subscribes_for_himself_and_gets_the_signing_secret_once(cast, receiver):
    bob = api_client(cast.bob)
    r = post(bob, "/api/v1/teams/vision/subscriptions",
             {"scope": "self", "channel": "webhook", "target": receiver.url(), "events": ["job.failed"]})
    assert r.status_code == 201, r.content
    assert r.json()["secret"].startswith("whsec_")
    listed = bob.get("/api/v1/teams/vision/subscriptions").json()["subscriptions"]
    assert [s["id"] for s in listed] == [r.json()["id"]]


def test_only_managers_subscribe_for_the_whole_team(cast, receiver):
    body = {"scope": "team", "channel": "slack", "target": receiver.url(), "events": ["budget.threshold"]}
    refused = post(api_client(cast.bob), "/api/v1/teams/vision/subscriptions", body)
    assert refused.status_code == 400 and "managers" in refused.json()["errors"]["scope"][0]
    assert post(api_client(cast.alice), "/api/v1/teams/vision/subscriptions", body).status_code == 201


@pytest.mark.parametrize("body,field", [
    ({"channel": "email", "target": "not an address", "events": ["job.failed"]}, "target"),
    ({"channel": "webhook", "target": "file:///etc/passwd", "events": ["job.failed"]}, "target"),
    ({"channel": "pager", "target": "x", "events": ["job.failed"]}, "channel"),
    ({"channel": "email", "target": "a@example.com", "events": ["job.exploded"]}, "events"),
    ({"channel": "email", "target": "a@example.com", "events": []}, "events"),
    # A JSON body is typed (jobs.api.body.json_type_errors): a number as the target was a 500
    ({"channel": "email", "target": 5, "events": ["job.failed"]}, "target"),
    ({"channel": ["email"], "target": "a@example.com", "events": ["job.failed"]}, "channel"),
    ({"channel": "email", "target": "a@example.com", "events": "job.failed"}, "events"),
    ({"channel": "email", "target": "a@example.com", "events": [5]}, "events"),
    ({"channel": "email", "target": "a@example.com", "events": ["job.failed"], "filter": "mine"}, "filter"),
])
def test_a_bad_subscription_is_a_400_naming_the_field(cast, body, field):
    r = post(api_client(cast.bob), "/api/v1/teams/vision/subscriptions", body)
    assert r.status_code == 400 and field in r.json()["errors"], r.content
    assert not Subscription.objects.exists()


def test_charlie_gets_404_for_visions_subscriptions_deliveries_and_team(cast, receiver):
    sub = Subscription.objects.create(team=cast.vision, user=cast.alice, scope="team", channel="webhook",
                                      target=receiver.url(), events=["quota.changed"])
    notify_events.emit(EventKind.QUOTA_CHANGED, team_id=cast.vision.pk, title="q")
    d = Delivery.objects.get()
    charlie = api_client(cast.charlie)
    assert charlie.get(f"/api/v1/subscriptions/{sub.pk}/deliveries").status_code == 404
    assert charlie.post(f"/api/v1/deliveries/{d.pk}/resend").status_code == 404
    assert charlie.delete(f"/api/v1/subscriptions/{sub.pk}").status_code == 404
    assert charlie.get("/api/v1/teams/vision/subscriptions").status_code == 404
    assert Subscription.objects.filter(pk=sub.pk).exists()
    # bob (a member) does not see alice's team subscription either
    assert api_client(cast.bob).get(f"/api/v1/subscriptions/{sub.pk}/deliveries").status_code == 404


def test_the_delivery_log_shows_attempts_and_the_last_error_and_a_resend_delivers(cast, receiver, settings):
    settings.NOTIFY_GIVE_UP_S = 0
    receiver.fail_first.add("/flaky")
    sub = Subscription.objects.create(team=cast.vision, user=cast.bob, scope="self", channel="webhook",
                                      target=receiver.url("/flaky"), events=["job.succeeded"])
    notify_events.emit(EventKind.JOB_SUCCEEDED, team_id=cast.vision.pk, user_id=cast.bob.pk, title="done")
    d = Delivery.objects.get()
    assert notify_delivery.attempt(d.pk, 0) == "failed"
    bob = api_client(cast.bob)
    log = bob.get(f"/api/v1/subscriptions/{sub.pk}/deliveries").json()
    assert log["subscription"]["failing_since"] and "gave up" in log["subscription"]["last_failure"]
    [row] = log["deliveries"]
    assert row["status"] == "failed" and row["attempts"] == 1 and "HTTP 500" in row["last_error"]
    settings.NOTIFY_GIVE_UP_S = 3600
    again = bob.post(f"/api/v1/deliveries/{d.pk}/resend").json()
    assert again["status"] == "pending" and again["delivery_id"] == row["delivery_id"]
    d.refresh_from_db()
    assert notify_delivery.attempt(d.pk, d.ticket) == "delivered"
    log = bob.get(f"/api/v1/subscriptions/{sub.pk}/deliveries").json()
    assert log["deliveries"][0]["status"] == "delivered" and log["deliveries"][0]["attempts"] == 2
    assert log["subscription"]["failing_since"] is None
    assert list(receiver.accepted) == [row["delivery_id"]]
