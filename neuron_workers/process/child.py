"""The body of a process the zygote forks: a spare waiting for its first job, or a
process forked for one. It runs that job and, as a warm runner
(:mod:`neuron_workers.process.warm`), possibly later ones of the same key.

Each job gets what an exec-mode job gets: its own session (the first job only: a
warm runner's later jobs run in the session it leads), stdout and stderr on its
log.txt, cwd = its workdir, exactly the environment the supervisor built, and
the status channel as its lifeline.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import NoReturn

from neuron_workers.process import channel, runner, warm
from neuron_workers.process.lifeline import Lifeline

TAG_VAR = "NEURON_PROCESS_TAG"


def runner_main(sock: socket.socket, max_jobs: int, first: tuple[dict, socket.socket] | None = None) -> NoReturn:
    """Run jobs handed over on ``sock`` (the first one may come with the fork), at
    most ``max_jobs``, while each ends in a state the next may start from. A job
    without a reuse key is always its process's last."""
    done = 0
    request, status_sock = first if first is not None else _next_request(sock)
    while True:
        last = done + 1 >= max_jobs or not request.get("reuse_key")
        code, again = _run_job(request, status_sock, first_job=done == 0, last=last)
        done += 1
        if not again:
            _exit(code)
        _go_idle()
        try:
            sock.send(b"I")  # to the zygote: idle, waiting for the next job
        except OSError:
            _exit(0)
        request, status_sock = _next_request(sock)


def _next_request(sock: socket.socket) -> tuple[dict, socket.socket]:
    """Wait for the zygote to hand us a job: (request, its status channel). Exits on EOF."""
    try:
        msg, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 1)
    except BaseException:  # noqa: BLE001
        msg, fds = b"", []
    if not msg or not fds:
        os._exit(0)  # the zygote is gone, shutting down, or retired us: nothing to do
    return json.loads(msg), socket.socket(fileno=fds[0])


def _run_job(request: dict, status_sock: socket.socket, *, first_job: bool, last: bool) -> tuple[int, bool]:
    """Run one job in this process: (exit code, whether this process may run another)."""
    code = 1
    try:
        if first_job:
            # A new session first: the supervisor may killpg(pid) as soon as it
            # learns the pid, which STARTED below tells it.
            os.setsid()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        redirect_stdio(request["log_path"])
        os.chdir(request["workdir"])
        set_environ(request["env"])
        reseed_rngs()
        hf = sys.modules.get("neuron_workers.backends.hf")
        if hf is not None:
            hf.mark_one_job_process()  # the inherited model cache is ours alone now
        status_sock.sendall(channel.pack(channel.STARTED, os.getpid()))
        if first_job:
            runner.prepare_child_process()
        # EOF on the status channel once the supervisor closed its end: after the
        # job ended, or when the supervisor died.
        lifeline = Lifeline(status_sock.detach(), Path(request["workdir"]), float(request["grace_s"]))
        # Look like the exec-mode command line to code that inspects argv.
        sys.argv[:] = [runner.__file__, request["payload_path"]]
        if request.get("payload_json") is not None:
            payload = json.loads(request["payload_json"])
        else:
            with open(request["payload_path"], encoding="utf-8") as fh:
                payload = json.load(fh)
        code = runner.run_payload(payload)
        if warm.may_stay(payload, code, last=last) and lifeline.release(channel.pack(channel.RELEASED, os.getpid(), code)):
            return code, True
        lifeline.finish()
    except BaseException:  # noqa: BLE001 - report and exit; never return into the zygote's loop
        import traceback

        traceback.print_exc()
    return code, False


def _exit(code: int) -> NoReturn:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        # os._exit: no atexit handler or buffered state inherited from the zygote may run.
        os._exit(code)


def _go_idle() -> None:
    """Between jobs: write nowhere, hold no workdir, carry no job tag."""
    sys.stdout.flush()
    sys.stderr.flush()
    redirect_stdio(os.devnull)
    os.chdir("/")
    os.environ.pop(TAG_VAR, None)


def redirect_stdio(log_path: str) -> None:
    """stdout and stderr appended to ``log_path``, stdin from /dev/null."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.close(null_fd)


def set_environ(env: dict[str, str]) -> None:
    """Make os.environ (and so the C environment) exactly ``env``."""
    os.environ.clear()
    os.environ.update(env)


def reseed_rngs() -> None:
    """Give this job its own random numbers. os.fork() reseeds ``random``; numpy's
    global generator is not reseeded, and every job forked from the same zygote
    would draw the same numbers. Only if numpy.random is imported already
    (importing it just for this would be slow), with an explicit seed (numpy's
    argument-less seed() is slow on first use)."""
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_random.seed(int.from_bytes(os.urandom(4), "little"))
