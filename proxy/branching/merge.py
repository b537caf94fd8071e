"""Proxy-merged find cursors, as mongos merges shard results.

Each side (the base collection and every live overlay along the chain) runs the
user's own find; the server evaluates filter, sort and projection and hands back
each document's sort key. The proxy drops ids a layer above hides (an in-memory
set lookup) and merges the streams by sort key, then applies skip and limit.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.int64 import Int64
from bson.regex import Regex

from proxy.branching.bsonorder import sort_key
from proxy.branching.idkey import idkey
from proxy.branching.model import NsState
from proxy.branching.runner import Runner

SORT_KEY = "__mb_sk"
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

    def accept(self, docs: list[dict[str, Any]]) -> None:
        if not self.hidden:
            self.buffer.extend(docs)
            return
        for doc in docs:
            key = idkey(doc.get("_id"))
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

    @property
    def ns(self) -> str:
        return f"{self.db}.{self.coll}"

    @property
    def done(self) -> bool:
        if self.limit is not None and self.limit <= 0:
            return True
        return all(not s.buffer and not s.cursor_id for s in self.sides)

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
            total += len(bson.encode(doc))
            if out and total > MAX_REPLY_BYTES:
                if sk is not None:
                    doc[SORT_KEY] = sk
                side.buffer.appendleft(doc)  # the first of the next batch
                break
            out.append(doc)
            if self.limit is not None:
                self.limit -= 1
        return out

    async def close(self, run: Runner) -> None:
        for side in self.sides:
            if side.cursor_id:
                await run.reply(self.db, {"killCursors": side.coll, "cursors": [side.cursor_id]})
                side.cursor_id = 0


class CursorTable:
    """The proxy's own cursors; getMore and killCursors for these ids stop here."""

    def __init__(self) -> None:
        self._cursors: dict[int, MergedCursor] = {}

    def add(self, cursor: MergedCursor) -> int:
        now = time.monotonic()
        for stale in [c for c in self._cursors.values() if now - c.used > IDLE_TIMEOUT]:
            self._cursors.pop(stale.id, None)
        cursor.id = secrets.randbits(62) | (1 << 62)
        self._cursors[cursor.id] = cursor
        return cursor.id

    def get(self, cursor_id: Any) -> MergedCursor | None:
        return self._cursors.get(cursor_id) if isinstance(cursor_id, int) else None

    def pop(self, cursor_id: int) -> MergedCursor | None:
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


def plan_sides(coll: str, layers: list[NsState], skip_top_live: bool = False) -> list[Side]:
    """The collections a merged find reads, each with the hidden sets that filter it.

    skip_top_live leaves out the top branch's own overlay: the parent view a write copies
    from."""
    sides: list[Side] = []
    dropped_at = next((i for i, layer in enumerate(layers) if layer.base_dropped), None)
    if dropped_at is None:
        sides.append(Side(coll, [layer.hidden_ids for layer in layers
                                 if layer.hidden_ids]))
    for j, layer in enumerate(layers):
        if dropped_at is not None and j > dropped_at:
            break
        if j == 0 and skip_top_live:
            continue
        sides.append(Side(layer.live, [above.hidden_ids for above in layers[:j]
                                       if above.hidden_ids]))
    return sides



def collated(cmd: dict[str, Any]) -> bool:
    """Whether a command compares strings by a collation: then {_id: "a"} may match "A"."""
    collation = cmd.get("collation")
    return isinstance(collation, dict) and collation.get("locale", "simple") != "simple"


def point_id(filt: Any) -> tuple[Any] | None:
    """(the _id,) when a filter is an equality on _id alone: one document at most."""
    if not isinstance(filt, dict) or list(filt) != ["_id"]:
        return None
    value = filt["_id"]
    if isinstance(value, dict | list | Regex | re.Pattern):
        return None
    return (value,)


