"""Start-time estimates: the pure replay takes only time limits and history (never a
true runtime), agrees with the reservation, and is shown in the API, the job page
and the list."""
from __future__ import annotations

import inspect
from dataclasses import replace
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from jobs.lifecycle import forecasts, runtimes, scheduler
from jobs.live.store import redis
from jobs.models import Job
from jobs.tasks import estimate_starts_task
from jobs.quotas import backfill
from jobs.quotas.backfill import FleetState, Running, Waiting, forecast, runtime_ratio
from jobs.quotas.placement import HostSlots
from tests.conftest import api_client
from tests.polling import wait_until
from tests.test_backfill import running_job
from tests.test_scheduling import host, pending, set_family

pytestmark = pytest.mark.usefixtures("fresh_scheduler")

S = Job.Status


def test_the_estimator_is_pure_and_takes_only_limits_and_history():
    # The replay's inputs: Waiting (time limit + an estimated runtime the caller derived from
    # limit × ratio) and Running (an expected end). Nothing that could carry a true runtime.
    assert set(inspect.signature(forecast).parameters) == {"order", "state", "now", "horizon_s", "max_steps", "until",
                                                            "scan", "step"}
    assert list(Waiting._fields) == ["job_id", "team_id", "family", "cores", "limit_s", "runtime_s", "host_count",
                                     "same_network"]
    assert "finished_at" not in inspect.getsource(forecasts)
    # Where runtimes come from: only the history query reads finished_at, and only of finished jobs.
    ratios_src = inspect.getsource(runtimes.team_ratios)
    assert "status=Job.Status.SUCCEEDED" in ratios_src
    assert "django" not in inspect.getsource(backfill)


def test_two_fleets_that_differ_only_in_true_runtimes_get_the_same_estimates():
    def fleet():
        hosts = {0: HostSlots(0, "h0", "cpu", tuple(range(8)))}
        return FleetState(hosts, {1: Running(1, 1, "cpu", 0, tuple(range(8)), end=300)}, unlimited=True,
                          limit_end={1: 600})

    order = [Waiting(2, 1, "cpu", 4, 600, 300), Waiting(3, 2, "cpu", 8, 1200, 600)]
    a = forecast(order, fleet(), 0.0)
    b = forecast(order, fleet(), 0.0)  # the "true" runtimes of a simulator live elsewhere: same inputs, same answer
    assert a == b and a[2].start == 300 and a[3].start == 600


def test_runtime_ratio_is_the_time_limit_without_history_and_the_median_with_it():
    assert runtime_ratio([]) == (1.0, 1.0, 1.0)
    low, mid, high = runtime_ratio([(10, 100)] * 5 + [(50, 100)] * 5 + [(500, 100)])
    assert (low, mid, high) == (0.1, 0.5, 0.5)  # the 90th percentile of 11; an overrun counts as 1


def finished(team, user, limit_s: int, ran_s: int) -> None:
    end = timezone.now() - timedelta(hours=1)
    Job.objects.create(team=team, user=user, kind="inference", status=S.SUCCEEDED, max_runtime_s=limit_s,
                       started_at=end - timedelta(seconds=ran_s), finished_at=end)


def test_each_teams_ratio_comes_from_its_last_finished_jobs_only(cast):
    end = timezone.now() - timedelta(hours=1)

    def jobs(team, n: int, ran_s: int, ended) -> list[Job]:
        return [Job(team=team, user=cast.bob, kind="inference", status=S.SUCCEEDED, max_runtime_s=1000,
                    started_at=ended - timedelta(seconds=ran_s), finished_at=ended) for _ in range(n)]

    # vision: 30 old jobs ran their whole limit, the newest HISTORY_JOBS a tenth of it;
    # audio has 3 jobs (all of its history), and a team with none gets the limits themselves
    newest = runtimes.HISTORY_JOBS
    Job.objects.bulk_create(jobs(cast.vision, 30, 1000, end - timedelta(days=2))
                            + [j for i in range(newest) for j in jobs(cast.vision, 1, 100, end - timedelta(minutes=i))]
                            + jobs(cast.audio, 3, 500, end))
    ratios = runtimes.team_ratios({cast.vision.pk, cast.audio.pk, 10 ** 9})
    assert ratios[cast.vision.pk] == ((0.1, 0.1, 0.1), newest)
    assert ratios[cast.audio.pk] == ((0.5, 0.5, 0.5), 3)
    assert ratios[10 ** 9] == ((1.0, 1.0, 1.0), 0)


