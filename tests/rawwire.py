"""Hand-built wire messages over plain sockets, for tests that must send what no driver would."""

from __future__ import annotations

import socket
import struct
import zlib
from typing import Any

import bson
import crc32c

HEADER = struct.Struct("<iiii")
OP_REPLY = 1
OP_QUERY = 2004
OP_MSG = 2013
CHECKSUM_PRESENT = 1


def frame(op_code: int, payload: bytes, request_id: int = 1, response_to: int = 0,
          length: int | None = None) -> bytes:
    size = HEADER.size + len(payload) if length is None else length
    return HEADER.pack(size, request_id, response_to, op_code) + payload


def compressed(message: bytes, compressor: int = 2) -> bytes:
    """A whole message wrapped in OP_COMPRESSED, its body compressed with zlib; the header
    names `compressor` (2: zlib)."""
    inner_op = struct.unpack_from("<i", message, 12)[0]
    body = message[16:]
    return frame(2012, struct.pack("<iiB", inner_op, len(body), compressor)
                 + zlib.compress(body))


def op_msg(body: dict[str, Any] | bytes, *, flags: int = 0, request_id: int = 1,
           checksum: bool = False, bad_checksum: bool = False) -> bytes:
    raw = body if isinstance(body, bytes) else bson.encode(body)
    if checksum or bad_checksum:
        flags |= CHECKSUM_PRESENT
    payload = struct.pack("<I", flags) + b"\x00" + raw
    if not (checksum or bad_checksum):
        return frame(OP_MSG, payload, request_id)
    head = HEADER.pack(HEADER.size + len(payload) + 4, request_id, 0, OP_MSG)
    crc = crc32c.crc32c(head + payload)
    if bad_checksum:
        crc ^= 0xDEADBEEF
    return head + payload + struct.pack("<I", crc)


def op_query(collection: str, query: dict[str, Any], request_id: int = 1) -> bytes:
    payload = (struct.pack("<i", 0) + collection.encode() + b"\x00"
               + struct.pack("<ii", 0, -1) + bson.encode(query))
    return frame(OP_QUERY, payload, request_id)


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def read_message(sock: socket.socket) -> tuple[int, int, bytes]:
    """(opCode, responseTo, payload) of the next message."""
    length, _request_id, response_to, op_code = HEADER.unpack(recv_exact(sock, HEADER.size))
    return op_code, response_to, recv_exact(sock, length - HEADER.size)


def msg_reply(payload: bytes) -> dict[str, Any]:
    """The body of an OP_MSG reply whose first section is the body."""
    (flags,) = struct.unpack_from("<I", payload, 0)
    assert payload[4] == 0, "first section of a reply must be the body"
    end = len(payload) - 4 if flags & CHECKSUM_PRESENT else len(payload)
    doc: dict[str, Any] = bson.decode(payload[5:end])
    return doc


def command(sock: socket.socket, body: dict[str, Any], request_id: int = 1) -> dict[str, Any]:
    sock.sendall(op_msg(body, request_id=request_id))
    op_code, response_to, payload = read_message(sock)
    assert op_code == OP_MSG and response_to == request_id
    return msg_reply(payload)


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the peer closes the connection (EOF or reset) within timeout, sending nothing."""
    sock.settimeout(timeout)
    try:
        # Anything but EOF (a reply to malformed input, say) means it was not simply closed.
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
