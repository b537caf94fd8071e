"""The branch management requests, typed (docs/ARCHITECTURE.md, "Layers and where they
live"): one frozen dataclass per request and one parse function that validates and
coerces a plain mapping into it.

The admin HTTP API parses its JSON body (and query string), the wire admin commands their
command's fields, and the CLI the options it is given, all with these functions, so what a
valid request is has one definition; the operations (operations.py) take only the parsed
dataclasses. Pure: no engine, no I/O, nothing heavier than the lifecycle's parsers, so
the CLI can import it.

A parse function takes `command` when the fields come from a wire command: its messages
about a field's type and about unknown fields then start with the command's name, as
mongod's own do, and `labels` maps a field to the name the wire spells it with.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from proxy.branching import lifecycle
from proxy.branching.errors import BranchError, Kind
from proxy.branching.naming import MAIN, valid_branch_name

Mode = Literal["wal", "copy"]
Strategy = Literal["abort", "ours", "theirs"]
MODES: tuple[Mode, ...] = ("wal", "copy")
STRATEGIES: tuple[Strategy, ...] = ("abort", "ours", "theirs")
# A point in history: an LSN, or an ISO-8601 time the engine resolves to one.
Point = int | str
LOG_LIMIT = 10_000
PORTS = (1, 65535)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class Fields:
    """A request's fields as one front door received them: the values keyed as that door
    spells them (`labels` maps a field's name here to the door's, where they differ), and
    the wire command they came with, which the messages about types and unknown fields
    start with."""

    def __init__(self, values: Mapping[str, Any], command: str | None = None,
                 labels: Mapping[str, str] | None = None):
        self.values = values
        self.command = command
        self.labels = labels or {}

    def label(self, key: str) -> str:
        return self.labels.get(key, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(self.label(key), default)

    def __contains__(self, key: str) -> bool:
        return self.label(key) in self.values

    def invalid(self, message: str, prefixed: bool = False) -> BranchError:
        if prefixed and self.command:
            message = f"{self.command}: {message}"
        return BranchError(Kind.INVALID, message)

    def only(self, allowed: frozenset[str] | set[str]) -> None:
        spelled = {self.label(k) for k in allowed}
        unknown = sorted(k for k in self.values if k not in spelled)
        if unknown:
            raise self.invalid(f"unknown field(s): {', '.join(unknown)}", prefixed=True)

    def needs(self, key: str, verb: str, hint: str) -> Any:
        """A required field; `verb` names the request in the message where no command
        does."""
        if key not in self:
            raise self.invalid(f"{self.command or verb} needs '{self.label(key)}'{hint}")
        return self.get(key)


def _fields(values: Mapping[str, Any] | Fields) -> Fields:
    return values if isinstance(values, Fields) else Fields(values)


# -- values ----------------------------------------------------------------------------------
def parse_flag(value: Any, what: str) -> bool:
    """A flag from a JSON body or BSON (a boolean) or a query string (true/false/1/0);
    absent is false."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0"):
        return value.lower() in ("true", "1")
    raise BranchError(Kind.INVALID, f"{what} must be true or false, got {value!r}")


def _strict_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise BranchError(Kind.INVALID, f"{what} must be true or false")
    return value


