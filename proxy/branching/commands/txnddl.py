"""create and createIndexes in a multi-document transaction on a branch, as mongod 4.4+
runs them: a collection that does not exist yet, and indexes on a collection the
transaction created and has not written to.

The collection's overlay is created in the transaction's session with a `create` entry,
so an abort leaves neither; other clients see it, and its indexes, from the commit on
(`Txn.present`, `Txn.indexes`). Children of the branch keep not showing it: they are
given their own view of the collection first, outside the transaction, which changes
nothing they show whether it commits or not.
"""

from __future__ import annotations

from typing import Any

from proxy.branching import catalog
from proxy.branching.catalog import with_specs
from proxy.branching.commands.base import Request, coll_name
from proxy.branching.commands.catalog import exists
from proxy.branching.commands.ddl import create_options, index_specs, own_state
from proxy.branching.errors import CommandError
from proxy.branching.model import NsState
from proxy.branching.runner import outside_transaction
from proxy.branching.txn import CURRENT, Txn
from proxy.branching.wal import CREATE, Change
from proxy.wire.codes import Code

# Options mongod refuses to create a collection with in a transaction, by what they make.
_NOT_IN_TRANSACTION = (("viewOn", "a view"), ("capped", "a capped collection"),
                       ("timeseries", "a time-series collection"))


def _txn() -> Txn:
    txn = CURRENT.get()
    assert txn is not None, "only the router's transaction path comes here"
    return txn


def _not_supported(message: str) -> CommandError:
    return CommandError(Code.OPERATION_NOT_SUPPORTED_IN_TRANSACTION, message)


async def _exists(req: Request, coll: str, state: NsState | None) -> bool:
    """Whether the branch shows the collection to this transaction: one it created
    exists only for it until the commit."""
    if state is not None and state.key in _txn().present:
        return True
    # The catalog's own reads run outside it: mongod runs no listCollections in one.
    with outside_transaction():
        return await exists(req, coll)


async def _new(req: Request, coll: str, options: dict[str, Any]) -> NsState:
    """Create a collection the branch does not show, in the transaction."""
    engine, branch, ns = req.engine, req.on_branch, f"{req.db}.{coll}"
    if coll.startswith("system."):
        raise _not_supported(f"Cannot create system collection {ns} within a transaction.")
    state = engine.state(branch, req.db, coll)
    if await _exists(req, coll, state):
        raise CommandError(Code.NAMESPACE_EXISTS, f"Collection {ns} already exists.")
    if state is None:
        state = await own_state(req, coll, options)
    elif not state.base_dropped or state.options != options:
        # An overlay the branch had before (a collection it dropped, or one it kept a
        # view of): only a drop, which no transaction runs, could start it over.
        raise _not_supported(
            f"Cannot create {ns} with these options in a multi-document transaction on "
            f"branch {branch.name!r}: the branch already has an overlay of it (dropped or "
            "kept earlier); create it outside a transaction (mongobranch)")
    else:
        with outside_transaction():
            await engine.mark_dirty(state)
    engine.txns.set_aside(state)
    await engine.txns.creating(state)
    await engine.log_changes(branch, [Change(ns, None, CREATE, None, None)], req.client())
    return state


async def create(req: Request) -> dict[str, Any]:
    options = create_options(req)
    for option, kind in _NOT_IN_TRANSACTION:
        if options.get(option):
            raise _not_supported(f"Cannot create {kind} in a multi-document transaction.")
    async with req.engine.writing(req.on_branch):
        await _new(req, coll_name(req), options)
    return {"ok": 1.0}


async def create_indexes(req: Request) -> dict[str, Any]:
    coll, specs = coll_name(req), index_specs(req)
    engine, branch, ns = req.engine, req.on_branch, f"{req.db}.{coll}"
    async with engine.writing(branch):
        state = engine.state(branch, req.db, coll)
        created = state is None or state.key not in _txn().present
        if state is None or created:
            if await _exists(req, coll, state):
                with outside_transaction():
                    view = await catalog.view_definition(engine, branch, req.run, req.db, coll)
                if view is not None:
                    raise CommandError(Code.COMMAND_NOT_SUPPORTED_ON_VIEW,
                                       f"Namespace {ns} is a view, not a collection")
                raise _not_supported(f"Cannot create new indexes on existing collection {ns} "
                                     "in a multi-document transaction.")
            state = await _new(req, coll, {})
        elif await _holds_documents(req, state):
            raise _not_supported(f"Cannot create new indexes on non-empty collection {ns} "
                                 "in a multi-document transaction.")
        before = engine.txns.indexes_of(state) or []
        reply = await req.run.reply(req.db, {"createIndexes": state.live, "indexes": specs})
        if not reply.get("ok"):
            reply["errmsg"] = str(reply.get("errmsg", "")).replace(state.live, coll)
            return reply
        after = with_specs(before, specs)
        await engine.txns.set_indexes(state, after)
    return {"createdCollectionAutomatically": created, "numIndexesBefore": len(before),
            "numIndexesAfter": len(after), "ok": 1.0}


async def _holds_documents(req: Request, state: NsState) -> bool:
    """A collection the transaction created holds its writes in the overlay alone (it
    shows nothing of the parent)."""
    reply = await req.run(req.db, {"find": state.live, "projection": {"_id": 1}, "limit": 1,
                                   "singleBatch": True})
    return bool(reply["cursor"]["firstBatch"])
