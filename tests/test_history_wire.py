"""History as wire admin commands (branchLog, branchDiff, mergeBranch, resetBranch,
createBranch with at) from pymongo, and once from mongosh."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from tests.branchutil import Branches, unique
from tests.historyutil import changed_branch, contents, diff, entries, last_lsn
from tests.servers import ProxyProcess
from tests.test_branch_wire_admin import mongosh


def without_gossip(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply without the upstream's cluster time, which the proxy passes on."""
    return {k: v for k, v in reply.items() if k not in ("$clusterTime", "operationTime")}


def failure(client: MongoClient, cmd: dict[str, Any], db: str = "admin") -> OperationFailure:
    with pytest.raises(OperationFailure) as info:
        client[db].command(cmd)
    return info.value


def test_branch_log(proxy: ProxyProcess, client: MongoClient, made: Branches,
                    db_name: str) -> None:
    branch = changed_branch(client, made, db_name)
    name = branch["name"]
    api = entries(proxy, name)
    reply = client.admin.command({"branchLog": name})
    assert reply["ok"] == 1.0 and reply["branch"] == name
    assert reply["entries"] == api
    assert client.admin.command({"branchLog": name, "limit": 1})["entries"] == api[:1]
    paged = client.admin.command({"branchLog": name, "limit": 2, "beforeLsn": api[0]["lsn"]})
    assert paged["entries"] == api[1:3]
    # From the branch's own port too.
    with MongoClient(branch["uri"]) as b:
        assert b.admin.command({"branchLog": name, "limit": 1.0})["entries"] == api[:1]


def test_branch_diff(proxy: ProxyProcess, client: MongoClient, made: Branches,
                     db_name: str) -> None:
    branch = changed_branch(client, made, db_name)
    name = branch["name"]
    reply = without_gossip(client.admin.command({"branchDiff": name}))
    assert reply.pop("ok") == 1.0
    http = diff(proxy, name)
    assert reply == http
    assert {(c["op"], c["_id"]) for c in reply["changes"]} == {
        ("update", 1), ("delete", 2), ("insert", "new")}


def test_branch_diff_refers_large_diffs_to_the_http_api(
        proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str) -> None:
    branch = made.create()
    name = branch["name"]
    with MongoClient(branch["uri"]) as b:
        b[db_name].items.insert_many([{"_id": i} for i in range(10_000)])
        assert len(client.admin.command({"branchDiff": name})["changes"]) == 10_000
        b[db_name].items.insert_one({"_id": 10_000})
    err = failure(client, {"branchDiff": name})
    assert err.code == 10334
    assert "more than 10000 changes" in str(err)
    assert f"GET /branches/{name}/diff" in str(err)
    # The HTTP API streams it all.
    assert len(diff(proxy, name)["changes"]) == 10_001


def test_merge_branch(proxy: ProxyProcess, client: MongoClient, made: Branches,
                      db_name: str) -> None:
    branch = changed_branch(client, made, db_name)
    name = branch["name"]
    client[db_name].items.update_one({"_id": 1}, {"$set": {"v": "main"}})
    before = contents(client[db_name].items)

    dry = client.admin.command({"mergeBranch": name, "dryRun": True})
    assert dry["ok"] == 1.0 and dry["dry_run"] is True
    assert [c["_id"] for c in dry["conflicts"]] == [1]
    assert contents(client[db_name].items) == before

    err = failure(client, {"mergeBranch": name})
    assert err.code == 117 and err.details is not None
    assert "aborted: 1 conflict(s); nothing was changed" in str(err)
    assert [c["_id"] for c in err.details["conflicts"]] == [1]
    assert err.details["conflicts"][0]["parent"]["v"] == "main"
    assert err.details["applied"] == {"insert": 1, "update": 1, "delete": 1}
    assert contents(client[db_name].items) == before

    done = client.admin.command({"mergeBranch": name, "into": "main", "strategy": "theirs"})
    assert done["ok"] == 1.0 and done["skipped_conflicts"] == 1
    assert client[db_name].items.find_one({"_id": 1}) == {"_id": 1, "v": "main"}
    assert client[db_name].items.find_one({"_id": 2}) is None
    done = client.admin.command({"mergeBranch": name, "strategy": "ours"})
    assert done["applied"] == {"insert": 0, "update": 1, "delete": 0}
    with MongoClient(branch["uri"]) as b:
        assert contents(client[db_name].items) == contents(b[db_name].items)


def test_reset_branch_and_create_at(proxy: ProxyProcess, client: MongoClient,
                                    made: Branches, db_name: str) -> None:
    client[db_name].items.insert_many([{"_id": i} for i in range(3)])
    source = made.create()
    with MongoClient(source["uri"]) as s:
        s[db_name].items.update_one({"_id": 0}, {"$set": {"v": 1}})
        mark = last_lsn(proxy, source["name"])
        then = contents(s[db_name].items)
        s[db_name].items.delete_one({"_id": 1})

    name = unique("wire-at")
    made.track(name)
    created = client.admin.command({"createBranch": name, "from": source["name"], "at": mark})
    assert created["ok"] == 1.0 and created["fork_lsn"] == mark
    with MongoClient(created["uri"]) as a:
        assert contents(a[db_name].items) == then

    reply = without_gossip(client.admin.command({"resetBranch": source["name"], "to": mark}))
    assert reply == {"branch": source["name"], "to_lsn": mark, "voided_entries": 1,
                     "copied_into_children": 1, "ok": 1.0}
    with MongoClient(source["uri"]) as s:
        assert contents(s[db_name].items) == then
    assert client.admin.command({"resetBranch": source["name"], "to": "0"})["to_lsn"] == 0


