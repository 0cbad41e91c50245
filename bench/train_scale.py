"""Fine-tune scaling, checkpoint cost and resume: the figures of issue 17.

    .venv/bin/python bench/train_scale.py

- torchrun_speedup: the cpu backend's training code under plain `torchrun --standalone`
  (neuron_workers.backends.cpu_rank, DDP over gloo), 2 processes x 1 thread over
  1 process x 1 thread at the same per-rank batch, in samples/s (global batch x
  steps / rank 0's training seconds: the training loop only, no start-up) on the
  tiny GPT-2.
- two_host_speedup: the same through NeuronDeck, a 2-host x 1-core gang (two hosts
  on this machine, each with its own worker, the ranks under torchrun) over a
  1-host x 1-core job, both placed by the scheduler. Null with the reason where the
  workers do not run multi-host gangs.
- two_host_vs_torchrun (target >= 0.95): the median over repeats of each repeat's
  two_host_speedup / torchrun_speedup. Each repeat runs the four trainings with the
  runs of one size side by side (torchrun 1 process and NeuronDeck 1 host, then
  NeuronDeck 2 hosts and torchrun 2 processes, the order mirrored every other repeat),
  so the figures divided share the machine's load and a drift of it falls on both
  sides alike. The speedups above are the medians of the repeats' own; the
  best-of-repeats figures (*_best) divide runs made under different loads and are
  kept for reference only. nd_over_torchrun_1 / _2: the median of NeuronDeck's samples/s
  over torchrun's at one and two ranks: NeuronDeck's own cost at each size.
- service_cores_1host / _2host: the CPU the NeuronDeck services (workers, scheduler,
  PostgreSQL backends of the bench database, Redis) used during those runs, in cores
  (CPU seconds over wall seconds). On this 2-core machine a 2-host gang's two ranks
  take both cores, so the services' CPU is taken from them (a 1-host job leaves a core
  free for it): that share, service_cores_2host / 2, is what the gang's speedup loses
  to NeuronDeck here; a real host's bookkeeping runs beside its training. The workers
  and scheduler run with the deployment's default heartbeat and reaping periods (the
  resume phase shortens them later, to reap within seconds).
- checkpoint_overhead_ratio: training seconds with a checkpoint every 50 steps over
  none (median of interleaved runs, one process, one thread).
- resume_steps_lost, resume_checkpoint_every, resume_weight_max_abs_diff: a fine-tune
  submitted to NeuronDeck (PostgreSQL, Redis, a scheduler with beat and a host
  worker); once it has checkpointed a few times its worker and the job's process
  are killed with SIGKILL (a lost host), the reaper requeues it, a new worker runs
  attempt 2 to the end. Steps lost = the last step attempt 1 reached - the step
  attempt 2 resumed from; the weights are compared with an uninterrupted run of the
  same spec.

The checkpoint times are the best of interleaved repeats (the run least disturbed by
the machine's other users). Prints progress on stderr and one JSON object on its last
line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support.harness import (  # noqa: E402
    CELERY, PY, ROOT, Bench, Processes, exclusive_run, free_port_range, log, redis_url, seed_team, start_heartbeat,
)

BENCH = Bench(db_name="neurondeck_bench_train_scale",
              redis_url=redis_url("train_scale"),
              host="bench-train-host", workdir=Path())
NEVER = 1_000_000  # checkpoint_every that never checkpoints within a run
SPEED_SPEC = {"learning_rate": 3e-3, "sequence_length": 64, "seed": 0, "checkpoint_every": NEVER}
RESUME_EVERY = 25
RESUME_SPEC = {"steps": 300, "learning_rate": 3e-3, "batch_size": 4, "sequence_length": 32, "seed": 7,
               "checkpoint_every": RESUME_EVERY}


# ---------------------------------------------------------------- plain torchrun


def torchrun_samples_per_s(workdir: Path, inputs: dict, nproc: int, per_rank_batch: int, steps: int) -> float:
    """Samples/s of `nproc` DDP ranks (one thread each) at `per_rank_batch` under plain torchrun."""
    job = workdir / f"torchrun-{nproc}-{time.monotonic_ns()}"
    job.mkdir(parents=True)
    spec = {**SPEED_SPEC, "steps": steps, "batch_size": per_rank_batch * nproc}
    (job / "train_job.json").write_text(json.dumps({"job_id": 0, "spec": spec, "inputs": {
        **inputs, "checkpoint_dir": str(job / "checkpoints")}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           "-m", "neuron_workers.backends.cpu_rank", "--job-dir", str(job)],
                          env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun with {nproc} ranks failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    result = json.loads((job / "train_result.json").read_text())
    return spec["batch_size"] * result["steps"] / result["train_seconds"]


# ---------------------------------------------------------------- checkpoint overhead


def train_seconds(workdir: Path, inputs: dict, spec: dict, writes: list[float] | None = None) -> float:
    """Training seconds of one in-process run; each checkpoint's write time goes to `writes`."""
    from neuron_workers.backends import JobContext, get_backend

    run = workdir / f"run-{time.monotonic_ns()}"

    def metric(row: dict) -> None:
        if row.get("event") == "checkpoint" and writes is not None:
            writes.append(row["seconds"])

    ctx = JobContext(job_id=0, kind="finetune", spec=spec, workdir=run,
                     inputs={**inputs, "checkpoint_dir": str(run / "checkpoints")},
                     log=lambda line: None, metric=metric)
    result = get_backend("cpu").run(ctx)
    shutil.rmtree(run, ignore_errors=True)
    return result["train_seconds"]


