"""The options of `optimum-cli export neuron`, checked once for the form, the API and
the backends: task, static input shapes, tensor-parallel size against the family's
instance types, auto-cast. Pure: no torch, no Django.

Sources: optimum-neuron docs/source/guides/export_model.mdx (static shapes: batch
size and sequence length; height / width / num_images_per_prompt for Stable
Diffusion; tensor_parallel_size for LLMs; --auto_cast matmul|all with
--auto_cast_type bf16|fp16|tf32 ...), and neuron.md §3 for the core counts of each
instance type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

TASKS: tuple[str, ...] = ("text-generation", "feature-extraction", "text-classification", "text-to-image")
# Tasks the cpu backend compiles for real (torch.jit.trace / a static-shape diffusers pipeline).
CPU_TASKS: tuple[str, ...] = ("text-generation", "text-to-image")
AUTO_CAST: tuple[str, ...] = ("none", "matmul", "all")
AUTO_CAST_TYPES: tuple[str, ...] = ("bf16", "fp16", "tf32", "fp8_e4m3")

# NeuronCores per instance type (neuron.md §3; trn2 at its default LNC=2).
INSTANCE_CORES: dict[str, dict[str, int]] = {
    "inf2": {"inf2.xlarge": 2, "inf2.8xlarge": 2, "inf2.24xlarge": 12, "inf2.48xlarge": 24},
    "trn1": {"trn1.2xlarge": 2, "trn1.32xlarge": 32},
    "trn2": {"trn2.48xlarge": 64},
}

# Optimum Neuron class per task (optimum.neuron's public names).
OPTIMUM_CLASSES: dict[str, str] = {
    "text-generation": "NeuronModelForCausalLM",
    "feature-extraction": "NeuronModelForFeatureExtraction",
    "text-classification": "NeuronModelForSequenceClassification",
    "text-to-image": "NeuronStableDiffusionPipeline",
}

DEFAULTS: dict[str, object] = {"task": "text-generation", "tensor_parallel_size": 1, "auto_cast": "none",
                               "auto_cast_type": "bf16", "height": 512, "width": 512, "num_images_per_prompt": 1}


# Optimum Neuron (the 0.4.6 line this backend targets) has no auto-cast for decoders:
# NeuronModelForCausalLM.get_neuron_config takes instance type, batch size, sequence
# length, tensor-parallel size and prefill chunk size only, and sets the compiled
# precision from the checkpoint's own dtype (config.dtype -> NxDNeuronConfig.torch_dtype);
# export() warns and ignores any other keyword, and `optimum-cli export neuron` drops
# --auto_cast_type for decoders (exporters/neuron/__main__.py,
# maybe_export_from_neuron_model_class). Accepting the option would promise a cast the
# export silently does not make, so it is refused.
DECODER_AUTO_CAST = ("text-generation exports take no auto-cast in Optimum Neuron: NeuronModelForCausalLM is "
                     "compiled in the checkpoint's own dtype (its config's torch_dtype). Choose auto_cast none, "
                     "or upload the model saved in the precision you want (e.g. bfloat16)")


class ExportOptionError(ValueError):
    """An export option was refused: `field` names it, the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ExportOptions:
    task: str
    batch_size: int
    sequence_length: int
    tensor_parallel_size: int
    auto_cast: str
    auto_cast_type: str
    height: int | None = None
    width: int | None = None
    num_images_per_prompt: int | None = None

    @property
    def is_image(self) -> bool:
        return self.task == "text-to-image"

    def shape(self) -> dict:
        """The static input shape the artifact is compiled for."""
        if self.is_image:
            return {"batch_size": self.batch_size, "height": self.height, "width": self.width,
                    "num_images_per_prompt": self.num_images_per_prompt}
        return {"batch_size": self.batch_size, "sequence_length": self.sequence_length}

    def key_extras(self) -> dict:
        """What the compile cache key adds beyond batch, sequence and compiler flags; empty
        for a plain text-generation export so keys made before these options still match."""
        extras = {k: v for k, v in (("task", self.task), ("tensor_parallel_size", self.tensor_parallel_size),
                                    ("auto_cast", self.auto_cast)) if v != DEFAULTS[k]}
        if self.auto_cast != "none":
            extras["auto_cast_type"] = self.auto_cast_type
        if self.is_image:
            extras.update(height=self.height, width=self.width, num_images_per_prompt=self.num_images_per_prompt)
        return extras


def valid_tensor_parallel_sizes(family: str) -> list[int]:
    """Core counts a model can be split over on one instance of `family`: each divisor
    of an instance type's core count (a TP group lives on one instance)."""
    sizes = {d for cores in INSTANCE_CORES.get(family, {}).values() for d in range(1, cores + 1) if cores % d == 0}
    return sorted(sizes)


