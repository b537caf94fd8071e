"""The read planner: how a read on a branch is served, decided in one place
(docs/ARCHITECTURE.md, "Reads").

Pure: it takes the command and what the engine knows of the namespace (its layers,
nearest first, with the hidden-id sets cached in memory) and returns a `Plan`, a kind
and the reason for it in words, with what the executors (`commands/read.py`,
`commands/aggregate.py`, `viewscan.py`) need to carry it out. What only a round trip can
tell is a second planning step here, never a decision of the executor's: `fall_back`
(a merged or in-place find the upstream refused) and `narrow`/`literal_fits`/`replan`
(how few base documents an aggregation's leading `$match` selects).

The kinds, cheapest first:

- pass-through: the branch never changed what the read reads; the upstream answers it.
- point: an equality on `_id` alone; only one collection can hold that document.
- in-place: the top layer owns the whole collection (a copy branch, a collection dropped
  and refilled); the read runs on that collection as it is.
- merged: plain reads on the base and on each overlay, combined by the proxy (finds
  merged by server-computed sort keys, counts summed, distinct values deduplicated).
- union: the branch view as a server-side pipeline (`views.py`), then the read's own stages.
- copy: an index-bound find (min, max, returnKey) no merge serves: the upstream copies the
  branch view into a scratch collection, builds the hinted index on it, and runs the
  find there as it is (no aggregation stage takes index bounds or returns index keys);
  also the explain of any index-bound find on a changed collection, which shows one plan.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import bson
from bson.regex import Regex

from proxy.branching import views
from proxy.branching.errors import CommandError, not_supported
from proxy.branching.model import NsState
from proxy.wire import bsonutil
from proxy.wire.codes import Code

log = logging.getLogger("mongobranch.planner")

Pipeline = list[dict[str, Any]]

# Carried from the user's read command onto its rewritten form.
READ_CARRY = ("lsid", "$clusterTime", "$readPreference", "readConcern", "apiVersion",
              "apiStrict", "apiDeprecationErrors", "comment", "maxTimeMS", "collation", "let",
              "hint", "allowDiskUse")
# find options with no faithful aggregate equivalent, and why (showRecordId has a
# refetch plan, tailable finds plan_tailable, the index-bound options a merged or a copy
# plan: these are refused only where neither applies, an explain or the engine's reads).
_INDEX_BOUND_WHY = "no aggregation stage takes them, and no merged find serves this one"
_FIND_UNSUPPORTED = {
    "min": f"index bounds: {_INDEX_BOUND_WHY}",
    "max": f"index bounds: {_INDEX_BOUND_WHY}",
    "returnKey": f"index keys: {_INDEX_BOUND_WHY}",
    "showRecordId": "record ids exist only in a find",
    "tailable": "no cursor can tail a base and an overlay together",
    "awaitData": "no cursor can tail a base and an overlay together",
    "oplogReplay": "an oplog option",
}
# find options that read an index (its bounds, its keys): each side of a merged find
# runs them with the user's hint, on its copy of the index (an overlay is created
# with the indexes of the view it overlays, names and options included).
INDEX_BOUND = ("min", "max", "returnKey")


def index_bound(cmd: dict[str, Any]) -> bool:
    """Whether a find reads an index's bounds or keys (min, max, returnKey)."""
    return any(cmd.get(opt) for opt in INDEX_BOUND)


def merge_sort(cmd: dict[str, Any]) -> dict[str, Any]:
    """The order a merged find's sides are read in and merged by: the user's sort; for
    an index-bound find without one, the hinted index's key pattern, the order mongod's
    index scan returns them in (every side then scans its own copy of that index)."""
    sort = cmd.get("sort") or {}
    if sort or not index_bound(cmd):
        return dict(sort)
    hint = cmd.get("hint")
    return dict(hint) if isinstance(hint, dict) else {}


class PlanKind(enum.StrEnum):
    PASS = "pass-through"
    POINT = "point"
    IN_PLACE = "in-place"
    MERGED = "merged"
    UNION = "union"
    COPY = "copy"


@dataclass(frozen=True)
class Source:
    """One collection a read reads, with the hidden-id sets (idkey -> id) of the layers
    above it: the ids it holds that the view does not show."""

    coll: str
    hidden: tuple[dict[Any, Any], ...] = ()

    def hidden_ids(self) -> list[Any]:
        return [v for ids in self.hidden for v in ids.values()]


