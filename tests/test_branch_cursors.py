"""Cursor kinds and read options on a branch port, each against the main port.

Differential: one collection seeded on main, a branch forked from it, then the same
writes on both ports (the branch's snapshot does not see main's), so that both show
the same documents while the branch's collection is changed (an overlay over the base).
The same read on both ports must give the same documents. Exhaust streams are also
checked frame by frame over a raw socket (flag bits, responseTo chain, cursor ids).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from bson.int64 import Int64
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.timestamp import Timestamp
from pymongo import CursorType, MongoClient
from pymongo.database import Database
from pymongo.errors import OperationFailure

from tests import rawwire
from tests.branchutil import Branches
from tests.servers import ProxyProcess

MORE_TO_COME = 1 << 1
EXHAUST_ALLOWED = 1 << 16
N = 40


def _doc(i: int) -> dict[str, Any]:
    return {"_id": i, "k": i % 9, "arr": [i % 5, (i + 1) % 5, {"x": i % 3}, i],
            "sub": {"n": i, "tags": ["a", f"t{i % 4}"]}}


def _write(db: Database) -> None:
    """The same writes on both ports: an update, a delete and inserts."""
    db.c.update_many({"_id": {"$in": [3, 10, 17]}}, {"$set": {"k": 100}, "$push": {"arr": 7}})
    db.c.delete_many({"_id": {"$in": [5, 21]}})
    db.c.insert_many([{**_doc(i), "_id": 1000 + i} for i in range(6)])


@dataclass
class Pair:
    main: Database
    branch: Database
    port: int  # the branch's port
    main_port: int
    db: str
    uri: str  # the branch's


@pytest.fixture()
def pair(proxy: ProxyProcess, made: Branches, client: MongoClient,
         db_name: str) -> Iterator[Pair]:
    main = client[db_name]
    main.c.insert_many([_doc(i) for i in range(N)])
    main.c.create_index("k")
    main.u.insert_many([_doc(i) for i in range(N)])  # never written again: unchanged
    info = made.create()
    bclient = made.client(info)
    branch = bclient[db_name]
    _write(main)
    _write(branch)
    port = int(str(info["uri"]).rsplit(":", 1)[1].split("/", 1)[0])
    main_port = int(proxy.uri.rsplit(":", 1)[1].split("/", 1)[0])
    yield Pair(main, branch, port, main_port, db_name, str(info["uri"]))
    bclient.close()


# -- exhaust ------------------------------------------------------------------------------

def _read(sock: socket.socket) -> tuple[int, int, int, dict[str, Any]]:
    """(requestId, responseTo, flagBits, body) of the next OP_MSG."""
    length, request_id, response_to, op_code = rawwire.HEADER.unpack(
        rawwire.recv_exact(sock, rawwire.HEADER.size))
    payload = rawwire.recv_exact(sock, length - rawwire.HEADER.size)
    assert op_code == rawwire.OP_MSG
    (flags,) = struct.unpack_from("<I", payload, 0)
    return request_id, response_to, flags, rawwire.msg_reply(payload)


def _exhaust(port: int, db: str, batch: int, coll: str = "c",
             ) -> tuple[list[Any], list[tuple[int, bool, Any]]]:
    """A find, then one exhaust getMore, on a raw socket: the documents and, per reply
    to the getMore, (flag bits, whether it answers the message before it, cursor id)."""
    with rawwire.connect(port) as sock:
        first = rawwire.command(sock, {"find": coll, "sort": {"_id": 1}, "batchSize": batch,
                                       "$db": db})
        assert first["ok"] == 1.0, first
        docs = list(first["cursor"]["firstBatch"])
        cursor_id = first["cursor"]["id"]
        assert isinstance(cursor_id, Int64) and cursor_id
        sock.sendall(rawwire.op_msg({"getMore": cursor_id, "collection": coll,
                                     "batchSize": batch, "$db": db},
                                    flags=EXHAUST_ALLOWED, request_id=7))
        previous, frames = 7, []
        while True:
            request_id, response_to, flags, body = _read(sock)
            assert body["ok"] == 1.0, body
            frames.append((flags, response_to == previous, body["cursor"]["id"]))
            docs += body["cursor"]["nextBatch"]
            previous = request_id
            if not flags & MORE_TO_COME:
                break
        # The connection still serves requests once the stream ended.
        assert rawwire.command(sock, {"ping": 1, "$db": "admin"}, request_id=99)["ok"] == 1.0
    return docs, frames


def test_exhaust_getmore_streams_moretocome_replies_until_the_cursor_ends(pair: Pair) -> None:
    expected = list(pair.main.c.find().sort("_id", 1))
    docs, frames = _exhaust(pair.port, pair.db, 4)
    assert docs == expected
    # mongod: every reply but the last flagged moreToCome, each answering the one before
    # it, the cursor id an int64 throughout and 0 on the last, which is empty when the
    # one before it was full (as many replies as the main port's).
    assert len(expected) % 4 == 0
    assert len(frames) == len(_exhaust(pair.main_port, pair.db, 4)[1]) == \
        (len(expected) - 4) // 4 + 1
    assert all(flags == MORE_TO_COME for flags, _, _ in frames[:-1])
    assert frames[-1][0] == 0
    assert all(chained for _, chained, _ in frames)
    assert all(isinstance(cid, Int64) and cid for _, _, cid in frames[:-1])
    assert isinstance(frames[-1][2], Int64) and frames[-1][2] == 0


def test_exhaust_cursor_from_pymongo_gives_mains_documents(pair: Pair) -> None:
    for batch in (1, 3, 1000):
        expected = list(pair.main.c.find({"k": {"$lt": 100}}).sort("_id", 1))
        got = list(pair.branch.c.find({"k": {"$lt": 100}}, cursor_type=CursorType.EXHAUST,
                                      batch_size=batch).sort("_id", 1))
        assert got == expected
        assert got == list(pair.main.c.find({"k": {"$lt": 100}},
                                            cursor_type=CursorType.EXHAUST,
                                            batch_size=batch).sort("_id", 1))


def test_exhaust_stream_of_an_unchanged_collection_matches_the_main_ports(pair: Pair) -> None:
    """Not changed on the branch: its cursor is the upstream's, and so is the stream."""
    docs, frames = _exhaust(pair.port, pair.db, 7, "u")
    assert docs == list(pair.main.u.find().sort("_id", 1))
    main_docs, main_frames = _exhaust(pair.main_port, pair.db, 7, "u")
    assert docs == main_docs
    assert [flags for flags, _, _ in frames] == [flags for flags, _, _ in main_frames]


