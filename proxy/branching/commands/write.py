"""insert, update, delete and findAndModify on a branch.

Copy-on-write, then the real write: the documents a write will touch are copied
from the parent view into the branch's live overlay (and their ids hidden from
the parent), then the user's own statement runs against the overlay, so the
upstream applies every update operator itself. Every changed document is
logged with its pre- and post-image before the client hears back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from typing import Any

import bson
from bson import ObjectId

from proxy.branching import planner, snapshot, unique, viewscan
from proxy.branching.commands.base import Request, coll_name, documents_stage
from proxy.branching.errors import CommandError, code_name
from proxy.branching.idkey import idkey
from proxy.branching.model import NsState
from proxy.branching.runner import error_from
from proxy.branching.wal import DELETE, PUT, Change
from proxy.wire.bsonutil import same
from proxy.wire.codes import Code

BATCH = 1000


class Writer:
    """One write command on one collection of a branch, under the branch's write lock."""

    def __init__(self, req: Request, coll: str, state: NsState):
        self.req = req
        self.coll = coll
        self.state = state
        self.ns = f"{req.db}.{coll}"
        self.changes: list[Change] = []
        self.wc_error: dict[str, Any] | None = None
        self.write_concern = req.cmd.get("writeConcern")
        self.wc_sent = False

    @property
    def layers(self) -> list[NsState]:
        return self.req.layers(self.coll)

    async def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """A command on an overlay; replies name the user's collection, not ours."""
        if next(iter(cmd)) in ("insert", "update", "delete", "findAndModify"):
            if self.write_concern is not None:
                cmd["writeConcern"] = self.write_concern
                self.wc_sent = True
            # The overlay carries the branch collection's validator: the user's bypass
            # must reach the write that would be validated.
            if self.req.cmd.get("bypassDocumentValidation") is True:
                cmd.setdefault("bypassDocumentValidation", True)
        reply = await self.req.run.reply(self.req.db, cmd)
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
        return viewscan.view_batches(self.req.run, self.req.db, self.coll, self.layers, filt,
                                     sort=sort, limit=limit, options=options,
                                     skip_top_live=parent_only, project_id=project_id)

    async def unique_specs(self) -> list[dict[str, Any]]:
        if self.state.unique is None:
            indexes = await self.req.engine.view_indexes(self.req.on_branch, self.req.db,
                                                         self.coll, self.req.run)
            self.state.unique = unique.unique_specs(indexes)
        return self.state.unique

    async def _collisions(self, cmd: dict[str, Any], head: list[dict[str, Any]]
                          ) -> dict[Any, dict[str, Any]]:
        """idkey -> a duplicate-key error body, for candidates that collide with the
        parent view on some unique index."""
        found: dict[Any, dict[str, Any]] = {}
        for spec in await self.unique_specs():
            pipeline = head + unique.collision_stages(self.coll, self.layers, spec)
            async for batch in self.req.run.batches(self.req.db, {**cmd, "pipeline": pipeline,
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
        return await self._collisions({"aggregate": self.state.live},
                                      [{"$match": {"_id": {"$in": ids}}}])

    async def reject_collisions(self, since: int, copied: list[Any]) -> dict[str, Any] | None:
        """Undo changes logged since a point that collide on a unique index with the
        parent view; the first such error, as mongod would report it. copied: the ids
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
        cmd = {"find": self.state.live, "filter": {"_id": {"$in": ids}},
               "projection": {"_id": 1}}
        async for batch in self.req.run.batches(self.req.db, cmd, BATCH):
            found.update(idkey(d["_id"]) for d in batch)
        return found

    async def hide(self, ids: list[Any], *, pooled: bool = False) -> list[Any]:
        """Hide ids from the parent; returns those this call hid (the others were hidden
        already: by an earlier delete, or as the branch's own documents), the only ones
        an undo may un-hide. pooled: on the engine's own connection, so it can run beside
        a write on the client's (the hidden-id collection is the proxy's own)."""
        if not ids:
            return []
        cmd = {"insert": self.state.hidden, "documents": [{"_id": i} for i in ids],
               "ordered": False}
        # Not pooled, the hide runs on the client's connection: the upstream judges its
        # right to write here.
        reply = await (self.req.engine.pool.reply(self.req.db, cmd) if pooled
                       else self.run(cmd))
        if not reply.get("ok"):
            raise error_from(reply)
        # A duplicate: hidden already. Any other error (an _id no collection takes, which
        # the write itself is refused for too): not hidden.
        errors = {e["index"]: e.get("code") for e in reply.get("writeErrors", [])}
        self.state.hide([i for n, i in enumerate(ids)
                         if errors.get(n, Code.DUPLICATE_KEY) == Code.DUPLICATE_KEY])
        return [i for n, i in enumerate(ids) if n not in errors]

    async def unhide_pooled(self, ids: list[Any]) -> None:
        """Undo a pooled hide whose companion write on the client's connection failed (it
        may have been refused: then the proxy's own connection must not have changed the
        branch view on the client's behalf)."""
        if not ids:
            return
        reply = await self.req.engine.pool.reply(self.req.db, {
            "delete": self.state.hidden, "deletes": [{"q": {"_id": {"$in": ids}}, "limit": 0}]})
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
        cmd = {"find": self.state.live, "filter": {"_id": {"$in": ids}}, "projection": {"_id": 1}}
        async for batch in self.req.run.batches(self.req.db, cmd, BATCH):
            present.update(idkey(d["_id"]) for d in batch)
        absent = [i for i in ids if idkey(i) not in present]
        if absent:
            await self.check({"delete": self.state.hidden,
                              "deletes": [{"q": {"_id": {"$in": absent}}, "limit": 0}]})
            self.state.unhide(absent)

    async def copy_on_write(self, docs: list[dict[str, Any]]) -> list[Any]:
        """Copy parent documents into the overlay; returns the ids copied now."""
        owned = await self.in_live([d["_id"] for d in docs])
        fresh = [d for d in docs if idkey(d["_id"]) not in owned]
        if not fresh:
            return []
        ids = [d["_id"] for d in fresh]
        hidden, copied = await asyncio.gather(
            self.hide(ids, pooled=True),
            self.check({"insert": self.state.live, "documents": fresh, "ordered": False}),
            return_exceptions=True)
        if isinstance(copied, BaseException):
            if not isinstance(hidden, BaseException):
                await self.unhide_pooled(hidden)
            raise copied
        if isinstance(hidden, BaseException):
            await self.check({"delete": self.state.live,
                              "deletes": [{"q": {"_id": {"$in": ids}}, "limit": 0}]})
            raise hidden
        return ids

    async def uncopy(self, ids: list[Any]) -> None:
        """Undo a copy that turned out to change nothing, so the overlay stays minimal."""
        if not ids:
            return
        await self.check({"delete": self.state.live,
                          "deletes": [{"q": {"_id": {"$in": ids}}, "limit": 0}]})
        await self.check({"delete": self.state.hidden,
                          "deletes": [{"q": {"_id": {"$in": ids}}, "limit": 0}]})
        self.state.unhide(ids)

    async def live_docs(self, ids: list[Any]) -> dict[Any, dict[str, Any]]:
        out: dict[Any, dict[str, Any]] = {}
        cmd = {"find": self.state.live, "filter": {"_id": {"$in": ids}}}
        async for batch in self.req.run.batches(self.req.db, cmd, BATCH):
            for d in batch:
                out[idkey(d["_id"])] = d
        return out

    async def record_puts(self, pres: list[dict[str, Any]], copied: list[Any]) -> None:
        """Log what changed between pre-images and the overlay now; undo idle copies."""
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
            self.changes.append(Change(self.ns, pre["_id"], PUT, pre, post))
        await self.uncopy(idle)

    async def flush(self) -> None:
        """Log a large write a batch at a time, so memory stays bounded. Like a mongod
        multi-document write, one that spans batches is not atomic across a crash."""
        if len(self.changes) >= BATCH:
            await self.req.engine.log_changes(self.req.on_branch, self.changes,
                                              self.req.client(), _txn(self.req))
            self.changes.clear()

    async def record_inserts(self, match: dict[str, Any], pres: list[dict[str, Any]]) -> None:
        """Log documents a server-side write added to the overlay (they had no pre-image)."""
        known = {idkey(d["_id"]) for d in pres}
        cmd = {"find": self.state.live, "filter": match}
        async for batch in self.req.run.batches(self.req.db, cmd, BATCH):
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


async def begin(req: Request, coll: str) -> Writer:
    engine = req.engine
    # Point writes on other ids may be setting up the same collection at the same time.
    async with engine.branch_lock(req.on_branch.bid).setup:
        await snapshot.before_collection_write(engine, req.on_branch, req.db, coll)
        state = await engine.ensure_state(req.on_branch, req.db, coll, req.run)
        await engine.mark_dirty(state)
        if state.present is not True:
            state.present = True
            await engine.save_state(state)
    return Writer(req, coll, state)


def _point(req: Request, coll: str, stmts: list[Any]) -> Hashable | None:
    """The lock key of a write on one document named by _id; None for any other write,
    which then holds its branch exclusively."""
    stmt = stmts[0] if len(stmts) == 1 else None
    if not isinstance(stmt, dict) or planner.collated(req.cmd) or planner.collated(stmt):
        return None
    point = planner.point_id(stmt.get("q"))
    return None if point is None else (req.db, coll, idkey(point[0]))


async def finish(req: Request, writer: Writer, reply: dict[str, Any]) -> dict[str, Any]:
    if writer.write_concern is not None and not writer.wc_sent:
        # Every statement failed before reaching the overlay. mongod still waits for the
        # client's write concern and reports a writeConcernError: so does a no-op write.
        await writer.run({"delete": writer.state.hidden,
                          "deletes": [{"q": {"_id": {"$in": []}}, "limit": 1}]})
    if writer.wc_error is not None:
        reply["writeConcernError"] = writer.wc_error
    await req.engine.log_changes(req.on_branch, writer.changes, req.client(), _txn(req), reply)
    writer.changes.clear()
    req.engine.remember(_txn(req), reply)
    return reply


def _txn(req: Request) -> dict[str, Any] | None:
    if "txnNumber" in req.cmd and isinstance(req.cmd.get("lsid"), dict):
        return {"lsid": req.cmd["lsid"].get("id"), "n": req.cmd["txnNumber"]}
    return None


def _retried(req: Request) -> dict[str, Any] | None:
    req.reject_transactions()
    return _recalled(req)


def _recalled(req: Request) -> dict[str, Any] | None:
    """The reply to an earlier attempt of this retryable write. Asked again under the
    branch's write lock: a driver's retry can arrive while the first attempt still waits
    for that lock or runs, and must then repeat its outcome, not apply it again."""
    return req.engine.recall(_txn(req))


def _stmt_error(index: int, reply: dict[str, Any]) -> dict[str, Any]:
    err = {"index": index, "code": int(reply.get("code", 8)),
           "errmsg": str(reply.get("errmsg", ""))}
    for key in ("codeName", "errInfo", "keyPattern", "keyValue"):
        if key in reply:
            err[key] = reply[key]
    return err


# -- insert ---------------------------------------------------------------------------
async def insert(req: Request) -> dict[str, Any]:
    coll = coll_name(req)
    if (done := _retried(req)) is not None:
        return done
    raw_docs = req.cmd.get("documents")
    if not isinstance(raw_docs, list):
        raise CommandError(Code.FAILED_TO_PARSE, "insert needs a 'documents' array")
    docs = [d if "_id" in d else {"_id": ObjectId(), **d} for d in raw_docs]
    ordered = req.cmd.get("ordered", True) is not False
    n = 0
    errors: list[dict[str, Any]] = []
    point = (req.db, coll, idkey(docs[0]["_id"])) if len(docs) == 1 else None
    async with req.engine.writing(req.on_branch, point):
        if (done := _recalled(req)) is not None:
            return done
        writer = await begin(req, coll)
        for start in range(0, len(docs), BATCH):
            chunk = docs[start:start + BATCH]
            taken = await writer.parent_has([d["_id"] for d in chunk])
            clashes = await writer.collisions_new(chunk)
            batch: list[tuple[int, dict[str, Any]]] = []
            stop = False
            # Ordered, the first document the parent view refuses ends the batch, but
            # only if every document before it lands: else the batch stops earlier and
            # never reaches it.
            held: dict[str, Any] | None = None
            for offset, doc in enumerate(chunk):
                key = idkey(doc["_id"])
                if key in taken or key in clashes:
                    err = dup_key_error(writer.ns, doc["_id"]) if key in taken else clashes[key]
                    if ordered:
                        held = {**err, "index": start + offset}
                        stop = True
                        break
                    errors.append({**err, "index": start + offset})
                    continue
                batch.append((start + offset, doc))
            if batch:
                # New ids hide nothing of the parent yet, so hiding them can run beside the
                # insert; ids that did not land are un-hidden after.
                tried = [d["_id"] for _, d in batch]
                reply, hid = await asyncio.gather(
                    writer.run({"insert": writer.state.live, "ordered": ordered,
                                "documents": [d for _, d in batch]}),
                    writer.hide(tried, pooled=True))
                if not reply.get("ok"):
                    await writer.unhide_pooled(hid)  # the insert failed as a whole
                    return reply
                failed = set()
                for err in reply.get("writeErrors", []):
                    index, _ = batch[err["index"]]
                    failed.add(err["index"])
                    errors.append({**err, "index": index})
                if ordered and failed:
                    batch = batch[:min(failed)]
                    stop = True
                    held = None
                good = [d for i, (_, d) in enumerate(batch) if i not in failed]
                landed = {idkey(d["_id"]) for d in good}
                await writer.unhide_absent([i for i in hid if idkey(i) not in landed])
                writer.changes.extend(Change(writer.ns, d["_id"], PUT, None, d) for d in good)
                n += len(good)
            if held is not None:
                errors.append(held)
            await writer.flush()
            if stop:
                break
        errors.sort(key=lambda e: e["index"])
        result: dict[str, Any] = {"n": n, "ok": 1.0}
        if errors:
            result["writeErrors"] = errors
        return await finish(req, writer, result)


# -- update ---------------------------------------------------------------------------
async def update(req: Request) -> dict[str, Any]:
    coll = coll_name(req)
    if (done := _retried(req)) is not None:
        return done
    stmts = req.cmd.get("updates")
    if not isinstance(stmts, list):
        raise CommandError(Code.FAILED_TO_PARSE, "update needs an 'updates' array")
    ordered = req.cmd.get("ordered", True) is not False
    totals = {"n": 0, "nModified": 0}
    upserted: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    async with req.engine.writing(req.on_branch, _point(req, coll, stmts)):
        if (done := _recalled(req)) is not None:
            return done
        writer = await begin(req, coll)
        for index, stmt in enumerate(stmts):
            outcome = await _update_stmt(writer, stmt, index)
            if "error" in outcome:
                errors.append(outcome["error"])
            totals["n"] += outcome.get("n", 0)
            totals["nModified"] += outcome.get("nModified", 0)
            if "upserted" in outcome:
                upserted.append({"index": index, "_id": outcome["upserted"]})
            if errors and ordered:
                break
        # mongod's order: the fields every write reply has, then the update's own.
        result: dict[str, Any] = {"n": totals["n"] + len(upserted)}
        if errors:
            result["writeErrors"] = errors
        if upserted:
            result["upserted"] = upserted
        result["nModified"] = totals["nModified"]
        result["ok"] = 1.0
        return await finish(req, writer, result)


async def _update_stmt(writer: Writer, stmt: dict[str, Any], index: int) -> dict[str, Any]:
    req = writer.req
    q = stmt.get("q") or {}
    multi = bool(stmt.get("multi"))
    options: dict[str, Any] = {k: stmt[k] for k in ("collation", "hint") if k in stmt}
    if "let" in req.cmd:
        options["let"] = req.cmd["let"]
    # Read every match before writing (so a moved document cannot match twice); keep
    # the documents themselves while they fit one batch, else re-read per batch.
    ids: list[Any] = []
    small: list[dict[str, Any]] | None = []
    try:
        async for batch in writer.view_docs(q, sort=stmt.get("sort") if not multi else None,
                                            limit=0 if multi else 1, options=options):
            ids.extend(d["_id"] for d in batch)
            if small is not None:
                small.extend(batch)
                if len(small) > BATCH:
                    small = None
    except CommandError as exc:
        if exc.code == Code.UNAUTHORIZED:
            raise  # as mongod: a refused privilege fails the whole command
        return {"error": {"index": index, "code": exc.code, "errmsg": str(exc)}}
    base_stmt = {k: v for k, v in stmt.items() if k not in ("q", "multi", "upsert", "sort")}
    if not ids:
        if not stmt.get("upsert"):
            # mongod parses the update even when nothing matches: an unknown operator
            # is an error all the same, so the upstream sees it on a filter matching none.
            reply = await writer.run(_with_let(req, {"update": writer.state.live, "updates": [
                {**base_stmt, "q": {"_id": {"$in": []}}, "multi": multi}]}))
            if not reply.get("ok"):
                return {"error": _stmt_error(index, reply)}
            if reply.get("writeErrors"):
                return {"n": 0, "nModified": 0,
                        "error": {**reply["writeErrors"][0], "index": index}}
            return {"n": 0, "nModified": 0}
        reply = await writer.run(_with_let(req, {
            "update": writer.state.live,
            "updates": [{**base_stmt, "q": q, "upsert": True, "multi": False}]}))
        if not reply.get("ok"):
            return {"error": _stmt_error(index, reply)}
        if reply.get("writeErrors"):
            return {"error": {**reply["writeErrors"][0], "index": index}}
        new_id = reply["upserted"][0]["_id"]
        dup = await writer.upserted(new_id)
        if dup is not None:
            return {"error": {**dup, "index": index}}
        return {"upserted": new_id}
    if not multi and small is not None and len(small) == 1:
        return await _update_one(writer, stmt, q, small[0], index)
    out = {"n": 0, "nModified": 0}
    for start in range(0, len(ids), BATCH):
        chunk = ids[start:start + BATCH]
        pres = small if small is not None else \
            [d async for batch in writer.view_docs({"_id": {"$in": chunk}}) for d in batch]
        copied = await writer.copy_on_write(pres)
        reply = await writer.run(_with_let(req, {
            "update": writer.state.live,
            "updates": [{**base_stmt, "q": _by_id(q, stmt.get("u"), {"$in": chunk}),
                         "multi": multi}]}))
        since = len(writer.changes)
        await writer.record_puts(pres, copied)
        clash = await writer.reject_collisions(since, copied)
        if clash is not None:
            modified = len(writer.changes) - since
            return {"n": out["n"] + modified, "nModified": out["nModified"] + modified,
                    "error": {**clash, "index": index}}
        if not reply.get("ok"):
            return {**out, "error": _stmt_error(index, reply)}
        out["n"] += int(reply.get("n", 0))
        out["nModified"] += int(reply.get("nModified", 0))
        if reply.get("writeErrors"):
            return {**out, "error": {**reply["writeErrors"][0], "index": index}}
        await writer.flush()
    return out


async def _update_one(writer: Writer, stmt: dict[str, Any], q: dict[str, Any],
                      pre: dict[str, Any], index: int) -> dict[str, Any]:
    """A single-document update, addressed to the overlay by _id (which every server
    answers from the index) rather than by the user's filter again."""
    copied = await writer.copy_on_write([pre])
    base_stmt = {k: v for k, v in stmt.items() if k not in ("q", "multi", "upsert", "sort")}
    reply = await writer.run(_with_let(writer.req, {
        "update": writer.state.live,
        "updates": [{**base_stmt, "q": _by_id(q, stmt.get("u"), pre["_id"])}]}))
    since = len(writer.changes)
    await writer.record_puts([pre], copied)
    if not reply.get("ok"):
        return {"error": _stmt_error(index, reply)}
    if reply.get("writeErrors"):
        return {"n": 0, "nModified": 0, "error": {**reply["writeErrors"][0], "index": index}}
    clash = await writer.reject_collisions(since, copied)
    if clash is not None:
        return {"n": 0, "nModified": 0, "error": {**clash, "index": index}}
    return {"n": int(reply.get("n", 0)), "nModified": int(reply.get("nModified", 0))}


def _positional(update: Any) -> bool:
    """Whether an update uses the positional $ operator, which needs the user's filter."""
    if not isinstance(update, dict):
        return False
    return any(key == "$" or key.endswith(".$") or ".$." in key
               for fields in update.values() if isinstance(fields, dict) for key in fields)


def _by_id(q: dict[str, Any], update: Any, ids: Any) -> dict[str, Any]:
    """The filter for an overlay write on documents already matched: their ids (indexed on
    every server), with the user's filter kept only where the positional $ needs it."""
    if _positional(update):
        return {"$and": [q, {"_id": ids}]}
    return {"_id": ids}


def _with_let(req: Request, cmd: dict[str, Any]) -> dict[str, Any]:
    if "let" in req.cmd:
        cmd["let"] = req.cmd["let"]
    return cmd


# -- delete ---------------------------------------------------------------------------
async def delete(req: Request) -> dict[str, Any]:
    coll = coll_name(req)
    if (done := _retried(req)) is not None:
        return done
    stmts = req.cmd.get("deletes")
    if not isinstance(stmts, list):
        raise CommandError(Code.FAILED_TO_PARSE, "delete needs a 'deletes' array")
    ordered = req.cmd.get("ordered", True) is not False
    n = 0
    errors: list[dict[str, Any]] = []
    async with req.engine.writing(req.on_branch, _point(req, coll, stmts)):
        if (done := _recalled(req)) is not None:
            return done
        writer = await begin(req, coll)
        for index, stmt in enumerate(stmts):
            options: dict[str, Any] = {k: stmt[k] for k in ("collation", "hint") if k in stmt}
            if "let" in req.cmd:
                options["let"] = req.cmd["let"]
            # Deleting what a cursor already returned never makes it return more.
            try:
                async for batch in writer.view_docs(
                        stmt.get("q") or {}, limit=1 if stmt.get("limit") == 1 else 0,
                        options=options):
                    await _remove(writer, batch)
                    n += len(batch)
                    await writer.flush()
            except CommandError as exc:
                if exc.code == Code.UNAUTHORIZED:
                    raise  # as mongod: a refused privilege fails the whole command
                errors.append({"index": index, "code": exc.code, "errmsg": str(exc)})
                if ordered:
                    break
        result: dict[str, Any] = {"n": n, "ok": 1.0}
        if errors:
            result["writeErrors"] = errors
        return await finish(req, writer, result)


async def _remove(writer: Writer, pres: list[dict[str, Any]]) -> None:
    ids = [d["_id"] for d in pres]
    owned = await writer.in_live(ids)
    mine = [i for i in ids if idkey(i) in owned]
    if mine:  # the overlay holds only ids it hides: the others are the parent's to hide
        await writer.check({"delete": writer.state.live,
                            "deletes": [{"q": {"_id": {"$in": mine}}, "limit": 0}]})
    await writer.hide([i for i in ids if idkey(i) not in owned])
    writer.changes.extend(Change(writer.ns, d["_id"], DELETE, d, None) for d in pres)


# -- findAndModify ----------------------------------------------------------------------
async def find_and_modify(req: Request) -> dict[str, Any]:
    coll = coll_name(req)
    if (done := _retried(req)) is not None:
        return done
    cmd = req.cmd
    q = cmd.get("query") or {}
    options: dict[str, Any] = {k: cmd[k] for k in ("collation", "hint", "let") if k in cmd}
    async with req.engine.writing(req.on_branch, _point(req, coll, [{"q": q}])):
        if (done := _recalled(req)) is not None:
            return done
        writer = await begin(req, coll)
        pres = [d async for batch in writer.view_docs(q, sort=cmd.get("sort"), limit=1,
                                                       options=options) for d in batch]
        live = writer.state.live

        async def projected(doc_id: Any) -> dict[str, Any] | None:
            """The document as findAndModify returns it: with the user's fields projection,
            computed by the server."""
            find: dict[str, Any] = {"find": live, "filter": {"_id": doc_id}, "limit": 1,
                                    "singleBatch": True}
            if cmd.get("fields"):
                find["projection"] = cmd["fields"]
            batch = (await writer.check(find))["cursor"]["firstBatch"]
            return batch[0] if batch else None

        statement: dict[str, Any] = {k: cmd[k] for k in ("arrayFilters", "collation", "hint")
                                     if k in cmd}
        write_opts: dict[str, Any] = {k: cmd[k] for k in ("let", "bypassDocumentValidation")
                                      if k in cmd}
        if pres:
            pre = pres[0]
            copied = await writer.copy_on_write([pre])
            value = None if cmd.get("new") and not cmd.get("remove") else \
                await projected(pre["_id"])
            if cmd.get("remove"):
                await writer.check({"delete": live,
                                    "deletes": [{"q": {"_id": pre["_id"]}, "limit": 1}]})
                writer.changes.append(Change(writer.ns, pre["_id"], DELETE, pre, None))
                return await finish(req, writer, {"lastErrorObject": {"n": 1},
                                                  "value": value, "ok": 1.0})
            reply = await writer.run({"update": live, **write_opts, "updates": [{
                **statement, "q": _by_id(q, cmd.get("update"), pre["_id"]),
                "u": cmd.get("update")}]})
            failed = not reply.get("ok") or reply.get("writeErrors")
            if cmd.get("new") and not failed:
                # Read before record_puts: an update that changed nothing has its copy
                # taken out of the overlay again, yet findAndModify returns the document.
                value = await projected(pre["_id"])
            since = len(writer.changes)
            await writer.record_puts([pre], copied)
            if failed:
                return _fam_error(reply)
            clash = await writer.reject_collisions(since, copied)
            if clash is not None:
                return _dup_reply(clash)
            return await finish(req, writer, {
                "lastErrorObject": {"n": 1, "updatedExisting": True}, "value": value,
                "ok": 1.0})
        if not cmd.get("upsert") or cmd.get("remove"):
            return await finish(req, writer, {
                "lastErrorObject": {"n": 0, "updatedExisting": False}, "value": None, "ok": 1.0})
        reply = await writer.run({"update": live, **write_opts, "updates": [{
            **statement, "q": q, "u": cmd.get("update"), "upsert": True}]})
        if not reply.get("ok") or reply.get("writeErrors"):
            return _fam_error(reply)
        new_id = reply["upserted"][0]["_id"]
        dup = await writer.upserted(new_id)
        if dup is not None:
            return _dup_reply(dup)
        return await finish(req, writer, {
            "lastErrorObject": {"n": 1, "updatedExisting": False, "upserted": new_id},
            "value": await projected(new_id) if cmd.get("new") else None, "ok": 1.0})


def _fam_error(reply: dict[str, Any]) -> dict[str, Any]:
    """An update's failure, shaped as findAndModify reports it (a command error)."""
    err = reply["writeErrors"][0] if reply.get("writeErrors") else reply
    code = int(err.get("code", 8))
    # A write error carries no codeName; the command error findAndModify answers does.
    out = {"ok": 0.0, "errmsg": err.get("errmsg", ""), "code": code,
           "codeName": err.get("codeName") or code_name(code)}
    for key in ("errInfo", "keyPattern", "keyValue"):
        if key in err:
            out[key] = err[key]
    return out


def _dup_reply(err: dict[str, Any]) -> dict[str, Any]:
    return {"ok": 0.0, "errmsg": err["errmsg"], "code": Code.DUPLICATE_KEY,
            "codeName": Code.DUPLICATE_KEY.code_name,
            "keyPattern": err["keyPattern"], "keyValue": err["keyValue"]}
