"""A listening port: accepts clients and drains them on shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

from proxy.metrics import RELAYED, PortStats
from proxy.net.connection import ClientConnection
from proxy.net.handoff import HandedOff, HandoffClient
from proxy.net.handshake import Topology
from proxy.net.reads import MemberCursors
from proxy.net.relay import Relay
from proxy.net.router import Router
from proxy.upstream.connection import UpstreamConfig

log = logging.getLogger("mongobranch.listener")

# Client connections open on every listener of this process, and the file descriptors
# they may use: a client connection holds two (its socket and its upstream's).
_open_clients = 0
_fd_limit = 0
_FDS_PER_CLIENT = 2
_FDS_RESERVED = 64  # listeners, the engine's pool, the admin API, logs
_full_warned_at = -1e9


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit where it may; the limit."""
    global _fd_limit
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    _fd_limit = soft
    log.info("open-file limit %d: room for about %d client connections at once", soft,
             capacity())
    return soft


def capacity() -> int:
    """About how many client connections the open-file limit leaves room for."""
    return max(0, (_fd_limit - _FDS_RESERVED) // _FDS_PER_CLIENT)


def _client_opened(loop: asyncio.AbstractEventLoop) -> None:
    global _open_clients, _full_warned_at
    _open_clients += 1
    if _fd_limit and _open_clients >= capacity() and loop.time() - _full_warned_at > 10.0:
        _full_warned_at = loop.time()
        log.warning("%d client connections open: the open-file limit (%d) is nearly used up, "
                    "so new connections are refused or cannot reach the upstream; raise it "
                    "(ulimit -n, LimitNOFILE=, or the container's nofile ulimit)",
                    _open_clients, _fd_limit)


def _client_closed(_conn: object) -> None:
    global _open_clients
    _open_clients -= 1


def _log_failed_adoption(task: asyncio.Task[object]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.info("a handed-over connection could not be served: %s", task.exception())


class Listener:
    def __init__(self, name: str, host: str, port: int, *, upstream: UpstreamConfig,
                 topology: Topology, router: Router, stats: PortStats | None = None,
                 legacy_op_query: bool = True, anonymous_as_uri_user: bool = True,
                 tls: ssl.SSLContext | None = None, read_routing: bool = False,
                 relay_to: Callable[[], tuple[str, int] | HandoffClient | None] | None = None,
                 reuse_port: bool = False):
        self.name = name
        self.host = host
        self.port = port
        self.upstream = upstream
        self.topology = topology
        self.router = router
        self.stats = stats
        self.legacy_op_query = legacy_op_query
        self.anonymous_as_uri_user = anonymous_as_uri_user
        self.tls = tls
        self.stopping = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._connections: set[ClientConnection] = set()
        # Command names whose messages this port forwards unchanged (router.wants is
        # asked once per name), for the connections' fast path.
        self._fast_names: dict[bytes, str] = {}
        # With read routing (the main port): the cursors this port's reads opened on
        # members other than the primary, shared by its connections.
        self._read_cursors = MemberCursors() if read_routing else None
        # Asked at every accept: where this port's clients are served instead of here
        # (None: here): another process's address, for scale-out, or, between workers of
        # one machine, the channel their sockets are handed over on; the connections
        # relayed there.
        self.relay_to = relay_to
        # Workers share the port number (the kernel spreads accepts across them).
        self.reuse_port = reuse_port
        self._relays: set[Relay] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._new_connection, self.host, self.port, reuse_address=True, ssl=self.tls,
            reuse_port=self.reuse_port or None)
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]
        log.info("%s listening on %s:%d%s", self.name, self.host, self.port,
                 " (TLS)" if self.tls else "")

    def _new_connection(self) -> ClientConnection | Relay | HandedOff:
        target = self.relay_to() if self.relay_to is not None else None
        if isinstance(target, HandoffClient):
            RELAYED.labels("main" if self.name == "main" else "branch").inc()
            return HandedOff(target, self.port)
        if target is not None:
            RELAYED.labels("main" if self.name == "main" else "branch").inc()
            return Relay(target, self._relays.add, self._relays.discard)
        return self._served()

    def _served(self) -> ClientConnection:
        return ClientConnection(
            upstream=self.upstream, topology=self.topology, router=self.router,
            listener=self.name, stopping=self.stopping, on_closed=self._closed,
            on_opened=self._opened, fast_names=self._fast_names, stats=self.stats,
            legacy_op_query=self.legacy_op_query,
            anonymous_as_uri_user=self.anonymous_as_uri_user,
            read_cursors=self._read_cursors,
        )

    def adopt(self, sock: socket.socket) -> None:
        """Serve a connection another worker accepted on this port and handed over."""
        loop = asyncio.get_running_loop()
        if self.stopping.is_set():
            sock.close()
            return
        task = loop.create_task(loop.connect_accepted_socket(self._served, sock, ssl=self.tls))
        task.add_done_callback(_log_failed_adoption)

    def _opened(self, conn: ClientConnection) -> None:
        self._connections.add(conn)
        _client_opened(asyncio.get_running_loop())

    def _closed(self, conn: ClientConnection) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            _client_closed(conn)

    async def reroute(self, names: frozenset[str]) -> None:
        """The router's answer for these command names has changed: forget what was
        remembered about forwarding them, then wait until every request with one of
        these names that was forwarded unchanged before now has been answered."""
        self._fast_names.clear()
        while any(conn.forwarding(names) for conn in self._connections):
            await asyncio.sleep(0.002)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish, then close every client."""
        self.stopping.set()
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # Idle connections close now, busy ones once their request is answered (and their
        # reply flushed: a connection leaves the set when its transport is gone).
        for conn in list(self._connections):
            conn.shutdown()
        for relay in list(self._relays):
            relay.close()
        while self._connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self._connections):
            conn.abort()
        settle = loop.time() + 1.0
        while self._connections and loop.time() < settle:
            await asyncio.sleep(0.01)
        if self._server is not None:
            await self._server.wait_closed()