# -- tailable / awaitData -------------------------------------------------------------------

def _try_next(cursor: Any) -> Any:
    """The next document of a tailable cursor; None on an empty batch (it stays alive)."""
    try:
        return next(cursor)
    except StopIteration:
        return None


def _tail(db: Database, coll: str, writer: Database) -> list[list[Any]]:
    """What a tailable awaitData cursor returns: its first documents, an empty batch (it
    waits at most maxAwaitTimeMS and stays open), then a document inserted after."""
    cursor = db[coll].find(cursor_type=CursorType.TAILABLE_AWAIT).max_await_time_ms(50)
    seen = [[doc["_id"] for doc in (next(cursor), next(cursor), next(cursor))]]
    assert _try_next(cursor) is None and cursor.alive
    writer[coll].insert_one({"_id": 3})
    got = _try_next(cursor)
    while got is None and cursor.alive:  # an await can end just before the insert lands
        got = _try_next(cursor)
    assert got is not None
    seen.append([got["_id"]])
    cursor.close()
    return seen


@pytest.fixture()
def capped(pair: Pair) -> Iterator[tuple[Database, Database]]:
    """A capped collection made on each port after the fork: the branch's own."""
    for db in (pair.main, pair.branch):
        db.create_collection("cap", capped=True, size=1 << 16)
        db.cap.insert_many([{"_id": i} for i in range(3)])
    # A bounded socket: a getMore that never answers fails the test instead of hanging it.
    with MongoClient(pair.uri, socketTimeoutMS=30000) as bounded:
        yield pair.main, bounded[pair.db]


def test_tailable_await_cursor_on_a_capped_collection_made_on_the_branch(
        capped: tuple[Database, Database]) -> None:
    main, branch = capped
    assert _tail(branch, "cap", branch) == _tail(main, "cap", main) == [[0, 1, 2], [3]]


def test_tailable_cursor_on_an_unchanged_capped_collection(
        pair: Pair, proxy: ProxyProcess, made: Branches) -> None:
    """Made on main before the fork and not written on the branch: the upstream's cursor."""
    pair.main.create_collection("old", capped=True, size=1 << 16)
    pair.main.old.insert_many([{"_id": i} for i in range(3)])
    info = made.create()
    with MongoClient(info["uri"], socketTimeoutMS=30000) as bounded:
        cursor = bounded[pair.db].old.find(cursor_type=CursorType.TAILABLE_AWAIT)
        assert [d["_id"] for d in cursor.max_await_time_ms(50)] == [0, 1, 2]
        assert cursor.alive
        cursor.close()


def test_tailable_cursor_on_non_capped_collections_is_mongods_bad_value(pair: Pair) -> None:
    pair.branch.create_collection("plain")  # the branch's own
    pair.main.create_collection("plain")
    for coll in ("c", "plain"):  # changed on the branch; made on it
        errors = []
        for db in (pair.main, pair.branch):
            with pytest.raises(OperationFailure) as info:
                db[coll].find_one(cursor_type=CursorType.TAILABLE)
            errors.append((info.value.code, info.value.details["codeName"],
                           f"{pair.db}.{coll}" in str(info.value.details["errmsg"])))
        assert errors[0] == errors[1] == (2, "BadValue", True)


@pytest.mark.parametrize("coll", ["cap", "c"], ids=["capped", "not-capped"])
def test_tailable_cursor_in_a_transaction_is_mongods_invalid_options(
        capped: tuple[Database, Database], coll: str) -> None:
    """mongod refuses a tailable cursor in a multi-document transaction before it looks
    at the collection (InvalidOptions, jstests/core/txns/ban_tailable_cursor.js); the
    branch does the same, on its own capped collection as on one it changed. (Against
    mongod's documented answer, not main's port: SecantusDB opens the cursor.)"""
    _, branch = capped
    with branch.client.start_session() as session:
        session.start_transaction()
        branch.c.insert_one({"_id": 99}, session=session)  # (no write of a capped one)
        with pytest.raises(OperationFailure) as refused:
            branch.command("find", coll, tailable=True, awaitData=True, session=session)
        assert refused.value.code == 72
        assert "tailable cursor in a transaction" in str(refused.value)
        session.abort_transaction()
    assert branch.c.find_one({"_id": 99}) is None


def test_a_branch_takes_a_capped_collection_whole_on_its_first_write(
        pair: Pair, made: Branches) -> None:
    """An overlay beside a capped base keeps neither its insertion order nor its size:
    on its first write the branch copies the collection whole into a capped collection
    of its own, so the upstream orders, evicts and tails it as mongod does. The same
    writes on a capped copy made on main give the same documents in the same order."""
    for name in ("log", "twin"):
        pair.main.create_collection(name, capped=True, size=1 << 16, max=5)
        pair.main[name].insert_many([{"_id": i, "v": i} for i in range(5)])
    info = made.create()

    def writes(coll: Any) -> None:
        coll.insert_one({"_id": 9, "v": 9})  # evicts the oldest, 0
        coll.update_one({"_id": 3}, {"$set": {"v": "three"}})  # keeps its place

    with MongoClient(info["uri"], socketTimeoutMS=30000) as bclient:
        log = bclient[pair.db].log
        writes(log)
        writes(pair.main.twin)
        expected = list(pair.main.twin.find())
        assert [d["_id"] for d in expected] == [1, 2, 3, 4, 9]
        assert list(log.find()) == expected
        # (SecantusDB answers `$natural: -1` in insertion order, on either port.)
        assert list(log.find().sort("$natural", -1)) \
            == list(pair.main.twin.find().sort("$natural", -1))
        assert log.count_documents({}) == 5
        assert [d["_id"] for d in pair.main.log.find()] == [0, 1, 2, 3, 4]  # main's own
        # Tailable awaitData: the branch's documents, then its next insert.
        cursor = log.find(cursor_type=CursorType.TAILABLE_AWAIT).max_await_time_ms(50)
        assert [next(cursor)["_id"] for _ in range(5)] == [1, 2, 3, 4, 9]
        assert _try_next(cursor) is None and cursor.alive
        log.insert_one({"_id": 10})
        got = _try_next(cursor)
        while got is None and cursor.alive:  # an await can end just before the insert
            got = _try_next(cursor)
        assert got == {"_id": 10}
        cursor.close()
        assert [d["_id"] for d in log.find()] == [2, 3, 4, 9, 10]
        options = bclient[pair.db].log.options()
        assert options.get("capped") is True and options.get("max") == 5, options
    # A child of the branch takes the branch's own copy whole in turn.
    kid = made.create(**{"from": info["name"]})
    with MongoClient(kid["uri"], socketTimeoutMS=30000) as kclient:
        klog = kclient[pair.db].log
        klog.insert_one({"_id": 11})
        assert [d["_id"] for d in klog.find()] == [3, 4, 9, 10, 11]
        cursor = klog.find(cursor_type=CursorType.TAILABLE)
        assert [d["_id"] for d in cursor] == [3, 4, 9, 10, 11]
    with MongoClient(info["uri"]) as bclient:
        assert [d["_id"] for d in bclient[pair.db].log.find()] == [2, 3, 4, 9, 10]


