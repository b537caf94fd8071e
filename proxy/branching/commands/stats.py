"""Collection statistics on a branch port: the `collStats` command and the `$collStats`
and `$indexStats` stages that begin an aggregation.

A collection the branch never changed is the base as it is: the upstream answers
(`collStats` forwarded, the aggregation passed through). One it changed is stored in
several collections, the base it reads through and the live overlays of the branches
of its chain (`planner.sources`), each with the ids the layers above it hide. The
upstream reports each of them, and the branch's figures are theirs combined: documents
and data bytes summed, less what the hidden ids hold in each (an indexed `$in` whose
`$bsonSize` the server sums), so that `count`, `size` and `avgObjSize` are those of a
plain collection holding the branch view. Storage and index sizes are those of the
collections the view is stored in, the base's included (shared with main and its other
branches): no figure of the storage engine's belongs to the view alone. The reply's
shape, field order and numeric types are the upstream's own report of the first of
them, with `ns` naming the user's collection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bson.int64 import Int64

from proxy.branching import naming, planner, views
from proxy.branching.catalog import base_collections
from proxy.branching.commands import catalog
from proxy.branching.commands.base import Request, carry, coll_name, documents_stage
from proxy.branching.cursormerge import adopt
from proxy.branching.errors import CommandError
from proxy.branching.model import NsState
from proxy.wire.codes import Code

Stats = dict[str, Any]
# The stages that report on the collection instead of reading its documents.
STAGES = frozenset({"$collStats", "$indexStats"})
# Carried from the client's aggregation onto the one that runs its other stages.
_CARRIED = ("let", "maxTimeMS", "comment", "lsid", "$clusterTime", "readConcern",
            "apiVersion", "apiStrict", "apiDeprecationErrors", "allowDiskUse")


@dataclass
class _Figures:
    """The branch view's figures, unscaled."""

    count: int = 0
    size: int = 0
    storage: int = 0
    free: int = 0
    indexes: dict[str, int] = field(default_factory=dict)
    # Whether the upstream reports a non-empty collection's average size as a double
    # (SecantusDB; mongod sends an integer), None until one is seen.
    average_double: bool | None = None

    def add(self, stats: Stats) -> None:
        if stats.get("count") and "avgObjSize" in stats:
            self.average_double = isinstance(stats["avgObjSize"], float)
        self.count += int(stats.get("count") or 0)
        self.size += int(stats.get("size") or 0)
        self.storage += int(stats.get("storageSize") or 0)
        self.free += int(stats.get("freeStorageSize") or 0)
        sizes = stats.get("indexSizes")
        for name, size in (sizes.items() if isinstance(sizes, dict) else ()):
            self.indexes[name] = self.indexes.get(name, 0) + int(size or 0)


# How one storage collection's storage statistics are read: the collStats command's
# reply, or the storageStats of a $collStats stage (an upstream may count them apart).
Reader = Callable[[Request, str], Awaitable[Stats | None]]


async def _by_command(req: Request, name: str) -> Stats | None:
    return _found(await req.run.reply(req.db, {"collStats": name}))


async def _by_stage(req: Request, name: str) -> Stats | None:
    reply = await req.run.reply(req.db, {"aggregate": name, "cursor": {},
                                         "pipeline": [{"$collStats": {"storageStats": {}}}]})
    found = _found(reply)
    if found is None:
        return None
    batch = found["cursor"]["firstBatch"]
    return dict(batch[0].get("storageStats") or {}) if batch else None


def _found(reply: dict[str, Any]) -> dict[str, Any] | None:
    """A reply, None for a collection the upstream does not hold (an overlay not made
    yet); any other error is the command's."""
    if reply.get("ok"):
        return reply
    if reply.get("code") == Code.NAMESPACE_NOT_FOUND:
        return None
    raise CommandError(int(reply.get("code", 8)), str(reply.get("errmsg", "")),
                       code_name=str(reply.get("codeName", "")))


async def _figures(req: Request, coll: str, layers: list[NsState], read: Reader) -> _Figures:
    fig = _Figures()
    if any(layer.hidden_ids is None for layer in layers):
        # A hidden set too large to keep in memory: the server counts the view itself.
        for source in planner.sources(coll, layers):
            stats = await read(req, source.coll)
            if stats is not None:
                fig.add(stats)
        src, stages = views.view_source(coll, layers)
        fig.count, fig.size = await _counted(req, src, stages)
        return fig
    for source in planner.sources(coll, layers):
        stats = await read(req, source.coll)
        if stats is None:
            continue
        fig.add(stats)
        hidden = source.hidden_ids()
        if hidden:
            n, size = await _counted(req, source.coll, [{"$match": {"_id": {"$in": hidden}}}])
            fig.count -= n
            fig.size -= size
    fig.count, fig.size = max(fig.count, 0), max(fig.size, 0)
    return fig


