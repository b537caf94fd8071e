"""mongod's BSON types in every reply the proxy builds.

pymongo accepts a cursor id sent as int32 where mongod sends int64; the Node, Go and
Java drivers do not. So the same commands go over raw sockets to the upstream itself, to
the main port and to a branch port that changed the collections (so that the proxy
builds the replies), and the replies are compared element by element: same keys, in the
same order, with the same BSON type, recursively. Values (namespaces, cursor ids, times)
are not compared. bson's decoder maps every BSON element type to its own Python type
(int32 to int, int64 to Int64, double to float, ...), so the type names below are the
type bytes on the wire.

Each target has its own database, seeded identically: `U` the upstream, `M` the main
port, `B` the branch port. Admin commands exist only on the proxy: there the main and
the branch port are compared, and mongod's conventions checked (ok a double, cursor ids
int64) as everywhere.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from bson import Binary, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from pymongo import MongoClient

from tests import rawwire
from tests.branchutil import Branches, unique
from tests.servers import ProxyProcess

# Reply fields whose presence the upstream decides (cluster-time gossip): compared
# separately from the reply bodies.
GOSSIP = ("$clusterTime", "operationTime")

_BSON_TYPES: list[tuple[type, str]] = [
    (bool, "bool"), (Int64, "int64"), (int, "int32"), (float, "double"), (str, "string"),
    (dict, "object"), (list, "array"), (bytes, "binData"), (Binary, "binData"),
    (ObjectId, "objectId"), (datetime.datetime, "date"), (type(None), "null"),
    (Regex, "regex"), (Timestamp, "timestamp"), (Decimal128, "decimal"),
    (Code, "javascript"), (MinKey, "minKey"), (MaxKey, "maxKey"),
]


def bson_type(value: Any) -> str:
    for cls, name in _BSON_TYPES:
        if type(value) is cls:
            return name
    raise AssertionError(f"unexpected decoded type {type(value)!r}")


def shape(value: Any) -> Any:
    """The value's BSON types, values left out: a document as ("object", [(key, shape)]
    in order), an array as ("array", [shape]), anything else as its type name."""
    if isinstance(value, dict):
        return ("object", [(key, shape(item)) for key, item in value.items()])
    if isinstance(value, list):
        return ("array", [shape(item) for item in value])
    return bson_type(value)


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Every place where two shapes differ, by path."""
    where = path or "<reply>"
    kind_e = expected if isinstance(expected, str) else expected[0]
    kind_a = actual if isinstance(actual, str) else actual[0]
    if kind_e != kind_a:
        return [f"{where}: {kind_e} expected, {kind_a} sent"]
    if isinstance(expected, str):
        return []
    items_e, items_a = expected[1], actual[1]
    out: list[str] = []
    if kind_e == "object":
        keys_e, keys_a = [k for k, _ in items_e], [k for k, _ in items_a]
        if keys_e != keys_a:
            out.append(f"{where}: keys {keys_e} expected, {keys_a} sent")
        got = dict(items_a)
        for key, sub in items_e:
            if key in got:
                out += differences(sub, got[key], f"{path}.{key}" if path else key)
        return out
    if len(items_e) != len(items_a):
        return [f"{where}: {len(items_e)} elements expected, {len(items_a)} sent"]
    for i, (sub_e, sub_a) in enumerate(zip(items_e, items_a, strict=True)):
        out += differences(sub_e, sub_a, f"{path}[{i}]")
    return out


def convention_problems(reply: dict[str, Any], path: str = "") -> list[str]:
    """mongod's conventions, wherever they apply: ok is a double, cursor ids int64."""
    out = []
    if "ok" in reply and bson_type(reply["ok"]) != "double":
        out.append(f"{path}ok is {bson_type(reply['ok'])}, mongod sends a double")
    cursor = reply.get("cursor")
    if isinstance(cursor, dict) and "id" in cursor and bson_type(cursor["id"]) != "int64":
        out.append(f"{path}cursor.id is {bson_type(cursor['id'])}, mongod sends an int64")
    return out


