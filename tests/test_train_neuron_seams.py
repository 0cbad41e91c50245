"""The neuron backend's training options at their seams (no Neuron hardware here):
the precompile stage's command line and environment, NeuronTrainer's arguments for
tensor parallelism and ZeRO-1, its stop-and-save and its resume, the trial run's limits, and the
option checks the form and the backend share."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from neuron_workers.backends import JobFailed, get_backend, neuron, neuron_launch, neuron_train, neuron_trainer
from neuron_workers.backends.checkpoints import CheckpointStore
from neuron_workers.config import TRIAL_STEPS_ENV
from neuron_workers.backends.neuron_parallel import (
    ParallelOptionError,
    check_parallel_options,
    precompile_command,
    trainer_arguments,
)
from tests.optimum_standin import StandInOptimum
from tests.test_backend_neuron import (  # noqa: F401 - fixtures
    FINETUNE_SPEC,
    StandInXla,
    finetune_inputs,
    installed,
    make_ctx,
    restore_environ,
    tiny_lm_dir,
)

SPEC = {**FINETUNE_SPEC, "family": "trn1", "checkpoint_every": 4, "keep_checkpoints": 2}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache_url(monkeypatch, tmp_path) -> str:
    path = str(tmp_path / "fleet-cache")
    monkeypatch.setenv("NEURONDECK_COMPILE_CACHE", path)
    return path


def test_precompile_runs_the_jobs_torchrun_under_neuron_parallel_compile_with_the_fleet_cache(
        monkeypatch, finetune_inputs, cache_url, tmp_path):
    launched: list[tuple[list[str], dict]] = []
    real_popen = subprocess.Popen

    def recording_popen(argv, **kwargs):
        if "--job-dir" not in argv:  # another subprocess (the host probe): left alone
            return real_popen(argv, **kwargs)
        launched.append((list(argv), dict(kwargs["env"])))
        if argv[0] == "neuron_parallel_compile":
            script = "print('compilation_summary: 3 graphs compiled', flush=True)"
        else:  # the training run: rank 0's result, as neuron_train writes it
            script = ("import json, pathlib, sys; pathlib.Path(sys.argv[1], 'train_result.json')"
                      ".write_text(json.dumps({'steps': 5, 'final_loss': 1.0}))")
        return real_popen([sys.executable, "-c", script, argv[argv.index("--job-dir") + 1]], **kwargs)

    monkeypatch.setattr(neuron_launch.subprocess, "Popen", recording_popen)
    monkeypatch.setattr(neuron_launch, "default_torchrun", lambda: "/opt/venv/bin/torchrun")
    ctx = make_ctx(tmp_path / "job", "finetune", {**SPEC, "cores": 2, "precompile": True}, finetune_inputs)
    assert get_backend("neuron").run(ctx) == {"steps": 5, "final_loss": 1.0}

    (compile_argv, compile_env), (train_argv, train_env) = launched
    torchrun = ["/opt/venv/bin/torchrun", "--standalone", "--nproc_per_node=2", "-m",
                "neuron_workers.backends.neuron_train", "--job-dir", str(tmp_path / "job")]
    assert compile_argv == ["neuron_parallel_compile", *torchrun]
    assert train_argv == torchrun  # the same command: its graphs are the ones compiled
    assert compile_env["NEURON_COMPILE_CACHE_URL"] == cache_url
    assert compile_env[TRIAL_STEPS_ENV] == "3"
    assert f"--cache_dir={cache_url}" in compile_env["NEURON_CC_FLAGS"] == train_env["NEURON_CC_FLAGS"]
    assert TRIAL_STEPS_ENV not in train_env
    stages = [(m["stage"], m["state"]) for m in ctx.metrics if m.get("event") == "stage"]
    assert stages == [("precompile", "started"), ("precompile", "done"), ("train", "started"), ("train", "done")]
    assert "compilation_summary: 3 graphs compiled" in ctx.lines


def test_a_failed_precompile_fails_the_job_as_a_compile_error(monkeypatch, finetune_inputs, cache_url, tmp_path):
    real_popen = subprocess.Popen
    monkeypatch.setattr(neuron_launch.subprocess, "Popen", lambda argv, **kw: real_popen(
        [sys.executable, "-c", "import sys; print('ERROR: graph 2 failed'); sys.exit(3)"]
        if "--job-dir" in argv else argv, **kw))
    ctx = make_ctx(tmp_path / "job", "finetune", {**SPEC, "precompile": True}, finetune_inputs)
    with pytest.raises(JobFailed) as info:
        get_backend("neuron").run(ctx)
    assert info.value.code == "compile_error" and "status 3: ERROR: graph 2 failed" in info.value.message


def test_a_precompile_trial_run_trains_a_few_steps_and_saves_nothing(monkeypatch, finetune_inputs, tmp_path):
    for name, module in StandInXla().modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(neuron_train, "native_neuron_device_available", lambda: False)
    monkeypatch.setenv(TRIAL_STEPS_ENV, "3")
    ctx = make_ctx(tmp_path / "job", "finetune", SPEC, {**finetune_inputs, "checkpoint_dir": str(tmp_path / "ck")})
    result = neuron_train.train_rank(ctx, neuron_train.finetune_plan(ctx), rank=0, world_size=1, framework="xla")
    assert result["steps"] == 3
    assert not (tmp_path / "ck").exists() and not (tmp_path / "job" / "artifacts" / "checkpoint").exists()


def test_single_core_xla_training_checkpoints_and_resumes_like_the_cpu_backend(monkeypatch, finetune_inputs, tmp_path):
    for name, module in StandInXla().modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(neuron_train, "native_neuron_device_available", lambda: False)
    inputs = {**finetune_inputs, "checkpoint_dir": str(tmp_path / "ck")}
    first = make_ctx(tmp_path / "a1", "finetune", {**SPEC, "steps": 10}, inputs)
    first.should_stop = lambda: sum("loss" in m for m in first.metrics) >= 5
    with pytest.raises(JobFailed):
        get_backend("neuron").run(first)
    second = make_ctx(tmp_path / "a2", "finetune", {**SPEC, "steps": 10}, inputs)
    result = get_backend("neuron").run(second)
    assert result["resumed_from_step"] == 6 and result["steps"] == 10


XLA_RANK = textwrap.dedent("""
    # One rank of the own loop under torch-xla, on the CPU: torch_xla stood in for
    # (StandInXla), and its "xla" process group by gloo with ProcessGroupXla's behaviour
    # (pytorch/xla torch_xla/distributed/xla_backend.py): all_reduce reduces, barrier
    # returns at once; xm.rendezvous is what waits. Rank 1 alone gets SIGTERM during step 3.
    import os, signal, sys
    import torch.distributed as dist
    from tests.test_backend_neuron import StandInXla

    sys.modules.update(StandInXla().modules())
    from neuron_workers.backends import loops, neuron_train

    gloo_init, gloo_barrier = dist.init_process_group, dist.barrier

    def init_process_group(backend=None, **kwargs):
        assert backend == "xla", backend
        gloo_init("gloo")

    dist.init_process_group, dist.barrier = init_process_group, lambda *args, **kwargs: None
    sys.modules["torch_xla.core.xla_model"].rendezvous = lambda tag: gloo_barrier()
    neuron_train.installed_framework = lambda: "xla"
    train_step = loops._Run.one_step

    def one_step(run):
        loss = train_step(run)
        if os.environ["RANK"] == "1" and run.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # torchrun forwards the launcher's to every rank
        return loss

    loops._Run.one_step = one_step
    sys.exit(neuron_train.main())