def no_replay_in_requests(monkeypatch) -> None:
    """From here on, a replay fails the test: pages and the API only read stored estimates."""
    def replay(*args, **kwargs):
        raise AssertionError("a request ran the start-time replay")

    monkeypatch.setattr(forecasts, "replay", replay)


def test_a_waiting_job_is_estimated_from_the_running_jobs_limits_corrected_by_history(cast, monkeypatch):
    host("cpu-a", "cpu", 4)
    set_family(cast.vision, "cpu", 8)
    for _ in range(5):
        finished(cast.vision, cast.bob, 1000, 500)  # the team's jobs run half their limit
    running_job(cast.vision, cast.bob, 4, 3600, 600)  # limit ends in 3000 s; expected in 1200 s
    waiting = pending(cast.vision, cast.bob, cores=4)
    scheduler.dispatch()
    before = timezone.now()
    assert estimate_starts_task() == {"estimated": 1, "scanned_through": None}  # what the periodic task does
    no_replay_in_requests(monkeypatch)
    body = api_client(cast.bob).get(f"/api/v1/jobs/{waiting.pk}/pending").json()
    est = body["estimate"]
    assert 1100 <= est["in_s"] <= 1200
    latest = (timezone.datetime.fromisoformat(est["latest"]) - timezone.now()).total_seconds()
    assert 2900 <= latest <= 3000  # the running job's time limit
    assert "50%" in est["basis"] and "last 5 finished" in est["basis"]
    computed_at = timezone.datetime.fromisoformat(est["computed_at"])
    assert before <= computed_at <= timezone.now() and est["age_s"] >= 0 and est["age"].startswith("estimated ")
    browser = Client()
    browser.force_login(cast.bob)
    page = browser.get(f"/jobs/{waiting.pk}/").content.decode()
    assert "Estimated start" in page and est["summary"].split(" (")[0] in page
    assert 'id="pending-estimate-age">estimated ' in page
    listing = browser.get(f"/teams/{cast.vision.slug}/jobs/").content.decode()
    assert "starts in about" in listing and " ago</span>" in listing


def test_a_job_waiting_only_behind_endpoint_replicas_says_so_instead_of_when_other_jobs_end(cast, monkeypatch):
    """Replicas have no time limit: a job that needs their cores has no estimate, and
    its estimate and hint used to say it starts "when other jobs end". A job that
    waits behind a job with a time limit still gets a start."""
    host("cpu-a", "cpu", 8)
    set_family(cast.vision, "cpu", 16)
    replica = running_job(cast.vision, cast.bob, 4, backfill.NO_TIME_LIMIT, 600)
    Job.objects.filter(pk=replica.pk).update(kind="serve")
    running_job(cast.vision, cast.bob, 4, 3600, 600)  # its cores are back within 3000 s
    fits_after_it = pending(cast.vision, cast.bob, cores=4)
    needs_the_replicas_cores = pending(cast.vision, cast.bob, cores=8)
    scheduler.dispatch()
    dry_run = scheduler.PendingRow(-1, cast.vision.pk, cast.vision.slug, "inference", "cpu", 8, timezone.now(),
                                   "submitted", "", 1800)
    assert forecasts.estimate_of(dry_run).summary == "no estimate (waiting for endpoint replicas to stop)"
    estimate_starts_task()
    no_replay_in_requests(monkeypatch)
    api = api_client(cast.bob)
    soon = api.get(f"/api/v1/jobs/{fits_after_it.pk}/pending").json()
    assert soon["estimate"]["estimated_start"] is not None and "replayed over the 2 jobs" in soon["estimate"]["basis"]
    never = api.get(f"/api/v1/jobs/{needs_the_replicas_cores.pk}/pending").json()
    assert never["reason_code"] == "no_free_cores_of_family"
    est = never["estimate"]
    assert est["estimated_start"] is None and est["summary"] == "no estimate (waiting for endpoint replicas to stop)"
    assert "cores held by endpoint replicas" in est["basis"] and "scaled down or stopped" in est["basis"]
    assert "replayed" not in est["basis"] and "scaled down or stopped" in never["hint"]
    browser = Client()
    browser.force_login(cast.bob)
    page = browser.get(f"/jobs/{needs_the_replicas_cores.pk}/").content.decode()
    assert "no estimate (waiting for endpoint replicas to stop)" in page


