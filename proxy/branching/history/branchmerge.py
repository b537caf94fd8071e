"""Merging a branch into its parent (docs/ARCHITECTURE.md, "History"): the branch's diff
applied through the parent's own write path, with conflicts where the parent changed a
document after the branch first touched it. Not the k-way cursor merge (merge.py) nor
the `$merge` stage."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from bson.int64 import Int64

from proxy.branching import authz, snapshot
from proxy.branching.engine import Engine
from proxy.branching.errors import BranchError, Kind
from proxy.branching.history.changes import (
    collection_change,
    diff_replaced,
    index_changes,
    options_change,
    state_changes,
)
from proxy.branching.history.lookup import BATCH, branch_states, equal
from proxy.branching.lineage import parent_layers, parent_of, replaced
from proxy.branching.model import Branch, NsState
from proxy.branching.runner import Runner, SystemContext
from proxy.net.router import Context

STRATEGIES = ("abort", "ours", "theirs")


@dataclass
class MergeResult:
    branch: str
    into: str
    strategy: str
    dry_run: bool
    applied: dict[str, int] = field(default_factory=lambda: {"insert": 0, "update": 0,
                                                             "delete": 0})
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    collections: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"branch": self.branch, "into": self.into, "strategy": self.strategy,
                "dry_run": self.dry_run, "applied": self.applied,
                "conflicts": self.conflicts, "skipped_conflicts": self.skipped,
                "collections": self.collections}


# The first pre-image of a change whose collection the branch replaced: not compared.
_UNSEEN = object()


async def merge(engine: Engine, name: str, into: Any = None, strategy: Any = "abort",
                dry_run: Any = False, caller: Caller | None = None) -> dict[str, Any]:
    """Apply the branch's net changes to its parent, detecting conflicts: documents the
    parent changed after the branch first touched them. Re-running an interrupted merge
    finishes it: writes are by _id and idempotent, and a document the parent already
    holds in the branch's version is neither a conflict nor written again.

    With a `caller` (a wire client), the parent's collections are written on the
    caller's own upstream connection, so the upstream judges each write by the
    caller's privileges; without one (the admin API, the operator's channel) they are
    written with the proxy's own credentials."""
    branch = engine.get(name)
    target = branch.parent if into is None else into
    if target != branch.parent:
        raise BranchError(Kind.INVALID,
                          f"branch {name!r} merges into its parent {branch.parent!r}, "
                          f"not {target!r}")
    if strategy not in STRATEGIES:
        raise BranchError(Kind.INVALID, f"strategy must be one of {', '.join(STRATEGIES)}")
    if not isinstance(dry_run, bool):
        raise BranchError(Kind.INVALID, "dry_run must be true or false")
    result = MergeResult(name, target, strategy, dry_run)
    if strategy == "abort":
        await _scan(engine, branch, result, apply=False)
        if result.conflicts or dry_run:
            return result.to_json()
    elif dry_run:
        await _scan(engine, branch, result, apply=False)
        return result.to_json()
    await engine.meta["merges"].replace_one(
        {"_id": name}, {"_id": name, "into": target, "strategy": strategy, "status": "running",
                        "started": dt.datetime.now(dt.UTC).replace(tzinfo=None)}, upsert=True)
    if caller is not None:
        for state in branch_states(engine, branch):
            await authz.require_write(caller.run, state.db, state.coll, "mergeBranch")
    result = MergeResult(name, target, strategy, dry_run)
    merging = snapshot.MERGING.set(branch.bid)
    try:
        await _scan(engine, branch, result, apply=True, caller=caller)
    finally:
        snapshot.MERGING.reset(merging)
    await engine.meta["merges"].update_one(
        {"_id": name}, {"$set": {"status": "done", "result": result.to_json(),
                                 "lsn": Int64(await engine.wal.current())}})
    return result.to_json()


async def _scan(engine: Engine, branch: Branch, result: MergeResult, *, apply: bool,
                caller: Caller | None = None) -> None:
    applier = Applier(engine, branch, caller) if apply else None
    for state in branch_states(engine, branch):
        coll_change = (await collection_change(engine, branch, state)
                       if await replaced(engine, branch, state) else None)
        if coll_change is not None:
            result.collections.append(coll_change)
        if coll_change is None:
            await _documents(engine, branch, state, result, applier)
        elif coll_change["collection"] == "dropped":
            # Counted against the parent's documents; the drop removes them all.
            await _documents(engine, branch, state, result, None)
            if applier is not None:
                await applier.drop_collection(state)
        else:
            # Counted against the parent's documents, then the parent's collection is
            # replaced by the branch's (options included) and its documents written.
            await _documents(engine, branch, state, result, None)
            if applier is not None:
                await applier.replace_collection(state)
                await _documents(engine, branch, state, MergeResult(
                    result.branch, result.into, result.strategy, result.dry_run), applier)
        # Both known before either is applied: a change to main's collection makes the
        # branch (a child of main) take its own copy of it first (snapshot.freeze).
        modified = await options_change(engine, branch, state) if coll_change is None \
            else None
        indexes = [change async for change in index_changes(engine, branch, state)] \
            if state.indexes is not None and state.present is not False else []
        if modified is not None:
            result.collections.append(modified)
            if applier is not None:
                await applier.modify(state, modified)
        for change in indexes:
            result.collections.append(change)
            if applier is not None:
                await applier.index(state, change)


