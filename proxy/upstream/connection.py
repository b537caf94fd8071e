"""A raw wire connection to the upstream: one per client connection."""

from __future__ import annotations

import asyncio
import itertools
import ssl
import struct
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pymongo.client_options import ClientOptions

from proxy.upstream.scram import authenticate
from proxy.upstream.topology import STATE_CHANGE_CODES, NoWritableServer, UpstreamTopology
from proxy.wire import compression, opmsg
from proxy.wire.bsonutil import decode, first_key
from proxy.wire.errors import ProtocolError
from proxy.wire.framing import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER,
    HEADER_SIZE,
    OP_COMPRESSED,
    OP_MSG,
    Frame,
    MessageProtocol,
)

_request_ids = itertools.count(1 << 24)
_T = TypeVar("_T")

# Write buffer marks of upstream sockets: above the high one, the client connection that
# writes to it stops reading its client until it drains below the low one.
_WRITE_HIGH = 1 << 20
_WRITE_LOW = 1 << 18
_LENGTH = struct.Struct("<i")
# A "not primary" reply is small: larger replies are never searched for one.
_STATE_CHANGE_MAX = 4096
_OP_MSG_BYTES = struct.pack("<i", OP_MSG)
_OP_COMPRESSED_BYTES = struct.pack("<i", OP_COMPRESSED)
_BODY_AT = HEADER_SIZE + 5  # a plain OP_MSG's command document


def with_labels(msg: bytes, labels: list[str]) -> bytes:
    """An OP_MSG reply with `labels` added to its errorLabels."""
    _length, request_id, response_to, _op = HEADER.unpack_from(msg)
    body = decode(opmsg.body_bytes(Frame(request_id, response_to, OP_MSG, msg[HEADER_SIZE:])))
    have = body.get("errorLabels")
    have = list(have) if isinstance(have, list) else []
    body["errorLabels"] = have + [label for label in labels if label not in have]
    return opmsg.build(body, request_id=request_id, response_to=response_to).to_bytes()


def state_change(msg: bytes) -> tuple[int, dict[str, Any] | None] | None:
    """The SDAM state-change code (NotWritablePrimary, PrimarySteppedDown,
    ShutdownInProgress, InterruptedDueToReplStateChange, ...) of a reply, top level or
    in its writeConcernError, with the reply's topologyVersion; None for any other
    reply."""
    if len(msg) > _STATE_CHANGE_MAX or msg[12:16] != _OP_MSG_BYTES or b"code" not in msg:
        return None
    try:
        body = decode(opmsg.body_bytes(Frame(0, 0, OP_MSG, msg[HEADER_SIZE:])))
    except (ProtocolError, ValueError, IndexError):
        return None
    codes = [body.get("code")]
    wce = body.get("writeConcernError")
    if isinstance(wce, dict):
        codes.append(wce.get("code"))
    version = body.get("topologyVersion")
    for code in codes:
        if isinstance(code, int) and code in STATE_CHANGE_CODES:
            return code, version if isinstance(version, dict) else None
    return None


def deflate(msg: bytes, compressor: int) -> bytes:
    """A request compressed as a driver compresses it: OP_MSG only, never the handshake
    and authentication commands the compression spec names, nor a checksummed message
    or one whose command is not its first section (sent as is, which is always allowed)."""
    if (msg[12:16] != _OP_MSG_BYTES or len(msg) <= _BODY_AT + 5
            or msg[16] & opmsg.CHECKSUM_PRESENT or msg[20] != 0
            or first_key(msg, _BODY_AT) in compression.UNCOMPRESSIBLE):
        return msg
    _length, request_id, response_to, op_code = HEADER.unpack_from(msg)
    return compression.compress(Frame(request_id, response_to, op_code, msg[HEADER_SIZE:]),
                                compressor).to_bytes()


def inflate(msg: bytes, max_size: int) -> bytes:
    """An OP_COMPRESSED reply as the message it holds (ProtocolError when it does not
    decompress); any other message unchanged."""
    if msg[12:16] != _OP_COMPRESSED_BYTES:
        return msg
    _length, request_id, response_to, op_code = HEADER.unpack_from(msg)
    inner, _compressor = compression.decompress(
        Frame(request_id, response_to, op_code, msg[HEADER_SIZE:]), max_size)
    return inner.to_bytes()


def next_request_id() -> int:
    return next(_request_ids) & 0x7FFFFFFF


class UpstreamUnavailable(Exception):
    """The upstream could not be reached or dropped the connection."""