# -- targets ---------------------------------------------------------------------------
@dataclass
class Target:
    """One port and the database it works in."""

    name: str
    port: int
    db: str

    def session(self) -> Session:
        return Session(self, rawwire.connect(self.port))


class Session:
    """A raw connection that keeps every reply it got, for comparison."""

    def __init__(self, target: Target, sock: Any):
        self.target = target
        self.sock = sock
        self.replies: list[tuple[str, dict[str, Any]]] = []
        self._ids = 0

    def __call__(self, cmd: dict[str, Any], db: str | None = None) -> dict[str, Any]:
        self._ids += 1
        reply = rawwire.command(self.sock, {**cmd, "$db": db or self.target.db},
                                request_id=self._ids)
        self.replies.append((next(iter(cmd)), reply))
        return reply

    def drain(self, first: dict[str, Any], coll: str, batch: int) -> None:
        """getMore until the cursor is exhausted (bounded: the test data is small)."""
        cursor_id = first["cursor"]["id"]
        for _ in range(20):
            if not cursor_id:
                return
            reply = self({"getMore": cursor_id, "collection": coll, "batchSize": batch})
            assert reply.get("ok") == 1, reply
            cursor_id = reply["cursor"]["id"]
        raise AssertionError("cursor never exhausted")

    def close(self) -> None:
        self.sock.close()


def seed(db: Any) -> None:
    """The same documents, indexes and collections in every target's database."""
    db.items.insert_many([
        {"_id": i, "n": i, "big": Int64(i << 40), "f": i / 2, "s": f"s{i}", "tags": [i, "x"],
         "sub": {"a": i}, "when": datetime.datetime(2026, 1, 1 + i)} for i in range(10)])
    db.items.create_index("n")
    db.other.insert_one({"_id": 1})
    db.refilled.insert_many(REFILLED)
    for name in WRITE_COLLS:
        db[name].insert_many([{"_id": i, "u": f"u{i}", "n": i} for i in range(10)])
        db[name].create_index("u", unique=True)


# Dropped and refilled on the branch, which then owns it outright: its reads run in place,
# the proxy holding their cursors under the user's namespace.
REFILLED = [{"_id": i, "n": i % 4, "big": Int64(i)} for i in range(10)]
WRITE_COLLS = ("w_insert", "w_update", "w_delete", "w_fam", "w_merge", "w_wc", "w_dup")


@dataclass
class World:
    upstream: Target
    main: Target
    branch: Target


@pytest.fixture(scope="module")
def world(proxy: ProxyProcess, direct: MongoClient) -> Iterator[World]:
    tag = unique("rt").replace("-", "_")
    dbs = {t: f"{tag}_{t}" for t in "UMB"}
    for name in dbs.values():
        seed(direct[name])
    made = Branches(proxy)
    info = made.create()
    try:
        with MongoClient(info["uri"], serverSelectionTimeoutMS=10000) as on_branch:
            db = on_branch[dbs["B"]]
            # Touch every collection the cases read, so the branch port serves them
            # itself; the views stay equal to the upstream's documents.
            db.items.update_one({"_id": 0}, {"$set": {"s": "s0"}})
            db.other.update_one({"_id": 1}, {"$set": {"x": None}})
            db.fresh.insert_one({"_id": 1})
            db.refilled.drop()
            db.refilled.insert_many(REFILLED)
            for name in WRITE_COLLS:
                db[name].update_one({"_id": 9}, {"$set": {"n": 9}})
        for t in "UM":
            direct[dbs[t]].other.update_one({"_id": 1}, {"$set": {"x": None}})
            direct[dbs[t]].fresh.insert_one({"_id": 1})
        yield World(Target("upstream", proxy_upstream_port(direct), dbs["U"]),
                    Target("main port", proxy.port, dbs["M"]),
                    Target("branch port", int(info["port"]), dbs["B"]))
    finally:
        made.cleanup()
        for name in dbs.values():
            direct.drop_database(name)


def proxy_upstream_port(direct: MongoClient) -> int:
    address = direct.address
    assert address is not None
    return int(address[1])


# -- cases -----------------------------------------------------------------------------
Case = Callable[[Session], None]


def find_single_batch(run: Session) -> None:
    run({"find": "items", "filter": {}, "sort": {"_id": 1}})


