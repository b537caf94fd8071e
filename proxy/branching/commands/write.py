"""insert, update, delete and findAndModify on a branch: which documents each statement
touches, and the reply in mongod's shape. The copy-on-write itself, and what is logged,
is the overlay writer's (overlay.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from itertools import accumulate
from typing import Any

import bson
from bson import ObjectId

from proxy.branching import overlay, planner
from proxy.branching.batching import fitted
from proxy.branching.commands.base import Request, coll_name
from proxy.branching.errors import CommandError, code_name
from proxy.branching.idkey import idkey
from proxy.branching.overlay import BATCH, Writer, by_ids, chunks, dup_key_error
from proxy.branching.runner import SESSION
from proxy.branching.wal import DELETE, PUT, Change
from proxy.wire.codes import Code

# The bytes of update statements sent in one command (the 16 MB limit, with room).
_STATEMENTS_BYTES = 8 * 1024 * 1024

# A handler's statements, parsed from its command.
Statements = Callable[[Request], list[Any]]
# A handler's own work on its statements, under the lock, ending in the reply.
Body = Callable[[Writer, list[Any]], Awaitable[dict[str, Any]]]


async def _handle(req: Request, statements: Statements, body: Body, *,
                  point: Callable[[Request, str, list[Any]], Hashable | None] | None = None,
                  ) -> dict[str, Any]:
    """What the four handlers do around their statements, in mongod's order of checks:
    the collection name, no transaction, a retry answered from the reply remembered, the
    statements; then, under the branch's write lock (one document's, for a write on one
    _id), the retry asked again (a driver's retry can arrive while the first attempt
    still waits for that lock or runs, and must then repeat its outcome, not apply it
    again) and the collection's overlay made ready."""
    coll = coll_name(req)
    if (done := _recalled(req)) is not None:
        return done
    stmts = statements(req)
    async with req.engine.writing(req.on_branch, (point or _point)(req, coll, stmts)):
        if (done := _recalled(req)) is not None:
            return done
        writer = await begin(req, coll)
        # A batch's append may still be running (Writer.flush): it ends before the
        # client hears back. A write that failed before its last batch gets its own
        # error, not the append's.
        try:
            reply = await body(writer, stmts)
        except BaseException as exc:
            await writer.settle_failed(repr(exc))
            raise
        if reply.get("ok"):
            await writer.settle()
        else:
            await writer.settle_failed(reply.get("errmsg"))
        return reply


async def begin(req: Request, coll: str) -> Writer:
    """The overlay writer for a client's write command; the caller holds the branch's
    write lock."""
    return await overlay.begin(req.engine, req.on_branch, req.run, req.db, coll, req.cmd,
                               req.client(), req.stmts)


def _recalled(req: Request) -> dict[str, Any] | None:
    """The reply to an earlier attempt of this retryable write (or bulkWrite op)."""
    return req.engine.recall(overlay.identity(req.cmd, req.stmts))


def _point(req: Request, coll: str, stmts: list[Any]) -> Hashable | None:
    """The lock key of a write on one document named by _id; None for any other write,
    which then holds its branch exclusively."""
    stmt = stmts[0] if len(stmts) == 1 else None
    if not isinstance(stmt, dict) or planner.collated(req.cmd) or planner.collated(stmt):
        return None
    point = planner.point_id(stmt.get("q"))
    return None if point is None else (req.db, coll, idkey(point[0]))


def _stmt_error(index: int, reply: dict[str, Any]) -> dict[str, Any]:
    err = {"index": index, "code": int(reply.get("code", 8)),
           "errmsg": str(reply.get("errmsg", ""))}
    for key in ("codeName", "errInfo", "keyPattern", "keyValue"):
        if key in reply:
            err[key] = reply[key]
    return err


# -- insert ---------------------------------------------------------------------------
async def insert(req: Request) -> dict[str, Any]:
    return await _handle(req, _documents, _insert, point=_insert_point)


def _documents(req: Request) -> list[Any]:
    raw_docs = req.cmd.get("documents")
    if not isinstance(raw_docs, list):
        raise CommandError(Code.FAILED_TO_PARSE, "insert needs a 'documents' array")
    return [d if "_id" in d else {"_id": ObjectId(), **d} for d in raw_docs]


def _insert_point(req: Request, coll: str, docs: list[Any]) -> Hashable | None:
    return (req.db, coll, idkey(docs[0]["_id"])) if len(docs) == 1 else None