Address = tuple[str, int]


@dataclass(slots=True)
class UpstreamConfig:
    """How the proxy's raw connections reach the upstream, from pymongo's own options.

    Every option comes from `pymongo.client_options.ClientOptions`, the parsed and
    validated form pymongo itself connects with: the TLS context (`tlsCAFile`,
    `tlsCertificateKeyFile`, `tlsAllowInvalidCertificates`, `tlsAllowInvalidHostnames`,
    `tlsInsecure`, ...) is pymongo's own, and so are the credentials (`authSource`,
    `authMechanism`), `appName`, the timeouts and `compressors` (offered in each
    connection's hello; the first the server accepts compresses its requests).
    """

    uri: str
    seeds: list[Address]
    username: str | None = None
    password: str | None = None
    auth_source: str = "admin"
    mechanism: str = "DEFAULT"
    tls: ssl.SSLContext | None = None
    app_name: str | None = None
    connect_timeout: float = 20.0
    # pymongo's socketTimeoutMS: bounds the proxy's own commands (not forwarded ones,
    # which the client's driver times itself).
    socket_timeout: float | None = None
    # The URI's compressors, in its order, that both pymongo and the proxy implement.
    compressors: list[str] = field(default_factory=list)
    # Where a new connection goes (the current primary) and whom to tell when that
    # server stopped taking writes; None: the first seed, as for a standalone.
    topology: UpstreamTopology | None = None

    @classmethod
    def from_options(cls, uri: str, seeds: list[Address], options: ClientOptions,
                     topology: UpstreamTopology | None = None) -> UpstreamConfig:
        pool = options.pool_options
        cred = pool._credentials
        ctx = pool._ssl_context
        settings = pool._compression_settings
        return cls(
            uri=uri,
            seeds=seeds,
            username=cred.username if cred else None,
            password=cred.password if cred else None,
            auth_source=cred.source if cred else "admin",
            mechanism=cred.mechanism if cred else "DEFAULT",
            tls=ctx if isinstance(ctx, ssl.SSLContext) else None,
            app_name=pool.appname,
            connect_timeout=pool.connect_timeout or 20.0,
            socket_timeout=pool.socket_timeout,
            compressors=[name for name in (settings.compressors if settings else [])
                         if name in compression.NAMES],
            topology=topology,
        )

    @property
    def address(self) -> str:
        """The seed list, for messages."""
        return ",".join(f"{h}:{p}" for h, p in self.seeds)

    async def locate(self) -> Address:
        """Where to open the next connection."""
        if self.topology is None:
            return self.seeds[0]
        try:
            return await self.topology.select()
        except NoWritableServer as exc:
            raise UpstreamUnavailable(f"no writable upstream server among {self.address}: "
                                      f"{exc}") from exc


