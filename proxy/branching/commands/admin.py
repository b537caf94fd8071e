"""Branch management over the wire, on the admin database of any port: the wire edge of
the branch operations (operations.py).

Each handler checks who may run it (authz), parses the command's fields with requests.py
(the command names the branch; camelCase fields are spelled as the shell does) and
shapes the operation's answer as a command reply. A BranchError becomes mongod's error
reply in one place, `_wire`, with the code of its kind.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import bson

from proxy.branching import authz, history, operations
from proxy.branching import requests as rq
from proxy.branching.commands.base import SESSION_FIELDS, Request
from proxy.branching.errors import BranchError, CommandError, Kind
from proxy.wire.codes import Code

_CODES = {Kind.INVALID: Code.BAD_VALUE, Kind.NOT_FOUND: Code.NAMESPACE_NOT_FOUND,
          Kind.FORBIDDEN: Code.ILLEGAL_OPERATION,
          Kind.CONFLICT: Code.CONFLICTING_OPERATION_IN_PROGRESS,
          Kind.UNAVAILABLE: Code.HOST_UNREACHABLE}

# branchDiff answers in one document: beyond this many changes (or bytes) it refers the
# user to the HTTP API, which streams.
DIFF_LIMIT = 10_000
DIFF_BYTES = 12 * 1024 * 1024
# Fields the wire spells otherwise than requests.py (and the HTTP API) do.
_LABELS = {"dry_run": "dryRun", "before_lsn": "beforeLsn"}

Handler = Callable[[Request], Awaitable[dict[str, Any]]]


def _wire(handler: Handler) -> Handler:
    """The one place a branch failure becomes a command error."""

    @functools.wraps(handler)
    async def run(req: Request) -> dict[str, Any]:
        try:
            return await handler(req)
        except BranchError as exc:
            raise CommandError(_CODES.get(exc.kind, Code.INTERNAL_ERROR), str(exc)) from exc

    return run


def _admin_only(req: Request) -> None:
    if req.db != "admin":
        raise CommandError(Code.UNAUTHORIZED,
                           f"{req.name} may only be run against the admin database.")


async def _may_manage(req: Request) -> None:
    """Changing branches: the upstream must let the caller write the metadata database."""
    _admin_only(req)
    await authz.require_manage(req.run, req.engine.meta_db, req.name)


async def _may_view(req: Request) -> None:
    """Reading branches and their history: the caller must be able to read the metadata
    database (the WAL it is computed from)."""
    _admin_only(req)
    await authz.require_view(req.run, req.engine.meta_db, req.name)


def _target(req: Request) -> str:
    """The branch name a command names (branchInfo, dropBranch, the history commands)."""
    value = req.cmd.get(req.name)
    if not isinstance(value, str):
        raise CommandError(Code.BAD_VALUE,
                           f"{req.name} takes a branch name (a string), got {value!r}")
    return value


def _fields(req: Request, keep_name: bool = False) -> rq.Fields:
    """The command's own fields for requests.py: without the session's fields and `$`
    options (and the command's name, unless it is the request's `name`)."""
    values = {k: v for k, v in req.cmd.items()
              if k not in SESSION_FIELDS and not k.startswith("$")
              and (keep_name or k != req.name)}
    labels = {**_LABELS, "name": req.name} if keep_name else _LABELS
    return rq.Fields(values, command=req.name, labels=labels)


@_wire
async def create_branch(req: Request) -> dict[str, Any]:
    await _may_manage(req)
    branch = await operations.create(req.engine, rq.parse_create(_fields(req, keep_name=True)))
    return {**req.engine.public(branch), "ok": 1.0}


@_wire
async def list_branches(req: Request) -> dict[str, Any]:
    await _may_view(req)
    return {"branches": operations.list_branches(req.engine, rq.ListBranches()), "ok": 1.0}


@_wire
async def branch_info(req: Request) -> dict[str, Any]:
    await _may_view(req)
    return {**await req.engine.describe(_target(req)), "ok": 1.0}


@_wire
async def drop_branch(req: Request) -> dict[str, Any]:
    await _may_manage(req)
    drop = rq.parse_drop(_target(req), _fields(req))
    if req.branch is not None and req.branch.name == drop.name:
        # Dropping closes the branch's port, which would wait on this very request.
        raise CommandError(Code.ILLEGAL_OPERATION,
                           f"branch {drop.name!r} cannot be dropped through its own port; run "
                           "dropBranch on the main port or on another branch's port")
    result = await operations.drop(req.engine, drop)
    # As before lifecycle: just ok; a drop kept for restore says until when.
    until = result.get("restorable_until")
    return {"restorableUntil": until, "ok": 1.0} if until else {"ok": 1.0}


# -- history -------------------------------------------------------------------------------
@_wire
async def branch_log(req: Request) -> dict[str, Any]:
    """{branchLog: name, limit?, beforeLsn?}: WAL entries, newest first."""
    await _may_view(req)
    log = rq.parse_log(_target(req), _fields(req))
    return {"branch": log.name, "entries": await operations.log(req.engine, log), "ok": 1.0}


@_wire
async def branch_diff(req: Request) -> dict[str, Any]:
    """{branchDiff: name}: the changes in one document, up to DIFF_LIMIT of them."""
    await _may_view(req)
    diff = rq.parse_diff(_target(req), _fields(req))
    name = diff.name
    parent, stream = operations.diff(req.engine, diff)
    changes: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    size = 0
    async with contextlib.aclosing(stream):
        async for change in stream:
            size += len(bson.encode(change))
            if len(changes) >= DIFF_LIMIT or size > DIFF_BYTES:
                what = (f"more than {DIFF_LIMIT} changes" if len(changes) >= DIFF_LIMIT
                        else f"more than {DIFF_BYTES // (1024 * 1024)} MiB of changes")
                raise CommandError(
                    Code.BSON_OBJECT_TOO_LARGE,
                    f"branchDiff: branch {name!r} has {what}, too many for one reply; "
                    f"use the admin HTTP API, which streams the diff: GET "
                    f"/branches/{name}/diff (or `mongobranch branch diff {name} --json`)")
            history.summarize(summary, change)
            changes.append(change)
    return {"branch": name, "parent": parent, "changes": changes, "summary": summary,
            "ok": 1.0}


@_wire
async def merge_branch(req: Request) -> dict[str, Any]:
    """{mergeBranch: name, into?, strategy?, dryRun?, force?}. Conflicts under strategy
    abort are an error (nothing was merged) carrying the full result, conflicts
    included."""
    _admin_only(req)
    if req.cmd.get("dryRun") is True:
        await _may_view(req)
    else:
        await _may_manage(req)
    merge = rq.parse_merge(_target(req), _fields(req))
    result = await operations.merge(req.engine, merge, history.Caller(req.run, req.ctx))
    if result["strategy"] == "abort" and result["conflicts"] and not result["dry_run"]:
        raise CommandError(Code.CONFLICTING_OPERATION_IN_PROGRESS,
                           f"merge of {merge.name!r} into {result['into']!r} aborted: "
                           f"{len(result['conflicts'])} conflict(s); nothing was changed. "
                           "Re-run with strategy 'ours' or 'theirs'", **result)
    return {**result, "ok": 1.0}


@_wire
async def reset_branch(req: Request) -> dict[str, Any]:
    """{resetBranch: name, to: LSN | ISO-8601 time, force?}."""
    await _may_manage(req)
    reset = rq.parse_reset(_target(req), _fields(req))
    return {**await operations.reset(req.engine, reset), "ok": 1.0}
