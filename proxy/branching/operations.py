"""Branch management operations (docs/ARCHITECTURE.md, "Layers and where they live"): one
function per request of requests.py, taking the engine and the parsed request.

The admin HTTP API (admin/branches.py) and the wire admin commands (commands/admin.py)
are edges over these: they parse their own shape into a request, call the operation and
shape its answer; who may call (tokens, authz) and the audit stay with them. Failures are
BranchErrors of a Kind, which each edge maps once. The guards of protected branches are
here, so both doors refuse the same things.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from proxy.branching import copymode, gc, history, lifecycle, masking
from proxy.branching.engine import Engine
from proxy.branching.errors import BranchError, Kind
from proxy.branching.model import Branch
from proxy.branching.requests import (
    CreateBranch,
    Diff,
    DropBranch,
    Gc,
    ListBranches,
    Log,
    MergeBranch,
    Migrate,
    Reap,
    RefreshBranch,
    ResetBranch,
    RestoreBranch,
    UpdateLifecycle,
)


async def create(engine: Engine, req: CreateBranch) -> Branch:
    if req.at is not None:
        branch = await history.create_at(engine, req.name, req.parent, req.at, req.port,
                                         masked=req.masked)
    else:
        branch = await engine.create_branch(req.name, req.parent, req.port, req.mode,
                                            masked=req.masked)
    await lifecycle.apply(engine, branch, dict(req.lifecycle))
    return branch


def list_branches(engine: Engine, req: ListBranches) -> list[dict[str, Any]]:
    if engine.unavailable is not None:
        raise BranchError(Kind.UNAVAILABLE, engine.unavailable)
    if req.deleted:
        return [lifecycle.deleted_public(engine, b) for b in lifecycle.deleted(engine)]
    return [engine.public(b) for b in engine.branches.values() if b.deleted_at is None]


async def drop(engine: Engine, req: DropBranch) -> dict[str, Any]:
    return await lifecycle.drop(engine, req.name, force=req.force, purge=req.purge)


async def restore(engine: Engine, req: RestoreBranch) -> Branch:
    return await lifecycle.restore(engine, req.name, req.port)


async def refresh(engine: Engine, req: RefreshBranch) -> Branch:
    return await lifecycle.refresh(engine, req.name, req.force)


async def update(engine: Engine, req: UpdateLifecycle) -> dict[str, Any]:
    return await lifecycle.update(engine, req.name, dict(req.changes))


async def reap(engine: Engine, req: Reap) -> dict[str, Any]:
    return await lifecycle.reap(engine, req.now, req.dry_run)


async def log(engine: Engine, req: Log) -> list[dict[str, Any]]:
    """A log's entries carry no image (ids, operations, times, clients), so a masked
    branch's log is shown as any other."""
    return await history.log(engine, req.name, req.limit, req.before_lsn)


def diff(engine: Engine, req: Diff) -> tuple[str, AsyncGenerator[dict[str, Any], None]]:
    """The branch's parent and its changes as a stream; an unknown branch fails here,
    before anything is streamed. A masked branch's document images, its own and its
    parent's, come masked by the upstream (history.masked_diff)."""
    branch = engine.get(req.name)
    changes = history.diff(engine, req.name)
    masker = masking.for_branch(engine.config, branch)
    if masker is not None:
        changes = history.masked_diff(engine, masker, changes)
    return branch.parent, changes


async def merge(engine: Engine, req: MergeBranch,
                caller: history.Caller | None = None) -> dict[str, Any]:
    """Merging into a protected parent needs force; only a merge that writes does.
    `caller`: the wire client the parent's collections are written for."""
    branch = engine.get(req.name)
    if not req.dry_run and req.into in (None, branch.parent):
        lifecycle.guard(engine, branch.parent, req.force, "merging into")
    result = await history.merge(engine, req.name, req.into, req.strategy, req.dry_run,
                                 caller)
    if branch.masked:
        # Its conflicts would show the documents' stored images: only which ones.
        result["conflicts"] = [{k: c[k] for k in ("ns", "_id", "op") if k in c}
                               for c in result.get("conflicts") or []]
    return result


async def reset(engine: Engine, req: ResetBranch) -> dict[str, Any]:
    engine.get(req.name)
    lifecycle.guard(engine, req.name, req.force, "resetting")
    return await history.reset(engine, req.name, req.to)


async def migrate(engine: Engine, req: Migrate) -> dict[str, Any]:
    return await copymode.migrate(engine, req.name, req.to)


async def collect(engine: Engine, req: Gc) -> dict[str, Any]:
    engine.check_ready()
    return await gc.collect(engine, req.retention)
