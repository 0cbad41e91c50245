"""The multi-core fine-tune launcher: torchrun with one neuron_train rank per NeuronCore.

The launcher and the ranks talk through the job directory and rank 0's stdout:

- the launcher writes train_job.json ({"job_id", "spec", "inputs"});
- rank 0 prints each metric as a line "@@neurondeck-metric {json}", relayed here
  to ctx.metric, and every other line is relayed to ctx.log;
- rank 0 writes train_result.json on success, or train_error.json
  ({"code", "message"}) on a JobFailed.

Torch-free: the ranks are separate processes (neuron_workers.backends.neuron_train,
which imports the constants below).

The ranks' environment (`training_env`): the compile cache of their framework, and
for several ranks a collective root address of the job's own. Each rank's one
NeuronCore is set by the rank itself (neuron_train.prepare_rank_environment).
"""

from __future__ import annotations

import errno
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .base import JobContext, JobFailed, write_json
from .neuron_env import installed_framework, parse_visible_cores
from .neuron_errors import classify_neuron_error
from .neuron_matrix import XLA
from .neuron_parallel import precompile_command

METRIC_PREFIX = "@@neurondeck-metric "
RESULT_FILE = "train_result.json"
ERROR_FILE = "train_error.json"
JOB_FILE = "train_job.json"
# A stopped torchrun's ranks get this long to save the step they reached before the
# launcher kills them (the worker's own JOB_KILL_GRACE_S bounds the whole job).
STOP_GRACE_S = 10.0
RANK_MODULE = "neuron_workers.backends.neuron_train"

# The Neuron XLA plugin sets NEURON_RT_ROOT_COMM_ID to MASTER_ADDR:62182 when it is
# unset (pytorch/xla torch_xla/_internal/neuron.py, set_rt_root_comm_id): two
# multi-core jobs on one host would both bind it.
DEFAULT_ROOT_COMM_PORT = 62182


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _ephemeral_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def root_comm_id(first_core: int, port_free: Callable[[int], bool] = _port_free) -> str:
    """NEURON_RT_ROOT_COMM_ID for a multi-core job whose cores start at `first_core`.

    Port DEFAULT_ROOT_COMM_PORT + 1 + first_core: the jobs running on one host hold
    disjoint core ranges, so two of them never get the same port. When something
    else listens there, a free ephemeral port instead."""
    port = DEFAULT_ROOT_COMM_PORT + 1 + first_core
    if not port_free(port):
        port = _ephemeral_port()
    return f"localhost:{port}"


def neuron_cc_flags(existing: str | None, cache_dir: str) -> str:
    """NEURON_CC_FLAGS with our --cache_dir appended and any earlier --cache_dir dropped.

    neuron_cc_wrapper, which torch-xla's lazy graphs (training) compile through,
    reads this variable and consumes --cache_dir itself (neuron.md §4.4).
    torch_neuronx.trace runs neuronx-cc directly and ignores it (aws-neuron-sdk#865),
    so compile jobs do not set it. The value is a whitespace-separated flag string
    read by the wrapper, never a shell command, so a cache path containing
    whitespace cannot be represented and is refused.
    """
    if not cache_dir or any(c.isspace() for c in cache_dir):
        raise ValueError(f"compile cache dir {cache_dir!r} must be non-empty and contain no whitespace")
    kept = [flag for flag in (existing or "").split() if not flag.startswith("--cache_dir")]
    return " ".join([*kept, f"--cache_dir={cache_dir}"])


def training_env(framework: str, visible: str | None, cache_dir: str, environ: Mapping[str, str],
                 port_free: Callable[[int], bool] = _port_free) -> dict[str, str]:
    """What a fine-tune's processes add to their environment.

    - The compile cache of the framework: NEURON_CC_FLAGS --cache_dir for torch-xla,
      TORCH_NEURONX_NEFF_CACHE_DIR for native TorchNeuron (its persistent NEFF
      cache; default /tmp/neff_cache, docs torch/reference/env-vars).
    - With several cores, NEURON_RT_ROOT_COMM_ID of the job's own (root_comm_id),
      unless the environment already has one. For native ranks the runtime reads
      the same variable; that it needs one per job there too is UNCONFIRMED.
    """
    env = ({"NEURON_CC_FLAGS": neuron_cc_flags(environ.get("NEURON_CC_FLAGS"), cache_dir)} if framework == XLA
           else {"TORCH_NEURONX_NEFF_CACHE_DIR": cache_dir})
    cores = parse_visible_cores(visible)
    if len(cores) > 1 and not environ.get("NEURON_RT_ROOT_COMM_ID"):
        env["NEURON_RT_ROOT_COMM_ID"] = root_comm_id(cores[0], port_free)
    return env


def torchrun_argv(cores: int, job_dir: Path, torchrun: str | None = None) -> list[str]:
    """argv for a data-parallel run: torchrun with one process per NeuronCore.

    --standalone picks a free local rendezvous port, so two jobs on one host do
    not collide on torchrun's default master port. Every rank inherits the job's
    NEURON_RT_VISIBLE_CORES range and LOCAL_WORLD_SIZE = cores; each then uses
    cores[LOCAL_RANK] (torch-xla remaps by itself, a native rank is narrowed by
    neuron_train.prepare_rank_environment).
    """
    if cores < 1:
        raise ValueError("cores must be >= 1")
    return [
        torchrun or default_torchrun(),
        "--standalone",
        f"--nproc_per_node={cores}",
        "-m",
        RANK_MODULE,
        "--job-dir",
        str(job_dir),
    ]


