"""Documents by _id, a chunk of ids at a time, from an overlay or a view: what diff,
merge, reset and branches at a point compare with the WAL's images."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from bson import ObjectId
from bson.int64 import Int64

from proxy.branching import bsonorder, views, viewscan
from proxy.branching.engine import Engine
from proxy.branching.idkey import idkey
from proxy.branching.model import Branch, NsState
from proxy.branching.wal import matching
from proxy.wire.bsonutil import same

BATCH = viewscan.BATCH


def branch_states(engine: Engine, branch: Branch) -> list[NsState]:
    return sorted((s for s in engine.states.values() if s.bid == branch.bid),
                  key=lambda s: (s.db, s.coll))


async def _by_id(batches: AsyncIterator[list[dict[str, Any]]]) -> dict[Any, dict[str, Any]]:
    return {idkey(d["_id"]): d async for batch in batches for d in batch}


# Ids per $in lookup: a few round trips per batch; SecantusDB's $in costs grow with the
# square of the list.
IN_CHUNK = 100


def chunks(ids: list[Any]) -> list[list[Any]]:
    return [ids[i:i + IN_CHUNK] for i in range(0, len(ids), IN_CHUNK)]


# Fewer ids than this in a run of one type are looked up by `$in`, not read as a range.
MIN_RUN = 8


def _kind(value: Any) -> str | None:
    """The ids a range `{$gte: lo, $lte: hi}` finds by plain comparison: numbers and
    ObjectIds. A range never crosses types, and a collection's collation orders
    strings its own way: those ids, and the rest, are looked up."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, Int64)) or (isinstance(value, float) and value == value):
        return "n"
    if isinstance(value, ObjectId):
        return "o"
    return None


Fetch = Callable[[dict[str, Any], int], AsyncIterator[list[dict[str, Any]]]]


async def _lookup(fetch: Fetch, ids: list[Any]) -> dict[Any, dict[str, Any]]:
    """Documents by id: each run of ids of one kind is read as the range from its lowest
    to its highest, in _id order, up to twice as many documents as it has ids (ids
    close together cost one round trip per batch, with no `$in` to evaluate); what that
    leaves unread, and ids of other types, by `$in` a chunk at a time."""
    out: dict[Any, dict[str, Any]] = {}
    rest: list[Any] = []
    runs: dict[str, list[Any]] = {}
    for value in ids:
        kind = _kind(value)
        if kind is None:
            rest.append(value)
        else:
            runs.setdefault(kind, []).append(value)
    for run in runs.values():
        if len(run) < MIN_RUN:
            rest.extend(run)
            continue
        wanted = {idkey(v) for v in run}
        limit = 2 * len(run)
        seen = 0
        last: Any = None
        async for batch in fetch({"_id": {"$gte": min(run), "$lte": max(run)}}, limit):
            for doc in batch:
                seen += 1
                last = doc["_id"]
                if idkey(last) in wanted:
                    out[idkey(last)] = doc
        if seen >= limit:
            rest.extend(v for v in run if _kind(last) != _kind(v) or v > last)
    for chunk in chunks(rest):
        out.update(await _by_id(fetch({"_id": {"$in": chunk}}, 0)))
    return out


async def find_ids(engine: Engine, db: str, coll: str,
                    ids: list[Any]) -> dict[Any, dict[str, Any]]:
    """The documents of a plain collection (an overlay) with these ids, by idkey."""
    def fetch(filt: dict[str, Any], limit: int) -> AsyncIterator[list[dict[str, Any]]]:
        cmd: dict[str, Any] = {"find": coll, "filter": filt}
        if limit:
            cmd.update(sort={"_id": 1}, limit=limit)
        return engine.pool.batches(db, cmd, BATCH)
    return await _lookup(fetch, ids)


async def view_ids(engine: Engine, db: str, coll: str, layers: list[NsState], ids: list[Any],
                    project_id: bool = False) -> dict[Any, dict[str, Any]]:
    """The documents of a view (no layers: the base) with these ids, by idkey."""
    def fetch(filt: dict[str, Any], limit: int) -> AsyncIterator[list[dict[str, Any]]]:
        return viewscan.view_batches(engine.pool, db, coll, layers, filt,
                                     sort={"_id": 1} if limit else None, limit=limit,
                                     project_id=project_id)
    return await _lookup(fetch, ids)


