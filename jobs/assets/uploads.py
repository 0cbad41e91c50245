"""Validation and storage of uploaded models (zip of a Hugging Face folder) and
datasets (JSONL / CSV). Nothing is registered unless the whole upload is valid;
a refused upload leaves no files behind."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from django.conf import settings

from jobs import safe_json

MAX_ZIP_MEMBERS = 10_000
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


class UploadError(ValueError):
    """A refused upload; `field` names the form / API field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _check_size(upload, field: str) -> None:
    if upload.size > settings.MAX_UPLOAD_BYTES:
        raise UploadError(field, f"{field} is {upload.size} bytes; the limit is {settings.MAX_UPLOAD_BYTES}")


def _safe_members(archive: zipfile.ZipFile) -> tuple[list[zipfile.ZipInfo], str]:
    """Zip members with their common top folder stripped; refuses escaping paths,
    links, and archives that expand beyond the upload limit (zip bombs)."""
    members = [m for m in archive.infolist() if not m.is_dir()]
    if not members:
        raise UploadError("file", "the zip is empty")
    if len(members) > MAX_ZIP_MEMBERS:
        raise UploadError("file", f"the zip holds more than {MAX_ZIP_MEMBERS} files")
    total = 0
    for member in members:
        name = member.filename
        path = PurePosixPath(name)
        if name.startswith(("/", "\\")) or ".." in path.parts or ":" in path.parts[0] or "\\" in name:
            raise UploadError("file", f"the zip holds a path escaping its folder: {name!r}")
        if stat.S_ISLNK(member.external_attr >> 16):
            raise UploadError("file", f"the zip holds a symbolic link: {name!r}")
        total += member.file_size
    if total > settings.MAX_UPLOAD_BYTES * 4:
        raise UploadError("file", "the zip expands to more than four times the upload limit")
    tops = {PurePosixPath(m.filename).parts[0] for m in members}
    prefix = ""
    if len(tops) == 1 and all(len(PurePosixPath(m.filename).parts) > 1 for m in members):
        prefix = tops.pop() + "/"
    return members, prefix


# What a damaged member raises while it is read: a CRC or size mismatch (BadZipFile),
# compressed data that does not inflate (zlib.error; EOFError when it ends early), an
# encrypted member (RuntimeError), a compression method zipfile lacks
# (NotImplementedError).
CORRUPT_MEMBER = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, ValueError)


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, out) -> None:
    """Copy one member into the file object `out`; UploadError if it is damaged."""
    try:
        with archive.open(member) as src:
            shutil.copyfileobj(src, out)
    except CORRUPT_MEMBER as exc:
        raise UploadError("file", f"the zip is corrupt: {member.filename} cannot be extracted ({exc})") from None


def extract_model_zip(upload, dest: Path) -> dict:
    """Extract a HF-format model zip into `dest`; returns the model's meta. Raises
    UploadError; the caller removes `dest` then (jobs.assets.services.model_upload)."""
    _check_size(upload, "file")
    try:
        archive = zipfile.ZipFile(upload)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        raise UploadError("file", "the file is not a zip archive") from None
    with archive:
        members, prefix = _safe_members(archive)
        names = {m.filename[len(prefix):] for m in members}
        if "model_index.json" in names:
            meta = _pipeline_meta(archive, prefix, names)
        elif "config.json" not in names:
            raise UploadError("file", "the zip has no config.json at its top level (not a Hugging Face model folder)")
        elif not any(w in names for w in WEIGHT_FILES):
            raise UploadError("file", "the zip has no weights (model.safetensors or pytorch_model.bin)")
        else:
            raw = io.BytesIO()
            _read_member(archive, archive.getinfo(prefix + "config.json"), raw)
            meta = config_meta(raw.getvalue())
        dest.mkdir(parents=True, exist_ok=True)
        for member in members:
            target = dest / member.filename[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                _read_member(archive, member, out)
    return meta


PIPELINE_WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin")


def _pipeline_meta(archive: zipfile.ZipFile, prefix: str, names: set[str]) -> dict:
    """The meta of a diffusers pipeline folder (model_index.json at the top, a UNet's
    weights): {"diffusers": True, "pipeline_class": ...}, for text-to-image compiles."""
    if not any(w in names for w in PIPELINE_WEIGHTS):
        raise UploadError("file", "the diffusers pipeline has no UNet weights (unet/diffusion_pytorch_model.safetensors)")
    raw = io.BytesIO()
    _read_member(archive, archive.getinfo(prefix + "model_index.json"), raw)
    try:
        index = safe_json.loads(raw.getvalue())
    except safe_json.JSONInputError as exc:
        raise UploadError("file", exc.sentence("model_index.json")) from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(name, str) or "StableDiffusion" not in name:
        raise UploadError("file", "model_index.json: only Stable Diffusion pipelines (_class_name "
                                  "StableDiffusion...) are supported")
    return {"diffusers": True, "pipeline_class": name}


def _positive_int(config: dict, key: str) -> None:
    value = config.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31):
        raise UploadError("file", f"config.json: {key} must be a positive integer, not {value!r:.40}")


