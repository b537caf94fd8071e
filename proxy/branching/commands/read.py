"""find, count, distinct, aggregate and explain on a branch: rewritten so the
upstream evaluates the branch view (cluster_find / cluster_aggregate style)."""

from __future__ import annotations

from typing import Any

from bson.int64 import Int64

from proxy.branching import merge, views
from proxy.branching.commands.aggregate import plan_aggregate
from proxy.branching.commands.base import (
    READ_CARRY,
    Request,
    carry,
    coll_name,
    cursor_reply,
    documents_stage,
)
from proxy.branching.errors import CommandError
from proxy.branching.model import NsState
from proxy.wire.codes import Code

# find options with no faithful aggregate equivalent.
_FIND_UNSUPPORTED = ("min", "max", "returnKey", "showRecordId", "tailable", "awaitData",
                     "oplogReplay")


def _check_projection(req: Request, projection: dict[str, Any]) -> None:
    for key, value in projection.items():
        if key.endswith(".$") or key == "$":
            raise req.unsupported("the positional projection operator '$'")
        if isinstance(value, dict) and ("$elemMatch" in value or "$slice" in value):
            raise req.unsupported(f"the {next(iter(value))} projection operator")


def find_pipeline(req: Request, cmd: dict[str, Any], layers: list[NsState]) -> dict[str, Any]:
    """The aggregate that answers a find on the branch view."""
    coll = cmd["find"]
    for opt in _FIND_UNSUPPORTED:
        if cmd.get(opt):
            raise req.unsupported(f"find option {opt!r}")
    filt = cmd.get("filter") or {}
    source, pipeline = views.view_source(coll, layers, filt)
    if cmd.get("sort"):
        pipeline.append({"$sort": cmd["sort"]})
    if cmd.get("skip"):
        pipeline.append({"$skip": cmd["skip"]})
    limit = abs(int(cmd.get("limit") or 0))
    if limit:
        pipeline.append({"$limit": limit})
    projection = cmd.get("projection")
    if projection:
        _check_projection(req, projection)
        pipeline.append({"$project": projection})
    cursor: dict[str, Any] = {}
    if "batchSize" in cmd:
        cursor["batchSize"] = cmd["batchSize"]
    out = carry(cmd, {"aggregate": source, "pipeline": pipeline, "cursor": cursor}, READ_CARRY)
    if source != coll:
        out.pop("hint", None)
    return out


async def find(req: Request) -> dict[str, Any] | None:
    coll = coll_name(req)
    layers = req.layers(coll)
    if not layers:
        return None
    cmd = req.cmd
    sides = None if merge.collated(cmd) else merge.point_sides(coll, layers, cmd.get("filter"))
    if sides is not None and not cmd.get("skip"):
        if not sides:
            return cursor_reply(f"{req.db}.{coll}", [])
        if sides[0].coll == coll:
            return None
        point = {k: v for k, v in cmd.items() if k not in ("$db", "hint")}
        point["find"] = sides[0].coll
        point["singleBatch"] = True
        reply = await req.run.reply(req.db, point)
        if reply.get("ok"):
            reply["cursor"]["ns"] = f"{req.db}.{coll}"
        return reply
    merged = await _merged_find(req, coll, layers)
    if merged is not None:
        return merged
    planned = find_pipeline(req, cmd, layers)
    reply = await req.run.reply(req.db, planned)
    single = cmd.get("singleBatch") or int(cmd.get("limit") or 0) < 0
    if single and reply.get("ok") and reply["cursor"]["id"]:
        await req.run.reply(req.db, {"killCursors": planned["aggregate"],
                                     "cursors": [reply["cursor"]["id"]]})
        reply["cursor"]["id"] = Int64(0)
    return merge.adopt(req.engine.cursors, req.db, coll, planned["aggregate"], reply,
                       cmd.get("lsid"))


async def _merged_find(req: Request, coll: str,
                       layers: list[NsState]) -> dict[str, Any] | None:
    cmd = req.cmd
    first = int(cmd.get("batchSize", merge.DEFAULT_FIRST_BATCH))
    cursor = await merge.open_find(req.run, req.db, coll, layers, cmd, first)
    if cursor is None:
        return None
    try:
        docs = await cursor.batch(req.run, first)
    except CommandError:
        # A side refused a getMore (SecantusDB's sortKey over an empty array): the
        # server-side union answers instead.
        await cursor.close(req.run)
        return None
    cursor_id = 0
    single = bool(cmd.get("singleBatch")) or int(cmd.get("limit") or 0) < 0
    if single or cursor.done:
        await cursor.close(req.run)
    else:
        cursor_id = req.engine.cursors.add(cursor)
    return cursor_reply(f"{req.db}.{coll}", docs, cursor_id)