def test_an_estimate_says_how_old_it_is():
    now = timezone.now()
    estimate = forecasts.Estimate(now + timedelta(minutes=12), None, None, False, "basis",
                                  computed_at=now - timedelta(seconds=20))
    assert estimate.age == "estimated 20 s ago" and estimate.as_dict()["age_s"] == 20
    assert estimate.as_dict()["computed_at"] == estimate.computed_at.isoformat()
    assert forecasts.Estimate(None, None, None, False, "basis").age == ""


def test_before_the_first_run_pages_say_the_estimate_is_being_computed_and_ask_for_one_run(cast, monkeypatch):
    host("cpu-a", "cpu", 4)
    set_family(cast.vision, "cpu", 8)
    running_job(cast.vision, cast.bob, 4, 3600, 600)
    waiting = pending(cast.vision, cast.bob, cores=4)
    scheduler.dispatch()
    redis().delete("estimates")  # the estimator's Celery queue
    no_replay_in_requests(monkeypatch)
    api = api_client(cast.bob)
    est = api.get(f"/api/v1/jobs/{waiting.pk}/pending").json()["estimate"]
    assert est["summary"] == "estimate being computed" and est["computed_at"] is None
    assert est["estimated_start"] is None and "every 15 s" in est["basis"]
    browser = Client()
    browser.force_login(cast.bob)
    assert "estimate being computed" in browser.get(f"/jobs/{waiting.pk}/").content.decode()
    assert "estimate being computed" in browser.get(f"/teams/{cast.vision.slug}/jobs/").content.decode()
    # the task was asked for once (one kick per interval, however many pages ask), on its own queue
    assert redis().llen("estimates") == 1
    monkeypatch.undo()
    estimate_starts_task()
    est = api.get(f"/api/v1/jobs/{waiting.pk}/pending").json()["estimate"]
    assert est["computed_at"] is not None and est["summary"].startswith("in about")


def test_a_job_submitted_after_the_last_run_waits_for_the_next_and_an_old_runs_entry_is_not_shown(cast, monkeypatch):
    host("cpu-a", "cpu", 4)
    set_family(cast.vision, "cpu", 8)
    running_job(cast.vision, cast.bob, 4, 3600, 600)
    first = pending(cast.vision, cast.bob, cores=4)
    estimate_starts_task()
    Job.objects.filter(pk=first.pk).update(cancel_requested=True)  # being cancelled: no longer estimated
    estimate_starts_task()
    Job.objects.filter(pk=first.pk).update(cancel_requested=False)
    later = pending(cast.vision, cast.bob, cores=4)
    no_replay_in_requests(monkeypatch)
    api = api_client(cast.bob)
    for job in (first, later):  # the first run's entry of `first` is older than the last run
        est = api.get(f"/api/v1/jobs/{job.pk}/pending").json()["estimate"]
        assert est["summary"] == "estimate being computed", job


