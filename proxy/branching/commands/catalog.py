"""listCollections and listIndexes: the branch's catalog, with overlays hidden."""

from __future__ import annotations

from typing import Any

from proxy.branching import naming
from proxy.branching.commands.base import Request, coll_name, cursor_reply, documents_stage
from proxy.branching.errors import CommandError
from proxy.branching.model import NsState
from proxy.wire.codes import Code

ID_INDEX = {"v": 2, "key": {"_id": 1}, "name": "_id_"}


async def base_collections(req: Request, reserved: dict[str, dict[str, Any]] | None = None
                           ) -> dict[str, dict[str, Any]]:
    """The upstream's collections in this database, reserved names left out (kept in
    `reserved` when given)."""
    out: dict[str, dict[str, Any]] = {}
    cmd = {"listCollections": 1}
    async for batch in req.run.batches(req.db, cmd):
        for info in batch:
            if not naming.is_reserved(info["name"]):
                out[info["name"]] = info
            elif reserved is not None:
                reserved[info["name"]] = info
    return out


def branch_states(req: Request) -> dict[str, list[NsState]]:
    """Per collection of this database, the states along the chain, nearest first."""
    bids = {branch.bid for branch in req.engine.chain(req.on_branch)}
    colls = {state.coll for state in req.engine.states.values()
             if state.bid in bids and state.db == req.db}
    return {coll: req.engine.layers(req.on_branch, req.db, coll) for coll in sorted(colls)}


def visible(layers: list[NsState], in_base: bool) -> bool:
    for layer in layers:
        if layer.present is not None:
            return layer.present
    return in_base


async def exists(req: Request, coll: str) -> bool:
    layers = req.layers(coll)
    for layer in layers:
        if layer.present is not None:
            return layer.present
    reply = await req.run(req.db, {"listCollections": 1, "filter": {"name": coll},
                                   "nameOnly": True})
    return bool(reply["cursor"]["firstBatch"])


async def visible_collections(req: Request) -> dict[str, dict[str, Any]]:
    overlays: dict[str, dict[str, Any]] = {}
    base = await base_collections(req, overlays)
    states = branch_states(req)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(base) | set(states)):
        layers = states.get(name, [])
        if not visible(layers, name in base):
            continue
        if name in base and not any(layer.base_dropped for layer in layers):
            out[name] = base[name]
        else:
            owner = next(layer for layer in layers if layer.present)
            out[name] = _owned_info(req, name, owner, overlays.get(owner.live))
    return out


def _owned_info(req: Request, name: str, owner: NsState,
                live: dict[str, Any] | None) -> dict[str, Any]:
    """A collection the branch owns, listed as the server lists its overlay (the
    collection's uuid and every field the server adds), under the user's name."""
    if live is None:
        return {"name": name, "type": "collection", "options": owner.options,
                "info": {"readOnly": False}, "idIndex": ID_INDEX}
    info = {**live, "name": name, "options": owner.options}
    id_index = live.get("idIndex")
    if isinstance(id_index, dict) and "ns" in id_index:
        info["idIndex"] = {**id_index, "ns": f"{req.db}.{name}"}
    return info


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
        infos = list((await base_collections(req)).values())
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