# -- snapshot reads ---------------------------------------------------------------------------

_SNAPSHOT = {"level": "snapshot"}


def test_snapshot_reads_carry_at_cluster_time_and_mains_documents(pair: Pair) -> None:
    """find, aggregate and distinct with readConcern snapshot: the reply says at which
    cluster time it read (cursor.atClusterTime; distinct's at the top), as mongod's."""
    for batch in (2, 1000):
        results = []
        for db in (pair.main, pair.branch):
            found = db.command("find", "c", filter={"k": {"$lt": 100}}, sort={"_id": 1},
                               batchSize=batch, readConcern=_SNAPSHOT)
            agg = db.command("aggregate", "c", pipeline=[{"$sort": {"_id": -1}}],
                             cursor={"batchSize": batch}, readConcern=_SNAPSHOT)
            distinct = db.command("distinct", "c", key="sub.tags", readConcern=_SNAPSHOT)
            for cursor in (found["cursor"], agg["cursor"]):
                assert isinstance(cursor.get("atClusterTime"), Timestamp), cursor
            assert isinstance(distinct.get("atClusterTime"), Timestamp), distinct
            results.append((found["cursor"]["firstBatch"], agg["cursor"]["firstBatch"],
                            sorted(distinct["values"])))
        assert results[0] == results[1]


def test_snapshot_session_reads_mains_documents(pair: Pair) -> None:
    """pymongo's snapshot session: its first read's atClusterTime pins the later ones."""
    out = []
    for db in (pair.main, pair.branch):
        with db.client.start_session(snapshot=True) as session:
            docs = list(db.c.find({}, session=session).sort("_id", 1))
            assert session._snapshot_time is not None  # read from the first reply
            out.append((docs,
                        list(db.c.aggregate([{"$match": {"k": {"$gte": 2}}},
                                             {"$sort": {"_id": 1}}], session=session)),
                        sorted(db.c.distinct("k", session=session))))
    assert out[0] == out[1]


def test_snapshot_read_at_cluster_time_is_merged_at_that_time(pair: Pair) -> None:
    """With atClusterTime, the merged sides read at it: the reply says so."""
    at = pair.branch.command("find", "c", limit=1, readConcern=_SNAPSHOT)["cursor"][
        "atClusterTime"]
    reply = pair.branch.command("find", "c", sort={"_id": 1}, batchSize=3,
                                readConcern={**_SNAPSHOT, "atClusterTime": at})
    assert reply["cursor"]["atClusterTime"] == at


@pytest.mark.secantus_gap(reason="SecantusDB reads the latest data at any atClusterTime "
                                 "(mongod reads the snapshot at that time)")
def test_snapshot_session_does_not_see_later_writes(pair: Pair) -> None:
    """On the main port first: an upstream that does not keep snapshots (SecantusDB)
    cannot give a branch one either, and the test says so by skipping."""
    for db in (pair.main, pair.branch):
        with db.client.start_session(snapshot=True) as session:
            before = list(db.c.find({}, session=session).sort("_id", 1))
            db.c.insert_one({"_id": 5000 if db is pair.main else 5001})
            db.c.update_one({"_id": 0}, {"$inc": {"k": -1}})
            after = list(db.c.find({}, session=session).sort("_id", 1))
            if db is pair.main and after != before:
                pytest.skip("the upstream reads the latest data at any atClusterTime "
                            "(SecantusDB): snapshot reads cannot be exact through it")
            assert after == before
            assert not {5000, 5001} & set(db.c.distinct("_id", session=session))


# -- find-only projections and options where the find cannot be merged ----------------------

_EN = {"locale": "en"}
# Each cannot be merged (a projection dropping _id, a collation ordering the sort): the
# server-side union answers, and only a find evaluates these projections.
_FIND_ONLY: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ({"arr": 2}, {"arr.$": 1, "_id": 0}, {}),
    ({"k": {"$lt": 100}}, {"arr": {"$elemMatch": {"x": 1}}, "_id": 0}, {"skip": 2}),
    ({}, {"arr": {"$slice": [1, 2]}, "sub.tags": {"$slice": -1}}, {"collation": _EN}),
    ({"arr": {"$gte": 3}}, {"arr.$": 1, "k": 1}, {"collation": _EN, "limit": 9}),
    ({}, {"arr": {"$slice": 1}, "k": 0, "_id": 0}, {"limit": -4}),
]


