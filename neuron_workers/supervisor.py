"""Start a job's runner in its own process group and supervise it to the end.

Django-free and Redis-free: the Celery task (``neuron_workers.tasks``) claims the
Job row and hands :func:`supervise` callbacks that touch the database and Redis.
Everything here talks to the child through its workdir (see
:mod:`neuron_workers.runner` for the file contract) and through signals.

Two launch modes:

``exec``
    ``python -m neuron_workers.runner workdir/payload.json`` in a new session.
    A clean interpreter: what Neuron hosts use, because the Neuron runtime reads
    ``NEURON_RT_VISIBLE_CORES`` once at init and must not inherit anything.
``fork`` (default for cpu)
    A per-supervising-process *zygote* (a fresh interpreter that has already
    imported torch, transformers and the cpu backend) forks one child per job.
    Start-up is a fork, not an interpreter + torch import. The zygote is started
    with ``subprocess`` and forks with ``os.fork``, so it works when the
    supervising process is a daemonic multiprocessing / Celery prefork child,
    where ``multiprocessing.Process.start()`` refuses to create children.

Both modes give the child ``os.setsid()`` (pgid == pid), stdout+stderr on
workdir/log.txt, stdin on /dev/null, cwd = workdir and the same environment
(the supervising process's environment at launch time + the payload's ``env``),
plus a *lifeline*: a pipe/socket end whose EOF tells the child that the
supervising process died, so an unsupervised job stops by itself instead of
running on next to the attempt the reaper will start (runner.Lifeline).

Why not a library: ``multiprocessing`` (fork or forkserver) refuses to start
children from daemonic processes and offers no session / lifeline / exit-status
forwarding for a process it did not fork itself; supervisord manages
long-running daemons, not one short process per job. What is left is small:
fork, setsid, killpg, waitpid, plus a zygote of ~150 lines.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from neuron_workers.runner import (
    LIFELINE_FD_ENV,
    LIFELINE_GRACE_ENV,
    LOG_FILE,
    METRICS_FILE,
    PAYLOAD_FILE,
    RESULT_FILE,
    STOP_FILE,
)

logger = logging.getLogger(__name__)

Mode = Literal["fork", "exec"]
Status = Literal["succeeded", "failed", "cancelled", "timed_out"]

TAG_VAR = "NEURON_PROCESS_TAG"
LOG_CHUNK = 64 * 1024
# Per poll we forward at most this much log so a chatty job cannot starve the
# heartbeat / cancel checks; the rest follows on the next polls.
LOG_BYTES_PER_POLL = 16 * LOG_CHUNK
# How long a SIGKILLed job may take to disappear before supervise() reports
# anyway (a process in uninterruptible sleep ignores even SIGKILL).
UNKILLABLE_GIVE_UP_S = 60.0
# A partial line (no newline yet, e.g. a progress bar) is held back this long
# before being forwarded anyway, so the live log does not look frozen.
PARTIAL_LINE_HOLD_S = 1.0

# Entries are modules to import, or "module:function" to import and call (a warm-up
# whose effects every forked job inherits; see neuron_workers.zygote_warmup).
DEFAULT_PRELOAD: tuple[str, ...] = ("torch", "transformers", "neuron_workers.backends.cpu",
                                    "neuron_workers.zygote_warmup:warm_up")
PRELOAD_ENV = "NEURONDECK_ZYGOTE_PRELOAD"
# "0" keeps the zygote's memory on 4 KiB pages (see _huge_pages).
HUGE_PAGES_ENV = "NEURONDECK_ZYGOTE_HUGE_PAGES"
# The zygote's own writes after each fork split some of its huge pages again
# (copy-on-write); it re-collapses them every this many forks (~2-8 ms).
HUGE_PAGES_EVERY_FORKS = 256

# "0": the zygote forks with os.fork() and runs every at-fork hook (see _fork_process).
RAW_FORK_ENV = "NEURONDECK_ZYGOTE_RAW_FORK"

# Warm runners (see _ZygoteServer): how many idle ones a zygote keeps (default 8),
# and how many jobs one process runs at most (default 100; "1": every job in a
# fresh process, as before warm runners).
WARM_RUNNERS_ENV = "NEURONDECK_WARM_RUNNERS"
RUNNER_JOBS_ENV = "NEURONDECK_RUNNER_JOBS"
WARM_IDLE_S = 30.0

_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


# --------------------------------------------------------------------- outcome


@dataclass
class Outcome:
    """How a supervised job ended.

    ``status``: succeeded | failed | cancelled | timed_out. cancelled / timed_out
    win over whatever the child reported once a stop was requested (``result`` is
    still filled if the child managed to return one, e.g. a partial checkpoint).
    ``exit_code`` is set for a normal exit, ``signal`` when the child was killed by
    a signal (then ``exit_code`` is None). A child that leaves no result.json is
    ``failed`` with ``error_code == "crashed"``. ``log_bytes`` is the size of
    log.txt, all of which was passed to ``on_log``.
    """

    status: Status
    exit_code: int | None
    signal: int | None
    result: dict | None
    error_code: str | None
    error: str | None
    log_bytes: int
    duration_s: float
    pid: int
    traceback: str | None = None


# ---------------------------------------------------------------- child handle


class ChildHandle:
    """A launched runner process. ``pgid == pid`` (the child called setsid).

    ``wait(timeout)`` returns True once the child has exited and been reaped;
    ``returncode`` then follows the subprocess convention (``-N`` = killed by
    signal N) or stays None if the exit status could not be learned (fork mode,
    zygote died meanwhile).
    """

    def __init__(self, pid: int, mode: Mode, workdir: Path, started_at: float) -> None:
        self.pid = pid
        self.pgid = pid
        self.mode = mode
        self.workdir = workdir
        self.started_at = started_at
        self.returncode: int | None = None
        self.exited = False
        # The job is over but its process lives on (a warm runner, alone in its
        # group): its group must not be signalled any more.
        self.released = False
        _live_handles.add(self)

    def wait(self, timeout: float | None) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        """Release fds, including the child's lifeline; never signals the child.

        Called by the handle itself once the child exited. Closing earlier tells
        the child that its supervisor is gone, and it stops by itself.
        """


class _ExecChild(ChildHandle):
    def __init__(self, popen: subprocess.Popen, lifeline_fd: int, workdir: Path, started_at: float) -> None:
        super().__init__(popen.pid, "exec", workdir, started_at)
        self._popen = popen
        self._lifeline_fd: int | None = lifeline_fd
        # A pidfd becomes readable the moment the child exits, so the supervisor
        # reacts to a 30 ms job in 30 ms instead of at its next poll tick.
        try:
            self._pidfd: int | None = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):
            self._pidfd = None

    def wait(self, timeout: float | None) -> bool:
        if self.exited:
            return True
        if self._pidfd is not None:
            select.select([self._pidfd], [], [], timeout)
            code = self._popen.poll()
        else:
            try:
                code = self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                code = None
        if code is not None:
            self.returncode, self.exited = code, True
            self.close()
        return self.exited

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self._lifeline_fd is not None:
            os.close(self._lifeline_fd)
            self._lifeline_fd = None


# Status channel between a fork-mode child, its zygote and the supervisor: a
# stream socket carrying fixed 17-byte records (kind, pid, value).
#   b"P": sent by the child itself right after setsid() -> pid is a group leader.
#   b"S": sent by the zygote after reaping the child; value = raw wait status.
#   b"D": sent by the child itself when its job is over but the process lives on
#         as a warm runner (see _ZygoteServer); value = the job's exit code. The
#         child is alone in its group then, and the supervisor closes its end.
_STATUS = struct.Struct("!cqq")


class _ForkChild(ChildHandle):
    def __init__(self, pid: int, status_sock: socket.socket, workdir: Path, started_at: float) -> None:
        super().__init__(pid, "fork", workdir, started_at)
        self._sock: socket.socket | None = status_sock
        self._buf = b""
        self._pidfd: int | None = None  # only used if the zygote is lost

    def wait(self, timeout: float | None) -> bool:
        if self.exited:
            return True
        if self._sock is not None:
            ready, _, _ = select.select([self._sock], [], [], timeout)
            if ready:
                self._read_status()
            return self.exited
        return self._wait_lost(timeout)

    def _read_status(self) -> None:
        assert self._sock is not None
        data = self._sock.recv(4096)
        if not data:
            # EOF without a status record: the zygote died, so nobody will reap
            # our child for us (init will). Fall back to watching the pid.
            logger.warning("zygote lost while job pid %s was running", self.pid)
            self._sock.close()
            self._sock = None
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except ProcessLookupError:
                self.exited = True
            except OSError:
                self._pidfd = None
            return
        self._buf += data
        while len(self._buf) >= _STATUS.size:
            kind, _pid, value = _STATUS.unpack_from(self._buf)
            self._buf = self._buf[_STATUS.size :]
            if kind in (b"S", b"D"):
                self.returncode = os.waitstatus_to_exitcode(value) if kind == b"S" else value
                self.exited = True
                self.released = kind == b"D"
                self.close()
                return

    def _wait_lost(self, timeout: float | None) -> bool:
        if self._pidfd is not None:
            ready, _, _ = select.select([self._pidfd], [], [], timeout)
            if ready:
                self.exited = True
                self.close()
        elif not _pid_alive(self.pid):
            self.exited = True
        else:
            time.sleep(min(timeout or 0.05, 0.05))
        return self.exited

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def _pid_alive(pid: int) -> bool:
    state = _proc_state(pid)
    return state is not None and state != "Z"


# ---------------------------------------------------------------------- zygote


class ZygoteError(RuntimeError):
    """The zygote could not be started or stopped answering."""


class Zygote:
    """Client side of a preloaded fork server owned by *this* process.

    ``start()`` runs a fresh interpreter that imports ``preload`` and then waits
    for requests on a SOCK_SEQPACKET socket; ``spawn()`` makes it fork a job
    child (``spares`` idle children are kept pre-forked, so a request does not
    wait for a fork). Thread-safe. The zygote exits when this process closes
    its end of the socket, including when this process dies. Jobs are not the
    zygote's business then: each one notices through its own lifeline.
    """

    def __init__(
        self,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        *,
        spares: int = 1,
        start_timeout_s: float = 300.0,
        model_cache: bool = True,
        warm_runners: int | None = None,
        runner_jobs: int | None = None,
    ) -> None:
        self.preload = tuple(preload)
        self.spares = spares
        self.warm_runners = int(os.environ.get(WARM_RUNNERS_ENV, 8)) if warm_runners is None else warm_runners
        self.runner_jobs = int(os.environ.get(RUNNER_JOBS_ENV, 100)) if runner_jobs is None else runner_jobs
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
            if self.running:
                return
            self._start_locked()

    def _start_locked(self) -> None:
        self._close_locked()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        # Reserve room in the zygote's *initial* environment block for the job
        # tag; see _EnvironSlot for why /proc/<pid>/environ needs this.
        env[TAG_VAR] = _ZYGOTE_TAG_PLACEHOLDER
        env["PYTHONPATH"] = _pythonpath_with_project(env.get("PYTHONPATH"))
        code = f"import neuron_workers.supervisor as s; s._zygote_main({theirs.fileno()})"
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", code],
                pass_fds=[theirs.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._sock = ours
        sys_path = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
        hello = {"sys_path": sys_path, "preload": list(self.preload), "spares": self.spares,
                 "model_cache": self.model_cache, "warm_runners": self.warm_runners, "runner_jobs": self.runner_jobs}
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
        """Ask the zygote to fork a job child; return (pid, status socket).

        Returns only after the child has called setsid(), so ``killpg(pid, ...)``
        is valid from the first moment the caller knows the pid.
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
                        if attempt == 2:
                            raise
                        logger.warning("zygote gone; restarting it")
                        self._close_locked()
                        ours.close()
                        continue
            finally:
                theirs.close()
            return self._await_pid(ours, timeout_s), ours
        raise ZygoteError("unreachable")

    @staticmethod
    def _await_pid(sock: socket.socket, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        buf = b""
        while len(buf) < _STATUS.size:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([sock], [], [], max(remaining, 0))
            if not ready:
                sock.close()
                raise ZygoteError(f"zygote did not start the job within {timeout_s} s")
            chunk = sock.recv(_STATUS.size - len(buf))
            if not chunk:
                sock.close()
                raise ZygoteError("zygote closed the status channel before the job started")
            buf += chunk
        kind, pid, value = _STATUS.unpack(buf)
        if kind == b"S":
            # The child died before it could report (e.g. its workdir vanished);
            # it never ran the job.
            raise ZygoteError(f"job child {pid} died during start-up (wait status {value})")
        return pid

    def _forget(self) -> None:
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
_live_handles: weakref.WeakSet[ChildHandle] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked copy of the supervising process (multiprocessing, a pool) must
    # not keep the jobs' lifelines or the zygote's control socket open: a job
    # would not notice the worker's death, the zygote its owner's exit.
    global _default_zygote, _default_zygote_lock
    _default_zygote_lock = threading.Lock()  # may have been held by another thread
    for handle in list(_live_handles):
        handle.close()
    _live_handles.clear()
    if _default_zygote is not None:
        _default_zygote._forget()
        _default_zygote = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def _preload_from_env() -> tuple[str, ...]:
    raw = os.environ.get(PRELOAD_ENV)
    if raw is None:
        return DEFAULT_PRELOAD
    return tuple(name.strip() for name in raw.split(",") if name.strip())


def default_zygote() -> Zygote:
    """This process's zygote (created lazily; a forked process gets its own).

    Preloads ``DEFAULT_PRELOAD`` unless ``NEURONDECK_ZYGOTE_PRELOAD`` (comma
    separated module names or ``module:function`` warm-ups, may be empty) says
    otherwise.
    """
    global _default_zygote
    with _default_zygote_lock:
        # A zygote belongs to the process that started it: its socket is shared
        # with a forked copy of us, and interleaved requests would mix replies.
        if _default_zygote is None or _default_zygote.owner_pid != os.getpid():
            _default_zygote = Zygote(_preload_from_env())
        return _default_zygote


def prewarm() -> None:
    """Start this process's zygote now (e.g. from Celery's worker_process_init)."""
    default_zygote().start()


# The zygote's placeholder tag value: long enough for any "job-<id>" tag, and
# not starting with "job-" so find_orphans never reports the zygote itself.
_ZYGOTE_TAG_PLACEHOLDER = "zygote" + "." * 122


class _EnvironSlot:
    """The bytes of ``NAME=value`` inside this process's *initial* env block.

    /proc/<pid>/environ shows the memory between env_start and env_end (the
    block the kernel built at exec); setenv()/os.environ never change it. A
    fork-mode job is never exec'd, so without help it would show the zygote's
    environment and find_orphans could not see it. The zygote therefore starts
    with a long placeholder value, and each forked child overwrites that value
    in place (its copy-on-write copy) with its own tag, NUL-padded.
    """

    def __init__(self, address: int, capacity: int) -> None:
        self.address = address
        self.capacity = capacity

    @classmethod
    def find(cls, name: str) -> _EnvironSlot | None:
        try:
            with open("/proc/self/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            # proc(5): env_start / env_end are fields 50 / 51; fields[0] is field 3.
            start, end = int(fields[47]), int(fields[48])
        except (OSError, IndexError, ValueError):
            return None
        block = ctypes.string_at(start, end - start)
        key = name.encode() + b"="
        if block.startswith(key):
            index = 0
        else:
            index = block.find(b"\0" + key) + 1
            if index == 0:
                return None
        value_at = index + len(key)
        value_end = block.find(b"\0", value_at)
        if value_end < 0:
            value_end = len(block)
        return cls(start + value_at, value_end - value_at)

    def write(self, value: str | None) -> bool:
        data = (value or "").encode()
        if len(data) > self.capacity:
            return False
        ctypes.memmove(self.address, data + b"\0" * (self.capacity - len(data)), self.capacity)
        return True


def _set_child_subreaper() -> None:
    # Orphans of a job (a daemonized helper whose parent died) are reparented to
    # the nearest subreaper instead of PID 1. In containers PID 1 often does not
    # reap (this dev VM's does not), leaving zombies forever; the zygote reaps.
    PR_SET_CHILD_SUBREAPER = 36
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _zygote_main(fd: int) -> None:
    """Zygote process body. Never returns; exits on EOF of the control socket ``fd``."""
    ctrl = socket.socket(fileno=fd)
    hello = json.loads(ctrl.recv(1 << 20))
    sys.path[:] = hello["sys_path"]
    # Ctrl-C in the worker's terminal goes to its whole process group, which
    # includes us; the worker decides what happens to jobs, not the terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_child_subreaper()
    errors = []
    import gc
    import importlib

    for module in ["neuron_workers.runner", *hello["preload"]]:
        try:
            name, _, function = module.partition(":")
            imported = importlib.import_module(name)
            if function:
                getattr(imported, function)()
        except BaseException as exc:  # noqa: BLE001 - a missing optional module must not kill the zygote
            errors.append(f"{module}: {type(exc).__name__}: {exc}")
    # Move the preloaded heap out of the collector's reach: a GC pass in a child
    # would otherwise write to every object header and copy most pages (COW).
    gc.collect()
    gc.freeze()
    huge = _huge_pages() if os.environ.get(HUGE_PAGES_ENV, "1") != "0" else None
    server = _ZygoteServer(ctrl, _EnvironSlot.find(TAG_VAR), spares=int(hello.get("spares", 1)),
                           model_cache=bool(hello.get("model_cache", True)), huge_pages=huge is not None,
                           warm_max=int(hello.get("warm_runners", 0)), reuse_jobs=int(hello.get("runner_jobs", 1)))
    ctrl.send(
        json.dumps(
            {
                "pid": os.getpid(),
                "preload_errors": errors,
                "threads": threading.active_count(),
                "tag_slot": server.slot is not None,
                "huge_page_regions": huge,
            }
        ).encode()
    )
    server.serve()
    # EOF: our owner is gone. Jobs keep running in their own sessions; we just
    # stop forwarding statuses (nobody could read them any more).
    os._exit(0)


class _ZygoteServer:
    """The zygote's request loop.

    Keeps ``spares`` pre-forked idle children: forking a process that has torch
    and transformers imported costs ~6 ms of page-table copying, so a request
    is handed to an idle spare and the replacement is forked *after* the hand-
    off, off the job's start-up path. Without a spare it forks directly.

    Every job child is our child, so we reap it (SIGCHLD wakes the loop through
    a wakeup pipe) and send its wait status on the job's status socket.

    Warm runners (``warm_max``): a child whose job the backend declares safe to
    follow in the same process (a cpu inference: it changes no state of the
    process that the next job could see, see ``Backend.reusable_process``) and
    that ended cleanly tells us it is idle instead of exiting. The next request
    with the same ``reuse_key`` (the job's team: a process never carries one
    team's data into another team's job) goes to it: no fork, no copy-on-write
    faults on the zygote's pages, no exit teardown, which is most of the CPU a
    short job costs. At most ``warm_max`` idle runners are kept; one idle for
    WARM_IDLE_S is retired, and every runner exits after REUSE_JOBS jobs.

    Model cache (``model_cache``): before handing a job to a child, the job's
    backend may load what the job needs into this process (a model and its
    tokenizer, ``Backend.zygote_preload``), so the child inherits it copy-on-write
    instead of loading it: ~20 ms of a ~30 ms tiny inference job. Spares forked
    before a load do not have it, so they are retired when the cache changes; a
    warm runner only takes jobs with the same inputs as its last one. A job never depends on this: its backend looks the cache up
    by path + file signature and loads for itself on a miss.
    """

    def __init__(self, ctrl: socket.socket, slot: _EnvironSlot | None, spares: int, model_cache: bool = True,
                 huge_pages: bool = False, warm_max: int = 0, reuse_jobs: int = 1) -> None:
        self.ctrl = ctrl
        self.slot = slot
        self.model_cache = model_cache
        self.huge_pages = huge_pages
        self.forks = 0
        self.spares_wanted = max(0, spares)
        self.warm_max = max(0, warm_max)
        self.reuse_jobs = max(1, reuse_jobs)
        self.jobs: dict[int, socket.socket] = {}  # job pid -> status socket
        self.spares: dict[int, socket.socket] = {}  # idle pid -> its request socket
        self.busy: dict[int, tuple[socket.socket, str]] = {}  # job pid -> (its request socket, reuse key)
        self.warm: dict[int, tuple[socket.socket, str, float]] = {}  # idle used runner -> (socket, key, since)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.raw_fork = os.environ.get(RAW_FORK_ENV, "1") != "0"

    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self._refill()
        while True:
            readers = [self.ctrl, self.wake_r, *(sock for sock, _key in self.busy.values())]
            try:
                ready, _, _ = select.select(readers, [], [], WARM_IDLE_S if self.warm else None)
            except InterruptedError:
                continue
            if self.wake_r in ready:
                self._drain_wakeups()
                self._reap()
            for pid, (sock, key) in list(self.busy.items()):
                if sock in ready:
                    self._runner_idle(pid, sock, key)
            if self.ctrl in ready:
                try:
                    msg, fds, _flags, _addr = socket.recv_fds(self.ctrl, 1 << 20, 1)
                except OSError:
                    msg, fds = b"", []
                if not msg:
                    return
                self._start_job(msg, socket.socket(fileno=fds[0]))
            self._expire_warm()
            self._refill()

    def _start_job(self, msg: bytes, status_sock: socket.socket) -> None:
        request = json.loads(msg)
        if self.model_cache and request.get("warm"):
            if self._warm(request["warm"]):
                self._retire_spares()  # forked before the load: they lack it
            if _peer_closed(status_sock):
                # A long load outlasted the supervisor's wait for the pid: it gave up
                # on this request (and may be running the job another way). Starting
                # it now would run it twice.
                status_sock.close()
                return
        # Same team and same inputs to preload (the model): a warm runner holds
        # what its last job used, inherited or loaded itself; a job of another
        # model would load a private copy in it, so it goes to a fresh fork that
        # shares the zygote's.
        key = str(request.get("reuse_key") or "")
        if key:
            key += "\0" + json.dumps((request.get("warm") or {}).get("inputs"), sort_keys=True)
        # A warm runner of the same key first (newest: its pages are the likeliest
        # to be in cache), then a fresh spare.
        candidates = [pid for pid, (_sock, k, _since) in sorted(self.warm.items(), key=lambda kv: -kv[1][2])
                      if key and k == key]
        for pid in candidates:
            sock = self.warm.pop(pid)[0]
            if self._hand_over(pid, sock, key, msg, status_sock):
                return
        while self.spares:
            pid, sock = self.spares.popitem()
            if self._hand_over(pid, sock, key, msg, status_sock):
                return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = self._fork()
        if pid == 0:
            ours.close()
            _runner_main(theirs, self.slot, self.reuse_jobs, first=(request, status_sock))
        theirs.close()
        self.jobs[pid] = status_sock
        self.busy[pid] = (ours, key)

    def _hand_over(self, pid: int, sock: socket.socket, key: str, msg: bytes, status_sock: socket.socket) -> bool:
        try:
            socket.send_fds(sock, [msg], [status_sock.fileno()])
        except OSError:
            sock.close()  # it died meanwhile; _reap drops its record
            return False
        self.jobs[pid] = status_sock
        self.busy[pid] = (sock, key)
        return True

    def _runner_idle(self, pid: int, sock: socket.socket, key: str) -> None:
        """A runner finished its job and waits for another (or it exited: EOF)."""
        try:
            msg = sock.recv(64)
        except OSError:
            msg = b""
        if msg != b"I":
            return  # EOF: it exits; _reap reports its status and drops it
        del self.busy[pid]
        status_sock = self.jobs.pop(pid, None)
        if status_sock is not None:
            status_sock.close()  # the runner reported the job's end itself
        if not key or len(self.warm) >= self.warm_max:
            sock.close()  # not wanted: EOF makes it exit
            return
        self.warm[pid] = (sock, key, time.monotonic())

    def _expire_warm(self) -> None:
        now = time.monotonic()
        for pid, (sock, _key, since) in list(self.warm.items()):
            if now - since >= WARM_IDLE_S:
                del self.warm[pid]
                sock.close()

    def _warm(self, warm: dict) -> bool:
        """Let the job's backend preload into our caches; True if anything changed."""
        import gc

        from neuron_workers.backends import BACKENDS

        name = str(warm.get("backend") or "")
        module_name, _, attr = BACKENDS.get(name, name).partition(":")
        # Only backends the zygote preloaded: importing a job's backend module here
        # would run its import-time code in the process every job is forked from.
        module = sys.modules.get(module_name)
        if module is None or not attr:
            return False
        threads = _native_threads()
        try:
            backend: Any = module
            for part in attr.split("."):
                backend = getattr(backend, part)
            preload = getattr(backend, "zygote_preload", None)
            changed = bool(preload(str(warm["kind"]), dict(warm.get("inputs") or {}))) if preload else False
        except BaseException as exc:  # noqa: BLE001 - the job loads for itself and reports it
            print(f"[zygote] preload for a {warm.get('kind')} job failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
            changed = True  # maybe half loaded: do not trust the spares
        if _native_threads() > threads:
            # Forking with a thread pool running copies its locks in whatever state;
            # nothing loaded from now on can be trusted to be fork-safe.
            print("[zygote] a preload started threads; model cache off", file=sys.stderr, flush=True)
            self.model_cache = False
        if changed:
            # As at start-up: keep the collector off the new objects' headers in children.
            gc.collect()
            gc.freeze()
            if self.huge_pages:
                _huge_pages()  # a big model's tensors are new anonymous memory
        return changed

    def _retire_spares(self) -> None:
        """Let idle spares exit (EOF on their request socket); _reap collects them.
        Warm runners stay: each serves only jobs with its last job's inputs."""
        for sock in self.spares.values():
            sock.close()
        self.spares.clear()

    def _refill(self) -> None:
        while len(self.spares) < self.spares_wanted:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = self._fork()
            if pid == 0:
                ours.close()  # else the spare never sees EOF when the zygote dies
                _runner_main(theirs, self.slot, self.reuse_jobs)
            theirs.close()
            self.spares[pid] = ours

    def _fork(self) -> int:
        """os.fork(); in the child, drop every fd and handler of the zygote's loop."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.forks += 1
        if self.huge_pages and self.forks % HUGE_PAGES_EVERY_FORKS == 0:
            _huge_pages()
        pid = _fork_process(self.raw_fork)
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(self.wake_r)
            os.close(self.wake_w)
            # A spare or job holding the control socket would keep the owner
            # from noticing that the zygote died.
            for sock in [self.ctrl, *self.jobs.values(), *self.spares.values(),
                         *(entry[0] for entry in self.busy.values()), *(entry[0] for entry in self.warm.values())]:
                sock.close()
        return pid

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for pool in (self.spares, self.busy, self.warm):
                entry = pool.pop(pid, None)
                if entry is not None:
                    (entry if isinstance(entry, socket.socket) else entry[0]).close()
            sock = self.jobs.pop(pid, None)  # None: a spare, or an adopted orphan (subreaper)
            if sock is not None:
                try:
                    sock.sendall(_STATUS.pack(b"S", pid, status))
                except OSError:
                    pass  # the supervisor gave up on this job; nothing to tell
                sock.close()


_libc_fork: Any = None


def _fork_process(raw: bool) -> int:
    """fork() for the zygote; 0 in the child.

    os.fork() runs every hook that imported modules registered with
    os.register_at_fork: threading, logging, random, concurrent.futures, torch,
    fsspec and filelock's (pulled in by transformers; it pins and resets its
    lock registry around every fork). In a job child they cost ~1-1.7 ms of CPU,
    mostly copy-on-write faults on the zygote's pages, and ~0.3 ms in the zygote
    (measured: fork + tiny 1-token inference, child 7.6-8.9 -> 6.6-7.2 ms). Those hooks
    only matter when another thread may hold a lock or own state at fork time.
    While the zygote is single-threaded, ``raw`` forks with libc's fork() (the
    C-level pthread_atfork handlers of torch, OpenMP and glibc still run, the GIL
    stays held across the call) and redoes in the child the hooks that change
    something for a single-threaded process: reseeding ``random`` (each job must
    draw its own numbers) and torch's OpenMP re-initialisation (gh-28389).
    With another thread alive it uses os.fork().
    """
    global _libc_fork
    if not raw or _native_threads() != 1:
        return os.fork()
    if _libc_fork is None:
        _libc_fork = ctypes.PyDLL(None, use_errno=True).fork  # PyDLL: keeps the GIL held
        _libc_fork.restype = ctypes.c_int
        _libc_fork.argtypes = []
    pid = _libc_fork()
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if pid == 0:
        random_module = sys.modules.get("random")
        if random_module is not None:
            random_module.seed()
        torch = sys.modules.get("torch")
        if torch is not None and hasattr(torch, "get_num_threads"):
            torch.get_num_threads()
    return pid


def _next_request(sock: socket.socket) -> tuple[dict, socket.socket]:
    """Wait for the zygote to hand us a job: (request, its status socket). Exits on EOF."""
    try:
        msg, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 1)
    except BaseException:  # noqa: BLE001
        msg, fds = b"", []
    if not msg or not fds:
        os._exit(0)  # the zygote is gone, shutting down, or retired us: nothing to do
    return json.loads(msg), socket.socket(fileno=fds[0])


def _runner_main(sock: socket.socket, slot: _EnvironSlot | None, reuse_jobs: int,
                 first: tuple[dict, socket.socket] | None = None) -> None:
    """Body of a child forked by the zygote: a spare waiting for its first job, or a
    runner forked for one. Runs jobs one after another while each ends in a state
    the next may start from (see _ZygoteServer), at most ``reuse_jobs``. Never returns."""
    done = 0
    request, status_sock = first if first is not None else _next_request(sock)
    while True:
        code, again = _run_job(request, status_sock, slot, first_job=done == 0, last=done + 1 >= reuse_jobs)
        done += 1
        if not again:
            _child_exit(code)
        _go_idle(slot)
        try:
            sock.send(b"I")
        except OSError:
            _child_exit(0)
        request, status_sock = _next_request(sock)


def _run_job(request: dict, status_sock: socket.socket, slot: _EnvironSlot | None, *,
             first_job: bool, last: bool) -> tuple[int, bool]:
    """Run one job in this process: (exit code, whether this process may run another)."""
    code = 1
    try:
        if first_job:
            # New session first: the supervisor may killpg(pid) as soon as it learns
            # the pid, which we only tell it at the end of this block. A runner's
            # later jobs run in the same session and group (it leads both).
            os.setsid()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _redirect_stdio(request["log_path"])
        os.chdir(request["workdir"])
        env: dict[str, str] = request["env"]
        if slot is not None:
            slot.write(env.get(TAG_VAR))
        _replace_environ(env)
        _reseed_forked_rngs()
        hf = sys.modules.get("neuron_workers.backends.hf")
        if hf is not None:
            hf.mark_one_job_process()  # the inherited model cache is ours alone now
        status_sock.sendall(_STATUS.pack(b"P", os.getpid(), 0))

        from neuron_workers import runner

        if first_job:
            runner.prepare_child_process()
        # The status socket doubles as the lifeline: EOF once the supervisor's
        # end is closed (after the job ended, unless the supervisor died).
        lifeline = runner.Lifeline(status_sock.detach(), Path(request["workdir"]), float(request["grace_s"]))
        # Look like the exec-mode command line to code that inspects argv.
        sys.argv[:] = [runner.__file__, request["payload_path"]]
        if request.get("payload_json") is not None:
            payload = json.loads(request["payload_json"])
        else:
            with open(request["payload_path"], encoding="utf-8") as fh:
                payload = json.load(fh)
        code = runner.run_payload(payload)
        if (not last and code == 0 and runner.may_run_another(payload) and _alone_in_group()
                and lifeline.release(_STATUS.pack(b"D", os.getpid(), code))):
            return code, True
        lifeline.finish()
    except BaseException:  # noqa: BLE001 - report and exit; never return into the zygote loop
        import traceback

        traceback.print_exc()
    return code, False


def _child_exit(code: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        # os._exit: no atexit handlers or buffered state of the zygote may run.
        os._exit(code)


def _go_idle(slot: _EnvironSlot | None) -> None:
    """Between jobs: write nowhere, hold no workdir, carry no job tag (find_orphans)."""
    sys.stdout.flush()
    sys.stderr.flush()
    _redirect_stdio(os.devnull)
    os.chdir("/")
    if slot is not None:
        slot.write(None)


def _children(pid: int) -> list[int] | None:
    """Child pids of ``pid`` (all its threads'), or None if the kernel cannot tell."""
    children: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                children.extend(int(x) for x in fh.read().split())
    except FileNotFoundError:
        return None if not os.path.exists(f"/proc/{pid}") else children
    except OSError:
        return None
    return children


def _alone_in_group() -> bool:
    """True if nothing the job started is still alive (nor a zombie child of ours).

    Whatever a job starts is our descendant, or was re-parented to the zygote (the
    subreaper) when its parent exited; a process cannot leave its session for our
    group. So our children and the zygote's children in our group tell, without
    reading every process in /proc (group_members), unless the kernel has no
    /proc/<pid>/task/<tid>/children."""
    me = os.getpid()
    ours = _children(me)
    theirs = _children(os.getppid())
    if ours is None or theirs is None:
        return group_members(me) == [me]
    if ours:
        return False
    for pid in theirs:
        stat = _proc_stat(pid) if pid != me else None
        if stat is not None and stat[1] == me and stat[0] != "Z":
            return False
    return True


def _replace_environ(env: dict[str, str]) -> None:
    """Make os.environ (and the C environment) exactly ``env``.

    Only the differences are applied: the job's environment is the supervisor's,
    which mostly equals ours, and each setenv/unsetenv goes through os.environ's
    Python wrapper (clear() + update() of ~60 variables cost ~0.6 ms a job)."""
    current = os.environ
    for key in [key for key in current if key not in env]:
        del current[key]
    for key, value in env.items():
        if current.get(key) != value:
            current[key] = value


def _redirect_stdio(log_path: str) -> None:
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.close(null_fd)


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25  # Linux >= 6.1


def _huge_pages() -> int | None:
    """Back the zygote's anonymous memory (heap, arenas, tensors) with 2 MiB pages
    where the kernel can; returns how many regions it collapsed (None: unsupported).

    What a fork costs is mostly page tables: with torch and transformers imported
    the zygote has ~250 MB of anonymous memory, 60k 4 KiB pages whose entries
    fork() copies and the child's exit tears down again, ~6 ms of CPU per job.
    As huge pages that is ~120 entries. A job's copy-on-write write to a shared
    huge page splits it and copies 4 KiB, as before. Measured on the tiny
    inference job: fork 4.5 -> 1.1 ms in the zygote, the child 16 -> 9.5 ms.
    MADV_HUGEPAGE marks the regions (khugepaged may collapse them later too),
    MADV_COLLAPSE collapses them now; both only change how memory is mapped.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
        with open("/proc/self/maps", encoding="ascii", errors="replace") as fh:
            maps = fh.read().splitlines()
    except (OSError, AttributeError):
        return None
    collapsed = 0
    for line in maps:
        fields = line.split()
        # address perms offset dev inode [name]: private writable anonymous memory only
        if len(fields) < 5 or fields[4] != "0" or not fields[1].startswith("rw") or fields[1][3] != "p":
            continue
        if len(fields) > 5 and fields[5] != "[heap]":
            continue  # [stack], [vvar], ...
        start, end = (int(x, 16) for x in fields[0].split("-"))
        start = (start + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        end &= ~(_HUGE_PAGE - 1)
        if end <= start:
            continue
        if madvise(start, end - start, _MADV_HUGEPAGE) != 0:
            return None  # no THP support at all
        if madvise(start, end - start, _MADV_COLLAPSE) == 0:
            collapsed += 1
    return collapsed


def _peer_closed(sock: socket.socket) -> bool:
    """True if the other end of a stream socket was closed (EOF is readable)."""
    ready, _, _ = select.select([sock], [], [], 0)
    if not ready:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _native_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _reseed_forked_rngs() -> None:
    # `random` reseeds itself after fork; numpy's global RNG does not, and every
    # job forked from the same zygote would otherwise draw the same numbers.
    # Only if numpy.random was imported (numpy 2 loads it lazily; importing it
    # here would cost ~25 ms), and with an explicit seed (argument-less seed()
    # costs ~14 ms on first use).
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_random.seed(int.from_bytes(os.urandom(4), "little"))


# ---------------------------------------------------------------------- launch


def _pythonpath_with_project(existing: str | None) -> str:
    parts = [p for p in (existing or "").split(os.pathsep) if p]
    if _PROJECT_ROOT not in parts:
        parts.insert(0, _PROJECT_ROOT)
    return os.pathsep.join(parts)


def child_env(payload: dict) -> dict[str, str]:
    """The environment a job child gets: ours at launch time + ``payload["env"]``.

    ``None`` values in ``payload["env"]`` unset a variable. PYTHONPATH is made to
    include the project so ``neuron_workers`` (and ``module:Class`` backends next
    to it) import from any cwd; PYTHONUNBUFFERED keeps the live log live.
    """
    env = dict(os.environ)
    for key, value in (payload.get("env") or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    env["PYTHONPATH"] = _pythonpath_with_project(env.get("PYTHONPATH"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


# A fork-mode payload up to this size travels in the zygote request instead of
# payload.json: one file less to create per job (a short job creates seven).
INLINE_PAYLOAD_MAX = 64 * 1024


def _payload_json(payload: dict, workdir: Path) -> str:
    return json.dumps({**payload, "workdir": str(workdir)}, default=str)


def _write_payload(workdir: Path, text: str) -> Path:
    payload_path = workdir / PAYLOAD_FILE
    # 0600: payload["env"] may carry credentials (e.g. a model hub token).
    fd = os.open(payload_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return payload_path


def _prepare_workdir(payload: dict) -> Path:
    """Create workdir and reset this attempt's control files."""
    workdir = Path(payload["workdir"]).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # A requeued job reuses its workdir: a stale STOP would stop it at once and a
    # stale result.json would be taken for this attempt's verdict.
    for name in (STOP_FILE, RESULT_FILE, METRICS_FILE):
        try:
            (workdir / name).unlink()
        except FileNotFoundError:
            pass
    (workdir / LOG_FILE).write_bytes(b"")
    return workdir


def launch(payload: dict, mode: Mode = "fork", *, grace_s: float = 10.0, zygote: Zygote | None = None) -> ChildHandle:
    """Start the runner for ``payload`` in a new session; return at once.

    ``payload`` is the runner payload (job_id, kind, backend, spec, workdir,
    inputs, cores, env). When this returns, the child exists, is its own process
    group leader (``handle.pgid == handle.pid``) and writes to workdir/log.txt.
    Fork mode uses ``zygote`` or this process's default one; if that zygote
    cannot be started the job is launched in exec mode instead (logged).

    The child keeps a lifeline to this process (see runner.Lifeline): if this
    process dies, the job stops by itself (SIGTERM, then SIGKILL ``grace_s``
    later, to its whole group). The lifeline is released by
    ``handle.close()``, which the handle does itself once the child exited.
    """
    started_at = time.monotonic()
    workdir = _prepare_workdir(payload)
    env = child_env(payload)
    text = _payload_json(payload, workdir)
    written = False
    if mode == "fork":
        zygote = zygote or default_zygote()
        inline = len(text) <= INLINE_PAYLOAD_MAX
        if not inline:
            _write_payload(workdir, text)
            written = True
        request = {
            "payload_json": text if inline else None,
            "payload_path": str(workdir / PAYLOAD_FILE),
            "log_path": str(workdir / LOG_FILE),
            "workdir": str(workdir),
            "env": env,
            "grace_s": grace_s,
            # Jobs with the same key may run one after another in one process.
            "reuse_key": payload.get("reuse_key") or "",
            # What the zygote may preload for this job (see _ZygoteServer): the
            # backend decides from the kind and input paths.
            "warm": {"backend": payload.get("backend"), "kind": payload.get("kind"),
                     "inputs": payload.get("inputs") or {}},
        }
        try:
            pid, status_sock = zygote.spawn(request)
        except (ZygoteError, OSError, ValueError):
            logger.exception("fork launch failed; falling back to exec mode")
        else:
            return _ForkChild(pid, status_sock, workdir, started_at)
    elif mode != "exec":
        raise ValueError(f"unknown launch mode {mode!r}")
    if not written:
        _write_payload(workdir, text)
    lifeline_r, lifeline_w = os.pipe()  # both O_CLOEXEC: no other child inherits them
    env[LIFELINE_FD_ENV] = str(lifeline_r)
    env[LIFELINE_GRACE_ENV] = str(grace_s)
    try:
        with open(workdir / LOG_FILE, "ab") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "neuron_workers.runner", str(workdir / PAYLOAD_FILE)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=env,
                pass_fds=[lifeline_r],
                start_new_session=True,
            )
    except BaseException:
        os.close(lifeline_w)
        raise
    finally:
        os.close(lifeline_r)
    return _ExecChild(popen, lifeline_w, workdir, started_at)


# ---------------------------------------------------------------------- tailing


def _utf8_safe_cut(data: bytes) -> int:
    """Largest n <= len(data) such that data[:n] does not end inside a UTF-8 char."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)  # ASCII: complete
        if byte >= 0xC0:  # lead byte: complete only if its sequence fits
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)  # not valid UTF-8 anyway; "replace" will cope


class _LogTailer:
    """Forward new bytes of log.txt as (byte offset, text) chunks of <= 64 KiB.

    Chunks end on a line break (\\n or \\r, so progress bars count) whenever the
    chunk contains one; a trailing partial line is held back until it completes,
    the job ends, or it has waited PARTIAL_LINE_HOLD_S.
    """

    def __init__(self, path: Path, on_log: Callable[[int, str], None]) -> None:
        self.path = path
        self.on_log = on_log
        self.offset = 0
        self._fh: Any = None
        self._partial_since: float | None = None

    def pump(self, *, final: bool) -> None:
        budget = None if final else LOG_BYTES_PER_POLL
        while budget is None or budget > 0:
            data = self._read(LOG_CHUNK)
            if not data:
                return
            cut = self._cut(data, final)
            if cut == 0:
                return
            chunk = data[:cut]
            self.on_log(self.offset, chunk.decode("utf-8", errors="replace"))
            self.offset += cut
            self._partial_since = None
            if budget is not None:
                budget -= cut

    def _cut(self, data: bytes, final: bool) -> int:
        """How many bytes of ``data`` (read at self.offset) to forward now."""
        full = len(data) == LOG_CHUNK
        if final and not full:
            return len(data)  # the job is over: the rest goes out as is
        last_break = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if last_break >= 0:
            return last_break + 1
        if full:
            # 64 KiB without a line break: split anyway, but not inside a character.
            return _utf8_safe_cut(data) or len(data)
        now = time.monotonic()
        if self._partial_since is None:
            self._partial_since = now
        if now - self._partial_since >= PARTIAL_LINE_HOLD_S:
            return _utf8_safe_cut(data)
        return 0

    def _read(self, size: int) -> bytes:
        if self._fh is None:
            try:
                self._fh = open(self.path, "rb")
            except FileNotFoundError:
                return b""
        self._fh.seek(self.offset)
        return self._fh.read(size)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _MetricsTailer:
    """Forward each complete JSON-object line of metrics.jsonl to ``on_metric``.

    Incomplete trailing lines wait for their newline; lines that are not JSON
    objects are skipped (a metric must never fail the job).
    """

    def __init__(self, path: Path, on_metric: Callable[[dict], None]) -> None:
        self.path = path
        self.on_metric = on_metric
        self.offset = 0
        self.skipped = 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(LOG_BYTES_PER_POLL)
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        if end == 0:
            return
        self.offset += end
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                self.skipped += 1
                continue
            if isinstance(record, dict):
                self.on_metric(record)
            else:
                self.skipped += 1


# ------------------------------------------------------------------- supervise


def supervise(
    payload: dict,
    *,
    mode: Mode = "fork",
    heartbeat: Callable[[], None],
    should_cancel: Callable[[], bool],
    on_log: Callable[[int, str], None],
    on_metric: Callable[[dict], None],
    max_runtime_s: float | None,
    grace_s: float = 10.0,
    poll_s: float = 0.5,
    on_start: Callable[[int], None] | None = None,
    heartbeat_s: float = 5.0,
    cancel_check_s: float = 1.0,
    initial_poll_s: float = 0.005,
    zygote: Zygote | None = None,
    first_heartbeat_s: float | None = None,
    on_exit: Callable[[], None] | None = None,
) -> Outcome:
    """Run ``payload`` in a child process group and block until it is over.

    Calls ``on_start(pid)`` once the child exists; then, until the child exits:
    forwards log.txt to ``on_log(offset, text)`` and metrics.jsonl records to
    ``on_metric``; calls ``heartbeat()`` every ``heartbeat_s`` (the first time
    after ``first_heartbeat_s`` if given); asks
    ``should_cancel()`` every ``cancel_check_s`` (it hits the database). Polls
    start at ``initial_poll_s`` and double up to ``poll_s``; the child's exit
    wakes the loop immediately.

    On cancel, or when the run exceeds ``max_runtime_s``: creates workdir/STOP,
    SIGTERMs the process group, and SIGKILLs it ``grace_s`` later if it has not
    exited. After the child exits, any process left in its group gets the same
    TERM-grace-KILL treatment, so nothing of the job outlives this call.

    ``on_exit()`` is called once the child has exited, before the rest of its log
    is forwarded (a caller may hold that last part back and store it with the
    outcome). A crashing child never raises here. An exception from a callback propagates,
    but only after the job's process group has been killed.
    """
    handle = launch(payload, mode, grace_s=grace_s, zygote=zygote)
    logs = _LogTailer(handle.workdir / LOG_FILE, on_log)
    metrics = _MetricsTailer(handle.workdir / METRICS_FILE, on_metric)
    try:
        if on_start is not None:
            on_start(handle.pid)
        stop_reason = _watch(
            handle,
            logs,
            metrics,
            heartbeat=heartbeat,
            should_cancel=should_cancel,
            max_runtime_s=max_runtime_s,
            grace_s=grace_s,
            poll_s=poll_s,
            heartbeat_s=heartbeat_s,
            cancel_check_s=cancel_check_s,
            initial_poll_s=initial_poll_s,
            first_heartbeat_s=first_heartbeat_s,
        )
        duration = time.monotonic() - handle.started_at
        if on_exit is not None:
            on_exit()
        # The leader is gone; helpers it left in the group (or that ignored the
        # SIGTERM) must not keep NeuronCores busy after we report the job done.
        # A released runner checked that it is alone and now waits for its next job.
        if not handle.released:
            kill_process_group(handle.pgid, grace_s if stop_reason is None else 0.0)
        logs.pump(final=True)
        metrics.pump()
        return _outcome(handle, stop_reason, max_runtime_s, logs.offset, duration)
    finally:
        if not handle.exited:
            # Only reached when a callback raised (or we were interrupted): never
            # leave an unsupervised job behind.
            _request_stop(handle)
            kill_process_group(handle.pgid, grace_s)
            handle.wait(5.0)
        handle.close()
        logs.close()


def _watch(
    handle: ChildHandle,
    logs: _LogTailer,
    metrics: _MetricsTailer,
    *,
    heartbeat: Callable[[], None],
    should_cancel: Callable[[], bool],
    max_runtime_s: float | None,
    grace_s: float,
    poll_s: float,
    heartbeat_s: float,
    cancel_check_s: float,
    initial_poll_s: float,
    first_heartbeat_s: float | None = None,
) -> str | None:
    """The supervision loop; returns the stop reason ("cancel" / "timeout" / None)."""
    start = handle.started_at
    next_heartbeat = start + (heartbeat_s if first_heartbeat_s is None else first_heartbeat_s)
    next_cancel_check = start + cancel_check_s
    deadline = start + max_runtime_s if max_runtime_s is not None else None
    stop_reason: str | None = None
    kill_at: float | None = None
    give_up_at: float | None = None
    interval = initial_poll_s
    while True:
        now = time.monotonic()
        timers = [next_heartbeat, kill_at if kill_at is not None else next_cancel_check]
        if deadline is not None and stop_reason is None:
            timers.append(deadline)
        # Never sleep past a due timer; 1 ms floor avoids a busy loop.
        timeout = max(0.001, min(interval, min(timers) - now))
        exited = handle.wait(timeout)
        logs.pump(final=False)
        metrics.pump()
        if exited:
            return stop_reason
        now = time.monotonic()
        interval = min(interval * 2, poll_s)
        if now >= next_heartbeat:
            heartbeat()
            next_heartbeat = now + heartbeat_s
        if stop_reason is None:
            if deadline is not None and now >= deadline:
                stop_reason = "timeout"
            elif now >= next_cancel_check:
                next_cancel_check = now + cancel_check_s
                if should_cancel():
                    stop_reason = "cancel"
            if stop_reason is not None:
                _request_stop(handle)
                kill_at = now + grace_s
                interval = initial_poll_s  # a cooperative exit should be noticed quickly
        elif kill_at is not None and now >= kill_at:
            _signal_group(handle.pgid, signal.SIGKILL)
            kill_at = None
            next_cancel_check = float("inf")
            give_up_at = now + UNKILLABLE_GIVE_UP_S
        elif give_up_at is not None and now >= give_up_at:
            # SIGKILL cannot interrupt uninterruptible sleep (a hung device
            # driver, a dead NFS mount). Report instead of heartbeating forever.
            logger.error("job pid %s survived SIGKILL for %s s; giving up on it", handle.pid, UNKILLABLE_GIVE_UP_S)
            return stop_reason


def _request_stop(handle: ChildHandle) -> None:
    # STOP first, then SIGTERM: the runner's SIGTERM handler only sets a flag,
    # and a backend between steps may poll the file before the signal lands.
    try:
        (handle.workdir / STOP_FILE).touch()
    except OSError:
        pass
    _signal_group(handle.pgid, signal.SIGTERM)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _outcome(
    handle: ChildHandle, stop_reason: str | None, max_runtime_s: float | None, log_bytes: int, duration: float
) -> Outcome:
    rc = handle.returncode
    exit_code = rc if rc is not None and rc >= 0 else None
    sig = -rc if rc is not None and rc < 0 else None
    verdict = _read_result(handle.workdir / RESULT_FILE)
    base = dict(exit_code=exit_code, signal=sig, log_bytes=log_bytes, duration_s=duration, pid=handle.pid)
    result = verdict.get("result") if verdict and verdict.get("ok") else None
    if stop_reason == "cancel":
        return Outcome("cancelled", result=result, error_code="cancelled", error="cancelled on request", **base)
    if stop_reason == "timeout":
        message = f"exceeded the maximum runtime of {max_runtime_s:g} s"
        return Outcome("timed_out", result=result, error_code="timed_out", error=message, **base)
    if verdict is not None and verdict.get("ok"):
        return Outcome("succeeded", result=result or {}, error_code=None, error=None, **base)
    if verdict is not None:
        return Outcome(
            "failed",
            result=None,
            error_code=str(verdict.get("code") or "error"),
            error=str(verdict.get("error") or ""),
            traceback=verdict.get("traceback"),
            **base,
        )
    if sig is not None:
        how = f"was killed by signal {signal.Signals(sig).name} ({sig})" if sig in _SIGNALS else f"got signal {sig}"
    elif exit_code is not None:
        how = f"exited with code {exit_code}"
    else:
        how = "ended with an unknown exit status (zygote lost)"
    message = f"the job process {how} without writing a result; see the end of its log"
    return Outcome("failed", result=None, error_code="crashed", error=message, **base)


_SIGNALS = {s.value for s in signal.Signals}


def _read_result(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            verdict = json.load(fh)
    except (FileNotFoundError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) else None


# ------------------------------------------------------------ process groups


def _proc_stat(pid: int | str) -> tuple[str, int] | None:
    """(state, pgrp) of a pid from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[2])