""")


def test_own_loop_xla_ranks_agree_on_a_stop_and_save_the_step_they_reached_together(finetune_inputs, tmp_path):
    """SIGTERM reaching one torch-xla rank: every rank stops after the same step (the
    stop flag all-reduced on the device, distributed.reduce_step), rank 0 saves it,
    and the run ends cancelled naming it, instead of a rank dying or hanging in
    xm.optimizer_step's all-reduce."""
    spec = {**SPEC, "steps": 10, "checkpoint_every": 100, "cores": 2}
    (tmp_path / neuron_launch.JOB_FILE).write_text(json.dumps({"job_id": 11, "spec": spec, "inputs": {
        **finetune_inputs, "checkpoint_dir": str(tmp_path / "ck")}}))
    script = tmp_path / "xla_rank.py"
    script.write_text(XLA_RANK)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NEURON_RT_VISIBLE_CORES": "0-1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), "--job-dir", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    error = json.loads((tmp_path / neuron_launch.ERROR_FILE).read_text())
    assert error == {"code": "cancelled",
                     "message": "job 11 was stopped after step 3 of 10; checkpoint saved at step 3"}, proc.stderr[-3000:]
    assert "rank 1: cancelled: job 11 was stopped after step 3 of 10" in proc.stderr
    assert CheckpointStore(tmp_path / "ck").complete_steps() == [3]
    # Each rank's RNG states, the XLA device's seed among them, gathered into it.
    assert [sorted(rng) for rng in CheckpointStore(tmp_path / "ck").latest().state["rng"]] == \
        [["cpu", "numpy", "python", "xla"]] * 2
    metrics = [json.loads(line[len(neuron_launch.METRIC_PREFIX):]) for line in proc.stdout.splitlines()
               if line.startswith(neuron_launch.METRIC_PREFIX)]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]


