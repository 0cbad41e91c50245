"""Writes that span models or have side effects: submit, cancel, uploads, outcomes.
Status changes go through jobs.states; messages are sent only after commit."""
from __future__ import annotations

import shutil

from django.db import transaction

from jobs.assets import storage
from jobs.assets.uploads import UploadError, dir_digest, extract_model_zip, validate_dataset
from jobs.models import (
    Dataset,
    Job,
    ModelAsset,
    Team,
)

# --- models and datasets ----------------------------------------------------------

def model_upload(*, team: Team, user, name: str, upload) -> ModelAsset:
    """Register an uploaded HF-format zip as the next version of `name`. Raises UploadError."""
    dest = storage.new_model_dir(team.slug)
    try:
        meta = extract_model_zip(upload, dest)
        digest, size = dir_digest(dest)
    except Exception:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return model_register(team=team, user=user, name=name, path=dest, meta=meta, digest=digest, size=size)


def model_register(*, team: Team, user, name: str, path, meta: dict, digest: str = "", size: int = 0,
                   fmt: str = ModelAsset.Format.HF, parent: ModelAsset | None = None, source_job: Job | None = None,
                   compile_key: str = "") -> ModelAsset:
    if not digest:
        digest, size = dir_digest(path)
    with transaction.atomic():
        Team.objects.select_for_update().filter(pk=team.pk).first()  # serialize version numbers
        last = ModelAsset.objects.filter(team=team, name=name).order_by("-version").values_list("version", flat=True).first()
        return ModelAsset.objects.create(
            team=team, name=name, version=(last or 0) + 1, format=fmt, parent=parent, source_job=source_job,
            path=storage.rel_path(path), digest=digest, size_bytes=size, meta=meta, created_by=user,
            compile_key=compile_key,
        )


def dataset_upload(*, team: Team, user, name: str, upload) -> Dataset:
    ext = "csv" if (upload.name or "").lower().endswith(".csv") else "jsonl"
    dest = storage.new_dataset_path(team.slug, ext)
    try:
        fmt, rows = validate_dataset(upload, dest)
    except UploadError:
        dest.unlink(missing_ok=True)
        raise
    return Dataset.objects.create(team=team, name=name, format=fmt, path=storage.rel_path(dest), rows=rows,
                                  size_bytes=dest.stat().st_size, created_by=user)
