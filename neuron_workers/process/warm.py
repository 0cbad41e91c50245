"""Warm runners: a job process that ended a cpu inference cleanly runs the next
inference job of the same team with the same model, instead of exiting.

No fork, no copy-on-write faults on the zygote's pages and no exit teardown for
that next job, which is most of what a short job costs. Only for jobs whose
backend says the kind changes nothing in the process that a later job could see
(``Backend.reusable_process``: cpu inference), after a success with no stop
requested, and with nothing the job started left alive. Fine-tune and compile
jobs, failures, cancels and time-outs always end their process.

Two sides:

* the job process (:func:`may_stay`): after its job, it decides whether to stay;
  if so it reports the job's end itself (``channel.RELEASED``) and tells the
  zygote it is idle;
* the zygote (:class:`WarmRunners`): keeps at most ``max_idle`` idle runners,
  each for WARM_IDLE_S, and hands a request only to a runner with the same
  :func:`reuse_key`. A process never carries one team's data into another
  team's job, and a runner holds the model its last job used, where a fresh
  fork shares the zygote's copy.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

from neuron_workers.process.groups import alone_in_session
from neuron_workers.process.runner import resolve_backend
from neuron_workers.process.workdir import STOP_FILE

WARM_IDLE_S = 30.0


def reuse_key(request: dict) -> str:
    """Which warm runners may take this zygote request: the job's reuse key (its
    team) and its inputs (the model); "" = none, the job gets a fresh process."""
    key = str(request.get("reuse_key") or "")
    if not key:
        return ""
    return key + "\0" + json.dumps((request.get("warm") or {}).get("inputs"), sort_keys=True)


def may_stay(payload: dict, code: int, *, last: bool) -> bool:
    """In a job process after its job: whether it may wait for another one.

    ``last``: the process has run as many jobs as it may.
    """
    return not last and code == 0 and job_allows_reuse(payload) and alone_in_session()


def job_allows_reuse(payload: dict) -> bool:
    """The job was not asked to stop, left no Python thread behind, and its
    backend says the kind changes nothing a later job could see."""
    if threading.active_count() != 1 or (Path(payload["workdir"]) / STOP_FILE).exists():
        return False
    try:
        check = getattr(resolve_backend(payload["backend"]), "reusable_process", None)
        return bool(check(payload["kind"])) if callable(check) else False
    except Exception:  # noqa: BLE001 - when in doubt, a fresh process
        return False


class WarmRunners:
    """The zygote's idle warm runners: pid -> (its request socket, key, idle since).

    Closing a runner's request socket makes it exit (EOF); the zygote reaps it.
    """

    def __init__(self, max_idle: int) -> None:
        self.max_idle = max(0, max_idle)
        self._idle: dict[int, tuple[socket.socket, str, float]] = {}

    def __len__(self) -> int:
        return len(self._idle)

    def keep(self, pid: int, sock: socket.socket, key: str) -> bool:
        """Keep an idle runner for its next job; False (and nothing kept) when it
        has no key or the pool is full: the caller lets it exit."""
        if not key or len(self._idle) >= self.max_idle:
            return False
        self._idle[pid] = (sock, key, time.monotonic())
        return True

    def pop(self, key: str) -> tuple[int, socket.socket] | None:
        """The idle runner of ``key`` that went idle last (its pages are the likeliest
        to be in cache), taken out of the pool; None if there is none."""
        if not key:
            return None
        matching = [(since, pid) for pid, (_sock, k, since) in self._idle.items() if k == key]
        if not matching:
            return None
        _since, pid = max(matching)
        return pid, self._idle.pop(pid)[0]

    def drop(self, pid: int) -> socket.socket | None:
        """Forget a runner that exited; its socket, if it was idle."""
        entry = self._idle.pop(pid, None)
        return entry[0] if entry else None

    def expire(self) -> None:
        """Let runners idle for WARM_IDLE_S exit."""
        now = time.monotonic()
        for pid, (sock, _key, since) in list(self._idle.items()):
            if now - since >= WARM_IDLE_S:
                del self._idle[pid]
                sock.close()

    def next_expiry_s(self) -> float | None:
        """How long the zygote may wait before calling expire() (None: no runner)."""
        return WARM_IDLE_S if self._idle else None

    def sockets(self) -> list[socket.socket]:
        return [sock for sock, _key, _since in self._idle.values()]
