"""The `failCommand` failpoints set through this proxy: which client commands a branch
asks the upstream about before it handles them (`commands/failpoints.py`)."""

from __future__ import annotations

from typing import Any

# The client commands a branch answers with other commands than their own name.
PROBED = frozenset({"insert", "update", "delete", "findAndModify", "findandmodify",
                    "bulkWrite", "count", "distinct"})
ALIASES = {"findandmodify": "findAndModify"}


class FailPoints:
    """What `failCommand` failpoints set through this proxy name: kept from the
    `configureFailPoint` commands the upstream accepted, until one turns it off (the
    upstream keeps one `failCommand` at a time; one that has fired its `times` is
    still kept here, and the probes it costs then answer nothing)."""

    def __init__(self) -> None:
        # None: no failCommand; an empty set: every command.
        self.names: frozenset[str] | None = None
        self.seeded = False

    def note(self, cmd: dict[str, Any]) -> None:
        if cmd.get("configureFailPoint") != "failCommand":
            return
        mode = cmd.get("mode")
        data = cmd.get("data")
        if mode == "off" or (isinstance(mode, dict) and "times" in mode
                             and not mode.get("times") and not mode.get("skip")):
            self.names = None
            return
        names = data.get("failCommands") if isinstance(data, dict) else None
        self.names = frozenset(ALIASES.get(n, n) for n in names if isinstance(n, str)) \
            if isinstance(names, list) else frozenset()

    def armed(self, name: str) -> bool:
        if self.names is None or name not in PROBED:
            return False
        return not self.names or ALIASES.get(name, name) in self.names
