"""A client connection handed byte for byte to another process's listener.

Used when another `mongobranch serve` process serves this port's traffic (scale-out,
docs/ARCHITECTURE.md "Scale-out"): nothing is parsed, so every command, cursor, session
and transaction behaves exactly as on the other process. If that process cannot be
reached the client's connection is closed, as a failed server closes it, and drivers
retry on a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import cast

log = logging.getLogger("mongobranch.relay")

CONNECT_TIMEOUT = 5.0


class _Peer(asyncio.Protocol):
    """The connection to the other process: what it sends goes to the client."""

    def __init__(self, relay: Relay):
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        self.relay.to_client(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.close()

    def pause_writing(self) -> None:
        self.relay.pause_client()

    def resume_writing(self) -> None:
        self.relay.resume_client()


class Relay(asyncio.Protocol):
    """The protocol of an accepted client connection relayed to (host, port)."""

    def __init__(self, target: tuple[str, int], on_opened: Callable[[Relay], None],
                 on_closed: Callable[[Relay], None]):
        self.target = target
        self._on_opened = on_opened
        self._on_closed = on_closed
        self._client: asyncio.Transport | None = None
        self._peer: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self._client = cast(asyncio.Transport, transport)
        self._on_opened(self)
        self._task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            peer, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _Peer(self), *self.target), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            log.info("cannot relay to %s:%d: %s; closing the client's connection",
                     *self.target, exc)
            self.close()
            return
        if self._closed:
            peer.close()
            return
        self._peer = peer
        for data in self._pending:
            peer.write(data)
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        if self._peer is not None:
            self._peer.write(data)
        else:
            self._pending.append(data)

    def to_client(self, data: bytes) -> None:
        if self._client is not None:
            self._client.write(data)

    def pause_writing(self) -> None:
        if self._peer is not None:
            self._peer.pause_reading()

    def resume_writing(self) -> None:
        if self._peer is not None:
            self._peer.resume_reading()

    def pause_client(self) -> None:
        if self._client is not None:
            self._client.pause_reading()

    def resume_client(self) -> None:
        if self._client is not None:
            self._client.resume_reading()

    def eof_received(self) -> bool | None:
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        """Both sides closed, once; the listener forgets the relay."""
        if self._closed:
            return
        self._closed = True
        for transport in (self._client, self._peer):
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.close()
        if self._task is not None and not self._task.done() \
                and self._task is not asyncio.current_task():
            self._task.cancel()
        self._on_closed(self)
