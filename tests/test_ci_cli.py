"""CI in two lines: `branch create --output uri`, the exit codes, and the GitHub Actions
workflow in deploy/github-actions run step by step against a real proxy."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from pymongo import MongoClient

from tests.branchutil import Branches, unique
from tests.servers import BIN, ProxyProcess, Secantus, free_port
from tests.test_branch_cli import cli

WORKFLOW = Path(__file__).resolve().parent.parent / "deploy/github-actions/branch-per-pr.yml"


def test_create_output_uri_prints_only_the_connection_string(proxy: ProxyProcess,
                                                              made: Branches) -> None:
    name = unique("ci")
    made.track(name)
    done = cli("--admin", proxy.admin_url, "create", name, "--output", "uri")
    assert done.returncode == 0 and done.stderr == ""
    status, branch = proxy.api("GET", f"/branches/{name}")
    assert status == 200 and isinstance(branch, dict)
    assert done.stdout == branch["uri"] + "\n"
    with MongoClient(done.stdout.strip(), serverSelectionTimeoutMS=10000) as c:
        c.ci_db.items.insert_one({"_id": 1})
        assert c.ci_db.items.count_documents({}) == 1
    shown = cli("--admin", proxy.admin_url, "show", name, "-o", "uri")
    assert shown.returncode == 0 and shown.stdout == done.stdout
    # The same branch again: exit 4, nothing on stdout for a script to mistake for a URI.
    again = cli("--admin", proxy.admin_url, "create", name, "--output", "uri")
    assert again.returncode == 4 and again.stdout == ""
    assert again.stderr == f"error: branch {name!r} already exists\n"
    # json and table outputs are the same as --json and the default.
    as_json = cli("--admin", proxy.admin_url, "show", name, "--output", "json")
    assert as_json.returncode == 0 and as_json.stdout == cli(
        "--admin", proxy.admin_url, "show", name, "--json").stdout
    table = cli("--admin", proxy.admin_url, "show", name, "--output", "table")
    assert table.stdout == cli("--admin", proxy.admin_url, "show", name).stdout
    assert "changed namespaces" in table.stdout


def test_output_usage_errors_exit_2(proxy: ProxyProcess) -> None:
    done = cli("--admin", proxy.admin_url, "create", unique("ci"), "--json", "--output", "uri")
    assert done.returncode == 2 and "contradict" in done.stderr and done.stdout == ""
    done = cli("--admin", proxy.admin_url, "create", unique("ci"), "--output", "yaml")
    assert done.returncode == 2 and "--output" in done.stderr


def test_each_exit_code(proxy: ProxyProcess, made: Branches) -> None:
    existing = made.create()["name"]
    cases = {
        0: ("list",),
        2: ("create", "bad name"),
        4: ("create", existing),
        5: ("delete", unique("never")),
    }
    for code, args in cases.items():
        done = cli("--admin", proxy.admin_url, *args)
        assert done.returncode == code, (args, done)
    done = cli("--admin", f"http://127.0.0.1:{free_port()}", "create", unique("ci"),
               "--output", "uri")
    assert done.returncode == 3 and done.stdout == ""


def test_a_server_that_is_not_the_admin_api_exits_1(tmp_path: Path) -> None:
    """Any other failure (here: an HTTP server that answers, but not with JSON)."""
    import functools
    import http.server
    import threading

    (tmp_path / "branches").write_text("<html>not the admin API</html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        done = cli("--admin", url, "list")
        assert done.returncode == 1, done
        assert done.stderr == f"error: the admin API at {url} did not answer JSON\n"
    finally:
        server.shutdown()
        server.server_close()


# -- the GitHub Actions workflow ----------------------------------------------------------

def _expand(value: str, context: dict[str, str]) -> str:
    """${{ expr }} as GitHub evaluates it, for the expressions the workflow uses."""
    def one(match: re.Match[str]) -> str:
        expr = match.group(1).strip()
        assert expr in context, f"the test does not know the expression {expr!r}"
        return context[expr]

    return re.sub(r"\$\{\{(.*?)\}\}", one, value)


def _step(job: dict[str, Any], step_id: str) -> dict[str, Any]:
    return next(s for s in job["steps"] if s.get("id") == step_id)


def _run_step(workflow: dict[str, Any], job: str, step_id: str, context: dict[str, str],
              github_env: Path) -> subprocess.CompletedProcess[str]:
    """One `run:` step as the runner runs it: bash -e -o pipefail, the workflow's env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONGOBRANCH")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    for scope in (workflow.get("env", {}), workflow["jobs"][job].get("env", {})):
        env.update({k: _expand(str(v), context) for k, v in scope.items()})
    env["GITHUB_ENV"] = str(github_env)
    script = _step(workflow["jobs"][job], step_id)["run"]
    assert "${{" not in script  # values reach the script through env, never spliced in
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
                          env=env, capture_output=True, text=True, timeout=120)


