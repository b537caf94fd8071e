"""What every command handler receives, and the helpers they share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bson.int64 import Int64

from proxy.branching.engine import Engine
from proxy.branching.errors import CommandError, not_supported
from proxy.branching.model import Branch, NsState
from proxy.branching.overlay import Stmts
from proxy.branching.runner import Runner
from proxy.branching.stages import documents_stage as documents_stage  # for the handlers
from proxy.net.router import Context
from proxy.wire.codes import Code

# Fields that describe the client's session and transport, not the operation.
SESSION_FIELDS = ("lsid", "txnNumber", "autocommit", "startTransaction", "$clusterTime",
                  "$readPreference", "readConcern", "writeConcern", "$db", "apiVersion",
                  "apiStrict", "apiDeprecationErrors", "comment", "maxTimeMS")


@dataclass
class Request:
    engine: Engine
    branch: Branch | None
    ctx: Context
    run: Runner
    db: str
    cmd: dict[str, Any]
    # A write that runs ops of a client bulkWrite (commands/bulkwrite.py): their identity.
    stmts: Stmts | None = None

    @property
    def name(self) -> str:
        return next(iter(self.cmd))

    @property
    def on_branch(self) -> Branch:
        assert self.branch is not None
        return self.branch

    @property
    def options(self) -> dict[str, Any]:
        """The command's own fields: neither its name nor the session's (what a handler
        passes on to the upstream's command on another collection)."""
        return {k: v for k, v in self.cmd.items() if k != self.name and k not in SESSION_FIELDS}

    def layers(self, coll: str) -> list[NsState]:
        return self.engine.layers(self.on_branch, self.db, coll)

    def client(self) -> dict[str, Any]:
        return {"app": self.ctx.app_name, "user": self.ctx.user, "conn": self.ctx.connection_id}

    def unsupported(self, what: str) -> CommandError:
        return not_supported(what, self.on_branch.name)

    def reject_transactions(self) -> None:
        """For what a transaction on a branch cannot hold (docs/ARCHITECTURE.md,
        "Transactions"): the router refuses most of it by command name."""
        if self.cmd.get("autocommit") is False or self.cmd.get("startTransaction"):
            raise CommandError(Code.OPERATION_NOT_SUPPORTED_IN_TRANSACTION,
                               f"{self.name} with $out, $merge or $changeStream cannot run in a "
                               f"multi-document transaction on branch {self.on_branch.name!r}"
                               if self.name == "aggregate" else
                               f"{self.name} cannot run in a multi-document transaction on "
                               f"branch {self.on_branch.name!r}")


def carry(src: dict[str, Any], dst: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    for key in fields:
        if key in src:
            dst[key] = src[key]
    return dst


def coll_name(req: Request) -> str:
    value = req.cmd[req.name]
    if not isinstance(value, str) or not value:
        raise CommandError(Code.INVALID_NAMESPACE,
                           f"collection name must be a non-empty string, not {value!r}")
    return value


def cursor_reply(ns: str, batch: list[dict[str, Any]], cursor_id: int = 0,
                 batch_key: str = "firstBatch") -> dict[str, Any]:
    """A cursor reply the proxy builds itself, in mongod's shape: the id is always a BSON
    int64 (0 included), which the Node, Go and Java drivers insist on; a Python int
    that fits 32 bits would be encoded as int32."""
    return {"cursor": {batch_key: batch, "id": Int64(cursor_id), "ns": ns}, "ok": 1.0}


# Appended by the server after a reply's own fields and its ok.
GOSSIP = ("$clusterTime", "operationTime")


def in_mongod_order(reply: dict[str, Any], gossip: dict[str, Any]) -> dict[str, Any]:
    """A reply as mongod or mongos sends it: a successful one has its own fields, then
    ok (which the command framework appends after them); an error one starts with ok.
    Then the cluster-time gossip: the latest the connection saw (a reply of the
    upstream's own carries the same or an older pair), so that drivers' causal
    consistency and cluster-time tracking work on replies the proxy built."""
    own = {key: reply.pop(key) for key in GOSSIP if key in reply}
    if reply.get("ok"):
        reply["ok"] = reply.pop("ok")
    reply.update(gossip or own)
    return reply


# A command family's handler: None lets the command through to the upstream unchanged.
Handler = Callable[[Request], Awaitable[dict[str, Any] | None]]
