"""find, count, distinct and explain on a branch: the executors of the read planner's
plans (`planner.py` decides; these run what it decided, and ask it again when the
upstream refuses a merged find)."""

from __future__ import annotations

from typing import Any

from bson.int64 import Int64

from proxy.branching import cursormerge, planner, views
from proxy.branching.commands import aggregate, changestream, hints, scratchfrom, snapshotread
from proxy.branching.commands.base import (
    Request,
    carry,
    coll_name,
    cursor_reply,
    documents_stage,
)
from proxy.branching.errors import CommandError
from proxy.branching.model import NsState
from proxy.branching.planner import PlanKind
from proxy.branching.runner import outside_transaction
from proxy.branching.txn import CURRENT
from proxy.wire.codes import Code


async def find(req: Request) -> dict[str, Any] | None:
    coll = coll_name(req)
    layers = req.layers(coll)
    cmd = req.cmd
    branch = req.on_branch.name
    if cmd.get("tailable"):
        return await _tailable(req, coll, layers)
    if layers and planner.index_bound(cmd):
        cmd = await _index_bound_form(req, coll, layers, cmd)
    elif layers:
        cmd = await hints.on_base(req, coll, cmd)
    plan = planner.plan_find(cmd, layers, branch=branch)
    if plan.kind is PlanKind.PASS:
        return await hints.passed(req, cmd)
    if plan.kind is PlanKind.COPY:
        return await _copy_find(req, coll, layers, cmd)
    if plan.kind is PlanKind.POINT:
        if plan.command is None:
            return cursor_reply(f"{req.db}.{coll}", [])
        reply = await req.run.reply(req.db, plan.command)
        if reply.get("ok"):
            reply["cursor"]["ns"] = f"{req.db}.{coll}"
        return reply
    if plan.kind is not PlanKind.UNION:
        refused: list[tuple[str, dict[str, Any]]] = []
        merged = await _proxy_cursor(req, coll, plan, cmd, refused)
        if merged is not None:
            return merged
        if planner.index_bound(cmd) and refused:
            if len(refused) == len(plan.sources):
                return _users_refusal(coll, refused)
            # The second planning step (logged with its reason), carried out below.
            planner.copy_find(cmd, layers, "the hinted index is not on every collection the "
                              "branch reads (one made on the branch has no copy on the base)")
            return await _copy_find(req, coll, layers, cmd)
        plan = planner.fall_back(plan, cmd, layers, "the upstream refused a side",
                                 branch=branch)
    if plan.refetch:
        return await _refetch_find(req, coll, layers, plan)
    return await _union_find(req, coll, plan)


async def _index_bound_form(req: Request, coll: str, layers: list[NsState],
                            cmd: dict[str, Any]) -> dict[str, Any]:
    """An index-bound find (min, max, returnKey) on a changed collection, with what the
    planner and the sides need said explicitly: the default collation, the hint's key
    pattern, and for a returnKey without a hint the index the base's planner picks."""
    whole = views.whole(layers) is not None
    if "collation" not in cmd and not whole:
        # The collection's default collation orders its indexes as an explicit one
        # would: said explicitly, the planner sees it (and sends the find to a copy).
        collation = (await _collection_options(req, coll, layers)).get("collation")
        if collation is not None:
            cmd = {**cmd, "collation": collation}
    if isinstance(cmd.get("hint"), str):
        cmd = await _hint_by_pattern(req, coll, cmd)
    if cmd.get("returnKey") and cmd.get("hint") is None and not whole:
        cmd = await _hint_by_plan(req, coll, cmd)
    return cmd


async def _hint_by_pattern(req: Request, coll: str, cmd: dict[str, Any]) -> dict[str, Any]:
    """An index-bound find whose hint names an index by name, hinted by its key pattern
    instead: the merge is ordered by that pattern. The name is looked up in the branch's
    index list, which each side's copy of the index shares (hints.check has refused a
    name it does not hold)."""
    indexes = await req.engine.view_indexes(req.on_branch, req.db, coll, req.run)
    key = next((ix.get("key") for ix in indexes if ix.get("name") == cmd["hint"]), None)
    return {**cmd, "hint": dict(key)} if isinstance(key, dict) else cmd