def checkpoint_phase(workdir: Path, inputs: dict, steps: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    spec = {**SPEED_SPEC, "steps": steps, "batch_size": 8}
    train_seconds(workdir, inputs, {**spec, "steps": 10})  # warm-up: first-call costs out of the way
    none, every, writes = [], [], []
    for _ in range(repeats):
        none.append(train_seconds(workdir, inputs, spec))
        every.append(train_seconds(workdir, inputs, {**spec, "checkpoint_every": 50}, writes))
        log(f"  {steps} steps: no checkpoint {none[-1]:.2f} s, every 50 steps {every[-1]:.2f} s")
    # On a loaded machine step times vary more than a checkpoint costs, so the write
    # time itself (timed inside the loop, from snapshot to fsynced marker) is reported
    # beside the ratio, as a share of training.
    return {"checkpoint_overhead_ratio": min(every) / min(none),
            "checkpoint_overhead_steps": steps, "checkpoint_write_seconds_mean": statistics.mean(writes),
            "checkpoint_write_share_of_training": sum(writes) / sum(every)}


# ---------------------------------------------------------------- resume after kill -9


def start_job_worker(procs: Processes, name: str) -> None:
    procs.start(name, [*CELERY, "-Q", f"host.{BENCH.host}", "--pool", "threads", "-c", "2", "-n", f"bench-{name}@%h"])


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def job_process_pids(job_id: int) -> list[int]:
    """The job's own processes (tagged NEURON_PROCESS_TAG=job-<id> by the worker)."""
    from neuron_workers.process import find_orphans

    return [pid for pid in find_orphans().get(job_id, []) if os.readlink(f"/proc/{pid}/cwd").startswith(
        str(BENCH.storage))]


def last_step(path: Path) -> int:
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines()
             if line.endswith("}") and '"loss"' in line]
    return max(steps, default=0)


def resume_phase(procs: Processes, user, team, model, dataset, inputs: dict) -> dict:
    from jobs.assets import storage
    from jobs.lifecycle.forms import FinetuneForm
    from jobs.lifecycle.services import job_submit
    from jobs.models import Job, JobEvent
    from neuron_workers.backends.checkpoints import CheckpointStore

    form = FinetuneForm(data={"family": "cpu", "cores": 1, "model": model.pk, "dataset": dataset.pk, **RESUME_SPEC},
                        team=team)
    if not form.is_valid():
        raise RuntimeError(f"the bench's fine-tune is refused: {form.errors.as_json()}")
    job = job_submit(team=team, user=user, form=form)
    store = CheckpointStore(storage.job_dir(job.pk) / "checkpoints")
    deadline = time.monotonic() + 300
    while max(store.complete_steps(), default=0) < 3 * RESUME_EVERY:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job.pk} wrote no third checkpoint: {Job.objects.get(pk=job.pk).reason}")
        time.sleep(0.05)
    children = job_process_pids(job.pk)
    kill_group(procs.procs.pop("worker"))  # the worker and its zygote ...
    for pid in children:  # ... and the job's process: a lost host saves nothing more
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    reached = last_step(storage.job_dir(job.pk) / "attempt-1" / "metrics.jsonl")
    log(f"  killed job {job.pk} at step {reached} (checkpoints {store.complete_steps()})")
    start_job_worker(procs, "worker-2")
    deadline = time.monotonic() + 600
    while Job.objects.get(pk=job.pk).status not in Job.FINISHED:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job.pk} did not finish after the kill")
        time.sleep(0.2)
    job = Job.objects.get(pk=job.pk)
    if job.status != Job.Status.SUCCEEDED:
        raise RuntimeError(f"job {job.pk} {job.status}: {job.reason}")
    resumed = JobEvent.objects.filter(job=job, kind="resumed").values_list("data", flat=True).first() or {}
    final = weights(storage.abs_path(job.output_model.path))
    reference = uninterrupted(inputs, job.spec)
    diff = max(float((final[k] - reference[k]).abs().max()) for k in final)
    log(f"  resumed from step {resumed.get('step')}, max |w - w_uninterrupted| = {diff:.3g}")
    return {"resume_steps_lost": reached - resumed.get("step", 0), "resume_checkpoint_every": RESUME_EVERY,
            "resume_from_step": resumed.get("step"), "resume_killed_at_step": reached,
            "resume_weight_max_abs_diff": diff, "resume_attempts": job.attempts}


