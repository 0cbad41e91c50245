"""One cpu fine-tune rank outside NeuronDeck's runner, for plain torchrun:

    torchrun --standalone --nproc-per-node 2 -m neuron_workers.backends.cpu_rank --job-dir DIR

DIR holds train_job.json ({"job_id", "spec", "inputs"}, the names neuron_launch
uses). Each rank runs CpuBackend.finetune (which joins the gloo group from
torchrun's environment); rank 0 works in DIR and writes train_result.json, rank r
in DIR/rank-r. The same training code a NeuronDeck job runs, so the bench and the
tests can compare a gang against plain torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .base import JobContext, JobFailed, write_json
from .neuron_launch import ERROR_FILE, JOB_FILE, RESULT_FILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    job = json.loads((args.job_dir / JOB_FILE).read_text(encoding="utf-8"))
    workdir = args.job_dir if rank == 0 else args.job_dir / f"rank-{rank}"
    ctx = JobContext(job_id=job["job_id"], kind="finetune", spec=job["spec"], workdir=workdir, inputs=job["inputs"],
                     log=lambda line: print(line, flush=True))
    from .cpu import CpuBackend  # torch is imported here, after argument errors are reported

    try:
        result = CpuBackend().finetune(ctx)
    except JobFailed as exc:
        if rank == 0:
            write_json(args.job_dir / ERROR_FILE, exc.to_dict())
        print(f"rank {rank}: {exc.code}: {exc.message}", file=sys.stderr, flush=True)
        return 1
    if rank == 0:
        write_json(args.job_dir / RESULT_FILE, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
