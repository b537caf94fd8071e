"""Bearer tokens on the admin HTTP API, the CLI sending them, and the refusal to expose
the API without one."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import BIN, ProxyProcess, Secantus, free_port

ADMIN = secrets.token_hex(16)
READ = secrets.token_hex(16)
_TOKEN_ENV = ("MONGOBRANCH_ADMIN_TOKEN", "MONGOBRANCH_ADMIN_TOKENS",
              "MONGOBRANCH_ADMIN_TOKEN_FILE", "MONGOBRANCH_ADMIN")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _TOKEN_ENV}
    env.update(extra)
    return env


def call(proxy: ProxyProcess, method: str, path: str, token: str | None = None,
         body: object | None = None) -> tuple[int, Any, dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(proxy.admin_url + path, data=data, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if path != "/metrics" else raw), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# admin API tokens\nadmin:{ADMIN}\nread:{READ}  # for dashboards\n")
    return path


@pytest.fixture(scope="module")
def guarded(upstream: Secantus, token_file: Path) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(upstream.uri, meta_db="mongobranch_admin_auth",
                        extra=["--admin-token-file", str(token_file)])
    proc.start()
    yield proc
    proc.stop()


def test_probes_stay_open(guarded: ProxyProcess) -> None:
    assert call(guarded, "GET", "/healthz")[0] == 200
    assert call(guarded, "GET", "/metrics")[0] == 200


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/branches"), ("POST", "/branches"), ("GET", "/config"), ("POST", "/gc"),
    ("DELETE", "/branches/x"), ("POST", "/branches/x/merge"), ("GET", "/nowhere"),
    ("PATCH", "/branches/x"), ("POST", "/branches/x/refresh"), ("POST", "/branches/x/restore"),
    ("POST", "/reap"),
])
def test_every_other_route_needs_a_token(guarded: ProxyProcess, method: str,
                                         path: str) -> None:
    status, body, headers = call(guarded, method, path, body={} if method == "POST" else None)
    assert status == 401
    assert "Bearer" in body["error"] and headers["WWW-Authenticate"].startswith("Bearer")
    status, body, _ = call(guarded, method, path, token="not-a-token-" + "x" * 20,
                           body={} if method == "POST" else None)
    assert (status, body) == (401, {"error": "invalid admin token"})


def test_scopes(guarded: ProxyProcess) -> None:
    assert call(guarded, "GET", "/branches", READ)[:2] == (200, [])
    status, body, _ = call(guarded, "POST", "/branches", READ, {"name": "by-reader"})
    assert status == 403 and "read-only token" in body["error"]
    status, body, _ = call(guarded, "POST", "/branches", ADMIN, {"name": "by-admin"})
    assert status == 201, body
    assert [b["name"] for b in call(guarded, "GET", "/branches", READ)[1]] == ["by-admin"]
    assert call(guarded, "DELETE", "/branches/by-admin", READ)[0] == 403
    assert call(guarded, "PATCH", "/branches/by-admin", READ, {"protected": True})[0] == 403
    assert call(guarded, "POST", "/reap", READ, {})[0] == 403
    assert call(guarded, "DELETE", "/branches/by-admin", ADMIN)[:2] == (
        200, {"deleted": "by-admin"})


def test_audit_names_the_token(guarded: ProxyProcess) -> None:
    """Runs after test_scopes: its create, refused create and delete are in the audit log."""
    marker = "mongobranch.audit: "
    lines = [json.loads(line.split(marker, 1)[1]) for line in guarded.read_log().splitlines()
             if marker in line]
    fp = hashlib.sha256(ADMIN.encode()).hexdigest()[:12]
    read_fp = hashlib.sha256(READ.encode()).hexdigest()[:12]
    assert ADMIN not in guarded.read_log() and READ not in guarded.read_log()
    created = [e for e in lines if e["op"] == "POST /branches" and e["user"]
               and e["user"].startswith(("admin-api:admin", "admin-api:read"))]
    assert [(e["branch"], e["user"], e["outcome"]) for e in created] == [
        (None, f"admin-api:read:{read_fp}", "refused"),
        ("by-admin", f"admin-api:admin:{fp}", "ok")]
    assert all(e["via"] == "http" and e["client"] == "127.0.0.1" for e in created)
    unauthenticated = [e for e in lines if e["user"] is None]
    assert unauthenticated and all(e["outcome"] == "refused" and e["code"] == 401
                                   for e in unauthenticated)
    deleted = [e for e in lines if e["op"] == "DELETE /branches/{name}" and e["user"]]
    assert [(e["branch"], e["outcome"]) for e in deleted] == [("by-admin", "refused"),
                                                              ("by-admin", "ok")]


def test_audit_records_a_refused_operation_as_answered(guarded: ProxyProcess) -> None:
    """A branch operation's failure is answered by the error middleware; the audit line
    written before it has the same status and message the client gets."""
    refusals = [("POST", "/branches", {"name": "main"}, 400, "failed"),
                ("DELETE", "/branches/audit-no-such", None, 404, "failed"),
                ("POST", "/branches/audit-no-such/reset", {"to": 0}, 404, "failed"),
                ("POST", "/branches/audit-no-such/merge", {"strategy": "mine"}, 400, "failed")]
    answers = []
    for method, path, body, status, _ in refusals:
        answer = call(guarded, method, path, ADMIN, body)
        assert answer[0] == status, answer
        answers.append(answer[1]["error"])
    marker = "mongobranch.audit: "
    lines = [json.loads(line.split(marker, 1)[1]) for line in guarded.read_log().splitlines()
             if marker in line]
    for (method, path, _, status, outcome), error in zip(refusals, answers, strict=True):
        op = f"{method} {path}".replace("audit-no-such", "{name}")
        entry = [e for e in lines if e["op"] == op and e.get("code") == status][-1]
        assert (entry["outcome"], entry["error"]) == (outcome, error)


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "mongobranch"), *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_cli_sends_the_token(guarded: ProxyProcess, token_file: Path) -> None:
    admin = ["--admin", guarded.admin_url]
    done = cli("branch", "list", "--json", *admin, env=clean_env())
    assert done.returncode == 1 and "authentication required" in done.stderr
    done = cli("branch", "list", "--json", *admin,
               env=clean_env(MONGOBRANCH_ADMIN_TOKEN=READ))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    done = cli("branch", "create", "cli-b", *admin, env=clean_env(MONGOBRANCH_ADMIN_TOKEN=READ))
    assert done.returncode == 1 and "read-only token" in done.stderr
    # The server's token file serves the CLI too: its first entry is the admin token.
    env = clean_env(MONGOBRANCH_ADMIN_TOKEN_FILE=str(token_file))
    done = cli("branch", "create", "cli-b", *admin, env=env)
    assert done.returncode == 0, done.stderr
    assert cli("branch", "delete", "cli-b", *admin, env=env).returncode == 0


def serve(upstream: Secantus, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "mongobranch"), "serve", "--upstream", upstream.uri, "--listen",
         f"127.0.0.1:{free_port()}", "--meta-db", "mongobranch_admin_auth", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_refuses_an_exposed_admin_api_without_a_token(upstream: Secantus,
                                                      tmp_path: Path) -> None:
    port = free_port()
    proc = serve(upstream, "--admin", f"0.0.0.0:{port}", env=clean_env())
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"0.0.0.0:{port}" in out and "MONGOBRANCH_ADMIN_TOKEN" in out
    proc = serve(upstream, "--admin", f"0.0.0.0:{port}",
                 env=clean_env(MONGOBRANCH_ADMIN_TOKEN="short"))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "shorter than 16" in out
    missing = tmp_path / "absent"
    proc = serve(upstream, "--admin", f"0.0.0.0:{port}", "--admin-token-file", str(missing),
                 env=clean_env())
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and str(missing) in out


def test_exposed_admin_api_with_a_token_from_the_environment(upstream: Secantus) -> None:
    proxy = ProxyProcess(upstream.uri, meta_db="mongobranch_admin_auth")
    proxy.extra = ["--admin", f"0.0.0.0:{proxy.admin_port}"]
    old = os.environ.get("MONGOBRANCH_ADMIN_TOKEN")
    os.environ["MONGOBRANCH_ADMIN_TOKEN"] = ADMIN  # inherited by the child process
    try:
        proxy.start()
    finally:
        if old is None:
            del os.environ["MONGOBRANCH_ADMIN_TOKEN"]
        else:
            os.environ["MONGOBRANCH_ADMIN_TOKEN"] = old
    try:
        assert call(proxy, "GET", "/branches")[0] == 401
        assert call(proxy, "GET", "/branches", ADMIN)[0] == 200
    finally:
        proxy.stop()
