"""create, drop, dropDatabase, renameCollection, createIndexes, dropIndexes: scoped
to the branch's overlay and metadata; the base never changes."""

from __future__ import annotations

from typing import Any

from proxy.branching import snapshot, views
from proxy.branching.catalog import with_specs
from proxy.branching.commands import scratchfrom
from proxy.branching.commands.base import SESSION_FIELDS, Request, coll_name
from proxy.branching.commands.catalog import exists, visible_collections
from proxy.branching.errors import CommandError
from proxy.branching.model import ID_INDEX, NsState
from proxy.branching.runner import outside_transaction
from proxy.branching.wal import CREATE, DROP, PUT, Change
from proxy.wire.codes import Code


async def _empty(req: Request, state: NsState, options: dict[str, Any],
                 indexes: list[dict[str, Any]] | None = None) -> None:
    """Start the branch's collection over: the base is hidden and the overlay is new.
    indexes: the list the collection shows from then on (a rename's target; the caller
    makes them), else `_id` alone."""
    # One round trip where the connection pipelines: the upstream runs them in order,
    # and a name already gone is no error.
    creates = [{"create": state.live, **options}, {"create": state.hidden}]
    replies = await req.run.replies(state.db, [
        {"drop": state.live}, {"drop": state.hidden}, *creates])
    await req.run.all_made(state.db, creates, replies[2:])
    state.base_dropped = True
    state.options = options
    state.indexes = indexes or [dict(ID_INDEX)]
    state.unique = None
    state.hidden_ids = {}


async def _reset(req: Request, state: NsState, options: dict[str, Any],
                 marker: str = DROP, extra: dict[str, Any] | None = None,
                 indexes: list[dict[str, Any]] | None = None) -> None:
    """Empty the branch's collection (`_empty`) and log it. `extra` marks the entry for
    the branch's change streams (changestream.py): the drop that ends a rename."""
    await _empty(req, state, options, indexes)
    lsn = await req.engine.log_changes(req.on_branch, [Change(f"{state.db}.{state.coll}",
                                                              None, marker, None, None,
                                                              extra)],
                                       req.client())
    req.engine.note_catalog(state, lsn)


async def _state(req: Request, coll: str) -> NsState:
    # Children first take their own copy of what they show of the collection.
    await snapshot.freeze(req.engine, req.on_branch.name, req.db, [coll])
    state = await req.engine.ensure_state(req.on_branch, req.db, coll, req.run)
    await req.engine.mark_dirty(state)
    return state


async def own_state(req: Request, coll: str, options: dict[str, Any], *,
                    dirty: bool = True) -> NsState:
    """The overlay of a collection the branch creates and had none of: made with the
    options at once, the branch's own from the start (nothing of the parent shows
    through), where `_reset` would make one and start it over. Its children keep not
    showing the collection. The caller saves its state (Engine.ensure_state's `fresh`).

    dirty: mark the overlay dirty (Engine.mark_dirty), for a caller that writes it next
    (a transaction's documents). A `create` outside a transaction leaves it empty, as
    made: until the caller saves the state no start-up rebuilds it (a marker without a
    state is ignored), and once saved it is what the WAL says, so the marker would
    change nothing; the branch's first write to it sets one, as to any overlay at rest."""
    engine, branch = req.engine, req.on_branch
    with outside_transaction():
        await snapshot.before_collection_write(engine, branch, req.db, coll)
    state = await engine.ensure_state(branch, req.db, coll, req.run, fresh=options)
    if dirty:
        with outside_transaction():
            await engine.mark_dirty(state)
    return state


def create_options(req: Request) -> dict[str, Any]:
    return {k: v for k, v in req.cmd.items() if k != "create" and k not in SESSION_FIELDS}


async def create(req: Request) -> dict[str, Any]:
    coll = coll_name(req)
    options = create_options(req)
    async with req.engine.writing(req.on_branch):
        if await exists(req, coll):
            # mongod accepts a create of an existing collection only with its options.
            shown = (await visible_collections(req, coll)).get(coll) or {}
            current = dict(shown.get("options") or {})
            if options != current:
                raise CommandError(Code.NAMESPACE_EXISTS,
                                   f"Collection {req.db}.{coll} already exists.")
            return {"ok": 1.0}
        if req.engine.state(req.on_branch, req.db, coll) is None:
            # Two upstream writes after the overlay's creation: its `create` entry,
            # then its state (no dirty marker: own_state).
            state = await own_state(req, coll, options, dirty=False)
            lsn = await req.engine.log_changes(req.on_branch, [Change(f"{req.db}.{coll}",
                                                                      None, CREATE, None,
                                                                      None)],
                                               req.client())
            req.engine.note_catalog(state, lsn)
        else:
            state = await _state(req, coll)
            await _reset(req, state, options, CREATE)
        state.present = True
        await req.engine.save_state(state)
    return {"ok": 1.0}


