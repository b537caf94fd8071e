"""Nobody gets more through mongobranch than their own credentials allow.

Against a SecantusDB started with --auth; the proxy holds a root user in its --upstream
URI, as the README suggests. Each client authenticates as itself (or not at all).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from bson.binary import Binary
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from tests import rawwire
from tests.servers import ProxyProcess, Secantus, secantus_with_users

META = "mongobranch_test"
PW = "pw-authz"
ROOT = "root"
# user -> roles
USERS: dict[str, list[dict[str, str]]] = {
    ROOT: [{"role": "root", "db": "admin"}],
    "reader": [{"role": "read", "db": "app"}],
    "writer": [{"role": "readWrite", "db": "app"}],
    # may manage branches, may not change app's collections
    "keeper": [{"role": "readWrite", "db": META}, {"role": "read", "db": "app"}],
    # may manage branches and change app: what merging into main needs
    "brancher": [{"role": "readWrite", "db": META}, {"role": "readWrite", "db": "app"}],
    "outsider": [{"role": "read", "db": "elsewhere"}],
}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secantus]:
    server = secantus_with_users(str(tmp_path_factory.mktemp("authz") / "db"), USERS, PW)
    yield server
    server.stop()


def root_uri(upstream: Secantus) -> str:
    return f"mongodb://{ROOT}:{PW}@127.0.0.1:{upstream.port}/?authSource=admin"


@pytest.fixture(scope="module")
def proxy(upstream: Secantus) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(root_uri(upstream), meta_db=META).start()
    yield proc
    proc.stop()


def connect(port: int, user: str | None = None) -> MongoClient[dict[str, Any]]:
    creds: dict[str, Any] = {} if user is None else {"username": user, "password": PW}
    return MongoClient(f"mongodb://127.0.0.1:{port}/", serverSelectionTimeoutMS=5000,
                       **creds)


def refused(fn: Any, *args: Any, **kwargs: Any) -> OperationFailure:
    with pytest.raises(OperationFailure) as info:
        fn(*args, **kwargs)
    assert info.value.code == 13, info.value.details
    assert info.value.details is not None
    assert info.value.details["codeName"] == "Unauthorized"
    return info.value


@pytest.fixture(scope="module")
def feat(proxy: ProxyProcess, upstream: Secantus) -> Iterator[dict[str, Any]]:
    """A branch made by a user allowed to, with a change to app.items in it."""
    with MongoClient(upstream.uri, directConnection=True, username=ROOT, password=PW) as c:
        c.app.items.delete_many({})
        c.app.items.insert_many([{"_id": 1, "v": "base"}, {"_id": 2, "v": "base"}])
    with connect(proxy.port, "brancher") as c:
        created = c.admin.command({"createBranch": "feat"})
    with connect(created["port"], "brancher") as b:
        b.app.items.update_one({"_id": 1}, {"$set": {"v": "branch"}})
        b.app.items.insert_one({"_id": 3, "v": "branch"})
    with MongoClient(upstream.uri, directConnection=True, username=ROOT, password=PW) as c:
        bid = c[META].branches.find_one({"_id": "feat"})["bid"]  # type: ignore[index]
    yield {**created, "bid": bid}


def base_items(upstream: Secantus) -> list[dict[str, Any]]:
    with MongoClient(upstream.uri, directConnection=True, username=ROOT, password=PW) as c:
        return list(c.app.items.find().sort("_id", 1))


BASE = [{"_id": 1, "v": "base"}, {"_id": 2, "v": "base"}]


# -- the scenario: a read-only user on the main port --------------------------------


def test_reader_cannot_merge_into_what_it_cannot_write(
        proxy: ProxyProcess, upstream: Secantus, feat: dict[str, Any]) -> None:
    with connect(proxy.port, "reader") as c:
        exc = refused(c.admin.command, {"mergeBranch": "feat", "strategy": "ours"})
        assert "mergeBranch" in str(exc)
        refused(c.admin.command, {"mergeBranch": "feat", "strategy": "abort", "dryRun": True})
    assert base_items(upstream) == BASE


def test_reader_cannot_create_drop_or_reset(proxy: ProxyProcess,
                                            feat: dict[str, Any]) -> None:
    with connect(proxy.port, "reader") as c:
        assert "createBranch" in str(refused(c.admin.command, {"createBranch": "mine"}))
        assert "dropBranch" in str(refused(c.admin.command, {"dropBranch": "feat"}))
        assert "resetBranch" in str(refused(c.admin.command, {"resetBranch": "feat", "to": 0}))
        refused(c.admin.command, {"listBranches": 1})
        refused(c.admin.command, {"branchLog": "feat"})
        refused(c.admin.command, {"branchDiff": "feat"})
        refused(c.admin.command, {"branchInfo": "feat"})
    with connect(proxy.port, "brancher") as c:
        names = [b["name"] for b in c.admin.command({"listBranches": 1})["branches"]]
        assert names == ["feat"]
        assert len(c.admin.command({"branchLog": "feat"})["entries"]) == 2


def test_writer_without_metadata_privilege_cannot_manage(proxy: ProxyProcess,
                                                         upstream: Secantus,
                                                         feat: dict[str, Any]) -> None:
    with connect(proxy.port, "writer") as c:
        refused(c.admin.command, {"mergeBranch": "feat", "strategy": "ours"})
        refused(c.admin.command, {"createBranch": "w"})
    assert base_items(upstream) == BASE


def test_merge_writes_with_the_callers_privileges(proxy: ProxyProcess, upstream: Secantus,
                                                  feat: dict[str, Any]) -> None:
    """keeper may manage branches but not write app: its merge changes nothing."""
    with connect(proxy.port, "keeper") as c:
        exc = refused(c.admin.command, {"mergeBranch": "feat", "strategy": "ours"})
        assert "app.items" in str(exc)
        # What it may do: look at the merge.
        dry = c.admin.command({"mergeBranch": "feat", "strategy": "ours", "dryRun": True})
        assert dry["applied"] == {"insert": 1, "update": 1, "delete": 0}
    assert base_items(upstream) == BASE


def test_reading_a_branch_needs_what_reading_main_needs(proxy: ProxyProcess,
                                                        feat: dict[str, Any]) -> None:
    with connect(feat["port"], "reader") as b:
        assert [d["v"] for d in b.app.items.find().sort("_id", 1)] == ["branch", "base",
                                                                      "branch"]
        refused(b.app.items.insert_one, {"_id": 9})
    with connect(feat["port"], "outsider") as b:
        refused(b.app.items.find_one)
    with connect(proxy.port, "outsider") as c:
        refused(c.app.items.find_one)


def test_refused_branch_writes_change_nothing(proxy: ProxyProcess,
                                              feat: dict[str, Any]) -> None:
    """A reader's update or delete of a parent document on a branch is refused by the
    upstream, and the document stays in the branch view (its copy-on-write hides it from
    the parent with the proxy's own connection: that must not outlive the refusal)."""
    with connect(feat["port"], "reader") as b:
        refused(b.app.items.update_one, {"_id": 2}, {"$set": {"v": "reader"}})
        refused(b.app.items.delete_one, {"_id": 2})
        refused(b.app.items.update_many, {}, {"$set": {"v": "reader"}})
        assert b.app.items.find_one({"_id": 2}) == {"_id": 2, "v": "base"}
        assert b.app.items.count_documents({}) == 3
    with connect(feat["port"], "brancher") as b:
        assert b.app.items.find_one({"_id": 2}) == {"_id": 2, "v": "base"}


def test_metadata_and_overlays_never_through_a_branch_port(proxy: ProxyProcess,
                                                           feat: dict[str, Any]) -> None:
    live = f"__mb_{feat['bid']}_l_items"
    with connect(proxy.port, "brancher") as c:
        other = c.admin.command({"createBranch": "other"})
    try:
        # Even root, who may read all of it on the upstream, does not through a branch.
        with connect(other["port"], ROOT) as b:
            exc = refused(b[META].wal.find_one)
            assert "find" in str(exc)
            refused(b[META].list_collection_names)
            refused(b.app[live].find_one)
            refused(b.app[live].insert_one, {"_id": "x"})
            refused(b.app.command, {"explain": {"find": live}})
            refused(lambda: list(b.app.items.aggregate(
                [{"$lookup": {"from": live, "localField": "_id", "foreignField": "_id",
                              "as": "x"}}])))
            refused(lambda: list(b.app.items.aggregate(
                [{"$unionWith": {"coll": "x", "pipeline": [{"$unionWith": live}]}}])))
            refused(lambda: list(b.app.items.aggregate(
                [{"$facet": {"a": [{"$lookup": {"from": {"db": META, "coll": "wal"},
                                                "pipeline": [], "as": "w"}}]}}])))
            refused(lambda: list(b.app.items.aggregate([{"$out": live}])))
            refused(b.admin.command, {"renameCollection": "app.items", "to": f"app.{live}"})
            # The branch itself still serves: its own view, not feat's.
            assert b.app.items.find_one({"_id": 1}) == {"_id": 1, "v": "base"}
    finally:
        with connect(proxy.port, "brancher") as c:
            c.admin.command({"dropBranch": "other"})


def audit_lines(proxy: ProxyProcess) -> list[dict[str, Any]]:
    marker = "mongobranch.audit: "
    return [json.loads(line.split(marker, 1)[1]) for line in proxy.read_log().splitlines()
            if marker in line]


def wal_users(upstream: Secantus, bid: str, ids: list[Any]) -> list[Any]:
    """Who the branch's WAL says wrote these ids (main's own history, captured from the
    change stream, names no client user)."""
    with MongoClient(upstream.uri, directConnection=True, username=ROOT, password=PW) as c:
        return [e["client"]["user"] for e in c[META].wal.find(
            {"b": bid, "ns": "app.items", "id": {"$in": ids}})]


def test_audit_and_wal_name_the_authenticated_user(proxy: ProxyProcess, upstream: Secantus,
                                                   feat: dict[str, Any]) -> None:
    with connect(proxy.port, "reader") as c:
        refused(c.admin.command, {"dropBranch": "feat"})
    lines = audit_lines(proxy)
    created = [e for e in lines if e["op"] == "createBranch" and e["branch"] == "feat"]
    assert len(created) == 1
    assert created[0]["user"] == "brancher@admin" and created[0]["outcome"] == "ok"
    assert created[0]["client"].startswith("127.0.0.1:") and created[0]["via"] == "wire"
    dropped = [e for e in lines if e["op"] == "dropBranch" and e["user"] == "reader@admin"]
    assert dropped and dropped[-1]["outcome"] == "refused" and dropped[-1]["code"] == 13
    assert "dropBranch" in dropped[-1]["error"]
    merges = [e for e in lines if e["op"] == "mergeBranch" and e["outcome"] == "refused"]
    assert {e["user"] for e in merges} >= {"reader@admin", "writer@admin", "keeper@admin"}
    # The WAL names who wrote, as the upstream authenticated them.
    assert wal_users(upstream, feat["bid"], [1, 3]) == ["brancher@admin", "brancher@admin"]


def test_a_claimed_name_is_not_an_identity(upstream: Secantus, proxy: ProxyProcess,
                                           feat: dict[str, Any]) -> None:
    """A SCRAM conversation started as 'brancher' and never finished: the client is not
    brancher (nor the URI user: it chose to authenticate itself), for the upstream, the
    WAL and the audit alike."""
    with rawwire.connect(feat["port"]) as sock:
        start = rawwire.command(sock, {"saslStart": 1, "mechanism": "SCRAM-SHA-256",
                                       "payload": Binary(b"n,,n=brancher,r=abcdefghijkl"),
                                       "$db": "admin"})
        assert start["ok"] == 1.0
        reply = rawwire.command(sock, {"insert": "items", "documents": [{"_id": "claimed"}],
                                       "$db": "app"}, request_id=2)
        assert reply["code"] == 13, reply
        reply = rawwire.command(sock, {"createBranch": "claimed", "$db": "admin"},
                                request_id=3)
        assert reply["code"] == 13, reply
    assert wal_users(upstream, feat["bid"], ["claimed"]) == []
    attempt = [e for e in audit_lines(proxy) if e["branch"] == "claimed"]
    assert [(e["user"], e["outcome"]) for e in attempt] == [(None, "refused")]


def test_brancher_merges(proxy: ProxyProcess, upstream: Secantus,
                         feat: dict[str, Any]) -> None:
    """Runs last of the merge tests: it changes the base."""
    with connect(proxy.port, "brancher") as c:
        result = c.admin.command({"mergeBranch": "feat", "strategy": "ours"})
        assert result["applied"] == {"insert": 1, "update": 1, "delete": 0}
    assert base_items(upstream) == [{"_id": 1, "v": "branch"}, {"_id": 2, "v": "base"},
                                    {"_id": 3, "v": "branch"}]
    merged = [e for e in audit_lines(proxy) if e["op"] == "mergeBranch"
              and e["outcome"] == "ok" and not e["dry_run"]]
    assert [e["user"] for e in merged] == ["brancher@admin"]


# -- anonymous clients --------------------------------------------------------------------


def _proxy_on(upstream: Secantus, host: str, *flags: str) -> ProxyProcess:
    proc = ProxyProcess(root_uri(upstream), meta_db=META)
    proc.extra = ["--listen", f"{host}:{proc.port}", *flags]
    return proc.start()


@pytest.mark.parametrize(("host", "flags", "lent"), [
    ("0.0.0.0", (), False),  # a listener reachable from elsewhere: no by default
    ("0.0.0.0", ("--anonymous-as-uri-user",), True),  # the operator's explicit choice
    ("127.0.0.1", ("--no-anonymous-as-uri-user",), False),
])
def test_anonymous_clients_and_the_uri_user(upstream: Secantus, feat: dict[str, Any],
                                            host: str, flags: tuple[str, ...],
                                            lent: bool) -> None:
    proc = _proxy_on(upstream, host, *flags)
    try:
        assert ("do not get" if not lent else "get the upstream URI") in proc.read_log()
        with connect(proc.port) as anon:
            assert anon.admin.command("ping")["ok"] == 1.0
            if lent:
                assert anon.app.items.count_documents({}) >= 2
            else:
                refused(anon.app.items.find_one)
                refused(anon.app.items.insert_one, {"_id": "anon"})
                refused(anon.admin.command, {"createBranch": "anon"})
                refused(anon.admin.command, {"mergeBranch": "feat", "strategy": "ours"})
        if not lent:
            with connect(proc.port, "reader") as c:  # authenticated clients are served
                assert c.app.items.count_documents({}) >= 2
            with connect(proc.port, "brancher") as c:
                port = c.admin.command({"createBranch": "anonb"})["port"]
            try:
                with connect(port) as anon:  # nor on a branch port
                    refused(anon.app.items.find_one)
                    refused(anon.app.items.insert_one, {"_id": "anon"})
                    # nor in a transaction, which runs in the proxy's own session
                    for statement in (lambda s: anon.app.items.find_one(session=s),
                                      lambda s: anon.app.items.insert_one({"_id": "anon"},
                                                                          session=s)):
                        with anon.start_session() as s:
                            s.start_transaction()
                            refused(statement, s)
            finally:
                with connect(proc.port, "brancher") as c:
                    c.admin.command({"dropBranch": "anonb"})
    finally:
        proc.stop()


def test_watching_a_branch_needs_what_reading_it_needs(feat: dict[str, Any]) -> None:
    """A branch's change streams read the WAL with the proxy's credentials: the client
    must be allowed to read what it watches, as the upstream judges."""
    with connect(feat["port"], "outsider") as b:
        refused(b.app.items.watch)
        refused(b.app.watch)
        refused(b.watch)
    with connect(feat["port"], "reader") as b, connect(feat["port"], "brancher") as w:
        refused(b.watch)  # the whole branch: every database
        with b.app.items.watch(max_await_time_ms=200) as stream:
            w.app.items.insert_one({"_id": "watched"})
            assert stream.next()["documentKey"] == {"_id": "watched"}
        w.app.items.delete_one({"_id": "watched"})


def _in_transaction(c: MongoClient[dict[str, Any]], *work: Any) -> None:
    """Each step in one transaction; a refused step (13) ends it: the next statement
    finds it gone (251)."""
    with c.start_session() as s:
        s.start_transaction()
        for step in work:
            try:
                step(c.app, s)
            except OperationFailure as exc:
                assert exc.code == 13, exc.details
                with pytest.raises(OperationFailure) as info:
                    c.app.txn.find_one({}, session=s)
                assert info.value.code == 251
                return
        s.commit_transaction()


def test_a_transaction_does_only_what_the_clients_privileges_allow(
        proxy: ProxyProcess, upstream: Secantus) -> None:
    """Transactions on a branch run in the proxy's session, as the --upstream URI's user;
    the upstream judges each statement first on the client's own connection, for the
    namespaces it names. A writer's transaction commits; a reader's write, a read by a
    user without access, and an update or upsert by a user who may insert but not
    update are refused (13), end the transaction, and leave nothing of it."""
    with MongoClient(upstream.uri, directConnection=True, username=ROOT, password=PW) as c:
        c.app.command("createRole", "inserts", roles=[], privileges=[
            {"resource": {"db": "app", "collection": "txn"}, "actions": ["find", "insert"]}])
        c.app.command("createRole", "updates", roles=[], privileges=[
            {"resource": {"db": "app", "collection": "txn"}, "actions": ["find", "update"]}])
        for user, role in (("inserter", "inserts"), ("updater", "updates")):
            c.admin.command("createUser", user, pwd=PW, roles=[{"role": role, "db": "app"}])
        c.app.txn.insert_many([{"_id": 1, "v": "base"}, {"_id": 2, "v": "base"}])
    with connect(proxy.port, "brancher") as c:
        port = c.admin.command({"createBranch": "txns"})["port"]
    try:
        def view() -> list[dict[str, Any]]:
            with connect(port, "brancher") as b:
                return list(b.app.txn.find().sort("_id", 1))

        def insert(doc_id: int) -> Any:
            return lambda app, s: app.txn.insert_one({"_id": doc_id, "v": "txn"}, session=s)

        def read(app: Any, s: Any) -> None:
            assert app.txn.find_one({"_id": 1}, session=s) is not None

        def update(app: Any, s: Any) -> None:
            app.txn.update_one({"_id": 1}, {"$set": {"v": "txn"}}, session=s)

        def upsert(app: Any, s: Any) -> None:
            app.txn.update_one({"_id": 7}, {"$set": {"v": "txn"}}, upsert=True, session=s)

        def joined(app: Any, s: Any) -> None:
            list(app.txn.aggregate([{"$lookup": {"from": "items", "localField": "_id",
                                                 "foreignField": "_id", "as": "i"}}],
                                   session=s))

        with connect(port, "writer") as c:
            _in_transaction(c, insert(10), update, read, joined)
        after = view()
        assert after == [{"_id": 1, "v": "txn"}, {"_id": 2, "v": "base"},
                         {"_id": 10, "v": "txn"}]
        for user, work in (("reader", (read, insert(11))), ("reader", (read, update)),
                           ("outsider", (read,)), ("inserter", (insert(12), update)),
                           ("inserter", (insert(13), upsert)),
                           # An upsert needs insert too (SecantusDB does not ask for it:
                           # the proxy's own insert probe does).
                           ("updater", (update, upsert))):
            with connect(port, user) as c:
                _in_transaction(c, *work)
            assert view() == after, (user, work)
        # A $lookup's foreign collection is judged with the pipeline: mongod refuses the
        # inserter's `joined` (no find on app.items). SecantusDB gap: it checks only the
        # collection an aggregate names, so that refusal cannot be shown here.
        with connect(port, "inserter") as c:
            _in_transaction(c, insert(15), read)
        with connect(port, "updater") as c:
            _in_transaction(c, update, read)
        assert view() == [*after, {"_id": 15, "v": "txn"}]
        with MongoClient(upstream.uri, directConnection=True, username=ROOT,
                         password=PW) as c:
            # The probes of inserts ran in transactions of their own, always aborted.
            assert list(c.app.txn.find().sort("_id", 1)) == [{"_id": 1, "v": "base"},
                                                             {"_id": 2, "v": "base"}]
    finally:
        with connect(proxy.port, "brancher") as c:
            c.admin.command({"dropBranch": "txns"})


def test_a_user_without_list_indexes_still_creates_and_is_told_what_exists(
        proxy: ProxyProcess, upstream: Secantus) -> None:
    """The proxy asks whether a name exists with a listIndexes of it (Runner.has), under
    the client's credentials; a user who may list collections but not indexes gets the
    same answers through a listCollections instead, never the proxy's."""
    with MongoClient(upstream.uri, directConnection=True, username=ROOT, password=PW) as c:
        c.app.command("createRole", "listsnoindexes", roles=[], privileges=[
            {"resource": {"db": "app", "collection": ""},
             "actions": ["find", "insert", "listCollections", "createCollection"]}])
        c.admin.command("createUser", "lister", pwd=PW,
                        roles=[{"role": "listsnoindexes", "db": "app"}])
        c.app.listed.insert_one({"_id": 1})
    with connect(proxy.port, "brancher") as c:
        port = c.admin.command({"createBranch": "lister"})["port"]
    try:
        with connect(port, "lister") as b:
            refused(b.app.command, {"listIndexes": "listed"})
            b.app.create_collection("fresh")
            for name in ("listed", "fresh"):  # the command itself, not pymongo's check
                with pytest.raises(OperationFailure) as info:
                    b.app.command({"create": name, "capped": True, "size": 4096})
                assert info.value.code == 48, (name, info.value.details)
            names = b.app.list_collection_names(filter={"name": {"$in": ["fresh", "listed"]}})
            assert sorted(names) == ["fresh", "listed"]
            assert b.app.list_collection_names(filter={"name": "nothing"}) == []
        with connect(proxy.port, "lister") as m:
            assert m.app.list_collection_names(filter={"name": "listed"}) == ["listed"]
            assert m.app.list_collection_names(filter={"name": "fresh"}) == []
    finally:
        with connect(proxy.port, "brancher") as c:
            c.admin.command({"dropBranch": "lister"})
