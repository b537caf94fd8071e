"""Branches at a past point (docs/ARCHITECTURE.md, "History"): a new branch whose
documents are given back their images from then, at the cost of what changed since,
never the size of the base."""

from __future__ import annotations

from typing import Any

from proxy.branching import copymode, gc
from proxy.branching.engine import MAIN, Engine
from proxy.branching.errors import BranchError, Kind
from proxy.branching.history.lookup import branch_states, chunks, equal, view_ids
from proxy.branching.history.points import (
    check_reopened,
    recorded_resets,
    resolve_point,
    visible_at,
    voids_at,
)
from proxy.branching.idkey import idkey
from proxy.branching.lineage import parent_layers
from proxy.branching.model import Branch, NsState
from proxy.branching.wal import (
    DELETE,
    DROP,
    HOLDS,
    OWN,
    PUT,
    RESETS,
    STARTS,
    Change,
    image,
    matching,
)


async def create_at(engine: Engine, name: Any, parent: Any, at: Any,
                    port: Any = None, masked: bool = False) -> Branch:
    """A branch holding the parent's state at a past point: every document whose image
    differs between then and now is given back its image from then. Costs what the
    parent changed, never the size of the base.

    The image at the point is the fold of the entries visible then (resets made later
    do not hide them); a document the parent had not changed by then gets the parent's
    own image from then: the pre-image of its first later change."""
    if parent == MAIN or parent is None:
        return await _create_main_at(engine, name, at, port, masked)
    source = engine.get(str(parent))
    lsn = await resolve_point(engine, at)
    await gc.check_point(engine, lsn)
    resets = await recorded_resets(engine, source)
    await check_reopened(engine, source, resets, lsn)
    then = voids_at(resets, lsn)
    # Entries by which the view now may differ from the view then: later ones, and
    # earlier ones inside any reset's range (voided now or then).
    reopened = [{"_id": {"$gt": lo, "$lte": min(hi, lsn)}} for lo, hi in resets if lo < lsn]
    differ: dict[str, Any] = {"b": source.bid, "_id": {"$gt": lsn}, **source.visible()}
    if reopened:
        differ = {"b": source.bid, "$or": [{"_id": {"$gt": lsn}, **source.visible()},
                                           {"_id": {"$lte": lsn}, "$or": reopened}]}
    marker = await engine.wal.first({**differ, "op": {"$in": list(RESETS)}})
    if marker is not None:
        raise BranchError(Kind.CONFLICT,
                          f"{source.name} dropped or recreated {marker['ns']} after that "
                          "point; a branch at that point is not supported")
    any_later = {"b": source.bid, "$or": [{"_id": {"$gt": lsn}}, *reopened]} if reopened \
        else {"b": source.bid, "_id": {"$gt": lsn}}

    async def restore(branch: Branch) -> None:
        branch.fork_lsn = lsn
        await engine.save_branch(branch)
        if source.mode == "copy":
            await copymode.undo_to(engine, source, lsn, branch)
            return
        async with engine.writing(branch):
            await _restore_at(engine, source, branch, lsn, then, any_later)

    return await engine.create_branch(name, source.name, port, source.mode, then=restore,
                                      masked=masked)


async def _create_main_at(engine: Engine, name: Any, at: Any, port: Any,
                          masked: bool) -> Branch:
    """A branch of main at a past point, from main's history the capture logs
    (capture.py): every document main changed since then gets back the pre-image of its
    first later change (absent: it did not exist then)."""
    capture = engine.capture
    if capture is None or not capture.exact or not capture.history:
        why = capture.why if capture is not None and capture.why else \
            "capture is off or cannot have pre-images"
        raise BranchError(Kind.INVALID,
                          "a branch of main at a past point needs main's history from "
                          f"the change stream ({why})")
    # Every write made before now is logged first, so a time resolves among all of them.
    await capture.barrier()
    lsn = await resolve_point(engine, at)
    await gc.check_point(engine, lsn)
    since = capture.since_lsn or 0
    if lsn < since:
        raise BranchError(Kind.CONFLICT, f"main's history starts at LSN {since} (when its capture "
                                         f"began); LSN {lsn} is before it")
    later = {"b": MAIN, "_id": {"$gt": lsn}}
    marker = await engine.wal.first({**later, "op": DROP})
    if marker is not None:
        raise BranchError(Kind.CONFLICT,
                          f"{marker['ns']} was dropped or renamed on main after that "
                          "point; a branch at that point is not supported")
    blind = await engine.wal.first({**later, "nopre": True})
    if blind is not None:
        raise BranchError(Kind.CONFLICT,
                          f"main changed {blind['ns']} after that point without a "
                          "pre-image (pre-images were off for it): its state then is "
                          "not known")

    async def restore(branch: Branch) -> None:
        branch.fork_lsn = lsn
        await engine.save_branch(branch)
        async with engine.writing(branch):
            await _restore_main_at(engine, branch, lsn)

    return await engine.create_branch(name, MAIN, port, None, then=restore, masked=masked)


