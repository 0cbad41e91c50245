"""Where files live under STORAGE_ROOT (a shared filesystem in a fleet: every host
mounts it at the same path, so artifacts and models outlive the host that wrote them)."""
from __future__ import annotations

import uuid
from pathlib import Path

from django.conf import settings


def root() -> Path:
    return Path(settings.STORAGE_ROOT)


def abs_path(rel: str) -> Path:
    """A stored relative path as an absolute one, refusing anything that escapes the root."""
    base = root().resolve()
    path = (base / rel).resolve()
    if base != path and base not in path.parents:
        raise ValueError(f"path escapes storage root: {rel}")
    return path


def rel_path(path: Path) -> str:
    return str(Path(path).resolve().relative_to(root().resolve()))


def new_model_dir(team_slug: str) -> Path:
    path = root() / "models" / team_slug / uuid.uuid4().hex
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_dataset_path(team_slug: str, ext: str) -> Path:
    path = root() / "datasets" / team_slug / f"{uuid.uuid4().hex}.{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def job_dir(job_id: int) -> Path:
    return root() / "jobs" / str(job_id)
