"""Who may do what through mongobranch: the upstream judges, on the caller's connection.

The proxy's own credentials (the --upstream URI) serve its metadata and WAL. Whether a
client may run a branch operation is asked of the upstream by a probe that changes
nothing, sent on the client's own authenticated connection: the upstream applies its
users, roles and custom roles, and the proxy only reads the verdict. Probes are used
rather than `connectionStatus {showPrivileges: true}` so that no privilege matching
is re-implemented here (and SecantusDB answers that list empty).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from bson.binary import UUID_SUBTYPE, Binary
from bson.int64 import Int64
from bson.objectid import ObjectId

from proxy.branching.errors import CommandError
from proxy.branching.naming import is_reserved
from proxy.branching.runner import CLIENT_SESSION_FIELDS, Runner, error_from
from proxy.wire.codes import Code

# Matches no document: the probes below read or change nothing.
_NOTHING: dict[str, Any] = {"_id": {"$in": []}}


def unauthorized(message: str) -> CommandError:
    return CommandError(Code.UNAUTHORIZED, message)


async def _probe(run: Runner, db: str, cmd: dict[str, Any]) -> str | None:
    """None when the upstream allows the probe, else its refusal's message."""
    reply = await run.reply(db, cmd)
    if reply.get("ok"):
        return None
    if reply.get("code") == Code.UNAUTHORIZED:
        return str(reply.get("errmsg", "not authorized"))
    raise error_from(reply)


async def require_manage(run: Runner, meta_db: str, operation: str) -> None:
    """Creating, dropping, resetting, merging, migrating branches and gc: the caller must
    be allowed to write the metadata database (the `remove` action on its `branches`
    collection, which `readWrite` on that database grants)."""
    refused = await _probe(run, meta_db, {"delete": "branches",
                                          "deletes": [{"q": _NOTHING, "limit": 1}]})
    if refused is not None:
        raise unauthorized(
            f"not authorized to run {operation}: it needs write access to the mongobranch "
            f"metadata database {meta_db!r} (readWrite on {meta_db!r}); the upstream "
            f"answered: {refused}")


async def require_view(run: Runner, meta_db: str, operation: str) -> None:
    """Listing branches and reading their history: the caller must be allowed to read
    the metadata database (the `find` action on its `branches` collection)."""
    refused = await _probe(run, meta_db, {"find": "branches", "filter": _NOTHING,
                                          "limit": 1, "singleBatch": True})
    if refused is not None:
        raise unauthorized(
            f"not authorized to run {operation}: it needs read access to the mongobranch "
            f"metadata database {meta_db!r} (read on {meta_db!r}); the upstream answered: "
            f"{refused}")


async def require_write(run: Runner, db: str, coll: str, operation: str) -> None:
    """Before a merge changes a collection: the caller may update and delete in it, as
    it could on the upstream directly. Probed first so that a refusal leaves the merge
    unapplied rather than half applied; the writes themselves run on the caller's
    connection as well, so the upstream judges each of them too."""
    for probe in ({"update": coll, "updates": [{"q": _NOTHING,
                                                "u": {"$set": {"_mb_probe": 1}}}]},
                  {"delete": coll, "deletes": [{"q": _NOTHING, "limit": 1}]}):
        refused = await _probe(run, db, probe)
        if refused is not None:
            raise unauthorized(
                f"not authorized to run {operation}: it writes {db}.{coll}, which this user "
                f"may not change; the upstream answered: {refused}")


# -- a transaction's statements ------------------------------------------------------------

# Stages that must open a pipeline: the probe's empty $match goes after them.
_FIRST_STAGES = frozenset({"$documents", "$geoNear", "$search", "$searchMeta", "$vectorSearch",
                           "$collStats", "$indexStats", "$currentOp", "$listSessions",
                           "$listLocalSessions", "$planCacheStats", "$changeStream"})


