"""Notification delivery under a flaky receiver and a killed worker.

    .venv/bin/python bench/notify.py [--events 10000]

A local webhook receiver (tests/notify_support.Receiver: verifies each signature from
the documented scheme, accepts each delivery id at most once) answers 500 to 30 % of
requests at random and is down entirely (connection refused) for 10 s in the middle.
--events job events are raised through jobs.notify.events.emit, each in its own
transaction, as fast as this process can, to one signed-webhook team subscription;
the notifier worker (celery -Q notify, threads, as in webapp/Procfile) is killed with
-9 once while it works and started again; the scheduler worker with beat runs the
sweep. It waits until every delivery is delivered (or given up).

Last line, one JSON object: events, delivered_unique (receiver-accepted ids; target
= events), lost (events never accepted; target 0), duplicates_accepted (an id
accepted twice; target 0), redelivered_after_accept (requests repeating an id the
receiver had already accepted: a worker killed between the receiver's answer and its
record; the receiver dropped them), delivery_p95_s while the receiver is up (event
created to accepted, events created outside the outage; target < 5), and
delivery_p50_s / delivery_p95_s_all_events, deliveries_per_s (accepted per second from
the first event to the last acceptance), requests, wall_s. Project defaults
throughout; its own database (neurondeck_bench_notify) and Redis db 11.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.support.harness import CELERY, Bench, Processes, exclusive_run, log, percentile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--outage-s", type=float, default=10.0)
    parser.add_argument("--fail-rate", type=float, default=0.30)
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--no-kill", action="store_true")
    args = parser.parse_args()
    _lock = exclusive_run("bench-notify")  # noqa: F841 - held until exit
    bench = Bench("neurondeck_bench_notify", os.environ.get("BENCH_NOTIFY_REDIS_URL", "redis://127.0.0.1:6379/11"),
                  "bench-notify", Path(tempfile.mkdtemp(prefix="nd-bench-notify-")))
    # The receiver listens on loopback, which the SSRF guard refuses unless allowed.
    env = bench.environment(NOTIFY_ALLOWED_NETWORKS="127.0.0.1/32")
    bench.setup(env)
    procs = Processes(bench.workdir, env)
    try:
        result = run(args, bench, procs)
    finally:
        procs.stop()
        bench.teardown()
    print(json.dumps(result))


def notifier_argv() -> list[str]:
    return [*CELERY, "-Q", "notify", "--pool", "threads", "-c", "8", "-n", "bench-notify@%h"]


def run(args, bench: Bench, procs: Processes) -> dict:
    from django.contrib.auth import get_user_model
    from django.db import transaction

    from jobs.models import Delivery, Notification, Role, Subscription
    from jobs.notify.events import emit
    from jobs.teams.services import membership_set, team_create
    from tests.notify_support import Receiver

    receiver = Receiver(fail_rate=args.fail_rate, seed=20).start()
    user = get_user_model().objects.create_user("bench", "bench@example.com", "bench-password")
    team = team_create(slug="bench", name="Bench")
    membership_set(team=team, user=user, role=Role.MANAGER)
    sub = Subscription.objects.create(team=team, user=user, scope="team", channel="webhook",
                                      target=receiver.url("/hook"), events=["job.succeeded"])
    receiver.secrets["/hook"] = sub.secret

    procs.start("scheduler", [*CELERY, "-Q", "scheduler", "-B", "--pool", "solo", "-n", "bench-sched@%h",
                              "--schedule", str(bench.workdir / "beat-schedule")])
    procs.start("notifier", notifier_argv())
    time.sleep(3)  # let the workers connect (a bench, not a test: start-up is not measured)

    outage: list[float] = []  # [down_at, up_at]
    killed: list[float] = []
    created_at: dict[int, float] = {}

    def chaos(started: float) -> None:
        """The outage and the kill, timed against the events' progress."""
        while len(created_at) < args.events * 0.3:
            time.sleep(0.05)
        log("receiver down")
        outage.append(time.time())
        if args.outage_s:
            receiver.stop()
            time.sleep(args.outage_s)
            receiver.start()
        outage.append(time.time())
        log("receiver up")
        while len(created_at) < args.events * 0.6:
            time.sleep(0.05)
        if args.no_kill:
            return
        proc = procs.procs["notifier"]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed.append(time.time())
        log("notifier killed with -9; starting another")
        procs.start("notifier-2", notifier_argv())

    t0 = time.time()
    chaos_thread = threading.Thread(target=chaos, args=(t0,), daemon=True)
    chaos_thread.start()
    for i in range(args.events):
        with transaction.atomic():
            note = emit("job.succeeded", team_id=team.pk, title=f"bench event {i}", seq=i)
        created_at[note.pk] = note.created_at.timestamp()
    log(f"{args.events} events in {time.time() - t0:.1f} s")
    chaos_thread.join()

    deadline = time.time() + args.timeout_s
    while time.time() < deadline:
        open_count = Delivery.objects.filter(status="pending").count()
        if open_count == 0:
            break
        log(f"{open_count} deliveries open, {len(receiver.accepted)} accepted")
        time.sleep(2)
    wall = time.time() - t0

    by_id = {str(d): n for d, n in Delivery.objects.values_list("delivery_id", "notification_id")}
    accepted = {by_id[k]: v["at"] for k, v in receiver.accepted.items() if k in by_id}
    down, up = outage
    latencies = [(accepted[n] - c) for n, c in created_at.items() if n in accepted]
    up_latencies = [accepted[n] - c for n, c in created_at.items() if n in accepted and not down <= c <= up]
    last = max(accepted.values()) if accepted else t0
    attempts = dict(Delivery.objects.values_list("notification_id", "attempts"))
    for n_attempts in sorted(set(attempts.values())):
        group = [accepted[n] - c for n, c in created_at.items() if n in accepted and attempts[n] == n_attempts]
        log(f"attempts={n_attempts}: {len(group)} events, p50 {percentile(group, 50):.2f} s, "
            f"p95 {percentile(group, 95):.2f} s")
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
        "requests": receiver.requests,
        "bad_signatures": receiver.bad_signatures,
        "outage_s": round(up - down, 1),
        "worker_killed_at_s": round(killed[0] - t0, 1) if killed else None,
        "notifications": Notification.objects.count(),
        "wall_s": round(wall, 1),
    }


if __name__ == "__main__":
    main()
