"""Tiny backends for the process layer's tests, loaded as ``tests.fake_backends:Name``.

They follow the real backend contract (``run(ctx) -> dict``, ``JobFailed`` for
user-facing failures) but do no ML work, so tests exercise process handling
only: start-up, logs, metrics, signals, crashes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from neuron_workers.backends.base import JobContext, JobFailed


class OkBackend:
    """Returns at once with what the child saw (env, cwd, pid, pgid)."""

    def run(self, ctx: JobContext) -> dict:
        ctx.log(f"ok job {ctx.job_id} starting")
        (ctx.workdir / "artifacts" / "out.txt").write_text("done")
        return {
            "job_id": ctx.job_id,
            "visible_cores": os.environ.get("NEURON_RT_VISIBLE_CORES"),
            "process_tag": os.environ.get("NEURON_PROCESS_TAG"),
            "ctx_cores": ctx.cores,
            "cwd": os.getcwd(),
            "pid": os.getpid(),
            "pgid": os.getpgrp(),
            "sid": os.getsid(0),
            "echo": ctx.spec.get("echo"),
            "random": random.random(),
            "environ": dict(os.environ),
            "threading_main": threading.current_thread() is threading.main_thread(),
        }


class SleepBackend:
    """Sleeps ``spec["seconds"]`` in small steps, logging and emitting metrics.

    spec keys:
      seconds         total sleep (default 1)
      step_s          sleep per step (default 0.05)
      lines           extra log lines to print up front (default 0)
      line            text of those lines (default "line")
      honour_stop     poll ctx.should_stop() and raise JobFailed("cancelled") (default True)
      ignore_sigterm  set SIGTERM to SIG_IGN (and never poll should_stop)
      grandchild      spawn a child process (which ignores SIGTERM too if
                      ignore_sigterm) and write its pid to workdir/grandchild.pid
      ready_file      touch workdir/<ready_file> once running
      until_file      return early, successfully, once workdir/<until_file> exists
    """

    def run(self, ctx: JobContext) -> dict:
        spec = ctx.spec
        ignore = bool(spec.get("ignore_sigterm"))
        honour = bool(spec.get("honour_stop", True)) and not ignore
        if ignore:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for i in range(int(spec.get("lines", 0))):
            print(f"{spec.get('line', 'line')} {i}")
        sys.stdout.flush()
        if spec.get("grandchild"):
            trap = "trap '' TERM; " if ignore else ""
            child = subprocess.Popen(["sh", "-c", f"{trap}sleep 300"])
            Path(ctx.workdir, "grandchild.pid").write_text(str(child.pid))
        if spec.get("ready_file"):
            Path(ctx.workdir, spec["ready_file"]).touch()
        seconds = float(spec.get("seconds", 1))
        step_s = float(spec.get("step_s", 0.05))
        started = time.monotonic()
        step = 0
        until = Path(ctx.workdir, spec["until_file"]) if spec.get("until_file") else None
        while time.monotonic() - started < seconds:
            if until is not None and until.exists():
                break
            if honour and ctx.should_stop():
                ctx.log(f"stopping at step {step}")
                raise JobFailed("cancelled", f"stopped at step {step}")
            ctx.metric({"step": step, "loss": 1.0 / (step + 1)})
            ctx.log(f"step {step}")
            step += 1
            time.sleep(step_s)
        return {"steps": step}


class CrashBackend:
    """Dies in the way ``spec["how"]`` says: exit | raise | sigkill | segv | fail | oom."""

    def run(self, ctx: JobContext) -> dict:
        how = ctx.spec.get("how", "exit")
        ctx.log(f"about to crash via {how}")
        if how == "exit":
            os._exit(int(ctx.spec.get("code", 3)))
        if how == "raise":
            raise RuntimeError("boom")
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if how == "fail":
            raise JobFailed(ctx.spec.get("code", "bad_input"), ctx.spec.get("message", "bad spec"))
        if how == "oom":
            raise MemoryError()
        time.sleep(5)
        return {}


class BadResultBackend:
    """Returns something that is not a dict."""

    def run(self, ctx: JobContext) -> list:
        return [1, 2, 3]


class ReusableBackend(OkBackend):
    """An OkBackend whose process may run the team's next job, like a cpu inference
    (``Backend.reusable_process``). It counts the jobs its process ran.

    spec keys (on top of OkBackend's):
      leave  "thread": leave a Python thread running; "child": leave a `sleep`
             child running and write its pid to workdir/child.pid; "orphan": the
             same, but a `sleep` whose parent exited (still in the job's session)
      fail   fail the job (JobFailed) after leaving whatever ``leave`` says
    """

    jobs_run = 0

    def reusable_process(self, kind: str) -> bool:
        return kind == "inference"

    def run(self, ctx: JobContext) -> dict:
        ReusableBackend.jobs_run += 1
        leave = ctx.spec.get("leave")
        if leave == "thread":
            threading.Thread(target=threading.Event().wait, daemon=True).start()
        elif leave == "child":
            child = subprocess.Popen(["sleep", "300"])
            Path(ctx.workdir, "child.pid").write_text(str(child.pid))
        elif leave == "orphan":
            subprocess.run(["sh", "-c", 'sleep 300 & echo $! > "$1"', "sh", str(Path(ctx.workdir, "child.pid"))],
                           check=True)
        if ctx.spec.get("fail"):
            raise JobFailed("bad_input", "asked to fail")
        return {**super().run(ctx), "jobs_run": ReusableBackend.jobs_run}


class ReusableSleepBackend(SleepBackend):
    """SleepBackend (same spec keys) whose process may run another job."""

    def reusable_process(self, kind: str) -> bool:
        return True


class ServeBackend:
    """An endpoint replica's stand-in for the control-plane tests: an HTTP server on a
    free port (GET /health, POST /v1/completions streaming a few SSE tokens), reported
    ready through the metric channel as the real serve backend does, serving until
    asked to stop (SIGTERM / STOP file), then finishing and exiting cleanly.

    The model's path chooses a failure: "broken" in it exits 1 at start, "hang" never
    becomes ready; spec "crash_after_s" (tests set it on the job) exits 1 after that.
    A request body with "hold_file" streams its first token, then the rest only once
    that file exists (a long request the test controls); on stop, requests in flight
    finish before the process exits."""

    def run(self, ctx: JobContext) -> dict:
        import http.server
        import json as json_lib

        model_path = str(ctx.inputs.get("model_path", ""))
        if "broken" in model_path:
            ctx.log("cannot load the model")
            os._exit(1)
        served = {"requests": 0}

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                body = b'{"status": "ok"}'
                self.send_response(200 if self.path == "/health" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    hold = json_lib.loads(self.rfile.read(length) or b"{}").get("hold_file")
                except ValueError:
                    hold = None
                served["requests"] += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for i, token in enumerate(("hello", " from", f" replica {ctx.spec.get('replica_id')}")):
                    while i == 1 and hold and not os.path.exists(hold):
                        time.sleep(0.02)
                    chunk = {"choices": [{"text": token, "index": 0}]}
                    self.wfile.write(f"data: {json_lib.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = False  # server_close() waits for the requests in flight: the drain
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://{ctx.spec.get('advertise_host', '127.0.0.1')}:{server.server_address[1]}"
        if "hang" not in model_path:
            ctx.metric({"event": "serve_ready", "url": url, "replica_id": ctx.spec.get("replica_id")})
        crash_after = ctx.spec.get("crash_after_s")
        started = time.monotonic()
        while not ctx.should_stop():
            if crash_after is not None and time.monotonic() - started >= float(crash_after):
                os._exit(1)
            time.sleep(0.05)
        ctx.metric({"event": "serve_draining", "replica_id": ctx.spec.get("replica_id")})
        server.shutdown()  # no new connections
        server.server_close()  # in-flight handlers finish: the drain
        return {"requests": served["requests"], "url": url}