def config_meta(raw: bytes) -> dict:
    """The meta of an uploaded model from its config.json, checked first: JSON through
    safe_json (depth, NUL), an object with a model_type string, architectures a list
    of strings, and the numbers the forms compare against positive integers."""
    try:
        config = safe_json.loads(raw)
    except safe_json.JSONInputError as exc:
        raise UploadError("file", exc.sentence("config.json")) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise UploadError("file", "config.json has no model_type")
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        raise UploadError("file", "config.json: architectures must be a list of strings")
    for key in ("n_positions", "max_position_embeddings", "vocab_size"):
        _positive_int(config, key)
    return _meta(config)


def _meta(config: dict) -> dict:
    return {
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures") or [],
        "max_positions": config.get("n_positions") or config.get("max_position_embeddings"),
        "vocab_size": config.get("vocab_size"),
    }


def model_meta(path: Path) -> dict:
    """The meta of a model folder written here (the demo model, a fine-tune's checkpoint)."""
    return _meta(json.loads((path / "config.json").read_text()))


def dir_digest(path: Path) -> tuple[str, int]:
    """sha256 over sorted relative names and contents, and the total size."""
    digest, size = hashlib.sha256(), 0
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for file in files:
        digest.update(str(file.relative_to(path) if Path(path).is_dir() else file.name).encode())
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    return digest.hexdigest(), size


def validate_dataset(upload, dest: Path) -> tuple[str, int]:
    """Check a JSONL ("text" field per line) or CSV ("text" column) upload and store it
    at `dest` (whose suffix is chosen here). Returns (format, rows). Raises UploadError."""
    _check_size(upload, "file")
    raw = upload.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UploadError("file", "the dataset is not UTF-8 text") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise UploadError("file", f"line {line} contains a NUL byte; a dataset is text")
    name = (getattr(upload, "name", "") or "").lower()
    fmt = "csv" if name.endswith(".csv") else "jsonl"
    rows = _check_csv(text) if fmt == "csv" else _check_jsonl(text)
    if rows == 0:
        raise UploadError("file", "the dataset has no rows")
    dest.write_bytes(raw)
    return fmt, rows


def _check_jsonl(text: str) -> int:
    rows = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = safe_json.loads(line)
        except safe_json.JSONInputError as exc:
            raise UploadError("file", exc.sentence(f"line {number}")) from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UploadError("file", f'line {number} needs a "text" string field')
        rows += 1
    return rows


def _check_csv(text: str) -> int:
    try:
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise UploadError("file", 'the CSV needs a header row with a "text" column')
        return sum(1 for row in reader if (row.get("text") or "").strip())
    except csv.Error as exc:
        raise UploadError("file", f"the CSV is malformed ({exc})") from None
