"""Capture of main's changes from the upstream's change stream (docs/ARCHITECTURE.md,
"Capture"): writes made without the proxy are preserved for the children of main, main
has a history to branch from, and the capture resumes after a restart."""

from __future__ import annotations

import datetime as dt
import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import InsertOne, MongoClient
from pymongo.errors import ClientBulkWriteException, OperationFailure

from tests.branchutil import Branches, branches, unique
from tests.servers import ProxyProcess, Secantus


def contents(client: MongoClient, db: str) -> dict[Any, Any]:
    return {d["_id"]: d for d in client[db].items.find()}


def test_a_branch_of_main_at_a_past_point(proxy: ProxyProcess, client: MongoClient,
                                          direct: MongoClient, made: Branches,
                                          db_name: str) -> None:
    """Main as it was at an LSN and at a time, whoever changed it since (the main port
    or another application on the upstream), while main had no children."""
    items = client[db_name].items
    items.insert_many([{"_id": i, "v": i} for i in range(50)])
    made.create()  # waits for the capture: main's history now holds the inserts
    status, log = proxy.api("GET", "/branches/main/log?limit=1")
    assert status == 200 and isinstance(log, dict)
    point = log["entries"][0]["lsn"]
    then = contents(client, db_name)
    when = dt.datetime.now(dt.UTC).isoformat()
    made.cleanup()
    items.update_many({"_id": {"$lt": 10}}, {"$set": {"v": "later"}})
    items.delete_many({"_id": {"$gte": 40}})
    items.insert_one({"_id": "later"})
    direct[db_name].items.update_one({"_id": 20}, {"$set": {"v": "behind"}})
    direct[db_name].items.insert_one({"_id": "behind"})
    for at in (point, when):
        past = made.create(**{"from": "main", "at": at})
        assert past["isolation"] == "snapshot"
        with made.client(past) as b:
            assert contents(b, db_name) == then, at
            assert b[db_name].items.count_documents({}) == 50
        items.update_one({"_id": 30}, {"$set": {"v": "after the branch"}})
        with made.client(past) as b:
            assert b[db_name].items.find_one({"_id": 30}) == {"_id": 30, "v": 30}
        items.update_one({"_id": 30}, {"$set": {"v": 30}})
    # Its diff against main names exactly what main changed since.
    status, body = proxy.api("GET", f"/branches/{past['name']}/diff")
    assert status == 200 and isinstance(body, dict)
    changed = sorted(repr(c["_id"]) for c in body["changes"] if c.get("ns") == f"{db_name}.items")
    assert changed == sorted(repr(i) for i in [*range(10), *range(40, 50), 20, "later", "behind"])
    with urllib.request.urlopen(f"{proxy.admin_url}/metrics") as reply:
        scraped = reply.read().decode()
    events = [line for line in scraped.splitlines()
              if line.startswith("mongobranch_capture_events_total ")]
    assert events and float(events[0].split()[1]) >= 50
    assert "mongobranch_capture_lag_seconds " in scraped


def test_a_branch_of_main_at_a_past_point_has_main_indexes_and_options_of_then(
        proxy: ProxyProcess, client: MongoClient, direct: MongoClient, made: Branches,
        db_name: str) -> None:
    """Main's index and option changes are in its history, through the main port or
    behind the proxy's back: a branch of main at an earlier point shows the index list
    and validator main had then."""
    items = client[db_name].items
    items.insert_many([{"_id": i, "v": i} for i in range(5)])
    items.create_index("v")
    made.create()  # waits for the capture
    status, log = proxy.api("GET", "/branches/main/log?limit=1")
    assert status == 200 and isinstance(log, dict)
    point = log["entries"][0]["lsn"]
    made.cleanup()

    def shown(db: Any) -> tuple[list[str], Any]:
        options = {c["name"]: c.get("options", {}) for c in db.list_collections()}
        return sorted(ix["name"] for ix in db.items.list_indexes()), \
            options["items"].get("validator")

    then = shown(client[db_name])
    assert then == (["_id_", "v_1"], None)
    direct[db_name].items.create_index("w")
    items.drop_index("v_1")
    direct[db_name].command("collMod", "items", validator={"v": {"$type": "number"}})
    assert shown(client[db_name]) == (["_id_", "w_1"], {"v": {"$type": "number"}})
    made.create()  # waits for the capture: main's log holds the three changes
    status, log = proxy.api("GET", "/branches/main/log?limit=3")
    assert status == 200 and isinstance(log, dict)
    assert [(e["op"], e["ns"]) for e in log["entries"]] == [
        ("collMod", f"{db_name}.items"), ("dropIndexes", f"{db_name}.items"),
        ("createIndexes", f"{db_name}.items")]

    past = made.create(**{"from": "main", "at": point})
    with made.client(past) as b:
        assert shown(b[db_name]) == then
        b[db_name].items.insert_one({"_id": "text", "v": "text"})  # no validator then
        assert b[db_name].items.find_one({"v": 3}, hint="v_1") == {"_id": 3, "v": 3}
    assert shown(client[db_name]) == (["_id_", "w_1"], {"v": {"$type": "number"}})