def _integral(value: Any) -> Any:
    """The shell sends numbers as doubles: 5.0 is the integer 5."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _int(f: Fields, key: str) -> int | None:
    """An integer field: a number, or digits (a query string sends nothing else)."""
    value = _integral(f.get(key))
    if value is None:
        return None
    if isinstance(value, str) and f.command is None:
        try:
            return int(value)
        except ValueError:
            pass
    if not isinstance(value, int) or isinstance(value, bool):
        raise f.invalid(f"{f.label(key)} must be an integer, got {value!r}", prefixed=True)
    return value


def parse_port(value: Any) -> int | None:
    value = _integral(value)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or \
            not PORTS[0] <= value <= PORTS[1]:
        raise BranchError(Kind.INVALID, f"port must be an integer {PORTS[0]}-{PORTS[1]}, "
                                        f"got {value!r}")
    return value


def parse_name(value: Any) -> str:
    if not valid_branch_name(value):
        raise BranchError(Kind.INVALID, "branch name must match [A-Za-z0-9._-]{1,64} and not be "
                                        f"'main', got {value!r}")
    return cast(str, value)


def parse_point(value: Any) -> Point:
    """An LSN (a number, or digits) or a time; the time is checked when it is resolved."""
    value = _integral(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BranchError(Kind.INVALID,
                          f"'at'/'to' must be an LSN or an ISO-8601 time, not {value!r}")
    if isinstance(value, int) and value < 0:
        raise BranchError(Kind.INVALID, f"LSN must not be negative, got {value}")
    return value


def parse_mode(value: Any) -> Mode | None:
    if value is not None and value not in MODES:
        raise BranchError(Kind.INVALID, f"mode must be 'wal' or 'copy', got {value!r}")
    return cast("Mode | None", value)


def parse_retention(value: Any) -> dt.timedelta:
    """gc's retention window: 30s, 15m, 12h, 7d or 2w."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", str(value))
    if not match:
        raise BranchError(Kind.INVALID, f"retention must look like 30s, 15m, 12h, 7d or 2w, "
                                        f"not {value!r}")
    return dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


# -- create ----------------------------------------------------------------------------------
CREATE_FIELDS = frozenset({"name", "from", "port", "at", "mode", "masked",
                           *lifecycle.FIELDS})


@dataclass(frozen=True)
class CreateBranch:
    name: str
    parent: str = MAIN
    port: int | None = None
    mode: Mode | None = None
    at: Point | None = None
    # The Branch fields the lifecycle settings set (lifecycle.settings), checked before
    # the branch exists: bad lifecycle input creates nothing.
    lifecycle: Mapping[str, Any] = field(default_factory=dict)
    # Its port shows the configured fields masked (masking.py); a masked parent's child
    # is masked whatever this says.
    masked: bool = False


def parse_create(values: Mapping[str, Any] | Fields) -> CreateBranch:
    f = _fields(values)
    f.only(CREATE_FIELDS)
    changes = lifecycle.settings({k: f.get(k) for k in lifecycle.FIELDS if k in f})
    mode = parse_mode(f.get("mode"))
    name = parse_name(f.get("name"))
    parent = f.get("from", MAIN)
    if not isinstance(parent, str):
        raise f.invalid(f"from must be a branch name (a string), got {parent!r}")
    port = parse_port(f.get("port"))
    at = None if f.get("at") is None else parse_point(f.get("at"))
    masked = False if f.get("masked") is None else _strict_bool(f.get("masked"), "masked")
    return CreateBranch(name, parent, port, mode, at, changes, masked)


# -- list, drop, restore, refresh, lifecycle -------------------------------------------------
@dataclass(frozen=True)
class ListBranches:
    deleted: bool = False


def parse_list(values: Mapping[str, Any] | Fields) -> ListBranches:
    return ListBranches(parse_flag(_fields(values).get("deleted"), "deleted"))


@dataclass(frozen=True)
class DropBranch:
    name: str
    force: bool = False
    purge: bool = False


def parse_drop(name: str, values: Mapping[str, Any] | Fields) -> DropBranch:
    f = _fields(values)
    f.only({"force", "purge"})
    return DropBranch(name, parse_flag(f.get("force"), "force"),
                      parse_flag(f.get("purge"), "purge"))


@dataclass(frozen=True)
class RestoreBranch:
    name: str
    port: int | None = None


def parse_restore(name: str, values: Mapping[str, Any] | Fields) -> RestoreBranch:
    f = _fields(values)
    f.only({"port"})
    return RestoreBranch(name, parse_port(f.get("port")))


@dataclass(frozen=True)
class RefreshBranch:
    name: str
    force: bool = False


def parse_refresh(name: str, values: Mapping[str, Any] | Fields) -> RefreshBranch:
    f = _fields(values)
    f.only({"force"})
    return RefreshBranch(name, parse_flag(f.get("force"), "force"))


