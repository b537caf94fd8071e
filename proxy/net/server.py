"""A listening port: accepts clients and drains them on shutdown."""

from __future__ import annotations

import asyncio
import logging

from proxy.net.connection import ClientConnection
from proxy.net.handshake import Topology
from proxy.net.router import Router
from proxy.upstream.connection import UpstreamConfig

log = logging.getLogger("mongobranch.listener")


class Listener:
    def __init__(self, name: str, host: str, port: int, *, upstream: UpstreamConfig,
                 topology: Topology, router: Router):
        self.name = name
        self.host = host
        self.port = port
        self.upstream = upstream
        self.topology = topology
        self.router = router
        self.stopping = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._connections: dict[ClientConnection, asyncio.Task[None]] = {}

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, limit=1 << 20, reuse_address=True
        )
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]
        log.info("%s listening on %s:%d", self.name, self.host, self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ClientConnection(
            reader, writer, upstream=self.upstream, topology=self.topology,
            router=self.router, listener=self.name, stopping=self.stopping,
        )
        task = asyncio.current_task()
        assert task is not None
        self._connections[conn] = task
        try:
            await conn.serve()
        except asyncio.CancelledError:
            # Cancelled by stop(). Ending normally keeps asyncio's stream callback from
            # logging a CancelledError traceback for every connection closed at shutdown.
            pass
        finally:
            self._connections.pop(conn, None)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish, then close every client."""
        self.stopping.set()
        if self._server is not None:
            self._server.close()
        deadline = asyncio.get_running_loop().time() + grace
        for conn, task in list(self._connections.items()):
            if not conn.busy:
                task.cancel()
        while self._connections and asyncio.get_running_loop().time() < deadline:
            for conn, task in list(self._connections.items()):
                if not conn.busy:
                    task.cancel()
            await asyncio.sleep(0.05)
        for task in list(self._connections.values()):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections.values(), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