async def _documents(engine: Engine, branch: Branch, state: NsState, result: MergeResult,
                     applier: Applier | None) -> None:
    pending: list[tuple[dict[str, Any], Any]] = []
    layers = parent_layers(engine, branch, state.db, state.coll)
    if await replaced(engine, branch, state):
        # The whole collection is the branch's: no per-document conflicts.
        source: AsyncIterator[tuple[dict[str, Any], Any]] = (
            (change, _UNSEEN) async for change in diff_replaced(engine, state, layers))
    else:
        source = state_changes(engine, branch, state)
    async for pair in source:
        pending.append(pair)
        if len(pending) >= BATCH:
            await _merge_batch(state, pending, result, applier)
            pending = []
    if pending:
        await _merge_batch(state, pending, result, applier)


async def _merge_batch(state: NsState, changes: list[tuple[dict[str, Any], Any]],
                       result: MergeResult, applier: Applier | None) -> None:
    ns = f"{state.db}.{state.coll}"
    chosen = []
    for change, first in changes:
        current = change["parent"]
        conflict = first is not _UNSEEN and not equal(current, first)
        if conflict:
            if len(result.conflicts) < 1000:
                result.conflicts.append({"ns": ns, "_id": change["_id"], "op": change["op"],
                                         "parent": current, "base": first,
                                         "branch": change["branch"]})
            if result.strategy == "theirs":
                result.skipped += 1
                continue
        chosen.append(change)
        result.applied[change["op"]] += 1
    if applier is not None and chosen:
        await applier.documents(state, chosen)


@dataclass
class Caller:
    """The client a merge runs for: its connection and its identity in the WAL."""

    run: Runner
    ctx: Context


class Applier:
    """Writes a merge into the parent: the base collections for main, else through the
    parent branch's own write path, so its WAL records the merge."""

    def __init__(self, engine: Engine, branch: Branch, caller: Caller | None = None):
        self.engine = engine
        self.parent = parent_of(engine, branch)
        self.run = engine.pool if caller is None else caller.run
        self.ctx: Context = SystemContext() if caller is None else caller.ctx

    async def _command(self, db: str, cmd: dict[str, Any]) -> dict[str, Any]:
        reply = await self.engine.write(self.parent, self.ctx, self.run, db, cmd)
        if reply is None or not reply.get("ok"):
            raise BranchError(Kind.INTERNAL, f"merge write failed: {reply}")
        return reply

    async def documents(self, state: NsState, changes: list[dict[str, Any]]) -> None:
        puts = [{"q": {"_id": c["_id"]}, "u": c["branch"], "upsert": True}
                for c in changes if c["branch"] is not None]
        deletes = [{"q": {"_id": c["_id"]}, "limit": 1} for c in changes if c["branch"] is None]
        if puts:
            reply = await self._command(state.db, {"update": state.coll, "updates": puts,
                                                   "ordered": False})
            if reply.get("writeErrors"):
                raise BranchError(Kind.CONFLICT, f"merge write failed: {reply['writeErrors'][0]}")
        if deletes:
            await self._command(state.db, {"delete": state.coll, "deletes": deletes,
                                           "ordered": False})

    async def drop_collection(self, state: NsState) -> None:
        """The branch dropped the collection: so does the parent."""
        await self._command(state.db, {"drop": state.coll})

    async def replace_collection(self, state: NsState) -> None:
        """The branch recreated the collection: so does the parent, with its options."""
        await self._command(state.db, {"drop": state.coll})
        await self._command(state.db, {"create": state.coll, **state.options})

    async def modify(self, state: NsState, change: dict[str, Any]) -> None:
        """The branch changed the collection's options (collMod): so does the parent."""
        await self._command(state.db, {"collMod": state.coll, **change["options"]})

    async def index(self, state: NsState, change: dict[str, Any]) -> None:
        if change["index"] == "modified":
            await self._command(state.db, {"collMod": state.coll, "index": {
                "keyPattern": change["spec"]["key"], **change["options"]}})
        elif change["index"] == "created":
            spec = {k: v for k, v in change["spec"].items() if k not in ("v", "ns")}
            await self._command(state.db, {"createIndexes": state.coll, "indexes": [spec]})
        else:
            await self._command(state.db, {"dropIndexes": state.coll, "index": change["name"]})
