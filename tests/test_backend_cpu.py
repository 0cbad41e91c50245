"""The cpu backend runs compile, finetune and inference for real on a tiny local GPT-2.

No Django, no database, no network: the model and dataset are created in tmp dirs.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch

from neuron_workers.backends import JobContext, JobFailed, get_backend, hf
from neuron_workers.backends import compiling
from neuron_workers.backends.base import FAILURE_CODES, downsample, percentile
from neuron_workers.backends.tinymodel import create_demo_dataset, create_tiny_model, model_digest

COMPILE_SPEC = {"model_id": 1, "batch_size": 2, "sequence_length": 48, "target": "cpu", "compiler_options": ["-O1"]}
FINETUNE_SPEC = {
    "model_id": 1, "dataset_id": 1, "steps": 40, "epochs": None, "learning_rate": 3e-3,
    "batch_size": 8, "sequence_length": 64, "cores": 2, "seed": 0,
}


class Recorder:
    """Collects what a backend sends to ctx.log / ctx.metric."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.metrics: list[dict] = []


def make_ctx(workdir: Path, kind: str, spec: dict, inputs: dict, recorder: Recorder | None = None,
             **kwargs) -> JobContext:
    recorder = recorder or Recorder()
    return JobContext(job_id=7, kind=kind, spec=spec, workdir=workdir, inputs=inputs,
                      log=recorder.lines.append, metric=recorder.metrics.append, **kwargs)


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-gpt")


@pytest.fixture(scope="module")
def demo_jsonl(tmp_path_factory) -> Path:
    return create_demo_dataset(tmp_path_factory.mktemp("data") / "demo.jsonl", rows=200)


@pytest.fixture(scope="module")
def compiled(tiny_lm_dir, tmp_path_factory) -> tuple[Path, dict]:
    """One compile shared by the compile and artifact-inference tests: (job workdir, result)."""
    workdir = tmp_path_factory.mktemp("compile-job")
    ctx = make_ctx(workdir, "compile", COMPILE_SPEC, {"model_path": str(tiny_lm_dir), "model_format": "hf"})
    return workdir, get_backend("cpu").run(ctx)


@pytest.fixture(scope="module")
def finetuned(tiny_lm_dir, demo_jsonl, tmp_path_factory) -> tuple[Path, dict, Recorder]:
    workdir = tmp_path_factory.mktemp("finetune-job")
    recorder = Recorder()
    inputs = {"model_path": str(tiny_lm_dir), "model_format": "hf", "dataset_path": str(demo_jsonl),
              "dataset_format": "jsonl"}
    result = get_backend("cpu").run(make_ctx(workdir, "finetune", FINETUNE_SPEC, inputs, recorder))
    return workdir, result, recorder


def hf_inputs(model_dir: Path) -> dict:
    return {"model_path": str(model_dir), "model_format": "hf"}


