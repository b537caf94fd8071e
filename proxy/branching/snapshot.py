"""Snapshots: a branch shows its parent as it was at the fork, whatever the parent does
later (docs/ARCHITECTURE.md, "Snapshots").

A child reads through its parent's overlay, so a parent's write would show through.
Before a parent's changes are logged, every live child that still reads a changed
document through the parent gets that document's pre-image copied up into its own
overlay (live copy plus hidden id; only the hidden id for a document that did not
exist) and logged in its WAL as a `keep` entry. The read planner is unchanged: the
child simply owns the document from then on, as if it had written it.

The parent's overlay changes before its entries are logged, so for that window a
branch's writes hold its fence as writers and every command on a descendant holds
its ancestors' fences as readers: a child never sees a parent's write half preserved.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from proxy.branching.errors import BranchError
from proxy.branching.idkey import idkey
from proxy.branching.wal import DELETE, KEEP, PUT, Change

if TYPE_CHECKING:
    from proxy.branching.engine import Engine
    from proxy.branching.model import Branch, NsState

# Ids per hidden-set lookup ($in lists stay small: SecantusDB's cost grows with their square).
CHUNK = 100
DUP_KEY = 11000
SYSTEM = {"app": "mongobranch", "why": "snapshot"}


class Fence:
    """Many writers of a branch at once, or many commands of its descendants at once,
    never both. The two sides take turns when both wait, so a steady stream of either
    cannot starve the other."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._active = {"w": 0, "r": 0}
        self._waiting = {"w": 0, "r": 0}
        self._turn = "w"

    @contextlib.asynccontextmanager
    async def hold(self, side: str) -> AsyncIterator[None]:
        other = "r" if side == "w" else "w"
        async with self._cond:
            self._waiting[side] += 1
            try:
                await self._cond.wait_for(lambda: not self._active[other] and (
                    not self._waiting[other] or self._turn == side))
            finally:
                self._waiting[side] -= 1
            self._active[side] += 1
            if self._waiting[other]:
                self._turn = other
        try:
            yield
        finally:
            async with self._cond:
                self._active[side] -= 1
                if not self._active[side]:
                    self._turn = other
                self._cond.notify_all()


async def preserve(engine: Engine, branch: Branch, changes: list[Change]) -> int:
    """Copy up the pre-images of a branch's changes into each child that has not diverged
    on them; returns the number of documents copied. Runs before the changes are logged."""
    kids = [b for b in engine.branches.values() if b.parent == branch.name and not b.creating]
    if not kids:
        return 0
    firsts: dict[str, dict[Any, Change]] = {}
    for change in changes:
        if change.op in (PUT, DELETE):
            firsts.setdefault(change.ns, {}).setdefault(idkey(change.id), change)
    if not firsts:
        return 0
    copied = 0
    for kid in kids:
        async with engine.branch_lock(kid.bid).exclusive():
            if engine.branches.get(kid.name) is not kid:
                continue  # dropped meanwhile
            for ns, by_id in firsts.items():
                copied += await _copy_up(engine, kid, ns, list(by_id.values()))
    return copied


async def _copy_up(engine: Engine, kid: Branch, ns: str, changes: list[Change]) -> int:
    db, coll = ns.split(".", 1)
    state = engine.state(kid, db, coll)
    if state is not None and state.base_dropped:
        return 0  # the child owns the whole collection: nothing shows through
    owned = await owned_ids(engine, state, [c.id for c in changes])
    fresh = [c for c in changes if idkey(c.id) not in owned]
    if not fresh:
        return 0
    if state is None:
        state = await engine.ensure_state(kid, db, coll, engine.pool)
    await engine.mark_dirty(state)
    docs = [c.pre for c in fresh if c.pre is not None]
    ids = [c.id for c in fresh]
    if docs:
        await _insert(engine, db, state.live, docs)
    await _insert(engine, db, state.hidden, [{"_id": i} for i in ids])
    state.hide(ids)
    await engine.wal.append(kid.bid, [Change(ns, c.id, KEEP, c.pre, c.pre) for c in fresh],
                            SYSTEM)
    return len(fresh)


async def _insert(engine: Engine, db: str, coll: str, docs: list[dict[str, Any]]) -> None:
    """Insert into an overlay; an id already there (a retried copy-up) is no error."""
    reply = await engine.pool(db, {"insert": coll, "documents": docs, "ordered": False})
    bad = [e for e in reply.get("writeErrors", []) if e.get("code") != DUP_KEY]
    if bad:
        raise BranchError(500, f"cannot preserve documents in {db}.{coll}: {bad[0]}")


async def owned_ids(engine: Engine, state: NsState | None, ids: list[Any]) -> set[Any]:
    """idkeys of the ids a branch's overlay already holds (hides from its parent)."""
    if state is None:
        return set()
    known = [state.hides(i) for i in ids]
    if all(k is not None for k in known):
        return {idkey(i) for i, k in zip(ids, known, strict=True) if k}
    found: set[Any] = set()
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        async for batch in engine.pool.batches(state.db, {
                "find": state.hidden, "filter": {"_id": {"$in": chunk}},
                "projection": {"_id": 1}}):
            found.update(idkey(d["_id"]) for d in batch)
    return found
