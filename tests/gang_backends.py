"""A backend for the multi-host job tests, loaded as ``tests.gang_backends:AllReduce``.

Each rank really joins torch.distributed over gloo (env://, from the variables torchrun
sets) and all-reduces tensors with the other hosts' ranks, so a test sees a true
rendezvous, not a stand-in.

spec keys:
  seconds     keep all-reducing (every step_s) this long after the first one (default 0)
  step_s      pause between those all-reduces (default 0.2)
  fail_rank   this rank raises JobFailed("bad_input") after the first all-reduce
  crash_rank  this rank's process dies (os._exit(3)) after the first all-reduce
  hang_rank   this rank never leaves its teardown (before destroy_process_group), deaf to SIGTERM
"""
from __future__ import annotations

import os
import signal
import time

from neuron_workers.backends.base import JobContext, JobFailed

SEEN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
        "TORCHELASTIC_RUN_ID", "NEURONDECK_GANG_HOSTS", "OMP_NUM_THREADS", "NEURON_RT_VISIBLE_CORES",
        "NEURON_PROCESS_TAG")


class AllReduce:
    def run(self, ctx: JobContext) -> dict:
        import torch
        import torch.distributed as dist

        rank = int(os.environ["RANK"])
        (ctx.workdir / "ready").write_text(str(os.getpid()))
        dist.init_process_group("gloo")
        try:
            world = dist.get_world_size()
            value = torch.tensor([float(rank + 1)])
            dist.all_reduce(value)
            ctx.log(f"rank {rank} of {world}: all-reduced sum {value.item()}")
            if ctx.spec.get("fail_rank") == rank:
                raise JobFailed("bad_input", f"rank {rank} refuses its shard")
            if ctx.spec.get("crash_rank") == rank:
                os._exit(3)
            deadline = time.monotonic() + float(ctx.spec.get("seconds", 0))
            steps = 0
            while time.monotonic() < deadline and not ctx.should_stop():
                time.sleep(float(ctx.spec.get("step_s", 0.2)))
                beat = torch.tensor([1.0])
                dist.all_reduce(beat)
                steps += 1
                ctx.metric({"beat": beat.item()}, step=steps)
            if ctx.should_stop():
                raise JobFailed("cancelled", "stopped")
            (ctx.workdir / "artifacts" / "sum.txt").write_text(str(value.item()))
            return {"sum": value.item(), "world_size": world, "rank": rank, "steps": steps,
                    "env": {name: os.environ.get(name) for name in SEEN}, "pid": os.getpid()}
        finally:
            if ctx.spec.get("hang_rank") == rank:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                ctx.log(f"rank {rank}: hanging in teardown")
                while True:
                    time.sleep(1)
            dist.destroy_process_group()