def test_jobs_behind_the_pending_scan_get_an_estimate_once_the_jobs_ahead_start_in_the_replay(cast, monkeypatch):
    host("cpu-a", "cpu", 4)
    set_family(cast.vision, "cpu", 8)
    running_job(cast.vision, cast.bob, 1, 3600, 600)  # its core is back by its limit in 3000 s (no history)
    jobs = [pending(cast.vision, cast.bob, cores=1) for _ in range(4)]
    monkeypatch.setattr(forecasts, "PENDING_SCAN", 2)
    assert estimate_starts_task() == {"estimated": 4, "scanned_through": jobs[1].pk}
    api = api_client(cast.bob)
    scanned = api.get(f"/api/v1/jobs/{jobs[1].pk}/pending").json()["estimate"]
    assert scanned["summary"] == "now" and "comes into view" not in scanned["basis"]
    # The third comes into view once the first two have started: now, in the pass after theirs.
    third = api.get(f"/api/v1/jobs/{jobs[2].pk}/pending").json()["estimate"]
    assert third["summary"] == "now" and "the oldest 2: in the replay this job comes into view" in third["basis"]
    # The fourth finds the host full: it starts when the running job's core comes back.
    fourth = api.get(f"/api/v1/jobs/{jobs[3].pk}/pending").json()["estimate"]
    assert 2900 <= fourth["in_s"] <= 3000 and fourth["computed_at"] is not None


def test_the_estimates_are_computed_every_interval_on_their_own_queue(settings):
    from webapp.celery import _beat_schedule, app

    entry = _beat_schedule()["estimate-starts"]
    assert entry["task"] == "jobs.estimate_starts" and entry["schedule"] == settings.ESTIMATES_EVERY_S
    assert app.amqp.router.route({}, "jobs.estimate_starts")["queue"].name == "estimates"


@pytest.mark.e2e
def test_a_page_that_finds_no_estimate_gets_one_from_the_estimator_process(transactional_db, cast, _storage,
                                                                            tmp_path):
    from tests.workers import Worker, process_env

    host("cpu-a", "cpu", 4)
    set_family(cast.vision, "cpu", 8)
    running_job(cast.vision, cast.bob, 4, 3600, 600)
    waiting = pending(cast.vision, cast.bob, cores=4)
    redis().delete("estimates")
    estimator = Worker(tmp_path / "estimator.log", process_env(storage_root=_storage), queues="estimates",
                       name="estimator", pool="solo", concurrency=1)
    estimator.start()
    try:
        api = api_client(cast.bob)
        assert api.get(f"/api/v1/jobs/{waiting.pk}/pending").json()["estimate"]["computed_at"] is None
        est = wait_until(lambda: api.get(f"/api/v1/jobs/{waiting.pk}/pending").json()["estimate"],
                         message="the estimator's estimate", until=lambda e: e["computed_at"] is not None)
        assert 2900 <= est["in_s"] <= 3000  # the running job's time limit (no history)
    finally:
        estimator.close()


def test_any_member_sees_the_fair_share_order_and_what_holds_the_teams_jobs_back(cast):
    host("cpu-a", "cpu", 4)
    set_family(cast.vision, "cpu", 1)
    first = pending(cast.vision, cast.bob, cores=1)
    second = pending(cast.vision, cast.bob, cores=1)
    scheduler.dispatch()
    assert Job.objects.get(pk=second.pk).reason_code == "waiting_for_quota" and first
    browser = Client()
    browser.force_login(cast.vera)  # a viewer
    page = browser.get("/teams/vision/").content.decode()
    assert 'id="fairshare-rank"' in page and "audio" in page
    assert "<code>waiting_for_quota</code>: 1 job asking for 1 core" in page