NATIVE_RANK = textwrap.dedent("""
    # One rank of the own loop under native TorchNeuron, on the CPU: torch_neuronx stood
    # in (its import registers the device and the "neuron" process group backend), the
    # neuron device by the CPU, its generator (torch.neuron's get_rng_state, set_rng_state,
    # manual_seed) by a CPU generator, and the "neuron" group by gloo, which all-reduces as
    # ProcessGroupNeuron does. Each step draws from every generator a checkpoint saves,
    # each rank a different number of times (as dropout would), and keeps its last draws.
    # argv: the step during which rank 1 alone gets SIGTERM (0: never).
    import json, os, random, signal, sys, types
    from pathlib import Path
    import numpy, torch
    import torch.distributed as dist

    sys.modules["torch_neuronx"] = types.ModuleType("torch_neuronx")
    device_rng = torch.Generator()
    torch.neuron = types.SimpleNamespace(get_rng_state=device_rng.get_state, set_rng_state=device_rng.set_state,
                                         manual_seed=device_rng.manual_seed)
    from neuron_workers.backends import loops, neuron_train

    gloo_init = dist.init_process_group

    def init_process_group(backend=None, **kwargs):
        assert backend == "neuron", backend
        assert len(os.environ["NEURON_RT_VISIBLE_CORES"].split(",")) == 1  # one device per process
        gloo_init("gloo")

    dist.init_process_group = init_process_group
    neuron_train.installed_framework = lambda: "native"
    neuron_train.native_neuron_device_available = lambda: True
    neuron_train.native_device = lambda: torch.device("cpu")
    stop_at, rank = int(sys.argv[1]), int(os.environ["RANK"])
    job_dir = Path(sys.argv[sys.argv.index("--job-dir") + 1])
    train_step = loops._Run.one_step

    def one_step(run):
        loss = train_step(run)
        for _ in range(rank + 1):
            draws = [random.random(), float(numpy.random.random()), float(torch.rand(1)),
                     float(torch.rand(1, generator=device_rng))]
        with open(job_dir / f"draws-{rank}.jsonl", "a") as f:
            print(json.dumps([run.step, draws]), file=f)
        if rank == 1 and run.step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # torchrun forwards the launcher's to every rank
        return loss

    loops._Run.one_step = one_step
    sys.exit(neuron_train.main(sys.argv[2:]))
""")


def native_ranks(job_dir: Path, stop_at: int = 0) -> tuple[subprocess.CompletedProcess, dict]:
    """Run NATIVE_RANK on two ranks under torchrun; (the run, {(rank, step): that step's last draws})."""
    script = job_dir / "native_rank.py"
    script.write_text(NATIVE_RANK)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NEURON_RT_VISIBLE_CORES": "0-1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(stop_at), "--job-dir", str(job_dir)], env=env, capture_output=True,
                          text=True, timeout=300)
    draws = {}
    for rank in (0, 1):
        for line in (job_dir / f"draws-{rank}.jsonl").read_text().splitlines():
            step, values = json.loads(line)
            draws[rank, step] = values
        (job_dir / f"draws-{rank}.jsonl").unlink()
    return proc, draws


