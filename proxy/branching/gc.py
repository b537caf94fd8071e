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

import bson
from bson.int64 import Int64
from pymongo import DeleteMany, UpdateOne

from proxy.branching.engine import Engine
from proxy.branching.errors import BranchError, Kind
from proxy.branching.naming import MAIN
from proxy.branching.wal import (
    DOCUMENT,
    IMAGES,
    IN_CHUNK,
    MAX_ENTRY,
    STARTS,
    first_pre,
    matching,
    packed,
)

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
    """The WAL's entries, and its bytes with the images stored out of line (walimages)."""
    entries, size = await _sized(engine, "wal")
    _, images = await _sized(engine, IMAGES)
    return {"entries": entries, "bytes": size + images}


async def _sized(engine: Engine, coll: str) -> tuple[int, int]:
    reply = await engine.pool(engine.meta_db, {"aggregate": coll, "cursor": {}, "pipeline": [
        {"$group": {"_id": None, "n": {"$sum": 1}, "bytes": {"$sum": {"$bsonSize": "$$ROOT"}}}}]})
    batch = reply["cursor"]["firstBatch"]
    return (int(batch[0]["n"]), int(batch[0]["bytes"])) if batch else (0, 0)


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
    for bid in [b.bid for b in engine.branches.values()] + [MAIN]:
        await engine.wal.sweep_images(bid, cutoff)
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
    # Document entries only: an `own` or catalog entry stays as it is.
    pipeline = [*matching({**after, "op": {"$in": list(DOCUMENT)}}), {"$sort": {"_id": 1}},
                {"$group": {"_id": "$id", "lsns": {"$push": "$_id"},
                            **first_pre(),
                            "post": {"$last": "$post"}, "n": {"$sum": 1}}},
                {"$match": {"n": {"$gt": 1}}}]
    async for batch in engine.pool.batches(engine.meta_db, {
            "aggregate": "wal", "pipeline": pipeline, "cursor": {}, "allowDiskUse": True}):
        # Every folded entry is rewritten before the entries it replaces go (one ordered
        # bulk): a crash in between leaves entries a second gc folds the same way.
        updates: list[Any] = []
        older: list[Any] = []
        for group in batch:
            lsns = group["lsns"]
            if group.get("prex"):
                # An out-of-line first pre-image: its chunks are the first entry's, which
                # goes; stored again as the folded entry's before it names them.
                group["prex"] = await engine.wal.copy_images(
                    group["prex"], old["b"], int(lsns[-1]), "pre")
            elif _too_large_to_add(group):
                # The folded entry may hold a post-image as large (its own pre-image was
                # then out of line): this one goes out of line too.
                group["prex"] = await engine.wal.store_image(
                    group.pop("pre"), old["b"], int(lsns[-1]), "pre")
            updates.append(UpdateOne({"_id": lsns[-1]}, _folded(group)))
            older.extend(lsns[:-1])
        # By _id, a hundred at a time: SecantusDB's `$in` costs grow with the square of
        # the list, and a range per document would be a statement per document.
        deletes = [DeleteMany({"_id": {"$in": older[i:i + IN_CHUNK]}})
                   for i in range(0, len(older), IN_CHUNK)]
        if updates:
            await wal.bulk_write([*updates, *deletes], ordered=True)
            gone += len(older)
    return gone


def _too_large_to_add(group: dict[str, Any]) -> bool:
    """Whether a first pre-image could not be added to a folded entry even compressed:
    over half the BSON limit. One that compression brings under it is left compressed
    in the group (`prez`), which `_folded` then takes as it is."""
    pre = group.get("pre")
    if not isinstance(pre, dict) or len(bson.encode(pre)) <= MAX_ENTRY // 2:
        return False
    blob = packed(pre)
    if blob is None or len(blob) > MAX_ENTRY // 2:
        return True
    group["prez"] = blob
    del group["pre"]
    return False


def _folded(group: dict[str, Any]) -> dict[str, Any]:
    """The update making a document's last old entry the fold of them all: the first
    pre-image (what merges compare with; out of line, its chunks copied for this entry),
    its images compressed where that saves space (what _compress would do next). An
    out-of-line post-image stays as it is."""
    sets: dict[str, Any] = {}
    unset: dict[str, Any] = {}
    pre, prez, prex = group.get("pre"), group.get("prez"), group.get("prex")
    if isinstance(pre, dict) and (blob := packed(pre)) is not None:
        pre, prez = None, blob
    for field, value in (("pre", pre), ("prez", prez), ("prex", prex)):
        if value is not None:
            sets[field] = value
        else:
            unset[field] = ""
    post = group.get("post")
    if isinstance(post, dict) and (blob := packed(post)) is not None:
        sets["postz"] = blob
        unset["post"] = ""
    return {**({"$set": sets} if sets else {}), **({"$unset": unset} if unset else {})}


async def _compress(engine: Engine, limit: int) -> int:
    """Compress the plain images of entries up to limit: one pass per branch over its
    (b, _id) index, in no order (a find sorted by LSN is sorted in memory by
    SecantusDB). A filter on the images themselves, or pages by LSN, would make
    SecantusDB examine the whole range for every page."""
    wal = engine.wal.entries
    done = 0
    for bid in [b.bid for b in engine.branches.values()] + [MAIN]:
        ops: list[UpdateOne] = []
        async for entry in wal.find({"b": bid, "_id": {"$lte": limit}},
                                    {"pre": 1, "post": 1}).batch_size(BATCH):
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