def test_a_dry_runs_estimate_stops_the_replays_at_its_start_and_is_the_whole_replays(cast):
    host("cpu-a", "cpu", 4)
    set_family(cast.vision, "cpu", 8)
    set_family(cast.audio, "cpu", 8)
    for _ in range(5):
        finished(cast.vision, cast.bob, 1000, 500)
    running_job(cast.vision, cast.bob, 4, 3600, 600)  # expected back in 1200 s, by its limit in 3000 s
    for _ in range(3):  # ahead of the dry run, and one behind it that would backfill
        pending(cast.vision, cast.bob, cores=2)
    scheduler.dispatch()
    row = scheduler.PendingRow(-1, cast.audio.pk, cast.audio.slug, "inference", "cpu", 4, timezone.now(),
                               "submitted", "", 1800)
    whole = forecasts._estimates(forecasts.Snapshot.read(row))
    assert len(whole) == 4 and whole[-1].start is not None and whole[-1].latest > whole[-1].start
    assert replace(forecasts.estimate_of(row), computed_at=None) == replace(whole[-1], computed_at=None)


def test_a_dry_runs_replay_is_bounded_and_says_so_when_its_job_starts_later(cast, monkeypatch):
    host("cpu-a", "cpu", 4)
    set_family(cast.vision, "cpu", 8)
    running_job(cast.vision, cast.bob, 4, 3600, 600)
    for _ in range(3):  # each needs the whole host: the dry run starts after four job ends
        pending(cast.vision, cast.bob, cores=4)
    row = scheduler.PendingRow(-1, cast.vision.pk, cast.vision.slug, "inference", "cpu", 4, timezone.now(),
                               "submitted", "", 1800)
    within = forecasts.estimate_of(row)
    assert within.start is not None and within.latest is not None
    monkeypatch.setattr(forecasts, "DRY_RUN_STEPS", 3)
    bounded = forecasts.estimate_of(row)
    # Three passes: now, when the running job's limit ends (in 3000 s), when the first
    # queued one's does; the next chance is when the second queued one's does.
    limit = Job.objects.filter(status=Job.Status.PENDING).values_list("max_runtime_s", flat=True).first()
    assert bounded.start is None and bounded.summary.startswith("in more than ")
    assert bounded.summary.endswith(" (as far as a dry run looks)")
    assert abs((bounded.earliest - timezone.now()).total_seconds() - (3000 + 2 * limit)) < 60
    assert bounded.earliest < within.start
    assert "within the 3 steps a dry run replays" in bounded.basis and "periodic estimates" in bounded.basis


def generated_fleet(rng, families=("cpu", "inf2", "trn1")):
    """Hosts of several families, each full of running jobs of three teams, and a
    queue of single-host jobs and gangs with quotas per team and family: (hosts,
    running, limit ends, quotas, order)."""
    hosts, running, limit_end, quotas, order = {}, {}, {}, {}, []
    for family in families:
        for _ in range(rng.randint(2, 5)):
            h = len(hosts)
            hosts[h] = HostSlots(h, f"h{h}", family, tuple(range(8)), network="pg0")
            first = 0
            while first < 8:
                n = min(rng.choice([1, 2, 4, 8]), 8 - first)
                job_id = 1000 + len(running)
                running[job_id] = Running(job_id, rng.randint(1, 3), family, h, tuple(range(first, first + n)),
                                          end=rng.uniform(60, 3600))
                limit_end[job_id] = running[job_id].end + rng.uniform(0, 3600)
                first += n
        for team in (1, 2, 3):
            quotas[(team, family)] = (rng.choice([0, 4, 8, 16]), rng.choice([0, 8, 32]))
    for job_id in range(1, 61):
        family, limit = rng.choice(families), rng.choice([600, 1800, 3600, 7200])
        gang = rng.random() < 0.15
        order.append(Waiting(job_id, rng.randint(1, 3), family, 16 if gang else rng.choice([1, 2, 4, 8]), limit,
                             limit * rng.uniform(0.2, 1), 2 if gang else 1))
    return hosts, running, limit_end, quotas, order