def _proc_state(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return stat[0] if stat else None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is ``pgid``.

    Zombies are excluded: they hold no resources, and where PID 1 does not reap
    (many containers) a killed orphan stays a zombie forever.
    """
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(entry)
            if stat and stat[1] == pgid and stat[0] != "Z":
                members.append(int(entry))
    return members


def group_alive(pgid: int) -> bool:
    """True while any non-zombie process is in group ``pgid``."""
    try:
        os.killpg(pgid, 0)  # cheap common case: the group is empty
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, but not ours to signal
    return bool(group_members(pgid))


def kill_process_group(pgid: int, grace_s: float, *, poll_s: float = 0.02, kill_wait_s: float = 5.0) -> bool:
    """SIGTERM group ``pgid``, wait up to ``grace_s``, then SIGKILL what is left.

    Returns True once no live process of the group remains (False if something
    survived ``kill_wait_s`` after SIGKILL, e.g. stuck in uninterruptible I/O).
    Safe to call on an empty or already dead group. Refuses our own group and
    pgid <= 1, which would signal the worker itself or everything.

    The pgid of a reaped leader is not reused while other members are alive
    (the kernel keeps the pid number busy), so this cannot hit a stranger's
    group as long as it runs before the group has fully exited.
    """
    if pgid <= 1 or pgid == os.getpgrp():
        raise ValueError(f"refusing to kill process group {pgid}")
    if not group_alive(pgid):
        return True
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(poll_s)
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + kill_wait_s
    while group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def find_orphans(tag_prefix: str = "job-") -> dict[int | str, list[int]]:
    """Map job id -> pids of live processes tagged ``NEURON_PROCESS_TAG=<prefix><id>``.

    Scans /proc/*/environ (readable for our own processes, or all as root). Ids
    that are decimal come back as int. This process is never included. Covers
    fork-mode jobs too (see _EnvironSlot) and anything a job spawned, since
    children inherit the environment.
    """
    key = f"{TAG_VAR}={tag_prefix}".encode()
    me = os.getpid()
    found: dict[int | str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read()
        except OSError:
            continue  # gone, or not ours to read
        for var in environ.split(b"\0"):
            if var.startswith(key):
                raw = var[len(key) :].decode(errors="replace")
                if raw and _proc_state(int(entry)) not in (None, "Z"):
                    job_id: int | str = int(raw) if raw.isdigit() else raw
                    found.setdefault(job_id, []).append(int(entry))
                break
    return found


def kill_orphans(
    keep: Container[int | str], grace_s: float = 10.0, tag_prefix: str = "job-"
) -> dict[int | str, list[int]]:
    """Kill the process groups of tagged processes whose job id is not in ``keep``.

    For a restarted worker: ``keep`` = ids of jobs this host is still running.
    Returns what was found and killed. Never touches our own process group.
    """
    killed: dict[int | str, list[int]] = {}
    own_group = os.getpgrp()
    for job_id, pids in find_orphans(tag_prefix).items():
        if job_id in keep:
            continue
        groups = set()
        for pid in pids:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                continue
        for pgid in groups - {own_group}:
            if pgid > 1:
                kill_process_group(pgid, grace_s)
        killed[job_id] = pids
    return killed

