"""listCollections and listIndexes: the branch's catalog (catalog.py) as mongod replies."""

from __future__ import annotations

from typing import Any

from proxy.branching import catalog
from proxy.branching.commands.base import Request, coll_name, cursor_reply, documents_stage
from proxy.branching.errors import CommandError
from proxy.wire.codes import Code


async def exists(req: Request, coll: str) -> bool:
    return await catalog.exists(req.engine, req.on_branch, req.run, req.db, coll)


async def visible_collections(req: Request, only: str | None = None
                              ) -> dict[str, dict[str, Any]]:
    return await catalog.visible_collections(req.engine, req.on_branch, req.run, req.db,
                                             only)


def _one_name(req: Request) -> str | None:
    """The name a listCollections filter asks for alone (`{name: "c"}`, as drivers check
    that a collection exists), whose answer is that collection's or nothing."""
    filt = req.cmd.get("filter")
    if isinstance(filt, dict) and len(filt) == 1 and isinstance(filt.get("name"), str):
        return str(filt["name"])
    return None


async def _filtered(req: Request, infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply the user's listCollections filter on the server, as mongod would."""
    filt = req.cmd.get("filter")
    if filt and infos and _one_name(req) is None:
        cmd = {"aggregate": 1, "pipeline": [documents_stage(infos), {"$match": filt}],
               "cursor": {}}
        infos = [d async for batch in req.run.batches(req.db, cmd) for d in batch]
    if req.cmd.get("nameOnly"):
        infos = [{"name": i["name"], "type": i.get("type", "collection")} for i in infos]
    return infos


async def list_collections(req: Request) -> dict[str, Any]:
    one = _one_name(req)
    if req.branch is None:
        # A name the upstream lacks (a driver's create_collection asks first) is known
        # without listing the database (Runner.has).
        infos = [] if one is not None and not await req.run.has(req.db, one) else list(
            (await catalog.base_collections(req.run, req.db,
                                            names=None if one is None else [one])).values())
    else:
        infos = list((await visible_collections(req, one)).values())
    return cursor_reply(f"{req.db}.$cmd.listCollections", await _filtered(req, infos))


async def list_indexes(req: Request) -> dict[str, Any] | None:
    coll = coll_name(req)
    if not req.layers(coll):
        return None
    if not await exists(req, coll):
        raise CommandError(Code.NAMESPACE_NOT_FOUND, f"ns does not exist: {req.db}.{coll}")
    indexes = await req.engine.view_indexes(req.on_branch, req.db, coll, req.run)
    return cursor_reply(f"{req.db}.{coll}", indexes)