@dataclass(frozen=True)
class Probe:
    """An aggregation over a large hidden set whose first stage is a `$match`: a find
    with that filter on the base tells whether few base documents are selected, and then
    the exclusion shrinks to the hidden ids among them (`narrow`, `replan`)."""

    source: str
    first: dict[str, Any]
    rest: Pipeline
    # Whether the live documents the $match selects may go in as a literal: no layer
    # dropped the base (each layer's live collection is then read with the filter).
    literal: bool


@dataclass(frozen=True)
class Narrowed:
    """What a leading $match selects from the base: the hidden ids among it, and how
    many documents and BSON bytes it holds."""

    hidden: list[Any]
    docs: int
    nbytes: int


@dataclass(frozen=True)
class Plan:
    op: str                # find, count, distinct or aggregate
    coll: str              # the collection the user named
    kind: PlanKind
    reason: str
    # point, in-place, merged: the collections read, each with its hidden sets. A point
    # with none: no collection can hold the id.
    sources: tuple[Source, ...] = ()
    # The one upstream command that carries the plan out (every kind but merged and an
    # empty point): the user's own command for pass-through.
    command: dict[str, Any] | None = field(default=None, compare=False)
    # aggregate: the second planning step's input, when the base is worth probing.
    probe: Probe | None = None
    # find, union: `command` yields only the answer's ids, in order; the documents are
    # then read by a find on each collection (`find_only`, cursormerge.RefetchCursor).
    refetch: bool = False

    def explain(self, explained: PlanKind | None = None) -> dict[str, Any]:
        """The `mongobranch` field of an explain reply: the plan and which command the
        upstream's part of the reply explains."""
        return {"plan": str(self.kind), "reason": self.reason,
                "explained": str(explained or self.kind)}


def _planned(plan: Plan, db: str | None) -> Plan:
    log.debug("%s %s.%s: %s: %s", plan.op, db or "?", plan.coll, plan.kind, plan.reason)
    return plan


def _db(cmd: dict[str, Any], layers: list[NsState]) -> str | None:
    return layers[0].db if layers else cmd.get("$db")


def _own(cmd: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cmd.items() if k != "$db"}


def _carry(src: dict[str, Any], dst: dict[str, Any]) -> dict[str, Any]:
    dst.update((k, src[k]) for k in READ_CARRY if k in src)
    return dst


# -- query shapes (also used by the write paths) ------------------------------------------

def collated(cmd: dict[str, Any]) -> bool:
    """Whether a command compares strings by a collation: then {_id: "a"} may match "A"."""
    collation = cmd.get("collation")
    return isinstance(collation, dict) and collation.get("locale", "simple") != "simple"


def point_id(filt: Any) -> tuple[Any] | None:
    """(the _id,) when a filter is an equality on _id alone: one document at most."""
    if not isinstance(filt, dict) or list(filt) != ["_id"]:
        return None
    value = filt["_id"]
    if isinstance(value, dict | list | Regex | re.Pattern):
        return None
    return (value,)


def sources(coll: str, layers: list[NsState], skip_top_live: bool = False,
            ) -> list[Source]:
    """The collections the branch view is stored in, each with the hidden sets that
    filter it: the base (unless a layer dropped it) and each layer's live collection down
    to the one that dropped the base. skip_top_live leaves out the top branch's own live
    collection: the parent view a write copies from."""
    out: list[Source] = []
    dropped_at = next((i for i, layer in enumerate(layers) if layer.base_dropped), None)
    if dropped_at is None:
        out.append(Source(coll, tuple(layer.hidden_ids for layer in layers
                                      if layer.hidden_ids)))
    for j, layer in enumerate(layers):
        if dropped_at is not None and j > dropped_at:
            break
        if j == 0 and skip_top_live:
            continue
        out.append(Source(layer.live, tuple(above.hidden_ids for above in layers[:j]
                                            if above.hidden_ids)))
    return out


def point_sources(coll: str, layers: list[NsState], filt: Any,
                  skip_top_live: bool = False) -> list[Source] | None:
    """For an equality on _id alone, the one collection that can hold the document (none
    when none can): the top layer hiding the id owns it, else the base has it. None when
    the filter is not such a point or the hidden-id caches cannot tell."""
    point = point_id(filt)
    if point is None:
        return None
    value = point[0]
    for j, layer in enumerate(layers):
        hidden = layer.hides(value)
        if hidden is None:
            return None
        if hidden or layer.base_dropped:
            # Hidden: this layer owns the id. Dropped: nothing below shows through, so
            # the id is in this layer's live documents or nowhere.
            return [] if j == 0 and skip_top_live else [Source(layer.live)]
    return [Source(coll)]


