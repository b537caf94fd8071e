"""A branch at a past point shows each collection's indexes and options as they were
then (docs/ARCHITECTURE.md, "History"), not its source's current ones: what the source
changed since is undone on the new branch through its own write path, logged as its
changes, as the documents given back are (at.py).

A branch's own changes are its catalog history (NsState.catalog, one list per change);
main's are the change stream's `createIndexes`, `dropIndexes` and `modify` events the
capture logs in main's history, each undone from what the event says of it: the index
specs it names, and the state before a `modify`."""

from __future__ import annotations

import dataclasses
from typing import Any

from proxy.branching import snapshot
from proxy.branching.catalogundo import IN_PLACE, Catalog, undo
from proxy.branching.engine import MAIN, Engine
from proxy.branching.errors import BranchError, Kind
from proxy.branching.history.lookup import branch_states
from proxy.branching.model import Branch, NsState, overlay_index
from proxy.branching.runner import SystemContext
from proxy.branching.views import ENFORCED
from proxy.branching.wal import CATALOG

# The collection options a branch at a point gives back (collMod takes them), and the
# value each has when a collection was made without it. changeStreamPreAndPostImages is
# not among them: the capture turns it on for main's collections itself.
RESTORED = {"validator": {}, "validationLevel": "strict", "validationAction": "error"}
assert set(RESTORED) == set(ENFORCED)


async def branch_catalogs(engine: Engine, source: Branch, branch: Branch, lsn: int,
                          then: list[list[int]]) -> None:
    """The new branch of a branch source: each collection whose index list or options
    the source changed itself gets them back as the source showed them at the point
    (under the voids in effect then). A collection the source never changed shows its
    parent's, which the source kept as they were when its parent changed them."""
    for state in branch_states(engine, source):
        if not state.catalog:
            continue
        past = dataclasses.replace(state, indexes=state.indexes, options=dict(state.options))
        engine.restore_catalog(past, then, lsn)
        await give_back(engine, branch, state.db, state.coll,
                        await _shown(engine, source, past), await _shown(engine, source, state))


async def _shown(engine: Engine, source: Branch, state: NsState) -> Catalog:
    """The index list and options a state shows, its parent's where it has none."""
    db, coll = state.db, state.coll
    indexes = state.indexes
    if indexes is None:
        indexes = await snapshot.parent_indexes(engine, source, db, coll) or []
    options = state.options if state.options or state.base_dropped \
        else await snapshot.parent_options(engine, source, db, coll)
    return indexes, options


async def main_catalogs(engine: Engine, branch: Branch, lsn: int) -> None:
    """The new branch of main: each collection main changed the indexes or options of
    since the point gets them back as they were, main's current ones with its later
    changes undone, newest first."""
    later: dict[str, list[dict[str, Any]]] = {}
    async for entry in engine.wal.entries.find(
            {"b": MAIN, "_id": {"$gt": lsn}, "op": {"$in": list(CATALOG)}},
            {"ns": 1, "op": 1, "desc": 1, "before": 1}).sort("_id", -1):
        later.setdefault(entry["ns"], []).append(entry)
    for ns, entries in later.items():
        db, coll = ns.split(".", 1)
        reply = await engine.pool.reply(db, {"listIndexes": coll})
        if not reply.get("ok"):
            continue  # dropped since: a branch at that point is refused (at.py)
        now: Catalog = (list(reply["cursor"]["firstBatch"]),
                        await engine.base_options(db, coll) or {})
        await give_back(engine, branch, db, coll, undo(ns, now, entries), now)


async def give_back(engine: Engine, branch: Branch, db: str, coll: str,
                    then: Catalog, now: Catalog) -> None:
    """The new branch (showing `now` through its parent) shows `then`: the indexes and
    options that differ are changed through its own write path, as a client would."""
    (was, options_then), (shown, options_now) = then, now
    old = {ix["name"]: overlay_index(ix) for ix in shown if ix["name"] != "_id_"}
    new = {ix["name"]: overlay_index(ix) for ix in was if ix["name"] != "_id_"}
    retuned = [name for name in new if name in old and new[name] != old[name]
               and _fixed(new[name]) == _fixed(old[name])]
    gone = [name for name in old if name not in new or (
        new[name] != old[name] and name not in retuned)]
    made = [new[name] for name in new if name not in old or name in gone]
    commands: list[dict[str, Any]] = []
    if gone:
        commands.append({"dropIndexes": coll, "index": gone})
    if made:
        commands.append({"createIndexes": coll, "indexes": made})
    for name in retuned:
        change = {k: new[name].get(k, False) for k in IN_PLACE
                  if new[name].get(k, False) != old[name].get(k, False)}
        commands.append({"collMod": coll, "index": {"name": name, **change}})
    fields = {k: options_then.get(k, default) for k, default in RESTORED.items()
              if options_then.get(k, default) != options_now.get(k, default)}
    if fields:
        commands.append({"collMod": coll, **fields})
    for command in commands:
        reply = await engine.write(branch, SystemContext(), engine.pool, db, command)
        if reply is None or not reply.get("ok"):
            raise BranchError(Kind.INTERNAL, f"cannot give {db}.{coll} its indexes and "
                                             f"options at that point back: {reply}")
    state = engine.state(branch, db, coll)
    if fields and options_then and state is not None:
        # collMod removes a validator as `validator: {}`, which listCollections would
        # show: the options then are the branch's own, exactly (an empty set would
        # mean its parent's).
        state.options = dict(options_then)
        state.catalog[-1]["options"] = dict(options_then)
        await engine.save_state(state)


def _fixed(spec: dict[str, Any]) -> dict[str, Any]:
    """What of an index collMod cannot change (its key, its options, whether it has a
    TTL at all): a difference there means another index."""
    return {**{k: v for k, v in spec.items() if k not in IN_PLACE},
            "ttl": "expireAfterSeconds" in spec}
