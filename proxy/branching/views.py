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
                skip_top_live: bool = False, base_hidden: list[Any] | None = None,
                ) -> list[Stage]:
    """Stages to run on the base collection that yield the branch view, filtered.

    skip_top_live leaves out the top branch's own live documents: what a write
    on that branch must copy from its parent. base_hidden, when given, are the only
    hidden ids the filter can select from the base (see hidden_among).
    """
    dropped_at = next((i for i, layer in enumerate(layers) if layer.base_dropped), None)
    if dropped_at is not None:
        stages = [_NOTHING]
    elif base_hidden is not None:
        stages = _match(filt) + ([{"$match": {"_id": {"$nin": base_hidden}}}]
                                 if base_hidden else [])
    else:
        stages = _match(filt) + exclusion(layers)
    for j, layer in enumerate(layers):
        if j == 0 and skip_top_live:
            continue
        if dropped_at is not None and dropped_at < j:
            break
        sub = _match(filt) + exclusion(layers[:j])
        stages.append({"$unionWith": {"coll": layer.live, "pipeline": sub}})
    return stages


def needs_anti_join(layers: list[NsState]) -> bool:
    """Whether excluding the hidden ids from the base takes the anti-join, with every
    hidden set cached (so the proxy could narrow them down first)."""
    if any(layer.hidden_ids is None for layer in layers):
        return False
    return sum(len(layer.hidden_ids or ()) for layer in layers) > NIN_LIMIT


def hidden_among(layers: list[NsState], ids: list[Any]) -> list[Any]:
    """Which of these base ids some layer hides: an id-set lookup, no query semantics."""
    return [value for value in ids if any(layer.hides(value) for layer in layers)]


def whole(layers: list[NsState]) -> str | None:
    """The one collection holding the whole view, when the top layer owns it outright
    (a copy branch, a collection dropped and refilled on the branch): reads then run
    on it as they are, with its own indexes, instead of a union over the base."""
    return layers[0].live if layers and layers[0].base_dropped else None


def view_source(coll: str, layers: list[NsState], filt: dict[str, Any] | None = None, *,
                skip_top_live: bool = False) -> tuple[str, list[Stage]]:
    """The collection to aggregate and the stages yielding the branch view from it."""
    top = None if skip_top_live else whole(layers)
    if top is not None:
        return top, _match(filt)
    return coll, view_stages(layers, filt, skip_top_live=skip_top_live)