async def _insert(writer: Writer, docs: list[Any]) -> dict[str, Any]:
    ordered = writer.cmd.get("ordered", True) is not False
    n = 0
    errors: list[dict[str, Any]] = []
    groups = fitted(docs)
    for start, chunk in zip(accumulate((len(g) for g in groups), initial=0), groups,
                            strict=False):
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
            err: dict[str, Any] | None = None
            if key in taken or key in clashes:
                err = dup_key_error(writer.ns, doc["_id"]) if key in taken else clashes[key]
            if err is not None:
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
            insert = {"insert": writer.state.live, "ordered": ordered,
                      "documents": [d for _, d in batch]}
            if SESSION.get() is None:
                reply, hid = await asyncio.gather(writer.run(insert),
                                                  writer.hide(tried, pooled=True))
            else:  # one upstream session (a transaction) runs one command at a time
                reply = await writer.run(insert)
                hid = await writer.hide(tried, pooled=True)
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
            good = [(index, d) for i, (index, d) in enumerate(batch) if i not in failed]
            landed = {idkey(d["_id"]) for _, d in good}
            await writer.unhide_absent([i for i in hid if idkey(i) not in landed])
            writer.changes.extend(Change(writer.ns, d["_id"], PUT, None, d,
                                         writer.inserted(index)) for index, d in good)
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
    return await writer.finish(result)


# -- update ---------------------------------------------------------------------------
async def update(req: Request) -> dict[str, Any]:
    return await _handle(req, _updates, _update)


def _updates(req: Request) -> list[Any]:
    stmts = req.cmd.get("updates")
    if not isinstance(stmts, list):
        raise CommandError(Code.FAILED_TO_PARSE, "update needs an 'updates' array")
    return stmts


async def _update(writer: Writer, stmts: list[Any]) -> dict[str, Any]:
    ordered = writer.cmd.get("ordered", True) is not False
    totals = {"n": 0, "nModified": 0}
    upserted: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
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
    return await writer.finish(result)