def point_sides(coll: str, layers: list[NsState], filt: Any,
                skip_top_live: bool = False) -> list[Side] | None:
    """For an equality on _id alone, the one side that can hold the document (none when
    no side can): the top layer hiding the id owns it, else the base has it. None when
    the filter is not such a point or the hidden-id caches cannot tell."""
    point = point_id(filt)
    if point is None:
        return None
    value = point[0]
    for j, layer in enumerate(layers):
        hidden = layer.hides(value)
        if hidden is None:
            return None
        if hidden or layer.base_dropped:
            # Hidden: this layer owns the id. Dropped: nothing below shows through, so
            # the id is in this layer's live documents or nowhere.
            return [] if j == 0 and skip_top_live else [Side(layer.live, [])]
    return [Side(coll, [])]


# find fields each side receives unchanged.
_SIDE_FIELDS = ("let", "maxTimeMS", "comment", "readConcern", "lsid", "allowDiskUse",
                "$readPreference", "collation", "apiVersion", "apiStrict")


async def _open_direct(run: Runner, db: str, coll: str, side: Side, cmd: dict[str, Any],
                       first: int) -> MergedCursor | None:
    """One collection holds the whole view (a copy branch, a dropped-and-refilled
    collection): the user's find runs on it unchanged, every option included; only
    the cursor's namespace is the proxy's to keep."""
    sub = {k: v for k, v in cmd.items() if k not in ("find", "$db", "singleBatch")}
    reply = await run.reply(db, {"find": side.coll, **sub, "batchSize": first})
    if not reply.get("ok"):
        return None
    side.cursor_id = reply["cursor"]["id"]
    side.accept(reply["cursor"]["firstBatch"])
    return MergedCursor(db, coll, [side], None, 0, None, cmd.get("lsid"))


def mergeable(cmd: dict[str, Any], layers: list[NsState]) -> bool:
    """Whether the proxy can merge plain finds instead of a server-side union
    (docs/ARCHITECTURE.md, "Reads")."""
    if any(layer.hidden_ids is None for layer in layers):
        return False
    for opt in ("min", "max", "returnKey", "showRecordId", "tailable", "awaitData"):
        if cmd.get(opt):
            return False
    sort = cmd.get("sort") or {}
    projection = cmd.get("projection") or {}
    if projection.get("_id") in (0, False):
        return False  # the hidden-id check needs _id
    if sort:
        collation = cmd.get("collation") or {}
        if collation.get("locale", "simple") != "simple":
            return False  # sort keys would need ICU comparison
        if any(isinstance(v, bool) or v not in (1, -1) for v in sort.values()):
            return False  # $meta sorts and $natural
        # SecantusDB drops every field from an exclusion projection that also asks for
        # $meta (mongod does not): such finds take the server-side union.
        if any(v in (0, False) for v in projection.values()):
            return False
    return b"$near" not in bson.encode(cmd.get("filter") or {})


async def open_find(run: Runner, db: str, coll: str, layers: list[NsState],
                    cmd: dict[str, Any], first: int,
                    skip_top_live: bool = False) -> MergedCursor | None:
    """A merged cursor over the branch view for a find-shaped command, or None when the
    server-side union must answer: the find is not mergeable, or a side refused it
    (SecantusDB fails sortKey projections over array fields that mongod computes; a bad
    query then gets the upstream's own error from the union)."""
    sides = plan_sides(coll, layers, skip_top_live)
    if len(sides) == 1 and not sides[0].hidden:
        return await _open_direct(run, db, coll, sides[0], cmd, first)
    if not mergeable(cmd, layers):
        return None
    if not collated(cmd):
        sides = point_sides(coll, layers, cmd.get("filter"), skip_top_live) or sides
    sort = cmd.get("sort") or {}
    projection = dict(cmd.get("projection") or {})
    if sort:
        projection[SORT_KEY] = {"$meta": "sortKey"}
    skip = int(cmd.get("skip") or 0)
    limit = abs(int(cmd.get("limit") or 0)) or None
    cursor = MergedCursor(db, coll, sides, [int(v) for v in sort.values()] or None, skip, limit,
                          cmd.get("lsid"))
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
        if side.coll == coll and "hint" in cmd:
            sub["hint"] = cmd["hint"]
        reply = await run.reply(db, sub)
        if not reply.get("ok"):
            await cursor.close(run)
            return None
        side.cursor_id = reply["cursor"]["id"]
        side.accept(reply["cursor"]["firstBatch"])
    return cursor
