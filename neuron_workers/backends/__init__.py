"""Registry of job backends, imported lazily by dotted path.

Importing this package must stay cheap and side-effect free: the web app and
the runner import it on machines (or in processes) that never run torch. So
nothing here imports torch, transformers or torch_neuronx at import time;
`detect_backend()` only tries the Neuron stack when a Neuron device node exists.

Module map (each module imports only modules listed below it; pyproject.toml's
import-linter contracts check the backends never import each other):

    cpu, neuron          the two backends; neither imports the other
    neuron_train         one fine-tune rank on NeuronCores, and the torchrun entry point
    serve_cpu            the cpu replica: serve_app under uvicorn until stopped, then drained
    serve_neuron         the Neuron replica: optimum-cli neuron serve / vLLM's command line
    serve_app            the OpenAI-compatible HTTP API (Starlette) over the batching engine
    serve_engine         dynamic batching: requests share forward passes (KV cache)
    serve_handoff        a replica's options, free port, health probe, ready/draining records
    neuron_launch        the multi-core torchrun launcher and its file protocol
    neuron_errors        Neuron error text -> failure code; the console tail it reads
    neuron_env           the host's job Python: its Neuron versions (probed without
                         importing the stack), NEURON_RT_VISIBLE_CORES, a rank's core
    compiling            compile steps both backends share, and the host-CPU compile
    inference            inference steps both backends share, and host-CPU inference
    finetuning           fine-tune plan, dataset -> blocks, checkpoint
    artifacts            the compiled artifact's files: written by compile, read by inference
    loops                device-agnostic train and decode loops
    hf                   HF models and tokenizers: loading, the in-process cache, thread count
    data                 datasets and prompts
    base, detect, compiler_options, tinymodel, neuron_matrix   torch-free: the
                         contract, host detection, compiler option checks, the demo
                         model, which job a host's Neuron versions can run
"""

from __future__ import annotations

import importlib

from .base import Backend, JobContext, JobFailed
from .detect import NEURON_DEVICE_GLOB, detect_backend, native_neuron_device_available, neuron_stack_importable

__all__ = ["BACKENDS", "NEURON_DEVICE_GLOB", "Backend", "JobContext", "JobFailed", "backend_class", "detect_backend",
           "get_backend", "native_neuron_device_available", "neuron_stack_importable"]

BACKENDS: dict[str, str] = {
    "cpu": "neuron_workers.backends.cpu:CpuBackend",
    "neuron": "neuron_workers.backends.neuron:NeuronBackend",
}


def backend_class(name: str) -> type[Backend]:
    """Import and return the backend class registered as `name`; ValueError if unknown."""
    try:
        dotted = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}") from None
    module_name, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def get_backend(name: str) -> Backend:
    """A ready-to-run instance of the backend registered as `name`."""
    return backend_class(name)()
