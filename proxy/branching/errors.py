"""Errors the engine raises; the wire layer turns them into command replies."""

from __future__ import annotations

from proxy.wire.errors import CommandError

__all__ = ["BranchError", "CommandError", "code_name", "not_supported"]

# Names of the codes a write the engine runs on an overlay may fail with.
_CODE_NAMES = {
    2: "BadValue", 9: "FailedToParse", 14: "TypeMismatch", 28: "PathNotViable",
    40: "ConflictingUpdateOperators", 52: "DollarPrefixedFieldName", 55: "DottedFieldName",
    56: "EmptyFieldName", 66: "ImmutableField", 121: "DocumentValidationFailure",
    11000: "DuplicateKey",
}


def code_name(code: int) -> str:
    """mongod's name for an error code: numbered assertions without one are "Location<code>"."""
    return _CODE_NAMES.get(code, f"Location{code}")


class BranchError(Exception):
    """A branch management failure, with the HTTP status that describes it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def not_supported(what: str, branch: str) -> CommandError:
    return CommandError(
        115, "CommandNotSupported",
        f"{what} is not supported on branch {branch!r} yet (mongobranch); "
        "run it on the main port or on a copy",
    )