async def _drop(req: Request, coll: str) -> int | None:
    """Drop one collection on the branch; the number of indexes it had, None if absent."""
    if not await exists(req, coll):
        return None
    indexes = await req.engine.view_indexes(req.on_branch, req.db, coll, req.run)
    state = await _state(req, coll)
    await _reset(req, state, {})
    state.present = False
    await req.engine.save_state(state)
    return len(indexes)


async def drop(req: Request) -> dict[str, Any]:
    coll = coll_name(req)
    async with req.engine.writing(req.on_branch):
        was = await _drop(req, coll)
    if was is None:
        return {"ok": 1.0}
    return {"nIndexesWas": was, "ns": f"{req.db}.{coll}", "ok": 1.0}


async def drop_database(req: Request) -> dict[str, Any]:
    """Every collection emptied first, then one WAL append of all their drops and one
    save of all their states, not one of each per collection (200 collections: 3.0 s,
    now 1.5 s): a crash between leaves overlays marked dirty, rebuilt from the WAL at
    start-up. The last entry marks the dropDatabase for the branch's change streams
    (changestream.py)."""
    async with req.engine.writing(req.on_branch):
        states = []
        for coll in await visible_collections(req):
            state = await _state(req, coll)
            await _empty(req, state, {})
            states.append(state)
        if states:
            last = len(states) - 1
            lsn = await req.engine.log_changes(req.on_branch, [
                Change(f"{req.db}.{state.coll}", None, DROP, None, None,
                       {"dropdb": True} if n == last else None)
                for n, state in enumerate(states)], req.client())
            for n, state in enumerate(states):
                req.engine.note_catalog(state, lsn - last + n)
                state.present = False
            await req.engine.save_states(states)
    return {"dropped": req.db, "ok": 1.0}


async def rename_collection(req: Request) -> dict[str, Any]:
    if req.db != "admin":
        raise CommandError(Code.UNAUTHORIZED, "renameCollection may only be run against the "
                                               "admin database.")
    source, target = req.cmd.get("renameCollection"), req.cmd.get("to")
    if not isinstance(source, str) or not isinstance(target, str) or "." not in source \
            or "." not in target:
        raise CommandError(Code.INVALID_NAMESPACE, "renameCollection needs full namespaces")
    sdb, scoll = source.split(".", 1)
    tdb, tcoll = target.split(".", 1)
    if sdb != tdb:
        raise req.unsupported("renameCollection across databases")
    sub = Request(req.engine, req.branch, req.ctx, req.run, sdb, req.cmd)
    async with req.engine.writing(req.on_branch):
        if not await exists(sub, scoll):
            raise CommandError(Code.NAMESPACE_NOT_FOUND,
                               f"source namespace does not exist: {source}")
        if source == target:
            raise CommandError(Code.ILLEGAL_OPERATION, "Can't rename a collection to itself")
        if await exists(sub, tcoll) and not req.cmd.get("dropTarget"):
            raise CommandError(Code.NAMESPACE_EXISTS, f"target namespace exists: {target}")
        indexes = await req.engine.view_indexes(req.on_branch, sdb, scoll, req.run)
        layers = sub.layers(scoll)
        src_state = await _state(sub, scoll)
        dst_state = await _state(sub, tcoll)
        # The target's entries are the rename's, not inserts (changestream.py).
        moved = {"from": source}
        await _reset(sub, dst_state, (src_state.options if src_state.base_dropped else {}),
                     CREATE, moved, indexes)
        source, stages = views.view_source(scoll, layers) if layers else (scoll, [])
        await req.run(sdb, {"aggregate": source, "cursor": {}, "pipeline": [
            *stages, {"$merge": {"into": dst_state.live, "whenMatched": "replace"}}]})
        specs = [{k: v for k, v in ix.items() if k not in ("v", "ns")} for ix in indexes
                 if ix.get("name") != "_id_"]
        if specs:
            await req.run(sdb, {"createIndexes": dst_state.live, "indexes": specs})
        dst_state.present = True
        ns = f"{sdb}.{tcoll}"
        async for batch in req.run.batches(sdb, {"find": dst_state.live}):
            await req.run(sdb, {"insert": dst_state.hidden,
                                "documents": [{"_id": d["_id"]} for d in batch]})
            await req.engine.log_changes(req.on_branch,
                                         [Change(ns, d["_id"], PUT, None, d, moved)
                                          for d in batch],
                                         req.client())
        await req.engine.save_state(dst_state)
        await req.engine.load_hidden(dst_state)
        await _reset(sub, src_state, {}, extra={"rename": target})
        src_state.present = False
        await req.engine.save_state(src_state)
    return {"ok": 1.0}