def default_torchrun() -> str:
    """The torchrun script of the running interpreter's environment, else "torchrun" on PATH."""
    candidate = Path(sys.executable).with_name("torchrun")
    return str(candidate) if candidate.exists() else "torchrun"


def run_torchrun(ctx: JobContext, cores: int, cache_dir: str, framework: str | None = None) -> dict:
    """Launch the ranks under torchrun, relay rank-0 metrics/logs, honour should_stop.

    `framework` ("xla" or "native") defaults to what the installed torch is
    (neuron_env.installed_framework); the launcher imports neither, so it holds no
    NeuronCore its ranks need."""
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    write_json(ctx.workdir / JOB_FILE, {"job_id": ctx.job_id, "spec": ctx.spec, "inputs": ctx.inputs})
    for stale in (RESULT_FILE, ERROR_FILE):
        (ctx.workdir / stale).unlink(missing_ok=True)
    argv = torchrun_argv(cores, ctx.workdir)
    added = training_env(framework or installed_framework() or XLA, os.environ.get("NEURON_RT_VISIBLE_CORES"),
                         cache_dir, os.environ)
    ctx.log(f"launching {' '.join(argv)} with {' '.join(f'{k}={v}' for k, v in sorted(added.items()))}")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **added},
                            start_new_session=True)  # own process group, so cancel can stop every rank
    tail = relay_output(ctx, proc)
    return collect_torchrun_result(ctx, proc.returncode, tail)


def run_precompile(ctx: JobContext, cores: int, cache_dir: str, framework: str | None = None) -> float:
    """The precompile stage: the job's own torchrun command under neuron_parallel_compile
    for a few trial steps (neuron_parallel.precompile_command), filling the compile cache
    the training run then reads. Returns its seconds; JobFailed("compile_error") if it fails."""
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    write_json(ctx.workdir / JOB_FILE, {"job_id": ctx.job_id, "spec": ctx.spec, "inputs": ctx.inputs})
    argv, trial = precompile_command(torchrun_argv(cores, ctx.workdir), cache_dir)
    added = {**training_env(framework or installed_framework() or XLA, os.environ.get("NEURON_RT_VISIBLE_CORES"),
                            cache_dir, os.environ), **trial}
    ctx.log(f"precompile: {' '.join(argv)} with {' '.join(f'{k}={v}' for k, v in sorted(added.items()))}")
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **added}, start_new_session=True)
    tail = relay_output(ctx, proc)
    if proc.returncode != 0:
        raise JobFailed("compile_error", f"neuron_parallel_compile exited with status {proc.returncode}: "
                                         f"{tail[-1] if tail else 'no output'}")
    return time.perf_counter() - started


def relay_output(ctx: JobContext, proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> list[str]:
    """Forward the child's lines (metrics to ctx.metric, the rest to ctx.log) until it exits.

    A reader thread feeds a queue so the loop can poll should_stop even while the
    child is silent (a first XLA compile can print nothing for minutes). Asked to stop,
    it sends SIGTERM to the child's process group (torchrun forwards it to the ranks)
    and keeps relaying: ranks that save their step in the grace period report the
    checkpoint on these lines. What still runs `grace_s` later is killed; a stopped
    child ends in JobFailed("cancelled").
    """
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    tail: list[str] = []
    deadline = None
    while True:
        if deadline is None and ctx.should_stop():
            deadline = time.monotonic() + grace_s
            _signal_group(proc, signal.SIGTERM)
        if deadline is not None and time.monotonic() > deadline:
            _signal_group(proc, signal.SIGKILL)
            deadline = float("inf")
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            proc.wait()
            if deadline is not None:
                raise JobFailed("cancelled", _stopped_message(ctx))
            return tail
        if line.startswith(METRIC_PREFIX):
            ctx.metric(json.loads(line[len(METRIC_PREFIX):]))
        else:
            ctx.log(line)
            tail = (tail + [line])[-200:]


def _stopped_message(ctx: JobContext) -> str:
    """The rank's own account of its stop (train_error.json: "stopped after step S ...;
    checkpoint saved"), else a plain one."""
    try:
        return json.loads((ctx.workdir / ERROR_FILE).read_text(encoding="utf-8"))["message"]
    except (OSError, ValueError, KeyError):
        return f"job {ctx.job_id} was cancelled during training"


def _pump(stream: Any, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def collect_torchrun_result(ctx: JobContext, returncode: int, tail: list[str]) -> dict:
    """Rank 0's result file on success; its error file, or the classified output tail, on failure."""
    error_file = ctx.workdir / ERROR_FILE
    if error_file.exists():
        error = json.loads(error_file.read_text(encoding="utf-8"))
        raise JobFailed(error["code"], error["message"])
    result_file = ctx.workdir / RESULT_FILE
    if returncode == 0 and result_file.exists():
        return json.loads(result_file.read_text(encoding="utf-8"))
    text = "\n".join(tail[-50:])
    raise JobFailed(classify_neuron_error(text, "train"),
                    f"torchrun exited with status {returncode}: {tail[-1] if tail else 'no output'}")
