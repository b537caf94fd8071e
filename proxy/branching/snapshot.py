"""Snapshots: a branch shows its parent as it was at the fork, whatever the parent does
later (docs/ARCHITECTURE.md, "Snapshots").

A child reads through its parent's overlay, so a parent's write would show through.
Before a parent's changes are logged, every live child that still reads a changed
document through the parent gets that document's pre-image copied up into its own
overlay (live copy plus hidden id; only the hidden id for a document that did not
exist) and logged in its WAL as a `keep` entry. The read planner is unchanged: the
child simply owns the document from then on, as if it had written it.

The parent's overlay changes before its entries are logged, so for that window a
branch's writes hold its fence as writers and every command on a descendant holds
its ancestors' fences as readers: a child never sees a parent's write half preserved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bson.timestamp import Timestamp
from pymongo.errors import PyMongoError

from proxy.branching import views, viewscan
from proxy.branching.batching import fitted
from proxy.branching.catalogundo import undo
from proxy.branching.errors import BranchError, CommandError, Kind
from proxy.branching.idkey import idkey
from proxy.branching.model import overlay_index
from proxy.branching.naming import MAIN
from proxy.branching.voids import written_through
from proxy.branching.wal import (
    KEEP,
    LATENT,
    OWN,
    RESETS,
    WRITES,
    Change,
    matching,
)
from proxy.wire.codes import Code

if TYPE_CHECKING:
    from proxy.branching.engine import Engine
    from proxy.branching.model import Branch, NsState

PRE_IMAGES = "changeStreamPreAndPostImages"
# Ids per hidden-set lookup ($in lists stay small: SecantusDB's cost grows with their square).
CHUNK = 100
SYSTEM = {"app": "mongobranch", "why": "snapshot"}


# Releases handed to a task (Fence.release_soon), kept referenced until they ran.
_releasing: set[asyncio.Task[None]] = set()


class Fence:
    """Many writers of a branch at once, or many commands of its descendants at once,
    never both. The two sides take turns when both wait, so a steady stream of either
    cannot starve the other."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._active = {"w": 0, "r": 0}
        self._waiting = {"w": 0, "r": 0}
        self._turn = "w"

    def hold(self, side: str) -> _Held:
        return _Held(self, side)

    async def acquire(self, side: str) -> None:
        other = "r" if side == "w" else "w"
        if not self._active[other] and not self._waiting[other] and not self._cond.locked():
            # Uncontended (every branch read takes main's fence): what the condition's
            # path below would do without waiting, without taking its lock.
            self._active[side] += 1
            return
        async with self._cond:
            self._waiting[side] += 1
            try:
                await self._cond.wait_for(lambda: not self._active[other] and (
                    not self._waiting[other] or self._turn == side))
            finally:
                self._waiting[side] -= 1
            self._active[side] += 1
            if self._waiting[other]:
                self._turn = other

    def try_acquire(self, side: str) -> bool:
        """`acquire` from synchronous code, where it would not wait (the other side
        neither holds nor awaits the fence); False: not taken."""
        other = "r" if side == "w" else "w"
        if self._active[other] or self._waiting[other] or self._cond.locked():
            return False
        self._active[side] += 1
        return True

    def release_soon(self, side: str) -> None:
        """`release` from synchronous code: at once when nobody waits, else in a task
        (waiters are notified under the condition's lock)."""
        if not self._waiting["r"] and not self._waiting["w"] and not self._cond.locked():
            self._active[side] -= 1
            if not self._active[side]:
                self._turn = "r" if side == "w" else "w"
            return
        task = asyncio.get_running_loop().create_task(self.release(side))
        _releasing.add(task)
        task.add_done_callback(_releasing.discard)

    async def release(self, side: str) -> None:
        other = "r" if side == "w" else "w"
        if not self._waiting["r"] and not self._waiting["w"] and not self._cond.locked():
            # Nobody waits on the condition (each waiter counts itself in _waiting
            # first): nobody to notify.
            self._active[side] -= 1
            if not self._active[side]:
                self._turn = other
            return
        async with self._cond:
            self._active[side] -= 1
            if not self._active[side]:
                self._turn = other
            self._cond.notify_all()