@pytest.mark.parametrize("case", range(len(_FIND_ONLY)))
def test_find_only_projections_on_a_changed_collection_give_mains_documents(
        pair: Pair, case: int) -> None:
    filt, projection, options = _FIND_ONLY[case]
    sort = {"_id": -1} if "collation" in options or "_id" in projection else {"sub.n": 1}
    # A negative limit is one batch: SecantusDB's holds the whole limit, whatever batchSize.
    for batch in (2, 101) if options.get("limit", 0) >= 0 else (101,):
        got = []
        for db in (pair.main, pair.branch):
            cursor = db.c.find(filt, projection, batch_size=batch, **{
                k: v for k, v in options.items() if k != "collation"}).sort(list(sort.items()))
            if "collation" in options:
                cursor = cursor.collation(options["collation"])
            got.append(list(cursor))
        assert got[0] == got[1]
        assert got[0]


def test_show_record_id_on_a_changed_collection(pair: Pair) -> None:
    """Each document gets its `$recordId`: the record's id in the collection that holds it
    on the branch (base or overlay), as mongod's names the record in its collection."""
    got = []
    for db in (pair.main, pair.branch):
        docs = list(db.c.find({"k": {"$lt": 100}}, {"_id": 0, "sub": 0}, show_record_id=True)
                    .sort("arr", 1).collation(_EN))
        assert all("$recordId" in d for d in docs)
        got.append([{k: v for k, v in d.items() if k != "$recordId"} for d in docs])
    assert got[0] == got[1]


@pytest.mark.parametrize("hint", [{"k": 1}, "k_1"], ids=["pattern", "name"])
@pytest.mark.parametrize("options", [
    {"min": {"k": 2}, "max": {"k": 6}},
    {"min": {"k": 4}},
    {"max": {"k": 3}, "sort": {"k": -1}, "skip": 2, "limit": 9},
    {"min": {"k": 1}, "max": {"k": 100}, "batchSize": 4, "filter": {"arr": {"$lt": 3}}},
], ids=["min-max", "min", "max-sorted-skip-limit", "filtered-batches"])
def test_min_and_max_on_a_changed_collection(pair: Pair, hint: Any,
                                            options: dict[str, Any]) -> None:
    """Each of base and overlay scans its own copy of the hinted index within the bounds
    (the branch's updated and deleted documents are in the overlay and hidden), merged in
    the index's key order: the same documents as main's, in the same key order."""
    got = []
    for db in (pair.main, pair.branch):
        docs = list(db.c.find(
            options.get("filter", {}), hint=hint, min=options.get("min"),
            max=options.get("max"), skip=options.get("skip", 0),
            limit=options.get("limit", 0), batch_size=options.get("batchSize", 0),
            sort=list(options.get("sort", {}).items()) or None))
        got.append(docs)
    assert got[0], "bounds that select nothing test nothing"
    assert [d["k"] for d in got[0]] == [d["k"] for d in got[1]]
    if "limit" not in options:
        assert sorted(got[0], key=lambda d: d["_id"]) == sorted(got[1], key=lambda d: d["_id"])
    ids = {d["_id"] for d in got[1]}
    assert not ids & {5, 21}
    assert ids & {3, 10, 17, 1000, 1001, 1002, 1003, 1004, 1005} or "max" in options


def _return_keys(db: Any, options: dict[str, Any]) -> list[dict[str, Any]]:
    """A returnKey find's keys, every batch of it."""
    reply = db.command("find", "c", returnKey=True, **options)
    docs = list(reply["cursor"]["firstBatch"])
    cursor_id = reply["cursor"]["id"]
    while cursor_id:
        more = db.command("getMore", cursor_id, collection="c", batchSize=5)
        docs += more["cursor"]["nextBatch"]
        cursor_id = more["cursor"]["id"]
    return docs


@pytest.mark.parametrize("options", [
    {"hint": {"k": 1}},
    {"hint": "k_1", "min": {"k": 3}, "max": {"k": 100}, "batchSize": 5},
    {"hint": {"k": 1}, "sort": {"k": -1}, "limit": 7, "filter": {"_id": {"$gte": 10}}},
], ids=["all", "bounded", "sorted-limit"])
def test_return_key_on_a_changed_collection(pair: Pair, options: dict[str, Any]) -> None:
    """Each side reads its documents' _id (to drop the hidden) and the index key its
    server computed ({$meta: "indexKey"}); the client gets the keys, in index order."""
    got = [_return_keys(db, options) for db in (pair.main, pair.branch)]
    assert got[0] and all(list(d) == ["k"] for d in got[0])
    assert got[0] == got[1]


def _by_key(docs: list[dict[str, Any]]) -> list[tuple[Any, list[str]]]:
    """Documents in their merge order, each run of one index key as a multiset (the order
    of documents with equal keys is the order of their records, which main's collection
    and a branch's base and overlay do not share); repr keeps each one's field order."""
    runs: list[tuple[Any, list[str]]] = []
    for doc in docs:
        if not runs or runs[-1][0] != doc["k"]:
            runs.append((doc["k"], []))
        runs[-1][1].append(repr(doc))
    return [(k, sorted(reprs)) for k, reprs in runs]


@pytest.mark.parametrize("projection", [
    {"_id": 0, "k": 1, "sub.n": 1},
    {"k": 1, "_id": 0, "x": {"$add": ["$sub.n", 1]}, "arr": {"$slice": 2}},
    {"_id": 0},
    {"sub": 0, "_id": 0, "arr": 0},
    {"sub": 0},
    {"_id": {"$mod": ["$sub.n", 7]}, "k": 1, "n": "$sub.n"},
    {"_id.x": 0, "sub": 0},
], ids=["inclusion", "computed", "only-id", "exclusion", "exclusion-keeps-id", "computed-id",
        "id-field-excluded"])
@pytest.mark.parametrize("options", [
    {"min": {"k": 2}, "max": {"k": 100}},
    {"max": {"k": 101}, "sort": {"k": -1}, "batchSize": 3},
], ids=["bounds", "sorted-batches"])
def test_min_max_with_a_projection_leaving_id_out(pair: Pair, projection: dict[str, Any],
                                                  options: dict[str, Any]) -> None:
    """Each side reads the real _id beside the user's projection (to drop the ids the
    branch hides) and the client gets the documents as mongod's projection shapes them:
    the same as main's, each key's documents with the same values and field order. (An
    exclusion of _id's own fields cannot read it beside them: that find runs on a copy.)"""
    got = []
    for db in (pair.main, pair.branch):
        got.append(list(db.c.find(
            {}, projection, hint=[("k", 1)], min=options.get("min"), max=options.get("max"),
            batch_size=options.get("batchSize", 0),
            sort=list(options.get("sort", {}).items()) or None)))
    assert got[0], "bounds that select nothing test nothing"
    if projection.get("_id") == 0:
        assert all("_id" not in d for d in got[1])
    assert _by_key(got[0]) == _by_key(got[1])


