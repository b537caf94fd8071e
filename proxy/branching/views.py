"""The branch view of a collection as pipeline stages on its base collection.

view(b) = (view(parent) - hidden(b)) + live(b), unless b dropped the
collection, in which case view(b) = live(b). Flattened over the ancestry
chain (top layer first), every filter and stage stays the server's to
evaluate: the proxy only chooses which collections to read.
"""

from __future__ import annotations

from typing import Any

from proxy.branching.model import NsState

Stage = dict[str, Any]
_NOTHING: Stage = {"$match": {"_id": {"$in": []}}}
_HIDE_FIELD = "__mb_hidden"


def exclusion(layers: list[NsState]) -> list[Stage]:
    """Stages dropping every id hidden by any of these layers."""
    cached: list[Any] = []
    stages: list[Stage] = []
    for layer in layers:
        if layer.hidden_ids is None:
            stages += [
                {"$lookup": {"from": layer.hidden, "localField": "_id", "foreignField": "_id",
                             "as": _HIDE_FIELD}},
                {"$match": {f"{_HIDE_FIELD}.0": {"$exists": False}}},
                {"$project": {_HIDE_FIELD: 0}},
            ]
        else:
            cached.extend(layer.hidden_ids.values())
    if cached:
        stages.insert(0, {"$match": {"_id": {"$nin": cached}}})
    return stages


def _match(filt: dict[str, Any] | None) -> list[Stage]:
    return [{"$match": filt}] if filt else []


def view_stages(layers: list[NsState], filt: dict[str, Any] | None = None, *,
                skip_top_live: bool = False) -> list[Stage]:
    """Stages to run on the base collection that yield the branch view, filtered.

    skip_top_live leaves out the top branch's own live documents: what a write
    on that branch must copy from its parent.
    """
    dropped_at = next((i for i, layer in enumerate(layers) if layer.base_dropped), None)
    stages = _match(filt) + exclusion(layers) if dropped_at is None else [_NOTHING]
    for j, layer in enumerate(layers):
        if j == 0 and skip_top_live:
            continue
        if dropped_at is not None and dropped_at < j:
            break
        sub = _match(filt) + exclusion(layers[:j])
        stages.append({"$unionWith": {"coll": layer.live, "pipeline": sub}})
    return stages