def find_batches(run: Session) -> None:
    run.drain(run({"find": "items", "filter": {}, "sort": {"_id": 1}, "batchSize": 3}),
              "items", 3)


def find_unsorted_batches(run: Session) -> None:
    run.drain(run({"find": "items", "filter": {"n": {"$gte": 0}}, "batchSize": 4}),
              "items", 4)


def find_limit(run: Session) -> None:
    run.drain(run({"find": "items", "filter": {"n": {"$gte": 2}}, "sort": {"n": -1},
                   "limit": 5, "batchSize": 2}), "items", 2)


def find_single_batch_flag(run: Session) -> None:
    run({"find": "items", "sort": {"_id": 1}, "limit": 3, "singleBatch": True})
    run({"find": "items", "filter": {"n": {"$gt": 1}}, "limit": 3, "singleBatch": True})


def find_points(run: Session) -> None:
    run({"find": "items", "filter": {"_id": 0}})
    run({"find": "items", "filter": {"_id": 5}})
    run({"find": "items", "filter": {"_id": 12345}})


def find_empty(run: Session) -> None:
    run({"find": "items", "filter": {"n": -1}})
    run({"find": "items", "filter": {"n": -1}, "sort": {"n": 1}, "batchSize": 0})


def find_projection(run: Session) -> None:
    run.drain(run({"find": "items", "projection": {"big": 1, "when": 1}, "sort": {"_id": 1},
                   "batchSize": 4}), "items", 4)


def owned_collection(run: Session) -> None:
    run.drain(run({"find": "refilled", "sort": {"_id": 1}, "batchSize": 3}), "refilled", 3)
    run.drain(run({"find": "refilled", "filter": {"n": {"$gt": 0}}, "batchSize": 4}),
              "refilled", 4)
    run.drain(run({"aggregate": "refilled", "pipeline": [{"$sort": {"_id": -1}}],
                   "cursor": {"batchSize": 3}}), "refilled", 3)
    first = run({"aggregate": "refilled", "pipeline": [], "cursor": {"batchSize": 2}})
    run({"killCursors": "refilled", "cursors": [first["cursor"]["id"]]})
    run({"count": "refilled", "query": {"n": 1}})
    run({"distinct": "refilled", "key": "n"})
    run({"listIndexes": "refilled"})
    run({"listCollections": 1, "filter": {"name": "refilled"}})


def aggregate_batches(run: Session) -> None:
    run.drain(run({"aggregate": "items", "pipeline": [{"$sort": {"_id": 1}}],
                   "cursor": {"batchSize": 3}}), "items", 3)


def aggregate_group(run: Session) -> None:
    run({"aggregate": "items", "pipeline": [
        {"$group": {"_id": {"$mod": ["$n", 2]}, "total": {"$sum": "$big"},
                    "n": {"$sum": 1}}}, {"$sort": {"_id": 1}}], "cursor": {}})


def aggregate_merge(run: Session) -> None:
    run({"aggregate": "items", "pipeline": [{"$match": {"n": {"$lt": 3}}},
                                            {"$project": {"n": 1}},
                                            {"$merge": {"into": "w_merge"}}], "cursor": {}})


def kill_cursors(run: Session) -> None:
    first = run({"find": "items", "sort": {"_id": 1}, "batchSize": 2})
    run({"killCursors": "items", "cursors": [first["cursor"]["id"]]})


def list_collections(run: Session) -> None:
    run({"listCollections": 1})
    run({"listCollections": 1, "nameOnly": True})
    run({"listCollections": 1, "filter": {"name": "items"}})
    run({"listCollections": 1, "filter": {"name": "fresh"}})
    run({"listCollections": 1, "filter": {"name": "nothing-here"}})


def list_indexes(run: Session) -> None:
    run({"listIndexes": "items"})
    run({"listIndexes": "w_insert"})


def count(run: Session) -> None:
    run({"count": "items"})
    run({"count": "items", "query": {"n": {"$gt": 3}}})
    run({"count": "items", "query": {"n": {"$gt": 3}}, "skip": 1, "limit": 2})


