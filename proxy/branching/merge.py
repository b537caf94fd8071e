"""Proxy-merged find cursors, as mongos merges shard results.

Each side (the base collection and every live overlay along the chain) runs the
user's own find; the server evaluates filter, sort and projection and hands back
each document's sort key. The proxy drops ids a layer above hides (an in-memory
set lookup) and merges the streams by sort key, then applies skip and limit.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from proxy.branching.bsonorder import sort_key
from proxy.branching.idkey import idkey
from proxy.branching.model import NsState
from proxy.branching.runner import Runner

SORT_KEY = "__mb_sk"
DEFAULT_FIRST_BATCH = 101
GETMORE_BATCH = 1000
IDLE_TIMEOUT = 600.0


@dataclass
class Side:
    coll: str
    hidden: list[dict[Any, Any]]
    cursor_id: int = 0
    buffer: deque[dict[str, Any]] = field(default_factory=deque)

    def accept(self, docs: list[dict[str, Any]]) -> None:
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

    async def batch(self, run: Runner, size: int) -> list[dict[str, Any]]:
        self.used = time.monotonic()
        out: list[dict[str, Any]] = []
        key = sort_key(self.directions) if self.directions is not None else None
        while len(out) < size and not (self.limit is not None and self.limit <= 0):
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
            doc.pop(SORT_KEY, None)
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


def plan_sides(coll: str, layers: list[NsState]) -> list[Side]:
    """The collections a merged find reads, each with the hidden sets that filter it."""
    sides: list[Side] = []
    dropped_at = next((i for i, layer in enumerate(layers) if layer.base_dropped), None)
    if dropped_at is None:
        sides.append(Side(coll, [layer.hidden_ids for layer in layers
                                 if layer.hidden_ids]))
    for j, layer in enumerate(layers):
        if dropped_at is not None and j > dropped_at:
            break
        sides.append(Side(layer.live, [above.hidden_ids for above in layers[:j]
                                       if above.hidden_ids]))
    return sides

