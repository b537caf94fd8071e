"""Branch management over the wire, on the admin database of any port."""

from __future__ import annotations

import contextlib
from typing import Any

import bson

from proxy.branching import authz, history, lifecycle
from proxy.branching.commands.base import SESSION_FIELDS, Request
from proxy.branching.engine import MAIN
from proxy.branching.errors import BranchError, CommandError, Kind
from proxy.wire.codes import Code

_CODES = {Kind.INVALID: Code.BAD_VALUE, Kind.NOT_FOUND: Code.NAMESPACE_NOT_FOUND,
          Kind.FORBIDDEN: Code.ILLEGAL_OPERATION,
          Kind.CONFLICT: Code.CONFLICTING_OPERATION_IN_PROGRESS,
          Kind.UNAVAILABLE: Code.HOST_UNREACHABLE}


def as_command_error(exc: BranchError) -> CommandError:
    return CommandError(_CODES.get(exc.kind, Code.INTERNAL_ERROR), str(exc))


_CREATE_FIELDS = {"createBranch", "from", "port", "at", "mode", *lifecycle.FIELDS,
                  *SESSION_FIELDS}
# branchDiff answers in one document: beyond this many changes (or bytes) it refers the
# user to the HTTP API, which streams.
DIFF_LIMIT = 10_000
DIFF_BYTES = 12 * 1024 * 1024


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
    """The branch name a branchInfo/dropBranch command names."""
    value = req.cmd.get(req.name)
    if not isinstance(value, str):
        raise CommandError(Code.BAD_VALUE,
                           f"{req.name} takes a branch name (a string), got {value!r}")
    return value


async def create_branch(req: Request) -> dict[str, Any]:
    await _may_manage(req)
    cmd = req.cmd
    unknown = sorted(k for k in cmd if k not in _CREATE_FIELDS and not k.startswith("$"))
    if unknown:
        raise CommandError(Code.BAD_VALUE, f"createBranch: unknown field(s): {', '.join(unknown)}")
    try:
        changes = lifecycle.settings({k: v for k, v in cmd.items() if k in lifecycle.FIELDS})
        if cmd.get("at") is not None:
            at = cmd["at"]
            if isinstance(at, float) and at.is_integer():
                at = int(at)  # the shell may send numbers as doubles
            branch = await history.create_at(req.engine, cmd.get("createBranch"),
                                             cmd.get("from", MAIN), at, cmd.get("port"))
        else:
            branch = await req.engine.create_branch(cmd.get("createBranch"),
                                                    cmd.get("from", MAIN), cmd.get("port"),
                                                    cmd.get("mode"))
        await lifecycle.apply(req.engine, branch, changes)
    except BranchError as exc:
        raise as_command_error(exc) from exc
    return {**req.engine.public(branch), "ok": 1.0}


async def list_branches(req: Request) -> dict[str, Any]:
    await _may_view(req)
    engine = req.engine
    if engine.unavailable is not None:
        raise CommandError(Code.HOST_UNREACHABLE, engine.unavailable)
    return {"branches": [engine.public(b) for b in engine.branches.values()
                         if b.deleted_at is None], "ok": 1.0}


async def branch_info(req: Request) -> dict[str, Any]:
    await _may_view(req)
    try:
        return {**await req.engine.describe(_target(req)), "ok": 1.0}
    except BranchError as exc:
        raise as_command_error(exc) from exc


async def drop_branch(req: Request) -> dict[str, Any]:
    await _may_manage(req)
    _only(req, ("force", "purge"))
    name = _target(req)
    if req.branch is not None and req.branch.name == name:
        # Dropping closes the branch's port, which would wait on this very request.
        raise CommandError(Code.ILLEGAL_OPERATION,
                           f"branch {name!r} cannot be dropped through its own port; run "
                           "dropBranch on the main port or on another branch's port")
    try:
        result = await lifecycle.drop(req.engine, name, force=req.cmd.get("force"),
                                      purge=req.cmd.get("purge"))
    except BranchError as exc:
        raise as_command_error(exc) from exc
    # As before lifecycle: just ok; a drop kept for restore says until when.
    until = result.get("restorable_until")
    return {"restorableUntil": until, "ok": 1.0} if until else {"ok": 1.0}


