"""Feature flags: command-line flags over MONGOBRANCH_* environment variables over a
TOML file over defaults. Every effective value remembers where it came from, so
`GET /config` and `mongobranch config` can say why a setting is what it is.

```toml
default_mode = "wal"        # mode of new branches: "wal" or "copy"
allow_wal = true            # false: creating a WAL branch is refused; existing ones serve
legacy_op_query = true      # false: legacy OP_QUERY commands refused, as mongod 6.0+ does

[[overrides]]               # per-branch overrides, first match wins
match = "perf-*"            # a branch name or fnmatch pattern
mode = "copy"

[masking."app.users"]       # what a masked branch shows of app.users (branching/masking.py)
email = "hash"              # redact, null, hash, or fake:<list>
"profile.phone" = "redact"
name = "fake:names"

[masking_lists]
names = ["Ada Lovelace", "Alan Turing", "Grace Hopper"]
```
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODES = ("wal", "copy")
MASK_RULES = ("redact", "null", "hash")
_FILE_KEYS = {"default_mode", "allow_wal", "legacy_op_query", "overrides", "masking",
              "masking_lists"}


class ConfigError(ValueError):
    pass


@dataclass
class Setting:
    value: Any
    source: str

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source}


def _bool(text: Any, where: str) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}: expected true or false, got {text!r}")


def _mode(text: Any, where: str) -> str:
    if text not in MODES:
        raise ConfigError(f"{where}: mode must be one of {', '.join(MODES)}, got {text!r}")
    return str(text)


@dataclass
class Config:
    default_mode: Setting = field(default_factory=lambda: Setting("wal", "default"))
    allow_wal: Setting = field(default_factory=lambda: Setting(True, "default"))
    legacy_op_query: Setting = field(default_factory=lambda: Setting(True, "default"))
    overrides: list[dict[str, str]] = field(default_factory=list)
    overrides_source: str = "default"
    # "<db>.<coll>" -> {field path: rule}; a masked branch shows these fields masked.
    masking: dict[str, dict[str, str]] = field(default_factory=dict)
    masking_lists: dict[str, list[Any]] = field(default_factory=dict)
    masking_source: str = "default"

    @classmethod
    def load(cls, path: str | Path | None = None, env: Mapping[str, str] | None = None,
             flags: Mapping[str, Any] | None = None) -> Config:
        env = os.environ if env is None else env
        flags = flags or {}
        config = cls()
        if path is None and env.get("MONGOBRANCH_CONFIG"):
            path = env["MONGOBRANCH_CONFIG"]
        if path is not None:
            config._apply_file(Path(path))
        if "MONGOBRANCH_DEFAULT_MODE" in env:
            config.default_mode = Setting(
                _mode(env["MONGOBRANCH_DEFAULT_MODE"], "MONGOBRANCH_DEFAULT_MODE"),
                "env MONGOBRANCH_DEFAULT_MODE")
        if "MONGOBRANCH_ALLOW_WAL" in env:
            config.allow_wal = Setting(_bool(env["MONGOBRANCH_ALLOW_WAL"],
                                             "MONGOBRANCH_ALLOW_WAL"),
                                       "env MONGOBRANCH_ALLOW_WAL")
        if "MONGOBRANCH_LEGACY_OP_QUERY" in env:
            config.legacy_op_query = Setting(_bool(env["MONGOBRANCH_LEGACY_OP_QUERY"],
                                                   "MONGOBRANCH_LEGACY_OP_QUERY"),
                                             "env MONGOBRANCH_LEGACY_OP_QUERY")
        if flags.get("default_mode") is not None:
            config.default_mode = Setting(_mode(flags["default_mode"], "--default-mode"),
                                          "flag --default-mode")
        if flags.get("allow_wal") is not None:
            config.allow_wal = Setting(_bool(flags["allow_wal"], "--allow-wal"),
                                       "flag --allow-wal/--no-allow-wal")
        if flags.get("legacy_op_query") is not None:
            config.legacy_op_query = Setting(
                _bool(flags["legacy_op_query"], "--legacy-op-query"),
                "flag --legacy-op-query/--no-legacy-op-query")
        return config

    def _apply_file(self, path: Path) -> None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        where = f"file {path}"
        unknown = set(data) - _FILE_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
        if "default_mode" in data:
            self.default_mode = Setting(_mode(data["default_mode"], where), where)
        if "allow_wal" in data:
            self.allow_wal = Setting(_bool(data["allow_wal"], where), where)
        if "legacy_op_query" in data:
            self.legacy_op_query = Setting(_bool(data["legacy_op_query"], where), where)
        overrides = data.get("overrides", [])
        if not isinstance(overrides, list):
            raise ConfigError(f"{where}: overrides must be an array of tables")
        for item in overrides:
            if not isinstance(item, dict) or set(item) != {"match", "mode"}:
                raise ConfigError(f"{where}: each override needs exactly 'match' and 'mode'")
            self.overrides.append({"match": str(item["match"]),
                                   "mode": _mode(item["mode"], where)})
        if overrides:
            self.overrides_source = where
        if "masking" in data or "masking_lists" in data:
            self.masking, self.masking_lists = _masking(data.get("masking", {}),
                                                        data.get("masking_lists", {}), where)
            self.masking_source = where

    def mode_for(self, name: str, asked: str | None) -> tuple[str, str]:
        """The mode a new branch gets, and why."""
        if asked is not None:
            return asked, "request"
        for rule in self.overrides:
            if fnmatch.fnmatchcase(name, rule["match"]):
                return rule["mode"], f"override {rule['match']!r} ({self.overrides_source})"
        return self.default_mode.value, f"default_mode ({self.default_mode.source})"

    def to_json(self) -> dict[str, Any]:
        return {"default_mode": self.default_mode.to_json(),
                "allow_wal": self.allow_wal.to_json(),
                "legacy_op_query": self.legacy_op_query.to_json(),
                "overrides": {"value": self.overrides, "source": self.overrides_source},
                "masking": {"value": self.masking, "lists": self.masking_lists,
                            "source": self.masking_source}}


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML reads `profile.phone = "hash"` as a nested table: the same dotted path."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _masking(rules: Any, lists: Any, where: str
             ) -> tuple[dict[str, dict[str, str]], dict[str, list[Any]]]:
    """The masking tables, checked whole at start-up: a rule the proxy could not turn
    into a stage must stop `serve`, never leave a field unmasked at read time."""
    if not isinstance(lists, dict) or not all(
            isinstance(v, list) and v and all(isinstance(x, str | int | float) for x in v)
            for v in lists.values()):
        raise ConfigError(f"{where}: masking_lists must map names to non-empty arrays "
                          "of strings or numbers")
    if not isinstance(rules, dict):
        raise ConfigError(f"{where}: masking must be a table of \"<db>.<coll>\" tables")
    out: dict[str, dict[str, str]] = {}
    for ns, fields in rules.items():
        db, _, coll = str(ns).partition(".")
        if not db or not coll or not isinstance(fields, dict) or not fields:
            raise ConfigError(f"{where}: masking.{ns!r}: expected a table of field rules "
                              "under a \"<db>.<coll>\" name")
        fields = _flat(fields)
        paths = sorted(fields)
        for path in paths:
            parts = path.split(".")
            if any(not p or p.startswith("$") for p in parts) or parts[0] == "_id":
                raise ConfigError(f"{where}: masking.{ns!r}: {path!r} is not a maskable "
                                  "field path (_id, empty or $-prefixed parts are refused)")
            rule = fields[path]
            listed = isinstance(rule, str) and rule.startswith("fake:")
            if rule not in MASK_RULES and not (listed and rule[5:] in lists):
                raise ConfigError(f"{where}: masking.{ns!r}.{path}: rule must be redact, "
                                  f"null, hash or fake:<a masking_lists name>, got {rule!r}")
        for a, b in ((a, b) for a in paths for b in paths if b.startswith(a + ".")):
            raise ConfigError(f"{where}: masking.{ns!r}: {a!r} and {b!r} overlap; "
                              "mask the outer field only")
        out[str(ns)] = {p: str(fields[p]) for p in paths}
    return out, {str(k): list(v) for k, v in lists.items()}