def read_outputs(workdir: Path) -> list[dict]:
    lines = (workdir / "artifacts" / "outputs.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# ---------------------------------------------------------------- tiny model


def test_the_tiny_model_loads_offline_with_the_auto_classes(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, local_files_only=True)
    assert model.config.vocab_size == len(tokenizer) == 259
    assert (model.config.n_layer, model.config.n_embd, model.config.n_positions) == (2, 64, 256)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.decode(tokenizer("héllo", add_special_tokens=False)["input_ids"]) == "héllo"


def test_the_tiny_model_is_seeded_and_its_digest_tracks_content(tmp_path):
    a = create_tiny_model(tmp_path / "a", seed=3)
    b = create_tiny_model(tmp_path / "b", seed=3)
    c = create_tiny_model(tmp_path / "c", seed=4)
    assert model_digest(a) == model_digest(b) != model_digest(c)
    (b / "extra.txt").write_text("x")
    assert model_digest(b) != model_digest(a)
    assert model_digest(a / "config.json") == model_digest(b / "config.json")


def test_the_demo_dataset_is_jsonl_text_rows(demo_jsonl):
    rows = [json.loads(line) for line in demo_jsonl.read_text().splitlines()]
    assert len(rows) == 200 and all(isinstance(r["text"], str) and r["text"] for r in rows)


# ---------------------------------------------------------------- compile


def test_compile_writes_a_torchscript_artifact_that_matches_eager(compiled, tiny_lm_dir):
    workdir, result = compiled
    artifacts = workdir / "artifacts"
    assert result["artifact"] == "model.pt" and result["backend"] == "cpu"
    assert result["input_shape"] == [2, 48]
    assert result["compiler_version"] == f"torch-{torch.__version__}"
    assert result["max_abs_logit_diff"] < 1e-4
    assert result["compile_seconds"] > 0
    assert 0 < result["latency_ms_p50"] <= result["latency_ms_p95"]
    traced = torch.jit.load(str(artifacts / "model.pt"))
    eager = hf.load_causal_lm(tiny_lm_dir).eval()
    x = torch.randint(0, 259, (2, 48), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        assert (traced(x) - eager(input_ids=x).logits).abs().max() < 1e-4


def test_compile_records_meta_tokenizer_log_and_cache_key(compiled, tiny_lm_dir):
    workdir, result = compiled
    artifacts = workdir / "artifacts"
    meta = json.loads((artifacts / "compile_meta.json").read_text())
    assert meta["input_shape"] == [2, 48] and meta["vocab_size"] == 259
    assert (meta["eos_token_id"], meta["pad_token_id"]) == (1, 0)
    assert meta["compiler_options"] == ["--optlevel=1"] == result["compiler_options"]
    assert meta["model_digest"] == model_digest(tiny_lm_dir) == result["model_digest"]
    assert len(result["cache_key"]) == 64
    assert hf.load_tokenizer(artifacts / "tokenizer").eos_token_id == 1
    assert "torch.jit.trace" in (artifacts / "compile_log.txt").read_text()


def test_compile_fails_when_traced_logits_drift_from_eager(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(compiling, "max_logit_diff", lambda *args: 0.5)
    ctx = make_ctx(tmp_path, "compile", COMPILE_SPEC, hf_inputs(tiny_lm_dir))
    with pytest.raises(JobFailed) as info:
        get_backend("cpu").run(ctx)
    assert info.value.code == "compile_error" and "0.5" in info.value.message


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"target": "inf2"}, "needs the neuron backend"),
        ({"compiler_options": ["--output=/tmp/x"]}, "'--output=/tmp/x'"),
        ({"compiler_options": ["-O1; reboot"]}, "'-O1; reboot'"),
        ({"sequence_length": 512}, "exceeds the model's 256 positions"),
        ({"batch_size": 0}, "'batch_size' must be >= 1"),
        ({"batch_size": "2"}, "'batch_size' must be an integer"),
        ({"sequence_length": None}, "'sequence_length' is required"),
    ],
)
def test_compile_rejects_inconsistent_specs_as_bad_input(tiny_lm_dir, tmp_path, change, fragment):
    ctx = make_ctx(tmp_path, "compile", {**COMPILE_SPEC, **change}, hf_inputs(tiny_lm_dir))
    with pytest.raises(JobFailed) as info:
        get_backend("cpu").run(ctx)
    assert info.value.code == "bad_input"
    assert fragment in info.value.message


def test_compile_rejects_missing_or_unloadable_models(tmp_path):
    missing = make_ctx(tmp_path, "compile", COMPILE_SPEC, hf_inputs(tmp_path / "nope"))
    with pytest.raises(JobFailed, match="does not exist") as info:
        get_backend("cpu").run(missing)
    assert info.value.code == "bad_input"
    (tmp_path / "empty").mkdir()
    empty = make_ctx(tmp_path, "compile", COMPILE_SPEC, hf_inputs(tmp_path / "empty"))
    with pytest.raises(JobFailed, match="could not load a causal LM"):
        get_backend("cpu").run(empty)
    wrong_format = make_ctx(tmp_path, "compile", COMPILE_SPEC,
                            {"model_path": str(tmp_path / "empty"), "model_format": "torchscript"})
    with pytest.raises(JobFailed, match="format hf"):
        get_backend("cpu").run(wrong_format)


# ---------------------------------------------------------------- finetune


