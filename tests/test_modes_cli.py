"""The CLI verbs of issue 5 and gc, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pymongo import MongoClient

from tests.servers import ProxyProcess

CLI = str(Path(sys.executable).parent / "mongobranch")


def run(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120,
                          env={"MONGOBRANCH_ADMIN": proxy.admin_url, "PATH": "/usr/bin:/bin"})


def test_copy_create_migrate_config_and_gc(proxy: ProxyProcess, direct: MongoClient) -> None:
    direct.cli_modes.items.drop()
    direct.cli_modes.items.insert_many([{"_id": i} for i in range(50)])
    try:
        created = run(proxy, "branch", "create", "cli-copy", "--mode", "copy")
        assert created.returncode == 0, created.stderr
        assert "copy" in created.stdout
        shown = json.loads(run(proxy, "branch", "show", "cli-copy", "--json").stdout)
        assert shown["mode"] == "copy"
        client: MongoClient = MongoClient(shown["uri"])
        try:
            assert client.cli_modes.items.count_documents({}) == 50
        finally:
            client.close()
        migrated = run(proxy, "branch", "migrate", "cli-copy", "--to", "wal")
        assert migrated.returncode == 0, migrated.stderr
        assert "now a wal branch" in migrated.stdout
        again = run(proxy, "branch", "migrate", "cli-copy", "--to", "wal")
        assert "already is a wal branch" in again.stdout
        bad = run(proxy, "branch", "migrate", "cli-copy", "--to", "tape")
        assert bad.returncode == 2  # click refuses the choice
        config = json.loads(run(proxy, "config", "--json").stdout)
        assert config["default_mode"]["value"] in ("wal", "copy")
        assert "source" in config["allow_wal"]
        table = run(proxy, "config")
        assert table.returncode == 0 and "default_mode" in table.stdout
        collected = run(proxy, "gc", "--retention", "30d")
        assert collected.returncode == 0, collected.stderr
        assert "horizon LSN" in collected.stdout
        refused = run(proxy, "gc", "--retention", "soon")
        assert refused.returncode == 2 and "retention must look like" in refused.stderr
    finally:
        run(proxy, "branch", "delete", "cli-copy")
        direct.drop_database("cli_modes")


def test_serve_refuses_bad_flags(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('default_mode = "fast"')
    for args in (["--config", str(bad)], ["--gc-retention", "never"],
                 ["--config", str(tmp_path / "missing.toml")]):
        result = subprocess.run([CLI, "serve", "--upstream", "mongodb://127.0.0.1:1/", *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert "Invalid value" in result.stderr
