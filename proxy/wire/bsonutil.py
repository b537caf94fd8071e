"""BSON helpers shared by the wire layer: one codec, cheap peeking."""

from __future__ import annotations

import struct
from typing import Any

import bson
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions, DatetimeConversion

from proxy.wire.errors import ProtocolError

# Round-trips every value unchanged: dates outside datetime's range, UUID
# subtypes and int64 come back out exactly as they came in.
CODEC: CodecOptions[dict[str, Any]] = CodecOptions(
    tz_aware=False,
    uuid_representation=UuidRepresentation.UNSPECIFIED,
    datetime_conversion=DatetimeConversion.DATETIME_AUTO,
)

_INT32 = struct.Struct("<i")


def decode(data: bytes | memoryview) -> dict[str, Any]:
    try:
        return bson.decode(bytes(data), CODEC)
    except Exception as exc:  # bson raises InvalidBSON and a few others
        raise ProtocolError(f"invalid BSON: {exc}") from exc


def encode(doc: Any) -> bytes:
    return bson.encode(doc, codec_options=CODEC)


def doc_length(data: bytes, offset: int) -> int:
    if offset + 4 > len(data):
        raise ProtocolError("BSON document runs past the end of the message")
    (length,) = _INT32.unpack_from(data, offset)
    if length < 5 or offset + length > len(data):
        raise ProtocolError(f"BSON document length {length} does not fit the message")
    return int(length)


def first_key(data: bytes, offset: int) -> str:
    """The first field name of the BSON document at offset, without decoding it."""
    start = offset + 5
    end = data.find(b"\x00", start)
    if end < 0 or data[offset + 4] == 0:
        return ""
    return data[start:end].decode("utf-8", "replace")
