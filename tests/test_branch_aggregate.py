"""Aggregations on a branch whose overlay outgrew a $nin: the leading $match's live
documents read with the overlay's index and appended as a literal, checked against a
plain copy of the same data holding the same writes."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from bson import Decimal128, Int64
from pymongo import MongoClient

from tests.servers import ProxyProcess

_names = itertools.count()
N = 3000


def _doc(i: int) -> dict[str, Any]:
    return {"_id": i, "k": i, "g": i % 7, "v": Int64(i), "d": Decimal128(f"{i}.5"),
            "at": dt.datetime(2026, 1, 1) + dt.timedelta(minutes=i), "s": f"${i}",
            "tags": ["a", f"t{i % 3}"]}


def _write(db: Any) -> None:
    """The same writes, on the branch and on the copy."""
    db.items.update_many({"_id": {"$in": list(range(0, N, 10))}},
                         {"$inc": {"k": 1}, "$set": {"s": "$changed", "o": {"x": "$y"}}})
    db.items.delete_many({"_id": {"$in": list(range(5, N, 30))}})
    db.items.insert_many([{"_id": f"new{i}", "k": 100 + i, "g": i % 7, "v": Int64(-i),
                           "s": "$inserted", "tags": []} for i in range(40)])


@pytest.fixture()
def pair(proxy: ProxyProcess, direct: MongoClient) -> Iterator[tuple[Any, Any, Any, str]]:
    n = next(_names)
    db_name, copy_name = f"ba_{n}", f"ba_{n}_copy"
    for name in (db_name, copy_name):
        direct[name].items.insert_many([_doc(i) for i in range(N)])
        direct[name].items.create_index("k")
    status, body = proxy.api("POST", "/branches", {"name": f"ba-{n}"})
    assert status == 201, body
    client: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    db, copy = client[db_name], direct[copy_name]
    _write(db)
    _write(copy)
    yield db, copy, direct[db_name], f"ba-{n}"
    client.close()
    proxy.api("DELETE", f"/branches/ba-{n}")
    direct.drop_database(db_name)
    direct.drop_database(copy_name)


PIPELINES: list[list[dict[str, Any]]] = [
    [{"$match": {"k": {"$gte": 90, "$lt": 160}}}],
    [{"$match": {"k": {"$gte": 90, "$lt": 160}}},
     {"$group": {"_id": "$g", "n": {"$sum": 1}, "v": {"$sum": "$v"}, "d": {"$sum": "$d"}}},
     {"$sort": {"_id": 1}}],
    [{"$match": {"k": {"$gte": 90, "$lt": 160}, "s": {"$regex": "^\\$"}}},
     {"$project": {"s": 1, "o": 1, "at": 1}}, {"$sort": {"_id": 1}}],
    [{"$match": {"$expr": {"$lt": ["$k", 120]}, "k": {"$gte": 100}}}, {"$count": "n"}],
    [{"$match": {"k": {"$gte": 2990}}}, {"$sort": {"k": -1}}, {"$limit": 3}],
    [{"$match": {"k": {"$gte": 100, "$lt": 110}}}, {"$unwind": "$tags"},
     {"$sortByCount": "$tags"}, {"$sort": {"_id": 1}}],
]


def _key(doc: dict[str, Any]) -> str:
    return repr(sorted(doc.items(), key=lambda kv: kv[0]))


@pytest.mark.parametrize("pipeline", PIPELINES, ids=range(len(PIPELINES)))
def test_few_selected_documents_answer_as_a_copy(pair: tuple[Any, Any, Any, str],
                                                  pipeline: list[dict[str, Any]]) -> None:
    db, copy, _, _ = pair
    got, want = list(db.items.aggregate(pipeline)), list(copy.items.aggregate(pipeline))
    if any("$sort" in stage or "$count" in stage for stage in pipeline):
        assert got == want
    else:
        assert sorted(map(_key, got)) == sorted(map(_key, want))
        assert len(got) == len(want)


def test_the_live_side_goes_in_as_a_literal_read_by_index(
        pair: tuple[Any, Any, Any, str]) -> None:
    """explain shows what the upstream runs: no union of the overlay, the live matches
    inline; a filter selecting more live documents than a literal carries unions."""
    db, copy, base, _ = pair
    pipeline = PIPELINES[1]
    plan = str(db.command("explain", {"aggregate": "items", "pipeline": pipeline,
                                      "cursor": {}}))
    assert "'$unionWith'" not in plan and "'$lookup'" not in plan
    assert "__mb_live" in plan and "$inserted" in plan
    reason = db.command("explain", {"aggregate": "items", "pipeline": pipeline,
                                    "cursor": {}})["mongobranch"]["reason"]
    assert "selects" in reason and "appended as a literal" in reason, reason

    db.items.insert_many([{"_id": f"bulk{i}", "k": 50_000 + i, "g": 1} for i in range(1100)])
    copy.items.insert_many([{"_id": f"bulk{i}", "k": 50_000 + i, "g": 1} for i in range(1100)])
    wide = [{"$match": {"k": {"$gte": 2990}}}, {"$group": {"_id": "$g", "n": {"$sum": 1}}},
            {"$sort": {"_id": 1}}]
    assert list(db.items.aggregate(wide)) == list(copy.items.aggregate(wide))
    plan = str(db.command("explain", {"aggregate": "items", "pipeline": wide, "cursor": {}}))
    assert "'$unionWith'" in plan and "__mb_live" not in plan
    reason = db.command("explain", {"aggregate": "items", "pipeline": wide,
                                    "cursor": {}})["mongobranch"]["reason"]
    assert "each overlay a $unionWith" in reason, reason
    # the base is never written
    assert base.items.count_documents({}) == N


def test_a_branch_of_a_branch_drops_what_its_own_layer_hides(
        pair: tuple[Any, Any, Any, str], proxy: ProxyProcess) -> None:
    db, copy, _, parent = pair
    status, body = proxy.api("POST", "/branches", {"name": f"{parent}-c", "from": parent})
    assert status == 201, body
    child: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    try:
        cdb = child[db.name]
        for target in (cdb, copy):
            # parent live documents hidden again by the child, and a new child layer
            target.items.delete_many({"_id": {"$in": ["new3", "new4", 100, 110]}})
            target.items.update_many({"k": {"$gte": 120, "$lt": 125}}, {"$inc": {"v": 1000}})
            target.items.delete_many({"_id": {"$in": list(range(200, 900, 7))}})
        for pipeline in PIPELINES:
            got, want = list(cdb.items.aggregate(pipeline)), list(copy.items.aggregate(pipeline))
            assert sorted(map(_key, got)) == sorted(map(_key, want)), pipeline
    finally:
        child.close()
        proxy.api("DELETE", f"/branches/{parent}-c")


def test_a_lookup_with_local_field_and_a_pipeline_on_a_changed_collection(
        pair: tuple[Any, Any, Any, str]) -> None:
    """mongod's concise correlated form (localField/foreignField beside a pipeline of
    per-document stages) joins the branch's view of the collection, with `let`; a
    pipeline with a stage over the whole joined set is refused, naming the stage."""
    db, copy, _, _ = pair
    pipeline = [
        {"$match": {"k": {"$gte": 88, "$lt": 104}}},
        {"$lookup": {"from": "items", "localField": "k", "foreignField": "_id",
                     "let": {"mine": "$s"},
                     "pipeline": [{"$match": {"tags": "a"}},
                                  {"$project": {"s": 1, "k": 1}},
                                  {"$set": {"from": "$$mine"}}],
                     "as": "j"}},
        {"$project": {"k": 1, "j": 1}}, {"$sort": {"_id": 1}}]
    got, want = list(db.items.aggregate(pipeline)), list(copy.items.aggregate(pipeline))
    assert got == want
    # The join met changed, deleted and unchanged documents of the branch.
    joined = {j["_id"] for doc in got for j in doc["j"]}
    assert {89, 91, 100} <= joined and 95 not in joined
    assert any(j["s"] == "$changed" for doc in got for j in doc["j"])


def _scratch(direct: MongoClient, db_name: str) -> list[str]:
    """The scratch `from` copies on the upstream (naming.scratch_from)."""
    return direct[db_name].list_collection_names(
        filter={"name": {"$regex": "^__mb_[0-9a-f]+_g_"}})


def test_a_lookup_with_local_field_and_a_whole_set_pipeline_reads_a_copy(
        pair: tuple[Any, Any, Any, str], direct: MongoClient) -> None:
    """A pipeline over the whole joined set ($sort, $limit, $group) cannot run once per
    layer: the join reads a scratch copy of the branch's view of `from`, the same
    answer as the copy's; the scratch is gone after the read."""
    db, copy, base, _ = pair
    pipeline = [
        {"$match": {"k": {"$gte": 88, "$lt": 104}}},
        {"$lookup": {"from": "items", "localField": "g", "foreignField": "g",
                     "pipeline": [{"$match": {"k": {"$lt": 200}}}, {"$sort": {"v": 1}},
                                  {"$limit": 3}, {"$project": {"k": 1, "s": 1}}],
                     "as": "j"}},
        {"$lookup": {"from": "items", "localField": "g", "foreignField": "g",
                     "pipeline": [{"$group": {"_id": None, "n": {"$sum": 1}}}],
                     "as": "n"}},
        {"$project": {"g": 1, "j": 1, "n": 1}}, {"$sort": {"_id": 1}}]
    got, want = list(db.items.aggregate(pipeline)), list(copy.items.aggregate(pipeline))
    assert got == want
    tops = {j["_id"] for doc in got for j in doc["j"]}
    assert tops & {f"new{i}" for i in range(40)}  # the overlay's inserts joined
    assert got[0]["n"][0]["n"] != base.items.count_documents({"g": got[0]["g"]})
    assert _scratch(direct, base.name) == []


