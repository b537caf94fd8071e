"""Views and collMod on a branch.

A view the branch shows (one of the base's, or one the branch defined: a namespace state
whose options hold `viewOn` and `pipeline`) is never evaluated by the proxy: a read of it
is rewritten into an aggregation of the collection at the bottom of its chain of views,
the views' pipelines first, then the read's own stages, and that aggregation reads the
branch's view of its source like any other (`aggregate.planned`). The upstream evaluates
everything, over the branch's data.

`collMod` changes the branch's catalog only: a view's definition, or a collection's
validation options and index options, which are applied to the branch's overlay (where
its writes land, so the upstream validates them) and kept in its namespace state, where
`listCollections` and `listIndexes` on the branch read them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from bson.int64 import Int64

from proxy.branching import catalog, cursormerge, masking, naming, planner, views
from proxy.branching.commands import aggregate, changestream, ddl, read, scratchfrom
from proxy.branching.commands.base import SESSION_FIELDS, Handler, Request, carry, coll_name
from proxy.branching.commands.catalog import exists, visible_collections
from proxy.branching.engine import Engine
from proxy.branching.errors import CommandError
from proxy.branching.model import Branch
from proxy.branching.wal import CREATE, Change
from proxy.wire.codes import Code

Pipeline = list[dict[str, Any]]

# find options mongod cannot run on a view (they have no aggregation form).
_FIND_REFUSED = ("min", "max", "returnKey", "showRecordId", "tailable", "awaitData",
                 "oplogReplay", "noCursorTimeout")
_COUNT_CARRY = ("lsid", "$clusterTime", "readConcern", "collation", "comment", "maxTimeMS",
                "apiVersion", "apiStrict", "hint")
# collMod fields on a collection the branch keeps in its options (and applies to its
# overlay); `index` changes its index list instead.
_COLL_OPTIONS = ("validator", "validationLevel", "validationAction",
                 "changeStreamPreAndPostImages")
_VIEW_OPTIONS = ("viewOn", "pipeline")


# -- reads ------------------------------------------------------------------------------

async def _view(req: Request, coll: str) -> dict[str, Any] | None:
    return await catalog.view_definition(req.engine, req.on_branch, req.run, req.db, coll)


def _masker(req: Request) -> masking.Masker | None:
    return masking.for_branch(req.engine.config, req.branch)


async def _read_view(req: Request, coll: str) -> dict[str, Any] | None:
    """The view a read names; None also when the branch changed nothing in the database,
    where the upstream evaluates a view of the base exactly (no extra round trip) unless
    the branch masks collections of it (the view's source must be read masked)."""
    masker = _masker(req)
    if not req.layers(coll) and not catalog.touches(req.engine, req.on_branch, req.db) \
            and not (masker is not None and masker.has_db(req.db)):
        return None
    return await _view(req, coll)


async def _masked_read(req: Request, masker: masking.Masker, handler: Handler,
                       made: list[str]) -> dict[str, Any] | None:
    """A read on a masked branch: of a masked collection, the aggregation that masks it
    first; an aggregation, with every sub-pipeline reading one masked first."""
    coll = req.cmd.get(req.name)
    if req.name == "aggregate" and changestream.wanted(req.cmd):
        # Its events are made of WAL images the stream masks first (changestream.py).
        return await handler(req)
    if coll == "system.profile":
        raise masking.refusal("reading the profiler's records", masker.branch)
    if isinstance(coll, str) and coll and masker.fields(req.db, coll) and not (
            req.name in ("count", "distinct") and not masker.reads(
                req.db, coll, req.cmd.get("query"),
                [k for k in [req.cmd.get("key")] if isinstance(k, str)])):
        hint = req.cmd.get("hint")
        if (isinstance(hint, dict) and masker.touches(req.db, coll, list(hint))) or \
                (isinstance(hint, str) and hint != "_id_"):
            # Documents come in the hinted index's order: that of the stored values.
            raise masking.refusal(f"a hint of an index on a masked field (or by name: "
                                  f"give its key pattern) on {req.db}.{coll}", masker.branch)
        if req.name == "find":
            for opt in _FIND_REFUSED:
                if req.cmd.get(opt):
                    raise masking.refusal(f"find option {opt!r} on masked collection "
                                          f"{req.db}.{coll}", masker.branch)
        if req.name == "aggregate":
            if _writes(req.cmd):
                req.reject_transactions()
            await _refuse_writing_into_a_view(req)
        return await on_view(req, coll, None, _BUILDERS[req.name](req.cmd), _FINISH[req.name],
                             made)
    if req.name != "aggregate":
        return await handler(req)
    pipeline = req.cmd.get("pipeline")
    if not isinstance(pipeline, list):
        return await handler(req)
    await _refuse_writing_into_a_view(req)
    inlined = await _inline(req, pipeline, made) or pipeline
    masked = masker.pipeline(req.db, coll if isinstance(coll, str) and coll else None,
                             inlined)
    if masked == pipeline:
        return await handler(req)
    sub = Request(req.engine, req.branch, req.ctx, req.run, req.db,
                  {**req.cmd, "pipeline": masked})
    reply = await handler(sub)
    if reply is None:
        reply = await req.run.reply(req.db, {k: v for k, v in sub.cmd.items() if k != "$db"})
    return reply


def _writes(cmd: dict[str, Any]) -> bool:
    pipeline = cmd.get("pipeline")
    last = pipeline[-1] if isinstance(pipeline, list) and pipeline else None
    return isinstance(last, dict) and bool({"$out", "$merge"} & set(last))


# A find the connection may answer inline (EngineRouter.inline): fields whose meaning
# the pass-through decision below covers; anything else is decided the usual way. Its
# answer must fit one batch (singleBatch, or a negative limit): a reply the router
# drops leaves no cursor open on the upstream.
_INLINE_FIND = frozenset({"find", "filter", "projection", "sort", "limit", "singleBatch",
                          "batchSize", "comment", "maxTimeMS", "lsid", "$clusterTime",
                          "$readPreference", "$db"})


def find_passes(engine: Engine, branch: Branch, db: str, cmd: dict[str, Any]) -> bool:
    """Whether `reading(read.find)` serves this find as the client's own command on the
    base, told without a round trip: no view in the way (as `_read_view` decides it),
    nothing masked, and the planner's pass-through (a point on an id no layer hides, a
    collection the branch never changed). False also where only a round trip can tell."""
    if not _INLINE_FIND.issuperset(cmd) or not (
            cmd.get("singleBatch") is True or _negative(cmd.get("limit"))):
        return False
    coll = cmd.get("find")
    if not isinstance(coll, str) or not coll or branch.masked:
        return False
    layers = engine.layers(branch, db, coll)
    if layers:
        decided, view = views.shown_view(layers)
        if not decided or view is not None:
            return False
    elif catalog.touches(engine, branch, db):
        return False  # the base's views are read from the upstream (catalog.base_views)
    return planner.passes(cmd, layers)


def _negative(limit: Any) -> bool:
    return isinstance(limit, int | float) and not isinstance(limit, bool) and limit < 0


def reading(handler: Handler) -> Handler:
    """find, count, distinct and aggregate: on a view, the rewritten aggregation; an
    aggregation whose $lookup, $unionWith or $facet reads a view reads its source's
    branch view with the view's stages first; a $graphLookup (or a $lookup no per-layer
    join can run) from a changed collection or a view reads a scratch copy of what it
    shows on the branch (`scratchfrom.py`), dropped when the read ends."""
    async def serve(req: Request) -> dict[str, Any] | None:
        made: list[str] = []
        try:
            reply = await _serve(req, made)
        except BaseException:
            await scratchfrom.drop(req, made)
            raise
        return await scratchfrom.settle(req, reply, made)

    async def _serve(req: Request, made: list[str]) -> dict[str, Any] | None:
        coll = req.cmd.get(req.name)
        masker = _masker(req)
        if isinstance(coll, str) and coll:
            view = await _read_view(req, coll)
            if view is not None:
                if req.name == "aggregate":
                    req.reject_transactions()
                    if changestream.wanted(req.cmd):
                        raise CommandError(Code.COMMAND_NOT_SUPPORTED_ON_VIEW,
                                           f"Namespace {req.db}.{coll} is a view, not a "
                                           "collection")
                    await _refuse_writing_into_a_view(req)
                return await on_view(req, coll, view, _BUILDERS[req.name](req.cmd),
                                     _FINISH[req.name], made)
        if masker is not None:
            return await _masked_read(req, masker, handler, made)
        if req.name != "aggregate" or not catalog.touches(req.engine, req.on_branch, req.db):
            return await handler(req)
        await _refuse_writing_into_a_view(req)
        pipeline = req.cmd.get("pipeline")
        inlined = await _inline(req, pipeline, made) if isinstance(pipeline, list) else None
        if inlined is None:
            return await handler(req)
        sub = Request(req.engine, req.branch, req.ctx, req.run, req.db,
                      {**req.cmd, "pipeline": inlined})
        reply = await handler(sub)
        if reply is None:  # nothing it reads changed: run as rewritten, on the upstream
            reply = await req.run.reply(req.db, {k: v for k, v in sub.cmd.items()
                                                 if k != "$db"})
        return reply
    return serve


async def _refuse_writing_into_a_view(req: Request) -> None:
    """$out and $merge into a view: mongod's CommandNotSupportedOnView."""
    pipeline = req.cmd.get("pipeline")
    last = pipeline[-1] if isinstance(pipeline, list) and pipeline else None
    if not isinstance(last, dict) or len(last) != 1:
        return
    kind, spec = next(iter(last.items()))
    if kind not in ("$out", "$merge"):
        return
    db, coll = req.db, spec
    if isinstance(spec, dict):
        target = spec.get("into", spec) if kind == "$merge" else spec
        if isinstance(target, dict):
            db, coll = str(target.get("db", req.db)), target.get("coll")
        else:
            coll = target
    if not isinstance(coll, str):
        return  # the aggregate handler refuses it in mongod's words
    sub = Request(req.engine, req.branch, req.ctx, req.run, db, req.cmd)
    if await _view(sub, coll) is not None:
        raise CommandError(Code.COMMAND_NOT_SUPPORTED_ON_VIEW,
                           f"Namespace {db}.{coll} is a view, not a collection")


async def _inline(req: Request, pipeline: Pipeline, made: list[str],
                  depth: int = 0) -> Pipeline | None:
    """The pipeline with each $lookup and $unionWith from a view (at any depth: in
    sub-pipelines, $facet) reading the view's source with the view's stages first, as
    mongod resolves them, and each stage that needs one reading a scratch copy (its
    name appended to `made`); None: it reads no view and needs no copy."""
    if depth > catalog.MAX_VIEW_DEPTH:
        raise CommandError(Code.VIEW_DEPTH_LIMIT_EXCEEDED,
                           f"View depth too deep or view cycle detected. Maximum depth is "
                           f"{catalog.MAX_VIEW_DEPTH}")
    changed = False
    out: Pipeline = []
    for stage in pipeline:
        kind, spec = next(iter(stage.items())) if isinstance(stage, dict) and len(stage) == 1 \
            else ("", None)
        if kind == "$facet" and isinstance(spec, dict):
            facets = {}
            for name, sub in spec.items():
                done = await _inline(req, sub, made, depth + 1) if isinstance(sub, list) \
                    else None
                changed |= done is not None
                facets[name] = sub if done is None else done
            out.append({"$facet": facets})
            continue
        if kind in ("$graphLookup", "$lookup") and isinstance(spec, dict) \
                and isinstance(spec.get("from"), str) and spec["from"]:
            copied = await _copied(req, kind, spec, made, depth)
            if copied is not None:
                out.append({kind: copied})
                changed = True
                continue
        field = {"$lookup": "from", "$unionWith": "coll"}.get(kind)
        if field is None or not (isinstance(spec, dict)
                                 or (kind == "$unionWith" and isinstance(spec, str))):
            out.append(stage)
            continue
        spec = {"coll": spec} if isinstance(spec, str) else dict(spec)
        inner = spec.get("pipeline")
        if isinstance(inner, list):
            done = await _inline(req, inner, made, depth + 1)
            if done is not None:
                spec["pipeline"], changed = done, True
        source = spec.get(field)
        view = await _read_view(req, source) if isinstance(source, str) and source else None
        if view is not None:
            assert isinstance(source, str)
            bottom, stages = await catalog.resolve_view(req.engine, req.on_branch, req.run,
                                                        req.db, source, view)
            stages = await _inline(req, stages, made, depth + 1) or stages
            spec[field] = bottom
            spec["pipeline"] = stages + list(spec.get("pipeline") or [])
            changed = True
        out.append({kind: spec})
    return out if changed else None


async def _copied(req: Request, kind: str, spec: dict[str, Any], made: list[str],
                  depth: int) -> dict[str, Any] | None:
    """A $graphLookup from a view or a changed collection, or a $lookup from one that no
    per-layer join can run (scratchfrom.splits), reading a scratch copy of what `from`
    shows on the branch; None: the stage reads its `from` otherwise."""
    source = spec["from"]
    masker = _masker(req)
    view = await _read_view(req, source)
    stages: Pipeline
    bottom, stages = source, []
    if view is None:
        if not scratchfrom.changed(req, source) or \
                (kind == "$lookup" and not scratchfrom.splits(spec)):
            return None
    else:
        bottom, stages = await catalog.resolve_view(req.engine, req.on_branch, req.run,
                                                    req.db, source, view)
        # A $lookup takes the view's stages first in its own pipeline (below), unless
        # that makes the per-layer form over a changed source with a whole-set stage.
        if kind == "$lookup" and not (
                scratchfrom.changed(req, bottom) and scratchfrom.splits(
                    {**spec, "pipeline": [*stages, *(spec.get("pipeline") or [])]})):
            return None
        stages = await _inline(req, stages, made, depth + 1) or stages
    if masker is not None:
        # The copy is made before the masking of the read that needs it: it must hold
        # nothing a masked collection shows unmasked.
        if masker.fields(req.db, bottom) or masker.fields(req.db, source):
            raise masking.refusal(f"{kind} from {req.db}.{source}, which needs a copy of "
                                  "a masked collection", masker.branch)
        stages = masker.pipeline(req.db, bottom, stages)
    copy = await scratchfrom.fill(req, bottom, stages, made,
                                  view.get("collation") if view is not None else None,
                                  key=_connect_to(kind, spec))
    spec = {**spec, "from": copy}
    inner = spec.get("pipeline")
    if isinstance(inner, list):
        spec["pipeline"] = await _inline(req, inner, made, depth + 1) or inner
    return spec


def _connect_to(kind: str, spec: dict[str, Any]) -> Any:
    """The field a stage looks its `from` up by: connectToField, foreignField."""
    return spec.get("connectToField" if kind == "$graphLookup" else "foreignField")


async def view_command(req: Request, coll: str, view: dict[str, Any] | None,
                       agg: dict[str, Any], made: list[str]) -> dict[str, Any]:
    """An aggregation of a view (agg: the read's stages, on the view's name) as the
    aggregation of its source collection, the views' stages first (scratch copies its
    stages read appended to `made`). On a masked branch the source's masking stage comes
    before them all (view None: a masked collection)."""
    source, stages = (coll, []) if view is None else await catalog.resolve_view(
        req.engine, req.on_branch, req.run, req.db, coll, view)
    masker = _masker(req)
    # Rules may name a view too: its fields are masked after its own stages.
    own = masker.stage(req.db, coll) if masker is not None and view is not None else None
    pipeline = stages + ([own] if own else []) + list(agg.get("pipeline") or [])
    pipeline = await _inline(req, pipeline, made) or pipeline
    if masker is not None:
        pipeline = masker.pipeline(req.db, source, pipeline)
    cmd = {**agg, "aggregate": source, "pipeline": pipeline}
    if view is None:
        return cmd
    if "collation" in cmd and _collation(cmd["collation"]) != _collation(view.get("collation")):
        raise CommandError(Code.OPTION_NOT_SUPPORTED_ON_VIEW,
                           "Cannot override a view's default collation")
    if "collation" in view:
        cmd["collation"] = view["collation"]
    return cmd


def _collation(spec: Any) -> Any:
    """A collation as mongod compares a read's with its view's: none is the simple one."""
    return None if not spec or (isinstance(spec, dict) and spec.get("locale") == "simple") \
        else spec


async def on_view(req: Request, coll: str, view: dict[str, Any] | None,
                  agg: dict[str, Any], finish: Finish, made: list[str]
                  ) -> dict[str, Any] | None:
    """A read of a view, run as the aggregation of the branch's view of its source."""
    cmd = await view_command(req, coll, view, agg, made)
    sub = Request(req.engine, req.branch, req.ctx, req.run, req.db, cmd)
    last = cmd["pipeline"][-1] if cmd["pipeline"] else None
    if isinstance(last, dict) and {"$out", "$merge"} & set(last):
        return await aggregate.aggregate(sub)
    command = (await aggregate.planned(sub, cmd)).command
    assert command is not None
    reply = await req.run.reply(req.db, command)
    reply = cursormerge.adopt(req.engine.cursors, req.db, coll, command["aggregate"], reply,
                              req.cmd.get("lsid"))
    return await finish(req, coll, reply)


def _aggregate_agg(cmd: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(cmd.get("pipeline"), list):
        raise CommandError(Code.TYPE_MISMATCH, "'pipeline' option must be specified as an array")
    return {k: v for k, v in cmd.items() if k != "$db"}


def _find_agg(cmd: dict[str, Any]) -> dict[str, Any]:
    """mongod's own rewrite of a find on a view: its filter, sort, skip, limit and
    projection become stages after the view's."""
    for opt in _FIND_REFUSED:
        if cmd.get(opt):
            raise CommandError(Code.INVALID_PIPELINE_OPERATOR,
                               f"Option {opt} not supported in aggregation.")
    stages: Pipeline = []
    if cmd.get("filter"):
        stages.append({"$match": cmd["filter"]})
    if cmd.get("sort"):
        stages.append({"$sort": cmd["sort"]})
    if cmd.get("skip"):
        stages.append({"$skip": cmd["skip"]})
    limit = int(cmd.get("limit") or 0)
    if limit:
        stages.append({"$limit": abs(limit)})
    if cmd.get("projection"):
        stages.append({"$project": cmd["projection"]})
    cursor: dict[str, Any] = {}
    if "batchSize" in cmd:
        cursor["batchSize"] = cmd["batchSize"]
    return carry(cmd, {"aggregate": cmd["find"], "pipeline": stages, "cursor": cursor},
                 planner.READ_CARRY)


def _count_agg(cmd: dict[str, Any]) -> dict[str, Any]:
    stages: Pipeline = [{"$match": cmd["query"]}] if cmd.get("query") else []
    stages += planner.count_stages(cmd)
    return carry(cmd, {"aggregate": cmd["count"], "pipeline": stages, "cursor": {}},
                 _COUNT_CARRY)


def _distinct_agg(cmd: dict[str, Any]) -> dict[str, Any]:
    """mongod's rewrite of a distinct on a view: every array along the key's path
    unwound, the values collected by the server."""
    key = cmd.get("key")
    if not isinstance(key, str):
        raise CommandError(Code.TYPE_MISMATCH, "distinct key must be a string")
    stages: Pipeline = [{"$match": cmd["query"]}] if cmd.get("query") else []
    parts = key.split(".")
    stages.append({"$match": {key: {"$not": {"$size": 0}}}})
    for i in range(len(parts)):
        stages.append({"$unwind": {"path": "$" + ".".join(parts[:i + 1]),
                                   "preserveNullAndEmptyArrays": True}})
    stages.append({"$group": {"_id": None, "distinct": {"$addToSet": f"${key}"}}})
    return carry(cmd, {"aggregate": cmd["distinct"], "pipeline": stages, "cursor": {}},
                 planner.READ_CARRY)


def _first(reply: dict[str, Any] | None) -> dict[str, Any] | None:
    """The one document of a reply's first batch (None: none), or the error raised."""
    assert reply is not None
    if not reply.get("ok"):
        raise CommandError(int(reply.get("code", 1)), str(reply.get("errmsg", "")),
                           code_name=str(reply.get("codeName", "")))
    batch = reply["cursor"]["firstBatch"]
    return batch[0] if batch else None


Finish = Callable[[Request, str, dict[str, Any]], Awaitable[dict[str, Any] | None]]


async def _cursor(req: Request, coll: str, reply: dict[str, Any]) -> dict[str, Any] | None:
    """A find's or aggregate's reply as it is; a single-batch find closes its cursor."""
    cmd = req.cmd
    single = req.name == "find" and (bool(cmd.get("singleBatch"))
                                     or int(cmd.get("limit") or 0) < 0)
    if single and reply.get("ok") and reply["cursor"].get("id"):
        kill = Request(req.engine, req.branch, req.ctx, req.run, req.db,
                       {"killCursors": coll, "cursors": [reply["cursor"]["id"]]})
        await read.kill_cursors(kill)
        reply["cursor"]["id"] = Int64(0)
    return reply


async def _counted(req: Request, coll: str, reply: dict[str, Any]) -> dict[str, Any]:
    doc = _first(reply)
    return {"n": int(doc["n"]) if doc else 0, "ok": 1.0}


async def _values(req: Request, coll: str, reply: dict[str, Any]) -> dict[str, Any]:
    doc = _first(reply)
    return {"values": doc["distinct"] if doc else [], "ok": 1.0}


_BUILDERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "find": _find_agg, "count": _count_agg, "distinct": _distinct_agg,
    "aggregate": _aggregate_agg}
_FINISH: dict[str, Finish] = {"find": _cursor, "aggregate": _cursor, "count": _counted,
                              "distinct": _values}


async def explain(req: Request) -> dict[str, Any] | None:
    """explain of a read of a view: the upstream's explain of the aggregation it runs as
    (the branch's view of the source, the views' stages first)."""
    inner = req.cmd.get("explain")
    name = next(iter(inner), None) if isinstance(inner, dict) else None
    coll = inner.get(name) if isinstance(inner, dict) and name in _BUILDERS else None
    masker = _masker(req)
    if masker is not None:
        masked_coll = isinstance(coll, str) and bool(coll)
        if not masked_coll and isinstance(inner, dict) and isinstance(name, str) and \
                (name == "aggregate" or masker.fields(req.db, str(inner.get(name)))):
            raise masking.refusal(f"explain of {name} of that form", masker.branch)
    if not isinstance(coll, str) or not coll:
        return await read.explain(req)
    view = await _read_view(req, coll)
    made: list[str] = []
    try:
        if view is None and masker is not None:
            return await _explained(req, coll, None, str(name), made)
        if view is None:
            pipeline = inner.get("pipeline") if isinstance(inner, dict) else None
            if name != "aggregate" or not isinstance(inner, dict) or \
                    not isinstance(pipeline, list) or \
                    not catalog.touches(req.engine, req.on_branch, req.db):
                return await read.explain(req)
            # The aggregation as it would run: views its stages read inlined, scratch
            # copies made for the stages that need them (dropped once explained).
            inlined = await _inline(req, pipeline, made)
            sub = req if inlined is None else Request(
                req.engine, req.branch, req.ctx, req.run, req.db,
                {**req.cmd, "explain": {**inner, "pipeline": inlined}})
            return await read.explain(sub)
        return await _explained(req, coll, view, str(name), made)
    finally:
        await scratchfrom.drop(req, made)


async def _explained(req: Request, coll: str, view: dict[str, Any] | None,
                     name: str, made: list[str]) -> dict[str, Any]:
    inner = req.cmd.get("explain")
    assert isinstance(inner, dict) and isinstance(name, str)
    cmd = await view_command(req, coll, view, _BUILDERS[name](inner), made)
    sub = Request(req.engine, req.branch, req.ctx, req.run, req.db, cmd)
    plan = await aggregate.planned(sub, cmd)
    assert plan.command is not None
    out = {"explain": {k: v for k, v in plan.command.items()
                       if k not in ("lsid", "$clusterTime")}}
    carry(req.cmd, out, ("verbosity", "lsid", "$clusterTime", "comment", "maxTimeMS"))
    reply = await req.run.reply(req.db, out)
    if reply.get("ok"):
        reply["mongobranch"] = {**plan.explain(), "view": f"{req.db}.{coll}"} \
            if view is not None else {**plan.explain(), "masked": True}
    return reply


# -- commands a view refuses ------------------------------------------------------------------

def _message(name: str, ns: str) -> str:
    if name == "createIndexes":
        return f"Cannot create indexes on a view: {ns}"
    if name in ("dropIndexes", "deleteIndexes"):
        return f"Cannot drop indexes on view {ns}"
    if name == "renameCollection":
        return f"cannot rename view: {ns}"
    if name == "validate":
        return "Cannot validate a view"
    return f"Namespace {ns} is a view, not a collection"


def not_on_views(handler: Handler) -> Handler:
    """Writes, index commands and renames refuse a view as mongod does
    (CommandNotSupportedOnView) before anything of the branch changes."""
    async def serve(req: Request) -> dict[str, Any] | None:
        db, coll = req.db, req.cmd.get(req.name)
        if req.name == "renameCollection" and isinstance(coll, str) and "." in coll:
            db, coll = coll.split(".", 1)
        if isinstance(coll, str) and coll:
            sub = Request(req.engine, req.branch, req.ctx, req.run, db, req.cmd)
            if req.name == "listIndexes":
                view = await _read_view(sub, coll)
            else:
                view = await _view(sub, coll)
            if view is not None:
                raise CommandError(Code.COMMAND_NOT_SUPPORTED_ON_VIEW,
                                   _message(req.name, f"{db}.{coll}"))
        return await handler(req)
    return serve


# -- create and collMod -------------------------------------------------------------------

def _writes_to_disk(pipeline: Pipeline, name: str, db: str) -> None:
    for i, stage in enumerate(pipeline):
        kind = next(iter(stage), "")
        if kind in ("$out", "$merge"):
            raise CommandError(Code.OPTION_NOT_SUPPORTED_ON_VIEW,
                               f"The aggregation stage {kind} in location {i} of the pipeline "
                               f"cannot be used in the view definition of {db}.{name} "
                               "because it writes to disk")
        if kind == "$changeStream":
            raise CommandError(Code.OPTION_NOT_SUPPORTED_ON_VIEW,
                               "$changeStream cannot be used in a view definition")


async def _checked_definition(req: Request, name: str, view_on: Any,
                              pipeline: Any) -> None:
    """A view definition as mongod checks it: types, no stage that writes, a pipeline
    the upstream parses (run over a collection that cannot exist: nothing is read), and
    no cycle through the branch's other views."""
    if not isinstance(view_on, str) or not view_on:
        raise CommandError(Code.TYPE_MISMATCH if not isinstance(view_on, str)
                           else Code.INVALID_NAMESPACE,
                           "'viewOn' must be a non-empty string naming a collection")
    if not isinstance(pipeline, list) or not all(isinstance(s, dict) for s in pipeline):
        raise CommandError(Code.TYPE_MISMATCH, "'pipeline' must be an array of objects")
    _writes_to_disk(pipeline, name, req.db)
    scratch = f"{naming.PREFIX}{req.on_branch.bid}_v"
    masker = _masker(req)
    # Its errors must quote masked values only.
    checked = pipeline if masker is None else masker.pipeline(req.db, None, pipeline)
    reply = await req.run.reply(req.db, {"aggregate": scratch, "pipeline": checked,
                                         "cursor": {"batchSize": 0}})
    if not reply.get("ok"):
        raise CommandError(int(reply.get("code", 1)), str(reply.get("errmsg", "")),
                           code_name=str(reply.get("codeName", "")))
    if reply["cursor"].get("id"):  # a stage reading another collection found documents
        await req.run.reply(req.db, {"killCursors": scratch,
                                     "cursors": [reply["cursor"]["id"]]})
    definition = {"viewOn": view_on, "pipeline": pipeline}
    await catalog.resolve_view(req.engine, req.on_branch, req.run, req.db, name, definition,
                               {name: definition})


async def _define(req: Request, name: str, options: dict[str, Any]) -> None:
    """The branch shows a view under this name: its state holds the definition, marked
    created in the WAL (a rebuild keeps it; a merge defines it in the parent)."""
    state = await ddl._state(req, name)
    state.base_dropped = True
    state.present = True
    state.options = options
    state.indexes = None
    state.unique = None
    lsn = await req.engine.log_changes(req.on_branch, [Change(f"{req.db}.{name}", None,
                                                              CREATE, None, None)],
                                       req.client())
    req.engine.note_catalog(state, lsn)
    await req.engine.save_state(state)


async def create(req: Request) -> dict[str, Any]:
    if "viewOn" not in req.cmd:
        return await ddl.create(req)
    name = coll_name(req)
    options = {k: v for k, v in req.cmd.items() if k != "create" and k not in SESSION_FIELDS}
    options.setdefault("pipeline", [])
    unknown = [k for k in options if k not in (*_VIEW_OPTIONS, "collation")]
    if unknown:
        raise CommandError(Code.INVALID_OPTIONS,
                           f"option not supported on a view: {unknown[0]}")
    async with req.engine.writing(req.on_branch):
        await _checked_definition(req, name, options["viewOn"], options["pipeline"])
        if await exists(req, name):
            shown = (await visible_collections(req, name)).get(name) or {}
            if dict(shown.get("options") or {}) != options:
                raise CommandError(Code.NAMESPACE_EXISTS,
                                   f"Namespace {req.db}.{name} already exists")
            return {"ok": 1.0}
        await _define(req, name, options)
    return {"ok": 1.0}


async def coll_mod(req: Request) -> dict[str, Any]:
    name = coll_name(req)
    fields = {k: v for k, v in req.cmd.items() if k != "collMod" and k not in SESSION_FIELDS}
    async with req.engine.writing(req.on_branch):
        if not await exists(req, name):
            raise CommandError(Code.NAMESPACE_NOT_FOUND, f"ns does not exist: {req.db}.{name}")
        view = await _view(req, name)
        if view is not None:
            return await _mod_view(req, name, view, fields)
        return await _mod_collection(req, name, fields)


async def _mod_view(req: Request, name: str, view: dict[str, Any],
                    fields: dict[str, Any]) -> dict[str, Any]:
    other = [k for k in fields if k not in _VIEW_OPTIONS]
    if other:
        raise CommandError(Code.INVALID_OPTIONS, f"option not supported on a view: {other[0]}")
    if not fields:
        return {"ok": 1.0}
    options = {**view, **fields}
    await _checked_definition(req, name, options["viewOn"], options["pipeline"])
    await _define(req, name, options)
    return {"ok": 1.0}


async def _mod_collection(req: Request, name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The upstream runs the collMod on the branch's overlay of the collection: it checks
    every field in its own words, and from then on validates the branch's writes there."""
    if any(k in fields for k in _VIEW_OPTIONS):
        raise CommandError(Code.INVALID_OPTIONS,
                           f"option only supported on a view: "
                           f"{next(k for k in fields if k in _VIEW_OPTIONS)}")
    shown = (await visible_collections(req, name)).get(name) or {}
    before = dict(shown.get("options") or {})
    indexes = await req.engine.view_indexes(req.on_branch, req.db, name, req.run)
    state = await ddl._state(req, name)
    reply = await req.run.reply(req.db, {"collMod": state.live, **fields})
    if not reply.get("ok"):
        raise CommandError(int(reply.get("code", 1)),
                           str(reply.get("errmsg", "")).replace(state.live, name),
                           code_name=str(reply.get("codeName", "")))
    options = {**before, **{k: fields[k] for k in _COLL_OPTIONS if k in fields}}
    if options != before:
        state.options = options
    spec = fields.get("index")
    if isinstance(spec, dict):
        state.indexes = [_modded(ix, spec) for ix in indexes]
        state.unique = None
    if options != before or isinstance(spec, dict):
        await req.engine.log_catalog(req.on_branch, state, "collMod", req.client())
    await req.engine.save_state(state)
    return {k: v for k, v in reply.items() if k not in ("$clusterTime", "operationTime")}


def _modded(index: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """An index of the branch's list with a collMod `index` change applied."""
    named = spec.get("name") == index.get("name") if "name" in spec \
        else spec.get("keyPattern") == index.get("key")
    if not named:
        return index
    out = dict(index)
    if "expireAfterSeconds" in spec:
        out["expireAfterSeconds"] = spec["expireAfterSeconds"]
    if "hidden" in spec:
        if spec["hidden"]:
            out["hidden"] = True
        else:
            out.pop("hidden", None)
    return out
