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
from proxy.branching.planner import Source
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


class CursorTable:
    """The proxy's own cursors; getMore and killCursors for these ids stop here."""

    def __init__(self) -> None:
        self._cursors: dict[int, Held] = {}

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


# find fields each side receives unchanged.
_SIDE_FIELDS = ("let", "maxTimeMS", "comment", "readConcern", "lsid", "allowDiskUse",
                "$readPreference", "collation", "apiVersion", "apiStrict")


async def open_one(run: Runner, db: str, coll: str, command: dict[str, Any],
                   first: int) -> MergedCursor | None:
    """One find on one collection that holds the whole answer (a plan's own command, every
    option included), as a proxy cursor: only the cursor's namespace is the proxy's to
    keep. None: the upstream refused it."""
    reply = await run.reply(db, {**command, "batchSize": first})
    if not reply.get("ok"):
        return None
    side = Side(str(command["find"]), [], cursor_id=reply["cursor"]["id"])
    side.accept(reply["cursor"]["firstBatch"])
    return MergedCursor(db, coll, [side], None, 0, None, command.get("lsid"))


async def open_merged(run: Runner, db: str, coll: str, sources: tuple[Source, ...],
                      cmd: dict[str, Any], first: int) -> MergedCursor | None:
    """A merged cursor over the user's find run on each source; None when a side refused
    it (SecantusDB fails sortKey projections over array fields that mongod computes)."""
    sides = [Side(src.coll, list(src.hidden)) for src in sources]
    sort = cmd.get("sort") or {}
    projection = dict(cmd.get("projection") or {})
    if sort:
        projection[SORT_KEY] = {"$meta": "sortKey"}
    skip = int(cmd.get("skip") or 0)
    limit = abs(int(cmd.get("limit") or 0)) or None
    cursor = MergedCursor(db, coll, sides, [int(v) for v in sort.values()] or None, skip, limit,
                          cmd.get("lsid"))
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
        if side.coll == coll and "hint" in cmd:
            sub["hint"] = cmd["hint"]
        subs.append(sub)
    replies = await run.replies(db, subs)
    for side, reply in zip(sides, replies, strict=True):
        if reply.get("ok"):
            side.cursor_id = reply["cursor"]["id"]
            side.accept(reply["cursor"]["firstBatch"])
    if not all(reply.get("ok") for reply in replies):
        await cursor.close(run)
        return None
    return cursor
