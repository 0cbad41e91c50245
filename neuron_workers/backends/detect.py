"""Which backend this host can run: the Neuron device nodes and whether the Neuron stack imports.

Cheap and torch-free at import: the registry re-exports these for the web app and
the runner. torch and torch_neuronx are imported inside the probes, and only
`detect_backend` decides when probing is worth it.
"""

from __future__ import annotations

import glob
import importlib

# Device nodes created by the aws-neuronx-dkms driver, one per Neuron device.
NEURON_DEVICE_GLOB = "/dev/neuron*"


def neuron_devices_present() -> bool:
    """True if at least one /dev/neuron* node exists."""
    return bool(glob.glob(NEURON_DEVICE_GLOB))


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
    if neuron_devices_present() and neuron_stack_importable():
        return "neuron"
    return "cpu"