class _Held:
    """One side of a fence held for an `async with` block."""

    __slots__ = ("fence", "side")

    def __init__(self, fence: Fence, side: str):
        self.fence = fence
        self.side = side

    async def __aenter__(self) -> None:
        await self.fence.acquire(self.side)

    async def __aexit__(self, *exc: object) -> None:
        await self.fence.release(self.side)


async def preserve(engine: Engine, parent: str, changes: list[Change],
                   kids: list[Branch] | None = None,
                   deferred: list[tuple[str, list[Change]]] | None = None) -> int:
    """Copy up the pre-images of a branch's (or main's) changes into each child (or each
    of `kids`) that has not diverged on them; returns the number of documents copied.
    Runs before the changes are logged (on main: before they are applied, or, captured
    from the change stream, before a child may read past them). With `deferred`, the
    children's `keep` entries are left there for the caller to log with its own."""
    if kids is None:
        kids = _children(engine, parent)
    if not kids:
        return 0
    firsts: dict[str, dict[Any, Change]] = {}
    for change in changes:
        if change.op in WRITES:
            firsts.setdefault(change.ns, {}).setdefault(idkey(change.id), change)
    if not firsts:
        return 0

    async def into(kid: Branch) -> int:
        copied = 0
        async with engine.branch_lock(kid.bid).exclusive():
            if engine.branches.get(kid.name) is not kid:
                return 0  # dropped meanwhile
            for ns, by_id in firsts.items():
                copied += await _copy_up(engine, kid, ns, list(by_id.values()), deferred)
        return copied

    # Children are independent of one another: their copies run side by side.
    return sum(await asyncio.gather(*(into(kid) for kid in kids)))


def _children(engine: Engine, parent: str) -> list[Branch]:
    return [b for b in engine.branches.values() if b.parent == parent and not b.creating]


def independent(state: NsState | None) -> bool:
    """Whether nothing of the parent shows through this state any more."""
    return state is not None and (state.base_dropped or state.detached)


def latent(kid: Branch, state: NsState | None) -> bool:
    """Whether only the branch's own drop or create hides its parent here, which a
    reset to before it would undo: the parent would show through again, as at the fork.
    So it keeps what the parent changes meanwhile, in its WAL alone (its overlay is its
    own collection): a rebuild folds none of it while the drop stands
    (Engine.rematerialize), all of it once a reset voided the drop."""
    return state is not None and state.base_dropped and not state.owned \
        and not state.detached and kid.mode != "copy"


# The branch being merged into its parent, during the merge's writes there: what the
# parent does then is the branch's own change, which it needs no copy of. A latent
# state of it keeps nothing and refuses resets to before its drop instead (`_forgo`):
# merging a branch that dropped a large collection copies none of it.
MERGING: ContextVar[str | None] = ContextVar("merging", default=None)


async def _forgo(engine: Engine, kid: Branch, state: NsState) -> int:
    """A latent state of the branch being merged: instead of keeping what its parent
    changes, it holds the collection whole from now on and refuses a reset to before
    its drop (which would have to show the parent's collection as it was)."""
    marker = await engine.wal.first({"b": kid.bid, "ns": f"{state.db}.{state.coll}",
                                     "op": {"$in": list(RESETS)}, **kid.visible()},
                                    newest=True)
    if marker is not None:
        state.reset_floor = max(state.reset_floor or 0, int(marker["_id"]))
    await _own_latent(engine, kid, state, False)
    return 0


async def _marked(engine: Engine, kid: Branch, state: NsState, ids: list[Any],
                  through: dict[str, Any] | None = None) -> set[Any]:
    """idkeys of the ids a latent state's parent images must not be kept for: ids the
    branch wrote over its parent's view (a reset to before its drop shows its own
    images; one to before those writes keeps the images then,
    resets._keep_fork_images), and ids already kept. through: written_through's filter,
    when the caller keeps several batches."""
    ns = f"{state.db}.{state.coll}"
    if through is None:
        through = await written_through(engine, kid, ns)
    found: set[Any] = set()
    for start in range(0, len(ids), CHUNK):
        filt = {"b": kid.bid, "ns": ns, "id": {"$in": ids[start:start + CHUNK]},
                **kid.visible(), "$or": [through, {"op": KEEP}]}
        async for batch in engine.pool.batches(engine.meta_db, {
                "aggregate": "wal", "cursor": {}, "allowDiskUse": True,
                "pipeline": [*matching(filt), {"$group": {"_id": "$id"}}]}):
            found.update(idkey(d["_id"]) for d in batch)
    return found