def weights(path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).state_dict()


def uninterrupted(inputs: dict, spec: dict) -> dict:
    from neuron_workers.backends import JobContext, get_backend

    run = BENCH.workdir / "uninterrupted"
    ctx = JobContext(job_id=0, kind="finetune", spec=spec, workdir=run,
                     inputs={**inputs, "checkpoint_dir": str(run / "checkpoints")},
                     log=lambda line: None, metric=lambda row: None)
    get_backend("cpu").run(ctx)
    return weights(run / "artifacts" / "checkpoint")


# ---------------------------------------------------------------- two hosts


GANG_HOSTS = ("bench-train-a", "bench-train-b")


def gang_available() -> bool:
    try:
        import jobs.lifecycle.gangs  # noqa: F401 - the workers' gang launcher (multi-host jobs)
    except ImportError:
        return False
    return True


def start_gang_hosts(procs: Processes) -> list:
    """Two 1-core cpu hosts on this machine, each with its own worker, reachable at 127.0.0.1."""
    from django.utils import timezone

    from jobs.models import Host

    base = str(free_port_range(1000))  # the gang's rendezvous ports: GANG_PORT_BASE .. +999
    beats = []
    for name in GANG_HOSTS:
        Host.objects.create(name=name, family="cpu", core_ids=[0], backend="cpu", memory_bytes=8 << 30,
                            address="127.0.0.1", last_heartbeat=timezone.now())
        procs.start(name, [*CELERY, "-Q", f"host.{name}", "--pool", "threads", "-c", "2", "-n", f"bench-{name}@%h"],
                    {"NEURONDECK_HOST": name, "GANG_PORT_BASE": base})
        beats.append(start_heartbeat(name))
    return beats


def service_cpu_seconds(procs: Processes) -> float:
    """User + system CPU seconds so far of the NeuronDeck services: every live process in
    the started services' process groups (a job's processes run in sessions of their
    own and are not counted; nor are reaped children), the PostgreSQL backends of the
    bench database and the redis-server."""
    groups = {proc.pid for proc in procs.procs.values()}
    title = f" {BENCH.db_name} ".encode()
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                head, tail = fh.read().rsplit(b")", 1)
            comm, fields = head.split(b"(", 1)[1], tail.split()
            used = (int(fields[11]) + int(fields[12])) / tick
            if int(fields[2]) in groups or comm.startswith(b"redis-server") or (
                    comm.startswith(b"postgres") and title in Path(f"/proc/{entry}/cmdline").read_bytes()):
                total += used
        except (OSError, ValueError, IndexError):
            continue
    return total


