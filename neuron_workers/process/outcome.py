"""How a supervised job ended: the job process's exit status and its verdict on
disk, read together into one :class:`Outcome`."""
from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from neuron_workers.process.workdir import read_result

Status = Literal["succeeded", "failed", "cancelled", "timed_out"]
StopReason = Literal["cancel", "timeout"]

_SIGNALS = {s.value for s in signal.Signals}


@dataclass
class Outcome:
    """How a supervised job ended.

    ``status``: succeeded | failed | cancelled | timed_out. cancelled / timed_out
    win over whatever the job reported once a stop was requested (``result`` is
    still filled if the job managed to return one, e.g. a partial checkpoint).
    ``exit_code`` is set for a normal exit, ``signal`` when the process was killed
    by a signal (then ``exit_code`` is None). A process that leaves no result.json
    is ``failed`` with ``error_code == "crashed"``. ``log_bytes`` is the size of
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


def outcome_of(workdir: Path, returncode: int | None, stop_reason: StopReason | None, *,
               max_runtime_s: float | None, log_bytes: int, duration_s: float, pid: int) -> Outcome:
    """The Outcome of a job process that ended with ``returncode`` (the subprocess
    convention: -N = killed by signal N; None = unknown) after ``stop_reason``."""
    exit_code = returncode if returncode is not None and returncode >= 0 else None
    sig = -returncode if returncode is not None and returncode < 0 else None
    verdict = read_result(workdir)
    base = dict(exit_code=exit_code, signal=sig, log_bytes=log_bytes, duration_s=duration_s, pid=pid)
    result = verdict.get("result") if verdict and verdict.get("ok") else None
    if stop_reason == "cancel":
        return Outcome("cancelled", result=result, error_code="cancelled", error="cancelled on request", **base)
    if stop_reason == "timeout":
        message = f"exceeded the maximum runtime of {max_runtime_s:g} s"
        return Outcome("timed_out", result=result, error_code="timed_out", error=message, **base)
    if verdict is not None and verdict.get("ok"):
        return Outcome("succeeded", result=result or {}, error_code=None, error=None, **base)
    if verdict is not None:
        return Outcome("failed", result=None, error_code=str(verdict.get("code") or "error"),
                       error=str(verdict.get("error") or ""), traceback=verdict.get("traceback"), **base)
    if sig is not None:
        how = f"was killed by signal {signal.Signals(sig).name} ({sig})" if sig in _SIGNALS else f"got signal {sig}"
    elif exit_code is not None:
        how = f"exited with code {exit_code}"
    else:
        how = "ended with an unknown exit status (zygote lost)"
    message = f"the job process {how} without writing a result; see the end of its log"
    return Outcome("failed", result=None, error_code="crashed", error=message, **base)
