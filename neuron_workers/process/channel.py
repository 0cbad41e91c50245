"""The status channel of a fork-mode job: one stream socket from the job process
(and its zygote) to the supervisor, carrying fixed 17-byte records (kind, pid, value).

``STARTED``   sent by the job process right after ``setsid()``: pid leads its own
              session and group, so the supervisor may signal the group from now on.
``REAPED``    sent by the zygote after reaping the job process; value = its raw
              wait status.
``RELEASED``  sent by the job process when its job is over but the process stays
              as a warm runner (:mod:`neuron_workers.process.warm`); value = the
              job's exit code. The process is alone in its group then.

The job process's end is also its lifeline (:class:`~neuron_workers.process.lifeline.Lifeline`):
EOF tells it that the supervisor is gone.
"""
from __future__ import annotations

import select
import socket
import struct
import time

RECORD = struct.Struct("!cqq")
STARTED, REAPED, RELEASED = b"P", b"S", b"D"


class ChannelError(RuntimeError):
    """The job never reported that it started."""


def pack(kind: bytes, pid: int, value: int = 0) -> bytes:
    return RECORD.pack(kind, pid, value)


def await_started(sock: socket.socket, timeout_s: float) -> int:
    """Wait for the job's STARTED record; return its pid. Closes ``sock`` and
    raises ChannelError if the job died first, the channel closed or time ran out."""
    deadline = time.monotonic() + timeout_s
    buf = b""
    while len(buf) < RECORD.size:
        ready, _, _ = select.select([sock], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            sock.close()
            raise ChannelError(f"the job did not start within {timeout_s} s")
        chunk = sock.recv(RECORD.size - len(buf))
        if not chunk:
            sock.close()
            raise ChannelError("the status channel closed before the job started")
        buf += chunk
    kind, pid, value = RECORD.unpack(buf)
    if kind == REAPED:
        # It died before it could report (e.g. its workdir vanished): it never ran the job.
        sock.close()
        raise ChannelError(f"job process {pid} died during start-up (wait status {value})")
    return pid


def peer_closed(sock: socket.socket) -> bool:
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
