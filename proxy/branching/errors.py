"""Errors the engine raises; the wire layer turns them into command replies."""

from __future__ import annotations

import enum

from proxy.wire import codes
from proxy.wire.codes import Code
from proxy.wire.errors import CommandError

__all__ = ["BranchError", "CommandError", "Kind", "code_name", "not_supported"]

# The codes a write the engine runs on an overlay may fail with.
_WRITE_CODES = frozenset({
    Code.BAD_VALUE, Code.FAILED_TO_PARSE, Code.TYPE_MISMATCH, Code.PATH_NOT_VIABLE,
    Code.CONFLICTING_UPDATE_OPERATORS, Code.DOLLAR_PREFIXED_FIELD_NAME, Code.DOTTED_FIELD_NAME,
    Code.EMPTY_FIELD_NAME, Code.IMMUTABLE_FIELD, Code.DOCUMENT_VALIDATION_FAILURE,
    Code.DUPLICATE_KEY,
})


def code_name(code: int) -> str:
    """mongod's name for the code of an overlay write error that came without one:
    numbered assertions without a name are "Location<code>"."""
    return codes.code_name(code) if code in _WRITE_CODES else f"Location{code}"


class Kind(enum.Enum):
    """What kind of failure a branch operation met. The engine says which; each front
    door maps it once: to an HTTP status (`admin/branches.py`) and to a mongod code
    (`commands/admin.py`)."""

    INVALID = "invalid"            # the request itself is wrong
    FORBIDDEN = "forbidden"        # the configuration does not allow it
    NOT_FOUND = "not found"        # no such branch (or point, or copy under way)
    CONFLICT = "conflict"          # the branches' present state does not allow it
    UPSTREAM = "upstream"          # the upstream refused a step the operation needs
    UNAVAILABLE = "unavailable"    # the engine cannot reach its metadata now
    INTERNAL = "internal"          # a step failed that should not have


class BranchError(Exception):
    """A branch management failure, of a kind both front doors understand."""

    def __init__(self, kind: Kind, message: str):
        super().__init__(message)
        self.kind = kind


def not_supported(what: str, branch: str) -> CommandError:
    return CommandError(
        Code.COMMAND_NOT_SUPPORTED,
        f"{what} is not supported on branch {branch!r} yet (mongobranch); "
        "run it on the main port or on a copy",
    )
