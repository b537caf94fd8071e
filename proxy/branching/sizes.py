"""What each branch holds on the upstream: its overlay documents and bytes, its WAL
entries. Measured on request (the metrics scrape asks, at most once per interval), never
per write: the figures come from the upstream's own `collStats` and an indexed count of
the WAL, so they cost a few small commands per branch whatever its size."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pymongo.errors import OperationFailure

if TYPE_CHECKING:
    from proxy.branching.engine import Engine

log = logging.getLogger("mongobranch.sizes")


@dataclass
class BranchSize:
    # Documents in the branch's live overlays (its changed and kept documents).
    overlay_documents: int = 0
    # Data bytes of its live overlays and hidden-id sets, as the upstream counts them.
    overlay_bytes: int = 0
    wal_entries: int = 0


async def measure(engine: Engine, names: list[str]) -> dict[str, BranchSize]:
    """The sizes of the named branches that exist (others are left out)."""
    sizes: dict[str, BranchSize] = {}
    bids = {engine.branches[n].bid: n for n in names if n in engine.branches}
    for name in bids.values():
        sizes[name] = BranchSize()
    for state in list(engine.states.values()):
        owner = bids.get(state.bid)
        if owner is None:
            continue
        size = sizes[owner]
        for coll, counted in ((state.live, True), (state.hidden, False)):
            count, data = await _coll_stats(engine, state.db, coll)
            if counted:
                size.overlay_documents += count
            size.overlay_bytes += data
    for bid, name in bids.items():
        # The WAL's (b, _id) index answers this without reading the entries.
        sizes[name].wal_entries = await engine.wal.entries.count_documents({"b": bid})
    return sizes


async def _coll_stats(engine: Engine, db: str, coll: str) -> tuple[int, int]:
    try:
        reply = await engine.pool(db, {"collStats": coll})
    except OperationFailure as exc:
        if exc.code == 26:  # NamespaceNotFound: not created yet, or dropped meanwhile
            return 0, 0
        raise
    return int(reply.get("count", 0)), int(reply.get("size", 0))
