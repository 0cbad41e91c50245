"""Which session each job runs in, as recorded by the process that launched it.

``launch`` writes one small record per job into a host-wide folder (the job's tag,
``NEURON_PROCESS_TAG``, and its session id, which is the job process's pid), and
``supervise`` removes it once nothing of the job is left. A job's processes are
then the live members of its recorded session, whoever asks: the supervisor
itself, a worker restarted after a crash (:func:`kill_orphans`), or a test.

A record names a session, not a process: the job process may be gone while a
helper it started still runs there. The kernel does not reuse a pid while it is
still some live process's session id, so such a record stays valid; once the
session is empty the pid may be reused, which the leader's start time (kept in
the record) tells apart. Records of empty sessions are removed when read.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Container
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote

from neuron_workers.process.groups import kill_process_group, proc_stat, session_members

logger = logging.getLogger(__name__)

TAG_VAR = "NEURON_PROCESS_TAG"
RECORDS_DIR = Path(tempfile.gettempdir()) / f"neurondeck-{os.getuid()}" / "sessions"


class Record(NamedTuple):
    """A job (by its tag) and the session it was recorded in."""

    tag: str
    sid: int
    path: Path


def record(tag: str | None, sid: int) -> Path | None:
    """Record that job ``tag`` runs in session ``sid``; the record's path (None
    without a tag). The file's name holds both, its content the leader's start time."""
    stat = proc_stat(sid)
    if not tag or stat is None:
        return None
    name = f"{sid}.{quote(tag, safe='')}"
    path, partial = RECORDS_DIR / name, RECORDS_DIR / f".{name}"
    try:
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except FileNotFoundError:
            RECORDS_DIR.mkdir(parents=True, exist_ok=True)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, str(stat.start_ticks).encode())
        finally:
            os.close(fd)
        # Renamed into place whole: a reader never sees a record without its start time.
        os.rename(partial, path)
    except OSError:
        # The job runs all the same; only finding it from elsewhere is lost.
        logger.warning("could not record the session of %s in %s", tag, RECORDS_DIR, exc_info=True)
        return None
    return path


def forget(path: Path | None) -> None:
    """Remove a record once nothing of its job is left (or its process moved on)."""
    if path is not None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def recorded() -> list[Record]:
    """The records whose session still has live members; others are removed."""
    try:
        entries = os.listdir(RECORDS_DIR)
    except FileNotFoundError:
        return []
    live = []
    for name in entries:
        sid_text, _, quoted = name.partition(".")
        path = RECORDS_DIR / name
        if not sid_text.isdigit() or not quoted:
            continue
        sid = int(sid_text)
        if _same_session(sid, path):
            live.append(Record(unquote(quoted), sid, path))
        else:
            forget(path)
    return live


def _same_session(sid: int, path: Path) -> bool:
    """Whether the session the record names still has live members and is the
    one recorded (not a later session under a reused pid)."""
    try:
        start = int(path.read_text() or 0)
    except (OSError, ValueError):
        return False
    leader = proc_stat(sid)
    if leader is not None:
        return leader.start_ticks == start and (leader.state != "Z" or bool(session_members(sid)))
    return bool(session_members(sid))


def find_orphans(tag_prefix: str = "job-") -> dict[int | str, list[int]]:
    """Map job id -> live pids of each recorded job whose tag is ``<tag_prefix><id>``.

    Every job launched on this host that still has processes, supervised or not
    (for a restarted worker, the ones nobody supervises any more are orphans).
    Ids that are decimal come back as int. This process is never included.
    """
    me = os.getpid()
    found: dict[int | str, list[int]] = {}
    for tag, sid, _path in recorded():
        if not tag.startswith(tag_prefix):
            continue
        raw = tag[len(tag_prefix):]
        pids = [pid for pid in session_members(sid) if pid != me]
        if raw and pids:
            job_id: int | str = int(raw) if raw.isdigit() else raw
            found.setdefault(job_id, []).extend(pids)
    return found


def kill_orphans(keep: Container[int | str], grace_s: float = 10.0,
                 tag_prefix: str = "job-") -> dict[int | str, list[int]]:
    """Stop the processes of recorded jobs whose id is not in ``keep`` (SIGTERM,
    ``grace_s``, SIGKILL, group by group); return what was found.

    For a restarted worker: ``keep`` = ids of the jobs this host still runs.
    Never touches our own process group.
    """
    killed: dict[int | str, list[int]] = {}
    own_group = os.getpgrp()
    for job_id, pids in find_orphans(tag_prefix).items():
        if job_id in keep:
            continue
        groups = {stat.pgrp for pid in pids if (stat := proc_stat(pid)) is not None}
        for pgid in groups - {own_group}:
            if pgid > 1:
                kill_process_group(pgid, grace_s)
        killed[job_id] = pids
    return killed
