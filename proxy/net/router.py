"""The seam between the wire layer and whatever serves commands on a port."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.wire.opmsg import OpMsg


@dataclass
class Continued:
    """A reply that more replies follow, for a request that allowed an exhaust stream
    (OP_MSG exhaustAllowed): the connection sends `reply` flagged moreToCome, then awaits
    `next` for the following one (the last is a plain reply body; None, which would
    forward the request again, ends the stream with an error). What the stream
    carries is the router's to decide; how it goes out is the connection's."""

    reply: dict[str, Any]
    next: Callable[[], Awaitable[dict[str, Any] | Continued | Passed | None]]


@dataclass(slots=True)
class Passed:
    """A successful upstream reply passed on as the upstream sent it (its body section's
    BSON, in mongod's field order with its own cluster time): what a router would
    otherwise decode only to encode it again unchanged."""

    body: bytes


@dataclass(slots=True)
class Inline:
    """A routed request answered without a task (`Router.inline`): the connection writes
    it to the upstream as the client sent it, the commands of `after` right behind it in
    the same write, and once every reply is in calls `check` with the body of the
    request's reply and those of `after`. True: that reply goes to the client as the
    upstream sent it. False: it is dropped and `handle` serves the request as usual.
    `check` is called exactly once; with None (and no bodies) when the exchange did
    not complete (the client or the upstream went away), so that what the router took
    for the request is given back."""

    after: tuple[tuple[str, dict[str, Any]], ...]
    check: Callable[[bytes | None, list[bytes]], bool]


class Context(Protocol):
    """What a router may ask of the client connection it serves."""

    connection_id: int
    app_name: str | None
    user: str | None
    peer: str
    # Whether the client authenticated itself.
    client_authenticated: bool

    @property
    def as_uri_user(self) -> bool:
        """Whether it runs as the --upstream URI's user: anonymous, and lent that user."""
        ...

    async def upstream_command(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        """Run a command on this client's own upstream connection."""
        ...

    async def upstream_commands(self, *requests: tuple[str, dict[str, Any]]
                                ) -> list[dict[str, Any]]:
        """Run commands pipelined on this client's own upstream connection, in order."""
        ...

    async def upstream_raw(self, *requests: tuple[str, dict[str, Any]]) -> list[bytes]:
        """As upstream_commands, the replies' body sections left undecoded."""
        ...

    @property
    def gossip(self) -> dict[str, Any]:
        """The `$clusterTime` and `operationTime` of the latest upstream reply this
        connection decoded (else of any connection's): what a reply built here carries,
        as mongos attaches them to every reply. Empty when the upstream sends none."""
        ...

    async def authenticated_user(self) -> str | None:
        """Who the upstream says the client is ("user@db"); also sets `user`."""
        ...


class Router(Protocol):
    def wants(self, name: str) -> bool:
        """Whether a command of this name is served here rather than forwarded raw.

        The answer must depend on the name alone: a listener asks once per name and
        remembers the names it forwards raw, until the router's owner calls the
        listener's `reroute` for names whose answer changed.
        """
        ...

    def inline(self, ctx: Context, name: str, body: bytes) -> Inline | None:
        """For a plain request (its command document `body`, well-formed, no flags) of a
        name this router wants: how to answer it inline, or None to `handle` it. Called
        synchronously, from the connection's data callback, with the upstream connected;
        whatever the answer, the request's reply is the one `handle` would give."""
        ...

    async def handle(self, ctx: Context, msg: OpMsg
                     ) -> dict[str, Any] | Continued | Passed | None:
        """The reply body (a `Continued` one only when the request allowed an exhaust
        stream; a `Passed` one as the upstream sent it), or None to forward the original
        message unchanged."""
        ...
