"""Which entries a branch showed at each point once resets voided some (docs/ARCHITECTURE.md,
"History"): pure folds of its recorded resets, used by history and by snapshots alike."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.branching.wal import RESETS

if TYPE_CHECKING:
    from proxy.branching.engine import Engine
    from proxy.branching.model import Branch


async def recorded_resets(engine: Engine, branch: Branch) -> list[tuple[int, int]]:
    """Every reset of the branch as (to, at): the LSN it went back to, the LSN it took.
    Voids saved before resets were recorded count as resets too."""
    found = {(int(doc["to"]), int(doc["at"]))
             async for doc in engine.meta["resets"].find({"b": branch.bid})}
    found.update((int(lo), int(hi)) for lo, hi in branch.voids)
    return sorted(found, key=lambda r: r[1])


def voids_at(resets: list[tuple[int, int]], lsn: int | None) -> list[list[int]]:
    """The voided ranges in effect at an LSN (None: now): the last reset taken at or
    before it voids (to, at]; before `to`, the last reset taken at or before `to`
    applies, and so on. Resets off that chain (taken inside a range a later reset went
    back across) void nothing there."""
    out: list[list[int]] = []
    limit = lsn
    while True:
        before = [r for r in resets if limit is None or r[1] <= limit]
        if not before:
            return out
        to, at = max(before, key=lambda r: r[1])
        out.append([to, at])
        limit = to


def replaced_spans(markers: list[int], resets: list[tuple[int, int]]
                   ) -> list[tuple[int, int | None]]:
    """The LSN spans (lo, hi] (hi None: open) in which one of these drops or creates of
    a branch's collection stood, under the resets in effect at each point (voids_at):
    an entry written then was not written over its parent's view."""
    spans: list[tuple[int, int | None]] = []
    for marker in markers:
        edges = [marker, *sorted(a for _, a in resets if a > marker)]
        for lo, hi in zip(edges, [*edges[1:], None], strict=True):
            if not any(v_lo < marker <= v_hi for v_lo, v_hi in voids_at(resets, lo)):
                spans.append((lo, hi))
    return spans


async def written_through(engine: Engine, branch: Branch, ns: str) -> dict[str, Any]:
    """A WAL filter for the branch's entries on a collection written over its parent's
    view: outside the spans in which a drop or create of its own stood."""
    markers = [int(d["_id"]) async for d in engine.wal.entries.find(
        {"b": branch.bid, "ns": ns, "op": {"$in": list(RESETS)}}, {"_id": 1})]
    if not markers:
        return {}
    spans = replaced_spans(markers, await recorded_resets(engine, branch))
    return {"$nor": [{"_id": {"$gt": lo, **({"$lte": hi} if hi is not None else {})}}
                     for lo, hi in spans]} if spans else {}