def test_merged_find_with_a_computed_id(pair: Pair) -> None:
    """A projection that computes _id: the sides read the real one beside it, so the
    branch's updated and deleted documents' base copies are still dropped."""
    projection = {"_id": {"$mod": ["$sub.n", 7]}, "k": 1, "n": "$sub.n"}
    got = [list(db.c.find({"k": {"$lt": 200}}, projection, batch_size=4)
                .sort([("n", -1), ("k", 1)]))
           for db in (pair.main, pair.branch)]
    assert got[0] == got[1] and len(got[0]) == N + 4


def test_index_bound_finds_refused_as_mongod_refuses_them(pair: Pair) -> None:
    """min/max without a hint: the upstream's own refusal, as on main."""
    with pytest.raises(OperationFailure) as on_main:
        pair.main.command("find", "c", min={"k": 2})
    with pytest.raises(OperationFailure) as on_branch:
        pair.branch.command("find", "c", min={"k": 2})
    assert on_branch.value.code == on_main.value.code
    assert on_branch.value.details["errmsg"] == on_main.value.details["errmsg"]


def _scratch_copies(direct: MongoClient, db: str) -> list[str]:
    return [name for name in direct[db].list_collection_names()
            if name.startswith("__mb_") and "_g_" in name]


@pytest.mark.parametrize("hint", [{"k": 1, "_id": -1}, "k_1__id_-1"], ids=["pattern", "name"])
def test_min_max_and_return_key_on_an_index_made_on_the_branch(
        pair: Pair, direct: MongoClient, hint: Any) -> None:
    """The base has no copy of an index the branch made: the branch view is copied
    server-side with that index and the find runs on the copy, which is dropped when its
    cursor ends. The same answer as main's once main has the index too."""
    def read(db: Database) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        docs = list(db.c.find({"arr": {"$ne": 4}}, {"_id": 0, "sub": 1, "k": 1}, hint=hint,
                              min={"k": 2, "_id": MaxKey()}, max={"k": 100, "_id": MaxKey()},
                              batch_size=4))
        keys = _return_keys(db, {"hint": hint, "max": {"k": 3, "_id": MinKey()},
                                 "batchSize": 3})
        return docs, keys

    pair.branch.c.create_index([("k", 1), ("_id", -1)])
    on_branch = read(pair.branch)
    assert not _scratch_copies(direct, pair.db)
    pair.main.c.create_index([("k", 1), ("_id", -1)])
    on_main = read(pair.main)
    assert on_main[0] and on_main[1]
    assert on_main == on_branch
    assert all(list(d) == ["k", "_id"] for d in on_main[1])


def test_index_bound_find_on_a_copy_cursor_killed_drops_the_copy(
        pair: Pair, direct: MongoClient) -> None:
    """A cursor over a scratch copy that the client closes early drops the copy."""
    pair.branch.c.create_index([("k", 1), ("_id", 1)])
    cursor = pair.branch.c.find({}, hint=[("k", 1), ("_id", 1)], min={"k": 0, "_id": 0},
                                batch_size=2)
    assert len([next(cursor), next(cursor)]) == 2
    assert _scratch_copies(direct, pair.db)
    cursor.close()
    assert not _scratch_copies(direct, pair.db)


def test_index_bound_find_on_a_copy_inside_a_transaction(
        pair: Pair, direct: MongoClient) -> None:
    """In a transaction the copy is made in it (created, its index built, then filled),
    so it holds the transaction's own writes; it is dropped when the transaction ends.
    The same answer as main's, in a transaction with the same writes."""
    def read(db: Database) -> list[dict[str, Any]]:
        with db.client.start_session() as session:
            session.start_transaction()
            db.c.insert_one({"_id": 5000, "k": 4}, session=session)
            db.c.delete_one({"_id": 13}, session=session)
            docs = list(db.c.find({}, {"_id": 1, "k": 1}, hint=[("k", 1), ("_id", 1)],
                                  min={"k": 4, "_id": 0}, max={"k": 5, "_id": 0},
                                  batch_size=2, session=session))
            session.abort_transaction()
        return docs

    pair.branch.c.create_index([("k", 1), ("_id", 1)])
    on_branch = read(pair.branch)
    assert not _scratch_copies(direct, pair.db)
    pair.main.c.create_index([("k", 1), ("_id", 1)])
    on_main = read(pair.main)
    assert on_main == on_branch
    assert {"_id": 5000, "k": 4} in on_main and {"_id": 13, "k": 4} not in on_main
    assert pair.branch.c.find_one({"_id": 5000}) is None


def test_index_bound_snapshot_read_on_a_copy(pair: Pair, direct: MongoClient) -> None:
    """The copy (of an index made on the branch) is filled from an aggregation read at
    the snapshot's time and the reply carries that time: the same documents as main's
    snapshot read, the time the client named kept, and the copy dropped with the
    cursor."""
    bounds = {"hint": {"k": 1, "_id": 1}, "min": {"k": 3, "_id": 0}, "max": {"k": 5, "_id": 0}}
    keys = {"hint": {"k": 1, "_id": 1}, "returnKey": True, "min": {"k": 3, "_id": 0},
            "batchSize": 2}
    pair.branch.c.create_index([("k", 1), ("_id", 1)])
    found = pair.branch.command("find", "c", **bounds, readConcern=_SNAPSHOT)
    assert isinstance(found["cursor"].get("atClusterTime"), Timestamp), found
    at = pair.branch.command("find", "c", limit=1, readConcern=_SNAPSHOT)["cursor"][
        "atClusterTime"]
    returned = pair.branch.command("find", "c", **keys,
                                   readConcern={**_SNAPSHOT, "atClusterTime": at})
    assert returned["cursor"]["atClusterTime"] == at
    assert _scratch_copies(direct, pair.db), returned  # held by the open cursor
    pair.branch.command("killCursors", "c", cursors=[returned["cursor"]["id"]])
    assert not _scratch_copies(direct, pair.db)
    pair.main.c.create_index([("k", 1), ("_id", 1)])
    assert found["cursor"]["firstBatch"] and found["cursor"]["firstBatch"] == pair.main.command(
        "find", "c", **bounds, readConcern=_SNAPSHOT)["cursor"]["firstBatch"]
    assert returned["cursor"]["firstBatch"] == pair.main.command(
        "find", "c", **keys, readConcern=_SNAPSHOT)["cursor"]["firstBatch"]


