"""The answer before the queue: is this compile cached, and if not, about how long?

`compile_answer` is what the dry-run API, the submit form and the CLI show:
"cached: done at once" with the artifact, or "not cached: about N minutes" estimated
from past compiles of similar size on that family (with the sample size), and which
cached configurations of the same model exist, with their shapes.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

from jobs.models import Job, Kind, ModelAsset, Team

# Past compiles looked at, and how many of the nearest in size the estimate uses.
HISTORY = 200
NEAREST = 15
CONFIGURATIONS_SHOWN = 20
SHAPE_KEYS = ("task", "batch_size", "sequence_length", "height", "width", "num_images_per_prompt",
              "tensor_parallel_size", "auto_cast", "auto_cast_type", "compiler_options", "compiler_version")


def work_size(model_bytes: int, spec: dict) -> float:
    """How much a compile has to do, for comparing compiles: the model's bytes times
    its static input (tokens, or pixels for text-to-image)."""
    batch = spec.get("batch_size") or 1
    if spec.get("task") == "text-to-image":
        inputs = (spec.get("height") or 512) * (spec.get("width") or 512) * (spec.get("num_images_per_prompt") or 1)
    else:
        inputs = spec.get("sequence_length") or 1
    return max(1.0, float(model_bytes or 1)) * batch * inputs


def estimate_seconds(history: list[tuple[float, float]], size: float) -> tuple[float | None, int]:
    """(estimated seconds, sample size) from (work size, seconds) of past compiles.

    The nearest compiles in log size; how time grows with size is learned from them
    (a least-squares slope of log time on log size, kept within 0..1.2), not assumed:
    small compiles are mostly fixed cost (process start, loading, checking), big ones
    grow with the graph. Without spread in size, their median. Pure, for the bench
    and tests."""
    if not history:
        return None, 0
    target = math.log(size)
    nearest = sorted(history, key=lambda row: abs(math.log(row[0]) - target))[:NEAREST]
    xs = [math.log(work) for work, _ in nearest]
    ys = [math.log(seconds) for _, seconds in nearest]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if len(nearest) < 3 or spread < 1e-6:
        return statistics.median(seconds for _, seconds in nearest), len(nearest)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread
    slope = min(1.2, max(0.0, slope))
    # Centre on the median (robust to one slow outlier), move along the learned slope.
    centre = statistics.median(y - slope * (x - mean_x) for x, y in zip(xs, ys))
    return math.exp(centre + slope * (target - mean_x)), len(nearest)


def compile_history(family: str) -> list[tuple[float, float]]:
    """(work size, seconds) of the family's latest real compiles (no cache hits):
    submit to done is not the compile; start to finish is."""
    rows = (Job.objects.filter(kind=Kind.COMPILE, family=family, status=Job.Status.SUCCEEDED, cache_hit=False,
                               started_at__isnull=False, finished_at__isnull=False)
            .order_by("-finished_at").values_list("spec", "started_at", "finished_at", "model__size_bytes")[:HISTORY])
    return [(work_size(size or 0, spec), max(0.001, (end - start).total_seconds()))
            for spec, start, end, size in rows]


def configuration(entry: ModelAsset) -> dict[str, Any]:
    meta = entry.meta or {}
    return {"model_id": entry.pk, "name": str(entry), "compile_key": entry.compile_key,
            **{k: meta[k] for k in SHAPE_KEYS if meta.get(k) is not None}}


def cached_configurations(team: Team, model: ModelAsset) -> list[dict[str, Any]]:
    """The team's newest cached compiles of `model`, most recently used first.

    Newest by id (a backward primary-key scan that stops after a few rows) and then
    ordered by use here: ordering all of a model's entries by last use sorted every
    one of them (28 ms at 10,000 entries, bench/compile_cache.py)."""
    rows = list(ModelAsset.objects.filter(team=team, parent=model).exclude(compile_key="")
                .order_by("-pk")[:CONFIGURATIONS_SHOWN])
    rows.sort(key=lambda row: row.last_used_at or row.created_at, reverse=True)
    return [configuration(row) for row in rows]


def sentence_minutes(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    return f"about {minutes} minute{'s' if minutes != 1 else ''}"


def compile_answer(team: Team, model: ModelAsset, spec: dict, family: str, key: str) -> dict[str, Any]:
    """The pre-submit answer for a compile of `model` with `spec` (whose cache key is `key`)."""
    hit = ModelAsset.objects.filter(team=team, compile_key=key).first()
    answer: dict[str, Any] = {"compile_key": key, "cached": hit is not None,
                              "configurations": cached_configurations(team, model)}
    if hit is not None:
        answer.update(sentence="cached: done at once", artifact=configuration(hit), estimate_s=0)
        return answer
    seconds, sample = estimate_seconds(compile_history(family), work_size(model.size_bytes, spec))
    if seconds is None:
        answer.update(sentence=f"not cached: no past {family} compiles to estimate from", estimate_s=None,
                      sample_size=0)
    else:
        answer.update(sentence=f"not cached: {sentence_minutes(seconds)} (from {sample} past {family} compile"
                               f"{'s' if sample != 1 else ''} of similar size)",
                      estimate_s=round(seconds, 3), sample_size=sample)
    return answer
