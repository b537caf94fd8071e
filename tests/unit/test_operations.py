"""What a valid branch management request is (proxy/branching/requests.py): every field's
accepted and refused values and the messages users get, from the HTTP API's JSON and
query strings and from the wire commands' fields. In process: the parse functions touch
no engine."""

from __future__ import annotations

import datetime as dt
from typing import Any

import click
import pytest

from proxy import cli
from proxy.branching import requests as rq
from proxy.branching.errors import BranchError, Kind

WIRE_LABELS = {"dry_run": "dryRun", "before_lsn": "beforeLsn"}


def refused(parse: Any, *args: Any) -> str:
    with pytest.raises(BranchError) as caught:
        parse(*args)
    assert caught.value.kind is Kind.INVALID
    return str(caught.value)


def wire(command: str, fields: dict[str, Any], name_field: bool = False) -> rq.Fields:
    labels = {**WIRE_LABELS, "name": command} if name_field else WIRE_LABELS
    return rq.Fields(fields, command=command, labels=labels)


# -- create ------------------------------------------------------------------------------------
def test_create_defaults() -> None:
    req = rq.parse_create({"name": "feature-1"})
    assert req == rq.CreateBranch("feature-1", "main", None, None, None, {})


def test_create_takes_every_field() -> None:
    req = rq.parse_create({"name": "f.2", "from": "parent", "port": 27150, "mode": "copy",
                           "at": "2026-01-01T00:00:00Z", "idle_ttl": "1h", "protected": True})
    assert (req.name, req.parent, req.port, req.mode, req.at) == \
        ("f.2", "parent", 27150, "copy", "2026-01-01T00:00:00Z")
    assert req.lifecycle == {"idle_ttl": 3600, "protected": True}


@pytest.mark.parametrize("name", ["a", "A-b_c.d", "x" * 64, "0"])
def test_create_accepts_names(name: str) -> None:
    assert rq.parse_create({"name": name}).name == name


@pytest.mark.parametrize("name", ["main", "a b", "x" * 65, "", 42, None, "a/b", True])
def test_create_refuses_names(name: Any) -> None:
    assert refused(rq.parse_create, {"name": name}) == (
        f"branch name must match [A-Za-z0-9._-]{{1,64}} and not be 'main', got {name!r}")


@pytest.mark.parametrize(("port", "parsed"), [(1, 1), (65535, 65535), (27100.0, 27100),
                                               (None, None)])
def test_create_accepts_ports(port: Any, parsed: int | None) -> None:
    assert rq.parse_create({"name": "p", "port": port}).port == parsed


@pytest.mark.parametrize("port", [0, 65536, -1, "27100", True, 1.5, [1]])
def test_create_refuses_ports(port: Any) -> None:
    assert refused(rq.parse_create, {"name": "p", "port": port}) == \
        f"port must be an integer 1-65535, got {port!r}"


@pytest.mark.parametrize("mode", ["wal", "copy", None])
def test_create_accepts_modes(mode: str | None) -> None:
    assert rq.parse_create({"name": "m", "mode": mode}).mode == mode


@pytest.mark.parametrize("mode", ["fast", "", 1, "WAL"])
def test_create_refuses_modes(mode: Any) -> None:
    assert refused(rq.parse_create, {"name": "m", "mode": mode}) == \
        f"mode must be 'wal' or 'copy', got {mode!r}"


@pytest.mark.parametrize("parent", [5, None, ["main"]])
def test_create_refuses_parents(parent: Any) -> None:
    assert refused(rq.parse_create, {"name": "c", "from": parent}) == \
        f"from must be a branch name (a string), got {parent!r}"


@pytest.mark.parametrize(("at", "parsed"), [
    (0, 0), (17, 17), (17.0, 17), ("17", 17), (" 3 ", 3), ("2026-01-01T00:00:00Z",
                                                          "2026-01-01T00:00:00Z"),
    ("later", "later"),  # a time, resolved (and refused) by the engine
    (None, None),
])
def test_points(at: Any, parsed: Any) -> None:
    assert rq.parse_create({"name": "c", "at": at}).at == parsed


@pytest.mark.parametrize(("at", "message"), [
    (True, "'at'/'to' must be an LSN or an ISO-8601 time, not True"),
    (1.5, "'at'/'to' must be an LSN or an ISO-8601 time, not 1.5"),
    ([1], "'at'/'to' must be an LSN or an ISO-8601 time, not [1]"),
    ({"lsn": 1}, "'at'/'to' must be an LSN or an ISO-8601 time, not {'lsn': 1}"),
    (-1, "LSN must not be negative, got -1"),
    ("-4", "LSN must not be negative, got -4"),
])
def test_refused_points(at: Any, message: str) -> None:
    assert refused(rq.parse_create, {"name": "c", "at": at}) == message


