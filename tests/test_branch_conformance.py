"""What pymongo's own test suite (`make conformance`) found missing on a branch port.

The upstream here runs with `--enable-test-commands`, as pymongo's suite expects.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from bson import Int64
from pymongo import DeleteMany, InsertOne, MongoClient, UpdateOne, monitoring
from pymongo.errors import (
    ClientBulkWriteException,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)

from tests.branchutil import Branches, unique
from tests.servers import ProxyProcess, Secantus


@pytest.fixture(scope="module")
def test_upstream() -> Iterator[Secantus]:
    server = Secantus(extra=["--enable-test-commands"]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def test_proxy(test_upstream: Secantus) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(test_upstream.uri).start()
    yield proc
    proc.stop()


@pytest.fixture()
def upstream_client(test_upstream: Secantus) -> Iterator[MongoClient]:
    c: MongoClient = MongoClient(test_upstream.uri, directConnection=True)
    yield c
    c.close()


@pytest.fixture()
def branch_info(test_proxy: ProxyProcess) -> Iterator[dict[str, Any]]:
    made = Branches(test_proxy)
    yield made.create(unique("conf"))
    made.cleanup()


# Makes a branch of main when called: its description and a client of its port.
Fork = Callable[[], tuple[dict[str, Any], MongoClient]]


@pytest.fixture()
def fork(test_proxy: ProxyProcess) -> Iterator[Fork]:
    """Branches made when a test asks, after it has seeded the base: a branch is a
    snapshot, so data written on the upstream after its fork is not in it."""
    made = Branches(test_proxy)
    clients: list[MongoClient] = []

    def make() -> tuple[dict[str, Any], MongoClient]:
        info = made.create(unique("conf"))
        clients.append(MongoClient(info["uri"], serverSelectionTimeoutMS=10000))
        return info, clients[-1]

    yield make
    for c in clients:
        c.close()
    made.cleanup()


@pytest.fixture()
def branch(branch_info: dict[str, Any]) -> Iterator[MongoClient]:
    c: MongoClient = MongoClient(branch_info["uri"], serverSelectionTimeoutMS=10000)
    yield c
    c.close()


def test_a_change_without_pre_image_breaks_only_children_reading_it(
        test_proxy: ProxyProcess, upstream_client: MongoClient, fork: Fork) -> None:
    """A collection main creates behind the proxy after a child's fork, updated before
    the capture turned its pre-images on (here the capture's collMod fails, a
    failCommand scoped to the proxy's own connections): the update arrives without its
    pre-image, but the child holds that collection absent, so it stays a snapshot. The
    same on a collection the child reads through main breaks it, and says why."""
    db = unique("conf_nopre").replace("-", "_")
    upstream_client[db].items.insert_many([{"_id": i, "v": i} for i in range(3)])
    info, kid = fork()
    upstream_client.admin.command({
        "configureFailPoint": "failCommand", "mode": "alwaysOn",
        "data": {"failCommands": ["collMod"], "errorCode": 2,
                 "appName": "mongobranch-engine"}})
    try:
        # Made explicitly: SecantusDB's change stream has no `create` event for a
        # collection an insert creates (mongod's has, with showExpandedEvents), and
        # without one the capture cannot tell the child to hold it absent.
        upstream_client[db].create_collection("fresh")
        upstream_client[db].fresh.insert_one({"_id": 1, "v": 1})
        upstream_client[db].fresh.update_one({"_id": 1}, {"$set": {"v": 2}})
        test_proxy.api("GET", "/branches/main/log?limit=1")  # the capture has seen them
    finally:
        upstream_client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    wal = upstream_client[test_proxy.meta_db or ""].wal
    assert wal.count_documents({"b": "main", "ns": f"{db}.fresh", "nopre": True}) == 1
    status, got = test_proxy.api("GET", f"/branches/{info['name']}")
    assert status == 200 and isinstance(got, dict)
    assert got["isolation"] == "snapshot", got
    assert kid[db].list_collection_names() == ["items"]

    upstream_client[db].command("collMod", "items",
                                changeStreamPreAndPostImages={"enabled": False})
    upstream_client[db].items.update_one({"_id": 0}, {"$set": {"v": "behind"}})
    test_proxy.api("GET", "/branches/main/log?limit=1")
    status, got = test_proxy.api("GET", f"/branches/{info['name']}")
    assert status == 200 and isinstance(got, dict)
    assert got["isolation"] == "proxy-writes-only", got
    assert any(f"{db}.items: a change arrived without its pre-image" in why
               for why in got["isolationBreaks"]), got


def test_configure_fail_point_reaches_the_upstream_from_a_branch(
        branch: MongoClient, upstream_client: MongoClient) -> None:
    reply = branch.admin.command("configureFailPoint", "failCommand", mode={"times": 1},
                                 data={"failCommands": ["ping"], "errorCode": 2})
    assert reply["ok"] == 1.0
    with pytest.raises(OperationFailure) as info:
        upstream_client.admin.command("ping")
    assert info.value.code == 2
    branch.admin.command("configureFailPoint", "failCommand", mode="off")
    assert upstream_client.admin.command("ping")["ok"] == 1.0


def _bulk(ordered: bool, errors_only: bool, db: str) -> dict[str, Any]:
    """A client-level bulkWrite over two namespaces: inserts (one a duplicate of a base
    document), an upsert, a multi-update, a replacement and deletes."""
    return {"bulkWrite": 1, "ops": [
        {"insert": 0, "document": {"_id": 10, "k": "new"}},
        {"insert": 0, "document": {"_id": 1, "k": "dup"}},
        {"insert": 0, "document": {"_id": 11, "k": "new"}},
        {"update": 1, "filter": {"g": 1}, "updateMods": {"$inc": {"v": 1}}, "multi": True},
        {"update": 1, "filter": {"_id": 99}, "updateMods": {"$set": {"v": 0}},
         "upsert": True},
        {"update": 0, "filter": {"_id": 2}, "updateMods": {"k": "replaced"}},
        {"delete": 1, "filter": {"g": 2}, "multi": True},
        {"delete": 0, "filter": {"_id": 3}, "multi": False},
    ], "nsInfo": [{"ns": f"{db}.a"}, {"ns": f"{db}.b"}], "ordered": ordered,
        "errorsOnly": errors_only}


def _seed(upstream_client: MongoClient, db: str) -> None:
    upstream_client[db].a.insert_many([{"_id": i, "k": "base"} for i in range(1, 5)])
    upstream_client[db].b.insert_many([{"_id": i, "g": i % 3, "v": 0} for i in range(9)])


def _types(value: Any) -> Any:
    """The BSON types of a decoded reply (int64 decodes to Int64, int32 to int)."""
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()
                if k not in ("$clusterTime", "operationTime")}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value).__name__


def _state(client: MongoClient, db: str) -> dict[str, list[dict[str, Any]]]:
    return {c: list(client[db][c].find({}, sort=[("_id", 1)])) for c in ("a", "b")}


@pytest.mark.parametrize("ordered,errors_only", [(False, False), (True, False), (False, True)])
def test_client_bulk_write_on_a_branch_answers_as_the_main_port(
        fork: Fork, upstream_client: MongoClient,
        test_proxy: ProxyProcess, ordered: bool, errors_only: bool) -> None:
    db = unique("bulk").replace("-", "_")
    _seed(upstream_client, db)
    _, branch = fork()
    base_before = _state(upstream_client, db)
    on_branch = branch.admin.command(_bulk(ordered, errors_only, db))
    assert _state(upstream_client, db) == base_before  # the base is never written
    branch_state = _state(branch, db)
    with MongoClient(test_proxy.uri) as main:
        on_main = main.admin.command(_bulk(ordered, errors_only, db))
        assert branch_state == _state(main, db)
    assert {k: v for k, v in on_branch.items() if k not in ("$clusterTime", "operationTime")} \
        == {k: v for k, v in on_main.items() if k not in ("$clusterTime", "operationTime")}
    branch_types, main_types = _types(on_branch), _types(on_main)
    # mongod's cursor id is always int64 (SecantusDB's is int32 here): checked on its own.
    assert branch_types["cursor"].pop("id") == "Int64"
    main_types["cursor"].pop("id")
    assert branch_types == main_types
    assert on_branch["nErrors"] == 1
    if ordered:
        assert on_branch["nInserted"] == 1 and on_branch["nMatched"] == 0
    else:
        assert on_branch["nInserted"] == 2 and on_branch["nUpserted"] == 1
        assert on_branch["nDeleted"] == 4 and on_branch["nModified"] == 4
    upstream_client.drop_database(db)


def test_pymongo_client_bulk_write_on_a_branch_is_logged(
        fork: Fork, upstream_client: MongoClient) -> None:
    db = unique("bulk").replace("-", "_")
    _seed(upstream_client, db)
    branch_info, branch = fork()
    result = branch.bulk_write([
        InsertOne(namespace=f"{db}.a", document={"_id": 20}),
        UpdateOne(namespace=f"{db}.b", filter={"_id": 1}, update={"$set": {"v": 7}}),
        DeleteMany(namespace=f"{db}.b", filter={"g": 0}),
    ], verbose_results=True)
    assert result.inserted_count == 1 and result.modified_count == 1
    assert result.deleted_count == 3
    assert result.update_results[1].matched_count == 1
    assert branch[db].a.find_one({"_id": 20}) == {"_id": 20}
    assert upstream_client[db].a.find_one({"_id": 20}) is None
    log = branch.admin.command({"branchLog": branch_info["name"], "limit": 50})
    assert len(log["entries"]) == 5  # one insert, one update, three deletes
    with pytest.raises(ClientBulkWriteException) as info:
        branch.bulk_write([InsertOne(namespace=f"{db}.a", document={"_id": 20})])
    assert info.value.write_errors[0]["code"] == 11000
    upstream_client.drop_database(db)


def test_bypass_document_validation_on_branch_writes(branch: MongoClient) -> None:
    db = branch[unique("bdv").replace("-", "_")]
    coll = db.create_collection("v", validator={"a": {"$type": "int"}})
    with pytest.raises(OperationFailure) as info:
        coll.insert_one({"_id": 1, "a": "text"})
    assert info.value.code == 121
    coll.insert_one({"_id": 1, "a": "text"}, bypass_document_validation=True)
    coll.insert_many([{"_id": 2, "a": "x"}, {"_id": 3, "a": 3}],
                     bypass_document_validation=True)
    with pytest.raises(OperationFailure):
        coll.update_one({"_id": 3}, {"$set": {"a": "y"}})
    coll.update_one({"_id": 3}, {"$set": {"a": "y"}}, bypass_document_validation=True)
    coll.replace_one({"_id": 2}, {"a": "z"}, bypass_document_validation=True)
    db.command("findAndModify", "v", query={"_id": 1}, update={"$set": {"a": "w"}},
               bypassDocumentValidation=True)
    assert list(coll.find({}, sort=[("_id", 1)])) == [
        {"_id": 1, "a": "w"}, {"_id": 2, "a": "z"}, {"_id": 3, "a": "y"}]
    with pytest.raises(OperationFailure):
        coll.insert_one({"_id": 4, "a": "no"}, bypass_document_validation=False)


def test_documents_near_16_mib_are_stored_and_logged_on_a_branch(
        branch: MongoClient, branch_info: dict[str, Any], test_proxy: ProxyProcess) -> None:
    """The WAL entry of such a document (its image plus the entry's fields), and that of an
    update of it (pre- and post-image), are over the BSON limit on their own."""
    coll = branch[unique("big").replace("-", "_")].c
    limit = 16 * 1024 * 1024
    coll.insert_one({"_id": 1, "s": "x" * (limit - 64)})
    coll.replace_one({"_id": 1}, {"s": "y" * (limit - 64)})
    coll.update_one({"_id": 2}, {"$set": {"s": "a" * (limit - 64)}}, upsert=True)
    got = {d["_id"]: d["s"] for d in coll.find()}
    assert got == {1: "y" * (limit - 64), 2: "a" * (limit - 64)}
    status, log = test_proxy.api("GET", f"/branches/{branch_info['name']}/log?limit=10")
    assert status == 200 and isinstance(log, dict)
    # Besides the three writes: the `own` entry of the collection's first write (new
    # on the branch, it is the branch's own from then on).
    assert [e["op"] for e in log["entries"]] == ["put", "put", "put", "own"]
    status, diff = test_proxy.api("GET", f"/branches/{branch_info['name']}/diff")
    assert status == 200 and isinstance(diff, dict)
    assert sorted(c["_id"] for c in diff["changes"]) == [1, 2]
    coll.delete_many({})
    assert coll.count_documents({}) == 0


def test_documents_whose_wal_entry_cannot_hold_their_images_are_written(
        fork: Fork, upstream_client: MongoClient, test_proxy: ProxyProcess) -> None:
    """Documents of random bytes, which zstd does not shrink: an insert of one near
    16 MiB, an update of one over 8 MiB (its entry would hold both images), and a delete
    of one near 16 MiB, of the base and of the branch's own, in every write command,
    land as they do on mongod; their entries name images stored out of line
    (tests/test_large_images.py reads them back through every history operation)."""
    name = unique("hugewal").replace("-", "_")
    big = os.urandom(9 * 1024 * 1024)
    huge = os.urandom(16 * 1024 * 1024 - 300)
    upstream_client[name].c.insert_many([{"_id": "base", "b": big}, {"_id": "small", "n": 0}])
    upstream_client[name].c.insert_one({"_id": "gone", "b": huge})
    info, branch = fork()
    coll = branch[name].c
    coll.insert_one({"_id": "own", "b": huge})
    coll.insert_many([{"_id": 2}, {"_id": "own2", "b": huge}, {"_id": 4}], ordered=False)
    for target in ("base", "own"):
        assert coll.update_one({"_id": target}, {"$set": {"n": 1}}).modified_count == 1
        assert coll.find_one_and_update({"_id": target}, {"$inc": {"n": 1}},
                                        projection={"n": 1}) == {"_id": target, "n": 1}
    coll.bulk_write([UpdateOne({"_id": "base"}, {"$inc": {"n": 1}}),
                     UpdateOne({"_id": "small"}, {"$inc": {"n": 1}})], ordered=False)
    assert coll.delete_one({"_id": "gone"}).deleted_count == 1
    assert coll.find_one_and_delete({"_id": "own2"}, projection={"_id": 1}) == {"_id": "own2"}
    assert {d["_id"]: d.get("n") for d in coll.find({}, {"b": 0})} == {
        "base": 3, "own": 2, "small": 1, 2: None, 4: None}
    assert coll.find_one({"_id": "base"}) == {"_id": "base", "b": big, "n": 3}
    # In a transaction too (the entries' images stored in it, committed with it).
    with branch.start_session() as session, session.start_transaction():
        coll.update_one({"_id": "own"}, {"$set": {"t": 1}}, session=session)
        coll.insert_one({"_id": "txn", "b": huge}, session=session)
    assert coll.find_one({"_id": "own"}, {"t": 1}) == {"_id": "own", "t": 1}
    assert coll.find_one({"_id": "txn"}) == {"_id": "txn", "b": huge}
    coll.delete_one({"_id": "txn"})
    status, log = test_proxy.api("GET", f"/branches/{info['name']}/log?limit=30")
    assert status == 200 and isinstance(log, dict)
    logged = sorted(repr(e.get("_id")) for e in log["entries"] if e.get("ns") == coll.full_name)
    assert logged.count("'base'") == 3 and logged.count("'gone'") == 1, logged
    status, diff = test_proxy.api("GET", f"/branches/{info['name']}/diff")
    assert status == 200 and isinstance(diff, dict)
    assert sorted(repr(c["_id"]) for c in diff["changes"] if c.get("ns") == coll.full_name) \
        == sorted(map(repr, ["base", "gone", "own", "small", 2, 4]))


def test_validate_on_a_branch(fork: Fork,
                              upstream_client: MongoClient) -> None:
    name = unique("val").replace("-", "_")
    upstream_client[name].t.insert_many([{"_id": i} for i in range(5)])
    upstream_client[name].t.create_index("a")
    _, branch = fork()
    db = branch[name]
    untouched = db.validate_collection("t")
    assert untouched["valid"] is True and untouched["nrecords"] == 5
    db.t.insert_one({"_id": 10, "a": 1})
    db.t.delete_many({"_id": {"$lt": 2}})
    changed = db.validate_collection("t", full=True)
    assert changed["valid"] is True
    assert changed["ns"] == f"{name}.t"
    assert changed["nrecords"] == 4
    assert changed["nIndexes"] == 2 and set(changed["indexDetails"]) == {"_id_", "a_1"}
    assert changed["errors"] == []
    db.t.drop()
    with pytest.raises(OperationFailure) as info:
        db.validate_collection("t")
    assert info.value.code == 26
    with pytest.raises(OperationFailure) as info:
        db.validate_collection("never")
    assert info.value.code == 26
    upstream_client.drop_database(name)


def test_a_hint_naming_no_index_is_refused_on_a_changed_collection(
        fork: Fork, upstream_client: MongoClient) -> None:
    name = unique("hint").replace("-", "_")
    upstream_client[name].c.insert_many([{"_id": i, "num": i} for i in range(20)])
    upstream_client[name].c.create_index([("num", -1)], name="by_num")
    _, branch = fork()
    db = branch[name]
    db.c.insert_one({"_id": 100, "num": 100})  # the collection now differs from the base
    db.r.insert_many([{"num": i} for i in range(5)])
    db.r.drop()
    db.r.insert_many([{"num": i} for i in range(5)])  # dropped and refilled: read in place
    for coll in (db.c, db.r):
        for bad in ([("num", 1)], "nosuch"):
            with pytest.raises(OperationFailure) as info:
                list(coll.find({"num": 3}).hint(bad))
            assert info.value.code == 2, info.value.details
            with pytest.raises(OperationFailure):
                coll.find({"num": 3}).hint(bad).explain()
            with pytest.raises(OperationFailure):
                coll.count_documents({"num": 3}, hint=bad)
            with pytest.raises(OperationFailure) as info:
                list(coll.aggregate([{"$match": {"num": 3}}],
                                    hint=bad if isinstance(bad, str) else dict(bad)))
            assert info.value.code == 2, info.value.details
    # hints that name an index of the branch's view, and $natural, still work
    assert len(list(db.c.find({"num": {"$gte": 5}}).hint([("num", -1)]))) == 16
    assert len(list(db.c.find({"num": {"$gte": 5}}).hint("by_num"))) == 16
    assert len(list(db.c.find().hint([("$natural", 1)]))) == 21
    assert db.c.count_documents({"num": {"$gte": 10}}, hint="_id_") == 11
    upstream_client.drop_database(name)


def test_a_hint_of_an_index_made_on_a_refilled_collection_is_honoured(
        fork: Fork, upstream_client: MongoClient) -> None:
    """pymongo's test_hint_by_name on a branch: a collection the branch dropped and
    refilled is read as it is, with the index the branch made on it, so a hint naming
    that index (which the base's collection of the same name lacks) orders the read as
    it does on a plain copy made the same way on the upstream."""
    name = unique("hintown").replace("-", "_")
    upstream_client[name].coll.insert_many([{"i": -i} for i in range(3)])
    _, branch = fork()

    def reads(coll: Any) -> list[Any]:
        return [next(coll.find())["i"], next(coll.find().hint("fooindex"))["i"],
                next(coll.find().hint([("i", -1)]))["i"],
                list(coll.aggregate([{"$limit": 1}], hint="fooindex")),
                coll.count_documents({"i": {"$gte": 90}}, hint="fooindex")]

    # One the base has (without that index), one it lacks, as in pymongo's run.
    for base_name in ("coll", "nobase"):
        on_branch, copy = branch[name][base_name], upstream_client[name][f"copy_{base_name}"]
        for coll in (on_branch, copy):
            coll.drop()
            coll.insert_many([{"_id": i, "i": i} for i in range(100)])
            coll.create_index([("i", -1)], name="fooindex")
        assert next(on_branch.find().hint("fooindex"))["i"] == 99  # pymongo's assertion
        assert reads(on_branch) == reads(copy), base_name
    upstream_client.drop_database(name)


def test_explain_shows_the_read_plan_beside_the_upstreams_explain(
        fork: Fork, upstream_client: MongoClient) -> None:
    """explain on a branch port names the plan the read takes and why, next to the
    upstream's explain of what runs (for merged reads: the server-side union answering
    the same read)."""
    name = unique("plan").replace("-", "_")
    upstream_client[name].c.insert_many([{"_id": i, "num": i} for i in range(20)])
    upstream_client[name].u.insert_many([{"_id": i} for i in range(3)])
    _, branch = fork()
    db = branch[name]
    db.c.update_one({"_id": 4}, {"$set": {"num": 40}})
    db.r.insert_many([{"_id": i} for i in range(3)])
    db.r.drop()
    db.r.insert_many([{"_id": i} for i in range(3)])  # dropped and refilled: owned outright

    def explained(cmd: dict[str, Any]) -> dict[str, Any]:
        reply = db.command("explain", cmd)
        assert reply["ok"] == 1.0 and "queryPlanner" in reply, reply
        return dict(reply["mongobranch"])

    assert explained({"find": "u", "filter": {}}) == {
        "plan": "pass-through", "reason": "the branch never changed u",
        "explained": "pass-through"}
    point = db.command("explain", {"find": "c", "filter": {"_id": 4}})
    assert point["mongobranch"]["plan"] == "point"
    assert point["queryPlanner"]["namespace"].endswith("_l_c"), point["queryPlanner"]
    assert explained({"find": "c", "filter": {"_id": 5}})["plan"] == "pass-through"
    merged = explained({"find": "c", "filter": {"num": {"$gt": 3}}, "sort": {"num": 1}})
    assert merged["plan"] == "merged" and merged["explained"] == "union"
    assert "merged by sort key" in merged["reason"]
    union = explained({"find": "c", "sort": {"num": 1}, "collation": {"locale": "fr"}})
    assert union["plan"] == "union" and "collation" in union["reason"]
    assert explained({"find": "r", "filter": {}})["plan"] == "in-place"
    assert explained({"count": "c", "query": {"num": 40}})["plan"] == "merged"
    assert explained({"aggregate": "c", "pipeline": [], "cursor": {}})["plan"] == "union"
    assert explained({"aggregate": "u", "pipeline": [], "cursor": {}})["plan"] == \
        "pass-through"
    assert explained({"distinct": "u", "key": "_id"})["plan"] == "pass-through"
    inline = db.command("aggregate", "c", pipeline=[{"$match": {"num": 40}}], explain=True)
    assert inline["mongobranch"]["plan"] == "union" and "$nin" in inline["mongobranch"]["reason"]
    upstream_client.drop_database(name)


def test_out_from_a_collection_the_branch_never_changed(
        fork: Fork, upstream_client: MongoClient) -> None:
    """$out reads an untouched source as it is and writes into the branch only."""
    name = unique("out").replace("-", "_")
    upstream_client[name].u.insert_many([{"_id": i, "n": i} for i in range(5)])
    _, branch = fork()
    db = branch[name]
    assert list(db.u.aggregate([{"$match": {"n": {"$gte": 2}}}, {"$out": "copied"}])) == []
    assert sorted(d["_id"] for d in db.copied.find()) == [2, 3, 4]
    assert "copied" not in upstream_client[name].list_collection_names()
    upstream_client.drop_database(name)


class _Batches(monitoring.CommandListener):
    """The length of every batch a cursor received, first batch included."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        cursor = event.reply.get("cursor")
        if event.command_name in ("find", "getMore") and isinstance(cursor, dict):
            self.sizes.append(len(cursor.get("firstBatch", cursor.get("nextBatch", []))))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def _batch_sizes(uri: str, db: str, **find: Any) -> list[int]:
    listener = _Batches()
    with MongoClient(uri, event_listeners=[listener]) as c:
        docs = list(c[db].c.find({}, sort=[("_id", 1)], **find))
    assert docs
    return [n for n in listener.sizes if n]  # mongod may end on an empty batch, or not


@pytest.mark.parametrize("find", [{}, {"batch_size": 7}, {"batch_size": 3000}])
def test_get_more_batches_on_a_branch_are_mongods(
        fork: Fork, upstream_client: MongoClient,
        test_proxy: ProxyProcess, find: dict[str, Any]) -> None:
    """A getMore without batchSize returns what fits 16 MiB (not a fixed count); with
    one, that many; any batch stops at 16 MiB."""
    db = unique("gm").replace("-", "_")
    small = [{"_id": i, "v": "s" * 10} for i in range(2500)]
    big = [{"_id": 10_000 + i, "v": "b" * (1024 * 1024)} for i in range(40)]
    upstream_client[db].c.insert_many(small + big)
    branch_info, branch = fork()
    branch[db].c.update_one({"_id": 5}, {"$set": {"v": "t" * 10}})  # same size, changed
    assert _batch_sizes(branch_info["uri"], db, **find) == \
        _batch_sizes(test_proxy.uri, db, **find)
    upstream_client.drop_database(db)


def test_retried_client_bulk_write_applies_once(branch: MongoClient) -> None:
    db = unique("bwr").replace("-", "_")
    cmd = {"bulkWrite": 1, "ops": [
        {"insert": 0, "document": {"_id": 1}},
        {"update": 0, "filter": {"_id": 1}, "updateMods": {"$inc": {"n": 1}}},
    ], "nsInfo": [{"ns": f"{db}.c"}], "txnNumber": Int64(7)}
    with branch.start_session() as session:
        first = branch.admin.command(dict(cmd), session=session)
        again = branch.admin.command(dict(cmd), session=session)
    assert first["nErrors"] == 0 and again["nErrors"] == 0
    assert again["cursor"]["firstBatch"] == first["cursor"]["firstBatch"]
    assert list(branch[db].c.find()) == [{"_id": 1, "n": 1}]


def test_an_invalid_update_matching_nothing_is_refused(branch: MongoClient) -> None:
    """mongod parses the update document whether or not the filter matches."""
    coll = branch[unique("upd").replace("-", "_")].c
    coll.insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as info:
        coll.update_many({"_id": 2}, {"$thismodifierdoesntexist": 1})
    assert info.value.code == 9, info.value.details
    with pytest.raises(OperationFailure) as info:
        coll.update_one({"nope": 1}, {"$nosuch": {"a": 1}})
    assert info.value.code == 9, info.value.details
    assert coll.update_many({"_id": 2}, {"$set": {"a": 1}}).matched_count == 0


# The failpoints below are scoped to the test's client by appName: unscoped, the
# engine's own commands of that name (the capture's copies of main's writes for the
# branches, on its pool) may meet one first, at a time no test controls.
APP = "conformance-fp"


def _fail_once(client: MongoClient, name: str, **data: Any) -> None:
    client.admin.command("configureFailPoint", "failCommand", mode={"times": 1},
                         data={"failCommands": [name], "appName": APP, **data})


# Client commands a branch answers with other upstream commands than their own.
_PROBED_OPS: dict[str, Callable[[MongoClient, str], Any]] = {
    "delete": lambda c, db: c[db].c.delete_one({"_id": 1}),
    "update": lambda c, db: c[db].c.update_one({"_id": 1}, {"$set": {"v": 1}}),
    "findAndModify": lambda c, db: c[db].c.find_one_and_update({"_id": 1}, {"$set": {"v": 1}}),
    "bulkWrite": lambda c, db: c.bulk_write([InsertOne({"_id": 5}, namespace=f"{db}.c")]),
    "count": lambda c, db: c[db].c.estimated_document_count(),
}


@pytest.mark.parametrize("name", sorted(_PROBED_OPS))
def test_a_failpoint_set_through_a_branch_fails_the_clients_command(
        fork: Fork, upstream_client: MongoClient, name: str) -> None:
    """`failCommand` on a command the branch answers with others (a delete with finds and
    overlay writes): the client's command fails as on mongod, once, and changes nothing;
    the next one runs."""
    db = unique("fp").replace("-", "_")
    upstream_client[db].c.insert_many([{"_id": 1}, {"_id": 2}])
    info, _ = fork()
    branch: MongoClient = MongoClient(info["uri"], appname=APP)
    branch[db].c.insert_one({"_id": 3})  # a changed collection: the branch's own handling
    _fail_once(branch, name, errorCode=8)
    with pytest.raises(PyMongoError) as info:
        _PROBED_OPS[name](branch, db)
    failure = info.value.error if isinstance(info.value, ClientBulkWriteException) \
        else info.value
    assert isinstance(failure, OperationFailure) and failure.code == 8, info.value
    assert sorted(d["_id"] for d in branch[db].c.find()) == [1, 2, 3]
    _PROBED_OPS[name](branch, db)
    branch.close()
    upstream_client.drop_database(db)


def test_a_failpoints_write_concern_error_reaches_a_branch_write(
        branch_info: dict[str, Any]) -> None:
    db = unique("fpw").replace("-", "_")
    branch: MongoClient = MongoClient(branch_info["uri"], appname=APP)
    _fail_once(branch, "bulkWrite",
               writeConcernError={"code": 91, "errmsg": "Replication is being shut down"})
    with pytest.raises(ClientBulkWriteException) as info:
        branch.bulk_write([InsertOne({"_id": 1}, namespace=f"{db}.c")])
    assert info.value.write_concern_errors == [
        {"code": 91, "errmsg": "Replication is being shut down"}]
    assert list(branch[db].c.find()) == [{"_id": 1}]  # the write itself ran
    _fail_once(branch, "update", writeConcernError={"code": 91, "errmsg": "down"})
    with pytest.raises(WriteConcernError):
        branch[db].c.update_one({"_id": 1}, {"$set": {"v": 1}})
    assert list(branch[db].c.find()) == [{"_id": 1, "v": 1}]
    branch.close()


def test_a_failpoint_for_another_application_spares_a_branch_client(
        branch_info: dict[str, Any], branch: MongoClient) -> None:
    """The upstream evaluates the failpoint's appName against the client's own upstream
    connection, which the probe runs on."""
    db = unique("fpa").replace("-", "_")
    branch[db].c.insert_one({"_id": 1})
    _fail_once(branch, "delete", errorCode=8, appName="someone-else")
    with MongoClient(branch_info["uri"], appname="me") as mine:
        assert mine[db].c.delete_one({"_id": 1}).deleted_count == 1
    with MongoClient(branch_info["uri"], appname="someone-else", retryWrites=False) as theirs:
        with pytest.raises(OperationFailure) as info:
            theirs[db].c.delete_one({"_id": 2})
        assert info.value.code == 8


def test_a_find_with_an_unknown_operator_is_refused_on_a_dropped_collection(
        branch: MongoClient) -> None:
    """mongod parses the filter whatever the collection holds; SecantusDB's union over no
    documents would not: the branch answers the find's own refusal."""
    coll = branch[unique("bad").replace("-", "_")].c
    coll.insert_one({"_id": 1})
    coll.drop()
    with pytest.raises(OperationFailure) as info:
        next(coll.find_raw_batches({"x": {"$bad": 1}}))
    assert info.value.code == 2
    assert isinstance(info.value.details, dict)


def test_a_full_batch_leaves_a_branch_cursor_open_as_mongods(
        branch: MongoClient, test_proxy: ProxyProcess) -> None:
    """mongod closes a cursor only on a batch short of its size: after a full one, the
    next getMore answers an empty batch (an exhaust cursor's driver counts them)."""
    db = unique("full").replace("-", "_")
    seen: dict[str, list[Any]] = {}
    for port, client in (("main", MongoClient(test_proxy.uri)), ("branch", branch)):
        client[db].c.insert_many([{"_id": i} for i in range(3)])
        first = client[db].command({"find": "c", "batchSize": 2})
        more = client[db].command({"getMore": first["cursor"]["id"], "collection": "c",
                                   "batchSize": 1})
        last = client[db].command({"getMore": first["cursor"]["id"], "collection": "c",
                                   "batchSize": 1})
        seen[port] = [len(first["cursor"]["firstBatch"]), bool(more["cursor"]["id"]),
                      last["cursor"]["nextBatch"], last["cursor"]["id"]]
        client[db].c.drop()
    assert seen["branch"] == seen["main"] == [2, True, [], 0]


def test_fsync_on_a_branch_is_the_upstreams_and_its_lock_is_refused(
        branch: MongoClient) -> None:
    """Plain fsync flushes the upstream, the branch's collections included (pymongo's
    validate-in-the-background test runs it first); its lock would stop main's writes
    and every branch's, and a branch port refuses it with mongod's error shape."""
    db = branch[unique("fs").replace("-", "_")]
    db.c.insert_one({"_id": 1})
    assert branch.admin.command("fsync")["ok"] == 1.0
    assert db.validate_collection("c", background=True)["valid"] is True
    with pytest.raises(OperationFailure) as info:
        branch.admin.command("fsync", lock=True)
    assert info.value.code == 20 and info.value.details["codeName"] == "IllegalOperation"
    db.c.insert_one({"_id": 2})  # nothing was locked


@pytest.mark.parametrize("name", ["insert", "update", "delete"])
def test_a_failpoint_fails_a_main_port_write_while_main_has_branches(
        fork: Fork, test_proxy: ProxyProcess, name: str) -> None:
    """While main has branches the main port handles its writes itself (the branches
    keep what they forked); a failpoint on the write fails it as the upstream would,
    not as an internal error of an engine command it happened to hit."""
    fork()
    db = unique("fpm").replace("-", "_")
    ops: dict[str, Callable[[Any], Any]] = {
        "insert": lambda c: c.database.fresh.insert_one({"_id": 2}),  # creates it
        "update": lambda c: c.update_one({"_id": 1}, {"$set": {"v": 1}}),
        "delete": lambda c: c.delete_one({"_id": 1}),
    }
    with MongoClient(test_proxy.uri, retryWrites=False, appname=APP) as main:
        main[db].c.insert_one({"_id": 1})
        _fail_once(main, name, errorCode=8)
        with pytest.raises(OperationFailure) as info:
            ops[name](main[db].c)
        assert info.value.code == 8, info.value.details
        assert list(main[db].c.find()) == [{"_id": 1}]
        assert main[db].fresh.find_one() is None
        ops[name](main[db].c)
        main.drop_database(db)


def test_a_closed_connection_failpoint_cuts_a_branch_delete_as_a_main_one(
        fork: Fork, test_proxy: ProxyProcess) -> None:
    """The probe's connection is the client's own: the upstream cuts it, and the client
    sees what the main port answers a cut connection with; nothing was deleted. (A base
    document: the branch deletes it by hiding its id, with no delete command.)"""
    db = unique("fpc").replace("-", "_")
    with MongoClient(test_proxy.uri) as main:
        main[db].c.insert_one({"_id": 1})
    info, _ = fork()
    seen = {}
    for port, uri in (("branch", info["uri"]), ("main", test_proxy.uri)):
        with MongoClient(uri, appname=APP, retryWrites=False) as c:
            _fail_once(c, "delete", closeConnection=True)
            with pytest.raises(PyMongoError) as failed:
                c[db].c.delete_one({"_id": 1})
            seen[port] = (type(failed.value), getattr(failed.value, "code", None))
            assert c[db].c.find_one() == {"_id": 1}
            assert c[db].c.delete_one({"_id": 1}).deleted_count == 1
    assert seen["branch"] == seen["main"]
    with MongoClient(test_proxy.uri) as main:
        main.drop_database(db)