async def _counted(req: Request, coll: str, stages: list[dict[str, Any]]) -> tuple[int, int]:
    """How many documents the stages yield from a collection, and their BSON bytes."""
    group = {"$group": {"_id": None, "n": {"$sum": 1}, "size": {"$sum": {"$bsonSize": "$$ROOT"}}}}
    reply = await req.run(req.db, {"aggregate": coll, "pipeline": [*stages, group],
                                   "cursor": {}})
    batch = reply["cursor"]["firstBatch"]
    return (int(batch[0]["n"]), int(batch[0]["size"])) if batch else (0, 0)


def _restated(template: Stats, fig: _Figures, scale: int, names: list[str]) -> Stats:
    """The upstream's report of one storage collection, its figures replaced by the
    view's: same fields, same order, same numeric types."""
    index_total = sum(fig.indexes.get(n, 0) for n in names)
    figures: dict[str, Any] = {
        "count": fig.count, "size": fig.size // scale,
        "storageSize": fig.storage // scale, "freeStorageSize": fig.free // scale,
        "nindexes": len(names), "totalIndexSize": index_total // scale,
        "totalSize": (fig.storage + index_total) // scale,
        "indexSizes": {n: fig.indexes.get(n, 0) // scale for n in names},
    }
    out: Stats = {}
    for key, value in template.items():
        if key in figures:
            out[key] = Int64(figures[key]) if isinstance(value, Int64) else figures[key]
        elif key == "avgObjSize":
            # mongod: the average of the unscaled sizes, an integer; an upstream that
            # sends a double for a non-empty collection gets one.
            double = fig.average_double
            if double if double is not None else isinstance(value, float):
                out[key] = fig.size / fig.count if fig.count else 0.0
            else:
                out[key] = fig.size // fig.count if fig.count else 0
        elif key == "indexDetails" and isinstance(value, dict):
            out[key] = {n: value[n] for n in names if n in value}
        else:
            out[key] = value
    return out


def _scale(template: Stats) -> int:
    scale = template.get("scaleFactor", 1)
    return int(scale) if isinstance(scale, int | float) and scale >= 1 else 1


async def _template(req: Request, coll: str, cmd_of: Callable[[str], dict[str, Any]]
                    ) -> tuple[dict[str, Any], bool]:
    """The upstream's reply to the command on the first collection the view is stored in
    that it holds (an overlay is made on the branch's first write to it), which gives
    the branch's reply its shape: with True. With False, a reply that is the user's as it
    is: an error, or, for a collection the branch does not show, the upstream's answer
    under a reserved name never created (its answer for a missing collection)."""
    if not await catalog.exists(req, coll):
        name = naming.absent(req.on_branch.bid, coll)
        return renamed(await req.run.reply(req.db, cmd_of(name)), req.db, name, coll), False
    reply: dict[str, Any] = {}
    for source in planner.sources(coll, req.layers(coll)):
        reply = renamed(await req.run.reply(req.db, cmd_of(source.coll)),
                         req.db, source.coll, coll)
        if reply.get("code") != Code.NAMESPACE_NOT_FOUND:
            break
    return reply, bool(reply.get("ok"))


def renamed(reply: dict[str, Any], db: str, inner: str, coll: str) -> dict[str, Any]:
    """A reply of the upstream's about a stored collection, naming the user's instead."""
    if "ns" in reply:
        reply["ns"] = f"{db}.{coll}"
    if isinstance(reply.get("errmsg"), str):
        reply["errmsg"] = reply["errmsg"].replace(inner, coll)
    return reply


async def _index_names(req: Request, coll: str) -> list[str]:
    indexes = await req.engine.view_indexes(req.on_branch, req.db, coll, req.run)
    return [str(ix.get("name")) for ix in indexes]


async def coll_stats(req: Request) -> dict[str, Any] | None:
    coll = coll_name(req)
    layers = req.layers(coll)
    if not layers:
        return None
    options = req.options
    reply, view = await _template(req, coll, lambda name: {"collStats": name, **options})
    if not view:
        return reply
    fig = await _figures(req, coll, layers, _by_command)
    return _restated(reply, fig, _scale(reply), await _index_names(req, coll))


async def db_stats(req: Request) -> dict[str, Any]:
    """The database the port shows: its collections and views (main's without the
    branches' overlays, which the upstream's own figures would count), each collection's
    figures as `collStats` gives them there, summed into the upstream's own report of
    the database (its shape, its engine's fields). Views are counted apart from
    collections, as mongod counts them."""
    options = req.options
    reply = await req.run.reply(req.db, {"dbStats": 1, **options})
    if not reply.get("ok"):
        return reply
    fig = _Figures()
    index_total = 0
    counted = {"collections": 0, "views": 0, "indexes": 0}
    if req.branch is not None:
        shown = await catalog.visible_collections(req)
    else:
        reserved: dict[str, dict[str, Any]] = {}
        shown = await base_collections(req.run, req.db, reserved)
        if not reserved:
            return reply  # no branch stores anything here: the upstream's figures are main's
    for name, info in shown.items():
        if info.get("type") == "view":
            counted["views"] += 1
            continue
        counted["collections"] += 1
        layers = req.layers(name) if req.branch is not None else []
        if layers:
            one = await _figures(req, name, layers, _by_command)
            names = await _index_names(req, name)
        else:
            stats = await _by_command(req, name) or {}
            one = _Figures()
            one.add(stats)
            names = list(one.indexes)
        counted["indexes"] += len(names)
        fig.count += one.count
        fig.size += one.size
        fig.storage += one.storage
        fig.free += one.free
        index_total += sum(one.indexes.get(index, 0) for index in names)
    scale = _scale(reply)
    figures: dict[str, Any] = {
        **counted, "objects": fig.count, "dataSize": fig.size / scale,
        "storageSize": fig.storage / scale, "indexSize": index_total / scale,
        "totalSize": (fig.storage + index_total) / scale,
    }
    out: dict[str, Any] = {}
    for key, value in reply.items():
        if key == "avgObjSize":
            out[key] = type(value)(fig.size / fig.count) if fig.count else type(value)(0)
        elif key in figures:
            out[key] = _typed(figures[key], value)
        else:
            out[key] = value
    return out


def _typed(figure: float, like: Any) -> Any:
    """A figure in the numeric type the upstream sent for it (mongod's dbStats sends
    sizes as doubles, SecantusDB's as integers)."""
    if isinstance(like, float):
        return float(figure)
    return Int64(int(figure)) if isinstance(like, Int64) else int(figure)


def stage_of(pipeline: Any) -> str | None:
    """The statistics stage a pipeline begins with, if any."""
    if isinstance(pipeline, list) and pipeline and isinstance(pipeline[0], dict) \
            and len(pipeline[0]) == 1:
        name = next(iter(pipeline[0]))
        return name if name in STAGES else None
    return None


async def aggregate(req: Request, coll: str, layers: list[NsState]) -> dict[str, Any]:
    """An aggregation beginning with `$collStats` or `$indexStats` on a changed
    collection: the stage's documents for the branch view, then the user's other stages
    run over them by the upstream."""
    pipeline = list(req.cmd["pipeline"])
    head = {k: v for k, v in req.cmd.items() if k not in ("$db", "pipeline", "aggregate")}
    reply, view = await _template(req, coll, lambda name: {"aggregate": name, **head,
                                                           "pipeline": pipeline[:1]})
    if not reply.get("ok"):
        return reply
    docs = list(reply["cursor"]["firstBatch"])
    sources = [s.coll for s in planner.sources(coll, layers)]
    if view:
        if "$collStats" in pipeline[0]:
            docs = [await _coll_stats_doc(req, coll, layers, doc) for doc in docs]
        else:
            docs = await _index_stats(req, coll, sources)
    for doc in docs:
        if "ns" in doc:
            doc["ns"] = f"{req.db}.{coll}"
    rewritten = planner.rewrite(pipeline[1:], req.layers, req.on_branch.name)
    cmd = {"aggregate": 1, "pipeline": [documents_stage(docs), *rewritten],
           "cursor": req.cmd.get("cursor", {})}
    carry(req.cmd, cmd, _CARRIED)
    out = await req.run.reply(req.db, cmd)
    return adopt(req.engine.cursors, req.db, coll, "$cmd.aggregate", out, req.cmd.get("lsid"))


async def _coll_stats_doc(req: Request, coll: str, layers: list[NsState],
                          doc: dict[str, Any]) -> dict[str, Any]:
    out = dict(doc)
    stats = doc.get("storageStats")
    if isinstance(stats, dict) or "count" in doc:
        fig = await _figures(req, coll, layers, _by_stage)
        if isinstance(stats, dict):
            out["storageStats"] = _restated(stats, fig, _scale(stats),
                                            await _index_names(req, coll))
        if "count" in doc:
            out["count"] = Int64(fig.count) if isinstance(doc["count"], Int64) else fig.count
    return out


async def _index_stats(req: Request, coll: str, sources: list[str]) -> list[dict[str, Any]]:
    """Each index the branch shows (the base's own entries, which the first reply held,
    are not the view's), its accesses those of its copies in every collection the view
    is stored in, summed (the earliest `since`)."""
    names = await _index_names(req, coll)
    seen: dict[str, list[dict[str, Any]]] = {}
    for name in sources:
        reply = _found(await req.run.reply(req.db, {"aggregate": name, "cursor": {},
                                                    "pipeline": [{"$indexStats": {}}]}))
        for entry in reply["cursor"]["firstBatch"] if reply else ():
            seen.setdefault(str(entry.get("name")), []).append(entry)
    out = []
    for name in names:
        entries = seen.get(name)
        if not entries:
            continue
        entry = dict(entries[0])
        accesses: list[dict[str, Any]] = [e["accesses"] for e in entries
                                          if isinstance(e.get("accesses"), dict)]
        if accesses:
            ops = sum(int(a.get("ops") or 0) for a in accesses)
            kind = accesses[0].get("ops")
            since: list[Any] = [a["since"] for a in accesses if a.get("since") is not None]
            entry["accesses"] = {**accesses[0], "ops": Int64(ops) if isinstance(kind, Int64)
                                 else ops, "since": min(since) if since else None}
        out.append(entry)
    return out
