"""A branch's changes against its parent's current state (docs/ARCHITECTURE.md,
"History"): documents, then collections and indexes. What a merge applies is this diff,
so both read it from here."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import bson

from proxy.branching import views, viewscan
from proxy.branching.batching import fitted
from proxy.branching.engine import Engine
from proxy.branching.history.lookup import (
    BATCH,
    SCAN_RATIO,
    OrderedSide,
    branch_states,
    collated,
    collection_count,
    find_ids,
    ordered_overlay,
    ordered_view,
    view_ids,
)
from proxy.branching.idkey import idkey
from proxy.branching.lineage import parent_layers, parent_of, replaced
from proxy.branching.masking import Masker
from proxy.branching.model import Branch, NsState
from proxy.branching.stages import documents_stage
from proxy.branching.wal import DOCUMENT, KEEP, first_pre, image, matching
from proxy.wire.bsonutil import same


def _classify(ns: str, key_id: Any, parent: dict[str, Any] | None,
              mine: dict[str, Any] | None) -> dict[str, Any] | None:
    if parent is None and mine is None:
        return None
    if parent is None:
        op = "insert"
    elif mine is None:
        op = "delete"
    elif same(parent, mine):
        return None
    else:
        op = "update"
    return {"ns": ns, "op": op, "_id": key_id, "parent": parent, "branch": mine}


async def diff(engine: Engine, name: str) -> AsyncGenerator[dict[str, Any], None]:
    """Document changes of a branch relative to its parent's current state, then its
    collection and index changes ({"ns", "collection"|"index", ...})."""
    branch = engine.get(name)
    for state in branch_states(engine, branch):
        layers = parent_layers(engine, branch, state.db, state.coll)
        whole = await replaced(engine, branch, state)
        changes = (diff_replaced(engine, state, layers) if whole
                   else diff_state(engine, branch, state))
        async for change in changes:
            yield change
        coll_change = await (collection_change(engine, branch, state) if whole
                             else options_change(engine, branch, state))
        if coll_change is not None:
            yield coll_change
        if state.indexes is not None and state.present is not False:
            async for change in index_changes(engine, branch, state):
                yield change


async def touched(engine: Engine, branch: Branch,
                  state: NsState) -> AsyncIterator[list[tuple[Any, dict[str, Any] | None]]]:
    """Batches of the ids a branch changed in a collection, in _id order, each with the
    parent image the branch saw when it first touched it (None: absent then). Ids it
    only keeps a parent's image of are not changes; their kept image is what it saw.

    One pass over the branch's visible WAL entries for the collection: the logged ids
    (of an overlay over its parent, the hidden set: rematerialization rebuilds one from
    the other), and the first pre-images come with them, with no per-batch lookup in the
    WAL."""
    pipeline = [*matching({"b": branch.bid, "ns": f"{state.db}.{state.coll}",
                           "op": {"$in": list(DOCUMENT)}, **branch.visible()}),
                {"$sort": {"_id": 1}},
                {"$group": {"_id": "$id", **first_pre(),
                            "own": {"$max": {"$cond": [{"$eq": ["$op", KEEP]}, 0, 1]}}}},
                {"$match": {"own": 1}},
                {"$sort": {"_id": 1}}]
    async for batch in engine.pool.batches(engine.meta_db, {
            "aggregate": "wal", "pipeline": pipeline, "cursor": {}, "allowDiskUse": True},
            BATCH):
        async for part in engine.wal.parts(batch):
            yield [(d["_id"], image(d, "pre")) for d in part]


async def parent_collection(engine: Engine, branch: Branch, db: str,
                            coll: str) -> dict[str, Any] | None:
    """The options of the collection as the branch's parent shows it; None if absent."""
    layers = parent_layers(engine, branch, db, coll)
    for layer in layers:
        if layer.present is not None:
            if not layer.present:
                return None
            break
    reply = await engine.pool.reply(db, {"listCollections": 1, "filter": {"name": coll}})
    found = reply["cursor"]["firstBatch"] if reply.get("ok") else []
    if found and not any(layer.base_dropped for layer in layers):
        return dict(views.options_of(layers) or found[0].get("options") or {})
    owner = next((layer for layer in layers if layer.present), None)
    return None if owner is None else dict(owner.options)


def _comparable(options: dict[str, Any]) -> dict[str, Any]:
    """Collection options that make a recreated collection another one: pre-images are
    turned on for main's collections by the capture itself (capture.py)."""
    return {k: v for k, v in options.items() if k != "changeStreamPreAndPostImages"}


async def collection_change(engine: Engine, branch: Branch,
                            state: NsState) -> dict[str, Any] | None:
    """For a collection the branch dropped (and maybe recreated): the change a merge
    makes to the parent's collection itself, None when the parent already matches."""
    ns = f"{state.db}.{state.coll}"
    theirs = await parent_collection(engine, branch, state.db, state.coll)
    if not state.present:
        return None if theirs is None else {"ns": ns, "collection": "dropped"}
    if theirs is not None and _comparable(theirs) == _comparable(state.options):
        return None  # documents and indexes carry the rest
    return {"ns": ns, "collection": "recreated"}