async def _keep_latent(engine: Engine, kid: Branch, state: NsState,
                       images: list[tuple[Any, dict[str, Any] | None]],
                       deferred: list[tuple[str, list[Change]]] | None = None,
                       through: dict[str, Any] | None = None) -> int:
    """`keep` entries of a latent state (see latent): logged, never in the overlay."""
    marked = await _marked(engine, kid, state, [i for i, _ in images], through)
    ns = f"{state.db}.{state.coll}"
    keeps = [Change(ns, i, KEEP, None, img) for i, img in images if idkey(i) not in marked]
    if keeps:
        await _log_keeps(engine, kid, keeps, deferred)
    return len(keeps)


async def _log_keeps(engine: Engine, kid: Branch, keeps: list[Change],
                     deferred: list[tuple[str, list[Change]]] | None) -> None:
    """Log a child's `keep` entries, or leave them in `deferred` for the caller's one
    insert."""
    if deferred is not None:
        for keep in keeps:
            keep.extra = {"client": SYSTEM}
        deferred.append((kid.bid, keeps))
    else:
        await engine.wal.append(kid.bid, keeps, SYSTEM)


async def _copy_up(engine: Engine, kid: Branch, ns: str, changes: list[Change],
                   deferred: list[tuple[str, list[Change]]] | None = None) -> int:
    db, coll = ns.split(".", 1)
    state = engine.state(kid, db, coll)
    if latent(kid, state):
        assert state is not None
        if MERGING.get() == kid.bid:
            return await _forgo(engine, kid, state)
        return await _keep_latent(engine, kid, state,
                                  [(c.id, c.pre) for c in changes], deferred)
    if independent(state):
        return 0
    owned = await owned_ids(engine, state, [c.id for c in changes])
    fresh = [c for c in changes if idkey(c.id) not in owned]
    if not fresh:
        return 0
    if state is None:
        state = await engine.ensure_state(kid, db, coll, engine.pool)
    await engine.mark_dirty(state)
    await _keep(engine, kid, state, [(c.id, c.pre) for c in fresh], deferred)
    return len(fresh)


async def _keep(engine: Engine, kid: Branch, state: NsState,
                images: list[tuple[Any, dict[str, Any] | None]],
                deferred: list[tuple[str, list[Change]]] | None = None) -> None:
    """Make the child own these ids with these images (None: absent), logged as keeps
    (or left in `deferred` for the caller's one insert)."""
    docs = [img for _, img in images if img is not None]
    ids = [i for i, _ in images]
    # Both before the WAL entries; between the two, order does not matter (a crash
    # leaves the overlay dirty, rebuilt from the WAL).
    # A child's overlay may carry a validator (collMod): what it keeps is not a write.
    bypass = bool(views.enforced(engine.layers(kid, state.db, state.coll)))
    await asyncio.gather(*([_insert(engine, state.db, state.live, docs, bypass)]
                           if docs else []),
                         _insert(engine, state.db, state.hidden, [{"_id": i} for i in ids]))
    state.hide(ids)
    ns = f"{state.db}.{state.coll}"
    await _log_keeps(engine, kid, [Change(ns, i, KEEP, None, img) for i, img in images],
                     deferred)


async def freeze(engine: Engine, parent: str, db: str, colls: list[str], *,
                 indexes_only: bool = False) -> int:
    """Before a branch (or main) changes collections themselves (create, drop, rename,
    indexes, $out, the first write that creates one, a reset): every child still reading
    them through it takes its own copy of what it shows, and reads nothing of its
    ancestors there from then on. Returns the number of documents copied.

    indexes_only (main's index changes): the child keeps its index list and reads on."""
    copied = 0
    for kid in _children(engine, parent):
        async with engine.branch_lock(kid.bid).exclusive():
            if engine.branches.get(kid.name) is not kid:
                continue
            for coll in colls:
                if indexes_only:
                    await _pin_indexes(engine, kid, db, coll)
                else:
                    copied += await _freeze(engine, kid, db, coll)
    return copied


