"""Multi-document transactions on a branch port (docs/ARCHITECTURE.md, "Transactions"):
one upstream transaction per client transaction, so the overlay writes and the WAL
entries commit together or not at all, isolated from other clients until the commit."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bson import Int64
from pymongo import DeleteOne, InsertOne, MongoClient, UpdateOne
from pymongo.client_session import ClientSession
from pymongo.errors import OperationFailure
from pymongo.read_concern import ReadConcern

from tests.branchutil import Branches, branches, unique
from tests.historyutil import entries
from tests.servers import ProxyProcess, Secantus
from tests.test_node_clients import NODE_DIR, run_json


@pytest.fixture()
def setup(proxy: ProxyProcess, direct: MongoClient, made: Branches, db_name: str
          ) -> Iterator[tuple[dict[str, Any], MongoClient, MongoClient]]:
    """A branch of main over two collections; its client and a second client."""
    base = direct[db_name]
    base.people.insert_many([{"_id": i, "n": i} for i in range(5)])
    base.orders.insert_many([{"_id": i, "person": i, "total": 10 * i} for i in range(3)])
    branch = made.create()
    one, two = made.client(branch), made.client(branch)
    yield branch, one, two
    one.close()
    two.close()


def _state(db: Any) -> dict[str, list[dict[str, Any]]]:
    return {c: list(db[c].find({}, sort=[("_id", 1)])) for c in ("people", "orders")}


def _work(db: Any, session: ClientSession) -> None:
    """Inserts, updates and deletes in two collections, with reads in between."""
    db.people.insert_one({"_id": 10, "n": 10}, session=session)
    db.people.update_one({"_id": 1}, {"$set": {"n": 100}}, session=session)
    db.people.delete_one({"_id": 2}, session=session)
    db.orders.insert_one({"_id": 10, "person": 10, "total": 5}, session=session)
    db.orders.update_many({"total": {"$gte": 10}}, {"$inc": {"total": 1}}, session=session)
    db.orders.delete_one({"_id": 0}, session=session)
    # The transaction reads its own writes, by _id and by scans, in both collections.
    assert db.people.find_one({"_id": 10}, session=session) == {"_id": 10, "n": 10}
    assert db.people.find_one({"_id": 2}, session=session) is None
    assert db.people.count_documents({}, session=session) == 5
    assert [d["total"] for d in db.orders.find({}, sort=[("_id", 1)], session=session)] \
        == [11, 21, 5]
    assert db.people.find_one({"_id": 1}, session=session)["n"] == 100


EXPECTED = {
    "people": [{"_id": 0, "n": 0}, {"_id": 1, "n": 100}, {"_id": 3, "n": 3},
               {"_id": 4, "n": 4}, {"_id": 10, "n": 10}],
    "orders": [{"_id": 1, "person": 1, "total": 11}, {"_id": 2, "person": 2, "total": 21},
               {"_id": 10, "person": 10, "total": 5}],
}


def test_commit_makes_every_write_visible_at_once(
        proxy: ProxyProcess, direct: MongoClient, setup: Any, db_name: str) -> None:
    branch, one, two = setup
    before = _state(two[db_name])
    logged = len(entries(proxy, branch["name"]))
    with one.start_session() as session, session.start_transaction():
        _work(one[db_name], session)
        # Isolation: another client, and the same client outside the session, see none
        # of it before the commit; neither does the WAL.
        assert _state(two[db_name]) == before
        assert _state(one[db_name]) == before
        assert len(entries(proxy, branch["name"])) == logged
    assert _state(two[db_name]) == EXPECTED
    ops = sorted((e["ns"].split(".")[1], e["op"], e["_id"])
                 for e in entries(proxy, branch["name"])[:7])
    assert len(entries(proxy, branch["name"])) == logged + 7
    assert ops == sorted([("people", "put", 10), ("people", "put", 1),
                          ("people", "delete", 2), ("orders", "put", 10),
                          ("orders", "put", 1), ("orders", "put", 2),
                          ("orders", "delete", 0)])
    # Main is unchanged.
    assert _state(direct[db_name]) == before


def test_abort_leaves_no_trace(proxy: ProxyProcess, direct: MongoClient, setup: Any,
                               db_name: str) -> None:
    branch, one, two = setup
    # A change before the transaction: the overlay exists and has content to keep.
    one[db_name].people.update_one({"_id": 4}, {"$set": {"n": 44}})
    before = _state(two[db_name])
    logged = entries(proxy, branch["name"])
    overlays = {c: list(direct[db_name][c].find({}, sort=[("_id", 1)]))
                for c in direct[db_name].list_collection_names() if c.startswith("__mb_")}
    with one.start_session() as session:
        session.start_transaction()
        _work(one[db_name], session)
        session.abort_transaction()
    assert _state(two[db_name]) == before
    assert _state(one[db_name]) == before
    assert entries(proxy, branch["name"]) == logged
    assert {c: list(direct[db_name][c].find({}, sort=[("_id", 1)]))
            for c in direct[db_name].list_collection_names() if c.startswith("__mb_")} \
        == overlays
    # The branch keeps working as before, also after a restart-free reuse of the ids.
    one[db_name].people.insert_one({"_id": 10, "n": -10})
    assert one[db_name].people.find_one({"_id": 10}) == {"_id": 10, "n": -10}


def test_with_transaction_retries_and_commits(proxy: ProxyProcess, setup: Any,
                                              db_name: str) -> None:
    _, one, two = setup
    calls = []

    def callback(session: ClientSession) -> None:
        calls.append(1)
        _work(one[db_name], session)

    with one.start_session() as session:
        session.with_transaction(callback)
    assert calls == [1]
    assert _state(two[db_name]) == EXPECTED


def test_a_failed_statement_aborts_the_transaction(setup: Any, db_name: str) -> None:
    _, one, two = setup
    before = _state(two[db_name])
    with one.start_session() as session:
        session.start_transaction()
        db = one[db_name]
        db.people.insert_one({"_id": 20, "n": 20}, session=session)
        with pytest.raises(OperationFailure):
            db.people.insert_one({"_id": 3, "n": 0}, session=session)  # in the base
        with pytest.raises(OperationFailure) as info:
            session.commit_transaction()
        assert info.value.code == 251
        assert info.value.has_error_label("TransientTransactionError")
    assert _state(two[db_name]) == before


def test_commit_retried_and_unknown_transactions(setup: Any, db_name: str) -> None:
    _, one, _ = setup
    db = one[db_name]
    admin = one.admin
    lsid = {"id": one.start_session().session_id["id"]}
    db.command({"insert": "people", "documents": [{"_id": 30}], "lsid": lsid,
                "txnNumber": Int64(1), "startTransaction": True, "autocommit": False})
    commit = {"commitTransaction": 1, "lsid": lsid, "txnNumber": Int64(1),
              "autocommit": False}
    assert admin.command(commit)["ok"] == 1.0
    assert admin.command(commit)["ok"] == 1.0  # a retried commit answers ok again
    assert db.people.find_one({"_id": 30}) == {"_id": 30}
    with pytest.raises(OperationFailure) as info:
        admin.command({"abortTransaction": 1, "lsid": lsid, "txnNumber": Int64(7),
                       "autocommit": False})
    assert info.value.code == 251 and info.value.details["codeName"] == "NoSuchTransaction"
    assert "TransientTransactionError" in info.value.details["errorLabels"]
    with pytest.raises(OperationFailure) as info:
        db.command({"find": "people", "lsid": lsid, "txnNumber": Int64(8),
                    "autocommit": False})
    assert info.value.code == 251
    with pytest.raises(OperationFailure) as info:
        db.command({"count": "people", "lsid": lsid, "txnNumber": Int64(9),
                    "startTransaction": True, "autocommit": False})
    assert info.value.code == 263


@pytest.mark.parametrize("concern", [{"w": 2, "wtimeout": 500}, {"w": "nosuchtag"},
                                     {"w": 1, "j": True}])
def test_the_commit_meets_the_clients_write_concern(
        client: MongoClient, setup: Any, db_name: str, concern: dict[str, Any]) -> None:
    """The client names its transaction's write concern on commitTransaction only: the
    branch commits with it, as mongod does (an unsatisfiable one is a
    writeConcernError beside ok: 1, the transaction committed all the same)."""
    _, one, _ = setup
    replies = {}
    for port, c in (("main", client), ("branch", one)):
        lsid = {"id": c.start_session().session_id["id"]}
        c[db_name].command({"insert": "people", "documents": [{"_id": f"wc-{port}"}],
                            "lsid": lsid, "txnNumber": Int64(1), "startTransaction": True,
                            "autocommit": False})
        reply = c.admin.command({"commitTransaction": 1, "lsid": lsid,
                                 "txnNumber": Int64(1), "autocommit": False,
                                 "writeConcern": concern})
        replies[port] = {k: v for k, v in reply.items()
                         if k not in ("$clusterTime", "operationTime")}
        assert c[db_name].people.find_one({"_id": f"wc-{port}"}) == {"_id": f"wc-{port}"}
    assert replies["branch"] == replies["main"]
    assert [type(v) for v in replies["branch"].values()] == \
        [type(v) for v in replies["main"].values()]
    assert ("writeConcernError" in replies["branch"]) == (concern.get("w") != 1)


@pytest.mark.parametrize(("concern", "message"), [
    ({"w": -1}, "w cannot be less than 0"), ({"j": "yes"}, "j must be True or False"),
    ({"w": 1, "wtimeout": -5}, "wtimeout cannot be less than 0"),
    ({"bogus": 1}, "unrecognized write concern field: bogus")])
def test_an_invalid_commit_write_concern_is_refused(
        setup: Any, db_name: str, concern: dict[str, Any], message: str) -> None:
    """A commit whose write concern is not one is refused with FailedToParse, as mongod
    parses it, and ends the transaction: nothing of it lands, no retry label invites
    the driver to repeat it. (SecantusDB on the main port accepts these silently; mongod
    refuses each.)"""
    _, one, _ = setup
    lsid = {"id": one.start_session().session_id["id"]}
    one[db_name].command({"insert": "people", "documents": [{"_id": "bad-wc"}],
                          "lsid": lsid, "txnNumber": Int64(1), "startTransaction": True,
                          "autocommit": False})
    with pytest.raises(OperationFailure) as info:
        one.admin.command({"commitTransaction": 1, "lsid": lsid, "txnNumber": Int64(1),
                           "autocommit": False, "writeConcern": concern})
    assert info.value.code == 9 and message in str(info.value.details["errmsg"])
    assert "errorLabels" not in info.value.details
    assert one[db_name].people.find_one({"_id": "bad-wc"}) is None
    one[db_name].people.insert_one({"_id": "after"})
    assert one[db_name].people.find_one({"_id": "after"}) == {"_id": "after"}


def test_a_second_transactions_write_waits_then_conflicts(setup: Any, db_name: str) -> None:
    """One transaction holds the branch from its first write: another transaction's
    write fails with a retryable WriteConflict; once the first ends, it goes through."""
    _, one, two = setup
    with one.start_session() as first, two.start_session() as second:
        first.start_transaction()
        one[db_name].people.insert_one({"_id": 40}, session=first)
        second.start_transaction()
        with pytest.raises(OperationFailure) as info:
            two[db_name].orders.insert_one({"_id": 40}, session=second)
        assert info.value.code == 112
        assert info.value.has_error_label("TransientTransactionError")
        first.commit_transaction()
        second.abort_transaction()
        second.start_transaction()
        two[db_name].orders.insert_one({"_id": 40}, session=second)
        second.commit_transaction()
    assert one[db_name].people.find_one({"_id": 40}) == {"_id": 40}
    assert one[db_name].orders.find_one({"_id": 40}) == {"_id": 40}


def test_a_plain_write_waits_for_the_transaction(setup: Any, db_name: str) -> None:
    """A write outside any transaction waits while a transaction holds the branch, and
    lands after its commit."""
    _, one, two = setup
    done = threading.Event()

    def plain() -> None:
        two[db_name].people.update_one({"_id": 0}, {"$set": {"n": "plain"}})
        done.set()

    with one.start_session() as session:
        session.start_transaction()
        one[db_name].people.update_one({"_id": 0}, {"$set": {"n": "txn"}}, session=session)
        writer = threading.Thread(target=plain)
        writer.start()
        assert not done.is_set()  # held by the transaction's lock until the commit
        session.commit_transaction()
    writer.join(30)
    assert done.is_set()
    assert two[db_name].people.find_one({"_id": 0}) == {"_id": 0, "n": "plain"}


def test_a_child_keeps_its_snapshot(proxy: ProxyProcess, made: Branches, setup: Any,
                                     db_name: str) -> None:
    """A child of the branch shows the branch as at its fork through a committed and an
    aborted transaction: the commit copies the pre-images up into it, with the commit;
    the abort copies nothing. A document the child changed itself meanwhile stays its."""
    branch, one, _ = setup
    one[db_name].people.update_one({"_id": 4}, {"$set": {"n": 44}})
    kid = made.create(**{"from": branch["name"]})
    kid_client = made.client(kid)
    kid_db = kid_client[db_name]
    seen = _state(kid_db)
    kid_logged = len(entries(proxy, kid["name"]))
    with one.start_session() as session:
        session.start_transaction()
        _work(one[db_name], session)
        assert _state(kid_db) == seen
        kid_db.people.update_one({"_id": 1}, {"$set": {"n": "kid"}})
        kid_logged += 1
        seen["people"][1] = {"_id": 1, "n": "kid"}
        # No child may be forked from the branch while the transaction holds it.
        status, reply = proxy.api("POST", "/branches", {"name": unique("kid"),
                                                        "from": branch["name"]})
        assert status == 409 and "transaction" in str(reply), reply
        session.commit_transaction()
    assert _state(one[db_name])["people"][4] == {"_id": 10, "n": 10}
    assert _state(kid_db) == seen
    kid_entries = entries(proxy, kid["name"])
    # Kept: people 2 and 10 and orders 0, 1, 2 and 10 (not people 1, the child's own).
    assert sorted(e["op"] for e in kid_entries[:len(kid_entries) - kid_logged]) \
        == ["keep"] * 6
    kid_logged = len(kid_entries)
    with one.start_session() as session:
        session.start_transaction()
        one[db_name].people.update_one({"_id": 0}, {"$set": {"n": "gone"}}, session=session)
        one[db_name].orders.delete_many({}, session=session)
        session.abort_transaction()
    assert _state(kid_db) == seen
    assert len(entries(proxy, kid["name"])) == kid_logged
    kid_client.close()


def test_main_is_unaffected_and_reads_on_untouched_collections(
        direct: MongoClient, made: Branches, db_name: str) -> None:
    """A collection the branch never changed is read inside the transaction too (it
    would be forwarded as it is outside one), with a snapshot read concern."""
    direct[db_name].untouched.insert_one({"_id": 1})
    one = made.client(made.create())
    with one.start_session() as session, session.start_transaction(
            read_concern=ReadConcern("snapshot")):
        assert one[db_name].untouched.find_one({}, session=session) == {"_id": 1}
        one[db_name].untouched.insert_one({"_id": 2}, session=session)
        assert one[db_name].untouched.count_documents({}, session=session) == 2
    assert direct[db_name].untouched.count_documents({}) == 1
    assert one[db_name].untouched.count_documents({}) == 2
    one.close()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH")
def test_node_driver_with_transaction_on_a_branch(direct: MongoClient, made: Branches,
                                                  tmp_path: Path) -> None:
    """tests/node/crud.js (CRUD, cursors, aggregation, `withTransaction`) on a branch
    port: the transaction's insert lands on the branch only."""
    main_had = direct["node_clients"]["items"].find_one({"_id": "txn"})
    branch = made.create()
    out = run_json(["node", "crud.js", branch["uri"]], cwd=NODE_DIR, home=tmp_path)
    assert (out["updated"], out["deleted"], out["count"]) == (50, 50, 200)
    assert out["txn"] == {"_id": "txn"}
    assert direct["node_clients"]["items"].find_one({"_id": "txn"}) == main_had