@pytest.mark.parametrize(("cmd", "code", "message"), [
    ({"branchLog": "no-such-hw"}, 26, "branch 'no-such-hw' does not exist"),
    ({"branchDiff": "no-such-hw"}, 26, "branch 'no-such-hw' does not exist"),
    ({"mergeBranch": "no-such-hw"}, 26, "branch 'no-such-hw' does not exist"),
    ({"resetBranch": "no-such-hw", "to": 0}, 26, "branch 'no-such-hw' does not exist"),
    ({"createBranch": "NEW", "from": "no-such-hw", "at": 0}, 26,
     "branch 'no-such-hw' does not exist"),
    ({"branchLog": 5}, 2, "branchLog takes a branch name (a string), got 5"),
    ({"branchLog": "B", "limit": 0}, 2, "limit must be 1-10000, got 0"),
    ({"branchLog": "B", "limit": "ten"}, 2, "branchLog: limit must be an integer"),
    ({"branchLog": "B", "beforeLsn": True}, 2, "branchLog: beforeLsn must be an integer"),
    ({"branchLog": "B", "before_lsn": 3}, 2, "branchLog: unknown field(s): before_lsn"),
    ({"branchDiff": "B", "limit": 3}, 2, "branchDiff: unknown field(s): limit"),
    ({"mergeBranch": "B", "strategy": "mine"}, 2, "strategy must be one of abort, ours"),
    ({"mergeBranch": "B", "dryRun": "yes"}, 2, "dry_run must be true or false"),
    ({"mergeBranch": "B", "into": "other"}, 2,
     "branch 'B' merges into its parent 'main', not 'other'"),
    ({"mergeBranch": "B", "dry_run": True}, 2, "mergeBranch: unknown field(s): dry_run"),
    ({"resetBranch": "B"}, 2, "resetBranch needs 'to': an LSN or an ISO-8601 time"),
    ({"resetBranch": "B", "to": "soon"}, 2, "not an LSN or ISO-8601 time: 'soon'"),
    ({"resetBranch": "B", "to": -1}, 2, "LSN must not be negative, got -1"),
    ({"resetBranch": "B", "to": 0, "hard": 1}, 2, "resetBranch: unknown field(s): hard"),
    ({"createBranch": "NEW", "at": -1}, 2, "LSN must not be negative, got -1"),
    ({"createBranch": "NEW", "from": "B", "at": "later"}, 2, "not an LSN or ISO-8601 time"),
    ({"createBranch": "NEW", "from": "B", "at": 0, "when": 1}, 2,
     "createBranch: unknown field(s): when"),
])
def test_errors(client: MongoClient, made: Branches, cmd: dict[str, Any], code: int,
                message: str) -> None:
    name = made.create()["name"]
    new = unique("never")
    made.track(new)
    cmd = {k: (name if v == "B" else v) for k, v in cmd.items()}
    if next(iter(cmd.values())) == "NEW":
        cmd[next(iter(cmd))] = new
    err = failure(client, cmd)
    assert err.code == code, err
    assert message.replace("'B'", repr(name)) in str(err), str(err)


def test_history_commands_only_on_admin(client: MongoClient, made: Branches) -> None:
    name = made.create()["name"]
    for cmd in ({"branchLog": name}, {"branchDiff": name}, {"mergeBranch": name},
                {"resetBranch": name, "to": 0}):
        err = failure(client, cmd, db="test")
        assert err.code == 13
        assert str(err).startswith(f"{next(iter(cmd))} may only be run against the admin")


def test_history_from_mongosh(proxy: ProxyProcess, client: MongoClient, made: Branches,
                              db_name: str) -> None:
    branch = changed_branch(client, made, db_name)
    name = branch["name"]
    client[db_name].items.update_one({"_id": 1}, {"$set": {"v": "main"}})
    at_name = unique("sh-at")
    made.track(at_name)
    script = f"""
        const log = db.adminCommand({{branchLog: "{name}", limit: 2}});
        print(EJSON.stringify(log.entries.map(e => [e.op, e._id])));
        const d = db.adminCommand({{branchDiff: "{name}"}});
        print(EJSON.stringify(d.summary));
        try {{ db.adminCommand({{mergeBranch: "{name}"}}); print("no error"); }}
        catch (e) {{
          print(EJSON.stringify({{code: e.code, n: e.errorResponse.conflicts.length}}));
        }}
        const m = db.adminCommand({{mergeBranch: "{name}", strategy: "ours", dryRun: false}});
        print(EJSON.stringify(m.applied));
        const lsn = log.entries[1].lsn;
        const r = db.adminCommand({{resetBranch: "{name}", to: lsn}});
        print(EJSON.stringify([r.to_lsn === lsn, r.voided_entries]));
        const c = db.adminCommand({{createBranch: "{at_name}", from: "{name}", at: 0}});
        print(EJSON.stringify([c.parent, c.fork_lsn]));
    """
    done = mongosh(proxy.uri, script)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    log, summary, refused, applied, reset, created = lines
    assert log == [["put", "new"], ["delete", 2]]
    assert summary == {f"{db_name}.items": {"insert": 1, "update": 1, "delete": 1,
                                            "collection": None, "indexes": 0}}
    assert refused == {"code": 117, "n": 1}
    assert applied == {"insert": 1, "update": 1, "delete": 1}
    assert reset == [True, 1]
    assert created == [name, 0]
    with MongoClient(branch["uri"]) as b:
        # The reset voided the insert of "new" on the branch: the branch is as it was at
        # that point, a snapshot of main at its fork, so the merge that put "new" in main
        # later does not show through.
        assert {d["_id"] for d in b[db_name].items.find()} == {0, 1, 3}
