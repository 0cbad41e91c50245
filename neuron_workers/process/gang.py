"""One host's share of a multi-host job (a gang): PyTorch's own launcher, torchrun.

Each host of a gang runs ``python -m neuron_workers.process.gang payload.json`` as its
job process (exec mode, in a session of its own, like any job). It holds the job's
lifeline and runs, in its own process group,

    python -m torch.distributed.run --nnodes N --node-rank r --nproc-per-node P
        --rdzv-backend static --rdzv-endpoint <rank 0's address>:<port> --rdzv-id job-<id>-<attempt>
        --rdzv-conf timeout=<s> --local-addr <this host's address>
        --max-restarts 0 -m neuron_workers.process.runner payload.json

so every local process torchrun starts is the project's runner, with torchrun's RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and MASTER_PORT in
its environment.

Why the static rendezvous (torch's TCPStore on node rank 0, at the endpoint) and not
c10d: c10d's dynamic rendezvous numbers the hosts by sorting their (address, pid)
and ignores --node-rank (torch/distributed/elastic/rendezvous/dynamic_rendezvous.py,
_mark_rendezvous_complete; run.py: node-rank "is only used for static rendezvous"),
so the host NeuronDeck placed as rank 0 could run torch's rank 1 and the rank table
would lie. A gang never grows or shrinks (a lost host stops the whole gang), so
nothing of c10d's elasticity is lost. The rendezvous id prefixes the store's keys;
``timeout`` bounds the wait for the other hosts (GANG_JOIN_TIMEOUT_S).

``payload["gang"]`` (written by the worker, :mod:`neuron_workers.gang_execution`):
nnodes, node_rank, nproc_per_node, endpoint (rank 0's address), port, rdzv_id,
local_addr, hosts (every host's address in rank order), join_timeout_s, backend, precompile.

Precompile (neuron gangs whose spec asks for it, ``gang["precompile"]``): before
training, every host runs the same torchrun command under ``neuron_parallel_compile``
for a few trial steps (neuron_workers.backends.neuron_parallel.precompile_command:
NEURONDECK_TRIAL_STEPS, NEURON_COMPILE_CACHE_URL = the fleet's compile cache), with a
rendezvous id of its own and a payload whose workdir is ``precompile/`` (the trial's
verdict and meaningless figures stay there; its output goes to the log). Its graphs
compile into the shared cache the training run then reads. A failed precompile ends
the host's share as ``compile_error``. Rank 0's launcher reports the stages of a
neuron gang (precompile, train) on the job's metrics, as the single-host backend does.

Stopping: torchrun starts its workers in sessions of their own, so the job's
process group does not reach them; torchrun forwards a SIGTERM to them (then
SIGKILL), and each worker watches its parent (the runner's
:class:`~neuron_workers.process.lifeline.ParentWatch`) and stops itself if torchrun
is gone. Django-free.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from neuron_workers import config
from neuron_workers.process import workdir as files
from neuron_workers.process.lifeline import Lifeline

RUNNER_MODULE = "neuron_workers.process.runner"

# The Neuron multi-node environment of the Neuron training samples
# (aws-neuron/aws-neuron-samples torch-neuronx/training/*/run_*.sh, their Slurm branch:
# NEURON_RT_ROOT_COMM_ID=$MASTER_ADDR:<port>, FI_EFA_FORK_SAFE=1, FI_EFA_USE_DEVICE_RDMA=1,
# FI_PROVIDER=efa): the runtime's collectives bootstrap at rank 0's root address and run
# over EFA with device RDMA; fork safety because the launcher and data loaders fork.
EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "FI_EFA_FORK_SAFE": "1"}


def torchrun_argv(python: str, gang: dict, payload_path: Path | str) -> list[str]:
    """The torchrun command line of this host's share of the gang."""
    node_rank = int(gang["node_rank"])
    return [
        python, "-m", "torch.distributed.run",
        "--nnodes", str(int(gang["nnodes"])),
        "--node-rank", str(node_rank),
        "--nproc-per-node", str(int(gang["nproc_per_node"])),
        "--rdzv-backend", "static",
        "--rdzv-endpoint", f"{gang['endpoint']}:{int(gang['port'])}",
        "--rdzv-id", str(gang["rdzv_id"]),
        "--rdzv-conf", f"timeout={int(gang['join_timeout_s'])}",
        "--local-addr", str(gang["local_addr"]),
        # A lost rank fails the whole gang (NeuronDeck requeues it); torchrun must not
        # restart this host's processes on its own.
        "--max-restarts", "0",
        "-m", RUNNER_MODULE, str(payload_path),
    ]


def gang_env(gang: dict, visible_cores: str | None) -> dict[str, str]:
    """What this host's processes add to their environment for the gang.

    Every backend: NEURONDECK_GANG_HOSTS (the hosts' addresses in rank order; torchrun
    adds RANK, WORLD_SIZE, GROUP_RANK = this host's rank, and the rest).
    cpu: OMP_NUM_THREADS = the host's cores (one process per host). neuron: the host's
    NEURON_RT_VISIBLE_CORES, the collectives' root at rank 0 (NEURON_RT_ROOT_COMM_ID,
    the port after the rendezvous port) and the EFA variables (EFA_ENV)."""
    env = {config.GANG_HOSTS_ENV: ",".join(gang["hosts"])}
    if gang.get("backend") == "neuron":
        env.update(EFA_ENV)
        env["NEURON_RT_ROOT_COMM_ID"] = f"{gang['endpoint']}:{int(gang['port']) + 1}"
        env["NEURON_RT_VISIBLE_CORES"] = visible_cores or ""
        # One rank per NeuronCore: torchrun's LOCAL_WORLD_SIZE is the host's core count.
        env["OMP_NUM_THREADS"] = "1"
    else:
        env["OMP_NUM_THREADS"] = str(int(gang["cores_per_host"]))
    return env