def test_native_ranks_agree_on_a_stop_save_each_ranks_rng_and_each_resumes_its_own(finetune_inputs, tmp_path):
    """SIGTERM reaching one native TorchNeuron rank: both stop after the same step (the
    stop flag all-reduced on the device, as under torch-xla), rank 0 saves that step
    with both ranks' RNG states, the neuron device's among them, and the resumed ranks
    draw what an uninterrupted run draws, each from its own states."""
    spec = {**SPEC, "steps": 6, "checkpoint_every": 100, "cores": 2}
    for name in ("whole", "resumed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / neuron_launch.JOB_FILE).write_text(json.dumps({"job_id": 11, "spec": spec, "inputs": {
            **finetune_inputs, "checkpoint_dir": str(tmp_path / name / "ck")}}))
    proc, whole = native_ranks(tmp_path / "whole")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(whole) == [(rank, step) for rank in (0, 1) for step in range(1, 7)]

    proc, stopped = native_ranks(tmp_path / "resumed", stop_at=3)
    error = json.loads((tmp_path / "resumed" / neuron_launch.ERROR_FILE).read_text())
    assert error == {"code": "cancelled",
                     "message": "job 11 was stopped after step 3 of 6; checkpoint saved at step 3"}, proc.stderr[-3000:]
    assert "rank 1: cancelled: job 11 was stopped after step 3 of 6" in proc.stderr
    assert sorted(stopped) == [(rank, step) for rank in (0, 1) for step in (1, 2, 3)]
    metrics = [json.loads(line[len(neuron_launch.METRIC_PREFIX):]) for line in proc.stdout.splitlines()
               if line.startswith(neuron_launch.METRIC_PREFIX)]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    saved = CheckpointStore(tmp_path / "resumed" / "ck").latest()
    assert saved.step == 3
    assert [sorted(rng) for rng in saved.state["rng"]] == [["cpu", "neuron", "numpy", "python"]] * 2
    assert not torch.equal(saved.state["rng"][0]["neuron"], saved.state["rng"][1]["neuron"])

    proc, resumed = native_ranks(tmp_path / "resumed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "resumed" / neuron_launch.RESULT_FILE).read_text())["resumed_from_step"] == 3
    assert sorted(resumed) == [(rank, step) for rank in (0, 1) for step in (4, 5, 6)]
    for key, values in resumed.items():
        assert values == whole[key], key


# ---------------------------------------------------------------- NeuronTrainer


@pytest.fixture
def optimum(monkeypatch) -> StandInOptimum:
    """Optimum Neuron 0.4 (its own NeuronTrainer loop) and neuronx_distributed, stood in."""
    standin = StandInOptimum()
    for name, module in standin.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(neuron_train.hf, "check_sequence_length", lambda model, length: None)
    return standin


TP_SPEC = {**SPEC, "cores": 8, "tensor_parallel_size": 2, "zero_1": True, "batch_size": 8, "steps": 10,
           "checkpoint_every": 4}


def train_attempt(optimum: StandInOptimum, workdir: Path, inputs: dict, spec: dict = TP_SPEC, *,
                  world_size: int = 8, stop_during: int | None = None, agree=bool) -> tuple:
    """One attempt of a NeuronTrainer rank, asked to stop during step `stop_during` (once
    the step before it was reported)."""
    optimum.world_size = world_size
    ctx = make_ctx(workdir, "finetune", spec, inputs)
    if stop_during is not None:
        ctx.should_stop = lambda: sum("loss" in m for m in ctx.metrics) >= stop_during - 1
    plan = neuron_train.finetune_plan(ctx)
    try:
        return ctx, neuron_trainer.optimum_train_rank(ctx, plan, world_size=world_size, agree=agree)
    except JobFailed as exc:
        return ctx, exc


def test_tensor_parallel_and_zero_1_train_through_neuron_trainer_with_its_options(optimum, finetune_inputs,
                                                                                   tmp_path):
    checkpoints = tmp_path / "ck"
    ctx, result = train_attempt(optimum, tmp_path / "job", {**finetune_inputs, "checkpoint_dir": str(checkpoints)})
    args = optimum.calls["args"]
    assert (args["tensor_parallel_size"], args["zero_1"]) == (2, True)
    assert args["per_device_train_batch_size"] == 2  # global 8 over 8 / 2 = 4 data-parallel ranks
    assert (args["save_steps"], args["learning_rate"], args["seed"]) == (4, SPEC["learning_rate"], 0)
    assert args["output_dir"] == str(checkpoints / ".trainer-staging")  # adopted from there, step by step
    assert optimum.calls["model"]["trn_config"].tensor_parallel_size == 2
    assert optimum.calls["model"]["dtype"] == torch.bfloat16
    row = optimum.calls["trainer"]["dataset"][0]
    assert torch.equal(row["input_ids"], row["labels"]) and row["input_ids"].shape == (32,)
    assert result["training_mode"] == "neuron-trainer" and result["steps"] == 10 and len(result["losses"]) == 10
    # None of the last step: the model is saved next (artifacts/checkpoint).
    assert [m["step"] for m in ctx.metrics if m.get("event") == "checkpoint"] == [4, 8]
    assert sorted(p.name for p in checkpoints.iterdir()) == [".trainer-staging", "step-00000004", "step-00000008"]
    assert (tmp_path / "job" / "artifacts" / "checkpoint" / "config.json").exists()


def test_a_stopped_neuron_trainer_saves_the_step_it_reached_and_the_next_attempt_ends_with_the_same_weights(
        optimum, finetune_inputs, tmp_path):
    """SIGTERM (preemption, time limit, Suspend) in the grace period: the step reached is
    saved complete, the attempt ends cancelled naming it, and the next attempt resumes
    there through neuronx_distributed.trainer.load_checkpoint - never through
    train(resume_from_checkpoint=...), which optimum-neuron 0.4 refuses."""
    _, whole = train_attempt(optimum, tmp_path / "whole", {**finetune_inputs, "checkpoint_dir": str(tmp_path / "w")})
    reference, reference_batches = optimum.weights(), optimum.trainer.batches
    inputs = {**finetune_inputs, "checkpoint_dir": str(tmp_path / "ck")}
    first, stopped = train_attempt(optimum, tmp_path / "a1", inputs, stop_during=6)
    assert isinstance(stopped, JobFailed) and stopped.code == "cancelled"
    assert "stopped after step 6 of 10; checkpoint saved at step 6" in stopped.message
    assert [m["step"] for m in first.metrics if m.get("event") == "checkpoint"] == [4, 6]
    marker = json.loads((tmp_path / "ck" / "step-00000006" / "COMPLETE").read_text())
    assert marker["step"] == 6 and "trainer_state.json" in marker["files"] and "scheduler.pt" in marker["files"]
    assert not list((tmp_path / "ck" / ".trainer-staging").iterdir())

    second, result = train_attempt(optimum, tmp_path / "a2", inputs)
    assert optimum.calls["loads"] == [{"path": str(tmp_path / "ck" / "step-00000006"), "tag": "shards",
                                       "optimizer": True}]  # tensor parallel: the optimizer is in the shards
    assert result["resumed_from_step"] == 6 and result["steps"] == 10
    assert [m["step"] for m in second.metrics if m.get("event") == "resumed"] == [6]
    # Steps 7..10 read the rows an uninterrupted run reads there, and end with its weights.
    assert all(torch.equal(a, b) for a, b in zip(optimum.trainer.batches, reference_batches[6:]))
    after = optimum.weights()
    assert max(float((after[k] - reference[k]).abs().max()) for k in reference) <= 1e-6
    assert whole["final_loss"] == pytest.approx(result["final_loss"])


def test_a_resumed_neuron_trainer_draws_the_random_numbers_an_uninterrupted_run_draws(optimum, finetune_inputs,
                                                                                     tmp_path):
    """Dropout masks after a resume: every rank's Python, numpy, torch CPU and XLA device
    RNG state is in the checkpoint (named as transformers' Trainer names it) and is
    loaded before the first resumed step. The stop comes at a checkpoint step (8): 0.4
    marks one step more when it saves, which moves the device seed on, so only a run
    that saved at the same step draws the same device numbers after it."""
    train_attempt(optimum, tmp_path / "whole", {**finetune_inputs, "checkpoint_dir": str(tmp_path / "w")})
    reference = optimum.trainer.draws
    inputs = {**finetune_inputs, "checkpoint_dir": str(tmp_path / "ck")}
    train_attempt(optimum, tmp_path / "a1", inputs, stop_during=8)
    marker = json.loads((tmp_path / "ck" / "step-00000008" / "COMPLETE").read_text())
    assert "rng_state_0.pth" in marker["files"]  # this rank's, of 8
    state = torch.load(tmp_path / "ck" / "step-00000008" / "rng_state_0.pth", weights_only=False)
    assert set(state) == {"python", "numpy", "cpu", "xla"}

    optimum.xm.set_rng_state(12345)  # another process: other states everywhere until restored
    ctx, result = train_attempt(optimum, tmp_path / "a2", inputs)
    assert result["resumed_from_step"] == 8
    assert optimum.trainer.draws == reference[8:]
    assert not any("RNG" in line for line in ctx.lines)


def test_a_checkpoint_without_rng_state_resumes_and_says_the_draws_differ(optimum, finetune_inputs, tmp_path):
    inputs = {**finetune_inputs, "checkpoint_dir": str(tmp_path / "ck")}
    train_attempt(optimum, tmp_path / "a1", inputs, spec={**TP_SPEC, "cores": 1, "tensor_parallel_size": 1},
                  world_size=1, stop_during=6)
    folder = tmp_path / "ck" / "step-00000006"
    (folder / "rng_state.pth").unlink()  # one process: the Trainer's single-file name
    marker = json.loads((folder / "COMPLETE").read_text())
    del marker["files"]["rng_state.pth"]
    (folder / "COMPLETE").write_text(json.dumps(marker))
    ctx, result = train_attempt(optimum, tmp_path / "a2", inputs,
                                spec={**TP_SPEC, "cores": 1, "tensor_parallel_size": 1}, world_size=1)
    assert result["resumed_from_step"] == 6
    assert "step-00000006 has no RNG state for rank 0: random draws (dropout) differ from an uninterrupted run" \
        in ctx.lines


def test_without_tensor_parallelism_the_optimizer_resumes_from_optimizer_pt(optimum, finetune_inputs, tmp_path):
    spec = {**TP_SPEC, "tensor_parallel_size": 1, "cores": 2, "batch_size": 4}
    inputs = {**finetune_inputs, "checkpoint_dir": str(tmp_path / "ck")}
    train_attempt(optimum, tmp_path / "a1", inputs, spec, world_size=2, stop_during=5)
    _, result = train_attempt(optimum, tmp_path / "a2", inputs, spec, world_size=2)
    assert optimum.calls["loads"][-1]["optimizer"] is False and result["resumed_from_step"] == 5


def test_a_rank_not_asked_to_stop_stops_with_the_others_after_the_same_step(optimum, finetune_inputs, tmp_path):
    """A save is collective: the ranks agree (an all-reduce of the flag) after every step."""
    asked: list[bool] = []

    def another_rank_was_asked(flag: bool) -> bool:
        asked.append(flag)
        return len(asked) >= 3

    inputs = {**finetune_inputs, "checkpoint_dir": str(tmp_path / "ck")}
    _, stopped = train_attempt(optimum, tmp_path / "a1", inputs, agree=another_rank_was_asked)
    assert isinstance(stopped, JobFailed) and "checkpoint saved at step 3" in stopped.message
    assert not any(asked)  # this rank itself was never asked
    assert (tmp_path / "ck" / "step-00000003" / "COMPLETE").exists()


def test_a_torn_newest_trainer_checkpoint_is_ignored_and_the_one_before_resumed(optimum, finetune_inputs,
                                                                               tmp_path):
    inputs = {**finetune_inputs, "checkpoint_dir": str(tmp_path / "ck")}
    train_attempt(optimum, tmp_path / "a1", inputs, stop_during=6)
    torn = tmp_path / "ck" / "step-00000006" / "scheduler.pt"
    torn.write_bytes(torn.read_bytes()[:10])
    staged = tmp_path / "ck" / ".trainer-staging" / "checkpoint-7"  # a save killed half-way
    staged.mkdir(parents=True)
    ctx, result = train_attempt(optimum, tmp_path / "a2", inputs)
    assert result["resumed_from_step"] == 4
    assert any("step-00000006 ignored: scheduler.pt has 10 bytes" in line for line in ctx.lines)
    assert not staged.exists()


def test_the_single_host_launcher_relays_a_stopped_ranks_checkpoint_and_its_account(tmp_path):
    """On a stop the launcher SIGTERMs torchrun and keeps relaying: the checkpoint a rank
    saves in the grace period reaches the job's metrics, its message the failure."""
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(f"""
        import json, signal, sys, time
        def stop(signum, frame):
            print({neuron_launch.METRIC_PREFIX!r} + json.dumps({{"event": "checkpoint", "step": 3}}), flush=True)
            with open({str(tmp_path / neuron_launch.ERROR_FILE)!r}, "w") as fh:
                json.dump({{"code": "cancelled", "message": "stopped after step 3 of 9; checkpoint saved"}}, fh)
            sys.exit(1)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
    """))
    ctx = make_ctx(tmp_path, "finetune", SPEC, {})
    ctx.should_stop = lambda: "ready" in ctx.lines
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    with pytest.raises(JobFailed) as info:
        neuron_launch.relay_output(ctx, proc)
    assert info.value.code == "cancelled" and info.value.message == "stopped after step 3 of 9; checkpoint saved"
    assert {"event": "checkpoint", "step": 3} in ctx.metrics


