"""The engine's own reads of a branch view: the documents a write copies from the parent
view, a diff or merge compares, a snapshot keeps, a copy branch materializes, streamed
in batches. The planner decides how each is read (`planner.plan_find`); this carries the
plan out with the engine's batch size."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from proxy.branching import cursormerge, planner
from proxy.branching.model import NsState
from proxy.branching.planner import PlanKind
from proxy.branching.runner import Runner

BATCH = 1000


async def view_batches(run: Runner, db: str, coll: str, layers: list[NsState],
                       filt: dict[str, Any], *, sort: dict[str, Any] | None = None,
                       limit: int = 0, options: dict[str, Any] | None = None,
                       skip_top_live: bool = False, project_id: bool = False,
                       ) -> AsyncIterator[list[dict[str, Any]]]:
    """Batches of the view's documents matching a filter (no layers: the base itself)."""
    options = dict(options or {})
    if any(layer.base_dropped for layer in layers):
        options.pop("hint", None)
    find: dict[str, Any] = {"find": coll, "filter": filt, **options}
    if sort:
        find["sort"] = sort
    if limit:
        find["limit"] = limit
    if project_id:
        find["projection"] = {"_id": 1}
    plan = planner.plan_find(find, layers, skip_top_live=skip_top_live)
    if plan.kind is PlanKind.POINT and not plan.sources:
        return
    cursor = None
    if plan.kind is PlanKind.MERGED:
        cursor = await cursormerge.open_merged(run, db, coll, plan.sources, find, BATCH)
    elif plan.kind is not PlanKind.UNION:
        assert plan.command is not None
        cursor = await cursormerge.open_one(run, db, coll, plan.command, BATCH)
    if cursor is not None:
        try:
            while not cursor.done:
                batch = await cursor.batch(run, BATCH)
                if batch:
                    yield batch
        finally:
            await cursor.close(run)
        return
    if plan.kind is not PlanKind.UNION:
        plan = planner.fall_back(plan, find, layers, "the upstream refused it",
                                 skip_top_live=skip_top_live)
    assert plan.command is not None
    async for batch in run.batches(db, plan.command, BATCH):
        yield batch
