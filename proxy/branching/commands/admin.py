"""Branch management over the wire, on the admin database of any port."""

from __future__ import annotations

from typing import Any

from proxy.branching.commands.base import SESSION_FIELDS, Request
from proxy.branching.engine import MAIN
from proxy.branching.errors import BranchError, CommandError

_CODES = {400: (2, "BadValue"), 404: (26, "NamespaceNotFound"),
          409: (117, "ConflictingOperationInProgress"), 503: (6, "HostUnreachable")}


def as_command_error(exc: BranchError) -> CommandError:
    code, name = _CODES.get(exc.status, (1, "InternalError"))
    return CommandError(code, name, str(exc))


_CREATE_FIELDS = {"createBranch", "from", "port", *SESSION_FIELDS}


def _admin_only(req: Request) -> None:
    if req.db != "admin":
        raise CommandError(13, "Unauthorized",
                           f"{req.name} may only be run against the admin database.")


def _target(req: Request) -> str:
    """The branch name a branchInfo/dropBranch command names."""
    value = req.cmd.get(req.name)
    if not isinstance(value, str):
        raise CommandError(2, "BadValue",
                           f"{req.name} takes a branch name (a string), got {value!r}")
    return value


async def create_branch(req: Request) -> dict[str, Any]:
    _admin_only(req)
    cmd = req.cmd
    unknown = sorted(k for k in cmd if k not in _CREATE_FIELDS and not k.startswith("$"))
    if unknown:
        raise CommandError(2, "BadValue",
                           f"createBranch: unknown field(s): {', '.join(unknown)}")
    try:
        branch = await req.engine.create_branch(cmd.get("createBranch"), cmd.get("from", MAIN),
                                                cmd.get("port"))
    except BranchError as exc:
        raise as_command_error(exc) from exc
    return {**branch.public(req.engine.host), "ok": 1.0}


async def list_branches(req: Request) -> dict[str, Any]:
    _admin_only(req)
    engine = req.engine
    if engine.unavailable is not None:
        raise CommandError(6, "HostUnreachable", engine.unavailable)
    return {"branches": [b.public(engine.host) for b in engine.branches.values()], "ok": 1.0}


async def branch_info(req: Request) -> dict[str, Any]:
    _admin_only(req)
    try:
        return {**await req.engine.describe(_target(req)), "ok": 1.0}
    except BranchError as exc:
        raise as_command_error(exc) from exc


async def drop_branch(req: Request) -> dict[str, Any]:
    _admin_only(req)
    name = _target(req)
    if req.branch is not None and req.branch.name == name:
        # Dropping closes the branch's port, which would wait on this very request.
        raise CommandError(20, "IllegalOperation",
                           f"branch {name!r} cannot be dropped through its own port; run "
                           "dropBranch on the main port or on another branch's port")
    try:
        await req.engine.drop_branch(name)
    except BranchError as exc:
        raise as_command_error(exc) from exc
    return {"ok": 1.0}
