"""Branches are snapshots: a child shows its parent as it was at the fork, plus its own
writes, whatever the parent does afterwards (docs/ARCHITECTURE.md, "Snapshots")."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pymongo import DeleteOne, IndexModel, InsertOne, MongoClient, UpdateOne
from pymongo.database import Database
from pymongo.errors import (
    AutoReconnect,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from tests.branchutil import Branches, bid_of, fingerprint, unique
from tests.historyutil import diff, doc_changes, entries, merge, ok
from tests.servers import ProxyProcess, Secantus

SEED = int(os.environ.get("MONGOBRANCH_SNAPSHOT_SEED", "20261130"))


def view(db: Database) -> dict[str, Any]:
    """What a client sees of a database through every read path the planner has: full
    finds, counts, an indexed query, point lookups, distinct, an aggregation, the catalog."""
    items = db.items
    return {
        "fingerprint": fingerprint(db),
        "count": items.count_documents({}),
        "estimated": items.estimated_document_count(),
        "count_k1": items.count_documents({"k": 1}),
        "indexed": sorted(repr(d) for d in items.find({"k": 1}).hint("k_1")),
        "points": [items.find_one({"_id": i}) for i in (0, 1, 2, 3, 12, 13, 14, 22, "new")],
        "distinct": sorted(repr(v) for v in items.distinct("v")),
        "grouped": sorted(repr(d) for d in items.aggregate(
            [{"$group": {"_id": "$k", "n": {"$sum": 1}}}])),
        "sorted": [d["_id"] for d in items.find({}, {"_id": 1}).sort("v", -1).limit(7)],
        "collections": sorted(db.list_collection_names()),
        "indexes": sorted(ix["name"] for ix in items.list_indexes()),
    }


def seed(client: MongoClient, db: str) -> None:
    client[db].items.insert_many([{"_id": i, "v": i, "k": i % 5} for i in range(30)])
    client[db].items.create_index("k")


PARENT_WRITES: list[tuple[str, Callable[[Any], Any]]] = [
    ("update_many", lambda c: c.update_many({"_id": {"$lt": 10}}, {"$set": {"v": "P"}})),
    ("delete_many", lambda c: c.delete_many({"_id": {"$gte": 20, "$lt": 25}})),
    ("insert_one", lambda c: c.insert_one({"_id": "new", "v": 1, "k": 1})),
    ("insert_many", lambda c: c.insert_many([{"_id": 100 + i, "v": -i, "k": 1}
                                             for i in range(3)])),
    ("find_one_and_update", lambda c: c.find_one_and_update({"_id": 12},
                                                            {"$inc": {"v": 100}})),
    ("find_one_and_delete", lambda c: c.find_one_and_delete({"_id": 13})),
    ("replace_one", lambda c: c.replace_one({"_id": 14}, {"v": "r", "k": 1})),
    ("upsert", lambda c: c.update_one({"_id": "ups"}, {"$set": {"v": 1, "k": 1}},
                                      upsert=True)),
    ("upsert_by_filter", lambda c: c.update_one({"v": "nowhere"}, {"$set": {"k": 1}},
                                                upsert=True)),
    ("bulk", lambda c: c.bulk_write([InsertOne({"_id": "b1", "k": 1}),
                                     UpdateOne({"_id": 15}, {"$set": {"k": 1}}),
                                     DeleteOne({"_id": 16}),
                                     UpdateOne({"_id": 22}, {"$set": {"v": "again"}})],
                                    ordered=False)),
    ("update_all", lambda c: c.update_many({}, {"$inc": {"k": 1}})),
    ("delete_all", lambda c: c.delete_many({})),
]


@pytest.mark.parametrize("mode", ["wal", "copy"])
def test_child_of_a_wal_branch_keeps_the_parent_as_at_the_fork(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str,
        mode: str) -> None:
    seed(client, db_name)
    parent = made.create()
    with made.client(parent) as p:
        pitems = p[db_name].items
        pitems.update_one({"_id": 0}, {"$set": {"v": "p0"}})  # the parent's own, pre-fork
        pitems.update_one({"_id": 22}, {"$set": {"v": "p22"}})
        child = made.create(**{"from": parent["name"], "mode": mode})
        with made.client(child) as c:
            citems = c[db_name].items
            citems.update_one({"_id": 1}, {"$set": {"v": "c1"}})
            expected = view(c[db_name])
            for what, write in PARENT_WRITES:
                write(pitems)
                assert view(c[db_name]) == expected, what
            assert pitems.count_documents({}) == 0
            # The child's own write on a document the parent changed applies to what the
            # child saw (2, not the parent's "P").
            citems.update_one({"_id": 2}, {"$inc": {"v": 1}})
            assert citems.find_one({"_id": 2}) == {"_id": 2, "v": 3, "k": 2}
            assert citems.count_documents({}) == 30
    if mode == "copy":
        return
    # Only the child's own writes are changes, shown against the parent now (which
    # deleted everything): preserved documents are not.
    assert doc_changes(diff(proxy, child["name"])) == [
        (f"{db_name}.items", "insert", 1), (f"{db_name}.items", "insert", 2)]
    logged = entries(proxy, child["name"], limit=10_000)
    assert {e["op"] for e in logged} == {"put", "keep"}
    # Its description counts the same: two changed, the rest of its overlay kept.
    status, info = proxy.api("GET", f"/branches/{child['name']}")
    assert status == 200, info
    counts = info["namespaces"][f"{db_name}.items"]  # type: ignore[index]
    kept = {repr(e["_id"]) for e in logged if e["op"] == "keep"} - {"1", "2"}
    assert (counts["changed"], counts["kept"]) == (2, len(kept)) and kept, counts
    # A merge compares against the parent as at the fork: both documents were changed
    # on both sides (the parent deleted them), nothing else conflicts.
    result = merge(proxy, child["name"], strategy="abort", dry_run=True)
    assert sorted(c["_id"] for c in result["conflicts"]) == [1, 2]
    assert {c["_id"]: c["base"] for c in result["conflicts"]} == {
        1: {"_id": 1, "v": 1, "k": 1}, 2: {"_id": 2, "v": 2, "k": 2}}


def test_grandchild_keeps_both_ancestors_as_at_its_fork(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str) -> None:
    seed(client, db_name)
    top = made.create()
    middle = made.create(**{"from": top["name"]})
    with made.client(middle) as m:
        m[db_name].items.update_one({"_id": 3}, {"$set": {"v": "m3"}})
    leaf = made.create(**{"from": middle["name"]})
    with made.client(top) as t, made.client(middle) as m, made.client(leaf) as lf:
        expected = view(lf[db_name])
        middle_view = view(m[db_name])
        t[db_name].items.update_many({"k": {"$in": [1, 3]}}, {"$set": {"v": "T"}})
        t[db_name].items.insert_one({"_id": "new", "k": 1})
        assert view(m[db_name]) == middle_view
        assert view(lf[db_name]) == expected
        m[db_name].items.update_many({}, {"$set": {"v": "M"}})
        m[db_name].items.delete_one({"_id": 4})
        assert view(lf[db_name]) == expected


def test_merge_and_reset_of_the_parent_leave_the_child_as_it_was(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str) -> None:
    seed(client, db_name)
    parent = made.create()
    child = made.create(**{"from": parent["name"]})
    sibling = made.create(**{"from": parent["name"]})
    with made.client(sibling) as s:
        s[db_name].items.update_many({"k": 2}, {"$set": {"v": "sib"}})
        s[db_name].items.insert_one({"_id": "sib", "k": 1})
    with made.client(parent) as p:
        mark = int(p[db_name].items.count_documents({}))
        assert mark == 30
    before = [e["lsn"] for e in entries(proxy, parent["name"], limit=1)]
    with made.client(child) as c:
        expected = view(c[db_name])
        merge(proxy, sibling["name"], strategy="abort")
        with made.client(parent) as p:
            assert p[db_name].items.count_documents({}) == 31
        assert view(c[db_name]) == expected
        ok(proxy, "POST", f"/branches/{parent['name']}/reset",
           {"to": before[0] if before else 0})
        assert view(c[db_name]) == expected
    assert diff(proxy, child["name"])["changes"] == []


def catalog_view(db: Database) -> dict[str, Any]:
    """Every collection the client sees, with its documents, counts and index names."""
    out: dict[str, Any] = {"fingerprint": fingerprint(db),
                           "collections": sorted(db.list_collection_names())}
    for name in out["collections"]:
        out[name] = {"count": db[name].count_documents({}),
                     "indexes": sorted(ix["name"] for ix in db[name].list_indexes()),
                     "first": db[name].find_one(sort=[("_id", 1)])}
    out["indexed"] = sorted(repr(d) for d in db.items.find({"k": 1}).hint("k_1")) \
        if "k_1" in out.get("items", {}).get("indexes", []) else None
    return out


PARENT_DDL: list[tuple[str, Callable[[MongoClient, str], Any]]] = [
    ("createIndexes", lambda p, db: p[db].items.create_index("v")),
    ("dropIndexes", lambda p, db: p[db].items.drop_index("k_1")),
    ("create", lambda p, db: p[db].create_collection("fresh")),
    ("insert creates", lambda p, db: p[db].implicit.insert_one({"_id": 1})),
    ("renameCollection", lambda p, db: p[db].other.rename("renamed")),
    ("drop", lambda p, db: p[db].items.drop()),
    ("$out", lambda p, db: list(p[db].renamed.aggregate([{"$out": "items"}]))),
    ("write after", lambda p, db: p[db].items.insert_one({"_id": "late", "k": 1})),
    ("dropDatabase", lambda p, db: p.drop_database(db)),
    ("refill", lambda p, db: p[db].items.insert_many([{"_id": i, "k": 1} for i in range(5)])),
]


@pytest.mark.parametrize("mode", ["wal", "copy"])
@pytest.mark.parametrize("parent_mode", ["wal", "copy"])
def test_parent_ddl_leaves_the_child_as_it_was(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str,
        mode: str, parent_mode: str) -> None:
    seed(client, db_name)
    client[db_name].other.insert_many([{"_id": i, "o": i} for i in range(3)])
    parent = made.create(mode=parent_mode)
    with made.client(parent) as p:
        p[db_name].items.update_many({"_id": {"$lt": 4}}, {"$set": {"v": "p"}})
        p[db_name].items.delete_one({"_id": 29})
        p[db_name].other.insert_one({"_id": "p", "o": 9})
        child = made.create(**{"from": parent["name"], "mode": mode})
        with made.client(child) as c:
            c[db_name].items.update_one({"_id": 1}, {"$set": {"v": "c1"}})
            expected = catalog_view(c[db_name])
            for what, ddl in PARENT_DDL:
                ddl(p, db_name)
                assert catalog_view(c[db_name]) == expected, what
            # The child's own writes still apply to what it saw.
            c[db_name].items.update_one({"_id": 5}, {"$set": {"v": "c5"}})
            c[db_name].other.delete_one({"_id": 0})
            assert c[db_name].items.count_documents({}) == 29
            assert c[db_name].items.find_one({"_id": 2}) == {"_id": 2, "v": "p", "k": 2}
            assert sorted(repr(d["_id"]) for d in c[db_name].other.find()) == ["'p'", "1", "2"]
            assert sorted(c[db_name].list_collection_names()) == ["items", "other"]
    if mode == "copy":
        return
    # Against the parent now (its database dropped, items refilled): the child's updates
    # differ, its delete of other 0 does not (the parent has no other either); nothing it
    # kept shows as a change, nor the collections and indexes it kept.
    changes = diff(proxy, child["name"])["changes"]
    assert [c for c in changes if "op" not in c] == []
    assert sorted((c["ns"].split(".")[1], repr(c["_id"])) for c in changes) == [
        ("items", "1"), ("items", "5")]


def _parent_workload(uri: str, db: str, rng: random.Random, acked: threading.Semaphore,
                     stop: threading.Event, tag: str, failures: list[Exception]) -> None:
    """Seeded writes on the parent until the proxy goes away; one release per ack."""
    with MongoClient(uri, retryWrites=False, serverSelectionTimeoutMS=2000) as c:
        items = c[db].items
        n = 0
        while not stop.is_set():
            n += 1
            lo = rng.randrange(0, 200)
            try:
                kind = rng.randrange(5)
                if kind == 0:
                    items.update_many({"_id": {"$gte": lo, "$lt": lo + 20}},
                                      {"$set": {"w": n}})
                elif kind == 1:
                    items.insert_one({"_id": f"new{tag}.{n}", "v": n, "k": 1})
                elif kind == 2:
                    items.delete_many({"_id": {"$gte": lo, "$lt": lo + 3}})
                elif kind == 3:
                    items.find_one_and_update({"_id": lo}, {"$set": {"v": "fam"}})
                else:
                    items.bulk_write([UpdateOne({"_id": lo}, {"$set": {"v": "b"}}),
                                      InsertOne({"_id": f"bulk{tag}.{n}", "k": 2})])
            except (AutoReconnect, ServerSelectionTimeoutError):
                return  # the kill
            except PyMongoError as exc:
                failures.append(exc)
                return
            acked.release()


def test_sigkill_during_parent_writes_leaves_children_exact(tmp_path: Path) -> None:
    """SIGKILL the proxy while a parent branch writes (so, at some runs, between a write
    landing in the parent's overlay and its preservation in the children); after each
    restart every child still shows the parent as at its fork, plus its own writes."""
    rng = random.Random(SEED)
    server = Secantus(storage=str(tmp_path / "data")).start()
    proxy = ProxyProcess(server.uri, meta_db="mb_snapkill")
    db = "snapkill"
    try:
        proxy.start()
        with MongoClient(server.uri, directConnection=True) as d:
            d[db].items.insert_many([{"_id": i, "v": 0, "k": i % 5} for i in range(200)])
            d[db].items.create_index("k")
        _, parent = proxy.api("POST", "/branches", {"name": "p"})
        assert isinstance(parent, dict)
        with MongoClient(parent["uri"]) as p:
            p[db].items.update_many({"_id": {"$lt": 10}}, {"$set": {"v": "p"}})
        kids = {}
        for name, mode in (("w", "wal"), ("c", "copy")):
            status, kid = proxy.api("POST", "/branches", {"name": name, "from": "p",
                                                          "mode": mode})
            assert status == 201 and isinstance(kid, dict)
            with MongoClient(kid["uri"]) as c:
                c[db].items.update_one({"_id": 5}, {"$set": {"v": name}})
                c[db].items.delete_one({"_id": 150})
                kids[name] = (kid["uri"], view(c[db]))
        for round_ in range(3):
            acked = threading.Semaphore(0)
            stop = threading.Event()
            failures: list[Exception] = []
            writer = threading.Thread(target=_parent_workload, args=(
                parent["uri"], db, random.Random(rng.random()), acked, stop, str(round_),
                failures))
            writer.start()
            for _ in range(5 + rng.randrange(10)):
                assert acked.acquire(timeout=60), failures
            time.sleep(rng.uniform(0, 0.02))  # lands anywhere inside some write
            proxy.kill()
            stop.set()
            writer.join()
            assert failures == []
            proxy = ProxyProcess(server.uri, meta_db="mb_snapkill", port=proxy.port,
                                 admin_port=proxy.admin_port,
                                 branch_ports=proxy.branch_ports).start()
            for name, (uri, expected) in kids.items():
                with MongoClient(uri) as c:
                    assert view(c[db]) == expected, (round_, name)
    finally:
        proxy.stop()
        server.stop()


MAIN_WRITES = [
    *PARENT_WRITES[:-2],
    ("pipeline upsert", lambda c: c.update_one({"v": "pipe"}, [{"$set": {"k": 1}}],
                                               upsert=True)),
    ("update_all", lambda c: c.update_many({}, {"$set": {"k": 1}})),
    # The client-level bulkWrite command (MongoDB 8.0), each operation preserved first.
    ("client bulkWrite", lambda c: c.database.client.bulk_write([
        InsertOne(namespace=c.full_name, document={"_id": "cb", "k": 1}),
        UpdateOne(namespace=c.full_name, filter={"_id": 5}, update={"$set": {"v": "cb"}}),
        DeleteOne(namespace=c.full_name, filter={"_id": 6})])),
]


def test_branch_of_main_keeps_main_as_at_the_fork(
        proxy: ProxyProcess, client: MongoClient, direct: MongoClient, made: Branches,
        db_name: str) -> None:
    seed(client, db_name)
    client[db_name].other.insert_many([{"_id": i} for i in range(3)])
    branch = made.create()
    with made.client(branch) as b:
        b[db_name].items.update_one({"_id": 1}, {"$set": {"v": "b1"}})
        expected, catalog = view(b[db_name]), catalog_view(b[db_name])
        items = client[db_name].items
        for what, write in MAIN_WRITES:
            write(items)
            assert view(b[db_name]) == expected, what
        items.update_one({"_id": 3}, {"$set": {"v": "main3"}})
        for what, ddl in PARENT_DDL:
            ddl(client, db_name)
            assert catalog_view(b[db_name]) == catalog, what
        # The branch's own write on a document main changed applies to what it saw.
        b[db_name].items.update_one({"_id": 3}, {"$inc": {"v": 10}})
        assert b[db_name].items.find_one({"_id": 3}) == {"_id": 3, "v": 13, "k": 3}
    # Main's changes through the main port are in the WAL, with pre- and post-images.
    logged = direct[proxy.meta_db]["wal"].find_one({"b": "main", "ns": f"{db_name}.items",
                                                   "id": "new"})
    assert logged is not None and logged["op"] == "put" and "pre" not in logged
    assert logged["post"] == {"_id": "new", "v": 1, "k": 1}
    # A merge compares against main as at the fork: 3 was changed on both sides after it.
    result = merge(proxy, branch["name"], strategy="abort", dry_run=True)
    assert sorted(c["_id"] for c in result["conflicts"]) == [1, 3]
    assert [c["base"] for c in result["conflicts"] if c["_id"] == 3] == [
        {"_id": 3, "v": 3, "k": 3}]


def test_main_history_is_captured_with_or_without_children(
        proxy: ProxyProcess, client: MongoClient, direct: MongoClient, made: Branches,
        db_name: str) -> None:
    """Main's writes reach its WAL from the change stream, whoever makes them and whether
    or not main has children (without children the main port forwards them unchanged)."""
    branch = made.create()
    client[db_name].items.insert_one({"_id": "while"})
    made.cleanup()
    client[db_name].items.insert_one({"_id": "after"})
    direct[db_name].items.insert_one({"_id": "behind"})
    wal = direct[proxy.meta_db]["wal"]
    made.create()  # a fork waits for the capture to pass every write made before it
    for _id in ("while", "after", "behind"):
        logged = list(wal.find({"b": "main", "ns": f"{db_name}.items", "id": _id}))
        assert len(logged) == 1, _id
        assert logged[0]["client"] == {"app": "upstream", "via": "change stream"}
        assert logged[0]["post"] == {"_id": _id}
    status, listed = proxy.api("GET", "/branches")
    assert status == 200 and isinstance(listed, list)
    assert branch["name"] not in [b["name"] for b in listed]


def _random_op(rng: random.Random, n: int) -> Callable[[Any], Any]:
    """A seeded write whose effect is the same on any collection holding the same data
    (explicit ids, no server-chosen values)."""
    lo = rng.randrange(0, 60)
    kind = rng.randrange(7)
    if kind == 0:
        return lambda c: c.insert_one({"_id": f"i{n}", "v": n, "k": n % 5})
    if kind == 1:
        return lambda c: c.update_many({"_id": {"$gte": lo, "$lt": lo + 8}},
                                       {"$set": {"v": n}, "$inc": {"k": 1}})
    if kind == 2:
        return lambda c: c.delete_many({"k": lo % 5, "_id": {"$lt": lo}})
    if kind == 3:
        return lambda c: c.update_one({"_id": f"u{lo}"}, {"$inc": {"v": 1}}, upsert=True)
    if kind == 4:
        return lambda c: c.find_one_and_update({"_id": lo}, {"$set": {"v": f"f{n}"}})
    if kind == 5:
        return lambda c: c.replace_one({"_id": lo}, {"v": n, "k": 2})
    return lambda c: c.bulk_write([UpdateOne({"_id": lo}, {"$set": {"b": n}}),
                                   DeleteOne({"_id": lo + 1}),
                                   InsertOne({"_id": f"b{n}", "k": 0})], ordered=False)


def _contents(coll: Any) -> list[Any]:
    return sorted((repr(d) for d in coll.find()), key=str)


KINDS = ["main", "upstream", "mixed", "branch"]


@pytest.mark.parametrize("parent_kind", KINDS)
def test_differential_branch_equals_copy_at_fork_plus_own_writes(
        proxy: ProxyProcess, client: MongoClient, direct: MongoClient, made: Branches,
        db_name: str, parent_kind: str) -> None:
    """Seeded, interleaved writes on the parent and on the branch: the branch always equals
    a plain copy of the parent taken at the fork with the branch's own writes replayed.
    The parent is main written through the main port, main written straight on the
    upstream (another application), both at random, or a WAL branch."""
    rng = random.Random(SEED + KINDS.index(parent_kind))
    seed(client, db_name)
    client[db_name].items.insert_many([{"_id": i, "v": i, "k": i % 5} for i in range(30, 70)])
    if parent_kind != "branch":
        parent_uri = proxy.uri
    else:
        parent_uri = made.create()["uri"]
        with MongoClient(parent_uri) as p:
            for n in range(10):
                _random_op(rng, 1000 + n)(p[db_name].items)
    ref = direct[f"{db_name}_ref"].items
    with MongoClient(parent_uri) as p:
        ref.insert_many(list(p[db_name].items.find()))
        branch = made.create(**{"from": "main" if parent_kind != "branch"
                                else made.created[-1]})
        with made.client(branch) as b:
            for n in range(60):
                op = _random_op(rng, n)
                if rng.random() < 0.5:
                    behind = parent_kind == "upstream" or (
                        parent_kind == "mixed" and rng.random() < 0.5)
                    op(direct[db_name].items if behind else p[db_name].items)
                else:
                    op(b[db_name].items)
                    op(ref)
                assert _contents(b[db_name].items) == _contents(ref), n
            assert b[db_name].items.count_documents({"k": 1}) == ref.count_documents({"k": 1})
    direct.drop_database(f"{db_name}_ref")


def test_several_children_of_main_each_equal_a_copy_at_their_fork(
        proxy: ProxyProcess, client: MongoClient, direct: MongoClient, made: Branches,
        db_name: str) -> None:
    """With several children of main the capture lets a batch of main's changes grow
    before applying it (capture.py, `_coalesce`): runs of main's writes (through the main
    port and straight on the upstream) between reads, forks along the way, and each child
    always equals a plain copy of main taken at its fork plus its own writes."""
    rng = random.Random(SEED + 99)
    seed(client, db_name)
    client[db_name].items.insert_many([{"_id": i, "v": i, "k": i % 5} for i in range(30, 70)])
    kids: list[tuple[dict[str, Any], Any]] = []

    def fork(n: int) -> None:
        ref = direct[f"{db_name}_ref{n}"].items
        ref.insert_many(list(client[db_name].items.find()))
        kids.append((made.create(), ref))

    for n in range(3):
        fork(n)
    clients = [MongoClient(kid["uri"]) for kid, _ in kids]
    try:
        for n in range(60):
            if n == 30:
                fork(3)
                clients.append(MongoClient(kids[-1][0]["uri"]))
            op = _random_op(rng, n)
            if rng.random() < 0.6:
                op(direct[db_name].items if rng.random() < 0.5 else client[db_name].items)
            else:
                which = rng.randrange(len(kids))
                op(clients[which][db_name].items)
                op(kids[which][1])
            if rng.random() < 0.3:
                which = rng.randrange(len(kids))
                assert _contents(clients[which][db_name].items) == \
                    _contents(kids[which][1]), (n, which)
        for (_, ref), c in zip(kids, clients, strict=True):
            assert _contents(c[db_name].items) == _contents(ref)
            assert c[db_name].items.count_documents({"k": 1}) == ref.count_documents({"k": 1})
    finally:
        for c in clients:
            c.close()
        for n in range(len(kids)):
            direct.drop_database(f"{db_name}_ref{n}")


def test_reset_of_the_child_goes_back_to_the_parent_as_at_the_fork(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str) -> None:
    """A reset that undoes the child's own writes shows the parent's documents as they
    were at the fork, not as the parent changed them since."""
    seed(client, db_name)
    parent = made.create()
    child = made.create(**{"from": parent["name"]})
    with made.client(parent) as p, made.client(child) as c:
        expected = view(c[db_name])
        mark = entries(proxy, child["name"], limit=1)
        c[db_name].items.update_one({"_id": 1}, {"$set": {"v": "c1"}})
        c[db_name].items.delete_one({"_id": 2})
        c[db_name].items.insert_one({"_id": "new", "k": 1})
        p[db_name].items.update_many({"_id": {"$lt": 5}}, {"$set": {"v": "P"}})
        p[db_name].items.insert_one({"_id": "new", "v": "P", "k": 1})
        ok(proxy, "POST", f"/branches/{child['name']}/reset",
           {"to": mark[0]["lsn"] if mark else 0})
        assert view(c[db_name]) == expected
    assert diff(proxy, child["name"])["changes"] == []


def test_a_collection_new_on_the_branch_stays_its_own(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str) -> None:
    """A collection the branch creates by writing to it is the branch's own from the
    first write (nothing of the parent shows through it, whatever the parent does with
    that name later), and a reset to before that write shows it absent, as at the fork.
    Its writes hide no ids (overlay.Writer.hide), so the branch's diff and describe
    count its changes from the WAL."""
    seed(client, db_name)
    child = made.create()
    with made.client(child) as c:
        expected = view(c[db_name])
        mark = entries(proxy, child["name"], limit=1)
        c[db_name].fresh.insert_many([{"_id": i, "v": "c"} for i in range(3)])
        c[db_name].fresh.update_one({"_id": 0}, {"$set": {"v": "c2"}})
        c[db_name].fresh.delete_one({"_id": 2})
        # Main creates a collection of the same name, with an id the branch holds too.
        client[db_name].fresh.insert_many([{"_id": 1, "v": "main"}, {"_id": 9, "v": "main"}])
        client[db_name].fresh.insert_one({"_id": 10, "v": "main"})
        assert sorted(c[db_name].fresh.find(), key=lambda d: d["_id"]) == \
            [{"_id": 0, "v": "c2"}, {"_id": 1, "v": "c"}]
        assert c[db_name].fresh.count_documents({"v": "main"}) == 0
        assert c[db_name].fresh.find_one({"_id": 9}) is None
        shown = ok(proxy, "GET", f"/branches/{child['name']}")["namespaces"][
            f"{db_name}.fresh"]
        assert (shown["changed"], shown["kept"], shown["live"], shown["dropped"]) == \
            (3, 0, 2, False), shown
        assert {i for ns, _, i in doc_changes(diff(proxy, child["name"]))
                if ns == f"{db_name}.fresh"} == {0, 1}
        ok(proxy, "POST", f"/branches/{child['name']}/reset",
           {"to": mark[0]["lsn"] if mark else 0})
        assert view(c[db_name]) == expected
        assert "fresh" not in c[db_name].list_collection_names()
        assert c[db_name].fresh.find_one({"_id": 9}) is None
        c[db_name].items.drop()  # the parent's collection, which describe says it dropped
        shown = ok(proxy, "GET", f"/branches/{child['name']}")["namespaces"]
        assert shown[f"{db_name}.items"]["dropped"] is True, shown


def test_the_scenario_of_issue_11(proxy: ProxyProcess, client: MongoClient,
                                  direct: MongoClient, made: Branches, db_name: str) -> None:
    """The issue's scenario, run as written, checked at every step: writes on main
    through the main port, then straight on the upstream (another application)."""
    client[db_name].items.insert_many([{"_id": i, "v": i, "k": i % 5} for i in range(100)])
    client[db_name].items.create_index("k")
    snap = made.create(name=unique("snap"))
    assert snap["isolation"] == "snapshot"
    with made.client(snap) as b:
        items = b[db_name].items
        items.update_one({"_id": 0}, {"$set": {"v": "branch"}})
        at_fork = {d["_id"]: d for d in items.find()}

        def exact() -> None:
            assert {d["_id"]: d for d in items.find()} == at_fork
            assert items.count_documents({}) == 100
            assert sorted(d["_id"] for d in items.find({"k": 1}).hint("k_1")) == \
                sorted(i for i, d in at_fork.items() if d["k"] == 1)
            assert b[db_name].list_collection_names() == ["items"]

        main = client[db_name].items
        main.update_many({"_id": {"$gte": 10, "$lt": 20}}, {"$set": {"v": "main"}})
        exact()
        main.delete_many({"_id": {"$gte": 20, "$lt": 30}})
        exact()
        main.insert_one({"_id": "main-new", "k": 1})
        exact()
        client[db_name].created_on_main.insert_one({"_id": 1})
        exact()
        behind = direct[db_name].items
        behind.update_one({"_id": 40}, {"$set": {"v": "upstream", "k": 1}})
        exact()
        behind.insert_one({"_id": "upstream-new", "k": 1})
        exact()
        behind.delete_many({"_id": {"$gte": 50, "$lt": 55}})
        exact()
        behind.replace_one({"_id": 41}, {"k": 1})
        exact()
        direct[db_name].create_collection("created_upstream")
        direct[db_name].created_upstream.insert_one({"_id": 1})
        exact()
    _, info = proxy.api("GET", f"/branches/{snap['name']}")
    assert isinstance(info, dict) and info["isolation"] == "snapshot"
    # A child of a WAL branch: the parent's later update_many and insert do not show.
    parent = made.create()
    child = made.create(**{"from": parent["name"]})
    with made.client(parent) as p, made.client(child) as c:
        before = {d["_id"]: d for d in c[db_name].items.find()}
        p[db_name].items.update_many({"_id": {"$lt": 10}}, {"$set": {"v": "parent"}})
        p[db_name].items.insert_one({"_id": "parent-new"})
        assert {d["_id"]: d for d in c[db_name].items.find()} == before
        assert c[db_name].items.count_documents({}) == len(before)


def test_a_drop_behind_the_proxys_back_makes_the_child_say_so(
        proxy: ProxyProcess, direct: MongoClient, made: Branches, db_name: str) -> None:
    """What cannot be preserved after the fact is reported, never silent."""
    direct[db_name].items.insert_many([{"_id": i} for i in range(3)])
    kid = made.create()
    assert kid["isolation"] == "snapshot"
    direct[db_name].items.drop()
    with made.client(kid) as c:
        c[db_name].command("ping")
        c[db_name].items.find_one()  # the read waits for the capture to pass the drop
    _, info = proxy.api("GET", f"/branches/{kid['name']}")
    assert isinstance(info, dict)
    assert info["isolation"] == "proxy-writes-only"
    assert any(f"drop of {db_name}.items" in why for why in info["isolationBreaks"])
    assert f"branch {kid['name']} is no longer an exact snapshot" in proxy.read_log()


def test_index_and_option_changes_behind_the_proxys_back_leave_the_child_as_it_was(
        proxy: ProxyProcess, direct: MongoClient, made: Branches, db_name: str) -> None:
    """Index and validator changes made on the upstream directly reach the children as
    change events: each child that shows main's collection keeps its index list and
    options as at its fork, exactly (no isolation break), and its own writes meet that
    validator and those unique indexes. Two indexes of one createIndexes are two events,
    the second already in the list read for the first: it is undone there too."""
    items = direct[db_name].items
    items.insert_many([{"_id": i, "v": i, "k": i % 5} for i in range(10)])
    items.create_index("k")
    items.create_index("v", unique=True)
    kid = made.create()
    with made.client(kid) as c:
        at_fork = (sorted(ix["name"] for ix in c[db_name].items.list_indexes()),
                   c[db_name].list_collections(filter={"name": "items"}).next()["options"])
    items.create_indexes([IndexModel("a"), IndexModel("b", unique=True, sparse=True)])
    items.drop_index("v_1")
    direct[db_name].command("collMod", "items", validator={"v": {"$type": "string"}})
    items.insert_one({"_id": "main", "v": "ten", "k": 1})
    with made.client(kid) as c:
        kept = c[db_name].items
        assert kept.find_one({"_id": "main"}) is None  # waits for the capture
        assert (sorted(ix["name"] for ix in kept.list_indexes()),
                c[db_name].list_collections(filter={"name": "items"}).next()["options"]
                ) == at_fork
        assert at_fork[0] == ["_id_", "k_1", "v_1"]

        def hinted() -> tuple[Any, ...]:
            # v_1, which the base no longer has, hinted by each read that takes a hint.
            return (kept.find_one({"v": 3}, hint="v_1"),
                    kept.count_documents({"v": {"$gte": 3}}, hint="v_1"),
                    [d["_id"] for d in kept.aggregate([{"$match": {"v": {"$gte": 3}}},
                                                       {"$sort": {"_id": 1}}], hint="v_1")])

        assert hinted() == ({"_id": 3, "v": 3, "k": 3}, 7, [3, 4, 5, 6, 7, 8, 9])
        with pytest.raises(OperationFailure) as unknown:
            kept.find_one({"a": 1}, hint="a_1")
        assert unknown.value.code == 2
        kept.insert_one({"_id": "own", "v": 100, "b": 1})  # no validator at the fork
        kept.insert_one({"_id": "own2", "v": 101, "b": 1})  # no unique b at the fork
        # v_1 comes back whole, unique (SecantusDB's dropIndexes event names only its
        # key and name: the capture keeps the specs it listed).
        assert next(ix for ix in kept.list_indexes() if ix["name"] == "v_1")["unique"]
        with pytest.raises(OperationFailure) as dup:
            kept.insert_one({"_id": "own3", "v": 3})
        assert dup.value.code == 11000
        assert hinted() == ({"_id": 3, "v": 3, "k": 3}, 9,
                            [3, 4, 5, 6, 7, 8, 9, "own", "own2"])
    _, info = proxy.api("GET", f"/branches/{kid['name']}")
    assert isinstance(info, dict) and info["isolation"] == "snapshot", info
    assert sorted(ix["name"] for ix in items.list_indexes()) == ["_id_", "a_1", "b_1", "k_1"]


def test_an_index_collmod_behind_the_proxys_back_is_kept_or_reported(
        proxy: ProxyProcess, direct: MongoClient, made: Branches, db_name: str) -> None:
    """A TTL changed with collMod on the upstream directly: the child keeps the TTL of
    its fork where the change event says what it was (mongod's stateBeforeChange), and
    otherwise (SecantusDB's event names neither the index nor its options) reports that
    it is no longer exact, naming the collection; it never shows the new TTL as exact."""
    items = direct[db_name].items
    items.insert_many([{"_id": i, "t": i} for i in range(3)])
    items.create_index("t", expireAfterSeconds=3600)
    kid = made.create()
    direct[db_name].command("collMod", "items", index={"name": "t_1",
                                                       "expireAfterSeconds": 60})
    items.insert_one({"_id": "after"})
    with made.client(kid) as c:
        assert c[db_name].items.find_one({"_id": "after"}) is None  # waits for the capture
        ttl = {ix["name"]: ix.get("expireAfterSeconds")
               for ix in c[db_name].items.list_indexes()}["t_1"]
    _, info = proxy.api("GET", f"/branches/{kid['name']}")
    assert isinstance(info, dict)
    if info["isolation"] == "snapshot":
        assert ttl == 3600
    else:
        assert any(f"{db_name}.items: main changed it with collMod" in why
                   for why in info["isolationBreaks"]), info


def test_log_of_main_lists_main_port_writes_while_main_has_children(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str) -> None:
    client[db_name].items.insert_many([{"_id": i, "v": i} for i in range(5)])
    made.create()
    client[db_name].items.update_one({"_id": 1}, {"$set": {"v": "x"}})
    client[db_name].items.delete_one({"_id": 2})
    client[db_name].items.insert_one({"_id": 9}, )
    mine = [(e["op"], e["_id"]) for e in entries(proxy, "main", limit=50)
            if e["ns"] == f"{db_name}.items"]
    # Newest first: the three writes, then the insert_many before the branch existed.
    assert mine == [("put", 9), ("delete", 2), ("put", 1), *[("put", i) for i in (4, 3, 2, 1, 0)]]


def test_children_of_main_stay_exact_across_a_restart(tmp_path: Path) -> None:
    """After a restart the main port knows main has children before it serves writes as
    pass-through: a write after the restart is preserved like one before it."""
    server = Secantus(storage=str(tmp_path / "data")).start()
    proxy = ProxyProcess(server.uri, meta_db="mb_snaprestart")
    db = "snaprestart"
    try:
        proxy.start()
        with MongoClient(proxy.uri) as m:
            m[db].items.insert_many([{"_id": i, "v": i, "k": i % 5} for i in range(20)])
            m[db].items.create_index("k")
            _, kid = proxy.api("POST", "/branches", {"name": "kid"})
            assert isinstance(kid, dict)
            with MongoClient(kid["uri"]) as c:
                expected = view(c[db])
            m[db].items.update_many({"_id": {"$lt": 5}}, {"$set": {"v": "before"}})
        assert proxy.stop() == 0
        proxy = ProxyProcess(server.uri, meta_db="mb_snaprestart", port=proxy.port,
                             admin_port=proxy.admin_port,
                             branch_ports=proxy.branch_ports).start()
        with MongoClient(proxy.uri) as m, MongoClient(kid["uri"]) as c:
            assert view(c[db]) == expected
            m[db].items.update_many({}, {"$set": {"v": "after"}})
            m[db].items.delete_many({"k": 1})
            m[db].items.insert_one({"_id": "new", "k": 1})
            assert view(c[db]) == expected
    finally:
        proxy.stop()
        server.stop()


def test_a_child_keeps_a_large_document_its_parent_deletes(
        proxy: ProxyProcess, client: MongoClient, direct: MongoClient, made: Branches,
        db_name: str) -> None:
    """A child keeps a pre-image in a `keep` entry holding it once (as its post-image):
    a document of 9 MiB of random bytes, which no entry could hold twice, is kept, and
    the child stays exact when its parent deletes it."""
    big = os.urandom(9 * 1024 * 1024)
    client[db_name].items.insert_many([{"_id": "big", "b": big}, {"_id": "small", "v": 0}])
    parent = made.create()
    child = made.create(**{"from": parent["name"]})
    with made.client(parent) as p:
        p[db_name].items.delete_many({})
        assert p[db_name].items.count_documents({}) == 0
    with made.client(child) as c:
        assert c[db_name].items.find_one({"_id": "small"}) == {"_id": "small", "v": 0}
        assert c[db_name].items.find_one({"_id": "big"}) == {"_id": "big", "b": big}
    status, info = proxy.api("GET", f"/branches/{child['name']}")
    assert status == 200 and isinstance(info, dict)
    assert info["isolation"] == "snapshot", info
    keeps = list(direct[proxy.meta_db or ""].wal.find(
        {"b": bid_of(direct, proxy, child["name"]), "op": "keep", "ns": f"{db_name}.items",
         "id": "big"}, {"pre": 1, "prez": 1, "postz": 1}))
    assert len(keeps) == 1 and "pre" not in keeps[0] and "prez" not in keeps[0], keeps


@pytest.mark.parametrize("parent_kind", ["main", "branch"])
def test_a_reset_to_before_the_branch_changed_a_collection_itself_shows_it_as_it_was(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str,
        parent_kind: str) -> None:
    """A reset takes a collection back across the branch's own drop and index changes:
    its documents and indexes are the parent's as at the fork again, whatever the parent
    did while the branch held the collection whole."""
    seed(client, db_name)
    parent = made.create() if parent_kind == "branch" else None
    child = made.create(**({"from": parent["name"]} if parent else {}))
    with made.client(child) as c:
        expected = view(c[db_name])
        mark = entries(proxy, child["name"], limit=1)
        items = c[db_name].items
        items.create_index("v")
        items.create_index("w")
        items.update_one({"_id": 0}, {"$set": {"x": 1}})
        made_index = view(c[db_name])
        between = entries(proxy, child["name"], limit=1)
        items.drop_index("w_1")
        items.drop()
        items.insert_many([{"_id": i, "v": "c", "k": 1} for i in range(3)])
        items.create_index("k", name="k_1")
        # The parent changes documents and indexes while the branch holds items whole.
        p = made.client(parent) if parent else client
        p[db_name].items.update_many({"_id": {"$lt": 5}}, {"$set": {"v": "P"}})
        p[db_name].items.insert_one({"_id": "new", "v": "P", "k": 1})
        p[db_name].items.delete_one({"_id": 14})
        p[db_name].items.create_index("v", name="parent_v")
        if parent:
            p.close()
        ok(proxy, "POST", f"/branches/{child['name']}/reset", {"to": between[0]["lsn"]})
        assert view(c[db_name]) == made_index
        ok(proxy, "POST", f"/branches/{child['name']}/reset",
           {"to": mark[0]["lsn"] if mark else 0})
        assert view(c[db_name]) == expected
    assert diff(proxy, child["name"])["changes"] == []


def options_view(db: Database) -> dict[str, Any]:
    """Each collection's options as listCollections gives them."""
    return {c["name"]: c.get("options", {}) for c in db.list_collections()}


@pytest.mark.parametrize("parent_kind", ["main", "branch"])
def test_resets_across_the_branchs_own_ddl_show_each_point_as_it_was(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str,
        parent_kind: str) -> None:
    """The child runs every kind of DDL itself, then its parent runs them all too; a
    reset to each point of the child's log, newest first, shows the child's catalog,
    documents and options exactly as they were at that point (the last one: the parent
    as at the fork)."""
    seed(client, db_name)
    client[db_name].other.insert_many([{"_id": i, "o": i} for i in range(3)])
    parent = made.create() if parent_kind == "branch" else None
    child = made.create(**({"from": parent["name"]} if parent else {}))
    with made.client(child) as c:
        def point() -> tuple[int, dict[str, Any]]:
            last = entries(proxy, child["name"], limit=1)
            return (last[0]["lsn"] if last else 0,
                    {**catalog_view(c[db_name]), "options": options_view(c[db_name])})

        points = [point()]
        steps = [*PARENT_DDL, ("collMod", lambda p, db: p[db].command(
            "collMod", "items", validator={"k": {"$exists": True}}))]
        for _, ddl in steps:
            ddl(c, db_name)
            lsn, shown = point()
            if lsn != points[-1][0]:
                points.append((lsn, shown))
        p = made.client(parent) if parent else client
        for _, ddl in steps:
            ddl(p, db_name)
        p[db_name].items.insert_many([{"_id": i, "k": "p"} for i in range(10, 15)])
        if parent:
            p.close()
        for lsn, shown in reversed(points):
            ok(proxy, "POST", f"/branches/{child['name']}/reset", {"to": lsn})
            assert point()[1] == shown, lsn


def _random_step(rng: random.Random, db: Database, side: str) -> None:
    """One seeded write or collection-level change on `items`/`other` of a branch or
    its parent; errors a step may meet (a dropped index, a missing collection) are the
    step's own and leave nothing behind."""
    coll = db[rng.choice(["items", "other"])]
    i = rng.randrange(40)
    kind = rng.choice(["insert", "update", "update", "delete", "upsert", "many",
                       "index", "unindex", "drop", "refill", "rename", "collMod"])
    try:
        if kind == "insert":
            coll.insert_one({"_id": f"{side}{i}", "v": i, "k": i % 3})
        elif kind == "update":
            coll.update_one({"_id": i}, {"$set": {"v": f"{side}{i}"}})
        elif kind == "delete":
            coll.delete_one({"_id": rng.randrange(40)})
        elif kind == "upsert":
            coll.update_one({"_id": i}, {"$inc": {"n": 1}}, upsert=True)
        elif kind == "many":
            coll.update_many({"k": i % 3}, {"$inc": {"m": 1}})
        elif kind == "index":
            coll.create_index(rng.choice(["v", "k", "m"]))
        elif kind == "unindex":
            coll.drop_index(rng.choice(["v_1", "k_1", "m_1"]))
        elif kind == "drop":
            coll.drop()
        elif kind == "refill":
            coll.insert_many([{"_id": j, "v": side, "k": j % 3} for j in range(i, i + 3)],
                             ordered=False)
        elif kind == "rename":
            coll.rename("items" if coll.name == "other" else "other", dropTarget=True)
        else:
            db.command("collMod", coll.name, validator={"v": {"$exists": True}})
    except PyMongoError:
        pass


@pytest.mark.parametrize("seed_offset", range(4))
def test_seeded_resets_across_writes_and_ddl_of_both_sides(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str,
        seed_offset: int) -> None:
    """Seeded writes and collection-level changes on a branch and its parent, mixed;
    then resets of the branch to its recorded points in a seeded order (back and forth,
    across earlier resets): each shows the branch's catalog, documents, indexes and
    options exactly as they were at that point."""
    rng = random.Random(SEED + seed_offset)
    seed(client, db_name)
    client[db_name].other.insert_many([{"_id": i, "o": i, "k": i % 3} for i in range(10)])
    parent = made.create() if seed_offset % 2 else None
    child = made.create(**({"from": parent["name"]} if parent else {}))
    p = made.client(parent) if parent else client
    with made.client(child) as c:
        def shown() -> dict[str, Any]:
            return {"fingerprint": fingerprint(c[db_name]),
                    "options": options_view(c[db_name])}

        def newest() -> int:
            # Main's log first: its writes so far are captured, the child's copies of
            # them logged, so none lands inside the child's next step.
            entries(proxy, "main", limit=1)
            last = entries(proxy, child["name"], limit=1)
            return int(last[0]["lsn"]) if last else 0

        points: dict[int, dict[str, Any]] = {0: shown()}
        for _ in range(30):
            if rng.random() < 0.6:
                before = newest()
                _random_step(rng, c[db_name], "c")
                # A point is the state right after a step that logged an entry.
                if (lsn := newest()) != before:
                    points.setdefault(lsn, shown())
            else:
                _random_step(rng, p[db_name], "p")
        order = list(points)
        rng.shuffle(order)
        for lsn in order:
            ok(proxy, "POST", f"/branches/{child['name']}/reset", {"to": lsn})
            assert shown() == points[lsn], (lsn, order)
    if parent:
        p.close()


@pytest.mark.parametrize(("cmd", "changed"), [
    ({"convertToCapped": "items", "size": 65536}, "items"),
    ({"emptycapped": "items"}, "items"),
    ({"cloneCollectionAsCapped": "items", "toCollection": "capped", "size": 65536},
     "capped"),
])
def test_whole_collection_commands_on_main_leave_the_children_their_copy(
        proxy: ProxyProcess, client: MongoClient, direct: MongoClient, made: Branches,
        db_name: str, cmd: dict[str, Any], changed: str) -> None:
    """convertToCapped, emptycapped and cloneCollectionAsCapped on the main port while
    main has a child: the child first takes its own copy of the collection the command
    changes or makes (as for main's other DDL), then the command runs on the upstream
    and the client gets its answer. mongod converts, empties or clones, and the child
    still shows the collection as at its fork. SecantusDB implements none of the three:
    its CommandNotFound reaches the client as the upstream's answer (not a refusal of
    the proxy's), and what mongod does to the collection is not checked there."""
    client[db_name].items.insert_many([{"_id": i} for i in range(3)])
    child = made.create()
    bid = bid_of(direct, proxy, child["name"])
    try:
        client[db_name].command(cmd)
    except OperationFailure as exc:
        assert exc.code == 59, exc.details  # SecantusDB: no such command (see above)
    state = direct[proxy.meta_db or ""].namespaces.find_one({"_id": f"{bid}:{db_name}.{changed}"})
    # Held whole from now on (a child of main copies all it shows of a collection).
    assert state is not None and (state.get("owned") or state.get("detached")), state
    with made.client(child) as c:
        assert sorted(d["_id"] for d in c[db_name].items.find()) == [0, 1, 2]
        assert "capped" not in c[db_name].list_collection_names()
        assert not c[db_name].items.options().get("capped")


def test_deprecated_and_internal_commands_on_main_say_why_they_are_refused(
        client: MongoClient, made: Branches, db_name: str) -> None:
    """While main has a child, `applyOps` (internal to mongod) and a `mapReduce` writing
    a collection (deprecated since 5.0) are refused with the reason; an inline mapReduce
    writes nothing and reaches the upstream."""
    client[db_name].items.insert_many([{"_id": i, "k": i % 2} for i in range(4)])
    made.create()
    for cmd, why in (({"applyOps": [{"op": "i", "ns": f"{db_name}.items", "o": {"_id": 9}}]},
                      "internal command"),
                     ({"mapReduce": "items", "map": "function() { emit(this.k, 1); }",
                       "reduce": "function(k, v) { return v.length; }", "out": "counted"},
                      "deprecated")):
        with pytest.raises(OperationFailure) as refused:
            client[db_name].command(cmd)
        assert refused.value.code == 20, refused.value.details
        assert why in str(refused.value) and "child branches" in str(refused.value)
    reply = client[db_name].command({
        "mapReduce": "items", "map": "function() { emit(this.k, 1); }",
        "reduce": "function(key, values) { return values.length; }", "out": {"inline": 1}})
    assert sorted((r["_id"], r["value"]) for r in reply["results"]) == [(0, 2.0), (1, 2.0)]
