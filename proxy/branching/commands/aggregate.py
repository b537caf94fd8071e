"""aggregate on a branch: the branch view is inlined for the source collection and
for every collection a $lookup, $unionWith or $facet reaches; $out writes into
the branch."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from proxy.branching import merge, snapshot, views
from proxy.branching.commands import write
from proxy.branching.commands.base import Request, cursor_reply
from proxy.branching.errors import CommandError
from proxy.branching.wal import CREATE, PUT, Change
from proxy.wire import bsonutil
from proxy.wire.codes import Code

Pipeline = list[dict[str, Any]]
_TMP = "__mb_lk"


def _rewrite(req: Request, pipeline: Pipeline) -> Pipeline:
    out: Pipeline = []
    for stage in pipeline:
        if not isinstance(stage, dict) or len(stage) != 1:
            raise CommandError(Code.STAGE_NEEDS_ONE_FIELD,
                               "A pipeline stage specification object must contain exactly "
                               "one field.")
        name, spec = next(iter(stage.items()))
        if name == "$lookup":
            out.extend(_lookup(req, spec))
        elif name == "$unionWith":
            out.append({"$unionWith": _union(req, spec)})
        elif name == "$facet" and isinstance(spec, dict):
            out.append({"$facet": {k: _rewrite(req, v) for k, v in spec.items()}})
        elif name == "$graphLookup" and isinstance(spec, dict) and \
                req.layers(str(spec.get("from"))):
            top = views.whole(req.layers(str(spec.get("from"))))
            if top is None:
                raise req.unsupported("$graphLookup from a collection the branch changed")
            out.append({"$graphLookup": {**spec, "from": top}})
        elif name in ("$changeStream", "$changeStreamSplitLargeEvent"):
            raise req.unsupported("change streams")
        elif name == "$merge" and stage is not pipeline[-1]:
            raise CommandError(Code.MERGE_NOT_LAST, "$merge can only be the final stage "
                               "in the pipeline")
        else:
            out.append(stage)
    return out


def _union(req: Request, spec: Any) -> dict[str, Any]:
    if isinstance(spec, str):
        spec = {"coll": spec}
    if not isinstance(spec, dict):
        return spec
    spec = dict(spec)
    inner = _rewrite(req, spec.get("pipeline") or [])
    layers = req.layers(str(spec.get("coll")))
    top = views.whole(layers)
    if top is not None:
        spec["coll"] = top
    elif layers:
        inner = views.view_stages(layers) + inner
    spec["pipeline"] = inner
    return spec


def _lookup(req: Request, spec: Any) -> Pipeline:
    if not isinstance(spec, dict):
        return [{"$lookup": spec}]
    spec = dict(spec)
    if "pipeline" in spec:
        spec["pipeline"] = _rewrite(req, spec["pipeline"])
    source = spec.get("from")
    layers = req.layers(source) if isinstance(source, str) else []
    if not layers:
        return [{"$lookup": spec}]
    top = views.whole(layers)
    if top is not None:
        return [{"$lookup": {**spec, "from": top}}]
    if "localField" not in spec:
        spec["pipeline"] = views.view_stages(layers) + spec.get("pipeline", [])
        return [{"$lookup": spec}]
    if "pipeline" in spec:
        raise req.unsupported("$lookup with both localField and pipeline on a changed "
                              "collection")
    # Equality lookups keep mongod's array semantics: one lookup per layer, each
    # excluding the ids hidden above it, concatenated.
    dropped_at = next((i for i, layer in enumerate(layers) if layer.base_dropped), None)
    parts: list[tuple[str, Pipeline]] = []
    if dropped_at is None:
        parts.append((source, views.exclusion(layers)))  # type: ignore[arg-type]
    for j, layer in enumerate(layers):
        if dropped_at is not None and j > dropped_at:
            break
        parts.append((layer.live, views.exclusion(layers[:j])))
    stages: Pipeline = []
    names = []
    for i, (coll, excl) in enumerate(parts):
        name = f"{_TMP}{i}"
        names.append(name)
        sub: dict[str, Any] = {"from": coll, "localField": spec["localField"],
                               "foreignField": spec["foreignField"], "as": name}
        if excl:
            sub["pipeline"] = excl
        stages.append({"$lookup": sub})
    stages.append({"$set": {spec["as"]: {"$concatArrays": [f"${n}" for n in names]}}})
    stages.append({"$unset": names})
    return stages


def _out_target(req: Request, pipeline: Pipeline) -> tuple[str, str] | None:
    if not pipeline or not isinstance(pipeline[-1], dict) or "$out" not in pipeline[-1]:
        return None
    target = pipeline[-1]["$out"]
    if isinstance(target, str):
        return req.db, target
    if isinstance(target, dict) and isinstance(target.get("coll"), str):
        return str(target.get("db", req.db)), target["coll"]
    raise CommandError(Code.OUT_NEEDS_A_COLLECTION, "$out needs a collection name")


# A leading $match selecting at most this many base documents narrows the hidden ids
# to exclude from the base down to those it selects (a small overlay: the common case).
NARROW_LIMIT = 1000
_NARROW_CARRY = ("lsid", "$clusterTime", "readConcern", "collation", "let", "hint",
                 "maxTimeMS", "apiVersion", "apiStrict")


@dataclass
class _Narrowed:
    """What a leading $match selects from the base: the hidden ids among it, and how
    many documents and BSON bytes it holds."""

    hidden: list[Any]
    docs: int
    nbytes: int


_SIZE = "__mb_size"


def _probe(cmd: dict[str, Any], coll: str, first: dict[str, Any],
           projection: dict[str, Any]) -> dict[str, Any]:
    find: dict[str, Any] = {"find": coll, "filter": first, "projection": projection,
                            "limit": NARROW_LIMIT + 1, "batchSize": NARROW_LIMIT + 1}
    for key in _NARROW_CARRY:
        if key in cmd:
            find[key] = cmd[key]
    return find


async def _first_batch(req: Request, coll: str, find: dict[str, Any]) -> list[Any] | None:
    """The whole result when it fits one batch of at most NARROW_LIMIT documents."""
    reply = await req.run.reply(req.db, find)
    if not reply.get("ok"):
        return None
    batch, cursor_id = reply["cursor"]["firstBatch"], reply["cursor"]["id"]
    if cursor_id:  # more than one batch (large documents): not the few this is for
        await req.run.reply(req.db, {"killCursors": coll, "cursors": [cursor_id]})
        return None
    return batch if len(batch) <= NARROW_LIMIT else None


async def _base_hidden(req: Request, cmd: dict[str, Any], source: str, layers: list[Any],
                       first: dict[str, Any] | None) -> _Narrowed | None:
    """The hidden ids among the base documents a leading $match selects, when few: a
    short $nin then replaces the anti-join, which costs a lookup per base document. The
    server still evaluates the filter; the proxy only intersects id sets. None: the
    anti-join stays (no $match, too many matches, or the filter is the server's to
    reject on the aggregate itself)."""
    if not first or not views.needs_anti_join(layers):
        return None
    batch = await _first_batch(req, source, _probe(
        cmd, source, first, {"_id": 1, _SIZE: {"$bsonSize": "$$ROOT"}}))
    if batch is None:
        return None
    hidden = views.hidden_among(layers, [d["_id"] for d in batch])
    if len(hidden) > views.NIN_LIMIT:
        return None
    nbytes = sum(d[_SIZE] if isinstance(d.get(_SIZE), int) else views.INJECT_BYTES
                 for d in batch)
    return _Narrowed(hidden, len(batch), nbytes)


async def _live_docs(req: Request, cmd: dict[str, Any], layers: list[Any],
                     first: dict[str, Any], base: _Narrowed) -> list[dict[str, Any]] | None:
    """Every layer's live documents the leading $match selects, read with the overlays'
    own indexes, when they and the base side are few enough to go in as a literal
    (views.injects_live); None: the pipeline unions the live collections."""
    if any(layer.base_dropped for layer in layers):
        return None
    live: list[list[dict[str, Any]]] = []
    count = nbytes = 0
    for layer in layers:
        if not views.injects_live(base.docs, base.nbytes, count, nbytes):
            return None
        find = _probe(cmd, layer.live, first, {})
        find.pop("projection")
        find.pop("hint", None)
        batch = await _first_batch(req, layer.live, find)
        if batch is None:
            return None
        live.append(batch)
        count += len(batch)
        nbytes += sum(len(bsonutil.encode(d)) for d in batch)
    if not views.injects_live(base.docs, base.nbytes, count, nbytes):
        return None
    return views.live_view(layers, live)


async def plan_aggregate(req: Request, cmd: dict[str, Any]) -> dict[str, Any] | None:
    """The rewritten aggregate, or None when the branch changed nothing it reads."""
    pipeline = cmd.get("pipeline")
    if not isinstance(pipeline, list):
        raise CommandError(Code.TYPE_MISMATCH, "'pipeline' option must be specified as an array")
    source = cmd.get("aggregate")
    layers = req.layers(source) if isinstance(source, str) else []
    rewritten = _rewrite(req, pipeline)
    if not layers and rewritten == pipeline:
        return None
    top = views.whole(layers)
    target = top if top is not None else source
    if layers and top is None:
        first: dict[str, Any] | None = None
        rest = rewritten
        if rest and "$match" in rest[0] and isinstance(rest[0]["$match"], dict):
            first, rest = rest[0]["$match"], rest[1:]
        narrowed = await _base_hidden(req, cmd, source, layers, first) \
            if isinstance(source, str) else None
        live = await _live_docs(req, cmd, layers, first, narrowed) \
            if narrowed is not None and first else None
        rewritten = views.view_stages(
            layers, first, base_hidden=None if narrowed is None else narrowed.hidden,
            live_docs=live) + rest
    out = {k: v for k, v in cmd.items() if k not in ("$db", "pipeline")}
    out["aggregate"] = target
    out["pipeline"] = rewritten
    if isinstance(source, str) and layers and any(layer.base_dropped for layer in layers):
        out.pop("hint", None)
    return out


async def aggregate(req: Request) -> dict[str, Any] | None:
    req.reject_transactions()
    pipeline = req.cmd.get("pipeline")
    target = _out_target(req, pipeline) if isinstance(pipeline, list) else None
    if target is not None:
        return await _aggregate_out(req, target)
    merge_spec = _merge_spec(req, pipeline) if isinstance(pipeline, list) else None
    if merge_spec is not None:
        return await _aggregate_merge(req, merge_spec)
    planned = await plan_aggregate(req, req.cmd)
    if planned is None:
        return None
    reply = await req.run.reply(req.db, planned)
    if "explain" in planned:
        return reply
    return merge.adopt(req.engine.cursors, req.db, str(req.cmd.get("aggregate")),
                       planned["aggregate"], reply, req.cmd.get("lsid"))


async def _aggregate_out(req: Request, target: tuple[str, str]) -> dict[str, Any]:
    """$out replaces the branch's collection: run into its overlay, log every document."""
    db, coll = target
    branch = req.on_branch
    engine = req.engine
    async with engine.writing(branch):
        await snapshot.freeze(engine, branch.name, db, [coll])
        state = await engine.ensure_state(branch, db, coll, req.run)
        await engine.mark_dirty(state)
        cmd = dict(req.cmd)
        cmd["pipeline"] = [*cmd["pipeline"][:-1], {"$out": {"db": db, "coll": state.live}}]
        planned = await plan_aggregate(req, cmd)
        assert planned is not None
        reply = await req.run.reply(req.db, planned)
        if not reply.get("ok"):
            return reply
        state.base_dropped = True
        state.present = True
        await engine.save_state(state)
        ns = f"{db}.{coll}"
        # The overlay must stay the fold of the WAL: a drop, then one put per document.
        await engine.log_changes(branch, [Change(ns, None, CREATE, None, None)], req.client())
        await req.run(db, {"delete": state.hidden, "deletes": [{"q": {}, "limit": 0}]})
        async for batch in req.run.batches(db, {"find": state.live}):
            await engine.log_changes(branch, [Change(ns, d["_id"], PUT, None, d) for d in batch],
                                     req.client())
            await req.run(db, {"insert": state.hidden,
                               "documents": [{"_id": d["_id"]} for d in batch]})
        await engine.load_hidden(state)
    return reply


