"""Message framing: the 16-byte header and length checks."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from proxy.wire.errors import ProtocolError

HEADER = struct.Struct("<iiii")
HEADER_SIZE = HEADER.size

OP_REPLY = 1
OP_UPDATE = 2001
OP_INSERT = 2002
OP_QUERY = 2004
OP_GET_MORE = 2005
OP_DELETE = 2006
OP_KILL_CURSORS = 2007
OP_COMPRESSED = 2012
OP_MSG = 2013

KNOWN_OPCODES = {OP_REPLY, OP_QUERY, OP_COMPRESSED, OP_MSG}

DEFAULT_MAX_MESSAGE_SIZE = 48_000_000


@dataclass(slots=True)
class Frame:
    """One wire message: the header fields and the raw bytes after the header."""

    request_id: int
    response_to: int
    op_code: int
    payload: bytes

    def to_bytes(self) -> bytes:
        return (
            HEADER.pack(HEADER_SIZE + len(self.payload), self.request_id, self.response_to,
                        self.op_code)
            + self.payload
        )


def check_length(length: int, max_size: int) -> None:
    if length < HEADER_SIZE:
        raise ProtocolError(f"message length {length} is shorter than the 16-byte header")
    if length > max_size:
        raise ProtocolError(f"message length {length} exceeds maxMessageSizeBytes {max_size}")


async def read_frame(
    reader: asyncio.StreamReader, max_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> Frame | None:
    """Read one frame; None on a clean EOF between messages."""
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError("connection closed inside a message header") from exc
    length, request_id, response_to, op_code = HEADER.unpack(header)
    check_length(length, max_size)
    try:
        payload = await reader.readexactly(length - HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(
            f"truncated message: header says {length} bytes, got {HEADER_SIZE + len(exc.partial)}"
        ) from exc
    return Frame(request_id, response_to, op_code, payload)
