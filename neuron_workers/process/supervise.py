"""Run one job in a process group of its own and supervise it to the end.

Django-free and Redis-free: the caller (``neuron_workers.execution``) hands
:func:`supervise` callbacks that touch the database. Everything here talks to the
job through its workdir (:mod:`neuron_workers.process.workdir`) and signals.
"""
from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from neuron_workers.process import sessions
from neuron_workers.process import workdir as files
from neuron_workers.process.groups import kill_process_group, signal_group
from neuron_workers.process.handles import ChildHandle, Mode
from neuron_workers.process.launch import launch
from neuron_workers.process.outcome import Outcome, StopReason, outcome_of
from neuron_workers.process.tailing import LogTailer, MetricsTailer
from neuron_workers.process.zygote import Zygote

logger = logging.getLogger(__name__)

# How long a SIGKILLed job may take to disappear before supervise() reports
# anyway (a process in uninterruptible sleep ignores even SIGKILL).
UNKILLABLE_GIVE_UP_S = 60.0


@dataclass
class Timing:
    """The supervision loop's clocks, in seconds."""

    max_runtime_s: float | None
    grace_s: float
    poll_s: float
    initial_poll_s: float
    heartbeat_s: float
    first_heartbeat_s: float
    cancel_check_s: float


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
    """Run ``payload`` in a process group of its own and block until it is over.

    Calls ``on_start(pid)`` once the job process exists; then, until it exits:
    forwards log.txt to ``on_log(offset, text)`` and metrics.jsonl records to
    ``on_metric``; calls ``heartbeat()`` every ``heartbeat_s`` (the first time
    after ``first_heartbeat_s`` if given); asks ``should_cancel()`` every
    ``cancel_check_s`` (it hits the database). Polls start at ``initial_poll_s``
    and double up to ``poll_s``; the job's exit wakes the loop immediately.

    On cancel, or when the run exceeds ``max_runtime_s``: creates workdir/STOP,
    SIGTERMs the process group, and SIGKILLs it ``grace_s`` later if it has not
    exited. After the job process exits, any process left in its group gets the
    same TERM-grace-KILL treatment, so nothing of the job outlives this call.

    ``on_exit()`` is called once the job process has exited, before the rest of
    its log is forwarded (a caller may hold that last part back and store it with
    the outcome). A crashing job never raises here. An exception from a callback
    propagates, but only after the job's process group has been killed.
    """
    timing = Timing(max_runtime_s, grace_s, poll_s, initial_poll_s, heartbeat_s,
                    heartbeat_s if first_heartbeat_s is None else first_heartbeat_s, cancel_check_s)
    handle = launch(payload, mode, grace_s=grace_s, zygote=zygote)
    logs = LogTailer(handle.workdir / files.LOG_FILE, on_log)
    metrics = MetricsTailer(handle.workdir / files.METRICS_FILE, on_metric)
    try:
        if on_start is not None:
            on_start(handle.pid)
        stop_reason = _watch(handle, logs, metrics, heartbeat, should_cancel, timing)
        duration = time.monotonic() - handle.started_at
        if on_exit is not None:
            on_exit()
        # The leader is gone; helpers it left in the group (or that ignored the
        # SIGTERM) must not keep NeuronCores busy after we report the job done.
        # A released warm runner is alone in its group and waits for its next job.
        if not handle.released:
            kill_process_group(handle.pgid, grace_s if stop_reason is None else 0.0)
        logs.pump(final=True)
        metrics.pump()
        return outcome_of(handle.workdir, handle.returncode, stop_reason, max_runtime_s=max_runtime_s,
                          log_bytes=logs.offset, duration_s=duration, pid=handle.pid)
    finally:
        if not handle.exited:
            # Only reached when a callback raised (or we were interrupted): never
            # leave an unsupervised job behind.
            _request_stop(handle)
            kill_process_group(handle.pgid, grace_s)
            handle.wait(5.0)
        handle.close()
        logs.close()
        sessions.forget(handle.session_record)


def _watch(handle: ChildHandle, logs: LogTailer, metrics: MetricsTailer, heartbeat: Callable[[], None],
           should_cancel: Callable[[], bool], timing: Timing) -> StopReason | None:
    """The supervision loop; returns why the job was stopped (None: it ended by itself)."""
    start = handle.started_at
    next_heartbeat = start + timing.first_heartbeat_s
    next_cancel_check = start + timing.cancel_check_s
    deadline = start + timing.max_runtime_s if timing.max_runtime_s is not None else None
    stop_reason: StopReason | None = None
    kill_at: float | None = None
    give_up_at: float | None = None
    interval = timing.initial_poll_s
    while True:
        now = time.monotonic()
        timers = [next_heartbeat, kill_at if kill_at is not None else next_cancel_check]
        if deadline is not None and stop_reason is None:
            timers.append(deadline)
        # Never sleep past a due timer; the 1 ms floor avoids a busy loop.
        exited = handle.wait(max(0.001, min(interval, min(timers) - now)))
        logs.pump(final=False)
        metrics.pump()
        if exited:
            return stop_reason
        now = time.monotonic()
        interval = min(interval * 2, timing.poll_s)
        if now >= next_heartbeat:
            heartbeat()
            next_heartbeat = now + timing.heartbeat_s
        if stop_reason is None:
            if deadline is not None and now >= deadline:
                stop_reason = "timeout"
            elif now >= next_cancel_check:
                next_cancel_check = now + timing.cancel_check_s
                if should_cancel():
                    stop_reason = "cancel"
            if stop_reason is not None:
                _request_stop(handle)
                kill_at = now + timing.grace_s
                interval = timing.initial_poll_s  # a cooperative exit should be noticed quickly
        elif kill_at is not None and now >= kill_at:
            signal_group(handle.pgid, signal.SIGKILL)
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
    files.request_stop(handle.workdir)
    signal_group(handle.pgid, signal.SIGTERM)
