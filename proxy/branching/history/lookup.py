"""Documents by _id, a chunk of ids at a time, from an overlay or a view: what diff,
merge, reset and branches at a point compare with the WAL's images."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from proxy.branching import viewscan
from proxy.branching.engine import Engine
from proxy.branching.idkey import idkey
from proxy.branching.model import Branch, NsState
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


async def find_ids(engine: Engine, db: str, coll: str,
                    ids: list[Any]) -> dict[Any, dict[str, Any]]:
    """The documents of a plain collection (an overlay) with these ids, by idkey."""
    out: dict[Any, dict[str, Any]] = {}
    for chunk in chunks(ids):
        out.update(await _by_id(engine.pool.batches(db, {
            "find": coll, "filter": {"_id": {"$in": chunk}}}, BATCH)))
    return out


async def view_ids(engine: Engine, db: str, coll: str, layers: list[NsState], ids: list[Any],
                    project_id: bool = False) -> dict[Any, dict[str, Any]]:
    """The documents of a view (no layers: the base) with these ids, by idkey."""
    out: dict[Any, dict[str, Any]] = {}
    for chunk in chunks(ids):
        out.update(await _by_id(viewscan.view_batches(engine.pool, db, coll, layers,
                                                      {"_id": {"$in": chunk}},
                                                      project_id=project_id)))
    return out


def equal(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is b
    return same(a, b)
