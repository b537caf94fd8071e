"""A canned-reply MongoDB responder, for measuring the proxy's own ceiling.

It answers every OP_MSG (and legacy OP_QUERY) with one fixed reply, pre-encoded, that
satisfies both a handshake (`hello`) and a point `find` (a cursor with one document), so
that the proxy, the metadata client and the benchmark's raw client all accept it. Each
request costs it a header unpack and a write: whatever throughput is measured through a
relay in front of it is the relay's, not a database's.

    .venv/bin/python benchmarks/canned.py PORT [--procs N]

With --procs N, N processes share the port through SO_REUSEPORT.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing as mp
import socket
import struct
from typing import Any

import bson
from bson import Int64

_HEADER = struct.Struct("<iiii")
OP_REPLY, OP_QUERY, OP_MSG = 1, 2004, 2013

REPLY = {
    "ok": 1.0,
    "isWritablePrimary": True, "ismaster": True, "helloOk": True,
    "maxBsonObjectSize": 16 * 1024 * 1024, "maxMessageSizeBytes": 48_000_000,
    "maxWriteBatchSize": 100_000, "localTime": dt.datetime.now(dt.UTC),
    "logicalSessionTimeoutMinutes": 30, "connectionId": 1,
    "minWireVersion": 0, "maxWireVersion": 21, "readOnly": False,
    "n": 0,
    "cursor": {"id": Int64(0), "ns": "bench.points", "firstBatch": [{"_id": 0, "v": 0}]},
}


def _frames() -> tuple[bytes, bytes]:
    body = bson.encode(REPLY)
    msg = b"\x00\x00\x00\x00\x00" + body
    # OP_REPLY: flags, cursorID, startingFrom, numberReturned, then the document.
    legacy = struct.pack("<iqii", 8, 0, 0, 1) + body
    return msg, legacy


class Canned(asyncio.Protocol):
    msg, legacy = _frames()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport  # uvloop's transports are not asyncio.Transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, end = 0, len(buf)
        out = []
        while end - pos >= 16:
            length, request_id, _, op_code = _HEADER.unpack_from(buf, pos)
            if length < 16 or end - pos < length:
                break
            pos += length
            if op_code == OP_MSG:
                payload = self.msg
                out.append(_HEADER.pack(16 + len(payload), 0, request_id, OP_MSG) + payload)
            elif op_code == OP_QUERY:
                payload = self.legacy
                out.append(_HEADER.pack(16 + len(payload), 0, request_id, OP_REPLY) + payload)
        self.buf = buf[pos:]
        if out:
            self.transport.write(b"".join(out))


def serve(port: int) -> None:
    async def main() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(1024)
        server = await asyncio.get_running_loop().create_server(Canned, sock=sock)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--procs", type=int, default=1)
    args = parser.parse_args()
    procs = [mp.Process(target=serve, args=(args.port,)) for _ in range(args.procs - 1)]
    for proc in procs:
        proc.start()
    serve(args.port)


if __name__ == "__main__":
    cli()
