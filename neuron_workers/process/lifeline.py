"""The job process's side of its lifeline: stop the job when its supervisor is gone.

The lifeline is a file descriptor whose other end only the supervising process
holds: a pipe in exec mode (its number in NEURONDECK_LIFELINE_FD), the status
channel in fork mode. It reads EOF once every copy of that end is closed:
normally after the job exited, or early when the worker died (OOM-killed,
``kill -9``, a Celery hard time limit). A job nobody supervises holds cores and
gets no heartbeat, so the reaper will requeue it; it must not keep running next
to its second attempt.
"""
from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from pathlib import Path

from neuron_workers import config
from neuron_workers.process import workdir as files


class Lifeline:
    """Watch ``fd`` from a thread; on EOF write STOP, SIGTERM the job's process
    group (the runner's handler turns that into ``should_stop()``) and SIGKILL the
    group ``grace_s`` later."""

    def __init__(self, fd: int, workdir: Path, grace_s: float) -> None:
        os.set_inheritable(fd, False)  # processes the job starts need not hold it
        self.fd = fd
        self.workdir = workdir
        self.grace_s = grace_s
        self.lost = threading.Event()
        self.releasing = False
        self.released = threading.Event()
        # A bare thread, never joined: threading.Thread's start-up handshake and
        # bookkeeping cost a forked child noticeably more.
        _thread.start_new_thread(self._watch, ())

    @classmethod
    def from_env(cls, workdir: Path) -> Lifeline | None:
        """The exec-mode lifeline announced in the environment (removed from it, so
        the job's backend and what it starts do not see it)."""
        fd, grace_s = config.lifeline_fd(), config.lifeline_grace_s()
        os.environ.pop(config.LIFELINE_FD_ENV, None)
        os.environ.pop(config.LIFELINE_GRACE_ENV, None)
        return None if fd is None else cls(fd, workdir, grace_s)

    def _watch(self) -> None:
        while True:
            try:
                if not os.read(self.fd, 4096):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        if self.releasing:
            self.released.set()  # the supervisor let go of the finished job
            return
        self.lost.set()
        os.write(2, b"[runner] the supervising process is gone; stopping the job\n")
        files.request_stop(self.workdir)
        _signal_own_group(signal.SIGTERM)
        time.sleep(self.grace_s)
        os.write(2, b"[runner] grace period over; killing the job's process group\n")
        _signal_own_group(signal.SIGKILL)

    def release(self, record: bytes, timeout_s: float = 5.0) -> bool:
        """The job is over and this process will run another: send ``record`` (the
        supervisor then treats the job as ended) and wait until the supervisor has
        closed its end, after which it never signals our group for this job again.
        False if the lifeline was lost or that took longer than ``timeout_s``: the
        caller then ends the process as after any job."""
        if self.lost.is_set():
            return False
        self.releasing = True
        try:
            os.write(self.fd, record)
        except OSError:
            return False
        if not self.released.wait(timeout_s):
            return False
        os.close(self.fd)
        return True

    def finish(self) -> None:
        """Call last: if orphaned, take what is left of the group down with us.

        A backend may have stopped cooperatively while a helper it started
        ignores SIGTERM; nobody else is left to SIGKILL that helper.
        """
        if self.lost.is_set():
            sys.stdout.flush()
            sys.stderr.flush()
            _signal_own_group(signal.SIGKILL)


def _signal_own_group(sig: int) -> None:
    try:
        os.killpg(os.getpgrp(), sig)
    except OSError:
        pass


class ParentWatch:
    """For a process torchrun started (a rank of a multi-host job): torchrun puts each of
    them in a session of its own, so neither the job's lifeline nor a stop of the job's
    process group reaches them. If torchrun is gone (our parent changed: we were
    reparented), do what a lost lifeline does: STOP, SIGTERM our group, SIGKILL it
    ``grace_s`` later. Polls once every ``poll_s``."""

    def __init__(self, workdir: Path, grace_s: float, poll_s: float = 0.5) -> None:
        self.parent = os.getppid()
        self.workdir, self.grace_s, self.poll_s = workdir, grace_s, poll_s
        self.lost = threading.Event()
        _thread.start_new_thread(self._watch, ())

    @classmethod
    def under_torchrun(cls, workdir: Path, grace_s: float = 10.0) -> ParentWatch | None:
        """A watch when this process was started by torchrun (TORCHELASTIC_RUN_ID is
        torchrun's own variable for its workers), else None."""
        return cls(workdir, grace_s) if os.environ.get("TORCHELASTIC_RUN_ID") else None

    def _watch(self) -> None:
        while os.getppid() == self.parent:
            time.sleep(self.poll_s)
        self.lost.set()
        os.write(2, b"[runner] torchrun is gone; stopping this rank\n")
        files.request_stop(self.workdir)
        _signal_own_group(signal.SIGTERM)
        time.sleep(self.grace_s)
        _signal_own_group(signal.SIGKILL)
