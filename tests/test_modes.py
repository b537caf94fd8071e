"""Copy branches beside WAL branches, and migration between the two modes."""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import bson
import pytest
from pymongo import MongoClient
from pymongo.errors import AutoReconnect, OperationFailure

from tests import rawwire
from tests.servers import ProxyProcess, Secantus

_names = itertools.count()


def fingerprint(db: Any) -> dict[str, str]:
    return {name: hashlib.sha256(b"".join(
        bson.encode(d) for d in db[name].find().sort("_id", 1))).hexdigest()
        for name in sorted(db.list_collection_names()) if not name.startswith("__mb_")}


@pytest.fixture()
def setup(proxy: ProxyProcess, direct: MongoClient) -> Iterator[tuple[str, Any]]:
    n = next(_names)
    db_name = f"modes_{n}"
    base = direct[db_name]
    base.items.insert_many([{"_id": i, "v": i, "tag": f"t{i % 7}"} for i in range(600)])
    base.items.create_index("tag")
    base.other.insert_many([{"_id": i} for i in range(10)])
    yield db_name, base
    for name in (f"mode-{n}", f"mode-{n}-kid"):
        proxy.api("DELETE", f"/branches/{name}")
    direct.drop_database(db_name)


def test_copy_branch_is_a_snapshot_with_logged_writes(proxy: ProxyProcess,
                                                      setup: tuple[str, Any]) -> None:
    db_name, base = setup
    name = f"mode-{db_name.split('_')[1]}"
    status, body = proxy.api("POST", "/branches", {"name": name, "mode": "copy"})
    assert status == 201 and body["mode"] == "copy", body  # type: ignore[index]
    client: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    try:
        db = client[db_name]
        assert fingerprint(db) == fingerprint(base)
        assert sorted(ix["name"] for ix in db.items.list_indexes()) == ["_id_", "tag_1"]
        base.items.insert_one({"_id": 10_000})  # the copy does not see later parent writes
        assert db.items.find_one({"_id": 10_000}) is None
        db.items.update_one({"_id": 3}, {"$set": {"v": -3}})
        db.items.delete_one({"_id": 4})
        entries = proxy.api("GET", f"/branches/{name}/log")[1]["entries"]  # type: ignore[index]
        assert [e["op"] for e in entries] == ["delete", "put"]
        diff = proxy.api("GET", f"/branches/{name}/diff")[1]
        assert sorted((c["op"], c["_id"]) for c in diff["changes"]) == [  # type: ignore[index]
            ("delete", 4), ("update", 3)]
        status, merged = proxy.api("POST", f"/branches/{name}/merge", {"strategy": "abort"})
        assert status == 200, merged
        assert base.items.find_one({"_id": 3})["v"] == -3
        assert base.items.find_one({"_id": 4}) is None
        assert base.items.find_one({"_id": 10_000}) is not None  # the parent's own write stays
    finally:
        client.close()


@pytest.mark.parametrize("first", ["wal", "copy"])
def test_migration_keeps_data_and_port(proxy: ProxyProcess, setup: tuple[str, Any],
                                       first: str) -> None:
    db_name, _ = setup
    name = f"mode-{db_name.split('_')[1]}"
    status, body = proxy.api("POST", "/branches", {"name": name, "mode": first})
    assert status == 201, body
    port = body["port"]  # type: ignore[index]
    client: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    try:
        db = client[db_name]
        db.items.update_many({"v": {"$lt": 50}}, {"$inc": {"v": 1000}})
        db.items.delete_many({"v": {"$gte": 590}})
        db.items.insert_one({"_id": "new", "v": 1})
        db.fresh.insert_one({"_id": 1})
        db.other.drop()
        expected = db.items.count_documents({})
        for target in (("copy", "wal") if first == "wal" else ("wal", "copy")):
            before = fingerprint(db)
            errors: list[int] = []
            wrong: list[int] = []
            stop = threading.Event()
            thread = threading.Thread(target=read_during, args=(
                body["uri"], db_name, expected, stop, errors, wrong))  # type: ignore[index]
            thread.start()
            status, result = proxy.api("POST", f"/branches/{name}/migrate", {"to": target})
            stop.set()
            thread.join(30)
            assert status == 200, result
            assert not wrong, f"reads during the migration counted {wrong}"
            assert set(errors) <= {11602}
            info = proxy.api("GET", f"/branches/{name}")[1]
            assert info["mode"] == target and info["port"] == port  # type: ignore[index]
            assert fingerprint(db) == before
        db.items.update_one({"_id": 100}, {"$set": {"after": True}})
        assert db.items.find_one({"_id": 100})["after"] is True
    finally:
        client.close()


def read_during(uri: str, db_name: str, expected: int, stop: threading.Event,
                errors: list[int], wrong: list[int]) -> None:
    """Reads during a migration see the right data or a retryable error, never wrong data."""
    reading: MongoClient = MongoClient(uri, retryReads=False)
    try:
        while not stop.is_set():
            try:
                got = reading[db_name].items.count_documents({})
            except (OperationFailure, AutoReconnect) as exc:
                errors.append(int((getattr(exc, "details", None) or {}).get("code", 0)))
                continue
            if got != expected:
                wrong.append(got)
    finally:
        reading.close()


