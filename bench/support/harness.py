"""What the benchmarks share: a throw-away database, a Redis db, the services they
start, the host heartbeat and small statistics helpers.

Each benchmark owns one PostgreSQL database (created and dropped around the run)
and one Redis db (flushed before and after), and holds a machine-wide lock so two
runs of the same benchmark never flush or drop each other's state.

The servers are named once, here, for every bench: BENCH_PG (a PostgreSQL server,
postgres://user@host:port) and BENCH_REDIS (a Redis server, redis://host:port; each
bench appends its own db number from REDIS_DBS).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432").rstrip("/")
REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379").rstrip("/")
# Appended to each Bench's database name: runs that share the PostgreSQL server but not
# Redis (so not the machine-wide lock, exclusive_run) must not drop each other's database.
DB_SUFFIX = os.environ.get("BENCH_DB_SUFFIX", "")
# Each bench's own Redis db on the BENCH_REDIS server, distinct so that different benches
# can run at once (usage.py reads pages.py's db, which neither flushes). Tests use db 15
# and `make run` db 0.
REDIS_DBS = {"train_scale": 3, "estimates": 6, "overhead": 7, "serve": 8, "pages": 9, "compile_cache": 10, "notify": 11,
             "monitor": 12, "fleet_sim": 13, "dispatch": 14}
# Variables this process needs for Django to point at the bench's own state.
DJANGO_ENV = ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "STORAGE_ROOT", "DJANGO_SETTINGS_MODULE",
              "SECRET_KEY", "DEBUG", "LOG_LEVEL")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def redis_url(bench: str) -> str:
    """The URL of `bench`'s own Redis db (REDIS_DBS) on the BENCH_REDIS server."""
    if urlsplit(REDIS).path:
        raise SystemExit(f"BENCH_REDIS={REDIS!r} names a db; give the server only (redis://host:port): "
                         "each bench uses its own db number")
    return f"{REDIS}/{REDIS_DBS[bench]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_range(count: int) -> int:
    """The first of `count` consecutive ports below the ephemeral range on which nothing
    listens now, for a service that derives its ports from a base (GANG_PORT_BASE)."""
    for _ in range(100):
        base = random.randrange(20000, 32000 - count, 2)
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports found between 20000 and 32000")


def exclusive_run(name: str):
    """Hold a machine-wide lock named `name` for these servers (BENCH_PG, BENCH_REDIS: a run
    on other servers shares no state) until the process exits (returns the handle)."""
    servers = hashlib.sha256(f"{PG} {REDIS}".encode()).hexdigest()[:12]
    handle = open(Path(tempfile.gettempdir()) / f"neurondeck-{name}-{servers}.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another {name} run is in progress; waiting for it to finish")
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


@dataclass
class Bench:
    """One benchmark's private state: database, Redis db, storage, host name."""

    db_name: str
    redis_url: str
    host: str
    workdir: Path

    def __post_init__(self):
        self.db_name += DB_SUFFIX

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    def environment(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=f"{PG}/{self.db_name}", REDIS_URL=self.redis_url, CELERY_BROKER_URL=self.redis_url,
            STORAGE_ROOT=str(self.storage), NEURONDECK_HOST=self.host, PYTHONPATH=str(ROOT),
            DJANGO_SETTINGS_MODULE="webapp.settings", DEBUG="0", SECRET_KEY="bench-" + uuid.uuid4().hex,
            LOG_LEVEL="WARNING",
        )
        env.update(extra)
        return env

    def setup(self, env: dict[str, str]) -> None:
        """Fresh database and Redis db; Django set up and migrated in this process."""
        import psycopg
        import redis

        os.environ.update({k: env[k] for k in DJANGO_ENV})
        redis.Redis.from_url(self.redis_url).flushdb()
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {self.db_name}")
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)

    def teardown(self) -> None:
        import psycopg
        import redis
        from django.db import connections

        connections.close_all()
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)")
        redis.Redis.from_url(self.redis_url).flushdb()


