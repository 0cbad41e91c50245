"""Handles on launched job processes: wait for the exit, learn the exit status,
hold (and let go of) the supervisor's end of the job's lifeline.

An exec-mode job is our child, watched through a pidfd. A fork-mode job is the
zygote's child: its status arrives on the job's status channel
(:mod:`neuron_workers.process.channel`), and a warm runner may end its job there
without exiting.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import subprocess
import time
import weakref
from pathlib import Path
from typing import Literal

from neuron_workers.process import channel
from neuron_workers.process.groups import pid_alive

logger = logging.getLogger(__name__)

Mode = Literal["fork", "exec"]

_live_handles: weakref.WeakSet[ChildHandle] = weakref.WeakSet()


class ChildHandle:
    """A launched job process. It leads its own session and process group, so
    ``sid == pgid == pid``.

    ``wait(timeout)`` returns True once the job is over; ``returncode`` then
    follows the subprocess convention (``-N`` = killed by signal N), or stays None
    if the exit status could not be learned (fork mode, zygote died meanwhile).
    ``released`` is True when the job ended but its process lives on as a warm
    runner: its group must not be signalled for this job any more.
    ``session_record`` is where launch recorded the job's session
    (:mod:`neuron_workers.process.sessions`).
    """

    def __init__(self, pid: int, mode: Mode, workdir: Path, started_at: float) -> None:
        self.pid = self.pgid = self.sid = pid
        self.mode = mode
        self.workdir = workdir
        self.started_at = started_at
        self.returncode: int | None = None
        self.exited = False
        self.released = False
        self.session_record: Path | None = None
        _live_handles.add(self)

    def wait(self, timeout: float | None) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        """Release fds, including the job's lifeline; never signals the job.

        Called by the handle itself once the job is over. Closing earlier tells
        the job that its supervisor is gone, and it stops by itself.
        """


class ExecChild(ChildHandle):
    def __init__(self, popen: subprocess.Popen, lifeline_fd: int, workdir: Path, started_at: float) -> None:
        super().__init__(popen.pid, "exec", workdir, started_at)
        self._popen = popen
        self._lifeline_fd: int | None = lifeline_fd
        # Readable the moment the child exits: a short job is noticed at once, not
        # at the supervisor's next poll.
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


class ForkChild(ChildHandle):
    def __init__(self, pid: int, status_sock: socket.socket, workdir: Path, started_at: float) -> None:
        super().__init__(pid, "fork", workdir, started_at)
        self._sock: socket.socket | None = status_sock
        self._buf = b""
        self._pidfd: int | None = None  # only once the zygote is lost

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
            # the job process for us. Watch the pid instead.
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
        while len(self._buf) >= channel.RECORD.size:
            kind, _pid, value = channel.RECORD.unpack_from(self._buf)
            self._buf = self._buf[channel.RECORD.size:]
            if kind in (channel.REAPED, channel.RELEASED):
                self.returncode = os.waitstatus_to_exitcode(value) if kind == channel.REAPED else value
                self.exited = True
                self.released = kind == channel.RELEASED
                self.close()
                return

    def _wait_lost(self, timeout: float | None) -> bool:
        if self._pidfd is not None:
            ready, _, _ = select.select([self._pidfd], [], [], timeout)
            if ready:
                self.exited = True
                self.close()
        elif not pid_alive(self.pid):
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


def _close_inherited_handles() -> None:
    # A forked copy of the supervising process (multiprocessing, a pool) must not
    # keep the jobs' lifelines open, or a job would not notice the worker's death.
    for handle in list(_live_handles):
        handle.close()
    _live_handles.clear()


os.register_at_fork(after_in_child=_close_inherited_handles)