# -- history -------------------------------------------------------------------------------
def _only(req: Request, allowed: tuple[str, ...]) -> None:
    unknown = sorted(k for k in req.cmd
                     if k != req.name and k not in allowed and k not in SESSION_FIELDS
                     and not k.startswith("$"))
    if unknown:
        raise CommandError(Code.BAD_VALUE, f"{req.name}: unknown field(s): {', '.join(unknown)}")


def _optional_int(req: Request, key: str) -> int | None:
    value = req.cmd.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # the shell sends numbers as doubles
    if not isinstance(value, int) or isinstance(value, bool):
        raise CommandError(Code.BAD_VALUE, f"{req.name}: {key} must be an integer, "
                                          f"got {value!r}")
    return value


async def branch_log(req: Request) -> dict[str, Any]:
    """{branchLog: name, limit?, beforeLsn?}: WAL entries, newest first."""
    await _may_view(req)
    _only(req, ("limit", "beforeLsn"))
    name = _target(req)
    limit = _optional_int(req, "limit")
    try:
        entries = await history.log(req.engine, name, 100 if limit is None else limit,
                                    _optional_int(req, "beforeLsn"))
    except BranchError as exc:
        raise as_command_error(exc) from exc
    return {"branch": name, "entries": entries, "ok": 1.0}


async def branch_diff(req: Request) -> dict[str, Any]:
    """{branchDiff: name}: the changes in one document, up to DIFF_LIMIT of them."""
    await _may_view(req)
    _only(req, ())
    name = _target(req)
    try:
        branch = req.engine.get(name)
        changes: list[dict[str, Any]] = []
        summary: dict[str, Any] = {}
        size = 0
        async with contextlib.aclosing(history.diff(req.engine, name)) as stream:
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
    except BranchError as exc:
        raise as_command_error(exc) from exc
    return {"branch": name, "parent": branch.parent, "changes": changes, "summary": summary,
            "ok": 1.0}


async def merge_branch(req: Request) -> dict[str, Any]:
    """{mergeBranch: name, into?, strategy?, dryRun?}. Conflicts under strategy abort are
    an error (nothing was merged) carrying the full result, conflicts included."""
    _admin_only(req)
    if req.cmd.get("dryRun") is True:
        await _may_view(req)
    else:
        await _may_manage(req)
    _only(req, ("into", "strategy", "dryRun", "force"))
    name = _target(req)
    try:
        branch = req.engine.get(name)
        if req.cmd.get("dryRun", False) is False and req.cmd.get("into") in (None,
                                                                            branch.parent):
            lifecycle.guard(req.engine, branch.parent, req.cmd.get("force"), "merging into")
        result = await history.merge(req.engine, name, req.cmd.get("into"),
                                     req.cmd.get("strategy", "abort"),
                                     req.cmd.get("dryRun", False),
                                     history.Caller(req.run, req.ctx))
    except BranchError as exc:
        raise as_command_error(exc) from exc
    if result["strategy"] == "abort" and result["conflicts"] and not result["dry_run"]:
        raise CommandError(Code.CONFLICTING_OPERATION_IN_PROGRESS,
                           f"merge of {name!r} into {result['into']!r} aborted: "
                           f"{len(result['conflicts'])} conflict(s); nothing was changed. "
                           "Re-run with strategy 'ours' or 'theirs'", **result)
    return {**result, "ok": 1.0}


async def reset_branch(req: Request) -> dict[str, Any]:
    """{resetBranch: name, to: LSN | ISO-8601 time}."""
    await _may_manage(req)
    _only(req, ("to", "force"))
    name = _target(req)
    if "to" not in req.cmd:
        raise CommandError(Code.BAD_VALUE, "resetBranch needs 'to': an LSN or an ISO-8601 time")
    to = req.cmd["to"]
    if isinstance(to, float) and to.is_integer():
        to = int(to)
    try:
        req.engine.get(name)
        lifecycle.guard(req.engine, name, req.cmd.get("force"), "resetting")
        return {**await history.reset(req.engine, name, to), "ok": 1.0}
    except BranchError as exc:
        raise as_command_error(exc) from exc
