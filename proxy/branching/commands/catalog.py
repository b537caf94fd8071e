"""listCollections and listIndexes: the branch's catalog (catalog.py) as mongod replies."""

from __future__ import annotations

from typing import Any

from proxy.branching import catalog
from proxy.branching.commands.base import Request, coll_name, cursor_reply, documents_stage
from proxy.branching.errors import CommandError
from proxy.wire.codes import Code


async def exists(req: Request, coll: str) -> bool:
    return await catalog.exists(req.engine, req.on_branch, req.run, req.db, coll)


async def visible_collections(req: Request) -> dict[str, dict[str, Any]]:
    return await catalog.visible_collections(req.engine, req.on_branch, req.run, req.db)


async def _filtered(req: Request, infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply the user's listCollections filter on the server, as mongod would."""
    filt = req.cmd.get("filter")
    if filt and infos:
        cmd = {"aggregate": 1, "pipeline": [documents_stage(infos), {"$match": filt}],
               "cursor": {}}
        infos = [d async for batch in req.run.batches(req.db, cmd) for d in batch]
    if req.cmd.get("nameOnly"):
        infos = [{"name": i["name"], "type": i.get("type", "collection")} for i in infos]
    return infos


async def list_collections(req: Request) -> dict[str, Any]:
    if req.branch is None:
        infos = list((await catalog.base_collections(req.run, req.db)).values())
    else:
        infos = list((await visible_collections(req)).values())
    return cursor_reply(f"{req.db}.$cmd.listCollections", await _filtered(req, infos))


async def list_indexes(req: Request) -> dict[str, Any] | None:
    coll = coll_name(req)
    if not req.layers(coll):
        return None
    if not await exists(req, coll):
        raise CommandError(Code.NAMESPACE_NOT_FOUND, f"ns does not exist: {req.db}.{coll}")
    indexes = await req.engine.view_indexes(req.on_branch, req.db, coll, req.run)
    return cursor_reply(f"{req.db}.{coll}", indexes)
