"""Errors of the wire layer: frames the proxy cannot accept, and mongod's error replies."""

from __future__ import annotations

from typing import Any


class ProtocolError(Exception):
    """A frame the proxy cannot accept; the connection that sent it is closed."""


class CommandError(Exception):
    """A command failure reported to the client as mongod would: ok 0 with a code."""

    def __init__(self, code: int, code_name: str, message: str, **extra: Any):
        super().__init__(message)
        self.code = code
        self.code_name = code_name
        self.extra = extra

    def to_reply(self) -> dict[str, Any]:
        return {
            "ok": 0.0, "errmsg": str(self), "code": self.code, "codeName": self.code_name,
            **self.extra,
        }
