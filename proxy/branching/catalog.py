"""The collections a branch shows in a database (docs/ARCHITECTURE.md, "Overlays and
the branch view"): the upstream's catalog with the reserved overlay names left out,
then the branch's own layers (a collection created, dropped or recreated on the branch
or an ancestor). The listCollections and DDL handlers shape replies from it; copy mode
copies what it lists."""

from __future__ import annotations

from typing import Any

from proxy.branching import naming, views
from proxy.branching.engine import Engine
from proxy.branching.errors import CommandError
from proxy.branching.model import ID_INDEX, Branch, NsState
from proxy.branching.runner import Runner, outside_transaction
from proxy.wire.codes import Code


def with_specs(before: list[dict[str, Any]], specs: list[Any]) -> list[dict[str, Any]]:
    """An index list after createIndexes of these specs (the upstream built them): each
    new name listed as mongod lists it, v, key, name, then the options."""
    names = {ix["name"] for ix in before}
    after = list(before)
    for spec in specs:
        if spec.get("name") not in names:
            after.append({"v": 2, "key": spec.get("key"), "name": spec.get("name"),
                          **{k: v for k, v in spec.items() if k not in ("key", "name")}})
            names.add(spec.get("name"))
    return after


async def base_collections(run: Runner, db: str,
                           reserved: dict[str, dict[str, Any]] | None = None,
                           names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The upstream's collections in this database (of these names only, when given),
    reserved names left out (kept in `reserved` when given)."""
    out: dict[str, dict[str, Any]] = {}
    cmd: dict[str, Any] = {"listCollections": 1}
    if names is not None:
        cmd["filter"] = {"name": {"$in": names}}
    async for batch in run.batches(db, cmd):
        for info in batch:
            if not naming.is_reserved(info["name"]):
                out[info["name"]] = info
            elif reserved is not None:
                reserved[info["name"]] = info
    return out


def branch_states(engine: Engine, branch: Branch, db: str) -> dict[str, list[NsState]]:
    """Per collection of this database, the states along the chain, nearest first."""
    bids = {b.bid for b in engine.chain(branch)}
    colls = {state.coll for state in engine.states.values()
             if state.bid in bids and state.db == db}
    return {coll: engine.layers(branch, db, coll) for coll in sorted(colls)}


def visible(layers: list[NsState], in_base: bool) -> bool:
    for layer in layers:
        if layer.present is not None:
            return layer.present
    return in_base


async def exists(engine: Engine, branch: Branch, run: Runner, db: str, coll: str) -> bool:
    layers = engine.layers(branch, db, coll)
    for layer in layers:
        if layer.present is not None:
            return layer.present
    return await run.has(db, coll)


async def visible_collections(engine: Engine, branch: Branch, run: Runner, db: str,
                              only: str | None = None) -> dict[str, dict[str, Any]]:
    """only: the one collection of that name, if the branch shows it. The upstream then
    lists that name and its overlays alone, not the whole database (drivers ask it
    before each create: pymongo's `create_collection`)."""
    overlays: dict[str, dict[str, Any]] = {}
    if only is None:
        base = await base_collections(run, db, overlays)
        states = branch_states(engine, branch, db)
    else:
        layers = engine.layers(branch, db, only)
        decided = next((layer.present for layer in layers if layer.present is not None), None)
        if decided is False or (decided is None and not await run.has(db, only)):
            return {}  # what a driver's create_collection asks first, mostly of new names
        base = await base_collections(run, db, overlays,
                                      [only, *(layer.live for layer in layers)])
        states = {only: layers} if layers else {}
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(base) | set(states)):
        layers = states.get(name, [])
        if not visible(layers, name in base):
            continue
        if name in base and not any(layer.base_dropped for layer in layers):
            own = views.options_of(layers)
            out[name] = {**base[name], "options": own} if own else base[name]
        else:
            owner = next(layer for layer in layers if layer.present)
            out[name] = _owned_info(db, name, owner, overlays.get(owner.live))
    return out


def _owned_info(db: str, name: str, owner: NsState,
                live: dict[str, Any] | None) -> dict[str, Any]:
    """A collection the branch owns, listed as the server lists its overlay (the
    collection's uuid and every field the server adds), under the user's name; a view
    the branch defined as mongod lists a view."""
    if "viewOn" in owner.options:
        return {"name": name, "type": "view", "options": owner.options,
                "info": {"readOnly": True}}
    if live is None:
        return {"name": name, "type": "collection", "options": owner.options,
                "info": {"readOnly": False}, "idIndex": ID_INDEX}
    info = {**live, "name": name, "options": owner.options}
    id_index = live.get("idIndex")
    if isinstance(id_index, dict) and "ns" in id_index:
        info["idIndex"] = {**id_index, "ns": f"{db}.{name}"}
    return info


# mongod's limit on views defined on views (ViewGraph::kMaxViewDepth).
MAX_VIEW_DEPTH = 20


async def base_views(branch: Branch, run: Runner, db: str) -> dict[str, dict[str, Any]]:
    """The base's views in a database, as the branch sees those no layer of it decides
    (read once per branch and database: views.BASE_VIEWS says why that holds)."""
    key = (branch.bid, db)
    known = views.BASE_VIEWS.get(key)
    if known is None:
        known = {}
        # Outside a transaction: mongod runs no listCollections in one, and the base's
        # views are the same in and out of it.
        with outside_transaction():
            async for batch in run.batches(db, {"listCollections": 1,
                                                "filter": {"type": "view"}}):
                for info in batch:
                    known[info["name"]] = dict(info.get("options") or {})
        views.BASE_VIEWS[key] = known
    return known


async def view_definition(engine: Engine, branch: Branch, run: Runner, db: str,
                          coll: str) -> dict[str, Any] | None:
    """The view the branch shows under this name (its options: viewOn, pipeline,
    collation); None: a collection, or nothing."""
    decided, definition = views.shown_view(engine.layers(branch, db, coll))
    if decided:
        return definition
    known = (await base_views(branch, run, db)).get(coll)
    return None if known is None else dict(known)


def touches(engine: Engine, branch: Branch, db: str) -> bool:
    """Whether the branch (or an ancestor) has any state of its own in this database: if
    not, a view of the base reads exactly what it reads on the base, passed through."""
    bids = {b.bid for b in engine.chain(branch)}
    return any(state.bid in bids and state.db == db for state in engine.states.values())


async def resolve_view(engine: Engine, branch: Branch, run: Runner, db: str, coll: str,
                       first: dict[str, Any],
                       defined: dict[str, dict[str, Any]] | None = None,
                       ) -> tuple[str, list[dict[str, Any]]]:
    """The collection a view reads at the bottom of its chain of views and the whole
    pipeline over it (the innermost view's stages first), as mongod resolves it.
    `defined`: definitions to take instead of the branch's (a create or collMod being
    checked for cycles)."""
    pipeline: list[dict[str, Any]] = []
    seen = [coll]
    definition: dict[str, Any] | None = first
    source = coll
    while definition is not None:
        pipeline = list(definition.get("pipeline") or []) + pipeline
        source = str(definition.get("viewOn"))
        if source in seen:
            raise CommandError(Code.GRAPH_CONTAINS_CYCLE, "View cycle detected: "
                               + " => ".join(f"{db}.{name}" for name in [*seen, source]))
        seen.append(source)
        if len(seen) > MAX_VIEW_DEPTH:
            raise CommandError(Code.VIEW_DEPTH_LIMIT_EXCEEDED,
                               f"View depth too deep or view cycle detected. Maximum depth "
                               f"is {MAX_VIEW_DEPTH}")
        if defined is not None and source in defined:
            definition = defined[source]
        else:
            definition = await view_definition(engine, branch, run, db, source)
    return source, pipeline
