"""DDL on a branch, compared step by step with the same DDL on a plain copy."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from tests.servers import ProxyProcess

_names = itertools.count()


def seed(db: Any) -> None:
    db.a.insert_many([{"_id": i, "k": i % 4, "s": f"v{i}"} for i in range(20)])
    db.b.insert_many([{"_id": i, "k": i} for i in range(4)])
    db.a.create_index("k")
    db.c.insert_one({"_id": 1})


@pytest.fixture()
def pair(proxy: ProxyProcess, direct: MongoClient) -> Iterator[tuple[Any, Any, Any]]:
    n = next(_names)
    base_name, copy_name = f"ddl_base_{n}", f"ddl_copy_{n}"
    seed(direct[base_name])
    seed(direct[copy_name])
    status, body = proxy.api("POST", "/branches", {"name": f"ddl-{n}"})
    assert status == 201, body
    client: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    yield client[base_name], direct[copy_name], direct[base_name]
    client.close()
    proxy.api("DELETE", f"/branches/ddl-{n}")
    direct.drop_database(base_name)
    direct.drop_database(copy_name)


def snapshot(db: Any) -> Any:
    """Collections, documents and indexes; overlays (which share the base database) aside."""
    names = sorted(n for n in db.list_collection_names() if not n.startswith("__mb_"))
    return {
        "names": names,
        "docs": {n: list(db[n].find().sort("_id", 1)) for n in names},
        "indexes": {n: sorted((ix["name"], tuple(ix["key"].items()), bool(ix.get("unique")))
                              for ix in db[n].list_indexes()) for n in names},
    }


def both(pair: tuple[Any, Any, Any], fn: Any) -> Any:
    branch, copy, _ = pair
    out = []
    for db in (branch, copy):
        try:
            out.append(("ok", fn(db)))
        except OperationFailure as exc:
            out.append(("error", exc.code))
    assert out[0] == out[1], f"branch {out[0]} != copy {out[1]}"
    assert snapshot(branch) == snapshot(copy)
    return out[0]


def test_ddl_sequence_matches_a_copy(pair: tuple[Any, Any, Any]) -> None:
    base_before = snapshot(pair[2])
    both(pair, lambda db: db.create_collection("fresh").name)
    both(pair, lambda db: db.fresh.insert_one({"_id": 1, "x": 1}).inserted_id)
    both(pair, lambda db: db.command("create", "a")["ok"])  # exists, same options: ok
    both(pair, lambda db: db.a.create_index([("s", 1)], unique=True))
    both(pair, lambda db: db.a.create_index([("k", -1), ("s", 1)], name="ks"))
    both(pair, lambda db: db.a.drop_index("k_1"))
    both(pair, lambda db: db.a.drop_index("nope"))
    both(pair, lambda db: db.a.update_many({"k": 1}, {"$set": {"moved": True}}).modified_count)
    both(pair, lambda db: db.b.drop())
    both(pair, lambda db: db.b.find_one())
    both(pair, lambda db: db.b.insert_one({"_id": 9, "again": True}).inserted_id)
    both(pair, lambda db: db.client.admin.command(
        "renameCollection", f"{db.name}.a", to=f"{db.name}.renamed")["ok"])
    both(pair, lambda db: db.renamed.count_documents({"moved": True}))
    both(pair, lambda db: db.client.admin.command(
        "renameCollection", f"{db.name}.c", to=f"{db.name}.renamed")["ok"])  # target exists
    both(pair, lambda db: db.client.admin.command(
        "renameCollection", f"{db.name}.c", to=f"{db.name}.b", dropTarget=True)["ok"])
    both(pair, lambda db: db.client.admin.command(
        "renameCollection", f"{db.name}.missing", to=f"{db.name}.x")["ok"])
    both(pair, lambda db: list(db.renamed.aggregate([
        {"$match": {"k": {"$lt": 2}}},
        {"$lookup": {"from": "b", "localField": "_id", "foreignField": "_id", "as": "j"}},
        {"$unionWith": {"coll": "fresh"}}, {"$sort": {"_id": 1, "k": 1}}])))
    both(pair, lambda db: list(db.renamed.aggregate([
        {"$match": {"k": 3}}, {"$project": {"s": 1}}, {"$out": "outcoll"}])))
    both(pair, lambda db: db.outcoll.count_documents({}))
    both(pair, lambda db: list(db.renamed.aggregate([
        {"$match": {"k": {"$in": [0, 1]}}}, {"$project": {"k": 1, "tag": "merged"}},
        {"$merge": {"into": "b", "whenMatched": "merge", "whenNotMatched": "insert"}}])))
    both(pair, lambda db: list(db.renamed.aggregate([
        {"$match": {"k": 2}}, {"$project": {"k": 1}},
        {"$merge": {"into": "b", "whenMatched": "fail", "whenNotMatched": "discard"}}])))
    both(pair, lambda db: list(db.renamed.aggregate([
        {"$match": {"k": 0}}, {"$set": {"k": 100}},
        {"$merge": {"into": "renamed", "whenMatched": "replace"}}])))
    both(pair, lambda db: sorted(db.list_collection_names(filter={"name": {"$regex": "^r"}})))
    both(pair, lambda db: db.client.drop_database(db.name))
    both(pair, lambda db: db.list_collection_names())
    both(pair, lambda db: db.again.insert_one({"_id": 1}).inserted_id)
    # none of it reached the base
    assert snapshot(pair[2]) == base_before


def test_a_unique_index_over_duplicates_is_refused_as_on_a_copy(
        pair: tuple[Any, Any, Any]) -> None:
    """mongod builds a unique index over the documents already there: a duplicate in the
    base, or between the base and the branch's writes, refuses it (11000) on the branch
    as on the copy, in the collection's own name, and leaves no index and no scratch
    copy behind; without duplicates it is built and holds from then on."""
    branch, _, base = pair
    both(pair, lambda db: db.a.create_index("k", unique=True, name="k_u"))
    both(pair, lambda db: db.a.create_index("s", unique=True, name="s_u"))
    both(pair, lambda db: db.b.insert_one({"_id": 10, "k": 1}).inserted_id)
    both(pair, lambda db: db.b.create_index("k", unique=True))
    with pytest.raises(OperationFailure) as refused:
        branch.b.create_index("k", unique=True)
    assert "__mb_" not in str(refused.value) and f"{branch.name}.b" in str(refused.value)
    both(pair, lambda db: db.b.delete_one({"_id": 1}).deleted_count)
    both(pair, lambda db: db.b.create_index("k", unique=True))
    both(pair, lambda db: db.b.insert_one({"_id": 11, "k": 2}).inserted_id)
    assert not [n for n in base.list_collection_names() if "_g_" in n]


def test_overlay_collections_are_never_listed(pair: tuple[Any, Any, Any],
                                              proxy: ProxyProcess) -> None:
    branch, _, base = pair
    branch.a.update_one({"_id": 1}, {"$set": {"x": 1}})
    assert any(n.startswith("__mb_") for n in base.list_collection_names())  # on the upstream
    assert not any(n.startswith("__mb_") for n in branch.list_collection_names())
    main: MongoClient = MongoClient(proxy.uri)
    try:
        assert not any(n.startswith("__mb_") for n in main[base.name].list_collection_names())
    finally:
        main.close()


def test_list_collections_by_one_name_is_the_full_listing_of_that_name(
        pair: tuple[Any, Any, Any], proxy: ProxyProcess) -> None:
    """A listCollections filtered by one name (drivers' existence check before a create)
    answers, on the branch and on the main port, what the full listing holds of that
    name: a base collection, one the branch made or dropped, a view, an absent one."""
    branch, copy, base = pair
    for db in (branch, copy):
        db.create_collection("made", validator={"k": {"$type": "int"}})
        db.drop_collection("b")
        db.create_collection("seen", viewOn="a", pipeline=[{"$match": {"k": 1}}])
        db.a.insert_one({"_id": 100, "k": 1})
    with MongoClient(proxy.uri) as main:
        on_main = main[base.name]
        for db in (branch, copy, on_main):
            # The copy's own database holds the overlays of the branch's copy-ups of
            # what main changed there (snapshot semantics): the upstream lists them.
            everything = {info["name"]: info for info in db.list_collections()}
            for name in ("a", "b", "c", "made", "seen", "absent"):
                one = list(db.list_collections(filter={"name": name}))
                assert one == ([everything[name]] if name in everything else []), (db, name)
                assert db.list_collection_names(filter={"name": name}) \
                    == [i["name"] for i in one]
    names = [sorted(n for n in db.list_collection_names() if not n.startswith("__mb_"))
             for db in (branch, copy)]
    assert names == [["a", "c", "made", "seen"]] * 2


def test_a_create_the_upstream_refuses_leaves_no_overlay(pair: tuple[Any, Any, Any]) -> None:
    """A new collection's overlay (its live and hidden collections) is made in one round
    trip: when the upstream refuses the client's options, the error is the copy's, and
    nothing of the overlay is left; the same name can then be made."""
    branch, _, base = pair
    refused = both(pair, lambda db: db.command({"create": "bad", "capped": True}))
    assert refused == ("error", 72), refused  # InvalidOptions: a capped one needs a size
    assert not [n for n in base.list_collection_names() if n.endswith("_bad")]
    both(pair, lambda db: db.command({"create": "bad", "capped": True, "size": 4096})["ok"])
    assert branch.bad.options() == {"capped": True, "size": 4096}


def test_writes_that_create_no_collection_leave_it_missing(
        pair: tuple[Any, Any, Any]) -> None:
    """A delete, or a findAndModify without upsert, on a collection that does not exist
    leaves it missing, as on mongod and the copy; an insert or an upsert creates it. An
    update without upsert creates none on mongod either (its documented rule: "insert or
    update with upsert: true"); SecantusDB creates one there, so the branch is checked
    against mongod's rule alone for it."""
    branch, copy, _ = pair
    both(pair, lambda db: db.gone1.delete_many({}).deleted_count)
    both(pair, lambda db: db.gone1.delete_one({"_id": 1}).deleted_count)
    both(pair, lambda db: db.gone2.find_one_and_update({"x": 1}, {"$set": {"y": 1}}))
    both(pair, lambda db: db.gone2.find_one_and_delete({"x": 1}))
    branch.c.drop()
    copy.c.drop()
    both(pair, lambda db: db.c.delete_one({"_id": 1}).deleted_count)
    both(pair, lambda db: db.made1.update_one({"_id": "u"}, {"$set": {"y": 1}},
                                              upsert=True).matched_count)
    both(pair, lambda db: db.made2.find_one_and_update({"_id": "u"}, {"$set": {"y": 1}},
                                                       upsert=True) is None)
    assert branch.gone3.update_many({"x": 1}, {"$set": {"y": 1}}).matched_count == 0
    branch.c.update_one({"_id": 1}, {"$set": {"y": 1}})
    assert "gone3" not in branch.list_collection_names()
    assert "c" not in branch.list_collection_names()