def test_merging_a_branch_of_main_at_a_past_point_judges_conflicts_against_main_now(
        proxy: ProxyProcess, client: MongoClient, direct: MongoClient, made: Branches,
        db_name: str) -> None:
    """A branch of main at a past point records main's images as they were when it was
    made (what it hides): merged back with no change on main since, it returns main to
    that point without conflict; a document main changed after the branch was made is a
    conflict, whoever changed it."""
    items = client[db_name].items
    items.insert_many([{"_id": i, "v": i} for i in range(20)])
    made.create()
    status, log = proxy.api("GET", "/branches/main/log?limit=1")
    assert status == 200 and isinstance(log, dict)
    point = log["entries"][0]["lsn"]
    then = contents(client, db_name)
    made.cleanup()
    items.update_many({"_id": {"$lt": 5}}, {"$set": {"v": "later"}})
    items.delete_many({"_id": {"$gte": 15}})
    direct[db_name].items.update_one({"_id": 7}, {"$set": {"v": "behind"}})

    past = made.create(**{"from": "main", "at": point})
    status, body = proxy.api("POST", f"/branches/{past['name']}/merge",
                             {"strategy": "abort", "dry_run": True})
    assert status == 200 and isinstance(body, dict), body
    assert body["conflicts"] == [], body

    # Main changes two of the documents the branch restores, one through each path.
    items.update_one({"_id": 0}, {"$set": {"v": "after the branch"}})
    direct[db_name].items.insert_one({"_id": 15, "v": "back, differently"})
    status, body = proxy.api("POST", f"/branches/{past['name']}/merge",
                             {"strategy": "abort", "dry_run": True})
    assert status in (200, 409) and isinstance(body, dict), body
    assert sorted(repr(c["_id"]) for c in body["conflicts"]) == ["0", "15"], body

    items.update_one({"_id": 0}, {"$set": {"v": "later"}})
    items.delete_one({"_id": 15})
    status, body = proxy.api("POST", f"/branches/{past['name']}/merge",
                             {"strategy": "abort", "force": True})
    assert status == 200 and isinstance(body, dict), body
    assert contents(client, db_name) == then


def again(proxy: ProxyProcess) -> ProxyProcess:
    """The same proxy started again: same upstream, metadata database and ports."""
    return ProxyProcess(proxy.upstream, meta_db=proxy.meta_db, port=proxy.port,
                        admin_port=proxy.admin_port, branch_ports=proxy.branch_ports).start()


@pytest.fixture()
def stored(tmp_path: Path) -> Iterator[Secantus]:
    server = Secantus(storage=str(tmp_path / "data")).start()
    yield server
    server.stop()


def test_the_capture_resumes_after_a_restart(stored: Secantus) -> None:
    """Writes made on the upstream while the proxy is down are preserved for the
    children when it comes back, from the persisted resume token."""
    proxy = ProxyProcess(stored.uri, meta_db="mb_capture_restart").start()
    db = "caprestart"
    try:
        with MongoClient(stored.uri) as direct, branches(proxy) as made:
            direct[db].items.insert_many([{"_id": i, "v": i} for i in range(20)])
            kid = made.create()
            with made.client(kid) as c:
                expected = contents(c, db)
            assert proxy.stop() == 0
            direct[db].items.update_many({"_id": {"$lt": 5}}, {"$set": {"v": "down"}})
            direct[db].items.delete_one({"_id": 7})
            direct[db].items.insert_one({"_id": "down"})
            proxy = made.proxy = again(proxy)
            with made.client(kid) as c:
                assert contents(c, db) == expected
            status, info = proxy.api("GET", f"/branches/{kid['name']}")
            assert status == 200 and isinstance(info, dict)
            assert info["isolation"] == "snapshot"
            # Each write is in main's history once, though the stream was replayed.
            wal = direct["mb_capture_restart"]["wal"]
            assert wal.count_documents({"b": "main", "ns": f"{db}.items", "id": 7}) == 2
            assert wal.count_documents({"b": "main", "ns": f"{db}.items", "id": "down"}) == 1
    finally:
        proxy.stop()


