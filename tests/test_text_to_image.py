"""Issue 19, part 5: text-to-image. cpu: a real diffusers Stable Diffusion pipeline
built locally from a tiny configuration with random weights (nothing downloaded),
compiled at a static shape and run at exactly that shape; neuron: Optimum Neuron's
NeuronStableDiffusionPipeline at its seams; the job page's gallery in Chromium."""
from __future__ import annotations

import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from neuron_workers.backends import get_backend, neuron, neuron_env
from neuron_workers.backends.tinydiffusion import create_tiny_pipeline
from tests.test_backend_neuron import XLA_PYTHON, StandInNeuronx, make_ctx

SHAPE = {"task": "text-to-image", "batch_size": 1, "sequence_length": 32, "height": 32, "width": 24,
         "num_images_per_prompt": 2}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return create_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


def compile_images(tmp_path: Path, pipeline_dir: Path) -> Path:
    ctx = make_ctx(tmp_path / "compile", "compile", {**SHAPE, "target": "cpu"},
                   {"model_path": str(pipeline_dir), "model_format": "hf"})
    result = get_backend("cpu").run(ctx)
    assert result["input_shape"] == {"batch_size": 1, "height": 32, "width": 24, "num_images_per_prompt": 2}
    return ctx.artifacts_dir


def test_the_cpu_backend_makes_images_at_the_compiled_shape_with_seeds_and_latency(pipeline_dir, tmp_path):
    artifacts = compile_images(tmp_path, pipeline_dir)
    meta = json.loads((artifacts / "compile_meta.json").read_text())
    assert (meta["height"], meta["width"], meta["num_images_per_prompt"]) == (32, 24, 2)
    ctx = make_ctx(tmp_path / "infer", "inference",
                   {"prompts": ["a red fox", "a blue bird"], "seed": 5, "num_inference_steps": 2},
                   {"model_path": str(artifacts), "model_format": "torchscript"})
    result = get_backend("cpu").run(ctx)
    assert result["images"] == 4 and result["requests"] == 2
    assert [(g["prompt"], g["seed"]) for g in result["gallery"]] == [("a red fox", 5), ("a red fox", 5),
                                                                     ("a blue bird", 6), ("a blue bird", 6)]
    for item in result["gallery"]:
        assert item["latency_ms"] > 0
        with Image.open(ctx.artifacts_dir / item["image"]) as image:
            assert image.size == (24, 32)
    # Same seed, same image: the gallery's seeds reproduce it.
    again = make_ctx(tmp_path / "again", "inference", {"prompts": ["a red fox"], "seed": 5, "num_inference_steps": 2},
                     {"model_path": str(artifacts), "model_format": "torchscript"})
    get_backend("cpu").run(again)
    assert (again.artifacts_dir / "image-0-0.png").read_bytes() == (ctx.artifacts_dir / "image-0-0.png").read_bytes()


class StandInSDPipeline:
    calls: list = []

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        cls.calls.append(("from_pretrained", path, kwargs))
        return cls()

    def __call__(self, prompt, **kwargs):
        type(self).calls.append(("__call__", prompt, sorted(kwargs)))
        return types.SimpleNamespace(images=[Image.new("RGB", (512, 512))] * 4)


def test_the_neuron_backend_runs_optimum_neurons_stable_diffusion_pipeline(monkeypatch, tmp_path):
    optimum = types.ModuleType("optimum.neuron")
    optimum.NeuronStableDiffusionPipeline = StandInSDPipeline
    package = types.ModuleType("optimum")
    package.neuron = optimum
    monkeypatch.setitem(sys.modules, "optimum", package)
    monkeypatch.setitem(sys.modules, "optimum.neuron", optimum)
    monkeypatch.setitem(sys.modules, "torch_neuronx", StandInNeuronx())
    monkeypatch.setattr(neuron_env, "dist_version", lambda name: XLA_PYTHON.get(name))
    artifacts = tmp_path / "artifacts"
    (artifacts / "neuron_model").mkdir(parents=True)
    (artifacts / "compile_meta.json").write_text(json.dumps({
        "task": "text-to-image", "exporter": "optimum-neuron", "artifact": "neuron_model", "batch_size": 1,
        "height": 512, "width": 512, "num_images_per_prompt": 4}))
    ctx = make_ctx(tmp_path / "job", "inference", {"prompts": ["an astronaut"], "seed": 3, "family": "inf2"},
                   {"model_path": str(artifacts), "model_format": "neuron"})
    StandInSDPipeline.calls = []
    result = neuron.NeuronBackend().inference(ctx)
    assert StandInSDPipeline.calls == [
        ("from_pretrained", str(artifacts / "neuron_model"), {}),
        # The shape is compiled in: no height, width or images per prompt at call time.
        ("__call__", "an astronaut", ["generator", "guidance_scale", "num_inference_steps"])]
    assert result["images"] == 4 and result["gallery"][0]["seed"] == 3


