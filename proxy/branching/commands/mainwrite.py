"""Writes on the main port while main has child branches (docs/ARCHITECTURE.md,
"Snapshots").

Without children the main port never routes these commands here: they stay on the
wire layer's pass-through fast path. With children, each write first reads what it
will change from the upstream, copies those pre-images up into every child that still
reads them from the base (snapshot.preserve), then runs the client's own statement on
the client's own upstream connection, and logs main's change (pre- and post-image) in
the WAL under the branch id "main". A statement that names no single document is sent
for exactly the documents read (by _id), so the pre-images are those it changes.
Collection-level changes (create, drop, rename, collMod, indexes, $out/$merge) first
give each child its own copy of the collection (snapshot.freeze). Commands whose effect
cannot be known beforehand are refused while main has children, never run silently.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from bson import ObjectId
from pymongo.errors import ConnectionFailure

from proxy.branching import naming, planner, snapshot
from proxy.branching.capture import now_of
from proxy.branching.commands.base import Handler, Request, coll_name
from proxy.branching.errors import CommandError
from proxy.branching.idkey import idkey
from proxy.branching.wal import DELETE, PUT, Change
from proxy.wire.bsonutil import same
from proxy.wire.codes import Code

WRITES = ("insert", "update", "delete", "findAndModify", "findandmodify")
# Commands that change collections as a whole (their options, indexes, or every
# document): the children first take their own copy of each (`ddl`).
DDL = ("create", "drop", "dropDatabase", "renameCollection", "collMod", "createIndexes",
       "dropIndexes", "deleteIndexes", "convertToCapped", "cloneCollectionAsCapped",
       "emptycapped")
# `applyOps` is internal to mongod (its oplog entries name any namespace and command);
# `mapReduce` is deprecated since 5.0 (its aggregation equivalent is preserved).
REFUSED = ("applyOps", "mapReduce")
# Every command the main port routes here while main has children (bulkWrite runs each
# of its operations through the handlers below: commands/bulkwrite.py).
NAMES = frozenset((*WRITES, *DDL, *REFUSED, "aggregate", "bulkWrite", "commitTransaction"))
BATCH = 1000
# Fields of a write command that describe the statement list, not the session.
_STMT_LISTS = ("documents", "updates", "deletes")


def active(req: Request) -> bool:
    """Whether main has children, so that its writes must be preserved for them first."""
    return req.engine.intercepting_main()


def captured(req: Request) -> bool:
    """Whether the capture preserves every write to main (capture.py), so that a write
    needs no reading beforehand."""
    capture = req.engine.capture
    return capture is not None and capture.exact


async def through_capture(req: Request) -> dict[str, Any]:
    """A document write while the capture preserves main's changes: the command runs as
    the client sent it, under main's fence. A child's command takes that fence too and
    then waits for the capture to pass the upstream's current time (Engine.reading), so
    it either runs before this write or sees it preserved; the write itself need not
    wait for the capture, unless the capture has fallen behind (backpressure)."""
    capture = req.engine.capture
    assert capture is not None
    async with req.engine.fence(naming.MAIN).hold("w"):
        # A write that creates a collection: children keep not showing it (an upstream
        # may not report an implicit creation in its change stream).
        try:
            for db, coll in _targets(req):
                await snapshot.before_collection_write(req.engine, None, db, coll)
        except ConnectionFailure as exc:
            # No primary to ask (an election): the write could not be taken either, and is
            # answered as the primary-less upstream would, so that drivers retry it.
            raise CommandError(Code.NOT_WRITABLE_PRIMARY, f"not primary: {exc}",
                               errorLabels=["RetryableWriteError"]) from exc
        reply = await req.run.reply(req.db, {k: v for k, v in req.cmd.items() if k != "$db"})
    at = now_of(reply)
    if at is not None and not _in_txn(req) and capture.behind(at):
        await capture.reached(at)
    return reply


def _targets(req: Request) -> list[tuple[str, str]]:
    """The collections a document write may create."""
    if req.name == "bulkWrite":
        infos = req.cmd.get("nsInfo")
        return [tuple(i["ns"].split(".", 1)) for i in infos  # type: ignore[misc]
                if isinstance(i, dict) and isinstance(i.get("ns"), str) and "." in i["ns"]
                ] if isinstance(infos, list) else []
    if req.name in ("insert", "update", "findAndModify", "findandmodify") \
            and isinstance(req.cmd.get(req.name), str):
        return [(req.db, req.cmd[req.name])]
    return []


def _either(intercepted: Handler) -> Handler:
    """A document write: through the capture when it is exact, else intercepted."""
    async def handler(req: Request) -> dict[str, Any] | None:
        if not active(req):
            return None
        if captured(req):
            return await through_capture(req)
        return await intercepted(req)
    return handler


async def commit_transaction(req: Request) -> dict[str, Any] | None:
    """A transaction's writes appear in the change stream at its commit."""
    return await through_capture(req) if active(req) and captured(req) else None


