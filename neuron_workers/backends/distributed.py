"""Data-parallel ranks: torchrun's environment, the gloo process group, and how ranks agree on a step.

When a fine-tune runs as one rank of `torch.distributed.run` (torchrun sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT), the cpu backend joins a gloo
process group from that environment, wraps the model in DistributedDataParallel
and trains on its shard of each global batch (data.shard). Without WORLD_SIZE > 1
it is a single process and nothing here is used.

reduce_step is the rule every multi-rank training loop follows after each step
(the cpu backend over gloo, the neuron backend's own loop over torch-xla's or
TorchNeuron's process group, and NeuronTrainer): the ranks stop together or not at
all. agreement gives the own loop's ranks that rule, the hand-over of each rank's RNG
states for a checkpoint and the wait for its writer, on every backend alike.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .base import JobFailed

# A rank waits this long for the others in a collective before failing, so a gang
# whose peer died ends instead of hanging (gangrun stops the gang sooner).
COLLECTIVE_TIMEOUT_S = 300


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks_from_env(environ: Mapping[str, str] | None = None) -> Ranks:
    """This process's place in a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK); one rank if unset."""
    environ = os.environ if environ is None else environ
    try:
        ranks = Ranks(int(environ.get("RANK") or 0), int(environ.get("WORLD_SIZE") or 1),
                      int(environ.get("LOCAL_RANK") or 0))
    except ValueError as exc:
        raise JobFailed("bad_input", f"torchrun's RANK / WORLD_SIZE / LOCAL_RANK are not integers: {exc}") from exc
    if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size:
        raise JobFailed("bad_input", f"rank {ranks.rank} is outside a world of {ranks.world_size}")
    return ranks


def init_gloo(ranks: Ranks) -> None:
    """Join the job's gloo process group (env:// rendezvous at MASTER_ADDR:MASTER_PORT)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://", rank=ranks.rank, world_size=ranks.world_size,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def reduce_step(loss: float, stop: bool, device: Any = "cpu") -> tuple[float, bool]:
    """(the step's loss averaged over ranks, whether any rank was asked to stop), in one
    all-reduce over the job's process group. Agreeing on the stop makes every rank stop
    after the same step, so none is left waiting in a collective for a peer that has
    gone or is saving a checkpoint.

    `device` is where the group's collectives run: the host CPU for gloo; under
    torch-xla the rank's XLA device, where the "xla" group runs the all-reduce as
    xm.all_reduce (pytorch/xla torch_xla/distributed/xla_backend.py). float32, which
    Neuron devices compute in (not float64)."""
    import torch.distributed as dist

    tensor = torch.tensor([loss, 1.0 if stop else 0.0], dtype=torch.float32, device=device)
    dist.all_reduce(tensor)
    total = tensor.to("cpu")
    return float(total[0]) / dist.get_world_size(), bool(total[1] > 0)


def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj` (picklable, small), in rank order: all_gather_object over
    `group` (None: the job's process group; gloo on the host; under torch-xla the "xla"
    group, whose allgather runs as xm.all_gather on the device)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def barrier(group: Any = None) -> None:
    import torch.distributed as dist

    dist.barrier(group=group)


def host_group() -> Any:
    """A gloo group of every rank beside a device backend's, for what lives on the host:
    Python objects and waiting. Every rank must create it, in the same order."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def agreement(device: Any = "cpu", objects: Any = None,
              wait: Callable[[], None] | None = None) -> dict[str, Callable]:
    """loops.TrainHooks' reduce_step, gather and barrier for several ranks of the own
    training loop, the one rule on every backend: after each step the ranks all-reduce
    their stop flags with the loss on `device` (reduce_step) and so stop after the same
    step; at a checkpoint each rank hands rank 0 its RNG states over the group `objects`
    (None: the job's), so each resumes its own; on a stop no rank leaves before rank 0
    has written the checkpoint (`wait`, by default a barrier of `objects`)."""
    return {"reduce_step": functools.partial(reduce_step, device=device),
            "gather": functools.partial(gather_objects, group=objects),
            "barrier": wait or functools.partial(barrier, group=objects)}


def xla_barrier() -> None:
    """barrier() under torch-xla: xm.rendezvous, as NeuronTrainer's own saves use. The
    "xla" process group's barrier returns at once (xla_backend.py), waiting for nobody."""
    importlib.import_module("torch_xla.core.xla_model").rendezvous("neurondeck-barrier")
