"""A branch's bookkeeping (hidden ids, overlay, WAL) reflects exactly what the upstream
applied: writes that stop at an error or change nothing leave the view as mongod leaves
a plain collection. Every case runs the same operations on a branch and directly on a
plain copy of its base, and compares replies and the full contents."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pymongo import DeleteOne, InsertOne, MongoClient, ReplaceOne, ReturnDocument, UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError, OperationFailure

from tests.servers import ProxyProcess

_names = itertools.count()


@dataclass
class Pair:
    branch: Database[Any]
    copy: Database[Any]

    def both(self, fn: Callable[[Database[Any]], Any]) -> Any:
        """Run fn on the branch and on the copy: same outcome, same contents after."""
        got, want = outcome(fn, self.branch), outcome(fn, self.copy)
        assert got == want, f"branch: {got!r}\ncopy:   {want!r}"
        assert contents(self.branch) == contents(self.copy)
        return got


def outcome(fn: Callable[[Database[Any]], Any], db: Database[Any]) -> Any:
    try:
        return ("ok", fn(db))
    except BulkWriteError as exc:
        d = exc.details
        return ("bulk", d["nInserted"], d["nUpserted"], d["nMatched"], d["nModified"],
                d["nRemoved"], [(e["index"], e["code"], e.get("keyValue"))
                                for e in d["writeErrors"]])
    except OperationFailure as exc:
        return ("op", exc.code)


def raw(result: Any) -> dict[str, Any]:
    """A write's reply without the cluster-time gossip, which is about the connection,
    not the write (a plain mongod and the proxy differ in whether they send it)."""
    doc = dict(result.raw_result)
    for key in ("$clusterTime", "operationTime"):
        doc.pop(key, None)
    return doc


def contents(db: Database[Any]) -> list[dict[str, Any]]:
    return list(db.items.find().sort("_id", 1))


def seed(db: Database[Any]) -> None:
    db.items.insert_many([{"_id": i, "v": "base", "u": i, "n": i % 10, "z": 1000 + i}
                          for i in range(20)])
    db.items.create_index("u", unique=True, sparse=True)


@pytest.fixture(params=["wal", "copy"])
def pair(proxy: ProxyProcess, direct: MongoClient, request: pytest.FixtureRequest
         ) -> Iterator[Pair]:
    n = next(_names)
    base, copy = f"bk_{n}", f"bkc_{n}"
    seed(direct[base])
    seed(direct[copy])
    name = f"bk-{n}-{request.param}"
    status, body = proxy.api("POST", "/branches", {"name": name, "mode": request.param})
    assert status == 201, body
    client: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    yield Pair(client[base], direct[copy])
    client.close()
    proxy.api("DELETE", f"/branches/{name}")
    direct.drop_database(base)
    direct.drop_database(copy)


def test_ordered_insert_stopped_by_a_duplicate_leaves_deleted_ids_deleted(pair: Pair) -> None:
    """The issue's reproduction: the batch stops at index 1, so _id 5 (which the branch
    deleted) is never inserted and its base version must stay hidden."""
    pair.both(lambda db: db.items.delete_many({}).deleted_count)
    got = pair.both(lambda db: db.items.insert_many(
        [{"_id": 100}, {"_id": 100}, {"_id": 5, "v": "new"}], ordered=True))
    assert got[1] == 1 and got[-1] == [(1, 11000, {"_id": 100})]
    assert contents(pair.branch) == [{"_id": 100}]


@pytest.mark.parametrize("at", [0, 1, 3])
def test_ordered_bulk_write_failing_insert_keeps_deleted_and_changed_ids(pair: Pair,
                                                                         at: int) -> None:
    """Ids deleted one by one, and ids changed then deleted, placed after the failing
    insert of an ordered bulk_write (at its first, a middle and its last insert)."""
    pair.both(lambda db: db.items.delete_one({"_id": 3}).deleted_count)
    pair.both(lambda db: db.items.delete_one({"_id": 4}).deleted_count)
    pair.both(lambda db: raw(db.items.update_one({"_id": 6}, {"$set": {"v": "changed"}})))
    pair.both(lambda db: db.items.delete_one({"_id": 6}).deleted_count)
    pair.both(lambda db: raw(db.items.update_one({"_id": 7}, {"$set": {"v": "changed"}})))
    inserts: list[Any] = [InsertOne({"_id": 200, "u": 200}), InsertOne({"_id": 3, "u": 30}),
                          InsertOne({"_id": 4, "u": 40}), InsertOne({"_id": 6, "u": 60})]
    inserts.insert(at, InsertOne({"_id": 1}))  # taken by the base
    pair.both(lambda db: db.items.bulk_write([*inserts, DeleteOne({"_id": 7})], ordered=True))
    pair.both(lambda db: db.items.bulk_write(
        [UpdateOne({"_id": 7}, {"$set": {"w": 1}}), InsertOne({"_id": 201, "u": 201}),
         InsertOne({"_id": 201}), InsertOne({"_id": 6})], ordered=True))


@pytest.mark.parametrize("ordered", [True, False])
def test_insert_of_a_deleted_id_refused_by_a_unique_key_keeps_it_deleted(pair: Pair,
                                                                         ordered: bool) -> None:
    """A deleted id re-inserted with a unique key the branch's own document holds: the
    upstream refuses it in the overlay, and the base version stays hidden."""
    pair.both(lambda db: db.items.delete_one({"_id": 5}).deleted_count)
    pair.both(lambda db: raw(db.items.update_one({"_id": 6}, {"$set": {"u": 60}})))
    pair.both(lambda db: db.items.insert_many(
        [{"_id": 300, "u": 300}, {"_id": 5, "u": 60}, {"_id": 301, "u": 301}],
        ordered=ordered))
    pair.both(lambda db: db.items.insert_one({"_id": 5, "u": 60}).inserted_id)


@pytest.mark.parametrize("taken", [2, 60])
def test_colliding_upsert_of_a_deleted_id_keeps_it_deleted(pair: Pair, taken: int) -> None:
    """An upsert re-creating a deleted id with a unique key held by the base (2) or by the
    branch (60) fails, and the base version of that id stays hidden."""
    pair.both(lambda db: db.items.delete_one({"_id": 7}).deleted_count)
    pair.both(lambda db: raw(db.items.update_one({"_id": 6}, {"$set": {"u": 60}})))
    pair.both(lambda db: raw(db.items.update_one({"_id": 7}, {"$set": {"u": taken}},
                                                 upsert=True)))
    pair.both(lambda db: db.items.find_one_and_update({"_id": 7}, {"$set": {"u": taken}},
                                                      upsert=True))
    pair.both(lambda db: db.items.bulk_write(
        [ReplaceOne({"_id": 7}, {"u": taken}, upsert=True), InsertOne({"_id": 400})],
        ordered=False).bulk_api_result)


SORT = [("n", 1), ("_id", 1)]


def fam_update(filt: Any, upd: Any, after: bool, proj: Any, upsert: bool
               ) -> Callable[[Database[Any]], Any]:
    """The whole findAndModify reply (lastErrorObject too), without the gossip."""
    def fn(db: Database[Any]) -> Any:
        reply = db.command("findAndModify", "items", query=filt, update=upd, new=after,
                           fields=proj, upsert=upsert, sort=dict(SORT))
        return {k: v for k, v in reply.items() if k not in ("$clusterTime", "operationTime")}
    return fn


def fam_same_replacement(filt: Any, after: bool) -> Callable[[Database[Any]], Any]:
    ret = ReturnDocument.AFTER if after else ReturnDocument.BEFORE

    def fn(db: Database[Any]) -> Any:
        doc = db.items.find_one(filt, sort=SORT)
        assert doc is not None
        return db.items.find_one_and_replace(
            {"_id": doc["_id"]}, {k: v for k, v in doc.items() if k != "_id"},
            return_document=ret)
    return fn


def fam_delete(filt: Any, proj: Any) -> Callable[[Database[Any]], Any]:
    return lambda db: db.items.find_one_and_delete(filt, projection=proj, sort=SORT)


def test_find_and_modify_that_changes_nothing_returns_the_matched_document(pair: Pair
                                                                          ) -> None:
    """The issue's reproduction, and the same no-op through every findAndModify option,
    on a document only the base has, one the branch changed and one it inserted."""
    pair.both(lambda db: raw(db.items.update_one({"_id": 0}, {"$set": {"n": 50}})))
    pair.both(lambda db: db.items.delete_one({"_id": 10}).deleted_count)
    pair.both(lambda db: db.items.insert_one({"_id": 50, "n": 3, "z": 900}).inserted_id)
    issue = {"$or": [{"n": {"$lt": 1}}, {"z": {"$gt": 1015}}]}
    got = pair.both(fam_update(issue, {"$pull": {"arr": 4}}, True, None, False))
    assert got[1]["value"]["_id"] == 16
    filters = [issue, {"_id": 0}, {"z": 900}]
    noops = [{"$pull": {"arr": 4}}, {"$set": {"n": 3}}, {"$max": {"z": 5}}]
    for filt, upd, after, proj, upsert in itertools.product(
            filters, noops, [True, False], [None, {"n": 1}, {"z": 0}], [True, False]):
        got = pair.both(fam_update(filt, upd, after, proj, upsert))
        assert got[1]["value"] is not None, (filt, upd, after, proj, upsert)
    for filt, after in itertools.product(filters, [True, False]):
        assert pair.both(fam_same_replacement(filt, after))[1] is not None
    for filt, proj in itertools.product(filters, [None, {"n": 1}]):
        pair.both(fam_delete(filt, proj))


def test_ordered_insert_reports_only_the_error_it_stopped_at(pair: Pair) -> None:
    """An ordered batch that stops at a duplicate of the branch's own document (index 1)
    never reaches a later document the base holds (index 3): one error, not two."""
    pair.both(lambda db: db.items.insert_one({"_id": 500}).inserted_id)
    got = pair.both(lambda db: db.items.insert_many(
        [{"_id": 501}, {"_id": 500}, {"_id": 502}, {"_id": 3}], ordered=True))
    assert got[1] == 1 and got[-1] == [(1, 11000, {"_id": 500})]