def gang_samples_per_s(team, user, model, dataset, hosts: int, per_rank_batch: int, steps: int,
                       procs: Processes | None = None, service_cores: list[float] | None = None) -> float:
    """Samples/s of a fine-tune on `hosts` 1-core hosts placed and run by NeuronDeck;
    the services' CPU use during it (cores) goes to `service_cores`."""
    from jobs.lifecycle import states
    from jobs.models import Job, Kind
    from jobs.wake import kick_dispatch

    spec = {**SPEED_SPEC, "steps": steps, "batch_size": per_rank_batch * hosts}
    job = Job.objects.create(team=team, user=user, kind=Kind.FINETUNE, spec=spec, family="cpu", cores=hosts,
                             host_count=hosts, model=model, dataset=dataset, max_attempts=1, reason_code="submitted",
                             reason="waiting for the scheduler")
    states.event(job.pk, "pending", "submitted by the bench")
    cpu_before, wall_before = (service_cpu_seconds(procs), time.monotonic()) if procs else (0.0, 0.0)
    kick_dispatch()
    deadline = time.monotonic() + 900
    while Job.objects.get(pk=job.pk).status not in Job.FINISHED:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {hosts}-host job {job.pk} did not finish")
        time.sleep(0.2)
    if procs is not None and service_cores is not None:
        service_cores.append((service_cpu_seconds(procs) - cpu_before) / (time.monotonic() - wall_before))
    job = Job.objects.get(pk=job.pk)
    if job.status != Job.Status.SUCCEEDED:
        raise RuntimeError(f"the {hosts}-host job {job.pk} {job.status}: {job.reason}")
    return spec["batch_size"] * job.result["steps"] / job.result["train_seconds"]


def speed_phase(procs: Processes, workdir: Path, inputs: dict, team, user, model, dataset, per_rank_batch: int,
                steps: int, repeats: int, gang: bool) -> dict:
    """Plain torchrun 1 vs 2 processes and, with `gang`, NeuronDeck 1 host vs a 2-host
    gang; in each repeat the runs of one size side by side, mirrored every other repeat."""
    runs = {"t1": [], "t2": [], "n1": [], "n2": []}
    cores1, cores2 = [], []

    def torchrun(ranks: int) -> None:
        runs[f"t{ranks}"].append(torchrun_samples_per_s(workdir, inputs, ranks, per_rank_batch, steps))

    def neurondeck(hosts: int) -> None:
        runs[f"n{hosts}"].append(gang_samples_per_s(team, user, model, dataset, hosts, per_rank_batch, steps, procs,
                                                    cores1 if hosts == 1 else cores2))

    order = [lambda: torchrun(1), lambda: neurondeck(1), lambda: neurondeck(2), lambda: torchrun(2)]
    if not gang:
        order = [order[0], order[3]]
    for repeat in range(repeats):
        for run in (order if repeat % 2 == 0 else order[::-1]):
            run()
        t1, t2 = runs["t1"][-1], runs["t2"][-1]
        line = f"  torchrun 1 proc {t1:.1f}, 2 procs {t2:.1f} samples/s"
        if gang:
            n1, n2 = runs["n1"][-1], runs["n2"][-1]
            line += (f"; NeuronDeck 1 host {n1:.1f}, 2-host gang {n2:.1f} samples/s (services "
                     f"{cores1[-1]:.2f} / {cores2[-1]:.2f} cores); this repeat's ratio {(n2 / n1) / (t2 / t1):.2f}")
        log(f"{line}; load {os.getloadavg()[0]:.1f}")
    t1, t2 = runs["t1"], runs["t2"]
    report = {"torchrun_speedup": statistics.median(b / a for a, b in zip(t1, t2)),
              "torchrun_speedup_best": max(t2) / max(t1), "torchrun_1proc_samples_per_s": statistics.median(t1),
              "torchrun_2proc_samples_per_s": statistics.median(t2), "torchrun_per_rank_batch": per_rank_batch,
              "speed_repeats": repeats, "speed_steps": steps}
    if gang:
        n1, n2 = runs["n1"], runs["n2"]
        report.update({
            "two_host_speedup": statistics.median(b / a for a, b in zip(n1, n2)),
            "two_host_speedup_best": max(n2) / max(n1),
            "two_host_vs_torchrun": statistics.median((d / c) / (b / a) for a, b, c, d in zip(t1, t2, n1, n2)),
            "two_host_vs_torchrun_per_repeat": [round((d / c) / (b / a), 3) for a, b, c, d in zip(t1, t2, n1, n2)],
            "two_host_vs_torchrun_best": (max(n2) / max(n1)) / (max(t2) / max(t1)),
            "nd_over_torchrun_1": statistics.median(c / a for a, c in zip(t1, n1)),
            "nd_over_torchrun_2": statistics.median(d / b for b, d in zip(t2, n2)),
            "two_host_1host_samples_per_s": statistics.median(n1),
            "two_host_2host_samples_per_s": statistics.median(n2),
            "service_cores_1host": statistics.median(cores1), "service_cores_2host": statistics.median(cores2)})
    return report


# ---------------------------------------------------------------- main

