"""The notifications pages: a member's history in a team and their subscriptions
(subscribe with field errors, delivery log, re-send, unsubscribe), the team's alert
policy edited by managers (validated, audited), another team's pages are 404, and
the page in a phone-sized browser."""
from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.models import AuditEntry, Delivery, EventKind, Job, Notification, Subscription, TeamAlertPolicy
from jobs.notify import delivery as notify_delivery
from jobs.notify.events import emit
from tests.notify_support import LOCAL_RECEIVERS, Receiver

URL = "/teams/vision/notifications/"


def client(user) -> Client:
    c = Client()
    c.force_login(user)
    return c


@pytest.fixture
def receiver(settings):
    settings.NOTIFY_ALLOWED_NETWORKS = [LOCAL_RECEIVERS]
    r = Receiver().start()
    yield r
    r.stop()


def job_of(cast, user) -> Job:
    return Job.objects.create(team=cast.vision, user=user, kind="inference", status=Job.Status.SUCCEEDED)


def test_a_member_subscribes_with_the_form_and_sees_a_webhooks_secret_once(cast, receiver):
    bob = client(cast.bob)
    r = bob.post(URL + "subscribe/", {"scope": "self", "channel": "webhook", "target": receiver.url("/bob"),
                                       "events": ["job.failed", "job.succeeded"]})
    assert r.status_code == 201
    sub = Subscription.objects.get(user=cast.bob)
    assert sub.events == ["job.failed", "job.succeeded"] and sub.scope == "self"
    html = r.content.decode()
    assert 'id="new-secret">' + sub.secret in html
    again = bob.get(URL).content.decode()
    assert sub.secret not in again and f'data-subscription="{sub.pk}"' in again


@pytest.mark.parametrize("data, field, words", [
    ({"channel": "email", "target": "not an address", "events": ["job.failed"]}, "target", "an email address"),
    ({"channel": "webhook", "target": "http://169.254.169.254/latest/", "events": ["job.failed"]}, "target",
     "link-local"),
    ({"channel": "slack", "target": "https://hooks.example/x", "events": []}, "events", "required"),
    ({"channel": "pager", "target": "x", "events": ["job.failed"]}, "channel", "valid choice"),
])
def test_a_bad_subscription_is_a_400_naming_the_field(cast, settings, data, field, words):
    settings.NOTIFY_ALLOWED_NETWORKS = []
    r = client(cast.bob).post(URL + "subscribe/", {"scope": "self", **data})
    assert r.status_code == 400
    errors = r.context["form"].errors
    assert field in errors and words in " ".join(errors[field])
    assert f'id="id_{field}_error"' in r.content.decode() or field == "events"
    assert not Subscription.objects.exists()


def test_only_managers_may_subscribe_for_the_whole_team(cast):
    r = client(cast.bob).post(URL + "subscribe/", {"scope": "team", "channel": "email", "target": "b@example.com",
                                                    "events": ["job.failed"]})
    assert r.status_code == 400 and "scope" in r.context["form"].errors
    r = client(cast.alice).post(URL + "subscribe/", {"scope": "team", "channel": "email",
                                                      "target": "a@example.com", "events": ["job.failed"]})
    assert r.status_code == 201 and Subscription.objects.get().scope == "team"


def test_the_history_shows_a_member_their_jobs_and_the_teams_facts_with_delivery_state(cast, receiver):
    mine = Subscription.objects.create(team=cast.vision, user=cast.bob, scope="self", channel="webhook",
                                       target=receiver.url("/b"), events=["job.succeeded", "quota.changed"])
    bobs, alices = job_of(cast, cast.bob), job_of(cast, cast.alice)
    own = emit(EventKind.JOB_SUCCEEDED, team_id=cast.vision.pk, job_id=bobs.pk, user_id=cast.bob.pk,
               title=f"job {bobs.pk} of bob succeeded", dedup_key="a")
    other = emit(EventKind.JOB_SUCCEEDED, team_id=cast.vision.pk, job_id=alices.pk, user_id=cast.alice.pk,
                 title=f"job {alices.pk} of alice succeeded", dedup_key="b")
    fact = emit(EventKind.QUOTA_CHANGED, team_id=cast.vision.pk, title="quota of team vision changed", dedup_key="c")
    elsewhere = emit(EventKind.QUOTA_CHANGED, team_id=cast.audio.pk, title="quota of team audio changed",
                     dedup_key="d")
    d = Delivery.objects.get(notification=own, subscription=mine)
    assert notify_delivery.attempt(d.pk, d.ticket) == "delivered"
    html = client(cast.bob).get(URL).content.decode()
    assert f'data-notification="{own.pk}"' in html and f'data-notification="{fact.pk}"' in html
    assert f'data-notification="{other.pk}"' not in html and f'data-notification="{elsewhere.pk}"' not in html
    assert 'data-status="delivered">webhook: delivered' in html
    manager = client(cast.alice).get(URL).content.decode()
    assert f'data-notification="{other.pk}"' in manager and f'data-notification="{own.pk}"' in manager
    assert client(cast.charlie).get(URL).status_code == 404