def test_an_abandoned_transaction_expires(upstream: Secantus, direct: MongoClient,
                                          db_name: str) -> None:
    """A transaction its client never ends (a crash, a lost connection) is aborted after
    --transaction-lifetime: its lock is released, its writes are gone, its commit fails.
    The plain write below blocks until then; nothing here depends on how long it takes."""
    direct[db_name].people.insert_one({"_id": 1, "n": 1})
    proc = ProxyProcess(upstream.uri, meta_db="mongobranch_txn_expiry",
                        extra=["--transaction-lifetime", "1"]).start()
    try:
        with branches(proc) as made:
            branch = made.create()
            one, two = made.client(branch), made.client(branch)
            logged = len(entries(proc, branch["name"]))
            session = one.start_session()
            session.start_transaction()
            one[db_name].people.update_one({"_id": 1}, {"$set": {"n": "txn"}},
                                           session=session)
            two[db_name].people.insert_one({"_id": 2})  # waits for the expiry
            with pytest.raises(OperationFailure) as info:
                session.commit_transaction()
            assert info.value.code == 251
            assert one[db_name].people.find_one({"_id": 1}) == {"_id": 1, "n": 1}
            assert [e["_id"] for e in entries(proc, branch["name"])][:1] == [2]
            assert len(entries(proc, branch["name"])) == logged + 1
            assert "aborting a transaction on branch" in proc.read_log()
            session.end_session()
            one.close()
            two.close()
    finally:
        proc.stop()
        direct.drop_database("mongobranch_txn_expiry")


