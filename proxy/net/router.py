"""The seam between the wire layer and whatever serves commands on a port."""

from __future__ import annotations

from typing import Any, Protocol

from proxy.wire.opmsg import OpMsg


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


class Context(Protocol):
    """What a router may ask of the client connection it serves."""

    connection_id: int
    app_name: str | None
    user: str | None

    async def upstream_command(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        """Run a command on this client's own upstream connection."""
        ...


class Router(Protocol):
    def wants(self, name: str) -> bool:
        """Whether a command of this name is served here rather than forwarded raw.

        The answer must depend on the name alone: a listener asks once per name and
        remembers the names it forwards raw, until the router's owner calls the
        listener's `reroute` for names whose answer changed.
        """
        ...

    async def handle(self, ctx: Context, msg: OpMsg) -> dict[str, Any] | None:
        """The reply body, or None to forward the original message unchanged."""
        ...


class ForwardAll:
    """The main port: nothing is served locally."""

    def wants(self, name: str) -> bool:
        return False

    async def handle(self, ctx: Context, msg: OpMsg) -> dict[str, Any] | None:
        return None
