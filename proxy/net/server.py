"""A listening port: accepts clients and drains them on shutdown."""

from __future__ import annotations

import asyncio
import logging

from proxy.metrics import PortStats
from proxy.net.connection import ClientConnection
from proxy.net.handshake import Topology
from proxy.net.router import Router
from proxy.upstream.connection import UpstreamConfig

log = logging.getLogger("mongobranch.listener")


class Listener:
    def __init__(self, name: str, host: str, port: int, *, upstream: UpstreamConfig,
                 topology: Topology, router: Router, stats: PortStats | None = None,
                 legacy_op_query: bool = True):
        self.name = name
        self.host = host
        self.port = port
        self.upstream = upstream
        self.topology = topology
        self.router = router
        self.stats = stats
        self.legacy_op_query = legacy_op_query
        self.stopping = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._connections: set[ClientConnection] = set()
        # Command names whose messages this port forwards unchanged (router.wants is
        # asked once per name), for the connections' fast path.
        self._fast_names: dict[bytes, str] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._new_connection, self.host, self.port, reuse_address=True
        )
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]
        log.info("%s listening on %s:%d", self.name, self.host, self.port)

    def _new_connection(self) -> ClientConnection:
        conn = ClientConnection(
            upstream=self.upstream, topology=self.topology, router=self.router,
            listener=self.name, stopping=self.stopping, on_closed=self._connections.discard,
            fast_names=self._fast_names, stats=self.stats,
            legacy_op_query=self.legacy_op_query,
        )
        self._connections.add(conn)
        return conn

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
        while self._connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self._connections):
            conn.abort()
        settle = loop.time() + 1.0
        while self._connections and loop.time() < settle:
            await asyncio.sleep(0.01)
        if self._server is not None:
            await self._server.wait_closed()
