"""Issue 19, part 1: the options of `optimum-cli export neuron` reach the backends.

neuron: the exact arguments given to a stand-in optimum.neuron (the real API:
get_neuron_config + export for decoders, from_pretrained(export=True, ...) for
encoders and Stable Diffusion). cpu: the shape traced is the one asked for, and an
inference that does not fit the compiled shape is a 400 at submit (and bad_input
on the host)."""
from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from neuron_workers.backends import JobFailed, neuron, neuron_env
from neuron_workers.backends.compiler_options import compile_cache_key
from neuron_workers.backends.compiling import compile_on_cpu
from neuron_workers.backends.export_options import (
    ExportOptionError,
    check_export_options,
    optimum_export_call,
    valid_tensor_parallel_sizes,
)
from neuron_workers.backends.inference import infer_on_cpu
from neuron_workers.backends.tinymodel import create_tiny_model
from tests.test_backend_neuron import XLA_PYTHON, StandInNeuronx, make_ctx

# ---------------------------------------------------------------- pure rules


def test_tensor_parallel_sizes_follow_the_familys_instance_types():
    assert valid_tensor_parallel_sizes("inf2") == [1, 2, 3, 4, 6, 8, 12, 24]
    assert valid_tensor_parallel_sizes("trn1") == [1, 2, 4, 8, 16, 32]
    with pytest.raises(ExportOptionError) as exc:
        check_export_options({"tensor_parallel_size": 5}, "inf2")
    assert exc.value.field == "tensor_parallel_size" and "inf2.48xlarge (24)" in str(exc.value)


def test_the_cpu_backend_refuses_what_it_cannot_compile_for_real():
    for spec, field in (({"task": "feature-extraction"}, "task"), ({"tensor_parallel_size": 2}, "tensor_parallel_size"),
                        ({"auto_cast": "matmul"}, "auto_cast")):
        with pytest.raises(ExportOptionError) as exc:
            check_export_options(spec, "cpu")
        assert exc.value.field == field


def test_image_sides_must_be_multiples_of_eight():
    with pytest.raises(ExportOptionError) as exc:
        check_export_options({"task": "text-to-image", "height": 60, "width": 64, "num_images_per_prompt": 1}, "inf2")
    assert exc.value.field == "height"


def test_every_export_option_changes_the_cache_key_and_defaults_keep_old_keys():
    def key(spec: dict) -> str:
        return compile_cache_key("d" * 64, 1, 32, [], "neuron", "v", "inf2", check_export_options(spec, "inf2").key_extras())

    plain = compile_cache_key("d" * 64, 1, 32, [], "neuron", "v", "inf2")
    assert key({}) == plain == key({"task": "text-generation", "tensor_parallel_size": 1, "auto_cast": "none"})
    image = {"task": "text-to-image", "height": 64, "width": 64, "num_images_per_prompt": 1}
    encoder = {"task": "feature-extraction"}
    variants = [{"tensor_parallel_size": 2}, {**encoder, "auto_cast": "matmul"},
                {**encoder, "auto_cast": "matmul", "auto_cast_type": "fp16"},
                encoder, image, {**image, "height": 72}, {**image, "num_images_per_prompt": 2}]
    keys = {key(v) for v in variants}
    assert len(keys) == len(variants) and plain not in keys


def test_optimum_call_for_a_decoder_is_get_neuron_config_then_export():
    opts = check_export_options({"batch_size": 4, "sequence_length": 128, "tensor_parallel_size": 2}, "trn1")
    assert optimum_export_call(opts, "trn1", []) == (
        "NeuronModelForCausalLM", "export",
        {"batch_size": 4, "sequence_length": 128, "tensor_parallel_size": 2, "instance_type": "trn1"})


# ---------------------------------------------------------------- neuron backend at its seams


class StandInOptimumNeuron(types.ModuleType):
    """optimum.neuron's export entry points, recording their arguments; save_pretrained
    writes a folder as the real classes do."""

    def __init__(self) -> None:
        super().__init__("optimum.neuron")
        self.calls: list[tuple[str, str, tuple, dict]] = []
        for name in ("NeuronModelForCausalLM", "NeuronModelForFeatureExtraction",
                     "NeuronModelForSequenceClassification", "NeuronStableDiffusionPipeline"):
            setattr(self, name, self._class(name))

    def _class(self, name: str):
        calls = self.calls

        class Exported:
            def save_pretrained(self, path):
                Path(path).mkdir(parents=True, exist_ok=True)
                (Path(path) / "model.neuron").write_bytes(b"NEFF")
                calls.append((name, "save_pretrained", (path,), {}))

        class StandIn:
            @classmethod
            def get_neuron_config(cls, model_name_or_path, config=None, token=None, revision=None,
                                  instance_type=None, batch_size=None, sequence_length=None,
                                  tensor_parallel_size=None, prefill_chunk_size=None):
                """The real signature (optimum-neuron 0.4.6, models/inference/modeling_utils.py):
                anything else, auto_cast included, is a TypeError as it would be there."""
                kwargs = {k: v for k, v in (("instance_type", instance_type), ("batch_size", batch_size),
                                            ("sequence_length", sequence_length),
                                            ("tensor_parallel_size", tensor_parallel_size)) if v is not None}
                calls.append((name, "get_neuron_config", (model_name_or_path,), kwargs))
                return {"neuron_config": kwargs}

            @classmethod
            def export(cls, model_id, **kwargs):
                calls.append((name, "export", (model_id,), kwargs))
                return Exported()

            @classmethod
            def from_pretrained(cls, model_id, **kwargs):
                calls.append((name, "from_pretrained", (model_id,), kwargs))
                return Exported()

        return StandIn


