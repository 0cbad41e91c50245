"""Neuron error text -> a JobFailed code (cores_unavailable, oom, compile_error, runtime_error).

Pure and torch-free: the neuron backend maps exceptions from torch_neuronx calls,
the training ranks map theirs, and the torchrun launcher classifies the output
tail of a run that crashed without writing an error file.

The runtime writes the lines that say why (`TDRV … Failed to allocate …`,
`nrt_allocate_neuron_cores …`) to the process's console, not into the exception
(neuron.md §0, §5.6): callers pass that output as `log_text` (`console_tail`).
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import JobFailed

_CORES_PATTERNS = (
    r"nrt_allocate_neuron_cores",
    r"NeuronCore\(s\) not available",
    r"NRT_LOAD_NOT_ENOUGH_NC",
    r"Neuron cores are not contiguous",
    # The core is locked by another model or process [SDK nrt_status.h: NRT_EXEC_NC_BUSY = 1005].
    r"NRT_EXEC_NC_BUSY",
    # torch-neuronx when the runtime cannot start because another process holds the
    # cores (aws-neuron-samples#44; torch_neuronx DataParallel.device_count).
    r"cannot determine the number of available NeuronCores",
)
_OOM_PATTERNS = (
    r"Failed to allocate",
    r"Failed to alloc\w* DEVICE memory",
    r"dmem_alloc",
    r"Allocation Failure",
    r"NRT_RESOURCE",
    r"NRT_FAIL_HOST_MEM_ALLOC",
    r"out of memory",
    # The host OOM killer ends neuronx-cc with SIGKILL; the log then says "Killed"
    # (neuronx-distributed#53, neuron.md §5.4).
    r"\bKilled\b",
    r"SIGKILL",
)
_STATUS = re.compile(r"\bstatus\s*[=:]?\s*(\d+)\b", re.IGNORECASE)
# Runtime status codes from nrt_status.h (neuron.md §5.6).
_OOM_STATUS = {4, 11}  # NRT_RESOURCE, NRT_FAIL_HOST_MEM_ALLOC
_CORES_STATUS = {9, 1005}  # NRT_LOAD_NOT_ENOUGH_NC, NRT_EXEC_NC_BUSY


def classify_neuron_error(text: str, phase: str) -> str:
    """Failure code for an error text: cores_unavailable, oom, else compile_error or runtime_error.

    Core exhaustion is checked first: NRT status 9 means other processes hold
    the cores (neuron.md §5.1), and telling that user "out of memory" would send
    them shrinking a batch that was never the problem.
    """
    statuses = {int(s) for s in _STATUS.findall(text)}
    if statuses & _CORES_STATUS or any(re.search(p, text, re.IGNORECASE) for p in _CORES_PATTERNS):
        return "cores_unavailable"
    if statuses & _OOM_STATUS or any(re.search(p, text, re.IGNORECASE) for p in _OOM_PATTERNS):
        return "oom"
    return "compile_error" if phase == "compile" else "runtime_error"


_ADVICE = {
    "cores_unavailable": "the NeuronCores assigned to this job are held by another process",
    "oom": "reduce batch_size or sequence_length, or use a larger instance (16 GiB per NeuronCore on inf2/trn1)",
    "compile_error": "see compile_log.txt for the compiler's output",
    "runtime_error": "the Neuron runtime reported an error",
}


# The job's console: the runner sends the process's stdout and stderr to this file
# in its workdir (neuron_workers.process.workdir.LOG_FILE).
CONSOLE_LOG = "log.txt"


def console_tail(path: Path, limit: int = 64 * 1024) -> str:
    """The last `limit` bytes of a console log (the job's log.txt, where the runner sends
    the process's stdout and stderr, so the runtime's own lines land there), or ""."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def map_neuron_error(exc: BaseException, phase: str, log_text: str = "") -> JobFailed:
    """Turn an exception (plus captured log text) from a Neuron call into a JobFailed."""
    if isinstance(exc, JobFailed):
        return exc
    code = "oom" if isinstance(exc, MemoryError) else classify_neuron_error(f"{exc}\n{log_text}", phase)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
    return JobFailed(code, f"{phase} failed: {first_line} ({_ADVICE[code]})")
