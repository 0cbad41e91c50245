"""/metrics: guarded by a token or an allowed address, parsed with prometheus_client's
text parser, and a non-staff user's credentials expose only their teams' series."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from jobs.models import CoreAllocation, Delivery, Host, Job, JobAttempt, MetricMinute, Subscription
from jobs.notify import events as notify_events
from tests.conftest import api_client

S = Job.Status


@pytest.fixture
def fleet(cast):
    """A running 2-core job in each team on one host, with last minute's utilization,
    and a given-up delivery of vision's."""
    now = timezone.now()
    host = Host.objects.create(name="trn-a", family="trn1", core_ids=list(range(8)), last_heartbeat=now)
    jobs = {}
    for team, user, start in ((cast.vision, cast.bob, 0), (cast.audio, cast.charlie, 2)):
        job = Job.objects.create(team=team, user=user, kind="finetune", family="trn1", status=S.RUNNING, cores=2,
                                 host=host, core_start=start, created_at=now - timedelta(seconds=90),
                                 queued_at=now - timedelta(seconds=31), started_at=now - timedelta(seconds=30))
        JobAttempt.objects.create(job=job, team=team, user=user, kind="finetune", family="trn1", host=host,
                                  number=1, cores=2, started_at=job.started_at)
        for core in (start, start + 1):
            CoreAllocation.objects.create(host=host, core=core, job=job, team=team, family="trn1")
            MetricMinute.objects.create(host=host, job=job, core=core, util_mean=50.0, samples=60,
                                        minute=now.replace(second=0, microsecond=0) - timedelta(minutes=1))
        jobs[team.slug] = job
    Job.objects.create(team=cast.audio, user=cast.charlie, kind="inference", family="cpu")
    sub = Subscription.objects.create(team=cast.vision, user=cast.bob, channel="webhook", target="http://x/",
                                      events=["job.failed"])
    notify_events.emit("job.failed", team_id=cast.vision.pk, user_id=cast.bob.pk, title="f")
    Delivery.objects.filter(subscription=sub).update(status="failed")
    return jobs


def scrape(client: Client, **headers) -> dict:
    r = client.get("/metrics", **headers)
    assert r.status_code == 200, r.content
    assert r["Content-Type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.content.decode())}


def values(families, name, **match):
    return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples
            if all(s.labels.get(k) == v for k, v in match.items())}


