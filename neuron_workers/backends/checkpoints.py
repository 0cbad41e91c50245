"""Training checkpoints on shared storage: written atomically, read only when complete.

A job's checkpoints live in one folder shared by all its attempts and ranks
(STORAGE_ROOT/jobs/<id>/checkpoints, handed to the backend as
inputs["checkpoint_dir"]):

    step-00000050/
      state.pt       torch.save of the training state (model, optimizer, scheduler,
                     every rank's RNG states, data position, loss history)
      COMPLETE       {"step": 50, "sha256": <state.pt's digest>, "bytes": <size>}

Writing: state.pt goes into a hidden temporary folder, is fsynced, the folder is
renamed to step-N (atomic on one filesystem) and only then is COMPLETE written
(temporary file, fsync, rename). A reader takes the newest step-N whose COMPLETE
parses and whose state.pt has that size and digest; anything else (a writer killed
mid-way, a torn copy, a half-synced file after a host crash) is skipped and
reported, and the next older one is tried.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
MARKER_FILE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
# A temporary folder this old was left by a writer that died (a live writer takes
# well under a minute for the models checkpointed here); pruning removes it.
STALE_TMP_S = 3600.0


@dataclass(frozen=True)
class Loaded:
    step: int
    path: Path
    state: dict


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class CheckpointStore:
    """One job's checkpoint folder. `log(line)` reports skipped checkpoints."""

    def __init__(self, root: Path, keep: int = 3, log: Callable[[str], None] = print) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.root = Path(root)
        self.keep = keep
        self.log = log

    # ------------------------------------------------------------ writing

    def save(self, step: int, state: dict) -> Path:
        """Write `state` as the checkpoint of `step`; returns its folder.

        If that step's checkpoint is already complete (an earlier attempt, or a
        superseded one finishing in its grace period, reached the same step) it is
        kept: the same seed and position give the same state."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / step_dir_name(step)
        if self._marked(final):
            return final
        tmp = self.root / f".tmp-{step_dir_name(step)}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        try:
            _write_file(tmp / STATE_FILE, data)
            fsync_path(tmp)
            if final.exists():  # torn leftovers of a writer that died after its rename
                shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_path(self.root)
        marker = {"step": step, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        marker_tmp = final / f".{MARKER_FILE}.tmp"
        _write_file(marker_tmp, json.dumps(marker).encode())
        os.replace(marker_tmp, final / MARKER_FILE)
        fsync_path(final)
        return final

    def prune(self) -> list[int]:
        """Delete all but the newest `keep` complete checkpoints, incomplete ones older
        than the newest complete one, and stale temporary folders; returns the pruned
        steps."""
        steps = self._steps()
        complete = [s for s in steps if self._marked(self.root / step_dir_name(s))]
        kept = set(complete[-self.keep:])
        newest = complete[-1] if complete else None
        pruned = []
        for step in steps:
            if step in kept or newest is None or step > newest:
                continue
            shutil.rmtree(self.root / step_dir_name(step), ignore_errors=True)
            pruned.append(step)
        now = time.time()
        for tmp in self.root.glob(".tmp-step-*"):
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    shutil.rmtree(tmp, ignore_errors=True)
            except FileNotFoundError:
                pass
        return pruned

    # ------------------------------------------------------------ reading

    def latest(self) -> Loaded | None:
        """The newest complete checkpoint, loaded (tensors on the CPU); None if none."""
        for step in reversed(self._steps()):
            folder = self.root / step_dir_name(step)
            data = self._complete(folder, report=True)
            if data is None:
                continue
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
            return Loaded(step, folder, state)
        return None

    def complete_steps(self) -> list[int]:
        """Steps whose marker is there and agrees with state.pt's size (digests unread)."""
        return [s for s in self._steps() if self._marked(self.root / step_dir_name(s))]

    @staticmethod
    def _marked(folder: Path) -> bool:
        """The cheap check pruning needs: a marker whose size agrees with state.pt.
        Reading (latest) verifies the digest too."""
        try:
            marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
            return isinstance(marker, dict) and marker.get("bytes") == (folder / STATE_FILE).stat().st_size
        except (OSError, ValueError):
            return False

    def _steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir():
                found.append(int(match.group(1)))
        return sorted(found)

    def _complete(self, folder: Path, report: bool = False) -> bytes | None:
        """state.pt's bytes if `folder` is a complete checkpoint, else None."""
        reason = None
        try:
            marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
            data = (folder / STATE_FILE).read_bytes()
        except FileNotFoundError as exc:
            reason = f"{Path(exc.filename).name} is missing"
        except (OSError, ValueError) as exc:
            reason = f"unreadable: {exc}"
        else:
            if not isinstance(marker, dict) or marker.get("bytes") != len(data):
                reason = f"{STATE_FILE} has {len(data)} bytes, its marker says {marker.get('bytes') if isinstance(marker, dict) else '?'}"
            elif marker.get("sha256") != hashlib.sha256(data).hexdigest():
                reason = f"{STATE_FILE} does not match its digest"
            else:
                return data
        if report:
            self.log(f"checkpoint {folder.name} ignored: {reason}")
        return None


def _loaded_xla_model() -> Any:
    """torch_xla.core.xla_model if this process trains through torch-xla (imported it), else None."""
    import sys

    return sys.modules.get("torch_xla.core.xla_model")


def _native_neuron() -> Any:
    """torch.neuron, the device module native TorchNeuron registers when torch_neuronx is
    imported (get_rng_state / set_rng_state / manual_seed, as torch.cuda has), else None."""
    return getattr(torch, "neuron", None)


def rng_state() -> dict:
    """The RNG states a resumed run must continue from, laid out as transformers' Trainer
    saves them (Trainer._save_rng_state): Python's, numpy's if loaded, torch's CPU
    generator's, under torch-xla the device's running seed (xm.get_rng_state) and under
    native TorchNeuron the neuron device's generator (torch.neuron.get_rng_state), which
    dropout on the device draws from."""
    import random
    import sys

    state: dict[str, Any] = {"python": random.getstate(), "cpu": torch.get_rng_state()}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        state["numpy"] = numpy.random.get_state()
    xm = _loaded_xla_model()
    if xm is not None:
        state["xla"] = xm.get_rng_state()
    neuron = _native_neuron()
    if neuron is not None:
        state["neuron"] = neuron.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state saved (Trainer._load_rng_state); a state without an entry
    for a generator this process uses (numpy, the XLA or neuron device) leaves that one as it is."""
    import random
    import sys

    random.setstate(state["python"])
    # "torch": the CPU generator's key in checkpoints of earlier releases, which a job
    # may still resume from.
    torch.set_rng_state(state["cpu"] if "cpu" in state else state["torch"])
    numpy = sys.modules.get("numpy")
    if numpy is not None and "numpy" in state:
        numpy.random.set_state(state["numpy"])
    xm = _loaded_xla_model()
    if xm is not None and "xla" in state:
        xm.set_rng_state(state["xla"])
    neuron = _native_neuron()
    if neuron is not None and "neuron" in state:
        neuron.set_rng_state(state["neuron"])


def seed_rng(seed: int) -> None:
    """Seed every generator rng_state covers (transformers' set_seed, plus the XLA or
    neuron device)."""
    import random
    import sys

    random.seed(seed)
    torch.manual_seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed)
    xm = _loaded_xla_model()
    if xm is not None:
        xm.set_rng_state(seed)
    neuron = _native_neuron()
    if neuron is not None:
        neuron.manual_seed(seed)
