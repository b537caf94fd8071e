"""`mongobranch branch log|diff|merge|reset` and `create --at`, run as subprocesses against
the real proxy's admin API: tables by default, the API's JSON with --json."""

from __future__ import annotations

import json
import time

import pytest
from pymongo import MongoClient

from tests.branchutil import Branches, unique
from tests.historyutil import changed_branch, contents, entries, last_lsn
from tests.servers import ProxyProcess, free_port
from tests.test_branch_cli import cli, ok


def run(proxy: ProxyProcess, *args: str) -> str:
    return ok("--admin", proxy.admin_url, *args)


def rows(out: str, needle: str) -> list[list[str]]:
    """The cells of the table rows containing needle."""
    return [[cell.strip() for cell in line.strip().strip("│┃").split("│")]
            for line in out.splitlines() if needle in line and "│" in line]


def test_log(proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str) -> None:
    branch = changed_branch(client, made, db_name, appname="cli-app")
    name = branch["name"]
    api = entries(proxy, name)
    assert json.loads(run(proxy, "log", name, "--json")) == {"branch": name, "entries": api}
    assert json.loads(run(proxy, "log", name, "--json", "--limit", "1",
                          "--before-lsn", str(api[0]["lsn"]))) == {
        "branch": name, "entries": api[1:2]}
    out = run(proxy, "log", name)
    assert f"log of {name}" in out
    header = next(line for line in out.splitlines() if "lsn" in line and "op" in line)
    for column in ("lsn", "time", "op", "ns", "_id", "client", "visible"):
        assert column in header
    found = rows(out, f"{db_name}.items")
    assert [(r[0], r[2], r[4]) for r in found] == [
        (str(api[0]["lsn"]), "put", '"new"'), (str(api[1]["lsn"]), "delete", "2"),
        (str(api[2]["lsn"]), "put", "1")]
    assert all("app=cli-app" in r[5] and r[6] == "yes" for r in found)
    # An empty log says so.
    fresh = made.create()["name"]
    assert run(proxy, "log", fresh).strip() == f"no log entries for branch {fresh}"


def test_diff(proxy: ProxyProcess, client: MongoClient, made: Branches, db_name: str) -> None:
    branch = changed_branch(client, made, db_name, appname="cli-app")
    name = branch["name"]
    with MongoClient(branch["uri"]) as b:
        b[db_name].items.create_index("v", name="v_1")
    status, headers_body = proxy.api("GET", f"/branches/{name}/diff")
    assert status == 200
    # --json passes the streamed document through: the API's JSON, unchanged.
    assert json.loads(run(proxy, "diff", name, "--json")) == headers_body
    out = run(proxy, "diff", name)
    ns = f"{db_name}.items"
    assert f"changes of {name} against main" in out
    assert sorted(tuple(r) for r in rows(out, ns) if len(r) == 3) == sorted([
        (ns, "update", "1"), (ns, "delete", "2"), (ns, "insert", '"new"'),
        (ns, "index created", "v_1")])
    assert "summary" in out
    summary = [r for r in rows(out, ns) if len(r) == 6]
    assert summary == [[ns, "1", "1", "1", "-", "1"]]
    fresh = made.create()["name"]
    assert run(proxy, "diff", fresh).strip() == f"no changes: {fresh} matches main"


def test_merge_dry_run_then_merge(proxy: ProxyProcess, client: MongoClient, made: Branches,
                                  db_name: str) -> None:
    branch = changed_branch(client, made, db_name, appname="cli-app")
    name = branch["name"]
    before = contents(client[db_name].items)
    out = run(proxy, "merge", name, "--dry-run")
    assert f"merge {name} into main (dry run)" in out
    for label, count in (("inserts to apply", "1"), ("updates to apply", "1"),
                         ("deletes to apply", "1"), ("conflicts", "0")):
        assert rows(out, label)[0][-1] == count
    assert contents(client[db_name].items) == before
    result = json.loads(run(proxy, "merge", name, "--into", "main", "--json"))
    assert result["applied"] == {"insert": 1, "update": 1, "delete": 1}
    assert result["conflicts"] == [] and result["dry_run"] is False
    with MongoClient(branch["uri"]) as b:
        assert contents(client[db_name].items) == contents(b[db_name].items)


def test_merge_conflicts_exit_4_and_are_shown(proxy: ProxyProcess, client: MongoClient,
                                              made: Branches, db_name: str) -> None:
    branch = changed_branch(client, made, db_name, appname="cli-app")
    name = branch["name"]
    client[db_name].items.update_one({"_id": 1}, {"$set": {"v": "main"}})
    before = contents(client[db_name].items)
    done = cli("--admin", proxy.admin_url, "merge", name)
    assert done.returncode == 4
    assert done.stderr.startswith(f"error: merge of {name} into main aborted: 1 conflict(s)")
    assert "conflicts: the parent changed these" in done.stdout
    assert f"merge {name} into main (aborted)" in done.stdout
    assert rows(done.stdout, "inserts to apply")[0][-1] == "1"  # nothing was applied
    assert rows(done.stdout, f"{db_name}.items") == [[f"{db_name}.items", "1", "update",
                                                       "changed"]]
    done = cli("--admin", proxy.admin_url, "merge", name, "--json")
    assert done.returncode == 4
    body = json.loads(done.stdout)
    assert [c["_id"] for c in body["conflicts"]] == [1]
    assert body["conflicts"][0]["parent"]["v"] == "main"
    assert contents(client[db_name].items) == before
    # theirs keeps main's version and applies the rest.
    result = json.loads(run(proxy, "merge", name, "--strategy", "theirs", "--json"))
    assert result["skipped_conflicts"] == 1
    assert client[db_name].items.find_one({"_id": 1}) == {"_id": 1, "v": "main"}
    assert client[db_name].items.find_one({"_id": "new"}) == {"_id": "new"}
    out = run(proxy, "merge", name, "--strategy", "ours")
    assert rows(out, "updates applied")[0][-1] == "1"
    assert client[db_name].items.find_one({"_id": 1}) == {"_id": 1, "v": "b"}