# Collection options a collMod on a branch changes, which a merge carries to the parent.
MODIFIABLE = (*views.ENFORCED, "changeStreamPreAndPostImages")


async def options_change(engine: Engine, branch: Branch,
                         state: NsState) -> dict[str, Any] | None:
    """For a collection the branch kept (not replaced) and changed with collMod: the
    options a merge sets on the parent's collection; None when it already has them."""
    if state.base_dropped or not state.options or state.present is False \
            or "viewOn" in state.options:
        return None
    theirs = await parent_collection(engine, branch, state.db, state.coll)
    if theirs is None:
        return None
    before = state.options_base or {}
    changed = {k: v for k, v in state.options.items()
               if k in MODIFIABLE and theirs.get(k) != v
               and (state.options_base is None or before.get(k) != v)}
    if not changed:
        return None
    return {"ns": f"{state.db}.{state.coll}", "collection": "modified", "options": changed}


def _index_options(spec: dict[str, Any]) -> dict[str, Any]:
    """What collMod changes of an index: its TTL and whether it is hidden."""
    out: dict[str, Any] = {"hidden": bool(spec.get("hidden"))}
    if "expireAfterSeconds" in spec:
        out["expireAfterSeconds"] = spec["expireAfterSeconds"]
    return out


async def diff_replaced(engine: Engine, state: NsState,
                         layers: list[NsState]) -> AsyncIterator[dict[str, Any]]:
    """A collection the branch dropped or recreated: every parent document is gone unless
    the branch holds one with its _id."""
    pool = engine.pool
    ns = f"{state.db}.{state.coll}"
    async for batch in viewscan.view_batches(pool, state.db, state.coll, layers, {}):
        mine = await find_ids(engine, state.db, state.live, [d["_id"] for d in batch])
        for doc in batch:
            change = _classify(ns, doc["_id"], doc, mine.get(idkey(doc["_id"])))
            if change is not None:
                yield change
    async for batch in pool.batches(state.db, {"find": state.live}, BATCH):
        theirs = await view_ids(engine, state.db, state.coll, layers,
                                 [d["_id"] for d in batch], project_id=True)
        for doc in batch:
            if idkey(doc["_id"]) not in theirs:
                yield {"ns": ns, "op": "insert", "_id": doc["_id"], "parent": None,
                       "branch": doc}


async def index_changes(engine: Engine, branch: Branch,
                         state: NsState) -> AsyncIterator[dict[str, Any]]:
    ns = f"{state.db}.{state.coll}"
    parent = parent_of(engine, branch)
    if parent is None:
        reply = await engine.pool.reply(state.db, {"listIndexes": state.coll})
        theirs = reply["cursor"]["firstBatch"] if reply.get("ok") else []
    else:
        theirs = await engine.view_indexes(parent, state.db, state.coll, engine.pool)
    # Every collection has its _id index: never a change.
    mine = {ix["name"]: ix for ix in state.indexes or [] if ix["name"] != "_id_"}
    other = {ix["name"]: ix for ix in theirs if ix["name"] != "_id_"}
    created, dropped = set(mine) - set(other), set(other) - set(mine)
    if state.index_base is not None:
        # Kept from before the parent changed its list: only what the branch itself
        # changed since then counts, and only where the parent does not match it yet.
        base = {ix["name"] for ix in state.index_base}
        created -= base
        dropped &= base
    kept = {ix["name"]: ix for ix in state.index_base or []}
    for name in sorted(set(mine) & set(other)):
        ours = _index_options(mine[name])
        if ours == _index_options(other[name]) or (
                name in kept and ours == _index_options(kept[name])):
            continue  # the same, or changed by the parent only since the branch detached
        theirs = _index_options(other[name])
        yield {"ns": ns, "index": "modified", "name": name, "spec": mine[name],
               "options": {k: v for k, v in ours.items() if theirs.get(k) != v}}
    for name in sorted(created):
        yield {"ns": ns, "index": "created", "name": name, "spec": mine[name]}
    for name in sorted(dropped):
        yield {"ns": ns, "index": "dropped", "name": name, "spec": other[name]}


def summarize(summary: dict[str, Any], change: dict[str, Any]) -> None:
    per = summary.setdefault(change["ns"], {"insert": 0, "update": 0, "delete": 0,
                                            "collection": None, "indexes": 0})
    if "op" in change:
        per[change["op"]] += 1
    elif "collection" in change:
        per["collection"] = change["collection"]
    else:
        per["indexes"] += 1