@pytest.fixture
def optimum(monkeypatch):
    fake = StandInOptimumNeuron()
    package = types.ModuleType("optimum")
    package.neuron = fake
    monkeypatch.setitem(sys.modules, "optimum", package)
    monkeypatch.setitem(sys.modules, "optimum.neuron", fake)
    monkeypatch.setitem(sys.modules, "torch_neuronx", StandInNeuronx())
    monkeypatch.setattr(neuron_env, "dist_version", lambda name: XLA_PYTHON.get(name))
    monkeypatch.delenv("NEURON_PLATFORM_TARGET_OVERRIDE", raising=False)
    return fake


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-gpt")


def neuron_compile(tmp_path: Path, model_dir: Path, spec: dict):
    ctx = make_ctx(tmp_path / "job", "compile", {"batch_size": 1, "sequence_length": 32, "target": "trn1", **spec},
                   {"model_path": str(model_dir), "model_format": "hf"})
    return ctx, neuron.NeuronBackend().compile(ctx)


def test_a_text_generation_export_reaches_optimum_neuron_with_exact_arguments(optimum, lm_dir, tmp_path):
    ctx, result = neuron_compile(tmp_path, lm_dir, {"task": "text-generation", "batch_size": 2, "sequence_length": 64,
                                                     "tensor_parallel_size": 8})
    assert optimum.calls[:2] == [
        ("NeuronModelForCausalLM", "get_neuron_config", (str(lm_dir),),
         {"batch_size": 2, "sequence_length": 64, "tensor_parallel_size": 8, "instance_type": "trn1"}),
        ("NeuronModelForCausalLM", "export", (str(lm_dir),),
         {"neuron_config": {"neuron_config": {"batch_size": 2, "sequence_length": 64, "tensor_parallel_size": 8,
                                              "instance_type": "trn1"}}, "load_weights": False}),
    ]
    assert optimum.calls[2][1] == "save_pretrained"
    assert (ctx.artifacts_dir / "neuron_model" / "model.neuron").exists()
    meta = json.loads((ctx.artifacts_dir / "compile_meta.json").read_text())
    assert meta["tensor_parallel_size"] == 8 and meta["batch_size"] == 2 and meta["sequence_length"] == 64
    assert result["cache_key"] == meta["cache_key"] and result["exporter"] == "optimum-neuron"
    import os
    assert os.environ["NEURON_PLATFORM_TARGET_OVERRIDE"] == "trn1"


def test_an_encoder_export_passes_auto_cast_and_shapes_to_from_pretrained(optimum, lm_dir, tmp_path):
    neuron_compile(tmp_path, lm_dir, {"task": "feature-extraction", "batch_size": 4, "sequence_length": 16,
                                      "auto_cast": "matmul", "auto_cast_type": "fp16", "compiler_options": ["-O3"]})
    assert optimum.calls[0] == ("NeuronModelForFeatureExtraction", "from_pretrained", (str(lm_dir),),
                                {"export": True, "instance_type": "trn1", "tensor_parallel_size": 1, "batch_size": 4,
                                 "auto_cast": "matmul", "auto_cast_type": "fp16", "optlevel": "3",
                                 "sequence_length": 16})


def test_a_stable_diffusion_export_passes_height_width_and_images_per_prompt(optimum, lm_dir, tmp_path):
    neuron_compile(tmp_path, lm_dir, {"task": "text-to-image", "height": 512, "width": 768,
                                      "num_images_per_prompt": 4, "auto_cast": "matmul", "auto_cast_type": "bf16"})
    assert optimum.calls[0] == ("NeuronStableDiffusionPipeline", "from_pretrained", (str(lm_dir),),
                                {"export": True, "instance_type": "trn1", "tensor_parallel_size": 1, "batch_size": 1,
                                 "auto_cast": "matmul", "auto_cast_type": "bf16", "height": 512, "width": 768,
                                 "num_images_per_prompt": 4})