async def get_more(req: Request) -> dict[str, Any] | None:
    cursor = req.engine.cursors.get(req.cmd.get("getMore"))
    if cursor is None:
        return None
    # mongod: a getMore without batchSize returns what fits one reply (16 MiB).
    size = int(req.cmd["batchSize"]) if req.cmd.get("batchSize") else None
    docs = await cursor.batch(req.run, size)
    cursor_id = cursor.id
    if cursor.done:
        req.engine.cursors.pop(cursor.id)
        await cursor.close(req.run)
        cursor_id = 0
    return cursor_reply(cursor.ns, docs, cursor_id, "nextBatch")


async def kill_cursors(req: Request) -> dict[str, Any] | None:
    ids = req.cmd.get("cursors")
    if not isinstance(ids, list):
        return None
    ours = [i for i in ids if req.engine.cursors.get(i) is not None]
    if not ours:
        return None
    for cursor_id in ours:
        cursor = req.engine.cursors.pop(cursor_id)
        if cursor is not None:
            await cursor.close(req.run)
    reply: dict[str, Any] = {"cursorsKilled": list(ours), "cursorsNotFound": [],
                             "cursorsAlive": [], "cursorsUnknown": [], "ok": 1.0}
    rest = [i for i in ids if i not in ours]
    if rest:
        upstream = await req.run(req.db, {"killCursors": req.cmd["killCursors"],
                                          "cursors": rest})
        for key in ("cursorsKilled", "cursorsNotFound", "cursorsAlive", "cursorsUnknown"):
            reply[key] += upstream.get(key, [])
    return reply


def count_pipeline(cmd: dict[str, Any], layers: list[NsState]) -> dict[str, Any]:
    source, pipeline = views.view_source(cmd["count"], layers, cmd.get("query") or {})
    if cmd.get("skip"):
        pipeline.append({"$skip": int(cmd["skip"])})
    limit = abs(int(cmd.get("limit") or 0))
    if limit:
        pipeline.append({"$limit": limit})
    pipeline.append({"$count": "n"})
    out = carry(cmd, {"aggregate": source, "pipeline": pipeline, "cursor": {}}, READ_CARRY)
    if source != cmd["count"]:
        out.pop("hint", None)
    return out


async def count(req: Request) -> dict[str, Any] | None:
    coll = coll_name(req)
    layers = req.layers(coll)
    if not layers:
        return None
    cmd = req.cmd
    if any(layer.hidden_ids is None for layer in layers):
        reply = await req.run(req.db, count_pipeline(cmd, layers))
        batch = reply["cursor"]["firstBatch"]
        return {"n": int(batch[0]["n"]) if batch else 0, "ok": 1.0}
    # Per side: its matches, less those a layer above hides (an indexed $in on _id).
    filt = cmd.get("query") or {}
    total = 0
    for side in merge.plan_sides(coll, layers):
        sub = carry(cmd, {"count": side.coll, "query": filt}, _COUNT_CARRY)
        if side.coll == coll and "hint" in cmd:
            sub["hint"] = cmd["hint"]
        total += int((await req.run(req.db, sub))["n"])
        hidden = [v for ids in side.hidden for v in ids.values()]
        if hidden:
            # The ids first (an index lookup), the user's filter over just those.
            stages: list[dict[str, Any]] = [{"$match": {"_id": {"$in": hidden}}}]
            if filt:
                stages.append({"$match": filt})
            agg = carry(cmd, {"aggregate": side.coll, "cursor": {},
                              "pipeline": [*stages, {"$count": "n"}]}, _COUNT_CARRY)
            batch = (await req.run(req.db, agg))["cursor"]["firstBatch"]
            total -= int(batch[0]["n"]) if batch else 0
    total = max(0, total - int(cmd.get("skip") or 0))
    limit = abs(int(cmd.get("limit") or 0))
    return {"n": min(total, limit) if limit else total, "ok": 1.0}


