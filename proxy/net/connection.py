"""One client connection: framing, decompression, handshake, dispatch, forwarding."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from proxy import metrics
from proxy.net import handshake
from proxy.net.router import CommandError, Router
from proxy.upstream.connection import (
    UpstreamConfig,
    UpstreamConnection,
    UpstreamUnavailable,
    next_request_id,
)
from proxy.wire import compression, legacy, opmsg
from proxy.wire.bsonutil import decode
from proxy.wire.errors import ProtocolError
from proxy.wire.framing import OP_COMPRESSED, OP_MSG, OP_QUERY, Frame, read_frame

log = logging.getLogger("mongobranch.conn")
_connection_ids = itertools.count(1)

# Never compressed, per the compression spec.
_UNCOMPRESSIBLE = frozenset({
    "hello", "isMaster", "ismaster", "saslStart", "saslContinue", "getnonce", "authenticate",
    "createUser", "updateUser", "copydbSaslStart", "copydbgetnonce", "copydb",
})


# Commands by which a client authenticates itself.
_CLIENT_AUTH = frozenset({"saslStart", "authenticate"})

# Commands a driver may retry with the same txnNumber (the retryable-writes spec).
_RETRYABLE_WRITES = frozenset({
    "insert", "update", "delete", "findAndModify", "findandmodify", "bulkWrite",
    "commitTransaction", "abortTransaction",
})


def host_unreachable(message: str, command: dict[str, Any] | None = None) -> dict[str, Any]:
    """The reply when the upstream cannot be reached, labelled as mongos labels it."""
    reply: dict[str, Any] = {"ok": 0.0, "errmsg": message, "code": 6,
                             "codeName": "HostUnreachable"}
    labels = error_labels(command) if command is not None else []
    if labels:
        reply["errorLabels"] = labels
    return reply


def error_labels(command: dict[str, Any]) -> list[str]:
    """Labels for a network-class error, so drivers retry what is safe to retry."""
    name = next(iter(command), "")
    if command.get("autocommit") is False and name not in ("commitTransaction",
                                                           "abortTransaction"):
        return ["TransientTransactionError"]
    if "txnNumber" in command and name in _RETRYABLE_WRITES:
        return ["RetryableWriteError"]
    return []


class ClientConnection:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: UpstreamConfig,
        topology: handshake.Topology,
        router: Router,
        listener: str,
        stopping: asyncio.Event,
    ):
        self.reader = reader
        self.writer = writer
        self.router = router
        self.topology = topology
        self.listener = listener
        self.stopping = stopping
        self.connection_id = next(_connection_ids)
        self.upstream = UpstreamConnection(upstream, topology.info.max_message_size_bytes)
        self.app_name: str | None = None
        self.user: str | None = None
        self.client_metadata: dict[str, Any] | None = None
        self.compressors: list[str] = []
        self.busy = False
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    # -- the Context protocol the routers use -----------------------------------
    async def upstream_command(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        await self._ensure_upstream()
        try:
            return await self.upstream.command(db, body)
        except UpstreamUnavailable:
            metrics.UPSTREAM_ERRORS.inc()
            raise

    async def _ensure_upstream(self, hello: dict[str, Any] | None = None, *,
                               client_auth: bool = False) -> dict[str, Any] | None:
        """Connect upstream if needed; the upstream's hello reply when this connected.

        With `client_auth` the client is about to authenticate itself, so the URI's
        credentials are not used on this connection: the client's identity is the one
        the upstream sees, and its SCRAM conversation is not interleaved with the proxy's.
        """
        if self.upstream.connected:
            return None
        first = hello or handshake.upstream_hello({"client": self.client_metadata}
                                                  if self.client_metadata else {})
        try:
            return await self.upstream.connect(first, authenticate=not client_auth)
        except UpstreamUnavailable:
            metrics.UPSTREAM_ERRORS.inc()
            raise

    # -- main loop ----------------------------------------------------------------
    async def serve(self) -> None:
        gauge = metrics.OPEN_CONNECTIONS.labels(self.listener)
        gauge.inc()
        try:
            while not self.stopping.is_set():
                frame = await read_frame(self.reader, self.topology.info.max_message_size_bytes)
                if frame is None:
                    break
                metrics.BYTES_IN.inc(16 + len(frame.payload))
                self.busy = True
                try:
                    await self._dispatch(frame)
                    # Still busy until the reply is on its way: a shutdown waits for it.
                    await self.writer.drain()
                finally:
                    self.busy = False
        except ProtocolError as exc:
            metrics.PROTOCOL_ERRORS.inc()
            log.warning("closing connection %d from %s: %s", self.connection_id, self.peer, exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            metrics.PROTOCOL_ERRORS.inc()
            log.exception("closing connection %d from %s: unexpected error", self.connection_id,
                          self.peer)
        finally:
            gauge.dec()
            self.upstream.close()
            self.writer.close()

    async def _dispatch(self, frame: Frame) -> None:
        compressor: int | None = None
        if frame.op_code == OP_COMPRESSED:
            frame, compressor = compression.decompress(
                frame, self.topology.info.max_message_size_bytes
            )
        if frame.op_code == OP_MSG:
            await self._on_msg(frame, compressor)
        elif frame.op_code == OP_QUERY:
            await self._on_query(frame)
        else:
            raise ProtocolError(f"unsupported opCode {frame.op_code}")

    def _write(self, frame: Frame, compressor: int | None, name: str) -> None:
        if compressor is not None and name not in _UNCOMPRESSIBLE:
            frame = compression.compress(frame, compressor)
        data = frame.to_bytes()
        try:
            self.writer.write(data)  # first: the reply leaves before the bookkeeping
        finally:
            metrics.BYTES_OUT.inc(len(data))

    def _reply(self, body: dict[str, Any], request: Frame, compressor: int | None,
               name: str) -> None:
        frame = opmsg.build(body, request_id=next_request_id(), response_to=request.request_id)
        self._write(frame, compressor, name)

    async def _on_msg(self, frame: Frame, compressor: int | None) -> None:
        # Flags, checksum and section framing are checked before anything else is done.
        sections = opmsg.split(frame)
        name, flags = sections.name, sections.flags
        metrics.count_request(name)
        started = time.perf_counter()
        try:
            if name in handshake.HELLO_NAMES:
                msg = sections.decode()
                reply = await self._hello(msg.command)
            elif self.router.wants(name):
                msg = sections.decode()
                routed = await self._routed(msg)
                if routed is None:
                    await self._forward(frame, compressor, name, flags, msg.body)
                    return
                reply = routed
            else:
                # Nothing malformed reaches the upstream: the connection that sent it is closed.
                body = sections.validate()
                if name == "saslStart" or name == "authenticate":
                    self._note_user(body)
                await self._forward(frame, compressor, name, flags, body)
                return
            if not flags & opmsg.MORE_TO_COME:
                self._reply(reply, frame, compressor, name)
        finally:
            metrics.LATENCY.observe(time.perf_counter() - started)

    def _note_user(self, cmd: dict[str, Any]) -> None:
        """Remember who authenticates, for the WAL's client identity."""
        user = cmd.get("user")
        if isinstance(user, str):
            self.user = user
            return
        payload = cmd.get("payload")
        if isinstance(payload, bytes):
            for part in payload.split(b","):
                if part.startswith(b"n=") and len(part) > 2:
                    self.user = part[2:].decode("utf-8", "replace").replace("=2C", ",").replace(
                        "=3D", "=")
                    return

    async def _routed(self, msg: opmsg.OpMsg) -> dict[str, Any] | None:
        try:
            return await self.router.handle(self, msg)
        except CommandError as exc:
            return exc.to_reply()
        except UpstreamUnavailable as exc:
            return host_unreachable(str(exc), msg.body)
        except ProtocolError:
            raise
        except Exception as exc:
            log.exception("command %s failed on connection %d", next(iter(msg.body), "?"),
                          self.connection_id)
            return {"ok": 0.0, "errmsg": f"mongobranch internal error: {exc!r}", "code": 1,
                    "codeName": "InternalError"}

    async def _forward(self, frame: Frame, compressor: int | None, name: str, flags: int,
                       body: dict[str, Any] | None = None) -> None:
        try:
            if not self.upstream.connected:  # no coroutine round trip on the hot path
                await self._ensure_upstream(client_auth=name in _CLIENT_AUTH)
            await self.upstream.send(frame.to_bytes())
            if flags & opmsg.MORE_TO_COME:
                return
            while True:
                reply = await self.upstream.receive()
                reply.response_to = frame.request_id
                self._write(reply, compressor, name)
                if reply.op_code != OP_MSG or not opmsg.flags_of(reply) & opmsg.MORE_TO_COME:
                    return
                await self.writer.drain()
        except UpstreamUnavailable as exc:
            metrics.UPSTREAM_ERRORS.inc()
            self.upstream.close()
            if not flags & opmsg.MORE_TO_COME:
                self._reply(host_unreachable(str(exc), body), frame, compressor, name)

    # -- handshake ----------------------------------------------------------------
    async def _hello(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.client_metadata is None and isinstance(request.get("client"), dict):
            self.client_metadata = request["client"]
            app = request["client"].get("application")
            if isinstance(app, dict):
                self.app_name = app.get("name")
        problem = handshake.awaitable_problem(request, self.topology)
        if problem is not None:
            return problem
        negotiated = handshake.negotiate_compression(request)
        if negotiated is not None:
            self.compressors = negotiated
        if handshake.is_streaming(request):
            await self._await_topology_change(request)
        upstream_reply = None
        if any(key in request for key in handshake.UPSTREAM_FIELDS):
            if isinstance(request.get("speculativeAuthenticate"), dict):
                self._note_user(request["speculativeAuthenticate"])
            upstream_hello = handshake.upstream_hello(request)
            try:
                if self.upstream.connected:
                    upstream_hello.pop("client", None)
                    upstream_reply = await self.upstream.command("admin", upstream_hello)
                else:
                    upstream_reply = await self._ensure_upstream(upstream_hello,
                                                                 client_auth=True)
            except UpstreamUnavailable as exc:
                log.info("hello could not reach the upstream: %s", exc)
        return handshake.build_reply(
            request, self.topology, self.connection_id,
            upstream_reply=upstream_reply, negotiated=negotiated,
        )

    async def _await_topology_change(self, request: dict[str, Any]) -> None:
        """Streaming hello: hold the reply until the topology changes, maxAwaitTimeMS passes
        or the proxy stops. A client whose topologyVersion is stale is answered at once."""
        if not self.topology.is_current(request["topologyVersion"]):
            return
        wait = max(0.0, float(request["maxAwaitTimeMS"]) / 1000.0)
        waiters = [asyncio.ensure_future(self.stopping.wait()),
                   asyncio.ensure_future(self.topology.wait_changed())]
        try:
            await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _on_query(self, frame: Frame) -> None:
        query = legacy.parse_query(frame)
        cmd = query.query
        if "$query" in cmd and isinstance(cmd["$query"], dict):
            cmd = cmd["$query"]
        name = next(iter(cmd), "")
        metrics.count_request(name)
        flags = 0
        if query.collection.endswith(".$cmd") and name in handshake.HELLO_NAMES:
            reply = await self._hello(cmd)
        elif query.collection.endswith(".$cmd"):
            # As mongod 6.0+: only the handshake may still use OP_QUERY.
            message = (f"Unsupported OP_QUERY command: {name}. The client driver may require an "
                       f"upgrade. mongobranch only accepts hello and isMaster over OP_QUERY.")
            reply = {"$err": message, "errmsg": message, "ok": 0.0, "code": 352,
                     "codeName": "UnsupportedOpQueryCommand"}
            flags = legacy.QUERY_FAILURE
        else:
            message = ("OP_QUERY is no longer supported. The client driver may require an "
                       f"upgrade (query on {query.collection}).")
            reply = {"$err": message, "errmsg": message, "ok": 0.0, "code": 5739101,
                     "codeName": "Location5739101"}
            flags = legacy.QUERY_FAILURE
        data = legacy.build_reply(reply, request_id=next_request_id(),
                                  response_to=frame.request_id, flags=flags).to_bytes()
        metrics.BYTES_OUT.inc(len(data))
        self.writer.write(data)


def decode_reply(frame: Frame) -> dict[str, Any]:
    return decode(opmsg.body_bytes(frame))
