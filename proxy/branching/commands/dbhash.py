"""`dbHash` and `dataSize` on a branch port.

The upstream holds a branch's collections as its base plus overlays, and other branches'
overlays beside them: its own `dbHash` of the database would hash all of those, not the
branch's view. So a branch port answers `dbHash` itself for every database, touched or
not, over the documents the branch shows, read from the upstream as its own BSON (the
server-side union of a changed collection, sorted by `_id`), so that the digest is
mongod's algorithm applied to the branch's data.

`dataSize` of a collection the branch never changed is the upstream's own answer. Of a
changed one, the upstream reads the branch view and sizes each document (`$bsonSize`):
a `$group` through the branch's aggregate for the whole collection, a `min`/`max` find
through the branch's find for an index range, the proxy only adding the figures up.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from bson.int64 import Int64
from bson.max_key import MaxKey
from bson.min_key import MinKey

from proxy.branching import authz, masking, planner
from proxy.branching.commands import aggregate, read
from proxy.branching.commands.base import Handler, Request
from proxy.branching.commands.catalog import visible_collections
from proxy.branching.errors import CommandError
from proxy.branching.runner import error_from
from proxy.wire.codes import Code

# What mongod leaves out of a database's hash: collections that are not replicated (the
# profiler's), and incremental mapReduce's temporary ones.
_UNHASHED = ("system.profile",)
_UNHASHED_PREFIX = "tmp.mr."


def _wanted(spec: Any) -> set[str] | None:
    if spec is None:
        return None
    if not isinstance(spec, list):
        raise CommandError(Code.TYPE_MISMATCH, "collections must be an array of strings")
    if not all(isinstance(name, str) for name in spec):
        raise CommandError(Code.TYPE_MISMATCH, "collections entries have to be strings")
    return set(spec)


def _hashed(name: str) -> bool:
    return name not in _UNHASHED and not name.startswith(_UNHASHED_PREFIX)


async def _collection_md5(req: Request, coll: str) -> str:
    """mongod's: the md5 of every document's BSON, one after another, in `_id` order. A
    changed collection is read as one server-side union (not the proxy's merge of
    several finds, which decodes every document to compare sort keys), so its bytes are
    the upstream's; the sort is the server's, allowed to spill to disk."""
    layers = req.layers(coll)
    spec = {"find": coll, "filter": {}, "sort": {"_id": 1}}
    cmd = spec if not layers else {
        **planner.union_find(spec, layers, branch=req.on_branch.name), "allowDiskUse": True}
    digest = hashlib.md5()
    async for batch in req.run.raw_batches(req.db, cmd):
        for doc in batch:
            digest.update(doc)
    return digest.hexdigest()


def _unmasked(req: Request) -> None:
    """A masked branch shows masked values over the base's real ones, which both commands
    would read: a digest or a size of the real values tells of them."""
    if req.on_branch.masked:
        raise masking.refusal(f"command {req.name!r}", req.on_branch.name)


async def db_hash(req: Request) -> dict[str, Any]:
    started = time.monotonic()
    _unmasked(req)
    wanted = _wanted(req.cmd.get("collections"))
    hashes: dict[str, str] = {}
    capped: list[str] = []
    uuids: dict[str, Any] = {}
    shown = await visible_collections(req)
    for name in sorted(shown):
        info = shown[name]
        if info.get("type", "collection") != "collection" or not _hashed(name):
            continue
        if req.db == "local" or (wanted is not None and name not in wanted):
            continue
        if (info.get("options") or {}).get("capped"):
            capped.append(name)
        uuid = (info.get("info") or {}).get("uuid")
        if uuid is not None:
            uuids[name] = uuid
        hashes[name] = await _collection_md5(req, name)
    # mongod's database digest: the collections' hex digests, in name order.
    total = hashlib.md5()
    for digest in hashes.values():
        total.update(digest.encode())
    return {"host": f"{socket.gethostname()}:{req.on_branch.port}", "collections": hashes,
            "capped": capped, "uuids": uuids, "md5": total.hexdigest(),
            "timeMillis": _millis(started), "fromCache": [], "ok": 1.0}


def _millis(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


# -- dataSize ---------------------------------------------------------------------------

async def _documents(req: Request, handler: Handler,
                     cmd: dict[str, Any]) -> AsyncGenerator[list[dict[str, Any]]]:
    """The batches of a read run as the branch's own handler runs it (the upstream as it
    is where the handler lets it through), its cursor continued and closed the same way."""
    sub = Request(req.engine, req.branch, req.ctx, req.run, req.db, {**cmd, "$db": req.db})
    reply = await handler(sub) or await req.run.reply(req.db, cmd)
    if not reply.get("ok"):
        raise error_from(reply)
    cursor = reply["cursor"]
    coll = str(cursor["ns"]).split(".", 1)[1]
    cursor_id = cursor["id"]
    batch = cursor["firstBatch"]
    try:
        while True:
            if batch:
                yield batch
            if not cursor_id:
                break
            more = {"getMore": cursor_id, "collection": coll, "$db": req.db}
            reply = await read.get_more(
                Request(req.engine, req.branch, req.ctx, req.run, req.db, more)) \
                or await req.run.reply(req.db, {k: v for k, v in more.items() if k != "$db"})
            if not reply.get("ok"):
                raise error_from(reply)
            cursor_id = reply["cursor"]["id"]
            batch = reply["cursor"]["nextBatch"]
    finally:
        if cursor_id:
            kill = {"killCursors": coll, "cursors": [cursor_id], "$db": req.db}
            await read.kill_cursors(Request(req.engine, req.branch, req.ctx, req.run,
                                            req.db, kill)) \
                or await req.run.reply(req.db, {k: v for k, v in kill.items() if k != "$db"})


async def _whole(req: Request, coll: str) -> tuple[int, int]:
    """The branch view's total BSON size and document count, as the upstream sums them."""
    group = {"aggregate": coll, "cursor": {}, "pipeline": [{"$group": {
        "_id": None, "size": {"$sum": {"$bsonSize": "$$ROOT"}}, "n": {"$sum": 1}}}]}
    async with aclosing(_documents(req, aggregate.aggregate, group)) as batches:
        async for batch in batches:
            for doc in batch:
                return int(doc["size"]), int(doc["n"])
    return 0, 0