def test_transactions_on_a_copy_branch(direct: MongoClient, made: Branches,
                                       db_name: str) -> None:
    base = direct[db_name]
    base.people.insert_many([{"_id": i, "n": i} for i in range(5)])
    base.orders.insert_many([{"_id": i, "person": i, "total": 10 * i} for i in range(3)])
    branch = made.create(mode="copy")
    one, two = made.client(branch), made.client(branch)
    before = _state(two[db_name])
    with one.start_session() as session:
        session.start_transaction()
        _work(one[db_name], session)
        session.abort_transaction()
        assert _state(two[db_name]) == before
        session.with_transaction(lambda s: _work(one[db_name], s))
    assert _state(two[db_name]) == EXPECTED
    assert _state(base) == before
    one.close()
    two.close()


def test_what_a_transaction_cannot_hold_is_refused_and_ends_it(setup: Any,
                                                               db_name: str) -> None:
    """$out, DDL and catalog reads inside a transaction are refused (263) and, as on
    mongod, the refusal aborts the transaction: nothing of it lands."""
    _, one, two = setup
    before = _state(two[db_name])
    refusals = [
        lambda db, s: list(db.people.aggregate([{"$out": "copy"}], session=s)),
        lambda db, s: db.create_collection(unique("c"), capped=True, size=4096, session=s),
        lambda db, s: db.people.create_index("n", session=s),
        lambda db, s: db.list_collection_names(session=s),
        lambda db, s: db.command("count", "people", session=s),
    ]
    for refuse in refusals:
        with one.start_session() as session:
            session.start_transaction()
            one[db_name].people.insert_one({"_id": 60}, session=session)
            with pytest.raises(OperationFailure) as info:
                refuse(one[db_name], session)
            assert info.value.code == 263, info.value.details
            with pytest.raises(OperationFailure) as info:
                one[db_name].people.insert_one({"_id": 61}, session=session)
            assert info.value.code == 251
            assert info.value.has_error_label("TransientTransactionError")
        assert _state(two[db_name]) == before


