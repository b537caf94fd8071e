"""Branch management over the wire, on the admin database of any port."""

from __future__ import annotations

from typing import Any

from proxy.branching.commands.base import Request
from proxy.branching.engine import MAIN
from proxy.branching.errors import BranchError, CommandError

_CODES = {400: (2, "BadValue"), 404: (26, "NamespaceNotFound"),
          409: (117, "ConflictingOperationInProgress"), 503: (6, "HostUnreachable")}


def as_command_error(exc: BranchError) -> CommandError:
    code, name = _CODES.get(exc.status, (1, "InternalError"))
    return CommandError(code, name, str(exc))


def _admin_only(req: Request) -> None:
    if req.db != "admin":
        raise CommandError(13, "Unauthorized",
                           f"{req.name} may only be run against the admin database.")


async def create_branch(req: Request) -> dict[str, Any]:
    _admin_only(req)
    cmd = req.cmd
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
        return {**await req.engine.describe(str(req.cmd.get("branchInfo"))), "ok": 1.0}
    except BranchError as exc:
        raise as_command_error(exc) from exc


async def drop_branch(req: Request) -> dict[str, Any]:
    _admin_only(req)
    try:
        await req.engine.drop_branch(str(req.cmd.get("dropBranch")))
    except BranchError as exc:
        raise as_command_error(exc) from exc
    return {"ok": 1.0}
