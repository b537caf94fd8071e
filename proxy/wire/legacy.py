"""OP_QUERY (the legacy handshake on admin.$cmd) and OP_REPLY."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from proxy.wire.bsonutil import decode, doc_length, encode
from proxy.wire.errors import ProtocolError
from proxy.wire.framing import OP_REPLY, Frame

_QUERY_HEAD = struct.Struct("<i")
_SKIP_RETURN = struct.Struct("<ii")
_REPLY_HEAD = struct.Struct("<iqii")

# OP_REPLY responseFlags.
CURSOR_NOT_FOUND = 1 << 0
QUERY_FAILURE = 1 << 1


@dataclass(slots=True)
class OpQuery:
    flags: int
    collection: str
    skip: int
    limit: int
    query: dict[str, Any]

    @property
    def database(self) -> str:
        return self.collection.split(".", 1)[0]


def parse_query(frame: Frame) -> OpQuery:
    data = frame.payload
    if len(data) < 4 + 1 + 8 + 5:
        raise ProtocolError("OP_QUERY too short")
    (flags,) = _QUERY_HEAD.unpack_from(data, 0)
    end = data.find(b"\x00", 4)
    if end < 0:
        raise ProtocolError("OP_QUERY collection name is not terminated")
    collection = data[4:end].decode("utf-8", "replace")
    pos = end + 1
    if pos + 8 > len(data):
        raise ProtocolError("OP_QUERY truncated before numberToSkip")
    skip, limit = _SKIP_RETURN.unpack_from(data, pos)
    pos += 8
    length = doc_length(data, pos)
    query = decode(data[pos : pos + length])
    return OpQuery(flags, collection, skip, limit, query)


def command_body(query: OpQuery) -> dict[str, Any] | None:
    """The OP_MSG body of a legacy command (a query on `<db>.$cmd`), or None for any
    other query: the command document, unwrapped from `$query` with its
    `$readPreference` kept, and `$db` naming the database, as OP_MSG says it."""
    if not query.collection.endswith(".$cmd"):
        return None
    wrapped = query.query
    inner = wrapped.get("$query")
    body = dict(inner) if isinstance(inner, dict) else dict(wrapped)
    if isinstance(inner, dict) and "$readPreference" in wrapped:
        body["$readPreference"] = wrapped["$readPreference"]
    body.pop("$db", None)
    body["$db"] = query.database
    return body


def build_reply(doc: dict[str, Any], *, request_id: int, response_to: int,
                flags: int = 0) -> Frame:
    payload = _REPLY_HEAD.pack(flags, 0, 0, 1) + encode(doc)
    return Frame(request_id, response_to, OP_REPLY, payload)
