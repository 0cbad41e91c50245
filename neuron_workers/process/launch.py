"""Start a job's runner in a process of its own, in a new session; return at once.

Two modes:

``exec``
    ``python -m neuron_workers.process.runner workdir/payload.json`` (a gang's host:
    ``neuron_workers.process.gang``, which runs the runner under torchrun) as a fresh
    interpreter: what Neuron hosts use, because the Neuron runtime reads
    ``NEURON_RT_VISIBLE_CORES`` once at start and must inherit nothing. The
    interpreter is the host's job Python (NEURONDECK_JOB_PYTHON: the Neuron
    DLAMI virtualenv or container Python, whose torch-neuronx the web app's
    virtualenv cannot hold), else this one.
``fork`` (cpu hosts)
    The supervising process's zygote (:mod:`neuron_workers.process.zygote`) hands
    the job to a process forked from its preloaded interpreter, or to a warm
    runner (:mod:`neuron_workers.process.warm`).

Both give the job process ``setsid()`` (sid == pgid == pid), stdout and stderr on
workdir/log.txt, stdin on /dev/null, cwd = workdir, the environment of
:func:`child_env`, and a lifeline (:mod:`neuron_workers.process.lifeline`). The
job's session is recorded (:mod:`neuron_workers.process.sessions`), so its
processes can be found and stopped by whoever asks.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from neuron_workers import config
from neuron_workers.backends.neuron_env import job_path
from neuron_workers.process import sessions
from neuron_workers.process import workdir as files
from neuron_workers.process.handles import ChildHandle, ExecChild, ForkChild, Mode
from neuron_workers.process.zygote import Zygote, ZygoteError, default_zygote, pythonpath_with_project

logger = logging.getLogger(__name__)

# A fork-mode payload up to this size travels in the zygote request instead of
# payload.json: one file less to create per job.
INLINE_PAYLOAD_MAX = 64 * 1024


def child_env(payload: dict) -> dict[str, str]:
    """The environment a job process gets: ours at launch time + ``payload["env"]``.

    ``None`` values in ``payload["env"]`` unset a variable. PYTHONPATH is made to
    include the project so ``neuron_workers`` (and ``module:Class`` backends next
    to it) import from any cwd; PYTHONUNBUFFERED keeps the live log live.
    """
    env = dict(os.environ)
    for key, value in (payload.get("env") or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    env["PYTHONPATH"] = pythonpath_with_project(env.get("PYTHONPATH"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch(payload: dict, mode: Mode = "fork", *, grace_s: float = 10.0, zygote: Zygote | None = None) -> ChildHandle:
    """Start the runner for ``payload`` in a new session; return at once.

    ``payload`` is the runner payload (job_id, kind, backend, spec, workdir,
    inputs, cores, env, and for fork mode an optional reuse_key). When this
    returns, the job process exists, leads its own session and process group and
    writes to workdir/log.txt. Fork mode uses ``zygote`` or this process's default
    one; if that zygote fails, the job is launched in exec mode instead (logged).

    If this process dies, the job stops by itself (SIGTERM, then SIGKILL
    ``grace_s`` later, to its whole group). ``handle.close()`` lets go of it the
    same way; the handle does that itself once the job is over.
    """
    started_at = time.monotonic()
    workdir = files.prepare(payload)
    env = child_env(payload)
    text = files.payload_text(payload, workdir)
    if mode not in ("fork", "exec"):
        raise ValueError(f"unknown launch mode {mode!r}")
    if payload.get("gang"):
        mode = "exec"  # a gang's host launches torchrun (neuron_workers.process.gang): a fresh interpreter
    handle = None
    if mode == "fork":
        try:
            handle = _fork(payload, zygote or default_zygote(), workdir, env, text, grace_s, started_at)
        except (ZygoteError, OSError, ValueError):
            logger.exception("fork launch failed; falling back to exec mode")
    if handle is None:
        module = "neuron_workers.process.gang" if payload.get("gang") else "neuron_workers.process.runner"
        handle = _exec(workdir, env, text, grace_s, started_at, module)
    handle.session_record = sessions.record(env.get(sessions.TAG_VAR), handle.sid)
    return handle


def _fork(payload: dict, zygote: Zygote, workdir: Path, env: dict[str, str], text: str, grace_s: float,
          started_at: float) -> ForkChild:
    inline = len(text) <= INLINE_PAYLOAD_MAX
    if not inline:
        files.write_payload(workdir, text)
    request = {
        "payload_json": text if inline else None,
        "payload_path": str(workdir / files.PAYLOAD_FILE),
        "log_path": str(workdir / files.LOG_FILE),
        "workdir": str(workdir),
        "env": env,
        "grace_s": grace_s,
        # Jobs with the same key may run one after another in one process.
        "reuse_key": payload.get("reuse_key") or "",
        # What the zygote may load for this job before forking it: the backend
        # decides from the kind and the input paths.
        "warm": {"backend": payload.get("backend"), "kind": payload.get("kind"), "inputs": payload.get("inputs") or {}},
    }
    pid, status_sock = zygote.spawn(request)
    return ForkChild(pid, status_sock, workdir, started_at)


def job_interpreter(env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The interpreter an exec-mode job starts with, and the environment it gets.

    NEURONDECK_JOB_PYTHON with its bin directory (then /opt/aws/neuron/bin) first on
    PATH, as activating its virtualenv would: torch_neuronx.trace runs the neuronx-cc
    it finds on PATH, and torchrun is found beside the interpreter. Unset: this
    interpreter, the environment as it is."""
    python = config.job_python()
    if python is None:
        return sys.executable, env
    return python, {**env, "PATH": job_path(python, env.get("PATH"))}


def _exec(workdir: Path, env: dict[str, str], text: str, grace_s: float, started_at: float,
          module: str = "neuron_workers.process.runner") -> ExecChild:
    payload_path = files.write_payload(workdir, text)
    python, env = job_interpreter(env)
    lifeline_r, lifeline_w = os.pipe()  # both O_CLOEXEC: no other child inherits them
    env = {**env, config.LIFELINE_FD_ENV: str(lifeline_r), config.LIFELINE_GRACE_ENV: str(grace_s)}
    try:
        with open(workdir / files.LOG_FILE, "ab") as log:
            popen = subprocess.Popen(
                [python, "-m", module, str(payload_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env,
                pass_fds=[lifeline_r], start_new_session=True,
            )
    except BaseException:
        os.close(lifeline_w)
        raise
    finally:
        os.close(lifeline_r)
    return ExecChild(popen, lifeline_w, workdir, started_at)
