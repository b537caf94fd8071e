"""The main port of a worker that does not run the engine (`serve --workers N`).

Such a worker serves its main-port clients itself (each on its own upstream connection,
as the holder would), so main's pass-through traffic runs on every core. The commands
the engine must serve there (branch commands, `listCollections`, failpoints, and main's
writes while main has children: `EngineRouter.wants` on the main port) are run by the
worker holding the engine, over a Unix socket: the holder runs its main-port router
with a context whose upstream calls come back here and run on the client's own
upstream connection, so they carry the client's credentials and nothing else
(docs/ARCHITECTURE.md, "Workers"). Whether main's writes are the engine's (main has
children) is pushed by the holder before it changes, and acknowledged once the writes
forwarded unchanged here before it are answered, as the holder's own main port does.

Messages are BSON documents, one after another on the stream (BSON's own length
prefix frames them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from bson import Binary

from proxy.branching.commands import mainwrite
from proxy.branching.router import MAIN
from proxy.net.router import Context, Continued, Inline, Passed, Router
from proxy.upstream.connection import UpstreamUnavailable
from proxy.wire.bsonutil import decode, encode
from proxy.wire.opmsg import OpMsg

log = logging.getLogger("mongobranch.workers")

ACK_TIMEOUT = 5.0
UNREACHABLE = "the worker running the branch engine cannot be reached; retry"


async def _read(reader: asyncio.StreamReader) -> dict[str, Any]:
    head = await reader.readexactly(4)
    rest = await reader.readexactly(int.from_bytes(head, "little") - 4)
    return decode(head + rest)


class _Peer:
    """One end of a link: documents out, in order."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer

    def send(self, doc: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(doc))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def _spawn(tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None]) -> None:
    """A task kept referenced in `tasks` until it ends."""
    task = asyncio.create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _main_wants(name: str, intercepting: bool) -> bool:
    """The holder's main-port answer (EngineRouter.wants), from its pushed state."""
    if name in mainwrite.NAMES:
        return intercepting
    return name in MAIN


class EngineLink:
    """A non-holder worker's link to the holder, and its main port's router."""

    def __init__(self, on_state: Callable[[], Coroutine[Any, Any, None]]):
        self.on_state = on_state
        self.path: str | None = None
        # Unknown counts as intercepting: main's writes never pass unpreserved.
        self.intercepting = True
        self._peer: _Peer | None = None
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ctxs: dict[int, Context] = {}
        self._upcalls: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        return self._peer is not None

    async def connect(self, path: str | None) -> None:
        """Follow the holder named by the lease (None: no holder, or this process)."""
        if path == self.path and (path is None or self._peer is not None):
            return
        self.close()
        self.path = path
        if path is None:
            return
        try:
            # A socket of our own: the event loop's own connect may refuse the abstract
            # names (a leading NUL) the workers use.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                raise
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        except OSError as exc:
            log.info("cannot reach the engine's worker at %r: %s", path, exc)
            return
        self._peer = _Peer(writer)
        self._task = asyncio.create_task(self._run(reader, self._peer))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._lost()

    def _lost(self) -> None:
        if self._peer is not None:
            self._peer.close()
            self._peer = None
        self.intercepting = True
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(UpstreamUnavailable(UNREACHABLE))
        self._calls.clear()

    async def _run(self, reader: asyncio.StreamReader, peer: _Peer) -> None:
        try:
            while True:
                doc = await _read(reader)
                kind = doc.get("t")
                if kind == "up":
                    _spawn(self._upcalls, self._upcall(peer, doc))
                elif kind == "ret":
                    self._returned(doc)
                elif kind == "state":
                    await self._state(peer, doc)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            log.info("link to the engine's worker closed: %s", exc or "end of stream")
        finally:
            if self._peer is peer:
                self._task = None
                self._lost()

    async def _state(self, peer: _Peer, doc: dict[str, Any]) -> None:
        intercepting = bool(doc.get("intercepting"))
        changed = intercepting != self.intercepting
        self.intercepting = intercepting
        if changed:
            await self.on_state()
        peer.send({"t": "ack", "seq": doc.get("seq")})

    def _returned(self, doc: dict[str, Any]) -> None:
        fut = self._calls.pop(doc["id"], None)
        if "intercepting" in doc and bool(doc["intercepting"]) != self.intercepting:
            self.intercepting = bool(doc["intercepting"])
            _spawn(self._upcalls, self.on_state())
        if fut is not None and not fut.done():
            fut.set_result(doc)

    async def _upcall(self, peer: _Peer, doc: dict[str, Any]) -> None:
        """An upstream call of a command the holder runs, on the client's connection."""
        ctx = self._ctxs.get(doc["call"])
        out: dict[str, Any] = {"t": "upr", "id": doc["id"]}
        try:
            if ctx is None:
                raise UpstreamUnavailable("the client's connection is gone")
            kind = doc["kind"]
            reqs = [(db, body) for db, body in doc.get("reqs", [])]
            if kind == "cmds":
                out["replies"] = await ctx.upstream_commands(*reqs)
            elif kind == "raw":
                out["raw"] = [Binary(r) for r in await ctx.upstream_raw(*reqs)]
            else:
                out["user"] = await ctx.authenticated_user()
            out["gossip"] = ctx.gossip
        except UpstreamUnavailable as exc:
            out["unavailable"] = str(exc)
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        peer.send(out)

    async def call(self, ctx: Context, msg: OpMsg
                   ) -> dict[str, Any] | Continued | Passed | None:
        peer = self._peer
        if peer is None:
            raise UpstreamUnavailable(UNREACHABLE)
        call_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        self._ctxs[call_id] = ctx
        try:
            peer.send({"t": "call", "id": call_id, "flags": msg.flags, "body": msg.body,
                       "seqs": msg.sequences, "ctx": {
                           "connection_id": ctx.connection_id, "app_name": ctx.app_name,
                           "user": ctx.user, "peer": ctx.peer,
                           "client_authenticated": ctx.client_authenticated,
                           "as_uri_user": ctx.as_uri_user,
                           "gossip": ctx.gossip}})
            doc = await fut
        finally:
            self._calls.pop(call_id, None)
            self._ctxs.pop(call_id, None)
        if "unavailable" in doc:
            raise UpstreamUnavailable(doc["unavailable"])
        if "error" in doc:
            raise RuntimeError(doc["error"])
        if "passed" in doc:
            return Passed(bytes(doc["passed"]))
        reply = doc.get("reply")
        return reply if isinstance(reply, dict) else None


