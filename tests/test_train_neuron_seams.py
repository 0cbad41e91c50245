"""The neuron backend's training options at their seams (no Neuron hardware here):
the precompile stage's command line and environment, NeuronTrainer's arguments for
tensor parallelism and ZeRO-1 and its resume, the trial run's limits, and the
option checks the form and the backend share."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from neuron_workers.backends import JobFailed, get_backend, neuron, neuron_launch, neuron_train
from neuron_workers.config import TRIAL_STEPS_ENV
from neuron_workers.backends.neuron_parallel import (
    ParallelOptionError,
    check_parallel_options,
    precompile_command,
    trainer_arguments,
)
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


# ---------------------------------------------------------------- NeuronTrainer


class StandInOptimum:
    """optimum.neuron's training surface on the CPU: records what the backend passes."""

    def __init__(self) -> None:
        self.calls: dict = {}

    def modules(self) -> dict[str, types.ModuleType]:
        test = self

        class NeuronTrainingArguments:
            def __init__(self, **kwargs):
                test.calls["args"] = kwargs
                self.trn_config = {"tensor_parallel_size": kwargs["tensor_parallel_size"], "zero_1": kwargs["zero_1"]}

        class NeuronTrainer:
            def __init__(self, model, args, train_dataset):
                test.calls["trainer"] = {"model": model, "dataset": train_dataset}

            def train(self, resume_from_checkpoint=None):
                test.calls["resume"] = resume_from_checkpoint
                return types.SimpleNamespace(training_loss=2.25, global_step=test.calls["args"]["max_steps"])

            def save_model(self, path):
                Path(path).mkdir(parents=True, exist_ok=True)
                (Path(path) / "config.json").write_text("{}")

        class NeuronModelForCausalLM:
            @classmethod
            def from_pretrained(cls, path, trn_config, dtype=None):
                test.calls["model"] = {"path": path, "trn_config": trn_config, "dtype": dtype}
                return types.SimpleNamespace(config=types.SimpleNamespace(n_positions=256, max_position_embeddings=256))

        root = types.ModuleType("optimum.neuron")
        root.NeuronTrainingArguments, root.NeuronTrainer = NeuronTrainingArguments, NeuronTrainer
        training = types.ModuleType("optimum.neuron.models.training")
        training.NeuronModelForCausalLM = NeuronModelForCausalLM
        return {"optimum.neuron": root, "optimum.neuron.models.training": training}


def test_tensor_parallel_and_zero_1_train_through_neuron_trainer_and_resume_its_newest_checkpoint(
        monkeypatch, finetune_inputs, tmp_path):
    optimum = StandInOptimum()
    for name, module in optimum.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(neuron_train.hf, "check_sequence_length", lambda model, length: None)
    checkpoints = tmp_path / "ck"
    for step, complete in ((4, True), (8, True), (12, False)):  # 12: torn, no trainer_state.json
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (checkpoints / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    spec = {**SPEC, "cores": 8, "tensor_parallel_size": 2, "zero_1": True, "batch_size": 8, "steps": 20}
    ctx = make_ctx(tmp_path / "job", "finetune", spec, {**finetune_inputs, "checkpoint_dir": str(checkpoints)})
    result = neuron_train.train_rank(ctx, neuron_train.finetune_plan(ctx), rank=0, world_size=8)

    args = optimum.calls["args"]
    assert (args["tensor_parallel_size"], args["zero_1"]) == (2, True)
    assert args["per_device_train_batch_size"] == 2  # global 8 over 8 / 2 = 4 data-parallel ranks
    assert (args["output_dir"], args["save_steps"], args["save_total_limit"]) == (str(checkpoints), 4, 2)
    assert (args["max_steps"], args["learning_rate"], args["seed"]) == (20, SPEC["learning_rate"], 0)
    assert optimum.calls["model"]["trn_config"] == {"tensor_parallel_size": 2, "zero_1": True}
    assert optimum.calls["model"]["dtype"] == torch.bfloat16
    assert optimum.calls["resume"] == str(checkpoints / "checkpoint-8")
    row = optimum.calls["trainer"]["dataset"][0]
    assert torch.equal(row["input_ids"], row["labels"]) and row["input_ids"].shape == (32,)
    assert result["resumed_from_step"] == 8 and result["training_mode"] == "neuron-trainer"
    assert (tmp_path / "job" / "artifacts" / "checkpoint" / "config.json").exists()


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
