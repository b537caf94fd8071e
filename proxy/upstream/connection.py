"""A raw wire connection to the upstream: one per client connection."""

from __future__ import annotations

import asyncio
import itertools
import ssl
from dataclasses import dataclass, field
from typing import Any

from pymongo import uri_parser

from proxy.upstream.scram import authenticate
from proxy.wire import opmsg
from proxy.wire.bsonutil import decode
from proxy.wire.errors import ProtocolError
from proxy.wire.framing import DEFAULT_MAX_MESSAGE_SIZE, OP_MSG, Frame, read_frame

_request_ids = itertools.count(1 << 24)


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


class UpstreamConnection:
    """Sends frames and reads replies; handles moreToCome on both sides."""

    def __init__(self, config: UpstreamConfig, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE):
        self.config = config
        self.max_message_size = max_message_size
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.bytes_out = 0
        self.bytes_in = 0

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

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
        try:
            self._reader, self._writer = await asyncio.open_connection(
                cfg.host, cfg.port, ssl=cfg.tls, server_hostname=cfg.server_hostname,
                limit=1 << 20,
            )
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnavailable(f"cannot connect to upstream {cfg.address}: {exc}") from exc
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

    async def ensure(self, handshake: dict[str, Any] | None = None) -> None:
        if not self.connected:
            await self.connect(handshake)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def send(self, data: bytes) -> None:
        if self._writer is None:
            raise UpstreamUnavailable("upstream connection is not open")
        try:
            self._writer.write(data)
            self.bytes_out += len(data)
            if self._writer.transport.get_write_buffer_size() > 1 << 20:
                await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            self.close()
            raise UpstreamUnavailable(f"upstream write failed: {exc}") from exc

    async def receive(self) -> Frame:
        if self._reader is None:
            raise UpstreamUnavailable("upstream connection is not open")
        try:
            frame = await read_frame(self._reader, self.max_message_size)
        except (OSError, ProtocolError) as exc:
            self.close()
            raise UpstreamUnavailable(f"upstream read failed: {exc}") from exc
        if frame is None:
            self.close()
            raise UpstreamUnavailable("upstream closed the connection")
        self.bytes_in += 16 + len(frame.payload)
        return frame

    async def command(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        """Run one command and decode its reply (for the proxy's own requests)."""
        frame = opmsg.build({**body, "$db": db}, request_id=next_request_id())
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