def test_the_history_pages_by_fifty_in_a_fixed_number_of_queries(cast):
    def notes(n: int) -> None:
        for i in range(n):
            emit(EventKind.QUOTA_CHANGED, team_id=cast.vision.pk, title=f"change {i}", dedup_key=f"q{i}-{n}")

    Subscription.objects.create(team=cast.vision, user=cast.bob, channel="email", target="b@example.com",
                                events=["quota.changed"])
    notes(3)
    bob = client(cast.bob)
    with CaptureQueriesContext(connection) as few:
        assert bob.get(URL).status_code == 200
    notes(60)
    with CaptureQueriesContext(connection) as many:
        first = bob.get(URL)
    assert len(many) == len(few)
    assert len(first.context["entries"]) == 50 and first.context["older"]
    rest = bob.get(URL, {"before": first.context["older"]})
    assert len(rest.context["entries"]) == 13 and rest.context["older"] is None
    shown = {e.notification.pk for e in first.context["entries"]} | {e.notification.pk for e in rest.context["entries"]}
    assert shown == set(Notification.objects.values_list("pk", flat=True))


def test_the_delivery_log_pages_by_fifty_in_a_fixed_number_of_queries(cast):
    sub = Subscription.objects.create(team=cast.vision, user=cast.bob, channel="email", target="b@example.com",
                                      events=["quota.changed"])

    def sent(n: int) -> None:
        notes = Notification.objects.bulk_create([Notification(team=cast.vision, kind=EventKind.QUOTA_CHANGED,
                                                               title=f"change {i}") for i in range(n)])
        Delivery.objects.bulk_create([Delivery(notification=note, subscription=sub, status="delivered")
                                      for note in notes])

    sent(3)
    bob, log = client(cast.bob), f"{URL}subscriptions/{sub.pk}/"
    with CaptureQueriesContext(connection) as few:
        assert bob.get(log).status_code == 200
    sent(60)
    with CaptureQueriesContext(connection) as many:
        first = bob.get(log)
    assert len(many) == len(few)
    assert len(first.context["deliveries"]) == 50 and first.context["older"]
    assert f'href="?before={first.context["older"]}"' in first.content.decode()
    rest = bob.get(log, {"before": first.context["older"]})
    assert len(rest.context["deliveries"]) == 13 and rest.context["older"] is None
    shown = [d.pk for d in first.context["deliveries"]] + [d.pk for d in rest.context["deliveries"]]
    assert shown == list(Delivery.objects.filter(subscription=sub).order_by("-id").values_list("pk", flat=True))
    assert bob.get(log, {"before": "not a number"}).context["deliveries"] == first.context["deliveries"]


def test_the_delivery_log_resends_and_unsubscribe_removes_and_others_get_404(cast, receiver):
    sub = Subscription.objects.create(team=cast.vision, user=cast.bob, scope="self", channel="slack",
                                      target=receiver.url("/slack"), events=["job.succeeded"])
    job = job_of(cast, cast.bob)
    note = emit(EventKind.JOB_SUCCEEDED, team_id=cast.vision.pk, job_id=job.pk, user_id=cast.bob.pk, title="done")
    d = Delivery.objects.get(notification=note)
    notify_delivery.attempt(d.pk, d.ticket)
    bob = client(cast.bob)
    log = bob.get(f"{URL}subscriptions/{sub.pk}/").content.decode()
    assert f'data-delivery="{d.pk}" data-status="delivered"' in log and str(d.delivery_id) in log
    assert bob.post(f"{URL}deliveries/{d.pk}/resend/").status_code == 302
    d.refresh_from_db()
    assert d.status == "pending"
    for stranger, url in ((cast.charlie, f"{URL}subscriptions/{sub.pk}/"),
                          (cast.charlie, f"/teams/audio/notifications/subscriptions/{sub.pk}/"),
                          (cast.vera, f"{URL}subscriptions/{sub.pk}/")):
        assert client(stranger).get(url).status_code == 404
    assert client(cast.vera).post(f"{URL}deliveries/{d.pk}/resend/").status_code == 404
    assert client(cast.vera).post(f"{URL}subscriptions/{sub.pk}/delete/").status_code == 404
    assert bob.post(f"{URL}subscriptions/{sub.pk}/delete/").status_code == 302
    assert not Subscription.objects.exists()