def _in_txn(req: Request) -> bool:
    return req.cmd.get("autocommit") is False


def _txn(req: Request) -> dict[str, Any] | None:
    if "txnNumber" in req.cmd and isinstance(req.cmd.get("lsid"), dict) and not _in_txn(req):
        return {"lsid": req.cmd["lsid"].get("id"), "n": req.cmd["txnNumber"]}
    return None


async def _docs(req: Request, coll: str, filt: dict[str, Any], *, limit: int = 0,
                sort: Any = None, options: dict[str, Any] | None = None,
                ) -> list[list[dict[str, Any]]]:
    """The documents a statement will change, read from the upstream before it runs."""
    cmd: dict[str, Any] = {"find": coll, "filter": filt, **(options or {})}
    if limit:
        cmd["limit"] = limit
    if sort:
        cmd["sort"] = sort
    out = []
    async for batch in req.engine.pool.batches(req.db, cmd, BATCH):
        out.append(batch)
    return out


async def _by_ids(req: Request, coll: str, ids: list[Any]) -> dict[Any, dict[str, Any]]:
    found: dict[Any, dict[str, Any]] = {}
    for start in range(0, len(ids), snapshot.CHUNK):
        chunk = ids[start:start + snapshot.CHUNK]
        async for batch in req.engine.pool.batches(req.db, {
                "find": coll, "filter": {"_id": {"$in": chunk}}}, BATCH):
            found.update((idkey(d["_id"]), d) for d in batch)
    return found


async def _preserve(req: Request, ns: str, pres: list[tuple[Any, dict[str, Any] | None]]
                    ) -> None:
    await snapshot.preserve(req.engine, naming.MAIN,
                            [Change(ns, i, PUT, pre, None) for i, pre in pres])


async def _log(req: Request, coll: str, pres: list[tuple[Any, dict[str, Any] | None]],
               reply: dict[str, Any] | None = None) -> None:
    """Main's changes in the WAL: the pre-images read before, the documents now."""
    if _in_txn(req):
        return  # not committed yet: what a transaction changes is not logged
    ns = f"{req.db}.{coll}"
    changes: list[Change] = []
    for start in range(0, len(pres), BATCH):
        part = pres[start:start + BATCH]
        now = await _by_ids(req, coll, [i for i, _ in part])
        for value, pre in part:
            post = now.get(idkey(value))
            if pre is None and post is None:
                continue
            if pre is not None and post is not None and same(pre, post):
                continue
            changes.append(Change(ns, value, DELETE if post is None else PUT, pre, post))
    if changes:
        await req.engine.wal.append(naming.MAIN, changes, req.client(), _txn(req), reply)


def _point(req: Request, coll: str, filters: list[Any]) -> Hashable | None:
    if len(filters) != 1 or planner.collated(req.cmd):
        return None
    point = planner.point_id(filters[0])
    return None if point is None else (req.db, coll, idkey(point[0]))


