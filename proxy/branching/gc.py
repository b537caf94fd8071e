"""Retention: WAL history older than a window is compacted without changing what any
branch shows.

Per branch, collection and document, the old entries fold into one (the last op and
image, keeping the first pre-image so merges still detect conflicts); entries a reset
voided, or that precede a drop, go; the old images left are zstd-compressed where that
saves space. Points in history before the horizon can no longer be reset to or
branched from.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from bson.int64 import Int64
from pymongo import DeleteMany, UpdateOne

from proxy.branching.engine import Engine
from proxy.branching.errors import BranchError, Kind
from proxy.branching.naming import MAIN
from proxy.branching.wal import STARTS, matching, packed

BATCH = 1000


async def horizon(engine: Engine) -> int:
    doc = await engine.meta["gc"].find_one({"_id": "gc"})
    return int(doc["horizon"]) if doc else 0


async def check_point(engine: Engine, lsn: int) -> None:
    first = await horizon(engine)
    if lsn < first:
        raise BranchError(Kind.CONFLICT, f"history before LSN {first} was compacted by gc; "
                                         f"the earliest point is LSN {first}")


async def _stats(engine: Engine) -> dict[str, int]:
    reply = await engine.pool(engine.meta_db, {"aggregate": "wal", "cursor": {}, "pipeline": [
        {"$group": {"_id": None, "n": {"$sum": 1}, "bytes": {"$sum": {"$bsonSize": "$$ROOT"}}}}]})
    batch = reply["cursor"]["firstBatch"]
    return {"entries": int(batch[0]["n"]) if batch else 0,
            "bytes": int(batch[0]["bytes"]) if batch else 0}


async def collect(engine: Engine, retention: dt.timedelta) -> dict[str, Any]:
    wal = engine.wal.entries
    before = await _stats(engine)
    cutoff = dt.datetime.now(dt.UTC).replace(tzinfo=None) - retention
    last_old = await wal.find_one({"ts": {"$lt": cutoff}}, sort=[("_id", -1)])
    if last_old is None:
        return {"horizon_lsn": await horizon(engine), "before": before, "after": before,
                "folded": 0, "compressed": 0}
    limit = int(last_old["_id"])
    folded = 0
    for branch in list(engine.branches.values()):
        async with engine.writing(branch):
            old = {"b": branch.bid, "_id": {"$lte": limit}}
            if branch.voids:
                await wal.delete_many({**old, "$or": [{"_id": {"$gt": lo, "$lte": hi}}
                                                      for lo, hi in branch.voids]})
            for ns in await wal.distinct("ns", old):
                folded += await _fold(engine, {**old, "ns": ns})
    # Main's log (its changes through the main port while it had children) too.
    async with engine.writing_main():
        old = {"b": MAIN, "_id": {"$lte": limit}}
        for ns in await wal.distinct("ns", old):
            folded += await _fold(engine, {**old, "ns": ns})
    compressed = await _compress(engine, limit)
    await engine.meta["gc"].replace_one(
        {"_id": "gc"}, {"_id": "gc", "horizon": Int64(limit),
                        "at": dt.datetime.now(dt.UTC).replace(tzinfo=None)}, upsert=True)
    return {"horizon_lsn": limit, "before": before, "after": await _stats(engine),
            "folded": folded, "compressed": compressed}


async def _fold(engine: Engine, old: dict[str, Any]) -> int:
    """Fold one namespace's old entries; returns how many entries went."""
    wal = engine.wal.entries
    gone = 0
    marker = await engine.wal.first({**old, "op": {"$in": list(STARTS)}}, newest=True)
    after = dict(old)
    if marker is not None:
        gone += (await wal.delete_many({**old, "_id": {"$lt": marker["_id"]}})).deleted_count
        after["_id"] = {"$gt": marker["_id"], "$lte": old["_id"]["$lte"]}
    pipeline = [*matching({**after, "op": {"$nin": list(STARTS)}}), {"$sort": {"_id": 1}},
                {"$group": {"_id": "$id", "first": {"$first": "$_id"}, "last": {"$last": "$_id"},
                            "pre": {"$first": "$pre"}, "prez": {"$first": "$prez"},
                            "n": {"$sum": 1}}},
                {"$match": {"n": {"$gt": 1}}}]
    async for batch in engine.pool.batches(engine.meta_db, {
            "aggregate": "wal", "pipeline": pipeline, "cursor": {}, "allowDiskUse": True}):
        ops: list[Any] = []
        for group in batch:
            keep: dict[str, Any] = {}
            drop: dict[str, Any] = {"pre": "", "prez": ""}
            for field in ("pre", "prez"):
                if group.get(field) is not None:
                    keep[field] = group[field]
                    drop.pop(field)
            update: dict[str, Any] = {"$unset": drop} if drop else {}
            if keep:
                update["$set"] = keep
            if update:
                ops.append(UpdateOne({"_id": group["last"]}, update))
            ops.append(DeleteMany({**after, "id": group["_id"],
                                   "_id": {"$gte": group["first"], "$lt": group["last"]}}))
            gone += int(group["n"]) - 1
        if ops:
            await wal.bulk_write(ops, ordered=True)
    return gone


async def _compress(engine: Engine, limit: int) -> int:
    """Compress the plain images of entries up to limit: one pass per branch over its
    (b, _id) index. A filter on the images themselves, or pages by LSN, would make
    SecantusDB examine the whole range for every page."""
    wal = engine.wal.entries
    done = 0
    for bid in [b.bid for b in engine.branches.values()] + [MAIN]:
        ops: list[UpdateOne] = []
        async for entry in wal.find({"b": bid, "_id": {"$lte": limit}},
                                    {"pre": 1, "post": 1}).sort("_id", 1).batch_size(BATCH):
            update: dict[str, Any] = {}
            for field in ("pre", "post"):
                if isinstance(entry.get(field), dict):
                    blob = packed(entry[field])
                    if blob is not None:
                        update.setdefault("$set", {})[field + "z"] = blob
                        update.setdefault("$unset", {})[field] = ""
            if update:
                ops.append(UpdateOne({"_id": entry["_id"]}, update))
            if len(ops) >= BATCH:
                await wal.bulk_write(ops, ordered=False)
                done += len(ops)
                ops = []
        if ops:
            await wal.bulk_write(ops, ordered=False)
            done += len(ops)
    return done
