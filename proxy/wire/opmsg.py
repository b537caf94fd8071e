"""OP_MSG: sections of kind 0 (body) and 1 (document sequence), optional CRC-32C."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import bson
import crc32c

from proxy.wire.bsonutil import (
    CODEC,
    check_document,
    check_documents,
    decode,
    doc_length,
    encode,
    first_key,
)
from proxy.wire.errors import ProtocolError
from proxy.wire.framing import OP_MSG, Frame

CHECKSUM_PRESENT = 1 << 0
MORE_TO_COME = 1 << 1
EXHAUST_ALLOWED = 1 << 16
_KNOWN_FLAGS = CHECKSUM_PRESENT | MORE_TO_COME | EXHAUST_ALLOWED
_UINT32 = struct.Struct("<I")
_INT32 = struct.Struct("<i")
# Flags, first section kind and its document length: the whole of a plain command's framing.
PLAIN_HEAD = struct.Struct("<IBi")
# Flags that send split() down the general path (a checksum, or bits it must reject).
NOT_PLAIN = CHECKSUM_PRESENT | (0xFFFF & ~_KNOWN_FLAGS)


@dataclass(slots=True)
class OpMsg:
    """A decoded OP_MSG; sequences are merged into the body by `command`."""

    flags: int
    body: dict[str, Any]
    sequences: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def command(self) -> dict[str, Any]:
        """The body with document sequences folded in, as a command handler sees it."""
        if not self.sequences:
            return self.body
        merged = dict(self.body)
        for name, docs in self.sequences.items():
            merged[name] = docs
        return merged


def _verify_checksum(frame: Frame) -> bytes:
    payload = frame.payload
    if len(payload) < 8:
        raise ProtocolError("OP_MSG with checksum flag is too short")
    body, tail = payload[:-4], payload[-4:]
    (expected,) = _UINT32.unpack(tail)
    header = frame.to_bytes()[:16]
    actual = crc32c.crc32c(header + body)
    if actual != expected:
        raise ProtocolError(f"OP_MSG checksum mismatch (got {expected:#x}, computed {actual:#x})")
    return body


def sections_of(frame: Frame) -> tuple[int, bytes]:
    """Flags and the section bytes, with the checksum verified and stripped."""
    if len(frame.payload) < 5:
        raise ProtocolError("OP_MSG too short for flags and a section")
    (flags,) = _UINT32.unpack_from(frame.payload, 0)
    if flags & 0xFFFF & ~_KNOWN_FLAGS:
        raise ProtocolError(f"OP_MSG has unknown required flag bits {flags:#x}")
    payload = _verify_checksum(frame) if flags & CHECKSUM_PRESENT else frame.payload
    return flags, payload


def flags_of(frame: Frame) -> int:
    """The flag bits of an OP_MSG, read without looking at its sections."""
    if len(frame.payload) < 4:
        raise ProtocolError("OP_MSG too short for flags")
    return int(_UINT32.unpack_from(frame.payload, 0)[0])


@dataclass(slots=True)
class Sections:
    """An OP_MSG split into raw sections; the framing is checked, the BSON not yet decoded."""

    flags: int
    body: bytes
    sequences: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The command name: the body's first field."""
        return first_key(self.body, 0)

    def validate(self) -> None:
        """Check every document's structure, so nothing malformed is forwarded.

        See `bsonutil.check_document` for what is checked: the top-level elements of
        the body and of each document of a sequence, not the full decode. Strings with
        invalid UTF-8 are let through, as mongod lets them through.
        """
        check_document(self.body, 0, len(self.body))
        for _name, docs in self.sequences:
            check_documents(docs)

    def decode(self) -> OpMsg:
        sequences: dict[str, list[dict[str, Any]]] = {}
        for name, docs in self.sequences:
            try:
                decoded = bson.decode_all(docs, CODEC)
            except Exception as exc:
                raise ProtocolError(f"invalid BSON: {exc}") from exc
            sequences.setdefault(name, []).extend(decoded)
        return OpMsg(self.flags, decode(self.body), sequences)


def split(frame: Frame) -> Sections:
    """Check an OP_MSG's flags, checksum and section framing; no BSON is decoded."""
    payload = frame.payload
    if len(payload) >= 9:
        # Fast path with the same result: no checksum and one body section filling the
        # message, which is how drivers send nearly every command.
        flags, kind, length = PLAIN_HEAD.unpack_from(payload, 0)
        if kind == 0 and length >= 5 and length == len(payload) - 5 and not flags & NOT_PLAIN:
            return Sections(flags, payload[5:])
    flags, payload = sections_of(frame)
    pos = 4
    end = len(payload)
    body: bytes | None = None
    sequences: list[tuple[str, bytes]] = []
    while pos < end:
        kind = payload[pos]
        pos += 1
        if kind == 0:
            if body is not None:
                raise ProtocolError("OP_MSG has more than one body section")
            length = doc_length(payload, pos)
            body = payload[pos : pos + length]
            pos += length
        elif kind == 1:
            if pos + 4 > end:
                raise ProtocolError("truncated document sequence")
            (size,) = _INT32.unpack_from(payload, pos)
            stop = pos + size
            if size < 5 or stop > end:
                raise ProtocolError(f"document sequence size {size} does not fit the message")
            name_end = payload.find(b"\x00", pos + 4, stop)
            if name_end < 0:
                raise ProtocolError("document sequence identifier is not terminated")
            try:
                name = payload[pos + 4 : name_end].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ProtocolError("document sequence identifier is not UTF-8") from exc
            cursor = name_end + 1
            while cursor < stop:
                length = doc_length(payload, cursor)
                if cursor + length > stop:
                    raise ProtocolError("document runs past its document sequence")
                cursor += length
            sequences.append((name, payload[name_end + 1 : stop]))
            pos = stop
        else:
            raise ProtocolError(f"unknown OP_MSG section kind {kind}")
    if body is None:
        raise ProtocolError("OP_MSG without a body section")
    return Sections(flags, body, sequences)


def build(
    body: dict[str, Any] | bytes,
    *,
    request_id: int,
    response_to: int = 0,
    flags: int = 0,
    checksum: bool = False,
) -> Frame:
    raw = body if isinstance(body, bytes) else encode(body)
    if checksum:
        flags |= CHECKSUM_PRESENT
    else:
        flags &= ~CHECKSUM_PRESENT
    payload = _UINT32.pack(flags) + b"\x00" + raw
    frame = Frame(request_id, response_to, OP_MSG, payload)
    if checksum:
        header = frame.to_bytes()[:16]
        # The header's length must already count the 4 checksum bytes.
        header = _INT32.pack(16 + len(payload) + 4) + header[4:]
        frame.payload = payload + _UINT32.pack(crc32c.crc32c(header + payload))
    return frame


def body_bytes(frame: Frame) -> bytes:
    """The raw BSON of the body section of a reply (the only section replies have)."""
    return split(frame).body
