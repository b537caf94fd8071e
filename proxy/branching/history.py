"""History computed from the WAL (docs/ARCHITECTURE.md, "History"): log, diff, merge,
reset, and branches at a past point.

Everything streams in batches: a diff or a merge never holds more than one batch
of documents, whatever the number of changes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from bson.int64 import Int64

from proxy.branching import authz, copymode, gc, snapshot, viewscan
from proxy.branching.engine import MAIN, Engine
from proxy.branching.errors import BranchError, Kind
from proxy.branching.idkey import idkey
from proxy.branching.lineage import parent_layers, parent_of, replaced
from proxy.branching.model import Branch, NsState
from proxy.branching.runner import Runner, SystemContext
from proxy.branching.wal import (
    DELETE,
    DROP,
    HOLDS,
    KEEP,
    OWN,
    PUT,
    RESETS,
    STARTS,
    Change,
    image,
    matching,
)
from proxy.net.router import Context
from proxy.wire.bsonutil import same

BATCH = viewscan.BATCH
STRATEGIES = ("abort", "ours", "theirs")


# -- points in history -----------------------------------------------------------------
async def resolve_point(engine: Engine, at: Any) -> int:
    """An LSN from an LSN or an ISO-8601 time (the last entry at or before it)."""
    if isinstance(at, bool):
        raise BranchError(Kind.INVALID, f"'at'/'to' must be an LSN or an ISO-8601 time, not {at!r}")
    if isinstance(at, int):
        if at < 0:
            raise BranchError(Kind.INVALID, f"LSN must not be negative, got {at}")
        return at
    if isinstance(at, str) and at.strip().lstrip("-").isdigit():
        return await resolve_point(engine, int(at))
    if not isinstance(at, str):
        raise BranchError(Kind.INVALID, f"'at'/'to' must be an LSN or an ISO-8601 time, not {at!r}")
    try:
        when = dt.datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BranchError(Kind.INVALID, f"not an LSN or ISO-8601 time: {at!r}") from exc
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    doc = await engine.wal.entries.find_one({"ts": {"$lte": when}}, sort=[("_id", -1)])
    return int(doc["_id"]) if doc else 0


# -- log ---------------------------------------------------------------------------------
async def log(engine: Engine, name: str, limit: int = 100,
              before_lsn: int | None = None) -> list[dict[str, Any]]:
    """A branch's WAL entries, newest first. `main` has the changes made through the main
    port while main had children (docs/ARCHITECTURE.md, "Snapshots")."""
    if name == MAIN:
        engine.check_ready()
        if engine.capture is not None:
            await engine.capture.barrier()  # main's writes so far are in its log
        bid, voids = MAIN, []
    else:
        branch = engine.get(name)
        bid, voids = branch.bid, branch.voids
    if not 0 < limit <= 10_000:
        raise BranchError(Kind.INVALID, f"limit must be 1-10000, got {limit}")
    query: dict[str, Any] = {"b": bid}
    if before_lsn is not None:
        query["_id"] = {"$lt": before_lsn}
    out = []
    cursor = engine.wal.entries.find(query, {"pre": 0, "post": 0, "prez": 0, "postz": 0})
    cursor = cursor.sort("_id", -1).limit(limit)
    async for doc in cursor:
        lsn = int(doc["_id"])
        out.append({
            "lsn": lsn, "time": doc["ts"].replace(tzinfo=dt.UTC).isoformat(),
            "op": doc["op"], "ns": doc["ns"], "_id": doc.get("id"),
            "client": doc.get("client") or {},
            "visible": not any(lo < lsn <= hi for lo, hi in voids),
        })
    return out


# -- diff --------------------------------------------------------------------------------
def branch_states(engine: Engine, branch: Branch) -> list[NsState]:
    return sorted((s for s in engine.states.values() if s.bid == branch.bid),
                  key=lambda s: (s.db, s.coll))


async def _by_id(batches: AsyncIterator[list[dict[str, Any]]]) -> dict[Any, dict[str, Any]]:
    return {idkey(d["_id"]): d async for batch in batches for d in batch}


# Ids per $in lookup: a few round trips per batch; SecantusDB's $in costs grow with the
# square of the list.
IN_CHUNK = 100


def _chunks(ids: list[Any]) -> list[list[Any]]:
    return [ids[i:i + IN_CHUNK] for i in range(0, len(ids), IN_CHUNK)]


async def _find_ids(engine: Engine, db: str, coll: str,
                    ids: list[Any]) -> dict[Any, dict[str, Any]]:
    """The documents of a plain collection (an overlay) with these ids, by idkey."""
    out: dict[Any, dict[str, Any]] = {}
    for chunk in _chunks(ids):
        out.update(await _by_id(engine.pool.batches(db, {
            "find": coll, "filter": {"_id": {"$in": chunk}}}, BATCH)))
    return out


async def _view_ids(engine: Engine, db: str, coll: str, layers: list[NsState], ids: list[Any],
                    project_id: bool = False) -> dict[Any, dict[str, Any]]:
    """The documents of a view (no layers: the base) with these ids, by idkey."""
    out: dict[Any, dict[str, Any]] = {}
    for chunk in _chunks(ids):
        out.update(await _by_id(viewscan.view_batches(engine.pool, db, coll, layers,
                                                      {"_id": {"$in": chunk}},
                                                      project_id=project_id)))
    return out


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
        changes = (_diff_replaced(engine, state, layers) if whole
                   else diff_state(engine, branch, state))
        async for change in changes:
            yield change
        if whole:
            coll_change = await collection_change(engine, branch, state)
            if coll_change is not None:
                yield coll_change
        if state.indexes is not None and state.present is not False:
            async for change in _index_changes(engine, branch, state):
                yield change


async def touched(engine: Engine, branch: Branch,
                  state: NsState) -> AsyncIterator[list[tuple[Any, dict[str, Any] | None]]]:
    """Batches of the ids a branch changed in a collection, in _id order, each with the
    parent image the branch saw when it first touched it (None: absent then). Ids it
    only keeps a parent's image of are not changes; their kept image is what it saw.

    One pass over the branch's visible WAL entries for the collection: the logged ids
    are the hidden set (rematerialization rebuilds one from the other), and the first
    pre-images come with them, with no per-batch lookup in the WAL."""
    pipeline = [*matching({"b": branch.bid, "ns": f"{state.db}.{state.coll}",
                           "op": {"$nin": [*STARTS, OWN]}, **branch.visible()}),
                {"$sort": {"_id": 1}},
                {"$group": {"_id": "$id", "pre": {"$first": "$pre"},
                            "prez": {"$first": "$prez"},
                            "own": {"$max": {"$cond": [{"$eq": ["$op", KEEP]}, 0, 1]}}}},
                {"$match": {"own": 1}},
                {"$sort": {"_id": 1}}]
    async for batch in engine.pool.batches(engine.meta_db, {
            "aggregate": "wal", "pipeline": pipeline, "cursor": {}, "allowDiskUse": True},
            BATCH):
        yield [(d["_id"], image(d, "pre")) for d in batch]


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
        return dict(found[0].get("options") or {})
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


async def _diff_replaced(engine: Engine, state: NsState,
                         layers: list[NsState]) -> AsyncIterator[dict[str, Any]]:
    """A collection the branch dropped or recreated: every parent document is gone unless
    the branch holds one with its _id."""
    pool = engine.pool
    ns = f"{state.db}.{state.coll}"
    async for batch in viewscan.view_batches(pool, state.db, state.coll, layers, {}):
        mine = await _find_ids(engine, state.db, state.live, [d["_id"] for d in batch])
        for doc in batch:
            change = _classify(ns, doc["_id"], doc, mine.get(idkey(doc["_id"])))
            if change is not None:
                yield change
    async for batch in pool.batches(state.db, {"find": state.live}, BATCH):
        theirs = await _view_ids(engine, state.db, state.coll, layers,
                                 [d["_id"] for d in batch], project_id=True)
        for doc in batch:
            if idkey(doc["_id"]) not in theirs:
                yield {"ns": ns, "op": "insert", "_id": doc["_id"], "parent": None,
                       "branch": doc}


async def _index_changes(engine: Engine, branch: Branch,
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


# -- merge ---------------------------------------------------------------------------------
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
    await _scan(engine, branch, result, apply=True, caller=caller)
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
        if state.indexes is not None and state.present is not False:
            async for change in _index_changes(engine, branch, state):
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
            (change, _UNSEEN) async for change in _diff_replaced(engine, state, layers))
    else:
        source = _state_changes(engine, branch, state)
    async for pair in source:
        pending.append(pair)
        if len(pending) >= BATCH:
            await _merge_batch(state, pending, result, applier)
            pending = []
    if pending:
        await _merge_batch(state, pending, result, applier)


# The first pre-image of a change whose collection the branch replaced: not compared.
_UNSEEN = object()


async def diff_state(engine: Engine, branch: Branch,
                     state: NsState) -> AsyncIterator[dict[str, Any]]:
    async for change, _ in _state_changes(engine, branch, state):
        yield change


async def _state_changes(engine: Engine, branch: Branch, state: NsState,
                         ) -> AsyncIterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(change, first pre-image) for each document the branch changed in a collection
    it did not replace."""
    ns = f"{state.db}.{state.coll}"
    layers = parent_layers(engine, branch, state.db, state.coll)
    async for batch in touched(engine, branch, state):
        ids = [value for value, _ in batch]
        mine = await _find_ids(engine, state.db, state.live, ids)
        theirs = await _view_ids(engine, state.db, state.coll, layers, ids)
        for value, first in batch:
            change = _classify(ns, value, theirs.get(idkey(value)), mine.get(idkey(value)))
            if change is not None:
                yield change, first


