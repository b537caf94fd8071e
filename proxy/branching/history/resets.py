"""Taking a branch back to a point (docs/ARCHITECTURE.md, "History"): later entries are
voided, not deleted, so a later reset can bring them back."""

from __future__ import annotations

from typing import Any

from bson.int64 import Int64

from proxy.branching import copymode, gc, snapshot
from proxy.branching.engine import Engine
from proxy.branching.errors import BranchError, Kind
from proxy.branching.history.lookup import branch_states, chunks, equal, view_ids
from proxy.branching.history.points import check_reopened, recorded_resets, resolve_point, voids_at
from proxy.branching.idkey import idkey
from proxy.branching.lineage import parent_layers
from proxy.branching.model import Branch, NsState
from proxy.branching.voids import written_through
from proxy.branching.wal import KEEP, RESETS, WRITES, Change, image, matching


async def reset(engine: Engine, name: str, to: Any) -> dict[str, Any]:
    """Return the branch to its state at an LSN or time. Later entries stay in the WAL,
    voided; child branches first take a copy of what they saw, so they keep it.

    The state at an LSN is the one the branch showed when the log stood there, resets
    included: every reset is recorded as (to, at), taking an LSN of its own (at), and
    the entries in effect at a point n are those at or before n outside the chain of
    resets that led there (see voids_at). The branch's voids are that chain for now, so
    a reset into a range an earlier reset voided brings back what was visible then."""
    branch = engine.get(name)
    lsn = await resolve_point(engine, to)
    await gc.check_point(engine, lsn)
    resets = await recorded_resets(engine, branch)
    await check_reopened(engine, branch, resets, lsn)
    for state in branch_states(engine, branch):
        if state.reset_floor is not None and lsn < state.reset_floor:
            raise BranchError(Kind.CONFLICT,
                              f"{name} dropped or recreated {state.db}.{state.coll} at LSN "
                              f"{state.reset_floor} and was merged since, which changed its "
                              "parent's collection: a reset to before that LSN cannot show "
                              "the parent's collection as it was")
    if branch.mode == "copy":
        # A copy is taken back by undoing its visible entries after the point: right
        # only when the point's voids are the current ones below it.
        current = voids_at(resets, None)
        if any(lo < lsn < hi for lo, hi in current) or \
                voids_at(resets, lsn) != [v for v in current if v[1] <= lsn]:
            raise BranchError(Kind.CONFLICT, f"{name} is a copy branch: it cannot be reset into a "
                                             "range an earlier reset voided")
    async with engine.writing(branch):
        # The LSN of the reset itself: above every entry written before it, so the
        # state at the last entry's LSN stays the one before the reset.
        at = await engine.wal.reserve(1)
        after = [*resets, (lsn, at)] if lsn < at else resets
        # Entries voided now that the reset brings back.
        voids = voids_at(after, None)
        # Children keep what they show of every collection the reset takes back
        # (documents, presence, indexes): they read none of it through the branch after.
        frozen = 0
        for state in branch_states(engine, branch):
            frozen += await snapshot.freeze(engine, branch.name, state.db, [state.coll])
        voided = await engine.wal.count(
            {"b": branch.bid, "_id": {"$gt": lsn, "$lte": at}, **branch.visible()})
        if branch.mode == "copy":
            await copymode.undo_to(engine, branch, lsn)  # under the voids before this one
        # Voids first: they name this reset too (recorded_resets reads both), so a
        # crash between the two loses nothing.
        branch.voids = voids
        await engine.save_branch(branch)
        if lsn < at:
            await engine.meta["resets"].insert_one({"b": branch.bid, "to": Int64(lsn),
                                                    "at": Int64(at)})
        for state in branch_states(engine, branch) if branch.mode != "copy" else []:
            await _keep_fork_images(engine, branch, state, lsn, at)
            await engine.mark_dirty(state)
            await engine.rematerialize(state)
    return {"branch": name, "to_lsn": lsn, "voided_entries": voided,
            "copied_into_children": frozen}


async def _keep_fork_images(engine: Engine, branch: Branch, state: NsState, lsn: int,
                            at: int) -> None:
    """After a reset voided the branch's own writes of a document, the branch reads it
    through its parent again, which may have changed it since the fork (no copy was kept
    while the branch held its own). Keep the parent's image as at the fork for it: the
    pre-image of the branch's first entry on it written while it read the document
    through its parent (a parent change before that would have left a `keep` entry,
    which no reset voids). An entry written while a drop or create of the branch's own
    stood has no such pre-image; the parent's changes then were kept as they came
    (snapshot.latent). Nothing to keep while such a drop stands after the reset; in a
    collection the branch holds whole (`own`), every image it showed is kept, as the
    overlay alone shows it."""
    ns = f"{state.db}.{state.coll}"
    if await engine.wal.first({"b": branch.bid, "ns": ns, "op": {"$in": list(RESETS)},
                               **branch.visible()}):
        return
    through = await written_through(engine, branch, ns)
    undone = [*matching({"b": branch.bid, "ns": ns, "_id": {"$gt": lsn, "$lte": at},
                         "op": {"$in": list(WRITES)}}), {"$group": {"_id": "$id"}}]
    async for batch in engine.pool.batches(engine.meta_db, {
            "aggregate": "wal", "pipeline": undone, "cursor": {}, "allowDiskUse": True}):
        for chunk in chunks([d["_id"] for d in batch]):
            by_id = {"b": branch.bid, "ns": ns, "id": {"$in": chunk}}
            seen = {idkey(d["_id"]) async for part in engine.pool.batches(engine.meta_db, {
                "aggregate": "wal", "cursor": {}, "allowDiskUse": True,
                "pipeline": [*matching({**by_id, **branch.visible()}),
                             {"$group": {"_id": "$id"}}]}) for d in part}
            rest = [i for i in chunk if idkey(i) not in seen]
            if not rest:
                continue
            firsts = [*matching({**by_id, "id": {"$in": rest},
                                 **through}),
                      {"$sort": {"_id": 1}},
                      {"$group": {"_id": "$id", "first": {"$first": "$$ROOT"}}}]
            now = {} if state.owned else await view_ids(
                engine, state.db, state.coll,
                parent_layers(engine, branch, state.db, state.coll), rest)
            async for part in engine.pool.batches(engine.meta_db, {
                    "aggregate": "wal", "pipeline": firsts, "cursor": {},
                    "allowDiskUse": True}):
                # A part at a time: the images are loaded, up to 16 MiB each.
                async for loaded in engine.wal.parts(part, lambda d: [d["first"]]):
                    await engine.wal.append(branch.bid, _moved(ns, loaded, now),
                                            snapshot.SYSTEM)


def _moved(ns: str, firsts: list[dict[str, Any]],
           now: dict[Any, dict[str, Any]]) -> list[Change]:
    """`keep` entries of the parent's images at the fork (the pre-images of the first
    entries, loaded) where the parent's now differ."""
    keep = []
    for doc in firsts:
        img = image(doc["first"], "pre")
        # Held whole: the overlay shows nothing else; else: the parent moved.
        if not equal(img, now.get(idkey(doc["_id"]))):
            keep.append(Change(ns, doc["_id"], KEEP, None, img))
    return keep