def check_export_options(spec: Mapping, family: str) -> ExportOptions:
    """The export options of a compile spec, checked; raises ExportOptionError naming the field."""
    task = spec.get("task") or DEFAULTS["task"]
    if task not in TASKS:
        raise ExportOptionError("task", f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if family == "cpu" and task not in CPU_TASKS:
        raise ExportOptionError("task", f"the cpu backend compiles {' and '.join(CPU_TASKS)}; "
                                        f"{task} needs a Neuron family (inf2, trn1, trn2)")
    tp = _int(spec, "tensor_parallel_size")
    if family != "cpu":
        sizes = valid_tensor_parallel_sizes(family)
        if tp not in sizes:
            types = ", ".join(f"{name} ({n})" for name, n in INSTANCE_CORES.get(family, {}).items())
            raise ExportOptionError("tensor_parallel_size",
                                    f"tensor_parallel_size {tp} does not fit a {family} instance ({types}); "
                                    f"choose one of {', '.join(map(str, sizes))}")
    elif tp != 1:
        raise ExportOptionError("tensor_parallel_size", "the cpu backend compiles for one device: "
                                                        "tensor_parallel_size must be 1")
    auto_cast = spec.get("auto_cast") or DEFAULTS["auto_cast"]
    auto_cast_type = spec.get("auto_cast_type") or DEFAULTS["auto_cast_type"]
    if auto_cast not in AUTO_CAST:
        raise ExportOptionError("auto_cast", f"auto_cast must be one of {', '.join(AUTO_CAST)}")
    if auto_cast_type not in AUTO_CAST_TYPES:
        raise ExportOptionError("auto_cast_type", f"auto_cast_type must be one of {', '.join(AUTO_CAST_TYPES)}")
    if family == "cpu" and auto_cast != "none":
        raise ExportOptionError("auto_cast", "auto-cast is a neuronx-cc option; the cpu backend traces in fp32")
    if task == "text-generation" and auto_cast != "none":
        raise ExportOptionError("auto_cast", DECODER_AUTO_CAST)
    image = {}
    if task == "text-to-image":
        for name in ("height", "width"):
            value = _int(spec, name)
            if value % 8:
                raise ExportOptionError(name, f"{name} must be a multiple of 8 (the VAE downsamples by 8), got {value}")
            image[name] = value
        image["num_images_per_prompt"] = _int(spec, "num_images_per_prompt")
    return ExportOptions(task, _int(spec, "batch_size", 1), _int(spec, "sequence_length", 32), tp,
                         auto_cast, auto_cast_type, **image)


def _int(spec: Mapping, name: str, default: int | None = None) -> int:
    value = spec.get(name)
    if value is None:
        value = DEFAULTS.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExportOptionError(name, f"{name} must be a positive integer, got {value!r}")
    return value


def optimum_export_call(options: ExportOptions, target: str, compiler_options: list[str]) -> tuple[str, str, dict]:
    """(class name, method, keyword arguments) of the Optimum Neuron export for these options.

    Decoders (text-generation) go through `get_neuron_config(...)` + `export(...)`
    (optimum/neuron/models/inference/modeling_utils.py), with no auto-cast (see
    DECODER_AUTO_CAST: check_export_options refuses one); encoders and Stable
    Diffusion through `from_pretrained(model, export=True, **compiler_args,
    **input_shapes)` (docs/source/guides/export_model.mdx, model_doc/diffusers/
    stable_diffusion.mdx). `instance_type` is the family: a CPU-only compile host
    targets it as `--instance_type` does."""
    cls = OPTIMUM_CLASSES[options.task]
    if options.task == "text-generation":
        return cls, "export", {"batch_size": options.batch_size, "sequence_length": options.sequence_length,
                               "tensor_parallel_size": options.tensor_parallel_size, "instance_type": target}
    kwargs: dict = {"export": True, "instance_type": target, "tensor_parallel_size": options.tensor_parallel_size,
                    "batch_size": options.batch_size}
    if options.auto_cast != "none":
        kwargs.update(auto_cast=options.auto_cast, auto_cast_type=options.auto_cast_type)
    elif options.is_image:
        kwargs.update(auto_cast=None)  # the diffusion exporter defaults to matmul/bf16; "none" means none
    optlevel = next((o.split("=", 1)[1] for o in compiler_options if o.startswith("--optlevel=")), None)
    if optlevel:
        kwargs["optlevel"] = optlevel
    if options.is_image:
        kwargs.update(height=options.height, width=options.width, num_images_per_prompt=options.num_images_per_prompt)
    else:
        kwargs["sequence_length"] = options.sequence_length
    return cls, "from_pretrained", kwargs