def distinct(run: Session) -> None:
    run({"distinct": "items", "key": "n"})
    run({"distinct": "items", "key": "sub.a", "query": {"n": {"$lt": 4}}})
    run({"distinct": "items", "key": "tags"})


def insert(run: Session) -> None:
    run({"insert": "w_insert", "documents": [{"_id": 100, "u": "a"}, {"_id": 101, "u": "b"}]})
    run({"insert": "w_insert", "documents": [{"_id": 102, "u": "c"}, {"_id": 0, "u": "d"},
                                             {"_id": 103, "u": "e"}]})
    run({"insert": "w_insert", "ordered": False,
         "documents": [{"_id": 104, "u": "u1"}, {"_id": 105, "u": "f"}, {"_id": 105, "u": "g"}]})


def update(run: Session) -> None:
    run({"update": "w_update", "updates": [
        {"q": {"_id": 1}, "u": {"$set": {"x": 1}}},
        {"q": {"n": {"$gte": 5}}, "u": {"$inc": {"n": 100}}, "multi": True},
        {"q": {"_id": 500}, "u": {"$set": {"x": 1}}, "upsert": True},
        {"q": {"_id": -1}, "u": {"$set": {"x": 1}}}]})
    run({"update": "w_update", "updates": [{"q": {"_id": 2}, "u": {"$set": {"u": "u3"}}}]})


def delete(run: Session) -> None:
    run({"delete": "w_delete", "deletes": [{"q": {"_id": 3}, "limit": 1},
                                           {"q": {"n": {"$gte": 7}}, "limit": 0},
                                           {"q": {"_id": -1}, "limit": 1}]})


def find_and_modify(run: Session) -> None:
    run({"findAndModify": "w_fam", "query": {"_id": 1}, "update": {"$inc": {"n": 1}},
         "new": True, "fields": {"n": 1}})
    run({"findAndModify": "w_fam", "query": {"_id": 2}, "update": {"$inc": {"n": 1}}})
    run({"findAndModify": "w_fam", "query": {"_id": 3}, "remove": True})
    run({"findAndModify": "w_fam", "query": {"_id": -1}, "update": {"$inc": {"n": 1}}})
    run({"findAndModify": "w_fam", "query": {"_id": 600}, "update": {"$set": {"n": 1}},
         "upsert": True, "new": True})
    run({"findAndModify": "w_fam", "query": {"_id": 601}, "update": {"$set": {"n": 1}},
         "upsert": True})
    run({"findAndModify": "w_fam", "query": {"_id": 4}, "update": {"$set": {"u": "u5"}}})


# A write concern no single server satisfies: the write is applied and the reply
# carries a writeConcernError.
UNSATISFIABLE = {"w": 2, "wtimeout": 10}


def write_concern_errors(run: Session) -> None:
    run({"insert": "w_wc", "documents": [{"_id": 1, "u": "a"}],
         "writeConcern": UNSATISFIABLE})
    run({"insert": "w_wc", "documents": [{"_id": 2, "u": "b"}, {"_id": 1, "u": "c"}],
         "writeConcern": UNSATISFIABLE})
    run({"update": "w_wc", "updates": [{"q": {"_id": 3}, "u": {"$set": {"x": 1}}}],
         "writeConcern": UNSATISFIABLE})
    run({"delete": "w_wc", "deletes": [{"q": {"_id": 4}, "limit": 1}],
         "writeConcern": UNSATISFIABLE})
    run({"findAndModify": "w_wc", "query": {"_id": 5}, "update": {"$set": {"x": 1}},
         "writeConcern": UNSATISFIABLE})


def errors(run: Session) -> None:
    run({"find": "items", "filter": {"$bogus": 1}})
    run({"insert": "w_insert", "documents": "not an array"})
    run({"listIndexes": "no_such_collection"})


def collection_stats(run: Session) -> None:
    for coll in ("items", "refilled"):
        run({"collStats": coll})
        run({"aggregate": coll, "pipeline": [{"$collStats": {"storageStats": {}, "count": {}}}],
             "cursor": {}})
        run({"aggregate": coll, "pipeline": [{"$indexStats": {}}], "cursor": {}})
    run({"dbStats": 1})