def test_finetune_lowers_the_loss_and_reports_every_step(finetuned):
    _, result, recorder = finetuned
    losses = result["losses"]
    assert result["steps"] == len(losses) == 40
    assert statistics.mean(losses[:5]) > statistics.mean(losses[-5:]) + 0.5
    assert (result["first_loss"], result["final_loss"]) == (losses[0], losses[-1])
    loss_rows = [m for m in recorder.metrics if "loss" in m]
    assert [m["step"] for m in loss_rows] == list(range(1, 41))
    assert [m["loss"] for m in loss_rows] == losses
    assert result["train_seconds"] > 0 and result["tokens_per_s"] > 0
    assert result["checkpoint"] == "checkpoint"
    assert any("step 40/40" in line for line in recorder.lines)


def test_finetune_checkpoint_reloads_with_from_pretrained(finetuned, tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir, _, _ = finetuned
    checkpoint = workdir / "artifacts" / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, local_files_only=True)
    assert len(tokenizer) == model.config.vocab_size
    changed = any(not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))
    assert changed, "training must have changed the weights"


def test_finetune_by_epochs_reads_csv_and_writes_default_metrics_file(tiny_lm_dir, tmp_path):
    data = tmp_path / "data.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows([i, f"row {i}: the red fox jumps over the lazy dog."] for i in range(12))
    spec = {**FINETUNE_SPEC, "steps": None, "epochs": 2, "batch_size": 4, "sequence_length": 32}
    inputs = {**hf_inputs(tiny_lm_dir), "dataset_path": str(data), "dataset_format": "csv"}
    ctx = JobContext(job_id=8, kind="finetune", spec=spec, workdir=tmp_path / "job", inputs=inputs,
                     log=lambda line: None)
    result = get_backend("cpu").run(ctx)
    # Byte-level tokens: each row's UTF-8 bytes plus one eos, packed into blocks of 32.
    tokens = sum(len(f"row {i}: the red fox jumps over the lazy dog.".encode()) + 1 for i in range(12))
    steps_per_epoch = -(-(tokens // 32) // 4)
    assert result["steps"] == 2 * steps_per_epoch
    lines = (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, result["steps"] + 1))


def test_finetune_stops_cleanly_between_steps_when_asked(tiny_lm_dir, demo_jsonl, tmp_path):
    polls = []

    def stop_after_three_steps() -> bool:
        polls.append(1)
        return len(polls) > 3

    recorder = Recorder()
    inputs = {**hf_inputs(tiny_lm_dir), "dataset_path": str(demo_jsonl), "dataset_format": "jsonl"}
    ctx = make_ctx(tmp_path, "finetune", FINETUNE_SPEC, inputs, recorder, should_stop=stop_after_three_steps)
    with pytest.raises(JobFailed) as info:
        get_backend("cpu").run(ctx)
    assert info.value.code == "cancelled"
    assert [m["step"] for m in recorder.metrics if "loss" in m] == [1, 2, 3]
    assert not (tmp_path / "artifacts" / "checkpoint").exists()  # no final model
    assert [m["step"] for m in recorder.metrics if m.get("event") == "checkpoint"] == [3]  # saved on the stop


@pytest.mark.parametrize(
    ("dataset", "fmt", "spec_change", "fragment"),
    [
        ('{"text": "ok"}\n{"body": "no text"}\n', "jsonl", {}, "line 2 has no string field 'text'"),
        ('{"text": "ok"}\nnot json\n', "jsonl", {}, "line 2 is not valid JSON"),
        ('{"text": "   "}\n', "jsonl", {}, "no non-empty text rows"),
        ("id,body\n1,hello\n", "csv", {}, "no 'text' column"),
        ('{"text": "ok"}\n', "parquet", {}, "not supported"),
        ('{"text": "ok"}\n', "jsonl", {"steps": None, "epochs": None}, "needs 'steps' or 'epochs'"),
        ('{"text": "ok"}\n', "jsonl", {"learning_rate": 0}, "greater than 0"),
        ('{"text": "ok"}\n', "jsonl", {"learning_rate": float("nan")}, "finite number"),
        ('{"text": "ok"}\n', "jsonl", {"sequence_length": 1000}, "exceeds the model's 256 positions"),
    ],
)
def test_finetune_rejects_bad_datasets_and_specs_as_bad_input(tiny_lm_dir, tmp_path, dataset, fmt, spec_change,
                                                             fragment):
    path = tmp_path / f"data.{fmt}"
    path.write_text(dataset)
    inputs = {**hf_inputs(tiny_lm_dir), "dataset_path": str(path), "dataset_format": fmt}
    ctx = make_ctx(tmp_path, "finetune", {**FINETUNE_SPEC, **spec_change}, inputs)
    with pytest.raises(JobFailed) as info:
        get_backend("cpu").run(ctx)
    assert info.value.code == "bad_input"
    assert fragment in info.value.message


# ---------------------------------------------------------------- inference


INFERENCE_SPEC = {"model_id": 1, "prompts": ["the red fox", "a small robot", ""], "max_new_tokens": 6,
                  "temperature": 0.0}


def test_inference_on_an_hf_model_writes_one_output_per_prompt(tiny_lm_dir, tmp_path):
    result = get_backend("cpu").run(make_ctx(tmp_path, "inference", INFERENCE_SPEC, hf_inputs(tiny_lm_dir)))
    outputs = read_outputs(tmp_path)
    assert [o["index"] for o in outputs] == [0, 1, 2]
    assert [o["prompt"] for o in outputs] == INFERENCE_SPEC["prompts"]
    assert all(isinstance(o["output"], str) and 0 <= o["new_tokens"] <= 6 and o["latency_ms"] > 0 for o in outputs)
    assert result["requests"] == 3 and result["outputs"] == "outputs.jsonl"
    assert result["latency_ms_p50"] <= result["latency_ms_p90"] <= result["latency_ms_p99"]
    assert result["tokens_per_s"] > 0 and result["requests_per_s"] > 0


def test_greedy_is_deterministic_and_sampling_follows_the_seed(tiny_lm_dir, tmp_path):
    def outputs(name: str, **change) -> list[str]:
        spec = {**INFERENCE_SPEC, "max_new_tokens": 12, **change}
        get_backend("cpu").run(make_ctx(tmp_path / name, "inference", spec, hf_inputs(tiny_lm_dir)))
        return [o["output"] for o in read_outputs(tmp_path / name)]

    assert outputs("greedy-a") == outputs("greedy-b")
    assert outputs("seed1-a", temperature=1.0, seed=1) == outputs("seed1-b", temperature=1.0, seed=1)
    assert outputs("seed1-c", temperature=1.0, seed=1) != outputs("seed2", temperature=1.0, seed=2)


def test_inference_on_the_compiled_artifact_matches_hf_greedy_decoding(compiled, tiny_lm_dir, tmp_path):
    workdir, _ = compiled
    prompts = ["the red fox", "a quiet cat waits", "x"]  # 3 prompts through a batch-2 artifact
    spec = {**INFERENCE_SPEC, "prompts": prompts, "max_new_tokens": 10}
    compiled_inputs = {"model_path": str(workdir / "artifacts"), "model_format": "torchscript"}
    result = get_backend("cpu").run(make_ctx(tmp_path / "ts", "inference", spec, compiled_inputs))
    get_backend("cpu").run(make_ctx(tmp_path / "hf", "inference", spec, hf_inputs(tiny_lm_dir)))
    from_artifact, from_hf = read_outputs(tmp_path / "ts"), read_outputs(tmp_path / "hf")
    assert result["requests"] == 3 and result["latency_ms_p99"] > 0
    assert [o["output"] for o in from_artifact] == [o["output"] for o in from_hf]
    assert [o["new_tokens"] for o in from_artifact] == [o["new_tokens"] for o in from_hf]


def test_fixed_shape_decoding_refuses_a_prompt_that_does_not_fit_the_compiled_sequence_length(compiled, tmp_path):
    workdir, _ = compiled
    spec = {**INFERENCE_SPEC, "prompts": ["y" * 100], "max_new_tokens": 40}
    inputs = {"model_path": str(workdir / "artifacts" / "model.pt"), "model_format": "torchscript"}
    # Static shapes, as on Neuron: 100 bytes + 40 new tokens do not fit 48 positions;
    # refused with the reason rather than silently cut.
    with pytest.raises(JobFailed) as exc:
        get_backend("cpu").run(make_ctx(tmp_path, "inference", spec, inputs))
    assert exc.value.code == "bad_input" and "sequence_length 48" in exc.value.message


def test_inference_reads_prompts_from_a_jsonl_file(tiny_lm_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "one"}\n\n{"prompt": "two"}\n')
    spec = {**INFERENCE_SPEC, "prompts": None}
    ctx = make_ctx(tmp_path, "inference", spec, {**hf_inputs(tiny_lm_dir), "prompts_path": str(prompts)})
    assert get_backend("cpu").run(ctx)["requests"] == 2
    assert [o["prompt"] for o in read_outputs(tmp_path)] == ["one", "two"]


def test_repeated_small_inference_jobs_reuse_the_loaded_model(tiny_lm_dir, tmp_path, monkeypatch):
    hf.clear_cache()
    threads_before = torch.get_num_threads()
    loads = []
    real_load = hf.load_causal_lm
    monkeypatch.setattr(hf, "load_causal_lm", lambda path: loads.append(path) or real_load(path))
    spec = {**INFERENCE_SPEC, "prompts": ["hi"], "max_new_tokens": 4}
    for i in range(5):
        get_backend("cpu").run(make_ctx(tmp_path / str(i), "inference", spec, hf_inputs(tiny_lm_dir)))
    assert len(loads) == 1
    assert torch.get_num_threads() == threads_before  # the tiny-model 1-thread setting was undone


@pytest.mark.parametrize(
    ("spec_change", "inputs_change", "code", "fragment"),
    [
        ({"prompts": []}, {}, "bad_input", "needs spec 'prompts' or an uploaded prompts file"),
        ({"prompts": "just one string"}, {}, "bad_input", "must be a list of strings"),
        ({"max_new_tokens": 0}, {}, "bad_input", "'max_new_tokens' must be >= 1"),
        ({"temperature": -1}, {}, "bad_input", "'temperature' must be >= 0"),
        ({}, {"model_format": "neuron"}, "unavailable", "neuron backend"),
        ({}, {"model_format": "onnx"}, "bad_input", "format hf or torchscript or neuron"),
        ({}, {"model_format": "torchscript"}, "bad_input", "no compiled artifact"),
        ({"prompts": None}, {"prompts_path": "/nonexistent/prompts.jsonl"}, "bad_input", "does not exist"),
    ],
)
def test_inference_rejects_bad_inputs_with_a_code(tiny_lm_dir, tmp_path, spec_change, inputs_change, code, fragment):
    inputs = {**hf_inputs(tiny_lm_dir), **inputs_change}
    ctx = make_ctx(tmp_path, "inference", {**INFERENCE_SPEC, **spec_change}, inputs)
    with pytest.raises(JobFailed) as info:
        get_backend("cpu").run(ctx)
    assert info.value.code == code
    assert fragment in info.value.message


def test_a_compiled_artifact_without_its_meta_is_bad_input(compiled, tmp_path):
    workdir, _ = compiled
    lonely = tmp_path / "model.pt"
    lonely.write_bytes((workdir / "artifacts" / "model.pt").read_bytes())
    ctx = make_ctx(tmp_path / "job", "inference", INFERENCE_SPEC,
                   {"model_path": str(lonely), "model_format": "torchscript"})
    with pytest.raises(JobFailed, match="compile_meta.json") as info:
        get_backend("cpu").run(ctx)
    assert info.value.code == "bad_input"


# ---------------------------------------------------------------- contract details


def test_an_unknown_job_kind_is_bad_input(tmp_path):
    with pytest.raises(JobFailed) as info:
        get_backend("cpu").run(make_ctx(tmp_path, "distill", {}, {}))
    assert info.value.code == "bad_input"


def test_job_failed_carries_code_and_message():
    exc = JobFailed("oom", "ran out")
    assert (exc.code, exc.message, str(exc)) == ("oom", "ran out", "ran out")
    assert exc.to_dict() == {"code": "oom", "message": "ran out"}
    assert {"bad_input", "cancelled", "oom", "compile_error"} <= FAILURE_CODES


def test_losses_are_downsampled_to_at_most_2000_points_keeping_the_ends():
    values = [float(i) for i in range(5001)]
    points = downsample(values, 2000)
    assert len(points) == 2000 and points[0] == 0.0 and points[-1] == 5000.0
    assert downsample(values[:10], 2000) == values[:10]


def test_percentiles_interpolate_like_numpy():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile(range(101), 95) == 95
