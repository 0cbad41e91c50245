"""The backend contract shared by the runner and every backend.

Django-free and torch-free on purpose: the runner imports this module to build a
`JobContext` before it knows which backend (if any) can run, and the web app may
import `JobFailed` codes for display without paying for a torch import.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# Failure codes the backends raise. The web app shows the message; the code lets
# it pick advice ("reduce batch size" for oom, "free the cores" for
# cores_unavailable) without parsing text. JobFailed accepts other codes too
# (the runner may add its own, e.g. "timed_out"), so this set is documentation
# and a test oracle, not a gate.
FAILURE_CODES: frozenset[str] = frozenset(
    {
        "bad_input",  # the spec or an input file is inconsistent; resubmitting as-is fails again
        "cancelled",  # should_stop() turned true; the backend stopped between steps
        "oom",  # host or device memory allocation failed
        "cores_unavailable",  # NeuronCores held by another process (NRT status 9)
        "compile_error",  # the tracer/compiler rejected the model or produced a wrong artifact
        "runtime_error",  # the Neuron runtime failed while executing
        "unavailable",  # this host lacks the software stack the job needs
    }
)


class JobFailed(Exception):
    """A user-facing failure: `code` is one of FAILURE_CODES, `message` a sentence."""

    def __init__(self, code: str, message: str) -> None:
        if not code:
            raise ValueError("JobFailed needs a non-empty code")
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        """JSON shape the runner records as the job's error."""
        return {"code": self.code, "message": self.message}

    def __repr__(self) -> str:
        return f"JobFailed({self.code!r}, {self.message!r})"


class JsonlMetricSink:
    """Default `JobContext.metric`: append each dict as one JSON line to a file.

    Opens and closes the file per call so a crash never loses earlier lines and
    the runner can tail the file while the job runs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, metric: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(metric, separators=(",", ":")) + "\n")


def _never_stop() -> bool:
    return False


@dataclass
class JobContext:
    """Everything a backend needs to run one job; built by the runner.

    `spec` has already been validated by the web app, but backends re-check what
    they depend on and raise `JobFailed("bad_input", ...)` on inconsistencies.
    `inputs` holds resolved local paths: model_path, model_format
    ("hf" | "torchscript" | "neuron"), dataset_path, dataset_format
    ("jsonl" | "csv"), prompts_path (JSONL, one {"prompt": ...} per line).
    Outputs go under `artifacts_dir` (workdir/"artifacts").
    """

    job_id: int
    kind: str
    spec: dict
    workdir: Path
    inputs: dict
    cores: str | None = None
    env: dict = field(default_factory=dict)
    log: Callable[[str], None] = print
    metric: Callable[[dict], None] | None = None
    should_stop: Callable[[], bool] = _never_stop

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        if self.metric is None:
            self.metric = JsonlMetricSink(self.workdir / "metrics.jsonl")

    @property
    def artifacts_dir(self) -> Path:
        """workdir/"artifacts", created on first use."""
        path = self.workdir / "artifacts"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def check_stop(self, where: str) -> None:
        """Raise JobFailed("cancelled") if the runner asked us to stop."""
        if self.should_stop():
            raise JobFailed("cancelled", f"job {self.job_id} was cancelled {where}")


class Backend:
    """A way to run compile / finetune / inference jobs, and serve (an endpoint's
    replica: a model server that runs until cancelled), on this host.

    Subclasses set `name`, implement `available()` (cheap, no side effects) and the
    three kind methods. `run()` dispatches on `ctx.kind` and returns a
    JSON-serializable result dict; it raises `JobFailed` for user-facing failures.
    """

    name: ClassVar[str] = ""
    KINDS: ClassVar[tuple[str, ...]] = ("compile", "finetune", "inference", "serve")

    @classmethod
    def available(cls) -> bool:
        raise NotImplementedError

    @classmethod
    def zygote_preload(cls, kind: str, inputs: dict) -> bool:
        """Load what a `kind` job with `inputs` will need into this process's caches.

        Called by the cpu host's zygote (the process that forks job processes)
        before it forks the job's child, which then inherits the loaded objects
        copy-on-write instead of loading them itself. Returns True if a cache
        changed. Must not start threads (the zygote forks); may raise (the zygote
        ignores it and the job loads for itself, reporting the problem properly).
        Default: nothing.
        """
        return False

    def reusable_process(self, kind: str) -> bool:
        """Whether the process that ran a `kind` job to success may run the team's
        next job too (a warm runner, kept by the zygote) instead of exiting. Only
        for kinds that change nothing a later job could observe: no cached object
        mutated, no thread or process left, no global setting changed for good.
        Default: no, every job gets a fresh process."""
        return False

    def run(self, ctx: JobContext) -> dict:
        if ctx.kind not in self.KINDS:
            raise JobFailed("bad_input", f"unknown job kind {ctx.kind!r}; expected one of {', '.join(self.KINDS)}")
        return getattr(self, ctx.kind)(ctx)

    def compile(self, ctx: JobContext) -> dict:
        raise NotImplementedError

    def finetune(self, ctx: JobContext) -> dict:
        raise NotImplementedError

    def inference(self, ctx: JobContext) -> dict:
        raise NotImplementedError

    def serve(self, ctx: JobContext) -> dict:
        """Serve the model over HTTP until ctx.should_stop(), then drain; see serve_handoff
        for how the replica's URL reaches the worker."""
        raise JobFailed("unavailable", f"the {self.name} backend cannot serve models")


