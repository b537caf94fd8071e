"""The wire codec in process: frames as hex fixtures, no server, no socket."""

from __future__ import annotations

import pytest

from proxy.wire import opmsg
from proxy.wire.errors import ProtocolError
from proxy.wire.framing import HEADER, OP_MSG, Frame, MessageProtocol

# {ping: 1, $db: "admin"} as a driver sends it: flags 0, one body section.
PING = bytes.fromhex(
    "330000000700000000000000dd07000000000000001e0000001070696e6700010000000224646200"
    "0600000061646d696e0000")
# The same with the checksum flag and its CRC-32C.
PING_CRC = bytes.fromhex(
    "370000000700000000000000dd07000001000000001e0000001070696e6700010000000224646200"
    "0600000061646d696e00000b1bb50f")
# insert {insert: "c", $db: "t"} with a "documents" sequence of {_id: 1}, {_id: 2}.
INSERT_SEQ = bytes.fromhex(
    "5e0000000900000000000000dd07000000000000001e00000002696e736572740002000000630002"
    "2464620002000000740000012a000000646f63756d656e7473000e000000105f69640001000000000e"
    "000000105f6964000200000000")


def frame(raw: bytes) -> Frame:
    length, request_id, response_to, op_code = HEADER.unpack_from(raw, 0)
    assert length == len(raw)
    return Frame(request_id, response_to, op_code, raw[16:])


def test_plain_body_splits_and_decodes() -> None:
    sections = opmsg.split(frame(PING))
    assert sections.name == "ping" and sections.flags == 0 and sections.sequences == []
    sections.validate()
    assert sections.decode().command == {"ping": 1, "$db": "admin"}


def test_build_gives_the_fixture_bytes() -> None:
    assert opmsg.build({"ping": 1, "$db": "admin"}, request_id=7).to_bytes() == PING
    built = opmsg.build({"ping": 1, "$db": "admin"}, request_id=7, checksum=True)
    assert built.to_bytes() == PING_CRC


def test_checksum_is_verified() -> None:
    assert opmsg.split(frame(PING_CRC)).decode().command["ping"] == 1
    corrupt = PING_CRC[:-1] + bytes([PING_CRC[-1] ^ 0xFF])
    with pytest.raises(ProtocolError, match="checksum mismatch"):
        opmsg.split(frame(corrupt))


def test_document_sequence_folds_into_the_command() -> None:
    msg = opmsg.split(frame(INSERT_SEQ)).decode()
    assert msg.body == {"insert": "c", "$db": "t"}
    assert msg.command["documents"] == [{"_id": 1}, {"_id": 2}]


def _with_payload(payload: bytes) -> Frame:
    return Frame(1, 0, OP_MSG, payload)


@pytest.mark.parametrize(("payload", "message"), [
    (b"\x00\x00\x00\x00", "too short"),
    (b"\x04\x00\x00\x00" + PING[20:], "unknown required flag bits"),
    (b"\x00\x00\x00\x00\x02" + PING[21:], "unknown OP_MSG section kind 2"),
    (b"\x00\x00\x00\x00" + PING[20:] + PING[20:], "more than one body section"),
    (INSERT_SEQ[16:16 + 4] + INSERT_SEQ[16 + 4 + 1 + 30:], "without a body section"),
    (INSERT_SEQ[16:-3], "does not fit the message"),
])
def test_malformed_sections_are_refused(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        opmsg.split(_with_payload(payload))


class Collect(MessageProtocol):
    def __init__(self, max_size: int = 1 << 20) -> None:
        super().__init__(max_size)
        self.messages: list[bytes] = []
        self.errors: list[ProtocolError] = []

    def message_received(self, msg: bytes) -> None:
        self.messages.append(bytes(msg))

    def frame_error(self, exc: ProtocolError) -> None:
        self.errors.append(exc)


def test_stream_is_sliced_into_whole_messages_whatever_the_chunks() -> None:
    stream = PING + INSERT_SEQ + PING_CRC
    for size in (1, 3, 16, 17, 50, len(stream)):
        proto = Collect()
        for start in range(0, len(stream), size):
            proto.data_received(stream[start:start + size])
        assert proto.messages == [PING, INSERT_SEQ, PING_CRC], size
        assert proto.partial_message_error() is None


def test_stream_cut_inside_a_message_is_reported_at_eof() -> None:
    proto = Collect()
    proto.data_received(PING[:20])
    assert proto.messages == []
    assert proto.partial_message_error() is not None


@pytest.mark.parametrize("length", [0, 15, (1 << 20) + 1])
def test_length_out_of_range_stops_delivery(length: int) -> None:
    proto = Collect()
    proto.data_received(length.to_bytes(4, "little") + PING[4:] + PING)
    assert proto.messages == [] and len(proto.errors) == 1
    proto.data_received(PING)
    assert proto.messages == []
