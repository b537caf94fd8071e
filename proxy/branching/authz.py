"""Who may do what through mongobranch: the upstream judges, on the caller's connection.

The proxy's own credentials (the --upstream URI) serve its metadata and WAL. Whether a
client may run a branch operation is asked of the upstream by a probe that changes
nothing, sent on the client's own authenticated connection: the upstream applies its
users, roles and custom roles, and the proxy only reads the verdict. Probes are used
rather than `connectionStatus {showPrivileges: true}` so that no privilege matching
is re-implemented here (and SecantusDB answers that list empty).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from proxy.branching.errors import CommandError
from proxy.branching.naming import is_reserved
from proxy.branching.runner import Runner, error_from
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
