"""aggregate on a branch: the executor of the planner's aggregate plans (the branch
view inlined for the source collection and for every collection a $lookup, $unionWith or
$facet reaches, `planner.plan_aggregate`), including their probes; $out and $merge write
into the branch."""

from __future__ import annotations

import secrets
from typing import Any

from proxy.branching import cursormerge, overlay, planner, snapshot
from proxy.branching.commands import changestream, hints, snapshotread, stats, write
from proxy.branching.commands.base import Request, cursor_reply
from proxy.branching.errors import CommandError
from proxy.branching.planner import PlanKind
from proxy.branching.wal import CREATE, PUT, Change
from proxy.wire.codes import Code

Pipeline = list[dict[str, Any]]


def _out_target(req: Request, pipeline: Pipeline) -> tuple[str, str] | None:
    if not pipeline or not isinstance(pipeline[-1], dict) or "$out" not in pipeline[-1]:
        return None
    target = pipeline[-1]["$out"]
    if isinstance(target, str):
        return req.db, target
    if isinstance(target, dict) and isinstance(target.get("coll"), str):
        return str(target.get("db", req.db)), target["coll"]
    raise CommandError(Code.OUT_NEEDS_A_COLLECTION, "$out needs a collection name")


async def _first_batches(req: Request, finds: list[dict[str, Any]]
                         ) -> list[list[Any] | None]:
    """Each find's whole result when it fits one batch (None: the upstream refused the
    find, or it needs more than one batch, large documents not the few a probe is for).
    The finds go out together, in one round trip."""
    out: list[list[Any] | None] = []
    kills = []
    for find, reply in zip(finds, await req.run.replies(req.db, finds), strict=True):
        cursor = reply.get("cursor") if reply.get("ok") else None
        if cursor is None or cursor["id"]:
            if cursor is not None:
                kills.append({"killCursors": find["find"], "cursors": [cursor["id"]]})
            out.append(None)
            continue
        out.append(list(cursor["firstBatch"]))
    if kills:
        await req.run.replies(req.db, kills)
    return out


async def planned(req: Request, cmd: dict[str, Any]) -> planner.Plan:
    """The aggregate's plan, with its second step taken when the planner asked for a
    probe: what the leading $match selects from the base (and from each overlay, for a
    literal of it) is read and the planner plans again."""
    plan = planner.plan_aggregate(cmd, req.layers, branch=req.on_branch.name)
    probe = plan.probe
    if probe is None:
        return plan
    layers = req.layers(probe.source)
    finds = [planner.probe_find(cmd, probe.source, probe.first, base=True)]
    if probe.literal:
        # Read beside the base's: an overlay's probe is bounded (NARROW_LIMIT + 1
        # documents), and one round trip for all of them costs less than the wasted
        # reads when the base's turns out too large.
        finds += [planner.probe_find(cmd, layer.live, probe.first, base=False)
                  for layer in layers]
    first, *overlays = await _first_batches(req, finds)
    base = planner.narrow(layers, first)
    live: list[list[dict[str, Any]]] | None = None
    if base is not None and probe.literal:
        found = [batch for batch in overlays if batch is not None]
        if len(found) == len(overlays) and planner.literal_fits(base, found):
            live = found
    return planner.replan(plan, layers, base, live)


async def aggregate(req: Request) -> dict[str, Any] | None:
    if changestream.wanted(req.cmd):
        req.reject_transactions()
        return await changestream.open_stream(req)
    pipeline = req.cmd.get("pipeline")
    target = _out_target(req, pipeline) if isinstance(pipeline, list) else None
    if target is not None:
        req.reject_transactions()
        return await _aggregate_out(req, target)
    merge_spec = _merge_spec(req, pipeline) if isinstance(pipeline, list) else None
    if merge_spec is not None:
        req.reject_transactions()
        return await _aggregate_merge(req, merge_spec)
    cmd = req.cmd
    source = cmd.get("aggregate")
    if isinstance(source, str) and req.layers(source) and stats.stage_of(pipeline) \
            and "explain" not in cmd:
        return await stats.aggregate(req, source, req.layers(source))
    if isinstance(source, str) and req.layers(source):
        cmd = await hints.on_base(req, source, cmd)
    if snapshotread.requested(cmd) and isinstance(source, str) and req.layers(source):
        # Its probes and the aggregate itself at one cluster time.
        cmd, _ = await snapshotread.pinned(req, source, cmd)
    plan = await planned(req, cmd)
    explaining = "explain" in req.cmd
    if plan.kind is PlanKind.PASS and not explaining:
        return await hints.passed(req, cmd)
    assert plan.command is not None
    reply = await req.run.reply(req.db, plan.command)
    if explaining:
        if reply.get("ok"):
            reply["mongobranch"] = plan.explain()
        return reply
    return cursormerge.adopt(req.engine.cursors, req.db, str(req.cmd.get("aggregate")),
                             plan.command["aggregate"], reply, req.cmd.get("lsid"))


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
        command = (await planned(req, cmd)).command
        assert command is not None
        reply = await req.run.reply(req.db, command)
        if not reply.get("ok"):
            return reply
        state.base_dropped = True
        state.present = True
        await engine.save_state(state)
        ns = f"{db}.{coll}"
        # The overlay must stay the fold of the WAL: a drop, then one put per document.
        await engine.log_changes(branch, [Change(ns, None, CREATE, None, None)], req.client())
        # The collection is the branch's own now: it hides nothing (overlay.Writer.hide).
        await req.run(db, {"delete": state.hidden, "deletes": [{"q": {}, "limit": 0}]})
        state.hidden_ids = {}
        async for batch in req.run.batches(db, {"find": state.live}):
            await engine.log_changes(branch, [Change(ns, d["_id"], PUT, None, d) for d in batch],
                                     req.client())
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
        command = (await planned(req, cmd)).command
        assert command is not None
        reply = await req.run.reply(req.db, command)
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
        await writer.finish({"ok": 1.0})
    if failed is not None:
        return overlay.unmask(failed, writer.state, coll)
    return cursor_reply(f"{req.db}.{req.cmd.get('aggregate')}", [])
