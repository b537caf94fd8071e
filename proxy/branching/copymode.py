"""Copy branches (docs/ARCHITECTURE.md, "Copy branches"): the traditional way, beside
WAL branches.

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

from proxy.branching import capture, catalog, views, viewscan
from proxy.branching.engine import MAIN, Engine
from proxy.branching.errors import BranchError, CommandError, Kind
from proxy.branching.idkey import idkey
from proxy.branching.lineage import parent_layers, replaced
from proxy.branching.model import Branch, NsState, overlay_index
from proxy.branching.requests import Mode
from proxy.branching.runner import Runner
from proxy.branching.snapshot import PRE_IMAGES
from proxy.branching.wal import CREATE, DELETE, PUT, REBASE, RESETS, WRITES, Change, image, matching
from proxy.wire.bsonutil import same

# The client app of the entries a migration to WAL mode logs: the branch re-logged as
# it is, no change of its own (a change stream skips them, commands/changestream.py).
MIGRATION = "mongobranch-migrate"

COPY = "copy"
WAL = "wal"
SYSTEM_DBS = frozenset({"admin", "local", "config"})

Progress = Callable[[str, int, int], None]


async def user_databases(engine: Engine) -> list[str]:
    reply = await engine.pool("admin", {"listDatabases": 1, "nameOnly": True})
    # Proxies' metadata (this one's, other proxies' on the same upstream, the registry) is
    # not main's data: copying another proxy's WAL made a copy fork take minutes.
    skip = await capture.metadata_databases(engine.client) | {engine.meta_db}
    # A name no driver can address (SecantusDB lets a command create a database named ""
    # where mongod refuses it) holds nothing a client could read, so nothing to copy.
    return sorted(d["name"] for d in reply["databases"]
                  if d["name"] and d["name"] not in SYSTEM_DBS and d["name"] not in skip)


async def parent_collections(engine: Engine, parent: Branch | None,
                             db: str) -> dict[str, dict[str, Any]]:
    """What the parent shows in a database: collections only (views and system
    collections are not copied)."""
    infos = (await catalog.visible_collections(engine, parent, engine.pool, db)
             if parent is not None else await catalog.base_collections(engine.pool, db))
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
        # Known (and saved) before the copy, so a failure or a crash drops it with the rest.
        engine.states[state.key] = state
        await engine.save_state(state)
        await pool.reply(db, {"drop": state.hidden})
        await pool(db, {"create": state.hidden})
        try:
            await _fill(pool, db, coll, layers, state.live, state.options, indexes)
        except CommandError as exc:
            raise BranchError(Kind.UPSTREAM, f"copying {db}.{coll} for copy branch {branch.name!r} "
                                             f"failed on the upstream: {exc} (code {exc.code}); "
                                             "nothing of the branch was kept") from exc
        copied += int((await pool(db, {"count": state.live}))["n"])
        await engine.save_state(state)
        if progress is not None:
            progress(f"{db}.{coll}", step + 1, len(plan))
    return copied


async def _fill(pool: Runner, db: str, coll: str, layers: list[NsState], target: str,
                options: dict[str, Any], indexes: list[dict[str, Any]]) -> None:
    """A new collection holding the view of coll, with its options and indexes.

    Without collection options the copy is an $out and the indexes are built after:
    SecantusDB's $out writes about 3.5x faster than $merge into an indexed collection
    (50,000 documents: 7.7 s against 27 s, 2.6 s more for an index built after), and it
    replaces the target's indexes rather than keeping them as mongod does, so they
    cannot come first. A collection with options (validator, capped, collation, ...) is
    created with them and filled by $merge, which keeps them.

    Pre-images are left out of the copy's own options: the capture turns them on for
    every collection of main (so nearly every copy would take the slow $merge: 20,000
    documents in 35 s against 5 s), and nothing reads a copy's pre-images, since the
    branch logs its own writes with the images it read itself. The branch still lists
    them (the state's options)."""
    source, stages = views.view_source(coll, layers)
    specs = [overlay_index(ix) for ix in indexes if ix.get("name") != "_id_"]
    options = {k: v for k, v in options.items() if k != PRE_IMAGES}
    await pool.reply(db, {"drop": target})
    # A copy holds the documents as they are, even those a validator added later refuses.
    copy = {"aggregate": source, "cursor": {}, "allowDiskUse": True,
            "bypassDocumentValidation": True}
    if options:
        await pool(db, {"create": target, **options})
        if specs:
            await pool(db, {"createIndexes": target, "indexes": specs})
        await pool(db, {**copy, "pipeline": [*stages, {"$merge": {"into": target}}]})
        return
    await pool(db, {**copy, "pipeline": [*stages, {"$out": target}]})
    await pool.reply(db, {"create": target})  # an $out of nothing leaves no collection
    if specs:
        await pool(db, {"createIndexes": target, "indexes": specs})


async def _base_indexes(engine: Engine, db: str, coll: str) -> list[dict[str, Any]]:
    reply = await engine.pool.reply(db, {"listIndexes": coll})
    return list(reply["cursor"]["firstBatch"]) if reply.get("ok") else []


async def undo_to(engine: Engine, branch: Branch, lsn: int,
                  target: Branch | None = None) -> int:
    """Take a copy branch back to an LSN by applying, newest first, the pre-images of
    its visible entries after it (to another copy of it, with target)."""
    target = target or branch
    later = {"b": branch.bid, "_id": {"$gt": lsn}, **branch.visible()}
    marker = await engine.wal.first({**later, "op": {"$in": list(RESETS)}})
    if marker is not None:
        raise BranchError(Kind.CONFLICT, f"{branch.name} dropped or recreated {marker['ns']} after "
                                         "that point; a copy branch cannot be taken back across it")
    undone = 0
    cursor = await engine.wal.entries.aggregate([*matching({**later, "op": {"$in": list(WRITES)}}),
                                                 {"$sort": {"_id": -1}}],
                                                allowDiskUse=True)
    async for entry in cursor:
        db, coll = entry["ns"].split(".", 1)
        state = engine.state(target, db, coll)
        if state is None:
            continue
        await engine.wal.load([entry])
        pre = image(entry, "pre")
        if pre is None:
            await engine.pool(db, {"delete": state.live,
                                   "deletes": [{"q": {"_id": entry["id"]}, "limit": 1}]})
        else:
            await engine.pool(db, {"update": state.live, "updates": [
                {"q": {"_id": entry["id"]}, "u": pre, "upsert": True}]})
        undone += 1
    return undone


async def migrate(engine: Engine, name: str, to: Mode) -> dict[str, Any]:
    """Convert a branch in place between WAL and copy mode: same data, same port.
    Clients get retryable errors while it runs (the router refuses the branch's
    commands); an interrupted migration is finished at the next start-up."""
    branch = engine.get(name)
    if branch.mode == to and branch.migrating is None:
        return {"branch": name, "mode": to, "migrated": False, "collections": 0}
    if to == WAL and not engine.config.allow_wal.value:
        raise BranchError(Kind.FORBIDDEN, "WAL branches are disabled (allow_wal=false, from "
                                          f"{engine.config.allow_wal.source})")
    engine.migrating.add(name)
    try:
        async with engine.writing(branch):
            branch.migrating = to
            await engine.save_branch(branch)
            converted = await (_to_copy(engine, branch) if to == COPY
                               else _to_wal(engine, branch))
            branch.mode = to
            branch.migrating = None
            await engine.save_branch(branch)
    finally:
        engine.migrating.discard(name)
    return {"branch": name, "mode": to, "migrated": True, "collections": converted}


async def _swap(engine: Engine, db: str, scratch: str, live: str) -> None:
    await engine.pool("admin", {"renameCollection": f"{db}.{scratch}", "to": f"{db}.{live}",
                                "dropTarget": True})


async def _to_copy(engine: Engine, branch: Branch) -> int:
    """Every collection the branch shows becomes a full copy of its view."""
    pool = engine.pool
    count = 0
    for db in await user_databases(engine):
        for coll, info in (await parent_collections(engine, branch, db)).items():
            layers = engine.layers(branch, db, coll)
            indexes = await engine.view_indexes(branch, db, coll, pool)
            state = await engine.ensure_state(branch, db, coll, pool)
            scratch = f"__mb_{branch.bid}_m_{coll}"
            options = dict(info.get("options") or {})
            await _fill(pool, db, coll, layers, scratch, options, indexes)
            await _swap(engine, db, scratch, state.live)
            state.base_dropped, state.present = True, True
            state.indexes, state.options = indexes, options
            await engine.save_state(state)
            count += 1
    return count


async def _to_wal(engine: Engine, branch: Branch) -> int:
    """Every copied collection becomes an overlay of what differs from the parent, and
    the WAL gets the entries that rebuild it, so a WAL branch can replay itself. What the
    branch shows does not change, so its children keep nothing (snapshot.py)."""
    pool = engine.pool
    count = 0
    identity = {"app": MIGRATION}
    for state in [s for s in engine.states.values() if s.bid == branch.bid]:
        ns = f"{state.db}.{state.coll}"
        if await replaced(engine, branch, state) or not state.base_dropped:
            # Replaced on the branch (or already an overlay): log it whole.
            if state.base_dropped:
                await engine.log_changes(branch, [Change(ns, None, CREATE, None, None)],
                                         identity, preserve=False)
                async for batch in pool.batches(state.db, {"find": state.live}):
                    await engine.log_changes(branch, [Change(ns, d["_id"], PUT, None, d)
                                                      for d in batch], identity, preserve=False)
            count += 1
            continue
        layers = parent_layers(engine, branch, state.db, state.coll)
        scratch_live = f"__mb_{branch.bid}_m_{state.coll}"
        scratch_hidden = f"__mb_{branch.bid}_n_{state.coll}"
        for name in (scratch_live, scratch_hidden):
            await pool.reply(state.db, {"drop": name})
            await pool(state.db, {"create": name})
        specs = [overlay_index(ix) for ix in state.indexes or [] if ix.get("name") != "_id_"]
        if specs:
            await pool(state.db, {"createIndexes": scratch_live, "indexes": specs})
        await engine.log_changes(branch, [Change(ns, None, REBASE, None, None)], identity,
                                 preserve=False)
        # Documents the copy holds differently from the parent, or the parent lacks.
        async for batch in pool.batches(state.db, {"find": state.live}):
            ids = [d["_id"] for d in batch]
            theirs: dict[Any, dict[str, Any]] = {}
            async for got in viewscan.view_batches(pool, state.db, state.coll, layers,
                                                   {"_id": {"$in": ids}}):
                theirs.update((idkey(d["_id"]), d) for d in got)
            differ = [d for d in batch if idkey(d["_id"]) not in theirs
                      or not same(theirs[idkey(d["_id"])], d)]
            if differ:
                await pool(state.db, {"insert": scratch_live, "documents": differ})
                await pool(state.db, {"insert": scratch_hidden,
                                      "documents": [{"_id": d["_id"]} for d in differ]})
                await engine.log_changes(branch, [Change(ns, d["_id"], PUT, None, d)
                                                  for d in differ], identity, preserve=False)
        # Documents the parent shows that the copy does not hold: deleted on the branch.
        async for got in viewscan.view_batches(pool, state.db, state.coll, layers, {}):
            ids = [d["_id"] for d in got]
            mine: set[Any] = set()
            async for b in pool.batches(state.db, {"find": state.live,
                                                   "filter": {"_id": {"$in": ids}},
                                                   "projection": {"_id": 1}}):
                mine.update(idkey(d["_id"]) for d in b)
            gone = [i for i in ids if idkey(i) not in mine]
            if gone:
                await pool(state.db, {"insert": scratch_hidden,
                                      "documents": [{"_id": i} for i in gone]})
                await engine.log_changes(branch, [Change(ns, i, DELETE, None, None)
                                                  for i in gone], identity, preserve=False)
        await _swap(engine, state.db, scratch_live, state.live)
        await _swap(engine, state.db, scratch_hidden, state.hidden)
        state.base_dropped = False  # present stays: the branch still shows what it showed
        await engine.save_state(state)
        await engine.load_hidden(state)
        count += 1
    return count