def test_create_refuses_unknown_fields() -> None:
    assert refused(rq.parse_create, {"name": "c", "colour": "red", "b": 1}) == \
        "unknown field(s): b, colour"


def test_create_lifecycle_is_checked_before_anything_else() -> None:
    assert refused(rq.parse_create, {"name": "main", "ttl": "soon"}).startswith(
        "ttl must be a duration such as 30m")
    assert refused(rq.parse_create, {"name": "c", "ttl": "1h", "expires_at": None}) == \
        "give either ttl or expires_at, not both"


def test_create_expiry() -> None:
    before = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    expires = rq.parse_create({"name": "c", "ttl": "2h"}).lifecycle["expires_at"]
    assert before + dt.timedelta(hours=2) - dt.timedelta(seconds=1) <= expires
    assert expires <= dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(hours=2)
    assert rq.parse_create({"name": "c", "expires_at": "2999-01-01T00:00:00+01:00"}) \
        .lifecycle["expires_at"] == dt.datetime(2998, 12, 31, 23)
    assert "is in the past" in refused(rq.parse_create,
                                       {"name": "c", "expires_at": "2000-01-01T00:00:00Z"})


def test_create_over_the_wire() -> None:
    req = rq.parse_create(wire("createBranch", {"createBranch": "w", "from": "p", "at": 4.0},
                               name_field=True))
    assert (req.name, req.parent, req.at) == ("w", "p", 4)
    assert refused(rq.parse_create, wire("createBranch", {"createBranch": "w", "form": "m"},
                                         name_field=True)) == \
        "createBranch: unknown field(s): form"
    # The wire names the branch in the command itself: a `name` field is not one of its.
    assert refused(rq.parse_create, wire("createBranch", {"createBranch": "w", "name": "v"},
                                         name_field=True)) == \
        "createBranch: unknown field(s): name"


# -- flags: drop, refresh, list ----------------------------------------------------------------
@pytest.mark.parametrize(("value", "parsed"), [
    (True, True), (False, False), (None, False), ("true", True), ("TRUE", True), ("1", True),
    ("false", False), ("0", False),
])
def test_flags(value: Any, parsed: bool) -> None:
    assert rq.parse_drop("b", {"force": value, "purge": value}) == rq.DropBranch("b", parsed,
                                                                                 parsed)
    assert rq.parse_refresh("b", {"force": value}).force is parsed
    assert rq.parse_list({"deleted": value}).deleted is parsed


@pytest.mark.parametrize("value", ["maybe", "yes", 1, 0, [], "2"])
def test_refused_flags(value: Any) -> None:
    assert refused(rq.parse_drop, "b", {"force": value}) == \
        f"force must be true or false, got {value!r}"
    assert refused(rq.parse_drop, "b", {"purge": value}) == \
        f"purge must be true or false, got {value!r}"
    assert refused(rq.parse_list, {"deleted": value}) == \
        f"deleted must be true or false, got {value!r}"


def test_drop_refresh_restore_refuse_unknown_fields() -> None:
    assert refused(rq.parse_drop, "b", {"hard": True}) == "unknown field(s): hard"
    assert refused(rq.parse_refresh, "b", {"port": 1}) == "unknown field(s): port"
    assert refused(rq.parse_restore, "b", {"force": True}) == "unknown field(s): force"
    assert refused(rq.parse_drop, "b", wire("dropBranch", {"hard": 1})) == \
        "dropBranch: unknown field(s): hard"


def test_restore() -> None:
    assert rq.parse_restore("b", {}) == rq.RestoreBranch("b", None)
    assert rq.parse_restore("b", {"port": 27111}) == rq.RestoreBranch("b", 27111)
    assert refused(rq.parse_restore, "b", {"port": "27111"}) == \
        "port must be an integer 1-65535, got '27111'"


# -- lifecycle changes and the reaper ----------------------------------------------------------
@pytest.mark.parametrize(("body", "changes"), [
    ({}, {}),
    ({"ttl": None}, {"expires_at": None}),
    ({"expires_at": None}, {"expires_at": None}),
    ({"idle_ttl": "1h30m"}, {"idle_ttl": 5400}),
    ({"idle_ttl": 90}, {"idle_ttl": 90}),
    ({"idle_ttl": None}, {"idle_ttl": None}),
    ({"protected": False}, {"protected": False}),
])
def test_update(body: dict[str, Any], changes: dict[str, Any]) -> None:
    assert rq.parse_update("b", body) == rq.UpdateLifecycle("b", changes)


