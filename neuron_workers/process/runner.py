"""The job process's entry point: run one job's backend and leave a verdict on disk.

The runner is the only code that executes *inside* a job's process. It runs either
in a process forked from the zygote (fork mode, :mod:`neuron_workers.process.child`)
or as a fresh interpreter (``python -m neuron_workers.process.runner <payload.json>``,
exec mode, what Neuron hosts use). It imports no Django and no Redis: everything
it needs arrives in the payload and everything it produces lands in the job's
workdir (see :mod:`neuron_workers.process.workdir` for the files).

Exit code: 0 when result.json says ok, 1 otherwise.
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from neuron_workers.process.lifeline import Lifeline, ParentWatch
from neuron_workers.process.workdir import ARTIFACTS_DIR, METRICS_FILE, RESULT_FILE, STOP_FILE


def resolve_backend(name: str) -> Any:
    """Return a backend *instance* for ``name``.

    ``name`` is either a registry name (``"cpu"``, ``"neuron"``) looked up through
    ``neuron_workers.backends.get_backend`` or a dotted ``"package.module:Class"``
    path (tests, out-of-tree backends). ``get_backend`` may return a class or an
    instance; a class is instantiated without arguments.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    else:
        from neuron_workers.backends import get_backend  # lazy: pulls torch

        obj = get_backend(name)
    return obj() if isinstance(obj, type) else obj


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON so readers see either the old file or the whole new one.

    No fsync: the reader is the supervisor on the same host, and what matters is
    that it never parses a half-written file, which os.replace guarantees. A
    power loss mid-job loses the job anyway.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(json_safe(obj), default=str, allow_nan=False).encode("utf-8")
    # One write() of the encoded bytes; no text-file wrapper for a file written once.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # as open(): umask applies
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/±inf floats replaced by None, recursively.

    A diverged loss is a legitimate result value, but PostgreSQL's jsonb (where
    the task stores the result) rejects NaN, so it would fail the recording of
    an otherwise finished job.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    return obj


def apply_env(env: dict[str, str | None] | None) -> None:
    """Put the job's env into os.environ (``None`` unsets a variable)."""
    environ = os.environ
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key, None)
        elif environ.get(key) != (text := str(value)):
            environ[key] = text


class _StopFlag:
    """Cooperative stop: set by SIGTERM or by the supervisor's STOP file.

    SIGTERM deliberately does *not* raise inside the backend: an exception at an
    arbitrary bytecode can leave half-written checkpoints. Backends poll
    ``ctx.should_stop()`` and wind down; those that never poll are SIGKILLed by
    the supervisor after its grace period.
    """

    def __init__(self, stop_path: Path) -> None:
        self.stop_path = stop_path
        self.signalled = False

    def __call__(self) -> bool:
        return self.signalled or self.stop_path.exists()

    def on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self.signalled:
            self.signalled = True
            # os.write, not print: print from a signal handler can re-enter the
            # buffered writer that the interrupted code was using.
            os.write(2, b"[runner] SIGTERM received; asking the backend to stop\n")


class _MetricWriter:
    """``ctx.metric(...)``: append one JSON object per line to metrics.jsonl.

    Accepts a dict and/or keyword fields (``ctx.metric({"loss": 1.2}, step=3)``);
    a ``ts`` (unix seconds) is added when missing. Each line is written with a
    single write() on a line-buffered file so the supervisor, which only consumes
    complete lines, never sees a torn record.
    """

    def __init__(self, path: Path) -> None:
        # Opened on the first metric: most short jobs report none, and a file
        # that is never written need not be created.
        self._path = path
        self._fh: Any = None
        self._lock = threading.Lock()

    def __call__(self, data: dict | None = None, /, **fields: Any) -> None:
        record = dict(data or {})
        record.update(fields)
        record.setdefault("ts", time.time())
        line = json.dumps(record, default=str) + "\n"
        with self._lock:
            if self._fh is None:
                self._fh = open(self._path, "a", buffering=1, encoding="utf-8")
            self._fh.write(line)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _log(message: str) -> None:
    print(message, flush=True)


