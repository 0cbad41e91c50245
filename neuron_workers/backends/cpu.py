"""The cpu backend: all three job kinds with plain PyTorch, for real, on the host CPU.

compile   = torch.jit.trace of the causal LM (logits only) at a fixed (batch, seq),
            saved as TorchScript: the same artifact shape torch_neuronx.trace
            returns (neuron.md §4.2), so inference code is shared
            (compiling.compile_on_cpu).
finetune  = AdamW steps on the packed dataset, resumable from the job's checkpoints;
            under torchrun (WORLD_SIZE > 1) one data-parallel rank: DDP over gloo,
            a shard of each global batch, rank 0 writes checkpoints and the model
            (save_pretrained).
inference = KV-cache decoding of an HF model, or fixed-shape decoding of a
            compiled artifact (inference.infer_on_cpu).
serve     = an endpoint's replica: the OpenAI-compatible server with dynamic
            batching (serve_cpu), until cancelled.

The neuron backend runs the same compile and inference functions for work that
stays on the host CPU, which is why they live in shared modules and not here.
"""

from __future__ import annotations

import gc
from pathlib import Path

from . import distributed, hf
from .base import Backend, JobContext, JobFailed, spec_int
from .checkpoints import seed_rng
from .compiling import compile_on_cpu
from .diffusion import compile_image_on_cpu, image_compile_meta, infer_images_on_cpu
from .finetuning import checkpointing, finetune_plan, prepare_training, save_checkpoint, stage
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
        """AdamW on the packed dataset, resumed from the job's newest checkpoint; the
        model (+ tokenizer) saved to artifacts/checkpoint by rank 0."""
        ranks = distributed.ranks_from_env()
        plan = finetune_plan(ctx)
        if plan["batch_size"] % ranks.world_size:
            raise JobFailed("bad_input", f"batch_size {plan['batch_size']} must divide evenly over "
                                         f"{ranks.world_size} data-parallel ranks")
        main = ranks.is_main
        if not main:  # one voice per job: rank 0 logs and reports its stages
            ctx.log = _quiet

        def note(name: str, state: str, message: str = "") -> None:
            if main:
                stage(ctx, name, state, message)

        note("prepare", "started")
        if ranks.distributed:
            distributed.init_gloo(ranks)
            ctx.log(f"data-parallel rank {ranks.rank} of {ranks.world_size} (gloo)")
        model, tokenizer = hf.owned_hf_model(plan["model_path"])
        blocks, total_steps = prepare_training(ctx, model, tokenizer, plan)
        seed_rng(plan["seed"])  # every generator a checkpoint saves
        note("prepare", "done")
        # Nothing is compiled ahead of training on the CPU; the stage is shown so
        # both backends read alike (the neuron backend runs neuron_parallel_compile).
        note("precompile", "skipped", "precompile: skipped (the cpu backend compiles nothing ahead)")
        # Small models train fastest on one thread: OpenMP fan-out costs more than
        # it saves on their tiny matmuls. For the rest, the job's core allocation
        # is its CPU thread budget.
        threads = hf.small_model_threads(plan["model_path"]) or spec_int(ctx.spec, "cores", default=None)
        hooks = TrainHooks(is_main=main, rank=ranks.rank, world_size=ranks.world_size)
        trained = model
        if ranks.distributed:
            from torch.nn.parallel import DistributedDataParallel

            trained = DistributedDataParallel(model)
            hooks = TrainHooks(is_main=main, rank=ranks.rank, world_size=ranks.world_size, shard_batches=True,
                               **distributed.agreement())
        note("train", "started")
        try:
            with hf.torch_threads(threads):
                stats = train_steps(ctx, trained, blocks, total_steps=total_steps, batch_size=plan["batch_size"],
                                    learning_rate=plan["learning_rate"], seed=plan["seed"], hooks=hooks,
                                    checkpointing=checkpointing(ctx, plan), lr_schedule=plan["lr_schedule"])
            note("train", "done")
            if main:
                note("save", "started")
                save_checkpoint(ctx, model, tokenizer)
                note("save", "done")
            if ranks.distributed:
                distributed.barrier()  # the job is done when rank 0 has saved the model
        finally:
            if ranks.distributed:
                # DDP's reducer holds the process group: it is freed before the group is
                # destroyed, not when this function returns, after it.
                trained = hooks = None
                gc.collect()
                distributed.shutdown()
        return {**stats.result(), "checkpoint": "checkpoint", "backend": "cpu", "world_size": ranks.world_size,
                "rank": ranks.rank}

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


def _quiet(_: str) -> None:
    return None
