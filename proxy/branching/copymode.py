"""Copy branches (DESIGN §12): the traditional way, beside WAL branches.

A copy branch holds a full server-side copy of every collection its parent shows,
under the reserved overlay names, with the parent hidden entirely. Every command then
runs through the same engine (the overlay is simply complete), so namespaces are
rewritten both ways by the same code, and its writes land in the WAL too, so log,
diff and merge work. The copy itself is the branch's data, not a cache: it is never
rebuilt from the WAL, and a reset undoes logged changes with their pre-images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.branching import views
from proxy.branching.commands import catalog
from proxy.branching.commands.base import Request, SystemContext
from proxy.branching.engine import MAIN, Engine, overlay_index
from proxy.branching.errors import BranchError
from proxy.branching.model import Branch, NsState
from proxy.branching.wal import RESETS, image

COPY = "copy"
WAL = "wal"
MODES = (WAL, COPY)
SYSTEM_DBS = frozenset({"admin", "local", "config"})

Progress = Callable[[str, int, int], None]


async def user_databases(engine: Engine) -> list[str]:
    reply = await engine.pool("admin", {"listDatabases": 1, "nameOnly": True})
    return sorted(d["name"] for d in reply["databases"]
                  if d["name"] not in SYSTEM_DBS and d["name"] != engine.meta_db)


async def parent_collections(engine: Engine, parent: Branch | None,
                             db: str) -> dict[str, dict[str, Any]]:
    """What the parent shows in a database: collections only (views and system
    collections are not copied)."""
    req = Request(engine, parent, SystemContext(), engine.pool, db, {})
    infos = (await catalog.visible_collections(req) if parent is not None
             else await catalog.base_collections(req))
    return {name: info for name, info in infos.items()
            if info.get("type", "collection") == "collection" and not name.startswith("system.")}


async def materialize(engine: Engine, branch: Branch,
                      progress: Progress | None = None) -> int:
    """Copy everything the parent shows into the branch; returns documents copied."""
    parent = None if branch.parent == MAIN else engine.get(branch.parent)
    pool = engine.pool
    plan: list[tuple[str, str, dict[str, Any]]] = []
    for db in await user_databases(engine):
        for coll, info in (await parent_collections(engine, parent, db)).items():
            plan.append((db, coll, info))
    copied = 0
    for step, (db, coll, info) in enumerate(plan):
        layers = engine.layers(parent, db, coll) if parent is not None else []
        indexes = (await engine.view_indexes(parent, db, coll, pool) if parent is not None
                   else await _base_indexes(engine, db, coll))
        state = NsState(branch.bid, db, coll, base_dropped=True, present=True,
                        indexes=indexes, options=dict(info.get("options") or {}))
        await pool.reply(db, {"drop": state.live})
        await pool.reply(db, {"drop": state.hidden})
        await pool(db, {"create": state.live, **state.options})
        await pool(db, {"create": state.hidden})
        specs = [overlay_index(ix) for ix in indexes if ix.get("name") != "_id_"]
        if specs:
            await pool(db, {"createIndexes": state.live, "indexes": specs})
        await pool(db, {"aggregate": coll, "cursor": {}, "allowDiskUse": True, "pipeline": [
            *views.view_stages(layers), {"$merge": {"into": state.live}}]})
        copied += int((await pool(db, {"count": state.live}))["n"])
        await engine.save_state(state)
        engine.states[state.key] = state
        if progress is not None:
            progress(f"{db}.{coll}", step + 1, len(plan))
    return copied


async def _base_indexes(engine: Engine, db: str, coll: str) -> list[dict[str, Any]]:
    reply = await engine.pool.reply(db, {"listIndexes": coll})
    return list(reply["cursor"]["firstBatch"]) if reply.get("ok") else []


async def undo_to(engine: Engine, branch: Branch, lsn: int,
                  target: Branch | None = None) -> int:
    """Take a copy branch back to an LSN by applying, newest first, the pre-images of
    its visible entries after it (to another copy of it, with target)."""
    target = target or branch
    later = {"b": branch.bid, "_id": {"$gt": lsn}, **branch.visible()}
    marker = await engine.wal.entries.find_one({**later, "op": {"$in": list(RESETS)}})
    if marker is not None:
        raise BranchError(409, f"{branch.name} dropped or recreated {marker['ns']} after "
                               "that point; a copy branch cannot be taken back across it")
    undone = 0
    cursor = engine.wal.entries.find(later).sort("_id", -1)
    async for entry in cursor:
        db, coll = entry["ns"].split(".", 1)
        state = engine.state(target, db, coll)
        if state is None:
            continue
        pre = image(entry, "pre")
        if pre is None:
            await engine.pool(db, {"delete": state.live,
                                   "deletes": [{"q": {"_id": entry["id"]}, "limit": 1}]})
        else:
            await engine.pool(db, {"update": state.live, "updates": [
                {"q": {"_id": entry["id"]}, "u": pre, "upsert": True}]})
        undone += 1
    return undone
