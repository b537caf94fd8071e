"""History over the admin HTTP API: log, streamed diff, merge (abort / ours / theirs, dry
run, into a parent branch), reset, and branches created at a past point, with every error
they answer."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest
from bson import ObjectId
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from tests.branchutil import Branches, fingerprint, unique
from tests.historyutil import (
    contents,
    diff,
    diff_raw,
    doc_changes,
    entries,
    error,
    last_lsn,
    merge,
    ok,
)
from tests.servers import ProxyProcess


def index_keys(coll: Any) -> list[tuple[str, Any]]:
    """Index names and keys, whatever the order of fields in each spec."""
    return sorted((ix["name"], dict(ix["key"])) for ix in coll.list_indexes())


def seed(client: MongoClient, db: str, n: int = 5) -> None:
    client[db].items.insert_many([{"_id": i, "v": i, "tag": "base"} for i in range(n)])


# -- log -----------------------------------------------------------------------------------

def test_log_newest_first_with_paging(proxy: ProxyProcess, client: MongoClient,
                                      made: Branches, db_name: str) -> None:
    seed(client, db_name)
    branch = made.create()
    name = branch["name"]
    assert entries(proxy, name) == []
    with MongoClient(branch["uri"], appname="hist-log") as b:
        items = b[db_name].items
        items.update_one({"_id": 1}, {"$set": {"v": 10}})
        items.delete_one({"_id": 2})
        items.insert_one({"_id": "new", "v": 99})
        b[db_name].other.insert_many([{"_id": 1}, {"_id": 2}])
    log = entries(proxy, name)
    # `other` is new on the branch: its first write makes it the branch's own (`own`).
    assert [(e["op"], e["ns"], e["_id"]) for e in log] == [
        ("put", f"{db_name}.other", 2), ("put", f"{db_name}.other", 1),
        ("own", f"{db_name}.other", None),
        ("put", f"{db_name}.items", "new"), ("delete", f"{db_name}.items", 2),
        ("put", f"{db_name}.items", 1)]
    lsns = [e["lsn"] for e in log]
    assert lsns == sorted(lsns, reverse=True) and len(set(lsns)) == 6
    assert all(e["visible"] for e in log)
    assert all(e["client"]["app"] == "hist-log" for e in log)
    for e in log:
        assert dt.datetime.fromisoformat(e["time"]).tzinfo is not None
        assert set(e) == {"lsn", "time", "op", "ns", "_id", "client", "visible"}

    assert entries(proxy, name, limit=2) == log[:2]
    assert entries(proxy, name, limit=2, before_lsn=log[1]["lsn"]) == log[2:4]
    assert entries(proxy, name, before_lsn=log[-1]["lsn"]) == []
    assert entries(proxy, name, limit=10_000) == log


def test_index_and_option_changes_are_entries_a_reset_can_name(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str) -> None:
    """createIndexes, dropIndexes and collMod log entries named for their command; a
    reset to each shows the indexes and options as that command left them, and one to
    before them all voids them in the log. A createIndexes that creates its collection
    logs the create, then itself."""
    seed(client, db_name)
    branch = made.create()
    name = branch["name"]
    with MongoClient(branch["uri"], appname="hist-ddl") as b:
        db = b[db_name]

        def shown() -> tuple[list[tuple[str, Any]], dict[str, Any], list[str]]:
            options = {c["name"]: c.get("options", {}) for c in db.list_collections()}
            return (index_keys(db.items), options.get("items", {}),
                    sorted(db.list_collection_names()))

        at_fork = shown()
        states = []
        for step in (lambda: db.items.create_index("v"),
                     lambda: db.items.create_index("tag"),
                     lambda: db.items.drop_index("v_1"),
                     lambda: db.command("collMod", "items",
                                        validator={"v": {"$exists": True}})):
            step()
            states.append(shown())
        assert states[-1][1]["validator"] == {"v": {"$exists": True}}
        assert [ix for ix, _ in states[-1][0]] == ["_id_", "tag_1"]
        db.fresh.create_index("x")
        log = entries(proxy, name)
        assert [(e["op"], e["ns"], e["_id"]) for e in log] == [
            ("createIndexes", f"{db_name}.fresh", None), ("create", f"{db_name}.fresh", None),
            ("collMod", f"{db_name}.items", None), ("dropIndexes", f"{db_name}.items", None),
            ("createIndexes", f"{db_name}.items", None),
            ("createIndexes", f"{db_name}.items", None)]
        assert all(e["client"]["app"] == "hist-ddl" and e["visible"] for e in log)

        for entry, want in zip(reversed(log[2:]), states, strict=True):
            ok(proxy, "POST", f"/branches/{name}/reset", {"to": entry["lsn"]})
            assert shown() == want, entry
        ok(proxy, "POST", f"/branches/{name}/reset", {"to": 0})
        assert shown() == at_fork
        assert not any(e["visible"] for e in entries(proxy, name, limit=6))
        ok(proxy, "POST", f"/branches/{name}/reset", {"to": log[0]["lsn"]})
        assert index_keys(db.fresh) == [("_id_", {"_id": 1}), ("x_1", {"x": 1})]
        assert shown() == (states[-1][0], states[-1][1], ["fresh", "items"])


def test_a_drop_database_logs_each_drop_and_a_reset_gives_each_back(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str) -> None:
    """A dropDatabase on a branch logs a drop per collection in one append (consecutive
    LSNs): a base collection it changed, one it never touched, one it made. A reset to
    before it gives every one back as it was; a reset to one of its drops gives back
    the collections dropped after it."""
    seed(client, db_name)
    client[db_name].untouched.insert_one({"_id": 1, "v": "base"})
    branch = made.create()
    name = branch["name"]
    with MongoClient(branch["uri"]) as b:
        db = b[db_name]
        db.items.update_one({"_id": 1}, {"$set": {"v": "branch"}})
        db.made.insert_one({"_id": "m"})
        db.made.create_index("x")
        before = {n: list(db[n].find().sort("_id", 1)) for n in ("items", "made", "untouched")}
        b.drop_database(db_name)
        assert db.list_collection_names() == []
        log = entries(proxy, name)
        drops = log[:3]
        assert sorted((e["op"], e["ns"]) for e in drops) == [
            ("drop", f"{db_name}.{n}") for n in ("items", "made", "untouched")]
        assert [e["lsn"] for e in drops] == list(range(drops[0]["lsn"], drops[0]["lsn"] - 3, -1))
        ok(proxy, "POST", f"/branches/{name}/reset", {"to": drops[1]["lsn"]})
        assert db.list_collection_names() == [drops[0]["ns"].split(".", 1)[1]]
        ok(proxy, "POST", f"/branches/{name}/reset", {"to": log[3]["lsn"]})
        assert {n: list(db[n].find().sort("_id", 1)) for n in sorted(
            db.list_collection_names())} == before
        assert index_keys(db.made) == [("_id_", {"_id": 1}), ("x_1", {"x": 1})]
    assert list(client[db_name].items.find({"_id": 1})) == [{"_id": 1, "v": 1, "tag": "base"}]


@pytest.mark.parametrize(("query", "message"), [
    ("limit=0", "limit must be 1-10000, got 0"),
    ("limit=-1", "limit must be 1-10000"),
    ("limit=10001", "limit must be 1-10000"),
    ("limit=ten", "limit must be an integer, got 'ten'"),
    ("before_lsn=x", "before_lsn must be an integer, got 'x'"),
])
def test_log_bad_parameters_are_400(proxy: ProxyProcess, made: Branches, query: str,
                                    message: str) -> None:
    name = made.create()["name"]
    status, msg = error(proxy, "GET", f"/branches/{name}/log?{query}")
    assert status == 400 and msg.startswith(message)


def test_unknown_branch_is_404_everywhere(proxy: ProxyProcess) -> None:
    for method, path, body in (
            ("GET", "/branches/no-such-hist/log", None),
            ("GET", "/branches/no-such-hist/diff", None),
            ("POST", "/branches/no-such-hist/merge", {}),
            ("POST", "/branches/no-such-hist/reset", {"to": 0}),
            ("POST", "/branches", {"name": unique("at"), "from": "no-such-hist", "at": 0})):
        status, msg = error(proxy, method, path, body)
        assert status == 404 and msg == "branch 'no-such-hist' does not exist", (path, msg)


# -- diff ----------------------------------------------------------------------------------

def test_diff_is_streamed_json(proxy: ProxyProcess, client: MongoClient, made: Branches,
                               db_name: str) -> None:
    seed(client, db_name)
    branch = made.create()
    name = branch["name"]
    empty = diff(proxy, name)
    assert empty == {"branch": name, "parent": "main", "changes": [], "summary": {}}
    with MongoClient(branch["uri"]) as b:
        items = b[db_name].items
        items.update_one({"_id": 1}, {"$set": {"v": 10}})
        items.delete_one({"_id": 2})
        items.insert_one({"_id": 7, "when": dt.datetime(2024, 1, 2, 3, 4, 5)})
        items.update_one({"_id": 3}, {"$set": {"v": 3}})  # no net change
        items.insert_one({"_id": 8})
        items.delete_one({"_id": 8})  # inserted then deleted: no net change
    status, headers, body = diff_raw(proxy, name)
    assert status == 200 and body.endswith(b"}\n")
    assert headers["Content-Type"].startswith("application/json")
    assert headers.get("Transfer-Encoding") == "chunked"  # streamed, no Content-Length
    result = diff(proxy, name)
    assert result["branch"] == name and result["parent"] == "main"
    ns = f"{db_name}.items"
    assert doc_changes(result) == sorted([(ns, "update", 1), (ns, "delete", 2),
                                          (ns, "insert", 7)], key=repr)
    by_id = {c["_id"]: c for c in result["changes"]}
    assert by_id[1]["parent"] == {"_id": 1, "v": 1, "tag": "base"}
    assert by_id[1]["branch"] == {"_id": 1, "v": 10, "tag": "base"}
    assert by_id[2]["branch"] is None and by_id[2]["parent"]["_id"] == 2
    assert by_id[7]["parent"] is None
    assert by_id[7]["branch"]["when"].replace(tzinfo=None) == dt.datetime(2024, 1, 2, 3, 4, 5)
    assert result["summary"] == {ns: {"insert": 1, "update": 1, "delete": 1,
                                      "collection": None, "indexes": 0}}


def test_collection_drop_and_index_create_in_diff_and_merge(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str) -> None:
    seed(client, db_name)
    client[db_name].gone.insert_many([{"_id": 1}, {"_id": 2}])
    branch = made.create()
    name = branch["name"]
    with MongoClient(branch["uri"]) as b:
        b[db_name].gone.drop()
        b[db_name].items.create_index("v", name="v_1")
        b[db_name].fresh.insert_one({"_id": "f"})
    result = diff(proxy, name)
    gone, items, fresh = (f"{db_name}.{c}" for c in ("gone", "items", "fresh"))
    assert {"ns": gone, "collection": "dropped"} in result["changes"]
    assert doc_changes(result) == sorted([(gone, "delete", 1), (gone, "delete", 2),
                                          (fresh, "insert", "f")], key=repr)
    index = [c for c in result["changes"] if "index" in c]
    assert [(c["ns"], c["index"], c["name"]) for c in index] == [(items, "created", "v_1")]
    assert index[0]["spec"]["key"] == {"v": 1}
    assert result["summary"][gone] == {"insert": 0, "update": 0, "delete": 2,
                                       "collection": "dropped", "indexes": 0}
    assert result["summary"][items]["indexes"] == 1

    merged = merge(proxy, name)
    assert {"ns": gone, "collection": "dropped"} in merged["collections"]
    assert any(c.get("index") == "created" and c["name"] == "v_1"
               for c in merged["collections"])
    assert merged["applied"] == {"insert": 1, "update": 0, "delete": 2}
    assert "gone" not in client[db_name].list_collection_names()
    assert "v_1" in client[db_name].items.index_information()
    assert contents(client[db_name].fresh) == [{"_id": "f"}]
    with MongoClient(branch["uri"]) as b:
        assert sorted(b[db_name].list_collection_names()) == sorted(
            client[db_name].list_collection_names())
        for coll in ("items", "fresh"):
            assert contents(b[db_name][coll]) == contents(client[db_name][coll])
            assert index_keys(b[db_name][coll]) == index_keys(client[db_name][coll])
    assert diff(proxy, name)["changes"] == []
    # Merging again does not drop the parent's collection a second time.
    client[db_name].gone.insert_one({"_id": "later"})
    assert diff(proxy, name)["changes"][0]["op"] == "delete"
    assert merge(proxy, name)["collections"] == [{"ns": gone, "collection": "dropped"}]


# -- merge ---------------------------------------------------------------------------------

def test_merge_into_main(proxy: ProxyProcess, client: MongoClient, made: Branches,
                         db_name: str) -> None:
    seed(client, db_name)
    branch = made.create()
    name = branch["name"]
    with MongoClient(branch["uri"]) as b:
        items = b[db_name].items
        items.update_one({"_id": 1}, {"$set": {"v": 10}})
        items.delete_one({"_id": 2})
        items.insert_many([{"_id": 100 + i, "n": i} for i in range(3)])
        want = contents(items)
    # The parent changes a document the branch never touched: kept, not a conflict.
    client[db_name].items.update_one({"_id": 4}, {"$set": {"v": 44}})
    want = [d if d["_id"] != 4 else {**d, "v": 44} for d in want]
    result = merge(proxy, name)
    assert result == {"branch": name, "into": "main", "strategy": "abort", "dry_run": False,
                      "applied": {"insert": 3, "update": 1, "delete": 1}, "conflicts": [],
                      "skipped_conflicts": 0, "collections": []}
    assert contents(client[db_name].items) == want
    assert diff(proxy, name)["changes"] == []
    # Merging again changes nothing.
    again = merge(proxy, name, into="main")
    assert again["applied"] == {"insert": 0, "update": 0, "delete": 0}
    assert contents(client[db_name].items) == want


def _conflicted(proxy: ProxyProcess, client: MongoClient, made: Branches,
                db: str) -> tuple[dict[str, Any], str]:
    """A branch that changed 1, 2 and 3 while main changed 1 and deleted 2."""
    seed(client, db)
    branch = made.create()
    with MongoClient(branch["uri"]) as b:
        items = b[db].items
        items.update_one({"_id": 1}, {"$set": {"v": "branch"}})
        items.update_one({"_id": 2}, {"$set": {"v": "branch"}})
        items.update_one({"_id": 3}, {"$set": {"v": "branch"}})
        items.insert_one({"_id": 9, "v": "branch"})
    client[db].items.update_one({"_id": 1}, {"$set": {"v": "main"}})
    client[db].items.delete_one({"_id": 2})
    return branch, branch["name"]


def test_abort_leaves_everything_unchanged(proxy: ProxyProcess, client: MongoClient,
                                           made: Branches, db_name: str) -> None:
    branch, name = _conflicted(proxy, client, made, db_name)
    before_main = contents(client[db_name].items)
    with MongoClient(branch["uri"]) as b:
        before_branch = contents(b[db_name].items)
    before_log = entries(proxy, name)
    before_diff = diff(proxy, name)
    status, body = proxy.api("POST", f"/branches/{name}/merge", {})
    assert status == 409 and isinstance(body, dict)
    assert body["strategy"] == "abort" and not body["dry_run"]
    ns = f"{db_name}.items"
    conflicts = {c["_id"]: c for c in body["conflicts"]}
    assert set(conflicts) == {1, 2}
    assert conflicts[1]["parent"]["v"] == "main" and conflicts[1]["branch"]["v"] == "branch"
    assert conflicts[1]["base"] == {"_id": 1, "v": 1, "tag": "base"}
    assert conflicts[2]["parent"] is None and conflicts[2]["op"] == "insert"
    assert all(c["ns"] == ns for c in conflicts.values())
    assert contents(client[db_name].items) == before_main
    with MongoClient(branch["uri"]) as b:
        assert contents(b[db_name].items) == before_branch
    assert entries(proxy, name) == before_log
    assert diff(proxy, name) == before_diff


def test_theirs_keeps_the_parents_version(proxy: ProxyProcess, client: MongoClient,
                                          made: Branches, db_name: str) -> None:
    _, name = _conflicted(proxy, client, made, db_name)
    result = merge(proxy, name, strategy="theirs")
    assert result["skipped_conflicts"] == 2 and len(result["conflicts"]) == 2
    assert result["applied"] == {"insert": 1, "update": 1, "delete": 0}
    items = {d["_id"]: d for d in client[db_name].items.find()}
    assert items[1]["v"] == "main" and 2 not in items
    assert items[3]["v"] == "branch" and items[9]["v"] == "branch"
    # The branch keeps its own version; only the conflicting ids still differ.
    assert [c["_id"] for c in diff(proxy, name)["changes"]] == [1, 2]


def test_ours_takes_the_branch_version(proxy: ProxyProcess, client: MongoClient,
                                       made: Branches, db_name: str) -> None:
    branch, name = _conflicted(proxy, client, made, db_name)
    result = merge(proxy, name, strategy="ours")
    assert {c["_id"] for c in result["conflicts"]} == {1, 2}
    assert result["skipped_conflicts"] == 0
    assert result["applied"] == {"insert": 2, "update": 2, "delete": 0}
    with MongoClient(branch["uri"]) as b:
        assert contents(client[db_name].items) == contents(b[db_name].items)
    assert diff(proxy, name)["changes"] == []


@pytest.mark.parametrize("strategy", ["abort", "ours", "theirs"])
def test_dry_run_changes_nothing(proxy: ProxyProcess, client: MongoClient, made: Branches,
                                 db_name: str, strategy: str) -> None:
    _, name = _conflicted(proxy, client, made, db_name)
    before = fingerprint(client[db_name])
    before_log = entries(proxy, name)
    result = merge(proxy, name, strategy=strategy, dry_run=True)  # 200 even with conflicts
    assert result["dry_run"] is True and result["strategy"] == strategy
    assert {c["_id"] for c in result["conflicts"]} == {1, 2}
    skipped = 2 if strategy == "theirs" else 0
    assert result["skipped_conflicts"] == skipped
    assert sum(result["applied"].values()) == 4 - skipped
    assert fingerprint(client[db_name]) == before
    assert entries(proxy, name) == before_log
    assert client[proxy.meta_db]["merges"].find_one({"_id": name}) is None


def test_merge_into_a_parent_branch(proxy: ProxyProcess, client: MongoClient,
                                    made: Branches, db_name: str) -> None:
    seed(client, db_name)
    parent = made.create()
    with MongoClient(parent["uri"]) as p:
        p[db_name].items.update_one({"_id": 0}, {"$set": {"v": "parent"}})
    child = made.create(**{"from": parent["name"]})
    with MongoClient(child["uri"]) as c:
        c[db_name].items.update_one({"_id": 1}, {"$set": {"v": "child"}})
        c[db_name].items.delete_one({"_id": 2})
        c[db_name].items.insert_one({"_id": 50, "v": "child"})
        c[db_name].items.update_one({"_id": 0}, {"$inc": {"n": 1}})
        want = contents(c[db_name].items)
    main_before = fingerprint(client[db_name])
    parent_log = entries(proxy, parent["name"])

    status, msg = error(proxy, "POST", f"/branches/{child['name']}/merge", {"into": "main"})
    assert status == 400
    assert msg == f"branch {child['name']!r} merges into its parent {parent['name']!r}, " \
                  "not 'main'"
    result = merge(proxy, child["name"], into=parent["name"])
    assert result["into"] == parent["name"]
    assert result["applied"] == {"insert": 1, "update": 2, "delete": 1}
    with MongoClient(parent["uri"]) as p:
        assert contents(p[db_name].items) == want
    assert fingerprint(client[db_name]) == main_before  # main untouched
    # The parent's WAL records the merge, written by mongobranch itself.
    new = entries(proxy, parent["name"])[:-len(parent_log)]
    assert sorted(((e["op"], e["_id"]) for e in new), key=repr) == sorted(
        [("put", 0), ("put", 1), ("delete", 2), ("put", 50)], key=repr)
    assert all(e["client"]["app"] == "mongobranch" for e in new)
    assert diff(proxy, child["name"])["changes"] == []
    # The merge is part of the parent's history: resetting the parent undoes it.
    ok(proxy, "POST", f"/branches/{parent['name']}/reset", {"to": parent_log[0]["lsn"]})
    with MongoClient(parent["uri"]) as p:
        assert {d["_id"]: d.get("v") for d in p[db_name].items.find()} == {
            0: "parent", 1: 1, 2: 2, 3: 3, 4: 4}


@pytest.mark.parametrize(("body", "message"), [
    ({"strategy": "mine"}, "strategy must be one of abort, ours, theirs"),
    ({"strategy": None}, "strategy must be one of abort, ours, theirs"),
    ({"dry_run": "yes"}, "dry_run must be true or false"),
    ({"into": "elsewhere"}, "merges into its parent 'main', not 'elsewhere'"),
    ({"into": 3}, "merges into its parent 'main', not 3"),
    ({"push": True}, "unknown field(s): push"),
    ({"dryRun": True, "x": 1}, "unknown field(s): dryRun, x"),
])
def test_merge_bad_requests_are_400(proxy: ProxyProcess, made: Branches, body: dict[str, Any],
                                    message: str) -> None:
    name = made.create()["name"]
    status, msg = error(proxy, "POST", f"/branches/{name}/merge", body)
    assert status == 400 and message in msg, msg


def test_merge_body_must_be_a_json_object(proxy: ProxyProcess, made: Branches) -> None:
    name = made.create()["name"]
    for body in ([], "abort", 1):
        status, msg = error(proxy, "POST", f"/branches/{name}/merge", body)
        assert status == 400 and msg == "request body must be a JSON object"


@pytest.mark.parametrize("options", [{}, {"capped": True, "size": 65536}])
def test_merge_of_a_collection_the_branch_dropped_and_recreated(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str,
        options: dict[str, Any]) -> None:
    seed(client, db_name)
    branch = made.create()
    with MongoClient(branch["uri"]) as b:
        b[db_name].items.drop()
        b[db_name].create_collection("items", **options)
        b[db_name].items.insert_many([{"_id": 1, "v": "again"}, {"_id": 70}])
        want = contents(b[db_name].items)
    result = diff(proxy, branch["name"])
    ns = f"{db_name}.items"
    # Recreated with other options, the parent's collection is replaced; with the same
    # options the document changes say it all.
    recreated = {"ns": ns, "collection": "recreated"}
    assert (recreated in result["changes"]) == bool(options)
    changes = [(ns, "update", 1), (ns, "insert", 70)] + [(ns, "delete", i) for i in (0, 2, 3, 4)]
    assert doc_changes(result) == sorted(changes, key=repr)
    merged = merge(proxy, branch["name"])
    assert merged["applied"] == {"insert": 1, "update": 1, "delete": 4}
    assert contents(client[db_name].items) == want
    info = client[db_name].command("listCollections", filter={"name": "items"})
    assert bool(info["cursor"]["firstBatch"][0]["options"].get("capped")) == bool(options)
    assert diff(proxy, branch["name"])["changes"] == []


# -- reset ---------------------------------------------------------------------------------

def test_reset_to_an_lsn_and_to_a_time(proxy: ProxyProcess, client: MongoClient,
                                       made: Branches, db_name: str) -> None:
    seed(client, db_name)
    branch = made.create()
    name = branch["name"]
    views: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    with MongoClient(branch["uri"]) as b:
        items = b[db_name].items
        for step in range(4):
            items.update_one({"_id": step}, {"$set": {"v": f"s{step}"}})
            items.insert_one({"_id": f"new{step}"})
            views.append((entries(proxy, name, limit=1)[0], contents(items)))
            time.sleep(0.01)  # WAL times have millisecond resolution: keep steps apart
        original = contents(client[db_name].items)

        at, view = views[1]
        result = ok(proxy, "POST", f"/branches/{name}/reset", {"to": at["lsn"]})
        assert result == {"branch": name, "to_lsn": at["lsn"], "voided_entries": 4,
                          "copied_into_children": 0}
        assert contents(items) == view
        log = entries(proxy, name)
        assert [e["visible"] for e in log] == [False] * 4 + [True] * 4
        # Writing again after a reset: the branch continues from there.
        items.insert_one({"_id": "after"})
        assert contents(items) == sorted([*view, {"_id": "after"}], key=lambda d: repr(d["_id"]))

        # An ISO time (with an offset): the last entry at or before it.
        at0, view0 = views[0]
        when = dt.datetime.fromisoformat(at0["time"]).astimezone(
            dt.timezone(dt.timedelta(hours=2)))
        result = ok(proxy, "POST", f"/branches/{name}/reset", {"to": when.isoformat()})
        assert result["to_lsn"] >= at0["lsn"]
        assert contents(items) == view0
        # A string of digits is an LSN; 0 empties the branch back to its parent.
        assert ok(proxy, "POST", f"/branches/{name}/reset", {"to": "0"})["to_lsn"] == 0
        assert contents(items) == original
    assert diff(proxy, name)["changes"] == []


@pytest.mark.parametrize(("body", "message"), [
    ({}, "reset needs 'to': an LSN or an ISO-8601 time"),
    ({"to": True}, "'at'/'to' must be an LSN or an ISO-8601 time, not True"),
    ({"to": None}, "'at'/'to' must be an LSN or an ISO-8601 time, not None"),
    ({"to": [1]}, "'at'/'to' must be an LSN or an ISO-8601 time"),
    ({"to": 1.5}, "'at'/'to' must be an LSN or an ISO-8601 time"),
    ({"to": -1}, "LSN must not be negative, got -1"),
    ({"to": "-4"}, "LSN must not be negative, got -4"),
    ({"to": "yesterday"}, "not an LSN or ISO-8601 time: 'yesterday'"),
    ({"to": 0, "hard": True}, "unknown field(s): hard"),
])
def test_reset_bad_requests_are_400(proxy: ProxyProcess, made: Branches, body: dict[str, Any],
                                    message: str) -> None:
    name = made.create()["name"]
    status, msg = error(proxy, "POST", f"/branches/{name}/reset", body)
    assert status == 400 and msg.startswith(message), msg


def test_reset_keeps_what_children_see(proxy: ProxyProcess, client: MongoClient,
                                       made: Branches, db_name: str) -> None:
    seed(client, db_name)
    parent = made.create()
    with MongoClient(parent["uri"]) as p:
        p[db_name].items.update_one({"_id": 1}, {"$set": {"v": "p"}})
        mark = last_lsn(proxy, parent["name"])
        p[db_name].items.update_one({"_id": 2}, {"$set": {"v": "p"}})
        p[db_name].items.delete_one({"_id": 3})
    child = made.create(**{"from": parent["name"]})
    with MongoClient(child["uri"]) as c:
        seen = contents(c[db_name].items)
    result = ok(proxy, "POST", f"/branches/{parent['name']}/reset", {"to": mark})
    assert result["voided_entries"] == 2 and result["copied_into_children"] == 3
    with MongoClient(parent["uri"]) as p:
        assert {d["_id"]: d["v"] for d in p[db_name].items.find()} == {
            0: 0, 1: "p", 2: 2, 3: 3, 4: 4}
    with MongoClient(child["uri"]) as c:
        assert contents(c[db_name].items) == seen


# -- branches at a point ---------------------------------------------------------------------

def test_create_at_an_lsn_and_at_a_time(proxy: ProxyProcess, client: MongoClient,
                                        made: Branches, db_name: str) -> None:
    seed(client, db_name)
    source = made.create()
    points = []
    with MongoClient(source["uri"]) as s:
        items = s[db_name].items
        items.update_one({"_id": 1}, {"$set": {"v": "one"}})
        points.append((entries(proxy, source["name"], limit=1)[0], contents(items)))
        time.sleep(0.01)  # WAL times have millisecond resolution: keep the points apart
        items.delete_one({"_id": 2})
        items.insert_one({"_id": "x"})
        points.append((entries(proxy, source["name"], limit=1)[0], contents(items)))
        items.update_one({"_id": 1}, {"$set": {"v": "two"}})
        items.delete_one({"_id": "x"})
        items.insert_one({"_id": 2, "v": "back"})
        now = contents(items)
    for entry, view in points:
        at = made.create(**{"from": source["name"], "at": entry["lsn"]})
        assert at["parent"] == source["name"] and at["fork_lsn"] == entry["lsn"]
        with MongoClient(at["uri"]) as a:
            assert contents(a[db_name].items) == view
    entry, view = points[0]
    at = made.create(**{"from": source["name"], "at": entry["time"]})
    assert at["fork_lsn"] >= entry["lsn"]
    with MongoClient(at["uri"]) as a:
        assert contents(a[db_name].items) == view
    # The source is unchanged by all this.
    with MongoClient(source["uri"]) as s:
        assert contents(s[db_name].items) == now


def test_create_at_gives_back_the_indexes_and_options_of_then(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str) -> None:
    """A branch at a point shows its source's index list and options as they were then:
    indexes the source created since are gone, those it dropped are back (unique ones
    enforced), a TTL it changed and a validator it set or changed are as they were."""
    seed(client, db_name)
    client[db_name].items.create_index("v")
    client[db_name].items.create_index("t", expireAfterSeconds=100)
    source = made.create()

    def shown(db: Any) -> tuple[list[tuple[str, Any]], dict[str, Any], Any]:
        options = {c["name"]: c.get("options", {}) for c in db.list_collections()}
        ttl = {ix["name"]: ix.get("expireAfterSeconds") for ix in db.items.list_indexes()}
        return index_keys(db.items), options.get("items", {}), ttl.get("t_1")

    with MongoClient(source["uri"]) as s:
        db = s[db_name]
        at_fork = (last_lsn(proxy, source["name"]), shown(db))
        db.items.create_index("u", unique=True, sparse=True)
        db.command("collMod", "items", validator={"v": {"$exists": True}})
        db.items.update_one({"_id": 1}, {"$set": {"v": "one"}})
        middle = (last_lsn(proxy, source["name"]), shown(db), contents(db.items))
        db.items.drop_index("u_1")
        db.items.create_index("w")
        db.command("collMod", "items", index={"name": "t_1", "expireAfterSeconds": 50})
        db.command("collMod", "items", validator={"v": {"$type": "number"}})
        db.items.insert_one({"_id": 9, "v": 9, "tag": "base"})
        now = shown(db)
    assert middle[1][0] != now[0] and now[2] == 50
    assert middle[1][1]["validator"] == {"v": {"$exists": True}}
    assert now[1]["validator"] == {"v": {"$type": "number"}}

    at = made.create(**{"from": source["name"], "at": middle[0]})
    with MongoClient(at["uri"]) as a:
        assert shown(a[db_name]) == middle[1]
        assert contents(a[db_name].items) == middle[2]
        items = a[db_name].items
        # The unique index of then holds on the branch, and the validator of then
        # (a string `v` passes it, where the source's current one refuses it).
        items.insert_one({"_id": "first", "v": 0, "u": 1})
        with pytest.raises(OperationFailure) as dup:
            items.insert_one({"_id": "dup", "v": 0, "u": 1})
        assert dup.value.code == 11000
        with pytest.raises(OperationFailure) as invalid:
            items.insert_one({"_id": "no-v"})
        assert invalid.value.code == 121
        items.insert_one({"_id": "text", "v": "text"})
    before = made.create(**{"from": source["name"], "at": at_fork[0]})
    with MongoClient(before["uri"]) as b:
        assert shown(b[db_name]) == at_fork[1]
    with MongoClient(source["uri"]) as s:
        assert shown(s[db_name]) == now


def test_merging_a_branch_created_at_a_point_restores_the_parent(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str) -> None:
    """Created at n, the branch holds the parent as it was; nobody changed the parent
    since, so merging it back is no conflict and returns the parent to n."""
    seed(client, db_name)
    source = made.create()
    with MongoClient(source["uri"]) as s:
        items = s[db_name].items
        items.update_one({"_id": 1}, {"$set": {"v": "one"}})
        mark = last_lsn(proxy, source["name"])
        then = contents(items)
        items.update_one({"_id": 1}, {"$set": {"v": "two"}})
        items.delete_one({"_id": 2})
        items.insert_one({"_id": "late"})
    at = made.create(**{"from": source["name"], "at": mark})
    assert merge(proxy, at["name"], dry_run=True)["conflicts"] == []
    result = merge(proxy, at["name"])
    assert result["conflicts"] == []
    with MongoClient(source["uri"]) as s:
        assert contents(s[db_name].items) == then


def test_merging_a_dropped_collection_copies_none_of_it(
        proxy: ProxyProcess, client: MongoClient, direct: MongoClient, made: Branches,
        db_name: str) -> None:
    """The merge drops the parent's collection the branch dropped; the branch keeps no
    copy of it for a reset to before its drop (snapshot.MERGING): such a reset is
    refused and says why, a reset to after the drop still works."""
    client[db_name].gone.insert_many([{"_id": i} for i in range(50)])
    branch = made.create()
    name = branch["name"]
    with MongoClient(branch["uri"]) as b:
        b[db_name].other.insert_one({"_id": "before"})
        before = last_lsn(proxy, name)
        b[db_name].gone.drop()
        b[db_name].other.insert_one({"_id": "after"})
        after = last_lsn(proxy, name)
        assert merge(proxy, name)["collections"] == [
            {"ns": f"{db_name}.gone", "collection": "dropped"}]
        assert "gone" not in client[db_name].list_collection_names()
        kept = direct[proxy.meta_db]["wal"].count_documents(
            {"ns": f"{db_name}.gone", "op": "keep"})
        assert kept == 0
        status, body = proxy.api("POST", f"/branches/{name}/reset", {"to": before})
        assert status == 409 and "was merged since" in str(body), body
        ok(proxy, "POST", f"/branches/{name}/reset", {"to": after})
        assert "gone" not in b[db_name].list_collection_names()
        assert sorted(d["_id"] for d in b[db_name].other.find()) == ["after", "before"]


def test_at_a_point_after_the_source_dropped_a_collection(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str) -> None:
    """A branch at a point where the source's own drop stood shows the collection as
    the source refilled it by then: neither what it wrote before the drop nor what it
    kept of its parent since (snapshot.latent) shows, and later writes are undone."""
    client[db_name].items.insert_many([{"_id": i, "v": i} for i in range(5)])
    source = made.create()
    with MongoClient(source["uri"]) as s:
        items = s[db_name].items
        items.update_one({"_id": 1}, {"$set": {"v": "one"}})
        items.drop()
        items.insert_one({"_id": 3, "v": "mine"})
        mark = last_lsn(proxy, source["name"])
        then = contents(items)
        client[db_name].items.update_one({"_id": 2}, {"$set": {"v": "P"}})
        items.insert_one({"_id": 1, "v": "later"})
        items.update_one({"_id": 3}, {"$set": {"v": "later"}})
    at = made.create(**{"from": source["name"], "at": mark})
    with MongoClient(at["uri"]) as a:
        assert contents(a[db_name].items) == then


def test_sparse_ids_of_every_type_in_diff_at_and_merge(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str) -> None:
    """Lookups by id read a batch's numeric and ObjectId ids as one _id range, at most
    twice as many documents as ids, and look up the rest: changes spread thin over many
    documents, and ids of other types, come back all the same."""
    oids = [ObjectId() for _ in range(40)]
    ids: list[Any] = [*range(400), *oids, *(f"s{i}" for i in range(20)), 2.5, {"a": 1}]
    client[db_name].items.insert_many([{"_id": i, "v": 0} for i in ids])
    changed: list[Any] = [*range(0, 400, 37), *oids[::4], "s3", "s17", 2.5, {"a": 1}]
    source = made.create()
    with MongoClient(source["uri"]) as s:
        items = s[db_name].items
        for i in changed:
            items.update_one({"_id": i}, {"$set": {"v": 1}})
        mark = last_lsn(proxy, source["name"])
        then = contents(items)
        for i in changed:
            items.update_one({"_id": i}, {"$set": {"v": 2}})
        items.delete_one({"_id": 37})
        items.insert_one({"_id": 1000, "v": 2})
        now = contents(items)
    ns = f"{db_name}.items"
    result = diff(proxy, source["name"])
    assert doc_changes(result) == sorted(
        [(ns, "update", i) for i in changed if i != 37] + [(ns, "delete", 37),
                                                          (ns, "insert", 1000)], key=repr)
    assert all(c["parent"] == {"_id": c["_id"], "v": 0} for c in result["changes"]
               if c["op"] != "insert")
    at = made.create(**{"from": source["name"], "at": mark})
    with MongoClient(at["uri"]) as a:
        assert contents(a[db_name].items) == then
    assert merge(proxy, source["name"])["conflicts"] == []
    assert contents(client[db_name].items) == now


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"from": "SOURCE", "at": "soon"}, 400, "not an LSN or ISO-8601 time: 'soon'"),
    ({"from": "SOURCE", "at": -2}, 400, "LSN must not be negative"),
    ({"from": "SOURCE", "at": True}, 400, "'at'/'to' must be an LSN or an ISO-8601 time"),
    ({"from": "SOURCE", "at": {"lsn": 1}}, 400, "'at'/'to' must be an LSN"),
    ({"from": "SOURCE", "at": 0, "when": 1}, 400, "unknown field(s): when"),
    ({"from": "SOURCE", "at": 0, "name": "main"}, 400, "branch name must match"),
    ({"from": "SOURCE", "at": 0, "name": "SOURCE"}, 409, "already exists"),
])
def test_create_at_bad_requests(proxy: ProxyProcess, made: Branches, body: dict[str, Any],
                                status: int, message: str) -> None:
    source = made.create()["name"]
    body = {k: (source if v == "SOURCE" else v) for k, v in body.items()}
    body.setdefault("name", unique("at"))
    made.track(str(body["name"]))
    got, msg = error(proxy, "POST", "/branches", body)
    assert got == status and message in msg, msg


def test_create_at_before_a_drop_is_refused(proxy: ProxyProcess, client: MongoClient,
                                            made: Branches, db_name: str) -> None:
    seed(client, db_name)
    source = made.create()
    with MongoClient(source["uri"]) as s:
        s[db_name].items.update_one({"_id": 1}, {"$set": {"v": 1.5}})
        mark = last_lsn(proxy, source["name"])
        s[db_name].items.drop()
    name = unique("at")
    made.track(name)
    status, msg = error(proxy, "POST", "/branches",
                        {"name": name, "from": source["name"], "at": mark})
    assert status == 409 and "dropped or recreated" in msg
    assert proxy.api("GET", f"/branches/{name}")[0] == 404


@pytest.mark.parametrize("collation", [None, {"locale": "en", "strength": 2}],
                         ids=["simple", "case-insensitive"])
def test_a_diff_over_more_than_a_batch_read_side_by_side_in_id_order(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str,
        collation: dict[str, Any] | None) -> None:
    """Past one batch of changed ids, a side holding few documents per change is read
    once in _id order beside the changed ids (history/lookup.py, OrderedSide) instead of
    a lookup per batch: every change still comes back, against the parent as it is now,
    whatever the ids' types and whatever order the collection's default collation gives
    its string ids (the WAL's grouping orders them by the simple collation)."""
    ids: list[Any] = [*range(700), *(("x" if i % 2 else "X") + f"{i:04d}" for i in range(700)),
                      *(ObjectId() for _ in range(100))]
    coll = client[db_name].create_collection("items", collation=collation) if collation \
        else client[db_name].items
    coll.insert_many([{"_id": i, "v": 0} for i in ids])
    source = made.create()
    gone, moved = ids[5::50], ids[7::100]
    with MongoClient(source["uri"]) as s:
        items = s[db_name].items
        items.update_many({}, {"$set": {"v": 1}})
        items.delete_many({"_id": {"$in": gone}})
        items.insert_many([{"_id": 10_000 + i, "v": 1} for i in range(30)])
    for i in moved:  # the parent moves on after the fork: the diff is against it now
        coll.update_one({"_id": i}, {"$set": {"v": 2}})
    ns = f"{db_name}.items"
    result = diff(proxy, source["name"])
    expected = [(ns, "delete", i) for i in gone] + \
        [(ns, "update", i) for i in ids if i not in gone] + \
        [(ns, "insert", 10_000 + i) for i in range(30)]
    assert doc_changes(result) == sorted(expected, key=repr)
    by_id = {repr(c["_id"]): c for c in result["changes"] if "op" in c}
    for i in ids:
        change = by_id[repr(i)]
        assert change["parent"] == {"_id": i, "v": 2 if i in moved else 0}, change
        assert change["branch"] == (None if i in gone else {"_id": i, "v": 1}), change
