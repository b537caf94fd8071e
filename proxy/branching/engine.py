"""The branch engine: registry, per-namespace overlay state, recovery and the WAL."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any, Protocol

from bson.int64 import Int64
from pymongo import AsyncMongoClient, ReplaceOne
from pymongo.errors import CollectionInvalid, DuplicateKeyError

from proxy.branching import naming, snapshot, views
from proxy.branching.capture import Capture
from proxy.branching.capture import register as capture_register
from proxy.branching.cursormerge import CursorTable
from proxy.branching.errors import BranchError, Kind
from proxy.branching.failpoints import FailPoints
from proxy.branching.lifecycle import Lifecycle
from proxy.branching.locks import BranchLock
from proxy.branching.model import (
    HIDDEN_CACHE_LIMIT,
    ID_INDEX,
    ISOLATION,
    SNAPSHOT,
    Branch,
    NsState,
    overlay_index,
)
from proxy.branching.runner import SESSION, Runner, error_from, outside_transaction, pooled
from proxy.branching.snapshot import Fence
from proxy.branching.txn import CURRENT, Transactions
from proxy.branching.wal import (
    CATALOG,
    CREATE,
    DOCUMENT,
    HOLDS,
    KEEP,
    OWN,
    RESETS,
    STARTS,
    WRITES,
    Change,
    Wal,
    image,
    matching,
)
from proxy.config import Config
from proxy.net.router import Context
from proxy.wire.codes import Code

log = logging.getLogger("mongobranch.engine")

MAIN = naming.MAIN
# Replies kept for retried writes; drivers retry once, immediately.
RETRY_MEMORY = 10_000
# Seconds an overlay stays unchanged before its dirty marker is cleared (_flush_dirty).
DIRTY_REST = 3.0


class Ports(Protocol):
    """Opens and closes branch listeners; implemented by the serving layer."""

    async def open(self, branch: Branch) -> None: ...

    async def close(self, branch: Branch) -> None: ...


class Copier(Protocol):
    """Copies a branch's data whole (copy mode, copymode.py, which sits above the engine);
    set by the serving layer."""

    async def materialize(self, engine: Engine, branch: Branch,
                          progress: Callable[[str, int, int], None] | None = None) -> int: ...

    async def migrate(self, engine: Engine, name: str, to: Any) -> dict[str, Any]: ...


# Runs a write command on a branch (None: main) through that branch's own write path, as
# a client's write would run there, so its WAL records it: how a merge writes into the
# parent. Set by the command layer (router.py), which the engine does not import.
WritePath = Callable[["Engine", Branch | None, Context, Runner, str, dict[str, Any]],
                  Awaitable[dict[str, Any] | None]]


class Engine:
    def __init__(self, client: AsyncMongoClient[dict[str, Any]], meta_db: str,
                 port_range: tuple[int, int], host: str = "127.0.0.1"):
        self.client = client
        self.meta = client[meta_db]
        self.meta_db = meta_db
        self.port_range = port_range
        self.host = host
        self.wal = Wal(client, meta_db)
        self.pool = pooled(client)
        self.branches: dict[str, Branch] = {}
        self.states: dict[str, NsState] = {}
        self.ports: Ports | None = None
        self.cursors = CursorTable()
        self.config = Config()
        # Branches being converted between modes: their ports answer with retryable errors.
        self.migrating: set[str] = set()
        # Copy branches being created: name -> {"done", "total", "ns"}.
        self.progress: dict[str, dict[str, Any]] = {}
        # Why branching is unavailable (None once start() succeeded, when ready is set).
        self.unavailable: str | None = "branch engine is starting"
        self.ready = asyncio.Event()
        self._locks: dict[str, BranchLock] = {}
        self._fences: dict[str, Fence] = {}
        # Set by the serving layer: the main port's listener forgets which command names it
        # forwards unchanged (the writes main's children must see) and waits for those in
        # flight (the wire layer's hook).
        self.reroute: Callable[[], Awaitable[None]] | None = None
        # Set by the serving layer: the layers above the engine it calls back into.
        self.copier: Copier | None = None
        self.writer: WritePath | None = None
        # Children of main being created: main's writes are intercepted from the start.
        self._main_forks = 0
        # Collections known to exist on main (so a main-port write need not ask whether
        # it creates one); emptied by every collection-level change made through it.
        self.main_collections: set[tuple[str, str]] = set()
        # Overlays whose dirty marker is set, and when each was last marked (monotonic).
        self._dirty: dict[str, float] = {}
        self._retries: OrderedDict[tuple[Any, Any, Any], dict[str, Any]] = OrderedDict()
        # Attempts of a retryable write under way (retrying): its lock and how many wait.
        self._attempts: dict[tuple[Any, Any], tuple[asyncio.Lock, list[int]]] = {}
        self._flusher: asyncio.Task[None] | None = None
        # Main's changes from the upstream's change stream (capture.py); the serving
        # layer may set capture_options (None: no capture) before start().
        self.capture_options: dict[str, Any] | None = {}
        self.capture: Capture | None = None
        self.lifecycle = Lifecycle()
        # Clients' multi-document transactions on branch ports (txn.py).
        self.txns = Transactions(self)
        # Set by the serving layer under scale-out: which process serves the branches
        # (describe() shows it).
        self.owner: Callable[[], dict[str, Any] | None] | None = None
        # The upstream's failCommand failpoints set through the proxy (failpoints.py).
        self.failpoints = FailPoints()

    # -- start-up -------------------------------------------------------------------
    async def start(self) -> None:
        # Before any write to the metadata database: other proxies' captures skip it.
        await capture_register(self.client, self.meta_db)
        await self.wal.init()
        # Written inside clients' transactions (txn.py), so never created by one: a
        # collection a transaction creates keeps every other writer out until it ends.
        if not await self.meta.list_collection_names(filter={"name": "namespaces"}):
            with contextlib.suppress(CollectionInvalid):
                await self.meta.create_collection("namespaces")
        async for doc in self.meta["branches"].find():
            branch = Branch.from_doc(doc)
            self.branches[branch.name] = branch
        async for doc in self.meta["namespaces"].find():
            state = NsState.from_doc(doc)
            self.states[state.key] = state
        for branch in [b for b in self.branches.values() if b.creating]:
            log.warning("dropping copy branch %s: its copy was cut off before the branch "
                        "was created", branch.name)
            await self._forget(branch)
        dirty = [doc["_id"] async for doc in self.meta["dirty"].find()]
        stale = [self.states[key] for key in dirty if key in self.states]
        for state in stale:
            log.warning("rematerializing %s from the WAL after an unclean stop", state.key)
        # Each overlay rebuilds server-side in one fold; collections rebuild in parallel.
        await asyncio.gather(*(self.rematerialize(state) for state in stale))
        await self.meta["dirty"].delete_many({"_id": {"$in": dirty}})
        for state in self.states.values():
            await self.load_hidden(state)
        for doc in reversed(await self.wal.recent_replies(RETRY_MEMORY)):
            self.remember(doc["txn"], doc["reply"])
        self.unavailable = None
        self.ready.set()
        for branch in [b for b in self.branches.values() if b.migrating]:
            log.warning("finishing the migration of %s to %s mode", branch.name,
                        branch.migrating)
            await self.copy().migrate(self, branch.name, branch.migrating)
        self._flusher = asyncio.create_task(self._flush_dirty())
        if self.capture_options is not None:
            capture = Capture(self, **self.capture_options)
            if await capture.start():
                self.capture = capture
        else:
            log.warning("capture of main's changes is off (--no-capture): writes that reach "
                        "the upstream without the proxy show through in branches")
        if self.intercepting_main() and self.reroute is not None:
            # The main port may have served (and remembered as pass-through) writes
            # before main's children were known.
            if self.capture is None:
                log.warning("main has child branches: main-port writes are intercepted; "
                            "writes made while the engine was starting were not preserved "
                            "for them")
            await self.reroute()

    async def stop(self) -> None:
        if self.capture is not None:
            await self.capture.stop()
        if self._flusher:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        for key in list(self._dirty):
            await self.meta["dirty"].delete_one({"_id": key})
        self._dirty.clear()

    def copy(self) -> Copier:
        if self.copier is None:
            raise RuntimeError("the serving layer sets the engine's copier before start()")
        return self.copier

    async def write(self, branch: Branch | None, ctx: Context, run: Runner, db: str,
                    cmd: dict[str, Any]) -> dict[str, Any] | None:
        """A write run through a branch's (None: main's) own write path (see WritePath)."""
        if self.writer is None:
            raise RuntimeError("the serving layer sets the engine's writer before start()")
        return await self.writer(self, branch, ctx, run, db, cmd)

    async def load_hidden(self, state: NsState) -> None:
        state.hidden_ids = {}
        coll = self.client[state.db][state.hidden]
        async for doc in coll.find({}, {"_id": 1}).limit(HIDDEN_CACHE_LIMIT + 1):
            state.hide([doc["_id"]])
            if state.hidden_ids is None:
                break

    # -- branches ---------------------------------------------------------------------
    def check_ready(self) -> None:
        if self.unavailable is not None:
            raise BranchError(Kind.UNAVAILABLE, self.unavailable)

    def get(self, name: str) -> Branch:
        self.check_ready()
        branch = self.branches.get(name)
        if branch is None:
            raise BranchError(Kind.NOT_FOUND, f"branch {name!r} does not exist")
        if branch.deleted_at is not None:  # kept for restore only (lifecycle.py)
            raise BranchError(Kind.NOT_FOUND,
                              f"branch {name!r} was deleted; `branch restore {name}` "
                              "brings it back")
        return branch

    def by_bid(self, bid: str) -> Branch | None:
        return next((b for b in self.branches.values() if b.bid == bid), None)

    def chain(self, branch: Branch) -> list[Branch]:
        """The branch and its ancestors, nearest first, main excluded."""
        out = []
        current: Branch | None = branch
        while current is not None:
            out.append(current)
            current = self.branches.get(current.parent) if current.parent != MAIN else None
        return out

    def children(self, name: str, *, deleted: bool = False) -> list[str]:
        """Its child branches; with deleted, also those kept for restore (lifecycle.py)."""
        return sorted(b.name for b in self.branches.values()
                      if b.parent == name and (deleted or b.deleted_at is None))

    def _free_port(self, skip: set[int] | None = None) -> int:
        used = {b.port for b in self.branches.values()} | (skip or set())
        for port in range(self.port_range[0], self.port_range[1] + 1):
            if port not in used:
                return port
        raise BranchError(Kind.CONFLICT,
                          f"no free port left in {self.port_range[0]}-{self.port_range[1]}")

    async def create_branch(self, name: str, parent: str = MAIN, port: int | None = None,
                            mode: str | None = None, progress: Any = None,
                            then: Callable[[Branch], Awaitable[None]] | None = None,
                            masked: bool = False) -> Branch:
        """A metadata insert and a listener; a copy branch first copies its parent's data,
        so no client ever sees it half-copied. Without a mode, the feature flags choose.
        `then` finishes the branch's data before its port opens, while its parent's writes
        still wait (a branch at a past point restores its images there).

        The name, port and mode are valid (requests.parse_create checks what a client
        sends); what is checked here is what depends on the branches there are."""
        self.check_ready()
        mode, why = self.config.mode_for(name, mode)
        if mode == "wal" and not self.config.allow_wal.value:
            raise BranchError(Kind.FORBIDDEN,
                              f"WAL branches are disabled (allow_wal=false, from "
                              f"{self.config.allow_wal.source}); the mode came from "
                              f"{why}: create it with mode \"copy\"")
        if parent != MAIN and (parent not in self.branches
                               or self.branches[parent].deleted_at is not None):
            raise BranchError(Kind.NOT_FOUND, f"parent branch {parent!r} does not exist")
        if name in self.branches:
            if self.branches[name].deleted_at is not None:
                raise BranchError(Kind.CONFLICT,
                                  f"branch {name!r} was deleted and is kept for restore: "
                                  f"restore it, or purge it first (`branch delete {name} "
                                  f"--purge`, DELETE /branches/{name}?purge=true)")
            raise BranchError(Kind.CONFLICT, f"branch {name!r} already exists")
        auto = port is None
        if port is None:
            port = self._free_port()
        elif any(b.port == port for b in self.branches.values()):
            raise BranchError(Kind.CONFLICT, f"port {port} is already used by another branch")
        if parent == MAIN:
            self._main_forks += 1
        try:
            if parent == MAIN and self.reroute is not None:
                # From now on the main port intercepts writes; those it forwarded unchanged
                # before land first.
                await self.reroute()
            # The parent's writes wait while the branch forks (and, in copy mode, copies):
            # it starts from a state no write is half-way through.
            async with self.reading(self.chain(self.branches[parent]) if parent != MAIN
                                    else []):
                if parent != MAIN and self.txns.holding(self.branches[parent].bid):
                    # Its writes are not preserved for children: a child forked now would
                    # see them appear at the commit.
                    raise BranchError(Kind.CONFLICT,
                                      f"branch {parent!r} has a multi-document transaction "
                                      "in progress; retry once it commits or aborts")
                # A child of a masked branch is masked too (with a salt of its own): it
                # must not become a way to read what its parent hides.
                masked = masked or (parent != MAIN and self.branches[parent].masked)
                branch = await self._fork(name, parent, port, mode, progress, masked)
                if then is not None:
                    try:
                        await then(branch)
                    except Exception:
                        await self._forget(branch)
                        raise
        finally:
            if parent == MAIN:
                self._main_forks -= 1
        if self.ports is not None:
            busy: set[int] = set()
            while True:
                try:
                    await self.ports.open(branch)
                    break
                except OSError as exc:
                    busy.add(branch.port)
                    error = BranchError(Kind.CONFLICT,
                                        f"port {branch.port} cannot be opened: {exc}")
                try:
                    if not auto:
                        raise error
                    # An auto-assigned port held by another socket: take the next free one.
                    branch.port = self._free_port(busy)
                except BranchError:
                    await self._forget(branch)
                    raise
                await self.meta["branches"].update_one({"_id": name},
                                                       {"$set": {"port": branch.port}})
        log.info("created branch %s (parent %s, port %d)", name, parent, branch.port)
        if self.isolation(branch) != SNAPSHOT:
            log.warning("branch %s: isolation %s: writes that reach the upstream without the "
                        "proxy show through in it (%s)", name, ISOLATION,
                        self.capture.why if self.capture else "capture is off")
        return branch

    def isolation(self, branch: Branch) -> str:
        """"snapshot" while every write to main, however made, is preserved for it."""
        if self.capture is None or not self.capture.exact:
            return ISOLATION
        return ISOLATION if any(b.breaks for b in self.chain(branch)) else SNAPSHOT

    def break_snapshot(self, branch: Branch, why: str) -> None:
        """The branch can no longer show its parent exactly as at its fork: it says so
        (`isolationBreaks`), once per cause, and the proxy logs it."""
        if why not in branch.breaks:
            branch.breaks.append(why)
            log.warning("branch %s is no longer an exact snapshot: %s", branch.name, why)
            asyncio.get_running_loop().create_task(self.save_branch(branch))

    def public(self, branch: Branch) -> dict[str, Any]:
        return branch.public(self.host, self.isolation(branch))

    async def _fork(self, name: str, parent: str, port: int, mode: str,
                    progress: Any, masked: bool = False) -> Branch:
        """The branch's metadata, and in copy mode its copy of the parent's data."""
        fork_ct = None
        if parent == MAIN and self.capture is not None and self.capture.running:
            if self.capture.pre_images:
                await self.capture.enable_pre_images()
            fork_ct = await self.capture.clock()
        branch = Branch(
            name=name, bid=secrets.token_hex(4), parent=parent, fork_ct=fork_ct,
            fork_lsn=await self.wal.current(),
            created_at=dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0), port=port,
            mode=mode, creating=mode == "copy", masked=masked,
            mask_salt=secrets.token_hex(16) if masked else None,
        )
        try:
            await self.meta["branches"].insert_one(branch.to_doc())
        except DuplicateKeyError as exc:
            raise BranchError(Kind.CONFLICT, f"branch {name!r} already exists") from exc
        self.branches[name] = branch
        if mode == "copy":
            def report(ns: str, done: int, total: int) -> None:
                self.progress[name] = {"ns": ns, "done": done, "total": total}

            self.progress[name] = {"ns": "", "done": 0, "total": None}
            try:
                await self.copy().materialize(self, branch, progress or report)
            except Exception:
                try:
                    await self._forget(branch)
                except Exception:
                    # Its metadata still says "creating": the next start removes the rest.
                    log.exception("could not remove copy branch %s after its copy failed",
                                  name)
                    self.branches.pop(name, None)
                raise
            finally:
                self.progress.pop(name, None)
            branch.creating = False
            await self.save_branch(branch)
        return branch

    async def _forget(self, branch: Branch) -> None:
        """Remove a branch's overlays, scratch `from` copies left behind, WAL entries and
        metadata."""
        prefix = naming.scratch_from_prefix(branch.bid)
        for name in sorted({s.db for s in self.states.values() if s.bid == branch.bid}):
            left = await self.client[name].list_collection_names(
                filter={"name": {"$regex": f"^{prefix}"}})
            for coll in left:
                await self.client[name].drop_collection(coll)
        for state in [s for s in self.states.values() if s.bid == branch.bid]:
            db = self.client[state.db]
            await db.drop_collection(state.live)
            await db.drop_collection(state.hidden)
            await self.meta["namespaces"].delete_one({"_id": state.key})
            del self.states[state.key]
        await self.wal.delete_branch(branch.bid)
        await self.meta["resets"].delete_many({"b": branch.bid})
        await self.meta["branches"].delete_one({"_id": branch.name})
        self.branches.pop(branch.name, None)
        views.forget_base_views(branch.bid)

    async def drop_branch(self, name: str) -> None:
        branch = self.get(name)
        kids = self.children(name, deleted=True)
        if kids:
            raise BranchError(Kind.CONFLICT,
                              f"branch {name!r} has child branches: {', '.join(kids)}")
        # Close the port before taking the write lock: a write still in flight there
        # finishes (it needs the lock) instead of stalling the drop.
        if self.ports is not None:
            await self.ports.close(branch)
        # Its clients cannot commit any more: their transactions would hold its lock.
        await self.txns.abort_branch(branch)
        async with self.writing(branch):
            await self._forget(branch)
        self._locks.pop(branch.bid, None)
        log.info("dropped branch %s", name)

    async def describe(self, name: str) -> dict[str, Any]:
        branch = self.get(name)
        info = self.public(branch)
        namespaces = {}
        for state in self.states.values():
            if state.bid != branch.bid:
                continue
            db = self.client[state.db]
            changed, kept, replaced = await self._touched(branch, state)
            namespaces[f"{state.db}.{state.coll}"] = {
                "changed": changed,
                # Documents held only to keep the parent as it was at the fork.
                "kept": kept,
                "live": await db[state.live].count_documents({}),
                # The branch dropped or replaced (create, $out, rename) what its parent
                # had: not a collection it first wrote to or holds whole (`own`).
                "dropped": replaced,
            }
        info["namespaces"] = namespaces
        info["children"] = self.children(name)
        if self.owner is not None:
            info["owner"] = self.owner()
        return info

    async def _touched(self, branch: Branch, state: NsState) -> tuple[int, int, bool]:
        """The ids the branch changed in a collection, those whose only WAL entries are
        copy-ups of the parent (keep): held by its overlay, but not changes of its own,
        and whether the overlay last started over with a drop or a create. Counted from
        the WAL entries since it did, as rematerialization folds them, not from the
        hidden set: a collection the branch owns whole hides nothing
        (`overlay.Writer.hide`)."""
        match: dict[str, Any] = {"b": branch.bid, "ns": f"{state.db}.{state.coll}",
                                 **branch.visible()}
        marker = await self.wal.first({**match, "op": {"$in": list(STARTS)}}, newest=True)
        replaced = marker is not None and marker["op"] in RESETS
        if marker is not None:
            match["_id"] = {"$gt": marker["_id"]}
        # Kept since a drop or create of its own: not held (snapshot.latent).
        match["op"] = {"$in": list(WRITES if replaced else DOCUMENT)}
        reply = await self.pool(self.meta_db, {"aggregate": "wal", "allowDiskUse": True,
                                               "cursor": {}, "pipeline": [
            *matching(match),
            {"$group": {"_id": "$id", "own": {"$max": {"$cond": [
                {"$eq": ["$op", KEEP]}, 0, 1]}}}},
            {"$group": {"_id": "$own", "n": {"$sum": 1}}}]})
        counts = {d["_id"]: int(d["n"]) for d in reply["cursor"]["firstBatch"]}
        return counts.get(1, 0), counts.get(0, 0), replaced

    # -- namespaces ---------------------------------------------------------------------
    def state(self, branch: Branch, db: str, coll: str) -> NsState | None:
        return self.states.get(f"{branch.bid}:{db}.{coll}")

    def layers(self, branch: Branch, db: str, coll: str) -> list[NsState]:
        """The states of this collection along the ancestry chain, nearest first."""
        out = []
        for b in self.chain(branch):
            state = self.states.get(f"{b.bid}:{db}.{coll}")
            if state is not None:
                out.append(state)
                if state.detached:
                    break  # nothing above shows through (snapshot.freeze)
        if SESSION.get() is not None:
            # In a transaction the hidden sets are read in its snapshot, on the server:
            # the caches hold what was committed since (txn.py).
            out = [copy.copy(state) for state in out]
            for state in out:
                state.hidden_ids = None
        return out

    async def ensure_state(self, branch: Branch, db: str, coll: str, run: Runner, *,
                           whole: dict[str, Any] | None = None,
                           fresh: dict[str, Any] | None = None,
                           base: dict[str, Any] | None = None) -> NsState:
        """The branch's overlay for a collection, created with the view's indexes.

        whole: the options of a capped collection the branch takes whole
        (`snapshot.first_write`): its overlay is created capped with them.
        fresh: the options of a collection the branch creates and had none of (ddl's
        create, txnddl's, a write's implicit one): it is the branch's own from the
        start, created with them, and nothing of the parent shows through it. Its state
        is not saved here: each caller saves it once it has made it what it is (owned,
        present), one write of the namespace state where two would say the same. A crash
        before that leaves an overlay no state names, which the next attempt drops and
        makes again (`_new_overlay`), and a dirty marker start-up ignores.
        base: the base collection's options, when the caller has just read them."""
        state = self.state(branch, db, coll)
        if state is not None:
            return state
        # A copy branch never reads through to its parent, even for new collections.
        state = NsState(branch.bid, db, coll, base_dropped=branch.mode == "copy")
        if fresh is not None:
            state.base_dropped, state.options = True, dict(fresh)
            state.indexes = [dict(ID_INDEX)]
            await self._new_overlay(state, run)
            return self._added_unsaved(state)
        indexes = await self.view_indexes(branch, db, coll, run)
        layers = self.layers(branch, db, coll)
        if whole is not None:
            state.options, state.options_base = dict(whole), dict(whole)
            await self._create_overlay(state, indexes, run, {
                **views.enforced([state]), **capped_options(whole)})
            return await self._added(state)
        if not state.base_dropped and not views.options_of(layers) \
                and not any(layer.base_dropped for layer in layers):
            # The base collection's own validation: the branch's writes meet it too.
            options = (await self.base_options(db, coll) or {}) if base is None else base
            if views.enforced([NsState(branch.bid, db, coll, options=options)]):
                state.options, state.options_base = options, dict(options)
        await self._create_overlay(state, indexes, run, views.enforced([state, *layers]))
        return await self._added(state)

    async def _added(self, state: NsState) -> NsState:
        await self.save_state(state)
        return self._added_unsaved(state)

    def _added_unsaved(self, state: NsState) -> NsState:
        self.states[state.key] = state
        self.txns.created(state)
        return state

    async def base_options(self, db: str, coll: str) -> dict[str, Any] | None:
        """The base collection's options (validator, capped, ...); {} for none or a view,
        None when the base has no such name."""
        # Outside a transaction: mongod runs no listCollections in one, and the base's
        # options are the same in and out of it.
        with outside_transaction():
            if not await self.pool.has(db, coll):
                return None
            reply = await self.pool(db, {"listCollections": 1, "filter": {"name": coll}})
        batch = reply["cursor"]["firstBatch"]
        if not batch:
            return None
        if batch[0].get("type", "collection") != "collection":
            return {}
        return dict(batch[0].get("options") or {})

    @staticmethod
    async def _overlay_left(state: NsState, run: Runner) -> list[str]:
        """The state's overlay collections already on the upstream (an earlier run made
        them before the state was saved), asked outside any transaction: mongod lists no
        collections in one."""
        with outside_transaction():
            reply = await run.reply(state.db, {"listCollections": 1, "nameOnly": True,
                                               "filter": {"name": {"$in": [
                                                   state.live, state.hidden]}}})
        return [info["name"] for info in reply["cursor"]["firstBatch"]] \
            if reply.get("ok") else []

    async def _new_overlay(self, state: NsState, run: Runner) -> None:
        """A fresh overlay with the state's options, which the upstream judges: its
        refusal is the client's. Collections a crash left before their state was saved
        (no state names them, and the caller holds the branch's lock) are dropped and
        made again; in a transaction, where a create of an existing one would abort it,
        they are looked for first and dropped outside it."""
        names = {state.live: {"create": state.live, **state.options},
                 state.hidden: {"create": state.hidden}}
        if SESSION.get() is not None:
            for name in await self._overlay_left(state, run):
                with outside_transaction():
                    await self.pool.reply(state.db, {"drop": name})
        # Both in one round trip where the connection pipelines; one refused (the
        # client's options) takes back the other, so no overlay is left half made.
        creates = list(names.values())
        replies = await run.replies(state.db, creates)
        for i, (name, reply) in enumerate(zip(names, replies, strict=True)):
            if reply.get("code") == Code.NAMESPACE_EXISTS and SESSION.get() is None:
                await run(state.db, {"drop": name})
                replies[i] = await run.reply(state.db, creates[i])
        await run.all_made(state.db, creates, replies)

    async def _create_overlay(self, state: NsState, indexes: list[dict[str, Any]],
                              run: Runner, enforced: dict[str, Any] | None = None) -> None:
        """The overlay's collections, with the view's indexes and the validation the
        branch (or an ancestor) set with collMod (`enforced`), so that the upstream
        validates the branch's writes."""
        if SESSION.get() is not None and await self._overlay_left(state, run):
            # In a transaction an error aborts it, NamespaceExists too: create only what
            # is not there (an overlay left by an earlier run is complete).
            return
        for name in (state.live, state.hidden):
            # The validation goes in with the live collection's creation: no collMod
            # (which a client may not be allowed, and no transaction may run).
            create = {"create": name, **(enforced or {})} if name == state.live \
                else {"create": name}
            reply = await run.reply(state.db, create)
            if reply.get("code") == 13:
                raise error_from(reply)  # the caller may not write here: mongod's refusal
            if not reply.get("ok") and reply.get("code") != 48:
                raise BranchError(Kind.INTERNAL, f"cannot create overlay {state.db}.{name}: "
                                                 f"{reply.get('errmsg')}")
        specs = [overlay_index(ix) for ix in indexes if ix.get("name") != "_id_"]
        if specs:
            await run(state.db, {"createIndexes": state.live, "indexes": specs})

    async def view_indexes(self, branch: Branch, db: str, coll: str,
                           run: Runner) -> list[dict[str, Any]]:
        """The index list the branch shows for a collection."""
        for layer in self.layers(branch, db, coll):
            if layer.indexes is not None:
                return list(layer.indexes)
            if layer.base_dropped:
                return [dict(ID_INDEX)]
        # Outside a transaction: mongod runs no listIndexes in one, and a branch's indexes
        # do not change inside one (DDL is refused there).
        with outside_transaction():
            reply = await run.reply(db, {"listIndexes": coll})
        if not reply.get("ok"):
            # Not in the base: a collection the branch creates starts with _id only.
            return [dict(ID_INDEX)]
        return list(reply["cursor"]["firstBatch"])

    async def save_branch(self, branch: Branch) -> None:
        await self.meta["branches"].replace_one({"_id": branch.name}, branch.to_doc())

    async def log_catalog(self, branch: Branch, state: NsState, command: str,
                          client: dict[str, Any]) -> None:
        """Log the branch's own change of a collection's indexes or options (an entry
        named for its command, wal.CATALOG) and note what it left."""
        assert command in CATALOG
        lsn = await self.log_changes(branch, [Change(f"{state.db}.{state.coll}", None,
                                                     command, None, None)], client,
                                     preserve=False)
        self.note_catalog(state, lsn)

    @staticmethod
    def note_catalog(state: NsState, lsn: int) -> None:
        """Record the branch's own change of a collection's indexes or options as it
        left them (saved with the state next), at the LSN of the entry that logged it:
        a reset to before it gives back the list in effect then."""
        state.catalog.append({"lsn": Int64(lsn), "indexes": state.indexes,
                              "options": dict(state.options), "whole": state.base_dropped})

    @staticmethod
    def restore_catalog(state: NsState, voids: list[list[int]], upto: int | None) -> None:
        """The indexes and options in effect at a point, under the voids in effect then:
        the branch's last catalog change the point shows, else what it showed of its
        parent (the lists it kept when its parent changed them, or the parent's own:
        None)."""
        if not state.catalog:
            return
        shown = [c for c in state.catalog
                 if (upto is None or c["lsn"] <= upto)
                 and not any(lo < c["lsn"] <= hi for lo, hi in voids)]
        if shown:
            last = max(shown, key=lambda c: int(c["lsn"]))
            state.indexes = None if last["indexes"] is None else list(last["indexes"])
            state.options = dict(last["options"])
            if state.base_dropped and not last["whole"]:
                # Changed while the parent showed through, held whole since: the
                # parent's options and index list then, with the branch's own over them.
                state.options = {**(state.options_base or {}), **state.options}
                if state.indexes is None and state.index_base is not None:
                    state.indexes = list(state.index_base)
        else:
            state.indexes = None if state.index_base is None else list(state.index_base)
            state.options = dict(state.options_base or {})

    async def save_state(self, state: NsState) -> None:
        await self.save_states([state])

    async def save_states(self, states: list[NsState]) -> None:
        """In one round trip; in a transaction (txn.py), in it: the states change with
        the overlay."""
        await self.meta["namespaces"].bulk_write(
            [ReplaceOne({"_id": state.key}, state.to_doc(), upsert=True) for state in states],
            session=SESSION.get())

    # -- writes -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def writing(self, branch: Branch, point: Hashable | None = None
                      ) -> AsyncIterator[None]:
        """Serializes a branch's writes so its overlay and WAL advance together; writes
        on one document each (point: its (namespace, idkey)) only against writes on the
        same document and against everything else (locks.py)."""
        txn = CURRENT.get()
        if txn is not None and txn.branch.bid == branch.bid:
            # A transaction holds the lock exclusively from its first write to its end;
            # its writes show nowhere before its commit, which holds the fence (txn.py).
            # Its first write takes the lock under the fence: a fork under way (it holds
            # the fence as a reader) ends first, and none starts once it is held.
            if not txn.locked:
                async with self.fence(branch.bid).hold("w"):
                    await self.txns.lock(txn)
            yield
            return
        lock = self.branch_lock(branch.bid)
        async with lock.exclusive() if point is None else lock.shared(point), \
                self.fence(branch.bid).hold("w"):
            yield

    def fence(self, bid: str) -> Fence:
        # Made once: every command on a branch port asks for main's.
        fence = self._fences.get(bid)
        if fence is None:
            fence = self._fences[bid] = Fence()
        return fence

    def intercepting_main(self) -> bool:
        """Whether main's writes are preserved for its children (it has some)."""
        return self._main_forks > 0 or any(b.parent == MAIN for b in self.branches.values())

    @contextlib.asynccontextmanager
    async def writing_main(self, point: Hashable | None = None) -> AsyncIterator[None]:
        """Main's writes through the main port while it has children, as `writing`."""
        lock = self.branch_lock(MAIN)
        async with lock.exclusive() if point is None else lock.shared(point), \
                self.fence(MAIN).hold("w"):
            yield

    def reading(self, branches: list[Branch], *, exact: bool = True) -> Reading:
        """Keeps these branches' writes (and main's) out, so none shows half preserved in a
        child (snapshot.py). Taken root first, before any branch lock; then (exact) what
        reached main before now, through the proxy or not, is preserved (capture.py). A
        cursor's later batches do not wait: they are as exact as a mongod cursor's under
        read concern "local" (docs/ARCHITECTURE.md, "Where isolation is not exact")."""
        return Reading(self, branches, exact)

    def try_reading(self, branches: list[Branch]) -> list[Fence] | None:
        """`reading(branches, exact=False)` taken from synchronous code, where it would
        not wait: the fences held, for `stop_reading`; None (nothing held) when one of
        them is held or awaited by writers."""
        fence = self.fence(MAIN)
        if not fence.try_acquire("r"):
            return None
        held = [fence]
        for branch in reversed(branches):
            fence = self.fence(branch.bid)
            if not fence.try_acquire("r"):
                self.stop_reading(held)
                return None
            held.append(fence)
        return held

    @staticmethod
    def stop_reading(held: list[Fence]) -> None:
        while held:
            held.pop().release_soon("r")

    def ancestors(self, branch: Branch) -> list[Branch]:
        """The branches a branch reads through, nearest first, main excluded."""
        return self.chain(branch)[1:]

    def branch_lock(self, bid: str) -> BranchLock:
        lock = self._locks.get(bid)
        if lock is None:
            lock = self._locks[bid] = BranchLock()
        return lock

    def copy_mode(self, bid: str) -> bool:
        branch = self.by_bid(bid)
        return branch is not None and branch.mode == "copy"

    async def mark_dirty(self, state: NsState) -> None:
        """Before an overlay changes: on a crash, start-up rebuilds it from the WAL. A copy
        branch's collections are its data, not a cache, and are never rebuilt."""
        if state.key in self._dirty:
            self._dirty[state.key] = time.monotonic()
            return
        if self.copy_mode(state.bid):
            return
        await self.meta["dirty"].replace_one({"_id": state.key}, {"_id": state.key},
                                             upsert=True)
        self._dirty[state.key] = time.monotonic()

    async def _flush_dirty(self) -> None:
        """Clears markers of overlays that are at rest, so a restart has less to rebuild.
        Only after DIRTY_REST seconds without a change: an overlay that keeps changing
        (a child of main copying up main's steady writes) would otherwise pay a marker
        set and a marker cleared every second, two upstream writes per overlay."""
        while True:
            await asyncio.sleep(1.0)
            rested = time.monotonic() - DIRTY_REST
            for key in [k for k, at in self._dirty.items() if at <= rested]:
                lock = self.branch_lock(key.split(":", 1)[0])
                if lock.locked():
                    continue
                # Under the branch's lock, so no write can start between the delete and
                # the set update and find its marker gone.
                async with lock.exclusive():
                    try:
                        if self._dirty.get(key, rested + 1) > rested:
                            continue  # changed while the lock was awaited
                        await self.meta["dirty"].delete_one({"_id": key})
                        self._dirty.pop(key, None)
                    except Exception:  # the marker stays; start-up rebuilds needlessly
                        log.exception("could not clear dirty marker %s", key)

    async def log_changes(self, branch: Branch, changes: list[Change], client: dict[str, Any],
                          txn: dict[str, Any] | None = None,
                          reply: dict[str, Any] | None = None, *,
                          preserve: bool = True) -> int:
        """Log a branch's changes; first (preserve) its children keep what they showed of
        the documents changed (snapshot.py): the caller holds the branch's fence."""
        current = CURRENT.get()
        if preserve and current is not None and current.branch.bid == branch.bid:
            # Preserved at the commit (txn.py); kept only for children there are (none
            # can be forked once the transaction writes).
            if any(b.parent == branch.name for b in self.branches.values()):
                current.defer(changes)
        elif preserve:
            await snapshot.preserve(self, branch.name, changes)
        return await self.wal.append(branch.bid, changes, client, txn, reply)

    # -- retryable writes -----------------------------------------------------------------
    # A retryable write's identity is its lsid and txnNumber, and for one statement of a
    # client bulkWrite (overlay.Stmts) the op's index too: mongod records each statement of
    # a retryable write it executed, and a retry runs only those it did not.
    @staticmethod
    def _retry_key(txn: dict[str, Any]) -> tuple[Any, Any, Any]:
        return bytes(txn["lsid"]) if txn["lsid"] else None, txn["n"], txn.get("stmt")

    def recall(self, txn: dict[str, Any] | None) -> dict[str, Any] | None:
        """The reply already given to this (lsid, txnNumber[, op]): a retry never applies
        twice."""
        if txn is None:
            return None
        return self._retries.get(self._retry_key(txn))

    def remember(self, txn: dict[str, Any] | None, reply: dict[str, Any]) -> None:
        if txn is None:
            return
        self._retries[self._retry_key(txn)] = reply
        while len(self._retries) > RETRY_MEMORY:
            self._retries.popitem(last=False)

    @contextlib.asynccontextmanager
    async def retrying(self, txn: dict[str, Any] | None) -> AsyncIterator[None]:
        """The attempts of one retryable write (lsid, txnNumber) one at a time, as mongod
        checks a session out to one command: a driver's retry can arrive while the first
        attempt still runs, and a write of several statements must find each one's
        outcome recorded, or the statement not begun."""
        if txn is None:
            yield
            return
        key = self._retry_key(txn)[:2]
        lock, waiting = self._attempts.setdefault(key, (asyncio.Lock(), [0]))
        waiting[0] += 1
        try:
            async with lock:
                yield
        finally:
            waiting[0] -= 1
            if not waiting[0]:
                del self._attempts[key]

    async def rematerialize(self, state: NsState, upto: int | None = None) -> None:
        """Rebuild an overlay as the fold of its visible WAL entries (up to an LSN)."""
        db = self.client[state.db]
        await db.drop_collection(state.live)
        await db.drop_collection(state.hidden)
        branch = self.by_bid(state.bid)
        ns = f"{state.db}.{state.coll}"
        match: dict[str, Any] = {"b": state.bid, "ns": ns}
        if branch is not None and branch.voids:
            match.update(branch.visible())
        if upto is not None:
            match["_id"] = {"$lte": upto}
        marker = await self.wal.first({**match, "op": {"$in": list(STARTS)}}, newest=True)
        replaced = marker is not None and marker["op"] in RESETS
        state.base_dropped = replaced
        # Held whole (`own`, never voided), before the marker too: its parent never shows
        # through again.
        if await self.wal.first({**match, "op": OWN}) is not None:
            state.owned = state.base_dropped = True
        if not state.detached or state.present_base is not None:
            # A collection detached before its presence was kept (present_base) keeps
            # the presence saved with it.
            state.present = None
        if marker is not None:
            match["_id"] = {**match.get("_id", {}), "$gt": marker["_id"]}
            state.present = marker["op"] == CREATE or None
        elif state.present is None and state.present_base is not None:
            state.present = state.present_base
        # While the branch's own drop or create stands, what it kept of its parent since
        # waits in the WAL for a reset to before it (snapshot.latent).
        match["op"] = {"$in": list(WRITES if replaced else DOCUMENT)}
        self.restore_catalog(state, branch.voids if branch is not None else [], upto)
        indexes = state.indexes
        if indexes is None and branch is not None:
            indexes = await self.view_indexes(branch, state.db, state.coll, self.pool)
        enforced = views.enforced(self.layers(branch, state.db, state.coll)
                                  if branch is not None else [state])
        # A collection the branch owns whole (made, refilled or taken) keeps being capped.
        whole = capped_options(state.options) if state.base_dropped else {}
        await self._create_overlay(state, indexes or [], self.pool, {**enforced, **whole})
        # What the overlay held was validated (or bypassed) when it was first written.
        bypass = {"bypassDocumentValidation": True} if enforced else {}
        # A document's last entry of the branch's own wins over an image it kept of its
        # parent, even a later one: that keep was made while a reset voided the branch's
        # entry, which a reset across it brought back.
        fold = [*matching(match),
                {"$addFields": {"own": {"$cond": [{"$eq": ["$op", KEEP]}, 0, 1]}}},
                {"$sort": {"own": 1, "_id": 1}},
                {"$group": {"_id": "$id", "op": {"$last": "$op"}, "post": {"$last": "$post"},
                            "postz": {"$last": "$postz"}, "postx": {"$last": "$postx"},
                            "first": {"$min": "$_id"}}}]
        if whole:
            # A capped collection's order is its insertion order: each document goes
            # back in the order of its first entry.
            fold.append({"$sort": {"first": 1}})
        await self.pool(self.meta_db, {
            "aggregate": "wal", "allowDiskUse": True, "cursor": {},
            "pipeline": [*fold, {"$project": {"_id": 1}},
                         {"$merge": {"into": {"db": state.db, "coll": state.hidden}}}],
        })
        await self.pool(self.meta_db, {
            "aggregate": "wal", "allowDiskUse": True, "cursor": {},
            "pipeline": [*fold, {"$match": {"op": {"$in": list(HOLDS)},
                                            "post": {"$type": "object"}}},
                         {"$replaceRoot": {"newRoot": "$post"}},
                         {"$merge": {"into": {"db": state.db, "coll": state.live}}}],
            **bypass,
        })
        # Images gc compressed, and those stored out of line, are unpacked here, a part
        # of a batch at a time (pymongo splits an insert by the BSON limit).
        live = self.client[state.db][state.live]
        async for batch in self.pool.batches(self.meta_db, {
                "aggregate": "wal", "allowDiskUse": True, "cursor": {},
                "pipeline": [*fold, {"$match": {"op": {"$in": list(HOLDS)}, "post": None,
                                                "$or": [{"postz": {"$ne": None}},
                                                        {"postx": {"$ne": None}}]}}]}):
            async for part in self.wal.parts(batch):
                docs = [d for d in (image(d, "post") for d in part) if d is not None]
                if docs:
                    await live.insert_many(docs, ordered=False,
                                           bypass_document_validation=bool(bypass))
        if state.present is None and await db[state.live].count_documents({}, limit=1):
            state.present = True  # writing to a collection creates it
        elif state.present is None and state.base_dropped:
            state.present = False
        await self.save_state(state)
        await self.load_hidden(state)


def capped_options(options: dict[str, Any]) -> dict[str, Any]:
    """What makes a collection capped, among its options."""
    if not options.get("capped"):
        return {}
    return {k: options[k] for k in ("capped", "size", "max") if k in options}


class Reading:
    """Engine.reading's hold, for an `async with` block: every command on a branch port
    takes it, so it is a plain class rather than a generator-based context manager."""

    __slots__ = ("branches", "engine", "exact", "held")

    def __init__(self, engine: Engine, branches: list[Branch], exact: bool):
        self.engine = engine
        self.branches = branches
        self.exact = exact
        self.held: list[Fence] = []

    async def __aenter__(self) -> None:
        engine = self.engine
        held = self.held
        try:
            fence = engine.fence(MAIN)
            await fence.acquire("r")
            held.append(fence)
            if engine.capture is not None and self.exact:
                # No main-port write is in flight now: every one acknowledged so far is
                # at or before the upstream's current time, which the capture passes.
                await engine.capture.barrier()
            for branch in reversed(self.branches):
                fence = engine.fence(branch.bid)
                await fence.acquire("r")
                held.append(fence)
        except BaseException:
            await self._release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self._release()

    async def _release(self) -> None:
        held = self.held
        while held:
            await held.pop().release("r")