@pytest.mark.secantus_gap(reason="SecantusDB reads the latest data at any atClusterTime "
                                 "(mongod reads the snapshot at that time)")
def test_index_bound_snapshot_read_on_a_copy_does_not_see_later_writes(pair: Pair) -> None:
    """On the main port first: an upstream that does not keep snapshots (SecantusDB)
    cannot give a branch one either, and the test says so by skipping."""
    for db in (pair.main, pair.branch):
        db.c.create_index([("k", 1), ("_id", 1)])
        with db.client.start_session(snapshot=True) as session:
            db.c.find_one({}, session=session)  # pins the session's time

            bounded = {"hint": [("k", 1), ("_id", 1)], "min": {"k": 3, "_id": 0},
                       "max": {"k": 5, "_id": 0}, "session": session}
            before = list(db.c.find({}, **bounded))
            db.c.insert_one({"_id": 5000, "k": 4})
            after = list(db.c.find({}, **bounded))
            if db is pair.main and after != before:
                pytest.skip("the upstream reads the latest data at any atClusterTime "
                            "(SecantusDB): snapshot reads cannot be exact through it")
            assert after == before


_EN2 = {"locale": "en", "strength": 2}


def _collated(db: Database, name: str) -> None:
    """A collection of mixed-case strings with a default collation and three indexes of
    one key pattern: the default's (its collation said explicitly), simple, and en's."""
    db.create_collection(name, collation=_EN2)
    db[name].create_index([("s", 1), ("n", 1)], name="s_n", collation=_EN2)
    db[name].create_index([("s", 1), ("n", 1)], name="s_n_simple",
                          collation={"locale": "simple"})
    db[name].create_index([("s", 1), ("n", 1)], name="s_n_en", collation=_EN)


@pytest.mark.parametrize("options", [
    {"hint": {"k": 1, "_id": 1}, "min": {"k": 3, "_id": 0}, "collation": _EN},
    {"hint": "k_1__id_1", "returnKey": True, "max": {"k": 4, "_id": 0}},
    {"hint": "k_1", "min": {"k": 2}, "max": {"k": 4}},
], ids=["collation", "return-key-by-name", "merged"])
def test_explain_of_an_index_bound_find_runs_on_a_copy(
        pair: Pair, direct: MongoClient, options: dict[str, Any]) -> None:
    """Whether the find itself would be merged or copied, its explain is the upstream's
    of the find on a copy of the branch view: the plan and the counts of the same find
    on a plain collection of the branch's documents with the same indexes, under the
    collection's namespace, and no copy left behind."""
    pair.branch.c.create_index([("k", 1), ("_id", 1)])
    ref = direct[pair.db].ref
    ref.insert_many(list(pair.branch.c.find()))
    ref.create_index("k")
    ref.create_index([("k", 1), ("_id", 1)])
    reply = pair.branch.command("explain", {"find": "c", **options},
                                verbosity="executionStats")
    plain = direct[pair.db].command("explain", {"find": "ref", **options},
                                    verbosity="executionStats")
    assert reply["mongobranch"]["plan"] == "copy"
    assert reply["queryPlanner"]["namespace"] == f"{pair.db}.c"
    assert "__mb_" not in str(reply)
    assert reply["queryPlanner"]["winningPlan"] == plain["queryPlanner"]["winningPlan"]
    assert reply["executionStats"]["nReturned"] == plain["executionStats"]["nReturned"] > 0
    assert not _scratch_copies(direct, pair.db)


@pytest.fixture()
def strings(made: Branches, client: MongoClient, direct: MongoClient,
            db_name: str) -> Iterator[Pair]:
    """The collated collection, forked, then the same writes on both ports; and `ref`, a
    plain copy of main's documents made on the upstream after them."""
    main = client[db_name]
    _collated(main, "c")
    main.c.insert_many([{"_id": i, "s": ["b", "A", "a", "B", "c", "C"][i % 6], "n": i}
                        for i in range(30)])
    info = made.create()
    bclient = made.client(info)
    branch = bclient[db_name]
    for db in (main, branch):
        db.c.update_many({"n": {"$in": [2, 9, 14]}}, {"$set": {"s": "a"}})
        db.c.delete_many({"n": {"$in": [4, 20]}})
        db.c.insert_many([{"_id": 100 + i, "s": "Ab"[i % 2], "n": 100 + i} for i in range(5)])
    _collated(direct[db_name], "ref")
    direct[db_name].ref.insert_many(list(main.c.find()))
    yield Pair(main, branch, 0, 0, db_name, str(info["uri"]))
    bclient.close()


@pytest.mark.parametrize("options", [
    {"hint": "s_n", "min": {"s": "a", "n": 0}, "max": {"s": "c", "n": 0}},
    {"hint": "s_n", "min": {"s": "A", "n": 5}, "sort": {"s": -1, "n": -1}, "limit": 9},
    {"hint": "s_n", "returnKey": True, "min": {"s": "b", "n": 0}, "batchSize": 3},
    {"hint": "s_n_en", "min": {"s": "a", "n": 0}, "max": {"s": "c", "n": 0},
     "collation": _EN, "projection": {"_id": 0}},
], ids=["default-collation", "sorted-limit", "return-key", "find-collation"])
def test_index_bounds_under_a_collation(strings: Pair, direct: MongoClient,
                                        options: dict[str, Any]) -> None:
    """A collation orders the index (and the sort): the sides' sort keys cannot be
    compared without it, so the branch view is copied with the hinted index (its
    collation kept) and the find runs on the copy in the collection's default collation
    or the find's own: the same documents, in the same order, as a plain collection of
    main's documents gives. (Against it, not main's port: SecantusDB orders an index that
    inherits the collection's default collation by the simple one instead.)"""
    ref = direct[strings.db].command("find", "ref", **{"collation": _EN2, **options})
    got = strings.branch.command("find", "c", **options)
    assert ref["cursor"]["firstBatch"], "bounds that select nothing test nothing"
    assert got["cursor"]["firstBatch"] == ref["cursor"]["firstBatch"]
    if "batchSize" in options:
        assert got["cursor"]["id"]
        more = strings.branch.command("getMore", got["cursor"]["id"], collection="c")
        rest = direct[strings.db].command("getMore", ref["cursor"]["id"], collection="ref")
        assert more["cursor"]["nextBatch"] == rest["cursor"]["nextBatch"]
        assert more["cursor"]["ns"] == f"{strings.db}.c"


