"""Process groups and sessions, read from /proc: who is in one, and stopping one.

Every job process leads its own session and process group (``setsid``), so the
group and session ids are its pid. Whatever the job starts stays in its session
(unless it calls ``setsid`` itself) and usually in its group, which is how the
supervisor stops all of a job at once: SIGTERM to the group, a grace period,
then SIGKILL.

Zombies do not count as members anywhere here: they hold no resources, and where
PID 1 does not reap (many containers) a killed orphan stays a zombie forever.
"""
from __future__ import annotations

import os
import signal
import time
from typing import NamedTuple


class ProcStat(NamedTuple):
    """The fields of /proc/<pid>/stat this package needs (proc(5))."""

    state: str
    ppid: int
    pgrp: int
    session: int
    start_ticks: int  # when the process started, in clock ticks since boot


def proc_stat(pid: int | str) -> ProcStat | None:
    """``pid``'s state, parent, group, session and start time; None if it is gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, 1024)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name may contain spaces and parentheses: split after its last ")".
    fields = data.rsplit(b")", 1)[-1].split()
    try:
        return ProcStat(fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    stat = proc_stat(pid)
    return stat is not None and stat.state != "Z"


def _scan(session: int | None = None) -> list[tuple[int, ProcStat]]:
    """Every process now with its stat, or only those in ``session``: those are found
    with getsid (one system call per process, no file to open and parse), so looking
    for one session's members costs little however many processes the machine runs."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (session is not None and not _in_session(int(entry), session)):
            continue
        if (stat := proc_stat(entry)) is not None:
            found.append((int(entry), stat))
    return found


def _in_session(pid: int, sid: int) -> bool:
    try:
        return os.getsid(pid) == sid
    except OSError:  # gone, or (where a system refuses to say) in another session
        return False


def group_members(pgid: int) -> list[int]:
    """Live pids whose process group is ``pgid``."""
    return [pid for pid, stat in _scan() if stat.pgrp == pgid and stat.state != "Z"]


def session_members(sid: int) -> list[int]:
    """Live pids whose session is ``sid``: a job and everything it started."""
    return [pid for pid, stat in _scan(sid) if stat.session == sid and stat.state != "Z"]


def alone_in_session() -> bool:
    """True if this process is the only live one in its session and has no
    unreaped child: nothing a job run here started is left over."""
    me, sid = os.getpid(), os.getsid(0)
    for pid, stat in _scan(sid):
        if pid != me and stat.session == sid and (stat.state != "Z" or stat.ppid == me):
            return False
    return True


def group_alive(pgid: int) -> bool:
    """True while any live process is in group ``pgid``."""
    try:
        os.killpg(pgid, 0)  # cheap common case: the group is empty
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, but not ours to signal
    return bool(group_members(pgid))


def signal_group(pgid: int, sig: int) -> None:
    """``killpg`` that ignores an empty group."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def kill_process_group(pgid: int, grace_s: float, *, poll_s: float = 0.02, kill_wait_s: float = 5.0) -> bool:
    """SIGTERM group ``pgid``, wait up to ``grace_s``, then SIGKILL what is left.

    Returns True once no live process of the group remains (False if something
    survived ``kill_wait_s`` after SIGKILL, e.g. stuck in uninterruptible I/O).
    Safe to call on an empty or already dead group. Refuses our own group and
    pgid <= 1, which would signal the caller itself or everything.

    The pgid of a reaped leader is not reused while other members are alive
    (the kernel keeps the pid number busy), so this cannot hit a stranger's
    group as long as it runs before the group has fully exited.
    """
    if pgid <= 1 or pgid == os.getpgrp():
        raise ValueError(f"refusing to kill process group {pgid}")
    if not group_alive(pgid):
        return True
    signal_group(pgid, signal.SIGTERM)
    if _wait_empty(pgid, grace_s, poll_s):
        return True
    signal_group(pgid, signal.SIGKILL)
    return _wait_empty(pgid, kill_wait_s, poll_s)


def _wait_empty(pgid: int, timeout_s: float, poll_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True
