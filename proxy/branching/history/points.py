"""Points in a branch's history (docs/ARCHITECTURE.md, "History"): an LSN from what a
user names, and which entries a branch showed at an LSN once resets voided some."""

from __future__ import annotations

import datetime as dt
from typing import Any

from proxy.branching import gc
from proxy.branching.engine import Engine
from proxy.branching.errors import BranchError, Kind
from proxy.branching.model import Branch
from proxy.branching.voids import recorded_resets as recorded_resets
from proxy.branching.voids import voids_at as voids_at
from proxy.branching.wal import UNVOIDED


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


def visible_at(bid: str, lsn: int, voids: list[list[int]]) -> dict[str, Any]:
    """A WAL filter for the entries a branch showed when the log stood at lsn, given the
    voids in effect then."""
    ranges = [{"_id": {"$gt": lo, "$lte": hi}, "op": {"$nin": list(UNVOIDED)}}
              for lo, hi in voids]
    return {"b": bid, "_id": {"$lte": lsn}, **({"$nor": ranges} if ranges else {})}


async def check_reopened(engine: Engine, branch: Branch, resets: list[tuple[int, int]],
                          lsn: int) -> None:
    """gc deletes voided entries below its horizon: a point inside such a range cannot
    be rebuilt."""
    first = await gc.horizon(engine)
    for lo, hi in resets:
        if hi > lsn > lo and lo < first:
            raise BranchError(Kind.CONFLICT,
                              f"LSN {lsn} lies in a range a reset voided ({lo}-{hi}) "
                              f"whose entries gc removed below its horizon {first}")