CASES: dict[str, Case] = {f.__name__: f for f in (
    find_single_batch, find_batches, find_unsorted_batches, find_limit,
    find_single_batch_flag, find_points, find_empty, find_projection, owned_collection,
    aggregate_batches,
    aggregate_group, aggregate_merge, kill_cursors, list_collections, list_indexes, count,
    distinct, insert, update, delete, find_and_modify, write_concern_errors, errors,
    collection_stats)}


def _comparable(name: str, reply: dict[str, Any]) -> dict[str, Any]:
    """The reply with a catalog's entries in name order (the server lists them in no set
    order). Two things the proxy itself puts on the upstream are left out of a listing:
    the overlay collections (`__mb_*`, which the ports never list; the capture makes them
    for the children of main when main creates a collection after their fork), and the
    pre-image option the capture turns on for main's collections (a collection a branch
    recreated has only the options the branch gave it)."""
    body = dict(reply)
    cursor = body.get("cursor")
    if name in ("listCollections", "listIndexes") and isinstance(cursor, dict):
        cursor = dict(cursor)
        entries = [d for d in cursor["firstBatch"]
                   if not str(d.get("name", "")).startswith("__mb_")]
        if name == "listCollections":
            entries = [_without_pre_images(d) for d in entries]
        cursor["firstBatch"] = sorted(entries, key=lambda d: d["name"])
        body["cursor"] = cursor
    return body


def _without_pre_images(entry: dict[str, Any]) -> dict[str, Any]:
    options = entry.get("options")
    if not isinstance(options, dict) or "changeStreamPreAndPostImages" not in options:
        return entry
    return {**entry, "options": {k: v for k, v in options.items()
                                 if k != "changeStreamPreAndPostImages"}}


def run_case(target: Target, case: Case) -> list[tuple[str, dict[str, Any]]]:
    session = target.session()
    try:
        case(session)
    finally:
        session.close()
    return session.replies


def ok_last(reply: dict[str, Any]) -> dict[str, Any]:
    """A successful reply with ok after its own fields, as mongod's command framework
    appends it, then the gossip. SecantusDB puts ok before writeErrors in insert replies."""
    if not reply.get("ok"):
        return reply
    body = {k: v for k, v in reply.items() if k != "ok" and k not in GOSSIP}
    return {**body, "ok": reply["ok"], **{k: reply[k] for k in GOSSIP if k in reply}}


def compare(expected: list[tuple[str, dict[str, Any]]],
            actual: list[tuple[str, dict[str, Any]]], what: str,
            mongod_order: bool = False) -> list[str]:
    """The differences in shape; with mongod_order, the expected replies are first put in
    mongod's order (the proxy builds those replies; the main port forwards the upstream's)."""
    names_e, names_a = [n for n, _ in expected], [n for n, _ in actual]
    if names_e != names_a:
        return [f"{what}: commands {names_e} expected, {names_a} sent"]
    out = []
    for i, ((name, want), (_, got)) in enumerate(zip(expected, actual, strict=True)):
        want = _comparable(name, want)
        if mongod_order:
            want = ok_last(want)
        for problem in differences(shape(want),
                                   shape(_comparable(name, got))):
            out.append(f"{what} #{i} {name}: {problem}")
    return out


# SecantusDB puts ok before writeErrors in an insert's reply; mongod after. The ports,
# which build write replies, are held to mongod's order.
_GAPS = {"insert": "SecantusDB orders an insert reply n, ok, writeErrors; mongod puts ok last",
         "write_concern_errors": "SecantusDB orders an insert reply n, ok, writeErrors; "
                                 "mongod puts ok last"}


@pytest.mark.parametrize("case", [
    pytest.param(name, marks=pytest.mark.secantus_gap(reason=_GAPS[name]))
    if name in _GAPS else name for name in CASES])
def test_reply_types_match_the_upstream(world: World, case: str) -> None:
    direct = run_case(world.upstream, CASES[case])
    for _, reply in direct:
        assert not convention_problems(reply), (reply, convention_problems(reply))
    problems = []
    for target in (world.main, world.branch):
        replies = run_case(target, CASES[case])
        for name, reply in replies:
            problems += [f"{target.name} {name}: {p}" for p in convention_problems(reply)]
        # Both ports build write replies here: world.branch is a child of main, so the
        # main port intercepts writes to preserve them in it (snapshots) and answers them
        # itself, in mongod's order.
        problems += compare(direct, replies, target.name, mongod_order=True)
    assert not problems, "\n".join(problems)


