"""A stage whose `from` no pipeline can turn into the branch's view: the upstream copies
what `from` shows on the branch into a scratch collection, and the stage reads that.

`$graphLookup` recurses over one collection the server reads as it is: it has no
pipeline to put the branch view's stages (base minus hidden ids, plus each overlay) or a
view's stages in. An equality `$lookup` (`localField`/`foreignField`) whose own pipeline
holds a stage over the whole joined set (`$sort`, `$limit`, `$group`, ...) cannot be
split into one join per layer (`planner._lookup`). For these the upstream runs the
aggregation of what `from` shows on the branch with a final `$out` into
`__mb_<bid>_g_<token>` (`naming.scratch_from`: in the same database, as `from` must be;
hidden from every listing, as every reserved name is), server-side, and the stage's
`from` names the copy; everything is still evaluated by the upstream.

The copy lives as long as the read: it is dropped when the reply is whole, else when
the proxy's cursor over the read ends or is killed (`cursormerge.MergedCursor.scratch`);
a branch's drop sweeps copies left behind (a cursor the proxy forgot while idle, a
crash). In a multi-document transaction, where neither `$out` nor a drop can run, the
copy is made in the transaction from the aggregation's batches (so it holds the
transaction's own writes) and dropped when the transaction ends (`txn.Txn.scratch`);
a snapshot read's copy is made the same way from the aggregation read at its time.
It costs a server-side copy of the collection per read. An upstream view in its
place would copy nothing, and mongod resolves a view named as `from`; SecantusDB reads
such a view as an empty collection, so the copy is what the tests can hold the branch to.
"""

from __future__ import annotations

import secrets
from typing import Any

from bson.int64 import Int64

from proxy.branching import cursormerge, naming, planner, views
from proxy.branching.batching import fitted
from proxy.branching.commands import aggregate
from proxy.branching.commands.base import Request
from proxy.branching.errors import CommandError
from proxy.branching.txn import CURRENT

Pipeline = list[dict[str, Any]]
# Carried from the user's aggregate onto the copy's (never a session's readConcern or
# transaction fields: in a transaction the copy's commands run in its upstream session).
_CARRY = ("maxTimeMS", "comment", "apiVersion", "apiStrict", "allowDiskUse")


def splits(spec: dict[str, Any]) -> bool:
    """Whether a $lookup is planner._lookup's per-layer form (localField beside a
    pipeline) with a stage the per-layer joins cannot run: it needs a copy."""
    inner = spec.get("pipeline")
    if "localField" not in spec or not isinstance(inner, list):
        return False
    return any(not isinstance(stage, dict) or next(iter(stage), "") not in planner.PER_DOCUMENT
               for stage in inner)


def changed(req: Request, coll: str) -> bool:
    """Whether a collection's branch view is more than one upstream collection."""
    layers = req.layers(coll)
    return bool(layers) and views.whole(layers) is None


async def fill(req: Request, source: str, stages: Pipeline, made: list[str],
               collation: Any = None, key: Any = None,
               indexes: list[dict[str, Any]] | None = None,
               default_collation: dict[str, Any] | None = None,
               read_concern: dict[str, Any] | None = None) -> str:
    """A scratch copy of the branch's view of `source` with these stages (a view's)
    applied; its name is appended to `made` before it is written, for the caller to drop.
    key: the field the stage looks documents up by (connectToField, foreignField),
    indexed on the copy once written, as the server would use an index of `from` for it.
    indexes: specs the copy must have (a find's hinted index): built once written, or
    when it is filled by inserts between the create and the inserts (an index made in a
    transaction must be on an empty collection it created); a refusal is the read's.
    default_collation: the copy's own (the collection's), so that its `_id` index orders
    as the collection's does. The copy is then created with it and filled by a `$merge`:
    an `$out` into an existing collection keeps its options on mongod but not on
    SecantusDB, and a `$merge` leaves the collection it fills as it was on both.
    read_concern: a snapshot read's (pinned to its time), which no `$out` or `$merge`
    takes: the aggregation reads at it and the copy is filled by inserts."""
    name = naming.scratch_from(req.on_branch.bid, secrets.token_hex(6))
    txn = CURRENT.get()
    create: dict[str, Any] = {"create": name}
    if default_collation is not None:
        create["collation"] = default_collation
    by_inserts = txn is not None or read_concern is not None
    out: Pipeline = []
    if not by_inserts:
        out = [{"$out": name}] if default_collation is None else [{"$merge": {
            "into": name, "whenMatched": "fail", "whenNotMatched": "insert"}}]
    cmd: dict[str, Any] = {"aggregate": source, "pipeline": [*stages, *out], "cursor": {}}
    cmd.update((k, req.cmd[k]) for k in _CARRY if k in req.cmd)
    if collation is not None:
        cmd["collation"] = collation
    if read_concern is not None:
        cmd["readConcern"] = read_concern
    sub = Request(req.engine, req.branch, req.ctx, req.run, req.db, cmd)
    command = (await aggregate.planned(sub, cmd)).command
    assert command is not None
    # No $out in a transaction, nor a drop: the copy is made in it (so it holds the
    # transaction's own writes, in its snapshot) and dropped once it ends. At a
    # snapshot, the copy is made of the aggregation's batches read at its time.
    if txn is not None:
        txn.scratch.append((req.db, name))
    else:
        made.append(name)
    if by_inserts or default_collation is not None:
        await req.run(req.db, create)
    if by_inserts:
        if indexes:
            await req.run(req.db, {"createIndexes": name, "indexes": indexes})
        async for batch in req.run.batches(req.db, command):
            for group in fitted(batch):
                await req.run(req.db, {"insert": name, "documents": group})
    else:
        reply = await req.run.reply(req.db, command)
        if not reply.get("ok"):
            raise CommandError(int(reply.get("code", 1)), str(reply.get("errmsg", "")),
                               code_name=str(reply.get("codeName", "")))
        if indexes:
            await req.run(req.db, {"createIndexes": name, "indexes": indexes})
    if isinstance(key, str) and key and key != "_id" and not key.startswith("$"):
        # Only a lookup's speed depends on it: a refused index leaves the copy without.
        await req.run.reply(req.db, {"createIndexes": name, "indexes": [
            {"key": {key: 1}, "name": "__mb_from"}]})
    return name


async def drop(req: Request, made: list[str]) -> None:
    for name in made:
        await req.run.reply(req.db, {"drop": name})
    made.clear()


async def settle(req: Request, reply: dict[str, Any] | None, made: list[str]
                 ) -> dict[str, Any] | None:
    """A read over scratch copies, answered: the copies are dropped now when nothing of
    the read is left to come, else handed to the proxy's cursor (an upstream cursor on
    the user's namespace becomes one) to drop when it ends."""
    if not made:
        return reply
    cursor = reply.get("cursor") if reply is not None and reply.get("ok") else None
    cursor_id = cursor.get("id") if isinstance(cursor, dict) else None
    if not cursor_id:
        await drop(req, made)
        return reply
    assert isinstance(cursor, dict)
    held = req.engine.cursors.get(cursor_id)
    if held is None:
        source = str(cursor.get("ns", "")).split(".", 1)[-1]
        side = cursormerge.Side(source, [], cursor_id=cursor_id)
        held = cursormerge.MergedCursor(req.db, source, [side], None, 0, None,
                                        req.cmd.get("lsid"))
        cursor["id"] = Int64(req.engine.cursors.add(held))
    assert isinstance(held, cursormerge.MergedCursor)
    held.scratch = [*held.scratch, *made]
    made.clear()
    return reply