async def _range_index(req: Request, coll: str, key: dict[str, Any]) -> dict[str, Any]:
    """The index a range is read by, as mongod picks it: the first whose key pattern
    starts with the given fields and that holds every document (neither sparse nor
    partial) under the simple collation."""
    fields = list(key)
    for index in await req.engine.view_indexes(req.on_branch, req.db, coll, req.run):
        pattern = index.get("key")
        if not isinstance(pattern, dict) or list(pattern)[:len(fields)] != fields:
            continue
        if index.get("sparse") or "partialFilterExpression" in index:
            continue
        if (index.get("collation") or {}).get("locale", "simple") != "simple":
            continue
        return dict(pattern)
    raise CommandError(Code.OPERATION_FAILED, "Couldn't find valid index containing key pattern")


def _extended(bound: dict[str, Any], pattern: dict[str, Any]) -> dict[str, Any]:
    """A bound on a prefix of the index's fields, extended over the rest as mongod's
    `extendRangeBound` does (MinKey under an ascending field, MaxKey under a descending
    one): the range then starts, and ends, before any key sharing that prefix."""
    return {field: bound[field] if field in bound else
            (MaxKey() if isinstance(order, (int, float)) and order < 0 else MinKey())
            for field, order in pattern.items()}


def _bound(req: Request, name: str) -> dict[str, Any]:
    value = req.cmd.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CommandError(Code.TYPE_MISMATCH, f"BSON field 'dataSize.{name}' is the wrong "
                           f"type '{type(value).__name__}', expected type 'object'")
    return value


async def data_size(req: Request) -> dict[str, Any] | None:
    started = time.monotonic()
    _unmasked(req)
    ns = req.cmd[req.name]
    if not isinstance(ns, str) or "." not in ns.strip(".") or ns.startswith("."):
        raise CommandError(Code.INVALID_NAMESPACE, f"Invalid namespace specified '{ns}'")
    db, coll = ns.split(".", 1)
    branch = req.on_branch
    authz.check_branch_port({req.name: ns}, db, req.engine.meta_db, branch.name)
    on_ns = Request(req.engine, req.branch, req.ctx, req.run, db, {**req.cmd, "$db": db})
    if not on_ns.layers(coll):
        return None
    low, high = _bound(req, "min"), _bound(req, "max")
    key = req.cmd.get("keyPattern") or {}
    estimate = bool(req.cmd.get("estimate"))
    max_size = int(req.cmd.get("maxSize") or 0)
    max_objects = int(req.cmd.get("maxObjects") or 0)
    info = (await visible_collections(on_ns, coll)).get(coll)
    if info is not None and info.get("type") == "view":
        raise CommandError(Code.COMMAND_NOT_SUPPORTED_ON_VIEW,
                           f"Namespace {ns} is a view, not a collection")
    if info is None:
        return {"size": Int64(0), "numObjects": Int64(0), "millis": _millis(started),
                "ok": 1.0}
    total, count = await _whole(on_ns, coll)
    if count == 0:
        return {"size": Int64(0), "numObjects": Int64(0), "millis": _millis(started),
                "ok": 1.0}
    if bool(low) != bool(high):
        raise CommandError(Code.BAD_VALUE, "Only one of min or max specified")
    if not low and (estimate or not (max_size or max_objects)):
        # The whole collection: what mongod's estimate gives (the collection's data size)
        # and what its scan adds up are the same figure here, the view's BSON bytes.
        return {"estimate": estimate, "size": Int64(total), "numObjects": Int64(count),
                "millis": _millis(started), "ok": 1.0}
    find: dict[str, Any] = {"find": coll, "filter": {},
                            "projection": {"_id": 0, "s": {"$bsonSize": "$$ROOT"}}}
    if low:
        pattern = await _range_index(on_ns, coll, key if isinstance(key, dict) and key
                                     else dict.fromkeys(low, 1))
        find.update(min=_extended(low, pattern), max=_extended(high, pattern), hint=pattern)
    size, objects, reached = await _scanned(on_ns, find, total // count if estimate else None,
                                            max_size, max_objects)
    reply: dict[str, Any] = {"estimate": estimate, "size": Int64(size),
                             "numObjects": Int64(objects), "millis": _millis(started)}
    if reached:
        reply["maxReached"] = True
    reply["ok"] = 1.0
    return reply


async def _scanned(req: Request, find: dict[str, Any], average: int | None, max_size: int,
                   max_objects: int) -> tuple[int, int, bool]:
    """Size and count of what the find reads, each document counted at the server's
    `$bsonSize` (or at the average, for an estimate), up to mongod's maxSize/maxObjects
    (then True)."""
    size = objects = 0
    async with aclosing(_documents(req, read.find, find)) as batches:
        async for batch in batches:
            for doc in batch:
                size += average if average is not None else int(doc["s"])
                objects += 1
                if (max_size and size > max_size) or (max_objects and objects > max_objects):
                    return size, objects, True
    return size, objects, False
