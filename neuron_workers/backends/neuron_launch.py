"""The multi-core fine-tune launcher: torchrun with one neuron_train rank per NeuronCore.

The launcher and the ranks talk through the job directory and rank 0's stdout:

- the launcher writes train_job.json ({"job_id", "spec", "inputs"});
- rank 0 prints each metric as a line "@@neurondeck-metric {json}", relayed here
  to ctx.metric, and every other line is relayed to ctx.log;
- rank 0 writes train_result.json on success, or train_error.json
  ({"code", "message"}) on a JobFailed.

Torch-free: the ranks are separate processes (neuron_workers.backends.neuron_train,
which imports the constants below).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from .base import JobContext, JobFailed, write_json
from .neuron_errors import classify_neuron_error

METRIC_PREFIX = "@@neurondeck-metric "
RESULT_FILE = "train_result.json"
ERROR_FILE = "train_error.json"
JOB_FILE = "train_job.json"
RANK_MODULE = "neuron_workers.backends.neuron_train"


def torchrun_argv(cores: int, job_dir: Path, torchrun: str | None = None) -> list[str]:
    """argv for a data-parallel run: torchrun with one process per NeuronCore.

    --standalone picks a free local rendezvous port, so two jobs on one host do
    not collide on torchrun's default master port. Every rank inherits
    NEURON_RT_VISIBLE_CORES from the runner (neuron.md §4.6: one NeuronCore per
    process; UNCONFIRMED here how ranks split the visible range).
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


def run_torchrun(ctx: JobContext, cores: int) -> dict:
    """Launch the ranks under torchrun, relay rank-0 metrics/logs, honour should_stop."""
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    write_json(ctx.workdir / JOB_FILE, {"job_id": ctx.job_id, "spec": ctx.spec, "inputs": ctx.inputs})
    for stale in (RESULT_FILE, ERROR_FILE):
        (ctx.workdir / stale).unlink(missing_ok=True)
    argv = torchrun_argv(cores, ctx.workdir)
    ctx.log(f"launching {' '.join(argv)}")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # own process group, so cancel can stop every rank
    tail = relay_output(ctx, proc)
    return collect_torchrun_result(ctx, proc.returncode, tail)


def relay_output(ctx: JobContext, proc: subprocess.Popen) -> list[str]:
    """Forward the child's lines (metrics to ctx.metric, the rest to ctx.log) until it exits.

    A reader thread feeds a queue so the loop can poll should_stop even while the
    child is silent (a first XLA compile can print nothing for minutes).
    """
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    tail: list[str] = []
    while True:
        if ctx.should_stop():
            _terminate(proc)
            raise JobFailed("cancelled", f"job {ctx.job_id} was cancelled during training")
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            proc.wait()
            return tail
        if line.startswith(METRIC_PREFIX):
            ctx.metric(json.loads(line[len(METRIC_PREFIX):]))
        else:
            ctx.log(line)
            tail = (tail + [line])[-200:]


def _pump(stream: Any, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the launcher's process group, SIGKILL it if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
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
