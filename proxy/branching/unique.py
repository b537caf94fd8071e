"""Unique indexes across base and branch.

An overlay carries the view's unique indexes, so the server rejects duplicates
among the branch's own documents. What it cannot see is the parent view: these
stages look up, server-side, whether candidate documents collide with a visible
parent document on any unique index (equality as the index compares it: the
lookup's localField/foreignField matching, missing equal to null), among the
documents a partial index's filter selects.
"""

from __future__ import annotations

from typing import Any

from bson import json_util

from proxy.branching import views
from proxy.branching.model import NsState

DUP_FIELD = "__mb_dup"
KEY_FIELD = "__mb_kv"


def unique_specs(indexes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The unique indexes worth checking across layers (not _id)."""
    return [ix for ix in indexes if ix.get("unique") and ix.get("name") != "_id_"]


def _eq_rest(fields: list[str]) -> list[dict[str, Any]]:
    if not fields:
        return []
    conds = [{"$eq": [{"$ifNull": [f"${f}", None]}, {"$ifNull": [f"$$k{i}", None]}]}
             for i, f in enumerate(fields)]
    return [{"$match": {"$expr": {"$and": conds}}}]


def collision_stages(coll: str, layers: list[NsState],
                     spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Stages keeping only candidates that collide with the parent view on this index."""
    fields = list(spec["key"])
    first, rest = fields[0], fields[1:]
    sides: list[tuple[str, list[dict[str, Any]]]] = []
    dropped_at = next((i for i, layer in enumerate(layers) if layer.base_dropped), None)
    if dropped_at is None:
        sides.append((coll, views.exclusion(layers)))
    for j, layer in enumerate(layers):
        if dropped_at is not None and j > dropped_at:
            break
        if j > 0:
            sides.append((layer.live, views.exclusion(layers[:j])))
    # A partial index holds only the documents its filter selects, on both sides.
    partial = spec.get("partialFilterExpression")
    stages: list[dict[str, Any]] = [] if partial is None else [{"$match": partial}]
    names = []
    for i, (source, excl) in enumerate(sides):
        name = f"{DUP_FIELD}{i}"
        names.append(name)
        pipeline = _eq_rest(rest) + excl
        if spec.get("sparse"):
            pipeline.insert(0, {"$match": {first: {"$exists": True}}})
        if partial is not None:
            pipeline.insert(0, {"$match": partial})
        lookup: dict[str, Any] = {"from": source, "localField": first, "foreignField": first,
                                  "pipeline": pipeline, "as": name}
        if rest:
            lookup["let"] = {f"k{i}": f"${f}" for i, f in enumerate(rest)}
        stages.append({"$lookup": lookup})
    if not names:
        return [{"$match": {"_id": {"$in": []}}}]
    match: dict[str, Any] = {"$or": [{f"{n}.0": {"$exists": True}} for n in names]}
    if spec.get("sparse"):
        match = {"$and": [match, {first: {"$exists": True}}]}
    stages.append({"$match": match})
    stages.append({"$project": {"_id": 1, KEY_FIELD: [f"${f}" for f in fields]}})
    return stages


def dup_error(ns: str, spec: dict[str, Any], doc: dict[str, Any], index: int) -> dict[str, Any]:
    fields = list(spec["key"])
    values = doc.get(KEY_FIELD) or [None] * len(fields)
    key_value = dict(zip(fields, values, strict=False))
    shown = ", ".join(f"{f}: {_shown(v)}" for f, v in key_value.items())
    return {"index": index, "code": 11000,
            "errmsg": f"E11000 duplicate key error collection: {ns} index: {spec['name']} "
                      f"dup key: {{ {shown} }}",
            "keyPattern": dict(spec["key"]), "keyValue": key_value}


def _shown(value: Any) -> str:
    """A key value as mongod prints it in a duplicate-key message: "text", null, 5."""
    return f'"{value}"' if isinstance(value, str) else json_util.dumps(value)