def run_payload(payload: dict) -> int:
    """Run the backend described by ``payload`` in this process; return 0 or 1.

    ``payload`` keys: job_id, kind, backend (registry name or ``module:Class``),
    spec, workdir, inputs, cores, env. ``env`` is applied to os.environ first (the
    caller puts ``NEURON_RT_VISIBLE_CORES`` and ``NEURON_PROCESS_TAG=job-<id>``
    there). Always writes workdir/result.json before returning, whatever the
    backend does short of killing the process; never raises for job errors.
    """
    workdir = Path(payload["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    result_path = workdir / result_file_name()
    try:
        verdict = _run(payload, workdir)
    except BaseException as exc:  # noqa: BLE001 - the verdict must always be written
        # Only reached for failures outside the backend call (bad payload,
        # unwritable workdir, KeyboardInterrupt...). Still leave a verdict.
        verdict = _failure("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    try:
        write_json_atomic(result_path, verdict)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0 if verdict.get("ok") else 1


def result_file_name() -> str:
    """result.json; under torchrun with several processes on the host (a neuron gang:
    one per NeuronCore) only LOCAL_RANK 0 writes it, the others result.local-<k>.json
    (their status reaches the supervisor through torchrun's exit status)."""
    local_rank = os.environ.get("LOCAL_RANK", "0")
    return RESULT_FILE if local_rank in ("", "0") else f"result.local-{local_rank}.json"


def _failure(code: str, message: str, tb: str | None) -> dict:
    return {"ok": False, "code": code, "error": message, "traceback": tb}


def _run(payload: dict, workdir: Path) -> dict:
    # Imported here, not at module top, so `python -m neuron_workers.process.runner` can
    # report even a broken backends package through result.json.
    from neuron_workers.backends.base import JobContext, JobFailed

    apply_env(payload.get("env"))
    (workdir / ARTIFACTS_DIR).mkdir(exist_ok=True)
    stop = _StopFlag(workdir / STOP_FILE)
    metric = _MetricWriter(workdir / METRICS_FILE)
    previous_handler = _install_sigterm(stop.on_sigterm)
    try:
        ctx = JobContext(
            job_id=payload["job_id"],
            kind=payload["kind"],
            spec=payload.get("spec") or {},
            workdir=workdir,
            inputs=payload.get("inputs") or {},
            cores=payload.get("cores"),
            env=dict(payload.get("env") or {}),
            log=_log,
            metric=metric,
            should_stop=stop,
        )
        try:
            backend = resolve_backend(payload["backend"])
            result = backend.run(ctx)
        except JobFailed as exc:
            code, message = exc.code, exc.message
            if code == "cancelled":  # a stop on request is no failure: say what happened
                print(f"[runner] job stopped on request: {message}", file=sys.stderr, flush=True)
            else:
                print(f"[runner] job failed ({code}): {message}", file=sys.stderr, flush=True)
            return _failure(code, message, traceback.format_exc())
        except MemoryError:
            traceback.print_exc()
            return _failure("oom", "the job ran out of host memory", traceback.format_exc())
        except BaseException as exc:  # noqa: BLE001 - report, never crash silently
            traceback.print_exc()
            return _failure("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        if result is None:
            result = {}
        if not isinstance(result, dict):
            return _failure(
                "error", f"backend returned {type(result).__name__}, expected dict", None
            )
        return {"ok": True, "result": result}
    finally:
        _restore_sigterm(previous_handler)
        metric.close()


def _install_sigterm(handler: Callable[[int, FrameType | None], None]) -> Any:
    # signal.signal only works in the main thread; run_payload may be called
    # in-process from a worker thread (tests, debugging), where the supervisor's
    # STOP file remains the stop channel.
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def prepare_child_process() -> None:
    """Process-level set-up shared by both launch modes (call before run_payload)."""
    # A segfault in native code (torch, the Neuron runtime) then leaves a Python
    # stack in log.txt instead of just "killed by SIGSEGV".
    faulthandler.enable()
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            # stdout is a file, so Python would block-buffer it; the supervisor
            # streams log.txt live, so lines must reach the file as written.
            reconfigure(line_buffering=True, errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m neuron_workers.process.runner <payload.json>``; exit code 0/1 (2 = usage)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m neuron_workers.process.runner <payload.json>", file=sys.stderr)
        return 2
    prepare_child_process()
    with open(args[0], encoding="utf-8") as fh:
        payload = json.load(fh)
    lifeline = Lifeline.from_env(Path(payload["workdir"]))
    ParentWatch.under_torchrun(Path(payload["workdir"]))
    code = run_payload(payload)
    if lifeline is not None:
        lifeline.finish()
    return code


if __name__ == "__main__":
    sys.exit(main())