async def _restore_main_at(engine: Engine, branch: Branch, lsn: int) -> None:
    """Streams the first later entry of each changed document, a batch at a time, and
    its last: main's image now is that last entry's (the capture logged every change
    before the barrier), so the base is not read again."""
    pool = engine.pool
    firsts = [*matching({"b": MAIN, "_id": {"$gt": lsn}}),
              {"$match": {"op": {"$in": [PUT, DELETE]}}},
              {"$sort": {"_id": 1}},
              {"$group": {"_id": {"ns": "$ns", "id": "$id"}, "pre": {"$first": "$pre"},
                          "prez": {"$first": "$prez"},
                          "last": {"$last": {"op": "$op", "post": "$post",
                                             "postz": "$postz"}}}}]
    async for batch in pool.batches(engine.meta_db, {
            "aggregate": "wal", "pipeline": firsts, "cursor": {}, "allowDiskUse": True}):
        by_ns: dict[str, list[tuple[Any, Any, Any]]] = {}
        for doc in batch:
            last = doc["last"]
            by_ns.setdefault(doc["_id"]["ns"], []).append(
                (doc["_id"]["id"], image(last, "post") if last["op"] == PUT else None,
                 image(doc, "pre")))
        for ns, restore in by_ns.items():
            db, coll = ns.split(".", 1)
            state = await engine.ensure_state(branch, db, coll, pool)
            await engine.mark_dirty(state)
            # The capture may have kept a later image for an id meanwhile: the image
            # then replaces it.
            await pool(db, {"delete": state.live, "deletes": [
                {"q": {"_id": {"$in": [i for i, _, _ in restore]}}, "limit": 0}]})
            await _give_back(engine, branch, state, restore)


async def _restore_at(engine: Engine, source: Branch, branch: Branch, lsn: int,
                      then: list[list[int]], any_later: dict[str, Any]) -> None:
    pool = engine.pool
    for state in branch_states(engine, source):
        ns = f"{state.db}.{state.coll}"
        ids_pipeline = [*matching({**any_later, "ns": ns, "op": {"$nin": [*STARTS, OWN]}}),
                        {"$group": {"_id": "$id"}}]
        mine: NsState | None = None
        async for group in pool.batches(engine.meta_db, {
                "aggregate": "wal", "pipeline": ids_pipeline, "cursor": {},
                "allowDiskUse": True}):
            restore = await _images_then(engine, source, state, lsn, then,
                                         [g["_id"] for g in group])
            if not restore:
                continue
            if mine is None:
                mine = await engine.ensure_state(branch, state.db, state.coll, pool)
                await engine.mark_dirty(mine)
            await _give_back(engine, branch, mine, restore)


async def _give_back(engine: Engine, branch: Branch, state: NsState,
                     restore: list[tuple[Any, Any, Any]]) -> None:
    """A branch at a point shows these (id, image now, image then) as they were then
    (None: absent), logged as its changes."""
    ids = [i for i, _, _ in restore]
    docs = [img for _, _, img in restore if img is not None]
    if docs:
        await engine.pool(state.db, {"insert": state.live, "documents": docs,
                                     "ordered": False})
    await engine.pool(state.db, {"insert": state.hidden,
                                 "documents": [{"_id": i} for i in ids], "ordered": False})
    state.hide(ids)
    # Pre-images are the source's documents now, what the new branch hides: merging it
    # back finds no conflict unless the source changes them again.
    await engine.log_changes(branch, [
        Change(f"{state.db}.{state.coll}", i, PUT, now, img) if img is not None
        else Change(f"{state.db}.{state.coll}", i, DELETE, now, None)
        for i, now, img in restore], {"app": "mongobranch"})


async def _images_then(engine: Engine, source: Branch, state: NsState, lsn: int,
                       voids: list[list[int]], ids: list[Any]) -> list[tuple[Any, Any, Any]]:
    """(id, image now, image at lsn) for the ids whose image differs; None: absent.

    The image then is the fold of the entries visible then; for a document the source
    had not changed then, the parent's image then: the pre-image of the source's first
    later change of it, else (nothing later) the parent's image now."""
    pool = engine.pool
    ns = f"{state.db}.{state.coll}"
    then: dict[Any, dict[str, Any] | None] = {}
    for chunk in chunks(ids):
        by_id = {"ns": ns, "id": {"$in": chunk}}
        fold = [*matching({**visible_at(source.bid, lsn, voids), **by_id}),
                {"$sort": {"_id": 1}},
                {"$group": {"_id": "$id", "last": {"$last": "$$ROOT"}}}]
        async for batch in pool.batches(engine.meta_db, {
                "aggregate": "wal", "pipeline": fold, "cursor": {}, "allowDiskUse": True}):
            for doc in batch:
                last = doc["last"]
                then[idkey(doc["_id"])] = image(last, "post") if last["op"] in HOLDS else None
        firsts = [*matching({"b": source.bid, **by_id, "_id": {"$gt": lsn}}),
                  {"$sort": {"_id": 1}},
                  {"$group": {"_id": "$id", "first": {"$first": "$$ROOT"}}}]
        async for batch in pool.batches(engine.meta_db, {
                "aggregate": "wal", "pipeline": firsts, "cursor": {}, "allowDiskUse": True}):
            for doc in batch:
                then.setdefault(idkey(doc["_id"]), image(doc["first"], "pre"))
    rest = [value for value in ids if idkey(value) not in then]
    if rest:
        theirs = await view_ids(engine, state.db, state.coll,
                                 parent_layers(engine, source, state.db, state.coll), rest)
        for value in rest:
            then[idkey(value)] = theirs.get(idkey(value))
    now = await view_ids(engine, state.db, state.coll,
                          engine.layers(source, state.db, state.coll), ids)
    out = []
    for value in ids:
        key = idkey(value)
        img, cur = then[key], now.get(key)
        if not equal(img, cur):
            out.append((value, cur, img))
    return out
