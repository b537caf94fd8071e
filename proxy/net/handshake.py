"""The proxy answers hello itself, as a mongos, so drivers stay on its address."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from bson import Int64, ObjectId

from proxy.wire import compression

HELLO_NAMES = frozenset({"hello", "isMaster", "ismaster"})

# Commands by which a client authenticates itself.
CLIENT_AUTH = frozenset({"saslStart", "authenticate"})

# Commands after which the connection's authenticated user may have changed.
IDENTITY_CHANGES = CLIENT_AUTH | {"saslContinue", "logout"}

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
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    @property
    def topology_version(self) -> dict[str, Any]:
        # int64 on the wire, as mongod sends it: some drivers (Go) refuse an int32 counter.
        return {"processId": self.process_id, "counter": Int64(self.counter)}

    def bump(self) -> None:
        """The topology changed: wake every streaming hello waiting on the old version."""
        self.counter += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def is_current(self, version: dict[str, Any]) -> bool:
        """Whether a client's topologyVersion is this one (the only case a hello waits)."""
        return version.get("processId") == self.process_id and version.get("counter") == \
            self.counter

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def learn(self, hello: dict[str, Any]) -> None:
        """The upstream's own hello (upstream/monitor.py): new limits or versions are a
        topology change, which wakes the streaming hellos."""
        info = UpstreamInfo.from_hello(hello)
        if self.info.known and info != self.info:
            self.bump()
        self.info = info


def is_streaming(request: dict[str, Any]) -> bool:
    return request.get("topologyVersion") is not None and \
        request.get("maxAwaitTimeMS") is not None


def _error(code: int, code_name: str, message: str) -> dict[str, Any]:
    return {"ok": 0.0, "errmsg": message, "code": code, "codeName": code_name}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def awaitable_problem(request: dict[str, Any], topology: Topology) -> dict[str, Any] | None:
    """mongod's checks of the awaitable-hello arguments; the error reply, or None."""
    version = request.get("topologyVersion")
    max_await = request.get("maxAwaitTimeMS")
    if version is not None:
        if not isinstance(version, dict):
            return _error(14, "TypeMismatch", "BSON field 'hello.topologyVersion' is the wrong "
                                              "type, expected type 'object'")
        counter = version.get("counter")
        if "counter" not in version or "processId" not in version:
            return _error(40414, "IDLFailedToParse", "BSON field 'hello.topologyVersion."
                          f"{'counter' if 'counter' not in version else 'processId'}' is "
                          "missing but a required field")
        if not isinstance(version["processId"], ObjectId):
            return _error(14, "TypeMismatch", "BSON field 'hello.topologyVersion.processId' is "
                                              "the wrong type, expected type 'objectId'")
        if not isinstance(counter, int) or isinstance(counter, bool):
            return _error(14, "TypeMismatch", "BSON field 'hello.topologyVersion.counter' is "
                                              "the wrong type, expected type 'long'")
    if max_await is not None:
        if not _is_number(max_await):
            return _error(14, "TypeMismatch", "BSON field 'hello.maxAwaitTimeMS' is the wrong "
                                              "type, expected types '[int, decimal, long, double]'")
        if max_await != max_await:  # NaN reads as 0
            max_await = 0
        if int(max_await) < 0:
            return _error(2, "BadValue", "BSON field 'maxAwaitTimeMS' value must be >= 0, "
                                         f"actual value '{int(max_await)}'")
    if version is None and max_await is not None:
        return _error(31368, "Location31368",
                      "A request with 'maxAwaitTimeMS' must include a 'topologyVersion'")
    if version is not None and max_await is None:
        return _error(31368, "Location31368",
                      "A request with a 'topologyVersion' must include 'maxAwaitTimeMS'")
    if version is not None:
        theirs = int(version["counter"])
        if theirs < 0:
            return _error(31372, "Location31372",
                          "topologyVersion must have a non-negative counter")
        if version["processId"] == topology.process_id and theirs > topology.counter:
            return _error(31382, "Location31382",
                          f"Received a topology version with counter: {theirs} which is "
                          f"greater than the server topology version counter: "
                          f"{topology.counter}")
    return None


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
        connectionId=Int64(connection_id),
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
