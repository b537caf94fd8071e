"""Branch management over the wire (admin commands) from pymongo and mongosh, and the clear
refusal of commands a branch port does not serve."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from tests import rawwire
from tests.branchutil import Branches, unique
from tests.servers import ProxyProcess, free_port

MONGOSH = Path(__file__).parent / "node" / "node_modules" / ".bin" / "mongosh"

GOSSIP = ("$clusterTime", "operationTime")


def mongosh(uri: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MONGOSH), uri, "--quiet", "--norc", "--eval", script],
                          capture_output=True, text=True, timeout=120)


def failure(fn: Any, *args: Any) -> OperationFailure:
    with pytest.raises(OperationFailure) as info:
        fn(*args)
    return info.value


# -- pymongo -------------------------------------------------------------------------------

def test_admin_commands_from_pymongo(proxy: ProxyProcess, client: MongoClient,
                                     made: Branches) -> None:
    name = unique("wire")
    made.track(name)
    created = client.admin.command({"createBranch": name})
    assert created["ok"] == 1.0
    assert created["name"] == name and created["parent"] == "main"
    assert created["uri"] == f"mongodb://127.0.0.1:{created['port']}/"
    public = {k: v for k, v in created.items() if k != "ok" and k not in GOSSIP}
    # The HTTP API sees the same branch.
    assert proxy.api("GET", f"/branches/{name}") == (
        200, {**public, "namespaces": {}, "children": []})

    listed = client.admin.command("listBranches")
    assert listed["ok"] == 1.0
    assert [b for b in listed["branches"] if b["name"] == name] == [public]

    with MongoClient(created["uri"]) as b:
        b.wire_db.items.insert_many([{"_id": 1}, {"_id": 2}])
        # Management works from a branch port too, on other branches.
        port = free_port()
        child_name = unique("wire-child")
        made.track(child_name)
        child = b.admin.command({"createBranch": child_name, "from": name, "port": port})
        assert child["parent"] == name and child["port"] == port
        assert child_name in {x["name"] for x in b.admin.command("listBranches")["branches"]}
    with MongoClient(child["uri"]) as c:
        assert sorted(d["_id"] for d in c.wire_db.items.find()) == [1, 2]

    info = client.admin.command({"branchInfo": name})
    assert info["children"] == [child_name]
    assert info["namespaces"]["wire_db.items"]["live"] == 2

    for dropping in (child_name, name):
        reply = client.admin.command({"dropBranch": dropping})
        # Just ok, and the cluster time the upstream gossips, as mongos would send.
        assert {k: v for k, v in reply.items() if k not in GOSSIP} == {"ok": 1.0}
    names = {b["name"] for b in client.admin.command("listBranches")["branches"]}
    assert not names & {name, child_name}
    assert proxy.api("GET", f"/branches/{name}")[0] == 404


@pytest.mark.parametrize(("cmd", "code", "message"), [
    ({"createBranch": "main"}, 2, "branch name must match [A-Za-z0-9._-]{1,64} and not be "
                                  "'main', got 'main'"),
    ({"createBranch": "a b"}, 2, "branch name must match"),
    ({"createBranch": "x" * 65}, 2, "branch name must match"),
    ({"createBranch": 42}, 2, "branch name must match"),
    ({"createBranch": "wire-x", "port": "1234"}, 2, "port must be an integer 1-65535"),
    ({"createBranch": "wire-x", "form": "main"}, 2, "createBranch: unknown field(s): form"),
    ({"createBranch": "wire-x", "from": 5}, 2, "from must be a branch name (a string), got 5"),
    ({"createBranch": "wire-x", "from": "no-such-parent"}, 26,
     "parent branch 'no-such-parent' does not exist"),
    ({"branchInfo": "no-such-branch"}, 26, "branch 'no-such-branch' does not exist"),
    ({"dropBranch": "no-such-branch"}, 26, "branch 'no-such-branch' does not exist"),
    ({"branchInfo": 5}, 2, "branchInfo takes a branch name (a string), got 5"),
    ({"dropBranch": None}, 2, "dropBranch takes a branch name (a string), got None"),
])
def test_errors_are_command_errors(client: MongoClient, cmd: dict[str, Any], code: int,
                                   message: str) -> None:
    err = failure(client.admin.command, cmd)
    assert err.code == code
    assert message in str(err.details["errmsg"])  # type: ignore[index]
    assert "wire-x" not in {b["name"] for b in client.admin.command("listBranches")["branches"]}


def test_conflicts_are_command_errors(client: MongoClient, made: Branches) -> None:
    parent = made.create()
    child = made.create(**{"from": parent["name"]})
    err = failure(client.admin.command, {"createBranch": parent["name"]})
    assert err.code == 117 and err.details["codeName"] == "ConflictingOperationInProgress"  # type: ignore[index]
    assert f"branch {parent['name']!r} already exists" in str(err)
    err = failure(client.admin.command, {"createBranch": unique("w"), "port": child["port"]})
    assert err.code == 117
    assert f"port {child['port']} is already used by another branch" in str(err)
    err = failure(client.admin.command, {"dropBranch": parent["name"]})
    assert err.code == 117
    assert f"has child branches: {child['name']}" in str(err)


@pytest.mark.parametrize("cmd", [{"createBranch": "wire-nonadmin"}, {"listBranches": 1},
                                 {"branchInfo": "x"}, {"dropBranch": "x"}])
def test_non_admin_database_is_refused(client: MongoClient, made: Branches,
                                       cmd: dict[str, Any]) -> None:
    name = next(iter(cmd))
    err = failure(client.some_db.command, cmd)
    assert err.code == 13
    assert str(err.details["errmsg"]) == (  # type: ignore[index]
        f"{name} may only be run against the admin database.")
    branch = made.create()
    with MongoClient(branch["uri"]) as b:
        err = failure(b.some_db.command, cmd)
        assert err.code == 13 and "admin database" in str(err)
        assert b.admin.command("ping")["ok"] == 1.0
    assert "wire-nonadmin" not in {x["name"] for x in client.admin.command("listBranches")[
        "branches"]}


def test_branch_cannot_drop_itself_through_its_own_port(proxy: ProxyProcess,
                                                        made: Branches) -> None:
    branch = made.create()
    with MongoClient(branch["uri"], maxPoolSize=1) as b:
        b.self_db.items.insert_one({"_id": 1})
        err = failure(b.admin.command, {"dropBranch": branch["name"]})
        assert err.code == 20
        assert f"branch {branch['name']!r} cannot be dropped through its own port" in str(err)
        assert b.self_db.items.find_one() == {"_id": 1}
    assert proxy.api("GET", f"/branches/{branch['name']}")[0] == 200


# -- mongosh ---------------------------------------------------------------------------------

def test_admin_commands_from_mongosh(proxy: ProxyProcess, made: Branches) -> None:
    name = unique("sh")
    made.track(name)
    done = mongosh(proxy.uri, f'EJSON.stringify(db.adminCommand({{createBranch: "{name}"}}))')
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)
    assert created["name"] == name and created["ok"] == 1
    assert proxy.api("GET", f"/branches/{name}")[0] == 200

    script = f"""
        const list = db.adminCommand({{listBranches: 1}});
        print(EJSON.stringify(list.branches.filter(b => b.name === "{name}")));
        print(EJSON.stringify(db.adminCommand({{branchInfo: "{name}"}})));
        for (const cmd of [{{createBranch: "{name}"}}, {{createBranch: "main"}},
                           {{branchInfo: "no-such-branch"}}]) {{
          try {{ db.adminCommand(cmd); print("no error"); }}
          catch (e) {{ print(EJSON.stringify({{code: e.code, message: e.message}})); }}
        }}
        try {{ db.getSiblingDB("test").runCommand({{listBranches: 1}}); print("no error"); }}
        catch (e) {{ print(EJSON.stringify({{code: e.code, message: e.message}})); }}
        print(EJSON.stringify(db.adminCommand({{dropBranch: "{name}"}})));
    """
    done = mongosh(proxy.uri, script)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    listed, info, dup, bad, unknown, nonadmin, dropped = lines
    assert [b["name"] for b in listed] == [name]
    assert info["name"] == name and info["namespaces"] == {} and info["children"] == []
    assert dup == {"code": 117, "message": f"branch '{name}' already exists"}
    assert bad["code"] == 2 and "branch name must match" in bad["message"]
    assert unknown == {"code": 26, "message": "branch 'no-such-branch' does not exist"}
    assert nonadmin == {"code": 13,
                        "message": "listBranches may only be run against the admin database."}
    assert {k: v for k, v in dropped.items() if k not in GOSSIP} == {"ok": 1}
    assert proxy.api("GET", f"/branches/{name}")[0] == 404


def test_mongosh_uncaught_error_exits_non_zero(proxy: ProxyProcess) -> None:
    done = mongosh(proxy.uri, 'db.adminCommand({dropBranch: "no-such-branch"})')
    assert done.returncode != 0
    assert "MongoServerError" in done.stdout + done.stderr
    assert "branch 'no-such-branch' does not exist" in done.stdout + done.stderr


# -- unsupported commands on a branch port -----------------------------------------------------

@pytest.mark.parametrize(("cmd", "what"), [
    ({"setIndexCommitQuorum": "items", "indexNames": ["a_1"], "commitQuorum": 1},
     "command 'setIndexCommitQuorum' is not supported on branch"),
    ({"mapReduce": "items", "map": "function() { emit(this._id, 1); }",
      "reduce": "function(k, v) { return 1; }", "out": {"inline": 1}},
     "mapReduce is not supported on branch"),
])
def test_unsupported_command_on_branch_is_clear_and_connection_survives(
        client: MongoClient, made: Branches, cmd: dict[str, Any], what: str) -> None:
    db = unique("unsup").replace("-", "_")
    client[db].items.insert_many([{"_id": i} for i in range(3)])
    branch = made.create()
    expected = f"{what} {branch['name']!r}"
    sock = rawwire.connect(branch["port"])
    try:
        reply = rawwire.command(sock, {**cmd, "$db": db}, request_id=1)
        assert reply["ok"] == 0.0 and reply["code"] == 115
        assert reply["codeName"] == "CommandNotSupported"
        assert expected in reply["errmsg"]
        # Same socket, still served.
        reply = rawwire.command(sock, {"find": "items", "filter": {}, "$db": db}, request_id=2)
        assert reply["ok"] == 1.0
        assert [d["_id"] for d in reply["cursor"]["firstBatch"]] == [0, 1, 2]
    finally:
        sock.close()
    with MongoClient(branch["uri"], maxPoolSize=1) as b:
        err = failure(b[db].command, cmd)
        assert err.code == 115 and expected in str(err)
        b[db].items.insert_one({"_id": 3})
        assert b[db].items.count_documents({}) == 4
    client.drop_database(db)


def test_change_stream_stage_after_the_first_is_refused_as_mongod_does(
        client: MongoClient, made: Branches) -> None:
    """watch() itself is served (tests/test_branch_changestream.py); a $changeStream
    anywhere but first is mongod's error 40602, and the connection survives it."""
    db = unique("watch").replace("-", "_")
    client[db].items.insert_one({"_id": 1})
    branch = made.create()
    with MongoClient(branch["uri"], maxPoolSize=1) as b:
        for pipeline in ([{"$match": {}}, {"$changeStream": {}}],
                         [{"$changeStream": {}}, {"$changeStream": {}}]):
            err = failure(b[db].command, {"aggregate": "items", "pipeline": pipeline,
                                          "cursor": {}})
            assert err.code == 40602
            assert "only valid as the first stage" in str(err)
        assert b[db].items.find_one() == {"_id": 1}
    client.drop_database(db)


def test_unsupported_command_from_mongosh(made: Branches) -> None:
    branch = made.create()
    done = mongosh(branch["uri"], 'db.getSiblingDB("sh_db").runCommand('
                                  '{setIndexCommitQuorum: "items", indexNames: ["a_1"], '
                                  'commitQuorum: 1})')
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "MongoServerError" in out
    assert f"command 'setIndexCommitQuorum' is not supported on branch '{branch['name']}'" \
        in out