def unmergeable(cmd: dict[str, Any], layers: list[NsState]) -> str | None:
    """Why the proxy cannot merge plain finds into this find (None: it can)."""
    if any(layer.hidden_ids is None for layer in layers):
        return "a hidden-id set is too large to keep in memory"
    for opt in ("showRecordId", "tailable", "awaitData"):
        if cmd.get(opt):
            return f"find option {opt!r} has no merged form"
    hint = cmd.get("hint")
    # min/max without a hint go to the sides, whose upstream refuses them as mongod
    # does. returnKey without one: each collection's planner would pick its own index
    # (keys of different indexes); a hashed or special index: no key order to merge by.
    if index_bound(cmd) and (hint is not None or cmd.get("returnKey")) and (
            not isinstance(hint, dict) or not hint
            or any(isinstance(v, bool) or v not in (1, -1) for v in hint.values())):
        return "min/max/returnKey without a hint naming an ascending/descending index"
    sort = merge_sort(cmd)
    projection = cmd.get("projection") or {}
    bounded = index_bound(cmd)
    # An index-bound find's sides read _id beside the user's projection, and the proxy
    # removes it (cursormerge.side_projection): it has no union to go to.
    if projection.get("_id") in (0, False) and not bounded:
        return "the projection drops _id, which dropping hidden ids needs"
    if any(str(k).startswith("_id.") for k in projection) and not cmd.get("returnKey") and \
            any(v in (0, False) for k, v in projection.items() if k != "_id"):
        return "an exclusion projection of _id's fields: dropping hidden ids needs the " \
            "whole _id, which an exclusion cannot compute beside them"
    if sort:
        if collated(cmd):
            return "a collation orders the sort: sort keys would need its comparison"
        if any(isinstance(v, bool) or v not in (1, -1) for v in sort.values()):
            return "a $meta or $natural sort has no sort key to merge by"
        # SecantusDB drops every field from an exclusion projection that also asks for
        # $meta (mongod does not): such finds take the server-side union. An index-bound
        # find has no union to take (SecantusDB 0.7 keeps the fields there).
        if any(v in (0, False) for v in projection.values()) and not bounded:
            return "an exclusion projection with a sort (the sort key is a $meta field)"
    if b"$near" in bson.encode(cmd.get("filter") or {}):
        return "a $near filter orders by distance"
    return None


# -- find ---------------------------------------------------------------------------------

def plan_find(cmd: dict[str, Any], layers: list[NsState], *, branch: str = "",
              skip_top_live: bool = False) -> Plan:
    """How a find on the branch view is served. skip_top_live: the parent view of the
    top layer, as a write copies from it (the engine's own reads, `viewscan.py`)."""
    coll = str(cmd["find"])
    db = _db(cmd, layers)

    def plan(kind: PlanKind, reason: str, srcs: Sequence[Source] = (),
             command: dict[str, Any] | None = None) -> Plan:
        return _planned(Plan("find", coll, kind, reason, tuple(srcs), command), db)

    if not layers:
        return plan(PlanKind.PASS, f"the branch never changed {coll}", [Source(coll)],
                    _own(cmd))
    point = None if collated(cmd) or index_bound(cmd) else \
        point_sources(coll, layers, cmd.get("filter"), skip_top_live)
    if point is not None and not cmd.get("skip"):
        if not point:
            return plan(PlanKind.POINT,
                        "an _id equality on an id this view hides: no collection can hold it")
        if point[0].coll == coll:
            return plan(PlanKind.PASS, "an _id equality on an id no layer hides: the base "
                        "collection holds it", point, _own(cmd))
        command = {k: v for k, v in cmd.items() if k not in ("$db", "hint")}
        command["find"] = point[0].coll
        command["singleBatch"] = True
        return plan(PlanKind.POINT, f"an _id equality on an id a layer owns (hides, or holds "
                    f"over a dropped base): only {point[0].coll} can hold it", point, command)
    every = sources(coll, layers, skip_top_live)
    # A hidden set too large to cache (None) is no empty one: sources() leaves it out.
    filtering = next((i for i, layer in enumerate(layers) if layer.base_dropped), len(layers))
    if len(every) == 1 and not every[0].hidden and \
            all(layer.hidden_ids is not None for layer in layers[:filtering]):
        one = every[0].coll
        command = {"find": one, **{k: v for k, v in cmd.items()
                                   if k not in ("find", "$db", "singleBatch")}}
        if one == coll:
            return plan(PlanKind.PASS, "the parent view hides nothing of the base collection",
                        every, command)
        return plan(PlanKind.IN_PLACE, f"the branch owns {coll} outright (a copy branch, or "
                    f"dropped and refilled): the find runs on {one}", every, command)
    why = unmergeable(cmd, layers)
    if why is not None and index_bound(cmd) and not skip_top_live:
        return copy_find(cmd, layers, why)
    if why is not None:
        return _union_plan(cmd, layers, why, branch=branch, skip_top_live=skip_top_live)
    if point:
        return plan(PlanKind.MERGED, f"an _id equality with a skip: a merged find on "
                    f"{point[0].coll}, the one collection that can hold it", point)
    return plan(PlanKind.MERGED, f"plain finds on {len(every)} collections (base and "
                "overlays), hidden ids dropped in memory, merged by sort key", every)


