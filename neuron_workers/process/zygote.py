"""The supervising process's side of its zygote: start it, ask it for job processes.

A zygote is a fresh interpreter that has imported torch, transformers and the cpu
backend once (its *preload*) and then forks one process per job on request, so a
cpu job starts with a fork instead of an interpreter and those imports. Each
supervising process (a Celery worker process) owns one, created lazily
(:func:`default_zygote`). The zygote itself is :mod:`neuron_workers.process.zygote_server`.

It is started with ``subprocess`` and forks with ``os.fork``, so it works when the
supervising process is a daemonic multiprocessing / Celery prefork child, where
``multiprocessing.Process.start()`` refuses to create children.

Switches (:mod:`neuron_workers.config`, read when a Zygote is created):
NEURONDECK_ZYGOTE_PRELOAD (what the zygote imports), NEURONDECK_WARM_RUNNERS
(idle warm runners kept) and NEURONDECK_RUNNER_JOBS (jobs per process at most).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neuron_workers import config
from neuron_workers.process import channel

logger = logging.getLogger(__name__)

# Entries are modules to import, or "module:function" to import and call: a warm-up
# whose effects every forked job inherits (see neuron_workers.process.zygote_warmup).
DEFAULT_PRELOAD = config.DEFAULT_ZYGOTE_PRELOAD

PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


class ZygoteError(RuntimeError):
    """The zygote could not be started, stopped answering, or lost a job at start-up."""


def pythonpath_with_project(existing: str | None) -> str:
    """PYTHONPATH with the project first, so ``neuron_workers`` imports from any cwd."""
    parts = [p for p in (existing or "").split(os.pathsep) if p]
    if PROJECT_ROOT not in parts:
        parts.insert(0, PROJECT_ROOT)
    return os.pathsep.join(parts)


class Zygote:
    """A preloaded fork server owned by *this* process.

    ``start()`` runs the zygote and waits until its preload is done; ``spawn()``
    makes it start a job process (``spares`` idle processes are kept pre-forked,
    so a request does not wait for a fork). Thread-safe. The zygote exits when
    this process closes its end of the control socket, including when this
    process dies; running jobs are not its business then: each one notices
    through its own lifeline.
    """

    def __init__(self, preload: Sequence[str] = DEFAULT_PRELOAD, *, spares: int = 1, start_timeout_s: float = 300.0,
                 model_cache: bool = True, warm_runners: int | None = None, runner_jobs: int | None = None) -> None:
        self.preload = tuple(preload)
        self.spares = spares
        self.warm_runners = config.warm_runners() if warm_runners is None else warm_runners
        self.runner_jobs = config.runner_jobs() if runner_jobs is None else runner_jobs
        self.model_cache = model_cache
        self.start_timeout_s = start_timeout_s
        self.owner_pid = os.getpid()
        self.info: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._sock is not None and self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the zygote (blocking until its preload finished). Idempotent."""
        with self._lock:
            if not self.running:
                self._start_locked()

    def _start_locked(self) -> None:
        self._close_locked()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env["PYTHONPATH"] = pythonpath_with_project(env.get("PYTHONPATH"))
        code = f"from neuron_workers.process import zygote_server; zygote_server.main({theirs.fileno()})"
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()], env=env,
                                          stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._sock = ours
        hello = {"sys_path": [os.path.abspath(p) if p else os.getcwd() for p in sys.path],
                 "preload": list(self.preload), "spares": self.spares, "model_cache": self.model_cache,
                 "warm_runners": self.warm_runners, "runner_jobs": self.runner_jobs}
        ours.send(json.dumps(hello).encode())
        ours.settimeout(self.start_timeout_s)
        try:
            reply = ours.recv(1 << 16)
        except socket.timeout as exc:
            self._close_locked()
            raise ZygoteError(f"zygote did not finish preloading within {self.start_timeout_s} s") from exc
        finally:
            if self._sock is not None:
                self._sock.settimeout(None)
        if not reply:
            self._close_locked()
            raise ZygoteError("zygote exited during start-up (see the worker's stderr)")
        self.info = json.loads(reply)
        for error in self.info.get("preload_errors", []):
            logger.warning("zygote preload failed: %s", error)
        if self.info.get("threads", 1) > 1:
            logger.warning("zygote has %s threads after preload; fork may copy held locks", self.info["threads"])

    def spawn(self, request: dict, *, timeout_s: float = 30.0) -> tuple[int, socket.socket]:
        """Ask the zygote to start a job process; return (pid, its status channel).

        Returns only after the process has called setsid(), so ``killpg(pid, ...)``
        is valid from the first moment the caller knows the pid. Restarts a zygote
        that died, once.
        """
        data = json.dumps(request).encode()
        for attempt in (1, 2):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with self._lock:
                    if not self.running:
                        self._start_locked()
                    assert self._sock is not None
                    try:
                        socket.send_fds(self._sock, [data], [theirs.fileno()])
                    except OSError:
                        ours.close()
                        if attempt == 2:
                            raise
                        logger.warning("zygote gone; restarting it")
                        self._close_locked()
                        continue
            finally:
                theirs.close()
            try:
                return channel.await_started(ours, timeout_s), ours
            except channel.ChannelError as exc:
                raise ZygoteError(str(exc)) from exc
        raise AssertionError("unreachable")

    def forget(self) -> None:
        """In a forked copy of the owner: drop our copy of the socket, nothing else."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._proc = None
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close our end; the zygote exits on EOF. Running jobs are not touched."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


_default_zygote: Zygote | None = None
_default_zygote_lock = threading.Lock()


def default_zygote() -> Zygote:
    """This process's zygote, created lazily; a forked copy of this process gets its own."""
    global _default_zygote
    with _default_zygote_lock:
        # A zygote belongs to the process that started it: its socket is shared
        # with a forked copy of us, and interleaved requests would mix replies.
        if _default_zygote is None or _default_zygote.owner_pid != os.getpid():
            _default_zygote = Zygote(config.zygote_preload())
        return _default_zygote


def prewarm() -> None:
    """Start this process's zygote now (e.g. when a Celery worker is ready)."""
    default_zygote().start()


def _forget_inherited_zygote() -> None:
    # A forked copy of the owner must not keep the zygote's control socket open,
    # or the zygote would not notice its owner's exit.
    global _default_zygote, _default_zygote_lock
    _default_zygote_lock = threading.Lock()  # another thread may have held it at fork
    if _default_zygote is not None:
        _default_zygote.forget()
        _default_zygote = None


os.register_at_fork(after_in_child=_forget_inherited_zygote)
