"""Server-wide commands on a branch port that touch no collection of the branch's.

`fsync` flushes the upstream's data to disk, the branch's included (its overlays and WAL
are collections there): forwarded, as on the main port. Its `lock` form would stop
every write of the upstream, main's and every other branch's, until `fsyncUnlock`: a
branch port refuses it (the main port forwards it)."""

from __future__ import annotations

from typing import Any

from proxy.branching.commands.base import Request
from proxy.branching.errors import CommandError
from proxy.wire.codes import Code


async def fsync(req: Request) -> dict[str, Any] | None:
    if req.cmd.get("lock"):
        raise CommandError(Code.ILLEGAL_OPERATION,
                           f"fsync with lock is not supported on branch "
                           f"{req.on_branch.name!r} (mongobranch): it would block every "
                           "write of the upstream, main's and other branches'; run it on "
                           "the main port")
    return None
