"""Branch management over the admin HTTP API, against a real proxy and SecantusDB."""

from __future__ import annotations

import json
import signal
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from tests.branchutil import (
    Branches,
    bid_of,
    fingerprint,
    overlay_collections,
    unique,
)
from tests.servers import ProxyProcess, Secantus, free_port


def raw_post(proxy: ProxyProcess, path: str, data: bytes,
             content_type: str = "application/json") -> tuple[int, Any]:
    req = urllib.request.Request(proxy.admin_url + path, data=data, method="POST",
                                 headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- create / list / show / delete ----------------------------------------------------------

def test_create_list_show_delete(proxy: ProxyProcess, made: Branches) -> None:
    name = unique("crud")
    status, created = proxy.api("POST", "/branches", {"name": name})
    made.track(name)
    assert status == 201
    assert isinstance(created, dict)
    assert set(created) == {"name", "parent", "port", "uri", "mode", "fork_lsn", "created_at",
                            "isolation", "protected", "expires_at", "idle_ttl", "last_used",
                            "masked"}
    assert (created["protected"], created["expires_at"], created["idle_ttl"],
            created["last_used"], created["masked"]) == (False, None, None, None, False)
    # Every write to main, through the proxy or not, is preserved (the change stream).
    assert created["isolation"] == "snapshot"
    assert created["name"] == name and created["parent"] == "main"
    lo, hi = proxy.branch_ports or (0, 0)
    assert lo <= created["port"] <= hi
    assert created["uri"] == f"mongodb://127.0.0.1:{created['port']}/"
    assert isinstance(created["fork_lsn"], int)

    status, listed = proxy.api("GET", "/branches")
    assert status == 200 and isinstance(listed, list)
    assert [b for b in listed if b["name"] == name] == [created]

    status, shown = proxy.api("GET", f"/branches/{name}")
    assert status == 200 and isinstance(shown, dict)
    assert shown == {**created, "namespaces": {}, "children": []}

    with made.client(created) as c:
        assert c.admin.command("ping")["ok"] == 1.0
        c.mgmt_show.items.insert_many([{"_id": i} for i in range(3)])
        c.mgmt_show.items.delete_one({"_id": 0})
    child = made.create(**{"from": name})
    status, shown = proxy.api("GET", f"/branches/{name}")
    assert isinstance(shown, dict)
    assert shown["children"] == [child["name"]]
    assert set(shown["namespaces"]) == {"mgmt_show.items"}
    assert shown["namespaces"]["mgmt_show.items"]["live"] == 2

    assert proxy.api("DELETE", f"/branches/{child['name']}") == (
        200, {"deleted": child["name"]})
    assert proxy.api("DELETE", f"/branches/{name}") == (200, {"deleted": name})
    status, listed = proxy.api("GET", "/branches")
    assert isinstance(listed, list)
    assert name not in {b["name"] for b in listed}
    assert proxy.api("GET", f"/branches/{name}")[0] == 404
    # The port is closed with the branch.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", created["port"]), timeout=2).close()


def test_explicit_port_and_dotted_names(proxy: ProxyProcess, made: Branches) -> None:
    port = free_port()
    branch = made.create(unique("port"), port=port)
    assert branch["port"] == port
    with made.client(branch) as c:
        assert c.admin.command("ping")["ok"] == 1.0
    for name in (".", "..", unique("a.b_c")):
        made.create(name)
        status, shown = proxy.api("GET", "/branches/" + name.replace(".", "%2E"))
        assert status == 200 and isinstance(shown, dict) and shown["name"] == name
    made.cleanup()


# -- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["main", "a b", "x" * 65, "", "a/b", "é", 7, None, ["a"]])
def test_create_rejects_bad_names(proxy: ProxyProcess, name: object) -> None:
    status, reply = proxy.api("POST", "/branches", {"name": name})
    assert status == 400, reply
    assert isinstance(reply, dict) and "branch name must match" in reply["error"]


def test_create_accepts_64_char_name(proxy: ProxyProcess, made: Branches) -> None:
    name = unique("n").ljust(64, "x")
    assert made.create(name)["name"] == name


@pytest.mark.parametrize(("data", "message"), [
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b'["a"]', "must be a JSON object"),
    (b'"a"', "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b'{"name": "x1", "colour": "red"}', "unknown field(s): colour"),
    (b'{"name": "x1", "port": "27100"}', "port must be an integer"),
    (b'{"name": "x1", "port": true}', "port must be an integer"),
    (b'{"name": "x1", "port": 70000}', "port must be an integer"),
])
def test_create_rejects_bad_bodies(proxy: ProxyProcess, data: bytes, message: str) -> None:
    status, reply = raw_post(proxy, "/branches", data)
    assert status == 400, reply
    assert isinstance(reply, dict) and message in reply["error"]
    assert "x1" not in {b["name"] for b in proxy.api("GET", "/branches")[1]}  # type: ignore[union-attr]


def test_unknown_branch_is_404(proxy: ProxyProcess) -> None:
    name = unique("ghost")
    for method in ("GET", "DELETE"):
        status, reply = proxy.api(method, f"/branches/{name}")
        assert status == 404
        assert reply == {"error": f"branch {name!r} does not exist"}
    status, reply = proxy.api("POST", "/branches", {"name": unique("orphan"), "from": name})
    assert status == 404
    assert reply == {"error": f"parent branch {name!r} does not exist"}


def test_unknown_route_is_json_404(proxy: ProxyProcess) -> None:
    status, reply = proxy.api("GET", "/nothing-here")
    assert status == 404 and isinstance(reply, dict) and "error" in reply


def test_duplicate_name_is_409(proxy: ProxyProcess, made: Branches) -> None:
    branch = made.create()
    status, reply = proxy.api("POST", "/branches", {"name": branch["name"]})
    assert status == 409
    assert reply == {"error": f"branch {branch['name']!r} already exists"}


def test_duplicate_port_is_409(proxy: ProxyProcess, made: Branches) -> None:
    branch = made.create()
    status, reply = proxy.api("POST", "/branches", {"name": unique("dup"), "port": branch["port"]})
    assert status == 409
    assert isinstance(reply, dict)
    assert f"port {branch['port']} is already used by another branch" in reply["error"]


def test_port_bound_by_another_socket_is_409(proxy: ProxyProcess) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        name = unique("busy")
        status, reply = proxy.api("POST", "/branches", {"name": name, "port": port})
        assert status == 409
        assert isinstance(reply, dict) and f"port {port} cannot be opened" in reply["error"]
    # Nothing was left behind: the name is free again.
    assert proxy.api("GET", f"/branches/{name}")[0] == 404
    status, _ = proxy.api("POST", "/branches", {"name": name, "port": port})
    assert status == 201
    assert proxy.api("DELETE", f"/branches/{name}")[0] == 200


def test_delete_with_children_is_409(proxy: ProxyProcess, made: Branches) -> None:
    parent = made.create()
    child = made.create(**{"from": parent["name"]})
    status, reply = proxy.api("DELETE", f"/branches/{parent['name']}")
    assert status == 409
    assert reply == {"error": f"branch {parent['name']!r} has child branches: {child['name']}"}
    # Still fully there.
    assert proxy.api("GET", f"/branches/{parent['name']}")[0] == 200
    with made.client(parent) as c:
        assert c.admin.command("ping")["ok"] == 1.0


# -- what branches see -----------------------------------------------------------------------

def test_branch_of_branch_of_branch_sees_ancestors(client: MongoClient, made: Branches) -> None:
    db = unique("chain").replace("-", "_")
    client[db].items.insert_many([{"_id": i, "v": "main"} for i in range(5)])
    b1 = made.create()
    with made.client(b1) as c1:
        c1[db].items.insert_one({"_id": 10, "v": "b1"})
        c1[db].items.update_one({"_id": 0}, {"$set": {"v": "b1"}})
        c1[db].items.delete_one({"_id": 1})
    b2 = made.create(**{"from": b1["name"]})
    with made.client(b2) as c2:
        c2[db].items.insert_one({"_id": 20, "v": "b2"})
        c2[db].items.update_one({"_id": 2}, {"$set": {"v": "b2"}})
        c2[db].other.insert_one({"_id": "b2-only"})
    b3 = made.create(**{"from": b2["name"]})
    with made.client(b3) as c3:
        c3[db].items.insert_one({"_id": 30, "v": "b3"})
        c3[db].items.delete_one({"_id": 3})
        assert {d["_id"]: d["v"] for d in c3[db].items.find()} == {
            0: "b1", 2: "b2", 4: "main", 10: "b1", 20: "b2", 30: "b3"}
        assert list(c3[db].other.find()) == [{"_id": "b2-only"}]
        assert c3[db].items.count_documents({}) == 6
    # Nothing flowed upwards.
    with made.client(b2) as c2:
        assert {d["_id"]: d["v"] for d in c2[db].items.find()} == {
            0: "b1", 2: "b2", 3: "main", 4: "main", 10: "b1", 20: "b2"}
    with made.client(b1) as c1:
        assert {d["_id"]: d["v"] for d in c1[db].items.find()} == {
            0: "b1", 2: "main", 3: "main", 4: "main", 10: "b1"}
        assert "other" not in c1[db].list_collection_names()
    assert {d["_id"]: d["v"] for d in client[db].items.find()} == {
        i: "main" for i in range(5)}
    client.drop_database(db)


def test_siblings_are_isolated(client: MongoClient, made: Branches) -> None:
    db = unique("sib").replace("-", "_")
    client[db].items.insert_many([{"_id": i, "n": 0} for i in range(4)])
    left, right = made.create(), made.create()
    with made.client(left) as cl, made.client(right) as cr:
        cl[db].items.insert_one({"_id": "left"})
        cl[db].items.update_many({}, {"$inc": {"n": 1}})
        cl[db].items.delete_one({"_id": 0})
        cl[db].left_only.insert_one({"_id": 1})
        cr[db].items.insert_one({"_id": "right"})
        cr[db].items.delete_one({"_id": 3})

        assert sorted(map(str, (d["_id"] for d in cl[db].items.find()))) == [
            "1", "2", "3", "left"]
        assert {d["n"] for d in cl[db].items.find({"_id": {"$type": "int"}})} == {1}
        assert sorted(map(str, (d["_id"] for d in cr[db].items.find()))) == [
            "0", "1", "2", "right"]
        assert {d["n"] for d in cr[db].items.find({"_id": {"$type": "int"}})} == {0}
        assert "left_only" not in cr[db].list_collection_names()
    assert list(client[db].items.find().sort("_id", 1)) == [
        {"_id": i, "n": 0} for i in range(4)]
    assert "left_only" not in client[db].list_collection_names()
    client.drop_database(db)


def test_base_is_untouched_by_branch_workload(client: MongoClient, direct: MongoClient,
                                              made: Branches) -> None:
    db = unique("base").replace("-", "_")
    base = direct[db]
    base.a.insert_many([{"_id": i, "x": i % 7, "s": f"doc{i}", "nested": {"k": [i, i + 1]}}
                        for i in range(200)])
    base.b.insert_many([{"_id": f"k{i}", "x": i} for i in range(50)])
    base.b.create_index("x", name="x_1")
    base.c.insert_many([{"_id": i} for i in range(20)])
    base.d.insert_many([{"_id": i, "tag": "d"} for i in range(10)])
    base.e.insert_many([{"_id": i} for i in range(5)])
    before = fingerprint(base)
    assert set(before) == {"a", "b", "c", "d", "e"}

    branch = made.create()
    with made.client(branch) as c:
        v = c[db]
        v.a.insert_many([{"_id": 1000 + i, "x": -1} for i in range(20)])
        v.a.update_many({"x": 3}, {"$set": {"s": "changed"}, "$unset": {"nested": ""}})
        v.a.replace_one({"_id": 5}, {"replaced": True})
        v.a.delete_many({"x": 0})
        v.a.update_one({"_id": 5000}, {"$set": {"x": 9}}, upsert=True)
        v.a.find_one_and_update({"_id": 6}, {"$inc": {"x": 100}})
        v.a.create_index([("s", 1), ("x", -1)], name="s_x")
        v.b.find_one_and_delete({"_id": "k3"})
        v.b.delete_many({"x": {"$gte": 40}})
        v.b.drop_index("x_1")
        v.c.drop()
        v.d.rename("d_renamed")
        v.e.update_many({}, {"$set": {"touched": True}})
        v.e.rename("e_renamed", dropTarget=True)
        v.fresh.insert_one({"_id": 1})

        # The branch really saw its own workload.
        assert v.a.count_documents({}) == 200 + 20 - 29 + 1
        assert v.a.find_one({"_id": 5}) == {"_id": 5, "replaced": True}
        assert "s_x" in v.a.index_information()
        assert "x_1" not in v.b.index_information()
        assert set(v.list_collection_names()) == {"a", "b", "d_renamed", "e_renamed", "fresh"}
        assert v.d_renamed.count_documents({}) == 10

    after = fingerprint(base)
    assert after == before
    # The main port sees the untouched base as well.
    assert set(client[db].list_collection_names()) == {"a", "b", "c", "d", "e"}
    assert client[db].a.find_one({"_id": 5})["s"] == "doc5"  # type: ignore[index]
    made.cleanup()
    assert fingerprint(base) == before
    direct.drop_database(db)


# -- deletion cleans up ---------------------------------------------------------------------

def test_delete_removes_overlays_and_wal(proxy: ProxyProcess, direct: MongoClient,
                                         made: Branches) -> None:
    db = unique("del").replace("-", "_")
    direct[db].items.insert_many([{"_id": i} for i in range(10)])
    branch = made.create()
    bid = bid_of(direct, proxy, branch["name"])
    with made.client(branch) as c:
        c[db].items.insert_one({"_id": 100})
        c[db].items.delete_many({"_id": {"$lt": 3}})
        c[db].items.update_one({"_id": 5}, {"$set": {"v": 1}})
        c[db].other.insert_many([{"_id": i} for i in range(3)])
        c[db].gone.insert_one({"_id": 1})
        c[db].gone.drop()
    wal = direct[proxy.meta_db]["wal"]
    assert wal.count_documents({"b": bid}) > 0
    assert overlay_collections(direct, bid)
    assert direct[proxy.meta_db]["namespaces"].count_documents({"bid": bid}) > 0

    assert proxy.api("DELETE", f"/branches/{branch['name']}")[0] == 200
    assert overlay_collections(direct, bid) == []
    assert wal.count_documents({"b": bid}) == 0
    assert direct[proxy.meta_db]["namespaces"].count_documents({"bid": bid}) == 0
    assert direct[proxy.meta_db]["branches"].count_documents({"_id": branch["name"]}) == 0
    assert sorted(d["_id"] for d in direct[db].items.find()) == list(range(10))
    direct.drop_database(db)


# -- ports ------------------------------------------------------------------------------------

def _bindable_range(size: int) -> tuple[int, int]:
    """A run of `size` consecutive ports that can all be bound right now."""
    for _ in range(50):
        lo = free_port()
        if lo + size > 65535:
            continue
        try:
            for port in range(lo, lo + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return lo, lo + size - 1
    raise RuntimeError("no free port range")


def test_auto_port_skips_ports_held_by_other_sockets(upstream: Secantus) -> None:
    lo, hi = _bindable_range(3)
    holders = []
    for port in (lo, lo + 1):
        s = socket.socket()
        s.bind(("127.0.0.1", port))
        s.listen()
        holders.append(s)
    proxy = ProxyProcess(upstream.uri, meta_db=unique("mbports").replace("-", "_"),
                         branch_ports=(lo, hi)).start()
    try:
        status, first = proxy.api("POST", "/branches", {"name": "first"})
        assert status == 201 and isinstance(first, dict) and first["port"] == hi
        status, reply = proxy.api("POST", "/branches", {"name": "second"})
        assert status == 409 and isinstance(reply, dict)
        assert reply["error"] == f"no free port left in {lo}-{hi}"
        assert proxy.api("GET", "/branches/second")[0] == 404
        for s in holders:
            s.close()
        status, second = proxy.api("POST", "/branches", {"name": "second"})
        assert status == 201 and isinstance(second, dict) and second["port"] == lo
        status, listed = proxy.api("GET", "/branches")
        assert {b["name"]: b["port"] for b in listed} == {  # type: ignore[union-attr]
            "first": hi, "second": lo}
    finally:
        for s in holders:
            s.close()
        proxy.stop()
        with MongoClient(upstream.uri, directConnection=True) as c:
            c.drop_database(proxy.meta_db)


# -- restart ------------------------------------------------------------------------------------

def test_branches_survive_restart(tmp_path: Path) -> None:
    server = Secantus(storage=str(tmp_path / "data")).start()
    first = ProxyProcess(server.uri, meta_db="mb_restart")
    second: ProxyProcess | None = None
    try:
        first.start()
        with MongoClient(server.uri, directConnection=True) as d:
            d.rs_db.items.insert_many([{"_id": i, "v": 0} for i in range(10)])
        status, dev = first.api("POST", "/branches", {"name": "dev"})
        assert status == 201 and isinstance(dev, dict)
        explicit = free_port()
        status, feat = first.api("POST", "/branches",
                                 {"name": "feat", "from": "dev", "port": explicit})
        assert status == 201 and isinstance(feat, dict)
        with MongoClient(dev["uri"]) as c:
            c.rs_db.items.insert_one({"_id": 100, "v": "dev"})
            c.rs_db.items.update_one({"_id": 1}, {"$set": {"v": "dev"}})
            c.rs_db.items.delete_one({"_id": 2})
            c.rs_db.items.create_index("v", name="v_1")
        with MongoClient(feat["uri"]) as c:
            c.rs_db.items.insert_one({"_id": 200, "v": "feat"})
            c.rs_db.items.delete_one({"_id": 3})
            c.rs_db.feat_only.insert_one({"_id": "f"})
        status, listed_before = first.api("GET", "/branches")
        status, shown_before = first.api("GET", "/branches/dev")

        assert first.stop(signal.SIGTERM) == 0

        second = ProxyProcess(server.uri, meta_db="mb_restart", branch_ports=first.branch_ports)
        second.start()
        status, listed_after = second.api("GET", "/branches")
        assert status == 200
        key = lambda b: b["name"]  # noqa: E731
        assert sorted(listed_after, key=key) == sorted(listed_before, key=key)  # type: ignore[arg-type]
        assert second.api("GET", "/branches/dev") == (200, shown_before)

        expected_dev = {i: 0 for i in range(10) if i != 2} | {1: "dev", 100: "dev"}
        with MongoClient(dev["uri"]) as c:
            assert {x["_id"]: x["v"] for x in c.rs_db.items.find()} == expected_dev
            assert "v_1" in c.rs_db.items.index_information()
            c.rs_db.items.insert_one({"_id": 101, "v": "after"})
            assert c.rs_db.items.count_documents({}) == len(expected_dev) + 1
        with MongoClient(f"mongodb://127.0.0.1:{explicit}/") as c:
            got = {x["_id"]: x["v"] for x in c.rs_db.items.find()}
            # A snapshot: dev as at feat's fork, before and after the restart, plus feat's
            # own writes; none of dev's later writes or its index shows through.
            assert got == {i: 0 for i in range(10) if i != 3} | {200: "feat"}
            assert "v_1" not in c.rs_db.items.index_information()
            assert list(c.rs_db.feat_only.find()) == [{"_id": "f"}]
        with MongoClient(second.uri) as c:
            assert list(c.rs_db.items.find().sort("_id", 1)) == [
                {"_id": i, "v": 0} for i in range(10)]
    finally:
        if second is not None:
            second.stop()
        first.stop()
        server.stop()


# -- more edges -------------------------------------------------------------------------------

def test_parent_must_be_a_string(proxy: ProxyProcess) -> None:
    for parent in (None, 5, ["main"]):
        status, reply = proxy.api("POST", "/branches", {"name": unique("p"), "from": parent})
        assert status == 400, reply
        assert isinstance(reply, dict) and "from must be a branch name" in reply["error"]


def test_unknown_charset_is_400(proxy: ProxyProcess) -> None:
    status, reply = raw_post(proxy, "/branches", b'{"name": "cs"}',
                             content_type="application/json; charset=no-such-charset")
    assert status == 400, reply
    assert isinstance(reply, dict) and "error" in reply


def test_concurrent_creates(proxy: ProxyProcess, made: Branches) -> None:
    names = [unique("conc") for _ in range(8)]
    for name in names:
        made.track(name)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda n: proxy.api("POST", "/branches", {"name": n}), names))
    assert [status for status, _ in results] == [201] * 8
    ports = [reply["port"] for _, reply in results]  # type: ignore[index]
    assert len(set(ports)) == 8
    same = unique("same")
    made.track(same)
    with ThreadPoolExecutor(6) as pool:
        statuses = sorted(s for s, _ in pool.map(
            lambda _: proxy.api("POST", "/branches", {"name": same}), range(6)))
    assert statuses == [201, 409, 409, 409, 409, 409]
    status, listed = proxy.api("GET", "/branches")
    assert status == 200
    assert sorted(b["name"] for b in listed if b["name"] in {*names, same}) == sorted(  # type: ignore[union-attr]
        [*names, same])


def test_recreated_name_starts_fresh(client: MongoClient, made: Branches) -> None:
    db = unique("again").replace("-", "_")
    client[db].items.insert_many([{"_id": 1}, {"_id": 2}])
    name = unique("again")
    branch = made.create(name)
    with made.client(branch) as c:
        c[db].items.insert_one({"_id": 3})
        c[db].items.delete_one({"_id": 1})
        c[db].extra.insert_one({"_id": 1})
    made.cleanup()
    branch = made.create(name)
    with made.client(branch) as c:
        assert sorted(d["_id"] for d in c[db].items.find()) == [1, 2]
        assert "extra" not in c[db].list_collection_names()
    client.drop_database(db)


def test_delete_closes_connected_clients(proxy: ProxyProcess, made: Branches) -> None:
    branch = made.create()
    c: MongoClient = MongoClient(branch["uri"], serverSelectionTimeoutMS=2000,
                                 retryReads=False, retryWrites=False)
    try:
        c.conn_db.items.insert_one({"_id": 1})
        assert proxy.api("DELETE", f"/branches/{branch['name']}")[0] == 200
        with pytest.raises(PyMongoError):
            c.conn_db.items.find_one()
    finally:
        c.close()