def seed_team(slots: int, host: str) -> tuple:
    """A member of team "bench" (room for any burst), a cpu Host with `slots` cores and
    the tiny model. Returns (team, user, model)."""
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from jobs.models import Host, Role, TeamQuota
    from jobs.assets.services import model_register
    from jobs.teams.services import membership_set, team_create
    from jobs.assets.uploads import model_meta
    from neuron_workers.backends.tinymodel import create_tiny_model

    user = get_user_model().objects.create_user("bench", "bench@example.com", "bench-password")
    team = team_create(slug="bench", name="Bench")
    membership_set(team=team, user=user, role=Role.MEMBER)
    TeamQuota.objects.filter(team=team).update(max_pending=1_000_000, monthly_core_hours=1e9)
    team.family_quotas.filter(family="cpu").update(guaranteed_cores=slots, borrow_limit=0)
    Host.objects.create(name=host, family="cpu", core_ids=list(range(slots)), backend="cpu",
                        memory_bytes=8 << 30, last_heartbeat=timezone.now())
    model_dir = create_tiny_model(Path(settings.STORAGE_ROOT) / "models" / "bench" / "tiny")
    model = model_register(team=team, user=user, name="tiny-gpt", path=model_dir, meta=model_meta(model_dir))
    return team, user, model


def heartbeat_host(stop: threading.Event, host: str, every_s: float = 5.0) -> None:
    """Do the host agent's one job that matters here: keep the host online (the reaper
    marks a host offline when its heartbeat is older than HOST_OFFLINE_AFTER_S)."""
    from django.db import connection
    from django.utils import timezone

    from jobs.models import Host

    try:
        while not stop.wait(every_s):
            Host.objects.filter(name=host).update(last_heartbeat=timezone.now(), state=Host.State.ONLINE)
    finally:
        connection.close()


def start_heartbeat(host: str) -> threading.Event:
    """Heartbeat `host` from a daemon thread until the returned event is set."""
    stop = threading.Event()
    threading.Thread(target=heartbeat_host, args=(stop, host), daemon=True).start()
    return stop


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _processes() -> Iterator[tuple[int, bytes, int, float]]:
    """(pid, command name, process group, CPU seconds: user+sys, own + reaped children)
    of every process now."""
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                head, tail = fh.read().rsplit(b")", 1)
        except OSError:
            continue
        fields = tail.split()
        yield int(entry), head.split(b"(", 1)[1], int(fields[2]), sum(int(x) for x in fields[11:15]) / tick


