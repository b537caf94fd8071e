"""A raw wire connection to the upstream: one per client connection."""

from __future__ import annotations

import asyncio
import itertools
import ssl
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pymongo import uri_parser

from proxy.upstream.scram import authenticate
from proxy.wire import opmsg
from proxy.wire.bsonutil import decode
from proxy.wire.errors import ProtocolError
from proxy.wire.framing import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER,
    HEADER_SIZE,
    OP_MSG,
    Frame,
    MessageProtocol,
)

_request_ids = itertools.count(1 << 24)

# Write buffer marks of upstream sockets: above the high one, the client connection that
# writes to it stops reading its client until it drains below the low one.
_WRITE_HIGH = 1 << 20
_WRITE_LOW = 1 << 18
_LENGTH = struct.Struct("<i")


def next_request_id() -> int:
    return next(_request_ids) & 0x7FFFFFFF


class UpstreamUnavailable(Exception):
    """The upstream could not be reached or dropped the connection."""


@dataclass(slots=True)
class UpstreamConfig:
    uri: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    auth_source: str = "admin"
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None
    connect_timeout: float = 5.0
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_uri(cls, uri: str, connect_timeout: float = 5.0) -> UpstreamConfig:
        parsed = uri_parser.parse_uri(uri)
        host, port = parsed["nodelist"][0]
        opts = parsed["options"]
        tls_ctx = None
        if opts.get("tls") or opts.get("ssl"):
            tls_ctx = ssl.create_default_context(cafile=opts.get("tlscafile"))
            if opts.get("tlsallowinvalidcertificates") or opts.get("tlsinsecure"):
                tls_ctx.check_hostname = False
                tls_ctx.verify_mode = ssl.CERT_NONE
            elif opts.get("tlsallowinvalidhostnames"):
                tls_ctx.check_hostname = False
            if opts.get("tlscertificatekeyfile"):
                tls_ctx.load_cert_chain(opts["tlscertificatekeyfile"])
        return cls(
            uri=uri,
            host=host,
            port=int(port),
            username=parsed.get("username"),
            password=parsed.get("password"),
            auth_source=opts.get("authsource") or parsed.get("database") or "admin",
            tls=tls_ctx,
            server_hostname=host if tls_ctx else None,
            connect_timeout=connect_timeout,
            options=dict(opts),
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class _UpstreamProtocol(MessageProtocol):
    """The socket side of an UpstreamConnection: whole reply messages, in order.

    While a client connection forwards through it, `sink` receives every message
    straight from `data_received`; otherwise messages queue for `UpstreamConnection.receive`.
    """

    def __init__(self, conn: UpstreamConnection, max_message_size: int):
        super().__init__(max_message_size)
        self.conn: UpstreamConnection | None = conn
        self.sink: Callable[[bytes], None] | None = None
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport instances

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH, low=_WRITE_LOW)

    def data_received(self, data: bytes) -> None:
        # The fast path: exactly one whole message while a client forwards through here.
        sink = self.sink
        if (sink is not None and not self._buf and len(data) >= HEADER_SIZE
                and _LENGTH.unpack_from(data)[0] == len(data)):
            sink(data)
        else:
            MessageProtocol.data_received(self, data)

    def message_received(self, msg: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink(msg)
        elif self.conn is not None:
            self.conn._inbox_put(msg)

    def frame_error(self, exc: ProtocolError) -> None:
        if self.conn is not None:
            self.conn._lost(self, f"upstream read failed: {exc}")

    def eof_received(self) -> bool:
        return False  # close: the transport calls connection_lost next

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn._lost(self, "upstream closed the connection" if exc is None
                            else f"upstream read failed: {exc}")

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn._set_write_paused(self, True)

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn._set_write_paused(self, False)


class UpstreamOwner(Protocol):
    """What an UpstreamConnection tells the client connection forwarding through it."""

    def upstream_lost(self, reason: str) -> None:
        """The connection dropped while a forwarded request waited for its reply."""

    def upstream_write_paused(self, paused: bool) -> None:
        """The upstream's write buffer went above its high mark (True) or drained (False)."""


class UpstreamConnection:
    """One raw upstream connection: the proxy's own commands and forwarded messages.

    Built on an asyncio Protocol. `forward`/`write` are the synchronous fast path used
    by a client connection; `send`/`receive`/`command` are the awaitable path used for
    the proxy's own requests and the slow paths.
    """

    def __init__(self, config: UpstreamConfig, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 owner: UpstreamOwner | None = None):
        self.config = config
        self.max_message_size = max_message_size
        self.owner = owner
        self._proto: _UpstreamProtocol | None = None
        # The open socket's protocol (None when not connected), for the forwarding fast
        # path: it sets `protocol.sink` and writes to `protocol.transport` directly.
        self.protocol: _UpstreamProtocol | None = None
        self._inbox: deque[bytes] = deque()
        self._error = "upstream connection is not open"
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._proto is not None

    async def connect(self, handshake: dict[str, Any] | None = None, *,
                      authenticate: bool = True) -> dict[str, Any]:
        """Open the socket, send the first hello and authenticate if configured.

        `authenticate=False` leaves authentication to the client, whose own SCRAM
        conversation (speculative in `handshake`, or a saslStart next) must not be
        interleaved with the proxy's. The whole handshake is bounded by the connect
        timeout: an upstream that accepts the TCP connection but never answers is as
        unavailable as one that refuses it.
        """
        cfg = self.config
        try:
            return await asyncio.wait_for(self._connect(handshake, authenticate),
                                          cfg.connect_timeout)
        except TimeoutError as exc:
            self.close()
            raise UpstreamUnavailable(
                f"upstream {cfg.address} did not complete the handshake within "
                f"{cfg.connect_timeout:g}s"
            ) from exc
        except BaseException:
            self.close()
            raise

    async def _connect(self, handshake: dict[str, Any] | None,
                       with_uri_credentials: bool) -> dict[str, Any]:
        cfg = self.config
        self.close()
        loop = asyncio.get_running_loop()
        try:
            _transport, proto = await loop.create_connection(
                lambda: _UpstreamProtocol(self, self.max_message_size), cfg.host, cfg.port,
                ssl=cfg.tls, server_hostname=cfg.server_hostname,
            )
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnavailable(f"cannot connect to upstream {cfg.address}: {exc}") from exc
        self._proto = self.protocol = proto
        self._inbox.clear()
        self._write_paused = False
        if self._read_paused:
            proto.transport.pause_reading()
        hello = {"hello": 1, **(handshake or {})}
        reply = await self.command("admin", hello)
        if with_uri_credentials and cfg.username and cfg.password is not None:
            try:
                await authenticate(self.command, cfg.username, cfg.password, cfg.auth_source)
            except UpstreamUnavailable:
                raise
            except Exception as exc:  # AuthError, or a reply SCRAM cannot read
                raise UpstreamUnavailable(
                    f"authentication to upstream {cfg.address} as {cfg.username!r} failed: {exc}"
                ) from exc
        return reply

    def close(self) -> None:
        proto = self._proto
        if proto is not None:
            self._proto = self.protocol = None
            proto.conn = None
            proto.sink = None
            proto.stop_delivery()
            proto.transport.close()
            self._error = "upstream connection is not open"
            self._wake()

    # -- the synchronous fast path ---------------------------------------------------
    def write(self, data: bytes) -> None:
        """Hand a message to the socket; UpstreamUnavailable when not connected."""
        proto = self._proto
        if proto is None:
            raise UpstreamUnavailable(self._error)
        proto.transport.write(data)

    def forward(self, sink: Callable[[bytes], None]) -> None:
        """Deliver every message to `sink` from now on, until `stop_forwarding`."""
        proto = self._proto
        if proto is not None:
            proto.sink = sink

    def stop_forwarding(self) -> None:
        proto = self._proto
        if proto is not None:
            proto.sink = None

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    def pause_reading(self) -> None:
        """Stop reading replies (the client is not reading its own)."""
        if not self._read_paused:
            self._read_paused = True
            if self._proto is not None:
                self._proto.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            if self._proto is not None:
                self._proto.transport.resume_reading()

    # -- protocol callbacks ----------------------------------------------------------
    def _inbox_put(self, msg: bytes) -> None:
        self._inbox.append(msg)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        drained = self._drained
        if drained is not None and not drained.done() and (
                not self._write_paused or self._proto is None):
            drained.set_result(None)

    def _lost(self, proto: _UpstreamProtocol, reason: str) -> None:
        if proto is not self._proto:
            return
        forwarding = proto.sink is not None
        self.close()
        self._error = reason
        if forwarding and self.owner is not None:
            self.owner.upstream_lost(reason)

    def _set_write_paused(self, proto: _UpstreamProtocol, paused: bool) -> None:
        if proto is not self._proto:
            return
        self._write_paused = paused
        if not paused:
            self._wake()
        if self.owner is not None:
            self.owner.upstream_write_paused(paused)

    # -- the awaitable path ----------------------------------------------------------
    async def send(self, data: bytes) -> None:
        self.write(data)
        while self._write_paused and self._proto is not None:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None
        if self._proto is None:
            raise UpstreamUnavailable(self._error)

    async def receive_raw(self) -> bytes:
        """The next whole message from the upstream, header included."""
        while not self._inbox:
            if self._proto is None:
                raise UpstreamUnavailable(self._error)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._inbox.popleft()

    async def receive(self) -> Frame:
        data = await self.receive_raw()
        _length, request_id, response_to, op_code = HEADER.unpack_from(data)
        return Frame(request_id, response_to, op_code, data[HEADER_SIZE:])

    async def command(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        """Run one command and decode its reply (for the proxy's own requests)."""
        frame = opmsg.build({**body, "$db": db}, request_id=next_request_id())
        async with self._lock:  # one command at a time on the connection
            await self.send(frame.to_bytes())
            reply = await self.receive()
        if reply.op_code != OP_MSG:
            self.close()
            raise UpstreamUnavailable(f"unexpected reply opcode {reply.op_code}")
        try:
            return decode(opmsg.body_bytes(reply))
        except ProtocolError as exc:
            self.close()
            raise UpstreamUnavailable(f"unreadable reply from upstream: {exc}") from exc