def passes(cmd: dict[str, Any], layers: list[NsState]) -> bool:
    """Whether `plan_find` passes this find through, told where that is cheap: a
    collection the branch never changed, or an `_id` equality on an id no layer hides.
    False for any other find (plan_find then decides)."""
    if not layers:
        return True
    if collated(cmd) or index_bound(cmd) or cmd.get("skip"):
        return False
    coll = cmd["find"]
    point = point_sources(str(coll), layers, cmd.get("filter"))
    return point is not None and len(point) == 1 and point[0].coll == coll


def plan_tailable(cmd: dict[str, Any], layers: list[NsState]) -> Plan:
    """How a tailable find is served: only where one upstream collection holds the whole
    view can an upstream cursor tail it. The base, where the branch changed nothing of
    it (pass-through: the upstream's cursor); the branch's own collection, where it owns
    the collection outright (in-place: the proxy holds the cursor under the user's
    namespace). Otherwise a union plan without a command: the branch's changes are in an
    overlay, a plain collection that no cursor can tail beside the base, and the
    executor refuses the find (after telling a non-capped collection apart, which mongod
    refuses with BadValue)."""
    coll = str(cmd["find"])
    db = _db(cmd, layers)
    if not layers:
        return _planned(Plan("find", coll, PlanKind.PASS, f"the branch never changed {coll}: "
                             "the upstream's tailable cursor", (Source(coll),), _own(cmd)), db)
    every = sources(coll, layers)
    if len(every) == 1 and not every[0].hidden:
        one = every[0].coll
        command = {"find": one, **{k: v for k, v in cmd.items() if k not in ("find", "$db")}}
        if one == coll:
            return _planned(Plan("find", coll, PlanKind.PASS, "the parent view hides nothing "
                                 "of the base collection: the upstream's tailable cursor",
                                 tuple(every), command), db)
        return _planned(Plan("find", coll, PlanKind.IN_PLACE, f"the branch owns {coll} "
                             f"outright: the tailable cursor is {one}'s", tuple(every),
                             command), db)
    return _planned(Plan("find", coll, PlanKind.UNION, f"the branch changed {coll}: its "
                         "changes are in an overlay beside the base, which no upstream "
                         "cursor can tail"), db)


def fall_back(failed: Plan, cmd: dict[str, Any], layers: list[NsState], why: str, *,
              branch: str = "", skip_top_live: bool = False) -> Plan:
    """The second step of a find whose merged or in-place plan the upstream failed
    internally (a side failed where the union works, such as SecantusDB's sortKey over an
    empty array). A side's other refusals are the user's own error, answered as they are
    (`cursormerge._raise_users`)."""
    return _union_plan(cmd, layers, f"the {failed.kind} plan failed ({why}): the "
                       "server-side union answers", branch=branch, skip_top_live=skip_top_live)


def copy_find(cmd: dict[str, Any], layers: list[NsState], why: str) -> Plan:
    """An index-bound find no merged find serves (why), or whose merged sides did not all
    hold the hinted index (one made on the branch): the union has no stage for index
    bounds or keys, so the branch view is copied server-side into a scratch collection
    with the hinted index (`commands/read.py`), and the find runs on the copy as it is."""
    return _planned(Plan("find", str(cmd["find"]), PlanKind.COPY,
                         f"{why}: the branch view is copied with the hinted index, and the "
                         "find runs on the copy"), _db(cmd, layers))


def find_only(cmd: dict[str, Any]) -> str | None:
    """What of a find only a find evaluates, with no aggregation equivalent a union could
    run (None: nothing): the positional, $elemMatch and find-form $slice projections
    ($project knows none of them; $slice there is another operator) and showRecordId."""
    for key, value in (cmd.get("projection") or {}).items():
        if key.endswith(".$") or key == "$":
            return "the positional projection"
        if isinstance(value, dict) and ("$elemMatch" in value or "$slice" in value):
            return f"the {next(iter(value))} projection"
    if cmd.get("showRecordId"):
        return "showRecordId"
    return None