def test_without_capture_branches_say_proxy_writes_only(upstream: Secantus) -> None:
    """--no-capture: what reaches the upstream without the proxy shows through, and the
    branch says so; main's writes through the proxy are still preserved."""
    proxy = ProxyProcess(upstream.uri, meta_db="mb_nocapture", extra=["--no-capture"]).start()
    db = unique("nocap").replace("-", "_")
    try:
        with MongoClient(proxy.uri) as m, MongoClient(upstream.uri) as direct, \
                branches(proxy) as made:
            m[db].items.insert_many([{"_id": i} for i in range(5)])
            kid = made.create()
            assert kid["isolation"] == "proxy-writes-only"
            m[db].items.update_one({"_id": 1}, {"$set": {"v": "main port"}})
            # Main's port splits a client bulkWrite into its own writes, which would run
            # outside a transaction: refused there, as mongod refuses what it cannot hold.
            with m.start_session() as session, \
                    pytest.raises(ClientBulkWriteException) as refused:
                session.start_transaction()
                m.bulk_write([InsertOne(namespace=f"{db}.items", document={"_id": 9})],
                             session=session)
            error = refused.value.error
            assert isinstance(error, OperationFailure) and error.code == 263, error
            assert m[db].items.find_one({"_id": 9}) is None
            direct[db].items.update_one({"_id": 2}, {"$set": {"v": "behind"}})
            with made.client(kid) as c:
                shown = contents(c, db)
            assert shown[1] == {"_id": 1}
            assert shown[2] == {"_id": 2, "v": "behind"}
            status, body = proxy.api("POST", "/branches", {"name": unique("at"),
                                                           "from": "main", "at": 1})
            assert status == 400 and "capture" in str(body), body
        assert "capture of main's changes is off (--no-capture)" in proxy.read_log()
        assert proxy.stop() == 0
        # With the capture on from now, main's history starts now: an earlier point is
        # refused rather than answered from a history that misses what happened then.
        proxy = ProxyProcess(upstream.uri, meta_db="mb_nocapture").start()
        status, body = proxy.api("POST", "/branches", {"name": unique("early"),
                                                       "from": "main", "at": 1})
        assert status == 409 and "main's history starts at LSN" in str(body), body
    finally:
        proxy.stop()


def test_sigkill_before_the_capture_preserved_a_write(stored: Secantus) -> None:
    """Writes acknowledged on the upstream but not yet preserved when the proxy dies
    (it is stopped, so its capture cannot have run; then SIGKILLed): after the restart
    every child of main still shows main as at its fork. Then writes through the main
    port, killed right after their acknowledgment, whatever the capture had done."""
    proxy = ProxyProcess(stored.uri, meta_db="mb_capture_kill").start()
    db = "capkill"
    try:
        with MongoClient(stored.uri) as direct, branches(proxy) as made:
            direct[db].items.insert_many([{"_id": i, "v": i} for i in range(40)])
            kids = [made.create(), made.create()]
            with made.client(kids[1]) as c:
                c[db].items.update_one({"_id": 3}, {"$set": {"v": "kid"}})
            expected = []
            for kid in kids:
                with made.client(kid) as c:
                    expected.append(contents(c, db))

            def restarted_still_exact() -> ProxyProcess:
                made.proxy = again(proxy)
                for kid, want in zip(kids, expected, strict=True):
                    with made.client(kid) as c:
                        assert contents(c, db) == want
                return made.proxy

            proxy.signal(signal.SIGSTOP)
            direct[db].items.update_many({"_id": {"$lt": 10}}, {"$set": {"v": "stopped"}})
            direct[db].items.delete_many({"_id": {"$gte": 30}})
            direct[db].items.insert_one({"_id": "stopped"})
            proxy.kill()
            proxy = restarted_still_exact()
            with MongoClient(proxy.uri) as m:
                m[db].items.update_many({}, {"$set": {"v": "main port"}})
                m[db].items.insert_one({"_id": "main port"})
            proxy.kill()
            proxy = restarted_still_exact()
    finally:
        proxy.stop()


