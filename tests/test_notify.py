"""Notifications: the outbox is written with its transaction, every event kind reaches
every channel (a real SMTP server, a real HTTP receiver that checks signatures from
the documented scheme), retries with back-off, giving up shows on the subscription,
and a real Celery worker delivers across processes."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from jobs.lifecycle import states
from jobs.models import Delivery, EventKind, Job, Notification, Subscription
from jobs.notify import delivery as notify_delivery
from jobs.notify import events as notify_events
from tests.notify_support import LOCAL_RECEIVERS, Receiver, SmtpServer, signature_ok
from tests.polling import wait_until
from tests.workers import Worker, process_env

S = Job.Status


@pytest.fixture
def receiver(settings):
    settings.NOTIFY_ALLOWED_NETWORKS = [LOCAL_RECEIVERS]  # the receiver is on loopback, refused by default
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def smtp(settings):
    server = SmtpServer().start()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", server.port
    yield server
    server.stop()


def running_job(cast, user=None) -> Job:
    return Job.objects.create(team=cast.vision, user=user or cast.bob, kind="inference", status=S.RUNNING,
                              started_at=timezone.now())


def subscribe(cast, channel: str, target: str, events, *, user=None, scope="self") -> Subscription:
    return Subscription.objects.create(team=cast.vision, user=user or cast.bob, scope=scope, channel=channel,
                                       target=target, events=[str(e) for e in events])


def test_a_failed_job_writes_its_notification_and_delivery_with_the_transition(cast, receiver):
    sub = subscribe(cast, "webhook", receiver.url(), [EventKind.JOB_FAILED])
    job = running_job(cast)
    assert states.mark_finished(job.pk, S.FAILED, failure="error", message="boom")
    delivery = Delivery.objects.get(subscription=sub)
    assert delivery.status == "pending" and delivery.notification.kind == EventKind.JOB_FAILED
    assert delivery.notification.job_id == job.pk


def test_a_rolled_back_transition_leaves_no_notification(cast, receiver):
    subscribe(cast, "webhook", receiver.url(), [EventKind.JOB_FAILED])
    job = running_job(cast)
    with pytest.raises(RuntimeError), transaction.atomic():
        assert states.mark_finished(job.pk, S.FAILED, failure="error")
        assert Notification.objects.count() == 1  # inside: written with it
        raise RuntimeError("the state change fails after the outbox row")
    assert Notification.objects.count() == 0 and Delivery.objects.count() == 0
    assert Job.objects.get(pk=job.pk).status == S.RUNNING


def test_a_timed_out_job_raises_timed_out_not_failed(cast, receiver):
    sub = subscribe(cast, "webhook", receiver.url(), [EventKind.JOB_TIMED_OUT])
    states.mark_finished(running_job(cast).pk, S.FAILED, failure="timed_out")
    assert Delivery.objects.get(subscription=sub).notification.kind == EventKind.JOB_TIMED_OUT


def test_self_subscriptions_hear_only_their_own_jobs_and_team_ones_hear_all(cast, receiver):
    bobs = subscribe(cast, "webhook", receiver.url("/bob"), [EventKind.JOB_SUCCEEDED])
    alices_self = subscribe(cast, "webhook", receiver.url("/a"), [EventKind.JOB_SUCCEEDED], user=cast.alice)
    alices_team = subscribe(cast, "webhook", receiver.url("/t"), [EventKind.JOB_SUCCEEDED], user=cast.alice,
                            scope="team")
    states.mark_finished(running_job(cast, cast.bob).pk, S.SUCCEEDED)
    assert set(Delivery.objects.values_list("subscription_id", flat=True)) == {bobs.pk, alices_team.pk}
    assert not Delivery.objects.filter(subscription=alices_self).exists()


def test_preemption_and_requeue_raise_their_events(cast, receiver):
    sub = subscribe(cast, "webhook", receiver.url(), [EventKind.JOB_PREEMPTED, EventKind.JOB_REQUEUED])
    first, second = running_job(cast), running_job(cast)
    assert states.requeue(first.pk, message="preempted by audio", kind="preempted")
    assert states.requeue(second.pk, message="worker lost", kind="worker_lost")
    kinds = sorted(Delivery.objects.filter(subscription=sub).values_list("notification__kind", flat=True))
    assert kinds == [EventKind.JOB_PREEMPTED, EventKind.JOB_REQUEUED]


def _emit_every_kind(cast) -> None:
    job = running_job(cast)
    for kind in EventKind.values:
        notify_events.emit(kind, team_id=cast.vision.pk, job_id=job.pk, user_id=cast.bob.pk,
                           title=f"{kind} happened", message="details")


def _deliver_all() -> None:
    for pk, ticket in Delivery.objects.filter(status="pending").values_list("pk", "ticket"):
        notify_delivery.attempt(pk, ticket)


def test_every_event_kind_reaches_a_signed_webhook_that_verifies_it(cast, receiver):
    sub = subscribe(cast, "webhook", receiver.url("/signed"), EventKind.values, scope="team", user=cast.alice)
    receiver.secrets["/signed"] = sub.secret
    _emit_every_kind(cast)
    _deliver_all()
    assert receiver.bad_signatures == 0
    assert sorted(a["event"] for a in receiver.accepted.values()) == sorted(EventKind.values)
    assert set(Delivery.objects.values_list("status", flat=True)) == {"delivered"}
    ids = {str(d) for d in Delivery.objects.values_list("delivery_id", flat=True)}
    assert set(receiver.accepted) == ids
    assert all(a["body"]["delivery_id"] in ids for a in receiver.accepted.values())


def test_a_receiver_refuses_a_body_or_timestamp_that_was_changed(cast):
    from jobs.notify.channels import sign

    body, headers = b'{"kind":"job.failed"}', {}
    ts = int(timezone.now().timestamp())
    headers = {"X-NeuronDeck-Timestamp": str(ts), "X-NeuronDeck-Signature": sign("s3cret", ts, body)}
    assert signature_ok("s3cret", headers, body)
    assert not signature_ok("s3cret", headers, body + b" ")
    assert not signature_ok("other", headers, body)
    assert not signature_ok("s3cret", {**headers, "X-NeuronDeck-Timestamp": str(ts + 1)}, body)
    old = ts - 3600
    assert not signature_ok("s3cret", {"X-NeuronDeck-Timestamp": str(old),
                                       "X-NeuronDeck-Signature": sign("s3cret", old, body)}, body)


def test_every_event_kind_reaches_a_slack_webhook(cast, receiver):
    subscribe(cast, "slack", receiver.url("/slack"), EventKind.values, scope="team", user=cast.alice)
    _emit_every_kind(cast)
    _deliver_all()
    texts = [a["body"]["text"] for a in receiver.accepted.values()]
    assert len(texts) == len(EventKind.values)
    assert all(t.startswith("*NeuronDeck* ") for t in texts)
    assert any("job.failed happened" in t for t in texts)


def test_every_event_kind_reaches_email_through_a_real_smtp_server(cast, smtp):
    subscribe(cast, "email", "ops@example.com", EventKind.values, scope="team", user=cast.alice)
    _emit_every_kind(cast)
    _deliver_all()
    assert set(Delivery.objects.values_list("status", flat=True)) == {"delivered"}
    assert len(smtp.messages) == len(EventKind.values)
    assert sorted(m["X-NeuronDeck-Event"] for m in smtp.messages) == sorted(EventKind.values)
    assert all(m["To"] == "ops@example.com" and m["Subject"].startswith("[NeuronDeck]") for m in smtp.messages)


def test_a_failed_attempt_is_retried_later_with_back_off_and_the_same_delivery_id(cast, receiver, settings):
    settings.NOTIFY_BACKOFF_BASE_S = 60
    receiver.fail_first.add("/flaky")
    subscribe(cast, "webhook", receiver.url("/flaky"), [EventKind.JOB_SUCCEEDED])
    states.mark_finished(running_job(cast).pk, S.SUCCEEDED)
    delivery = Delivery.objects.get()
    assert notify_delivery.attempt(delivery.pk, 0) == "pending"
    delivery.refresh_from_db()
    assert delivery.attempts == 1 and "HTTP 500" in delivery.last_error
    # The retry message is sent with the back-off as its countdown; the row's due time
    # is that plus the lease: when the sweep sends it again if that message was lost.
    wait = (delivery.next_attempt_at - timezone.now()).total_seconds() - settings.NOTIFY_LEASE_S
    assert 20 < wait <= 90  # 60 s × jitter in [0.5, 1.5)
    assert notify_delivery.attempt(delivery.pk, 0) is None  # a stale ticket sends nothing
    assert notify_delivery.attempt(delivery.pk, delivery.ticket) == "delivered"
    assert list(receiver.accepted) == [str(delivery.delivery_id)]


def test_back_off_grows_exponentially_up_to_its_cap(settings):
    import random

    settings.NOTIFY_BACKOFF_BASE_S, settings.NOTIFY_BACKOFF_MAX_S = 2, 100
    rng = random.Random(3)
    for attempts, base in [(1, 2), (2, 4), (3, 8), (6, 64), (7, 100), (30, 100)]:
        assert 0.5 * base <= notify_delivery.backoff_s(attempts, rng=rng) < 1.5 * base


def test_a_delivery_past_its_give_up_time_fails_and_the_subscriber_sees_why(cast, receiver, settings):
    settings.NOTIFY_GIVE_UP_S = 0
    receiver.stop()  # nothing listens on that port any more
    sub = subscribe(cast, "webhook", receiver.url("/gone"), [EventKind.JOB_FAILED])
    states.mark_finished(running_job(cast).pk, S.FAILED, failure="error")
    delivery = Delivery.objects.get()
    assert notify_delivery.attempt(delivery.pk, 0) == "failed"
    sub.refresh_from_db()
    delivery.refresh_from_db()
    assert delivery.status == "failed" and "ConnectionError" in delivery.last_error
    assert sub.failing_since is not None and "gave up after 1 attempts" in sub.last_failure


def test_emit_with_a_dedup_key_fires_once(cast):
    first = notify_events.emit(EventKind.BUDGET_THRESHOLD, team_id=cast.vision.pk, title="50 %", dedup_key="k")
    again = notify_events.emit(EventKind.BUDGET_THRESHOLD, team_id=cast.vision.pk, title="50 %", dedup_key="k")
    assert first is not None and again is None and Notification.objects.count() == 1


def test_endpoint_unhealthy_hook_reaches_team_subscribers(cast, receiver):
    sub = subscribe(cast, "webhook", receiver.url(), [EventKind.ENDPOINT_UNHEALTHY], scope="team", user=cast.alice)
    since = timezone.now()
    notify_events.endpoint_unhealthy(team_id=cast.vision.pk, endpoint="chat", reason="3 failed probes", since=since)
    notify_events.endpoint_unhealthy(team_id=cast.vision.pk, endpoint="chat", reason="still", since=since)
    assert Delivery.objects.filter(subscription=sub).count() == 1


def test_a_quota_change_notifies_the_team(cast, receiver):
    from jobs.quotas.services import quota_update

    sub = subscribe(cast, "webhook", receiver.url(), [EventKind.QUOTA_CHANGED], scope="team", user=cast.alice)
    quota_update(team=cast.vision, values={"max_pending": 7}, actor=cast.admin)
    note = Delivery.objects.get(subscription=sub).notification
    assert note.payload["changes"] == [{"subject": "quota.max_pending", "old": "100", "new": "7"}]


# --- across processes: a real Celery worker delivers after commit ----------------------

@pytest.mark.e2e
def test_a_celery_worker_delivers_after_commit_and_retries_after_its_back_off(transactional_db, cast, receiver,
                                                                             smtp, _storage, tmp_path):
    """No beat runs here: the first attempt is sent at commit, the retry by the failed
    attempt itself (the sweep is only the backstop for lost messages)."""
    from jobs.live.store import redis

    redis().flushdb()
    hook = subscribe(cast, "webhook", receiver.url("/signed"), [EventKind.JOB_SUCCEEDED])
    receiver.secrets["/signed"] = hook.secret
    receiver.fail_first.add("/signed")  # the first try of each delivery fails: a retry must follow
    subscribe(cast, "email", "bob@example.com", [EventKind.JOB_SUCCEEDED])
    worker = Worker(tmp_path / "notify-worker.log",
                    process_env(storage_root=_storage, EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(smtp.port),
                                NOTIFY_BACKOFF_BASE_S="0.2", NOTIFY_QUEUE="notify",
                                NOTIFY_ALLOWED_NETWORKS=LOCAL_RECEIVERS),
                    queues="notify", name="notify")
    worker.start()
    try:
        states.mark_finished(running_job(cast).pk, S.SUCCEEDED)
        wait_until(lambda: smtp.messages, 120, "the email")

        wait_until(lambda: receiver.accepted, 60, "the webhook after its retry")
        wait_until(lambda: set(Delivery.objects.values_list("status", flat=True)) == {"delivered"}, 60,
                   "both deliveries recorded")
        assert Delivery.objects.get(subscription=hook).attempts == 2
        assert receiver.bad_signatures == 0
    finally:
        worker.close()


def test_the_sweep_resends_a_delivery_whose_message_was_lost_once_its_lease_passed(cast, receiver):
    subscribe(cast, "webhook", receiver.url("/lost"), [EventKind.JOB_SUCCEEDED])
    states.mark_finished(running_job(cast).pk, S.SUCCEEDED)
    delivery = Delivery.objects.get()
    assert notify_delivery.sweep() == 0  # its first message is still within its lease
    Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    assert notify_delivery.sweep() == 1
    delivery.refresh_from_db()
    assert delivery.ticket == 1 and delivery.next_attempt_at > timezone.now()
    assert notify_delivery.attempt(delivery.pk, 0) is None  # the lost message, if it ever came, sends nothing
    assert notify_delivery.attempt(delivery.pk, 1) == "delivered"
    assert len(receiver.accepted) == 1


def test_a_failed_replica_tells_subscribers_the_endpoints_last_minute_at_the_gateway(cast, receiver):
    from jobs.endpoints import health
    from jobs.endpoints.selectors import inflight_key, requests_key
    from jobs.live.store import redis
    from jobs.models import Endpoint, Replica

    sub = subscribe(cast, "webhook", receiver.url("/ep"), [EventKind.ENDPOINT_UNHEALTHY], scope="team",
                    user=cast.alice)
    receiver.secrets["/ep"] = sub.secret
    endpoint = Endpoint.objects.create(team=cast.vision, name="chat")
    replica = Replica.objects.create(endpoint=endpoint, job=running_job(cast), revision=1, state="failed",
                                     stopped_at=timezone.now())
    r = redis()
    r.delete(requests_key(endpoint.pk), inflight_key(endpoint.pk))
    for status in (200, 502, 502, 200):
        r.xadd(requests_key(endpoint.pk), {"status": status, "ttft_ms": 80, "queue_ms": 1, "tokens": 4})
    try:
        health.replica_failed(replica, "exit code 137")
    finally:
        r.delete(requests_key(endpoint.pk))
    note = Notification.objects.get(kind=EventKind.ENDPOINT_UNHEALTHY)
    assert note.payload["figures"]["error_rate_pct"] == 50.0 and note.payload["figures"]["requests"] == 4
    assert "50.0 % errors" in note.payload["message"] and "exit code 137" in note.payload["reason"]
    d = Delivery.objects.get(notification=note)
    assert notify_delivery.attempt(d.pk, d.ticket) == "delivered"
    assert receiver.accepted[str(d.delivery_id)]["body"]["figures"]["error_rate_pct"] == 50.0