async def _update_stmt(writer: Writer, stmt: dict[str, Any], index: int) -> dict[str, Any]:
    q = stmt.get("q") or {}
    multi = bool(stmt.get("multi"))
    options: dict[str, Any] = {k: stmt[k] for k in ("collation", "hint") if k in stmt}
    if "let" in writer.cmd:
        options["let"] = writer.cmd["let"]
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
            reply = await writer.run(_with_let(writer, {"update": writer.state.live, "updates": [
                {**base_stmt, "q": {"_id": {"$in": []}}, "multi": multi}]}))
            if not reply.get("ok"):
                return {"error": _stmt_error(index, reply)}
            if reply.get("writeErrors"):
                return {"n": 0, "nModified": 0,
                        "error": {**reply["writeErrors"][0], "index": index}}
            return {"n": 0, "nModified": 0}
        reply = await writer.run(_with_let(writer, {
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
            [d for part in chunks(chunk)
             async for batch in writer.view_docs({"_id": {"$in": part}}) for d in batch]
        copied = await writer.copy_on_write(pres)
        reply = await _update_ids(writer, base_stmt, q, stmt.get("u"), chunk, multi)
        since = len(writer.changes)
        await writer.record_puts(pres, copied, stmt.get("u"))
        clash = await writer.reject_collisions(since, copied)
        if clash is not None:
            modified = len(writer.changes) - since
            return {"n": out["n"] + modified, "nModified": out["nModified"] + modified,
                    "error": {**clash, "index": index}}
        out["n"] += int(reply.get("n", 0))
        out["nModified"] += int(reply.get("nModified", 0))
        if not reply.get("ok"):
            return {**out, "error": _stmt_error(index, reply)}
        if reply.get("writeErrors"):
            return {**out, "error": {**reply["writeErrors"][0], "index": index}}
        await writer.flush()
    return out


async def _update_ids(writer: Writer, base_stmt: dict[str, Any], q: dict[str, Any],
                      update: Any, ids: list[Any], multi: bool) -> dict[str, Any]:
    """The overlay update of a batch of matched documents: one statement per chunk of
    ids, as many to a command as keep it well under the 16 MB command limit (the
    statement's update is repeated in each). A reply sums the commands run; the first
    failure ends it (the statements are ordered)."""
    per = max(1, _STATEMENTS_BYTES // len(bson.encode(base_stmt)))
    parts = chunks(ids)
    total: dict[str, Any] = {"n": 0, "nModified": 0, "ok": 1.0}
    for start in range(0, len(parts), per):
        reply = await writer.run(_with_let(writer, {
            "update": writer.state.live,
            "updates": [{**base_stmt, "q": _by_id(q, update, {"$in": part}), "multi": multi}
                        for part in parts[start:start + per]]}))
        reply["n"] = total["n"] + int(reply.get("n", 0))
        reply["nModified"] = total["nModified"] + int(reply.get("nModified", 0))
        total = reply
        if not reply.get("ok") or reply.get("writeErrors"):
            break
    return total


async def _update_one(writer: Writer, stmt: dict[str, Any], q: dict[str, Any],
                      pre: dict[str, Any], index: int) -> dict[str, Any]:
    """A single-document update, addressed to the overlay by _id (which every server
    answers from the index) rather than by the user's filter again."""
    copied = await writer.copy_on_write([pre])
    base_stmt = {k: v for k, v in stmt.items() if k not in ("q", "multi", "upsert", "sort")}
    reply = await writer.run(_with_let(writer, {
        "update": writer.state.live,
        "updates": [{**base_stmt, "q": _by_id(q, stmt.get("u"), pre["_id"])}]}))
    since = len(writer.changes)
    await writer.record_puts([pre], copied, stmt.get("u"))
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


def _with_let(writer: Writer, cmd: dict[str, Any]) -> dict[str, Any]:
    if "let" in writer.cmd:
        cmd["let"] = writer.cmd["let"]
    return cmd


# -- delete ---------------------------------------------------------------------------
async def delete(req: Request) -> dict[str, Any]:
    return await _handle(req, _deletes, _delete)


def _deletes(req: Request) -> list[Any]:
    stmts = req.cmd.get("deletes")
    if not isinstance(stmts, list):
        raise CommandError(Code.FAILED_TO_PARSE, "delete needs a 'deletes' array")
    return stmts


async def _delete(writer: Writer, stmts: list[Any]) -> dict[str, Any]:
    ordered = writer.cmd.get("ordered", True) is not False
    n = 0
    errors: list[dict[str, Any]] = []
    for index, stmt in enumerate(stmts):
        options: dict[str, Any] = {k: stmt[k] for k in ("collation", "hint") if k in stmt}
        if "let" in writer.cmd:
            options["let"] = writer.cmd["let"]
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
    return await writer.finish(result)


async def _remove(writer: Writer, pres: list[dict[str, Any]]) -> None:
    ids = [d["_id"] for d in pres]
    owned = await writer.in_live(ids)
    mine = [i for i in ids if idkey(i) in owned]
    if mine:  # the overlay holds only ids it hides: the others are the parent's to hide
        await writer.check({"delete": writer.state.live, "deletes": by_ids(mine)})
    await writer.hide([i for i in ids if idkey(i) not in owned])
    writer.changes.extend(Change(writer.ns, d["_id"], DELETE, d, None) for d in pres)


# -- findAndModify ----------------------------------------------------------------------
async def find_and_modify(req: Request) -> dict[str, Any]:
    return await _handle(req, _query, _find_and_modify)


def _query(req: Request) -> list[Any]:
    """findAndModify's one statement, in the shape of the others' (for its lock)."""
    return [{"q": req.cmd.get("query") or {}}]


async def _find_and_modify(writer: Writer, stmts: list[Any]) -> dict[str, Any]:
    cmd = writer.cmd
    q = stmts[0]["q"]
    options: dict[str, Any] = {k: cmd[k] for k in ("collation", "hint", "let") if k in cmd}
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
            return await writer.finish({"lastErrorObject": {"n": 1}, "value": value,
                                        "ok": 1.0})
        reply = await writer.run({"update": live, **write_opts, "updates": [{
            **statement, "q": _by_id(q, cmd.get("update"), pre["_id"]),
            "u": cmd.get("update")}]})
        failed = not reply.get("ok") or reply.get("writeErrors")
        if cmd.get("new") and not failed:
            # Read before record_puts: an update that changed nothing has its copy
            # taken out of the overlay again, yet findAndModify returns the document.
            value = await projected(pre["_id"])
        since = len(writer.changes)
        await writer.record_puts([pre], copied, cmd.get("update"))
        if failed:
            return _fam_error(reply)
        clash = await writer.reject_collisions(since, copied)
        if clash is not None:
            return _fam_error(clash)
        return await writer.finish({
            "lastErrorObject": {"n": 1, "updatedExisting": True}, "value": value,
            "ok": 1.0})
    if not cmd.get("upsert") or cmd.get("remove"):
        return await writer.finish({
            "lastErrorObject": {"n": 0, "updatedExisting": False}, "value": None, "ok": 1.0})
    reply = await writer.run({"update": live, **write_opts, "updates": [{
        **statement, "q": q, "u": cmd.get("update"), "upsert": True}]})
    if not reply.get("ok") or reply.get("writeErrors"):
        return _fam_error(reply)
    new_id = reply["upserted"][0]["_id"]
    dup = await writer.upserted(new_id)
    if dup is not None:
        return _fam_error(dup)
    return await writer.finish({
        "lastErrorObject": {"n": 1, "updatedExisting": False, "upserted": new_id},
        "value": await projected(new_id) if cmd.get("new") else None, "ok": 1.0})


def _fam_error(reply: dict[str, Any]) -> dict[str, Any]:
    """An update's failure (the upstream's reply or write error, or the branch's own:
    a unique clash with the parent view, an entry too large to log), shaped as
    findAndModify reports it (a command error)."""
    err = reply["writeErrors"][0] if reply.get("writeErrors") else reply
    code = int(err.get("code", 8))
    # A write error carries no codeName; the command error findAndModify answers does.
    out = {"ok": 0.0, "errmsg": err.get("errmsg", ""), "code": code,
           "codeName": err.get("codeName") or code_name(code)}
    for key in ("errInfo", "keyPattern", "keyValue"):
        if key in err:
            out[key] = err[key]
    return out
