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
# Up to this many hidden ids are excluded with $nin; past it an indexed anti-join
# against the hidden-id collection costs less (measured on the embedded server).
NIN_LIMIT = 64


def _anti_join(layer: NsState) -> list[Stage]:
    return [
        {"$lookup": {"from": layer.hidden, "localField": "_id", "foreignField": "_id",
                     "as": _HIDE_FIELD}},
        {"$match": {f"{_HIDE_FIELD}.0": {"$exists": False}}},
        {"$project": {_HIDE_FIELD: 0}},
    ]


def exclusion(layers: list[NsState]) -> list[Stage]:
    """Stages dropping every id hidden by any of these layers."""
    sizes = [NIN_LIMIT + 1 if layer.hidden_ids is None else len(layer.hidden_ids)
             for layer in layers]
    if sum(sizes) <= NIN_LIMIT:
        cached = [v for layer in layers for v in (layer.hidden_ids or {}).values()]
        return [{"$match": {"_id": {"$nin": cached}}}] if cached else []
    return [stage for layer, size in zip(layers, sizes, strict=True) if size
            for stage in _anti_join(layer)]


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
