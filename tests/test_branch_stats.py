"""Collection statistics and storage upkeep on a branch port: `collStats`, the
`$collStats` and `$indexStats` stages, `compact`, `reIndex`, `planCacheClear`, and what a
branch port refuses for good, with its reason.

The standard is a plain collection holding the same documents: a branch's figures for
what it shows must be that collection's, whatever base and overlays store them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from tests.branchutil import Branches, unique
from tests.servers import ProxyProcess

# The figures of the branch view itself; storage and index sizes are those of the
# collections that store it (the shared base among them), documented as such.
VIEW_FIGURES = ("ns", "count", "size", "avgObjSize", "nindexes", "capped")


@pytest.fixture()
def db_name(direct: MongoClient) -> Iterator[str]:
    name = unique("stats").replace("-", "_")
    yield name
    direct.drop_database(name)


def _seed(direct: MongoClient, db: str) -> None:
    direct[db].t.insert_many([{"_id": i, "a": i, "s": "x" * i} for i in range(60)])
    direct[db].t.create_index("a")


def _copy_of(direct: MongoClient, branch: MongoClient, db: str, coll: str, copy: str) -> None:
    """A plain collection on the upstream holding what the branch shows, same indexes."""
    direct[db][copy].insert_many(list(branch[db][coll].find().sort("_id", 1)))
    for ix in branch[db][coll].list_indexes():
        if ix["name"] != "_id_":
            direct[db][copy].create_index(list(ix["key"].items()), name=ix["name"])


def _view(stats: dict[str, Any], coll: str) -> dict[str, Any]:
    out = {k: stats[k] for k in VIEW_FIGURES if k in stats}
    if "ns" in out:
        out["ns"] = out["ns"].rsplit(".", 1)[0] + "." + coll
    out["indexes"] = sorted(stats.get("indexSizes", {}))
    return out


def _write(db: Any) -> None:
    db.t.insert_many([{"_id": 100 + i, "a": i, "s": "new" * i} for i in range(5)])
    db.t.update_many({"_id": {"$in": [10, 20, 30]}}, {"$set": {"s": "changed"}})
    db.t.delete_many({"_id": {"$in": [1, 2, 3, 40]}})


def test_coll_stats_of_a_changed_collection_are_a_copys(
        made: Branches, direct: MongoClient, db_name: str) -> None:
    _seed(direct, db_name)
    branch = made.client(made.create(unique("st")))
    # Unchanged: the upstream answers, as for main.
    assert _view(branch[db_name].command("collStats", "t"), "t") == \
        _view(direct[db_name].command("collStats", "t"), "t")
    _write(branch[db_name])
    branch[db_name].t.create_index("s", name="by_s")
    # Main changes after the fork: the branch keeps its snapshot, and its figures.
    direct[db_name].t.insert_many([{"_id": 1000 + i, "a": i} for i in range(7)])
    direct[db_name].t.delete_many({"_id": {"$in": [50, 51]}})
    _copy_of(direct, branch, db_name, "t", "copy")
    mine = branch[db_name].command("collStats", "t")
    want = direct[db_name].command("collStats", "copy")
    assert _view(mine, "t") == _view(want, "t")
    assert mine["count"] == 60 + 5 - 4
    assert "__mb_" not in repr(mine)
    # A child of the branch: hidden ids of two layers.
    child = made.client(made.create(unique("st"), **{"from": made.created[-1]}))
    child[db_name].t.delete_many({"_id": {"$lt": 20}})
    child[db_name].t.insert_one({"_id": 5000, "a": 1, "s": "child"})
    _copy_of(direct, child, db_name, "t", "copy2")
    assert _view(child[db_name].command("collStats", "t"), "t") == \
        _view(direct[db_name].command("collStats", "copy2"), "t")
    # The parent's figures did not move with the child's writes.
    assert branch[db_name].command("collStats", "t")["count"] == mine["count"]


def test_coll_stats_of_a_collection_the_branch_owns_or_dropped(
        made: Branches, direct: MongoClient, db_name: str) -> None:
    _seed(direct, db_name)
    branch = made.client(made.create(unique("st")))
    db = branch[db_name]
    db.t.drop()
    db.t.insert_many([{"_id": i, "refilled": True} for i in range(9)])
    mine = db.command("collStats", "t")
    assert mine["ns"] == f"{db_name}.t" and mine["count"] == 9
    assert "__mb_" not in repr(mine)
    db.t.drop()
    # What the upstream answers for a collection that does not exist (mongod: zeros
    # since 5.0, SecantusDB: NamespaceNotFound), under the user's name.
    try:
        expected: Any = direct[db_name].command("collStats", "never_made")
    except OperationFailure as failure:
        expected = (failure.code, str(failure.details.get("errmsg")))
    try:
        got: Any = db.command("collStats", "t")
    except OperationFailure as failure:
        got = (failure.code, str(failure.details.get("errmsg")))
    if isinstance(expected, tuple):
        assert got == (expected[0], expected[1].replace("never_made", "t"))
    else:
        assert _view(got, "t") == _view(expected, "t")


def test_stats_stages_report_the_branch_view(
        made: Branches, direct: MongoClient, db_name: str) -> None:
    _seed(direct, db_name)
    branch = made.client(made.create(unique("st")))
    db = branch[db_name]
    _write(db)
    db.t.create_index("s", name="by_s")
    db.t.drop_index("a_1")
    _copy_of(direct, branch, db_name, "t", "copy")
    stage = [{"$collStats": {"storageStats": {}, "count": {}}}, {"$project": {"localTime": 0}}]
    [mine] = list(db.t.aggregate(stage))
    [want] = list(direct[db_name].copy.aggregate(stage))
    assert mine["ns"] == f"{db_name}.t" and mine["count"] == want["count"] == 61
    assert _view(mine["storageStats"], "t") == _view(want["storageStats"], "t")
    assert "__mb_" not in repr(mine)
    # The client's own stages run over the report, on the server.
    [only] = list(db.t.aggregate([{"$collStats": {"count": {}}},
                                  {"$project": {"_id": 0, "n": "$count"}}]))
    assert only == {"n": 61}
    names = [ix["name"] for ix in db.t.aggregate([{"$indexStats": {}}])]
    assert sorted(names) == ["_id_", "by_s"]
    assert sorted(ix["name"] for ix in direct[db_name].t.aggregate([{"$indexStats": {}}])) == \
        ["_id_", "a_1"]


def _answer(db: Any, cmd: dict[str, Any]) -> Any:
    try:
        reply = db.command(cmd)
    except OperationFailure as failure:
        return failure.code, failure.details.get("codeName")
    return {k: v for k, v in reply.items() if k not in ("$clusterTime", "operationTime")}


@pytest.mark.secantus_gap(reason="SecantusDB implements none of compact, reIndex and "
                          "planCacheClear: the branch's answer is checked to be the "
                          "upstream's own (CommandNotFound there), not mongod's effect")
def test_storage_upkeep_answers_as_the_upstream(
        made: Branches, direct: MongoClient, db_name: str) -> None:
    _seed(direct, db_name)
    branch = made.client(made.create(unique("st")))
    _write(branch[db_name])
    for name in ("compact", "reIndex", "planCacheClear"):
        for coll in ("t", "missing"):
            upstream = _answer(direct[db_name], {name: coll})
            got = _answer(branch[db_name], {name: coll})
            if isinstance(upstream, tuple):  # an error: the upstream lacks the command
                assert got == upstream, (name, coll)
            else:
                assert isinstance(got, dict) and got["ok"] == 1.0, (name, coll, got)
    if isinstance(_answer(direct[db_name], {"reIndex": "t"}), dict):
        reply = branch[db_name].command("reIndex", "t")
        assert reply["nIndexes"] == 2
        assert [ix["name"] for ix in reply["indexes"]] == ["_id_", "a_1"]


@pytest.mark.parametrize(("cmd", "why"), [
    ({"planCacheSetFilter": "t", "query": {"a": 1}, "indexes": [{"a": 1}]}, "index filters"),
    ({"planCacheListFilters": "t"}, "index filters"),
    ({"createUser": "u", "pwd": "p", "roles": []}, "every branch share"),
    ({"setParameter": 1, "logLevel": 0}, "every branch share"),
    ({"createSearchIndexes": "t", "indexes": [{"definition": {"mappings": {}}}]},
     "Atlas Search"),
    ({"top": 1}, "reserved names"),
    ({"mapReduce": "t", "map": "function() {}", "reduce": "function() {}",
      "out": {"inline": 1}}, "deprecates"),
])
def test_commands_a_branch_refuses_say_why(made: Branches, direct: MongoClient,
                                           cmd: dict[str, Any], why: str) -> None:
    info = made.create(unique("st"))
    branch = made.client(info)
    with pytest.raises(OperationFailure) as failure:
        branch.admin.command(cmd) if "setParameter" in cmd or "top" in cmd \
            else branch.test.command(cmd)
    assert failure.value.code == 115
    message = str(failure.value.details.get("errmsg"))
    assert why in message and info["name"] in message and "yet" not in message


DB_FIGURES = ("collections", "views", "objects", "avgObjSize", "dataSize", "indexes")


def _db_figures(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats.get(k) for k in DB_FIGURES}


def test_db_stats_are_those_of_a_database_of_copies(
        proxy: ProxyProcess, made: Branches, direct: MongoClient, db_name: str) -> None:
    """On a branch port, the figures of a database holding what the branch shows; on the
    main port, main's own, the branches' overlays in the same database left out. Views
    are counted apart from collections, as mongod counts them (SecantusDB counts them
    among the collections and reports no `views`)."""
    _seed(direct, db_name)
    direct[db_name].other.insert_many([{"_id": i} for i in range(5)])
    direct[db_name].dropped.insert_one({"_id": 1})
    branch = made.client(made.create(unique("st")))
    db = branch[db_name]
    _write(db)
    db.t.create_index("s")
    db.dropped.drop()
    db.fresh.insert_many([{"_id": i, "f": "y" * i} for i in range(12)])
    db.command("create", "v", viewOn="t", pipeline=[])
    mine = db.command("dbStats")
    assert mine["db"] == db_name and mine["objects"] == 61 + 5 + 12
    shown = {coll: (list(db[coll].find().sort("_id", 1)),
                    [ix for ix in db[coll].list_indexes() if ix["name"] != "_id_"])
             for coll in ("t", "other", "fresh")}
    with MongoClient(proxy.uri) as main:
        on_main = main[db_name].command("dbStats")
    made.cleanup()  # the branch's overlays go with it: main's database as the upstream has it
    assert _db_figures(on_main) == _db_figures(direct[db_name].command("dbStats"))
    copies = unique("copies").replace("-", "_")
    try:
        for coll, (docs, indexes) in shown.items():
            direct[copies][coll].insert_many(docs)
            for ix in indexes:
                direct[copies][coll].create_index(list(ix["key"].items()), name=ix["name"])
        if "views" in on_main:
            direct[copies].command("create", "v", viewOn="t", pipeline=[])
        want = direct[copies].command("dbStats")
        assert _db_figures(mine) == _db_figures(want)
        assert list(mine) == list(want)  # the upstream's own shape
    finally:
        direct.drop_database(copies)