def test_auto_cast_for_a_decoder_export_is_refused_with_the_reason():
    """Optimum Neuron's decoder export has no auto-cast: refused rather than silently ignored."""
    for family in ("inf2", "trn1", "trn2"):
        with pytest.raises(ExportOptionError) as exc:
            check_export_options({"task": "text-generation", "auto_cast": "matmul", "auto_cast_type": "bf16"}, family)
        assert exc.value.field == "auto_cast" and "checkpoint's own dtype" in str(exc.value)
    assert check_export_options({"task": "text-generation", "auto_cast": "none"}, "inf2").auto_cast == "none"
    assert check_export_options({"task": "feature-extraction", "auto_cast": "all"}, "inf2").auto_cast == "all"


def test_a_decoder_compile_with_auto_cast_fails_before_optimum_is_touched(optimum, lm_dir, tmp_path):
    with pytest.raises(JobFailed) as exc:
        neuron_compile(tmp_path, lm_dir, {"task": "text-generation", "auto_cast": "matmul"})
    assert exc.value.code == "bad_input" and "no auto-cast" in str(exc.value) and not optimum.calls


def test_a_bad_tensor_parallel_size_fails_before_optimum_is_touched(optimum, lm_dir, tmp_path):
    with pytest.raises(JobFailed) as exc:
        neuron_compile(tmp_path, lm_dir, {"task": "text-generation", "tensor_parallel_size": 3})
    assert exc.value.code == "bad_input" and not optimum.calls


# ---------------------------------------------------------------- cpu backend: static shapes for real


def cpu_compile(tmp_path: Path, model_dir: Path, batch: int, seq: int) -> tuple[Path, dict]:
    ctx = make_ctx(tmp_path / f"c{batch}x{seq}", "compile",
                   {"batch_size": batch, "sequence_length": seq, "task": "text-generation", "target": "cpu"},
                   {"model_path": str(model_dir), "model_format": "hf"})
    return ctx.artifacts_dir, compile_on_cpu(ctx)


def test_the_cpu_compile_traces_the_asked_batch_and_length(lm_dir, tmp_path):
    artifacts, result = cpu_compile(tmp_path, lm_dir, 2, 12)
    assert result["input_shape"] == [2, 12]
    traced = torch.jit.load(str(artifacts / "model.pt"))
    assert traced(torch.zeros(2, 12, dtype=torch.long)).shape[:2] == (2, 12)
    meta = json.loads((artifacts / "compile_meta.json").read_text())
    assert (meta["batch_size"], meta["sequence_length"]) == (2, 12)


def test_cpu_inference_refuses_a_prompt_longer_than_the_compiled_shape(lm_dir, tmp_path):
    artifacts, _ = cpu_compile(tmp_path, lm_dir, 1, 12)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a prompt far longer than twelve bytes"}) + "\n")
    ctx = make_ctx(tmp_path / "infer", "inference", {"max_new_tokens": 2},
                   {"model_path": str(artifacts), "model_format": "torchscript", "prompts_path": str(prompts)})
    with pytest.raises(JobFailed) as exc:
        infer_on_cpu(ctx)
    assert exc.value.code == "bad_input" and "sequence_length 12" in exc.value.message


# ---------------------------------------------------------------- submit: the form and the API


def post(client, body):
    return client.post("/api/v1/jobs", data=json.dumps(body), content_type="application/json")


def test_export_options_are_stored_on_the_spec_and_checked_per_family(cast, tiny_model, cpu_host):
    from tests.conftest import api_client

    client = api_client(cast.bob)
    body = {"team": "vision", "kind": "compile", "family": "cpu", "cores": 1, "model": tiny_model.pk,
            "batch_size": 2, "sequence_length": 16, "task": "text-generation"}
    doc = post(client, body).json()
    assert doc["spec"]["task"] == "text-generation" and doc["spec"]["tensor_parallel_size"] == 1
    refused = post(client, {**body, "family": "inf2", "cores": 8, "tensor_parallel_size": 5})
    assert refused.status_code == 400 and "tensor_parallel_size" in refused.content.decode()
    refused = post(client, {**body, "task": "feature-extraction"})
    assert refused.status_code == 400 and "cpu backend" in refused.json()["detail"]


