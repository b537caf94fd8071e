"""`compressors=` in the --upstream URI: the proxy's own upstream connections offer them
in their hello and compress with the first the server accepts, as a driver does.

The upstream links are watched by a relay in the test that forwards every byte
unchanged and notes each message's opCode per connection. SecantusDB does not implement
OP_COMPRESSED (its hello never answers `compression`, so a driver never compresses to
it): the compressed link is tested with a mongobranch proxy as the server, which
negotiates compression with its clients as mongod does, in front of SecantusDB. In
front of SecantusDB itself the proxy connects with `directConnection=true`: its hello
names its own address, to which a replica-set client would go round the relay.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import bson
import pytest
from pymongo import MongoClient

from tests.servers import ProxyProcess, Secantus

pytestmark = pytest.mark.timeout(180)

OP_COMPRESSED, OP_QUERY, OP_MSG = 2012, 2004, 2013
_HEADER = struct.Struct("<iiii")


@dataclass
class Link:
    """One relayed connection: its first request (the handshake) and the opCodes of
    the messages that followed, each way."""

    hello: dict[str, Any] | None = None
    reply: dict[str, Any] | None = None
    requests: list[int] = field(default_factory=list)
    replies: list[int] = field(default_factory=list)
    # The compressor ids of its OP_COMPRESSED messages, both ways.
    compressors: set[int] = field(default_factory=set)

    @property
    def app(self) -> str | None:
        client = (self.hello or {}).get("client") or {}
        return (client.get("application") or {}).get("name")


def _document(op_code: int, body: bytes) -> dict[str, Any] | None:
    """The command document of an OP_MSG or OP_QUERY (the handshake), else None."""
    if op_code == OP_MSG and body[4] == 0:
        return bson.decode(body[5:5 + int.from_bytes(body[5:9], "little")])
    if op_code == OP_QUERY:
        at = body.index(b"\x00", 4) + 9
        return bson.decode(body[at:at + int.from_bytes(body[at:at + 4], "little")])
    return None


class Relay:
    """A TCP relay to `target` that records every message of every connection."""

    def __init__(self, target: int):
        self.target = target
        self.links: list[Link] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            link = Link()
            self.links.append(link)
            for src, dst, ops, first in ((client, upstream, link.requests, "hello"),
                                         (upstream, client, link.replies, "reply")):
                threading.Thread(target=self._pump, args=(src, dst, link, ops, first),
                                 daemon=True).start()

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError
            data += chunk
        return data

    def _pump(self, src: socket.socket, dst: socket.socket, link: Link, ops: list[int],
              first: str) -> None:
        try:
            while True:
                header = self._read(src, _HEADER.size)
                length, _rid, _rto, op_code = _HEADER.unpack(header)
                body = self._read(src, length - _HEADER.size)
                if getattr(link, first) is None:
                    setattr(link, first, _document(op_code, body))
                else:
                    ops.append(op_code)
                    if op_code == OP_COMPRESSED:
                        link.compressors.add(body[8])
                dst.sendall(header + body)
        except (OSError, ConnectionError):
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def of(self, app: str) -> list[Link]:
        return [link for link in list(self.links) if link.app == app]

    def close(self) -> None:
        self._server.close()


def _work(uri: str, app: str) -> None:
    """Writes and reads large enough to be worth compressing, with their results checked."""
    with MongoClient(uri, appname=app, serverSelectionTimeoutMS=20000) as client:
        coll = client.cz[app]
        coll.insert_many([{"_id": i, "text": "compressible " * 50} for i in range(300)])
        coll.update_many({"_id": {"$lt": 100}}, {"$set": {"low": True}})
        assert coll.count_documents({"low": True}) == 100
        docs = list(coll.find({}, sort=[("_id", 1)], batch_size=50))
        assert [d["_id"] for d in docs] == list(range(300))
        assert all(d["text"] == "compressible " * 50 for d in docs)
        assert coll.delete_many({"_id": {"$gte": 200}}).deleted_count == 100
        assert coll.count_documents({}) == 200


@pytest.fixture(scope="module")
def node() -> Iterator[Secantus]:
    server = Secantus().start()
    yield server
    server.stop()


@pytest.mark.parametrize(("compressors", "expected"), [
    ("zlib", 2), ("zstd", 3), ("snappy", 1), ("snappy,zlib", 1)])
def test_upstream_link_is_compressed_when_the_server_accepts(
        node: Secantus, compressors: str, expected: int) -> None:
    """`expected`: the compressor id (snappy 1, zlib 2, zstd 3) of the first of the
    URI's compressors, which the server (accepting them all) answers first too."""
    offered = compressors.split(",")
    app = f"cz-{compressors.replace(',', '-')}"
    server = ProxyProcess(node.uri, meta_db="mb_cz_server")
    relay: Relay | None = None
    proxy: ProxyProcess | None = None
    try:
        server.start()
        relay = Relay(server.port)
        proxy = ProxyProcess(f"mongodb://127.0.0.1:{relay.port}/?compressors={compressors}",
                             meta_db="mb_cz_proxy").start()
        _work(proxy.uri, app)
        links = relay.of(app)  # the client's own upstream connections
        assert links
        for link in links:
            assert link.hello is not None and link.hello["compression"] == offered
            assert link.reply is not None and link.reply["compression"] == offered
            # Everything after the handshake is compressed, both ways, with the first.
            assert link.requests and set(link.requests) == {OP_COMPRESSED}
            assert set(link.replies) == {OP_COMPRESSED}
            assert link.compressors == {expected}
        # The proxy's own commands too (its health check's ping, on a raw connection).
        monitor = relay.of("mongobranch-monitor")
        assert monitor and all(link.requests and set(link.requests) == {OP_COMPRESSED}
                               for link in monitor)
    finally:
        for proc in (proxy, server):
            if proc is not None:
                proc.stop()
        if relay is not None:
            relay.close()


@pytest.mark.secantus_gap(reason="SecantusDB implements no wire compression: its hello never "
                                 "answers `compression` (mongod accepts zlib, snappy and zstd by "
                                 "default); the compressed link is tested above against a "
                                 "mongobranch server")
def test_nothing_is_compressed_when_the_server_does_not_accept(node: Secantus) -> None:
    """SecantusDB answers the offer with no `compression` field: requests stay plain,
    as a driver's do."""
    relay = Relay(node.port)
    proxy = ProxyProcess(f"mongodb://127.0.0.1:{relay.port}/?compressors=zlib"
                         "&directConnection=true", meta_db="mb_cz_plain")
    try:
        proxy.start()
        _work(proxy.uri, "cz-refused")
        links = relay.of("cz-refused")
        assert links
        for link in links:
            assert link.hello is not None and link.hello["compression"] == ["zlib"]
            assert link.reply is not None and "compression" not in link.reply
            assert link.requests and set(link.requests) == {OP_MSG}
            assert set(link.replies) == {OP_MSG}
    finally:
        proxy.stop()
        relay.close()


def test_without_compressors_nothing_is_offered(node: Secantus) -> None:
    relay = Relay(node.port)
    proxy = ProxyProcess(f"mongodb://127.0.0.1:{relay.port}/?directConnection=true",
                         meta_db="mb_cz_none")
    try:
        proxy.start()
        with MongoClient(proxy.uri, appname="cz-none", compressors="zlib") as client:
            client.cz.none.insert_one({"_id": 1})
            assert client.cz.none.find_one() == {"_id": 1}
        links = relay.of("cz-none")
        assert links
        assert all(link.hello is not None and "compression" not in link.hello
                   for link in links)
    finally:
        proxy.stop()
        relay.close()

