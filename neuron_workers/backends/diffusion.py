"""Text-to-image: the static-shape "compile" of a Stable Diffusion pipeline on the host
CPU, and image generation from a compiled pipeline (cpu: diffusers; neuron: Optimum
Neuron's NeuronStableDiffusionPipeline, driven by the same loop).

As on Neuron, a text-to-image artifact has a static shape: batch size, height, width
and images per prompt are fixed when it is compiled (optimum-neuron
export_model.mdx); inference runs at exactly that shape. On the cpu backend the
compile checks the pipeline generates at that shape and stores it with the shape
in compile_meta.json; diffusers itself would accept other shapes, so the shape is
enforced by NeuronDeck (the inference form has no height or width to give).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .base import JobContext, JobFailed, input_path, percentile, spec_float, spec_int, write_json
from .compiler_options import compile_cache_key
from .data import read_prompts
from .export_options import ExportOptionError, check_export_options
from .tinymodel import model_digest

PIPELINE_DIR = "pipeline"
META_NAME = "compile_meta.json"
GALLERY_LIMIT = 200  # images listed in the job's result (all are in outputs.jsonl and artifacts)


def is_pipeline_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def load_pipeline(path: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def image_compile_meta(model_path: Path) -> dict | None:
    """compile_meta.json of a compiled text-to-image artifact at `model_path`, else None."""
    root = model_path if model_path.is_dir() else model_path.parent
    try:
        meta = json.loads((root / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if meta.get("task") == "text-to-image" else None


def compile_image_on_cpu(ctx: JobContext) -> dict:
    """Check the pipeline generates at the static shape (one denoising step), then store
    it with its shape as artifacts/pipeline + compile_meta.json."""
    try:
        export = check_export_options(ctx.spec, "cpu")
    except ExportOptionError as exc:
        raise JobFailed("bad_input", str(exc)) from exc
    model_path = input_path(ctx, "model_path")
    if not is_pipeline_folder(model_path):
        raise JobFailed("bad_input", "text-to-image needs a diffusers pipeline folder (model_index.json)")
    ctx.check_stop("before compiling")
    started = time.perf_counter()
    pipeline = load_pipeline(model_path)
    out = pipeline(["shape check"] * export.batch_size, height=export.height, width=export.width,
                   num_images_per_prompt=export.num_images_per_prompt, num_inference_steps=1,
                   generator=torch.Generator().manual_seed(0))
    expected = export.batch_size * export.num_images_per_prompt
    sizes = {image.size for image in out.images}
    if len(out.images) != expected or sizes != {(export.width, export.height)}:
        raise JobFailed("compile_error", f"the pipeline made {len(out.images)} images of {sizes}, "
                                         f"expected {expected} of {(export.width, export.height)}")
    shutil.copytree(model_path, ctx.artifacts_dir / PIPELINE_DIR, dirs_exist_ok=True)
    seconds = time.perf_counter() - started
    version = f"torch-{torch.__version__}"
    digest = model_digest(model_path)
    key = compile_cache_key(digest, export.batch_size, export.sequence_length, [], "cpu", version, "cpu",
                            export.key_extras())
    meta = {"task": "text-to-image", "artifact": PIPELINE_DIR, **export.shape(), "backend": "cpu", "target": "cpu",
            "compiler_version": version, "compiler_options": [], "model_digest": digest, "cache_key": key,
            "job_id": ctx.job_id}
    write_json(ctx.artifacts_dir / META_NAME, meta)
    ctx.log(f"text-to-image pipeline checked at {export.shape()} in {seconds:.2f}s")
    return {"artifact": PIPELINE_DIR, "compile_seconds": round(seconds, 4), "backend": "cpu",
            "compiler_version": version, "input_shape": export.shape(), "cache_key": key, "model_digest": digest,
            "compiler_options": [], "meta": META_NAME, "task": "text-to-image"}


def image_settings(ctx: JobContext) -> dict:
    return {"seed": spec_int(ctx.spec, "seed", minimum=0, default=0),
            "num_inference_steps": spec_int(ctx.spec, "num_inference_steps", default=4, maximum=200),
            "guidance_scale": spec_float(ctx.spec, "guidance_scale", default=7.5)}


def generate_images(ctx: JobContext, pipeline: Any, meta: dict, call_shape: dict) -> dict:
    """One call per prompt at the compiled shape (`call_shape`: the keyword arguments the
    pipeline takes for it), seeded seed + index; PNGs saved as artifacts/image-<i>-<k>.png.
    Writes outputs.jsonl; the result lists the gallery (prompt, seed, image, latency)."""
    settings = image_settings(ctx)
    prompts = read_prompts(ctx)
    records, gallery, per_image = [], [], []
    started = time.perf_counter()
    for index, prompt in enumerate(prompts):
        ctx.check_stop(f"before prompt {index}")
        seed = settings["seed"] + index
        t0 = time.perf_counter()
        images = pipeline(prompt, num_inference_steps=settings["num_inference_steps"],
                          guidance_scale=settings["guidance_scale"], generator=torch.Generator().manual_seed(seed),
                          **call_shape).images
        latency = (time.perf_counter() - t0) * 1000
        names = []
        for k, image in enumerate(images):
            name = f"image-{index}-{k}.png"
            image.save(ctx.artifacts_dir / name)
            names.append(name)
            if len(gallery) < GALLERY_LIMIT:
                gallery.append({"index": index, "prompt": prompt, "seed": seed, "image": name,
                                "latency_ms": round(latency / len(images), 3)})
        per_image.extend([latency / max(1, len(images))] * len(images))
        records.append({"index": index, "prompt": prompt, "seed": seed, "images": names,
                        "latency_ms": round(latency, 3), "new_tokens": 0, "output": ", ".join(names)})
        ctx.log(f"prompt {index}: {len(images)} image(s) {meta.get('width')}x{meta.get('height')} "
                f"in {latency:.1f} ms (seed {seed})")
    wall = max(time.perf_counter() - started, 1e-9)
    with (ctx.artifacts_dir / "outputs.jsonl").open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    latencies = [r["latency_ms"] for r in records]
    return {"requests": len(records), "images": len(per_image), "task": "text-to-image",
            "height": meta.get("height"), "width": meta.get("width"),
            "num_images_per_prompt": meta.get("num_images_per_prompt"), **settings,
            "latency_ms_p50": round(percentile(latencies, 50), 3), "latency_ms_p90": round(percentile(latencies, 90), 3),
            "per_image_ms_p50": round(percentile(per_image, 50), 3), "images_per_s": round(len(per_image) / wall, 3),
            "outputs": "outputs.jsonl", "gallery": gallery}


def infer_images_on_cpu(ctx: JobContext, model_path: Path, meta: dict) -> dict:
    root = model_path if model_path.is_dir() else model_path.parent
    pipeline = load_pipeline(root / meta.get("artifact", PIPELINE_DIR))
    return generate_images(ctx, pipeline, meta, {"height": meta["height"], "width": meta["width"],
                                                 "num_images_per_prompt": meta["num_images_per_prompt"]})