_GRAPH = [{"$sort": {"_id": 1}},
          {"$graphLookup": {"from": "people", "startWith": "$person",
                            "connectFromField": "n", "connectToField": "_id", "as": "p"}}]


def _graph(db: Any, session: Any) -> list[tuple[Any, list[Any]]]:
    """The $graphLookup's answer, each array sorted (its order is unspecified)."""
    return [(d["_id"], sorted(p["_id"] for p in d["p"]))
            for d in db.orders.aggregate(_GRAPH, session=session)]


def test_graph_lookup_in_a_transaction_reads_a_copy_made_in_it(
        setup: Any, direct: MongoClient, db_name: str) -> None:
    """A $graphLookup from a changed collection reads a scratch copy of what the branch
    shows of it. In a transaction ($out cannot run there) the copy is made in it, so it
    holds the transaction's own writes, and dropped when it ends: the answers are those
    of the same transaction on a plain copy of the data."""
    _, one, two = setup
    plain = direct[f"{db_name}_plain"]
    for coll in ("people", "orders"):
        plain[coll].insert_many(list(direct[db_name][coll].find()))
    one[db_name].people.update_one({"_id": 4}, {"$set": {"n": 0}})  # changed on the branch
    plain.people.update_one({"_id": 4}, {"$set": {"n": 0}})
    answers = []
    for client, db in ((one, one[db_name]), (direct, plain)):
        with client.start_session() as session:
            session.start_transaction()
            db.people.update_one({"_id": 1}, {"$set": {"n": 3}}, session=session)
            db.people.insert_one({"_id": 7, "n": 4}, session=session)
            db.orders.insert_one({"_id": 9, "person": 7}, session=session)
            inside = _graph(db, session)
            session.commit_transaction()
        answers.append((inside, _graph(db, None)))
    assert answers[0] == answers[1]
    assert dict(answers[0][0])[1] == [1, 3]  # the transaction's own update, followed
    assert dict(answers[0][0])[9] == [0, 4, 7]
    left = [n for n in direct[db_name].list_collection_names() if "_g_" in n]
    assert left == [], left
    with one.start_session() as session:
        session.start_transaction()
        one[db_name].people.insert_one({"_id": 8, "n": 8}, session=session)
        assert len(_graph(one[db_name], session)) == 4
        session.abort_transaction()
    assert two[db_name].people.find_one({"_id": 8}) is None
    left = [n for n in direct[db_name].list_collection_names() if "_g_" in n]
    assert left == [], left
    direct.drop_database(f"{db_name}_plain")


