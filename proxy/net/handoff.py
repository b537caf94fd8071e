"""Accepted client connections handed, socket and all, to another process of this machine.

With `serve --workers N` (docs/ARCHITECTURE.md, "Workers") every worker listens on the
same port numbers (SO_REUSEPORT) and the kernel spreads new connections across them;
a connection the worker holding the engine must serve is passed to it over a Unix
socket as its file descriptor (SCM_RIGHTS), before a byte of it is read. So the client
talks to that process directly from its first byte, with no hop in between, and
nothing of the connection is parsed here. The message is the port the client connected
to (4 bytes), which names the listener that serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import cast

log = logging.getLogger("mongobranch.handoff")

SEND_TIMEOUT = 1.0


class HandoffServer:
    """Receives handed-off connections on a Unix socket (an abstract name on Linux) and
    gives each to `accept(port, sock)`."""

    def __init__(self, name: str, accept: Callable[[int, socket.socket], None]):
        self.name = name
        self.accept = accept
        self._sock: socket.socket | None = None
        self._peers: set[socket.socket] = set()

    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.bind(self.name)
        sock.listen(64)
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_peer)

    def _on_peer(self) -> None:
        assert self._sock is not None
        try:
            peer, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        peer.setblocking(False)
        self._peers.add(peer)
        asyncio.get_running_loop().add_reader(peer.fileno(), self._on_message, peer)

    def _on_message(self, peer: socket.socket) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(peer, 16, 8)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("hand-off channel closed: %s", exc)
            data, fds = b"", []
        if not data:
            self._drop(peer)
            for fd in fds:
                socket.close(fd)
            return
        port = int.from_bytes(data[:4], "big")
        for fd in fds:
            self.accept(port, socket.socket(fileno=fd))

    def _drop(self, peer: socket.socket) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(peer.fileno())
        self._peers.discard(peer)
        peer.close()

    def close(self) -> None:
        for peer in list(self._peers):
            self._drop(peer)
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


class HandoffClient:
    """Sends accepted sockets to the HandoffServer named `name`."""

    def __init__(self, name: str):
        self.name = name
        self._sock: socket.socket | None = None

    def send(self, port: int, fd: int) -> bool:
        """Whether the other process now holds the connection (this one may close its
        descriptor of it). A send blocks at most SEND_TIMEOUT: the channel's buffer is
        full only when the other process has stopped reading."""
        for attempt in range(2):
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    sock.settimeout(SEND_TIMEOUT)
                    sock.connect(self.name)
                    self._sock = sock
                socket.send_fds(self._sock, [port.to_bytes(4, "big")], [fd])
                return True
            except OSError as exc:
                self.close()
                if attempt:
                    log.info("cannot hand a connection to %r: %s", self.name, exc)
        return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class HandedOff(asyncio.Protocol):
    """The protocol of an accepted connection that goes to another process: its socket
    is sent there at once and closed here (the other process's descriptor keeps the
    connection open). If it cannot be sent, the client's connection is closed, as a
    failed server closes it, and drivers retry on a new one."""

    def __init__(self, client: HandoffClient, port: int):
        self.client = client
        self.port = port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.client.send(self.port, sock.fileno())
        cast(asyncio.Transport, transport).abort()

    def data_received(self, data: bytes) -> None:  # pragma: no cover - aborted at once
        pass