@pytest.mark.parametrize(("body", "message"), [
    ({"ttl": "2 hours"}, "ttl must be a duration such as 30m, 2h, 7d or 1h30m (in JSON also "
                         "seconds as an integer), got '2 hours'"),
    ({"ttl": "-1h"}, "ttl must be a duration"),
    ({"ttl": ""}, "ttl must be a duration"),
    ({"ttl": 1.5}, "ttl must be a duration"),
    ({"ttl": True}, "ttl must be a duration"),
    ({"ttl": 0}, "ttl must be a duration"),
    ({"ttl": "0s"}, "ttl must be longer than zero, got '0s'"),
    ({"idle_ttl": "soon"}, "idle_ttl must be a duration"),
    ({"expires_at": "tomorrow"}, "expires_at must be an ISO-8601 time such as "
                                 "2026-12-01T09:00:00Z, got 'tomorrow'"),
    ({"expires_at": 5}, "expires_at must be an ISO-8601 time"),
    ({"protected": "yes"}, "protected must be true or false, got 'yes'"),
    ({"colour": 1}, "unknown field(s): colour; a branch's lifecycle takes expires_at, "
                    "idle_ttl, protected, ttl"),
])
def test_refused_updates(body: dict[str, Any], message: str) -> None:
    assert refused(rq.parse_update, "b", body).startswith(message)


def test_main_takes_only_protection() -> None:
    assert rq.parse_update("main", {"protected": True}).changes == {"protected": True}
    assert refused(rq.parse_update, "main", {"ttl": "1h"}) == \
        "main never expires: it takes only 'protected'"


def test_reap() -> None:
    assert rq.parse_reap({}) == rq.Reap(None, False)
    assert rq.parse_reap({"now": "2030-01-01T10:00:00+02:00", "dry_run": True}) == \
        rq.Reap(dt.datetime(2030, 1, 1, 8), True)
    assert refused(rq.parse_reap, {"now": "later"}).startswith("now must be an ISO-8601 time")
    assert refused(rq.parse_reap, {"dry_run": "no"}) == "dry_run must be true or false"
    assert refused(rq.parse_reap, {"dry_run": None}) == "dry_run must be true or false"
    assert refused(rq.parse_reap, {"then": 1}) == "unknown field(s): then"


# -- history -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("query", "parsed"), [
    ({}, (100, None)),
    ({"limit": "1", "before_lsn": "7"}, (1, 7)),
    ({"limit": "10000"}, (10_000, None)),
    ({"limit": 5, "before_lsn": 0}, (5, 0)),
])
def test_log(query: dict[str, Any], parsed: tuple[int, int | None]) -> None:
    assert rq.parse_log("b", query) == rq.Log("b", *parsed)


@pytest.mark.parametrize(("query", "message"), [
    ({"limit": "0"}, "limit must be 1-10000, got 0"),
    ({"limit": "-1"}, "limit must be 1-10000, got -1"),
    ({"limit": "10001"}, "limit must be 1-10000, got 10001"),
    ({"limit": "ten"}, "limit must be an integer, got 'ten'"),
    ({"before_lsn": "x"}, "before_lsn must be an integer, got 'x'"),
    ({"limit": True}, "limit must be an integer, got True"),
])
def test_refused_logs(query: dict[str, Any], message: str) -> None:
    assert refused(rq.parse_log, "b", query) == message


def test_log_over_the_wire() -> None:
    assert rq.parse_log("b", wire("branchLog", {"limit": 5.0, "beforeLsn": 9})) == \
        rq.Log("b", 5, 9)
    # BSON has numbers: a string is not one, whatever it holds.
    assert refused(rq.parse_log, "b", wire("branchLog", {"limit": "5"})) == \
        "branchLog: limit must be an integer, got '5'"
    assert refused(rq.parse_log, "b", wire("branchLog", {"beforeLsn": True})) == \
        "branchLog: beforeLsn must be an integer, got True"
    assert refused(rq.parse_log, "b", wire("branchLog", {"before_lsn": 3})) == \
        "branchLog: unknown field(s): before_lsn"
    assert refused(rq.parse_log, "b", wire("branchLog", {"limit": 0})) == \
        "limit must be 1-10000, got 0"


def test_diff() -> None:
    assert rq.parse_diff("b", {}) == rq.Diff("b")
    assert refused(rq.parse_diff, "b", wire("branchDiff", {"limit": 3})) == \
        "branchDiff: unknown field(s): limit"


def test_merge() -> None:
    assert rq.parse_merge("b", {}) == rq.MergeBranch("b", None, "abort", False, False)
    assert rq.parse_merge("b", {"into": "main", "strategy": "theirs", "dry_run": True,
                                "force": "true"}) == \
        rq.MergeBranch("b", "main", "theirs", True, True)
    assert rq.parse_merge("b", wire("mergeBranch", {"dryRun": True, "strategy": "ours"})) == \
        rq.MergeBranch("b", None, "ours", True, False)
    # Checked against the branch's parent by the merge, which names the parent.
    assert rq.parse_merge("b", {"into": 5}).into == 5


