"""Which Neuron job a host can run, from the versions its job Python reports: pure rules.

The web app asks at submit (a job no host of the family can run is refused with the
reason), and the neuron backend asks again in the job process before it touches the
Neuron stack. Torch-free, Django-free, no I/O.

The matrix, from the Neuron release notes and announcements (neuron.md §0):

- torch_neuronx.trace and the torch-xla training path exist only in the XLA-based
  torch-neuronx, whose last PyTorch is 2.9; PyTorch 2.10 and later is the native
  TorchNeuron backend, torch.device("neuron")
  [SDK about-neuron/announcements/neuron2.x/announce-transition-pytorch-trainium.rst].
- PyTorch/XLA training is unsupported from Neuron 2.30
  [SDK …/announce-no-support-pytorch-xla-training.rst]; XLA inference on Inf2/Trn1
  stays on PyTorch 2.9 in maintenance from 2.31
  [SDK …/announce-maintenance-pytorch-xla-inference.rst].
- TorchNeuron native supports Trn2 and Trn3 only, public (beta) from Neuron 2.33
  [docs torch/get-started/quickstart-torch-neuron; torch-neuronx release v2.33.0].
- Trn2 logical cores: the compiler's logical-nc-config must equal the runtime's
  NEURON_LOGICAL_NC_CONFIG [SDK about-neuron/arch/neuron-features/logical-neuroncore-config.rst].
- Collective jobs on trn1 use 1, 2, 8 or 32 cores, starting at a multiple of their
  size [SDK archive/nxd-training/torch-neuron-envvars.rst]; placement aligns them
  (jobs.quotas.placement), submit refuses other sizes.

A host that has reported nothing (registered before its agent probed the job
Python) is not refused here: nothing is known against it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

XLA = "xla"
NATIVE = "native"

LAST_XLA_TORCH = (2, 9)
NO_XLA_TRAINING_FROM_SDK = (2, 30)
NATIVE_FROM_SDK = (2, 33)
NATIVE_FAMILIES = ("trn2", "trn3")
TRN1_COLLECTIVE_SIZES = (1, 2, 8, 32)
DEFAULT_TRN2_LNC = 2  # neuron.md §3, logical-neuroncore-config.rst

_NUMBERS = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass(frozen=True)
class Refusal:
    """Why a job cannot run: a reason code, a sentence, and the form field at fault (or None)."""

    code: str
    message: str
    field: str | None = None


def version_tuple(text: str | None) -> tuple[int, ...] | None:
    """(2, 9, 0) for "2.9.0+cpu" or "2.9.0.2.15.32035"; None when there is no leading number."""
    match = _NUMBERS.match((text or "").strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else None


def framework_path(torch_version: str | None) -> str | None:
    """"xla" for PyTorch <= 2.9 (torch-neuronx on torch-xla), "native" for 2.10 and later
    (TorchNeuron), None without torch."""
    version = version_tuple(torch_version)
    if version is None:
        return None
    return XLA if version[:2] <= LAST_XLA_TORCH else NATIVE


def trn1_collective_size_ok(cores: int) -> bool:
    return cores in TRN1_COLLECTIVE_SIZES


def compile_lnc(options: Iterable[str]) -> int | None:
    """The logical-nc-config a list of validated options asks for (canonical form
    "--logical-nc-config=N", compiler_options.validate_compiler_options), else None."""
    for option in options:
        name, _, value = option.partition("=")
        if name == "--logical-nc-config" and value.isdigit():
            return int(value)
    return None


def job_refusal(kind: str, family: str, cores: int, software: Mapping[str, Any] | None, *,
                model_format: str = "hf", compiler_options: Iterable[str] = (), model_lnc: int | None = None,
                host_lnc: int | None = None) -> Refusal | None:
    """Why a host of `family` whose job Python reported `software` cannot run this job, or None.

    `software` is neuron_env.probe()'s report (empty or None: unknown, nothing refused
    for it). `family` "" is unknown (a job process told nothing): the rules that
    depend on the family are skipped. `model_format` is the input model's format ("neuron": a traced artifact);
    `model_lnc` the logical-nc-config it was compiled for; `host_lnc` the LNC the host
    runs at (neuron-ls), None off Trn2.
    """
    if family == "cpu":
        return None
    if family == "trn1" and kind == "finetune" and not trn1_collective_size_ok(cores):
        return Refusal("collective_size", f"a fine-tune on trn1 runs on 1, 2, 8 or 32 NeuronCores (collectives "
                                          f"need an aligned group of one of those sizes), not {cores}", "cores")
    refusal = _lnc_refusal(kind, family, model_format, compiler_options, model_lnc, host_lnc)
    if refusal is not None or not software:
        return refusal
    return _software_refusal(kind, family, software, model_format)


def _software_refusal(kind: str, family: str, software: Mapping[str, Any], model_format: str) -> Refusal | None:
    packages = software.get("packages") or {}
    torch = packages.get("torch")
    hosts = f"the {family} hosts'" if family else "this host's"
    python = f"{hosts} job Python ({software.get('executable') or 'unknown'})"
    path = framework_path(torch)
    sdk = version_tuple(software.get("sdk_version"))
    traced = kind == "compile" or (kind == "inference" and model_format == "neuron")
    if software.get("error"):
        return Refusal("neuron_env", f"{python} could not be probed: {software['error']}")
    if path is None:
        return Refusal("neuron_env", f"{python} has no torch; set NEURONDECK_JOB_PYTHON to the Neuron "
                                     "virtualenv's or container's Python")
    if path == NATIVE:
        if family and family not in NATIVE_FAMILIES:
            return Refusal("neuron_env", f"{python} has PyTorch {torch}, the native TorchNeuron backend, which "
                                         f"runs on Trn2/Trn3 only; on {family} use the XLA torch-neuronx "
                                         "environment (PyTorch 2.9)")
        if sdk is not None and sdk[:2] < NATIVE_FROM_SDK:
            return Refusal("neuron_env", f"native TorchNeuron is public from Neuron 2.33; {hosts} Neuron is "
                                         f"{software.get('sdk_version')}")
        if traced:
            return Refusal("neuron_env", "compiled artifacts come from torch_neuronx.trace, which only the XLA "
                                         f"torch-neuronx (PyTorch <= 2.9) has; {python} has PyTorch {torch}, "
                                         "native TorchNeuron")
        return None
    if kind == "finetune":
        if sdk is not None and sdk[:2] >= NO_XLA_TRAINING_FROM_SDK:
            return Refusal("neuron_env", f"PyTorch/XLA training is unsupported from Neuron 2.30; {hosts} Neuron "
                                         f"is {software.get('sdk_version')} with PyTorch {torch} (train with "
                                         "native TorchNeuron on Trn2/Trn3, Neuron >= 2.33)")
        if not packages.get("torch_xla"):
            return Refusal("neuron_env", f"{python} has no torch-xla to train with")
        return None
    if traced and not packages.get("torch_neuronx"):
        return Refusal("neuron_env", f"{python} has no torch-neuronx")
    return None


def _lnc_refusal(kind: str, family: str, model_format: str, options: Iterable[str], model_lnc: int | None,
                 host_lnc: int | None) -> Refusal | None:
    if family not in NATIVE_FAMILIES:
        return None
    runtime = host_lnc or DEFAULT_TRN2_LNC
    asked = compile_lnc(options) if kind == "compile" else None
    if asked is not None and asked != runtime:
        return Refusal("lnc_mismatch", f"--logical-nc-config={asked} does not match the {family} hosts' runtime "
                                       f"(NEURON_LOGICAL_NC_CONFIG={runtime}); the compiler's and the runtime's "
                                       "logical core setting must agree", "compiler_options")
    if kind == "inference" and model_format == "neuron" and model_lnc is not None and model_lnc != runtime:
        return Refusal("lnc_mismatch", f"the artifact was compiled for logical-nc-config={model_lnc} but the "
                                       f"{family} hosts run NEURON_LOGICAL_NC_CONFIG={runtime}", "model")
    return None


def fleet_refusal(kind: str, family: str, cores: int, hosts: Iterable[tuple[Mapping[str, Any] | None, int | None]],
                  **job: Any) -> Refusal | None:
    """The refusal when no host of the family can run the job: `hosts` holds each host's
    (software report, LNC). None when one can, or when there is no host (the capacity
    check answers that). A family whose hosts differ is accepted when one of them can
    run the job; the job may then be placed on another, which fails it with the reason
    (placement does not look at software: keep one Neuron environment per family)."""
    first: Refusal | None = None
    for software, lnc in hosts:
        refusal = job_refusal(kind, family, cores, software, host_lnc=lnc, **job)
        if refusal is None:
            return None
        first = first or refusal
    return first
