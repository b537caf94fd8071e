"""Branches at a past point (docs/ARCHITECTURE.md, "History"): a new branch whose
documents are given back their images from then, at the cost of what changed since,
never the size of the base."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from proxy.branching import copymode, gc
from proxy.branching.batching import fitted
from proxy.branching.engine import MAIN, Engine
from proxy.branching.errors import BranchError, Kind
from proxy.branching.history.catalogat import branch_catalogs, main_catalogs
from proxy.branching.history.lookup import BATCH, branch_states, by_document, equal, view_ids
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
    DOCUMENT,
    DROP,
    HOLDS,
    KEEP,
    PART_IMAGES,
    PUT,
    RESETS,
    STARTS,
    WRITES,
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
    ranges = [(lo, min(hi, lsn)) for lo, hi in resets if lo < lsn]

    async def restore(branch: Branch) -> None:
        branch.fork_lsn = lsn
        await engine.save_branch(branch)
        if source.mode == "copy":
            await copymode.undo_to(engine, source, lsn, branch)
        else:
            async with engine.writing(branch):
                await _restore_at(engine, source, branch, lsn, then, ranges)
        await branch_catalogs(engine, source, branch, lsn, then)

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
        await main_catalogs(engine, branch, lsn)

    return await engine.create_branch(name, MAIN, port, None, then=restore, masked=masked)


T = TypeVar("T")
_END = object()


async def _ahead(items: AsyncIterator[T]) -> AsyncIterator[T]:
    """Asks for the next batch while the caller writes the current one: the upstream
    prepares it (a getMore) while the proxy waits on the writes anyway."""
    nxt: asyncio.Future[Any] = asyncio.ensure_future(anext(items, _END))
    try:
        while (item := await nxt) is not _END:
            nxt = asyncio.ensure_future(anext(items, _END))
            yield item
    finally:
        if not nxt.done():
            nxt.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await nxt
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            # A killCursors that fails (the connection gone) leaves the cursor to time
            # out on the server; the restore's own outcome is what is raised.
            with contextlib.suppress(Exception):
                await aclose()


async def _restore_main_at(engine: Engine, branch: Branch, lsn: int) -> None:
    """Streams the first later entry of each changed document, a batch at a time, and
    its last: main's image now is that last entry's (the capture logged every change
    before the barrier), so the base is not read again."""
    firsts = [*matching({"b": MAIN, "_id": {"$gt": lsn}}),
              {"$match": {"op": {"$in": list(WRITES)}}},
              {"$sort": {"_id": 1}},
              {"$group": {"_id": {"ns": "$ns", "id": "$id"}, "pre": {"$first": "$pre"},
                          "prez": {"$first": "$prez"}, "prex": {"$first": "$prex"},
                          "last": {"$last": {"op": "$op", "post": "$post",
                                             "postz": "$postz", "postx": "$postx"}}}}]
    # Overlays this restore created: nothing but its own writes is in them (the
    # branch's lock is held; each document comes once out of the $group).
    fresh: set[str] = set()
    async for batch in _ahead(engine.pool.batches(engine.meta_db, {
            "aggregate": "wal", "pipeline": firsts, "cursor": {}, "allowDiskUse": True})):
        async for part in engine.wal.parts(batch, lambda d: [d, d["last"]]):
            await _restore_main_part(engine, branch, part, fresh)


async def _restore_main_part(engine: Engine, branch: Branch, part: list[dict[str, Any]],
                             fresh: set[str]) -> None:
    """Give back one part of a batch of `_restore_main_at`, its images loaded."""
    pool = engine.pool
    by_ns: dict[str, list[tuple[Any, Any, Any]]] = {}
    for doc in part:
        last = doc["last"]
        by_ns.setdefault(doc["_id"]["ns"], []).append(
            (doc["_id"]["id"], image(last, "post") if last["op"] == PUT else None,
             image(doc, "pre")))
    for ns, restore in by_ns.items():
        db, coll = ns.split(".", 1)
        if engine.state(branch, db, coll) is None:
            fresh.add(ns)
        state = await engine.ensure_state(branch, db, coll, pool)
        await engine.mark_dirty(state)
        if ns not in fresh:
            # The capture kept a later image for an id before the restore took the
            # branch's lock: the image then replaces it.
            await pool(db, {"delete": state.live, "deletes": [
                {"q": {"_id": {"$in": [i for i, _, _ in restore]}}, "limit": 0}]})
        await _give_back(engine, branch, state, restore)


async def _restore_at(engine: Engine, source: Branch, branch: Branch, lsn: int,
                      then: list[list[int]], reopened: list[tuple[int, int]]) -> None:
    """One pass over the source's entries of each collection, in (id, LSN) order
    (`by_document`): a document's images then and now are folds of its entries, so the
    WAL is read once, sequentially, and never looked up per chunk of ids."""
    for state in branch_states(engine, source):
        ns = f"{state.db}.{state.coll}"
        # A drop or create of the source's own standing at the point: the collection
        # then was its entries since, without the parent's images it kept meanwhile
        # (snapshot.latent). create_at refuses one after the point, so it stands now too.
        marker = await engine.wal.first({**visible_at(source.bid, lsn, then), "ns": ns,
                                         "op": {"$in": list(STARTS)}}, newest=True)
        floor = int(marker["_id"]) if marker is not None and marker["op"] in RESETS \
            else None
        mine: NsState | None = None
        pending: list[tuple[Any, Any, Any]] = []
        # Out-of-line images loaded since the last batch went: a few of them make one.
        heavy = 0
        fold: _AtFold | None = None
        async for entry, first in by_document(engine, {"b": source.bid, "ns": ns,
                                                       "op": {"$in": list(DOCUMENT)}}):
            if first and fold is not None and (done := fold.result()) is not None:
                pending.append(done)
                if len(pending) >= BATCH or heavy >= PART_IMAGES:
                    mine = await _restore_batch(engine, source, branch, state, mine, pending)
                    pending, heavy = [], 0
            if first:
                fold = _AtFold(lsn, then, reopened, source.voids, floor)
            assert fold is not None
            heavy += await engine.wal.load([entry])
            fold.add(entry)
        if fold is not None and (done := fold.result()) is not None:
            pending.append(done)
        if pending:
            await _restore_batch(engine, source, branch, state, mine, pending)


# Images a document's entries do not give: the parent's image now (then), the source's
# view now (now); looked up by id, which only a reset's voids leave to do.
_PARENT = object()
_VIEW = object()


def _shown(entry: dict[str, Any], voids: list[list[int]]) -> bool:
    """Whether an entry is in effect under these voids (a kept image always is)."""
    lsn = int(entry["_id"])
    return entry["op"] == KEEP or not any(lo < lsn <= hi for lo, hi in voids)


def _over(entry: dict[str, Any], held: dict[str, Any] | None) -> bool:
    """Whether a later entry replaces the one a fold holds: an image kept of the parent
    never replaces an entry of the branch's own (Engine.rematerialize)."""
    return held is None or entry["op"] != KEEP or held["op"] == KEEP