@pytest.mark.parametrize(("body", "message"), [
    ({"strategy": "mine"}, "strategy must be one of abort, ours, theirs"),
    ({"strategy": None}, "strategy must be one of abort, ours, theirs"),
    ({"dry_run": "yes"}, "dry_run must be true or false"),
    ({"dry_run": None}, "dry_run must be true or false"),
    ({"force": "maybe"}, "force must be true or false, got 'maybe'"),
    ({"push": True}, "unknown field(s): push"),
    ({"dryRun": True, "x": 1}, "unknown field(s): dryRun, x"),
])
def test_refused_merges(body: dict[str, Any], message: str) -> None:
    assert refused(rq.parse_merge, "b", body) == message


def test_merge_over_the_wire_spells_dry_run_its_way() -> None:
    assert refused(rq.parse_merge, "b", wire("mergeBranch", {"dry_run": True})) == \
        "mergeBranch: unknown field(s): dry_run"
    assert refused(rq.parse_merge, "b", wire("mergeBranch", {"dryRun": "yes"})) == \
        "dry_run must be true or false"


def test_reset() -> None:
    assert rq.parse_reset("b", {"to": "0"}) == rq.ResetBranch("b", 0, False)
    assert rq.parse_reset("b", {"to": "2026-01-01", "force": True}) == \
        rq.ResetBranch("b", "2026-01-01", True)
    assert refused(rq.parse_reset, "b", {}) == "reset needs 'to': an LSN or an ISO-8601 time"
    assert refused(rq.parse_reset, "b", wire("resetBranch", {})) == \
        "resetBranch needs 'to': an LSN or an ISO-8601 time"
    assert refused(rq.parse_reset, "b", {"to": None}) == \
        "'at'/'to' must be an LSN or an ISO-8601 time, not None"
    assert refused(rq.parse_reset, "b", {"to": 0, "hard": True}) == "unknown field(s): hard"
    assert refused(rq.parse_reset, "b", wire("resetBranch", {"to": 0, "hard": 1})) == \
        "resetBranch: unknown field(s): hard"


# -- modes and retention -----------------------------------------------------------------------
def test_migrate() -> None:
    assert rq.parse_migrate("b", {"to": "copy"}) == rq.Migrate("b", "copy")
    assert refused(rq.parse_migrate, "b", {}) == 'migrate needs \'to\': "wal" or "copy"'
    assert refused(rq.parse_migrate, "b", {"to": "disk"}) == \
        "'to' must be one of wal, copy, got 'disk'"
    assert refused(rq.parse_migrate, "b", {"to": "wal", "now": 1}) == "unknown field(s): now"


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("15m", 900), (" 12h ", 43200),
                                               ("7d", 604800), ("2w", 1209600), ("0s", 0)])
def test_gc(text: str, seconds: int) -> None:
    assert rq.parse_gc({"retention": text}) == rq.Gc(dt.timedelta(seconds=seconds))


@pytest.mark.parametrize("text", ["7", "1h30m", "d", "", None, 7, "7y"])
def test_refused_retention(text: Any) -> None:
    assert refused(rq.parse_gc, {"retention": text}) == \
        f"retention must look like 30s, 15m, 12h, 7d or 2w, not {text!r}"


def test_gc_needs_retention() -> None:
    assert refused(rq.parse_gc, {}) == 'gc needs \'retention\', e.g. "7d"'
    assert refused(rq.parse_gc, {"retention": "7d", "dry_run": True}) == \
        "unknown field(s): dry_run"


# -- the CLI offers what the API takes ---------------------------------------------------------
def _choices(command: click.Command, option: str) -> tuple[str, ...]:
    param = next(p for p in command.params if p.name == option)
    assert isinstance(param.type, click.Choice)
    return tuple(param.type.choices)


def test_cli_choices_are_the_requests_values() -> None:
    """The CLI lists its choices for --help without importing the server side; they must
    be the values the API takes."""
    assert _choices(cli.branch_create, "mode") == rq.MODES
    assert _choices(cli.branch_migrate, "to") == rq.MODES
    assert _choices(cli.branch_merge, "strategy") == rq.STRATEGIES
    assert _choices(cli.serve_cmd, "default_mode") == rq.MODES


def test_cli_ports_are_the_requests_ports() -> None:
    """--port is refused by click before any call (a usage error naming the option)."""
    for command in (cli.branch_create, cli.branch_restore):
        param = next(p for p in command.params if p.name == "port")
        assert isinstance(param.type, click.IntRange)
        assert (param.type.min, param.type.max) == rq.PORTS