@pytest.mark.parametrize("seed", range(5))
def test_a_pass_decides_for_each_family_what_a_pass_over_that_family_alone_decides(seed):
    """What lets a replay (a dry run's, the periodic estimates') take one family at a
    time: hosts, holders, quotas (per team and family), reservations and backfill are
    each family's own, and a budget (per team, across families) does not change
    within a pass."""
    import random

    hosts, running, limit_end, quotas, order = generated_fleet(random.Random(seed))
    running = {k: r for k, r in running.items() if r.end > 1800}  # the others have ended: room for some
    budgets = {1: (10.0, 100.0), 2: (100.0, 100.0)}  # team 2's is used up: refused in every family
    whole = backfill.schedule_pass(order, FleetState(dict(hosts), dict(running), dict(quotas),
                                                     limit_end=dict(limit_end), budgets=budgets), 600.0)
    started, reasons, made = [], {}, {}
    for family in ("cpu", "inf2", "trn1"):
        state = FleetState({k: h for k, h in hosts.items() if h.family == family},
                           {k: r for k, r in running.items() if r.family == family},
                           {k: q for k, q in quotas.items() if k[1] == family}, limit_end=dict(limit_end),
                           budgets=budgets)
        alone = backfill.schedule_pass([w for w in order if w.family == family], state, 600.0)
        started += alone.started
        reasons.update(alone.reasons)
        made.update(alone.made)
    assert sorted(started, key=lambda r: r.job_id) == sorted(whole.started, key=lambda r: r.job_id)
    assert reasons == whole.reasons and made == whole.made
    assert whole.started and "budget_exhausted" in reasons.values()


class FrozenClock:
    """django.utils.timezone as forecasts reads it, stopped: replays read at different
    moments then start from the same `now`."""

    at = timezone.now()

    @classmethod
    def now(cls):
        return cls.at


def generated_queue(cast, rng) -> None:
    """Two families of hosts full of running jobs of two teams, one team with
    history, and 40 pending jobs of both teams and families."""
    from jobs.models import CoreAllocation

    now = timezone.now()
    teams = (cast.vision, cast.audio)
    for team in teams:
        finished(team, cast.bob, 1000, rng.choice([300, 700]))
    for family in ("cpu", "inf2"):
        for team in teams:
            set_family(team, family, rng.choice([4, 8, 16]), rng.choice([0, 8]))
        for i in range(3):
            h = host(f"{family}-{i}", family, 8)
            first = 0
            while first < 8:
                n, team = min(rng.choice([1, 2, 4]), 8 - first), rng.choice(teams)
                job = Job.objects.create(team=team, user=cast.bob, kind="finetune", family=family, cores=n,
                                         status=S.RUNNING, host=h, core_start=first, heartbeat_at=now,
                                         started_at=now - timedelta(seconds=rng.randint(0, 1800)),
                                         max_runtime_s=rng.choice([1800, 3600, 7200]))
                CoreAllocation.objects.bulk_create([CoreAllocation(host=h, core=c, job=job, team_id=team.pk,
                                                                   family=family, since=now)
                                                    for c in range(first, first + n)])
                first += n
    for _ in range(40):
        job = pending(rng.choice(teams), cast.bob, cores=rng.choice([1, 2, 4, 8]), family=rng.choice(["cpu", "inf2"]))
        Job.objects.filter(pk=job.pk).update(max_runtime_s=rng.choice([600, 1800, 3600]))


def test_a_dry_runs_bounded_estimate_is_the_unbounded_replays_whenever_it_gives_a_start(cast, monkeypatch):
    """Bounded: only its family read and replayed, the replays stopped at its start
    or after DRY_RUN_STEPS passes. Unbounded: the whole snapshot (every family) and
    the whole queue replayed, as the periodic estimates do."""
    import random

    generated_queue(cast, random.Random(7))
    scheduler.dispatch()
    monkeypatch.setattr(forecasts, "timezone", FrozenClock)
    rows = [scheduler.PendingRow(-1, team.pk, team.slug, "inference", family, cores, FrozenClock.at, "submitted",
                                 "", limit)
            for team in (cast.vision, cast.audio) for family in ("cpu", "inf2") for cores in (1, 4, 8)
            for limit in (600, 3600)]
    compared = longer = 0
    for steps in (forecasts.DRY_RUN_STEPS, 6, 2):
        monkeypatch.setattr(forecasts, "DRY_RUN_STEPS", steps)
        for row in rows:
            bounded = forecasts.estimate_of(row)
            whole = forecasts._estimates(forecasts.Snapshot.read(row))[-1]
            if bounded.start is not None:
                assert bounded == whole, (steps, row)
                compared += 1
            elif whole.start is not None:  # it waits longer than the bound: at least that long
                assert bounded.summary.startswith("in more than ") and bounded.earliest <= whole.start
                longer += 1
            else:  # the whole replay never starts it either (more cores than its team may hold)
                assert bounded.latest is None
    assert compared >= 30 and longer >= 10