# -- admin commands --------------------------------------------------------------------
def test_admin_replies_have_mongod_conventions(world: World) -> None:
    """The branch commands exist only on the proxy: main and branch ports must answer in
    the same shape, with mongod's conventions."""
    made_name = unique("rt-admin")

    def admin(run: Session) -> None:
        run({"listBranches": 1}, db="admin")
        run({"branchLog": made_name, "limit": 5}, db="admin")
        run({"branchDiff": made_name}, db="admin")
        run({"branchInfo": made_name}, db="admin")
        run({"branchInfo": "no-such-branch"}, db="admin")

    session = world.main.session()
    try:
        created = session({"createBranch": made_name}, db="admin")
        assert created["ok"] == 1.0, created
        assert not convention_problems(created)
    finally:
        session.close()
    branch_port = Target("admin branch", int(created["port"]), world.branch.db)
    try:
        with MongoClient(f"mongodb://127.0.0.1:{branch_port.port}/") as client:
            client[world.branch.db].items.update_one({"_id": 1}, {"$set": {"s": "changed"}})
        on_main = run_case(world.main, admin)
        on_branch = run_case(branch_port, admin)
        upstream = world.upstream.session()
        try:
            gossip = [key for key in GOSSIP if key in upstream({"ping": 1}, db="admin")]
        finally:
            upstream.close()
        problems = []
        for name, reply in [*on_main, *on_branch]:
            problems += [f"{name}: {p}" for p in convention_problems(reply)]
            # As mongos: the upstream's cluster time on every reply, built here or not.
            problems += [f"{name}: no {key}" for key in gossip if key not in reply]
        problems += compare(on_main, on_branch, "branch port vs main port")
        assert not problems, "\n".join(problems)
    finally:
        session = world.main.session()
        try:
            dropped = session({"dropBranch": made_name}, db="admin")
            assert not convention_problems(dropped)
        finally:
            session.close()


def test_causal_session_on_a_branch_sees_operation_times(world: World) -> None:
    """pymongo's causally consistent session advances on the operationTime of replies the
    branch port built, and its next read sends it back as afterClusterTime."""
    with MongoClient(f"mongodb://127.0.0.1:{world.branch.port}/") as client:
        coll = client[world.branch.db].w_causal
        with client.start_session(causal_consistency=True) as session:
            coll.insert_one({"_id": 1}, session=session)
            after_insert = session.operation_time
            assert after_insert is not None
            assert session.cluster_time is not None
            coll.update_one({"_id": 1}, {"$set": {"x": 1}}, session=session)
            assert session.operation_time is not None
            assert session.operation_time >= after_insert
            assert coll.find_one({"_id": 1}, session=session) == {"_id": 1, "x": 1}


@pytest.mark.parametrize("value", ["u1", None, 7])
def test_duplicate_key_messages_read_as_the_upstreams(world: World, value: Any) -> None:
    """The branch enforces unique secondary keys across base and branch itself; its
    message prints the key as the server does (strings quoted, null, numbers)."""
    messages = []
    for target in (world.upstream, world.branch):
        session = target.session()
        try:
            # Key u "u1" exists in the base; null and 7 are inserted first, then again.
            first = {"_id": f"first-{value}", "u": value}
            if value is not None and value != "u1":
                assert session({"insert": "w_dup", "documents": [first]})["n"] == 1
            elif value is None:
                session({"insert": "w_dup", "documents": [{"_id": "no-u"}]})
            doc = {"_id": f"again-{value}"} if value is None else {"_id": f"again-{value}",
                                                                   "u": value}
            reply = session({"insert": "w_dup", "documents": [doc]})
        finally:
            session.close()
        (error,) = reply["writeErrors"]
        messages.append(error["errmsg"].replace(target.db, "DB"))
    assert messages[1] == messages[0]