def index_specs(req: Request) -> list[Any]:
    specs = req.cmd.get("indexes")
    if not isinstance(specs, list) or not specs:
        raise CommandError(Code.BAD_VALUE, "Must specify at least one index to create")
    return specs


async def create_indexes(req: Request) -> dict[str, Any]:
    coll = coll_name(req)
    specs = index_specs(req)
    async with req.engine.writing(req.on_branch):
        created = not await exists(req, coll)
        before = await req.engine.view_indexes(req.on_branch, req.db, coll, req.run) \
            if not created else [dict(ID_INDEX)]
        unique = [spec for spec in specs if isinstance(spec, dict) and spec.get("unique")
                  and spec.get("name") not in {ix.get("name") for ix in before}]
        if unique and not created and views.whole(req.layers(coll)) is None:
            await _build_on_a_copy(req, coll, unique)
        state = await _state(req, coll)
        if created:
            await _reset(req, state, {}, CREATE)
        reply = await req.run.reply(req.db, {"createIndexes": state.live, "indexes": specs})
        if not reply.get("ok"):
            reply["errmsg"] = str(reply.get("errmsg", "")).replace(state.live, coll)
            return reply
        after = with_specs(before, specs)
        state.indexes = after
        state.unique = None
        state.present = True
        await req.engine.log_catalog(req.on_branch, state, "createIndexes", req.client())
        await req.engine.save_state(state)
    return {"createdCollectionAutomatically": created, "numIndexesBefore": len(before),
            "numIndexesAfter": len(after), "ok": 1.0}


async def _build_on_a_copy(req: Request, coll: str, unique: list[dict[str, Any]]) -> None:
    """mongod builds a unique index over the documents already there and refuses it on
    a duplicate key; the overlay holds only the branch's writes, so the upstream first
    builds it on a scratch copy of the branch's view (a copy of the collection, as
    mongod's build reads all of it), whose refusal is the client's, in its names."""
    made: list[str] = []
    try:
        await scratchfrom.fill(req, coll, [], made, indexes=unique)
    except CommandError as exc:
        scratch = made[0] if made else coll
        raise CommandError(exc.code, str(exc).replace(scratch, coll), code_name=exc.code_name,
                           **{k: v for k, v in exc.extra.items() if k in _DUPLICATE}) from None
    finally:
        await scratchfrom.drop(req, made)


# What a duplicate-key refusal carries beside its message.
_DUPLICATE = ("keyPattern", "keyValue")


async def drop_indexes(req: Request) -> dict[str, Any]:
    coll = coll_name(req)
    which = req.cmd.get("index")
    async with req.engine.writing(req.on_branch):
        if not await exists(req, coll):
            raise CommandError(Code.NAMESPACE_NOT_FOUND, f"ns not found {req.db}.{coll}")
        before = await req.engine.view_indexes(req.on_branch, req.db, coll, req.run)
        if which == "*":
            drop = [ix for ix in before if ix["name"] != "_id_"]
        else:
            wanted = which if isinstance(which, list) else [which]
            drop = []
            for item in wanted:
                match = [ix for ix in before
                         if (isinstance(item, str) and ix["name"] == item)
                         or (isinstance(item, dict) and ix["key"] == item)]
                if not match:
                    label = item if isinstance(item, str) else str(item)
                    raise CommandError(Code.INDEX_NOT_FOUND, f"index not found with name [{label}]")
                if match[0]["name"] == "_id_":
                    raise CommandError(Code.INVALID_OPTIONS, "cannot drop _id index")
                drop.extend(match)
        state = await _state(req, coll)
        for ix in drop:
            await req.run.reply(req.db, {"dropIndexes": state.live, "index": ix["name"]})
        gone = {ix["name"] for ix in drop}
        state.indexes = [ix for ix in before if ix["name"] not in gone]
        state.unique = None
        await req.engine.log_catalog(req.on_branch, state, "dropIndexes", req.client())
        await req.engine.save_state(state)
    return {"nIndexesWas": len(before), "ok": 1.0}