_GRAPH = [
    {"$match": {"_id": {"$in": ["new0", "new25", "new3", 34, 4]}}},
    {"$graphLookup": {"from": "items", "startWith": "$k", "connectFromField": "k",
                      "connectToField": "_id", "as": "g", "maxDepth": 5,
                      "depthField": "depth"}},
    {"$project": {"g": {"$sortArray": {"input": "$g", "sortBy": {"_id": 1}}}}},
    {"$project": {"g._id": 1, "g.depth": 1, "g.s": 1, "g.k": 1}},
    {"$sort": {"_id": 1}}]


def test_graph_lookup_from_a_changed_collection(pair: tuple[Any, Any, Any, str],
                                                direct: MongoClient) -> None:
    """$graphLookup recurses over a scratch copy of the branch's view of `from` (base
    less the hidden ids, plus the overlay): the copy's answer, through changed (100
    now points at 101), deleted (125) and inserted documents."""
    db, copy, base, _ = pair
    got, want = list(db.items.aggregate(_GRAPH)), list(copy.items.aggregate(_GRAPH))
    assert got == want
    walked = {d["_id"]: [g["_id"] for g in d["g"]] for d in got}
    assert walked["new0"] == [100, 101] and walked["new25"] == []
    assert any(g.get("s") == "$changed" for d in got for g in d["g"])
    # Inside a sub-pipeline and a $facet too, each reading its own copy.
    nested = [{"$match": {"_id": "new0"}},
              {"$lookup": {"from": "items", "pipeline": _GRAPH, "as": "sub"}},
              {"$facet": {"f": _GRAPH}}]
    assert list(db.items.aggregate(nested)) == list(copy.items.aggregate(nested))
    assert _scratch(direct, base.name) == []
    # explain explains the aggregation as it runs, the copy made and dropped for it.
    plan = db.command("explain", {"aggregate": "items", "pipeline": _GRAPH, "cursor": {}})
    assert plan["ok"] == 1.0 and plan["mongobranch"]["plan"] == "union"
    assert _scratch(direct, base.name) == []