async def _pin_indexes(engine: Engine, kid: Branch, db: str, coll: str) -> None:
    """Before its parent changes a collection's indexes through the proxy: the list it
    shows now."""
    async def now() -> list[dict[str, Any]] | None:
        return await parent_indexes(engine, kid, db, coll)
    await _pin_list(engine, kid, engine.state(kid, db, coll), db, coll, now, None)


async def _pin_list(engine: Engine, kid: Branch, state: NsState | None, db: str, coll: str,
                    kept: Callable[[], Awaitable[list[dict[str, Any]] | None]],
                    at: Timestamp | None) -> None:
    """The child keeps the index list its parent showed before a change (`kept`): as
    its list from now on, unless its own list stands, and then as what a reset to before
    its own changes shows (Engine.rematerialize). at: when the list was read after the
    change (keep_catalog), the upstream's time after it, and the overlay, made with the
    parent's list now, is made to match."""
    if state is not None and state.index_base is None and (
            latent(kid, state) or (state.indexes is not None and not independent(state))):
        state.index_base = await kept()
        state.catalog_ct = at
        await engine.save_state(state)
        return
    if independent(state) or (state is not None and state.indexes is not None):
        return
    if not await _shown(engine, engine.layers(kid, db, coll), db, coll):
        return
    indexes = await kept()
    if indexes is None:
        return
    state = await engine.ensure_state(kid, db, coll, engine.pool)
    if at is not None:
        await _match_overlay(engine, state, indexes)
    state.indexes = indexes
    state.index_base = list(indexes)
    state.catalog_ct = at
    state.unique = None
    await engine.save_state(state)


@dataclass
class Listed:
    """A collection's index list as read from the upstream, and the upstream's time
    after the read: main's changes until then are in it."""

    indexes: list[dict[str, Any]]
    at: Timestamp | None


async def keep_catalog(engine: Engine, kids: list[Branch], db: str, coll: str,
                       entry: dict[str, Any], ct: Timestamp, listed: Listed | None) -> None:
    """Main changed a collection's indexes or options behind the proxy's back (an event
    the capture saw at `ct`, as catalogundo.undo takes it): each child that still shows
    main's keeps them as they were before, as when main changes them through the proxy
    (`_pin_indexes`, `_freeze`). An index list is read after the event (`listed`) and
    may hold main's later changes too: each is undone from what a child kept when the
    capture reaches it, while it is not later than that read (`NsState.catalog_ct`)."""
    desc = entry.get("desc") or {}
    for kid in kids:
        async with engine.branch_lock(kid.bid).exclusive():
            if engine.branches.get(kid.name) is not kid:
                continue
            state = engine.state(kid, db, coll)
            try:
                if entry["op"] == "collMod" and desc and "index" not in desc:
                    await _keep_options(engine, kid, state, db, coll, entry)
                else:
                    await _keep_indexes(engine, kid, state, db, coll, entry, ct, listed)
            except BranchError:
                # A collMod whose event does not say how it was (SecantusDB's, of an index).
                engine.break_snapshot(kid, f"{db}.{coll}: main changed it with collMod on "
                                           "the upstream, not through the proxy, and the "
                                           "change stream did not say how it was before")
            except (PyMongoError, CommandError) as exc:
                # Said, and the capture goes on: an event it cannot apply would stop it.
                engine.break_snapshot(kid, f"{db}.{coll}: main changed its indexes or "
                                           f"options on the upstream and the child could "
                                           f"not keep them as they were ({exc})")


def _later(ct: Timestamp, than: Timestamp) -> bool:
    return (ct.time, ct.inc) > (than.time, than.inc)


async def _keep_indexes(engine: Engine, kid: Branch, state: NsState | None, db: str,
                        coll: str, entry: dict[str, Any], ct: Timestamp,
                        listed: Listed | None) -> None:
    ns = f"{db}.{coll}"
    if state is not None and state.catalog_ct is not None \
            and not _later(ct, state.catalog_ct):
        # The list it keeps was read after this change: the change is undone there.
        if state.indexes is not None:
            state.indexes = undo(ns, (state.indexes, {}), [entry])[0]
            if not state.catalog:  # else its own changes made the overlay's list
                await _match_overlay(engine, state, state.indexes)
            state.unique = None
        if state.index_base is not None:
            state.index_base = undo(ns, (state.index_base, {}), [entry])[0]
        await engine.save_state(state)
        return
    if listed is None or listed.at is None:
        return  # the collection is gone since: its drop reaches the children next
    read = listed

    async def before() -> list[dict[str, Any]]:
        return undo(ns, (read.indexes, {}), [entry])[0]
    await _pin_list(engine, kid, state, db, coll, before, read.at)


