"""Write semantics on a branch that the differential test cannot reach: unique
indexes across base and branch, retryable writes, error shapes, explain."""

from __future__ import annotations

import itertools
import random
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from bson import Binary, Int64
from pymongo import MongoClient
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure

from tests import rawwire
from tests.branchutil import branches
from tests.servers import ProxyProcess, Secantus

_names = itertools.count()


@pytest.fixture()
def branch(proxy: ProxyProcess, direct: MongoClient) -> Iterator[tuple[Any, Any]]:
    n = next(_names)
    db_name = f"bw_{n}"
    base = direct[db_name]
    base.people.insert_many([{"_id": i, "email": f"p{i}@x", "team": i % 3, "seat": i}
                             for i in range(10)])
    base.people.create_index("email", unique=True)
    base.people.create_index([("team", 1), ("seat", 1)], unique=True)
    status, body = proxy.api("POST", "/branches", {"name": f"bw-{n}"})
    assert status == 201, body
    client: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    yield client[db_name], base
    client.close()
    proxy.api("DELETE", f"/branches/bw-{n}")
    direct.drop_database(db_name)


def test_duplicate_id_against_base_has_mongod_shape(branch: tuple[Any, Any]) -> None:
    db, _ = branch
    with pytest.raises(DuplicateKeyError) as info:
        db.people.insert_one({"_id": 3, "email": "new@x"})
    details = info.value.details
    assert details["code"] == 11000
    assert details["keyPattern"] == {"_id": 1}
    assert details["keyValue"] == {"_id": 3}
    assert "E11000 duplicate key error collection: " in details["errmsg"]
    assert "__mb_" not in details["errmsg"]


def test_unique_secondary_index_enforced_across_base_and_branch(branch: tuple[Any, Any]
                                                                ) -> None:
    db, base = branch
    with pytest.raises(DuplicateKeyError) as info:
        db.people.insert_one({"_id": 100, "email": "p4@x"})
    assert info.value.details["keyPattern"] == {"email": 1}
    assert info.value.details["keyValue"] == {"email": "p4@x"}
    # an update that would collide is refused and changes nothing
    with pytest.raises(DuplicateKeyError):
        db.people.update_one({"_id": 1}, {"$set": {"email": "p2@x"}})
    assert db.people.find_one({"_id": 1})["email"] == "p1@x"
    # compound unique index
    with pytest.raises(DuplicateKeyError) as info:
        db.people.insert_one({"_id": 101, "email": "z@x", "team": 1, "seat": 1})
    assert info.value.details["keyPattern"] == {"team": 1, "seat": 1}
    # once the branch deletes the base document, its key is free on the branch
    db.people.delete_one({"_id": 4})
    db.people.insert_one({"_id": 102, "email": "p4@x"})
    assert db.people.count_documents({"email": "p4@x"}) == 1
    # upsert into a taken key
    with pytest.raises(DuplicateKeyError):
        db.people.update_one({"_id": 103}, {"$set": {"email": "p5@x"}}, upsert=True)
    assert db.people.find_one({"_id": 103}) is None
    # the base never changed
    assert base.people.count_documents({}) == 10
    assert base.people.find_one({"_id": 4})["email"] == "p4@x"


def test_ordered_and_unordered_bulk_error_indexes(branch: tuple[Any, Any]) -> None:
    db, _ = branch

    def person(i: int) -> dict[str, Any]:
        # unique email and seat: missing keys would collide as null on the unique indexes
        return {"_id": i, "email": f"n{i}@x", "team": 7, "seat": i}

    docs = [person(200), person(2), person(201), person(5), person(202)]
    with pytest.raises(BulkWriteError) as info:
        db.people.insert_many(docs, ordered=True)
    assert info.value.details["nInserted"] == 1
    assert [e["index"] for e in info.value.details["writeErrors"]] == [1]
    with pytest.raises(BulkWriteError) as info:
        db.people.insert_many([person(300), person(2), person(301), person(5)], ordered=False)
    assert info.value.details["nInserted"] == 2
    assert [e["index"] for e in info.value.details["writeErrors"]] == [1, 3]
    assert db.people.count_documents({"_id": {"$gte": 200}}) == 3