async def by_document(engine: Engine, filt: dict[str, Any],
                      ) -> AsyncIterator[tuple[dict[str, Any], bool]]:
    """The WAL entries matching a filter, each with whether it is its document's first,
    from one cursor sorted by (id, LSN): a history operation folds each document's
    entries as they stream past instead of looking them up a chunk of ids at a time
    (each `$in` lookup walks the index for its ids, and SecantusDB's `$in` costs grow
    with the square of the list). Holds one batch, never a document's whole history."""
    pipeline = [*matching(filt), {"$sort": {"id": 1, "_id": 1}}]
    key: Any = _NONE
    async for batch in engine.pool.batches(engine.meta_db, {
            "aggregate": "wal", "pipeline": pipeline, "cursor": {}, "allowDiskUse": True},
            BATCH):
        for entry in batch:
            k = idkey(entry.get("id"))
            yield entry, k != key
            key = k


_NONE = object()


def equal(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is b
    return same(a, b)


# A side is read once in _id order, beside the changed ids, when it holds at most this
# many documents per change the branch logged in the collection: each lookup of a batch
# of ids then costs more than its share of one ordered read (on SecantusDB a range of
# _id values is a scan of the whole collection, as measured in benchmarks/RESULTS.md,
# "History in bulk"; mongod's lookups walk the _id index, and its ordered read does too).
SCAN_RATIO = 4


class OrderedSide:
    """One collection (or view) read once in _id order, handed out a batch of ids at a
    time: the ids come in the same order (a merge join), so one batch of documents is
    held at a time, never the side."""

    def __init__(self, batches: AsyncIterator[list[dict[str, Any]]]):
        self._batches = batches
        self._held: list[dict[str, Any]] = []
        self._at = 0
        self._done = False

    async def upto(self, ids: list[Any]) -> dict[Any, dict[str, Any]]:
        """The documents with these ids (ascending, after every id asked before), by
        idkey; those up to the last id are read and passed."""
        wanted = {idkey(v) for v in ids}
        last = ids[-1]
        out: dict[Any, dict[str, Any]] = {}
        while True:
            if self._at >= len(self._held):
                if self._done:
                    return out
                try:
                    self._held = await anext(self._batches)
                except StopAsyncIteration:
                    self._done = True
                    self._held = []
                self._at = 0
                continue
            doc = self._held[self._at]
            if bsonorder.compare(doc["_id"], last) > 0:
                return out
            self._at += 1
            key = idkey(doc["_id"])
            if key in wanted:
                out[key] = doc

    async def close(self) -> None:
        aclose = getattr(self._batches, "aclose", None)
        if aclose is not None:
            await aclose()


async def collated(engine: Engine, db: str, coll: str) -> bool:
    """Whether a collection has a default collation (or cannot be told)."""
    reply = await engine.pool.reply(db, {"listCollections": 1, "filter": {"name": coll}})
    if not reply.get("ok"):
        return True
    found = reply["cursor"]["firstBatch"]
    return bool(found and (found[0].get("options") or {}).get("collation"))


async def collection_count(engine: Engine, db: str, coll: str) -> int:
    """The documents of a plain collection, from the server's count of it (no filter:
    the collection's metadata on mongod)."""
    reply = await engine.pool.reply(db, {"count": coll})
    return int(reply.get("n", 0)) if reply.get("ok") else 0


def _sorted(engine: Engine, db: str, coll: str, stages: list[dict[str, Any]]) -> OrderedSide:
    """A side in _id order by an aggregation's $sort, the order the changed ids come in
    (the WAL's $group then $sort), from the first document: a range from the first
    changed id would leave out ids of other BSON types. Only for a collection without a
    default collation (the caller checks): naming the simple collation would not do on
    SecantusDB, which then orders strings as it does not without it ("x1" before "X2";
    mongod's simple collation is the binary order either way)."""
    return OrderedSide(engine.pool.batches(db, {
        "aggregate": coll, "pipeline": [*stages, {"$sort": {"_id": 1}}], "cursor": {},
        "allowDiskUse": True}, BATCH))


def ordered_overlay(engine: Engine, db: str, coll: str) -> OrderedSide:
    return _sorted(engine, db, coll, [])


def ordered_view(engine: Engine, db: str, coll: str, layers: list[NsState]) -> OrderedSide:
    source, stages = views.view_source(coll, layers)
    return _sorted(engine, db, source, stages)
