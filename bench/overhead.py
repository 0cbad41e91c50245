"""Overhead benchmark: the same fine-tune as a NeuronDeck job and as a plain script.

Run as `.venv/bin/python bench/overhead.py`. It starts what it needs (its own
PostgreSQL database neurondeck_bench_overhead, Redis db 7, a scheduler worker and
a cpu host worker) and runs, alternately, ROUNDS times each:

  job     a fine-tune of STEPS steps of the tiny model on the demo dataset,
          submitted with jobs.lifecycle.services.job_submit (the API's call) and run by
          the real worker: dispatch, Celery, claim, the zygote-forked runner, the
          supervisor tailing logs and metrics into PostgreSQL, heartbeats, outputs
          and the checkpoint registered as a model.
  plain   a fresh `python` process that builds the same JobContext and calls the
          same CpuBackend().finetune() — model load, packing, the training loop
          (neuron_workers.backends.loops.train_steps) and the checkpoint — with
          nothing around it.

Both report the loop's own clock (result["train_seconds"]): training time is
compared like for like, and the ratio says what supervision costs while the job
trains (target ≤ 1.05). Each round runs one job and one plain run back to back,
in alternating order (job first in odd rounds, plain first in even ones), so the
two runs of a round share the machine's load of the moment and neither side is
always the one that runs first. The headline ratio is the median over rounds of
each round's job time over its plain time: on a shared machine the load drifts
over minutes, which the pairs cancel and a ratio of medians taken over different
minutes does not (ratio_of_medians is reported beside it, and ratio_of_best_runs
of the fastest runs, since noise only adds time). The CPU the worker, PostgreSQL
(this bench's database only) and the scheduler spent per job says where the
difference goes.
The plain process runs in a session of its own, as the job's process does (the
supervisor starts every job in a new session): with autogroup scheduling, Linux
shares the CPU between sessions first, so a plain run left in the bench's session
would compete with everything else started from the same terminal.
Start-up is the time from submit (job) or process launch (plain) until training
begins (the first step's metric timestamp minus one mean step): queueing,
dispatch, fork and model load for the job; interpreter, imports and model load for
the plain script.

The last line is one JSON object: ratio (the median of the rounds' ratios),
job_train_s, plain_train_s, job_startup_s, plain_startup_s (medians over the
rounds) and the details.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support.harness import (  # noqa: E402
    PY, ROOT, Bench, CpuMeter, bench_run, log, redis_url, seed_team, start_workers, wait_finished,
)

BENCH = Bench(db_name="neurondeck_bench_overhead",
              redis_url=redis_url("overhead"),
              host="bench-overhead-host", workdir=Path())

# The plain run: the backend call and nothing else. Metrics go to metrics.jsonl
# with a timestamp per step, as the runner's writer does for a job.
PLAIN = r"""
import json, sys, time
from pathlib import Path
from neuron_workers.backends.base import JobContext
from neuron_workers.backends.cpu import CpuBackend

args = json.loads(sys.argv[1])
workdir = Path(args["workdir"]); workdir.mkdir(parents=True, exist_ok=True)
metrics = open(workdir / "metrics.jsonl", "a", buffering=1)
def metric(row):
    metrics.write(json.dumps({**row, "ts": time.time()}) + "\n")
ctx = JobContext(job_id=0, kind="finetune", spec=args["spec"], workdir=workdir, inputs=args["inputs"],
                 log=lambda line: None, metric=metric)
result = CpuBackend().finetune(ctx)
(workdir / "result.json").write_text(json.dumps(result))
"""


def training_start(metrics_path: Path, train_s: float) -> float:
    """Unix time training began: the first step's metric time minus one mean step."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if isinstance(r.get("step"), int)]
    return steps[0]["ts"] - train_s / len(steps)


def submit_finetune(team, user, model, dataset, args, cores: int):
    from jobs.lifecycle.forms import FinetuneForm
    from jobs.lifecycle.services import job_submit

    form = FinetuneForm(data={"model": model.pk, "dataset": dataset.pk, "steps": args.steps,
                              "batch_size": args.batch_size, "sequence_length": args.sequence_length,
                              "learning_rate": 1e-3, "seed": 0, "family": "cpu", "cores": cores}, team=team)
    if not form.is_valid():
        raise RuntimeError(form.errors.as_json())
    return job_submit(team=team, user=user, form=form)


def run_job(team, user, model, dataset, args, cores: int, groups: dict[str, int]) -> dict:
    from jobs.assets import storage
    from jobs.models import Job

    meter = CpuMeter(groups, BENCH.db_name)
    meter.start()
    started = time.time()
    job = submit_finetune(team, user, model, dataset, args, cores)
    # The figures come from the job's own timestamps, not from when this loop sees
    # it finish: polling slowly keeps the bench's queries out of the job's way.
    status = wait_finished([job.pk], 600, interval=0.5)[job.pk][0]
    job = Job.objects.get(pk=job.pk)
    if status != "succeeded":
        raise RuntimeError(f"fine-tune job {job.pk} ended {status}: {job.reason}")
    train_s = job.result["train_seconds"]
    begun = training_start(storage.job_dir(job.pk) / f"attempt-{job.attempts}" / "metrics.jsonl", train_s)
    cpu = meter.stop()
    # What runs beside the training on the same cores: the supervising worker
    # (log/metric tailing, heartbeats, DB writes), PostgreSQL and the scheduler.
    return {"train_s": train_s, "startup_s": begun - started,
            "total_s": job.finished_at.timestamp() - started, "steps": job.result["steps"],
            "worker_cpu_s": cpu["worker"], "postgres_cpu_s": cpu["postgres"], "scheduler_cpu_s": cpu["scheduler"]}


