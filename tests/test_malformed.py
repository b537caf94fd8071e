"""Malformed input on the main port: the offending connection is closed with a logged reason,
every other client keeps working."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import bson
import pytest
from pymongo import MongoClient

from tests import rawwire
from tests.servers import ProxyProcess

MAX_MESSAGE_SIZE = 48_000_000


def _find_body(db: str = "malformed") -> bytes:
    return bson.encode({"find": "items", "filter": {}, "$db": db})


def _bad_string_length() -> bytes:
    """A body whose first key peeks fine but whose string value claims 100 bytes."""
    raw = bytearray(_find_body())
    at = raw.index(b"items\x00") - 4
    struct.pack_into("<i", raw, at, 100)
    return bytes(raw)


def _bad_element_type() -> bytes:
    """A body whose "filter" element carries a type byte BSON does not define."""
    raw = bytearray(_find_body())
    at = raw.index(b"filter\x00") - 1
    assert raw[at] == 0x03
    raw[at] = 0x7A
    return bytes(raw)


def _sections(*parts: bytes, flags: int = 0) -> bytes:
    return rawwire.frame(rawwire.OP_MSG, struct.pack("<I", flags) + b"".join(parts))


# name -> (bytes to send, reason expected in the log, half-close our side after sending)
CASES: dict[str, tuple[Callable[[], bytes], str, bool]] = {
    "length-below-header": (
        lambda: struct.pack("<iiii", 8, 1, 0, rawwire.OP_MSG), "shorter than the 16-byte header",
        False),
    "length-zero": (lambda: struct.pack("<iiii", 0, 1, 0, rawwire.OP_MSG),
                    "shorter than the 16-byte header", False),
    "length-negative": (lambda: struct.pack("<iiii", -5, 1, 0, rawwire.OP_MSG),
                        "shorter than the 16-byte header", False),
    "length-above-max": (
        lambda: struct.pack("<iiii", MAX_MESSAGE_SIZE + 1, 1, 0, rawwire.OP_MSG),
        "exceeds maxMessageSizeBytes", False),
    "truncated": (
        lambda: rawwire.op_msg(bson.encode({"ping": 1, "$db": "admin", "pad": "x" * 1000}))[:100],
        "truncated message", True),
    "truncated-header": (lambda: b"\x40\x00\x00\x00\x01\x00", "inside a message header", True),
    "unknown-opcode": (lambda: rawwire.frame(9999, b"\x00" * 24), "unsupported opCode 9999",
                       False),
    "removed-op-insert": (lambda: rawwire.frame(2002, b"\x00" * 24), "unsupported opCode 2002",
                          False),
    "client-sent-op-reply": (lambda: rawwire.frame(rawwire.OP_REPLY, b"\x00" * 24),
                             "unsupported opCode 1", False),
    "invalid-bson-string-length": (lambda: rawwire.op_msg(_bad_string_length()), "invalid BSON",
                                   False),
    "invalid-bson-element-type": (lambda: rawwire.op_msg(_bad_element_type()), "invalid BSON",
                                  False),
    "bson-length-past-end": (
        lambda: _sections(b"\x00", struct.pack("<i", 500), b"\x10a\x00\x01\x00\x00\x00\x00"),
        "does not fit the message", False),
    "bad-checksum": (
        lambda: rawwire.op_msg({"ping": 1, "$db": "admin"}, bad_checksum=True),
        "checksum mismatch", False),
    "unknown-section-kind-first": (
        lambda: _sections(b"\x07", bson.encode({"ping": 1, "$db": "admin"})),
        "unknown OP_MSG section kind 7", False),
    "unknown-section-kind-after-body": (
        lambda: _sections(b"\x00", _find_body(), b"\x05", bson.encode({"x": 1})),
        "unknown OP_MSG section kind 5", False),
    "invalid-bson-in-document-sequence": (
        lambda: _sections(b"\x00", bson.encode({"insert": "items", "$db": "malformed"}),
                          b"\x01", struct.pack("<i", 4 + 10 + len(_bad_element_type())),
                          b"documents\x00", _bad_element_type()),
        "invalid BSON", False),
    "invalid-bson-compressed": (
        lambda: rawwire.compressed(rawwire.op_msg(_bad_string_length())), "invalid BSON", False),
    "truncated-document-sequence": (
        lambda: _sections(b"\x00", _find_body(), b"\x01\x30"),
        "document sequence", False),
    "no-body-section": (
        lambda: _sections(b"\x01", struct.pack("<i", 4 + 10 + 5), b"documents\x00",
                          bson.encode({})),
        "without a body section", False),
    "unknown-required-flag": (
        lambda: _sections(b"\x00", bson.encode({"ping": 1, "$db": "admin"}), flags=1 << 4),
        "unknown required flag bits", False),
    "compressed-garbage": (
        lambda: rawwire.frame(2012, struct.pack("<iiB", rawwire.OP_MSG, 50, 2) + b"not zlib"),
        "does not decompress", False),
}


def _log_line_for(proxy: ProxyProcess, peer_port: int, timeout: float = 10.0) -> str:
    marker = f"from 127.0.0.1:{peer_port}: "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in proxy.read_log().splitlines():
            if marker in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no log line for the connection from port {peer_port}")


def _still_serves(client: MongoClient) -> None:
    assert client.admin.command("ping")["ok"] == 1.0
    coll = client.malformed.survivors
    coll.replace_one({"_id": 1}, {"_id": 1, "v": "ok"}, upsert=True)
    assert coll.find_one({"_id": 1}) == {"_id": 1, "v": "ok"}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_closes_only_that_connection(
    relay_proxy: ProxyProcess, relay_client: MongoClient, case: str
) -> None:
    build, reason, half_close = CASES[case]
    _still_serves(relay_client)
    with rawwire.connect(relay_proxy.port) as sock:
        # The connection is a live one first: it has run a command through the upstream.
        assert rawwire.command(sock, {"ping": 1, "$db": "admin"})["ok"] == 1.0
        peer_port = sock.getsockname()[1]
        sock.sendall(build())
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        assert rawwire.closed_by_peer(sock), f"{case}: the proxy kept the connection open"
    line = _log_line_for(relay_proxy, peer_port)
    assert reason in line, line
    _still_serves(relay_client)


def test_valid_checksum_is_accepted(relay_proxy: ProxyProcess, relay_client: MongoClient) -> None:
    relay_client.malformed.crc.drop()
    with rawwire.connect(relay_proxy.port) as sock:
        reply = rawwire.command(sock, {"ping": 1, "$db": "admin"})
        assert reply["ok"] == 1.0
        sock.sendall(rawwire.op_msg({"ping": 1, "$db": "admin"}, request_id=7, checksum=True))
        op_code, response_to, payload = rawwire.read_message(sock)
        assert (op_code, response_to) == (rawwire.OP_MSG, 7)
        assert rawwire.msg_reply(payload)["ok"] == 1.0

        # An insert whose documents travel in a kind-1 sequence, checksummed.
        docs = b"".join(bson.encode({"_id": i, "v": i}) for i in range(3))
        seq = b"documents\x00" + docs
        body = bson.encode({"insert": "crc", "$db": "malformed"})
        payload = (struct.pack("<I", rawwire.CHECKSUM_PRESENT) + b"\x00" + body
                   + b"\x01" + struct.pack("<i", 4 + len(seq)) + seq)
        head = rawwire.HEADER.pack(16 + len(payload) + 4, 8, 0, rawwire.OP_MSG)
        import crc32c

        sock.sendall(head + payload + struct.pack("<I", crc32c.crc32c(head + payload)))
        op_code, response_to, payload = rawwire.read_message(sock)
        assert (op_code, response_to) == (rawwire.OP_MSG, 8)
        reply = rawwire.msg_reply(payload)
        assert reply["ok"] == 1.0 and reply["n"] == 3, reply

        sock.sendall(rawwire.op_msg({"find": "crc", "filter": {}, "sort": {"_id": 1},
                                     "$db": "malformed"}, request_id=9, checksum=True))
        _op, _to, payload = rawwire.read_message(sock)
        batch = rawwire.msg_reply(payload)["cursor"]["firstBatch"]
        assert batch == [{"_id": i, "v": i} for i in range(3)]
    assert sorted(d["_id"] for d in relay_client.malformed.crc.find()) == [0, 1, 2]


def _op_reply(payload: bytes) -> tuple[int, list[dict[str, object]]]:
    flags, _cursor, _start, count = struct.unpack_from("<iqii", payload, 0)
    docs = bson.decode_all(payload[20:])
    assert len(docs) == count
    return flags, docs


def test_legacy_op_query_is_master(relay_proxy: ProxyProcess) -> None:
    with rawwire.connect(relay_proxy.port) as sock:
        for name in ("isMaster", "ismaster"):
            sock.sendall(rawwire.op_query("admin.$cmd", {name: 1, "helloOk": True},
                                          request_id=21))
            op_code, response_to, payload = rawwire.read_message(sock)
            assert (op_code, response_to) == (rawwire.OP_REPLY, 21)
            flags, docs = _op_reply(payload)
            assert flags & 2 == 0
            (doc,) = docs
            assert doc["ismaster"] is True and doc["msg"] == "isdbgrid" and doc["ok"] == 1.0
            assert doc["helloOk"] is True
            assert doc["maxWireVersion"] >= 6
        # Wrapped in $query, as old drivers sending read preferences do.
        sock.sendall(rawwire.op_query("admin.$cmd", {"$query": {"isMaster": 1}}, request_id=22))
        op_code, _to, payload = rawwire.read_message(sock)
        assert op_code == rawwire.OP_REPLY
        assert _op_reply(payload)[1][0]["ismaster"] is True
        # After the legacy handshake the connection speaks OP_MSG.
        assert rawwire.command(sock, {"ping": 1, "$db": "admin"}, request_id=23)["ok"] == 1.0


# Legacy commands on <db>.$cmd are translated to OP_MSG (tests/test_legacy_op_query.py);
# a legacy query on a collection is not.
@pytest.mark.parametrize(("collection", "query", "code"), [
    ("malformed.items", {}, 5739101),
    ("malformed.items", {"isMaster": 1}, 5739101),
])
def test_other_op_query_gets_an_error_reply(
    relay_proxy: ProxyProcess, collection: str, query: dict[str, object], code: int
) -> None:
    with rawwire.connect(relay_proxy.port) as sock:
        sock.sendall(rawwire.op_query(collection, query, request_id=31))
        op_code, response_to, payload = rawwire.read_message(sock)
        assert (op_code, response_to) == (rawwire.OP_REPLY, 31)
        flags, (doc,) = _op_reply(payload)
        assert doc["ok"] == 0.0 and doc["code"] == code, doc
        assert flags & 2, "QueryFailure flag"
        assert "$err" in doc
        # The connection stays usable.
        assert rawwire.command(sock, {"ping": 1, "$db": "admin"}, request_id=32)["ok"] == 1.0