class _AtFold:
    """One document's image then and now, from its entries in LSN order, keeping three
    of them at most. Then: the last entry visible at the point (`visible_at`), else the
    pre-image of the first later one, else the parent's image. Now: the last entry
    visible now, else the source's view. Nothing to restore unless an entry is after
    the point or in a range a reset reopened. Under a drop or create of the source's own
    (floor: its LSN), only the later entries of its own count, and a document none
    holds is absent, then and now."""

    def __init__(self, lsn: int, then: list[list[int]], reopened: list[tuple[int, int]],
                 now: list[list[int]], floor: int | None = None):
        self.lsn, self.then, self.reopened, self.now = lsn, then, reopened, now
        self.floor = floor
        self.id: Any = None
        self.later = False
        self.past: dict[str, Any] | None = None
        self.after: dict[str, Any] | None = None
        self.shown: dict[str, Any] | None = None

    def add(self, entry: dict[str, Any]) -> None:
        at = int(entry["_id"])
        self.id = entry["id"]
        if self.floor is not None and (at <= self.floor or entry["op"] == KEEP):
            return
        if at > self.lsn or any(lo < at <= hi for lo, hi in self.reopened):
            self.later = True
        if at <= self.lsn and _shown(entry, self.then) and _over(entry, self.past):
            self.past = entry
        if at > self.lsn and self.after is None:
            self.after = entry
        if _shown(entry, self.now) and _over(entry, self.shown):
            self.shown = entry

    def result(self) -> tuple[Any, Any, Any] | None:
        """(id, image now, image then), None when nothing changed after the point."""
        if not self.later:
            return None
        img_then: Any = _PARENT if self.floor is None else None
        if self.past is not None:
            img_then = image(self.past, "post") if self.past["op"] in HOLDS else None
        elif self.after is not None and self.floor is None:
            img_then = image(self.after, "pre")
        img_now: Any = _VIEW if self.floor is None else None
        if self.shown is not None:
            img_now = image(self.shown, "post") if self.shown["op"] in HOLDS else None
        return self.id, img_now, img_then