async def _match_overlay(engine: Engine, state: NsState, indexes: list[dict[str, Any]]
                         ) -> None:
    """The overlay gets the indexes of the list the child keeps, and loses the others
    (it was made with main's list now): the upstream enforces a unique one in it."""
    reply = await engine.pool.reply(state.db, {"listIndexes": state.live})
    have = {ix["name"] for ix in reply["cursor"]["firstBatch"]} if reply.get("ok") else set()
    want = {ix["name"]: ix for ix in indexes}
    for name in sorted(name for name in have if name not in want and name != "_id_"):
        # One at a time: SecantusDB's dropIndexes takes no list of names.
        await engine.pool(state.db, {"dropIndexes": state.live, "index": name})
    missing = [overlay_index(ix) for name, ix in want.items() if name not in have]
    if missing:
        await engine.pool(state.db, {"createIndexes": state.live, "indexes": missing})


async def _keep_options(engine: Engine, kid: Branch, state: NsState | None, db: str,
                        coll: str, entry: dict[str, Any]) -> None:
    """The options before main's collMod, from its event (`stateBeforeChange`): a child
    showing main's keeps them, and its overlay validates its writes by them."""
    before = (entry.get("before") or {}).get("collectionOptions")
    if not isinstance(before, dict):
        raise BranchError(Kind.CONFLICT, "no options before the change")
    prior = {k: v for k, v in before.items() if k != "uuid"}
    if state is not None and (state.options_kept or independent(state)):
        return
    if state is not None and any(c.get("options") for c in state.catalog):
        # Its own collMod stands; a reset to before it shows main's as they were.
        state.options_base = prior
        state.options_kept = True
        await engine.save_state(state)
        return
    if not await _shown(engine, engine.layers(kid, db, coll), db, coll):
        return
    # A state made meanwhile holds main's options as read then, which may already be
    # these: the ones before the change replace them. Pre-images are the capture's own
    # setting, on before the fork (SecantusDB's stateBeforeChange leaves them out): as
    # they are now.
    now = await engine.base_options(db, coll) or {}
    if PRE_IMAGES in now:
        prior.setdefault(PRE_IMAGES, now[PRE_IMAGES])
    if not prior:
        # No options at all: a state without options of its own shows its parent's.
        raise CommandError(Code.INTERNAL_ERROR, "it had no options to keep")
    state = await engine.ensure_state(kid, db, coll, engine.pool)
    state.options = dict(prior)
    state.options_base = dict(prior)
    state.options_kept = True
    enforced = views.enforced([state])
    await engine.pool(db, {"collMod": state.live, "validator": enforced.get("validator", {}),
                           "validationLevel": enforced.get("validationLevel", "strict"),
                           "validationAction": enforced.get("validationAction", "error")})
    await engine.save_state(state)


async def pin_absent(engine: Engine, kid: Branch, db: str, coll: str) -> None:
    """A collection created on main after this child's fork (seen by the capture) stays
    absent in the child, unless the child has its own idea of it already."""
    state = engine.state(kid, db, coll)
    if latent(kid, state):
        assert state is not None
        async with engine.branch_lock(kid.bid).exclusive():
            if engine.branches.get(kid.name) is kid:
                # The branch created it itself: a reset to before that shows it absent.
                await _own_latent(engine, kid, state, False)
        return
    if state is not None and (state.present is not None or independent(state)):
        return
    async with engine.branch_lock(kid.bid).exclusive():
        if engine.branches.get(kid.name) is not kid:
            return
        state = await engine.ensure_state(kid, db, coll, engine.pool)
        if state.present is None:
            await engine.wal.append(kid.bid, [Change(f"{db}.{coll}", None, OWN, None, None)],
                                    SYSTEM)
            state.present = False
            state.base_dropped = True
            state.owned = True
            await engine.save_state(state)