REAPING = {"JOB_LEASE_S": "5", "HEARTBEAT_S": "1", "REAP_EVERY_S": "1"}


def start_scheduler(procs: Processes) -> None:
    procs.start("scheduler", [*CELERY, "-Q", "scheduler", "-B", "--pool", "solo", "-n", "bench-scheduler@%h",
                              "--schedule", str(BENCH.workdir / "beat-schedule")])


def finish(report: dict) -> dict:
    report["loadavg_1m_at_end"], report["cpus"] = os.getloadavg()[0], os.cpu_count()
    report = {k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}
    print(json.dumps(report))
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-rank-batch", type=int, default=32)
    parser.add_argument("--speed-steps", type=int, default=40)
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument("--checkpoint-steps", type=int, default=200)
    parser.add_argument("--checkpoint-repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="only the scaling figures")
    args = parser.parse_args(argv)
    lock = exclusive_run("bench-train-scale")  # noqa: F841 - held until the process exits
    BENCH.workdir = Path(tempfile.mkdtemp(prefix="nd-bench-train-"))
    # The speed phase runs the services with the deployment's defaults; the resume phase
    # restarts them with a short lease, heartbeat and reaping period (REAPING).
    env = BENCH.environment(JOB_KILL_GRACE_S="5", NEURONDECK_ZYGOTE_PRELOAD="")
    BENCH.setup(env)
    procs = Processes(BENCH.workdir, env)
    beating: list = []
    try:
        from django.core.files.uploadedfile import SimpleUploadedFile

        from jobs.assets import storage
        from jobs.assets.services import dataset_upload
        from neuron_workers.backends.tinymodel import create_demo_dataset

        team, user, model = seed_team(2, BENCH.host)
        data_file = create_demo_dataset(BENCH.workdir / "demo.jsonl", rows=400)
        dataset = dataset_upload(team=team, user=user, name="demo",
                                 upload=SimpleUploadedFile("demo.jsonl", data_file.read_bytes()))
        inputs = {"model_path": str(storage.abs_path(model.path)), "model_format": "hf",
                  "dataset_path": str(storage.abs_path(dataset.path)), "dataset_format": "jsonl"}
        report: dict = {}
        beating = [start_heartbeat(BENCH.host)]
        start_scheduler(procs)
        start_job_worker(procs, "worker")  # the one-host jobs' host
        gang = gang_available()
        gang_beats = start_gang_hosts(procs) if gang else []
        beating += gang_beats
        log("plain torchrun 1 process vs 2 (DDP over gloo, one thread each)"
            + (", and through NeuronDeck a 1-host job vs a 2-host gang (one core each), back to back …" if gang
               else " …"))
        report["loadavg_1m_at_start"] = os.getloadavg()[0]
        report.update(speed_phase(procs, BENCH.workdir, inputs, team, user, model, dataset, args.per_rank_batch,
                                  args.speed_steps, args.speed_repeats, gang))
        report["loadavg_1m_after_speed"] = os.getloadavg()[0]
        if gang:
            for name in GANG_HOSTS:  # their workers would take CPU from the phases below
                kill_group(procs.procs.pop(name))
            for beat in gang_beats:
                beat.set()
            time.sleep(6)  # a heartbeat already under way has written its last "online"
            from jobs.models import Host

            Host.objects.filter(name__in=GANG_HOSTS).update(state=Host.State.DRAINING)  # nothing more goes there
        else:
            report.update({"two_host_speedup": None, "two_host_speedup_reason":
                           "multi-host gangs are not run by the workers on this tree (no jobs.lifecycle.gangs); "
                           "torchrun_speedup is the same training code under plain torchrun"})
        if args.speed_only:
            return finish(report)
        # Reaping within seconds for the resume phase: the scheduler and the worker again.
        procs.env = {**procs.env, **REAPING}
        for name in ("scheduler", "worker"):
            kill_group(procs.procs.pop(name))
        start_scheduler(procs)
        start_job_worker(procs, "worker")
        log("checkpoint every 50 steps vs none …")
        report.update(checkpoint_phase(BENCH.workdir, inputs, args.checkpoint_steps, args.checkpoint_repeats))
        log("kill -9 of the worker and the job mid-run, then resume …")
        report.update(resume_phase(procs, user, team, model, dataset, inputs))
        return finish(report)
    finally:
        for beat in beating:
            beat.set()
        procs.stop()
        BENCH.teardown()
        if not args.keep:
            shutil.rmtree(BENCH.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