def test_retryable_write_applies_once(branch: tuple[Any, Any]) -> None:
    db, _ = branch
    session = db.client.start_session()
    try:
        cmd = {"update": "people", "updates": [{"q": {"_id": 7}, "u": {"$inc": {"seat": 100}}}],
               "lsid": session.session_id, "txnNumber": Int64(1)}
        first = db.command(cmd)
        again = db.command(cmd)
        assert first["nModified"] == again["nModified"] == 1
        assert db.people.find_one({"_id": 7})["seat"] == 107
    finally:
        session.end_session()


def test_explain_runs_the_rewritten_command(branch: tuple[Any, Any]) -> None:
    db, _ = branch
    db.people.update_one({"_id": 1}, {"$set": {"team": 9}})
    plan = db.command("explain", {"find": "people", "filter": {"team": 9}})
    text = repr(plan)
    assert plan["ok"] == 1.0
    # the branch's overlay is part of what really runs
    assert "__mb_" in text
    assert db.people.find_one({"team": 9})["_id"] == 1


def test_aggregate_over_a_large_overlay(proxy: ProxyProcess, direct: MongoClient) -> None:
    """More hidden ids than a $nin carries: a leading $match selecting few base documents
    narrows the exclusion to the hidden ids among them; one selecting many keeps the
    anti-join. Both answer as a plain copy does."""
    n = next(_names)
    db_name = f"bw_{n}"
    base = direct[db_name]
    base.items.insert_many([{"_id": i, "k": i, "g": i % 5} for i in range(3000)])
    base.items.create_index("k")
    status, body = proxy.api("POST", "/branches", {"name": f"bw-{n}"})
    assert status == 201, body
    client: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    try:
        db = client[db_name]
        db.items.update_many({"_id": {"$in": list(range(0, 3000, 10))}}, {"$inc": {"k": 1}})
        db.items.delete_many({"_id": {"$in": list(range(5, 3000, 30))}})
        db.items.insert_one({"_id": "new", "k": 105, "g": 0})
        want = {i: i + (1 if i % 10 == 0 else 0) for i in range(3000) if i % 30 != 5}
        want_k = {**want, "new": 105}

        def expect(lo: int, hi: int) -> list[dict[str, Any]]:
            groups: dict[int, int] = {}
            for i, k in want_k.items():
                if lo <= k < hi:
                    g = 0 if i == "new" else int(i) % 5
                    groups[g] = groups.get(g, 0) + 1
            return [{"_id": g, "n": c} for g, c in sorted(groups.items())]

        for lo, hi in ((100, 160), (0, 2500)):  # few base matches, then more than 1,000
            pipeline = [{"$match": {"k": {"$gte": lo, "$lt": hi}}},
                        {"$group": {"_id": "$g", "n": {"$sum": 1}}}, {"$sort": {"_id": 1}}]
            assert list(db.items.aggregate(pipeline)) == expect(lo, hi), (lo, hi)
            plan = str(db.command("explain", {"aggregate": "items", "pipeline": pipeline,
                                              "cursor": {}}))
            narrowed = "'$lookup'" not in plan
            assert narrowed == (hi - lo < 1000), plan[:300]
        assert base.items.count_documents({"k": {"$gte": 100, "$lt": 160}}) == 60
    finally:
        client.close()
        proxy.api("DELETE", f"/branches/bw-{n}")
        direct.drop_database(db_name)


def test_values_that_look_like_expressions_stay_values(proxy: ProxyProcess,
                                                       branch: tuple[Any, Any]) -> None:
    """Strings starting with '$' and documents with '$' keys pass through the proxy's own
    server-side steps (unique checks, distinct merging, listCollections filters) as data,
    never evaluated as field paths or operators."""
    _, base = branch
    base.people.update_one({"_id": 0}, {"$set": {"email": "$5 off"}})
    with branches(proxy) as made, made.client(made.create()) as client:
        db = client[base.name]  # a branch made after the base holds the value
        with pytest.raises(DuplicateKeyError) as info:
            db.people.insert_one({"_id": 50, "email": "$5 off", "team": 7, "seat": 1})
        assert info.value.details["keyValue"] == {"email": "$5 off"}
        db.people.update_one({"_id": 1}, {"$set": {"email": "$x"}})
        emails = db.people.distinct("email")
        assert "$5 off" in emails and "$x" in emails and len(emails) == 10
        db.create_collection("checked", validator={"n": {"$type": "int"}})
        assert db.checked.options() == {"validator": {"n": {"$type": "int"}}}


