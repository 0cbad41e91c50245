"""Notification delivery under a flaky receiver and a killed worker.

    .venv/bin/python bench/notify.py [--events 10000]

A local webhook receiver (tests/notify_support.Receiver: verifies each signature from
the documented scheme, accepts each delivery id at most once) and the processes of
webapp/Procfile: the scheduler worker with beat (the sweep, a backstop) and two
notifier workers (celery -Q notify, threads). Events are raised through
jobs.notify.events.emit, each in its own transaction, as fast as this process can, to
one signed-webhook team subscription. After a warm-up (WARM_UP_EVENTS, not measured:
both notifiers connected and through their first deliveries), two phases in one run:

- baseline: --baseline-events events to the receiver while it answers every request
  (no failures, no outage, no kill): what the pipeline itself costs at this load.
- chaos: --events events while the receiver answers 500 to 30 % of requests at random
  and is down entirely (connection refused) for 10 s once 30 % of the events exist;
  at 60 % one notifier is killed with -9 (and started again). It waits until every
  delivery is delivered (or given up).

Last line, one JSON object: events, delivered_unique (receiver-accepted ids; target
= events), lost (events never accepted; target 0), duplicates_accepted (an id
accepted twice; target 0), redelivered_after_accept (requests repeating an id the
receiver had already accepted: a worker killed between the receiver's answer and its
record; the receiver dropped them), delivery_p95_s while the receiver is up (event
created to accepted, events created outside the outage; target < 5), and
delivery_p50_s / delivery_p95_s_all_events, deliveries_per_s (accepted per second from
the first event to the last acceptance), requests, wall_s; baseline_delivery_p50_s /
baseline_delivery_p95_s and baseline_events_per_s from the baseline phase;
p95_by_attempts (chaos events by the attempts their delivery took); loadavg (1, 5
and 15 minutes at start and end: the machine may be shared). Project defaults
throughout; its own database (neurondeck_bench_notify) and Redis db 11.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.support.harness import (  # noqa: E402
    CELERY, Bench, Processes, bench_run, log, percentile, redis_url,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--baseline-events", type=int, default=1_000)
    parser.add_argument("--outage-s", type=float, default=10.0)
    parser.add_argument("--fail-rate", type=float, default=0.30)
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    args = parser.parse_args()
    bench = Bench("neurondeck_bench_notify", redis_url("notify"), "bench-notify", workdir=Path())
    # The receiver listens on loopback, which the SSRF guard refuses unless allowed.
    with bench_run(bench, "bench-notify", NOTIFY_ALLOWED_NETWORKS="127.0.0.1/32") as procs:
        load_start = [round(x, 2) for x in os.getloadavg()]  # the machine is shared: say how busy it was
        result = run(args, bench, procs)
    result["loadavg"] = {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(result))


WARM_UP_EVENTS = 40


def notifier_argv(name: str) -> list[str]:
    """A notifier as webapp/Procfile runs it (two of them: notifier and notifier2)."""
    return [*CELERY, "-Q", "notify", "--pool", "threads", "-c", "8", "-n", f"bench-{name}@%h"]


def raise_events(count: int, team_id: int, created_at: dict[int, float], first: int = 0) -> float:
    """`count` events, each in its own transaction, as fast as this process can; returns the seconds taken."""
    from django.db import transaction

    from jobs.notify.events import emit

    t0 = time.time()
    for i in range(first, first + count):
        with transaction.atomic():
            note = emit("job.succeeded", team_id=team_id, title=f"bench event {i}", seq=i)
        created_at[note.pk] = note.created_at.timestamp()
    return time.time() - t0


def wait_delivered(receiver, timeout_s: float) -> None:
    from jobs.models import Delivery

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        open_count = Delivery.objects.filter(status="pending").count()
        if open_count == 0:
            return
        log(f"{open_count} deliveries open, {len(receiver.accepted)} accepted")
        time.sleep(2)


def run(args, bench: Bench, procs: Processes) -> dict:
    from django.contrib.auth import get_user_model

    from jobs.models import Delivery, Notification, Role, Subscription
    from jobs.teams.services import membership_set, team_create
    from tests.notify_support import Receiver

    receiver = Receiver(fail_rate=0.0, seed=20).start()
    user = get_user_model().objects.create_user("bench", "bench@example.com", "bench-password")
    team = team_create(slug="bench", name="Bench")
    membership_set(team=team, user=user, role=Role.MANAGER)
    sub = Subscription.objects.create(team=team, user=user, scope="team", channel="webhook",
                                      target=receiver.url("/hook"), events=["job.succeeded"])
    receiver.secrets["/hook"] = sub.secret

    procs.start("scheduler", [*CELERY, "-Q", "scheduler", "-B", "--pool", "solo", "-n", "bench-sched@%h",
                              "--schedule", str(bench.workdir / "beat-schedule")])
    procs.start("notifier", notifier_argv("notifier"))
    procs.start("notifier2", notifier_argv("notifier2"))
    # Warm-up, not measured: both notifiers connected and through their first deliveries
    # (imports, connections), so the baseline does not time their start-up.
    raise_events(WARM_UP_EVENTS, team.pk, {}, first=-WARM_UP_EVENTS)
    wait_delivered(receiver, args.timeout_s)
    warm_ids = set(receiver.accepted)

    # Baseline: a receiver that answers every request, nothing killed.
    base_created: dict[int, float] = {}
    base_s = raise_events(args.baseline_events, team.pk, base_created)
    wait_delivered(receiver, args.timeout_s)
    by_id = {str(d): n for d, n in Delivery.objects.values_list("delivery_id", "notification_id")}
    base_latencies = [receiver.accepted[d]["at"] - base_created[by_id[d]] for d in receiver.accepted
                      if by_id.get(d) in base_created]
    log(f"baseline: {len(base_latencies)} delivered, p95 {percentile(base_latencies, 95):.2f} s")
    base_ids = set(receiver.accepted) | warm_ids
    base_requests = receiver.requests
    receiver.fail_rate = args.fail_rate

    outage: list[float] = []  # [down_at, up_at]
    killed: list[float] = []
    created_at: dict[int, float] = {}

    def chaos() -> None:
        """The outage and the kill, timed against the events' progress."""
        while len(created_at) < args.events * 0.3:
            time.sleep(0.05)
        log("receiver down")
        outage.append(time.time())
        receiver.stop()
        time.sleep(args.outage_s)
        receiver.start()
        outage.append(time.time())
        log("receiver up")
        while len(created_at) < args.events * 0.6:
            time.sleep(0.05)
        proc = procs.procs["notifier"]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed.append(time.time())
        log("notifier killed with -9; starting it again")
        procs.start("notifier-again", notifier_argv("notifier-again"))

    t0 = time.time()
    chaos_thread = threading.Thread(target=chaos, daemon=True)
    chaos_thread.start()
    events_s = raise_events(args.events, team.pk, created_at, first=args.baseline_events)
    log(f"{args.events} events in {events_s:.1f} s")
    chaos_thread.join()
    wait_delivered(receiver, args.timeout_s)
    wall = time.time() - t0

    by_id = {str(d): n for d, n in Delivery.objects.values_list("delivery_id", "notification_id")}
    accepted = {by_id[k]: v["at"] for k, v in receiver.accepted.items() if k in by_id and k not in base_ids}
    down, up = outage
    latencies = [(accepted[n] - c) for n, c in created_at.items() if n in accepted]
    up_latencies = [accepted[n] - c for n, c in created_at.items() if n in accepted and not down <= c <= up]
    last = max(accepted.values()) if accepted else t0
    attempts = dict(Delivery.objects.filter(notification_id__in=list(created_at)).values_list(
        "notification_id", "attempts"))
    by_attempts = {}
    for n_attempts in sorted(set(attempts.values())):
        group = [accepted[n] - c for n, c in created_at.items() if n in accepted and attempts[n] == n_attempts]
        by_attempts[str(n_attempts)] = {"events": len(group), "p95_s": round(percentile(group, 95), 2)}
    return {
        "events": args.events,
        "delivered_unique": len(accepted),
        "lost": args.events - len(accepted),
        "duplicates_accepted": receiver.acceptances - len(receiver.accepted),
        "redelivered_after_accept": sum(receiver.repeats.values()),
        "given_up": Delivery.objects.filter(status="failed").count(),
        "delivery_p50_s": round(percentile(latencies, 50), 3),
        "delivery_p95_s": round(percentile(up_latencies, 95), 3),
        "delivery_p95_s_all_events": round(percentile(latencies, 95), 3),
        "deliveries_per_s": round(len(accepted) / max(last - t0, 1e-9), 1),
        "events_per_s": round(args.events / events_s, 1),
        "requests": receiver.requests - base_requests,
        "bad_signatures": receiver.bad_signatures,
        "outage_s": round(up - down, 1),
        "worker_killed_at_s": round(killed[0] - t0, 1) if killed else None,
        "notifications": Notification.objects.count() - args.baseline_events - WARM_UP_EVENTS,
        "wall_s": round(wall, 1),
        "baseline_events": args.baseline_events,
        "baseline_delivered": len(base_latencies),
        "baseline_events_per_s": round(args.baseline_events / base_s, 1),
        "baseline_delivery_p50_s": round(percentile(base_latencies, 50), 3),
        "baseline_delivery_p95_s": round(percentile(base_latencies, 95), 3),
        "p95_by_attempts": by_attempts,
    }


if __name__ == "__main__":
    main()
