"""The client-level `bulkWrite` command (MongoDB 8.0) on a branch port.

One command carries inserts, updates and deletes on several namespaces. Each op runs
through the branch's own insert/update/delete handlers for its namespace, so it gets
exactly their copy-on-write, WAL entries and unique checks; this module only splits
the command and assembles mongod's reply: a cursor of per-op results (`ok`, `idx`,
`n`, `nModified`, `upserted`, or the error's fields), then `nErrors`, `nInserted`,
`nMatched`, `nModified`, `nUpserted`, `nDeleted`.

Consecutive inserts into one namespace run as one insert command (one lock, one WAL
append); updates and deletes run one op at a time, since mongod reports each op's
counts.

Retries (same `lsid` + `txnNumber`) are answered op by op, as mongod answers them from
the statements it recorded: each op's write carries the bulkWrite's identity and the
op's index (overlay.Stmts), so the op's last WAL entry holds its outcome (the reply of
its per-namespace write), which the engine remembers and reloads at start-up. An
attempt, the first or a retry, runs only the ops with no outcome recorded and puts the
recorded ones in its reply: across a restart, even one that cut the first attempt off
midway, each op is applied once. An op that changed nothing has no WAL entry and runs
again after a restart (as a statement mongod did not execute would), which gives the
same result unless other writes changed its documents meanwhile. The whole reply is
remembered too, in memory, for a retry to the same process.
"""

from __future__ import annotations

from typing import Any

from proxy.branching import overlay
from proxy.branching.commands import mainwrite, viewdefs, write
from proxy.branching.commands.base import (
    SESSION_FIELDS,
    Handler,
    Request,
    carry,
    cursor_reply,
)
from proxy.branching.errors import CommandError
from proxy.branching.txn import in_transaction
from proxy.wire.codes import Code

# Carried from the bulkWrite onto each per-namespace command it runs. Not txnNumber:
# one txnNumber on several sub-commands would make the second look like a retry of the
# first; each carries its ops' own identity instead (Request.stmts).
_CARRY = tuple(f for f in SESSION_FIELDS
               if f not in ("txnNumber", "autocommit", "startTransaction", "$db"))
_OPTIONS = ("bypassDocumentValidation", "let")


def _namespaces(cmd: dict[str, Any]) -> list[tuple[str, str]]:
    infos = cmd.get("nsInfo")
    if not isinstance(infos, list) or not infos:
        raise CommandError(Code.FAILED_TO_PARSE, "BSON field 'bulkWrite.nsInfo' is missing")
    out = []
    for info in infos:
        ns = info.get("ns") if isinstance(info, dict) else None
        db, _, coll = ns.partition(".") if isinstance(ns, str) else ("", "", "")
        if not db or not coll:
            raise CommandError(Code.INVALID_NAMESPACE, f"Invalid namespace specified '{ns}'")
        out.append((db, coll))
    return out


def _kind(op: Any, n_ns: int) -> tuple[str, int]:
    if not isinstance(op, dict):
        raise CommandError(Code.TYPE_MISMATCH, "bulkWrite ops must be documents")
    for kind in ("insert", "update", "delete"):
        if kind in op:
            index = op[kind]
            if isinstance(index, bool) or not isinstance(index, int):
                raise CommandError(Code.TYPE_MISMATCH,
                                   f"BSON field '{kind}' is the wrong type, expected int")
            if not 0 <= index < n_ns:
                raise CommandError(Code.BAD_VALUE,
                                   f"BulkWrite {kind} at index {index} has an invalid nsInfo index")
            return kind, index
    raise CommandError(Code.UNRECOGNIZED_BULK_WRITE_OP,
                       "Unrecognized bulkWrite op: needs insert, update or delete")


# A view refuses each op naming it, as mongod does (CommandNotSupportedOnView).
_BRANCH: dict[str, Handler] = {"insert": viewdefs.not_on_views(write.insert),
                               "update": viewdefs.not_on_views(write.update),
                               "delete": viewdefs.not_on_views(write.delete)}
_MAIN: dict[str, Handler] = {"insert": mainwrite.insert, "update": mainwrite.update,
                             "delete": mainwrite.delete}


