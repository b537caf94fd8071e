"""OP_COMPRESSED: zlib always; zstd and snappy when their packages are installed."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

from proxy.wire.errors import ProtocolError
from proxy.wire.framing import OP_COMPRESSED, Frame

_HEAD = struct.Struct("<iiB")

NOOP, SNAPPY, ZLIB, ZSTD = 0, 1, 2, 3

Codec = tuple[Callable[[bytes], bytes], Callable[[bytes, int], bytes]]
_CODECS: dict[int, Codec] = {
    NOOP: (lambda b: b, lambda b, _n: b),
    ZLIB: (lambda b: zlib.compress(b, 6), lambda b, _n: zlib.decompress(b)),
}
NAMES: dict[str, int] = {"zlib": ZLIB}

try:
    import zstandard

    _zc = zstandard.ZstdCompressor(level=3)
    _zd = zstandard.ZstdDecompressor()
    _CODECS[ZSTD] = (_zc.compress, lambda b, n: _zd.decompress(b, max_output_size=n))
    NAMES["zstd"] = ZSTD
except ImportError:  # pragma: no cover - optional
    pass

try:
    import snappy

    _CODECS[SNAPPY] = (snappy.compress, lambda b, _n: snappy.decompress(b))
    NAMES["snappy"] = SNAPPY
except ImportError:  # pragma: no cover - optional
    pass


# Commands never compressed, per the compression spec (in either direction).
UNCOMPRESSIBLE = frozenset({
    "hello", "isMaster", "ismaster", "saslStart", "saslContinue", "getnonce", "authenticate",
    "createUser", "updateUser", "copydbSaslStart", "copydbgetnonce", "copydb",
})


def negotiate(client_offers: list[str]) -> list[str]:
    """The compressors both sides support, in the client's order of preference."""
    return [name for name in client_offers if name in NAMES]


def decompress(frame: Frame, max_size: int) -> tuple[Frame, int]:
    """The inner frame and the compressor id the client used."""
    data = frame.payload
    if len(data) < _HEAD.size:
        raise ProtocolError("OP_COMPRESSED too short")
    original_op, size, compressor = _HEAD.unpack_from(data, 0)
    if size < 0 or size > max_size:
        raise ProtocolError(f"OP_COMPRESSED uncompressed size {size} is out of range")
    codec = _CODECS.get(compressor)
    if codec is None:
        raise ProtocolError(f"OP_COMPRESSED uses unsupported compressor id {compressor}")
    try:
        inner = codec[1](data[_HEAD.size :], size)
    except Exception as exc:
        raise ProtocolError(f"OP_COMPRESSED body does not decompress: {exc}") from exc
    if len(inner) != size:
        raise ProtocolError("OP_COMPRESSED uncompressed size does not match its header")
    return Frame(frame.request_id, frame.response_to, original_op, inner), compressor


def compress(frame: Frame, compressor: int) -> Frame:
    codec = _CODECS[compressor]
    payload = _HEAD.pack(frame.op_code, len(frame.payload), compressor) + codec[0](frame.payload)
    return Frame(frame.request_id, frame.response_to, OP_COMPRESSED, payload)
