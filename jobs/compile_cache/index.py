"""The compile cache index: every cached configuration (a compiled ModelAsset with a
compile key), its hits and last use, pinning, and the fleet size cap with
least-recently-used eviction of unpinned entries no job is using."""
from __future__ import annotations

import logging
import shutil
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, F, OuterRef, Q, QuerySet, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from jobs.assets import storage
from jobs.models import CompileClaim, Job, ModelAsset, Team

log = logging.getLogger(__name__)

ACTIVE_STATUSES = (Job.Status.PENDING, Job.Status.QUEUED, Job.Status.RUNNING)


def entries(teams: QuerySet[Team]) -> QuerySet[ModelAsset]:
    """The cached configurations of `teams`, most recently used first."""
    return (ModelAsset.objects.filter(team__in=teams).exclude(compile_key="")
            .select_related("team", "parent", "created_by")
            .order_by(Coalesce("last_used_at", "created_at").desc(), "-pk"))


def search(queryset: QuerySet[ModelAsset], q: str) -> QuerySet[ModelAsset]:
    """Entries whose model name, base model, builder, key prefix or compiler version match `q`."""
    q = (q or "").strip()
    if not q:
        return queryset
    return queryset.filter(Q(name__icontains=q) | Q(parent__name__icontains=q) | Q(created_by__username__icontains=q)
                           | Q(compile_key__startswith=q.lower()) | Q(meta__compiler_version__icontains=q)
                           | Q(meta__task=q))


def entry_document(entry: ModelAsset) -> dict[str, Any]:
    meta = entry.meta or {}
    return {
        "id": entry.pk, "team": entry.team.slug, "name": str(entry),
        "model": str(entry.parent) if entry.parent_id else None, "model_id": entry.parent_id,
        "format": entry.format, "compile_key": entry.compile_key,
        "shape": {k: meta[k] for k in ("batch_size", "sequence_length", "height", "width", "num_images_per_prompt")
                  if meta.get(k) is not None},
        "options": {k: meta[k] for k in ("task", "tensor_parallel_size", "auto_cast", "auto_cast_type",
                                         "compiler_options", "target") if meta.get(k) is not None},
        "compiler_version": meta.get("compiler_version"), "size_bytes": entry.size_bytes,
        "built_by": entry.created_by.username if entry.created_by_id else None,
        "source_job_id": entry.source_job_id, "compile_seconds": meta.get("compile_seconds"),
        "hits": entry.hits, "last_used_at": entry.last_used_at, "created_at": entry.created_at,
        "pinned": entry.pinned,
    }


def record_hit(entry_id: int) -> None:
    """One more hit, used now (an UPDATE of counters, no read-modify-write race)."""
    ModelAsset.objects.filter(pk=entry_id).update(hits=F("hits") + 1, last_used_at=timezone.now())


def set_pinned(entry: ModelAsset, pinned: bool) -> None:
    ModelAsset.objects.filter(pk=entry.pk).update(pinned=pinned)
    entry.pinned = pinned
    if not pinned:
        enforce_cap()


def fleet_usage() -> dict[str, Any]:
    """The cache's total size against the fleet cap (usage pages and the cache page)."""
    totals = ModelAsset.objects.exclude(compile_key="").aggregate(
        bytes=Coalesce(Sum("size_bytes"), 0), pinned=Coalesce(Sum("size_bytes", filter=Q(pinned=True)), 0))
    cap = settings.COMPILE_CACHE_MAX_BYTES
    return {"entries": ModelAsset.objects.exclude(compile_key="").count(), "size_bytes": totals["bytes"],
            "pinned_bytes": totals["pinned"], "cap_bytes": cap,
            "used_fraction": round(totals["bytes"] / cap, 4) if cap else None}


def _in_use() -> Q:
    """An entry a job is using: an active job runs on it, or compiles to its key."""
    return (Q(Exists(Job.objects.filter(model=OuterRef("pk"), status__in=ACTIVE_STATUSES)))
            | Q(Exists(Job.objects.filter(output_model=OuterRef("pk"), status__in=ACTIVE_STATUSES))))


def evictable() -> QuerySet[ModelAsset]:
    """Unpinned entries no active job uses, least recently used first."""
    return (ModelAsset.objects.exclude(compile_key="").filter(pinned=False)
            .exclude(_in_use())
            .order_by(Coalesce("last_used_at", "created_at").asc(), "pk"))


def enforce_cap(cap: int | None = None) -> list[int]:
    """Evict least-recently-used entries until the cache fits `cap` (default: the
    fleet's COMPILE_CACHE_MAX_BYTES; 0 = no cap). Never a pinned entry, never one a
    job is using: each candidate is locked (FOR UPDATE, which a submit's foreign
    key to it waits for) and checked again before its row and files go. Returns the
    evicted ids."""
    cap = settings.COMPILE_CACHE_MAX_BYTES if cap is None else cap
    if not cap:
        return []
    evicted: list[int] = []
    total = fleet_usage()["size_bytes"]
    while total > cap:
        with transaction.atomic():
            entry = evictable().select_for_update(skip_locked=True, of=("self",)).first()
            if entry is None:
                break  # everything left is pinned or in use
            deleted, _ = evictable().filter(pk=entry.pk).delete()
            if not deleted:
                continue
            CompileClaim.objects.filter(key=f"{entry.team_id}:{entry.compile_key}").delete()
            path = entry.path
            transaction.on_commit(lambda p=path: _remove_files(p))
        evicted.append(entry.pk)
        total -= entry.size_bytes
        log.info("compile cache: evicted %s (%s bytes, last used %s)", entry, entry.size_bytes, entry.last_used_at)
    return evicted


def _remove_files(rel: str) -> None:
    path = storage.abs_path(rel)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink(missing_ok=True)