def _error_item(idx: int, err: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {"ok": 0.0, "idx": idx}
    item.update({k: v for k, v in err.items() if k != "index"})
    return item


class _Bulk:
    def __init__(self, req: Request, txn: dict[str, Any] | None):
        self.req = req
        # On a branch, each op's outcome is logged under the bulkWrite's identity and
        # the op's index; main's writes (mainwrite.py) remember their replies in memory
        # only, so there the whole reply is all that is remembered.
        self.txn = txn if req.branch is not None else None
        self.items: list[dict[str, Any]] = []
        self.totals = {"nErrors": 0, "nInserted": 0, "nMatched": 0, "nModified": 0,
                       "nUpserted": 0, "nDeleted": 0}
        self.wc_error: dict[str, Any] | None = None

    async def run(self, kind: str, db: str, coll: str, body: dict[str, Any], ops: list[int]
                  ) -> dict[str, Any]:
        """The per-namespace write of these ops (its statements, in order); a write of
        one op whose outcome is recorded answers with it (write._handle)."""
        cmd: dict[str, Any] = {kind: coll, **body}
        carry(self.req.cmd, cmd, _CARRY + _OPTIONS)
        cmd["$db"] = db
        stmts = overlay.Stmts(self.txn, ops) if self.txn is not None else None
        sub = Request(self.req.engine, self.req.branch, self.req.ctx, self.req.run, db, cmd,
                      stmts)
        # On main (which has children, or this would have been forwarded) each operation
        # goes through the main port's preserving write path.
        table = _BRANCH if self.req.branch is not None else _MAIN
        try:
            reply = await table[kind](sub)
            if reply is None:  # main's last child went meanwhile: nothing to preserve
                reply = await self.req.run.reply(db, {k: v for k, v in cmd.items()
                                                      if k != "$db"})
        except CommandError as exc:
            reply = exc.to_reply()
        if "writeConcernError" in reply:
            self.wc_error = reply["writeConcernError"]
        return reply

    def fail(self, idx: int, err: dict[str, Any], **counts: int) -> None:
        self.totals["nErrors"] += 1
        self.items.append({**_error_item(idx, err), **counts})

    def recalled(self, idx: int) -> dict[str, Any] | None:
        """The outcome recorded for this op by an earlier attempt of the bulkWrite."""
        return self.req.engine.recall({**self.txn, "stmt": idx}) if self.txn else None

    async def inserts(self, db: str, coll: str, ops: list[tuple[int, dict[str, Any]]],
                      ordered: bool) -> bool:
        """Runs a run of inserts into one namespace, but those an earlier attempt
        recorded; False when an ordered bulk stops."""
        # Each op's outcome, as the reply of an insert of its document alone.
        outcomes = {idx: done for idx, _ in ops if (done := self.recalled(idx)) is not None}
        todo = [(idx, op) for idx, op in ops if idx not in outcomes]
        if todo:
            reply = await self.run("insert", db, coll, {
                "documents": [op.get("document") for _, op in todo], "ordered": ordered},
                [idx for idx, _ in todo])
            if not reply.get("ok"):
                for idx, _ in todo[:1] if ordered else todo:
                    outcomes[idx] = reply
            else:
                failed = {e["index"]: e for e in reply.get("writeErrors", [])}
                for offset, (idx, _) in enumerate(todo):
                    if offset in failed:
                        outcomes[idx] = {"n": 0, "writeErrors": [failed[offset]], "ok": 1.0}
                    elif not (ordered and failed and offset > min(failed)):
                        outcomes[idx] = dict(overlay.INSERTED)
        going = True
        for idx, _ in ops:
            outcome = outcomes.get(idx)
            if outcome is None:  # after an ordered run's error: never run
                return False
            if not outcome.get("ok"):
                self.fail(idx, _command_error(outcome), n=0)
                going = False
            elif outcome.get("writeErrors"):
                self.fail(idx, outcome["writeErrors"][0], n=0)
                going = False
            else:
                self.totals["nInserted"] += 1
                self.items.append({"ok": 1.0, "idx": idx, "n": 1})
            if not going and ordered:
                return False
        return going

    async def update(self, idx: int, db: str, coll: str, op: dict[str, Any]) -> bool:
        stmt: dict[str, Any] = {"q": op.get("filter", {}), "u": op.get("updateMods")}
        for src, dst in (("arrayFilters", "arrayFilters"), ("multi", "multi"),
                         ("upsert", "upsert"), ("hint", "hint"), ("collation", "collation"),
                         ("sort", "sort"), ("constants", "c")):
            if src in op:
                stmt[dst] = op[src]
        reply = await self.run("update", db, coll, {"updates": [stmt]}, [idx])
        if not reply.get("ok"):
            self.fail(idx, _command_error(reply), n=0, nModified=0)
            return False
        upserted = reply.get("upserted") or []
        n, modified = int(reply.get("n", 0)), int(reply.get("nModified", 0))
        if reply.get("writeErrors"):
            self.fail(idx, reply["writeErrors"][0], n=n, nModified=modified)
            return False
        self.totals["nMatched"] += n - len(upserted)
        self.totals["nModified"] += modified
        self.totals["nUpserted"] += len(upserted)
        item: dict[str, Any] = {"ok": 1.0, "idx": idx, "n": n, "nModified": modified}
        if upserted:
            item["upserted"] = {"_id": upserted[0]["_id"]}
        self.items.append(item)
        return True

    async def delete(self, idx: int, db: str, coll: str, op: dict[str, Any]) -> bool:
        stmt: dict[str, Any] = {"q": op.get("filter", {}), "limit": 0 if op.get("multi") else 1}
        for key in ("hint", "collation"):
            if key in op:
                stmt[key] = op[key]
        reply = await self.run("delete", db, coll, {"deletes": [stmt]}, [idx])
        if not reply.get("ok"):
            self.fail(idx, _command_error(reply), n=0)
            return False
        n = int(reply.get("n", 0))
        if reply.get("writeErrors"):
            self.fail(idx, reply["writeErrors"][0], n=n)
            return False
        self.totals["nDeleted"] += n
        self.items.append({"ok": 1.0, "idx": idx, "n": n})
        return True


def _command_error(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: reply[k] for k in ("code", "codeName", "errmsg", "errInfo", "errorLabels")
            if k in reply}


async def bulk_write(req: Request) -> dict[str, Any]:
    if req.db != "admin":
        raise CommandError(Code.UNAUTHORIZED,
                           "bulkWrite may only be run against the admin database.")
    if req.branch is None and in_transaction(req.cmd):
        # The main port splits it into main's own writes only without the capture; they
        # would run outside the client's transaction.
        raise CommandError(Code.OPERATION_NOT_SUPPORTED_IN_TRANSACTION,
                           "bulkWrite cannot run in a multi-document transaction on the main "
                           "port while main has child branches and the capture is off")
    txn = overlay.txn_of(req.cmd)
    if (done := req.engine.recall(txn)) is not None:
        return done
    cmd = req.cmd
    namespaces = _namespaces(cmd)
    ops = cmd.get("ops")
    if not isinstance(ops, list):
        raise CommandError(Code.FAILED_TO_PARSE, "BSON field 'bulkWrite.ops' is missing")
    kinds = [_kind(op, len(namespaces)) for op in ops]
    for op, (kind, _) in zip(ops, kinds, strict=True):
        if kind == "insert" and not isinstance(op.get("document"), dict):
            raise CommandError(Code.TYPE_MISMATCH,
                               "BSON field 'insert.document' is the wrong type, expected object")
    ordered = cmd.get("ordered", True) is not False
    async with req.engine.retrying(txn):
        if (done := req.engine.recall(txn)) is not None:
            return done  # an attempt that ran while this one waited
        reply = await _run(req, txn, namespaces, ops, kinds, ordered)
        req.engine.remember(txn, reply)
    return reply


async def _run(req: Request, txn: dict[str, Any] | None, namespaces: list[tuple[str, str]],
               ops: list[Any], kinds: list[tuple[str, int]], ordered: bool) -> dict[str, Any]:
    cmd = req.cmd
    bulk = _Bulk(req, txn)
    i = 0
    while i < len(ops):
        kind, ns_index = kinds[i]
        db, coll = namespaces[ns_index]
        if kind == "insert":
            j = i
            while j < len(ops) and kinds[j] == (kind, ns_index):
                j += 1
            going = await bulk.inserts(db, coll, list(zip(range(i, j), ops[i:j], strict=True)),
                                       ordered)
            i = j
        elif kind == "update":
            going = await bulk.update(i, db, coll, ops[i])
            i += 1
        else:
            going = await bulk.delete(i, db, coll, ops[i])
            i += 1
        if not going and ordered:
            break
    items = bulk.items
    if cmd.get("errorsOnly"):
        items = [item for item in items if not item["ok"]]
    reply = cursor_reply("admin.$cmd.bulkWrite", items)
    reply.pop("ok")
    reply.update(bulk.totals)
    if bulk.wc_error is not None:
        reply["writeConcernError"] = bulk.wc_error
    reply["ok"] = 1.0
    return reply


async def bulk_write_on_main(req: Request) -> dict[str, Any] | None:
    """The main port: forwarded as it is unless main has children, whose views each
    operation must first preserve (or the capture does: mainwrite.captured)."""
    if not mainwrite.active(req):
        return None
    if mainwrite.captured(req):
        return await mainwrite.through_capture(req)
    return await bulk_write(req)