def test_errors_in_a_transaction_are_the_statements_own(setup: Any, db_name: str) -> None:
    """A statement's error aborts the upstream transaction; the client hears that error
    (not the NoSuchTransaction of what the proxy ran after it), naming its collection."""
    _, one, two = setup
    db = one[db_name]
    before = _state(two[db_name])
    with one.start_session() as session:
        session.start_transaction()
        db.people.insert_one({"_id": 70}, session=session)
        with pytest.raises(OperationFailure) as info:
            db.people.insert_one({"_id": 70}, session=session)
        assert info.value.code == 11000
        assert "__mb_" not in str(info.value) and ".people" in str(info.value)
    with one.start_session() as session:
        session.start_transaction()
        db.people.update_one({"_id": 0}, {"$set": {"n": 1}}, session=session)
        with pytest.raises(OperationFailure) as info:
            db.people.update_one({"_id": 1}, {"$bogus": {"n": 1}}, session=session)
        assert info.value.code not in (251, 1), info.value.details
    assert _state(two[db_name]) == before


def test_ids_hidden_before_or_within_the_transaction(setup: Any, db_name: str) -> None:
    """Deleting then inserting an id, inside one transaction or across an earlier delete
    of the branch, hides an id that is hidden already: no duplicate key error may abort
    the transaction for it."""
    _, one, two = setup
    db = one[db_name]
    db.people.delete_one({"_id": 4})
    with one.start_session() as session, session.start_transaction():
        db.people.delete_one({"_id": 3}, session=session)
        db.people.insert_one({"_id": 3, "n": "again"}, session=session)
        db.people.insert_one({"_id": 4, "n": "back"}, session=session)
        db.people.delete_one({"_id": 4}, session=session)
        db.people.insert_one({"_id": 4, "n": "back twice"}, session=session)
    assert two[db_name].people.find_one({"_id": 3}) == {"_id": 3, "n": "again"}
    assert two[db_name].people.find_one({"_id": 4}) == {"_id": 4, "n": "back twice"}


def test_unique_indexes_upserts_and_merged_reads_in_a_transaction(
        direct: MongoClient, made: Branches, db_name: str) -> None:
    """The rest of the write path inside a transaction: a unique secondary index checked
    across base and branch, an upsert, findAndModify, and a sorted read of a collection
    the branch changed before the transaction (merged from base and overlay)."""
    base = direct[db_name]
    base.people.insert_many([{"_id": i, "email": f"p{i}@x"} for i in range(5)])
    base.people.create_index("email", unique=True)
    branch = made.create()
    one = made.client(branch)
    db = one[db_name]
    db.people.update_one({"_id": 0}, {"$set": {"email": "zero@x"}})
    with one.start_session() as session:
        session.start_transaction()
        assert [d["_id"] for d in db.people.find({}, sort=[("email", -1)],
                                                 session=session)] == [0, 4, 3, 2, 1]
        with pytest.raises(OperationFailure) as info:
            db.people.insert_one({"_id": 10, "email": "p3@x"}, session=session)
        assert info.value.code == 11000 and info.value.details["keyValue"] == {"email": "p3@x"}
    with one.start_session() as session, session.start_transaction():
        db.people.update_one({"_id": 11}, {"$set": {"email": "new@x"}}, upsert=True,
                             session=session)
        got = db.people.find_one_and_update({"_id": 1}, {"$set": {"email": "one@x"}},
                                            session=session, return_document=True)
        assert got == {"_id": 1, "email": "one@x"}
        assert db.people.count_documents({"email": {"$regex": "@x"}}, session=session) == 6
    assert db.people.find_one({"_id": 11}) == {"_id": 11, "email": "new@x"}
    assert db.people.find_one({"_id": 1}) == {"_id": 1, "email": "one@x"}
    assert base.people.find_one({"_id": 1}) == {"_id": 1, "email": "p1@x"}
    one.close()