class RemoteRouter:
    """The main port's router on a worker without the engine: see the module's text."""

    def __init__(self, link: EngineLink):
        self.link = link

    def wants(self, name: str) -> bool:
        return _main_wants(name, self.link.intercepting)

    def inline(self, ctx: Context, name: str, body: bytes) -> Inline | None:
        return None  # the holder's engine answers, over the link: never inline

    async def handle(self, ctx: Context, msg: OpMsg
                     ) -> dict[str, Any] | Continued | Passed | None:
        return await self.link.call(ctx, msg)


class SwitchedRouter:
    """The main port's router of a worker: the engine's own while this worker holds
    the engine lease, else the holder's through the link."""

    def __init__(self, local: Router, remote: Router, leading: Callable[[], bool]):
        self.local = local
        self.remote = remote
        self.leading = leading

    def wants(self, name: str) -> bool:
        return (self.local if self.leading() else self.remote).wants(name)

    def inline(self, ctx: Context, name: str, body: bytes) -> Inline | None:
        return (self.local if self.leading() else self.remote).inline(ctx, name, body)

    async def handle(self, ctx: Context, msg: OpMsg
                     ) -> dict[str, Any] | Continued | Passed | None:
        return await (self.local if self.leading() else self.remote).handle(ctx, msg)


