"""The proxy's own find cursors: k-way merges of several finds, as mongos merges shard
results, and single upstream cursors held under the user's namespace. (Not a branch
merge, `history.py`, nor the `$merge` stage.)

Each side (the base collection and every live overlay along the chain, as the planner
chose them) runs the user's own find; the server evaluates filter, sort and projection
and hands back each document's sort key. The proxy drops ids a layer above hides (an
in-memory set lookup) and merges the streams by sort key, then applies skip and limit.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import bson
from bson.int64 import Int64

from proxy.branching.bsonorder import sort_key
from proxy.branching.idkey import idkey
from proxy.branching.model import NsState
from proxy.branching.planner import Source, index_bound, merge_sort
from proxy.branching.runner import Runner, error_from
from proxy.wire.codes import Code

SORT_KEY = "__mb_sk"
# A returnKey find's sides read each document's _id (to drop the hidden ones) and the
# index key the server computed for it, which is all the client then gets.
INDEX_KEY = "__mb_ik"
# A side's copy of the document's real _id, where the user's projection reshapes _id
# (computes it, or keeps some of its fields): hidden ids are dropped by it.
ID_FIELD = "__mb_id"
DEFAULT_FIRST_BATCH = 101
GETMORE_BATCH = 1000
# mongod's bound on the documents of one reply batch (BSONObjMaxUserSize).
MAX_REPLY_BYTES = 16 * 1024 * 1024
IDLE_TIMEOUT = 600.0


@dataclass
class Side:
    coll: str
    hidden: list[dict[Any, Any]]
    cursor_id: int = 0
    buffer: deque[dict[str, Any]] = field(default_factory=deque)
    # The field of a side's documents holding their real _id (see ID_FIELD).
    id_field: str = "_id"

    def accept(self, docs: list[dict[str, Any]]) -> None:
        if not self.hidden:
            self.buffer.extend(docs)
            return
        for doc in docs:
            key = idkey(doc.get(self.id_field))
            if not any(key in ids for ids in self.hidden):
                self.buffer.append(doc)


@dataclass
class MergedCursor:
    db: str
    coll: str
    sides: list[Side]
    directions: list[int] | None
    skip: int
    limit: int | None
    lsid: Any
    id: int = 0
    used: float = field(default_factory=time.monotonic)
    # The cluster time of a snapshot read on one collection (the upstream's reply's).
    at_cluster_time: Any = None
    # returnKey: each document goes out as the index key its side's server gave it.
    keys_only: bool = False
    # The user's projection leaves _id out: each side reads it (to drop the hidden ids)
    # and it is removed from what the client gets.
    drop_id: bool = False
    # Scratch copies the read's stages read (commands/scratchfrom.py): dropped at close.
    scratch: list[str] = field(default_factory=list)
    # The latest batch held all it was asked for (batch()).
    filled: bool = False

    @property
    def ns(self) -> str:
        return f"{self.db}.{self.coll}"

    @property
    def done(self) -> bool:
        """As mongod's: a cursor ends with its limit, or with a batch that came back short
        of its size; after a full batch it stays open even when nothing is left, and the
        next getMore answers an empty batch and the end (drivers count those getMores,
        exhaust cursors included)."""
        if self.limit is not None and self.limit <= 0:
            return True
        return not self.filled and all(not s.buffer and not s.cursor_id for s in self.sides)

    async def _refill(self, run: Runner, side: Side) -> None:
        while not side.buffer and side.cursor_id:
            cmd: dict[str, Any] = {"getMore": side.cursor_id, "collection": side.coll,
                                   "batchSize": GETMORE_BATCH}
            if self.lsid is not None:
                cmd["lsid"] = self.lsid
            reply = await run(self.db, cmd)
            side.cursor_id = reply["cursor"]["id"]
            side.accept(reply["cursor"]["nextBatch"])

    async def batch(self, run: Runner, size: int | None) -> list[dict[str, Any]]:
        """The next documents: up to size of them (None: no count, as a getMore without
        batchSize), and, as mongod's, never more than MAX_REPLY_BYTES of them after the
        first."""
        self.used = time.monotonic()
        out: list[dict[str, Any]] = []
        total = 0
        key = sort_key(self.directions) if self.directions is not None else None
        while (size is None or len(out) < size) and \
                not (self.limit is not None and self.limit <= 0):
            for side in self.sides:
                await self._refill(run, side)
            ready = [s for s in self.sides if s.buffer]
            if not ready:
                break
            side = ready[0]
            if key is not None:
                side = min(ready, key=lambda s: key(s.buffer[0][SORT_KEY]))
            doc = side.buffer.popleft()
            if self.skip:
                self.skip -= 1
                continue
            sk = doc.pop(SORT_KEY, None)
            # returnKey: no index key means the side's scan used no index, and mongod's
            # returnKey then gives an empty document.
            shown = (doc.get(INDEX_KEY) or {}) if self.keys_only else _shown(doc, self.drop_id)
            total += len(bson.encode(shown))
            if out and total > MAX_REPLY_BYTES:
                if sk is not None:
                    doc[SORT_KEY] = sk
                side.buffer.appendleft(doc)  # the first of the next batch
                break
            out.append(shown)
            if self.limit is not None:
                self.limit -= 1
        self.filled = size is not None and len(out) == size
        return out

    async def close(self, run: Runner) -> None:
        for side in self.sides:
            if side.cursor_id:
                await run.reply(self.db, {"killCursors": side.coll, "cursors": [side.cursor_id]})
                side.cursor_id = 0
        for name in self.scratch:
            await run.reply(self.db, {"drop": name})
        self.scratch = []


def _shown(doc: dict[str, Any], drop_id: bool) -> dict[str, Any]:
    """A side's document as the client gets it: without the _id the proxy read for
    itself (the user's projection left it out, or reshaped it: ID_FIELD)."""
    if not drop_id and ID_FIELD not in doc:
        return doc
    return {k: v for k, v in doc.items() if k != ID_FIELD and not (drop_id and k == "_id")}


def side_projection(projection: dict[str, Any]) -> tuple[dict[str, Any], str, bool]:
    """The projection each side of a merged find runs for the user's, the field its
    documents' real _id is then in, and whether _id is removed from what the client gets.
    `_id: 0` is left out (the side reads _id, the proxy removes it: the other fields stay
    as the server gave them, since _id is always the first); an `_id` the projection
    computes, or of which it keeps some fields, is read again whole beside it as a
    computed field (`planner.unmergeable` sends an exclusion of _id's fields, which can
    have no computed field, to the union)."""
    spec = dict(projection)
    value = spec.get("_id", True)
    subfields = any(k.startswith("_id.") for k in spec)
    if not subfields and not isinstance(value, dict | str) and value in (0, False):
        del spec["_id"]
        return spec, "_id", True
    if not subfields and not isinstance(value, dict | str) and value in (1, True):
        return spec, "_id", False
    spec[ID_FIELD] = "$_id"
    return spec, ID_FIELD, False


class Held(Protocol):
    """A cursor the proxy holds: a merged find here, or a branch's change stream
    (commands/changestream.py)."""

    id: int
    used: float

    @property
    def ns(self) -> str: ...

    @property
    def done(self) -> bool: ...

    async def batch(self, run: Runner, size: int | None) -> list[dict[str, Any]]: ...

    async def close(self, run: Runner) -> None: ...


@dataclass
class TailCursor:
    """A tailable cursor the upstream holds on the branch's own collection (one created,
    or dropped and refilled, on the branch; a copy branch's), under the user's
    namespace. Unlike a merged cursor's, its batches are not filled up: each getMore is
    one upstream getMore, which waits for new documents at most the client's
    maxTimeMS (maxAwaitTimeMS) with awaitData, so an empty batch leaves it open, as
    mongod's does."""

    db: str
    coll: str
    source: str
    cursor_id: int
    lsid: Any
    id: int = 0
    used: float = field(default_factory=time.monotonic)

    @property
    def ns(self) -> str:
        return f"{self.db}.{self.coll}"

    @property
    def done(self) -> bool:
        return not self.cursor_id

    async def more(self, run: Runner, size: int | None, await_ms: Any) -> list[dict[str, Any]]:
        self.used = time.monotonic()
        if not self.cursor_id:
            return []
        cmd: dict[str, Any] = {"getMore": self.cursor_id, "collection": self.source}
        if size:
            cmd["batchSize"] = size
        if await_ms is not None:
            cmd["maxTimeMS"] = await_ms
        if self.lsid is not None:
            cmd["lsid"] = self.lsid
        reply = await run(self.db, cmd)
        self.cursor_id = reply["cursor"]["id"]
        docs: list[dict[str, Any]] = reply["cursor"]["nextBatch"]
        return docs

    async def batch(self, run: Runner, size: int | None) -> list[dict[str, Any]]:
        return await self.more(run, size, None)

    async def close(self, run: Runner) -> None:
        if self.cursor_id:
            await run.reply(self.db, {"killCursors": self.source, "cursors": [self.cursor_id]})
            self.cursor_id = 0


# Find fields the refetching finds carry from the user's.
_REFETCH_FIELDS = ("let", "maxTimeMS", "comment", "readConcern", "lsid", "$readPreference",
                   "collation", "apiVersion", "apiStrict", "showRecordId")


@dataclass
class RefetchCursor:
    """A find whose answer the server-side union picks (`ids`: an upstream cursor of the
    ids, in the answer's order) and whose projection only a find evaluates (positional,
    $elemMatch, $slice, showRecordId): each batch of ids is read by the user's find,
    its filter narrowed to those ids, on every collection of the view, the ids a layer
    above hides dropped (asked of each layer's hidden-id collection for just those ids
    when its set is not in memory), and put back in the union's order."""

    db: str
    coll: str
    ids: Side
    layers: list[NsState]
    find: dict[str, Any]  # the user's find, options carried, to narrow to each batch's ids
    drop_id: bool  # the user's projection leaves _id out: it is read, then removed
    lsid: Any
    id: int = 0
    used: float = field(default_factory=time.monotonic)
    at_cluster_time: Any = None
    filled: bool = False  # as MergedCursor's

    @property
    def ns(self) -> str:
        return f"{self.db}.{self.coll}"

    @property
    def done(self) -> bool:
        return not self.filled and not self.ids.buffer and not self.ids.cursor_id

    async def batch(self, run: Runner, size: int | None) -> list[dict[str, Any]]:
        self.used = time.monotonic()
        wanted = size if size is not None else GETMORE_BATCH
        ids: list[Any] = []
        while len(ids) < wanted:
            if not self.ids.buffer and self.ids.cursor_id:
                reply = await run(self.db, self._get_more())
                self.ids.cursor_id = reply["cursor"]["id"]
                self.ids.accept(reply["cursor"]["nextBatch"])
            if not self.ids.buffer:
                break
            ids.append(self.ids.buffer.popleft()["_id"])
        self.filled = size is not None and len(ids) == size
        if not ids:
            return []
        found = await self._fetch(run, ids)
        out: list[dict[str, Any]] = []
        total = 0
        for i, value in enumerate(ids):
            doc = found.get(idkey(value))
            if doc is None:
                continue  # changed since the union picked it
            total += len(bson.encode(doc))
            if out and total > MAX_REPLY_BYTES:
                self.ids.buffer.extendleft({"_id": v} for v in reversed(ids[i:]))
                break
            if self.drop_id:
                doc.pop("_id", None)
            out.append(doc)
        return out

    def _get_more(self) -> dict[str, Any]:
        cmd: dict[str, Any] = {"getMore": self.ids.cursor_id, "collection": self.ids.coll,
                               "batchSize": GETMORE_BATCH}
        if self.lsid is not None:
            cmd["lsid"] = self.lsid
        return cmd

    async def _fetch(self, run: Runner, ids: list[Any]) -> dict[Any, dict[str, Any]]:
        """The documents of these ids, each from the collection that shows it."""
        hidden = [await self._hidden(run, layer, ids) for layer in self.layers]
        dropped_at = next((i for i, layer in enumerate(self.layers) if layer.base_dropped),
                          None)
        sources: list[tuple[str, list[dict[Any, Any]]]] = []
        if dropped_at is None:
            sources.append((self.coll, hidden))
        for j, layer in enumerate(self.layers):
            if dropped_at is not None and j > dropped_at:
                break
            sources.append((layer.live, hidden[:j]))
        filt = dict(self.find.get("filter") or {})
        narrowed = {**filt, "_id": {"$in": ids}} if "_id" not in filt else \
            {"$and": [filt, {"_id": {"$in": ids}}]}
        found: dict[Any, dict[str, Any]] = {}
        for coll, above in sources:
            side = Side(coll, above)
            cmd: dict[str, Any] = {"find": coll, "filter": narrowed,
                                   "batchSize": len(ids) + 1}
            if self.find.get("projection"):
                cmd["projection"] = self.find["projection"]
            cmd.update((k, self.find[k]) for k in _REFETCH_FIELDS if k in self.find)
            if coll == self.coll and "hint" in self.find:
                cmd["hint"] = self.find["hint"]
            reply = await run(self.db, cmd)
            side.cursor_id = reply["cursor"]["id"]
            side.accept(reply["cursor"]["firstBatch"])
            while side.cursor_id:
                more = await run(self.db, {"getMore": side.cursor_id, "collection": coll})
                side.cursor_id = more["cursor"]["id"]
                side.accept(more["cursor"]["nextBatch"])
            for doc in side.buffer:
                found.setdefault(idkey(doc.get("_id")), doc)
        return found

    async def _hidden(self, run: Runner, layer: NsState, ids: list[Any]) -> dict[Any, Any]:
        """The ones among these ids the layer hides."""
        if layer.hidden_ids is not None:
            return {idkey(v): v for v in ids if idkey(v) in layer.hidden_ids}
        reply = await run(self.db, {"find": layer.hidden, "filter": {"_id": {"$in": ids}},
                                    "projection": {"_id": 1}, "batchSize": len(ids) + 1})
        out = {idkey(d["_id"]): d["_id"] for d in reply["cursor"]["firstBatch"]}
        cursor_id = reply["cursor"]["id"]
        while cursor_id:
            more = await run(self.db, {"getMore": cursor_id, "collection": layer.hidden})
            cursor_id = more["cursor"]["id"]
            out.update((idkey(d["_id"]), d["_id"]) for d in more["cursor"]["nextBatch"])
        return out

    async def close(self, run: Runner) -> None:
        if self.ids.cursor_id:
            await run.reply(self.db, {"killCursors": self.ids.coll,
                                      "cursors": [self.ids.cursor_id]})
            self.ids.cursor_id = 0



class CursorTable:
    """The proxy's own cursors; getMore and killCursors for these ids stop here."""

    def __init__(self) -> None:
        self._cursors: dict[int, Held] = {}

    def tailing(self, cursor_id: Any) -> bool:
        """Whether this id is a tailable cursor of the proxy's (its getMore may wait)."""
        return isinstance(self.get(cursor_id), TailCursor)

    def add(self, cursor: Held) -> int:
        now = time.monotonic()
        for stale in [c for c in self._cursors.values() if now - c.used > IDLE_TIMEOUT]:
            self._cursors.pop(stale.id, None)
        cursor.id = secrets.randbits(62) | (1 << 62)
        self._cursors[cursor.id] = cursor
        return cursor.id

    def get(self, cursor_id: Any) -> Held | None:
        return self._cursors.get(cursor_id) if isinstance(cursor_id, int) else None

    def pop(self, cursor_id: int) -> Held | None:
        return self._cursors.pop(cursor_id, None)


def adopt(table: CursorTable, db: str, coll: str, source: str, reply: dict[str, Any],
          lsid: Any) -> dict[str, Any]:
    """A reply from a read the proxy ran on another collection than the user named:
    the client sees its own namespace, and an open cursor becomes the proxy's, since
    the upstream would refuse a getMore naming the user's collection."""
    cursor = reply.get("cursor")
    if source == coll or not reply.get("ok") or not isinstance(cursor, dict):
        return reply
    cursor["ns"] = f"{db}.{coll}"
    if cursor.get("id"):
        side = Side(source, [], cursor_id=cursor["id"])
        cursor["id"] = Int64(table.add(MergedCursor(db, coll, [side], None, 0, None, lsid)))
    return reply


def adopt_tail(table: CursorTable, db: str, coll: str, source: str, reply: dict[str, Any],
               lsid: Any) -> dict[str, Any]:
    """A tailable find's reply from the branch's own collection, under the user's
    namespace: an open cursor becomes the proxy's TailCursor."""
    cursor = reply.get("cursor")
    if not reply.get("ok") or not isinstance(cursor, dict):
        return reply
    cursor["ns"] = f"{db}.{coll}"
    if cursor.get("id"):
        cursor["id"] = Int64(table.add(TailCursor(db, coll, source, cursor["id"], lsid)))
    return reply


# find fields each side receives unchanged.
_SIDE_FIELDS = ("let", "maxTimeMS", "comment", "readConcern", "lsid", "allowDiskUse",
                "$readPreference", "collation", "apiVersion", "apiStrict")


def _raise_users(failed: list[dict[str, Any]]) -> None:
    """Raises the first side's refusal that is the user's find's own error, which mongod
    would answer: the server-side union would not say it where SecantusDB parses a
    `$match` over no documents lazily (an unknown operator on an empty collection
    answers nothing instead of BadValue). An internal error of the upstream's
    (SecantusDB's sortKey over an empty array), which the union does not meet, leaves
    the answer to the union: the openers below return None."""
    for reply in failed:
        if reply.get("code") != Code.INTERNAL_ERROR:
            raise error_from(reply)


async def open_one(run: Runner, db: str, coll: str, command: dict[str, Any],
                   first: int) -> MergedCursor | None:
    """One find on one collection that holds the whole answer (a plan's own command, every
    option included), as a proxy cursor: only the cursor's namespace is the proxy's to
    keep. None: the upstream failed it internally (_raise_users)."""
    reply = await run.reply(db, {**command, "batchSize": first})
    if not reply.get("ok"):
        _raise_users([reply])
        return None
    side = Side(str(command["find"]), [], cursor_id=reply["cursor"]["id"])
    side.accept(reply["cursor"]["firstBatch"])
    return MergedCursor(db, coll, [side], None, 0, None, command.get("lsid"),
                        at_cluster_time=reply["cursor"].get("atClusterTime"))


async def open_merged(run: Runner, db: str, coll: str, sources: tuple[Source, ...],
                      cmd: dict[str, Any], first: int,
                      refused: list[tuple[str, dict[str, Any]]] | None = None,
                      ) -> MergedCursor | None:
    """A merged cursor over the user's find run on each source; None when a side failed
    internally (_raise_users: SecantusDB fails sortKey projections over array fields that
    mongod computes), or when a side refused an index-bound find, each refusing side's
    collection and reply then appended to `refused` (the caller tells which side lacks
    what).

    An index-bound find (min, max, returnKey) runs with its hint on every side, each
    scanning its own copy of the index, merged in the index's key order; returnKey
    becomes `{$meta: "indexKey"}` beside the _id that hidden ids are dropped by."""
    sort = merge_sort(cmd)
    keys_only = bool(cmd.get("returnKey"))
    bounded = index_bound(cmd)
    projection, id_field, drop_id = side_projection(cmd.get("projection") or {})
    if keys_only:
        projection, id_field, drop_id = {"_id": 1, INDEX_KEY: {"$meta": "indexKey"}}, "_id", False
    sides = [Side(src.coll, list(src.hidden), id_field=id_field) for src in sources]
    if sort:
        projection[SORT_KEY] = {"$meta": "sortKey"}
    skip = int(cmd.get("skip") or 0)
    limit = abs(int(cmd.get("limit") or 0)) or None
    cursor = MergedCursor(db, coll, sides, [int(v) for v in sort.values()] or None, skip, limit,
                          cmd.get("lsid"), keys_only=keys_only, drop_id=drop_id)
    subs = []
    for side in sides:
        hidden = sum(len(ids) for ids in side.hidden)
        sub: dict[str, Any] = {"find": side.coll, "filter": cmd.get("filter") or {}}
        if sort:
            sub["sort"] = sort
        if projection:
            sub["projection"] = projection
        if limit is not None:
            sub["limit"] = skip + limit + hidden
        sub["batchSize"] = max(first, 1) + skip + hidden
        for key in _SIDE_FIELDS:
            if key in cmd:
                sub[key] = cmd[key]
        if "hint" in cmd and (side.coll == coll or bounded):
            sub["hint"] = cmd["hint"]
        sub.update((k, cmd[k]) for k in ("min", "max") if cmd.get(k) is not None)
        subs.append(sub)
    replies = await run.replies(db, subs)
    for side, reply in zip(sides, replies, strict=True):
        if reply.get("ok"):
            side.cursor_id = reply["cursor"]["id"]
            side.accept(reply["cursor"]["firstBatch"])
        elif refused is not None:
            refused.append((side.coll, reply))
    failed = [reply for reply in replies if not reply.get("ok")]
    if failed:
        await cursor.close(run)
        if not bounded:
            _raise_users(failed)
        return None
    return cursor