def test_a_graph_lookup_cursor_keeps_its_copy_until_it_ends(
        pair: tuple[Any, Any, Any, str], direct: MongoClient, proxy: ProxyProcess) -> None:
    """A read left open holds its scratch copy (hidden from the branch's listing) until
    its cursor is exhausted or killed, or the branch is dropped."""
    db, copy, base, name = pair
    by_k = {**_GRAPH[1]["$graphLookup"], "connectFromField": "_id", "connectToField": "k"}
    pipeline = [{"$match": {"k": {"$gte": 90, "$lt": 130}}}, {"$graphLookup": by_k},
                *_GRAPH[2:]]
    for finish in ("exhaust", "kill"):
        cursor = db.items.aggregate(pipeline, batchSize=3)
        first = [next(cursor) for _ in range(3)]
        assert len(_scratch(direct, base.name)) == 1
        # Indexed by the field the traversal looks up, as `from`'s index would serve it.
        keys = [ix["key"] for ix in direct[base.name][_scratch(direct, base.name)[0]]
                .list_indexes()]
        assert {"k": 1} in keys
        assert not [c for c in db.list_collection_names() if c.startswith("__mb_")]
        if finish == "exhaust":
            assert first + list(cursor) == list(copy.items.aggregate(pipeline))
        else:
            cursor.close()
        assert _scratch(direct, base.name) == []
    left = db.items.aggregate(pipeline, batchSize=3)
    next(left)
    assert len(_scratch(direct, base.name)) == 1
    status, _ = proxy.api("DELETE", f"/branches/{name}")  # the suite keeps none
    assert status == 200
    assert _scratch(direct, base.name) == []


@pytest.mark.secantus_gap(reason="SecantusDB reads a view named as $graphLookup's `from` "
                                 "as an empty collection (mongod resolves it); the copy "
                                 "side joins a collection holding the view's documents")
def test_graph_lookup_from_a_view(pair: tuple[Any, Any, Any, str],
                                  direct: MongoClient) -> None:
    db, copy, base, _ = pair
    view = [{"$match": {"g": {"$lt": 5}}}, {"$set": {"k": {"$add": ["$k", 1]}}}]
    db.create_collection("shifted", viewOn="items", pipeline=view)
    copy.items.aggregate([*view, {"$out": "shifted"}])
    pipeline = [{"$match": {"_id": {"$in": [0, 3, 7, 12, "new1"]}}},
                {"$graphLookup": {"from": "shifted", "startWith": "$k",
                                  "connectFromField": "k", "connectToField": "_id",
                                  "as": "g", "maxDepth": 3}},
                {"$project": {"g": {"$sortArray": {"input": "$g", "sortBy": {"_id": 1}}}}},
                {"$project": {"g._id": 1, "g.k": 1}}, {"$sort": {"_id": 1}}]
    got, want = list(db.items.aggregate(pipeline)), list(copy.items.aggregate(pipeline))
    assert got == want
    assert any(len(d["g"]) > 1 for d in got)
    assert _scratch(direct, base.name) == []