class _RemoteContext:
    """The client connection of a call from another worker, as the holder's router sees
    it: its upstream calls run on that worker, on the client's own connection."""

    def __init__(self, hub: EngineHub, peer: _Peer, call_id: int, ctx: dict[str, Any]):
        self._hub = hub
        self._peer = peer
        self._call = call_id
        self.connection_id = int(ctx.get("connection_id") or 0)
        self.app_name = ctx.get("app_name")
        self.user = ctx.get("user")
        self.peer = str(ctx.get("peer") or "?")
        self.client_authenticated = bool(ctx.get("client_authenticated"))
        self.as_uri_user = bool(ctx.get("as_uri_user"))
        self._gossip: dict[str, Any] = ctx.get("gossip") or {}

    @property
    def gossip(self) -> dict[str, Any]:
        return self._gossip

    async def _up(self, kind: str, requests: tuple[tuple[str, dict[str, Any]], ...]
                  ) -> dict[str, Any]:
        doc = await self._hub.upcall(self._peer, {
            "t": "up", "call": self._call, "kind": kind,
            "reqs": [[db, body] for db, body in requests]})
        if "unavailable" in doc:
            raise UpstreamUnavailable(doc["unavailable"])
        if "error" in doc:
            raise RuntimeError(doc["error"])
        if doc.get("gossip"):
            self._gossip = doc["gossip"]
        return doc

    async def upstream_command(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        return (await self.upstream_commands((db, body)))[0]

    async def upstream_commands(self, *requests: tuple[str, dict[str, Any]]
                                ) -> list[dict[str, Any]]:
        replies: list[dict[str, Any]] = (await self._up("cmds", requests))["replies"]
        return replies

    async def upstream_raw(self, *requests: tuple[str, dict[str, Any]]) -> list[bytes]:
        return [bytes(r) for r in (await self._up("raw", requests))["raw"]]

    async def authenticated_user(self) -> str | None:
        user = (await self._up("user", ()))["user"]
        self.user = user
        return str(user) if user is not None else None


class EngineHub:
    """The holder's end: runs the other workers' main-port calls with its router, and
    tells them, before it changes, whether main's writes are the engine's."""

    def __init__(self, path: str, router: Router, intercepting: Callable[[], bool]):
        self.path = path
        self.router = router
        self.intercepting = intercepting
        self._server: asyncio.AbstractServer | None = None
        self._peers: dict[_Peer, dict[int, asyncio.Future[dict[str, Any]]]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        self._server = await asyncio.start_unix_server(self._serve_peer, sock=sock)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for peer in list(self._peers):
            peer.close()
        for task in list(self._tasks):
            task.cancel()

    async def _serve_peer(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = _Peer(writer)
        waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._peers[peer] = waiting
        peer.send({"t": "state", "seq": 0, "intercepting": self.intercepting()})
        try:
            while True:
                doc = await _read(reader)
                kind = doc.get("t")
                if kind == "call":
                    _spawn(self._tasks, self._call(peer, doc))
                elif kind in ("upr", "ack"):
                    fut = waiting.pop(int(doc.get("id") or doc.get("seq") or 0), None)
                    if fut is not None and not fut.done():
                        fut.set_result(doc)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._peers.pop(peer, None)
            for fut in waiting.values():
                if not fut.done():
                    fut.set_result({"unavailable": "the worker of the client is gone"})
            peer.close()

    async def upcall(self, peer: _Peer, doc: dict[str, Any]) -> dict[str, Any]:
        waiting = self._peers.get(peer)
        if waiting is None:
            return {"unavailable": "the worker of the client is gone"}
        up_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiting[up_id] = fut
        peer.send({**doc, "id": up_id})
        return await fut

    async def _call(self, peer: _Peer, doc: dict[str, Any]) -> None:
        ctx = _RemoteContext(self, peer, int(doc["id"]), doc.get("ctx") or {})
        msg = OpMsg(int(doc.get("flags") or 0), doc["body"], doc.get("seqs") or {})
        out: dict[str, Any] = {"t": "ret", "id": doc["id"]}
        try:
            reply = await self.router.handle(ctx, msg)
            if isinstance(reply, Continued):
                reply = reply.reply  # no exhaust stream across workers: one reply
            if isinstance(reply, Passed):
                out["passed"] = Binary(reply.body)
            elif reply is not None:
                out["reply"] = reply
        except UpstreamUnavailable as exc:
            out["unavailable"] = str(exc)
        except Exception as exc:
            log.exception("a main-port command of another worker failed")
            out["error"] = f"{type(exc).__name__}: {exc}"
        out["intercepting"] = self.intercepting()
        peer.send(out)

    async def broadcast(self) -> None:
        """Tell every worker whether main's writes are the engine's, and wait until each
        has answered the writes it forwarded unchanged before (a worker that does not
        answer in time is cut off: its link's calls then fail, retryable)."""
        state = self.intercepting()
        pending = []
        for peer, waiting in list(self._peers.items()):
            seq = next(self._ids)
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            waiting[seq] = fut
            peer.send({"t": "state", "seq": seq, "intercepting": state})
            pending.append((peer, fut))
        for peer, fut in pending:
            try:
                await asyncio.wait_for(fut, ACK_TIMEOUT)
            except TimeoutError:
                log.warning("a worker did not acknowledge main's new state in %.0fs; "
                            "cutting it off", ACK_TIMEOUT)
                peer.close()
