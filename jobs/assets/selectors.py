"""Reads for the model and dataset pages."""
from __future__ import annotations

from dataclasses import dataclass

from jobs.models import ModelAsset, Team


@dataclass(frozen=True)
class LineageRow:
    model: ModelAsset
    depth: int  # 0 = a root (uploaded) model; children are indented under their parent


def model_lineage(team: Team) -> list[LineageRow]:
    """The team's models as a depth-first tree: base → fine-tuned → compiled.

    One query; a model whose parent belongs to no listed row (deleted, or another
    team's) is shown as a root."""
    models = list(ModelAsset.objects.filter(team=team).select_related("created_by", "source_job")
                  .order_by("name", "version"))
    ids = {m.pk for m in models}
    children: dict[int | None, list[ModelAsset]] = {}
    for model in models:
        children.setdefault(model.parent_id if model.parent_id in ids else None, []).append(model)
    rows: list[LineageRow] = []
    stack = [(m, 0) for m in reversed(children.get(None, []))]
    while stack:
        model, depth = stack.pop()
        rows.append(LineageRow(model, depth))
        stack.extend((c, depth + 1) for c in reversed(children.get(model.pk, [])))
    return rows