@dataclass(frozen=True)
class UpdateLifecycle:
    """A change of a branch's expiry, idle expiry or protection; main takes only
    protection."""

    name: str
    changes: Mapping[str, Any]


def parse_update(name: str, values: Mapping[str, Any] | Fields) -> UpdateLifecycle:
    f = _fields(values)
    unknown = set(f.values) - lifecycle.FIELDS
    if unknown:
        raise f.invalid(f"unknown field(s): {', '.join(sorted(unknown))}; a branch's "
                        f"lifecycle takes {', '.join(sorted(lifecycle.FIELDS))}")
    if name == MAIN and set(f.values) - {"protected"}:
        raise f.invalid("main never expires: it takes only 'protected'")
    return UpdateLifecycle(name, lifecycle.settings(dict(f.values)))


@dataclass(frozen=True)
class Reap:
    """One reaper pass now; `now` (a later time) asks what would expire by then."""

    now: dt.datetime | None = None
    dry_run: bool = False


def parse_reap(values: Mapping[str, Any] | Fields) -> Reap:
    f = _fields(values)
    f.only({"now", "dry_run"})
    now = None if f.get("now") is None else lifecycle.parse_time(f.get("now"), "now")
    return Reap(now, _strict_bool(f.get("dry_run", False), "dry_run"))


# -- history ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Log:
    name: str
    limit: int = 100
    before_lsn: int | None = None


def parse_log(name: str, values: Mapping[str, Any] | Fields) -> Log:
    f = _fields(values)
    f.only({"limit", "before_lsn"})
    limit = _int(f, "limit")
    if limit is not None and not 0 < limit <= LOG_LIMIT:
        raise f.invalid(f"limit must be 1-{LOG_LIMIT}, got {limit}")
    return Log(name, 100 if limit is None else limit, _int(f, "before_lsn"))


@dataclass(frozen=True)
class Diff:
    name: str


def parse_diff(name: str, values: Mapping[str, Any] | Fields) -> Diff:
    _fields(values).only(set())
    return Diff(name)


@dataclass(frozen=True)
class MergeBranch:
    name: str
    # A branch merges into its parent only: the operation checks `into` against it, and
    # says which it is, whatever was given (a value that is no name never matches).
    into: object = None
    strategy: Strategy = "abort"
    dry_run: bool = False
    force: bool = False


def parse_merge(name: str, values: Mapping[str, Any] | Fields) -> MergeBranch:
    f = _fields(values)
    f.only({"into", "strategy", "dry_run", "force"})
    strategy = f.get("strategy", "abort")
    if strategy not in STRATEGIES:
        raise f.invalid(f"strategy must be one of {', '.join(STRATEGIES)}")
    dry_run = _strict_bool(f.get("dry_run", False), "dry_run")
    return MergeBranch(name, f.get("into"), strategy, dry_run,
                       parse_flag(f.get("force"), "force"))


@dataclass(frozen=True)
class ResetBranch:
    name: str
    to: Point
    force: bool = False


def parse_reset(name: str, values: Mapping[str, Any] | Fields) -> ResetBranch:
    f = _fields(values)
    f.only({"to", "force"})
    to = parse_point(f.needs("to", "reset", ": an LSN or an ISO-8601 time"))
    return ResetBranch(name, to, parse_flag(f.get("force"), "force"))


# -- modes and retention ---------------------------------------------------------------------
@dataclass(frozen=True)
class Migrate:
    name: str
    to: Mode


def parse_migrate(name: str, values: Mapping[str, Any] | Fields) -> Migrate:
    f = _fields(values)
    f.only({"to"})
    to = f.needs("to", "migrate", ': "wal" or "copy"')
    if to not in MODES:
        raise f.invalid(f"'to' must be one of {', '.join(MODES)}, got {to!r}")
    return Migrate(name, to)


@dataclass(frozen=True)
class Gc:
    retention: dt.timedelta


def parse_gc(values: Mapping[str, Any] | Fields) -> Gc:
    f = _fields(values)
    f.only({"retention"})
    return Gc(parse_retention(f.needs("retention", "gc", ', e.g. "7d"')))