def test_main_changing_during_a_transaction(client: MongoClient, made: Branches, setup: Any,
                                            db_name: str) -> None:
    """Main's writes during a transaction on a child of main: the capture preserves them
    for the branch once the transaction lets go of it; the transaction reads on from its
    snapshot meanwhile (it waits neither for the capture nor for main's fence), and the
    branch keeps its snapshot of main across the commit."""
    branch, _, two = setup
    one: MongoClient = MongoClient(branch["uri"], socketTimeoutMS=30000)
    db = one[db_name]
    main_done = threading.Event()

    def main_writes() -> None:
        client[db_name].people.update_one({"_id": 3}, {"$set": {"n": "main"}})
        client[db_name].people.insert_one({"_id": 99})
        main_done.set()

    with one.start_session() as session:
        session.start_transaction()
        db.people.update_one({"_id": 1}, {"$set": {"n": "txn"}}, session=session)
        writer = threading.Thread(target=main_writes)
        writer.start()
        # Main's writes are acknowledged before the capture preserves them, unless the
        # capture trails by over a second (then they wait for it, so for the commit):
        # either way the transaction goes on.
        main_done.wait(20)
        assert db.people.find_one({"_id": 3}, session=session) == {"_id": 3, "n": 3}
        db.people.update_one({"_id": 4}, {"$set": {"n": "txn"}}, session=session)
        assert db.people.find_one({"_id": 99}, session=session) is None
        session.commit_transaction()
    writer.join(60)
    assert main_done.is_set()
    assert client[db_name].people.find_one({"_id": 3}) == {"_id": 3, "n": "main"}
    assert two[db_name].people.find_one({"_id": 3}) == {"_id": 3, "n": 3}
    assert two[db_name].people.find_one({"_id": 99}) is None
    assert [two[db_name].people.find_one({"_id": i})["n"] for i in (1, 4)] == ["txn", "txn"]
    one.close()


def test_a_transaction_reads_its_snapshot(setup: Any, db_name: str) -> None:
    """What other clients commit on the branch after a transaction's first statement
    stays out of its reads (the engine's cached hidden ids are newer than its snapshot:
    inside it the hidden sets are read on the server, in the snapshot)."""
    _, one, two = setup
    db = one[db_name]
    db.people.update_one({"_id": 0}, {"$set": {"n": "before"}})  # a changed collection
    with one.start_session() as session:
        session.start_transaction(read_concern=ReadConcern("snapshot"))
        assert db.people.count_documents({}, session=session) == 5
        two[db_name].people.delete_one({"_id": 3})
        two[db_name].people.update_one({"_id": 4}, {"$set": {"n": "other"}})
        assert db.people.find_one({"_id": 3}, session=session) == {"_id": 3, "n": 3}
        assert [d["n"] for d in db.people.find({}, sort=[("_id", 1)], session=session)] \
            == ["before", 1, 2, 3, 4]
        assert db.people.count_documents({}, session=session) == 5
        session.abort_transaction()


def test_a_collection_a_transaction_creates(setup: Any, db_name: str) -> None:
    """A collection a transaction's write creates exists for other clients once it
    commits, and never when it aborts; inside, the transaction reads what it wrote."""
    _, one, two = setup
    db = one[db_name]
    with one.start_session() as session:
        session.start_transaction()
        db.fresh.insert_one({"_id": 1}, session=session)
        assert db.fresh.find_one({}, session=session) == {"_id": 1}
        assert "fresh" not in two[db_name].list_collection_names()
        session.commit_transaction()
        assert "fresh" in two[db_name].list_collection_names()
        session.start_transaction()
        db.gone.insert_one({"_id": 1}, session=session)
        session.abort_transaction()
    assert "gone" not in two[db_name].list_collection_names()
    assert two[db_name].gone.find_one() is None
    db.gone.insert_one({"_id": 2})  # the branch still creates it outside a transaction
    assert sorted(two[db_name].list_collection_names()) == ["fresh", "gone", "orders",
                                                            "people"]


def _ddl_transaction(db: Any, session: ClientSession) -> list[Any]:
    """create and createIndexes in one transaction, as mongod 4.4+ runs them: a new
    collection with options, an index on it while it is empty, then writes that meet
    both. What it read, for the comparison with the same transaction on the upstream."""
    db.create_collection("made", validator={"n": {"$type": "int"}}, session=session)
    made = db.made
    names = [made.create_index("k", unique=True, session=session),
             db.implicit.create_index([("k", 1), ("n", -1)], name="kn", session=session)]
    made.insert_many([{"_id": 1, "k": "a", "n": 1}, {"_id": 2, "k": "b", "n": 2}],
                     session=session)
    return [names, list(made.find({}, sort=[("_id", 1)], session=session)),
            list(db.implicit.find({}, session=session))]


