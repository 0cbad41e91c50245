"""/metrics in the Prometheus text format, read from the database at scrape time.

Open to a request bearing METRICS_TOKEN (`Authorization: Bearer …`) or from an
address in METRICS_ALLOWED_IPS: every series. A user's own credentials (an API token
or a session) also work, and then only the series of that user's teams are exposed
(staff: all): another team's jobs, cores and deliveries never appear, not even as a
label value. Anyone else gets a 404, like a page that does not exist."""
from __future__ import annotations

import hmac
from collections import defaultdict
from datetime import timedelta

from django.conf import settings
from django.db.models import Count, Max
from django.http import Http404, HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_safe
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from jobs import access
from jobs.models import CoreAllocation, Delivery, Endpoint, Job, JobAttempt, MetricMinute, Replica
from jobs.teams.tokens import token_user

WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600)
DISPATCH_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
WINDOW = timedelta(hours=1)  # waits, dispatch latency and finished jobs: the last hour
S = Job.Status


def _scope(qs, team_ids: set[int] | None, field: str = "team_id"):
    return qs if team_ids is None else qs.filter(**{f"{field}__in": team_ids})


def _histogram(name: str, doc: str, label: str, samples: dict[str, list[float]], buckets) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for value, seconds in sorted(samples.items()):
        cumulative = [(str(float(le)), sum(1 for s in seconds if s <= le)) for le in buckets]
        family.add_metric([value], cumulative + [("+Inf", len(seconds))], sum_value=sum(seconds))
    return family


