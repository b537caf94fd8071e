"""Reading a branch view from the engine's side: merged plain finds when the hidden
sets are in memory, a server-side union otherwise."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from proxy.branching import merge, views
from proxy.branching.model import NsState
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
    cursor = await merge.open_find(run, db, coll, layers, find, BATCH,
                                   skip_top_live=skip_top_live)
    if cursor is not None:
        try:
            while not cursor.done:
                batch = await cursor.batch(run, BATCH)
                if batch:
                    yield batch
        finally:
            await cursor.close(run)
        return
    source, pipeline = views.view_source(coll, layers, filt, skip_top_live=skip_top_live)
    if sort:
        pipeline.append({"$sort": sort})
    if limit:
        pipeline.append({"$limit": limit})
    if project_id:
        pipeline.append({"$project": {"_id": 1}})
    if source != coll:
        options.pop("hint", None)
    cmd: dict[str, Any] = {"aggregate": source, "pipeline": pipeline, "cursor": {}, **options}
    async for batch in run.batches(db, cmd, BATCH):
        yield batch
