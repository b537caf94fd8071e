"""`cloneCollectionAsCapped` and `convertToCapped` on a branch port.

mongod builds both from simpler steps: a capped collection is created, the source's
documents are inserted into it in natural order (the capped collection's own limits
dropping the oldest), and for a conversion the copy is renamed over the source, with
only the `_id` index left. A branch runs the same steps through its own write path
(`Engine.write`), so each is logged and materialized as the client's own `create`,
`insert` and `renameCollection` would be: history, diff, merge and change streams see
them as those commands, and the upstream judges the capped options in the `create`.
As on mongod, a conversion cut off half-way leaves its temporary collection behind.
A masked branch refuses both: the copy would hold the real values under a name (the
target, the temporary collection) that its masking may not cover.
"""

from __future__ import annotations

import secrets
from typing import Any

from proxy.branching import batching, masking, viewscan
from proxy.branching.commands.base import Request, coll_name
from proxy.branching.commands.catalog import exists
from proxy.branching.errors import CommandError
from proxy.wire.codes import Code

# Carried from the client's command onto the steps.
_CARRIED = ("writeConcern", "comment")


async def _step(req: Request, cmd: dict[str, Any], db: str | None = None) -> dict[str, Any]:
    cmd.update({k: req.cmd[k] for k in _CARRIED if k in req.cmd})
    reply = await req.engine.write(req.on_branch, req.ctx, req.run, db or req.db, cmd)
    if reply is None or not reply.get("ok") or reply.get("writeErrors"):
        error = (reply or {}).get("writeErrors", [reply or {}])[0]
        raise CommandError(int(error.get("code", 8)), str(error.get("errmsg", "")),
                           code_name=str(error.get("codeName", "")))
    return reply


def _capped_options(req: Request) -> dict[str, Any]:
    """The capped collection's options, as `create` takes them: its judge is the upstream."""
    out: dict[str, Any] = {"capped": True}
    if "size" in req.cmd:
        out["size"] = req.cmd["size"]
    if "max" in req.cmd:
        out["max"] = req.cmd["max"]
    return out


async def _clone(req: Request, source: str, target: str) -> None:
    if req.on_branch.masked:
        raise masking.refusal(f"command {req.name!r}", req.on_branch.name)
    ns = f"{req.db}.{source}"
    if not await exists(req, source):
        raise CommandError(Code.NAMESPACE_NOT_FOUND, f"source collection {ns} does not exist")
    if await exists(req, target):
        raise CommandError(Code.NAMESPACE_EXISTS,
                           f"a collection '{req.db}.{target}' already exists")
    await _step(req, {"create": target, **_capped_options(req)})
    layers = req.layers(source)
    async for batch in viewscan.view_batches(req.run, req.db, source, layers, {}):
        for group in batching.fitted(batch):
            await _step(req, {"insert": target, "documents": group, "ordered": True})


async def clone_collection_as_capped(req: Request) -> dict[str, Any]:
    source = coll_name(req)
    target = req.cmd.get("toCollection")
    if not isinstance(target, str) or not target:
        raise CommandError(Code.INVALID_NAMESPACE,
                           f"Invalid target collection name: {target!r}")
    await _clone(req, source, target)
    return {"ok": 1.0}


async def convert_to_capped(req: Request) -> dict[str, Any]:
    coll = coll_name(req)
    temp = f"tmp{secrets.token_hex(4)}.convertToCapped.{coll}"
    await _clone(req, coll, temp)
    await _step(req, {"renameCollection": f"{req.db}.{temp}", "to": f"{req.db}.{coll}",
                      "dropTarget": True}, "admin")
    return {"ok": 1.0}