def run_plain(model, dataset, args, env: dict, spec: dict) -> dict:
    from jobs.assets import storage

    workdir = Path(tempfile.mkdtemp(prefix="plain-", dir=BENCH.workdir))
    inputs = {"model_path": str(storage.abs_path(model.path)), "model_format": model.format,
              "dataset_path": str(storage.abs_path(dataset.path)), "dataset_format": dataset.format}
    started = time.time()
    subprocess.run([PY, "-c", PLAIN, json.dumps({"workdir": str(workdir), "spec": spec, "inputs": inputs})],
                   cwd=ROOT, env=env, check=True, start_new_session=True)
    ended = time.time()
    result = json.loads((workdir / "result.json").read_text())
    train_s = result["train_seconds"]
    return {"train_s": train_s, "startup_s": training_start(workdir / "metrics.jsonl", train_s) - started,
            "total_s": ended - started, "steps": result["steps"]}


def demo_dataset(team, user):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from jobs.assets.services import dataset_upload
    from neuron_workers.backends.tinymodel import create_demo_dataset

    path = create_demo_dataset(BENCH.workdir / "demo.jsonl", rows=400)
    return dataset_upload(team=team, user=user, name="demo", upload=SimpleUploadedFile("demo.jsonl", path.read_bytes()))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8,
                        help="an even count runs as many rounds with the job first as with the plain run first")
    parser.add_argument("--keep", action="store_true", help="keep the logs directory")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cores = os.cpu_count() or 1
    with bench_run(BENCH, "bench-overhead", keep=args.keep) as procs:
        team, user, model = seed_team(cores, BENCH.host)
        dataset = demo_dataset(team, user)
        procs.heartbeat(BENCH.host)
        start_workers(procs, BENCH.host, 1)
        log(f"system started (logs in {BENCH.workdir}); warming up the worker")
        warm = argparse.Namespace(**{**vars(args), "steps": 2})
        groups = {name: proc.pid for name, proc in procs.procs.items()}
        run_job(team, user, model, dataset, warm, cores, groups)  # starts the worker's zygote (torch preload)
        # The job's thread count is the worker's torch default (fork mode) or
        # OMP_NUM_THREADS=cores (exec mode); the plain process gets the same.
        plain_env = {**procs.env, "OMP_NUM_THREADS": str(cores)}
        from jobs.models import Job

        jobs, plains = [], []
        spec = None
        for round_no in range(1, args.rounds + 1):
            # Job first in odd rounds, plain first in even ones; round 1 runs the job
            # first, whose stored spec (the form's defaults filled in) the plain runs use.
            for side in ("job", "plain") if round_no % 2 else ("plain", "job"):
                if side == "job":
                    jobs.append(run_job(team, user, model, dataset, args, cores, groups))
                    spec = spec or Job.objects.filter(kind="finetune").order_by("-pk").values_list(
                        "spec", flat=True).first()
                else:
                    plains.append(run_plain(model, dataset, args, plain_env, spec))
            log(f"round {round_no}: job {jobs[-1]['train_s']:.3f} s, plain {plains[-1]['train_s']:.3f} s of training")
        report = summarize(jobs, plains, args, cores)
        print_table(report)
        print(json.dumps(report))
        return report


def summarize(jobs: list[dict], plains: list[dict], args, cores: int) -> dict:
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    report = {
        "job_train_s": med(jobs, "train_s"), "plain_train_s": med(plains, "train_s"),
        "job_startup_s": med(jobs, "startup_s"), "plain_startup_s": med(plains, "startup_s"),
        "job_total_s": med(jobs, "total_s"), "plain_total_s": med(plains, "total_s"),
        "job_worker_cpu_s": med(jobs, "worker_cpu_s"), "job_postgres_cpu_s": med(jobs, "postgres_cpu_s"),
        "job_scheduler_cpu_s": med(jobs, "scheduler_cpu_s"),
        "steps": args.steps, "batch_size": args.batch_size, "sequence_length": args.sequence_length,
        "rounds": args.rounds, "torch_threads": cores, "loadavg_1m": os.getloadavg()[0],
        "job_train_s_each": [round(r["train_s"], 3) for r in jobs],
        "plain_train_s_each": [round(r["train_s"], 3) for r in plains],
    }
    # The two runs of a round ran back to back: their ratio is taken under the same load.
    report["ratio"] = statistics.median(j["train_s"] / p["train_s"] for j, p in zip(jobs, plains))
    report["ratio_of_medians"] = report["job_train_s"] / report["plain_train_s"]
    # Other work on a shared machine only ever adds time: the best run of each side
    # is the least disturbed one.
    report["ratio_of_best_runs"] = min(r["train_s"] for r in jobs) / min(r["train_s"] for r in plains)
    report["extra_startup_s"] = report["job_startup_s"] - report["plain_startup_s"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}


def print_table(report: dict) -> None:
    print(f"{'':<26}{'job':>10}{'plain':>10}")
    for name, key in (("training (loop clock) s", "train_s"), ("start-up s", "startup_s"), ("total s", "total_s")):
        print(f"{name:<26}{report['job_' + key]:>10.3f}{report['plain_' + key]:>10.3f}")
    print(f"training ratio job/plain: {report['ratio']:.3f} (target ≤ 1.05; median over rounds of each round's "
          f"job over its plain run; ratio of medians {report['ratio_of_medians']:.3f}); "
          f"{report['steps']} steps, batch {report['batch_size']}, seq {report['sequence_length']}, "
          f"{report['rounds']} rounds (times: medians)")


if __name__ == "__main__":
    main()