def test_a_dry_run_reads_and_replays_only_its_family_and_at_most_the_pending_scan(cast, monkeypatch):
    host("cpu-a", "cpu", 4)
    host("inf2-a", "inf2", 8)
    set_family(cast.vision, "cpu", 8)
    set_family(cast.vision, "inf2", 8)
    running_job(cast.vision, cast.bob, 4, 3600, 600)
    for family in ("cpu", "inf2", "cpu"):
        pending(cast.vision, cast.bob, cores=4, family=family)
    read, replayed = [], []
    pending_rows, replay = scheduler.pending_rows, forecasts.replay

    def reading(limit=None):
        rows = pending_rows(limit)
        read.append(len(rows))
        return rows

    def replaying(snap, *args, **kwargs):
        replayed.append({h.family for h in snap.hosts.values()} | {h[1] for h in snap.holders.values()}
                        | {r.family for r in snap.order})
        return replay(snap, *args, **kwargs)

    monkeypatch.setattr(scheduler, "pending_rows", reading)
    monkeypatch.setattr(forecasts, "replay", replaying)
    monkeypatch.setattr(forecasts, "PENDING_SCAN", 4)
    row = scheduler.PendingRow(-1, cast.vision.pk, cast.vision.slug, "inference", "cpu", 4, timezone.now(),
                               "submitted", "", 1800)
    assert forecasts.estimate_of(row).start is not None
    assert read == [3] and replayed == [{"cpu"}] * 3  # three replays (low, median, time limits) of one family
    pending(cast.vision, cast.bob, cores=1, family="inf2")
    pending(cast.vision, cast.bob, cores=1, family="inf2")
    read.clear(), replayed.clear()
    behind = forecasts.estimate_of(row)  # it would be the sixth pending job: behind the oldest four
    assert read == [] and replayed == []
    assert behind.start is None and behind.summary == "no estimate in a dry run (behind the oldest 4 pending jobs)"
    assert "the scheduler looks at the oldest 4" in behind.basis and "periodic estimates" in behind.basis


def test_a_dry_run_behind_the_scan_starts_no_earlier_than_the_stored_estimates_bring_it_into_view(cast, monkeypatch):
    host("cpu-a", "cpu", 4)
    set_family(cast.vision, "cpu", 8)
    running_job(cast.vision, cast.bob, 4, 3600, 600)
    jobs = [pending(cast.vision, cast.bob, cores=4) for _ in range(5)]  # one at a time on the host
    monkeypatch.setattr(forecasts, "PENDING_SCAN", 4)
    row = scheduler.PendingRow(-1, cast.vision.pk, cast.vision.slug, "inference", "cpu", 4, timezone.now(),
                               "submitted", "", 1800)
    forecasts.clear_cache()
    assert forecasts.estimate_of(row).summary == "no estimate in a dry run (behind the oldest 4 pending jobs)"
    forecasts.store()
    # Six would be pending with it: it comes into view once two of the five have started.
    second = forecasts.stored([j.pk for j in jobs]).estimates[jobs[1].pk].start
    behind = forecasts.estimate_of(row)
    assert behind.start is None and behind.earliest == second
    assert behind.summary.startswith("in more than about ") and "(behind the oldest 4 pending jobs)" in behind.summary
    assert "once 2 of them have started" in behind.basis