def test_migrate_errors(proxy: ProxyProcess, setup: tuple[str, Any]) -> None:
    db_name, _ = setup
    name = f"mode-{db_name.split('_')[1]}"
    assert proxy.api("POST", "/branches", {"name": name})[0] == 201
    status, body = proxy.api("POST", f"/branches/{name}/migrate", {"to": "tape"})
    assert status == 400 and "'to' must be one of" in body["error"]  # type: ignore[index]
    assert proxy.api("POST", f"/branches/{name}/migrate", {})[0] == 400
    assert proxy.api("POST", "/branches/nope/migrate", {"to": "copy"})[0] == 404
    status, body = proxy.api("POST", f"/branches/{name}/migrate", {"to": "wal"})
    assert status == 200 and body["migrated"] is False  # type: ignore[index]


def test_copy_branch_reads_run_on_the_copy(proxy: ProxyProcess, setup: tuple[str, Any]) -> None:
    """A copy branch answers from its copied collection alone: cursors opened there
    page through the proxy under the user's namespace, and explain shows the copy."""
    db_name, base = setup
    name = f"mode-{db_name.split('_')[1]}"
    status, body = proxy.api("POST", "/branches", {"name": name, "mode": "copy"})
    assert status == 201, body
    client: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    try:
        db = client[db_name]
        db.items.update_many({"_id": {"$lt": 50}}, {"$inc": {"v": 1000}})
        pipeline = [{"$match": {"v": {"$gte": 10}}}, {"$sort": {"_id": 1}},
                    {"$project": {"v": 1}}]
        got = list(db.items.aggregate(pipeline, batchSize=7))
        want = [{"_id": i, "v": i + 1000 if i < 50 else i} for i in range(600)
                if (i + 1000 if i < 50 else i) >= 10]
        assert got == want
        cursor = db.items.aggregate([{"$sort": {"_id": -1}}], batchSize=5)
        assert cursor.address is not None and next(cursor)["_id"] == 599
        cursor.close()  # killCursors on a proxy-held cursor
        found = list(db.items.find({"tag": "t3"}, batch_size=4).sort("v", -1).hint("tag_1"))
        assert [d["_id"] for d in found] == sorted(
            (i for i in range(600) if i % 7 == 3), key=lambda i: -(i + 1000 if i < 50 else i))
        joined = list(db.other.aggregate([
            {"$lookup": {"from": "items", "localField": "_id", "foreignField": "_id",
                         "as": "item"}},
            {"$unionWith": {"coll": "items", "pipeline": [{"$match": {"_id": 599}}]}},
            {"$sort": {"_id": 1}}]))
        assert [d["item"][0]["v"] for d in joined[:10]] == [i + 1000 for i in range(10)]
        assert joined[-1] == {"_id": 599, "v": 599, "tag": "t4"}
        graph = list(db.other.aggregate([
            {"$match": {"_id": 1}},
            {"$graphLookup": {"from": "items", "startWith": "$_id", "connectFromField": "_id",
                              "connectToField": "_id", "as": "hops", "maxDepth": 0}}]))
        assert [h["v"] for h in graph[0]["hops"]] == [1001]
        assert db.items.count_documents({"v": {"$gte": 1000}}) == 50
        assert sorted(db.items.distinct("tag")) == [f"t{i}" for i in range(7)]
        plan = db.command("explain", {"aggregate": "items", "pipeline": [], "cursor": {}})
        namespace = plan["queryPlanner"]["namespace"]
        assert namespace.startswith(f"{db_name}.__mb_") and namespace.endswith("_l_items")
        assert base.items.find_one({"_id": 1})["v"] == 1  # the base never changed
    finally:
        client.close()


def test_copy_branch_keeps_empty_collections_and_options(proxy: ProxyProcess,
                                                         setup: tuple[str, Any]) -> None:
    """An empty collection is copied as an empty collection, and a collection with
    options keeps them (its validator still refuses what it refused on the parent)."""
    db_name, base = setup
    name = f"mode-{db_name.split('_')[1]}"
    base.create_collection("empty")
    base.create_collection("checked", validator={"n": {"$type": "int"}})
    base.checked.insert_one({"_id": 1, "n": 1})
    base.checked.create_index("n")
    status, body = proxy.api("POST", "/branches", {"name": name, "mode": "copy"})
    assert status == 201, body
    client: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    try:
        db = client[db_name]
        assert {"empty", "checked", "items", "other"} <= set(db.list_collection_names())
        assert db.empty.count_documents({}) == 0
        options = db.checked.options()
        assert options.get("validator") == {"n": {"$type": "int"}}
        assert sorted(ix["name"] for ix in db.checked.list_indexes()) == ["_id_", "n_1"]
        with pytest.raises(OperationFailure) as info:
            db.checked.insert_one({"_id": 2, "n": "not an int"})
        assert info.value.code == 121  # DocumentValidationFailure
        db.checked.insert_one({"_id": 3, "n": 3})
        assert [d["_id"] for d in db.checked.find().sort("_id", 1)] == [1, 3]
    finally:
        client.close()


@pytest.mark.secantus_gap(reason="SecantusDB creates a database named '' where mongod "
                                 "refuses the name; the proxy must still copy the rest")
def test_copy_branch_skips_a_database_no_driver_can_name(
        proxy: ProxyProcess, upstream: Secantus, setup: tuple[str, Any]) -> None:
    db_name, base = setup
    with rawwire.connect(upstream.port) as sock:
        made = rawwire.command(sock, {"insert": "c", "documents": [{"_id": 1}], "$db": ""})
    try:
        name = f"mode-{db_name.split('_')[1]}"
        status, body = proxy.api("POST", "/branches", {"name": name, "mode": "copy"})
        assert status == 201, (body, made)
        with MongoClient(body["uri"]) as client:  # type: ignore[index]
            assert fingerprint(client[db_name]) == fingerprint(base)
    finally:
        with rawwire.connect(upstream.port) as sock:
            rawwire.command(sock, {"dropDatabase": 1, "$db": ""})