def _union_plan(cmd: dict[str, Any], layers: list[NsState], why: str, *, branch: str,
                skip_top_live: bool) -> Plan:
    """The server-side union of a find; where the find asks for what only a find
    evaluates, the union picks the answer's ids (filter, sort, skip, limit: all its
    own) and a find by those ids on each collection projects them (a refetch plan)."""
    coll = str(cmd["find"])
    only = find_only(cmd)
    if only is None:
        return _planned(Plan("find", coll, PlanKind.UNION, why, (),
                             union_find(cmd, layers, branch=branch,
                                        skip_top_live=skip_top_live, unmerged=why)),
                        _db(cmd, layers))
    ids = {k: v for k, v in cmd.items() if k not in ("projection", "showRecordId")}
    ids["projection"] = {"_id": 1}
    return _planned(Plan("find", coll, PlanKind.UNION,
                         f"{why}: the union picks the ids, {only} is a find's on each "
                         "collection holding them", (),
                         union_find(ids, layers, branch=branch, skip_top_live=skip_top_live),
                         refetch=True), _db(cmd, layers))


def _check_projection(projection: dict[str, Any], branch: str) -> None:
    for key, value in projection.items():
        if key.endswith(".$") or key == "$":
            raise not_supported("the positional projection operator '$'", branch)
        if isinstance(value, dict) and ("$elemMatch" in value or "$slice" in value):
            raise not_supported(f"the {next(iter(value))} projection operator", branch)


def union_find(cmd: dict[str, Any], layers: list[NsState], *, branch: str = "",
               skip_top_live: bool = False, unmerged: str | None = None) -> dict[str, Any]:
    """The aggregate that answers a find on the branch view (unmerged: why no merged
    find serves it, said in the refusal of what only a find can do)."""
    coll = cmd["find"]
    for opt, why in _FIND_UNSUPPORTED.items():
        if cmd.get(opt):
            because = f": {unmerged}" if unmerged and opt in INDEX_BOUND else ""
            raise not_supported(f"find option {opt!r} on a collection the branch changed "
                                f"({why}{because})", branch)
    source, pipeline = views.view_source(coll, layers, cmd.get("filter") or {},
                                         skip_top_live=skip_top_live)
    if cmd.get("sort"):
        pipeline.append({"$sort": cmd["sort"]})
    if cmd.get("skip"):
        pipeline.append({"$skip": cmd["skip"]})
    limit = abs(int(cmd.get("limit") or 0))
    if limit:
        pipeline.append({"$limit": limit})
    projection = cmd.get("projection")
    if projection:
        _check_projection(projection, branch)
        pipeline.append({"$project": projection})
    cursor: dict[str, Any] = {}
    if "batchSize" in cmd:
        cursor["batchSize"] = cmd["batchSize"]
    out = _carry(cmd, {"aggregate": source, "pipeline": pipeline, "cursor": cursor})
    if source != coll:
        out.pop("hint", None)
    return out


# -- count and distinct -------------------------------------------------------------------

def _per_source(op: str, cmd: dict[str, Any], coll: str, layers: list[NsState],
                union: Callable[[], dict[str, Any]]) -> Plan:
    db = _db(cmd, layers)
    if not layers:
        return _planned(Plan(op, coll, PlanKind.PASS, f"the branch never changed {coll}",
                             (Source(coll),), _own(cmd)), db)
    every = sources(coll, layers)
    if len(every) == 1 and not every[0].hidden:
        return _planned(Plan(op, coll, PlanKind.IN_PLACE,
                             f"the branch owns {coll} outright: the {op} runs on "
                             f"{every[0].coll}", tuple(every)), db)
    if any(layer.hidden_ids is None for layer in layers):
        return _planned(Plan(op, coll, PlanKind.UNION, "a hidden-id set is too large to "
                             f"keep in memory: the server-side union {op}s", (), union()), db)
    what = "counts summed less the hidden matches" if op == "count" else \
        "distinct values of each, hidden ids left out, deduplicated by the server"
    return _planned(Plan(op, coll, PlanKind.MERGED, f"a {op} on each of {len(every)} "
                         f"collections (base and overlays): {what}", tuple(every)), db)


def plan_count(cmd: dict[str, Any], layers: list[NsState]) -> Plan:
    return _per_source("count", cmd, str(cmd["count"]), layers,
                       lambda: union_count(cmd, layers))


