"""Child-process entry point: run one job's backend and leave a verdict on disk.

The runner is the only code that executes *inside* a job's process. It is started
either by the supervisor's preloaded zygote (fork mode) or as a fresh interpreter
(``python -m neuron_workers.runner <payload.json>``, exec mode, also what Neuron
hosts use). It imports no Django and no Redis: everything it needs arrives in the
payload and everything it produces lands in the job's workdir.

Workdir contract (shared with :mod:`neuron_workers.supervisor`)::

    workdir/
      payload.json   written by the supervisor (mode 0600; holds the job env); in
                     fork mode only for a payload over INLINE_PAYLOAD_MAX (else sent to the zygote)
      log.txt        the child's stdout+stderr (the supervisor redirects fds 1/2)
      metrics.jsonl  one JSON object per line, appended by ``ctx.metric`` (created
                     with the first metric)
      artifacts/     created here; backends put outputs in it
      STOP           created by the supervisor to ask for a cooperative stop
      result.json    written last, atomically:
                     {"ok": true, "result": {...}} or
                     {"ok": false, "code": "...", "error": "...", "traceback": "..."}

Exit code: 0 when result.json says ok, 1 otherwise. A process that dies without
result.json (signal, os._exit, segfault) is classified "crashed" by the supervisor.
"""

from __future__ import annotations

import _thread
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

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "log.txt"
STOP_FILE = "STOP"
PAYLOAD_FILE = "payload.json"
ARTIFACTS_DIR = "artifacts"

# Exec mode: the supervisor passes the read end of a pipe whose write end only it
# holds, and the grace period to use if that pipe reports EOF (see Lifeline).
LIFELINE_FD_ENV = "NEURONDECK_LIFELINE_FD"
LIFELINE_GRACE_ENV = "NEURONDECK_LIFELINE_GRACE_S"


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
            environ[key] = text  # a forked child already has the job's env: usually a no-op


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
        # Opened on the first metric: most short jobs report none, and creating a
        # file costs ~0.1 ms of kernel time on the hosts' ext4.
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
    result_path = workdir / RESULT_FILE
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


def _failure(code: str, message: str, tb: str | None) -> dict:
    return {"ok": False, "code": code, "error": message, "traceback": tb}


def _run(payload: dict, workdir: Path) -> dict:
    # Imported here, not at module top, so `python -m neuron_workers.runner` can
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


def may_run_another(payload: dict) -> bool:
    """Whether this process may run another job after ``payload``'s: the job was not
    asked to stop, left no Python thread behind, and its backend says the kind
    changes nothing in the process that a later job could see
    (``Backend.reusable_process``)."""
    if threading.active_count() != 1 or (Path(payload["workdir"]) / STOP_FILE).exists():
        return False
    try:
        check = getattr(resolve_backend(payload["backend"]), "reusable_process", None)
        return bool(check(payload["kind"])) if callable(check) else False
    except Exception:  # noqa: BLE001 - when in doubt, a fresh process
        return False


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


class Lifeline:
    """Stop the job when its supervising process disappears.

    ``fd`` is readable-at-EOF once every copy of the supervisor's end is closed:
    normally after the job exits, or early when the worker dies (OOM-killed,
    ``kill -9``, Celery hard time limit). A job nobody supervises holds cores
    and gets no heartbeat, so the reaper will requeue it; it must not keep
    running next to its second attempt. On EOF a watcher thread writes STOP,
    SIGTERMs the job's process group (the runner's handler turns that into
    ``should_stop()``), and SIGKILLs the group ``grace_s`` later.
    """

    def __init__(self, fd: int, workdir: Path, grace_s: float) -> None:
        os.set_inheritable(fd, False)  # grandchildren need not hold it
        self.fd = fd
        self.workdir = workdir
        self.grace_s = grace_s
        self.lost = threading.Event()
        self.releasing = False
        self.released = threading.Event()
        # A bare thread (daemon-like: never joined at exit): threading.Thread's
        # start() handshake and bookkeeping cost ~0.3 ms in a forked child, most of
        # it copy-on-write faults on the zygote's pages.
        _thread.start_new_thread(self._watch, ())

    @classmethod
    def from_env(cls, workdir: Path) -> Lifeline | None:
        """The exec-mode lifeline announced in the environment (removed from it)."""
        raw = os.environ.pop(LIFELINE_FD_ENV, None)
        grace = float(os.environ.pop(LIFELINE_GRACE_ENV, "10") or 10)
        if not raw:
            return None
        return cls(int(raw), workdir, grace)

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
        try:
            (self.workdir / STOP_FILE).touch()
        except OSError:
            pass
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


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m neuron_workers.runner <payload.json>``; exit code 0/1 (2 = usage)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m neuron_workers.runner <payload.json>", file=sys.stderr)
        return 2
    prepare_child_process()
    with open(args[0], encoding="utf-8") as fh:
        payload = json.load(fh)
    lifeline = Lifeline.from_env(Path(payload["workdir"]))
    code = run_payload(payload)
    if lifeline is not None:
        lifeline.finish()
    return code


if __name__ == "__main__":
    sys.exit(main())
