"""The copy-on-write overlay writer (docs/ARCHITECTURE.md, "Writes"): how a write on a
branch changes its overlay and what it logs, apart from any wire command.

Copy-on-write, then the real write: the documents a write will touch are copied
from the parent view into the branch's live overlay (and their ids hidden from
the parent), then the user's own statement runs against the overlay, so the
upstream applies every update operator itself. Every changed document is
logged with its pre- and post-image before the client hears back. The write
handlers (commands/write.py, and `$merge` in commands/aggregate.py) decide which
documents a statement touches and shape the reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import bson

from proxy.branching import snapshot, unique, views, viewscan
from proxy.branching.batching import fitted
from proxy.branching.engine import Engine
from proxy.branching.errors import CommandError
from proxy.branching.idkey import idkey
from proxy.branching.model import Branch, NsState
from proxy.branching.runner import SESSION, Runner, error_from, outside_transaction
from proxy.branching.stages import documents_stage
from proxy.branching.txn import in_transaction
from proxy.branching.wal import PUT, Change
from proxy.wire.bsonutil import same
from proxy.wire.codes import Code

log = logging.getLogger("mongobranch.overlay")

BATCH = 1000
# Ids named in one `$in`. SecantusDB checks each candidate document against the whole
# list, so one `$in` of k ids that all match costs k² comparisons (an update of 1,000
# documents by one `$in`: 2.5-4.9 ms a document; by `$in`s of 100, 50, 20 in one
# command: 0.9, 0.7, 0.5 ms; by `{}`: 0.3-0.5 ms). A batch's ids therefore go in chunks
# of this size, several chunks in one command (one statement each) or pipelined finds:
# the round trips stay one per batch.
IN_CHUNK = 50


def chunks(ids: list[Any]) -> list[list[Any]]:
    return [ids[i:i + IN_CHUNK] for i in range(0, len(ids), IN_CHUNK)]


def by_ids(ids: list[Any]) -> list[dict[str, Any]]:
    """The statements of a `delete` of these ids, one per chunk."""
    return [{"q": {"_id": {"$in": chunk}}, "limit": 0} for chunk in chunks(ids)]


def txn_of(cmd: dict[str, Any]) -> dict[str, Any] | None:
    """A retryable write's identity (lsid + txnNumber), under which the engine remembers
    its reply; None for a write no driver retries, and for a statement of a multi-document
    transaction (its txnNumber is the transaction's, which the commit answers for)."""
    if in_transaction(cmd):
        return None
    if "txnNumber" in cmd and isinstance(cmd.get("lsid"), dict):
        return {"lsid": cmd["lsid"].get("id"), "n": cmd["txnNumber"]}
    return None


@dataclass(frozen=True)
class Stmts:
    """The ops of a client bulkWrite that one per-namespace write runs (its statements:
    each document of an insert, or the one update or delete): the bulkWrite's retry
    identity (lsid + txnNumber) and each statement's op index. Each op's outcome is
    logged and remembered under the identity plus its index, so that a retry of the
    bulkWrite, after a restart too, runs only the ops that have none (commands/bulkwrite.py)."""

    txn: dict[str, Any]
    ops: list[int]

    def of(self, index: int) -> dict[str, Any]:
        """The identity of the write's statement at this index."""
        return {**self.txn, "stmt": self.ops[index]}


def identity(cmd: dict[str, Any], stmts: Stmts | None) -> dict[str, Any] | None:
    """What a write's reply is remembered under: a write of one bulkWrite op is that op's
    (its reply is the op's outcome); one of several ops (an insert of several documents)
    has none of its own, each document's entry carrying its op's."""
    if stmts is None:
        return txn_of(cmd)
    return stmts.of(0) if len(stmts.ops) == 1 else None


# The outcome of one inserted document, as the reply of an insert of it alone.
INSERTED = {"n": 1, "ok": 1.0}


class Writer:
    """One write command on one collection of a branch, under the branch's write lock.

    `cmd` is the client's command as it came: its write concern, its bypass of
    validation and its retry identity (lsid + txnNumber) carry over to the overlay
    writes and the WAL. `runner` is the client's connection, so the upstream judges
    every write by the client's own privileges; `client` names it in the WAL. `stmts`:
    the client bulkWrite ops it runs, whose outcomes it logs."""

    def __init__(self, engine: Engine, branch: Branch, runner: Runner, db: str, coll: str,
                 state: NsState, cmd: dict[str, Any], client: dict[str, Any],
                 stmts: Stmts | None = None):
        self.engine = engine
        self.branch = branch
        self.runner = runner
        self.db = db
        self.coll = coll
        self.state = state
        self.cmd = cmd
        self.client = client
        self.stmts = stmts
        self.txn = identity(cmd, stmts)
        self.ns = f"{db}.{coll}"
        self.changes: list[Change] = []
        self.wc_error: dict[str, Any] | None = None
        self.write_concern = cmd.get("writeConcern")
        self.wc_sent = False
        self._logging: asyncio.Future[int] | None = None

    def inserted(self, index: int) -> dict[str, Any] | None:
        """The extra fields of the WAL entry of the document at this index of an insert of
        several bulkWrite ops: its op's identity and outcome (an insert that is one op
        logs them as any retryable write does, on its last entry)."""
        if self.stmts is None or self.txn is not None:
            return None
        return {"txn": self.stmts.of(index), "reply": dict(INSERTED)}

    async def _log(self, changes: list[Change], reply: dict[str, Any] | None = None) -> int:
        """Append changes to the WAL; then the outcomes of bulkWrite ops their entries
        carry (`inserted`) are remembered, as `finish` remembers the write's reply."""
        lsn = await self.engine.log_changes(self.branch, changes, self.client, self.txn, reply)
        for change in changes:
            if change.extra and "reply" in change.extra:
                self.engine.remember(change.extra["txn"], change.extra["reply"])
        return lsn

    @property
    def layers(self) -> list[NsState]:
        return self.engine.layers(self.branch, self.db, self.coll)

    async def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """A command on an overlay; replies name the user's collection, not ours."""
        if next(iter(cmd)) in ("insert", "update", "delete", "findAndModify"):
            if self.write_concern is not None:
                cmd["writeConcern"] = self.write_concern
                self.wc_sent = True
            # The overlay carries the branch collection's validator: the user's bypass
            # must reach the write that would be validated.
            if self.cmd.get("bypassDocumentValidation") is True:
                cmd.setdefault("bypassDocumentValidation", True)
        reply = await self.runner.reply(self.db, cmd)
        if "writeConcernError" in reply:
            self.wc_error = reply["writeConcernError"]
        return unmask(reply, self.state, self.coll)

    async def check(self, cmd: dict[str, Any]) -> dict[str, Any]:
        reply = await self.run(cmd)
        if not reply.get("ok"):
            raise CommandError(int(reply.get("code", 8)), str(reply.get("errmsg", "")),
                               code_name=str(reply.get("codeName", "")))
        return reply

    def view_docs(self, filt: dict[str, Any], *, sort: dict[str, Any] | None = None,
                  limit: int = 0, options: dict[str, Any] | None = None,
                  parent_only: bool = False, project_id: bool = False,
                  ) -> AsyncIterator[list[dict[str, Any]]]:
        """Batches of the branch view's documents matching a filter (the parent view's,
        with parent_only)."""
        return viewscan.view_batches(self.runner, self.db, self.coll, self.layers, filt,
                                     sort=sort, limit=limit, options=options,
                                     skip_top_live=parent_only, project_id=project_id)

    async def unique_specs(self) -> list[dict[str, Any]]:
        if self.state.unique is None:
            indexes = await self.engine.view_indexes(self.branch, self.db,
                                                         self.coll, self.runner)
            self.state.unique = unique.unique_specs(indexes)
        return self.state.unique

    async def _collisions(self, cmd: dict[str, Any], head: list[dict[str, Any]]
                          ) -> dict[Any, dict[str, Any]]:
        """idkey -> a duplicate-key error body, for candidates that collide with the
        parent view on some unique index."""
        found: dict[Any, dict[str, Any]] = {}
        for spec in await self.unique_specs():
            pipeline = head + unique.collision_stages(self.coll, self.layers, spec)
            async for batch in self.runner.batches(self.db, {**cmd, "pipeline": pipeline,
                                                                  "cursor": {}}):
                for doc in batch:
                    found.setdefault(idkey(doc["_id"]), unique.dup_error(self.ns, spec, doc, 0))
        return found

    async def collisions_new(self, docs: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
        if not docs or not await self.unique_specs():
            return {}
        return await self._collisions({"aggregate": 1}, [documents_stage(docs)])

    async def collisions_live(self, ids: list[Any]) -> dict[Any, dict[str, Any]]:
        if not ids or not await self.unique_specs():
            return {}
        found: dict[Any, dict[str, Any]] = {}
        for chunk in chunks(ids):
            found.update(await self._collisions({"aggregate": self.state.live},
                                                [{"$match": {"_id": {"$in": chunk}}}]))
        return found

    async def reject_collisions(self, since: int, copied: list[Any]) -> dict[str, Any] | None:
        """Undo changes logged since a point that collide on a unique index with the
        parent view. The first such error, as mongod would report it. copied: the ids
        this write hid itself, the only ones the undo un-hides."""
        recent = [c for c in self.changes[since:] if c.op == PUT]
        bad = await self.collisions_live([c.id for c in recent])
        if not bad:
            return None
        copied_keys = {idkey(i) for i in copied}
        first = None
        for change in recent:
            err = bad.get(idkey(change.id))
            if err is None:
                continue
            first = first or err
            self.changes.remove(change)
            if idkey(change.id) in copied_keys:
                await self.uncopy([change.id])
            elif change.pre is None:  # new, but hidden before (an id the branch deleted)
                await self.check({"delete": self.state.live,
                                  "deletes": [{"q": {"_id": change.id}, "limit": 1}]})
            else:
                await self.check({"update": self.state.live, "updates": [
                    {"q": {"_id": change.id}, "u": change.pre}]})
        return first

    async def parent_has(self, ids: list[Any]) -> set[Any]:
        """Which ids the parent view still shows (they would collide on insert)."""
        if self.state.base_dropped:
            return set()  # nothing of the parent shows through
        found: set[Any] = set()
        for start in range(0, len(ids), BATCH):
            chunk = ids[start:start + BATCH]
            async for batch in self.view_docs({"_id": {"$in": chunk}}, parent_only=True,
                                              project_id=True):
                found.update(idkey(d["_id"]) for d in batch)
        return found

    async def in_live(self, ids: list[Any]) -> set[Any]:
        """Which of these visible ids the branch's own overlay already holds."""
        if self.state.base_dropped:
            return {idkey(i) for i in ids}  # nothing shows through: all are its own
        known = [self.state.hides(i) for i in ids]
        if all(k is not None for k in known):
            return {idkey(i) for i, k in zip(ids, known, strict=True) if k}
        found: set[Any] = set()
        async for batch in self.find_ids(self.state.live, ids, {"_id": 1}):
            found.update(idkey(d["_id"]) for d in batch)
        return found

    async def find_ids(self, coll: str, ids: list[Any], projection: dict[str, Any] | None = None,
                       ) -> AsyncIterator[list[dict[str, Any]]]:
        """Batches of a collection's documents among these ids: one find per IN_CHUNK ids,
        sent pipelined a batch of ids at a time (one round trip); a reply over the first
        batch's size limit is drained with getMore."""
        for start in range(0, len(ids), BATCH):
            finds = []
            for chunk in chunks(ids[start:start + BATCH]):
                find: dict[str, Any] = {"find": coll, "filter": {"_id": {"$in": chunk}},
                                        "batchSize": len(chunk) + 1}
                if projection is not None:
                    find["projection"] = projection
                finds.append(find)
            for reply in await self.runner.replies(self.db, finds):
                if not reply.get("ok"):
                    raise error_from(reply)
                cursor = reply["cursor"]
                if cursor["firstBatch"]:
                    yield cursor["firstBatch"]
                cursor_id = cursor["id"]
                while cursor_id:
                    more = await self.runner(self.db, {"getMore": cursor_id,
                                                       "collection": coll})
                    cursor_id = more["cursor"]["id"]
                    if more["cursor"]["nextBatch"]:
                        yield more["cursor"]["nextBatch"]

    async def hide(self, ids: list[Any], *, pooled: bool = False) -> list[Any]:
        """Hide ids from the parent; returns those this call hid (the others were hidden
        already: by an earlier delete, or as the branch's own documents), the only ones
        an undo may un-hide. pooled: on the engine's own connection, so it can run beside
        a write on the client's (the hidden-id collection is the proxy's own).

        A collection the branch owns whole (dropped and refilled, created by it, taken
        whole, or any collection of a copy branch) hides nothing: its parent never shows
        through it, so no read consults its hidden set, and a reset rebuilds that set
        from the WAL. Its writes skip the hidden-id insert, a third of what a branch
        insert makes the upstream write."""
        if not ids or self.state.base_dropped:
            return []
        if SESSION.get() is not None:
            return await self._hide_in_transaction(ids, pooled)
        cmd = {"insert": self.state.hidden, "documents": [{"_id": i} for i in ids],
               "ordered": False}
        # Not pooled, the hide runs on the client's connection: the upstream judges its
        # right to write here.
        reply = await (self.engine.pool.reply(self.db, cmd) if pooled
                       else self.run(cmd))
        if not reply.get("ok"):
            raise error_from(reply)
        # A duplicate: hidden already. Any other error (an _id no collection takes, which
        # the write itself is refused for too): not hidden.
        errors = {e["index"]: e.get("code") for e in reply.get("writeErrors", [])}
        self.state.hide([i for n, i in enumerate(ids)
                         if errors.get(n, Code.DUPLICATE_KEY) == Code.DUPLICATE_KEY])
        return [i for n, i in enumerate(ids) if n not in errors]

    async def _hide_in_transaction(self, ids: list[Any], pooled: bool) -> list[Any]:
        """`hide` inside a transaction, where a duplicate key error would abort it (on
        mongod and SecantusDB alike): an upsert per id, which hides it or finds it hidden."""
        cmd = {"update": self.state.hidden, "updates": [
            {"q": {"_id": {"$eq": i}}, "u": {}, "upsert": True} for i in ids]}
        reply = await (self.engine.pool.reply(self.db, cmd) if pooled else self.run(cmd))
        if not reply.get("ok") or reply.get("writeErrors"):
            raise error_from(reply if not reply.get("writeErrors")
                             else {**reply["writeErrors"][0], "ok": 0.0})
        self.state.hide(ids)
        return [ids[u["index"]] for u in reply.get("upserted", [])]

    async def unhide_pooled(self, ids: list[Any]) -> None:
        """Undo a pooled hide whose companion write on the client's connection failed (it
        may have been refused: then the proxy's own connection must not have changed the
        branch view on the client's behalf)."""
        if not ids:
            return
        reply = await self.engine.pool.reply(self.db, {
            "delete": self.state.hidden, "deletes": by_ids(ids)})
        if not reply.get("ok"):
            raise error_from(reply)
        self.state.unhide(ids)

    async def unhide_absent(self, ids: list[Any]) -> None:
        """Undo hiding for ids the overlay turned out not to hold. Only for ids this
        write hid itself: un-hiding one an earlier delete hid would bring the parent's
        version back."""
        if not ids:
            return
        present: set[Any] = set()
        async for batch in self.find_ids(self.state.live, ids, {"_id": 1}):
            present.update(idkey(d["_id"]) for d in batch)
        absent = [i for i in ids if idkey(i) not in present]
        if absent:
            await self.check({"delete": self.state.hidden, "deletes": by_ids(absent)})
            self.state.unhide(absent)

    async def copy_on_write(self, docs: list[dict[str, Any]]) -> list[Any]:
        """Copy parent documents into the overlay; returns the ids copied now."""
        owned = await self.in_live([d["_id"] for d in docs])
        fresh = [d for d in docs if idkey(d["_id"]) not in owned]
        if not fresh:
            return []
        ids = [d["_id"] for d in fresh]
        if SESSION.get() is not None:
            # In a transaction both run in one upstream session, one command at a time;
            # a failure aborts the whole transaction, so nothing is left to undo.
            await self.hide(ids, pooled=True)
            await self._copy(fresh)
            return ids
        hidden, copied = await asyncio.gather(self.hide(ids, pooled=True), self._copy(fresh),
                                              return_exceptions=True)
        if isinstance(copied, BaseException):
            if not isinstance(hidden, BaseException):
                await self.unhide_pooled(hidden)
            raise copied
        if isinstance(hidden, BaseException):
            await self.check({"delete": self.state.live, "deletes": by_ids(ids)})
            raise hidden
        return ids

    async def _copy(self, docs: list[dict[str, Any]]) -> None:
        for group in fitted(docs):
            copy = {"insert": self.state.live, "documents": group, "ordered": False}
            if views.enforced(self.layers):
                await self._copy_validated(copy)
            else:
                await self.check(copy)

    async def _copy_validated(self, cmd: dict[str, Any]) -> None:
        """A copy into an overlay that carries a validator the branch set (collMod): the
        parent's documents are what the branch shows, not its writes, so they bypass it,
        on the proxy's own connection (a client may write without the right to bypass)."""
        reply = await self.engine.pool.reply(self.db, {**cmd, "bypassDocumentValidation": True})
        if not reply.get("ok"):
            raise error_from(reply)

    async def uncopy(self, ids: list[Any]) -> None:
        """Undo a copy that turned out to change nothing, so the overlay stays minimal."""
        if not ids:
            return
        await self.check({"delete": self.state.live, "deletes": by_ids(ids)})
        await self.check({"delete": self.state.hidden, "deletes": by_ids(ids)})
        self.state.unhide(ids)

    async def live_docs(self, ids: list[Any]) -> dict[Any, dict[str, Any]]:
        out: dict[Any, dict[str, Any]] = {}
        async for batch in self.find_ids(self.state.live, ids):
            for d in batch:
                out[idkey(d["_id"])] = d
        return out

    async def record_puts(self, pres: list[dict[str, Any]], copied: list[Any],
                          update: Any = None) -> None:
        """Log what changed between pre-images and the overlay now; undo idle copies.
        Entries of a replacement document are marked `rep`: a branch's change stream
        reports them as replace events, not updates (commands/changestream.py)."""
        extra = {"rep": True} if replacement(update) else None
        posts = await self.live_docs([d["_id"] for d in pres])
        copied_keys = {idkey(i) for i in copied}
        idle = []
        for pre in pres:
            key = idkey(pre["_id"])
            post = posts.get(key)
            if post is None:
                continue
            if same(pre, post):
                if key in copied_keys:
                    idle.append(pre["_id"])
                continue
            self.changes.append(Change(self.ns, pre["_id"], PUT, pre, post, extra))
        await self.uncopy(idle)

    async def flush(self) -> None:
        """Log a large write a batch at a time, so memory stays bounded. Like a mongod
        multi-document write, one that spans batches is not atomic across a crash.

        Outside a transaction the batch's append runs while the write goes on with its
        next batch (the upstream stores the WAL entries of one batch beside the overlay
        writes of the next: a branch bulk write spends most of its time in the WAL
        insert); at most one append is in flight, so entries keep their order, and
        `finish` (or `settle`) waits for it before the client hears back."""
        if len(self.changes) < BATCH:
            return
        await self.settle()
        changes, self.changes = self.changes, []
        logging = self._log(changes)
        if SESSION.get() is not None:  # one upstream session runs one command at a time
            await logging
        else:
            self._logging = asyncio.ensure_future(logging)

    async def settle(self) -> None:
        """Wait for the append `flush` left running; raises what it raised."""
        logging, self._logging = self._logging, None
        if logging is not None:
            await logging

    async def settle_failed(self, cause: object) -> None:
        """`settle` for a write that failed before its last batch: the append still ends
        before the client hears back, but what it raised is logged, not raised, so that
        the client gets the write's own error (`cause`), not the log's."""
        try:
            await self.settle()
        except Exception as exc:
            log.error("branch %s: the WAL append of an earlier batch of a write on %s failed "
                      "(superseded by the write's own error: %s)", self.branch.name, self.ns,
                      cause, exc_info=exc)

    async def record_inserts(self, match: dict[str, Any], pres: list[dict[str, Any]]) -> None:
        """Log documents a server-side write added to the overlay (they had no pre-image)."""
        known = {idkey(d["_id"]) for d in pres}
        cmd = {"find": self.state.live, "filter": match}
        async for batch in self.runner.batches(self.db, cmd, BATCH):
            new = [d for d in batch if idkey(d["_id"]) not in known]
            await self.hide([d["_id"] for d in new])
            self.changes.extend(Change(self.ns, d["_id"], PUT, None, d) for d in new)

    async def upserted(self, new_id: Any) -> dict[str, Any] | None:
        """After an upsert into the overlay: a duplicate-key error if the parent holds the id."""
        if await self.parent_has([new_id]):
            await self.check({"delete": self.state.live,
                              "deletes": [{"q": {"_id": new_id}, "limit": 1}]})
            return dup_key_error(self.ns, new_id)
        hid = await self.hide([new_id])
        post = (await self.live_docs([new_id])).get(idkey(new_id))
        self.changes.append(Change(self.ns, new_id, PUT, None, post))
        return await self.reject_collisions(len(self.changes) - 1, hid)

    async def finish(self, reply: dict[str, Any]) -> dict[str, Any]:
        """Log what the write changed, then remember its reply for a retry: the client
        hears back only once both hold."""
        if self.write_concern is not None and not self.wc_sent:
            # Every statement failed before reaching the overlay. mongod still waits for the
            # client's write concern and reports a writeConcernError: so does a no-op write.
            await self.run({"delete": self.state.hidden,
                            "deletes": [{"q": {"_id": {"$in": []}}, "limit": 1}]})
        if self.wc_error is not None:
            reply["writeConcernError"] = self.wc_error
        await self.settle()
        await self._log(self.changes, reply)
        self.changes.clear()
        self.engine.remember(self.txn, reply)
        return reply


def replacement(update: Any) -> bool:
    """Whether an update statement's `u` is a replacement document (no operators, not a
    pipeline)."""
    return isinstance(update, dict) and not any(str(k).startswith("$") for k in update)


def unmask(reply: dict[str, Any], state: NsState, coll: str) -> dict[str, Any]:
    """Replace overlay names in error messages by the collection the user named."""
    def fix(text: Any) -> Any:
        return text.replace(state.live, coll) if isinstance(text, str) else text

    if "errmsg" in reply:
        reply["errmsg"] = fix(reply["errmsg"])
    for err in reply.get("writeErrors", []):
        err["errmsg"] = fix(err.get("errmsg"))
    return reply


def dup_key_error(ns: str, value: Any, index: int = 0) -> dict[str, Any]:
    shown = bson.json_util.dumps(value) if not isinstance(value, str) else f'"{value}"'
    return {
        "index": index, "code": Code.DUPLICATE_KEY,
        "errmsg": f"E11000 duplicate key error collection: {ns} index: _id_ dup key: "
                  f"{{ _id: {shown} }}",
        "keyPattern": {"_id": 1}, "keyValue": {"_id": value},
    }


def creates(cmd: dict[str, Any]) -> bool:
    """Whether a write makes a missing collection exist, as on mongod: an insert or an
    upsert does; a delete, or an update or findAndModify without upsert, leaves it
    missing (SecantusDB creates one for an update without upsert too)."""
    name = next(iter(cmd), "")
    if name == "delete":
        return False
    if name == "update":
        return any(isinstance(u, dict) and u.get("upsert") for u in cmd.get("updates") or [])
    if name.lower() == "findandmodify":
        return bool(cmd.get("upsert"))
    return True


async def begin(engine: Engine, branch: Branch, runner: Runner, db: str, coll: str,
                cmd: dict[str, Any], client: dict[str, Any], stmts: Stmts | None = None
                ) -> Writer:
    """A writer for a collection of a branch, under the branch's write lock: the
    collection's overlay made ready (and children given what they saw of it first). A
    write that does not create a missing collection (`creates`) leaves it missing."""
    making = creates(cmd)
    # Point writes on other ids may be setting up the same collection at the same time.
    async with engine.branch_lock(branch.bid).setup:
        with outside_transaction():
            await snapshot.before_collection_write(engine, branch, db, coll)
        first = snapshot.FirstWrite()
        if SESSION.get() is None and engine.state(branch, db, coll) is None:
            first = await snapshot.first_write(engine, branch, db, coll)
        # In a transaction (txn.py) a new overlay is created in it (an abort leaves no
        # overlay behind), and the collection exists once it commits; the dirty marker
        # changes no view and is set outside it. A collection the parent does not show
        # is the branch's own from the start, as an explicit `create` makes it: nothing
        # of a parent's later collection of that name shows through, reads run on the
        # overlay alone, and writes hide no ids.
        state = await engine.ensure_state(branch, db, coll, runner, base=first.base,
                                          fresh={} if first.absent and making else None)
        with outside_transaction():
            await engine.mark_dirty(state)
        if first.absent and making and state.base_dropped:
            await snapshot.own(engine, branch, state, client)
        engine.txns.set_aside(state)
        if making and state.present is not True and not await engine.txns.creating(state):
            state.present = True
            await engine.save_state(state)
    return Writer(engine, branch, runner, db, coll, state, cmd, client, stmts)