def reads_base(engine: Engine, kid: Branch, db: str, colls: list[str] | None) -> bool:
    """Whether the child still reads these collections (None: any in the database) of
    main's base, so that main dropping them behind the proxy's back changes its view."""
    if colls is None:
        return True
    return any(not independent(engine.state(kid, db, coll)) for coll in colls)


async def before_collection_write(engine: Engine, branch: Branch | None, db: str,
                                  coll: str) -> None:
    """A write that creates a collection on a branch (None: main) changes the collection
    itself for its children: they must keep not showing it."""
    parent = MAIN if branch is None else branch.name
    state = None if branch is None else engine.state(branch, db, coll)
    if (state is not None and state.present is True) or not _children(engine, parent) \
            or (branch is None and (db, coll) in engine.main_collections):
        return
    layers = [] if branch is None else engine.layers(branch, db, coll)
    if not await _shown(engine, layers, db, coll):
        await freeze(engine, parent, db, [coll])
    if branch is None:
        engine.main_collections.add((db, coll))  # it exists once this write lands


async def _freeze(engine: Engine, kid: Branch, db: str, coll: str) -> int:
    """One collection of one child. The base is shared and never changes through the
    proxy, so the child copies only what its ancestors changed there (then it is
    `detached`); when an ancestor replaced the whole collection, it copies all of it
    (and owns it, marked by an `own` entry). The copies come first and the flag last, so
    a crash in between leaves the child reading through its parent, still exact."""
    state = engine.state(kid, db, coll)
    if latent(kid, state):
        assert state is not None
        if MERGING.get() == kid.bid:
            return await _forgo(engine, kid, state)
        return await _freeze_latent(engine, kid, state)
    if independent(state):
        return 0
    pool = engine.pool
    view = await _view_shown(engine, engine.layers(kid, db, coll), db, coll)
    if state is None:
        state = await engine.ensure_state(kid, db, coll, pool)
    if view is not None:
        # A view: the child keeps its definition (nothing to copy), as its own.
        await engine.wal.append(kid.bid, [Change(f"{db}.{coll}", None, OWN, None, None)],
                                SYSTEM)
        state.present = True
        state.base_dropped = True
        state.owned = True
        state.detached = True
        state.options = view
        await engine.save_state(state)
        return 0
    layers = engine.layers(kid, db, coll)
    above = layers[1:]
    present = await _shown(engine, layers, db, coll)
    whole = kid.parent == MAIN or any(layer.base_dropped for layer in above)
    indexes = await engine.view_indexes(kid, db, coll, pool) if present else None
    # The parent's list as at the fork: kept when the parent first changed it, else now.
    base = state.index_base if state.index_base is not None \
        else await parent_indexes(engine, kid, db, coll)
    await engine.mark_dirty(state)
    copied = 0
    if whole:
        async for batch in viewscan.view_batches(pool, db, coll, layers, {},
                                                 skip_top_live=True):
            await _keep(engine, kid, state, [(d["_id"], d) for d in batch])
            copied += len(batch)
    else:
        for layer in above:
            async for batch in pool.batches(db, {"find": layer.hidden}):
                ids = [d["_id"] for d in batch]
                owned = await owned_ids(engine, state, ids)
                fresh = [i for i in ids if idkey(i) not in owned]
                for start in range(0, len(fresh), CHUNK):
                    chunk = fresh[start:start + CHUNK]
                    docs = {idkey(d["_id"]): d async for part in viewscan.view_batches(
                        pool, db, coll, layers, {"_id": {"$in": chunk}}) for d in part}
                    await _keep(engine, kid, state, [(i, docs.get(idkey(i))) for i in chunk])
                    copied += len(chunk)
    if state.indexes is None and indexes is not None:
        state.indexes = indexes
    state.index_base = base
    if state.present is None:
        state.present = present
    if state.present_base is None:
        # What a reset to before the branch's own drop or create shows.
        state.present_base = present
    if whole:
        shown = await parent_options(engine, kid, db, coll)
        if not state.options:  # else the branch's own collMod made them
            state.options = dict(shown)
        if state.options_base is None:
            # What a reset to before the branch's own collMod gives back.
            state.options_base = shown
        await engine.wal.append(kid.bid, [Change(f"{db}.{coll}", None, OWN, None, None)],
                                SYSTEM)
        state.base_dropped = True
        state.owned = True
    else:
        # The options it showed (an ancestor's collMod, else the base's) stay the
        # child's once it reads no more of its ancestors.
        if not state.options:
            state.options = dict(views.options_of(above)) or (
                (await engine.base_options(db, coll) or {}) if present else {})
            state.options_base = dict(state.options)
        state.detached = True
    await engine.save_state(state)
    return copied