def test_reset_and_create_at(proxy: ProxyProcess, client: MongoClient, made: Branches,
                             db_name: str) -> None:
    client[db_name].items.insert_many([{"_id": i} for i in range(3)])
    source = made.create()
    with MongoClient(source["uri"]) as s:
        items = s[db_name].items
        items.update_one({"_id": 0}, {"$set": {"v": 1}})
        mark = last_lsn(proxy, source["name"])
        mark_time = entries(proxy, source["name"])[0]["time"]
        then = contents(items)
        time.sleep(0.01)  # WAL times have millisecond resolution
        items.update_one({"_id": 0}, {"$set": {"v": 2}})
        items.delete_one({"_id": 1})
        now = contents(items)

    at_name = unique("cli-at")
    made.track(at_name)
    created = json.loads(run(proxy, "create", at_name, "--from", source["name"],
                             "--at", str(mark), "--json"))
    assert created["fork_lsn"] == mark and created["parent"] == source["name"]
    with MongoClient(created["uri"]) as a:
        assert contents(a[db_name].items) == then
    at_time = unique("cli-at")
    made.track(at_time)
    out = run(proxy, "create", at_time, "--from", source["name"], "--at", mark_time)
    assert at_time in out and "fork_lsn" in out
    port = proxy.api("GET", f"/branches/{at_time}")[1]["port"]  # type: ignore[index]
    with MongoClient(f"mongodb://127.0.0.1:{port}/") as a:
        assert contents(a[db_name].items) == then

    out = run(proxy, "reset", source["name"], "--to", str(mark))
    assert f"reset {source['name']}" in out
    assert rows(out, "to_lsn")[0][-1] == str(mark)
    assert rows(out, "voided_entries")[0][-1] == "2"
    with MongoClient(source["uri"]) as s:
        assert contents(s[db_name].items) == then
    # The children keep what they saw.
    with MongoClient(created["uri"]) as a:
        assert contents(a[db_name].items) == then
    result = json.loads(run(proxy, "reset", source["name"], "--to", "0", "--json"))
    assert result["to_lsn"] == 0 and result["branch"] == source["name"]
    with MongoClient(source["uri"]) as s:
        assert contents(s[db_name].items) == [{"_id": i} for i in range(3)]
    assert now != then


@pytest.mark.parametrize(("args", "message", "code"), [
    (("log", "no-such-hcli"), "branch 'no-such-hcli' does not exist", 5),
    (("diff", "no-such-hcli"), "branch 'no-such-hcli' does not exist", 5),
    (("merge", "no-such-hcli"), "branch 'no-such-hcli' does not exist", 5),
    (("reset", "no-such-hcli", "--to", "0"), "branch 'no-such-hcli' does not exist", 5),
    (("reset", "BRANCH", "--to", "whenever"), "not an LSN or ISO-8601 time: 'whenever'", 2),
    (("merge", "BRANCH", "--into", "elsewhere"),
     "branch 'BRANCH' merges into its parent 'main', not 'elsewhere'", 2),
    (("log", "BRANCH", "--limit", "0"), "limit must be 1-10000, got 0", 2),
    (("create", "NEW", "--at", "-1"), "LSN must not be negative", 2),
    (("create", "NEW", "--from", "BRANCH", "--at", "later"), "not an LSN or ISO-8601 time", 2),
])
def test_api_errors_exit_codes(proxy: ProxyProcess, made: Branches, args: tuple[str, ...],
                               message: str, code: int) -> None:
    branch = made.create()["name"]
    new = unique("never")
    args = tuple(branch if a == "BRANCH" else new if a == "NEW" else a for a in args)
    message = message.replace("BRANCH", branch)
    for extra in ((), ("--json",)):
        done = cli("--admin", proxy.admin_url, *args, *extra)
        assert done.returncode == code, done
        assert done.stdout == ""
        assert done.stderr.startswith(f"error: {message}"), done.stderr
        assert len(done.stderr.splitlines()) == 1


def test_usage_errors_and_unreachable(proxy: ProxyProcess) -> None:
    done = cli("--admin", proxy.admin_url, "merge", "x", "--strategy", "mine")
    assert done.returncode == 2 and "--strategy" in done.stderr
    done = cli("--admin", proxy.admin_url, "reset", "x")
    assert done.returncode == 2 and "--to" in done.stderr
    done = cli("--admin", proxy.admin_url, "log", "x", "--limit", "many")
    assert done.returncode == 2 and "--limit" in done.stderr
    url = f"http://127.0.0.1:{free_port()}"
    for args in (("log", "x"), ("diff", "x"), ("diff", "x", "--json"), ("merge", "x"),
                 ("reset", "x", "--to", "1"), ("create", "x", "--from", "y", "--at", "1")):
        done = cli("--admin", url, *args)
        assert done.returncode == 3, done
        assert done.stdout == ""
        assert done.stderr.startswith(f"error: cannot reach the admin API at {url}")
