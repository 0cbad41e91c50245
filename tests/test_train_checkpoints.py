"""Fine-tune checkpoints and resume in the cpu backend, and data-parallel ranks under torchrun.

No Django: the backend runs in this process (or under plain torchrun) on a tiny
local GPT-2, with the checkpoint folder in a tmp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from neuron_workers.backends import JobContext, JobFailed, get_backend
from neuron_workers.backends.checkpoints import CheckpointStore, step_dir_name
from neuron_workers.backends.neuron_launch import JOB_FILE, RESULT_FILE
from neuron_workers.backends.tinymodel import create_demo_dataset, create_tiny_model

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"steps": 30, "learning_rate": 3e-3, "batch_size": 4, "sequence_length": 32, "seed": 3,
        "checkpoint_every": 10, "lr_schedule": "linear"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("train")
    model = create_tiny_model(base / "tiny-gpt")
    data = create_demo_dataset(base / "demo.jsonl", rows=60)
    return {"model_path": str(model), "model_format": "hf", "dataset_path": str(data), "dataset_format": "jsonl"}


def run(workdir: Path, inputs: dict, spec: dict, checkpoints: Path, stop_after: int | None = None,
        lines: list | None = None, metrics: list | None = None) -> dict:
    """One attempt of the fine-tune; with stop_after, asked to stop once that many steps
    have reported their loss (the loop polls during the next step, and stops after it)."""
    metrics = [] if metrics is None else metrics
    lines = [] if lines is None else lines

    def should_stop() -> bool:
        done = sum(1 for m in metrics if "loss" in m)
        return stop_after is not None and done >= stop_after

    ctx = JobContext(job_id=1, kind="finetune", spec=spec, workdir=workdir,
                     inputs={**inputs, "checkpoint_dir": str(checkpoints)}, log=lines.append,
                     metric=metrics.append, should_stop=should_stop)
    return get_backend("cpu").run(ctx)


def final_weights(workdir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workdir / "artifacts" / "checkpoint", local_files_only=True)
    return model.state_dict()


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory) -> tuple[dict, dict]:
    base = tmp_path_factory.mktemp("whole")
    result = run(base / "attempt-1", inputs, SPEC, base / "checkpoints")
    return result, final_weights(base / "attempt-1")


def test_a_stopped_run_resumes_from_its_checkpoint_and_ends_with_the_same_weights(inputs, uninterrupted, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    first: list[dict] = []
    with pytest.raises(JobFailed) as stopped:
        run(tmp_path / "attempt-1", inputs, SPEC, checkpoints, stop_after=12, metrics=first)
    assert stopped.value.code == "cancelled" and "checkpoint saved at step 13" in stopped.value.message
    # Every 10 steps, and the step it reached when asked to stop.
    assert [m["step"] for m in first if m.get("event") == "checkpoint"] == [10, 13]

    lines: list[str] = []
    second: list[dict] = []
    result = run(tmp_path / "attempt-2", inputs, SPEC, checkpoints, lines=lines, metrics=second)
    assert "resumed from step 13 (checkpoint step-00000013)" in lines
    assert [m for m in second if m.get("event") == "resumed"][0]["step"] == 13
    assert [m["step"] for m in second if "loss" in m] == list(range(14, 31))
    whole, weights = uninterrupted
    assert result["steps"] == 30 and result["resumed_from_step"] == 13
    assert result["losses"] == pytest.approx(whole["losses"], abs=1e-6)
    assert max_abs_diff(final_weights(tmp_path / "attempt-2"), weights) <= 1e-5


def test_a_torn_checkpoint_is_ignored_and_the_run_resumes_from_the_one_before(inputs, uninterrupted, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(JobFailed):
        run(tmp_path / "attempt-1", inputs, SPEC, checkpoints, stop_after=24)
    assert CheckpointStore(checkpoints).complete_steps() == [10, 20, 25]
    # A writer killed after its rename, before its marker: no COMPLETE.
    (checkpoints / step_dir_name(25) / "COMPLETE").unlink()
    # A copy torn on the shared storage: same size, other bytes.
    state = checkpoints / step_dir_name(20) / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))

    lines: list[str] = []
    result = run(tmp_path / "attempt-2", inputs, SPEC, checkpoints, lines=lines)
    assert "checkpoint step-00000025 ignored: COMPLETE is missing" in lines
    assert "checkpoint step-00000020 ignored: state.pt does not match its digest" in lines
    assert "resumed from step 10 (checkpoint step-00000010)" in lines
    assert result["resumed_from_step"] == 10
    assert max_abs_diff(final_weights(tmp_path / "attempt-2"), uninterrupted[1]) <= 1e-5


def test_old_checkpoints_are_pruned_to_the_last_few(inputs, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    run(tmp_path / "attempt-1", inputs, {**SPEC, "checkpoint_every": 3, "keep_checkpoints": 2}, checkpoints)
    assert CheckpointStore(checkpoints).complete_steps() == [24, 27]
    assert not list(checkpoints.glob(".tmp-*"))


def test_a_finished_steps_checkpoint_is_kept_when_saved_again(tmp_path):
    store = CheckpointStore(tmp_path)
    first = store.save(5, {"value": torch.tensor([1.0])})
    marker = (first / "COMPLETE").read_text()
    store.save(5, {"value": torch.tensor([2.0])})  # a superseded attempt reaching the same step
    assert (first / "COMPLETE").read_text() == marker
    assert float(store.latest().state["value"][0]) == 1.0


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("checkpoint_every", 0, "'checkpoint_every' must be >= 1"),
    ("keep_checkpoints", 500, "'keep_checkpoints' must be >= 1 and <= 100"),
    ("lr_schedule", "cubic", "'lr_schedule' must be one of constant, linear"),
])
def test_bad_checkpoint_options_fail_as_bad_input_naming_the_field(inputs, tmp_path, field, value, fragment):
    with pytest.raises(JobFailed) as info:
        run(tmp_path, inputs, {**SPEC, field: value}, tmp_path / "checkpoints")
    assert info.value.code == "bad_input" and fragment in info.value.message


# ---------------------------------------------------------------- data parallel under torchrun


def torchrun_job(job_dir: Path, inputs: dict, spec: dict, nproc: int) -> dict:
    job_dir.mkdir(parents=True)
    (job_dir / JOB_FILE).write_text(json.dumps({"job_id": 1, "spec": spec, "inputs": {
        **inputs, "checkpoint_dir": str(job_dir / "checkpoints")}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", "-m", "neuron_workers.backends.cpu_rank",
                           "--job-dir", str(job_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((job_dir / RESULT_FILE).read_text())


def test_two_ranks_under_torchrun_train_like_one_process_with_the_same_global_batch(inputs, tmp_path):
    spec = {**SPEC, "steps": 12, "checkpoint_every": 5}
    one = torchrun_job(tmp_path / "one", inputs, spec, 1)
    two = torchrun_job(tmp_path / "two", inputs, spec, 2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert one["losses"][0] > one["losses"][-1]
    # Only rank 0 writes checkpoints and the model.
    assert CheckpointStore(tmp_path / "two" / "checkpoints").complete_steps() == [5, 10]
    assert (tmp_path / "two" / "artifacts" / "checkpoint").is_dir()
    assert not (tmp_path / "two" / "rank-1" / "artifacts" / "checkpoint").exists()
    # Two ranks sum their half-batches' gradients in another order than one process sums the
    # whole batch: float32 results differ in the last bits, and AdamW's normalisation lets that
    # reach about 1e-5 after a dozen steps (one step at this learning rate moves weights ~3e-3).
    assert max_abs_diff(final_weights(tmp_path / "one"), final_weights(tmp_path / "two")) <= 1e-4


ASKED_RANK = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    from neuron_workers.backends.base import JobContext, JobFailed
    from neuron_workers.backends.cpu import CpuBackend

    job_dir, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    job = json.loads((job_dir / "train_job.json").read_text())
    polls = []

    def should_stop():  # polled once per step; only rank 1 is asked, from its third step on
        polls.append(1)
        return rank == 1 and len(polls) >= 3

    # torchrun's agent SIGTERMs the other ranks once one has exited non-zero: each rank
    # gives its own account here, as a job's runner does (a cooperative stop).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    ctx = JobContext(job_id=1, kind="finetune", spec=job["spec"], workdir=job_dir / f"rank-{rank}",
                     inputs=job["inputs"], should_stop=should_stop)
    try:
        CpuBackend().finetune(ctx)
    except JobFailed as exc:
        print(f"rank {rank}: {exc.code}: {exc.message}", flush=True)
        sys.exit(1)
""")