@pytest.fixture()
def string_ids(made: Branches, client: MongoClient, direct: MongoClient,
               db_name: str) -> Iterator[Pair]:
    """A collated collection whose _ids are mixed-case strings, so that the _id index's
    order is its collation's; forked, then the same writes on both ports; and `ref`, a
    plain collated collection of main's documents made on the upstream after them."""
    main = client[db_name]
    main.create_collection("c", collation=_EN2)
    main.c.insert_many([{"_id": f"{'bAcD'[i % 4]}{i:02}", "n": i} for i in range(24)])
    info = made.create()
    bclient = made.client(info)
    branch = bclient[db_name]
    for db in (main, branch):
        db.c.delete_many({"n": {"$in": [5, 10]}})
        db.c.insert_many([{"_id": f"{'aB'[i % 2]}9{i}", "n": 100 + i} for i in range(4)])
        db.c.update_one({"n": 7}, {"$set": {"x": 1}})
    direct[db_name].create_collection("ref", collation=_EN2)
    direct[db_name].ref.insert_many(list(main.c.find()))
    yield Pair(main, branch, 0, 0, db_name, str(info["uri"]))
    bclient.close()


@pytest.mark.parametrize("options", [
    {"hint": "_id_", "min": {"_id": "b"}, "max": {"_id": "d"}},
    {"hint": {"_id": 1}, "min": {"_id": "B05"}, "sort": {"_id": -1}, "limit": 7},
    {"hint": "_id_", "returnKey": True, "max": {"_id": "c"}, "batchSize": 3},
], ids=["name", "pattern-sorted", "return-key"])
def test_index_bounds_on_the_id_index_of_a_collated_collection(
        string_ids: Pair, direct: MongoClient, options: dict[str, Any]) -> None:
    """The copy is created with the collection's default collation and filled by a
    $merge, so its _id index orders as the collection's: the same documents, in the same
    order, as a plain collated collection of main's documents gives, and the copy is
    gone once the cursor is. (The reference find names the default collation, as the
    branch's does: SecantusDB orders by the simple one a find that names none on a
    collated collection, where mongod uses the collection's. It orders by the find's
    collation whatever the index's, so the copy's own options are checked too, while
    its cursor is open.)"""
    db = string_ids.db
    ref = direct[db].command("find", "ref", **{"collation": _EN2, **options})
    got = string_ids.branch.command("find", "c", **options)
    assert ref["cursor"]["firstBatch"], "bounds that select nothing test nothing"
    assert got["cursor"]["firstBatch"] == ref["cursor"]["firstBatch"]
    if "batchSize" in options:
        copies = _scratch_copies(direct, db)
        assert got["cursor"]["id"] and len(copies) == 1
        listed = direct[db].list_collections(filter={"name": copies[0]})
        assert next(listed)["options"].get("collation", {}).items() >= _EN2.items()
        more = string_ids.branch.command("getMore", got["cursor"]["id"], collection="c")
        rest = direct[db].command("getMore", ref["cursor"]["id"], collection="ref")
        assert more["cursor"]["nextBatch"] == rest["cursor"]["nextBatch"]
    assert not _scratch_copies(direct, db)


def test_index_bounds_on_the_id_index_of_a_collated_collection_in_a_transaction(
        string_ids: Pair, direct: MongoClient) -> None:
    """In a transaction the copy is created with the collation, then filled by inserts:
    the transaction's own writes read in the collection's _id order, as on main (the
    collation named, for SecantusDB's sake: see above)."""
    def read(db: Database) -> list[dict[str, Any]]:
        with db.client.start_session() as session:
            session.start_transaction()
            db.c.insert_one({"_id": "b50", "n": 50}, session=session)
            docs = list(db.c.find({}, hint="_id_", min={"_id": "B"}, max={"_id": "d"},
                                  collation=_EN2, session=session))
            session.abort_transaction()
        return docs

    on_branch = read(string_ids.branch)
    assert not _scratch_copies(direct, string_ids.db)
    assert {"_id": "b50", "n": 50} in on_branch
    assert on_branch == read(string_ids.main)


@pytest.mark.secantus_gap(reason="SecantusDB sorts by a collection's default collation "
                                 "when a find asks for the simple one")
def test_index_bounds_in_the_simple_collation_of_a_collated_collection(
        strings: Pair, direct: MongoClient) -> None:
    """The simple collation orders the sides' sort keys as the proxy compares them: the
    merged find answers, as main's."""
    simple = {"locale": "simple"}
    first = direct[strings.db].c.find_one({}, sort=[("s", 1)], collation=simple)
    assert first is not None
    if first["s"] != "A":
        pytest.skip("the upstream sorts by the collection's default collation when a find "
                    "asks for the simple one")
    options = {"hint": "s_n_simple", "min": {"s": "B", "n": 0}, "max": {"s": "b", "n": 0},
               "collation": simple}
    got = [db.command("find", "c", **options)["cursor"]["firstBatch"]
           for db in (strings.main, strings.branch)]
    assert got[0] and got[0] == got[1]


@pytest.mark.secantus_gap(reason="SecantusDB has no hashed indexes (CannotCreateIndex), and "
                                 "min/max on its 2d/2dsphere indexes fail internally")
