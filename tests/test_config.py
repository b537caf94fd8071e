"""Feature flags: flags over environment over file over defaults, and what they do."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pymongo import MongoClient

from proxy.config import Config, ConfigError
from tests.servers import ProxyProcess, Secantus


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    assert Config.load(env={}).to_json()["default_mode"] == {"value": "wal",
                                                              "source": "default"}
    path = tmp_path / "mb.toml"
    path.write_text('default_mode = "copy"\nallow_wal = false\n'
                    '[[overrides]]\nmatch = "perf-*"\nmode = "wal"\n')
    from_file = Config.load(path, env={})
    assert from_file.default_mode.value == "copy"
    assert from_file.default_mode.source == f"file {path}"
    assert from_file.allow_wal.value is False
    env = Config.load(path, env={"MONGOBRANCH_DEFAULT_MODE": "wal"})
    assert (env.default_mode.value, env.default_mode.source) == (
        "wal", "env MONGOBRANCH_DEFAULT_MODE")
    flagged = Config.load(path, env={"MONGOBRANCH_DEFAULT_MODE": "wal"},
                          flags={"default_mode": "copy", "allow_wal": True})
    assert flagged.default_mode.to_json() == {"value": "copy", "source": "flag --default-mode"}
    assert flagged.allow_wal.value is True
    assert flagged.mode_for("perf-1", None)[0] == "wal"
    assert flagged.mode_for("other", None)[0] == "copy"
    assert flagged.mode_for("perf-1", "copy") == ("copy", "request")


def test_legacy_op_query_setting_sources(tmp_path: Path) -> None:
    assert Config.load(env={}).legacy_op_query.to_json() == {"value": True, "source": "default"}
    path = tmp_path / "mb.toml"
    path.write_text("legacy_op_query = false\n")
    assert Config.load(path, env={}).legacy_op_query.value is False
    env = Config.load(path, env={"MONGOBRANCH_LEGACY_OP_QUERY": "on"}).legacy_op_query
    assert (env.value, env.source) == (True, "env MONGOBRANCH_LEGACY_OP_QUERY")
    flag = Config.load(path, env={"MONGOBRANCH_LEGACY_OP_QUERY": "on"},
                       flags={"legacy_op_query": False}).legacy_op_query
    assert (flag.value, flag.source) == (False, "flag --legacy-op-query/--no-legacy-op-query")
    with pytest.raises(ConfigError, match="expected true or false"):
        Config.load(env={"MONGOBRANCH_LEGACY_OP_QUERY": "maybe"})


@pytest.mark.parametrize("text, message", [
    ('default_mode = "fast"', "mode must be one of"),
    ("allow_wal = 3", "expected true or false"),
    ("nonsense = 1", "unknown setting"),
    ("default_mode = ", "not valid TOML"),
    ('[[overrides]]\nmatch = "x"', "exactly 'match' and 'mode'"),
])
def test_bad_config_files_are_refused_clearly(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        Config.load(path, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "missing.toml", env={})
    with pytest.raises(ConfigError, match="expected true or false"):
        Config.load(env={"MONGOBRANCH_ALLOW_WAL": "maybe"})


@pytest.fixture()
def walless(upstream: Secantus, monkeypatch: pytest.MonkeyPatch) -> Iterator[ProxyProcess]:
    monkeypatch.setenv("MONGOBRANCH_ALLOW_WAL", "false")
    proc = ProxyProcess(upstream.uri, meta_db="mb_config_test").start()
    monkeypatch.delenv("MONGOBRANCH_ALLOW_WAL")
    yield proc
    for name in ("cfg-copy", "cfg-wal"):
        proc.api("DELETE", f"/branches/{name}")
    proc.stop()


def test_wal_branches_can_be_turned_off(walless: ProxyProcess, direct: MongoClient) -> None:
    direct.cfg_db.items.drop()
    direct.cfg_db.items.insert_many([{"_id": i} for i in range(5)])
    status, body = walless.api("GET", "/config")
    assert status == 200
    assert body["allow_wal"] == {"value": False,  # type: ignore[index]
                                 "source": "env MONGOBRANCH_ALLOW_WAL"}
    status, body = walless.api("POST", "/branches", {"name": "cfg-wal"})
    assert status == 403
    assert "WAL branches are disabled" in body["error"]  # type: ignore[index]
    status, body = walless.api("POST", "/branches", {"name": "cfg-copy", "mode": "copy"})
    assert status == 201, body
    assert body["mode"] == "copy"  # type: ignore[index]
    client: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    try:
        assert client.cfg_db.items.count_documents({}) == 5
    finally:
        client.close()