def count_stages(cmd: dict[str, Any]) -> Pipeline:
    """A count command's skip and limit, then the count, as stages after its query."""
    stages: Pipeline = []
    if cmd.get("skip"):
        stages.append({"$skip": int(cmd["skip"])})
    limit = abs(int(cmd.get("limit") or 0))
    if limit:
        stages.append({"$limit": limit})
    stages.append({"$count": "n"})
    return stages


def union_count(cmd: dict[str, Any], layers: list[NsState]) -> dict[str, Any]:
    """The aggregate that counts a query's matches in the branch view."""
    source, pipeline = views.view_source(cmd["count"], layers, cmd.get("query") or {})
    pipeline += count_stages(cmd)
    out = _carry(cmd, {"aggregate": source, "pipeline": pipeline, "cursor": {}})
    if source != cmd["count"]:
        out.pop("hint", None)
    return out


def plan_distinct(cmd: dict[str, Any], layers: list[NsState], *, branch: str = "") -> Plan:
    key = cmd.get("key")
    if layers and not isinstance(key, str):
        raise CommandError(Code.TYPE_MISMATCH, "distinct key must be a string")
    return _per_source("distinct", cmd, str(cmd["distinct"]), layers,
                       lambda: union_distinct(cmd, str(key), layers, branch))


def union_distinct(cmd: dict[str, Any], key: str, layers: list[NsState],
                   branch: str) -> dict[str, Any]:
    """The aggregate that collects a key's distinct values in the branch view."""
    if "." in key:
        raise not_supported("distinct on a dotted key over a large overlay", branch)
    coll = cmd["distinct"]
    path = f"${key}"
    source, stages = views.view_source(coll, layers, cmd.get("query") or {})
    pipeline = [
        *stages,
        {"$match": {key: {"$not": {"$size": 0}}}},
        {"$unwind": {"path": path, "preserveNullAndEmptyArrays": True}},
        {"$group": {"_id": None, "v": {"$addToSet": path}}},
    ]
    out = _carry(cmd, {"aggregate": source, "pipeline": pipeline, "cursor": {}})
    if source != coll:
        out.pop("hint", None)
    return out


# -- aggregate ----------------------------------------------------------------------------

_TMP = "__mb_lk"
LayersOf = Callable[[str], list[NsState]]


def rewrite(pipeline: Pipeline, layers_of: LayersOf, branch: str) -> Pipeline:
    """A pipeline whose $lookup, $graphLookup, $unionWith and $facet read the branch views
    of the collections they name."""
    out: Pipeline = []
    for stage in pipeline:
        if not isinstance(stage, dict) or len(stage) != 1:
            raise CommandError(Code.STAGE_NEEDS_ONE_FIELD,
                               "A pipeline stage specification object must contain exactly "
                               "one field.")
        name, spec = next(iter(stage.items()))
        if name == "$lookup":
            out.extend(_lookup(spec, layers_of, branch))
        elif name == "$unionWith":
            out.append({"$unionWith": _union(spec, layers_of, branch)})
        elif name == "$facet" and isinstance(spec, dict):
            out.append({"$facet": {k: rewrite(v, layers_of, branch) for k, v in spec.items()}})
        elif name == "$graphLookup" and isinstance(spec, dict) and \
                layers_of(str(spec.get("from"))):
            top = views.whole(layers_of(str(spec.get("from"))))
            if top is None:
                # A client's read has pointed it at a scratch copy by now
                # (commands/scratchfrom.py); a pipeline that was not prepared so is refused.
                raise not_supported("$graphLookup from a collection the branch changed", branch)
            out.append({"$graphLookup": {**spec, "from": top}})
        elif name in ("$changeStream", "$changeStreamSplitLargeEvent"):
            # A leading $changeStream never gets here (commands/changestream.py).
            raise CommandError(Code.CHANGE_STREAM_NOT_FIRST,
                               f"{name} is only valid as the first stage in a pipeline")
        elif name == "$merge" and stage is not pipeline[-1]:
            raise CommandError(Code.MERGE_NOT_LAST, "$merge can only be the final stage "
                               "in the pipeline")
        else:
            out.append(stage)
    return out


def _union(spec: Any, layers_of: LayersOf, branch: str) -> Any:
    if isinstance(spec, str):
        spec = {"coll": spec}
    if not isinstance(spec, dict):
        return spec
    spec = dict(spec)
    inner = rewrite(spec.get("pipeline") or [], layers_of, branch)
    layers = layers_of(str(spec.get("coll")))
    top = views.whole(layers)
    if top is not None:
        spec["coll"] = top
    elif layers:
        inner = views.view_stages(layers) + inner
    spec["pipeline"] = inner
    return spec