def test_two_proxies_on_one_upstream_leave_each_others_metadata_alone(
        upstream: Secantus, direct: MongoClient) -> None:
    """Each proxy names its metadata database in the upstream's registry: another
    proxy's capture does not take its WAL and overlays for main's data (they fed each
    other's WAL, growing without end, before)."""
    first = ProxyProcess(upstream.uri, meta_db="mb_two_a").start()
    second = ProxyProcess(upstream.uri, meta_db="mb_two_b").start()
    db = unique("two").replace("-", "_")
    try:
        with branches(first) as made_a, branches(second) as made_b:
            for made in (made_a, made_b):
                with made.client(made.create()) as c:
                    c[db].items.insert_many([{"_id": i} for i in range(20)])
            for made in (made_a, made_b):
                made.create()  # each capture has passed every write made before
            for mine, theirs in (("mb_two_a", "mb_two_b"), ("mb_two_b", "mb_two_a")):
                logged = direct[mine].wal.distinct("ns", {"b": "main"})
                assert not [ns for ns in logged if ns.startswith(f"{theirs}.")], logged
            assert direct["mongobranch_registry"].meta_dbs.count_documents(
                {"_id": {"$in": ["mb_two_a", "mb_two_b"]}}) == 2
            # A copy of main copies main's data, not another proxy's WAL nor the registry.
            with MongoClient(first.uri) as main:
                main[db].on_main.insert_many([{"_id": i} for i in range(3)])
            copy = made_a.create(mode="copy")
            with made_a.client(copy) as c:
                assert sorted(d["_id"] for d in c[db].on_main.find()) == [0, 1, 2]
            bid = direct["mb_two_a"].branches.find_one({"_id": copy["name"]})["bid"]
            copied = direct["mb_two_a"].namespaces.distinct("db", {"bid": bid})
            assert db in copied and "mb_two_b" not in copied, copied
            assert "mongobranch_registry" not in copied, copied
    finally:
        first.stop()
        second.stop()


def test_updates_too_large_for_one_entry_are_kept_and_logged_whole(
        proxy: ProxyProcess, client: MongoClient, direct: MongoClient, made: Branches,
        db_name: str) -> None:
    """Updates on main of documents of random bytes: one of 9 MiB, whose pre- and
    post-image do not fit one WAL entry, and one near 16 MiB, whose image alone does
    not. Main's history logs both images of each, out of line where they do not fit; a
    child keeps both documents as they were and stays exact; a branch of main at a point
    before the updates shows them as they were then; the capture goes on."""
    items = client[db_name].items
    big = os.urandom(9 * 1024 * 1024)
    huge = os.urandom(16 * 1024 * 1024 - 400)
    items.insert_many([{"_id": "big", "b": big, "n": 0}, {"_id": "small", "n": 0}])
    items.insert_one({"_id": "huge", "b": huge})
    kid = made.create()  # waits for the capture
    assert kid["isolation"] == "snapshot"
    status, log = proxy.api("GET", "/branches/main/log?limit=1")
    assert status == 200 and isinstance(log, dict)
    point = int(log["entries"][0]["lsn"]) if log["entries"] else 0
    items.update_one({"_id": "big"}, {"$set": {"n": 1}})
    items.update_one({"_id": "huge"}, {"$set": {"n": 1}})
    items.update_one({"_id": "small"}, {"$set": {"n": 1}})
    then = [{"_id": "big", "b": big, "n": 0}, {"_id": "huge", "b": huge},
            {"_id": "small", "n": 0}]
    with made.client(kid) as b:
        assert sorted(b[db_name].items.find(), key=lambda d: d["_id"]) == then
    status, info = proxy.api("GET", f"/branches/{kid['name']}")
    assert status == 200 and isinstance(info, dict)
    assert info["isolation"] == "snapshot", info
    wal = direct[proxy.meta_db or ""].wal
    ns = f"{db_name}.items"
    # Each document's last entry: its update.
    logged = {e["id"]: e for e in wal.find({"b": "main", "ns": ns, "op": "put"},
                                           {"pre": 0, "post": 0, "prez": 0, "postz": 0}
                                           ).sort("_id", 1)}
    assert sorted(logged) == ["big", "huge", "small"], logged
    assert not any(e.get("nopre") for e in logged.values()), logged
    for name in ("big", "huge"):
        assert logged[name].get("prex") or logged[name].get("postx"), logged[name]
    past = made.create(**{"from": "main", "at": point})
    with made.client(past) as b:
        assert sorted(b[db_name].items.find(), key=lambda d: d["_id"]) == then
    items.insert_one({"_id": "after"})
    with made.client(made.create()) as b:
        assert b[db_name].items.find_one({"_id": "after"}) == {"_id": "after"}
