"""The cpu backend: all three job kinds with plain PyTorch, for real, on the host CPU.

compile   = torch.jit.trace of the causal LM (logits only) at a fixed (batch, seq),
            saved as TorchScript: the same artifact shape torch_neuronx.trace
            returns (neuron.md §4.2), so inference code is shared
            (compiling.compile_on_cpu).
finetune  = AdamW steps on the packed dataset, checkpoint via save_pretrained.
inference = KV-cache decoding of an HF model, or fixed-shape decoding of a
            compiled artifact (inference.infer_on_cpu).
serve     = an endpoint's replica: the OpenAI-compatible server with dynamic
            batching (serve_cpu), until cancelled.

The neuron backend runs the same compile and inference functions for work that
stays on the host CPU, which is why they live in shared modules and not here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import hf
from .base import Backend, JobContext, spec_int
from .compiling import compile_on_cpu
from .diffusion import compile_image_on_cpu, image_compile_meta, infer_images_on_cpu
from .finetuning import finetune_plan, prepare_training, save_checkpoint
from .inference import infer_on_cpu
from .loops import TrainHooks, train_steps
from .serve_cpu import serve_on_cpu


class CpuBackend(Backend):
    """Runs every job kind on the CPU with torch; always available where torch imports."""

    name = "cpu"

    @classmethod
    def available(cls) -> bool:
        return True

    @classmethod
    def zygote_preload(cls, kind: str, inputs: dict) -> bool:
        """Inference and fine-tune jobs on an HF folder: its model and tokenizer
        (bounded by hf's cache limits). A fine-tune child trains its own
        copy-on-write copy (hf.owned_hf_model), never the zygote's."""
        path = inputs.get("model_path")
        if kind not in ("inference", "finetune", "serve") or (inputs.get("model_format") or "hf") != "hf" or not path:
            return False
        if not Path(path).is_dir():
            return False
        return hf.preload_hf(Path(path))

    def reusable_process(self, kind: str) -> bool:
        """Inference only reads the cached model and tokenizer (hf.cached_hf_model,
        artifacts.load_compiled) and restores the thread count it changed
        (hf.torch_threads). A fine-tune takes the cached model for itself
        (hf.take_owned) and a compile traces into it, so both end their process."""
        return kind == "inference"

    def compile(self, ctx: JobContext) -> dict:
        """Trace to artifacts/model.pt, checked against eager (see compiling.compile_on_cpu);
        text-to-image: the pipeline checked and stored at its static shape (diffusion)."""
        if ctx.spec.get("task") == "text-to-image":
            return compile_image_on_cpu(ctx)
        return compile_on_cpu(ctx)

    def finetune(self, ctx: JobContext) -> dict:
        """AdamW on the packed dataset; checkpoint (+ tokenizer) saved to artifacts/checkpoint."""
        plan = finetune_plan(ctx)
        model, tokenizer = hf.owned_hf_model(plan["model_path"])
        blocks, total_steps = prepare_training(ctx, model, tokenizer, plan)
        torch.manual_seed(plan["seed"])
        # Small models train fastest on one thread: OpenMP fan-out costs more than
        # it saves on their tiny matmuls. For the rest, the job's core allocation
        # is its CPU thread budget.
        threads = hf.small_model_threads(plan["model_path"]) or spec_int(ctx.spec, "cores", default=None)
        with hf.torch_threads(threads):
            stats = train_steps(ctx, model, blocks, total_steps=total_steps, batch_size=plan["batch_size"],
                                learning_rate=plan["learning_rate"], seed=plan["seed"], hooks=TrainHooks())
        save_checkpoint(ctx, model, tokenizer)
        return {**stats.result(), "checkpoint": "checkpoint", "backend": "cpu"}

    def inference(self, ctx: JobContext) -> dict:
        """Generate for every prompt; writes artifacts/outputs.jsonl (see inference.infer_on_cpu);
        a compiled text-to-image pipeline makes images at its compiled shape (diffusion)."""
        if ctx.inputs.get("model_path") and (ctx.inputs.get("model_format") or "hf") != "hf":
            meta = image_compile_meta(Path(ctx.inputs["model_path"]))
            if meta is not None:
                return infer_images_on_cpu(ctx, Path(ctx.inputs["model_path"]), meta)
        return infer_on_cpu(ctx)

    def serve(self, ctx: JobContext) -> dict:
        """The replica server on a free port until cancelled, then drained (see serve_cpu)."""
        return serve_on_cpu(ctx)