# Stages whose output for a document depends on that document alone: run on each
# layer's part of a lookup's joined documents, they give what they would on the whole.
PER_DOCUMENT = frozenset({"$match", "$project", "$addFields", "$set", "$unset",
                          "$replaceRoot", "$replaceWith", "$redact", "$unwind", "$lookup",
                          "$graphLookup"})


def _lookup(spec: Any, layers_of: LayersOf, branch: str) -> Pipeline:
    if not isinstance(spec, dict):
        return [{"$lookup": spec}]
    spec = dict(spec)
    if "pipeline" in spec:
        spec["pipeline"] = rewrite(spec["pipeline"], layers_of, branch)
    source = spec.get("from")
    layers = layers_of(source) if isinstance(source, str) else []
    if not layers:
        return [{"$lookup": spec}]
    top = views.whole(layers)
    if top is not None:
        return [{"$lookup": {**spec, "from": top}}]
    if "localField" not in spec:
        spec["pipeline"] = views.view_stages(layers) + spec.get("pipeline", [])
        return [{"$lookup": spec}]
    inner = spec.get("pipeline") or []
    names = [next(iter(st), "") if isinstance(st, dict) else repr(st) for st in inner]
    stateful = next((n for n in names if n not in PER_DOCUMENT), None)
    if stateful is not None:
        # As for $graphLookup: a client's read reads a scratch copy instead (scratchfrom).
        raise not_supported(f"$lookup with both localField and a pipeline holding {stateful} "
                            "on a changed collection (only stages that act on each joined "
                            f"document alone: {', '.join(sorted(PER_DOCUMENT))})", branch)
    # Equality lookups keep mongod's array semantics: one lookup per layer, each
    # excluding the ids hidden above it, concatenated. A pipeline of per-document
    # stages runs in each of them, on that layer's joined documents: the same
    # documents come out as from the concatenation.
    dropped_at = next((i for i, layer in enumerate(layers) if layer.base_dropped), None)
    parts: list[tuple[str, Pipeline]] = []
    if dropped_at is None:
        parts.append((str(source), views.exclusion(layers)))
    for j, layer in enumerate(layers):
        if dropped_at is not None and j > dropped_at:
            break
        parts.append((layer.live, views.exclusion(layers[:j])))
    stages: Pipeline = []
    names = []
    for i, (coll, excl) in enumerate(parts):
        name = f"{_TMP}{i}"
        names.append(name)
        sub: dict[str, Any] = {"from": coll, "localField": spec["localField"],
                               "foreignField": spec["foreignField"], "as": name}
        if "let" in spec:
            sub["let"] = spec["let"]
        if excl or inner:
            sub["pipeline"] = excl + inner
        stages.append({"$lookup": sub})
    stages.append({"$set": {spec["as"]: {"$concatArrays": [f"${n}" for n in names]}}})
    stages.append({"$unset": names})
    return stages


def plan_aggregate(cmd: dict[str, Any], layers_of: LayersOf, *, branch: str = "") -> Plan:
    """How an aggregate on the branch is served. A union over a hidden set too large for
    `$nin` whose first stage is a `$match` carries a `probe`: the executor reads what that
    $match selects from the base and plans again (`narrow`, `replan`)."""
    pipeline = cmd.get("pipeline")
    if not isinstance(pipeline, list):
        raise CommandError(Code.TYPE_MISMATCH, "'pipeline' option must be specified as an array")
    source = cmd.get("aggregate")
    coll = source if isinstance(source, str) else str(source)
    layers = layers_of(source) if isinstance(source, str) else []
    db = _db(cmd, layers)
    rewritten = rewrite(pipeline, layers_of, branch)
    out = {k: v for k, v in cmd.items() if k not in ("$db", "pipeline")}
    if not layers:
        if rewritten == pipeline:
            return _planned(Plan("aggregate", coll, PlanKind.PASS,
                                 "the branch changed nothing the pipeline reads",
                                 (), {**out, "pipeline": pipeline}), db)
        return _planned(Plan("aggregate", coll, PlanKind.UNION,
                             f"{coll} is unchanged; the stages naming other collections "
                             "read their branch views", (), {**out, "pipeline": rewritten}),
                        db)
    top = views.whole(layers)
    if top is None and any(layer.base_dropped for layer in layers):
        out.pop("hint", None)
    if top is not None:
        # Its own collection holds the indexes the branch shows: the hint stays.
        out["aggregate"] = top
        out["pipeline"] = rewritten
        return _planned(Plan("aggregate", coll, PlanKind.IN_PLACE,
                             f"the branch owns {coll} outright: the pipeline runs on {top}",
                             (Source(top),), out), db)
    first: dict[str, Any] | None = None
    rest = rewritten
    if rest and "$match" in rest[0] and isinstance(rest[0]["$match"], dict):
        first, rest = rest[0]["$match"], rest[1:]
    probe = None
    how = "the hidden ids excluded with $nin"
    if views.needs_anti_join(layers):
        how = "the hidden ids excluded by an indexed anti-join"
        if first and isinstance(source, str):
            probe = Probe(source, first, rest,
                          literal=not any(layer.base_dropped for layer in layers))
    elif any(layer.hidden_ids is None for layer in layers):
        how = "the hidden ids excluded by an indexed anti-join (too many to keep in memory)"
    out["pipeline"] = views.view_stages(layers, first) + rest
    return _planned(Plan("aggregate", coll, PlanKind.UNION,
                         f"the branch view of {coll} inlined as a pipeline: {how}, each "
                         "overlay a $unionWith", (), out, probe), db)


