"""The proxy answers hello itself, as a mongos, so drivers stay on its address."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from bson import ObjectId

from proxy.wire import compression

HELLO_NAMES = frozenset({"hello", "isMaster", "ismaster"})

# Fields a driver may send in hello that only the upstream can answer.
UPSTREAM_FIELDS = ("saslSupportedMechs", "speculativeAuthenticate")


@dataclass
class UpstreamInfo:
    """Limits and versions learnt from the upstream's own hello."""

    max_bson_object_size: int = 16 * 1024 * 1024
    max_message_size_bytes: int = 48_000_000
    max_write_batch_size: int = 100_000
    min_wire_version: int = 0
    max_wire_version: int = 21
    logical_session_timeout_minutes: int | None = 30
    known: bool = False

    @classmethod
    def from_hello(cls, reply: dict[str, Any]) -> UpstreamInfo:
        return cls(
            max_bson_object_size=int(reply.get("maxBsonObjectSize", 16 * 1024 * 1024)),
            max_message_size_bytes=int(reply.get("maxMessageSizeBytes", 48_000_000)),
            max_write_batch_size=int(reply.get("maxWriteBatchSize", 100_000)),
            min_wire_version=int(reply.get("minWireVersion", 0)),
            max_wire_version=int(reply.get("maxWireVersion", 21)),
            logical_session_timeout_minutes=reply.get("logicalSessionTimeoutMinutes"),
            known=True,
        )


@dataclass
class Topology:
    """What every hello reply shares; the process id changes once per proxy start."""

    info: UpstreamInfo = field(default_factory=UpstreamInfo)
    process_id: ObjectId = field(default_factory=ObjectId)
    counter: int = 0

    @property
    def topology_version(self) -> dict[str, Any]:
        return {"processId": self.process_id, "counter": self.counter}


def is_streaming(request: dict[str, Any]) -> bool:
    return "topologyVersion" in request and "maxAwaitTimeMS" in request


def upstream_hello(request: dict[str, Any]) -> dict[str, Any]:
    """The part of a client's hello worth sending to the upstream as its first hello."""
    out: dict[str, Any] = {"hello": 1}
    for key in ("client", *UPSTREAM_FIELDS):
        if key in request:
            out[key] = request[key]
    return out


def build_reply(
    request: dict[str, Any],
    topology: Topology,
    connection_id: int,
    *,
    upstream_reply: dict[str, Any] | None = None,
    negotiated: list[str] | None = None,
) -> dict[str, Any]:
    info = topology.info
    name = next(iter(request), "hello")
    reply: dict[str, Any] = {}
    if name == "hello":
        reply["isWritablePrimary"] = True
    else:
        reply["ismaster"] = True
    reply.update(
        msg="isdbgrid",
        topologyVersion=topology.topology_version,
        maxBsonObjectSize=info.max_bson_object_size,
        maxMessageSizeBytes=info.max_message_size_bytes,
        maxWriteBatchSize=info.max_write_batch_size,
        localTime=dt.datetime.now(dt.UTC).replace(tzinfo=None),
        connectionId=connection_id,
        minWireVersion=info.min_wire_version,
        maxWireVersion=info.max_wire_version,
        readOnly=False,
    )
    if info.logical_session_timeout_minutes is not None:
        reply["logicalSessionTimeoutMinutes"] = info.logical_session_timeout_minutes
    if request.get("helloOk"):
        reply["helloOk"] = True
    if negotiated is not None:
        reply["compression"] = negotiated
    if upstream_reply:
        for key in UPSTREAM_FIELDS:
            if key in upstream_reply:
                reply[key] = upstream_reply[key]
    reply["ok"] = 1.0
    return reply


def negotiate_compression(request: dict[str, Any]) -> list[str] | None:
    offers = request.get("compression")
    if not isinstance(offers, list):
        return None
    return compression.negotiate([str(x) for x in offers])