POLICY = {"idle_util_below_pct": "10", "idle_minutes": "20", "idle_action": "stop", "idle_grace_minutes": "5",
          "budget_thresholds": "90, 50"}


def test_a_manager_edits_the_alert_policy_and_each_change_is_audited(cast):
    alice = client(cast.alice)
    assert alice.post(URL + "policy/", POLICY).status_code == 302
    policy = TeamAlertPolicy.objects.get(team=cast.vision)
    assert (policy.idle_util_below, policy.idle_minutes, policy.idle_action, policy.idle_grace_minutes,
            policy.budget_thresholds) == (0.1, 20, "stop", 5, [50, 90])
    audit = {a.subject: (a.old, a.new, a.actor_id) for a in AuditEntry.objects.filter(team=cast.vision)}
    assert audit["alert.idle_minutes"] == ("30", "20", cast.alice.pk)
    assert audit["alert.idle_util_below"] == ("0.05", "0.1", cast.alice.pk)
    assert audit["alert.budget_thresholds"] == ("site default", "50, 90", cast.alice.pk)
    assert alice.post(URL + "policy/", POLICY).status_code == 302  # the same again: nothing more audited
    assert AuditEntry.objects.filter(team=cast.vision).count() == len(audit)
    form = alice.get(URL).context["policy_form"]
    assert form.initial["idle_minutes"] == 20 and form.initial["budget_thresholds"] == "50, 90"


@pytest.mark.parametrize("field, value, words", [
    ("idle_minutes", "0", "greater than or equal to 1"), ("idle_util_below_pct", "150", "less than or equal to 100"),
    ("budget_thresholds", "50, lots", "'lots' is not a whole percent"), ("idle_action", "explode", "valid choice"),
])
def test_a_bad_alert_policy_is_a_400_naming_the_field(cast, field, value, words):
    r = client(cast.alice).post(URL + "policy/", {**POLICY, field: value})
    assert r.status_code == 400 and words in " ".join(r.context["policy_form"].errors[field])
    assert not TeamAlertPolicy.objects.exists() and not AuditEntry.objects.filter(subject__startswith="alert.").exists()


def test_members_read_the_policy_and_cannot_change_it(cast):
    TeamAlertPolicy.objects.create(team=cast.vision, idle_minutes=45, budget_thresholds=[75])
    html = client(cast.bob).get(URL).content.decode()
    assert 'id="policy-facts"' in html and "for 45 minutes" in html and "75 %" in html
    assert 'action="/teams/vision/notifications/policy/"' not in html
    assert client(cast.bob).post(URL + "policy/", POLICY).status_code == 403
    assert client(cast.charlie).post(URL + "policy/", POLICY).status_code == 404
    assert TeamAlertPolicy.objects.get(team=cast.vision).idle_minutes == 45


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_the_notifications_page_works_on_a_phone(cast, live_server, browser, settings):
    from playwright.sync_api import expect

    from tests.conftest import SHOTS, log_in

    settings.NOTIFY_ALLOWED_NETWORKS = []
    Subscription.objects.create(team=cast.vision, user=cast.alice, scope="team", channel="email",
                                target="alice@example.com", events=["quota.changed"])
    for i in range(5):
        emit(EventKind.QUOTA_CHANGED, team_id=cast.vision.pk, title=f"quota of team vision changed ({i})")
    page = log_in(browser, live_server.url, "alice", 390, 844)
    page.goto(f"{live_server.url}{URL}")
    expect(page.locator("#history tr[data-notification]")).to_have_count(5)
    page.fill("#id_target", "ops@example.com")
    page.select_option("#id_channel", "email")
    page.check("input[name=events][value='budget.threshold']")
    page.click("#subscribe button[type=submit]")
    expect(page.locator("#created")).to_contain_text("ops@example.com")
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    page.fill("#id_idle_minutes", "0")
    page.click("#policy button[type=submit]")
    expect(page.locator("#id_idle_minutes_error")).to_contain_text("greater than or equal to 1")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "notifications-phone.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