def test_metrics_with_the_token_parse_and_hold_every_series(fleet, settings):
    settings.METRICS_TOKEN, settings.METRICS_ALLOWED_IPS = "scrape-me", []
    families = scrape(Client(), HTTP_AUTHORIZATION="Bearer scrape-me")
    jobs = values(families, "neurondeck_jobs")
    assert jobs[(("family", "trn1"), ("kind", "finetune"), ("state", "running"), ("team", "vision"))] == 1
    assert jobs[(("family", "cpu"), ("kind", "inference"), ("state", "pending"), ("team", "audio"))] == 1
    allocated = values(families, "neurondeck_cores_allocated")
    assert allocated[(("family", "trn1"), ("host", "trn-a"), ("team", "audio"))] == 2
    used = values(families, "neurondeck_cores_used", team="vision")
    assert list(used.values()) == [1.0]  # 2 cores × 50 %
    per_core = values(families, "neurondeck_core_utilization_percent")
    assert len(per_core) == 4 and set(per_core.values()) == {50.0}
    assert {dict(k)["job"] for k in per_core} == {str(j.pk) for j in fleet.values()}
    waits = {s.name: s.value for s in families["neurondeck_pending_wait_seconds"].samples
             if s.labels.get("team") == "vision"}
    assert waits["neurondeck_pending_wait_seconds_count"] == 1
    assert 55 <= waits["neurondeck_pending_wait_seconds_sum"] <= 65
    latency = {s.labels.get("le"): s.value for s in families["neurondeck_dispatch_latency_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["team"] == "audio"}
    assert latency["0.5"] == 0 and latency["2.0"] == 1 and latency["+Inf"] == 1
    assert values(families, "neurondeck_notification_delivery_failures") == {
        (("channel", "webhook"), ("team", "vision")): 1}


def test_a_non_staff_users_token_sees_only_their_teams_series(fleet, settings):
    settings.METRICS_ALLOWED_IPS = []
    families = scrape(api_client(cast_user := fleet["vision"].user))
    assert cast_user.username == "bob"
    teams = {s.labels["team"] for f in families.values() for s in f.samples if "team" in s.labels}
    assert teams == {"vision"}
    jobs_seen = {s.labels["job"] for s in families["neurondeck_core_utilization_percent"].samples}
    assert jobs_seen == {str(fleet["vision"].pk)}
    charlie = scrape(api_client(fleet["audio"].user))
    assert {s.labels["team"] for f in charlie.values() for s in f.samples if "team" in s.labels} == {"audio"}


def test_staff_credentials_see_every_team(cast, fleet, settings):
    settings.METRICS_ALLOWED_IPS = []
    families = scrape(api_client(cast.admin))
    assert {s.labels["team"] for s in families["neurondeck_cores_allocated"].samples} == {"vision", "audio"}


def test_metrics_are_a_404_without_a_token_or_an_allowed_address(fleet, settings):
    settings.METRICS_TOKEN, settings.METRICS_ALLOWED_IPS = "scrape-me", []
    assert Client().get("/metrics").status_code == 404
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 404
    settings.METRICS_ALLOWED_IPS = ["127.0.0.1"]  # the test client's address
    assert "neurondeck_jobs" in scrape(Client())
    assert Client(REMOTE_ADDR="10.1.2.3").get("/metrics").status_code == 404


def test_the_grafana_dashboard_queries_only_metrics_that_metrics_exports(fleet, settings):
    import json
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent / "webapp" / "monitoring"
    dashboard = json.loads((root / "grafana" / "dashboards" / "neurondeck.json").read_text())
    settings.METRICS_TOKEN = "t"
    exported = set(scrape(Client(), HTTP_AUTHORIZATION="Bearer t"))
    queried = {re.sub(r"_(bucket|sum|count)$", "", name) for panel in dashboard["panels"]
               for target in panel["targets"] for name in re.findall(r"neurondeck_\w+", target["expr"])}
    assert queried and queried <= exported
    compose = yaml.safe_load((root.parent.parent / "docker-compose.yml").read_text())
    assert {"prometheus", "grafana"} <= {n for n, s in compose["services"].items() if "monitoring" in s.get("profiles", [])}


def test_endpoints_have_their_replicas_and_last_minutes_request_figures_scoped_by_team(cast, settings):
    from jobs.endpoints.selectors import inflight_key, requests_key
    from jobs.live.store import redis
    from jobs.models import Endpoint, Replica

    r = redis()
    endpoints = {}
    for team, user in ((cast.vision, cast.bob), (cast.audio, cast.charlie)):
        endpoint = Endpoint.objects.create(team=team, name="chat", max_replicas=2, desired_replicas=2)
        for state in ("ready", "starting"):
            job = Job.objects.create(team=team, user=user, kind="serve", status=S.RUNNING, cores=1)
            Replica.objects.create(endpoint=endpoint, job=job, revision=1, state=state)
        r.delete(requests_key(endpoint.pk), inflight_key(endpoint.pk))
        endpoints[team.slug] = endpoint
    stream = requests_key(endpoints["vision"].pk)
    for status, ttft in ((200, 100), (200, 300), (500, 50), (200, 200)):
        r.xadd(stream, {"replica": "1", "status": status, "ttft_ms": ttft, "duration_ms": 900, "queue_ms": 5,
                        "tokens": 10})
    r.hset(inflight_key(endpoints["vision"].pk), mapping={"1": 3, "waiting": 2})
    try:
        settings.METRICS_TOKEN, settings.METRICS_ALLOWED_IPS = "t", []
        families = scrape(Client(), HTTP_AUTHORIZATION="Bearer t")
        vision = {"team": "vision", "endpoint": "chat"}
        assert values(families, "neurondeck_endpoint_replicas", **vision) == {
            (("endpoint", "chat"), ("state", s), ("team", "vision")): n
            for s, n in (("starting", 1), ("ready", 1), ("draining", 0))}
        assert list(values(families, "neurondeck_endpoint_error_rate_percent", **vision).values()) == [25.0]
        assert list(values(families, "neurondeck_endpoint_ttft_p95_ms", **vision).values()) == [300.0]
        assert list(values(families, "neurondeck_endpoint_requests_in_flight", **vision).values()) == [3]
        assert list(values(families, "neurondeck_endpoint_requests_waiting", **vision).values()) == [2]
        per_s = values(families, "neurondeck_endpoint_requests_per_second")
        assert per_s[(("endpoint", "chat"), ("team", "vision"))] == pytest.approx(4 / 60, abs=0.01)
        assert per_s[(("endpoint", "chat"), ("team", "audio"))] == 0
        bobs = scrape(api_client(cast.bob))
        assert {s.labels["team"] for s in bobs["neurondeck_endpoint_replicas"].samples} == {"vision"}
    finally:
        r.delete(*(requests_key(e.pk) for e in endpoints.values()), inflight_key(endpoints["vision"].pk))