async def parent_indexes(engine: Engine, kid: Branch, db: str, coll: str,
                          present: bool | None = None) -> list[dict[str, Any]] | None:
    """The index list the branch's parent shows for a collection (None: absent).
    present: whether the parent shows it, when the caller knows."""
    parent = engine.branches.get(kid.parent)
    layers = [] if parent is None else engine.layers(parent, db, coll)
    if present is None:
        present = await _shown(engine, layers, db, coll)
    if not present:
        return None
    if parent is None:
        reply = await engine.pool.reply(db, {"listIndexes": coll})
        return list(reply["cursor"]["firstBatch"]) if reply.get("ok") else None
    return await engine.view_indexes(parent, db, coll, engine.pool)


async def parent_options(engine: Engine, kid: Branch, db: str, coll: str,
                          shown: tuple[bool, dict[str, Any] | None] | None = None
                          ) -> dict[str, Any]:
    """The options the branch's parent shows for a collection: a view's definition, the
    options an ancestor set or made it with, else the base's ({}: absent).
    shown: whether the parent shows it and its view definition, when the caller read
    them already."""
    parent = engine.branches.get(kid.parent)
    layers = [] if parent is None else engine.layers(parent, db, coll)
    if shown is None:
        present = await _shown(engine, layers, db, coll)
        shown = (present, await _view_shown(engine, layers, db, coll) if present else None)
    present, view = shown
    if not present:
        return {}
    if view is not None:
        return dict(view)
    for layer in layers:
        if layer.options or layer.base_dropped:
            return dict(layer.options)
    return await engine.base_options(db, coll) or {}


async def _freeze_latent(engine: Engine, kid: Branch, state: NsState) -> int:
    """A latent state (see latent) before its parent changes the collection itself:
    the branch keeps the parent's whole view in its WAL, then holds it whole (`own`),
    with the parent's indexes, options and presence as what a reset to before its drop
    gives back."""
    db, coll = state.db, state.coll
    parent = engine.branches.get(kid.parent)
    layers = [] if parent is None else engine.layers(parent, db, coll)
    present = await _shown(engine, layers, db, coll)
    view = await _view_shown(engine, layers, db, coll)
    copied = 0
    if present and view is None:
        through = await written_through(engine, kid, f"{db}.{coll}")
        async for batch in viewscan.view_batches(engine.pool, db, coll, layers, {}):
            copied += await _keep_latent(engine, kid, state, [(d["_id"], d) for d in batch],
                                         through=through)
        if state.index_base is None:  # else kept when the parent changed it first
            state.index_base = await parent_indexes(engine, kid, db, coll, present)
    if state.options_base is None:
        state.options_base = await parent_options(engine, kid, db, coll, (present, view))
    await _own_latent(engine, kid, state, present)
    return copied


async def _own_latent(engine: Engine, kid: Branch, state: NsState, present: bool) -> None:
    """The branch holds a latent state's collection whole from now on, as its parent
    shows it now (present or not), whatever a reset voids."""
    await engine.wal.append(kid.bid, [Change(f"{state.db}.{state.coll}", None, OWN, None,
                                             None, {LATENT: True})], SYSTEM)
    state.owned = True
    state.present_base = present
    await engine.save_state(state)


@dataclass
class FirstWrite:
    """What a branch's first write to a collection learnt of the parent's."""

    # The base collection's options, when they were read (the overlay made next needs
    # them too).
    base: dict[str, Any] | None = None
    # The parent view shows no collection of that name: the write creates it.
    absent: bool = False