# A leading $match selecting at most this many base documents narrows the hidden ids
# to exclude from the base down to those it selects (a small overlay: the common case).
NARROW_LIMIT = 1000
_NARROW_CARRY = ("lsid", "$clusterTime", "readConcern", "collation", "let", "hint",
                 "maxTimeMS", "apiVersion", "apiStrict")
SIZE = "__mb_size"


def probe_find(cmd: dict[str, Any], coll: str, filt: dict[str, Any], *,
               base: bool) -> dict[str, Any]:
    """The find that reads what a leading $match selects (at most NARROW_LIMIT + 1
    documents): of the base, only each document's _id and BSON size; of an overlay, the
    documents themselves, with its own indexes (no hint)."""
    find: dict[str, Any] = {"find": coll, "filter": filt, "limit": NARROW_LIMIT + 1,
                            "batchSize": NARROW_LIMIT + 1}
    if base:
        find["projection"] = {"_id": 1, SIZE: {"$bsonSize": "$$ROOT"}}
    find.update((k, cmd[k]) for k in _NARROW_CARRY if k in cmd and (base or k != "hint"))
    return find


def narrow(layers: list[NsState], batch: list[dict[str, Any]] | None) -> Narrowed | None:
    """From the base documents the leading $match selects (None: too many, or the
    upstream refused the probe), the hidden ids among them when few enough for `$nin`;
    None: the anti-join stays. The proxy only intersects id sets."""
    if batch is None or len(batch) > NARROW_LIMIT:
        return None
    hidden = views.hidden_among(layers, [d["_id"] for d in batch])
    if len(hidden) > views.NIN_LIMIT:
        return None
    nbytes = sum(d[SIZE] if isinstance(d.get(SIZE), int) else views.INJECT_BYTES
                 for d in batch)
    return Narrowed(hidden, len(batch), nbytes)


def literal_fits(base: Narrowed, live: list[list[dict[str, Any]]]) -> bool:
    """Whether the live documents read so far (one list per layer) and the base side
    are still few enough for the live side to go in as a literal (views.injects_live)."""
    if any(len(batch) > NARROW_LIMIT for batch in live):
        return False
    docs = sum(len(batch) for batch in live)
    nbytes = sum(len(bsonutil.encode(d)) for batch in live for d in batch)
    return views.injects_live(base.docs, base.nbytes, docs, nbytes)


def replan(plan: Plan, layers: list[NsState], base: Narrowed | None,
           live: list[list[dict[str, Any]]] | None) -> Plan:
    """The aggregate's second step, after its probes: the exclusion narrowed to the
    hidden ids among the base documents the leading $match selects, and the live
    documents it selects appended as a literal when `live` holds them."""
    probe = plan.probe
    if probe is None or base is None or plan.command is None:
        return plan
    stages = views.view_stages(layers, probe.first, base_hidden=base.hidden,
                               live_docs=None if live is None else
                               views.live_view(layers, live))
    reason = (f"the branch view of {plan.coll} inlined as a pipeline: its leading $match "
              f"selects {base.docs} base documents, {len(base.hidden)} of them hidden "
              "(excluded with $nin)")
    reason += (", the overlays' matches appended as a literal" if live is not None
               else ", each overlay a $unionWith")
    command = {**plan.command, "pipeline": stages + probe.rest}
    return _planned(replace(plan, reason=reason, command=command, probe=None),
                    _db(plan.command, layers))