def _merge_spec(req: Request, pipeline: Pipeline) -> dict[str, Any] | None:
    if not pipeline or not isinstance(pipeline[-1], dict) or "$merge" not in pipeline[-1]:
        return None
    spec = pipeline[-1]["$merge"]
    if isinstance(spec, str):
        spec = {"into": spec}
    if not isinstance(spec, dict):
        raise CommandError(Code.MERGE_NEEDS_INTO, "$merge needs a collection name or a document")
    spec = dict(spec)
    into = spec.get("into")
    if isinstance(into, str):
        spec["into"] = {"db": req.db, "coll": into}
    elif not (isinstance(into, dict) and isinstance(into.get("coll"), str)):
        raise CommandError(Code.MERGE_INTO_NOT_A_COLLECTION, "$merge 'into' must name a collection")
    else:
        spec["into"] = {"db": into.get("db", req.db), "coll": into["coll"]}
    return spec


async def _aggregate_merge(req: Request, spec: dict[str, Any]) -> dict[str, Any]:
    """$merge into the branch's collection: the results land in a scratch collection,
    then, a batch at a time, the documents they will meet are copied from the parent
    view and the server runs the user's own $merge against the overlay."""
    db, coll = spec["into"]["db"], spec["into"]["coll"]
    on = spec.get("on", "_id")
    fields = [on] if isinstance(on, str) else list(on)
    target = Request(req.engine, req.branch, req.ctx, req.run, db, req.cmd)
    scratch = f"__mb_{req.on_branch.bid}_t_{secrets.token_hex(4)}"
    async with req.engine.writing(req.on_branch):
        writer = await write.begin(target, coll)
        cmd = dict(req.cmd)
        cmd["pipeline"] = [*cmd["pipeline"][:-1], {"$out": {"db": db, "coll": scratch}}]
        planned = await plan_aggregate(req, cmd)
        assert planned is not None
        reply = await req.run.reply(req.db, planned)
        if not reply.get("ok"):
            return reply
        failed: dict[str, Any] | None = None
        try:
            async for batch in req.run.batches(db, {"find": scratch}):
                ids = [d["_id"] for d in batch]
                if fields == ["_id"]:
                    match: dict[str, Any] = {"_id": {"$in": ids}}
                else:
                    match = {"$or": [{f: d.get(f) for f in fields} for d in batch]}
                pres = [d async for b in writer.view_docs(match) for d in b]
                copied = await writer.copy_on_write(pres)
                step = {**spec, "into": {"db": db, "coll": writer.state.live}}
                merged = await req.run.reply(db, {"aggregate": scratch, "cursor": {}, "pipeline": [
                    {"$match": {"_id": {"$in": ids}}}, {"$merge": step}]})
                await writer.record_puts(pres, copied)
                await writer.record_inserts(match, pres)
                if not merged.get("ok"):
                    failed = merged
                    break
        finally:
            await req.run.reply(db, {"drop": scratch})
        await write.finish(target, writer, {"ok": 1.0})
    if failed is not None:
        return write.unmask(failed, writer.state, coll)
    return cursor_reply(f"{req.db}.{req.cmd.get('aggregate')}", [])
