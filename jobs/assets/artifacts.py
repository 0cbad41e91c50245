"""Serving a job's artifacts, shared by the pages and the API: the file path comes
from the stored Artifact row (never from the URL), must stay inside the job's own
folder, and a directory is streamed as a zip built on the fly."""
from __future__ import annotations

import os
from pathlib import Path

from django.http import FileResponse, Http404, StreamingHttpResponse
from django.utils.http import content_disposition_header
from zipstream import ZipStream

from jobs.assets import storage
from jobs.models import Job


def artifact_path(job: Job, name: str) -> Path:
    """The file or folder of artifact `name`, or of a path inside a folder artifact
    ("checkpoint/config.json"). A 404 for anything else, including a row or a link
    that points outside the job's folder."""
    if "\x00" in name:  # no artifact has one, and PostgreSQL cannot even compare it
        raise Http404("No such artifact")
    top, _, rest = name.partition("/")
    artifact = job.artifacts.filter(name=name).first()
    if artifact is None and rest:
        artifact = job.artifacts.filter(name=top, is_dir=True).first()
    if artifact is None:
        raise Http404("No such artifact")
    try:
        root = storage.abs_path(artifact.path)
    except ValueError:
        raise Http404("No such artifact") from None
    job_dir = storage.job_dir(job.pk).resolve()
    if root != job_dir and job_dir not in root.parents:  # a row pointing elsewhere (say, via a link the job made)
        raise Http404("No such artifact")
    path = root if artifact.name == name else (root / rest).resolve()  # resolve() follows links: caught below
    if path != root and root not in path.parents:
        raise Http404("No such file in this artifact")
    if not path.exists():
        raise Http404("The artifact's file is gone" if path == root else "No such file in this artifact")
    return path


def zip_of(folder: Path, arcname: str) -> ZipStream:
    """A sized, streamed zip of the regular files under `folder`. Symbolic links are
    skipped, so a link planted in a job's output cannot pull in files from elsewhere."""
    archive = ZipStream(sized=True)
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for filename in sorted(filenames):
            file = Path(dirpath) / filename
            if file.is_file() and not file.is_symlink():
                archive.add_path(str(file), f"{arcname}/{file.relative_to(folder).as_posix()}")
    return archive


def artifact_response(job: Job, name: str):
    """Download artifact `name` of `job` (already fetched through jobs.access)."""
    path = artifact_path(job, name)
    if path.is_dir():
        filename = f"job-{job.pk}-{path.name}"
        archive = zip_of(path, path.name)
        response = StreamingHttpResponse(archive, content_type="application/zip")
        response["Content-Length"] = str(len(archive))
        response["Content-Disposition"] = content_disposition_header(True, f"{filename}.zip")
        return response
    if not path.is_file():
        raise Http404("The artifact's file is gone")
    # The system's MIME table guesses from the extension alone, and ML files reuse
    # extensions it knows for something else (model.pt is "application/vnd.snesdev-
    # page-table"): name the types of the files jobs write, and let the rest be bytes.
    content_type = ARTIFACT_TYPES.get(path.suffix.lower(), "application/octet-stream")
    return FileResponse(path.open("rb"), as_attachment=True, filename=path.name, content_type=content_type)


# Content types of the artifacts jobs write; anything else downloads as plain bytes.
ARTIFACT_TYPES = {
    ".json": "application/json", ".jsonl": "application/jsonl", ".txt": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8", ".csv": "text/csv; charset=utf-8", ".md": "text/markdown; charset=utf-8",
    ".zip": "application/zip",
}