def _insert_probe(coll: Any, bypass: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    return {"insert": coll, "documents": [{"_id": ObjectId()}], **bypass}, True


def _update_probe(coll: Any, bypass: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    return {"update": coll, "updates": [{"q": _NOTHING, "u": {"$set": {"_mb_probe": 1}}}],
            **bypass}, False


def _delete_probe(coll: Any) -> tuple[dict[str, Any], bool]:
    return {"delete": coll, "deletes": [{"q": _NOTHING, "limit": 1}]}, False


def _find_probe(coll: Any) -> tuple[dict[str, Any], bool]:
    return {"find": coll, "filter": _NOTHING, "limit": 1, "singleBatch": True}, False


def _write_probes(kind: str, coll: Any, upsert: bool, bypass: dict[str, Any]
                  ) -> Iterator[tuple[dict[str, Any], bool]]:
    if kind == "delete":
        yield _delete_probe(coll)
        return
    if kind == "insert":
        yield _insert_probe(coll, bypass)
        return
    yield _update_probe(coll, bypass)
    if upsert:
        yield _insert_probe(coll, bypass)


def _statement_probes(db: str, cmd: dict[str, Any]
                      ) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(database, probe, whether it writes) for each action a statement needs, on the
    namespaces the client named, as the client would need them on the upstream itself."""
    name = next(iter(cmd))
    target = cmd[name]
    bypass = {"bypassDocumentValidation": True} if cmd.get("bypassDocumentValidation") else {}
    if name == "find":
        yield db, *_find_probe(target)
    elif name == "distinct":
        yield db, {"distinct": target, "key": "_id", "query": _NOTHING}, False
    elif name == "aggregate":
        # Every namespace the pipeline names is judged when the upstream parses it; no
        # document reaches a stage past the $match, and one at most comes back.
        stages = list(cmd.get("pipeline") or [])
        head = stages[:1] if stages and isinstance(stages[0], dict) \
            and next(iter(stages[0]), None) in _FIRST_STAGES else []
        yield db, {"aggregate": target, "cursor": {}, "pipeline": [
            *head, {"$match": _NOTHING}, *stages[len(head):], {"$limit": 1}]}, False
    elif name in ("insert", "update", "delete"):
        upsert = any(isinstance(u, dict) and u.get("upsert") for u in cmd.get("updates") or [])
        for probe, writes in _write_probes(name, target, upsert, bypass):
            yield db, probe, writes
    elif name in ("findAndModify", "findandmodify"):
        yield db, *_find_probe(target)
        for probe, writes in _write_probes("delete" if cmd.get("remove") else "update",
                                           target, bool(cmd.get("upsert")), bypass):
            yield db, probe, writes
    elif name == "bulkWrite":
        namespaces = [info.get("ns") for info in cmd.get("nsInfo") or []
                      if isinstance(info, dict)]
        for op in cmd.get("ops") or []:
            if not isinstance(op, dict) or not op:
                continue
            kind = next(iter(op))
            index = op[kind]
            ns = _namespace(namespaces[index]) \
                if isinstance(index, int) and 0 <= index < len(namespaces) else None
            if ns is not None:
                for probe, writes in _write_probes(kind, ns[1], bool(op.get("upsert")),
                                                   bypass):
                    yield ns[0] or db, probe, writes
    elif name in ("create", "createIndexes"):
        # A copy of the client's command runs in no session of the client's.
        yield db, {k: v for k, v in cmd.items() if k not in CLIENT_SESSION_FIELDS}, True


async def require_statement(run: Runner, db: str, cmd: dict[str, Any]) -> None:
    """A statement of a multi-document transaction on a branch runs in the engine's
    session, as the --upstream URI's user: first the client's own connection is asked
    whether it may do what the statement does, on the namespaces it names. Probes that
    read or write nothing ask it of reads, updates and deletes; an insert or a creation
    is asked by doing one in a transaction of the probe's own, always aborted, so
    nothing the upstream makes of it stays."""
    seen: set[str] = set()
    for probe_db, probe, writes in _statement_probes(db, cmd):
        key = f"{probe_db}:{next(iter(probe))}:{probe[next(iter(probe))]}:{writes}"
        if key in seen:
            continue
        seen.add(key)
        refused = await (_probe_aborted(run, probe_db, probe) if writes
                         else _refusal(run, probe_db, probe))
        if refused is not None:
            raise unauthorized(refused)


async def _refusal(run: Runner, db: str, cmd: dict[str, Any]) -> str | None:
    """The upstream's refusal of a probe, if it refused it: any other error is the
    statement's own to meet when it runs."""
    reply = await run.reply(db, cmd)
    if reply.get("code") == Code.UNAUTHORIZED:
        return str(reply.get("errmsg", "not authorized"))
    return None


async def _probe_aborted(run: Runner, db: str, cmd: dict[str, Any]) -> str | None:
    lsid = {"id": Binary(uuid.uuid4().bytes, UUID_SUBTYPE)}
    txn = {"lsid": lsid, "txnNumber": Int64(1), "autocommit": False}
    try:
        return await _refusal(run, db, {**cmd, **txn, "startTransaction": True})
    finally:
        await run.reply("admin", {"abortTransaction": 1, **txn})
        await run.reply("admin", {"endSessions": [lsid]})


# -- what a branch port never serves --------------------------------------------------------


def _names(value: Any, key: str) -> Iterator[tuple[str | None, str]]:
    """(db or None, collection) pairs an aggregation stage argument names."""
    if isinstance(value, str):
        yield None, value
    elif isinstance(value, dict):
        target = value.get(key)
        if isinstance(target, str):
            db = value.get("db")
            yield (db if isinstance(db, str) else None), target
        elif isinstance(target, dict):
            yield from _names(target, "coll")


_STAGE_TARGETS = {"$lookup": "from", "$graphLookup": "from", "$unionWith": "coll",
                  "$out": "coll", "$merge": "into"}


def _pipeline_refs(value: Any) -> Iterator[tuple[str | None, str]]:
    """Every namespace a pipeline reads or writes, sub-pipelines and $facet included."""
    if isinstance(value, list):
        for item in value:
            yield from _pipeline_refs(item)
    elif isinstance(value, dict):
        for key, arg in value.items():
            target = _STAGE_TARGETS.get(key)
            if target is not None:
                yield from _names(arg, target)
            if isinstance(arg, dict | list):
                yield from _pipeline_refs(arg)


def _namespace(full: Any) -> tuple[str | None, str] | None:
    if isinstance(full, str) and "." in full:
        db, coll = full.split(".", 1)
        return db, coll
    return None


def _refs(cmd: dict[str, Any]) -> Iterator[tuple[str | None, str]]:
    name = next(iter(cmd))
    target = cmd[name]
    if isinstance(target, dict) and target:
        yield from _refs(target)  # explain wraps the command it explains
        return
    if name == "getMore":
        target = cmd.get("collection")
    if name == "renameCollection":
        for full in (target, cmd.get("to")):
            ns = _namespace(full)
            if ns is not None:
                yield ns
        return
    if isinstance(target, str):
        yield None, target
    if "pipeline" in cmd:
        yield from _pipeline_refs(cmd["pipeline"])


def check_branch_port(cmd: dict[str, Any], db: str, meta_db: str, branch: str) -> None:
    """Refuse what would read or change mongobranch's own data through a branch port:
    the metadata database (the WAL holds every branch's writes) and the reserved
    overlay collections (other branches' private documents)."""
    name = next(iter(cmd))
    if db == meta_db:
        raise unauthorized(
            f"not authorized on {db} to execute command {name} through branch {branch!r}: "
            f"{db!r} is mongobranch's metadata database")
    for ref_db, coll in _refs(cmd):
        if ref_db == meta_db:
            raise unauthorized(
                f"not authorized on {ref_db} to execute command {name} through branch "
                f"{branch!r}: {ref_db!r} is mongobranch's metadata database")
        if is_reserved(coll):
            raise unauthorized(
                f"not authorized on {ref_db or db} to execute command {name} through branch "
                f"{branch!r}: {coll!r} is a name reserved for mongobranch's overlays")