async def diff_state(engine: Engine, branch: Branch,
                     state: NsState) -> AsyncIterator[dict[str, Any]]:
    async for change, _ in state_changes(engine, branch, state):
        yield change


async def state_changes(engine: Engine, branch: Branch, state: NsState,
                         ) -> AsyncIterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(change, first pre-image) for each document the branch changed in a collection
    it did not replace."""
    ns = f"{state.db}.{state.coll}"
    layers = parent_layers(engine, branch, state.db, state.coll)
    sides: tuple[OrderedSide | None, OrderedSide | None] | None = None
    try:
        async for batch in touched(engine, branch, state):
            ids = [value for value, _ in batch]
            if sides is None:
                sides = await _ordered_sides(engine, branch, state, layers, ids)
            mine_side, their_side = sides
            mine = await (mine_side.upto(ids) if mine_side is not None
                          else find_ids(engine, state.db, state.live, ids))
            theirs = await (their_side.upto(ids) if their_side is not None
                            else view_ids(engine, state.db, state.coll, layers, ids))
            for value, first in batch:
                change = _classify(ns, value, theirs.get(idkey(value)),
                                   mine.get(idkey(value)))
                if change is not None:
                    yield change, first
    finally:
        for side in sides or ():
            if side is not None:
                await side.close()


async def _ordered_sides(engine: Engine, branch: Branch, state: NsState,
                         layers: list[NsState], ids: list[Any]
                         ) -> tuple[OrderedSide | None, OrderedSide | None]:
    """Which sides of a diff are read once in _id order rather than looked up a batch
    of ids at a time: those holding at most SCAN_RATIO documents per entry the branch
    logged in the collection, once there is more than one batch of ids."""
    if len(ids) < BATCH:
        return None, None  # one batch: one lookup per side
    if "collation" in (state.options or {}) \
            or any("collation" in (layer.options or {}) for layer in layers) \
            or await collated(engine, state.db, state.coll):
        return None, None  # the sides' _id order would not be the changed ids' order
    entries = await engine.wal.count({"b": branch.bid, "ns": f"{state.db}.{state.coll}"})
    mine = await collection_count(engine, state.db, state.live)
    mine_side = ordered_overlay(engine, state.db, state.live) \
        if mine <= SCAN_RATIO * entries else None
    theirs = sum([await collection_count(engine, state.db, layer.live) for layer in layers],
                 0 if any(layer.base_dropped for layer in layers)
                 else await collection_count(engine, state.db, state.coll))
    their_side = ordered_view(engine, state.db, state.coll, layers) \
        if theirs <= SCAN_RATIO * entries else None
    return mine_side, their_side


# Images sent to the upstream in one masking round trip: a command holds 16 MiB at most
# (a larger image goes alone).
MASK_BYTES = 4 * 1024 * 1024
_SIDES = ("parent", "branch")


async def masked_diff(engine: Engine, masker: Masker,
                      changes: AsyncGenerator[dict[str, Any], None]
                      ) -> AsyncGenerator[dict[str, Any], None]:
    """A masked branch's diff: the document images of its masked collections, the
    branch's and its parent's alike, masked by the upstream with the branch's rules and
    salt (the values its port shows), a batch at a time; the rest passes as it is."""
    async with contextlib.aclosing(changes):
        async for change in _masked_batches(engine, masker, changes):
            yield change


async def _masked_batches(engine: Engine, masker: Masker,
                          changes: AsyncIterator[dict[str, Any]]
                          ) -> AsyncGenerator[dict[str, Any], None]:
    held: list[dict[str, Any]] = []
    size = 0
    async for change in changes:
        if "op" not in change or not masker.rules.get(change["ns"]):
            for done in await _masked(engine, masker, held):
                yield done
            held, size = [], 0
            yield change
            continue
        weight = sum(len(bson.encode(change[s])) for s in _SIDES if change.get(s))
        if held and (len(held) >= BATCH or size + weight > MASK_BYTES):
            for done in await _masked(engine, masker, held):
                yield done
            held, size = [], 0
        held.append(change)
        size += weight
    for done in await _masked(engine, masker, held):
        yield done


async def _masked(engine: Engine, masker: Masker,
                  changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items = [{"i": i, "s": side, "ns": change["ns"], "d": change[side]}
             for i, change in enumerate(changes) for side in _SIDES
             if change.get(side) is not None]
    stage = masker.images(["d"], [c["ns"] for c in changes])
    if not items or stage is None:
        return changes
    out = [dict(c) for c in changes]
    # Images of up to 16 MiB each: as many in one command as fit under the BSON limit.
    for group in fitted(items):
        async for batch in engine.pool.batches(engine.meta_db, {
                "aggregate": 1, "pipeline": [documents_stage(group), stage,
                                             {"$project": {"i": 1, "s": 1, "d": 1}}]}, BATCH):
            for item in batch:
                out[int(item["i"])][str(item["s"])] = item["d"]
    return out
