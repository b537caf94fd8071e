"""Running commands on the upstream: one interface for a client's own connection
and for the engine's pooled client, with cursors drained in batches."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import bson
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import OperationFailure

from proxy.net.router import Passed
from proxy.wire.bsonutil import decode, encode, raw_ok
from proxy.wire.codes import Code
from proxy.wire.errors import CommandError

RawRun = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
Pipelined = Callable[..., Awaitable[list[dict[str, Any]]]]
Undecoded = Callable[..., Awaitable[list[bytes]]]
_PING = {"ping": 1}
# A reply read lazily: each document of a batch keeps the upstream's own bytes.
_RAW: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)


class Runner:
    """Runs commands and raises CommandError for ok: 0 replies, as mongod phrased them."""

    def __init__(self, raw: RawRun, pipelined: Pipelined | None = None,
                 undecoded: Undecoded | None = None, *, clocked: bool = False):
        self.raw = raw
        self.pipelined = pipelined
        # The same exchange as `pipelined`, replies left as the upstream's BSON (passed()).
        self.undecoded = undecoded
        self._clocked = clocked and pipelined is not None
        # The reply to the `ping` sent right behind the latest command (clocked()).
        self.after: dict[str, Any] | None = None

    def clocked(self) -> Runner:
        """A runner whose every exchange is followed, in the same write, by a `ping`:
        the latest ping's reply (`after`) states the upstream's time once that exchange
        had run, hence at least that of every write its answer shows, at no extra round
        trip. Without pipelining, a runner that sends nothing more."""
        return Runner(self.raw, self.pipelined, self.undecoded, clocked=True)

    async def replies(self, db: str, cmds: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The replies, ok: 0 included, to commands sent together: pipelined in one
        write where the connection allows it, so they cost one round trip."""
        if self._clocked:
            assert self.pipelined is not None
            *replies, self.after = await self.pipelined(*((db, cmd) for cmd in cmds),
                                                        ("admin", _PING))
            return replies
        if self.pipelined is not None and len(cmds) > 1:
            return await self.pipelined(*((db, cmd) for cmd in cmds))
        return [await self.raw(db, cmd) for cmd in cmds]

    async def reply(self, db: str, cmd: dict[str, Any]) -> dict[str, Any]:
        """The reply as the server sent it, ok: 0 included."""
        return (await self.replies(db, [cmd]))[0]

    async def passed(self, db: str, cmd: dict[str, Any]) -> dict[str, Any] | Passed:
        """The reply to a command whose answer goes to the client unchanged: a successful
        one as the upstream's BSON, never decoded (a clocked runner's ping still is);
        any other decoded, as reply() gives it."""
        if self.undecoded is None or (self._clocked and self.pipelined is None):
            return await self.reply(db, cmd)
        if self._clocked:
            body, ping = await self.undecoded((db, cmd), ("admin", _PING))
            self.after = decode(ping)
        else:
            (body,) = await self.undecoded((db, cmd))
        return Passed(body) if raw_ok(body) else decode(body)

    async def __call__(self, db: str, cmd: dict[str, Any]) -> dict[str, Any]:
        reply = await self.reply(db, cmd)
        if not reply.get("ok"):
            raise error_from(reply)
        return reply

    async def all_made(self, db: str, creates: list[dict[str, Any]],
                       replies: list[dict[str, Any]]) -> None:
        """Collections made together or not at all: when the upstream refused one of
        the `creates` (their `replies`), the others it made are dropped again and its
        refusal is raised (the client's, when its options were the cause)."""
        refused = next((reply for reply in replies if not reply.get("ok")), None)
        if refused is None:
            return
        made = [create["create"] for create, reply in zip(creates, replies, strict=True)
                if reply.get("ok")]
        if made:
            await self.replies(db, [{"drop": name} for name in made])
        raise error_from(refused)

    async def has(self, db: str, name: str) -> bool:
        """Whether the upstream has a collection or view of that name. A listIndexes asks
        it of that name alone, where a listCollections, even filtered by name, costs what
        the whole database's list costs on SecantusDB (31 ms at 400 collections, 1.5 ms
        for a listIndexes), and a branch's overlays make its databases large. mongod
        answers a view's with CommandNotSupportedOnView; any answer but these three (no
        privilege for listIndexes, a transaction) is left to a listCollections. Whether
        it is a view it cannot tell: SecantusDB lists a view's indexes as a
        collection's (`_id_`), where mongod refuses."""
        reply = await self.reply(db, {"listIndexes": name})
        if reply.get("ok") or reply.get("code") == Code.COMMAND_NOT_SUPPORTED_ON_VIEW:
            return True
        if reply.get("code") == Code.NAMESPACE_NOT_FOUND:
            return False
        listed = await self(db, {"listCollections": 1, "filter": {"name": name},
                                 "nameOnly": True})
        return bool(listed["cursor"]["firstBatch"])

    async def batches(self, db: str, cmd: dict[str, Any],
                      batch_size: int = 1000) -> AsyncIterator[list[dict[str, Any]]]:
        """Every batch of a cursor-returning command; the cursor is killed if abandoned."""
        cmd = dict(cmd)
        cmd.setdefault("cursor", {})
        cmd["cursor"] = {**cmd["cursor"], "batchSize": batch_size}
        reply = await self(db, cmd)
        cursor = reply["cursor"]
        coll = cursor["ns"].split(".", 1)[1]
        cursor_id = cursor["id"]
        try:
            if cursor["firstBatch"]:
                yield cursor["firstBatch"]
            while cursor_id:
                reply = await self(db, {"getMore": cursor_id, "collection": coll,
                                        "batchSize": batch_size})
                cursor_id = reply["cursor"]["id"]
                if reply["cursor"]["nextBatch"]:
                    yield reply["cursor"]["nextBatch"]
        finally:
            if cursor_id:
                await self.reply(db, {"killCursors": coll, "cursors": [cursor_id]})

    async def raw_batches(self, db: str, cmd: dict[str, Any],
                          batch_size: int = 1000) -> AsyncIterator[list[bytes]]:
        """Every batch of a cursor-returning command, each document as the upstream's own
        BSON. Decoding and encoding again would not give those bytes back for every
        document: a deprecated type (symbol, undefined, DBPointer) comes back as its
        modern stand-in, a repeated field name once. A runner with no undecoded exchange
        (the engine's pool) can only give its documents encoded again."""
        if self.undecoded is None:
            async for decoded in self.batches(db, cmd, batch_size):
                yield [encode(doc) for doc in decoded]
            return
        cmd = dict(cmd)
        cmd["cursor"] = {**cmd.get("cursor", {}), "batchSize": batch_size}
        cursor = await self._raw_cursor(db, cmd)
        coll = str(cursor["ns"]).split(".", 1)[1]
        cursor_id = int(cursor["id"])
        try:
            batch = [doc.raw for doc in cursor["firstBatch"]]
            while True:
                if batch:
                    yield batch
                if not cursor_id:
                    break
                cursor = await self._raw_cursor(db, {"getMore": bson.Int64(cursor_id),
                                                     "collection": coll,
                                                     "batchSize": batch_size})
                cursor_id = int(cursor["id"])
                batch = [doc.raw for doc in cursor["nextBatch"]]
        finally:
            if cursor_id:
                await self.reply(db, {"killCursors": coll, "cursors": [bson.Int64(cursor_id)]})

    async def _raw_cursor(self, db: str, cmd: dict[str, Any]) -> RawBSONDocument:
        assert self.undecoded is not None
        (body,) = await self.undecoded((db, cmd))
        if not raw_ok(body):
            raise error_from(decode(body))
        cursor: RawBSONDocument = bson.decode(body, _RAW)["cursor"]
        return cursor


