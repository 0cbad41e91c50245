"""Live metrics against real PostgreSQL and Redis: a sample published by the agent
reaches the JSON endpoints with cursors; attribution to jobs by tag, pid and core
range end to end; the per-minute roll-up counts every entry exactly once; prune;
team scoping; and the live pages."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone as dt_timezone

import pytest
from django.test import Client
from django.utils import timezone

from conftest import api_client
from jobs.live import metrics
from jobs.lifecycle import states
from jobs.models import Host, Job, MetricMinute
from live_support import clean_streams, neuron_host, raw_lines, report, running_job, runtime  # noqa: F401
from neuron_workers.agent import Agent
from neuron_workers.readers.neuron_monitor import parse_report

MIN = 60_000


def minute_at(ms: int) -> datetime:
    """The MetricMinute.minute of a stream entry stamped `ms` (epoch milliseconds)."""
    return datetime.fromtimestamp(ms / 1000, tz=dt_timezone.utc)


def publish(host: Host, line: str, ts: float | None = None) -> None:
    assert Agent(host, placements_ttl=0).handle(parse_report(line, ts=ts))


def tagged_report(job: Job, cores: dict[int, float], pid: int = 111) -> str:
    return report(runtimes=[runtime(f"job-{job.pk}", pid, cores)])


def metrics_of(client: Client, job: Job, since: str | None = None) -> dict:
    url = f"/api/v1/jobs/{job.pk}/metrics" + (f"?since={since}" if since else "")
    response = client.get(url)
    assert response.status_code == 200, response.content
    return response.json()


def session(user) -> Client:
    client = Client()
    client.force_login(user)  # Client.login() passes no request, which the login lockout needs
    return client


# --- publish -> Redis -> endpoint -----------------------------------------------------

def test_published_points_reach_the_job_endpoint_and_the_cursor_returns_only_new_ones(cast, clean_streams):
    host = neuron_host()
    job = running_job(cast.vision, cast.bob, host, start=0, cores=8)
    util = {c: 50.0 + c for c in range(8)}
    for _ in range(3):
        publish(host, tagged_report(job, util))
    client = api_client(cast.bob)

    first = metrics_of(client, job)

    assert first["live"] and first["status"] == "running" and first["source"] == "stream"
    assert first["host"] == host.name and first["kind"] == "neuron" and first["replay"] is False
    assert first["cores"] == list(range(8))
    assert len(first["t"]) == 3 and first["t"] == sorted(first["t"])
    assert [series[-1] for series in first["util"]] == [util[c] for c in range(8)]
    assert first["lat_p50_ms"][-1] == pytest.approx(12.65) and first["lat_p99_ms"][-1] == pytest.approx(13.75)
    assert first["device_mem"][-1] > 0 and first["errors"] == [0, 0, 0]

    assert metrics_of(client, job, first["cursor"])["t"] == []
    publish(host, tagged_report(job, {c: 99.0 for c in range(8)}))
    later = metrics_of(client, job, first["cursor"])
    assert len(later["t"]) == 1 and later["t"][0] > first["t"][-1]
    assert [series for series in later["util"]] == [[99.0]] * 8
    assert later["cursor"] != first["cursor"]
    assert metrics_of(client, job, later["cursor"])["t"] == []


def test_attribution_by_tag_pid_and_core_range_reaches_each_jobs_endpoint(cast, clean_streams):
    host = neuron_host()
    tagged = running_job(cast.vision, cast.bob, host, start=0, cores=8)
    by_pid = running_job(cast.vision, cast.bob, host, start=8, cores=2, pid=4242)
    by_range = running_job(cast.vision, cast.bob, host, start=16, cores=4)
    line = report(runtimes=[
        runtime(f"job-{tagged.pk}", 100, {c: 80.0 for c in range(8)}),
        # Untagged, on a core outside its assignment: only its pid can name the job.
        runtime(None, 4242, {12: 60.0}),
        runtime(None, 555, {16: 40.0, 17: 41.0}),  # untagged, unknown pid: by core range
        runtime(None, 777, {24: 30.0, 25: 31.0}),  # nobody's: an orphan
        runtime("job-999999", 888, {28: 20.0}),  # tagged for a job not placed here
    ])
    publish(host, line)
    client = api_client(cast.bob)

    a, b, c = (metrics_of(client, job) for job in (tagged, by_pid, by_range))

    assert a["cores"] == list(range(8)) and all(s == [80.0] for s in a["util"])
    assert b["cores"] == [8, 9, 12]
    assert dict(zip(b["cores"], (s[0] for s in b["util"]))) == {8: 0.0, 9: 0.0, 12: 60.0}
    assert dict(zip(c["cores"], (s[0] for s in c["util"]))) == {16: 40.0, 17: 41.0, 18: 0.0, 19: 0.0}
    point = json.loads(clean_streams.xrevrange(metrics.job_key(by_range.pk), count=1)[0][1][b"d"])
    assert point["idle"] == [18, 19]

    host_view = client.get(f"/api/v1/hosts/{host.name}/metrics").json()
    assert host_view["used_by"] == {**{str(i): tagged.pk for i in range(8)}, "12": by_pid.pk,
                                    "16": by_range.pk, "17": by_range.pk}
    orphans = {(o["pid"], tuple(o["cores"]), o["reason"]) for o in host_view["orphans"]}
    assert orphans == {(777, (24, 25), "no_match"), (888, (28,), "unknown_job")}
    assert host_view["allocations"]["9"]["job"] == by_pid.pk
    assert host_view["allocations"]["16"]["team"] == "vision"
    assert host_view["util"][24] == [30.0] and host_view["util"][30] == [0.0]


def test_another_team_gets_a_404_for_a_jobs_metrics_and_a_member_does_not(cast, clean_streams):
    host = neuron_host()
    job = running_job(cast.vision, cast.bob, host, start=0, cores=2)
    publish(host, tagged_report(job, {0: 10.0, 1: 20.0}))

    assert api_client(cast.charlie).get(f"/api/v1/jobs/{job.pk}/metrics").status_code == 404
    assert session(cast.charlie).get(f"/api/v1/jobs/{job.pk}/metrics?since=0-0").status_code == 404
    assert api_client(cast.vera).get(f"/api/v1/jobs/{job.pk}/metrics").status_code == 200
    assert session(cast.alice).get(f"/api/v1/jobs/{job.pk}/metrics").json()["t"]
    assert Client().get(f"/api/v1/jobs/{job.pk}/metrics").status_code == 401


@pytest.mark.parametrize("since", ["yesterday", "12-x", "-5-0", "1-2-3"])
def test_a_cursor_that_is_not_a_stream_id_is_a_400_naming_since(cast, clean_streams, since):
    host = neuron_host()
    job = running_job(cast.vision, cast.bob, host, start=0, cores=1)

    response = api_client(cast.bob).get(f"/api/v1/jobs/{job.pk}/metrics", {"since": since})

    assert response.status_code == 400
    assert "since" in response.json()["errors"]
    assert api_client(cast.bob).get(f"/api/v1/hosts/{host.name}/metrics", {"since": since}).status_code == 400


def test_a_cursor_whose_points_were_trimmed_asks_the_client_to_reset(cast, clean_streams):
    host = neuron_host()
    job = running_job(cast.vision, cast.bob, host, start=0, cores=1)
    publish(host, tagged_report(job, {0: 1.0}))
    client = api_client(cast.bob)
    cursor = metrics_of(client, job)["cursor"]
    assert metrics_of(client, job, cursor)["reset"] is False
    for _ in range(5):
        publish(host, tagged_report(job, {0: 2.0}))
    clean_streams.xtrim(metrics.job_key(job.pk), maxlen=2, approximate=False)

    assert metrics_of(client, job, cursor)["reset"] is True
    assert metrics_of(client, job, "0-0")["reset"] is False  # an empty chart's cursor never resets


def test_the_first_load_of_an_hour_of_points_is_downsampled_and_following_is_raw(cast, clean_streams):
    host = neuron_host()
    job = running_job(cast.vision, cast.bob, host, start=0, cores=32)
    start = time.time() - 3600
    pipe = clean_streams.pipeline(transaction=False)
    for i in range(3600):
        point = {"ts": start + i, "kind": "neuron", "host": host.name,
                 "util": {str(c): float(i % 100) for c in range(32)},
                 "mem": {}, "device_mem": i, "host_mem": None, "lat_p50": None, "lat_p99": None,
                 "completed": 1, "errors": 0, "idle": []}
        pipe.xadd(metrics.job_key(job.pk), {"d": json.dumps(point)})
    pipe.execute()
    client = api_client(cast.bob)

    first = metrics_of(client, job)

    assert 300 <= len(first["t"]) <= metrics.MAX_POINTS
    assert first["resolution_s"] == pytest.approx(6.0)
    assert all(len(series) == len(first["t"]) for series in first["util"])
    assert first["completed"][0] == 6 and first["device_mem"][0] == 5  # counts summed, memory peaked
    assert first["util"][0][0] == pytest.approx(2.5)  # util averaged: mean of 0..5
    publish(host, tagged_report(job, {0: 77.0}))
    assert metrics_of(client, job, first["cursor"])["util"][0] == [77.0]


# --- hosts and fleet ------------------------------------------------------------------

def test_the_host_endpoint_names_only_the_callers_own_jobs(cast, clean_streams):
    host = neuron_host()
    job = running_job(cast.vision, cast.bob, host, start=0, cores=2)
    publish(host, tagged_report(job, {0: 10.0, 1: 20.0}))

    seen_by_charlie = api_client(cast.charlie).get(f"/api/v1/hosts/{host.name}/metrics").json()
    seen_by_admin = api_client(cast.admin).get(f"/api/v1/hosts/{host.name}/metrics").json()

    assert seen_by_charlie["allocations"]["0"]["job"] is None and seen_by_charlie["allocations"]["0"]["team"] is None
    assert seen_by_charlie["used_by"] == {"0": None, "1": None}
    assert seen_by_admin["allocations"]["0"]["job"] == job.pk and seen_by_admin["used_by"]["1"] == job.pk
    assert seen_by_admin["host"]["name"] == host.name and seen_by_admin["ecc"]["mem_uncorrected"] == 0
    vcpu = json.loads(raw_lines()[0])["system_data"]["vcpu_usage"]["average_usage"]
    assert seen_by_admin["vcpu_busy"][0] == pytest.approx(vcpu["user"] + vcpu["system"])
    assert api_client(cast.bob).get("/api/v1/hosts/no-such-host/metrics").status_code == 404


def test_the_hosts_list_has_state_allocations_and_current_utilization(cast, clean_streams):
    host = neuron_host(replay=True)
    Host.objects.create(name="cpu-idle", family="cpu", core_ids=[0, 1])
    job = running_job(cast.vision, cast.bob, host, start=0, cores=4)
    publish(host, tagged_report(job, {0: 100.0, 1: 100.0}))

    hosts = {h["name"]: h for h in api_client(cast.bob).get("/api/v1/hosts").json()["hosts"]}

    assert hosts[host.name]["cores_allocated"] == 4 and hosts[host.name]["replay"] is True
    assert hosts[host.name]["util_mean"] == pytest.approx(200 / 32, abs=0.1)
    assert hosts["cpu-idle"]["util_mean"] is None and hosts["cpu-idle"]["cores_allocated"] == 0


def test_the_fleet_flags_allocated_but_idle_cores_and_filters_by_family(cast, clean_streams):
    trn = neuron_host("trn-fleet")
    inf = neuron_host("inf-fleet", cores=4, family="inf2")
    busy = running_job(cast.vision, cast.bob, trn, start=0, cores=2)
    running_job(cast.vision, cast.bob, trn, start=2, cores=2)  # holds cores 2-3, uses nothing
    publish(trn, tagged_report(busy, {0: 90.0, 1: 91.0}))
    client = api_client(cast.bob)

    fleet = client.get("/api/v1/fleet").json()
    row = next(h for h in fleet["hosts"] if h["name"] == "trn-fleet")
    assert row["held"][:5] == [True, True, True, True, False]
    assert row["idle"][:5] == [False, False, True, True, False]
    assert row["util"][:3] == [90.0, 91.0, 0.0]
    assert row["job"][0] == busy.pk
    assert next(h for h in fleet["hosts"] if h["name"] == "inf-fleet")["util"] == [None] * 4  # no sample
    assert sorted(fleet["families"]) == ["inf2", "trn1"]

    only_inf = client.get("/api/v1/fleet", {"family": "inf2"}).json()
    assert [h["name"] for h in only_inf["hosts"]] == [inf.name]
    bad = client.get("/api/v1/fleet", {"family": "gpu"})
    assert bad.status_code == 400 and "family" in bad.json()["errors"]


def test_the_live_endpoints_are_in_the_api_schema(cast):
    paths = api_client(cast.bob).get("/api/v1/openapi.json").json()["paths"]
    for path in ("/api/v1/jobs/{job_id}/metrics", "/api/v1/hosts", "/api/v1/hosts/{name}/metrics", "/api/v1/fleet"):
        assert "get" in paths[path], path
    params = {p["name"] for p in paths["/api/v1/jobs/{job_id}/metrics"]["get"]["parameters"]}
    assert {"job_id", "since"} <= params


# --- roll-up --------------------------------------------------------------------------

def job_point(host: Host, ts_ms: int, util: dict[str, float], *, mem: int, p50: float, p99: float,
              errors: int) -> dict:
    return {"ts": ts_ms / 1000, "kind": "neuron", "host": host.name, "util": util,
            "mem": {core: mem for core in util}, "device_mem": mem * len(util), "host_mem": 1 << 30,
            "lat_p50": p50, "lat_p99": p99, "completed": 10, "errors": errors, "idle": []}


def host_point(ts_ms: int, util: dict[str, float], used: int) -> dict:
    return {"ts": ts_ms / 1000, "kind": "neuron", "util": util, "mem": {}, "job": {},
            "vcpu": {"user": 10.0, "system": 5.0, "idle": 85.0}, "host_mem": {"total": 100, "used": used},
            "ecc": {"mem_corrected": 1, "mem_uncorrected": 0, "sram_corrected": 0, "sram_uncorrected": 0},
            "orphans": [], "idle": {}, "errors": []}


def xadd(r, key: str, ms: int, point: dict) -> None:
    r.xadd(key, {"d": json.dumps(point)}, id=f"{ms}-0")


def rows(**filters) -> dict:
    return {(m.minute, m.core): m for m in MetricMinute.objects.filter(**filters)}


def test_the_rollup_aggregates_whole_minutes_and_counts_every_entry_once(cast, clean_streams):
    r = clean_streams
    host = neuron_host()
    job = running_job(cast.vision, cast.bob, host, start=0, cores=2)
    m1 = (int(time.time() * 1000) // MIN - 10) * MIN
    m2 = m1 + MIN
    jkey, hkey = metrics.job_key(job.pk), metrics.host_key(host.name)
    for i, (u0, u1, p50, p99, errs) in enumerate([(10, 50, .010, .020, 0), (20, 60, .012, .030, 1),
                                                  (30, 70, .014, .025, 2)]):
        xadd(r, jkey, m1 + 1000 * (i + 1), job_point(host, m1, {"0": u0, "1": u1}, mem=100 + i, p50=p50, p99=p99,
                                                     errors=errs))
        xadd(r, hkey, m1 + 1000 * (i + 1), host_point(m1, {"0": u0, "1": u1}, used=40 + i))
    for i in range(2):
        xadd(r, jkey, m2 + 1000 * (i + 1), job_point(host, m2, {"0": 90, "1": 90}, mem=1, p50=.1, p99=.2, errors=0))
        xadd(r, hkey, m2 + 1000 * (i + 1), host_point(m2, {"0": 90, "1": 90}, used=50))

    first = metrics.rollup(upto_ms=m2)

    assert (first.entries, first.rows) == (6, 6)  # 3 job + 3 host entries; cores 0, 1, -1 for each
    jobs = rows(job=job)
    minute = minute_at(m1)
    assert set(jobs) == {(minute, 0), (minute, 1), (minute, -1)}
    core0, whole = jobs[(minute, 0)], jobs[(minute, -1)]
    assert (core0.util_mean, core0.util_peak, core0.mem_bytes, core0.samples) == (20.0, 30.0, 102, 3)
    assert whole.util_mean == pytest.approx(40.0) and whole.mem_bytes == 204
    assert whole.lat_p50 == pytest.approx(0.012) and whole.lat_p99 == pytest.approx(0.030)
    assert whole.errors == 3 and whole.host_id == host.pk
    hosts = rows(job__isnull=True, host=host)
    assert hosts[(minute, 1)].util_mean == pytest.approx(60.0) and hosts[(minute, -1)].util_mean == pytest.approx(15.0)
    assert hosts[(minute, -1)].mem_bytes == 42 and hosts[(minute, -1)].errors == 1  # ECC: cumulative, not summed

    again = metrics.rollup(upto_ms=m2)
    assert again.entries == 0 and MetricMinute.objects.count() == 6

    later = metrics.rollup(upto_ms=m2 + MIN)
    assert later.entries == 4
    assert rows(job=job)[(minute_at(m2), 0)].samples == 2
    assert rows(job=job)[(minute, 0)].samples == 3

    # A run that died after writing but before moving its cursors is repeated: the
    # rows are replaced by identical ones, nothing is counted twice.
    r.delete(metrics.ROLLUP_CURSORS)
    repeated = metrics.rollup(upto_ms=m2 + MIN)
    assert repeated.entries == 10
    assert MetricMinute.objects.count() == 12
    assert rows(job=job)[(minute, 0)].samples == 3 and rows(job=job)[(minute_at(m2), -1)].samples == 2
    assert rows(job__isnull=True, host=host)[(minute, 0)].samples == 3


def test_the_rollup_leaves_the_current_minute_for_later_and_skips_while_another_runs(cast, clean_streams):
    host = neuron_host()
    job = running_job(cast.vision, cast.bob, host, start=0, cores=1)
    publish(host, tagged_report(job, {0: 5.0}))

    assert metrics.rollup().entries == 0  # the minute is not over on Redis's clock
    assert not MetricMinute.objects.exists()
    with clean_streams.lock(metrics.ROLLUP_LOCK, timeout=5):
        assert metrics.rollup(upto_ms=metrics.redis_ms() + MIN).skipped
    from jobs.tasks import rollup_metrics_task

    assert rollup_metrics_task()["skipped"] == ""


# --- prune and stored history ---------------------------------------------------------

def test_prune_drops_rolled_up_streams_of_finished_jobs_and_old_entries(cast, clean_streams):
    r = clean_streams
    host = neuron_host()
    done = running_job(cast.vision, cast.bob, host, start=0, cores=1)
    live = running_job(cast.vision, cast.bob, host, start=1, cores=1)
    now = metrics.redis_ms()
    old = (now // MIN - 120) * MIN  # two hours ago
    for i in range(3):
        xadd(r, metrics.job_key(done.pk), old + 1000 * i, job_point(host, old, {"0": 30.0}, mem=1, p50=.1, p99=.2,
                                                                  errors=0))
        xadd(r, metrics.job_key(live.pk), old + 1000 * i, job_point(host, old, {"1": 60.0}, mem=1, p50=.1, p99=.2,
                                                                  errors=0))
        xadd(r, metrics.host_key("ghost"), old + 1000 * i, host_point(old, {"0": 1.0}, used=1))
    assert states.mark_finished(done.pk, Job.Status.SUCCEEDED)
    Job.objects.filter(pk=done.pk).update(finished_at=timezone.now() - timezone.timedelta(hours=1))
    publish(host, report(runtimes=[runtime(f"job-{live.pk}", 1, {1: 61.0})]))  # a recent entry

    result = metrics.prune()

    assert set(result.deleted) == {metrics.job_key(done.pk), metrics.host_key("ghost")}
    assert not r.exists(metrics.job_key(done.pk))
    assert r.xlen(metrics.job_key(live.pk)) == 1 and result.trimmed >= 3
    assert MetricMinute.objects.filter(job=done, core=0).get().samples == 3  # rolled up before it was dropped

    done.refresh_from_db()
    history = metrics_of(api_client(cast.bob), done)
    assert history["source"] == "history" and history["live"] is False
    assert history["t"] == [old] and history["util"] == [[30.0]] and history["resolution_s"] == 60.0
    assert history["lat_p50_ms"] == [pytest.approx(100.0)]


def test_a_running_job_shows_stored_minutes_before_its_live_stream(cast, clean_streams):
    host = neuron_host()
    job = running_job(cast.vision, cast.bob, host, start=0, cores=1)
    early = (int(time.time() * 1000) // MIN - 90) * MIN
    MetricMinute.objects.create(host=host, job=job, minute=minute_at(early), core=0, util_mean=12.0, samples=60)
    publish(host, tagged_report(job, {0: 70.0}))

    data = metrics_of(api_client(cast.bob), job)

    assert data["source"] == "mixed"
    assert data["t"][0] == early and data["util"][0] == [12.0, 70.0]


# --- pages ----------------------------------------------------------------------------

def test_the_job_page_carries_its_charts_and_the_cursor_to_follow(cast, clean_streams):
    host = neuron_host(replay=True)
    job = running_job(cast.vision, cast.bob, host, start=0, cores=2)
    publish(host, tagged_report(job, {0: 1.0, 1: 2.0}))

    page = session(cast.bob).get(f"/jobs/{job.pk}/")

    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="job-live-charts"' in html and "plotly/plotly.min.js" in html and "live/live.js" in html
    assert ">replay</span>" in html
    config = json.loads(html.split('id="job-live-charts-config" type="application/json">')[1].split("</script>")[0])
    assert config["live"] and config["cursor"] != "0-0" and config["url"] == f"/api/v1/jobs/{job.pk}/metrics"
    assert [t["name"] for t in config["figures"]["util"]["data"]] == ["core 0", "core 1"]
    assert config["figures"]["util"]["data"][1]["y"] == [2.0]


def test_a_one_second_jobs_charts_span_seconds_and_bytes_not_a_millisecond_and_4_bytes(cast, clean_streams):
    host = neuron_host()
    job = running_job(cast.vision, cast.bob, host, start=0, cores=2)
    publish(host, tagged_report(job, {0: 1.0, 1: 2.0}))
    Job.objects.filter(pk=job.pk).update(status=Job.Status.SUCCEEDED, finished_at=timezone.now())

    html = session(cast.bob).get(f"/jobs/{job.pk}/").content.decode()
    config = json.loads(html.split('id="job-live-charts-config" type="application/json">')[1].split("</script>")[0])
    assert not config["live"] and config["points"] == 1
    [t] = config["figures"]["util"]["data"][0]["x"]
    for name, figure in config["figures"].items():
        low, high = figure["layout"]["xaxis"]["autorangeoptions"]["include"]
        assert low < t < high and high - low >= 10_000, name  # seconds around the sample, not Plotly's 1.5 ms
    memory = config["figures"]["mem"]["layout"]["yaxis"]
    assert max(memory.get("range") or memory["autorangeoptions"]["include"]) >= 1 << 20  # never 0B-4B


def test_the_host_pages_show_every_core_and_mark_a_replay(cast, clean_streams):
    host = neuron_host(replay=True)
    client = session(cast.bob)

    listing = client.get("/hosts/").content.decode()
    page = client.get(f"/hosts/{host.name}/")

    assert host.name in listing and "replay" in listing
    assert page.status_code == 200 and "replay" in page.content.decode()
    assert "host-live-config" in page.content.decode() and 'name="action"' not in page.content.decode()
    assert client.get("/hosts/nowhere/").status_code == 404


def test_only_staff_can_drain_and_undrain_a_host(cast):
    host = neuron_host()

    assert session(cast.alice).post(f"/hosts/{host.name}/drain/", {"action": "drain"}).status_code == 403
    admin = session(cast.admin)
    assert 'name="action" value="drain"' in admin.get(f"/hosts/{host.name}/").content.decode()
    assert admin.post(f"/hosts/{host.name}/drain/", {"action": "drain"}).status_code == 302
    assert Host.objects.get(pk=host.pk).state == Host.State.DRAINING
    assert admin.post(f"/hosts/{host.name}/drain/", {"action": "undrain"}).status_code == 302
    assert Host.objects.get(pk=host.pk).state == Host.State.ONLINE
    admin.post(f"/hosts/{host.name}/drain/", {"action": "explode"}, follow=True)
    assert Host.objects.get(pk=host.pk).state == Host.State.ONLINE


def test_the_fleet_page_draws_the_heatmap_and_refuses_an_unknown_family(cast, clean_streams):
    host = neuron_host()
    job = running_job(cast.vision, cast.bob, host, start=0, cores=2)
    publish(host, tagged_report(job, {0: 50.0}))
    client = session(cast.bob)

    page = client.get("/fleet/", {"family": "trn1"})
    figure = client.get("/fleet/figure.json", {"family": "trn1"}).json()

    assert page.status_code == 200 and "fleet-live-config" in page.content.decode()
    assert figure["figure"]["data"][0]["z"][0][:3] == [50.0, 0.0, 0.0]
    assert figure["figure"]["data"][2]["x"] == [1]  # core 1: allocated but idle
    assert figure["summary"]["idle"] == 1
    assert client.get("/fleet/", {"family": "gpu"}).status_code == 400
    assert client.get("/fleet/figure.json", {"family": "gpu"}).status_code == 400


def test_points_published_after_a_job_ended_are_not_the_jobs(cast, clean_streams):
    host = neuron_host()
    job = running_job(cast.vision, cast.bob, host, start=0, cores=1)
    publish(host, tagged_report(job, {0: 80.0}))
    assert states.mark_finished(job.pk, Job.Status.SUCCEEDED)
    job.refresh_from_db()
    # An agent that has not re-read its host's jobs yet still sends this one's cores.
    publish(host, tagged_report(job, {0: 0.0}), ts=job.finished_at.timestamp() + 10)

    data = metrics_of(api_client(cast.bob), job)
    metrics.rollup(upto_ms=(metrics.redis_ms() // MIN + 1) * MIN)

    assert data["util"] == [[80.0]] and data["live"] is False
    assert MetricMinute.objects.get(job=job, core=0).samples == 1