def _statement(req: Request, **lists: Any) -> dict[str, Any]:
    """The client's command with one statement list replaced; a retryable write split in
    several commands is answered by the proxy (txnNumber dropped, the reply remembered)."""
    cmd = {k: v for k, v in req.cmd.items() if k not in _STMT_LISTS and k != "$db"}
    if not _in_txn(req):
        cmd.pop("txnNumber", None)
    cmd.update(lists)
    return cmd


def _recalled(req: Request) -> dict[str, Any] | None:
    return req.engine.recall(_txn(req))


# -- insert ---------------------------------------------------------------------------------
async def insert(req: Request) -> dict[str, Any] | None:
    if not active(req):
        return None
    coll = coll_name(req)
    raw = req.cmd.get("documents")
    if not isinstance(raw, list) or not all(isinstance(d, dict) for d in raw):
        return None  # the upstream answers malformed commands itself
    docs = [d if "_id" in d else {"_id": ObjectId(), **d} for d in raw]
    ids = [d["_id"] for d in docs]
    async with req.engine.writing_main((req.db, coll, idkey(ids[0])) if len(ids) == 1
                                       else None):
        await snapshot.before_collection_write(req.engine, None, req.db, coll)
        now = await _by_ids(req, coll, ids)
        pres = [(i, now.get(idkey(i))) for i in ids]
        await _preserve(req, f"{req.db}.{coll}", pres)
        cmd = {k: v for k, v in req.cmd.items() if k != "$db"}
        cmd["documents"] = docs
        reply = await req.run.reply(req.db, cmd)
        if reply.get("ok") and not _in_txn(req):
            # The documents as sent are what landed: no read back.
            failed = {e.get("index") for e in reply.get("writeErrors", [])}
            stop = min(failed) if failed and req.cmd.get("ordered", True) is not False \
                else len(docs)
            landed = [Change(f"{req.db}.{coll}", d["_id"], PUT, None, d)
                      for i, d in enumerate(docs[:stop]) if i not in failed]
            if landed:
                await req.engine.wal.append(naming.MAIN, landed, req.client(), _txn(req),
                                            reply)
    return reply


