"""Registry of job backends, imported lazily by dotted path.

Importing this package must stay cheap and side-effect free: the web app and
the runner import it on machines (or in processes) that never run torch. So
nothing here imports torch, transformers or torch_neuronx at import time;
`detect_backend()` only tries the Neuron stack when a Neuron device node exists.
"""

from __future__ import annotations

import glob
import importlib

from .base import Backend, JobContext, JobFailed

__all__ = ["BACKENDS", "Backend", "JobContext", "JobFailed", "detect_backend", "get_backend", "neuron_stack_importable"]

BACKENDS: dict[str, str] = {
    "cpu": "neuron_workers.backends.cpu:CpuBackend",
    "neuron": "neuron_workers.backends.neuron:NeuronBackend",
}

# Device nodes created by the aws-neuronx-dkms driver, one per Neuron device.
NEURON_DEVICE_GLOB = "/dev/neuron*"


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


def neuron_stack_importable() -> bool:
    """True if torch_neuronx imports, or torch exposes the native "neuron" device.

    A real import, not importlib.util.find_spec: the PyPI `torch-neuronx` is a
    placeholder whose __init__ raises ImportError (neuron.md §4.1), so "the module
    exists" is not "the stack works".
    """
    try:
        importlib.import_module("torch_neuronx")
        return True
    except Exception:  # the placeholder raises ImportError; broken installs raise anything
        pass
    return native_neuron_device_available()


def native_neuron_device_available() -> bool:
    """True if torch has a usable native "neuron" device (TorchNeuron, Neuron SDK >= 2.32).

    UNCONFIRMED (neuron.md §4.6): the exact probe. TorchNeuron registers a
    PrivateUse1 backend named "neuron"; we accept either a `torch.neuron` module
    reporting is_available() or torch.device("neuron") constructing at all.
    """
    try:
        import torch
    except Exception:
        return False
    module = getattr(torch, "neuron", None)
    is_available = getattr(module, "is_available", None)
    if callable(is_available):
        try:
            return bool(is_available())
        except Exception:
            return False
    try:
        torch.device("neuron")
        return True
    except (RuntimeError, ValueError):
        return False


def detect_backend() -> str:
    """"neuron" when a /dev/neuron* node exists AND the Neuron stack imports; else "cpu".

    The device check comes first because it is free, and importing torch_neuronx
    on a CPU host would cost seconds for nothing.
    """
    if glob.glob(NEURON_DEVICE_GLOB) and neuron_stack_importable():
        return "neuron"
    return "cpu"
