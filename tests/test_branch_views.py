"""Views and collMod on a branch port, with real pymongo: compared with the same operations
on a plain copy on the upstream, and with main, which must not change."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import DeleteOne, InsertOne, MongoClient
from pymongo.errors import ClientBulkWriteException, OperationFailure

from tests.branchutil import Branches
from tests.servers import ProxyProcess

VIEW = [{"$match": {"k": {"$gt": 0}}},
        {"$project": {"k": 1, "tags": 1, "n": {"$multiply": ["$_id", 10]}}}]
ON_VIEW = [{"$match": {"n": {"$gte": 20}}}]


def seed(db: Any) -> None:
    db.src.insert_many([{"_id": i, "k": i % 3, "tags": [f"t{i % 4}", "all"]}
                        for i in range(12)])
    db.create_collection("v", viewOn="src", pipeline=VIEW)
    db.create_collection("vv", viewOn="v", pipeline=ON_VIEW)


def change(db: Any) -> None:
    """Writes to the source collection: the branch's own, and the copy's."""
    db.src.insert_many([{"_id": 100, "k": 1, "tags": ["new"]}, {"_id": 101, "k": 0}])
    db.src.update_many({"_id": {"$in": [1, 4]}}, {"$set": {"k": 0}})
    db.src.update_one({"_id": 3}, {"$set": {"k": 2, "tags": ["moved"]}})
    db.src.delete_one({"_id": 5})


def reads(db: Any, name: str) -> dict[str, Any]:
    coll = db[name]
    return {
        "find": list(coll.find({}, sort=[("_id", 1)])),
        "filtered": list(coll.find({"k": 2}, {"tags": 0}, sort=[("_id", -1)], skip=1, limit=3)),
        "aggregate": list(coll.aggregate([{"$group": {"_id": "$k", "c": {"$sum": 1}}},
                                          {"$sort": {"_id": 1}}])),
        "count": coll.count_documents({"k": {"$gte": 1}}),
        "small-batches": [d["_id"] for d in coll.find({}, sort=[("_id", 1)], batch_size=2)],
    }


def evaluated(db: Any, name: str, key: str) -> list[Any]:
    """A key's distinct values in a view, evaluated by the upstream from the view's
    definition: SecantusDB answers distinct on a view with no values (mongod answers
    them), so the copy side takes this form."""
    info = db.command("listCollections", filter={"name": name})["cursor"]["firstBatch"][0]
    pipeline = info["options"]["pipeline"]
    source = info["options"]["viewOn"]
    if source == "v":
        pipeline = VIEW + pipeline
        source = "src"
    out = db[source].aggregate([*pipeline, {"$unwind": f"${key}"},
                                {"$group": {"_id": None, "d": {"$addToSet": f"${key}"}}}])
    return sorted(next(out, {"d": []})["d"])


@pytest.fixture()
def trio(proxy: ProxyProcess, direct: MongoClient, made: Branches, db_name: str
         ) -> Iterator[tuple[Any, Any, Any, MongoClient]]:
    """(branch db, plain copy db, main db through the proxy, branch client)."""
    seed(direct[db_name])
    copy_name = f"{db_name}_copy"
    seed(direct[copy_name])
    branch = made.create()
    client = made.client(branch)
    main = MongoClient(proxy.uri)
    yield client[db_name], direct[copy_name], main[db_name], client
    client.close()
    main.close()
    direct.drop_database(copy_name)


@pytest.mark.secantus_gap(reason=(
    "SecantusDB answers distinct on a view with no values and count on a "
    "view of a view with 0; the copy side takes the values from the view's "
    "definition and its find"))
def test_view_of_main_reads_the_branch_data(trio: tuple[Any, Any, Any, MongoClient]) -> None:
    branch, copy, main, _ = trio
    before = {name: reads(main, name) for name in ("v", "vv")}
    change(branch)
    change(copy)
    for name in ("v", "vv"):
        assert reads(branch, name) == reads(copy, name), name
        # The count command on a view (SecantusDB answers 0 on a view of a view; mongod
        # counts what the view shows).
        assert branch[name].estimated_document_count() == len(list(copy[name].find()))
        assert sorted(branch[name].distinct("tags")) == evaluated(copy, name, "tags")
        assert sorted(branch[name].distinct("k", {"k": {"$lt": 2}})) == [1]
        # Main still shows the views over its own, unchanged, data.
        assert reads(main, name) == before[name]
    # A pipeline of the user's after the view's, reading another collection's branch view.
    pipeline = [{"$lookup": {"from": "src", "localField": "_id", "foreignField": "_id",
                             "as": "me"}}, {"$sort": {"_id": 1}}]
    assert list(branch.v.aggregate(pipeline)) == list(copy.v.aggregate(pipeline))


def test_view_defined_on_a_branch_is_the_branch_s(
        trio: tuple[Any, Any, Any, MongoClient], made: Branches) -> None:
    branch, copy, main, _ = trio
    sibling = made.client(made.create())
    try:
        for db in (branch, copy):
            change(db)
            db.create_collection("mine", viewOn="vv", pipeline=[{"$sort": {"k": -1, "_id": 1}}])
        assert reads(branch, "mine") == reads(copy, "mine")
        for db in (branch, copy):  # a definition that reads another collection
            db.create_collection("both", viewOn="src", pipeline=[
                {"$unionWith": {"coll": "src", "pipeline": [{"$set": {"again": True}}]}},
                {"$sort": {"_id": 1, "again": 1}}])
        assert list(branch.both.find()) == list(copy.both.find())
        assert len(list(branch.both.find())) == 2 * branch.src.count_documents({})
        info = branch.command("listCollections", filter={"name": "mine"})["cursor"]["firstBatch"]
        assert info == [{"name": "mine", "type": "view",
                         "options": {"viewOn": "vv", "pipeline": [{"$sort": {"k": -1, "_id": 1}}]},
                         "info": {"readOnly": True}}]
        shown = {i["name"]: i["type"] for i in branch.list_collections()}
        assert shown == {"src": "collection", "v": "view", "vv": "view", "mine": "view",
                         "both": "view"}
        assert "mine" not in main.list_collection_names()
        assert "mine" not in sibling[branch.name].list_collection_names()
        # The same create again is accepted; another definition under the name is not.
        branch.command("create", "mine", viewOn="vv", pipeline=[{"$sort": {"k": -1, "_id": 1}}])
        with pytest.raises(OperationFailure) as exc:
            branch.command("create", "mine", viewOn="src", pipeline=[])
        assert exc.value.code == 48
        # Dropping views on the branch: its own and one of main's.
        branch.drop_collection("mine")
        branch.drop_collection("both")
        branch.drop_collection("vv")
        assert sorted(branch.list_collection_names()) == ["src", "v"]
        assert list(branch.vv.find()) == []
        assert sorted(main.list_collection_names()) == ["src", "v", "vv"]
        assert sorted(sibling[branch.name].list_collection_names()) == ["src", "v", "vv"]
        assert reads(sibling[branch.name], "vv") == reads(main, "vv")
    finally:
        sibling.close()


@pytest.mark.secantus_gap(reason=(
    "SecantusDB writes into views and defines views whose pipeline it "
    "cannot parse; the branch is held to mongod's refusals"))
def test_a_view_refuses_what_mongod_refuses(trio: tuple[Any, Any, Any, MongoClient]) -> None:
    branch, _, main, _ = trio
    branch.create_collection("own", viewOn="src", pipeline=[])
    for name in ("v", "own"):
        for op in (lambda c: c.insert_one({"_id": 1000}),
                   lambda c: c.update_one({"_id": 1}, {"$set": {"x": 1}}),
                   lambda c: c.delete_many({}),
                   lambda c: c.find_one_and_delete({"_id": 1}),
                   lambda c: c.create_index("k"),
                   lambda c: c.database.validate_collection(c.name),
                   lambda c: list(c.list_indexes())):
            with pytest.raises(OperationFailure) as exc:
                op(branch[name])
            assert exc.value.code == 166, (name, exc.value.details)
            assert exc.value.details["codeName"] == "CommandNotSupportedOnView"
    # The client-level bulkWrite: each op naming a view fails alone, in mongod's shape.
    ops = [InsertOne(namespace=f"{branch.name}.src", document={"_id": 500}),
           InsertOne(namespace=f"{branch.name}.v", document={"_id": 501}),
           DeleteOne(namespace=f"{branch.name}.own", filter={})]
    with pytest.raises(ClientBulkWriteException) as bulk:
        branch.client.bulk_write(ops, ordered=False)
    assert [(e["idx"], e["code"]) for e in bulk.value.write_errors] == [(1, 166), (2, 166)]
    branch.src.delete_one({"_id": 500})
    with pytest.raises(OperationFailure) as exc:
        branch.v.watch()
    assert exc.value.code == 166
    assert branch.src.count_documents({}) == 12  # nothing reached the source
    bad = [([{"$bogus": 1}], 40324),
           ([{"$out": "elsewhere"}], 157),
           ({"not": "a list"}, 14)]
    for pipeline, code in bad:
        with pytest.raises(OperationFailure) as exc:
            branch.command("create", "broken", viewOn="src", pipeline=pipeline)
        assert exc.value.code == code, exc.value.details
    assert "broken" not in branch.list_collection_names()
    assert "elsewhere" not in branch.list_collection_names()
    # A view on itself, through another: mongod's cycle check.
    branch.create_collection("own2", viewOn="own", pipeline=[])
    with pytest.raises(OperationFailure) as exc:
        branch.command("collMod", "own", viewOn="own2", pipeline=[])
    assert exc.value.code == 167
    with pytest.raises(OperationFailure) as exc:
        branch.command("collMod", "v", viewOn="vv", pipeline=[])  # main's views
    assert exc.value.code == 167
    assert list(branch.own2.find({"_id": 1})) == [branch.src.find_one({"_id": 1})]
    assert sorted(main.list_collection_names()) == ["src", "v", "vv"]


@pytest.mark.secantus_gap(reason=(
    "SecantusDB acknowledges collMod on a view and changes nothing; main "
    "redefines it by a drop and a create"))
@pytest.mark.parametrize("written", [False, True], ids=["untouched", "written"])
def test_main_s_view_changes_after_the_fork_do_not_reach_the_branch(
        trio: tuple[Any, Any, Any, MongoClient], made: Branches, written: bool) -> None:
    branch, _, main, _ = trio
    if written:  # the branch's reads of the database then resolve views themselves
        branch.src.update_one({"_id": 1}, {"$set": {"k": 2}})
        branch.other.insert_one({"_id": 1})
    at_fork = {name: reads(branch, name) for name in ("v", "vv")}
    assert list(branch.later.find()) == []
    main.create_collection("later", viewOn="src", pipeline=[])
    # A new definition of main's view (SecantusDB acknowledges collMod on a view and
    # changes nothing: a drop and a create stand for it on the upstream).
    main.drop_collection("v")
    main.create_collection("v", viewOn="src", pipeline=[{"$match": {"k": 0}}])
    main.drop_collection("vv")
    assert sorted(set(branch.list_collection_names()) - {"other"}) == ["src", "v", "vv"]
    assert {name: reads(branch, name) for name in ("v", "vv")} == at_fork
    assert list(branch.later.find()) == []
    info = {i["name"]: i["options"] for i in branch.list_collections()}
    assert info["v"] == {"viewOn": "src", "pipeline": VIEW}
    assert [d["k"] for d in main.v.find()] == [0, 0, 0, 0]
    # A branch forked now shows main's views as they are now.
    with made.client(made.create()) as c:
        now = c[branch.name]
        if written:
            now.other.insert_one({"_id": 1})
        assert reads(now, "later") == reads(main, "later")
        assert reads(now, "v") == reads(main, "v")
        assert "vv" not in now.list_collection_names()


def test_coll_mod_validator_is_the_branch_s(trio: tuple[Any, Any, Any, MongoClient],
                                            made: Branches) -> None:
    branch, copy, main, _ = trio
    validator = {"k": {"$gte": 1}}  # refuses the parent's documents with k 0
    for db in (branch, copy):
        db.command("collMod", "src", validator=validator, validationLevel="strict",
                   changeStreamPreAndPostImages={"enabled": True})
    for db in (branch, copy):
        with pytest.raises(OperationFailure) as exc:
            db.src.insert_one({"_id": 60, "k": "not an int"})
        assert exc.value.code == 121
        # A document of the parent that the validator refuses can still be fixed.
        assert db.src.update_one({"_id": 3}, {"$set": {"k": 7}}).modified_count == 1
        with pytest.raises(OperationFailure) as exc:
            db.src.update_one({"_id": 2}, {"$set": {"k": "no"}})
        assert exc.value.code == 121
        db.src.insert_one({"_id": 61, "k": 1}, bypass_document_validation=True)
        db.src.insert_one({"_id": 62, "k": "bypassed"}, bypass_document_validation=True)

    def options(db: Any) -> dict[str, Any]:
        return dict(db.command("listCollections", filter={"name": "src"})
                    ["cursor"]["firstBatch"][0]["options"])

    assert options(branch) == options(copy) == {
        "validator": validator, "validationLevel": "strict",
        "changeStreamPreAndPostImages": {"enabled": True}}
    assert sorted(branch.src.find(), key=lambda d: d["_id"]) == \
        sorted(copy.src.find(), key=lambda d: d["_id"])
    # Main and a sibling: no validator.
    main.src.insert_one({"_id": 60, "k": "not an int"})
    assert "validator" not in options(main)
    # A child of the branch writes under the validator too.
    child = made.create(**{"from": made.created[0]})
    with made.client(child) as c:
        with pytest.raises(OperationFailure) as exc:
            c[branch.name].src.insert_one({"_id": 70, "k": "no"})
        assert exc.value.code == 121
        c[branch.name].src.insert_one({"_id": 70, "k": 70})
        assert options(c[branch.name]) == options(branch)


@pytest.mark.secantus_gap(reason=(
    "SecantusDB leaves `hidden` out of listIndexes and ignores collMod on a "
    "view; the branch is held to mongod's listing and definition"))
def test_coll_mod_index_options_and_views(trio: tuple[Any, Any, Any, MongoClient]) -> None:
    branch, copy, main, _ = trio
    for db in (branch, copy, main):
        db.src.create_index("k", expireAfterSeconds=3600)
    for db in (branch, copy):
        reply = db.command("collMod", "src", index={"keyPattern": {"k": 1},
                                                    "expireAfterSeconds": 7200})
        assert (reply["expireAfterSeconds_old"], reply["expireAfterSeconds_new"]) == (3600, 7200)
    ttl = {ix["name"]: ix.get("expireAfterSeconds") for ix in branch.src.list_indexes()}
    assert ttl == {ix["name"]: ix.get("expireAfterSeconds") for ix in copy.src.list_indexes()}
    assert ttl["k_1"] == 7200
    assert {ix["name"]: ix.get("expireAfterSeconds")
            for ix in main.src.list_indexes()}["k_1"] == 3600
    branch.command("collMod", "src", index={"name": "k_1", "hidden": True})
    hidden = {ix["name"]: ix.get("hidden") for ix in branch.src.list_indexes()}
    assert hidden["k_1"] is True  # mongod lists it hidden (SecantusDB leaves the field out)
    assert not {ix["name"]: ix.get("hidden") for ix in main.src.list_indexes()}["k_1"]
    with pytest.raises(OperationFailure) as exc:  # a hidden index cannot be hinted
        list(branch.src.find({"k": 1}, hint="k_1"))
    assert exc.value.code == 2
    assert len(list(main.src.find({"k": 1}, hint="k_1"))) == 4
    with pytest.raises(OperationFailure) as exc:
        branch.command("collMod", "src", index={"name": "nope", "hidden": True})
    assert exc.value.code == 27
    # A view's definition, changed on the branch only.
    change(branch)
    change(copy)
    branch.command("collMod", "v", viewOn="src", pipeline=[{"$match": {"k": 2}}])
    # SecantusDB acknowledges collMod on a view and changes nothing (mongod redefines
    # it): the copy gets the new definition by a drop and a create.
    copy.drop_collection("v")
    copy.create_collection("v", viewOn="src", pipeline=[{"$match": {"k": 2}}])
    assert reads(branch, "v") == reads(copy, "v")
    assert reads(branch, "vv") == reads(copy, "vv")
    assert {i["name"]: i["options"] for i in branch.list_collections()}["v"] == \
        {"viewOn": "src", "pipeline": [{"$match": {"k": 2}}]}
    assert {i["name"]: i["options"] for i in main.list_collections()}["v"]["pipeline"] == VIEW
    with pytest.raises(OperationFailure) as exc:
        branch.command("collMod", "v", validator={"k": 1})
    assert exc.value.code == 72


def test_coll_mod_bad_input(trio: tuple[Any, Any, Any, MongoClient]) -> None:
    branch, copy, _, _ = trio
    for db in (branch, copy):
        with pytest.raises(OperationFailure) as exc:
            db.command("collMod", "missing", validator={"k": 1})
        assert exc.value.code == 26
        assert exc.value.details["codeName"] == "NamespaceNotFound"
        with pytest.raises(OperationFailure) as exc:
            db.command("collMod", "src", bogus=1)
        assert exc.value.code == 40415
    assert "missing" not in branch.list_collection_names()
    assert branch.src.count_documents({}) == 12


def test_a_merge_defines_the_branch_s_views_in_main(
        proxy: ProxyProcess, trio: tuple[Any, Any, Any, MongoClient], made: Branches) -> None:
    branch, _, main, _ = trio
    branch.create_collection("mine", viewOn="src", pipeline=[{"$match": {"k": 1}}])
    branch.command("collMod", "v", viewOn="src", pipeline=[{"$match": {"k": 2}}])
    status, body = proxy.api("POST", f"/branches/{made.created[0]}/merge",
                             {"strategy": "theirs", "force": True})
    assert status == 200, body
    # The capture turns on pre-images for the collections main creates (SecantusDB
    # takes it for a view too): only the definitions are compared.
    info = {i["name"]: (i["type"], i["options"]["viewOn"], i["options"]["pipeline"])
            for i in main.list_collections() if i["type"] == "view"}
    assert info["mine"] == ("view", "src", [{"$match": {"k": 1}}])
    assert info["v"] == ("view", "src", [{"$match": {"k": 2}}])
    assert list(main.mine.find()) == list(branch.mine.find())


@pytest.mark.secantus_gap(reason=(
    "SecantusDB reads nothing through a view named by $unionWith, $lookup "
    "or $graphLookup; the expected answer is built from finds on the copy's "
    "views, and from a collection holding a view's documents"))
def test_stages_reading_a_view_read_the_branch_data(
        trio: tuple[Any, Any, Any, MongoClient]) -> None:
    branch, copy, main, _ = trio
    before = list(main.src.aggregate([{"$unionWith": "vv"}]))
    for db in (branch, copy):
        change(db)
        db.create_collection("mine", viewOn="vv", pipeline=[{"$match": {"k": 1}}])
    # SecantusDB reads nothing through a view named by $unionWith or $lookup (mongod
    # reads the view): what mongod answers is built from finds on the copy's views.
    def by_id(docs: Any) -> list[Any]:
        return sorted(docs, key=lambda d: d["_id"])

    got = branch.src.aggregate([{"$match": {"_id": {"$lt": 0}}}, {"$unionWith": "vv"}])
    assert by_id(got) == by_id(copy.vv.find())
    got = branch.src.aggregate([{"$match": {"_id": {"$lt": 0}}}, {"$unionWith": {
        "coll": "mine", "pipeline": [{"$sort": {"_id": -1}}]}}])
    assert list(got) == list(copy.mine.find(sort=[("_id", -1)]))
    got = branch.src.aggregate([
        {"$sort": {"_id": 1}}, {"$limit": 4},
        {"$lookup": {"from": "v", "pipeline": [{"$match": {"k": 2}}, {"$sort": {"_id": 1}}],
                     "as": "twos"}}])
    twos = list(copy.v.find({"k": 2}, sort=[("_id", 1)]))
    assert list(got) == [{**d, "twos": twos} for d in copy.src.find(sort=[("_id", 1)], limit=4)]
    got = branch.src.aggregate([{"$facet": {"views": [{"$match": {"_id": 0}},
                                                      {"$unionWith": "mine"}],
                                            "n": [{"$count": "n"}]}}])
    assert list(got) == [{"views": [copy.src.find_one({"_id": 0}), *copy.mine.find()],
                          "n": [{"n": copy.src.count_documents({})}]}]
    assert twos and list(copy.mine.find())  # the comparisons are not of empty sets
    assert list(main.src.aggregate([{"$unionWith": "vv"}])) == before
    # $out into a view: mongod's refusal; nothing changed.
    with pytest.raises(OperationFailure) as exc:
        branch.src.aggregate([{"$out": "v"}])
    assert exc.value.code == 166
    with pytest.raises(OperationFailure) as exc:
        branch.src.aggregate([{"$merge": {"into": "mine"}}])
    assert exc.value.code == 166
    assert reads(branch, "v") == reads(copy, "v")
    # $graphLookup has no pipeline for the view's stages: it walks a scratch copy of
    # what the view shows on each (scratchfrom.py), over the branch's data.
    graph = [{"$graphLookup": {"from": "v", "startWith": "$k", "connectFromField": "k",
                               "connectToField": "_id", "as": "g", "depthField": "d"}},
             {"$project": {"g": {"$sortArray": {"input": "$g", "sortBy": {"_id": 1}}}}},
             {"$sort": {"_id": 1}}]
    walked = list(branch.src.aggregate(graph))
    copy.v.aggregate([{"$out": "v_docs"}])  # SecantusDB walks no view: its documents
    graph[0]["$graphLookup"]["from"] = "v_docs"
    assert walked == list(copy.src.aggregate(graph))
    # Only 2 is left in the view with k 1 or 2: main's 1 has k 0 on the branch.
    assert {g["_id"] for d in walked for g in d["g"]} == {2}
    # A read may not override a view's collation (mongod's OptionNotSupportedOnView).
    with pytest.raises(OperationFailure) as exc:
        list(branch.v.find({}, collation={"locale": "fr"}))
    assert exc.value.code == 157
    simple = list(branch.v.find({}, collation={"locale": "simple"}, sort=[("_id", 1)]))
    assert simple == reads(copy, "v")["find"]
    # explain of a read of a view explains the aggregation it runs as.
    plan = branch.command("explain", {"find": "vv", "filter": {"k": 2}})
    assert plan["mongobranch"]["view"] == f"{branch.name}.vv"
    assert plan["mongobranch"]["plan"] == "union"


def test_a_copy_branch_shows_the_views_its_parent_shows(
        trio: tuple[Any, Any, Any, MongoClient], made: Branches) -> None:
    branch, _, main, _ = trio
    change(branch)
    branch.create_collection("mine", viewOn="v", pipeline=[{"$match": {"k": 1}}])
    branch.drop_collection("vv")
    copy = made.create(**{"from": made.created[0], "mode": "copy"})
    of_main = made.create(mode="copy")
    with made.client(copy) as c, made.client(of_main) as m:
        copied, main_copy = c[branch.name], m[branch.name]
        assert sorted(copied.list_collection_names()) == ["mine", "src", "v"]
        for name in ("v", "mine"):
            assert reads(copied, name) == reads(branch, name), name
        # Main redefines and drops its views after the copies were made.
        main.drop_collection("v")
        main.create_collection("v", viewOn="src", pipeline=[{"$match": {"k": 0}}])
        main.drop_collection("vv")
        assert reads(copied, "v") == reads(branch, "v")
        assert sorted(main_copy.list_collection_names()) == ["src", "v", "vv"]
        assert {i["name"]: i["options"] for i in main_copy.list_collections()}["v"] == \
            {"viewOn": "src", "pipeline": VIEW}
        assert list(main_copy.vv.find())


def test_a_merge_carries_coll_mod_to_the_parent(
        proxy: ProxyProcess, trio: tuple[Any, Any, Any, MongoClient], made: Branches) -> None:
    _, _, main, _ = trio
    main.src.create_index("k", expireAfterSeconds=3600)
    main.command("collMod", "src", validator={"k": {"$gte": -100}})
    forked = made.create()  # after the index and the validator: it shows them
    name = forked["name"]
    child = made.create(**{"from": name})
    with made.client(forked) as c:
        branch = c[main.name]
        branch.command("collMod", "src", validator={"k": {"$gte": 0}},
                       validationAction="error")
        branch.command("collMod", "src", index={"keyPattern": {"k": 1},
                                                "expireAfterSeconds": 60})
        status, diff = proxy.api("GET", f"/branches/{name}/diff")
        assert status == 200, diff
        status, body = proxy.api("POST", f"/branches/{name}/merge",
                                 {"strategy": "theirs", "force": True})
        assert status == 200, body
    options = main.command("listCollections", filter={"name": "src"})["cursor"]["firstBatch"]
    assert options[0]["options"]["validator"] == {"k": {"$gte": 0}}
    assert options[0]["options"]["validationAction"] == "error"
    ttl = {ix["name"]: ix.get("expireAfterSeconds") for ix in main.src.list_indexes()}
    assert ttl["k_1"] == 60
    with pytest.raises(OperationFailure) as exc:
        main.src.insert_one({"_id": 900, "k": -1})
    assert exc.value.code == 121
    # The merged branch's own child still shows what it showed at its fork.
    with made.client(child) as c:
        shown = c[main.name].command("listCollections", filter={"name": "src"})
        assert shown["cursor"]["firstBatch"][0]["options"]["validator"] == \
            {"k": {"$gte": -100}}
        c[main.name].src.insert_one({"_id": 900, "k": -1})
        c[main.name].src.delete_one({"_id": 900})
        c[main.name].src.insert_one({"_id": 901, "k": 5})
    # Merged into the branch, the child carries its document, not the options it kept.
    status, body = proxy.api("POST", f"/branches/{child['name']}/merge",
                             {"strategy": "theirs", "force": True})
    assert status == 200, body
    assert not [c for c in body["collections"] if c.get("collection") == "modified"], body
    with made.client(forked) as c:
        shown = c[main.name].command("listCollections", filter={"name": "src"})
        assert shown["cursor"]["firstBatch"][0]["options"]["validator"] == {"k": {"$gte": 0}}
        assert c[main.name].src.find_one({"_id": 901}) == {"_id": 901, "k": 5}


def test_the_base_collection_s_validator_checks_branch_writes(
        direct: MongoClient, made: Branches, db_name: str) -> None:
    copy_name = f"{db_name}_copy"
    for name in (db_name, copy_name):
        direct[name].create_collection("checked", validator={"n": {"$type": "int"}})
        direct[name].checked.insert_many([{"_id": 1, "n": 1}, {"_id": 2, "n": 2}])
        direct[name].checked.insert_one({"_id": 3, "n": "old"}, bypass_document_validation=True)
    with made.client(made.create()) as c:
        for db in (c[db_name], direct[copy_name]):
            with pytest.raises(OperationFailure) as exc:
                db.checked.insert_one({"_id": 4, "n": "text"})
            assert exc.value.code == 121
            with pytest.raises(OperationFailure) as exc:
                db.checked.update_one({"_id": 1}, {"$set": {"n": "text"}})
            assert exc.value.code == 121
            db.checked.update_one({"_id": 3}, {"$set": {"n": 3}})  # made valid
            db.checked.insert_one({"_id": 5, "n": "ok"}, bypass_document_validation=True)
        assert list(c[db_name].checked.find(sort=[("_id", 1)])) == \
            list(direct[copy_name].checked.find(sort=[("_id", 1)]))
        assert c[db_name].checked.options() == direct[copy_name].checked.options()
        # A child of the branch is held to it too.
        with made.client(made.create(**{"from": made.created[-1]})) as child:
            with pytest.raises(OperationFailure) as exc:
                child[db_name].checked.insert_one({"_id": 6, "n": "text"})
            assert exc.value.code == 121
    direct.drop_database(copy_name)
