"""Minimal Python relays, floors for what a Python proxy on uvloop can cost.

    python benchmarks/pyrelay.py protocol UPSTREAM_PORT LISTEN_PORT
    python benchmarks/pyrelay.py streams  UPSTREAM_PORT LISTEN_PORT

`protocol`: asyncio Protocols pumping bytes both ways, no framing, no tasks per
message (what socat does, in Python). `streams`: StreamReader/StreamWriter, reads
each message by its header length and writes it on, one task per connection
(the I/O skeleton of mongobranch's forwarding, without anything else).
Used by `passthrough.py --python-floor`.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from typing import Any

_LEN = struct.Struct("<i")


class _Upstream(asyncio.Protocol):
    def __init__(self, client: Any):
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.upstream: Any = None  # uvloop's transports are not asyncio.Transport instances
        self.pending: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.opening = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        upstream, _ = await loop.create_connection(
            lambda: _Upstream(self.transport), "127.0.0.1", self.upstream_port)
        for data in self.pending:
            upstream.write(data)
        self.pending.clear()
        self.upstream = upstream

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def _read_message(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(16)
    return header + await reader.readexactly(_LEN.unpack_from(header)[0] - 16)


async def main(mode: str, upstream_port: int, port: int) -> None:
    loop = asyncio.get_running_loop()
    if mode == "protocol":
        server = await loop.create_server(lambda: _Client(upstream_port), "127.0.0.1", port)
    else:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port,
                                                                 limit=1 << 20)
            try:
                while True:
                    up_writer.write(await _read_message(reader))
                    while True:  # an exhaust reply (moreToCome) is followed by more replies
                        reply = await _read_message(up_reader)
                        writer.write(reply)
                        await writer.drain()
                        if _LEN.unpack_from(reply, 12)[0] != 2013 or not reply[16] & 2:
                            break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                up_writer.close()
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", port, limit=1 << 20)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    except ImportError:
        asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    except KeyboardInterrupt:
        pass
