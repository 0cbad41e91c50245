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
local_addr, hosts (every host's address in rank order), join_timeout_s, backend.

Stopping: torchrun starts its workers in sessions of their own, so the job's
process group does not reach them; torchrun forwards a SIGTERM to them (then
SIGKILL), and each worker watches its parent (the runner's
:class:`~neuron_workers.process.lifeline.ParentWatch`) and stops itself if torchrun
is gone. Django-free.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from neuron_workers import config
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


class _Stopping:
    """SIGTERM to this launcher: torchrun (in our group) got it too and stops its
    workers; we wait for it instead of dying first."""

    def __init__(self) -> None:
        self.signalled = False

    def __call__(self, signum, frame) -> None:
        self.signalled = True


def main(argv: list[str] | None = None) -> int:
    """``python -m neuron_workers.process.gang <payload.json>``: run torchrun, return its status."""
    import json

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m neuron_workers.process.gang <payload.json>", file=sys.stderr)
        return 2
    payload_path = Path(args[0])
    payload = json.loads(payload_path.read_text(encoding="utf-8"))
    # Popped from the environment first, so torchrun and its workers never see it.
    lifeline = Lifeline.from_env(Path(payload["workdir"]))
    signal.signal(signal.SIGTERM, _Stopping())
    argv_ = torchrun_argv(sys.executable, payload["gang"], payload_path)
    print(f"[gang] host rank {payload['gang']['node_rank']} of {payload['gang']['nnodes']}: {' '.join(argv_)}",
          flush=True)
    proc = subprocess.Popen(argv_, stdin=subprocess.DEVNULL)  # same session and group as we are
    while True:
        try:
            code = proc.wait()
            break
        except InterruptedError:
            continue
    if lifeline is not None:
        lifeline.finish()
    # torchrun's status: 0 only when every local process exited 0; -N = killed by signal N.
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
