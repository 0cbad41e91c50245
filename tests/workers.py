"""Real processes the tests start: Celery workers and a private Redis server.

`Worker` is the one way a test starts a Celery worker: the `celery_worker_proc`
fixture (conftest) starts one against the shared test Redis, the fault tests start
several against a redis-server of their own (`RedisServer`: a free port, no
persistence), because they stop, flush and restart it and `kill -9` workers without
disturbing anybody else's broker. Workers are real `celery -A webapp worker`
subprocesses, each in its own session so a test can kill the worker and its zygote
(same process group) without touching job children, which live in sessions of
their own. Every subprocess reaches the test database (PostgreSQL or SQLite) through
`process_env`.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

from tests.polling import wait_until

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A throw-away redis-server on 127.0.0.1:<port>; start/stop/restart keep the port."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 15) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_until(self.ping, 10, message=f"redis-server on port {self.port}")

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=0.2).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """Stop hard (SIGKILL): whatever was in memory is gone, like a crashed server."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class Worker:
    """One `celery worker` subprocess serving `queues` as host `host` (NEURONDECK_HOST)."""

    def __init__(self, log_path: Path, env: dict[str, str], *, queues: str, name: str,
                 pool: str = "threads", concurrency: int = 4):
        self.log_path = log_path
        self.env = env
        self.queues, self.name, self.pool, self.concurrency = queues, name, pool, concurrency
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "Worker":
        log = open(self.log_path, "ab")
        self._log_start = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "webapp", "worker", "-Q", self.queues, "--pool", self.pool,
             "-c", str(self.concurrency), "--without-heartbeat", "--without-gossip", "--without-mingle",
             "-n", f"{self.name}-{os.getpid()}@%h", "--loglevel", "INFO"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()

        def started() -> bool:
            return b" ready." in self.output(since_start=True) or self.proc.poll() is not None

        try:
            wait_until(started, timeout, f"worker {self.name} to start")
        except AssertionError as exc:
            self.kill9()
            raise AssertionError(f"{exc}\n{self.tail()}") from None
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited:\n{self.tail()}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self, since_start: bool = False) -> bytes:
        data = self.log_path.read_bytes()
        return data[self._log_start:] if since_start else data

    def tail(self, chars: int = 4000) -> str:
        """The end of the worker's log, for failure messages."""
        return self.output().decode(errors="replace")[-chars:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL the worker's process group: the worker and its zygote, not job children."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown (SIGTERM: Celery finishes running tasks first); SIGKILL after `timeout`."""
        if not self.alive():
            return
        try:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
        except ProcessLookupError:
            pass

    def close(self, timeout: float = 15) -> None:
        """The end of a test: warm shutdown, then SIGKILL whatever is left of the
        worker's process group (its zygote)."""
        self.stop(timeout)
        self.kill9()


def database_url() -> str:
    """The URL of the database this test process uses (the test database once
    pytest-django has created it), for a subprocess to reach the same one."""
    from django.db import connection

    db = connection.settings_dict
    if connection.vendor == "sqlite":
        if connection.is_in_memory_db():
            raise RuntimeError("an in-memory SQLite test database cannot be shared with a subprocess; "
                               "settings.py gives SQLite test databases a file (DATABASES TEST NAME)")
        return f"sqlite:///{db['NAME']}"
    credentials = quote(db["USER"] or "", safe="")
    if db.get("PASSWORD"):
        credentials += ":" + quote(db["PASSWORD"], safe="")
    port = f":{db['PORT']}" if db.get("PORT") else ""
    return f"postgres://{credentials}@{db['HOST'] or ''}{port}/{db['NAME']}"


def process_env(*, storage_root: Path, host: str = "test-host", redis_url: str | None = None,
                **extra: str) -> dict[str, str]:
    """Environment for a subprocess (a worker, the agent) that works on the test
    database and storage as host `host`, with Redis at `redis_url` (default: this
    process's). Heartbeats every second; no persistent database connections (a
    subprocess left connected would keep PostgreSQL from dropping the test database).
    `extra` adds or overrides variables."""
    from django.conf import settings

    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url(), REDIS_URL=redis_url or settings.REDIS_URL,
        CELERY_BROKER_URL=redis_url or settings.CELERY_BROKER_URL, STORAGE_ROOT=str(storage_root),
        NEURONDECK_HOST=host, PYTHONPATH=str(ROOT), DB_CONN_MAX_AGE="0", HEARTBEAT_S="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def worker_env(*, redis_url: str, storage_root: Path, host: str, **extra: str) -> dict[str, str]:
    """`process_env` for the fault tests' workers: short leases, a 1 s kill grace and
    no zygote preload by default; `extra` overrides or adds (e.g.
    CELERY_VISIBILITY_TIMEOUT, RUNNER_MODE, JOB_KILL_GRACE_S)."""
    fast = dict(JOB_LEASE_S="4", QUEUED_RESEND_AFTER_S="2", JOB_KILL_GRACE_S="1",
                # The fake backends need no torch: an empty preload makes the zygote start in
                # milliseconds instead of seconds. Fork mode is still exercised.
                NEURONDECK_ZYGOTE_PRELOAD="")
    return process_env(storage_root=storage_root, host=host, redis_url=redis_url, **{**fast, **extra})


def point_celery_at(url: str) -> None:
    """Make this process's Celery app and live-Redis client use `url` from now on.

    The app reads its broker URL once, when it is first configured, and pools
    connections; tests that switch brokers must drop both."""
    from kombu import pools

    from jobs.live import store
    from webapp.celery import app

    app.conf.broker_url = url
    # kombu keeps process-wide pools keyed by URL: close and forget them all (a
    # restarted server on the same URL must not be reached through dead sockets),
    # then make the app build new ones.
    pools.reset()
    app._after_fork()
    store.redis.cache_clear()