def _at_once(port: int, cmd: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The replies to one command sent on n connections at once (a barrier releases
    them together), as a driver's retries racing its first attempt would arrive."""
    replies: list[dict[str, Any]] = []
    start = threading.Barrier(n)

    def attempt() -> None:
        with rawwire.connect(port) as sock:
            start.wait()
            replies.append(rawwire.command(sock, cmd))

    threads = [threading.Thread(target=attempt) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return replies


def test_concurrent_retries_of_one_write_apply_it_once(branch: tuple[Any, Any]) -> None:
    """A driver may retry a write (same lsid and txnNumber) on a new connection while its
    first attempt is still running on the proxy: every attempt gets the same outcome and
    the write is applied once."""
    db, _ = branch
    port = db.client.address[1]
    cmd = {"update": "people", "updates": [{"q": {"_id": 7}, "u": {"$inc": {"seat": 100}}}],
           "ordered": True, "lsid": {"id": Binary(uuid.uuid4().bytes, 4)},
           "txnNumber": Int64(1), "$db": db.name}
    replies = _at_once(port, cmd, 8)
    assert [r.get("nModified") for r in replies] == [1] * 8, replies
    assert db.people.find_one({"_id": 7})["seat"] == 107


def test_concurrent_retries_of_one_client_bulk_write_apply_each_op_once(
        branch: tuple[Any, Any]) -> None:
    """Attempts of one client bulkWrite (same lsid and txnNumber) on several connections
    at once run one at a time: each later one finds every op's outcome recorded, so all
    answer alike and each insert and `$inc` lands once."""
    db, _ = branch
    port = db.client.address[1]
    cmd = {"bulkWrite": 1, "ops": [
        {"insert": 0, "document": {"_id": 100, "email": "n100@x", "team": 7, "seat": 0}},
        {"insert": 0, "document": {"_id": 101, "email": "n101@x", "team": 7, "seat": 1}},
        {"update": 0, "filter": {"_id": 7}, "updateMods": {"$inc": {"seat": 100}}},
        {"update": 0, "filter": {"_id": 101}, "updateMods": {"$inc": {"seat": 10}}},
    ], "nsInfo": [{"ns": f"{db.name}.people"}], "lsid": {"id": Binary(uuid.uuid4().bytes, 4)},
        "txnNumber": Int64(1), "$db": "admin"}
    replies = _at_once(port, cmd, 8)
    answers = [(r.get("nErrors"), r.get("nInserted"), r.get("nModified"),
                r["cursor"]["firstBatch"]) for r in replies]
    assert answers == [answers[0]] * 8 and len(answers) == 8, replies
    assert answers[0][:3] == (0, 2, 2), replies[0]
    assert db.people.find_one({"_id": 7})["seat"] == 107
    assert db.people.find_one({"_id": 101})["seat"] == 11


def test_a_partial_unique_index_is_enforced_across_base_and_branch(
        proxy: ProxyProcess, direct: MongoClient) -> None:
    """Only the documents the index's filter selects collide, on either side: the same
    writes on the branch and on a plain copy succeed and fail alike."""
    n = next(_names)
    names = (f"bwp_{n}", f"bwp_{n}_copy")
    for name in names:
        direct[name].badges.insert_many([{"_id": 1, "code": "A", "active": True},
                                         {"_id": 2, "code": "B", "active": False},
                                         {"_id": 3, "code": "C", "active": True}])
        direct[name].badges.create_index("code", unique=True,
                                         partialFilterExpression={"active": True})
    status, body = proxy.api("POST", "/branches", {"name": f"bwp-{n}"})
    assert status == 201, body
    client: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    try:
        writes: list[tuple[str, Any]] = [
            ("insert", {"_id": 10, "code": "A", "active": True}),    # taken in the base
            ("insert", {"_id": 11, "code": "A", "active": False}),   # outside the index
            ("insert", {"_id": 12, "code": "B", "active": True}),    # base's B is outside
            ("update", (2, {"active": True})),                        # now B twice
            ("update", (3, {"active": False})),                       # frees C
            ("insert", {"_id": 13, "code": "C", "active": True}),
            ("update", (11, {"active": True})),                       # A twice
        ]

        def outcomes(db: Any) -> list[Any]:
            got = []
            for kind, arg in writes:
                try:
                    if kind == "insert":
                        db.badges.insert_one(arg)
                    else:
                        db.badges.update_one({"_id": arg[0]}, {"$set": arg[1]})
                    got.append("ok")
                except DuplicateKeyError as exc:
                    got.append((exc.code, exc.details.get("keyValue")))
            return got

        on_branch, on_copy = outcomes(client[names[0]]), outcomes(direct[names[1]])
        assert on_branch == on_copy
        assert on_branch == [(11000, {"code": "A"}), "ok", "ok", (11000, {"code": "B"}), "ok",
                             "ok", (11000, {"code": "A"})]
        assert list(client[names[0]].badges.find().sort("_id")) == \
            list(direct[names[1]].badges.find().sort("_id"))
    finally:
        client.close()
        proxy.api("DELETE", f"/branches/bwp-{n}")
        for name in names:
            direct.drop_database(name)


def test_a_maximum_size_bulk_insert(proxy: ProxyProcess, direct: MongoClient) -> None:
    """pymongo's test_bulk_max_message_size on a branch: one 48 MB batch (three documents
    near 16 MB, then small ones) comes in one message; the overlay's inserts stay under
    the upstream's 16 MB command limit, so the batch lands whole (it used to be sent on
    as one command the upstream refused, and the client was left waiting)."""
    n = next(_names)
    status, body = proxy.api("POST", "/branches", {"name": f"bw-max-{n}"})
    assert status == 201, body
    mb16 = 16 * 1000 * 1000
    docs: list[dict[str, Any]] = [{"_id": 1, "l": "s" * mb16}, {"_id": 2, "l": "s" * mb16},
                                  {"_id": 3, "l": "s" * (mb16 - 10000)}]
    docs += [{"_id": i} for i in range(4, 2000)]
    client: MongoClient = MongoClient(body["uri"],  # type: ignore[index]
                                      socketTimeoutMS=300_000)
    try:
        coll = client[f"bw_max_{n}"].c
        assert len(coll.insert_many(docs).inserted_ids) == len(docs)
        assert coll.count_documents({}) == len(docs)
        assert len(coll.find_one({"_id": 2})["l"]) == mb16
        assert direct[f"bw_max_{n}"].c.count_documents({}) == 0  # the base is never written
    finally:
        client.close()
        proxy.api("DELETE", f"/branches/bw-max-{n}")
        direct.drop_database(f"bw_max_{n}")


def test_a_write_of_several_batches_is_logged_whole_and_in_order(
        proxy: ProxyProcess, direct: MongoClient) -> None:
    """A branch write of several batches logs one batch while it writes the next
    (overlay.Writer.flush): when its reply arrives, every changed document has its WAL
    entry, and the entries follow the write's order (inserts in document order, each
    document's insert before its update and its delete)."""
    n = next(_names)
    status, body = proxy.api("POST", "/branches", {"name": f"bw-batches-{n}"})
    assert status == 201, body
    db_name = f"bw_batches_{n}"
    ns = f"{db_name}.c"
    wal = direct[proxy.meta_db or "mongobranch"]["wal"]
    count = 2500  # three batches of the writer (BATCH = 1,000)
    order = list(range(count))
    random.Random(n).shuffle(order)
    client: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    try:
        coll = client[db_name].c
        coll.insert_many([{"_id": i, "v": 0} for i in order])
        entries = list(wal.find({"ns": ns}).sort("_id", 1))
        # The collection is new on the branch: its own from the first write on (`own`).
        assert [(e["id"], e["op"]) for e in entries] == \
            [(None, "own")] + [(i, "put") for i in order]
        coll.update_many({}, {"$inc": {"v": 1}})
        coll.delete_many({})
        entries = list(wal.find({"ns": ns, "op": {"$ne": "own"}}).sort("_id", 1))
        assert len(entries) == 3 * count
        seen: dict[int, list[str]] = {}
        for e in entries:
            seen.setdefault(e["id"], []).append(
                "insert" if e["op"] == "put" and e.get("pre") is None
                else "update" if e["op"] == "put" else e["op"])
        assert seen == {i: ["insert", "update", "delete"] for i in order}
        assert coll.count_documents({}) == 0
    finally:
        client.close()
        proxy.api("DELETE", f"/branches/bw-batches-{n}")
        direct.drop_database(db_name)


@pytest.fixture(scope="module")
def failing() -> Iterator[tuple[ProxyProcess, MongoClient]]:
    """A proxy on an upstream of its own with mongod's test commands (failpoints), and
    that upstream's direct client: the tests below make the WAL refuse entries."""
    server = Secantus(extra=["--enable-test-commands"]).start()
    proxy = ProxyProcess(server.uri, meta_db="mb_failing")
    direct: MongoClient = MongoClient(server.uri, directConnection=True)
    try:
        proxy.start()
        yield proxy, direct
    finally:
        direct.close()
        proxy.stop()
        server.stop()


@pytest.mark.parametrize("op", ["insert", "update"])
def test_a_write_failing_after_its_first_batch_reports_its_own_error(
        failing: tuple[ProxyProcess, MongoClient], op: str) -> None:
    """A branch write of two batches (overlay.BATCH = 1,000) whose first batch's WAL
    append fails (the WAL refuses its entries: a validator the test sets on it) while the
    second batch's overlay write fails too (a failpoint on the client's second overlay
    insert: for an insert the documents, for an update the copy-up of the documents it
    changes). The client gets the write's own error, not the append's, which the proxy
    logs. The insert's overlay error comes back as a reply, the update's as an
    exception (overlay.Writer.check): both ways of failing are covered."""
    proxy, direct = failing
    name = f"bw-own-{op}"
    status, body = proxy.api("POST", "/branches", {"name": name})
    assert status == 201, body
    db_name = f"bw_own_{op}"
    docs = [{"_id": i, "refused": True} for i in range(1500)]
    if op == "update":
        direct[db_name].c.insert_many(docs)
    app = f"bw-own-{op}"
    meta = direct["mb_failing"]
    client: MongoClient = MongoClient(body["uri"], appname=app)  # type: ignore[index]
    try:
        meta.command("collMod", "wal", validator={"post.refused": {"$exists": False}})
        direct.admin.command("configureFailPoint", "failCommand", mode={"skip": 1, "times": 1},
                             data={"failCommands": ["insert"], "appName": app,
                                   "errorCode": 2, "errorLabels": []})
        cmd: dict[str, Any] = (
            {"insert": "c", "documents": docs} if op == "insert" else
            {"update": "c", "updates": [{"q": {}, "u": {"$inc": {"v": 1}}, "multi": True}]})
        with pytest.raises(OperationFailure) as failed:
            client[db_name].command(cmd)
        assert failed.value.code == 2, failed.value.details
        assert "failCommand" in str(failed.value.details), failed.value.details
        log = proxy.read_log()
        assert f"branch {name}: the WAL append of an earlier batch of a write on " \
               f"{db_name}.c failed" in log
        assert "Document failed validation" in log.partition(f"branch {name}: the WAL")[2]
        # The branch's write lock is free again: with the WAL taking entries, a write runs.
        meta.command("collMod", "wal", validator={})
        client[db_name].d.insert_one({"_id": "after"})
        assert client[db_name].d.find_one() == {"_id": "after"}
    finally:
        direct.admin.command("configureFailPoint", "failCommand", mode="off")
        meta.command("collMod", "wal", validator={})
        client.close()
        proxy.api("DELETE", f"/branches/{name}")
        direct.drop_database(db_name)
