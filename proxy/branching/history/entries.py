"""A branch's log: its WAL entries, with whether a reset voided each."""

from __future__ import annotations

import datetime as dt
from typing import Any

from proxy.branching.engine import MAIN, Engine
from proxy.branching.errors import BranchError, Kind
from proxy.branching.wal import UNVOIDED


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
    async for doc in engine.wal.newest(query, limit,
                                       {"pre": 0, "post": 0, "prez": 0, "postz": 0,
                                        "prex": 0, "postx": 0}):
        lsn = int(doc["_id"])
        out.append({
            "lsn": lsn, "time": doc["ts"].replace(tzinfo=dt.UTC).isoformat(),
            "op": doc["op"], "ns": doc["ns"], "_id": doc.get("id"),
            "client": doc.get("client") or {},
            "visible": doc["op"] in UNVOIDED or not any(lo < lsn <= hi for lo, hi in voids),
        })
    return out