PRECOMPILE_DIR = "precompile"  # the trial run's workdir, inside the host's own


def precompile_plan(python: str, gang: dict, payload: dict, workdir: Path) -> tuple[list[str], dict[str, str], dict]:
    """(argv, added environment, the trial ranks' payload) of this host's precompile
    stage: this host's torchrun command under neuron_parallel_compile, its rendezvous id
    "<rdzv_id>-precompile" (a late process of one run never joins the other), the trial
    length and the fleet's compile cache."""
    from neuron_workers.backends.neuron_parallel import precompile_command  # torch-free

    trial_payload = {**payload, "workdir": str(workdir / PRECOMPILE_DIR)}
    trial_payload.pop("gang", None)
    train = torchrun_argv(python, {**gang, "rdzv_id": f"{gang['rdzv_id']}-precompile"},
                          workdir / PRECOMPILE_DIR / files.PAYLOAD_FILE)
    argv, added = precompile_command(train, config.compile_cache_dir())
    return argv, added, trial_payload


class _Stages:
    """Rank 0's reports of a neuron gang's stages (metrics.jsonl "stage" events, as
    neuron_workers.backends.finetuning.stage writes them); other hosts report none."""

    def __init__(self, workdir: Path, gang: dict) -> None:
        self.path = workdir / files.METRICS_FILE
        self.on = gang.get("backend") == "neuron" and int(gang["node_rank"]) == 0

    def __call__(self, name: str, state: str, message: str = "") -> None:
        if self.on:
            row = {"event": "stage", "stage": name, "state": state, "message": message or f"{name}: {state}",
                   "ts": time.time()}
            with open(self.path, "a", encoding="utf-8") as fh:  # one line, appended whole
                fh.write(json.dumps(row) + "\n")


def _run(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run `argv` in our session and group (a stop reaches it too); its status, 128+N if killed by signal N."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env)
    while True:
        try:
            code = proc.wait()
            break
        except InterruptedError:
            continue
    return code if code >= 0 else 128 - code


def _precompile(payload: dict, workdir: Path, stages: _Stages, stopping: "_Stopping") -> int:
    """The precompile stage on this host; 0, or the status it failed with (its verdict written)."""
    from neuron_workers.process.runner import write_json_atomic

    gang = payload["gang"]
    argv, added, trial_payload = precompile_plan(sys.executable, gang, payload, workdir)
    (workdir / PRECOMPILE_DIR).mkdir(parents=True, exist_ok=True)
    payload_path = workdir / PRECOMPILE_DIR / files.PAYLOAD_FILE
    payload_path.write_text(json.dumps(trial_payload), encoding="utf-8")
    os.chmod(payload_path, 0o600)  # as the job's own payload: its env may hold credentials
    stages("precompile", "started")
    print(f"[gang] precompile: {' '.join(argv)} with {' '.join(f'{k}={v}' for k, v in sorted(added.items()))}",
          flush=True)
    started = time.monotonic()
    code = _run(argv, {**os.environ, **added})
    if code == 0:
        stages("precompile", "done", f"precompile: done in {time.monotonic() - started:.1f} s "
                                     f"(neuron_parallel_compile)")
        return 0
    if not stopping.signalled:  # stopped, it is no compile error: the job's stop says why
        write_json_atomic(workdir / files.RESULT_FILE, {
            "ok": False, "code": "compile_error", "traceback": None,
            "error": f"neuron_parallel_compile exited with status {code} on host rank {gang['node_rank']}"})
    return code


class _Stopping:
    """SIGTERM to this launcher: torchrun (in our group) got it too and stops its
    workers; we wait for it instead of dying first."""

    def __init__(self) -> None:
        self.signalled = False

    def __call__(self, signum, frame) -> None:
        self.signalled = True


def main(argv: list[str] | None = None) -> int:
    """``python -m neuron_workers.process.gang <payload.json>``: run torchrun (after the
    precompile stage, if asked), return its status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m neuron_workers.process.gang <payload.json>", file=sys.stderr)
        return 2
    payload_path = Path(args[0])
    payload = json.loads(payload_path.read_text(encoding="utf-8"))
    workdir = Path(payload["workdir"])
    gang = payload["gang"]
    # Popped from the environment first, so torchrun and its workers never see it.
    lifeline = Lifeline.from_env(workdir)
    stopping = _Stopping()
    signal.signal(signal.SIGTERM, stopping)
    stages = _Stages(workdir, gang)
    code = 0
    if gang.get("precompile"):
        code = _precompile(payload, workdir, stages, stopping)
    elif gang.get("backend") == "neuron":
        stages("precompile", "skipped", "precompile: off (the first steps compile as they go)")
    if code == 0 and not stopping.signalled:
        argv_ = torchrun_argv(sys.executable, gang, payload_path)
        print(f"[gang] host rank {gang['node_rank']} of {gang['nnodes']}: {' '.join(argv_)}", flush=True)
        stages("train", "started")
        # torchrun's status: 0 only when every local process exited 0.
        code = _run(argv_)
        if code == 0:
            stages("train", "done")
    elif code == 0:
        code = 128 + signal.SIGTERM  # stopped between the stages
    if lifeline is not None:
        lifeline.finish()
    return code


if __name__ == "__main__":
    sys.exit(main())
