"""`dbHash` and `dataSize` on a branch port (commands/dbhash.py).

SecantusDB, the suite's upstream, has neither command (CommandNotFound, 59): a branch
port answers dbHash itself for every database, and its dataSize of a changed collection
is checked against mongod's documented result computed here from the same documents.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from bson import Int64
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from tests.branchutil import RAW, Branches


def _seed(client: MongoClient, db: str) -> None:
    client[db].c.insert_many([{"_id": i, "n": i, "s": "x" * i} for i in range(10)])
    client[db].d.insert_many([{"_id": f"k{i}", "v": [i, {"w": i}]} for i in range(5)])
    client[db].c.create_index("n")


def _mongod_md5(client: MongoClient, db: str, names: list[str]) -> tuple[dict[str, str], str]:
    """mongod's dbhash algorithm over the raw BSON a plain find gives: each collection's
    documents in _id order, then the database digest over its collections' hex digests
    in name order."""
    hashes = {}
    for name in sorted(names):
        digest = hashlib.md5()
        for doc in client[db].get_collection(name, codec_options=RAW).find().sort("_id", 1):
            digest.update(doc.raw)
        hashes[name] = digest.hexdigest()
    total = hashlib.md5()
    for value in hashes.values():
        total.update(value.encode())
    return hashes, total.hexdigest()


def _port(made: Branches, **body: Any) -> MongoClient:
    return made.client(made.create(**body))


def test_dbhash_of_the_same_documents_written_differently_is_the_same(
        made: Branches, client: MongoClient, db_name: str) -> None:
    _seed(client, db_name)
    one, two = _port(made), _port(made)
    one[db_name].c.insert_many([{"_id": 20, "n": 20}, {"_id": 21, "n": 21}])
    one[db_name].c.update_one({"_id": 3}, {"$set": {"n": 300}})
    one[db_name].c.update_one({"_id": 3}, {"$set": {"n": 3}})  # back as it was
    two[db_name].c.insert_one({"_id": 21, "n": 21})
    two[db_name].c.insert_one({"_id": 20, "n": 20})
    first, second = one[db_name].command("dbHash"), two[db_name].command("dbHash")
    assert first["collections"] == second["collections"] and first["md5"] == second["md5"]
    assert set(first["collections"]) == {"c", "d"}

    two[db_name].c.update_one({"_id": 4}, {"$set": {"n": -4}})
    changed = two[db_name].command("dbHash")
    assert changed["collections"]["c"] != first["collections"]["c"]
    assert changed["collections"]["d"] == first["collections"]["d"]
    assert changed["md5"] != first["md5"]


def test_dbhash_is_mongods_algorithm_over_the_servers_bytes(
        made: Branches, client: MongoClient, db_name: str) -> None:
    _seed(client, db_name)
    branch = _port(made)
    reply = branch[db_name].command("dbHash")
    hashes, total = _mongod_md5(client, db_name, ["c", "d"])
    assert reply["collections"] == hashes and reply["md5"] == total
    assert list(reply)[:8] == ["host", "collections", "capped", "uuids", "md5", "timeMillis",
                               "fromCache", "ok"]
    assert reply["capped"] == [] and reply["fromCache"] == []
    assert isinstance(reply["timeMillis"], int) and ":" in reply["host"]

    # A changed collection hashes what the branch shows: the same documents written on
    # main elsewhere give mongod's digest of them.
    branch[db_name].c.delete_many({"_id": {"$in": [2, 5]}})
    branch[db_name].c.insert_one({"_id": 11, "n": 11, "s": "new"})
    client[db_name].shown.insert_many(list(branch[db_name].c.find().sort("_id", -1)))
    expected, _ = _mongod_md5(client, db_name, ["shown"])
    assert branch[db_name].command("dbHash", collections=["c"])["collections"] == \
        {"c": expected["shown"]}


def test_dbhash_of_a_copy_branch_equals_an_overlay_branchs(
        made: Branches, client: MongoClient, db_name: str) -> None:
    _seed(client, db_name)
    overlay, copy = _port(made), _port(made, mode="copy")
    for port in (overlay, copy):
        port[db_name].c.update_one({"_id": 1}, {"$set": {"s": "changed"}})
        port[db_name].d.delete_one({"_id": "k2"})
        port[db_name].e.insert_one({"_id": 1})
    a, b = overlay[db_name].command("dbHash"), copy[db_name].command("dbHash")
    assert a["collections"] == b["collections"] and a["md5"] == b["md5"]
    assert set(a["collections"]) == {"c", "d", "e"}


def test_dbhash_collections_filter_and_what_it_leaves_out(
        made: Branches, client: MongoClient, db_name: str) -> None:
    _seed(client, db_name)
    client[db_name].command("create", "v", viewOn="c", pipeline=[])
    branch = _port(made)
    branch[db_name].create_collection("capped1", capped=True, size=4096)
    branch[db_name].capped1.insert_one({"_id": 1})
    whole = branch[db_name].command("dbHash")
    assert set(whole["collections"]) == {"c", "d", "capped1"}  # the view is not hashed
    assert whole["capped"] == ["capped1"]
    only = branch[db_name].command("dbHash", collections=["d", "nosuch"])
    assert only["collections"] == {"d": whole["collections"]["d"]}
    assert only["md5"] == hashlib.md5(whole["collections"]["d"].encode()).hexdigest()
    with pytest.raises(OperationFailure) as info:
        branch[db_name].command("dbHash", collections=["d", 1])
    assert info.value.code == 14


def test_datasize_of_an_untouched_collection_is_the_upstreams(
        made: Branches, client: MongoClient, db_name: str) -> None:
    _seed(client, db_name)
    branch = _port(made)
    # Forwarded as it is: SecantusDB has no dataSize command at all.
    with pytest.raises(OperationFailure) as info:
        branch[db_name].command("dataSize", f"{db_name}.c")
    assert info.value.code == 59


def _bson_sizes(client: MongoClient, db: str, coll: str,
                match: dict[str, Any] | None = None) -> tuple[int, int]:
    rows = list(client[db][coll].aggregate([
        {"$match": match or {}},
        {"$group": {"_id": None, "size": {"$sum": {"$bsonSize": "$$ROOT"}},
                    "n": {"$sum": 1}}}]))
    return (rows[0]["size"], rows[0]["n"]) if rows else (0, 0)


def test_datasize_of_a_changed_collection_is_the_branch_views(
        made: Branches, client: MongoClient, db_name: str) -> None:
    # SecantusDB has no dataSize command: the expected figures are mongod's documented
    # result computed with $bsonSize on main over the same documents.
    _seed(client, db_name)
    branch = _port(made)
    db = branch[db_name]
    db.c.delete_one({"_id": 0})
    db.c.update_one({"_id": 6}, {"$set": {"s": "y" * 100}})
    db.c.insert_one({"_id": 15, "n": 15, "s": "z" * 15})
    client[db_name].shown.insert_many(list(db.c.find()))
    size, count = _bson_sizes(client, db_name, "shown")

    whole = db.command("dataSize", f"{db_name}.c")
    assert list(whole)[:5] == ["estimate", "size", "numObjects", "millis", "ok"]
    assert whole["size"] == size and whole["numObjects"] == count == 10
    assert isinstance(whole["size"], Int64) and isinstance(whole["millis"], int)
    assert db.command("dataSize", f"{db_name}.c", estimate=True)["size"] == size

    ranged = db.command("dataSize", f"{db_name}.c", keyPattern={"n": 1}, min={"n": 3},
                        max={"n": 8})
    in_range = _bson_sizes(client, db_name, "shown", {"n": {"$gte": 3, "$lt": 8}})
    assert (ranged["size"], ranged["numObjects"]) == in_range
    inferred = db.command("dataSize", f"{db_name}.c", min={"n": 3}, max={"n": 8})
    assert (inferred["size"], inferred["numObjects"]) == in_range
    estimated = db.command("dataSize", f"{db_name}.c", keyPattern={"n": 1}, min={"n": 3},
                           max={"n": 8}, estimate=True)
    assert estimated["numObjects"] == in_range[1]
    assert estimated["size"] == in_range[1] * (size // count)
    capped = db.command("dataSize", f"{db_name}.c", maxObjects=2)
    assert capped["numObjects"] == 3 and capped["maxReached"] is True

    with pytest.raises(OperationFailure) as info:
        db.command("dataSize", f"{db_name}.c", keyPattern={"s": 1}, min={"s": ""},
                   max={"s": "z"})
    assert info.value.code == 96
    with pytest.raises(OperationFailure) as info:
        db.command("dataSize", f"{db_name}.c", min={"n": 3})
    assert info.value.code == 2
    db.gone.insert_one({"_id": 1})
    db.gone.drop()
    missing = db.command("dataSize", f"{db_name}.gone")
    assert (missing["size"], missing["numObjects"]) == (0, 0)

