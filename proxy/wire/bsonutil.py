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


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two documents are the same BSON: field order and types count, as they do
    for the server (1 and 1.0 differ; so do {a, b} and {b, a})."""
    return bson.encode(a, codec_options=CODEC) == bson.encode(b, codec_options=CODEC)


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


class _Unread(Exception):
    """Stands for an embedded document or array that `check_document` does not look into.

    `_type_marker` 101 is bson's raw-document marker: pymongo's C decoder then builds
    one of these per embedded document (from its bytes and the codec options, after
    checking its length and terminator) instead of decoding it. An Exception subclass,
    because constructing one runs no Python code.
    """

    _type_marker = 101


# Top-level values are decoded (cheap scalars, mostly); embedded documents are not.
# Invalid UTF-8 is let through, as mongod lets it through.
SKIM_OPTIONS: CodecOptions[Any] = CODEC.with_options(document_class=_Unread,  # type: ignore[arg-type]
                                              unicode_decode_error_handler="replace")
_FULL: CodecOptions[dict[str, Any]] = CODEC.with_options(unicode_decode_error_handler="replace")

# pymongo's C decoder of a document's elements into a given dict (what RawBSONDocument
# inflates with): (data, first element's offset, terminator's offset, options, dict,
# raw arrays). None without bson's C extension: check_document then decodes in full.
try:
    from bson._cbson import _raw_to_dict as SKIM_ELEMENTS
except ImportError:  # pragma: no cover - a bson without its C extension
    SKIM_ELEMENTS = None


def check_document(data: bytes, start: int, end: int) -> None:
    """Check the BSON document filling data[start:end] without decoding it in full.

    Its length and terminator, then every top-level element, in C (pymongo's decoder in
    raw-document mode): a defined type, a terminated name, a value that fits (strings
    their length and terminator, embedded documents and arrays their length and
    terminator, booleans 0 or 1, ...). The contents of embedded documents are not
    looked into: they are the upstream's to check, as mongod checks every document it
    receives. About 1 µs for a driver's find; a full decode costs 3-4 times as much and
    builds every nested value as a Python object.

    Whatever the quick pass refuses goes through the full decoder, which has the last
    word (the quick pass cannot represent a top-level code-with-scope value, which is
    valid BSON) and gives the error its message.
    """
    if (end - start < 5 or _INT32.unpack_from(data, start)[0] != end - start
            or data[end - 1] != 0 or SKIM_ELEMENTS is None):
        decode_checked(data[start:end])
        return
    try:
        SKIM_ELEMENTS(data, start + 4, end - 1, SKIM_OPTIONS, {}, True)
    except Exception:
        decode_checked(data[start:end])


def check_documents(data: bytes) -> None:
    """`check_document` for each of the documents laid end to end in data (an OP_MSG
    document sequence: an insert's documents, say), in one loop."""
    skim, options, unpack = SKIM_ELEMENTS, SKIM_OPTIONS, _INT32.unpack_from
    pos, end = 0, len(data)
    while pos < end:
        stop = pos + doc_length(data, pos) if end - pos < 5 else pos + unpack(data, pos)[0]
        if stop - pos < 5 or stop > end or data[stop - 1] or skim is None:
            doc_length(data, pos)  # raises for a length that does not fit
            check_document(data, pos, stop)
        else:
            try:
                skim(data, pos + 4, stop - 1, options, {}, True)
            except Exception:
                check_document(data, pos, stop)
        pos = stop


def decode_checked(data: bytes) -> dict[str, Any]:
    """A full decode that lets invalid UTF-8 through; ProtocolError if not valid BSON."""
    try:
        return bson.decode(data, _FULL)
    except Exception as exc:  # bson raises InvalidBSON and a few others
        raise ProtocolError(f"invalid BSON: {exc}") from exc


def first_key(data: bytes, offset: int) -> str:
    """The first field name of the BSON document at offset, without decoding it."""
    start = offset + 5
    end = data.find(b"\x00", start)
    if end < 0 or data[offset + 4] == 0:
        return ""
    return data[start:end].decode("utf-8", "replace")


# Value sizes of the fixed-width BSON types, for walking a document's top level.
_FIXED = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8,
          0x13: 16, 0x7F: 0, 0xFF: 0}
_DOUBLE = struct.Struct("<d")
_INT64 = struct.Struct("<q")
_TIMESTAMP = struct.Struct("<II")  # increment, then seconds


def _raw_field(data: bytes, name: bytes) -> tuple[int, int] | None:
    """The type byte and value offset of a top-level field, walked without decoding;
    None when absent, or behind a type this walk does not know, or malformed."""
    try:
        pos, end = 4, len(data) - 1
        while pos < end:
            kind = data[pos]
            name_end = data.index(b"\x00", pos + 1)
            value = name_end + 1
            if data[pos + 1:name_end] == name:
                return kind, value
            size = _FIXED.get(kind)
            if size is not None:
                pos = value + size
            elif kind in (0x02, 0x0D, 0x0E):
                pos = value + 4 + _INT32.unpack_from(data, value)[0]
            elif kind in (0x03, 0x04):
                pos = value + _INT32.unpack_from(data, value)[0]
            elif kind == 0x05:
                pos = value + 5 + _INT32.unpack_from(data, value)[0]
            else:
                return None
    except (ValueError, IndexError, struct.error):
        return None
    return None


def raw_ok(data: bytes) -> bool | None:
    """Whether a reply's top-level `ok` is set, read without decoding the reply; None
    when it cannot tell (no ok, a type this walk does not know, malformed)."""
    found = _raw_field(data, b"ok")
    if found is None:
        return None
    kind, value = found
    try:
        if kind == 0x01:
            return bool(_DOUBLE.unpack_from(data, value)[0])
        if kind == 0x10:
            return bool(_INT32.unpack_from(data, value)[0])
        if kind == 0x12:
            return bool(_INT64.unpack_from(data, value)[0])
        if kind == 0x08:
            return bool(data[value])
    except (IndexError, struct.error):
        return None
    return None


def raw_timestamp(data: bytes, name: bytes) -> tuple[int, int] | None:
    """A top-level BSON timestamp as (seconds, increment), read without decoding the
    document (a reply's `operationTime`); None when absent or of another type."""
    found = _raw_field(data, name)
    if found is None or found[0] != 0x11:
        return None
    try:
        increment, seconds = _TIMESTAMP.unpack_from(data, found[1])
    except struct.error:
        return None
    return seconds, increment
    return None