async def _merge_batch(state: NsState, changes: list[tuple[dict[str, Any], Any]],
                       result: MergeResult, applier: Applier | None) -> None:
    ns = f"{state.db}.{state.coll}"
    chosen = []
    for change, first in changes:
        current = change["parent"]
        conflict = first is not _UNSEEN and not _equal(current, first)
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


def _equal(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is b
    return same(a, b)


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

    async def index(self, state: NsState, change: dict[str, Any]) -> None:
        if change["index"] == "created":
            spec = {k: v for k, v in change["spec"].items() if k not in ("v", "ns")}
            await self._command(state.db, {"createIndexes": state.coll, "indexes": [spec]})
        else:
            await self._command(state.db, {"dropIndexes": state.coll, "index": change["name"]})


# -- reset ----------------------------------------------------------------------------------
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
    await _check_reopened(engine, branch, resets, lsn)
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
    pre-image of the branch's first entry on it (a parent change before that would have
    left a `keep` entry, which no reset voids)."""
    ns = f"{state.db}.{state.coll}"
    undone = [*matching({"b": branch.bid, "ns": ns, "_id": {"$gt": lsn, "$lte": at},
                         "op": {"$nin": [*STARTS, OWN, KEEP]}}), {"$group": {"_id": "$id"}}]
    async for batch in engine.pool.batches(engine.meta_db, {
            "aggregate": "wal", "pipeline": undone, "cursor": {}, "allowDiskUse": True}):
        for chunk in _chunks([d["_id"] for d in batch]):
            by_id = {"b": branch.bid, "ns": ns, "id": {"$in": chunk}}
            seen = {idkey(d["_id"]) async for part in engine.pool.batches(engine.meta_db, {
                "aggregate": "wal", "cursor": {}, "allowDiskUse": True,
                "pipeline": [*matching({**by_id, **branch.visible()}),
                             {"$group": {"_id": "$id"}}]}) for d in part}
            rest = [i for i in chunk if idkey(i) not in seen]
            if not rest:
                continue
            firsts = [*matching({**by_id, "id": {"$in": rest}}), {"$sort": {"_id": 1}},
                      {"$group": {"_id": "$id", "first": {"$first": "$$ROOT"}}}]
            now = await _view_ids(engine, state.db, state.coll,
                                  parent_layers(engine, branch, state.db, state.coll), rest)
            keep = []
            async for part in engine.pool.batches(engine.meta_db, {
                    "aggregate": "wal", "pipeline": firsts, "cursor": {},
                    "allowDiskUse": True}):
                for doc in part:
                    img = image(doc["first"], "pre")
                    if not _equal(img, now.get(idkey(doc["_id"]))):  # the parent moved
                        keep.append(Change(ns, doc["_id"], KEEP, img, img))
            await engine.wal.append(branch.bid, keep, snapshot.SYSTEM)


async def recorded_resets(engine: Engine, branch: Branch) -> list[tuple[int, int]]:
    """Every reset of the branch as (to, at): the LSN it went back to, the LSN it took.
    Voids saved before resets were recorded count as resets too."""
    found = {(int(doc["to"]), int(doc["at"]))
             async for doc in engine.meta["resets"].find({"b": branch.bid})}
    found.update((int(lo), int(hi)) for lo, hi in branch.voids)
    return sorted(found, key=lambda r: r[1])


def voids_at(resets: list[tuple[int, int]], lsn: int | None) -> list[list[int]]:
    """The voided ranges in effect at an LSN (None: now): the last reset taken at or
    before it voids (to, at]; before `to`, the last reset taken at or before `to`
    applies, and so on. Resets off that chain (taken inside a range a later reset went
    back across) void nothing there."""
    out: list[list[int]] = []
    limit = lsn
    while True:
        before = [r for r in resets if limit is None or r[1] <= limit]
        if not before:
            return out
        to, at = max(before, key=lambda r: r[1])
        out.append([to, at])
        limit = to


def visible_at(bid: str, lsn: int, voids: list[list[int]]) -> dict[str, Any]:
    """A WAL filter for the entries a branch showed when the log stood at lsn, given the
    voids in effect then."""
    ranges = [{"_id": {"$gt": lo, "$lte": hi}, "op": {"$ne": KEEP}} for lo, hi in voids]
    return {"b": bid, "_id": {"$lte": lsn}, **({"$nor": ranges} if ranges else {})}


async def _check_reopened(engine: Engine, branch: Branch, resets: list[tuple[int, int]],
                          lsn: int) -> None:
    """gc deletes voided entries below its horizon: a point inside such a range cannot
    be rebuilt."""
    first = await gc.horizon(engine)
    for lo, hi in resets:
        if hi > lsn > lo and lo < first:
            raise BranchError(Kind.CONFLICT,
                              f"LSN {lsn} lies in a range a reset voided ({lo}-{hi}) "
                              f"whose entries gc removed below its horizon {first}")


# -- branches at a point ---------------------------------------------------------------------
async def create_at(engine: Engine, name: Any, parent: Any, at: Any,
                    port: Any = None) -> Branch:
    """A branch holding the parent's state at a past point: every document whose image
    differs between then and now is given back its image from then. Costs what the
    parent changed, never the size of the base.

    The image at the point is the fold of the entries visible then (resets made later
    do not hide them); a document the parent had not changed by then gets the parent's
    own image from then: the pre-image of its first later change."""
    if parent == MAIN or parent is None:
        return await _create_main_at(engine, name, at, port)
    source = engine.get(str(parent))
    lsn = await resolve_point(engine, at)
    await gc.check_point(engine, lsn)
    resets = await recorded_resets(engine, source)
    await _check_reopened(engine, source, resets, lsn)
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

    return await engine.create_branch(name, source.name, port, source.mode, then=restore)


async def _create_main_at(engine: Engine, name: Any, at: Any, port: Any) -> Branch:
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

    return await engine.create_branch(name, MAIN, port, None, then=restore)


async def _restore_main_at(engine: Engine, branch: Branch, lsn: int) -> None:
    """Streams the first later entry of each changed document, a batch at a time."""
    pool = engine.pool
    firsts = [*matching({"b": MAIN, "_id": {"$gt": lsn}}),
              {"$match": {"op": {"$in": [PUT, DELETE]}}},
              {"$sort": {"_id": 1}},
              {"$group": {"_id": {"ns": "$ns", "id": "$id"}, "pre": {"$first": "$pre"},
                          "prez": {"$first": "$prez"}}}]
    async for batch in pool.batches(engine.meta_db, {
            "aggregate": "wal", "pipeline": firsts, "cursor": {}, "allowDiskUse": True}):
        by_ns: dict[str, list[tuple[Any, dict[str, Any] | None]]] = {}
        for doc in batch:
            by_ns.setdefault(doc["_id"]["ns"], []).append(
                (doc["_id"]["id"], image(doc, "pre")))
        for ns, then in by_ns.items():
            db, coll = ns.split(".", 1)
            state = await engine.ensure_state(branch, db, coll, pool)
            await engine.mark_dirty(state)
            ids = [i for i, _ in then]
            now = await _find_ids(engine, db, coll, ids)
            # The capture may have kept a later image for an id meanwhile: the image
            # then replaces it.
            await pool(db, {"delete": state.live, "deletes": [
                {"q": {"_id": {"$in": ids}}, "limit": 0}]})
            await _give_back(engine, branch, state, [(i, now.get(idkey(i)), img)
                                                     for i, img in then])


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
    for chunk in _chunks(ids):
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
        theirs = await _view_ids(engine, state.db, state.coll,
                                 parent_layers(engine, source, state.db, state.coll), rest)
        for value in rest:
            then[idkey(value)] = theirs.get(idkey(value))
    now = await _view_ids(engine, state.db, state.coll,
                          engine.layers(source, state.db, state.coll), ids)
    out = []
    for value in ids:
        key = idkey(value)
        img, cur = then[key], now.get(key)
        if not _equal(img, cur):
            out.append((value, cur, img))
    return out
