"""commitTransaction and abortTransaction on a branch port: the end of a client's
multi-document transaction, which the engine runs as one upstream transaction
(txn.py; the statements themselves go through their own handlers)."""

from __future__ import annotations

from typing import Any

from proxy.branching.commands.base import Request
from proxy.branching.txn import Transactions


async def commit_transaction(req: Request) -> dict[str, Any]:
    """Commits the upstream transaction; a retry of a commit that succeeded answers ok
    again, as mongod does."""
    extra = await req.engine.txns.commit(Transactions.key_of(req.cmd), req.cmd)
    return {"ok": 1.0, **extra}


async def abort_transaction(req: Request) -> dict[str, Any]:
    await req.engine.txns.abort_key(Transactions.key_of(req.cmd))
    return {"ok": 1.0}