_COUNT_CARRY = ("lsid", "$clusterTime", "readConcern", "collation", "comment", "maxTimeMS",
                "apiVersion", "apiStrict")


async def distinct(req: Request) -> dict[str, Any] | None:
    coll = coll_name(req)
    layers = req.layers(coll)
    if not layers:
        return None
    cmd = req.cmd
    key = cmd.get("key")
    if not isinstance(key, str):
        raise CommandError(Code.TYPE_MISMATCH, "distinct key must be a string")
    filt = cmd.get("query") or {}
    if any(layer.hidden_ids is None for layer in layers):
        return await _distinct_by_pipeline(req, coll, key, filt, layers)
    # Each side is a real distinct (exact array semantics); the server merges them.
    parts: list[Any] = []
    dropped_at = next((i for i, layer in enumerate(layers) if layer.base_dropped), None)
    sides: list[tuple[str, list[NsState]]] = []
    if dropped_at is None:
        sides.append((coll, layers))
    for j, layer in enumerate(layers):
        if dropped_at is not None and j > dropped_at:
            break
        sides.append((layer.live, layers[:j]))
    for name, above in sides:
        hidden = [v for layer in above for v in (layer.hidden_ids or {}).values()]
        query = filt
        if hidden:
            query = {"$and": [filt, {"_id": {"$nin": hidden}}]} if filt else \
                {"_id": {"$nin": hidden}}
        sub = carry(cmd, {"distinct": name, "key": key, "query": query}, READ_CARRY)
        if name != coll:
            sub.pop("hint", None)  # the hint names a base index
        reply = await req.run(req.db, sub)
        parts.extend(reply["values"])
    return {"values": await _dedupe(req, parts), "ok": 1.0}


async def _dedupe(req: Request, values: list[Any]) -> list[Any]:
    """Distinct values of a list, compared by the server (BSON order, collation)."""
    if len(values) < 2:
        return values
    cmd: dict[str, Any] = {
        "aggregate": 1,
        "pipeline": [documents_stage([{"v": v} for v in values]),
                     {"$group": {"_id": "$v"}}],
        "cursor": {},
    }
    carry(req.cmd, cmd, ("collation",))
    return [doc["_id"] async for batch in req.run.batches(req.db, cmd) for doc in batch]


async def _distinct_by_pipeline(req: Request, coll: str, key: str, filt: dict[str, Any],
                                layers: list[NsState]) -> dict[str, Any]:
    if "." in key:
        raise req.unsupported("distinct on a dotted key over a large overlay")
    path = f"${key}"
    source, stages = views.view_source(coll, layers, filt)
    pipeline = [
        *stages,
        {"$match": {key: {"$not": {"$size": 0}}}},
        {"$unwind": {"path": path, "preserveNullAndEmptyArrays": True}},
        {"$group": {"_id": None, "v": {"$addToSet": path}}},
    ]
    cmd = carry(req.cmd, {"aggregate": source, "pipeline": pipeline, "cursor": {}}, READ_CARRY)
    if source != coll:
        cmd.pop("hint", None)
    reply = await req.run(req.db, cmd)
    batch = reply["cursor"]["firstBatch"]
    return {"values": batch[0]["v"] if batch else [], "ok": 1.0}


async def explain(req: Request) -> dict[str, Any] | None:
    inner = req.cmd.get("explain")
    if not isinstance(inner, dict) or not inner:
        raise CommandError(Code.FAILED_TO_PARSE, "explain needs a command document")
    name = next(iter(inner))
    coll = inner.get(name)
    if not isinstance(coll, str):
        return None
    layers = req.layers(coll)
    if name == "find" and layers:
        rewritten = find_pipeline(req, inner, layers)
    elif name == "count" and layers:
        rewritten = count_pipeline(inner, layers)
    elif name == "aggregate":
        planned = await plan_aggregate(req, inner)
        if planned is None:
            return None
        rewritten = planned
    elif name in ("update", "delete", "findAndModify", "distinct") and layers:
        raise req.unsupported(f"explain of {name} on a changed collection")
    else:
        return None
    rewritten = {k: v for k, v in rewritten.items() if k not in ("lsid", "$clusterTime")}
    out = {"explain": rewritten}
    carry(req.cmd, out, ("verbosity", "lsid", "$clusterTime", "comment", "maxTimeMS"))
    return await req.run.reply(req.db, out)