def error_from(reply: dict[str, Any]) -> CommandError:
    extra = {k: v for k, v in reply.items()
             if k not in ("ok", "errmsg", "code", "codeName", "$clusterTime", "operationTime")}
    return CommandError(int(reply.get("code", 8)), str(reply.get("errmsg", "command failed")),
                        code_name=str(reply.get("codeName", "UnknownError")), **extra)


# The upstream transaction a client's multi-document transaction on a branch runs in
# (txn.py): while set, every command of the engine's pool (and every WAL insert) runs in
# it, so the overlay writes and their WAL entries commit together or not at all.
SESSION: ContextVar[AsyncClientSession | None] = ContextVar("mongobranch_session",
                                                            default=None)

# The upstream's failures within the current statement of a transaction, first first:
# any of them aborted the upstream transaction, so what the engine ran after it failed
# with NoSuchTransaction, and the client is told the first instead (router.py).
FAILED: ContextVar[list[dict[str, Any]] | None] = ContextVar("mongobranch_failed",
                                                             default=None)


def _note(reply: dict[str, Any]) -> dict[str, Any]:
    failed = FAILED.get()
    if failed is not None and (not reply.get("ok") or reply.get("writeErrors")):
        failed.append(reply)
    return reply


# A client's own session fields: in a transaction the engine's session sets its own.
CLIENT_SESSION_FIELDS = ("lsid", "txnNumber", "autocommit", "startTransaction", "$clusterTime",
                         "readConcern", "writeConcern", "$db", "$readPreference")


@contextmanager
def outside_transaction() -> Iterator[None]:
    """Runs the engine's pool outside the current transaction, for set-up that must
    outlive an abort (an overlay collection, a dirty marker, an LSN block)."""
    token = SESSION.set(None)
    try:
        yield
    finally:
        SESSION.reset(token)


def pooled(client: AsyncMongoClient[dict[str, Any]]) -> Runner:
    async def raw(db: str, cmd: dict[str, Any]) -> dict[str, Any]:
        session = SESSION.get()
        try:
            if session is not None:
                cmd = {k: v for k, v in cmd.items() if k not in CLIENT_SESSION_FIELDS}
                return _note(await client[db].command(cmd, session=session))
            return await client[db].command(cmd)
        except OperationFailure as exc:
            details = dict(exc.details or {})
            details.setdefault("ok", 0.0)
            details.setdefault("errmsg", str(exc))
            details.setdefault("code", exc.code or 8)
            return _note(details) if session is not None else details

    return Runner(raw)


@dataclass
class SystemContext:
    """The identity the engine's own writes (merges, copies) carry in the WAL: they run on
    the pool above, not on a client's connection."""

    app_name: str | None = "mongobranch"
    user: str | None = None
    connection_id: int = 0
    peer: str = "mongobranch"
    client_authenticated: bool = False
    as_uri_user: bool = True

    async def upstream_command(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("system requests run on the engine's pool")

    async def upstream_commands(self, *requests: tuple[str, dict[str, Any]]
                                ) -> list[dict[str, Any]]:
        raise RuntimeError("system requests run on the engine's pool")

    async def upstream_raw(self, *requests: tuple[str, dict[str, Any]]) -> list[bytes]:
        raise RuntimeError("system requests run on the engine's pool")

    @property
    def gossip(self) -> dict[str, Any]:
        return {}

    async def authenticated_user(self) -> str | None:
        return self.user
