"""Storage upkeep on a branch port: `compact`, `reIndex` and `planCacheClear`.

They change how the server stores, indexes or plans for a collection, never what it
holds. A branch runs them on the collections it owns of that collection (its live and
hidden overlays) and leaves the base and its ancestors' overlays alone: those are the
storage of main and of the other branches, which a branch's user has no business
rebuilding or locking (mongod's reIndex holds the collection exclusively while it
rebuilds). A collection the branch never changed has nothing of the branch's to work
on. The upstream judges the command first, under a name it holds no collection by, so
that a command it does not implement, options it refuses and a collection that does
not exist are answered in its own words.
"""

from __future__ import annotations

from typing import Any

from proxy.branching import naming
from proxy.branching.commands import catalog
from proxy.branching.commands.base import Request, coll_name
from proxy.branching.commands.stats import renamed
from proxy.wire.codes import Code


async def upkeep(req: Request) -> dict[str, Any] | None:
    coll = coll_name(req)
    options = req.options
    absent = naming.absent(req.on_branch.bid, coll)
    judged = renamed(await req.run.reply(req.db, {req.name: absent, **options}), req.db,
                     absent, coll)
    if not judged.get("ok") and judged.get("code") != Code.NAMESPACE_NOT_FOUND:
        return judged
    if not await catalog.exists(req, coll):
        return judged
    replies = []
    for layer in req.layers(coll):
        if layer.bid != req.on_branch.bid:
            continue
        for name in (layer.live, layer.hidden):
            reply = await req.run.reply(req.db, {req.name: name, **options})
            if reply.get("ok"):
                replies.append(reply)
            elif reply.get("code") != Code.NAMESPACE_NOT_FOUND:  # not made yet: skipped
                return renamed(reply, req.db, name, coll)
    if req.name == "compact":
        return _summed(replies)
    if req.name == "reIndex":
        indexes = await req.engine.view_indexes(req.on_branch, req.db, coll, req.run)
        return {"nIndexesWas": len(indexes), "nIndexes": len(indexes), "indexes": indexes,
                "ok": 1.0}
    return {"ok": 1.0}


def _summed(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """compact's counts (`bytesFreed`, a dry run's estimate) over the collections it ran
    on, in the first reply's shape."""
    if not replies:
        return {"bytesFreed": 0, "ok": 1.0}
    out = dict(replies[0])
    for key, value in out.items():
        if key != "ok" and isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = type(value)(sum(r.get(key) or 0 for r in replies))
    return out