def test_a_stop_asked_of_one_rank_stops_both_after_the_same_step_with_its_checkpoint(inputs, tmp_path):
    """gloo ranks agree on a stop after every step (distributed.reduce_step): rank 0 saves
    the step rank 1 was asked to stop at, and neither trains on or waits for the other."""
    spec = {**SPEC, "steps": 12, "checkpoint_every": 100}
    (tmp_path / JOB_FILE).write_text(json.dumps({"job_id": 1, "spec": spec, "inputs": {
        **inputs, "checkpoint_dir": str(tmp_path / "checkpoints")}}))
    script = tmp_path / "asked_rank.py"
    script.write_text(ASKED_RANK)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert (f"rank {rank}: cancelled: job 1 was stopped after step 3 of 12; checkpoint saved at step 3"
                in proc.stdout), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert CheckpointStore(tmp_path / "checkpoints").complete_steps() == [3]


# ---------------------------------------------------------------- RNG states of every rank

DRAWING_RANK = textwrap.dedent("""
    # One gloo rank of the cpu fine-tune whose steps draw from every generator a
    # checkpoint saves (as dropout draws from torch's), each rank a different number of
    # times (so the ranks' states part ways), and keep the last draws of each step.
    # argv: the job folder, the step after which rank 1 is asked to stop (0: never).
    import json, os, random, signal, sys
    from pathlib import Path
    import numpy, torch
    from neuron_workers.backends import loops
    from neuron_workers.backends.base import JobContext, JobFailed
    from neuron_workers.backends.cpu import CpuBackend

    job_dir, stop_at, rank = Path(sys.argv[1]), int(sys.argv[2]), int(os.environ["RANK"])
    job = json.loads((job_dir / "train_job.json").read_text())
    train_step, steps = loops._Run.one_step, []

    def one_step(run):
        loss = train_step(run)
        for _ in range(rank + 1):
            draws = [random.random(), float(numpy.random.random()), float(torch.rand(1))]
        with open(job_dir / f"draws-{rank}.jsonl", "a") as f:
            print(json.dumps([run.step, draws]), file=f)
        steps.append(run.step)
        return loss

    loops._Run.one_step = one_step
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # each rank gives its own account
    ctx = JobContext(job_id=1, kind="finetune", spec=job["spec"], workdir=job_dir / f"rank-{rank}",
                     inputs=job["inputs"], should_stop=lambda: rank == 1 and steps[-1] == stop_at)
    try:
        CpuBackend().finetune(ctx)
    except JobFailed as exc:
        print(f"rank {rank}: {exc.code}: {exc.message}", flush=True)
        sys.exit(1)
""")


