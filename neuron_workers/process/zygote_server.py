"""The zygote process: import the preload once, then fork a process per job request.

Started by :class:`neuron_workers.process.zygote.Zygote` as
``python -c "...zygote_server.main(fd)"``; exits when its owner closes the
control socket ``fd`` (EOF), including when the owner dies. Jobs keep running
then, in their own sessions; each one notices the loss through its lifeline.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
from typing import Any, NoReturn

from neuron_workers.process import channel
from neuron_workers.process.child import runner_main
from neuron_workers.process.warm import WarmRunners, reuse_key
from neuron_workers.process.zygote_warmup import native_threads


def main(fd: int) -> NoReturn:
    """Zygote process body: read the hello on ``fd``, preload, serve until EOF."""
    ctrl = socket.socket(fileno=fd)
    hello = json.loads(ctrl.recv(1 << 20))
    sys.path[:] = hello["sys_path"]
    # Ctrl-C in the worker's terminal goes to its whole process group, which
    # includes us; the worker decides what happens to jobs, not the terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    errors = []
    for entry in ["neuron_workers.process.runner", *hello["preload"]]:
        try:
            name, _, function = entry.partition(":")
            module = importlib.import_module(name)
            if function:
                getattr(module, function)()
        except BaseException as exc:  # noqa: BLE001 - a missing optional module must not kill the zygote
            errors.append(f"{entry}: {type(exc).__name__}: {exc}")
    # Move the preloaded heap out of the collector's reach: a collection in a job
    # process would otherwise write to every object header and copy most pages.
    gc.collect()
    gc.freeze()
    server = ZygoteServer(ctrl, spares=int(hello.get("spares", 1)), model_cache=bool(hello.get("model_cache", True)),
                          warm_runners=int(hello.get("warm_runners", 0)), runner_jobs=int(hello.get("runner_jobs", 1)))
    ctrl.send(json.dumps({"pid": os.getpid(), "preload_errors": errors, "threads": threading.active_count()}).encode())
    server.serve()
    os._exit(0)


class ZygoteServer:
    """The zygote's request loop.

    Spares: ``spares`` idle processes are kept pre-forked, and a request is handed
    to one; its replacement is forked after the hand-off, off the job's start-up
    path. Without a spare it forks for the request.

    Reaping: every job process is our child, so we reap it (SIGCHLD wakes the loop
    through a wake-up pipe) and send its wait status on the job's status channel.

    Model cache (``model_cache``): before handing a job over, the job's backend may
    load what the job needs into this process (a model and its tokenizer,
    ``Backend.zygote_preload``), so the job process inherits it copy-on-write
    instead of loading it. Spares forked before a load lack it, so they are
    retired when the cache changes. A job never depends on this: its backend
    looks the cache up by path and file signature and loads for itself on a miss.

    Warm runners: see :mod:`neuron_workers.process.warm`.
    """

    def __init__(self, ctrl: socket.socket, spares: int, model_cache: bool = True, warm_runners: int = 0,
                 runner_jobs: int = 1) -> None:
        self.ctrl = ctrl
        self.model_cache = model_cache
        self.spares_wanted = max(0, spares)
        # Without warm runners every process runs one job: none waits to be kept.
        self.runner_jobs = max(1, runner_jobs) if warm_runners > 0 else 1
        self.jobs: dict[int, socket.socket] = {}  # job pid -> its status channel
        self.spares: dict[int, socket.socket] = {}  # idle pid -> its request socket
        self.busy: dict[int, tuple[socket.socket, str]] = {}  # job pid -> (its request socket, reuse key)
        self.warm = WarmRunners(warm_runners)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def serve(self) -> None:
        """Serve requests until the owner closes the control socket."""
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self._refill()
        while True:
            readers = [self.ctrl, self.wake_r, *(sock for sock, _key in self.busy.values())]
            try:
                ready, _, _ = select.select(readers, [], [], self.warm.next_expiry_s())
            except InterruptedError:
                continue
            if self.wake_r in ready:
                self._drain_wakeups()
                self._reap()
            for pid, (sock, key) in list(self.busy.items()):
                if sock in ready:
                    self._runner_idle(pid, sock, key)
            if self.ctrl in ready:
                try:
                    msg, fds, _flags, _addr = socket.recv_fds(self.ctrl, 1 << 20, 1)
                except OSError:
                    msg, fds = b"", []
                if not msg:
                    return
                self._start_job(msg, socket.socket(fileno=fds[0]))
            self.warm.expire()
            self._refill()

    def _start_job(self, msg: bytes, status_sock: socket.socket) -> None:
        request = json.loads(msg)
        if self.model_cache and request.get("warm"):
            if self._load_for(request["warm"]):
                self._retire_spares()
            if channel.peer_closed(status_sock):
                # A long load outlasted the supervisor's wait for the pid: it gave up
                # on this request (and may run the job another way). Starting it
                # now would run it twice.
                status_sock.close()
                return
        key = reuse_key(request)
        while (runner := self.warm.pop(key)) is not None:
            if self._hand_over(*runner, key, msg, status_sock):
                return
        while self.spares:
            if self._hand_over(*self.spares.popitem(), key, msg, status_sock):
                return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = self._fork()
        if pid == 0:
            ours.close()
            runner_main(theirs, self.runner_jobs, first=(request, status_sock))
        theirs.close()
        self.jobs[pid] = status_sock
        self.busy[pid] = (ours, key)

    def _hand_over(self, pid: int, sock: socket.socket, key: str, msg: bytes, status_sock: socket.socket) -> bool:
        try:
            socket.send_fds(sock, [msg], [status_sock.fileno()])
        except OSError:
            sock.close()  # it died meanwhile; _reap drops its record
            return False
        self.jobs[pid] = status_sock
        self.busy[pid] = (sock, key)
        return True

    def _runner_idle(self, pid: int, sock: socket.socket, key: str) -> None:
        """A runner finished its job and waits for another (or it exits: EOF)."""
        try:
            msg = sock.recv(64)
        except OSError:
            msg = b""
        if msg != b"I":
            return  # EOF: it exits; _reap reports its status and drops it
        del self.busy[pid]
        status_sock = self.jobs.pop(pid, None)
        if status_sock is not None:
            status_sock.close()  # the runner reported the job's end itself
        if not self.warm.keep(pid, sock, key):
            sock.close()  # not wanted: EOF makes it exit

    def _load_for(self, warm: dict) -> bool:
        """Let the job's backend load what the job needs into our caches; True if
        anything changed."""
        from neuron_workers.backends import BACKENDS

        name = str(warm.get("backend") or "")
        module_name, _, attr = BACKENDS.get(name, name).partition(":")
        # Only backends the zygote preloaded: importing a job's backend module here
        # would run its import-time code in the process every job is forked from.
        module = sys.modules.get(module_name)
        if module is None or not attr:
            return False
        threads = native_threads()
        try:
            backend: Any = module
            for part in attr.split("."):
                backend = getattr(backend, part)
            preload = getattr(backend, "zygote_preload", None)
            changed = bool(preload(str(warm["kind"]), dict(warm.get("inputs") or {}))) if preload else False
        except BaseException as exc:  # noqa: BLE001 - the job loads for itself and reports it
            print(f"[zygote] preload for a {warm.get('kind')} job failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
            changed = True  # maybe half loaded: do not trust the spares
        if native_threads() > threads:
            # Forking with a thread pool running copies its locks in whatever state;
            # nothing loaded from now on can be trusted to be fork-safe.
            print("[zygote] a preload started threads; model cache off", file=sys.stderr, flush=True)
            self.model_cache = False
        if changed:
            # As at start-up: keep the collector off the new objects' headers in jobs.
            gc.collect()
            gc.freeze()
        return changed

    def _retire_spares(self) -> None:
        """Let idle spares exit (EOF on their request socket); _reap collects them.
        Warm runners stay: each serves only jobs with its last job's inputs."""
        for sock in self.spares.values():
            sock.close()
        self.spares.clear()

    def _refill(self) -> None:
        while len(self.spares) < self.spares_wanted:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = self._fork()
            if pid == 0:
                ours.close()  # else the spare never sees EOF when the zygote dies
                runner_main(theirs, self.runner_jobs)
            theirs.close()
            self.spares[pid] = ours

    def _fork(self) -> int:
        """os.fork(); in the child, drop every fd and handler of this loop."""
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(self.wake_r)
            os.close(self.wake_w)
            # A job process holding the control socket would keep the owner from
            # noticing that the zygote died.
            for sock in [self.ctrl, *self.jobs.values(), *self.spares.values(),
                         *(sock for sock, _key in self.busy.values()), *self.warm.sockets()]:
                sock.close()
        return pid

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for sock in (self.spares.pop(pid, None), self.busy.pop(pid, (None, ""))[0], self.warm.drop(pid)):
                if sock is not None:
                    sock.close()
            status_sock = self.jobs.pop(pid, None)  # None: a spare
            if status_sock is not None:
                try:
                    status_sock.sendall(channel.pack(channel.REAPED, pid, status))
                except OSError:
                    pass  # the supervisor gave up on this job; nobody to tell
                status_sock.close()