async def _hint_by_plan(req: Request, coll: str, cmd: dict[str, Any]) -> dict[str, Any]:
    """A returnKey find without a hint, hinted with the index the base collection's own
    planner picks for it (its explain): every side then returns keys of that one index,
    as mongod's one plan does, merged in its key order. A plan with no index scan gives
    every document an empty key, as mongod's does; `$natural` keeps each side on a scan."""
    shape = {k: cmd[k] for k in ("filter", "sort", "collation") if k in cmd}
    reply = await req.run.reply(req.db, {"explain": {"find": coll, **shape},
                                         "verbosity": "queryPlanner"})
    plan = (reply.get("queryPlanner") or {}).get("winningPlan") if reply.get("ok") else None
    if not isinstance(plan, dict):
        return cmd  # the merge then refuses it, saying why
    key = _scanned_index(plan)
    return {**cmd, "hint": key if key is not None else {"$natural": 1}}


def _scanned_index(stage: dict[str, Any]) -> dict[str, Any] | None:
    """The key pattern of the index scan in an explained plan, if it has one."""
    if stage.get("stage") == "IXSCAN" and isinstance(stage.get("keyPattern"), dict):
        return dict(stage["keyPattern"])
    children = [stage.get("inputStage"), *(stage.get("inputStages") or [])]
    for child in children:
        if isinstance(child, dict) and (found := _scanned_index(child)) is not None:
            return found
    return None