class _UpstreamProtocol(MessageProtocol):
    """The socket side of an UpstreamConnection: whole reply messages, in order.

    While a client connection forwards through it, `sink` receives every message
    straight from `data_received`; otherwise messages queue for `UpstreamConnection.receive`.
    """

    def __init__(self, conn: UpstreamConnection, max_message_size: int):
        super().__init__(max_message_size)
        self.conn: UpstreamConnection | None = conn
        self.sink: Callable[[bytes], None] | None = None
        # The compressor the server accepted in the handshake: requests are compressed
        # with it and compressed replies decompressed before anyone sees them.
        self.compressor: int | None = None
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport instances

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH, low=_WRITE_LOW)

    def data_received(self, data: bytes) -> None:
        # The fast path: exactly one whole message while a client forwards through here.
        sink = self.sink
        if (sink is not None and not self._buf and len(data) >= HEADER_SIZE
                and _LENGTH.unpack_from(data)[0] == len(data)):
            if self.compressor is not None:
                try:
                    data = inflate(data, self.max_message_size)
                except ProtocolError as exc:
                    self.frame_error(exc)
                    return
            conn = self.conn
            if conn is not None and (len(data) <= _STATE_CHANGE_MAX or conn._retiring):
                data = conn._before_reply(data)
            sink(data)
        else:
            MessageProtocol.data_received(self, data)

    def message_received(self, msg: bytes) -> None:
        if self.compressor is not None:
            try:
                msg = inflate(msg, self.max_message_size)
            except ProtocolError as exc:
                self.frame_error(exc)
                return
        sink = self.sink
        conn = self.conn
        if conn is not None and (len(msg) <= _STATE_CHANGE_MAX or conn._retiring):
            msg = conn._before_reply(msg)
        if sink is not None:
            sink(msg)
        elif conn is not None:
            conn._inbox_put(msg)

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

    def retry_labels(self) -> list[str]:
        """The error labels a network-class error of the request in flight gets."""


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
        # The server the open socket goes to (the primary when it was opened).
        self.address: Address | None = None
        self._retiring = False

    @property
    def connected(self) -> bool:
        return self._proto is not None

    async def connect(self, handshake: dict[str, Any] | None = None, *,
                      authenticate: bool = True,
                      address: Address | None = None) -> dict[str, Any]:
        """Open the socket to the current primary, send the first hello and authenticate
        if configured.

        `authenticate=False` leaves authentication to the client, whose own SCRAM
        conversation (speculative in `handshake`, or a saslStart next) must not be
        interleaved with the proxy's. Finding the primary waits while an election is
        under way (pymongo's server selection timeout); the handshake itself is bounded
        by the connect timeout: an upstream that accepts the TCP connection but never
        answers is as unavailable as one that refuses it. `address`: that member instead
        (the one a read preference selected).
        """
        cfg = self.config
        self.close()
        if address is None:
            address = await cfg.locate()
        try:
            return await asyncio.wait_for(self._connect(address, handshake, authenticate),
                                          cfg.connect_timeout)
        except TimeoutError as exc:
            self.close()
            raise UpstreamUnavailable(
                f"upstream {address[0]}:{address[1]} did not complete the handshake within "
                f"{cfg.connect_timeout:g}s"
            ) from exc
        except BaseException:
            self.close()
            raise

    async def _connect(self, address: Address, handshake: dict[str, Any] | None,
                       with_uri_credentials: bool) -> dict[str, Any]:
        cfg = self.config
        host, port = address
        where = f"{host}:{port}"
        loop = asyncio.get_running_loop()
        try:
            _transport, proto = await loop.create_connection(
                lambda: _UpstreamProtocol(self, self.max_message_size), host, port,
                ssl=cfg.tls, server_hostname=host if cfg.tls is not None else None,
            )
        except (OSError, ssl.SSLError) as exc:
            if cfg.topology is not None:
                await cfg.topology.failed(address, None)
            raise UpstreamUnavailable(f"cannot connect to upstream {where}: {exc}") from exc
        self._proto = self.protocol = proto
        self.address = address
        if cfg.topology is not None:
            cfg.topology.opened(self)
        self._inbox.clear()
        self._write_paused = False
        if self._read_paused:
            proto.transport.pause_reading()
        hello = {"hello": 1, **(handshake or {})}
        if cfg.app_name and "client" not in hello:
            hello["client"] = {"application": {"name": cfg.app_name}}
        if with_uri_credentials and cfg.username and cfg.mechanism == "DEFAULT":
            hello.setdefault("saslSupportedMechs", f"{cfg.auth_source}.{cfg.username}")
        if cfg.compressors:
            hello["compression"] = cfg.compressors
        reply = await self.command("admin", hello)
        accepted = reply.get("compression")
        if cfg.compressors and isinstance(accepted, list):
            # As a driver: the first of its own compressors the server also named.
            agreed = [name for name in cfg.compressors if name in accepted]
            if agreed:
                proto.compressor = compression.NAMES[agreed[0]]
        if with_uri_credentials and cfg.username:
            try:
                await authenticate(self.command, cfg.username, cfg.password, cfg.auth_source,
                                   cfg.mechanism, reply)
            except UpstreamUnavailable:
                raise
            except Exception as exc:  # AuthError, or a reply SCRAM cannot read
                raise UpstreamUnavailable(
                    f"authentication to upstream {where} as {cfg.username!r} failed: {exc}"
                ) from exc
        return reply

    def close(self) -> None:
        proto = self._proto
        if proto is not None:
            if self.config.topology is not None:
                self.config.topology.closed(self)
            self._proto = self.protocol = None
            self._retiring = False
            proto.conn = None
            proto.sink = None
            proto.stop_delivery()
            proto.transport.close()
            self._error = "upstream connection is not open"
            self._wake()

    # -- the synchronous fast path ---------------------------------------------------
    def write(self, data: bytes, *more: bytes) -> None:
        """Hand messages to the socket in one write (each compressed when the server
        agreed to it); UpstreamUnavailable when not connected."""
        proto = self._proto
        if proto is None:
            raise UpstreamUnavailable(self._error)
        if more:
            if proto.compressor is not None:
                data = b"".join(deflate(msg, proto.compressor) for msg in (data, *more))
            else:
                data = b"".join((data, *more))
        elif proto.compressor is not None:
            data = deflate(data, proto.compressor)
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

    def _before_reply(self, msg: bytes) -> bytes:
        """Before a small reply is delivered: a state-change error retires every connection
        to that server, and a retired connection closes with its last reply. Closed first,
        so that whatever the reply sets off next opens a connection to the new primary;
        the reply itself is still delivered, with the labels that make the client's driver
        retry it (as mongos labels a shard's state-change errors)."""
        change = state_change(msg)
        if change is None or self.address is None:
            if self._retiring and not (msg[12:16] == _OP_MSG_BYTES and len(msg) > HEADER_SIZE
                                       and msg[16] & opmsg.MORE_TO_COME):
                self.close()
            return msg
        address = self.address
        self.close()
        if self.config.topology is not None:
            self.config.topology.report(address, *change)
        labels = self.owner.retry_labels() if self.owner is not None else []
        return with_labels(msg, labels) if labels else msg

    def retire(self) -> None:
        """The server stopped being the primary: close now if idle, else after the reply
        in flight (the next request then opens a connection to the new primary)."""
        proto = self._proto
        if proto is None:
            return
        if proto.sink is None and not self._lock.locked() and self._waiter is None:
            self.close()
        else:
            self._retiring = True

    def _lost(self, proto: _UpstreamProtocol, reason: str) -> None:
        if proto is not self._proto:
            return
        forwarding = proto.sink is not None
        # Only a connection lost in the middle of a request says something about the
        # server: one it closed while idle (SecantusDB does after 300 s) does not.
        busy = forwarding or self._lock.locked() or self._waiter is not None
        address = self.address
        self.close()
        if busy and address is not None and self.config.topology is not None:
            self.config.topology.report(address, None)
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
        """Run one command and decode its reply (for the proxy's own requests), bounded by
        the URI's socketTimeoutMS as pymongo bounds its own."""
        return await self._bounded(self._command(db, body), next(iter(body), "?"))

    async def commands(self, *requests: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Run several commands pipelined, in one write, and decode their replies in
        order: the server runs them one after the other on this connection, so the last
        one's reply reflects everything the earlier ones saw, for no extra round trip."""
        return await self._bounded(self._commands(requests), next(iter(requests[0][1]), "?"))

    async def raw_commands(self, *requests: tuple[str, dict[str, Any]]) -> list[bytes]:
        """As `commands`, the replies' body sections left undecoded (a reply passed on
        unchanged needs no decoding)."""
        return await self._bounded(self._raw_commands(requests),
                                   next(iter(requests[0][1]), "?"))

    async def _bounded(self, work: Coroutine[Any, Any, _T], name: str) -> _T:
        """An exchange bounded by the URI's socketTimeoutMS: past it the connection is
        closed (its reply could still arrive and answer the next request)."""
        timeout = self.config.socket_timeout
        if timeout is None:
            return await work
        try:
            return await asyncio.wait_for(work, timeout)
        except TimeoutError as exc:
            self.close()
            raise UpstreamUnavailable(
                f"upstream did not answer {name} within {timeout:g}s (socketTimeoutMS)"
            ) from exc

    async def _command(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        return (await self._commands(((db, body),)))[0]

    async def _commands(self, requests: tuple[tuple[str, dict[str, Any]], ...]
                        ) -> list[dict[str, Any]]:
        out = []
        for body in await self._raw_commands(requests):
            try:
                out.append(decode(body))
            except ProtocolError as exc:
                self.close()
                raise UpstreamUnavailable(f"unreadable reply from upstream: {exc}") from exc
        return out

    async def _raw_commands(self, requests: tuple[tuple[str, dict[str, Any]], ...]
                            ) -> list[bytes]:
        data = b"".join(opmsg.build({**body, "$db": db}, request_id=next_request_id()).to_bytes()
                        for db, body in requests)
        async with self._lock:  # one exchange at a time on the connection
            await self.send(data)
            replies = [await self.receive() for _ in requests]
        out = []
        for reply in replies:
            if reply.op_code != OP_MSG:
                self.close()
                raise UpstreamUnavailable(f"unexpected reply opcode {reply.op_code}")
            try:
                out.append(opmsg.body_bytes(reply))
            except ProtocolError as exc:
                self.close()
                raise UpstreamUnavailable(f"unreadable reply from upstream: {exc}") from exc
        return out