@pytest.mark.browser
@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_bob_sees_the_images_with_prompts_seeds_and_latency_and_downloads_one(
        cast, cpu_host, pipeline_dir, celery_worker_proc, live_server, browser):
    from django.conf import settings
    from playwright.sync_api import expect

    from jobs.assets.services import model_register
    from jobs.models import Job
    from tests.conftest import api_client
    from tests.polling import wait_until

    dest = Path(settings.STORAGE_ROOT) / "models" / "vision" / "tiny-sd"
    shutil.copytree(pipeline_dir, dest)
    sd = model_register(team=cast.vision, user=cast.alice, name="tiny-sd", path=dest, meta={"diffusers": True})
    client = api_client(cast.bob)

    def run(body: dict) -> Job:
        response = client.post("/api/v1/jobs", data=json.dumps({"team": "vision", "family": "cpu", "cores": 1, **body}),
                               content_type="application/json")
        assert response.status_code == 201, response.content
        job = wait_until(lambda: Job.objects.get(pk=response.json()["id"]), 180, "the job to finish",
                         until=lambda j: j.is_finished, interval=0.2)
        assert job.status == "succeeded", (job.reason, celery_worker_proc.tail())
        return job

    compiled = run({"kind": "compile", "model": sd.pk, **{k: v for k, v in SHAPE.items() if k != "sequence_length"}})
    job = run({"kind": "inference", "model": compiled.output_model_id, "prompts": ["a red fox", "a blue bird"],
               "seed": 11, "num_inference_steps": 2})
    page = log_in(browser, live_server.url, "bob")
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    items = page.locator("#gallery .gallery-item")
    expect(items).to_have_count(4)
    expect(items.nth(0).locator(".prompt")).to_have_text("a red fox")
    expect(items.nth(2).locator(".seed")).to_have_text("12")
    assert float(items.nth(0).locator(".latency").inner_text()) > 0
    page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth == 24)")
    href = items.nth(3).locator("a:has-text('Download')").get_attribute("href")
    download = page.request.get(f"{live_server.url}{href}")
    assert download.status == 200 and download.body()[:8] == b"\x89PNG\r\n\x1a\n"
    page.screenshot(path=str(SHOTS / "text-to-image-gallery.png"), full_page=True)


from conftest import SHOTS, log_in  # noqa: E402  (the browser helpers, as the other browser tests import them)


def test_a_diffusers_pipeline_zip_uploads_as_a_text_to_image_model(cast, pipeline_dir, tmp_path):
    import io
    import zipfile

    from django.conf import settings
    from django.core.files.uploadedfile import SimpleUploadedFile

    from jobs.models import ModelAsset
    from tests.conftest import api_client

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(pipeline_dir.rglob("*")):
            if path.is_file():
                archive.write(path, f"tiny-sd/{path.relative_to(pipeline_dir)}")
    upload = SimpleUploadedFile("tiny-sd.zip", buffer.getvalue(), content_type="application/zip")
    response = api_client(cast.bob).post("/api/v1/models", data={"team": "vision", "name": "tiny-sd", "file": upload})
    assert response.status_code == 201, response.content
    model = ModelAsset.objects.get(pk=response.json()["id"])
    assert model.meta == {"diffusers": True, "pipeline_class": "StableDiffusionPipeline"}
    assert (Path(settings.STORAGE_ROOT) / model.path / "model_index.json").exists()
