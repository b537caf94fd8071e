"""`mongobranch branch ...` run as a subprocess against the real proxy's admin API."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
from pymongo import MongoClient

from tests.branchutil import Branches, unique
from tests.servers import BIN, ProxyProcess, free_port


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "MONGOBRANCH_ADMIN"}
    full_env.update(env or {})
    return subprocess.run([str(BIN / "mongobranch"), "branch", *args], capture_output=True,
                          text=True, timeout=60, env=full_env)


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    done = cli(*args, env=env)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert done.stderr == ""
    return done.stdout


def test_create_list_show_delete_json(proxy: ProxyProcess, made: Branches) -> None:
    name = unique("cli")
    made.track(name)
    created = json.loads(ok("create", name, "--json", "--admin", proxy.admin_url))
    assert created["name"] == name and created["parent"] == "main"
    assert proxy.api("GET", f"/branches/{name}") == (
        200, {**created, "namespaces": {}, "children": []})
    port = free_port()
    child_name = unique("cli-child")
    made.track(child_name)
    child = json.loads(ok("--admin", proxy.admin_url, "create", child_name, "--from", name,
                          "--port", str(port), "--json"))
    assert child["parent"] == name and child["port"] == port
    assert child["uri"] == f"mongodb://127.0.0.1:{port}/"

    listed = json.loads(ok("list", "--json", "--admin", proxy.admin_url))
    assert isinstance(listed, list)
    mine = {b["name"]: b for b in listed if b["name"] in (name, child_name)}
    assert mine == {name: created, child_name: child}

    with MongoClient(child["uri"]) as c:
        c.cli_db.items.insert_many([{"_id": 1}, {"_id": 2}])
    shown = json.loads(ok("show", child_name, "--json", "--admin", proxy.admin_url))
    assert shown["namespaces"]["cli_db.items"]["live"] == 2
    assert shown["children"] == []
    assert json.loads(ok("show", name, "--json", "--admin", proxy.admin_url))["children"] == [
        child_name]

    assert json.loads(ok("delete", child_name, "--json", "--admin", proxy.admin_url)) == {
        "deleted": child_name}
    assert json.loads(ok("delete", name, "--json", "--admin", proxy.admin_url)) == {
        "deleted": name}
    assert proxy.api("GET", f"/branches/{name}")[0] == 404


def test_table_output(proxy: ProxyProcess, made: Branches) -> None:
    name = unique("tbl")
    made.track(name)
    out = ok("--admin", proxy.admin_url, "create", name)
    status, branch = proxy.api("GET", f"/branches/{name}")
    assert status == 200 and isinstance(branch, dict)
    for value in (name, "main", str(branch["port"]), branch["uri"], branch["created_at"]):
        assert value in out
    assert "{" not in out  # a table, not JSON

    out = ok("--admin", proxy.admin_url, "list")
    header = next(line for line in out.splitlines() if "name" in line)
    for column in ("name", "parent", "port", "uri", "created_at"):
        assert column in header
    row = next(line for line in out.splitlines() if name in line)
    assert branch["uri"] in row and str(branch["port"]) in row and "main" in row

    with MongoClient(branch["uri"]) as c:
        c.tbl_db.things.insert_one({"_id": 1})
        c.tbl_db.things.delete_one({"_id": 1})
    out = ok("--admin", proxy.admin_url, "show", name)
    assert name in out and branch["uri"] in out
    assert "changed namespaces" in out
    ns_row = next(line for line in out.splitlines() if "tbl_db.things" in line)
    cells = [cell.strip() for cell in ns_row.strip().strip("│").split("│")]
    assert cells == ["tbl_db.things", "1", "0", "0", "no"]  # changed, kept, live, dropped

    assert ok("--admin", proxy.admin_url, "delete", name).strip() == f"deleted branch {name}"


def test_show_without_changes_says_so(proxy: ProxyProcess, made: Branches) -> None:
    branch = made.create()
    out = ok("show", branch["name"], "--admin", proxy.admin_url)
    assert "no changed namespaces" in out


def test_admin_url_from_environment(proxy: ProxyProcess, made: Branches) -> None:
    branch = made.create()
    env = {"MONGOBRANCH_ADMIN": proxy.admin_url}
    listed = json.loads(ok("list", "--json", env=env))
    assert branch["name"] in {b["name"] for b in listed}
    # A host:port without scheme is accepted too.
    env = {"MONGOBRANCH_ADMIN": f"127.0.0.1:{proxy.admin_port}"}
    assert json.loads(ok("show", branch["name"], "--json", env=env))["name"] == branch["name"]
    # The option wins over the environment.
    env = {"MONGOBRANCH_ADMIN": "http://127.0.0.1:1"}
    assert json.loads(ok("--admin", proxy.admin_url, "list", "--json", env=env))


@pytest.mark.parametrize(("args", "message", "code"), [
    (("create", "main"), "branch name must match", 2),
    (("create", "a b"), "branch name must match", 2),
    (("create", "x" * 65), "branch name must match", 2),
    (("show", "no-such-branch-cli"), "branch 'no-such-branch-cli' does not exist", 5),
    (("delete", "no-such-branch-cli"), "branch 'no-such-branch-cli' does not exist", 5),
    (("create", "cli-orphan", "--from", "no-such-parent"),
     "parent branch 'no-such-parent' does not exist", 5),
])
def test_api_errors_exit_codes(proxy: ProxyProcess, args: tuple[str, ...], message: str,
                               code: int) -> None:
    for extra in ((), ("--json",), ("--output", "uri")):
        if extra[:1] == ("--output",) and args[0] == "delete":
            continue
        done = cli("--admin", proxy.admin_url, *args, *extra)
        assert done.returncode == code, done
        assert done.stdout == ""
        assert done.stderr.startswith(f"error: {message}")
        assert len(done.stderr.splitlines()) == 1


def test_conflicts_exit_4(proxy: ProxyProcess, made: Branches) -> None:
    parent = made.create()
    child = made.create(**{"from": parent["name"]})
    done = cli("--admin", proxy.admin_url, "create", parent["name"])
    assert done.returncode == 4
    assert done.stderr == f"error: branch {parent['name']!r} already exists\n"
    done = cli("--admin", proxy.admin_url, "create", unique("p"), "--port", str(child["port"]))
    assert done.returncode == 4
    assert f"port {child['port']} is already used by another branch" in done.stderr
    done = cli("--admin", proxy.admin_url, "delete", parent["name"])
    assert done.returncode == 4
    assert done.stderr == (f"error: branch {parent['name']!r} has child branches: "
                           f"{child['name']}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = cli("--admin", proxy.admin_url, "create", unique("p"), "--port", str(port))
    assert done.returncode == 4
    assert f"port {port} cannot be opened" in done.stderr


def test_unreachable_admin_exits_3() -> None:
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    for args in (("list",), ("show", "x"), ("create", "x"), ("delete", "x"),
                 ("list", "--json")):
        done = cli("--admin", url, *args)
        assert done.returncode == 3, done
        assert done.stdout == ""
        assert done.stderr.startswith(f"error: cannot reach the admin API at {url}")
        assert "Traceback" not in done.stderr
    done = cli("list", env={"MONGOBRANCH_ADMIN": url})
    assert done.returncode == 3
    assert f"cannot reach the admin API at {url}" in done.stderr


def test_default_admin_url_is_used(proxy: ProxyProcess) -> None:
    done = cli("list", "--json")
    if done.returncode == 0:  # something serves the default admin port on this machine
        assert isinstance(json.loads(done.stdout), list)
    elif done.returncode == 3:  # the usual case: nothing there
        assert "cannot reach the admin API at http://127.0.0.1:9090" in done.stderr
    else:  # something else answers there
        assert done.returncode in (1, 2, 5) and done.stderr.startswith("error: ")


def test_usage_errors(proxy: ProxyProcess) -> None:
    done = cli("--admin", proxy.admin_url, "create")
    assert done.returncode == 2 and "Missing argument 'NAME'" in done.stderr
    done = cli("--admin", proxy.admin_url, "create", "x", "--port", "0")
    assert done.returncode == 2 and "--port" in done.stderr
