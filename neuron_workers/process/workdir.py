"""A job's working directory: the files its supervisor and its runner share.

::

    workdir/
      payload.json   the runner payload, written by the supervisor (mode 0600: its
                     env may hold credentials); in fork mode only when the payload
                     is over INLINE_PAYLOAD_MAX, else it travels in the zygote request
      log.txt        the job process's stdout + stderr
      metrics.jsonl  one JSON object per line, appended by ``ctx.metric`` (created
                     with the first metric)
      artifacts/     created by the runner; backends put their outputs in it
      STOP           created by the supervisor to ask for a cooperative stop
      result.json    the verdict, written last and atomically by the runner:
                     {"ok": true, "result": {...}} or
                     {"ok": false, "code": "...", "error": "...", "traceback": "..."}

A job process that dies without result.json (a signal, ``os._exit``, a segfault)
is "crashed" (see :mod:`neuron_workers.process.outcome`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "log.txt"
STOP_FILE = "STOP"
PAYLOAD_FILE = "payload.json"
ARTIFACTS_DIR = "artifacts"


def prepare(payload: dict) -> Path:
    """Create the payload's workdir (resolved) and reset this attempt's control files.

    A requeued job reuses its workdir: a stale STOP would stop it at once and a
    stale result.json would be taken for this attempt's verdict.
    """
    workdir = Path(payload["workdir"]).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for name in (STOP_FILE, RESULT_FILE, METRICS_FILE):
        try:
            (workdir / name).unlink()
        except FileNotFoundError:
            pass
    (workdir / LOG_FILE).write_bytes(b"")
    return workdir


def payload_text(payload: dict, workdir: Path) -> str:
    """The payload as the runner reads it, with its resolved workdir."""
    return json.dumps({**payload, "workdir": str(workdir)}, default=str)


def write_payload(workdir: Path, text: str) -> Path:
    """Write payload.json readable by its owner only; return its path."""
    path = workdir / PAYLOAD_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def read_result(workdir: Path) -> dict | None:
    """The runner's verdict, or None if it left none (or an unreadable one)."""
    try:
        with open(workdir / RESULT_FILE, encoding="utf-8") as fh:
            verdict = json.load(fh)
    except (FileNotFoundError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) else None


def request_stop(workdir: Path) -> None:
    """Create STOP (a backend between steps polls it); never fails."""
    try:
        (workdir / STOP_FILE).touch()
    except OSError:
        pass