def test_workflow_branch_per_pull_request(proxy: ProxyProcess, tmp_path: Path) -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert set(triggers["pull_request"]["types"]) >= {"opened", "synchronize", "closed"}
    assert "!= 'closed'" in workflow["jobs"]["test"]["if"]
    assert "== 'closed'" in workflow["jobs"]["drop"]["if"]
    number = str(int(unique("x")[-6:], 16))
    context = {"secrets.MONGOBRANCH_ADMIN": proxy.admin_url,
               "github.event.pull_request.number": number,
               "vars.MONGOBRANCH_PIP": "(not used: the test runs the installed CLI)"}
    name = f"pr-{number}"
    github_env = tmp_path / "github_env"
    try:
        # opened: the branch is made and its URI exported to the job.
        done = _run_step(workflow, "test", "branch", context, github_env)
        assert done.returncode == 0, done
        status, branch = proxy.api("GET", f"/branches/{name}")
        assert status == 200 and isinstance(branch, dict)
        assert github_env.read_text() == f"MONGODB_URI={branch['uri']}\n"
        with MongoClient(branch["uri"], serverSelectionTimeoutMS=10000) as c:
            c.pr_db.items.insert_one({"_id": "kept"})
        # synchronize: the same branch, with what earlier runs wrote, is exported again.
        done = _run_step(workflow, "test", "branch", context, github_env)
        assert done.returncode == 0, done
        assert github_env.read_text().splitlines() == [f"MONGODB_URI={branch['uri']}"] * 2
        with MongoClient(branch["uri"], serverSelectionTimeoutMS=10000) as c:
            assert c.pr_db.items.find_one() == {"_id": "kept"}
        # closed: dropped; closing again (a re-run) finds it gone and still succeeds.
        done = _run_step(workflow, "drop", "drop", context, github_env)
        assert done.returncode == 0, done
        assert proxy.api("GET", f"/branches/{name}")[0] == 404
        done = _run_step(workflow, "drop", "drop", context, github_env)
        assert done.returncode == 0, done
        # An unreachable proxy fails the job with exit 3 and exports nothing.
        context["secrets.MONGOBRANCH_ADMIN"] = f"http://127.0.0.1:{free_port()}"
        github_env.write_text("")
        done = _run_step(workflow, "test", "branch", context, github_env)
        assert done.returncode == 3 and github_env.read_text() == ""
        done = _run_step(workflow, "drop", "drop", context, github_env)
        assert done.returncode != 0
    finally:
        proxy.api("DELETE", f"/branches/{name}")


def test_advertise_host_names_the_branch_uri(upstream: Secantus) -> None:
    proc = ProxyProcess(upstream.uri, meta_db=unique("mbadv").replace("-", "_"),
                        extra=["--advertise-host", "localhost"]).start()
    try:
        done = subprocess.run([str(BIN / "mongobranch"), "branch", "--admin", proc.admin_url,
                               "create", "adv", "--output", "uri"], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done
        status, branch = proc.api("GET", "/branches/adv")
        assert status == 200 and isinstance(branch, dict)
        assert done.stdout == f"mongodb://localhost:{branch['port']}/\n"
        with MongoClient(done.stdout.strip(), serverSelectionTimeoutMS=10000) as c:
            assert c.admin.command("ping")["ok"] == 1.0
    finally:
        proc.stop()
        with MongoClient(upstream.uri, directConnection=True) as c:
            c.drop_database(proc.meta_db)