# -- update and delete ----------------------------------------------------------------------
def _options(req: Request, stmt: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {k: stmt[k] for k in ("collation", "hint") if k in stmt}
    if "let" in req.cmd:
        options["let"] = req.cmd["let"]
    return options


def _by_id(q: dict[str, Any], update: Any, ids: Any) -> dict[str, Any]:
    """The filter that sends a statement to the documents already read, under main's lock:
    their ids (which every server answers from the index; SecantusDB scans the collection
    for an $and), with the client's filter kept only where the positional $ needs it."""
    positional = isinstance(update, dict) and any(
        key == "$" or key.endswith(".$") or ".$." in key
        for fields in update.values() if isinstance(fields, dict) for key in fields)
    return {"$and": [q, {"_id": ids}]} if positional else {"_id": ids}


def _new_id(q: Any, u: Any) -> Any:
    """The _id an upsert will insert, when it is known before it runs (None: not)."""
    if isinstance(q, dict) and "_id" in q and planner.point_id({"_id": q["_id"]}):
        return q["_id"]
    if isinstance(u, dict) and isinstance(u.get("$setOnInsert"), dict) \
            and "_id" in u["$setOnInsert"]:
        return u["$setOnInsert"]["_id"]
    if isinstance(u, dict) and "_id" in u and not any(k.startswith("$") for k in u):
        return u["_id"]
    return None


def _upsert_id(stmt: dict[str, Any]) -> dict[str, Any]:
    """An upsert whose new _id is chosen here, so the children can hide it before it
    exists; a pipeline update keeps the server's choice."""
    q, u = stmt.get("q") or {}, stmt.get("u")
    point = planner.point_id({"_id": q["_id"]}) if isinstance(q, dict) and "_id" in q else None
    if point is not None or not isinstance(u, dict):
        return stmt
    if not any(k.startswith("$") for k in u):
        return stmt if "_id" in u else {**stmt, "u": {"_id": ObjectId(), **u}}
    if any("_id" in fields for fields in u.values() if isinstance(fields, dict)):
        return stmt
    on_insert = {**(u.get("$setOnInsert") or {}), "_id": ObjectId()}
    return {**stmt, "u": {**u, "$setOnInsert": on_insert}}


async def _run_statement(req: Request, coll: str, kind: str, stmt: dict[str, Any],
                         multi: bool) -> tuple[dict[str, Any], list[tuple[Any, Any]]]:
    """One update/delete statement: pre-images read and preserved, then the statement
    sent for exactly those documents. Returns the reply and the (id, pre-image) pairs
    left to log (a multi-document statement logs its own, a chunk at a time)."""
    ns = f"{req.db}.{coll}"
    q = stmt.get("q") or {}
    lists = "updates" if kind == "update" else "deletes"
    options = _options(req, stmt)
    if multi:
        # Every match first, by _id (a document the write moves must not match twice),
        # then chunk by chunk: pre-images, copy-up, the statement on those ids, the log.
        ids = [d["_id"] async for batch in req.engine.pool.batches(req.db, {
            "find": coll, "filter": q, "projection": {"_id": 1}, **options}, BATCH)
            for d in batch]
        if ids:
            return await _chunked(req, coll, stmt, lists, ids), []
    else:
        found = await _docs(req, coll, q, limit=1, sort=stmt.get("sort"), options=options)
        if found and found[0]:
            pre = found[0][0]
            await _preserve(req, ns, [(pre["_id"], pre)])
            one = {**stmt, "q": _by_id(q, stmt.get("u"), pre["_id"])}
            one.pop("sort", None)
            return await req.run.reply(req.db, _statement(req, **{lists: [one]})), \
                [(pre["_id"], pre)]
    if kind != "update" or not stmt.get("upsert"):
        return {"n": 0, **({"nModified": 0} if kind == "update" else {}), "ok": 1.0}, []
    stmt = _upsert_id(stmt)
    new_id = _new_id(q, stmt.get("u"))
    pres: list[tuple[Any, Any]] = []
    if new_id is not None:
        pres = [(new_id, None)]
        await _preserve(req, ns, pres)
    reply = await req.run.reply(req.db, _statement(req, **{lists: [stmt]}))
    for up in reply.get("upserted", []) if not pres else []:
        pres.append((up["_id"], None))  # a pipeline upsert: hidden now, under the fence
        await _preserve(req, ns, [(up["_id"], None)])
    return reply, pres


async def _chunked(req: Request, coll: str, stmt: dict[str, Any], lists: str,
                   ids: list[Any]) -> dict[str, Any]:
    ns = f"{req.db}.{coll}"
    q = stmt.get("q") or {}
    total: dict[str, Any] = {"n": 0, **({"nModified": 0} if lists == "updates" else {})}
    for start in range(0, len(ids), snapshot.CHUNK):
        chunk = ids[start:start + snapshot.CHUNK]
        now = await _by_ids(req, coll, chunk)
        pres: list[tuple[Any, dict[str, Any] | None]] = [
            (i, now[idkey(i)]) for i in chunk if idkey(i) in now]
        await _preserve(req, ns, pres)
        part = {**stmt, "q": _by_id(q, stmt.get("u"), {"$in": chunk})}
        part.pop("upsert", None)
        reply = await req.run.reply(req.db, _statement(req, **{lists: [part]}))
        await _log(req, coll, pres)
        if not reply.get("ok"):
            return reply
        for key in total:
            total[key] += int(reply.get(key, 0))
        for key in ("writeErrors", "writeConcernError"):
            if key in reply:
                return {**total, key: reply[key], "ok": 1.0}
    return {**total, "ok": 1.0}


async def _statements(req: Request, kind: str) -> dict[str, Any] | None:
    if not active(req):
        return None
    coll = coll_name(req)
    lists = "updates" if kind == "update" else "deletes"
    stmts = req.cmd.get(lists)
    if not isinstance(stmts, list) or not all(isinstance(s, dict) for s in stmts) \
            or not stmts:
        return None
    ordered = req.cmd.get("ordered", True) is not False
    async with req.engine.writing_main(_point(req, coll, [s.get("q") for s in stmts])):
        if (done := _recalled(req)) is not None:
            return done
        if kind == "update":
            await snapshot.before_collection_write(req.engine, None, req.db, coll)
        total: dict[str, Any] = {"n": 0, **({"nModified": 0} if kind == "update" else {})}
        upserted: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        all_pres: list[tuple[Any, Any]] = []
        wc_error = None
        for index, stmt in enumerate(stmts):
            multi = bool(stmt.get("multi")) if kind == "update" else stmt.get("limit") != 1
            reply, pres = await _run_statement(req, coll, kind, stmt, multi)
            all_pres.extend(pres)
            if not reply.get("ok"):
                if len(stmts) == 1:
                    await _log(req, coll, all_pres)
                    return reply
                errors.append({"index": index, "code": reply.get("code", 8),
                               "errmsg": reply.get("errmsg", "")})
            for key in total:
                total[key] += int(reply.get(key, 0))
            upserted.extend({**u, "index": index} for u in reply.get("upserted", []))
            errors.extend({**e, "index": index} for e in reply.get("writeErrors", []))
            wc_error = reply.get("writeConcernError", wc_error)
            if errors and ordered:
                break
            if len(all_pres) >= BATCH:
                await _log(req, coll, all_pres)
                all_pres = []
        # mongod's order: the fields every write reply has, then the update's own.
        result: dict[str, Any] = {"n": total["n"]}
        if errors:
            result["writeErrors"] = errors
        if upserted:
            result["upserted"] = upserted
        if "nModified" in total:
            result["nModified"] = total["nModified"]
        if wc_error is not None:
            result["writeConcernError"] = wc_error
        result["ok"] = 1.0
        await _log(req, coll, all_pres, result)
        req.engine.remember(_txn(req), result)
        return result


async def update(req: Request) -> dict[str, Any] | None:
    return await _statements(req, "update")


async def delete(req: Request) -> dict[str, Any] | None:
    return await _statements(req, "delete")


# -- findAndModify ----------------------------------------------------------------------------
async def find_and_modify(req: Request) -> dict[str, Any] | None:
    if not active(req):
        return None
    coll = coll_name(req)
    cmd = req.cmd
    q = cmd.get("query") or {}
    if not isinstance(q, dict):
        return None
    ns = f"{req.db}.{coll}"
    options: dict[str, Any] = {k: cmd[k] for k in ("collation", "hint", "let") if k in cmd}
    async with req.engine.writing_main(_point(req, coll, [q])):
        await snapshot.before_collection_write(req.engine, None, req.db, coll)
        found = [d for batch in await _docs(req, coll, q, limit=1, sort=cmd.get("sort"),
                                            options=options) for d in batch]
        out = {k: v for k, v in cmd.items() if k != "$db"}
        pres: list[tuple[Any, Any]] = []
        if found:
            pres = [(found[0]["_id"], found[0])]
            out["query"] = _by_id(q, cmd.get("update"), found[0]["_id"])
        elif cmd.get("upsert") and not cmd.get("remove"):
            out["update"] = _upsert_id({"q": q, "u": cmd.get("update")})["u"]
            new_id = _new_id(q, out["update"])
            if new_id is not None:
                pres = [(new_id, None)]
        if pres:
            await _preserve(req, ns, pres)
        reply = await req.run.reply(req.db, out)
        upserted = (reply.get("lastErrorObject") or {}).get("upserted")
        if upserted is not None and not pres:
            pres = [(upserted, None)]
            await _preserve(req, ns, pres)
        await _log(req, coll, pres)
    return reply


# -- collection-level changes -------------------------------------------------------------------
async def _caught_up(req: Request) -> None:
    """Before children copy what they show of a collection main is about to change:
    main's writes acknowledged so far are preserved for them (the capture runs behind
    the upstream), so no copy holds a change of main a child never saw."""
    if req.engine.capture is not None:
        await req.engine.capture.barrier()


async def ddl(req: Request) -> dict[str, Any] | None:
    """Children take their own copy of the collections named, then the command runs."""
    if not active(req):
        return None
    name = req.name
    async with req.engine.writing_main():
        await _caught_up(req)
        req.engine.main_collections.clear()
        if name == "renameCollection":
            source, target = req.cmd.get("renameCollection"), req.cmd.get("to")
            for full in (source, target):
                if isinstance(full, str) and "." in full:
                    db, coll = full.split(".", 1)
                    await snapshot.freeze(req.engine, naming.MAIN, db, [coll])
        elif name == "dropDatabase":
            # The children's overlays live in this database: main's collections are
            # dropped one by one, theirs stay.
            colls = [c["name"] async for batch in req.engine.pool.batches(req.db, {
                "listCollections": 1, "nameOnly": True}) for c in batch
                     if not c["name"].startswith(("system.", naming.PREFIX))]
            await snapshot.freeze(req.engine, naming.MAIN, req.db, colls)
            for coll in colls:
                reply = await req.run.reply(req.db, {"drop": coll})
                if not reply.get("ok") and reply.get("code") != 26:
                    return reply
            return {"dropped": req.db, "ok": 1.0}
        else:
            # cloneCollectionAsCapped makes its target (its source stays as it is).
            target = req.cmd.get("toCollection") if name == "cloneCollectionAsCapped" \
                else coll_name(req)
            if not isinstance(target, str) or not target:
                raise CommandError(Code.INVALID_NAMESPACE,
                                   f"collection name must be a non-empty string, not {target!r}")
            coll = target
            # A new index changes no document and no read a child can make of the base;
            # a dropped one would fail the child's hints, so the child copies the
            # collection, as for every other change.
            await snapshot.freeze(req.engine, naming.MAIN, req.db, [coll],
                                  indexes_only=name == "createIndexes")
        return await req.run.reply(req.db, {k: v for k, v in req.cmd.items() if k != "$db"})


async def aggregate(req: Request) -> dict[str, Any] | None:
    """Only an aggregation writing with $out or $merge changes main."""
    if not active(req):
        return None
    pipeline = req.cmd.get("pipeline")
    last = pipeline[-1] if isinstance(pipeline, list) and pipeline else None
    if not isinstance(last, dict) or not ({"$out", "$merge"} & set(last)):
        return None
    spec = last.get("$out", last.get("$merge"))
    target = spec.get("into", spec.get("coll")) if isinstance(spec, dict) else spec
    db = req.db
    if isinstance(spec, dict) and isinstance(spec.get("db"), str):
        db = spec["db"]
    if isinstance(target, dict):
        db, target = target.get("db", db), target.get("coll")
    if not isinstance(target, str) or not isinstance(db, str):
        return None
    if "$merge" in last and captured(req):
        return await through_capture(req)
    async with req.engine.writing_main():
        await _caught_up(req)
        req.engine.main_collections.clear()
        await snapshot.freeze(req.engine, naming.MAIN, db, [target])
        return await req.run.reply(req.db, {k: v for k, v in req.cmd.items() if k != "$db"})


_WHY = {"applyOps": "an internal command of mongod whose oplog entries may name any "
                    "namespace and command",
        "mapReduce": "deprecated by mongod since 5.0; run the equivalent aggregation "
                     "($group, $merge), which is preserved"}


async def refused(req: Request) -> dict[str, Any] | None:
    out = req.cmd.get("out")
    if not active(req) or (req.name == "mapReduce" and isinstance(out, dict)
                           and "inline" in out):
        return None  # an inline mapReduce writes nothing
    raise CommandError(Code.ILLEGAL_OPERATION,
                       f"{req.name} is refused on main while main has child branches "
                       f"(mongobranch cannot preserve what it changes for them): "
                       f"{_WHY[req.name]}")


HANDLERS: dict[str, Handler] = {
    "insert": _either(insert), "update": _either(update), "delete": _either(delete),
    "findAndModify": _either(find_and_modify), "findandmodify": _either(find_and_modify),
    "commitTransaction": commit_transaction, "aggregate": aggregate,
    **dict.fromkeys(DDL, ddl), **dict.fromkeys(REFUSED, refused),
}