def _users_refusal(coll: str, refused: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """A merged min/max/returnKey find every side refused: the upstream's own answer to
    the user's find (a missing hint, bounds that do not fit the index), given as the
    base's (or first overlay's) reply."""
    return next((reply for source, reply in refused if source == coll), refused[0][1])


async def _copy_find(req: Request, coll: str, layers: list[NsState],
                     cmd: dict[str, Any]) -> dict[str, Any]:
    """An index-bound find (min, max, returnKey) run as it is on a scratch copy of the
    branch view (planner.copy_find, `_filled_copy`), so bounds, keys, collation and any
    index type are the server's own. The copy is dropped when the cursor (or the
    transaction) ends."""
    made: list[str] = []
    try:
        name, find, at = await _filled_copy(req, coll, layers, cmd, req.cmd.get("hint"), made)
        reply = await req.run.reply(req.db, {**find, "find": name})
    except BaseException:
        await scratchfrom.drop(req, made)
        raise
    if not reply.get("ok") and isinstance(reply.get("errmsg"), str):
        reply["errmsg"] = reply["errmsg"].replace(f"{req.db}.{name}", f"{req.db}.{coll}")
    reply = cursormerge.adopt(req.engine.cursors, req.db, coll, name, reply,
                              cmd.get("lsid"))
    settled = await scratchfrom.settle(req, reply, made)
    assert settled is not None
    return snapshotread.stamp(settled, at)


async def _filled_copy(req: Request, coll: str, layers: list[NsState], cmd: dict[str, Any],
                       users_hint: Any, made: list[str]) -> tuple[str, dict[str, Any], Any]:
    """A scratch copy of what the branch shows of `coll` (scratchfrom.fill: an $out, or
    inserts in a transaction or at a snapshot), with the branch's indexes the hint names
    built on it (their names and options kept) and the collection's default collation;
    the find to run there; and the cluster time of a snapshot read. A snapshot read's
    copy is filled from an aggregation at the read's time, so the find on it reads that
    time's data without a read concern of its own."""
    cmd, at = await snapshotread.pinned(req, coll, cmd)
    concern = cmd.get("readConcern") if snapshotread.requested(cmd) else None
    find = {k: v for k, v in cmd.items()
            if k != "$db" and not (k == "readConcern" and concern is not None)}
    # The user's own hint (a name stays a name: the copy's index keeps it), else the one
    # the branch chose for a returnKey without one.
    find["hint"] = users_hint if users_hint is not None else cmd.get("hint")
    if find["hint"] is None:
        del find["hint"]
    indexes = await req.engine.view_indexes(req.on_branch, req.db, coll, req.run)
    # An index listed without a collation on a collection with a default one has the
    # default (mongod lists it; SecantusDB leaves it out): the copy's says so.
    default = (await _collection_options(req, coll, layers)).get("collation")
    named = hints.named(find.get("hint"), indexes)
    specs = [{**({"collation": default} if default is not None else {}),
              **{k: v for k, v in ix.items() if k not in ("ns", "hidden")}}
             for ix in named if ix.get("name") != "_id_" and not ix.get("hidden")]
    name = await scratchfrom.fill(req, coll, [], made, indexes=specs,
                                  default_collation=default, read_concern=concern)
    return name, find, at


async def _refetch_find(req: Request, coll: str, layers: list[NsState],
                        plan: planner.Plan) -> dict[str, Any]:
    """The union picks the answer's ids; a find on each collection holding them projects
    them (planner.find_only). Always a proxy cursor: its batches are read as asked."""
    cmd, at = await snapshotread.pinned(req, coll, req.cmd)
    assert plan.command is not None
    ids_cmd = dict(plan.command)
    if at is not None:
        ids_cmd["readConcern"] = cmd["readConcern"]
    first = int(cmd.get("batchSize", cursormerge.DEFAULT_FIRST_BATCH))
    ids_cmd["cursor"] = {"batchSize": first}
    reply = await req.run(req.db, ids_cmd)
    source = str(ids_cmd["aggregate"])
    ids = cursormerge.Side(source, [], cursor_id=reply["cursor"]["id"])
    ids.accept(reply["cursor"]["firstBatch"])
    projection = dict(cmd.get("projection") or {})
    drop_id = projection.get("_id") in (0, False)
    if drop_id:
        del projection["_id"]
    find = {**cmd, "projection": projection}
    cursor = cursormerge.RefetchCursor(req.db, coll, ids, layers, find, drop_id,
                                       cmd.get("lsid"), at_cluster_time=at)
    docs = await cursor.batch(req.run, first)
    return await _first_reply(req, coll, cursor, docs, at)


async def _first_reply(req: Request, coll: str, cursor: cursormerge.Held,
                       docs: list[dict[str, Any]], at: Any) -> dict[str, Any]:
    """A proxy cursor's first batch: the cursor is kept for getMore unless it is done or
    the find asked for a single batch."""
    cursor_id = 0
    cmd = req.cmd
    single = bool(cmd.get("singleBatch")) or int(cmd.get("limit") or 0) < 0
    if single or cursor.done:
        await cursor.close(req.run)
    else:
        cursor_id = req.engine.cursors.add(cursor)
    return snapshotread.stamp(cursor_reply(f"{req.db}.{coll}", docs, cursor_id), at)


async def _tailable(req: Request, coll: str, layers: list[NsState]) -> dict[str, Any] | None:
    if CURRENT.get() is not None:
        # mongod's own refusal, before it looks at the collection (find_cmd.cpp).
        raise CommandError(Code.INVALID_OPTIONS,
                           "It is illegal to open a tailable cursor in a transaction")
    plan = planner.plan_tailable(req.cmd, layers)
    if plan.kind is PlanKind.PASS:
        return None
    if plan.kind is PlanKind.IN_PLACE:
        assert plan.command is not None
        reply = await req.run.reply(req.db, plan.command)
        if not reply.get("ok") and isinstance(reply.get("errmsg"), str):
            # The upstream's refusal (a collection that is not capped) names the user's
            # collection, not the branch's.
            reply["errmsg"] = reply["errmsg"].replace(f"{req.db}.{plan.sources[0].coll}",
                                                      f"{req.db}.{coll}")
        return cursormerge.adopt_tail(req.engine.cursors, req.db, coll, plan.sources[0].coll,
                                      reply, req.cmd.get("lsid"))
    if not await _capped(req, coll, layers):
        # mongod's own refusal, whatever the branch did to the collection.
        raise CommandError(Code.BAD_VALUE, "error processing query: tailable cursor "
                           f"requested on non capped collection {req.db}.{coll}")
    raise req.unsupported(f"a tailable cursor on a capped collection the branch changed "
                          f"({plan.reason})")


async def _capped(req: Request, coll: str, layers: list[NsState]) -> bool:
    return bool((await _collection_options(req, coll, layers)).get("capped"))


async def _collection_options(req: Request, coll: str, layers: list[NsState]
                              ) -> dict[str, Any]:
    """The options of the collection the branch shows: as the layer that recreated it
    made it, else as the base is."""
    dropped = next((layer for layer in layers if layer.base_dropped), None)
    if dropped is not None:
        return dict(dropped.options)
    # Outside a transaction: mongod runs no listCollections in one, and a collection's
    # options do not change inside one (DDL is refused there).
    with outside_transaction():
        reply = await req.run.reply(req.db, {"listCollections": 1, "filter": {"name": coll}})
    batch = reply.get("cursor", {}).get("firstBatch", []) if reply.get("ok") else []
    return dict(batch[0].get("options") or {}) if batch else {}


async def _union_find(req: Request, coll: str, plan: planner.Plan) -> dict[str, Any]:
    cmd = req.cmd
    assert plan.command is not None
    reply = await req.run.reply(req.db, plan.command)
    single = cmd.get("singleBatch") or int(cmd.get("limit") or 0) < 0
    if single and reply.get("ok") and reply["cursor"]["id"]:
        await req.run.reply(req.db, {"killCursors": plan.command["aggregate"],
                                     "cursors": [reply["cursor"]["id"]]})
        reply["cursor"]["id"] = Int64(0)
    return cursormerge.adopt(req.engine.cursors, req.db, coll, plan.command["aggregate"],
                             reply, cmd.get("lsid"))


async def _proxy_cursor(req: Request, coll: str, plan: planner.Plan, cmd: dict[str, Any],
                        refused: list[tuple[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """A merged or in-place find as a proxy-held cursor; None when the upstream refused a
    side (a merged find's refusals appended to `refused`), for the planner's fallback."""
    first = int(cmd.get("batchSize", cursormerge.DEFAULT_FIRST_BATCH))
    at = None
    if plan.kind is PlanKind.MERGED:
        # Every side at one cluster time, when a snapshot read.
        cmd, at = await snapshotread.pinned(req, coll, cmd)
        cursor = await cursormerge.open_merged(req.run, req.db, coll, plan.sources, cmd, first,
                                               refused)
    else:
        assert plan.command is not None
        cursor = await cursormerge.open_one(req.run, req.db, coll, plan.command, first)
    if cursor is None:
        return None
    try:
        docs = await cursor.batch(req.run, first)
    except CommandError:
        # A side refused a getMore (SecantusDB's sortKey over an empty array): the
        # server-side union answers instead.
        await cursor.close(req.run)
        return None
    return await _first_reply(req, coll, cursor, docs,
                              at if at is not None else cursor.at_cluster_time)


async def get_more(req: Request) -> dict[str, Any] | None:
    cursor = req.engine.cursors.get(req.cmd.get("getMore"))
    if cursor is None:
        return None
    if isinstance(cursor, changestream.Stream):
        return await changestream.get_more(req, cursor)
    # mongod: a getMore without batchSize returns what fits one reply (16 MiB).
    size = int(req.cmd["batchSize"]) if req.cmd.get("batchSize") else None
    if isinstance(cursor, cursormerge.TailCursor):
        docs = await cursor.more(req.run, size, req.cmd.get("maxTimeMS"))
    else:
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


async def count(req: Request) -> dict[str, Any] | None:
    coll = coll_name(req)
    cmd = req.cmd
    plan = planner.plan_count(cmd, req.layers(coll))
    if plan.kind is PlanKind.PASS:
        return await hints.passed(req, await hints.on_base(req, coll, cmd))
    if plan.kind is PlanKind.UNION:
        assert plan.command is not None
        reply = await req.run(req.db, plan.command)
        batch = reply["cursor"]["firstBatch"]
        return {"n": int(batch[0]["n"]) if batch else 0, "ok": 1.0}
    # Per source: its matches, less those a layer above hides (an indexed $in on _id).
    filt = cmd.get("query") or {}
    total = 0
    for source in plan.sources:
        sub = carry(cmd, {"count": source.coll, "query": filt}, _COUNT_CARRY)
        if source.coll == coll and "hint" in cmd:
            sub["hint"] = cmd["hint"]
        total += int((await req.run(req.db, sub))["n"])
        hidden = source.hidden_ids()
        if hidden:
            # The ids first (an index lookup), the user's filter over just those.
            stages: list[dict[str, Any]] = [{"$match": {"_id": {"$in": hidden}}}]
            if filt:
                stages.append({"$match": filt})
            agg = carry(cmd, {"aggregate": source.coll, "cursor": {},
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
    cmd = req.cmd
    plan = planner.plan_distinct(cmd, req.layers(coll), branch=req.on_branch.name)
    if plan.kind is PlanKind.PASS:
        return await hints.passed(req, await hints.on_base(req, coll, cmd))
    if plan.kind is PlanKind.UNION:
        assert plan.command is not None
        cursor = (await req.run(req.db, plan.command))["cursor"]
        batch = cursor["firstBatch"]
        return _at({"values": batch[0]["v"] if batch else []}, cursor.get("atClusterTime"))
    # Each source is a real distinct (exact array semantics); the server merges them,
    # all at one cluster time when a snapshot read.
    cmd, at = await snapshotread.pinned(req, coll, cmd)
    filt = cmd.get("query") or {}
    parts: list[Any] = []
    for source in plan.sources:
        hidden = source.hidden_ids()
        query = filt
        if hidden:
            query = {"$and": [filt, {"_id": {"$nin": hidden}}]} if filt else \
                {"_id": {"$nin": hidden}}
        sub = carry(cmd, {"distinct": source.coll, "key": cmd["key"], "query": query},
                    planner.READ_CARRY)
        if source.coll != coll:
            sub.pop("hint", None)  # the hint names a base index
        reply = await req.run(req.db, sub)
        parts.extend(reply["values"])
    return _at({"values": await _dedupe(req, parts)}, at)


def _at(reply: dict[str, Any], at: Any) -> dict[str, Any]:
    """A distinct reply: mongod's carries the time of a snapshot read beside the values."""
    if at is not None:
        reply["atClusterTime"] = at
    reply["ok"] = 1.0
    return reply


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


async def explain(req: Request) -> dict[str, Any] | None:
    """The upstream's explain of what the plan runs (for merged finds and counts, several
    commands: of the server-side union answering the same read), with the plan itself
    in a `mongobranch` field."""
    inner = req.cmd.get("explain")
    if not isinstance(inner, dict) or not inner:
        raise CommandError(Code.FAILED_TO_PARSE, "explain needs a command document")
    name = next(iter(inner))
    coll = inner.get(name)
    if not isinstance(coll, str):
        return None
    layers = req.layers(coll)
    branch = req.on_branch.name
    if name == "find" and layers and planner.index_bound(inner) and views.whole(layers) is None:
        return await _copy_explain(req, coll, layers, inner)
    explained: dict[str, Any] | None
    if name == "find":
        plan = planner.plan_find(inner, layers, branch=branch)
        explained = plan.command or planner.union_find(inner, layers, branch=branch)
    elif name == "count":
        plan = planner.plan_count(inner, layers)
        explained = _own(inner) if plan.kind is PlanKind.PASS else \
            planner.union_count(inner, layers)
    elif name == "aggregate":
        plan = await aggregate.planned(req, inner)
        explained = plan.command
    elif name == "distinct" and not layers:
        plan = planner.plan_distinct(inner, layers, branch=branch)
        explained = plan.command
    elif name in ("update", "delete", "findAndModify", "distinct") and layers:
        raise req.unsupported(f"explain of {name} on a changed collection")
    else:
        return None
    assert explained is not None
    out = {"explain": {k: v for k, v in explained.items() if k not in ("lsid", "$clusterTime")}}
    carry(req.cmd, out, ("verbosity", "lsid", "$clusterTime", "comment", "maxTimeMS"))
    reply = await req.run.reply(req.db, out)
    if reply.get("ok"):
        shown = PlanKind.UNION if plan.kind is PlanKind.MERGED or (
            plan.kind is PlanKind.POINT and plan.command is None) else None
        reply["mongobranch"] = plan.explain(shown)
    return reply


def _own(cmd: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cmd.items() if k != "$db"}


async def _copy_explain(req: Request, coll: str, layers: list[NsState],
                        inner: dict[str, Any]) -> dict[str, Any]:
    """The explain of an index-bound find on a changed collection: the upstream's explain
    of the user's find on a scratch copy of the branch view, made as `_copy_find` makes
    it, so the plan shown is the server's own for those bounds or keys over what the
    branch shows (the sides of a merged find would each show their own). The copy is
    dropped once explained; the reply names the collection, not the copy."""
    cmd = await _index_bound_form(req, coll, layers, {**inner, "$db": req.db})
    plan = planner.copy_find(cmd, layers, "an explain of an index-bound find, which shows "
                             "one plan")
    made: list[str] = []
    try:
        name, find, _ = await _filled_copy(req, coll, layers, cmd, inner.get("hint"), made)
        out = {"explain": {**find, "find": name}}
        carry(req.cmd, out, ("verbosity", "lsid", "$clusterTime", "comment", "maxTimeMS"))
        reply = await req.run.reply(req.db, out)
    finally:
        await scratchfrom.drop(req, made)
    renamed = _renamed(reply, {f"{req.db}.{name}": f"{req.db}.{coll}", name: coll})
    assert isinstance(renamed, dict)
    if renamed.get("ok"):
        renamed["mongobranch"] = plan.explain()
    return renamed


def _renamed(value: Any, names: dict[str, str]) -> Any:
    """A reply with every string that is one of `names` (a copy's name, its namespace)
    replaced by what it stands for, at any depth."""
    if isinstance(value, str):
        return names.get(value, value)
    if isinstance(value, dict):
        return {k: _renamed(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, names) for v in value]
    return value
