"""A backend for the zygote model-cache tests, loaded as ``tests.cache_backends:ProbeBackend``.

It preloads like the cpu backend (it is one) and reports what the job child found:
whether the model was already in the inherited cache, a checksum of the weights
it got, and the cache's size. Its "finetune" changes every weight in place, the
worst a real fine-tune can do to a model object.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from neuron_workers.backends import hf
from neuron_workers.backends.base import JobContext
from neuron_workers.backends.cpu import CpuBackend


def weights_checksum(model) -> float:
    """Sum of all weights in float64: equal for equal tensors, computed the same way."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))


class ProbeBackend(CpuBackend):
    def inference(self, ctx: JobContext) -> dict:
        path = Path(ctx.inputs["model_path"])
        was_cached = hf.is_cached("hf-model", path)
        model, _ = hf.cached_hf_model(path)
        return {"was_cached": was_cached, "checksum": weights_checksum(model), "pid": os.getpid(),
                "cache": hf.cache_info(), "storage_ptr": model.transformer.wte.weight.data_ptr()}

    def finetune(self, ctx: JobContext) -> dict:
        path = Path(ctx.inputs["model_path"])
        was_cached = hf.is_cached("hf-model", path)
        model, _ = hf.owned_hf_model(path)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        return {"was_cached": was_cached, "checksum": weights_checksum(model),
                "still_cached": hf.is_cached("hf-model", path)}
