"""Errors of the wire layer: frames the proxy cannot accept, and mongod's error replies."""

from __future__ import annotations

from typing import Any

from proxy.wire.codes import Code
from proxy.wire.codes import code_name as code_name_of


class ProtocolError(Exception):
    """A frame the proxy cannot accept; the connection that sent it is closed."""


class CommandError(Exception):
    """A command failure reported to the client as mongod would: ok 0 with a code. The
    proxy's own errors name a Code; an error relayed from the upstream keeps the number
    and codeName the upstream sent."""

    def __init__(self, code: Code | int, message: str, *, code_name: str | None = None,
                 **extra: Any):
        super().__init__(message)
        self.code = int(code)
        self.code_name = (code_name if code_name is not None
                          else code.code_name if isinstance(code, Code) else code_name_of(code))
        self.extra = extra

    def to_reply(self) -> dict[str, Any]:
        return {
            "ok": 0.0, "errmsg": str(self), "code": self.code, "codeName": self.code_name,
            **self.extra,
        }
