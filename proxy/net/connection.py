"""One client connection: framing, decompression, dispatch, forwarding.

Built on asyncio Protocols, client side and upstream side. Messages are sliced from
the byte stream in `data_received` and handled one at a time, in order:

* the fast path, for a message forwarded unchanged (not hello, not a command the
  router serves, upstream connected): its framing and top-level BSON structure are
  checked, it is written to the upstream socket from `data_received` itself, and
  each reply is written to the client from the upstream's `data_received`. No task,
  no future, no decode;
* everything else (hello, routed commands, OP_QUERY, connecting the upstream, the
  client's own authentication) runs as a task on the decode + handle path.

Messages that arrive while one is in flight wait in a queue (a driver never sends
the next request before the reply, but moreToCome requests and misbehaving clients
do); reading pauses while the queue is long, while the upstream's write buffer is
full, and the upstream stops being read while the client's write buffer is full.

The slow paths live beside this module: hello in `hello`, legacy OP_QUERY in `opquery`,
the error replies the connection builds itself in `replies`.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from pymongo.errors import PyMongoError

from proxy import metrics
from proxy.metrics import HOT, LATENCY_BUCKETS, PortStats, count_request, observe_latency
from proxy.net import handshake, hello, opquery, reads
from proxy.net.replies import (
    decoded_or_none,
    error_labels,
    host_unreachable,
    internal_error,
    upstream_state_error,
)
from proxy.net.router import Continued, Inline, Passed, Router
from proxy.upstream.connection import (
    UpstreamConfig,
    UpstreamConnection,
    UpstreamUnavailable,
    next_request_id,
)
from proxy.upstream.topology import STATE_CHANGE_CODES, read_preference
from proxy.wire import compression, fastwire, opmsg
from proxy.wire.bsonutil import check_document, decode, first_key
from proxy.wire.errors import CommandError, ProtocolError
from proxy.wire.framing import (
    HEADER,
    HEADER_SIZE,
    OP_COMPRESSED,
    OP_MSG,
    OP_QUERY,
    Frame,
    MessageProtocol,
)

log = logging.getLogger("mongobranch.conn")
_connection_ids = itertools.count(1)

_UNCOMPRESSIBLE = compression.UNCOMPRESSIBLE


# Never on the fast path: answered here (hello), or the client's identity may change.
_SLOW_NAMES = handshake.HELLO_NAMES | handshake.IDENTITY_CHANGES

_OP_MSG_CODE = OP_MSG.to_bytes(4, "little")
_PLAIN_HEAD = opmsg.PLAIN_HEAD
_NOT_PLAIN = opmsg.NOT_PLAIN
_MORE_TO_COME = opmsg.MORE_TO_COME
_BODY_AT = HEADER_SIZE + 5  # a plain OP_MSG's body: after the header, flags and kind byte
_NAME_AT = _BODY_AT + 5  # its first field's name: after the body's length and type byte
_NOT_FAST = _NOT_PLAIN | _MORE_TO_COME
_requests = HOT.requests
_latency_counts = HOT.latency_counts
_LATENCY_BUCKETS = LATENCY_BUCKETS
_bisect_left = bisect.bisect_left
_perf_counter = time.perf_counter
_plain_name = fastwire.plain_name
_check_body = fastwire.check_body
_ROUTABLE = reads.ROUTABLE_COUNTERS
_FAST_NAMES_MAX = 256  # the names are the clients' to choose: the cache stays bounded

# Messages queued beyond these many bytes pause reading from the client.
_QUEUE_HIGH = 1 << 20
_CLIENT_WRITE_HIGH = 1 << 20
_CLIENT_WRITE_LOW = 1 << 18

# Why reading from the client is paused (bits).
_PAUSED_QUEUE = 1
_PAUSED_UPSTREAM = 2

# What the connection is doing.
_IDLE, _FORWARDING, _TASK = 0, 1, 2

# Cluster-time gossip: a reply field pair the server appends after ok.
_GOSSIP = ("$clusterTime", "operationTime")
# The latest pair decoded on any connection, for one that has not talked to the upstream.
_latest_gossip: dict[str, Any] = {}


# The messages of the commands routers send behind inline requests, by the tuple's
# identity (a router's constant): each built once, its request id filled in per use.
_AFTER: dict[int, tuple[tuple[tuple[str, dict[str, Any]], ...], list[bytes]]] = {}
_AFTER_MAX = 64


def _frames(after: tuple[tuple[str, dict[str, Any]], ...]) -> list[bytes]:
    """Fresh messages for `after`, each with a new request id."""
    known = _AFTER.get(id(after))
    if known is None or known[0] is not after:
        if len(_AFTER) >= _AFTER_MAX:
            _AFTER.clear()
        known = _AFTER[id(after)] = (after, [
            opmsg.build({**body, "$db": db}, request_id=0).to_bytes() for db, body in after])
    return [b"".join((msg[:4], next_request_id().to_bytes(4, "little", signed=True),
                      msg[8:])) for msg in known[1]]


def _plain_body(msg: bytes) -> bytes | None:
    """The body of a reply that is a plain OP_MSG (no flags, one body section filling
    the message), else None."""
    if msg[12:16] != _OP_MSG_CODE or len(msg) < HEADER_SIZE + _PLAIN_HEAD.size:
        return None
    flags, kind, length = _PLAIN_HEAD.unpack_from(msg, HEADER_SIZE)
    if flags or kind or length != len(msg) - _BODY_AT:
        return None
    return msg[_BODY_AT:]


def _more_to_come(msg: bytes) -> bool:
    """Whether a reply message says more replies follow (an exhaust stream)."""
    return msg[12:16] == _OP_MSG_CODE and len(msg) > HEADER_SIZE and bool(msg[16] & _MORE_TO_COME)


class ClientConnection(MessageProtocol):
    def __init__(
        self,
        *,
        upstream: UpstreamConfig,
        topology: handshake.Topology,
        router: Router,
        listener: str,
        stopping: asyncio.Event,
        on_closed: Callable[[ClientConnection], None] | None = None,
        on_opened: Callable[[ClientConnection], None] | None = None,
        fast_names: dict[bytes, str] | None = None,
        stats: PortStats | None = None,
        legacy_op_query: bool = True,
        anonymous_as_uri_user: bool = True,
        read_cursors: reads.MemberCursors | None = None,
    ):
        super().__init__(topology.info.max_message_size_bytes)
        # Legacy OP_QUERY commands are translated to OP_MSG; off: refused, as mongod 6.0+.
        self.legacy_op_query = legacy_op_query
        # Whether a client that does not authenticate itself runs as the URI's user; when
        # not, its upstream connection stays unauthenticated and the upstream refuses it.
        self.anonymous_as_uri_user = anonymous_as_uri_user
        self.router = router
        self.topology = topology
        self.listener = listener
        self.stopping = stopping
        self.on_closed = on_closed
        # Called once the transport is up (after the TLS handshake, on a TLS port): a
        # client whose handshake fails never counts as a connection.
        self.on_opened = on_opened
        # Raw command names (the bytes on the wire) whose messages are forwarded unchanged,
        # each with its requests-counter key; shared by the listener's connections.
        self._fast_names: dict[bytes, str] = {} if fast_names is None else fast_names
        self._reply_sink = self._on_reply
        self.connection_id = next(_connection_ids)
        self.upstream = UpstreamConnection(upstream, topology.info.max_message_size_bytes,
                                           owner=self)
        # Reads with a read preference go to the member pymongo selects (the main port in
        # front of a replica set); None: every request stays on the client's own upstream
        # connection (branch ports read from the primary, where the overlay and the WAL
        # are written: a lagging secondary would make a branch read inexact).
        self._read_cursors = read_cursors if upstream.topology is not None else None
        # The client's connections to other members, opened as its reads need them.
        self._members: dict[tuple[str, int], UpstreamConnection] = {}
        self.app_name: str | None = None
        # The authenticated user, as the upstream reports it (see authenticated_user).
        self.user: str | None = None
        # `user` is what the upstream said since the client last ran an auth command.
        self.identity_known = False
        self.client_metadata: dict[str, Any] | None = None
        self._gossip: dict[str, Any] = {}
        self.compressors: list[str] = []
        # The client authenticated itself on its upstream connection: a new upstream
        # connection (after an election) would not carry that identity.
        self.client_authenticated = False
        self.peer = "?"
        self.transport: Any = None
        self._gauge = metrics.OPEN_CONNECTIONS.labels(listener)
        # The port's own figures (per-branch metrics), beside the global ones.
        self._stats = PortStats() if stats is None else stats
        self._state = _IDLE
        self._task: asyncio.Task[None] | None = None
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._read_paused = 0
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._eof = False
        self._shutting_down = False
        self._closing = False
        self._lost = False
        self._reported_closed = False
        # The name of a request a task is forwarding unchanged (slow path), if any.
        self._forwarding_task: str | None = None
        # The forwarded request in flight (fast path).
        self._req_started = 0.0
        self._req_compressor: int | None = None
        self._req_name = ""
        self._req_msg = b""
        self._req_body: bytes | None = None  # None: the plain body of _req_msg
        # A routed request answered inline (Router.inline), and the replies in so far.
        self._inline: Inline | None = None
        self._inline_replies: list[bytes] = []

    @property
    def busy(self) -> bool:
        """A request is in flight or waiting: a shutdown lets it finish first."""
        return self._state != _IDLE or bool(self._queue)

    def forwarding(self, names: frozenset[str]) -> bool:
        """Whether a request with one of these command names is being forwarded unchanged
        right now (its reply not yet back)."""
        if self._forwarding_task in names:
            return True
        if self._state != _FORWARDING:
            return False
        if self._req_compressor is not None or self._req_body is not None:
            return self._req_name in names
        try:  # the inline fast path keeps only the message
            return first_key(self._req_msg, _BODY_AT) in names
        except Exception:
            return True

    # -- the Context protocol the routers use -----------------------------------
    async def upstream_command(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        return (await self.upstream_commands((db, body)))[0]

    async def upstream_commands(self, *requests: tuple[str, dict[str, Any]]
                                ) -> list[dict[str, Any]]:
        await self.ensure_upstream()
        try:
            replies = await self.upstream.commands(*requests)
        except UpstreamUnavailable:
            metrics.UPSTREAM_ERRORS.inc()
            raise
        for reply in replies:
            if "operationTime" in reply or "$clusterTime" in reply:
                gossip = {key: reply[key] for key in _GOSSIP if key in reply}
                self._gossip = gossip
                _latest_gossip.clear()
                _latest_gossip.update(gossip)
        return replies

    async def upstream_raw(self, *requests: tuple[str, dict[str, Any]]) -> list[bytes]:
        await self.ensure_upstream()
        try:
            return await self.upstream.raw_commands(*requests)
        except UpstreamUnavailable:
            metrics.UPSTREAM_ERRORS.inc()
            raise

    @property
    def as_uri_user(self) -> bool:
        """Whether the upstream knows this client as the --upstream URI's user: it did
        not authenticate, and the operator lends anonymous clients that user."""
        return not self.client_authenticated and self.anonymous_as_uri_user

    @property
    def gossip(self) -> dict[str, Any]:
        return self._gossip or _latest_gossip

    async def ensure_upstream(self, first_hello: dict[str, Any] | None = None, *,
                              client_auth: bool = False) -> dict[str, Any] | None:
        """Connect upstream if needed; the upstream's hello reply when this connected.

        With `client_auth` the client is about to authenticate itself, so the URI's
        credentials are not used on this connection: the client's identity is the one
        the upstream sees, and its SCRAM conversation is not interleaved with the proxy's.
        """
        if self.upstream.connected:
            return None
        if self.client_authenticated and not client_auth:
            # The upstream moved (an election) under a client that authenticated itself:
            # a network error makes its driver reconnect and authenticate again there.
            raise ConnectionError("the upstream connection moved; the client reconnects")
        first = first_hello or handshake.upstream_hello({"client": self.client_metadata}
                                                        if self.client_metadata else {})
        try:
            return await self.upstream.connect(
                first, authenticate=self.anonymous_as_uri_user and not client_auth)
        except UpstreamUnavailable:
            metrics.UPSTREAM_ERRORS.inc()
            raise

    # -- transport callbacks --------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=_CLIENT_WRITE_HIGH, low=_CLIENT_WRITE_LOW)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._gauge.inc()
        if self.on_opened is not None:
            self.on_opened(self)
        if self.stopping.is_set():
            self._close()

    def data_received(self, data: bytes) -> None:
        # The fast path, inline: exactly one whole plain OP_MSG whose command is forwarded
        # unchanged, with nothing buffered, queued or in flight and the upstream connected.
        if (not self._state and not self._buf and not self._queue and not self._write_paused
                and self._reading):
            raw = _plain_name(data, _NOT_FAST)
            if raw is not None:
                counter = self._fast_names.get(raw)
                proto = self.upstream.protocol
                cursors = self._read_cursors
                if (counter is not None and proto is not None and proto.compressor is None
                        and (cursors is None or counter not in _ROUTABLE
                             or not reads.wants_member_raw(data, _BODY_AT, cursors))):
                    HOT.bytes_in += len(data)
                    _requests[counter] += 1
                    # The body's top level (fastwire); what it refuses, check_document decides.
                    if not _check_body(data, _BODY_AT, len(data)):
                        try:
                            check_document(data, _BODY_AT, len(data))
                        except ProtocolError as exc:
                            self._protocol_error(exc)
                            return
                    self._state = _FORWARDING
                    self._req_started = _perf_counter()
                    self._req_msg = data
                    self._req_body = None
                    proto.sink = self._reply_sink
                    proto.transport.write(data)
                    return
        MessageProtocol.data_received(self, data)

    def message_received(self, msg: bytes) -> None:
        if self._state or self._queue or self._write_paused:
            self._enqueue(msg)
            return
        self._process(msg)

    def frame_error(self, exc: ProtocolError) -> None:
        self._protocol_error(exc)

    def eof_received(self) -> bool:
        partial = self.partial_message_error()
        if partial is not None:
            self._protocol_error(partial)
            return False
        if self._state == _IDLE and not self._queue:
            return False  # the transport closes itself
        self._eof = True  # answer what is in flight, then close
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._closing = True
        self.stop_delivery()
        self._gauge.dec()
        self._queue.clear()
        self._wake_drain()
        if self._state == _FORWARDING:
            self._state = _IDLE
            self._inline_abandoned()
        if self._task is None:
            self._finish()
        # else: the task runs to its end (a routed command is not cut in the middle);
        # _task_done finishes.

    def pause_writing(self) -> None:
        self._write_paused = True
        self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self.upstream.resume_reading()
        self._wake_drain()
        if self._state == _IDLE:
            self._next()

    # -- UpstreamOwner --------------------------------------------------------------
    def upstream_lost(self, reason: str) -> None:
        """The upstream dropped while the fast path waited for a reply."""
        if self._state != _FORWARDING:
            return
        metrics.UPSTREAM_ERRORS.inc()
        self._inline_abandoned()
        if self.client_authenticated:
            self._close()  # a network error: the driver retries on a new connection
            self._forward_done()
            return
        msg = self._req_msg
        body = msg[_BODY_AT:] if self._req_body is None else self._req_body
        reply = host_unreachable(reason, decoded_or_none(body))
        frame = opmsg.build(reply, request_id=next_request_id(),
                            response_to=HEADER.unpack_from(msg)[1])
        self._write(frame, self._req_compressor, self._req_name)
        self._forward_done()

    def retry_labels(self) -> list[str]:
        body = self._req_msg[_BODY_AT:] if self._req_body is None else self._req_body
        command = decoded_or_none(body) if body else None
        return error_labels(command) if command is not None else []

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self._pause_reading(_PAUSED_UPSTREAM)
        else:
            self._resume_reading(_PAUSED_UPSTREAM)

    # -- the queue and the state machine ---------------------------------------------
    def _enqueue(self, msg: bytes) -> None:
        self._queue.append(msg)
        self._queued += len(msg)
        if self._queued > _QUEUE_HIGH:
            self._pause_reading(_PAUSED_QUEUE)

    def _next(self) -> None:
        """Idle again: handle queued messages, or close if that is what is left to do."""
        queue = self._queue
        while queue and self._state == _IDLE and not self._write_paused and not self._closing:
            msg = queue.popleft()
            self._queued -= len(msg)
            self._process(msg)
        if self._read_paused & _PAUSED_QUEUE and self._queued <= _QUEUE_HIGH // 4:
            self._resume_reading(_PAUSED_QUEUE)
        if self._state == _IDLE and not queue and (self._eof or self._shutting_down):
            self._close()

    def _pause_reading(self, why: int) -> None:
        if not self._read_paused and not self._closing:
            self.transport.pause_reading()
        self._read_paused |= why

    def _resume_reading(self, why: int) -> None:
        if not self._read_paused & why:
            return
        self._read_paused &= ~why
        if not self._read_paused and not self._closing:
            self.transport.resume_reading()

    def shutdown(self) -> None:
        """The listener stops: close now if idle, else once the request in flight is answered."""
        self._shutting_down = True
        if self._state == _IDLE and not self._queue:
            self._close()

    def abort(self) -> None:
        """The grace period is over: drop the connection and whatever it was doing."""
        if self._task is not None:
            self._task.cancel()
        if self.transport is not None and not self._lost:
            self.transport.abort()

    def _close(self) -> None:
        if not self._closing:
            self._closing = True
            self.stop_delivery()
            self.transport.close()  # flushes what is buffered first

    def _finish(self) -> None:
        """The client is gone and nothing runs for it any more."""
        self.upstream.close()
        for member in self._members.values():
            member.close()
        if not self._reported_closed:
            self._reported_closed = True
            if self.on_closed is not None:
                self.on_closed(self)

    def _protocol_error(self, exc: ProtocolError) -> None:
        metrics.PROTOCOL_ERRORS.inc()
        log.warning("closing connection %d from %s: %s", self.connection_id, self.peer, exc)
        self._close()

    # -- one message ----------------------------------------------------------------
    def _process(self, msg: bytes) -> None:
        HOT.bytes_in += len(msg)
        try:
            if msg[12:16] == _OP_MSG_CODE and len(msg) >= HEADER_SIZE + _PLAIN_HEAD.size:
                flags, kind, length = _PLAIN_HEAD.unpack_from(msg, HEADER_SIZE)
                if kind == 0 and length == len(msg) - _BODY_AT and not flags & _NOT_PLAIN:
                    # A plain OP_MSG: no checksum, one body section filling the message.
                    name = first_key(msg, _BODY_AT)
                    count_request(name)
                    if self._is_fast(name, msg) and self.upstream.connected:
                        if not _check_body(msg, _BODY_AT, len(msg)):
                            check_document(msg, _BODY_AT, len(msg))
                        self._forward_now(msg, None, name, flags, None)
                        return
                    if not flags and name not in _SLOW_NAMES and self.upstream.connected:
                        if not _check_body(msg, _BODY_AT, len(msg)):
                            check_document(msg, _BODY_AT, len(msg))
                        inline = self.router.inline(self, name, msg[_BODY_AT:])
                        if inline is not None:
                            self._inline_now(msg, name, inline)
                            return
                    _len, request_id, response_to, _op = HEADER.unpack_from(msg)
                    frame = Frame(request_id, response_to, OP_MSG, msg[HEADER_SIZE:])
                    sections = opmsg.Sections(flags, msg[_BODY_AT:])
                    self._start(self._on_msg(frame, sections, None, time.perf_counter()))
                    return
            self._general(msg)
        except ProtocolError as exc:
            self._protocol_error(exc)
        except Exception:
            # A bug must not leave the connection open and silent (the client would wait
            # forever, and a queued message would never be answered): close it.
            metrics.PROTOCOL_ERRORS.inc()
            log.exception("closing connection %d from %s: unexpected error", self.connection_id,
                          self.peer)
            self._close()

    def _is_fast(self, name: str, msg: bytes) -> bool:
        """Whether a plain OP_MSG with this command is forwarded unchanged; remembered."""
        if name in _SLOW_NAMES or self.router.wants(name):
            return False
        cursors = self._read_cursors
        if cursors is not None and reads.wants_member(name, msg, _BODY_AT, cursors):
            return False
        if len(self._fast_names) < _FAST_NAMES_MAX and msg[_BODY_AT + 4]:
            raw = msg[_NAME_AT : msg.find(b"\x00", _NAME_AT)]
            self._fast_names[raw] = name if name in _requests else "other"
        return True

    def _general(self, msg: bytes) -> None:
        """Anything but a plain OP_MSG: compressed, checksummed, sequences, OP_QUERY."""
        _len, request_id, response_to, op_code = HEADER.unpack_from(msg)
        frame = Frame(request_id, response_to, op_code, msg[HEADER_SIZE:])
        compressor: int | None = None
        if op_code == OP_COMPRESSED:
            frame, compressor = compression.decompress(
                frame, self.topology.info.max_message_size_bytes
            )
        if frame.op_code == OP_MSG:
            # Flags, checksum and section framing are checked before anything else is done.
            sections = opmsg.split(frame)
            name = sections.name
            count_request(name)
            started = time.perf_counter()
            cursors = self._read_cursors
            if (name not in _SLOW_NAMES and self.upstream.connected
                    and not self.router.wants(name)
                    and (cursors is None or not reads.wants_member(name, sections.body, 0,
                                                                   cursors))):
                sections.validate()
                data = msg if compressor is None else frame.to_bytes()
                self._forward_now(data, compressor, name, sections.flags, sections.body,
                                  started)
                return
            self._start(self._on_msg(frame, sections, compressor, started))
        elif frame.op_code == OP_QUERY:
            self._start(self._on_query(frame))
        else:
            raise ProtocolError(f"unsupported opCode {frame.op_code}")

    def _forward_now(self, msg: bytes, compressor: int | None, name: str, flags: int,
                     body: bytes | None, started: float | None = None) -> None:
        """Forward now (the fast path but for the general framing): the message goes to
        the upstream socket, replies come to `_on_reply` from the upstream's data_received."""
        upstream = self.upstream
        if flags & _MORE_TO_COME:
            upstream.write(msg)  # no reply to wait for
            return
        self._state = _FORWARDING
        self._req_started = time.perf_counter() if started is None else started
        self._req_compressor = compressor
        self._req_name = name
        self._req_msg = msg
        self._req_body = body
        upstream.forward(self._reply_sink if compressor is None else self._on_compressed_reply)
        upstream.write(msg)

    def _on_reply(self, msg: bytes) -> None:
        """A reply on the fast path, forwarded as the upstream sent it."""
        if not self._closing:
            self.transport.write(msg)
        HOT.bytes_out += len(msg)
        if len(msg) > HEADER_SIZE and msg[16] & _MORE_TO_COME and msg[12:16] == _OP_MSG_CODE:
            return  # an exhaust stream: more replies follow
        # observe_latency and the port's PortStats.observe, inlined
        started = self._req_started
        elapsed = _perf_counter() - started
        bucket = _bisect_left(_LATENCY_BUCKETS, elapsed)
        _latency_counts[bucket] += 1
        HOT.latency_sum += elapsed
        stats = self._stats
        stats.latency_counts[bucket] += 1
        stats.latency_sum += elapsed
        stats.last_started = started
        self._state = _IDLE
        proto = self.upstream.protocol
        if proto is not None:
            proto.sink = None
        if self._queue or self._eof or self._shutting_down or self._lost:
            self._after_forward()

    def _inline_now(self, msg: bytes, name: str, inline: Inline) -> None:
        """A routed request the router answers inline: it goes to the upstream with the
        router's commands behind it, in one write; `_on_inline_reply` takes the replies."""
        self._state = _FORWARDING
        self._req_started = _perf_counter()
        self._req_compressor = None
        self._req_name = name
        self._req_msg = msg
        self._req_body = None
        self._inline = inline
        self._inline_replies = []
        self.upstream.forward(self._on_inline_reply)
        if inline.after:
            self.upstream.write(msg, *_frames(inline.after))
        else:
            self.upstream.write(msg)

    def _on_inline_reply(self, msg: bytes) -> None:
        """A reply to an inline request or to a command behind it: once all are in, the
        router's check decides between passing the first on and the slow path."""
        inline = self._inline
        if inline is None:
            return
        replies = self._inline_replies
        replies.append(msg)
        complete = len(replies) > len(inline.after)
        if not complete and self.upstream.connected:
            return
        # Complete, or the upstream closed after this reply (a retired connection, a
        # state-change error): the rest will not come, and the slow path reconnects.
        self._inline = None
        self._inline_replies = []
        proto = self.upstream.protocol
        if proto is not None:
            proto.sink = None
        bodies = [body for body in map(_plain_body, replies) if body is not None]
        try:
            if complete and len(bodies) == len(replies):
                passed = inline.check(bodies[0], bodies[1:])
            else:  # cut short, or a reply of another shape: the slow path answers it
                passed = inline.check(None, []) and False
        except Exception:
            log.exception("an inline check failed on connection %d; served the usual way",
                          self.connection_id)
            passed = False
        if not passed:
            self._state = _IDLE
            request = self._req_msg
            self._req_msg = b""
            _len, request_id, response_to, _op = HEADER.unpack_from(request)
            frame = Frame(request_id, response_to, OP_MSG, request[HEADER_SIZE:])
            flags = _PLAIN_HEAD.unpack_from(request, HEADER_SIZE)[0]
            sections = opmsg.Sections(flags, request[_BODY_AT:])
            self._start(self._on_msg(frame, sections, None, self._req_started))
            return
        self._on_reply(replies[0])

    def _inline_abandoned(self) -> None:
        """The exchange of an inline request will not complete: the router gets back
        what it took for it."""
        inline = self._inline
        if inline is None:
            return
        self._inline = None
        self._inline_replies = []
        try:
            inline.check(None, [])
        except Exception:
            log.exception("an inline check failed on connection %d", self.connection_id)

    def _on_compressed_reply(self, msg: bytes) -> None:
        """A reply to a compressed request: compressed the same way, unless it must not be."""
        more = _more_to_come(msg)
        if self._req_name not in _UNCOMPRESSIBLE:
            _len, request_id, response_to, op_code = HEADER.unpack_from(msg)
            msg = compression.compress(
                Frame(request_id, response_to, op_code, msg[HEADER_SIZE:]),
                self._req_compressor or 0,
            ).to_bytes()
        if not self._closing:
            self.transport.write(msg)
        HOT.bytes_out += len(msg)
        if not more:
            self._forward_done()

    def _forward_done(self) -> None:
        elapsed = time.perf_counter() - self._req_started
        observe_latency(elapsed)
        self._stats.observe(self._req_started, elapsed)
        self._state = _IDLE
        self._req_compressor = None
        self.upstream.stop_forwarding()
        self._after_forward()

    def _after_forward(self) -> None:
        self._req_msg = b""
        self._req_body = None
        if self._lost:
            self._finish()
        elif self._queue or self._eof or self._shutting_down:
            self._next()

    # -- the slow path: a task per message ----------------------------------------------
    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        self._state = _TASK
        task = asyncio.get_running_loop().create_task(coro)
        self._task = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        self._state = _IDLE
        if self._lost:
            if not task.cancelled():
                task.exception()  # retrieved: the client is gone, nothing to report to
            self._finish()
            return
        if task.cancelled():
            self._close()
            return
        exc = task.exception()
        if exc is None:
            self._next()
        elif isinstance(exc, ProtocolError):
            self._protocol_error(exc)
        elif isinstance(exc, ConnectionError):
            self._close()
        else:
            metrics.PROTOCOL_ERRORS.inc()
            log.error("closing connection %d from %s: unexpected error", self.connection_id,
                      self.peer, exc_info=exc)
            self._close()

    def _write(self, frame: Frame, compressor: int | None, name: str) -> None:
        if compressor is not None and name not in _UNCOMPRESSIBLE:
            frame = compression.compress(frame, compressor)
        data = frame.to_bytes()
        if not self._closing:
            self.transport.write(data)  # first: the reply leaves before the bookkeeping
        HOT.bytes_out += len(data)

    def _reply(self, body: dict[str, Any] | bytes, request: Frame, compressor: int | None,
               name: str) -> None:
        frame = opmsg.build(body, request_id=next_request_id(), response_to=request.request_id)
        self._write(frame, compressor, name)

    async def _drain(self) -> None:
        while self._write_paused and not self._lost:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None

    def _wake_drain(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def _on_msg(self, frame: Frame, sections: opmsg.Sections, compressor: int | None,
                      started: float) -> None:
        name, flags = sections.name, sections.flags
        try:
            if name in handshake.HELLO_NAMES:
                msg = sections.decode()
                reply = await hello.answer(self, msg.command)
            elif self.router.wants(name):
                msg = sections.decode()
                routed = await self.routed(msg)
                if routed is None:
                    await self._forward(frame, compressor, name, flags, sections.body)
                    return
                if isinstance(routed, Continued):
                    await self._stream(routed, msg, frame, compressor, name)
                    return
                if isinstance(routed, Passed):
                    if not flags & opmsg.MORE_TO_COME:
                        self._reply(routed.body, frame, compressor, name)
                    return
                reply = routed
            else:
                # Nothing malformed reaches the upstream: the connection that sent it is closed.
                sections.validate()
                if name in handshake.CLIENT_AUTH:
                    self.client_authenticated = True
                if name in handshake.IDENTITY_CHANGES:
                    self.identity_known = False
                await self._forward(frame, compressor, name, flags, sections.body)
                return
            if not flags & opmsg.MORE_TO_COME:
                self._reply(reply, frame, compressor, name)
        finally:
            elapsed = time.perf_counter() - started
            observe_latency(elapsed)
            self._stats.observe(started, elapsed)

    async def authenticated_user(self) -> str | None:
        """Who the upstream says this connection is ("user@db"), None when anonymous.

        Asked of the upstream (connectionStatus) on first need and remembered until the
        client runs an authentication command again; a name a client merely claims in a
        SCRAM conversation is never taken for its identity.
        """
        if self.identity_known:
            return self.user
        try:
            reply = await self.upstream_command("admin", {"connectionStatus": 1})
        except UpstreamUnavailable:
            return None
        if reply.get("ok"):
            auth_info = reply.get("authInfo")
            users = auth_info.get("authenticatedUsers") if isinstance(auth_info, dict) else None
            names = [f"{u.get('user')}@{u.get('db')}" for u in users or []
                     if isinstance(u, dict)]
            self.user = ",".join(names) or None
        elif reply.get("code") == 13:
            self.user = None  # SecantusDB refuses connectionStatus before authentication
        else:
            return None
        self.identity_known = True
        return self.user

    async def routed(self, msg: opmsg.OpMsg) -> dict[str, Any] | Continued | Passed | None:
        """The router's reply, any failure turned into an error reply; None to forward."""
        return await self._guarded(lambda: self.router.handle(self, msg), msg)

    async def _stream(self, first: Continued, msg: opmsg.OpMsg, frame: Frame,
                      compressor: int | None, name: str) -> None:
        """An exhaust stream the router answers: every reply but the last flagged
        moreToCome, each answering the one before it, as mongod sends them; it ends early
        when the client goes away, and waits while the client's socket is full."""
        response_to = frame.request_id
        reply: dict[str, Any] | Continued | Passed | None = first
        while isinstance(reply, Continued):
            out = opmsg.build(reply.reply, request_id=next_request_id(),
                              response_to=response_to, flags=opmsg.MORE_TO_COME)
            self._write(out, compressor, name)
            response_to = out.request_id
            await self._drain()
            if self._lost or self._closing:
                return
            reply = await self._guarded(reply.next, msg)
        if reply is None:  # a router that forwards mid-stream: the stream cannot go on
            reply = internal_error(RuntimeError("an exhaust stream ended without a reply"))
        body = reply.body if isinstance(reply, Passed) else reply
        self._write(opmsg.build(body, request_id=next_request_id(), response_to=response_to),
                    compressor, name)

    async def _guarded(self, call: Callable[[], Awaitable[dict[str, Any] | Continued | Passed
                                                         | None]],
                       msg: opmsg.OpMsg) -> dict[str, Any] | Continued | Passed | None:
        try:
            reply = await call()
        except CommandError as exc:
            reply = exc.to_reply()
        except UpstreamUnavailable as exc:
            return host_unreachable(str(exc), msg.body)
        except (ProtocolError, ConnectionError):
            raise
        except PyMongoError as exc:
            failed = upstream_state_error(exc, msg.body)
            if failed is None:
                return self._internal_error(msg, exc)
            return failed
        except Exception as exc:
            return self._internal_error(msg, exc)
        if isinstance(reply, Continued | Passed):  # a Passed reply is a successful one
            return reply
        if reply is not None and not reply.get("ok") and reply.get("code") in STATE_CHANGE_CODES:
            # An election cut the command short: labelled as mongos labels it.
            labels = error_labels(msg.body)
            have = reply.get("errorLabels")
            have = list(have) if isinstance(have, list) else []
            if labels:
                reply["errorLabels"] = have + [lb for lb in labels if lb not in have]
        return reply

    def _internal_error(self, msg: opmsg.OpMsg, exc: Exception) -> dict[str, Any]:
        log.error("command %s failed on connection %d", next(iter(msg.body), "?"),
                  self.connection_id, exc_info=exc)
        return internal_error(exc)

    async def _forward(self, frame: Frame, compressor: int | None, name: str, flags: int,
                       body: bytes) -> None:
        """Forward from a task: connect first if needed, then wait for the replies."""
        self._req_body = body  # for retry_labels
        self._forwarding_task = name
        try:
            cursors = self._read_cursors
            if cursors is not None and reads.wants_member(name, body, 0, cursors):
                try:
                    member = await self._member_for(name, body, cursors)
                except (CommandError, UpstreamUnavailable) as exc:
                    if not flags & opmsg.MORE_TO_COME:
                        self._reply(exc.to_reply() if isinstance(exc, CommandError)
                                    else host_unreachable(str(exc), decoded_or_none(body)),
                                    frame, compressor, name)
                    return
                if member is not None:
                    await self._forward_to_member(*member, frame, compressor, name, flags,
                                                  cursors)
                    return
            if not self.upstream.connected:
                await self.ensure_upstream(client_auth=name in handshake.CLIENT_AUTH)
            await self.upstream.send(frame.to_bytes())
            if flags & opmsg.MORE_TO_COME:
                return
            while True:
                reply = await self.upstream.receive()
                self._write(reply, compressor, name)
                if reply.op_code != OP_MSG or not opmsg.flags_of(reply) & opmsg.MORE_TO_COME:
                    return
                await self._drain()
        except UpstreamUnavailable as exc:
            metrics.UPSTREAM_ERRORS.inc()
            self.upstream.close()
            if not flags & opmsg.MORE_TO_COME:
                self._reply(host_unreachable(str(exc), decoded_or_none(body)), frame,
                            compressor, name)
        finally:
            self._req_body = None
            self._forwarding_task = None

    async def _member_for(self, name: str, body: bytes, cursors: reads.MemberCursors
                          ) -> tuple[UpstreamConnection, tuple[str, int],
                                     dict[str, Any]] | None:
        """The connection to the member this request goes to, when not the primary: the
        member pymongo selects for its read preference, or the one its cursor is on.

        A client that authenticated itself keeps reading on its own connection: a
        connection to another member would run as the URI's user, not as the client."""
        cmd = decode(body)
        if name in reads.CURSOR_NAMES:
            address = cursors.find([cmd.get("getMore")] if name == "getMore"
                                   else cmd.get("cursors"))
        elif (self.client_authenticated or "autocommit" in cmd
              or not reads.is_read(name, cmd)):
            return None
        else:
            topology = self.upstream.config.topology
            assert topology is not None
            address = await topology.select_reader(read_preference(cmd.get("$readPreference")))
        if address is None:
            return None
        member = self._members.get(address)
        if member is None:
            member = self._members[address] = UpstreamConnection(
                self.upstream.config, self.topology.info.max_message_size_bytes)
        if not member.connected:
            try:
                await member.connect(
                    handshake.upstream_hello({"client": self.client_metadata}
                                             if self.client_metadata else {}),
                    authenticate=self.anonymous_as_uri_user, address=address)
            except UpstreamUnavailable:
                metrics.UPSTREAM_ERRORS.inc()
                raise
        return member, address, cmd

    async def _forward_to_member(self, member: UpstreamConnection, address: tuple[str, int],
                                 cmd: dict[str, Any], frame: Frame, compressor: int | None,
                                 name: str, flags: int, cursors: reads.MemberCursors) -> None:
        """Forward a request to another member and relay its replies; the cursor it opens
        is remembered (before the client can ask for more), the one it ends forgotten."""
        try:
            await member.send(frame.to_bytes())
            if flags & opmsg.MORE_TO_COME:
                return
            while True:
                reply = await member.receive()
                more = reply.op_code == OP_MSG and opmsg.flags_of(reply) & opmsg.MORE_TO_COME
                if not more:
                    opened = reads.cursor_id(reply)
                    if name == "getMore":
                        if not opened:
                            cursors.pop(cmd.get("getMore"))
                    elif name == "killCursors":
                        killed = cmd.get("cursors")
                        for cursor_id in killed if isinstance(killed, list) else ():
                            cursors.pop(cursor_id)
                    elif opened:
                        cursors.add(opened, address)
                self._write(reply, compressor, name)
                if not more:
                    return
                await self._drain()
        except UpstreamUnavailable as exc:
            metrics.UPSTREAM_ERRORS.inc()
            member.close()
            if not flags & opmsg.MORE_TO_COME:
                self._reply(host_unreachable(str(exc), cmd), frame, compressor, name)

    async def _on_query(self, frame: Frame) -> None:
        self._write(await opquery.answer(self, frame), None, "")