async def first_write(engine: Engine, branch: Branch, db: str, coll: str) -> FirstWrite:
    """Before a branch's first write to a collection: whether its parent shows the
    collection at all, and if it is capped, the branch takes it whole.

    Capped, held whole by one upstream collection (the base, or an ancestor's own copy):
    the branch takes it in a capped overlay of the same limits, its documents copied in
    their natural (insertion) order as `keep` entries, so that the upstream keeps the
    capped order, evicts the oldest documents past the limits, and tails it. An overlay
    beside a capped collection could do none of it. The copies come first and the `own`
    entry last: a crash in between leaves the branch reading through an overlay holding
    copies of what it shows, still exact.

    Absent is told only where it costs no extra round trip: the base read for its
    options anyway, or an ancestor's state that says so."""
    if branch.mode == "copy":
        return FirstWrite()
    layers = engine.layers(branch, db, coll)
    if not layers:
        options = await engine.base_options(db, coll)
        if options is None:
            return FirstWrite(absent=True)
        source = coll
    elif len(layers) == 1 and layers[0].base_dropped and layers[0].present:
        source, options = layers[0].live, dict(layers[0].options)
    else:
        decided = next((layer.present for layer in layers if layer.present is not None),
                       None)
        return FirstWrite(absent=decided is False)
    if not options.get("capped"):
        return FirstWrite(base=None if layers else options)
    state = await engine.ensure_state(branch, db, coll, engine.pool, whole=options)
    await engine.mark_dirty(state)
    async for batch in engine.pool.batches(db, {"find": source, "sort": {"$natural": 1}}):
        await _keep(engine, branch, state, [(d["_id"], d) for d in batch])
    await own(engine, branch, state)
    return FirstWrite()


async def own(engine: Engine, branch: Branch, state: NsState,
              client: dict[str, Any] = SYSTEM) -> None:
    """The branch holds the collection whole from now on, its parent no longer showing
    through: the `own` entry tells a rebuild from the WAL so (Engine.rematerialize).
    client: whose write made it so (the proxy's own work by default)."""
    await engine.wal.append(branch.bid, [Change(f"{state.db}.{state.coll}", None, OWN,
                                                None, None)], client)
    state.base_dropped = True
    state.owned = True
    state.present = True
    await engine.save_state(state)


async def _view_shown(engine: Engine, layers: list[NsState], db: str,
                      coll: str) -> dict[str, Any] | None:
    """The view definition this name has in the view of these layers (None: not a view)."""
    decided, view = views.shown_view(layers)
    if decided:
        return view
    if not await engine.pool.has(db, coll):
        return None  # a name new to main, which its children pin absent
    reply = await engine.pool(db, {"listCollections": 1, "filter": {"name": coll}})
    batch = reply["cursor"]["firstBatch"]
    if batch and batch[0].get("type") == "view":
        return dict(batch[0].get("options") or {})
    return None


async def _shown(engine: Engine, layers: list[NsState], db: str, coll: str) -> bool:
    """Whether the collection exists in this view (the nearest layer that says decides)."""
    for layer in layers:
        if layer.present is not None:
            return layer.present
    return await engine.pool.has(db, coll)


async def _insert(engine: Engine, db: str, coll: str, docs: list[dict[str, Any]],
                  bypass: bool = False) -> None:
    """Insert into an overlay; an id already there (a retried copy-up) is no error. In
    groups under the BSON limit: images may be up to 16 MiB each."""
    for group in fitted(docs):
        cmd: dict[str, Any] = {"insert": coll, "documents": group, "ordered": False}
        if bypass:
            cmd["bypassDocumentValidation"] = True
        reply = await engine.pool(db, cmd)
        bad = [e for e in reply.get("writeErrors", []) if e.get("code") != Code.DUPLICATE_KEY]
        if bad:
            raise BranchError(Kind.INTERNAL,
                              f"cannot preserve documents in {db}.{coll}: {bad[0]}")


async def owned_ids(engine: Engine, state: NsState | None, ids: list[Any]) -> set[Any]:
    """idkeys of the ids a branch's overlay already holds (hides from its parent)."""
    if state is None:
        return set()
    known = [state.hides(i) for i in ids]
    if all(k is not None for k in known):
        return {idkey(i) for i, k in zip(ids, known, strict=True) if k}
    found: set[Any] = set()
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        async for batch in engine.pool.batches(state.db, {
                "find": state.hidden, "filter": {"_id": {"$in": chunk}},
                "projection": {"_id": 1}}):
            found.update(idkey(d["_id"]) for d in batch)
    return found
