"""What a branch sees of its parent, as history (diff, merge) and copy mode (migration)
both ask it: the parent's layers of a collection, and whether the branch replaced it."""

from __future__ import annotations

from proxy.branching.engine import MAIN, Engine
from proxy.branching.model import Branch, NsState
from proxy.branching.wal import LATENT, OWN, RESETS


def parent_of(engine: Engine, branch: Branch) -> Branch | None:
    return None if branch.parent == MAIN else engine.get(branch.parent)


def parent_layers(engine: Engine, branch: Branch, db: str, coll: str) -> list[NsState]:
    parent = parent_of(engine, branch)
    return [] if parent is None else engine.layers(parent, db, coll)


async def replaced(engine: Engine, branch: Branch, state: NsState) -> bool:
    """Whether the branch replaced the whole collection (dropped or recreated it). A copy
    branch hides its parent by construction, and a branch that copied a collection whole
    before its parent changed it (an `own` marker) holds what it saw: only a logged drop
    or create counts."""
    if not state.base_dropped:
        return False
    marker = await engine.wal.first({
        "b": branch.bid, "ns": f"{state.db}.{state.coll}", "op": {"$in": [*RESETS, OWN]},
        **branch.visible()}, newest=True)
    if marker is None:
        # A copy branch owns every collection from its start; a WAL branch only by a drop
        # or create (entries gc removed before a drop leave no doubt either).
        return branch.mode != "copy"
    if marker["op"] == OWN and marker.get(LATENT):
        # Held whole since the parent changed it while the branch's own drop stood:
        # replaced while that drop still does (no reset voided it).
        return await engine.wal.first({
            "b": branch.bid, "ns": f"{state.db}.{state.coll}", "op": {"$in": list(RESETS)},
            **branch.visible()}) is not None
    return marker["op"] in RESETS