@pytest.mark.parametrize(("family", "cores", "tp", "zero_1", "field", "words"), [
    ("cpu", 2, 2, False, "tensor_parallel_size", "needs a Neuron family"),
    ("cpu", 2, 1, True, "zero_1", "needs a Neuron family"),
    ("trn1", 8, 3, False, "tensor_parallel_size", "must divide the job's 8 cores"),
    ("trn1", 4, 4, True, "zero_1", "leave one"),
])
def test_parallel_options_that_cannot_work_are_refused_naming_the_field(family, cores, tp, zero_1, field, words):
    with pytest.raises(ParallelOptionError) as info:
        check_parallel_options(family, cores, tp, zero_1, precompile=False)
    assert info.value.field == field and words in str(info.value)


def test_options_that_work_pass_and_precompile_is_allowed_on_cpu():
    check_parallel_options("trn1", 32, 8, True, precompile=True)
    check_parallel_options("cpu", 1, 1, False, precompile=True)
    with pytest.raises(ParallelOptionError, match="batch_size 6 must divide evenly over 4"):
        trainer_arguments({"batch_size": 6, "learning_rate": 1e-3, "steps": 5, "seed": 0, "checkpoint_every": 1,
                           "keep_checkpoints": 1}, output_dir="/x", world_size=8, tensor_parallel_size=2, zero_1=True)
    argv, env = precompile_command(["torchrun", "x"], "s3://bucket/cache", trial_steps=5)
    assert argv == ["neuron_parallel_compile", "torchrun", "x"]
    assert env == {"NEURON_COMPILE_CACHE_URL": "s3://bucket/cache", TRIAL_STEPS_ENV: "5"}
    assert json.dumps(env)  # plain strings for the child's environment