def _catalog(db: Any) -> dict[str, Any]:
    """What the transaction left in the catalog: options and index lists (but the
    pre-images the capture turns on for main's collections, which a branch never shows)."""
    return {name: ({k: v for k, v in info["options"].items()
                    if k != "changeStreamPreAndPostImages"},
                   sorted((ix["name"], list(ix["key"].items()), bool(ix.get("unique")))
                          for ix in db[name].list_indexes()))
            for info in db.list_collections() if (name := info["name"]) in ("made", "implicit")}


def test_create_and_create_indexes_in_a_transaction(proxy: ProxyProcess, direct: MongoClient,
                                                    made: Branches, db_name: str) -> None:
    """The same transaction on a branch and on the upstream itself reads the same, leaves
    the same catalog when it commits and nothing when it aborts. Other clients see the
    collection from the commit on; a child of the branch never does; the upstream then
    enforces the collection's validator and unique index on the branch's writes."""
    plain = direct[unique("plain")]
    branch = made.create()
    kid = made.create(**{"from": branch["name"]})
    one, two, child = made.client(branch), made.client(branch), made.client(kid)
    db = one[db_name]
    for target in (db, plain):
        with target.client.start_session() as session:
            session.start_transaction()
            _ddl_transaction(target, session)
            session.abort_transaction()
        assert _catalog(target) == {}
    with one.start_session() as session:
        session.start_transaction()
        read = _ddl_transaction(db, session)
        assert "made" not in two[db_name].list_collection_names()
        session.commit_transaction()
    with direct.start_session() as session, session.start_transaction():
        assert _ddl_transaction(plain, session) == read
    assert _catalog(two[db_name]) == _catalog(plain) != {}
    assert "made" not in child[db_name].list_collection_names()
    with pytest.raises(OperationFailure) as info:
        two[db_name].made.insert_one({"_id": 3, "k": "c", "n": "not an int"})
    assert info.value.code == 121
    with pytest.raises(OperationFailure) as info:
        two[db_name].made.insert_one({"_id": 3, "k": "a", "n": 3})
    assert info.value.code == 11000
    # The base never changes: the upstream holds only the branches' overlays.
    assert all(n.startswith("__mb_") for n in direct[db_name].list_collection_names())
    for client in (one, two, child):
        client.close()


def test_ddl_a_transaction_cannot_run_ends_it_as_on_mongod(
        direct: MongoClient, made: Branches, db_name: str) -> None:
    """Creating a collection that exists (48), indexing an existing or a non-empty one
    (263) fail as on mongod and end the transaction. The upstream answers the same but
    where noted."""
    plain = direct[unique("plain")]
    direct[db_name].people.insert_one({"_id": 1})
    plain.people.insert_one({"_id": 1})
    branch = made.create()
    one = made.client(branch)
    # (mongod's code, the case, whether SecantusDB refuses it too)
    cases = [
        (48, lambda db, s: db.create_collection("people", session=s), True),
        # SecantusDB gap, these two: it builds an index in a transaction on any
        # collection, which mongod refuses ("Cannot create new indexes on existing
        # collection", "... on non-empty collection").
        (263, lambda db, s: db.people.create_index("n", session=s), False),
        (263, lambda db, s: (db.create_collection("fresh", session=s),
                             db.fresh.insert_one({"_id": 1}, session=s),
                             db.fresh.create_index("n", session=s)), False),
    ]
    for code, case, upstream_too in cases:
        for db in (one[db_name], plain) if upstream_too else (one[db_name],):
            with db.client.start_session() as session:
                session.start_transaction()
                with pytest.raises(OperationFailure) as info:
                    case(db, session)
                assert info.value.code == code, info.value.details
                with pytest.raises(OperationFailure) as info:
                    db.people.insert_one({"_id": 2}, session=session)
                assert info.value.code == 251
    assert sorted(one[db_name].list_collection_names()) == ["people"]
    assert one[db_name].people.find_one({"_id": 2}) is None
    one.close()


def test_a_commit_of_unknown_outcome_is_retried() -> None:
    """The upstream drops the engine's connection on commitTransaction twice (pymongo's
    own retry included): the client hears UnknownTransactionCommitResult, its driver
    retries the commit, and the transaction, still open, commits once."""
    server = Secantus(extra=["--enable-test-commands"]).start()
    proc = ProxyProcess(server.uri, meta_db="mb_txn_commit").start()
    try:
        with branches(proc) as made, MongoClient(server.uri, directConnection=True) as up:
            up.appdb.people.insert_one({"_id": 0})
            branch = made.create()
            one = made.client(branch)
            session = one.start_session()
            session.start_transaction()
            one.appdb.people.insert_one({"_id": 1}, session=session)
            one.appdb.orders.insert_one({"_id": 1}, session=session)
            up.admin.command("configureFailPoint", "failCommand", mode={"times": 2},
                             data={"failCommands": ["commitTransaction"],
                                   "closeConnection": True})
            session.commit_transaction()  # the driver retries once: that one lands
            assert one.appdb.people.find_one({"_id": 1}) == {"_id": 1}
            assert one.appdb.orders.find_one({"_id": 1}) == {"_id": 1}
            assert len(entries(proc, branch["name"])) == 2
            assert up.appdb.people.count_documents({}) == 1
            session.end_session()
            one.close()
    finally:
        proc.stop()
        server.stop()