# ---------------------------------------------------------------- spec helpers


def spec_int(spec: dict, key: str, *, minimum: int = 1, maximum: int | None = None, default: Any = ...) -> int:
    """Read an int field, raising JobFailed("bad_input") naming the field if it is wrong.

    Booleans are refused although they are ints in Python: `True` as a batch size is
    a form bug, not a request for batch 1.
    """
    if key not in spec or spec[key] is None:
        if default is ...:
            raise JobFailed("bad_input", f"spec field {key!r} is required")
        return default
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobFailed("bad_input", f"spec field {key!r} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise JobFailed("bad_input", f"spec field {key!r} must be >= {minimum}{upper}, got {value}")
    return value


def spec_float(spec: dict, key: str, *, minimum: float = 0.0, default: Any = ...) -> float:
    """Read a finite float field >= minimum (ints accepted)."""
    if key not in spec or spec[key] is None:
        if default is ...:
            raise JobFailed("bad_input", f"spec field {key!r} is required")
        return default
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JobFailed("bad_input", f"spec field {key!r} must be a finite number, got {value!r}")
    if value < minimum:
        raise JobFailed("bad_input", f"spec field {key!r} must be >= {minimum}, got {value}")
    return float(value)


def input_path(ctx: JobContext, key: str) -> Path:
    """Resolve ctx.inputs[key] to an existing path or raise JobFailed("bad_input")."""
    raw = ctx.inputs.get(key)
    if not raw:
        raise JobFailed("bad_input", f"input {key!r} is missing for this {ctx.kind} job")
    path = Path(raw)
    if not path.exists():
        raise JobFailed("bad_input", f"input {key!r} points to {path}, which does not exist")
    return path


def require_model_format(ctx: JobContext, allowed: Sequence[str]) -> str:
    """Return inputs["model_format"] (default "hf") if allowed, else raise bad_input."""
    fmt = ctx.inputs.get("model_format") or "hf"
    if fmt not in allowed:
        raise JobFailed("bad_input", f"a {ctx.kind} job needs a model in format {' or '.join(allowed)}, got {fmt!r}")
    return fmt


# ---------------------------------------------------------------- result helpers


def percentile(values: Iterable[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def downsample(values: Sequence[float], limit: int) -> list[float]:
    """At most `limit` evenly spaced points, always keeping the first and last."""
    if len(values) <= limit:
        return list(values)
    if limit < 2:
        return list(values[-limit:]) if limit else []
    step = (len(values) - 1) / (limit - 1)
    return [values[round(i * step)] for i in range(limit)]


def write_json(path: Path, data: dict) -> None:
    """Write `data` atomically (tmp + rename) so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