class FleetCollector:
    def __init__(self, team_ids: set[int] | None):
        self.team_ids = team_ids

    def collect(self):
        now = timezone.now()
        since = now - WINDOW
        t = self.team_ids

        jobs = GaugeMetricFamily("neurondeck_jobs", "Jobs pending, queued or running now, and finished in the "
                                 "last hour, by state", labels=["state", "kind", "team", "family"])
        active = _scope(Job.objects.filter(status__in=[S.PENDING, *Job.ACTIVE]), t)
        finished = _scope(Job.objects.filter(finished_at__gte=since, status__in=Job.FINISHED), t)
        for qs in (active, finished):
            for row in qs.values("status", "kind", "team__slug", "family").annotate(n=Count("id")).order_by():
                jobs.add_metric([row["status"], row["kind"], row["team__slug"], row["family"]], row["n"])
        yield jobs

        waits: dict[str, list[float]] = defaultdict(list)
        latency: dict[str, list[float]] = defaultdict(list)
        started = _scope(JobAttempt.objects.filter(started_at__gte=since), t).values_list(
            "team__slug", "number", "started_at", "job__created_at", "job__queued_at")
        for slug, number, start, created, queued in started:
            if number == 1:
                waits[slug].append(max((start - created).total_seconds(), 0.0))
            if queued is not None and queued <= start:
                latency[slug].append((start - queued).total_seconds())
        yield _histogram("neurondeck_pending_wait_seconds", "Submit to first start of jobs started in the last "
                         "hour", "team", waits, WAIT_BUCKETS)
        yield _histogram("neurondeck_dispatch_latency_seconds", "Placed (queued) to running on the host, "
                         "jobs started in the last hour", "team", latency, DISPATCH_BUCKETS)

        util = self._latest_util(now)
        allocated = GaugeMetricFamily("neurondeck_cores_allocated", "NeuronCores (CPU: job slots) held by jobs",
                                      labels=["team", "host", "family"])
        used = GaugeMetricFamily("neurondeck_cores_used", "Allocated cores × their last minute's measured "
                                 "utilization", labels=["team", "host", "family"])
        per_core = GaugeMetricFamily("neurondeck_core_utilization_percent", "Last complete minute's mean "
                                     "utilization of a held core", labels=["host", "core", "job", "team"])
        groups: dict[tuple, list[float]] = defaultdict(lambda: [0, 0.0])
        for slug, host, family, core, job_id in _scope(CoreAllocation.objects.all(), t).values_list(
                "team__slug", "host__name", "family", "core", "job_id"):
            g = groups[(slug, host, family)]
            g[0] += 1
            value = util.get((job_id, core))
            if value is not None:
                g[1] += value / 100.0
                per_core.add_metric([host, str(core), str(job_id), slug], value)
        for labels, (count, busy) in sorted(groups.items()):
            allocated.add_metric(list(labels), count)
            used.add_metric(list(labels), round(busy, 4))
        yield allocated
        yield used
        yield per_core

        deliveries = GaugeMetricFamily("neurondeck_notification_deliveries", "Notification deliveries created "
                                       "in the last hour by status", labels=["channel", "status", "team"])
        failures = GaugeMetricFamily("neurondeck_notification_delivery_failures", "Deliveries given up in the "
                                     "last hour", labels=["channel", "team"])
        rows = _scope(Delivery.objects.filter(created_at__gte=since), t, "subscription__team_id").values(
            "subscription__channel", "status", "subscription__team__slug").annotate(n=Count("id")).order_by()
        for row in rows:
            labels = [row["subscription__channel"], row["status"], row["subscription__team__slug"]]
            deliveries.add_metric(labels, row["n"])
            if row["status"] == Delivery.Status.FAILED:
                failures.add_metric([labels[0], labels[2]], row["n"])
        yield deliveries
        yield failures
        yield from self._endpoints()

    def _endpoints(self):
        """Each active endpoint's replicas by state (database) and its gateway figures
        over the last minute (jobs.endpoints.selectors.stats, from the gateway's
        request stream in Redis; left out when Redis cannot say)."""
        from jobs.endpoints.selectors import STATS_WINDOW_S, stats

        labels = ["team", "endpoint"]
        replicas = GaugeMetricFamily("neurondeck_endpoint_replicas", "Replicas of an active endpoint by state",
                                     labels=[*labels, "state"])
        per_s = GaugeMetricFamily("neurondeck_endpoint_requests_per_second",
                                  f"Requests finished per second over the last {STATS_WINDOW_S} s", labels=labels)
        errors = GaugeMetricFamily("neurondeck_endpoint_error_rate_percent", "Share of the last minute's requests "
                                   "answered 5xx or broken off mid-stream", labels=labels)
        ttft = GaugeMetricFamily("neurondeck_endpoint_ttft_p95_ms", "Time to first token, p95 of the last "
                                 "minute's requests", labels=labels)
        queue = GaugeMetricFamily("neurondeck_endpoint_queue_p95_ms", "Time waiting in the gateway for a replica, "
                                  "p95 of the last minute's requests", labels=labels)
        inflight = GaugeMetricFamily("neurondeck_endpoint_requests_in_flight", "Requests on a replica now",
                                     labels=labels)
        waiting = GaugeMetricFamily("neurondeck_endpoint_requests_waiting", "Requests waiting for a replica now "
                                    "(none ready, or all at max_concurrent)", labels=labels)
        endpoints = _scope(Endpoint.objects.filter(state=Endpoint.State.ACTIVE), self.team_ids).values_list(
            "pk", "team__slug", "name")
        counts = {(e, state): n for e, state, n in _scope(
            Replica.objects.filter(state__in=Replica.ACTIVE), self.team_ids, "endpoint__team_id").values(
            "endpoint_id", "state").annotate(n=Count("id")).values_list("endpoint_id", "state", "n")}
        for pk, slug, name in endpoints:
            for state in Replica.ACTIVE:
                replicas.add_metric([slug, name, state], counts.get((pk, state), 0))
            figures = stats(pk)
            if figures is None:
                continue
            per_s.add_metric([slug, name], figures.requests_per_s)
            errors.add_metric([slug, name], figures.error_rate_pct)
            inflight.add_metric([slug, name], figures.inflight)
            waiting.add_metric([slug, name], figures.waiting)
            if figures.ttft_p95_ms is not None:
                ttft.add_metric([slug, name], figures.ttft_p95_ms)
            if figures.queue_p95_ms is not None:
                queue.add_metric([slug, name], figures.queue_p95_ms)
        yield from (replicas, per_s, errors, ttft, queue, inflight, waiting)

    def _latest_util(self, now) -> dict[tuple[int, int], float]:
        """(job, core) -> util_mean (percent) of the newest minute rolled up for it in
        the last few minutes."""
        recent = MetricMinute.objects.filter(minute__gte=now - timedelta(minutes=3), job__isnull=False, core__gte=0,
                                             job__status=S.RUNNING)
        recent = _scope(recent, self.team_ids, "job__team_id")
        newest = {(j, c): m for j, c, m in recent.values("job_id", "core").annotate(m=Max("minute"))
                  .values_list("job_id", "core", "m")}
        out = {}
        for job_id, core, minute, value in recent.values_list("job_id", "core", "minute", "util_mean"):
            if newest.get((job_id, core)) == minute:
                out[(job_id, core)] = value
        return out


def _teams_for(request: HttpRequest) -> set[int] | None:
    """None: every series; a set: those teams' series only. Http404 if not allowed."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        if settings.METRICS_TOKEN and hmac.compare_digest(token.encode(), settings.METRICS_TOKEN.encode()):
            return None
        user = token_user(token)
        if user is None:
            raise Http404("No such page")
        return None if user.is_staff else set(access.teams_of(user).values_list("pk", flat=True))
    if request.user.is_authenticated:
        user = request.user
        return None if user.is_staff else set(access.teams_of(user).values_list("pk", flat=True))
    if request.META.get("REMOTE_ADDR") in settings.METRICS_ALLOWED_IPS:
        return None
    raise Http404("No such page")


@require_safe
def metrics_view(request: HttpRequest) -> HttpResponse:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(_teams_for(request)))
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
