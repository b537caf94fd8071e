"""Errors the engine raises; the wire layer turns them into command replies."""

from __future__ import annotations

from proxy.wire.errors import CommandError

__all__ = ["BranchError", "CommandError", "not_supported"]


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