async def _restore_batch(engine: Engine, source: Branch, branch: Branch, state: NsState,
                         mine: NsState | None, folded: list[tuple[Any, Any, Any]],
                         ) -> NsState | None:
    """Gives back a batch of folded documents whose image differs, after looking up the
    few images their entries did not give."""
    parent = [i for i, _, then in folded if then is _PARENT]
    view = [i for i, now, _ in folded if now is _VIEW]
    theirs = await view_ids(engine, state.db, state.coll,
                            parent_layers(engine, source, state.db, state.coll),
                            parent) if parent else {}
    current = await view_ids(engine, state.db, state.coll,
                             engine.layers(source, state.db, state.coll),
                             view) if view else {}
    restore = []
    for value, now, then in folded:
        if then is _PARENT:
            then = theirs.get(idkey(value))
        if now is _VIEW:
            now = current.get(idkey(value))
        if not equal(then, now):
            restore.append((value, now, then))
    if not restore:
        return mine
    if mine is None:
        mine = await engine.ensure_state(branch, state.db, state.coll, engine.pool)
        await engine.mark_dirty(mine)
    await _give_back(engine, branch, mine, restore)
    return mine


async def _give_back(engine: Engine, branch: Branch, state: NsState,
                     restore: list[tuple[Any, Any, Any]]) -> None:
    """A branch at a point shows these (id, image now, image then) as they were then
    (None: absent), logged as its changes."""
    ids = [i for i, _, _ in restore]
    docs = [img for _, _, img in restore if img is not None]
    writes = [engine.pool(state.db, {"insert": state.hidden,
                                     "documents": [{"_id": i} for i in ids],
                                     "ordered": False})]
    # In groups under the BSON limit: images may be up to 16 MiB each.
    writes.extend(engine.pool(state.db, {"insert": state.live, "documents": group,
                                         "ordered": False}) for group in fitted(docs))
    # Pre-images are the source's documents now, what the new branch hides: merging it
    # back finds no conflict unless the source changes them again.
    log = engine.log_changes(branch, [
        Change(f"{state.db}.{state.coll}", i, PUT, now, img) if img is not None
        else Change(f"{state.db}.{state.coll}", i, DELETE, now, None)
        for i, now, img in restore], {"app": "mongobranch"})
    # Side by side: the overlay is marked dirty (a crash rebuilds it from the WAL) and
    # the branch is not served before its restore ends, so no order among them shows.
    # All end before a failure is raised: none still runs once the branch is forgotten.
    for outcome in await asyncio.gather(log, *writes, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome
    state.hide(ids)