def test_a_decoder_compile_with_auto_cast_is_refused_at_submit_naming_the_field(cast, tiny_model, cpu_host):
    from jobs.models import Host, Job
    from tests.conftest import api_client

    Host.objects.create(name="inf2-a", family="inf2", core_ids=list(range(24)), backend="neuron",
                        memory_bytes=8 << 30)
    body = {"team": "vision", "kind": "compile", "family": "inf2", "cores": 2, "model": tiny_model.pk,
            "batch_size": 1, "sequence_length": 16, "task": "text-generation", "auto_cast": "matmul",
            "auto_cast_type": "bf16"}
    for url in ("/api/v1/jobs?dry_run=true", "/api/v1/jobs"):
        refused = api_client(cast.bob).post(url, data=json.dumps(body), content_type="application/json")
        assert refused.status_code == 400, refused.content
        assert "auto_cast" in refused.json()["errors"] and "checkpoint's own dtype" in refused.content.decode()
    assert not Job.objects.exists()


def test_an_inference_that_does_not_fit_the_compiled_shape_is_a_400_naming_the_prompt(cast, tiny_model, cpu_host,
                                                                                       tmp_path):
    from django.conf import settings

    from jobs.assets.services import model_register
    from jobs.models import ModelAsset
    from tests.conftest import api_client

    artifacts, _ = cpu_compile(tmp_path, Path(settings.STORAGE_ROOT) / tiny_model.path, 1, 12)
    dest = Path(settings.STORAGE_ROOT) / "models" / "vision" / "compiled"
    shutil.copytree(artifacts, dest)
    compiled = model_register(team=cast.vision, user=cast.alice, name="tiny-cpu", path=dest,
                              meta={"batch_size": 1, "sequence_length": 12}, fmt=ModelAsset.Format.TORCHSCRIPT)
    client = api_client(cast.bob)
    body = {"team": "vision", "kind": "inference", "family": "cpu", "cores": 1, "model": compiled.pk,
            "prompts": ["hi", "a prompt far longer than twelve bytes"], "max_new_tokens": 2}
    response = post(client, body)
    assert response.status_code == 400
    assert "prompt 2" in response.content.decode() and "sequence_length 12" in response.content.decode()
    assert post(client, {**body, "prompts": ["hi"]}).status_code == 201


class StandInCausalLM:
    """optimum.neuron.NeuronModelForCausalLM as inference sees it: from_pretrained(folder)
    and generate(), appending fixed tokens (here 'x' = byte 120 + 3) to the prompt."""

    calls: list = []

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        cls.calls.append(("from_pretrained", path, kwargs))
        return cls()

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        type(self).calls.append(("generate", tuple(input_ids.shape), max_new_tokens, kwargs))
        return torch.cat([input_ids, torch.full((1, max_new_tokens), 123, dtype=torch.long)], dim=1)


def test_an_optimum_text_generation_export_is_run_with_generate_at_its_static_shape(optimum, lm_dir, tmp_path):
    ctx, _ = neuron_compile(tmp_path, lm_dir, {"task": "text-generation", "sequence_length": 16})
    assert (ctx.artifacts_dir / "neuron_model" / "tokenizer_config.json").exists()  # saved beside the export
    optimum.NeuronModelForCausalLM = StandInCausalLM
    StandInCausalLM.calls = []
    infer = make_ctx(tmp_path / "infer", "inference", {"prompts": ["hi"], "max_new_tokens": 3, "family": "trn1"},
                     {"model_path": str(ctx.artifacts_dir), "model_format": "neuron"})
    result = neuron.NeuronBackend().inference(infer)
    assert StandInCausalLM.calls == [("from_pretrained", str(ctx.artifacts_dir / "neuron_model"), {}),
                                     ("generate", (1, 2), 3, {"do_sample": False})]
    assert result["requests"] == 1 and result["new_tokens"] == 3
    too_long = make_ctx(tmp_path / "long", "inference", {"prompts": ["a prompt longer than sixteen"],
                                                         "max_new_tokens": 3, "family": "trn1"},
                        {"model_path": str(ctx.artifacts_dir), "model_format": "neuron"})
    with pytest.raises(JobFailed) as exc:
        neuron.NeuronBackend().inference(too_long)
    assert exc.value.code == "bad_input" and "sequence_length 16" in exc.value.message


def test_an_encoder_artifact_is_refused_for_inference_at_submit(cast, tiny_model, cpu_host):
    from django.conf import settings

    from jobs.assets.services import model_register
    from jobs.models import ModelAsset
    from tests.conftest import api_client

    encoder = model_register(team=cast.vision, user=cast.alice, name="tiny-fe",
                             path=Path(settings.STORAGE_ROOT) / tiny_model.path,
                             digest="e" * 64, meta={"task": "feature-extraction", "batch_size": 1,
                                                    "sequence_length": 16}, fmt=ModelAsset.Format.NEURON)
    response = post(api_client(cast.bob), {"team": "vision", "kind": "inference", "family": "cpu", "cores": 1,
                                           "model": encoder.pk, "prompts": ["hi"], "max_new_tokens": 2})
    assert response.status_code == 400 and "feature-extraction artifact" in response.content.decode()