def test_a_change_stream_sees_a_transaction_at_its_commit(made: Branches, setup: Any,
                                                          db_name: str) -> None:
    """A branch's change stream (read from the WAL) reports a transaction's writes once
    it commits, all of them, though other appends with higher LSNs were stored while it
    ran (the stream must not move past its entries before they are visible), and nothing
    of an aborted one."""
    _, one, two = setup
    other = made.client(made.create())
    with two[db_name].watch(max_await_time_ms=200) as stream:
        with one.start_session() as session:
            session.start_transaction()
            one[db_name].people.insert_one({"_id": 80}, session=session)
            one[db_name].orders.delete_one({"_id": 1}, session=session)
            other[db_name].people.insert_one({"_id": 80})  # a later LSN, stored now
            assert stream.try_next() is None
            session.commit_transaction()
            session.start_transaction()
            one[db_name].people.insert_one({"_id": 81}, session=session)
            session.abort_transaction()
        one[db_name].people.insert_one({"_id": 82})
        seen = []
        while not seen or seen[-1] != ("people", "insert", 82):
            event = stream.next()
            seen.append((event["ns"]["coll"], event["operationType"],
                         event["documentKey"]["_id"]))
    assert seen == [("people", "insert", 80), ("orders", "delete", 1),
                    ("people", "insert", 82)]
    other.close()


def test_a_transaction_meets_the_validation_of_a_collection(
        direct: MongoClient, made: Branches, db_name: str) -> None:
    """A collection with a validator in the base and one given one on the branch
    (collMod): a transaction's first write creates their overlays, validation included,
    inside it; an invalid document fails the statement and ends the transaction."""
    base = direct[db_name]
    base.create_collection("checked", validator={"n": {"$type": "int"}})
    base.checked.insert_many([{"_id": i, "n": i} for i in range(3)])
    base.loose.insert_many([{"_id": i, "n": i} for i in range(3)])
    branch = made.create()
    client = made.client(branch)
    db = client[db_name]
    db.command("collMod", "loose", validator={"n": {"$type": "int"}})
    with client.start_session() as session, session.start_transaction():
        db.checked.insert_one({"_id": 10, "n": 10}, session=session)
        db.loose.update_one({"_id": 1}, {"$set": {"n": 11}}, session=session)
    assert db.checked.find_one({"_id": 10}) == {"_id": 10, "n": 10}
    assert db.loose.find_one({"_id": 1}) == {"_id": 1, "n": 11}
    for coll in (db.checked, db.loose):
        with client.start_session() as session:
            session.start_transaction()
            coll.insert_one({"_id": 20, "n": 20}, session=session)
            with pytest.raises(OperationFailure) as failed:
                coll.update_one({"_id": 0}, {"$set": {"n": "not an int"}}, session=session)
            assert failed.value.code == 121
            with pytest.raises(OperationFailure):
                session.commit_transaction()
        assert coll.find_one({"_id": 20}) is None
        assert coll.find_one({"_id": 0}) == {"_id": 0, "n": 0}
    assert base.checked.count_documents({}) == 3 and base.loose.count_documents({}) == 3


def test_a_client_bulk_write_in_a_transaction(proxy: ProxyProcess, direct: MongoClient,
                                              setup: Any, db_name: str) -> None:
    """A client-level bulkWrite (MongoDB 8.0) is a statement of a transaction as on
    mongod: its ops over two collections land at the commit, all or (aborted) none, and
    they are the same as those of the same bulkWrite in a transaction on a plain copy."""
    branch, one, two = setup
    before = _state(two[db_name])
    plain = f"{db_name}_plainbw"
    for coll in ("people", "orders"):
        direct[plain][coll].insert_many(list(direct[db_name][coll].find()))

    def models(db: str) -> list[Any]:
        return [InsertOne(namespace=f"{db}.people", document={"_id": 20, "n": 20}),
                UpdateOne(namespace=f"{db}.people", filter={"_id": 1}, update={"$inc": {"n": 5}}),
                DeleteOne(namespace=f"{db}.orders", filter={"_id": 2}),
                UpdateOne(namespace=f"{db}.orders", filter={"_id": 7}, update={"$set": {"t": 1}},
                          upsert=True)]

    with one.start_session() as session:
        session.start_transaction()
        one.bulk_write(models(db_name), session=session)
        assert _state(two[db_name]) == before
        session.abort_transaction()
    assert _state(two[db_name]) == before
    results = []
    for client, db in ((one, db_name), (direct, plain)):
        with client.start_session() as session, session.start_transaction():
            got = client.bulk_write(models(db), session=session, verbose_results=True)
            results.append((got.inserted_count, got.matched_count, got.modified_count,
                            got.deleted_count, got.upserted_count))
    assert results[0] == results[1] == (1, 1, 1, 1, 1)
    assert _state(two[db_name]) == _state(direct[plain])
    assert len([e for e in entries(proxy, branch["name"])
                if e["ns"].startswith(f"{db_name}.")]) == 4
    direct.drop_database(plain)
