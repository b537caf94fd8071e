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


_LENGTH = struct.Struct("<i")


class MessageProtocol(asyncio.Protocol):
    """An asyncio Protocol that slices its byte stream into whole messages.

    Each complete message (header included, as one `bytes`) goes to `message_received`,
    in order, from `data_received` itself: no task and no future per message. A length
    out of range goes to `frame_error` and nothing more is delivered afterwards.
    """

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE):
        self.max_message_size = max_message_size
        self._buf = bytearray()
        self._need = HEADER_SIZE  # bytes the buffer must hold before anything can be sliced
        self._reading = True

    def message_received(self, msg: bytes) -> None:
        raise NotImplementedError

    def frame_error(self, exc: ProtocolError) -> None:
        raise NotImplementedError

    def stop_delivery(self) -> None:
        """Deliver nothing more (the connection is being closed)."""
        self._reading = False
        self._buf.clear()

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            return
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        end = len(data)
        pos = 0
        length = 0
        while end - pos >= HEADER_SIZE:
            (length,) = _LENGTH.unpack_from(data, pos)
            if length < HEADER_SIZE or length > self.max_message_size:
                try:
                    check_length(length, self.max_message_size)
                except ProtocolError as exc:
                    self.stop_delivery()
                    self.frame_error(exc)
                return
            if end - pos < length:
                break
            msg = data if pos == 0 and length == end else data[pos : pos + length]
            pos += length
            self.message_received(msg)
            if not self._reading:
                return
        if pos < end:
            buf += memoryview(data)[pos:]
            self._need = length if end - pos >= HEADER_SIZE else HEADER_SIZE

    def partial_message_error(self) -> ProtocolError | None:
        """At EOF: the error for a message cut short, None if the stream ended cleanly."""
        buf = self._buf
        if not self._reading or not buf:
            return None
        if len(buf) < HEADER_SIZE:
            return ProtocolError("connection closed inside a message header")
        (length,) = _LENGTH.unpack_from(buf, 0)
        return ProtocolError(f"truncated message: header says {length} bytes, got {len(buf)}")