@pytest.mark.parametrize("spec", [[("h", "hashed")], [("g", "2dsphere")]],
                         ids=["hashed", "2dsphere"])
def test_index_bounds_on_a_hashed_or_special_index(
        made: Branches, client: MongoClient, db_name: str, spec: list[tuple[str, Any]]
        ) -> None:
    """A hashed or special index orders its keys by what the server computes (hashes,
    cells), which the sides' sort keys do not carry: the branch view is copied with the
    index and the find runs on the copy, as mongod's on main."""
    main = client[db_name]
    main.c.insert_many([{"_id": i, "h": i % 7, "g": {"type": "Point", "coordinates": [i, i]}}
                        for i in range(20)])
    try:
        main.c.create_index(spec)
    except OperationFailure as e:
        pytest.skip(f"the upstream has no {spec[0][1]} index: {e}")
    try:
        first = main.c.find_one({}, hint=spec, projection={"k": {"$meta": "indexKey"}})
        assert first is not None
        options = {"hint": dict(spec), "min": first["k"]}
        main.command("find", "c", **options)
    except OperationFailure as e:
        pytest.skip(f"the upstream refuses min on a {spec[0][1]} index: {e}")
    info = made.create()
    with made.client(info) as bclient:
        branch = bclient[db_name]
        for db in (main, branch):
            db.c.update_many({"_id": {"$in": [1, 8]}}, {"$set": {"x": 1}})
            db.c.delete_many({"_id": 3})
        got = [sorted(map(repr, db.command("find", "c", **options)["cursor"]["firstBatch"]))
               for db in (main, branch)]
        keys = [db.command("find", "c", returnKey=True, **options)["cursor"]["firstBatch"]
                for db in (main, branch)]
    assert got[0] and got[0] == got[1]
    assert keys[0] == keys[1]


@pytest.mark.parametrize("options", [
    {"filter": {"k": 2}},
    {"filter": {"k": {"$gte": 3}}, "sort": {"k": -1}, "batchSize": 3},
    {"filter": {"arr": {"$lt": 3}}},
], ids=["indexed", "indexed-sorted", "scan"])
def test_return_key_without_a_hint_on_a_changed_collection(pair: Pair,
                                                           options: dict[str, Any]) -> None:
    """Without a hint mongod's one plan picks one index (or none: empty keys); the branch
    hints every side with the index the base's planner picks, so the keys are of one
    index too, the same as main's."""
    got = [_return_keys(db, options) for db in (pair.main, pair.branch)]
    assert got[0], "a find that selects nothing tests nothing"
    if "sort" in options:
        assert got[0] == got[1]
    else:  # no order asked: the same keys, in any order
        assert sorted(map(str, got[0])) == sorted(map(str, got[1]))
    if options["filter"].get("arr") is None:
        assert all(list(d) == ["k"] for d in got[1])
    else:
        assert all(d == {} for d in got[1])


def test_find_only_projection_over_a_hidden_set_too_large_for_memory(
        made: Branches, direct: MongoClient, db_name: str) -> None:
    """Past the in-memory hidden-id limit, each batch asks the overlay's hidden-id
    collection which of its ids the branch hides; checked against a plain copy of the
    result, written before the fork (main's writes then preserve nothing)."""
    n = 25_200  # the branch's deletes hide over model.HIDDEN_CACHE_LIMIT ids
    docs = [{"_id": i, "g": i % 10, "arr": [i % 5, i % 7, i % 3]} for i in range(n)]
    added = [{"_id": n + i, "g": 9, "arr": [2, -1, i]} for i in range(30)]
    direct[db_name].c.insert_many(docs)
    copy = direct[f"{db_name}_copy"]
    copy.c.insert_many([d for d in docs if d["g"] >= 8] + added)
    info = made.create()
    with made.client(info) as bclient:
        branch = bclient[db_name]
        branch.c.delete_many({"g": {"$lt": 8}})
        branch.c.insert_many(added)
        for projection in ({"arr": {"$slice": -2}}, {"arr": {"$elemMatch": {"$lt": 0}}},
                           {"arr.$": 1}):
            filt = {"g": {"$in": [3, 9]}, "arr": {"$lt": 3}}
            got = [list(db.c.find(filt, projection, batch_size=40).sort("_id", -1).limit(150))
                   for db in (branch, copy)]
            assert got[0] == got[1] and len(got[0]) == 150
    direct.drop_database(f"{db_name}_copy")


def test_index_bounds_over_a_hidden_set_too_large_for_memory(
        made: Branches, direct: MongoClient, db_name: str) -> None:
    """Past the in-memory hidden-id limit the sides cannot drop hidden ids as they merge:
    the branch view is copied server-side with the hinted index and the find runs on the
    copy. Checked against a plain copy of the result, written before the fork."""
    n = 25_200  # the branch's deletes hide over model.HIDDEN_CACHE_LIMIT ids
    docs = [{"_id": i, "g": i % 10, "k": i % 47} for i in range(n)]
    added = [{"_id": n + i, "g": 9, "k": i % 50} for i in range(30)]
    direct[db_name].c.insert_many(docs)
    direct[db_name].c.create_index([("k", 1), ("_id", 1)])
    copy = direct[f"{db_name}_copy"]
    copy.c.insert_many([d for d in docs if d["g"] >= 8] + added)
    copy.c.create_index([("k", 1), ("_id", 1)])
    info = made.create()
    with made.client(info) as bclient:
        branch = bclient[db_name]
        branch.c.delete_many({"g": {"$lt": 8}})
        branch.c.insert_many(added)
        bounds = {"hint": [("k", 1), ("_id", 1)], "min": {"k": 10, "_id": MinKey()},
                  "max": {"k": 13, "_id": MinKey()}}
        got = [list(db.c.find({"g": 9}, {"_id": 0, "k": 1}, batch_size=40, **bounds))
               for db in (branch, copy)]
        assert got[0] == got[1] and len(got[0]) > 40
        keys = [list(db.c.find({}, batch_size=50, return_key=True, **bounds).sort("k", -1))
                for db in (branch, copy)]
        assert keys[0] == keys[1] and len(keys[0]) > 50
    direct.drop_database(f"{db_name}_copy")