def test_a_neuron_gang_rank_trains_with_the_fleet_compile_cache_its_precompile_filled(
        monkeypatch, finetune_inputs, cache_url, tmp_path):
    """One rank of a gang's torchrun (neuron_workers.process.gang ran the precompile over
    every host first): it trains in this process, reading the same cache."""
    seen: dict = {}

    def fake_train_rank(ctx, plan, *, rank, world_size, framework=None):
        import os

        seen.update(rank=rank, world_size=world_size, flags=os.environ.get("NEURON_CC_FLAGS"),
                    root=os.environ.get("NEURON_RT_ROOT_COMM_ID"))
        return {"steps": 5}

    monkeypatch.setattr(neuron, "train_rank", fake_train_rank)
    for name, value in {"WORLD_SIZE": "64", "RANK": "33", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "32",
                        "NEURON_RT_VISIBLE_CORES": "0-31", "NEURON_RT_ROOT_COMM_ID": "10.0.0.11:41003"}.items():
        monkeypatch.setenv(name, value)
    ctx = make_ctx(tmp_path / "job", "finetune", {**SPEC, "cores": 32, "precompile": True}, finetune_inputs)
    assert get_backend("neuron").run(ctx) == {"steps": 5}
    assert (seen["rank"], seen["world_size"]) == (33, 64)
    assert seen["flags"] == f"--cache_dir={cache_url}"
    assert seen["root"] == "10.0.0.11:41003"  # the gang's collectives root is kept
    # No second precompile inside the rank: the launcher ran it for the whole gang.
    assert not [m for m in ctx.metrics if m.get("stage") == "precompile"]
