"""Branch lifecycle against a real proxy run with the serve defaults (main protected, drops
restorable for 24 h): expiry at a time and after idleness, protection, refresh, soft
delete and restore, over the admin API, the wire and the CLI.

Time is never waited for: expiry is driven through POST /reap with an explicit `now`; the
reaper task itself is checked by a proxy with a short --reap-interval, waiting for the
branch to be gone (an observable event), whatever the pass that removed it."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from tests.branchutil import bid_of, overlay_collections, unique
from tests.servers import BIN, ProxyProcess, Secantus


@pytest.fixture(scope="module")
def life(upstream: Secantus) -> Iterator[ProxyProcess]:
    # A pass an hour: no pass runs during the module but those a test asks for.
    proc = ProxyProcess(upstream.uri, meta_db="mongobranch_life", lifecycle_defaults=True,
                        extra=["--reap-interval", "3600"]).start()
    yield proc
    proc.stop()


def api(proxy: ProxyProcess, method: str, path: str, body: object | None = None
        ) -> tuple[int, Any]:
    return proxy.api(method, path, body)


def ok(proxy: ProxyProcess, method: str, path: str, body: object | None = None,
       status: int = 200) -> Any:
    got, reply = proxy.api(method, path, body)
    assert got == status, reply
    return reply


def refused(proxy: ProxyProcess, method: str, path: str, body: object | None = None,
            status: int = 400) -> str:
    got, reply = proxy.api(method, path, body)
    assert got == status, reply
    assert isinstance(reply, dict) and isinstance(reply["error"], str)
    return str(reply["error"])


def create(proxy: ProxyProcess, **body: Any) -> dict[str, Any]:
    body.setdefault("name", unique("lc"))
    return dict(ok(proxy, "POST", "/branches", body, 201))


def when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def reap(proxy: ProxyProcess, now: dt.datetime, dry_run: bool = False) -> dict[str, Any]:
    return dict(ok(proxy, "POST", "/reap", {"now": now.isoformat(), "dry_run": dry_run}))


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def names(proxy: ProxyProcess, deleted: bool = False) -> set[str]:
    path = "/branches?deleted=true" if deleted else "/branches"
    return {b["name"] for b in ok(proxy, "GET", path)}


def drop_all(proxy: ProxyProcess, *names_: str) -> None:
    for name in names_:
        proxy.api("DELETE", f"/branches/{name}?force=true&purge=true")


# -- expiry --------------------------------------------------------------------------------

def test_ttl_at_creation_expires_at_its_time(life: ProxyProcess) -> None:
    before = dt.datetime.now(dt.UTC)
    branch = create(life, ttl="2h")
    after = dt.datetime.now(dt.UTC)
    expires = when(branch["expires_at"])
    assert before + dt.timedelta(hours=2) - dt.timedelta(seconds=1) <= expires
    assert expires <= after + dt.timedelta(hours=2)
    assert ok(life, "GET", f"/branches/{branch['name']}")["expires_at"] == branch["expires_at"]

    early = reap(life, expires - dt.timedelta(seconds=1))
    assert branch["name"] not in [e["branch"] for e in early["expired"]]
    assert branch["name"] in names(life)

    preview = reap(life, expires + dt.timedelta(seconds=1), dry_run=True)
    assert {"branch": branch["name"], "due": expires.isoformat()} in preview["expired"]
    assert branch["name"] in names(life)  # a dry run changes nothing

    done = reap(life, expires + dt.timedelta(seconds=1))
    assert {"branch": branch["name"], "due": expires.isoformat()} in done["expired"]
    assert branch["name"] not in names(life)
    assert branch["name"] in names(life, deleted=True)  # expired = dropped: restorable
    assert not listening(branch["port"])
    log = life.read_log()
    assert f"branch {branch['name']} expired" in log
    audit = [json.loads(line.split("mongobranch.audit: ", 1)[1])
             for line in log.splitlines() if "mongobranch.audit: " in line]
    assert {"op": "expire", "branch": branch["name"], "via": "reaper", "outcome": "ok"} \
        .items() <= next(e for e in audit if e["op"] == "expire"
                         and e["branch"] == branch["name"]).items()
    drop_all(life, branch["name"])


def test_expires_at_changed_and_cleared(life: ProxyProcess) -> None:
    at = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).replace(microsecond=0)
    branch = create(life, expires_at=at.isoformat().replace("+00:00", "Z"))
    name = branch["name"]
    assert when(branch["expires_at"]) == at
    later = at + dt.timedelta(days=1)
    patched = ok(life, "PATCH", f"/branches/{name}", {"expires_at": later.isoformat()})
    assert when(patched["expires_at"]) == later
    assert name not in [e["branch"] for e in reap(life, at + dt.timedelta(hours=1))["expired"]]
    assert name in names(life)
    ttl = ok(life, "PATCH", f"/branches/{name}", {"ttl": "3h"})
    assert when(ttl["expires_at"]) < later
    cleared = ok(life, "PATCH", f"/branches/{name}", {"expires_at": None})
    assert cleared["expires_at"] is None
    reap(life, dt.datetime.now(dt.UTC) + dt.timedelta(days=3650))
    assert name in names(life)  # never expires now
    drop_all(life, name)


def test_idle_expiry_counts_from_the_last_request(life: ProxyProcess, db_name: str) -> None:
    branch = create(life, idle_ttl="1h")
    name = branch["name"]
    assert branch["idle_ttl"] == 3600 and branch["last_used"] is None
    with MongoClient(branch["uri"], serverSelectionTimeoutMS=10000) as c:
        c.admin.command("ping")  # the handshake and ping are not a use
        assert ok(life, "GET", f"/branches/{name}")["last_used"] is None
        before = dt.datetime.now(dt.UTC)
        c[db_name].items.insert_one({"_id": 1})
        used = when(ok(life, "GET", f"/branches/{name}")["last_used"])
        assert used >= before - dt.timedelta(milliseconds=1)
        assert name not in [e["branch"] for e in reap(
            life, used + dt.timedelta(hours=1) - dt.timedelta(seconds=1))["expired"]]
        assert name in names(life)
        c[db_name].items.find_one({"_id": 1})
        again = when(ok(life, "GET", f"/branches/{name}")["last_used"])
        assert again >= used
    gone = reap(life, again + dt.timedelta(hours=1, seconds=1))
    assert name in [e["branch"] for e in gone["expired"]]
    assert name not in names(life)
    # Its last use was written to its record, so a restart keeps the idle clock.
    doc = MongoClient(life.upstream)["mongobranch_life"]["branches"].find_one({"_id": name})
    assert doc is not None and doc["last_used"] is not None
    drop_all(life, name)


def test_a_parent_expires_after_its_children(life: ProxyProcess) -> None:
    parent = create(life, ttl="1h")
    child = create(life, **{"from": parent["name"]})
    future = when(parent["expires_at"]) + dt.timedelta(minutes=1)
    result = reap(life, future)
    assert parent["name"] not in [e["branch"] for e in result["expired"]]
    skipped = {s["branch"]: s["reason"] for s in result["skipped"]}
    assert skipped[parent["name"]] == f"it has child branches: {child['name']}"
    assert f"branch {parent['name']} expired at" in life.read_log()
    assert {parent["name"], child["name"]} <= names(life)
    # Both due: one pass takes the child, then the parent.
    ok(life, "PATCH", f"/branches/{child['name']}", {"ttl": "30m"})
    result = reap(life, future)
    order = [e["branch"] for e in result["expired"]]
    assert order.index(child["name"]) < order.index(parent["name"])
    assert {parent["name"], child["name"]} <= names(life, deleted=True)
    # A child comes back only after its parent.
    err = refused(life, "POST", f"/branches/{child['name']}/restore", status=409)
    assert f"restore {parent['name']!r} first" in err
    ok(life, "POST", f"/branches/{parent['name']}/restore")
    ok(life, "POST", f"/branches/{child['name']}/restore")
    assert {parent["name"], child["name"]} <= names(life)
    # Reaped "in the future": by the real clock its expiry is still ahead, and stays.
    assert ok(life, "GET", f"/branches/{parent['name']}")["expires_at"] == parent["expires_at"]
    drop_all(life, child["name"], parent["name"])


def test_the_reaper_task_drops_an_expired_branch(upstream: Secantus) -> None:
    proc = ProxyProcess(upstream.uri, meta_db="mongobranch_reaper", lifecycle_defaults=True,
                        extra=["--reap-interval", "0.2", "--deleted-retention", "0"]).start()
    try:
        branch = create(proc, ttl="1s")
        deadline = time.monotonic() + 60
        while proc.api("GET", f"/branches/{branch['name']}")[0] != 404:
            assert time.monotonic() < deadline, "the reaper never dropped the branch"
            time.sleep(0.1)
        assert f"branch {branch['name']} expired" in proc.read_log()
        assert branch["name"] not in names(proc, deleted=True)  # retention 0: gone
    finally:
        proc.stop()


# -- protection ----------------------------------------------------------------------------

def test_protected_branch_needs_force(life: ProxyProcess, db_name: str) -> None:
    branch = create(life, protected=True)
    name = branch["name"]
    assert branch["protected"] is True
    child = create(life, **{"from": name})
    with MongoClient(child["uri"]) as c:
        c[db_name].items.insert_one({"_id": 1})
    for method, path, body in [
            ("DELETE", f"/branches/{name}", None),
            ("POST", f"/branches/{name}/reset", {"to": 0}),
            ("POST", f"/branches/{child['name']}/merge", {"strategy": "ours"})]:
        err = refused(life, method, path, body, 409)
        assert f"branch {name!r} is protected" in err and "force" in err
    # Bad input is answered as such, not as a protection refusal.
    assert "dry_run must be" in refused(life, "POST", f"/branches/{child['name']}/merge",
                                        {"dry_run": "yes"})
    assert "merges into its parent" in refused(life, "POST",
                                               f"/branches/{child['name']}/merge",
                                               {"into": "elsewhere"})
    # A dry run changes nothing: no force needed.
    assert ok(life, "POST", f"/branches/{child['name']}/merge",
              {"dry_run": True})["applied"]["insert"] == 1
    merged = ok(life, "POST", f"/branches/{child['name']}/merge?force=true",
                {"strategy": "ours"})
    assert merged["applied"]["insert"] == 1
    ok(life, "POST", f"/branches/{name}/reset", {"to": 0, "force": True})
    # Expiry never takes a protected branch.
    ok(life, "PATCH", f"/branches/{name}", {"ttl": "1m"})
    drop_all(life, child["name"])
    result = reap(life, dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    assert {"branch": name, "reason": "it is protected"}.items() <= next(
        s for s in result["skipped"] if s["branch"] == name).items()
    assert ok(life, "PATCH", f"/branches/{name}", {"protected": False})["protected"] is False
    assert ok(life, "DELETE", f"/branches/{name}")["deleted"] == name
    drop_all(life, name)


def test_main_is_protected_by_default(life: ProxyProcess, db_name: str) -> None:
    branch = create(life)
    with MongoClient(branch["uri"]) as c:
        c[db_name].items.insert_one({"_id": "m"})
    err = refused(life, "POST", f"/branches/{branch['name']}/merge", {}, 409)
    assert "branch 'main' is protected" in err and "force" in err
    # Over the wire too.
    with MongoClient(life.uri) as main:
        with pytest.raises(OperationFailure) as exc:
            main.admin.command({"mergeBranch": branch["name"]})
        assert exc.value.code == 117 and "force" in str(exc.value)
        assert main[db_name].items.find_one({"_id": "m"}) is None
        assert ok(life, "PATCH", "/branches/main", {"protected": False}) == {
            "name": "main", "protected": False}
        try:
            main.admin.command({"mergeBranch": branch["name"]})
            assert main[db_name].items.find_one({"_id": "m"}) == {"_id": "m"}
        finally:
            assert ok(life, "PATCH", "/branches/main", {"protected": True})["protected"]
    err = refused(life, "PATCH", "/branches/main", {"ttl": "1h"})
    assert "main never expires" in err
    drop_all(life, branch["name"])


def test_wire_create_with_lifecycle(life: ProxyProcess) -> None:
    name = unique("wirelc")
    with MongoClient(life.uri) as main:
        made = main.admin.command({"createBranch": name, "ttl": "2h", "idle_ttl": 600,
                                   "protected": True})
        assert made["protected"] is True and made["idle_ttl"] == 600
        assert made["expires_at"] == ok(life, "GET", f"/branches/{name}")["expires_at"]
        with pytest.raises(OperationFailure) as exc:
            main.admin.command({"createBranch": unique("wirelc"), "ttl": "soon"})
        assert exc.value.code == 2 and "ttl must be a duration" in str(exc.value)
    drop_all(life, name)


def test_wire_drop_of_a_protected_branch(life: ProxyProcess) -> None:
    branch = create(life, protected=True)
    with MongoClient(life.uri) as main:
        with pytest.raises(OperationFailure) as exc:
            main.admin.command({"dropBranch": branch["name"]})
        assert exc.value.code == 117 and "protected" in str(exc.value)
        reply = main.admin.command({"dropBranch": branch["name"], "force": True})
        assert isinstance(reply["restorableUntil"], str)
        assert branch["name"] not in names(life)
        assert branch["name"] not in [b["name"] for b in
                                      main.admin.command("listBranches")["branches"]]
    drop_all(life, branch["name"])


# -- refresh -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["wal", "copy"])
def test_refresh_reforks_at_the_parent_now(life: ProxyProcess, db_name: str,
                                           mode: str) -> None:
    with MongoClient(life.uri) as main:
        main[db_name].items.insert_many([{"_id": 1, "v": "old"}, {"_id": 2, "v": "old"}])
        branch = create(life, mode=mode, ttl="5h", protected=True)
        name = branch["name"]
        with MongoClient(branch["uri"]) as b:
            b[db_name].items.update_one({"_id": 1}, {"$set": {"v": "mine"}})
            b[db_name].mine.insert_one({"_id": "x"})
        main[db_name].items.update_one({"_id": 2}, {"$set": {"v": "new"}}, upsert=True)
        with MongoClient(branch["uri"]) as b:
            assert b[db_name].items.find_one({"_id": 2}) == {"_id": 2, "v": "old"}
        old_bid = bid_of(MongoClient(life.upstream), life, name)
        err = refused(life, "POST", f"/branches/{name}/refresh", None, 409)
        assert "protected" in err
        fresh = ok(life, "POST", f"/branches/{name}/refresh", {"force": True})
        assert (fresh["name"], fresh["port"], fresh["expires_at"], fresh["protected"]) == (
            name, branch["port"], branch["expires_at"], True)
        assert fresh["fork_lsn"] >= branch["fork_lsn"]
        with MongoClient(branch["uri"]) as b:  # the same port
            assert list(b[db_name].items.find({}, sort=[("_id", 1)])) == [
                {"_id": 1, "v": "old"}, {"_id": 2, "v": "new"}]
            assert "mine" not in b[db_name].list_collection_names()
            main[db_name].items.update_one({"_id": 1}, {"$set": {"v": "after"}})
            # Still a snapshot: main's later writes do not show.
            assert b[db_name].items.find_one({"_id": 1}) == {"_id": 1, "v": "old"}
        # Its own changes are gone; a WAL branch kept the parent's image its write after
        # the refresh changed (a copy branch owns its copy and needs none).
        assert [e["op"] for e in ok(life, "GET", f"/branches/{name}/log")["entries"]] == (
            ["keep"] if mode == "wal" else [])
        with MongoClient(life.upstream) as direct:
            assert overlay_collections(direct, old_bid) == []
            assert direct["mongobranch_life"]["wal"].count_documents({"b": old_bid}) == 0
        # With a child it is refused: the child shows the branch as it is.
        child = create(life, **{"from": name})
        err = refused(life, "POST", f"/branches/{name}/refresh", {"force": True}, 409)
        assert f"has child branches ({child['name']})" in err
        drop_all(life, child["name"], name)


def test_refresh_is_a_new_snapshot(life: ProxyProcess, db_name: str) -> None:
    """A collection dropped on the upstream behind the proxy's back breaks the exact
    snapshot of a child reading it; a refresh forks anew, so the break is not its own."""
    with MongoClient(life.uri) as main, MongoClient(life.upstream) as direct:
        main[db_name].items.insert_one({"_id": 1})
        branch = create(life)
        name = branch["name"]
        assert branch["isolation"] == "snapshot"
        direct[db_name].drop_collection("items")
        with MongoClient(branch["uri"]) as b:
            b[db_name].items.find_one()  # waits for the capture to pass the drop
        broken = ok(life, "GET", f"/branches/{name}")
        assert broken["isolation"] == "proxy-writes-only" and broken["isolationBreaks"]
        fresh = ok(life, "POST", f"/branches/{name}/refresh")
        assert fresh["isolation"] == "snapshot" and "isolationBreaks" not in fresh
        main[db_name].items.insert_one({"_id": 2})
        with MongoClient(branch["uri"]) as b:
            assert list(b[db_name].items.find()) == []
        drop_all(life, name)


def test_refresh_unknown_branch(life: ProxyProcess) -> None:
    assert "does not exist" in refused(life, "POST", "/branches/nope-x/refresh", None, 404)


# -- soft delete ---------------------------------------------------------------------------

def test_drop_is_restorable_with_data_and_snapshot(life: ProxyProcess, db_name: str) -> None:
    with MongoClient(life.uri) as main:
        main[db_name].items.insert_one({"_id": 1, "v": "base"})
        branch = create(life)
        name = branch["name"]
        with MongoClient(branch["uri"]) as b:
            b[db_name].items.insert_one({"_id": 2, "v": "branch"})
        dropped = ok(life, "DELETE", f"/branches/{name}")
        until = when(dropped["restorable_until"])
        assert dt.timedelta(hours=23) < until - dt.datetime.now(dt.UTC) <= dt.timedelta(
            hours=24)
        assert not listening(branch["port"])
        assert "branch restore" in refused(life, "GET", f"/branches/{name}", None, 404)
        assert name not in names(life)
        kept = next(b for b in ok(life, "GET", "/branches?deleted=true") if b["name"] == name)
        assert kept["restorable_until"] == dropped["restorable_until"]
        # The name is kept for it.
        err = refused(life, "POST", "/branches", {"name": name}, 409)
        assert "--purge" in err and "restore" in err
        # main changes while it is deleted: the restored branch still shows the fork.
        main[db_name].items.update_one({"_id": 1}, {"$set": {"v": "changed"}})
        restored = ok(life, "POST", f"/branches/{name}/restore")
        assert restored["port"] == branch["port"]
        with MongoClient(restored["uri"]) as b:
            assert list(b[db_name].items.find({}, sort=[("_id", 1)])) == [
                {"_id": 1, "v": "base"}, {"_id": 2, "v": "branch"}]
        assert "is not deleted" in refused(life, "POST", f"/branches/{name}/restore",
                                           None, 409)
        # Purged: gone for good, the name free again.
        bid = bid_of(MongoClient(life.upstream), life, name)
        ok(life, "DELETE", f"/branches/{name}")
        assert ok(life, "DELETE", f"/branches/{name}?purge=true") == {"deleted": name}
        with MongoClient(life.upstream) as direct:
            assert overlay_collections(direct, bid) == []
        assert name not in names(life, deleted=True)
        assert "purged" in refused(life, "POST", f"/branches/{name}/restore", None, 404)
        create(life, name=name)
        drop_all(life, name)


def test_the_reaper_purges_after_the_retention_window(life: ProxyProcess,
                                                      db_name: str) -> None:
    branch = create(life)
    name = branch["name"]
    with MongoClient(branch["uri"]) as b:
        b[db_name].items.insert_one({"_id": 1})
    bid = bid_of(MongoClient(life.upstream), life, name)
    until = when(ok(life, "DELETE", f"/branches/{name}")["restorable_until"])
    assert name not in reap(life, until - dt.timedelta(seconds=1))["purged"]
    assert name in names(life, deleted=True)
    assert name in reap(life, until + dt.timedelta(seconds=1))["purged"]
    assert name not in names(life, deleted=True)
    with MongoClient(life.upstream) as direct:
        assert overlay_collections(direct, bid) == []
        assert direct["mongobranch_life"]["branches"].find_one({"_id": name}) is None
    assert f"purged branch {name}" in life.read_log()


def test_deleted_children_go_with_their_parent(life: ProxyProcess, db_name: str) -> None:
    parent = create(life)
    child = create(life, **{"from": parent["name"]})
    with MongoClient(child["uri"]) as c:
        c[db_name].items.insert_one({"_id": 1})
    assert "has child branches" in refused(life, "DELETE", f"/branches/{parent['name']}",
                                           None, 409)
    with MongoClient(life.upstream) as direct:
        kid_bid = bid_of(direct, life, child["name"])
    ok(life, "DELETE", f"/branches/{child['name']}")
    # A kept child does not hold its parent back: the parent is kept with it.
    ok(life, "DELETE", f"/branches/{parent['name']}")
    assert {parent["name"], child["name"]} <= names(life, deleted=True)
    # Purging the parent purges the child that reads through it.
    ok(life, "DELETE", f"/branches/{parent['name']}?purge=true")
    assert not {parent["name"], child["name"]} & names(life, deleted=True)
    with MongoClient(life.upstream) as direct:
        assert overlay_collections(direct, kid_bid) == []
    assert f"purged branch {child['name']} (its parent {parent['name']} was purged)" in \
        life.read_log()
    # Dropped for good at once (purge) while its child is kept: the child goes first.
    parent = create(life)
    child = create(life, **{"from": parent["name"]})
    ok(life, "DELETE", f"/branches/{child['name']}")
    assert ok(life, "DELETE", f"/branches/{parent['name']}?purge=true") == {
        "deleted": parent["name"]}
    assert not {parent["name"], child["name"]} & (names(life) | names(life, deleted=True))


def test_restore_on_another_port_and_errors(life: ProxyProcess) -> None:
    branch = create(life)
    name = branch["name"]
    other = create(life)
    ok(life, "DELETE", f"/branches/{name}")
    err = refused(life, "POST", f"/branches/{name}/restore", {"port": other["port"]}, 409)
    assert "already used" in err
    assert "port must be" in refused(life, "POST", f"/branches/{name}/restore",
                                     {"port": "x"})
    assert "unknown field" in refused(life, "POST", f"/branches/{name}/restore",
                                      {"from": "main"})
    assert "no deleted branch" in refused(life, "POST", "/branches/never-was/restore",
                                          None, 404)
    drop_all(life, name, other["name"])


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "message"), [
    ({"ttl": "2 hours"}, "ttl must be a duration"),
    ({"ttl": "0m"}, "longer than zero"),
    ({"ttl": "-1h"}, "ttl must be a duration"),
    ({"ttl": ""}, "ttl must be a duration"),
    ({"ttl": 1.5}, "ttl must be a duration"),
    ({"ttl": True}, "ttl must be a duration"),
    ({"idle_ttl": "soon"}, "idle_ttl must be a duration"),
    ({"expires_at": "tomorrow"}, "expires_at must be an ISO-8601 time"),
    ({"expires_at": 5}, "expires_at must be an ISO-8601 time"),
    ({"expires_at": "2001-01-01T00:00:00Z"}, "is in the past"),
    ({"ttl": "1h", "expires_at": "2999-01-01T00:00:00Z"}, "not both"),
    ({"protected": "yes"}, "protected must be true or false"),
])
def test_bad_lifecycle_input(life: ProxyProcess, body: dict[str, Any], message: str) -> None:
    name = unique("bad")
    assert message in refused(life, "POST", "/branches", {"name": name, **body})
    assert api(life, "GET", f"/branches/{name}")[0] == 404  # nothing was created
    target = create(life)
    assert message in refused(life, "PATCH", f"/branches/{target['name']}", body)
    drop_all(life, target["name"])


def test_bad_requests(life: ProxyProcess) -> None:
    branch = create(life)
    name = branch["name"]
    assert "unknown field" in refused(life, "PATCH", f"/branches/{name}", {"port": 1})
    assert "does not exist" in refused(life, "PATCH", "/branches/nope-y", {"ttl": "1h"},
                                       404)
    assert "force must be" in refused(life, "DELETE", f"/branches/{name}?force=maybe")
    assert "deleted must be" in refused(life, "GET", "/branches?deleted=maybe")
    assert "now must be" in refused(life, "POST", "/reap", {"now": "later"})
    assert "dry_run must be" in refused(life, "POST", "/reap", {"dry_run": "no"})
    assert "force must be" in refused(life, "POST", f"/branches/{name}/refresh",
                                      {"force": "please"})
    assert "does not exist" in refused(life, "DELETE", "/branches/nope-z", None, 404)
    drop_all(life, name)


# -- restart -------------------------------------------------------------------------------

def test_lifecycle_survives_a_restart(life: ProxyProcess) -> None:
    kept = create(life, protected=True, ttl="7d", idle_ttl="2h")
    gone = create(life)
    ok(life, "DELETE", f"/branches/{gone['name']}")
    ok(life, "PATCH", "/branches/main", {"protected": False})
    life.stop()
    # What a refresh cut off by a crash leaves: an old identity's overlay and WAL
    # entries that no branch record names.
    with MongoClient(life.upstream) as direct:
        meta = direct["mongobranch_life"]
        meta["namespaces"].insert_one({"_id": "deadbeef:lifeorphan.items", "bid": "deadbeef",
                                       "db": "lifeorphan", "coll": "items"})
        direct["lifeorphan"]["__mb_deadbeef_l_items"].insert_one({"_id": 1})
        direct["lifeorphan"]["__mb_deadbeef_h_items"].insert_one({"_id": 1})
        meta["wal"].insert_one({"_id": 10**12, "b": "deadbeef", "ns": "lifeorphan.items",
                                "id": 1, "op": "put"})
    life.start()
    try:
        assert reap(life, dt.datetime.now(dt.UTC))["orphans"] == ["deadbeef"]
        with MongoClient(life.upstream) as direct:
            assert overlay_collections(direct, "deadbeef") == []
            assert direct["mongobranch_life"]["wal"].count_documents({"b": "deadbeef"}) == 0
            assert direct["mongobranch_life"]["namespaces"].count_documents(
                {"bid": "deadbeef"}) == 0
        shown = ok(life, "GET", f"/branches/{kept['name']}")
        assert (shown["protected"], shown["expires_at"], shown["idle_ttl"]) == (
            True, kept["expires_at"], 7200)
        assert gone["name"] in names(life, deleted=True)
        assert not listening(gone["port"])
        assert "protected" not in refused(life, "POST", "/branches/x/merge", {}, 404)
        with MongoClient(life.uri) as main:
            assert main.admin.command("listBranches")["ok"] == 1.0
        restored = ok(life, "POST", f"/branches/{gone['name']}/restore")
        assert listening(restored["port"])
    finally:
        ok(life, "PATCH", "/branches/main", {"protected": True})
        drop_all(life, kept["name"], gone["name"])


# -- CLI -----------------------------------------------------------------------------------

def cli(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MONGOBRANCH_ADMIN"}
    return subprocess.run([str(BIN / "mongobranch"), "branch", "--admin", proxy.admin_url,
                           *args], capture_output=True, text=True, timeout=60, env=env)


def cli_ok(proxy: ProxyProcess, *args: str) -> str:
    done = cli(proxy, *args)
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout


def test_cli_lifecycle(life: ProxyProcess) -> None:
    name = unique("clilc")
    made = json.loads(cli_ok(life, "create", name, "--ttl", "2h", "--idle-ttl", "30m",
                             "--json"))
    assert made["expires_at"] is not None and made["idle_ttl"] == 1800
    assert cli_ok(life, "create", unique("clilc-uri"), "--ttl", "24h", "--output",
                  "uri").startswith("mongodb://")
    bad = cli(life, "create", unique("clilc"), "--ttl", "2 hours")
    assert bad.returncode == 2 and "ttl must be a duration" in bad.stderr
    assert cli(life, "create", unique("x"), "--ttl", "1h", "--expires-at",
               "2999-01-01T00:00:00Z").returncode == 2
    out = json.loads(cli_ok(life, "expire", name, "--never", "--json"))
    assert (out["expires_at"], out["idle_ttl"]) == (None, None)
    out = json.loads(cli_ok(life, "expire", name, "--at", "2999-01-01T00:00:00Z", "--json"))
    assert out["expires_at"] == "2999-01-01T00:00:00+00:00"
    assert "expires at 2999-01-01" in cli_ok(life, "expire", name, "--at",
                                             "2999-01-01T00:00:00Z")
    past = cli(life, "expire", name, "--at", "2001-01-01T00:00:00Z")
    assert past.returncode == 2 and "in the past" in past.stderr
    assert cli(life, "expire", name).returncode == 2
    assert cli(life, "expire", "nope-cli", "--ttl", "1h").returncode == 5

    assert f"branch {name} is protected" in cli_ok(life, "protect", name)
    refused_drop = cli(life, "delete", name)
    assert refused_drop.returncode == 4 and "--force" in refused_drop.stderr
    assert cli(life, "refresh", name).returncode == 4
    assert json.loads(cli_ok(life, "refresh", name, "--force", "--json"))["name"] == name
    assert f"branch {name} is unprotected" in cli_ok(life, "unprotect", name)
    assert "restorable until" in cli_ok(life, "delete", name)
    listed = json.loads(cli_ok(life, "list", "--deleted", "--json"))
    assert name in [b["name"] for b in listed]
    assert "restorable_until" in cli_ok(life, "list", "--deleted")
    assert cli_ok(life, "restore", name, "--output", "uri") == made["uri"] + "\n"
    assert cli(life, "restore", name).returncode == 4  # not deleted
    assert cli(life, "restore", "nope-cli").returncode == 5

    cli_ok(life, "expire", name, "--ttl", "1h")
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)).isoformat()
    preview = json.loads(cli_ok(life, "reap", "--now", future, "--dry-run", "--json"))
    assert name in [e["branch"] for e in preview["expired"]]
    assert f"would expire {name}" in cli_ok(life, "reap", "--now", future, "--dry-run")
    assert name in [b["name"] for b in json.loads(cli_ok(life, "list", "--json"))]
    assert f"expire {name}" in cli_ok(life, "reap", "--now", future)
    assert cli(life, "show", name).returncode == 5
    assert cli_ok(life, "delete", name, "--purge") == f"deleted branch {name}\n"
    assert name not in [b["name"] for b in json.loads(cli_ok(life, "list", "--deleted",
                                                             "--json"))]
    for branch in json.loads(cli_ok(life, "list", "--json")):
        if branch["name"].startswith("clilc-uri"):
            drop_all(life, branch["name"])


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--deleted-retention", "soon", "--deleted-retention must be a duration"),
    ("--reap-interval", "0", "--reap-interval"),
])
def test_serve_refuses_bad_lifecycle_flags(flag: str, value: str, message: str) -> None:
    done = subprocess.run([str(BIN / "mongobranch"), "serve", "--upstream",
                           "mongodb://127.0.0.1:1/", flag, value], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr


def test_cli_merge_into_protected_main(life: ProxyProcess, db_name: str) -> None:
    branch = create(life)
    with MongoClient(branch["uri"]) as c:
        c[db_name].items.insert_one({"_id": 1})
    refused_merge = cli(life, "merge", branch["name"])
    assert refused_merge.returncode == 4 and "protected" in refused_merge.stderr
    assert cli(life, "merge", branch["name"], "--dry-run").returncode == 0
    cli_ok(life, "merge", branch["name"], "--force")
    with MongoClient(life.uri) as main:
        assert main[db_name].items.find_one({"_id": 1}) == {"_id": 1}
    assert cli(life, "reset", branch["name"], "--to", "0").returncode == 0
    drop_all(life, branch["name"])
