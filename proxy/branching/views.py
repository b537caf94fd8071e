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


_LIVE_FIELD = "__mb_live"
# The live documents a leading $match selects enter the base's pipeline as a literal
# when both sides are known to be this small: $facet holds the base side in one
# document meanwhile (mongod caps it at 100 MB; 16 MB keeps far below).
INJECT_DOCS = 1000
INJECT_BYTES = 16 * 1024 * 1024


def injects_live(base_docs: int, base_bytes: int, live_docs: int, live_bytes: int) -> bool:
    """Whether the live documents go in as a literal rather than a $unionWith of the
    live collection. The union's sub-pipeline $match scans the whole overlay on
    SecantusDB (mongod would use the overlay's index); an indexed find on the overlay
    plus the literal costs what the selected documents cost, whatever the overlay's
    size, at the price of holding the small base side in one $facet document."""
    return (base_docs <= INJECT_DOCS and live_docs <= INJECT_DOCS
            and base_bytes + 2 * live_bytes <= INJECT_BYTES)


def inject(docs: list[dict[str, Any]]) -> list[Stage]:
    """Stages appending these documents to the stream (none: nothing to append)."""
    if not docs:
        return []
    # mongod refuses an empty $facet sub-pipeline; $match {} passes every document.
    return [{"$facet": {_LIVE_FIELD: [{"$match": {}}]}},
            {"$project": {_LIVE_FIELD: {
                "$concatArrays": [f"${_LIVE_FIELD}", {"$literal": docs}]}}},
            {"$unwind": f"${_LIVE_FIELD}"},
            {"$replaceRoot": {"newRoot": f"${_LIVE_FIELD}"}}]


def view_stages(layers: list[NsState], filt: dict[str, Any] | None = None, *,
                skip_top_live: bool = False, base_hidden: list[Any] | None = None,
                live_docs: list[dict[str, Any]] | None = None) -> list[Stage]:
    """Stages to run on the base collection that yield the branch view, filtered.

    skip_top_live leaves out the top branch's own live documents: what a write
    on that branch must copy from its parent. base_hidden, when given, are the only
    hidden ids the filter can select from the base (see hidden_among). live_docs,
    when given, are every layer's live documents the filter selects (see live_view),
    appended as a literal instead of a union of each live collection.
    """
    dropped_at = next((i for i, layer in enumerate(layers) if layer.base_dropped), None)
    if dropped_at is not None:
        stages = [_NOTHING]
    elif base_hidden is not None:
        stages = _match(filt) + ([{"$match": {"_id": {"$nin": base_hidden}}}]
                                 if base_hidden else [])
    else:
        stages = _match(filt) + exclusion(layers)
    if live_docs is not None:
        return stages + inject(live_docs)
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


def live_view(layers: list[NsState], live: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each layer's selected live documents, minus those a layer above hides (the
    union's exclusion, as an id-set lookup); every hidden set is cached."""
    out: list[dict[str, Any]] = []
    for j, docs in enumerate(live):
        out.extend(d for d in docs if not any(layer.hides(d["_id"]) for layer in layers[:j]))
    return out


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


# Collection options the server enforces on writes: an overlay that takes a branch's
# writes carries them, so the upstream validates those writes as it would the base's.
ENFORCED = ("validator", "validationLevel", "validationAction")


def shown_view(layers: list[NsState]) -> tuple[bool, dict[str, Any] | None]:
    """Whether the layers decide what the name is, and its view definition (viewOn,
    pipeline, collation) when they make it a view. A layer that does not say (a write
    to a collection of the parent) still decides: nothing writes into a view, so only
    a view the branch defined or pinned (snapshot.freeze) has a layer."""
    for layer in layers:
        if layer.present is not None or layer.base_dropped:
            if layer.present and "viewOn" in layer.options:
                return True, dict(layer.options)
            return True, None
    return bool(layers), None


def options_of(layers: list[NsState]) -> dict[str, Any]:
    """The collection options the branch set (create, collMod) nearest the top, down to
    the layer that replaced the collection; {}: the parent's (the base's) own."""
    for layer in layers:
        if layer.options:
            return layer.options
        if layer.base_dropped:
            return {}
    return {}


def enforced(layers: list[NsState]) -> dict[str, Any]:
    """The validation options the branch's overlay must carry (see ENFORCED)."""
    options = options_of(layers)
    return {k: options[k] for k in ENFORCED if k in options}


# Per (branch id, database): the base's views, read once (catalog.base_views). A name no
# layer of the branch decides is one the base has not changed since the fork: every view
# main creates, redefines or drops after it is first pinned in its children
# (snapshot.freeze, snapshot.pin_absent), so what the base showed of that name when this
# was read is what it shows for the branch's whole life.
BASE_VIEWS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}


def forget_base_views(bid: str) -> None:
    """A dropped branch's cache of the base's views."""
    for key in [k for k in BASE_VIEWS if k[0] == bid]:
        del BASE_VIEWS[key]