def _services_cpu(groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds now of each service in `groups` (name -> process group), "job
    processes", "redis" and "bench client" (see CpuMeter)."""
    totals = {name: 0.0 for name in [*groups, "job processes", "redis", "bench client"]}
    by_pgid = {pgid: name for name, pgid in groups.items()}
    worker = groups.get("worker")
    for pid, comm, pgid, used in _processes():
        if pgid == worker and pid != worker:
            totals["job processes"] += used  # the zygote, its spares and the jobs it reaped
        elif pgid in by_pgid:
            totals[by_pgid[pgid]] += used
        elif comm.startswith(b"redis-server"):
            totals["redis"] += used
        elif pid == os.getpid():
            totals["bench client"] += used
    return totals


def _backends_cpu(db_name: str) -> dict[int, float]:
    """CPU seconds now of each PostgreSQL backend serving `db_name`, by pid."""
    title = f" {db_name} ".encode()  # "postgres: 15/main: user db host(port) state"
    return {pid: used for pid, comm, _, used in _processes()
            if comm.startswith(b"postgres") and title in _cmdline(pid)}


class CpuMeter(threading.Thread):
    """CPU seconds (user+sys) each service spends between start() and stop(), which
    returns them: the live processes of each process group in `groups` (at both
    ends: a service's exited children are in its reaped time), the PostgreSQL
    backends serving `db_name` (other databases on the server are someone else's
    work; the server's own background processes are not counted) and the
    redis-server (shared: all its clients). Job children are reaped by the worker's
    zygote: "job processes" is the zygote's group-mates and everything they reaped,
    "worker" the Celery process alone.

    Nothing reaps a backend where it could be counted, and Django closes and opens
    connections all the time, so the backends are sampled every `every_s`: each
    counts up to the last sample that saw it (from its value at start() if it was
    already open, else from zero)."""

    def __init__(self, groups: dict[str, int], db_name: str, every_s: float = 0.1):
        super().__init__(daemon=True)
        self.groups, self.db_name, self.every_s = groups, db_name, every_s
        self.done = threading.Event()
        self.backends_before = _backends_cpu(db_name)
        self.backends = dict(self.backends_before)
        self.before = _services_cpu(groups)

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            self.backends.update(_backends_cpu(self.db_name))

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        self.backends.update(_backends_cpu(self.db_name))
        after = _services_cpu(self.groups)
        spent = {name: after[name] - self.before[name] for name in after}
        spent["postgres"] = sum(used - self.backends_before.get(pid, 0.0) for pid, used in self.backends.items())
        return spent


class Processes:
    """The started services (and host heartbeats); stop() ends exactly these (the
    services by their process groups)."""

    def __init__(self, logdir: Path, env: dict[str, str]):
        self.logdir, self.env = logdir, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.heartbeats: list[threading.Event] = []

    def heartbeat(self, host: str) -> None:
        """Keep `host` online (heartbeat_host) until stop()."""
        self.heartbeats.append(start_heartbeat(host))

    def start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> None:
        out = open(self.logdir / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(argv, cwd=ROOT, env={**self.env, **(extra_env or {})}, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        for beat in self.heartbeats:
            beat.set()
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def bench_run(bench: Bench, name: str, *, keep: bool = False, **extra_env: str) -> Iterator[Processes]:
    """One run of a benchmark that starts services: the machine-wide lock `name`
    (exclusive_run), a fresh workdir, database and Redis db (Bench.setup, with
    `extra_env` for the services), and the Processes it starts, yielded. On the way
    out, also on an error or Ctrl-C: services and heartbeats stopped, database
    dropped, Redis flushed, the workdir (logs) removed unless `keep`."""
    lock = exclusive_run(name)
    bench.workdir = Path(tempfile.mkdtemp(prefix=f"nd-{name}-"))
    env = bench.environment(**extra_env)
    bench.setup(env)
    procs = Processes(bench.workdir, env)
    try:
        yield procs
    finally:
        procs.stop()
        bench.teardown()
        if not keep:
            shutil.rmtree(bench.workdir, ignore_errors=True)
        lock.close()


CELERY = [PY, "-m", "celery", "-A", "webapp", "worker", "--without-gossip", "--without-mingle",
          "--without-heartbeat", "--loglevel", "WARNING"]


def start_workers(procs: Processes, host: str, slots: int, *extra: str) -> None:
    """A scheduler worker with beat (as in webapp/Procfile) and the host's job worker."""
    procs.start("scheduler", [*CELERY, "-Q", "scheduler", "-B", "--pool", "solo", "-n", "bench-scheduler@%h",
                              "--schedule", str(procs.logdir / "beat-schedule")])
    procs.start("worker", [*CELERY, "-Q", f"host.{host}", "--pool", "threads", "-c", str(slots),
                           "-n", "bench-worker@%h", *extra])


def wait_finished(ids: list[int], timeout: float, interval: float = 0.01) -> dict[int, tuple]:
    """Poll the database until every job is finished; {id: (status, started_at, finished_at, created_at)}."""
    from jobs.models import Job

    deadline = time.monotonic() + timeout
    while True:
        rows = {pk: (st, s, f, c) for pk, st, s, f, c in Job.objects.filter(pk__in=ids).values_list(
            "pk", "status", "started_at", "finished_at", "created_at")}
        if all(rows[pk][0] in Job.FINISHED for pk in ids):
            return rows
        if time.monotonic() > deadline:
            stuck = {pk: f"{st}: {reason}" for pk, st, reason in Job.objects.filter(pk__in=ids).exclude(
                status__in=Job.FINISHED).values_list("pk", "status", "reason")}
            raise RuntimeError(f"{len(stuck)} jobs did not finish in {timeout} s: {dict(list(stuck.items())[:10])}")
        time.sleep(interval)