def drawing_ranks(job_dir: Path, stop_at: int = 0) -> dict[tuple[int, int], list[float]]:
    """Run DRAWING_RANK on two gloo ranks; {(rank, step): that step's last draws}."""
    script = job_dir / "drawing_rank.py"
    script.write_text(DRAWING_RANK)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(job_dir), str(stop_at)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert (proc.returncode != 0) == bool(stop_at), proc.stdout[-3000:] + proc.stderr[-3000:]
    draws = {}
    for rank in (0, 1):
        for line in (job_dir / f"draws-{rank}.jsonl").read_text().splitlines():
            step, values = json.loads(line)
            draws[rank, step] = values
    (job_dir / "draws-0.jsonl").unlink()
    (job_dir / "draws-1.jsonl").unlink()
    return draws


def test_each_gloo_rank_resumes_its_own_random_draws(inputs, tmp_path):
    """Every rank's RNG states (Python, numpy, torch) go into the checkpoint rank 0
    writes, and each rank restores its own: after a stop and a resume, rank 1 draws
    what it would have drawn in an uninterrupted run, not what rank 0 would."""
    spec = {**SPEC, "steps": 6, "checkpoint_every": 100}
    job = {"job_id": 1, "spec": spec, "inputs": inputs}
    for name in ("whole", "resumed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / JOB_FILE).write_text(json.dumps(
            {**job, "inputs": {**inputs, "checkpoint_dir": str(tmp_path / name / "checkpoints")}}))
    whole = drawing_ranks(tmp_path / "whole")
    assert sorted(whole) == [(rank, step) for rank in (0, 1) for step in range(1, 7)]
    assert all(whole[0, step] != whole[1, step] for step in range(1, 7))

    stopped = drawing_ranks(tmp_path / "resumed", stop_at=3)
    assert sorted(stopped) == [(rank, step) for rank in (0, 1) for step in (1, 2, 3)]
    saved = CheckpointStore(tmp_path / "resumed" / "checkpoints").latest()
    assert saved.step == 3 and len(saved.state["rng"]) == 2
    resumed = drawing_ranks(tmp_path / "resumed")
    assert sorted(resumed) == [(rank, step) for rank in (0, 1) for step in (4, 5, 6)]
    for key, values in resumed.items():
        assert values == whole[key], key


def test_a_checkpoint_with_one_rng_state_still_resumes_it(inputs, tmp_path, monkeypatch):
    """A checkpoint written before every rank saved its own RNG states holds one state
    dict (rank 0's); a resumed run restores it and draws on as the uninterrupted run."""
    from neuron_workers.backends import loops

    draws: dict[str, list[float]] = {}
    train_step = loops._Run.one_step

    def one_step(run):
        loss = train_step(run)
        draws[f"{run.ctx.workdir.name} {run.step}"] = [float(torch.rand(1))]
        return loss

    monkeypatch.setattr(loops._Run, "one_step", one_step)
    spec = {**SPEC, "steps": 6, "checkpoint_every": 100}
    run(tmp_path / "whole", inputs, spec, tmp_path / "whole-checkpoints")
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(JobFailed):
        run(tmp_path / "stopped", inputs, spec, checkpoints, stop_after=2)
    store = CheckpointStore(checkpoints)
    state = store.latest().state
    assert state["step"] == 3 and len(state["rng"]) == 1
    state["rng"] = state["rng"][0]
    shutil.rmtree(checkpoints / step_dir_name(3))
    store.save(3, state)

    run(tmp_path / "resumed", inputs, spec, checkpoints)
    assert [draws[f"resumed {step}"] for step in (4, 5, 6)] == [draws[f"whole {step}"] for step in (4, 5, 6)]
