"""NeuronTrainer checkpoints in the job's checkpoint folder, under the rule every checkpoint follows.

Optimum Neuron's NeuronTrainer writes checkpoint-<step>/ in place, file by file, from
every rank (the model and optimizer shards through neuronx_distributed, then
scheduler.pt and trainer_state.json). A rank killed half-way leaves a folder that
looks like a checkpoint. So the trainer writes into a hidden staging folder
(``.trainer-staging`` in the job's checkpoint folder), and once every rank has
finished a save (transformers' ``on_save``, after the trainer's last rendezvous) the
world's rank 0 ``adopt``s it: every file fsynced, the folder renamed to step-<N>
(atomic on one filesystem) and only then marked COMPLETE, as
:mod:`neuron_workers.backends.checkpoints` does:

    step-00000050/
      <the trainer's files: shards/, scheduler.pt, trainer_state.json, ...>
      COMPLETE    {"step": 50, "kind": "neuron-trainer", "files": {<relative path>: <bytes>}}

A reader takes the newest step-N whose marker parses and whose files are all there
with their sizes; anything else is skipped and reported. Sizes, not digests: the
shards of a tensor-parallel model are gigabytes, and the last save happens in the
stop's grace period; the rename after the fsyncs is what makes a folder whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .checkpoints import MARKER_FILE, fsync_path, step_dir_name

STAGING_DIR = ".trainer-staging"
KIND = "neuron-trainer"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class TrainerCheckpoints:
    """The job's checkpoint folder as NeuronTrainer's checkpoints see it. `log(line)`
    reports skipped checkpoints."""

    def __init__(self, root: Path | str, keep: int, log: Callable[[str], None] = print) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.root = Path(root)
        self.keep = keep
        self.log = log

    @property
    def staging(self) -> Path:
        """The trainer's output_dir: it writes checkpoint-<step>/ here."""
        return self.root / STAGING_DIR

    def clear_staging(self) -> None:
        """Drop what a stopped attempt left half-written (call before training starts)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)

    def adopt(self, step: int) -> Path:
        """Make the trainer's finished staging/checkpoint-<step> the complete checkpoint of
        `step`; returns its folder. A step already complete (a superseded attempt's) is kept."""
        staged = self.staging / f"checkpoint-{step}"
        final = self.root / step_dir_name(step)
        if self._files(final) is not None:
            shutil.rmtree(staged, ignore_errors=True)
            return final
        files: dict[str, int] = {}
        for path in sorted(p for p in staged.rglob("*") if p.is_file()):
            fsync_path(path)
            files[path.relative_to(staged).as_posix()] = path.stat().st_size
        for folder in sorted({p.parent for p in staged.rglob("*")} | {staged}, reverse=True):
            fsync_path(folder)
        if final.exists():  # torn leftovers of an adopter that died after its rename
            shutil.rmtree(final, ignore_errors=True)
        os.rename(staged, final)
        fsync_path(self.root)
        marker_tmp = final / f".{MARKER_FILE}.tmp"
        with open(marker_tmp, "w", encoding="utf-8") as fh:
            json.dump({"step": step, "kind": KIND, "files": files}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(marker_tmp, final / MARKER_FILE)
        fsync_path(final)
        return final

    def latest(self) -> tuple[int, Path] | None:
        """(step, folder) of the newest complete checkpoint, or None."""
        for step in reversed(self._steps()):
            folder = self.root / step_dir_name(step)
            reason = self._incomplete(folder)
            if reason is None:
                return step, folder
            self.log(f"checkpoint {folder.name} ignored: {reason}")
        return None

    def prune(self) -> list[int]:
        """Delete all but the newest `keep` complete checkpoints, and incomplete ones older
        than the newest complete one; returns the pruned steps."""
        steps = self._steps()
        complete = [s for s in steps if self._files(self.root / step_dir_name(s)) is not None]
        if not complete:
            return []
        kept, newest = set(complete[-self.keep:]), complete[-1]
        pruned = [s for s in steps if s not in kept and s < newest]
        for step in pruned:
            shutil.rmtree(self.root / step_dir_name(step), ignore_errors=True)
        return pruned

    def _steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for e in self.root.iterdir()
                      if (m := _STEP_DIR.match(e.name)) and e.is_dir())

    @staticmethod
    def _marker(folder: Path) -> dict | None:
        try:
            marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        ok = isinstance(marker, dict) and marker.get("kind") == KIND and isinstance(marker.get("files"), dict)
        return marker if ok else None

    def _files(self, folder: Path) -> dict | None:
        """The marker's file table if `folder` is complete, else None."""
        return None if self._incomplete(folder) else self._marker(folder)["files"]

    def _incomplete(self, folder: Path) -> str | None:
        """Why `folder` is not a complete NeuronTrainer checkpoint, or None if it is."""
        marker = self._marker(folder)
        if marker is None:
            return f"no {MARKER_FILE} marker of a NeuronTrainer checkpoint"
        for name, size in marker["files"].items():
            try:
                actual = (folder / name).stat().st_size
            except OSError:
                return f"{name} is missing"
            if actual != size:
                return f"{name} has {actual} bytes, its marker says {size}"
        return None
