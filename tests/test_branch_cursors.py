"""Cursor kinds and read options on a branch port, each against the main port.

Differential: one collection seeded on main, a branch forked from it, then the same
writes on both ports (the branch's snapshot does not see main's), so that both show
the same documents while the branch's collection is changed (an overlay over the base).
The same read on both ports must give the same documents. Exhaust streams are also
checked frame by frame over a raw socket (flag bits, responseTo chain, cursor ids).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from bson.int64 import Int64
from pymongo import CursorType, MongoClient
from pymongo.database import Database

from tests import rawwire
from tests.branchutil import Branches
from tests.servers import ProxyProcess

MORE_TO_COME = 1 << 1
EXHAUST_ALLOWED = 1 << 16
N = 40


def _doc(i: int) -> dict[str, Any]:
    return {"_id": i, "k": i % 9, "arr": [i % 5, (i + 1) % 5, {"x": i % 3}, i],
            "sub": {"n": i, "tags": ["a", f"t{i % 4}"]}}


def _write(db: Database) -> None:
    """The same writes on both ports: an update, a delete and inserts."""
    db.c.update_many({"_id": {"$in": [3, 10, 17]}}, {"$set": {"k": 100}, "$push": {"arr": 7}})
    db.c.delete_many({"_id": {"$in": [5, 21]}})
    db.c.insert_many([{**_doc(i), "_id": 1000 + i} for i in range(6)])


@dataclass
class Pair:
    main: Database
    branch: Database
    port: int  # the branch's port
    main_port: int
    db: str
    uri: str  # the branch's


@pytest.fixture()
def pair(proxy: ProxyProcess, made: Branches, client: MongoClient,
         db_name: str) -> Iterator[Pair]:
    main = client[db_name]
    main.c.insert_many([_doc(i) for i in range(N)])
    main.c.create_index("k")
    main.u.insert_many([_doc(i) for i in range(N)])  # never written again: unchanged
    info = made.create()
    bclient = made.client(info)
    branch = bclient[db_name]
    _write(main)
    _write(branch)
    port = int(str(info["uri"]).rsplit(":", 1)[1].split("/", 1)[0])
    main_port = int(proxy.uri.rsplit(":", 1)[1].split("/", 1)[0])
    yield Pair(main, branch, port, main_port, db_name, str(info["uri"]))
    bclient.close()


# -- exhaust ------------------------------------------------------------------------------

def _read(sock: socket.socket) -> tuple[int, int, int, dict[str, Any]]:
    """(requestId, responseTo, flagBits, body) of the next OP_MSG."""
    length, request_id, response_to, op_code = rawwire.HEADER.unpack(
        rawwire.recv_exact(sock, rawwire.HEADER.size))
    payload = rawwire.recv_exact(sock, length - rawwire.HEADER.size)
    assert op_code == rawwire.OP_MSG
    (flags,) = struct.unpack_from("<I", payload, 0)
    return request_id, response_to, flags, rawwire.msg_reply(payload)


def _exhaust(port: int, db: str, batch: int, coll: str = "c",
             ) -> tuple[list[Any], list[tuple[int, bool, Any]]]:
    """A find, then one exhaust getMore, on a raw socket: the documents and, per reply
    to the getMore, (flag bits, whether it answers the message before it, cursor id)."""
    with rawwire.connect(port) as sock:
        first = rawwire.command(sock, {"find": coll, "sort": {"_id": 1}, "batchSize": batch,
                                       "$db": db})
        assert first["ok"] == 1.0, first
        docs = list(first["cursor"]["firstBatch"])
        cursor_id = first["cursor"]["id"]
        assert isinstance(cursor_id, Int64) and cursor_id
        sock.sendall(rawwire.op_msg({"getMore": cursor_id, "collection": coll,
                                     "batchSize": batch, "$db": db},
                                    flags=EXHAUST_ALLOWED, request_id=7))
        previous, frames = 7, []
        while True:
            request_id, response_to, flags, body = _read(sock)
            assert body["ok"] == 1.0, body
            frames.append((flags, response_to == previous, body["cursor"]["id"]))
            docs += body["cursor"]["nextBatch"]
            previous = request_id
            if not flags & MORE_TO_COME:
                break
        # The connection still serves requests once the stream ended.
        assert rawwire.command(sock, {"ping": 1, "$db": "admin"}, request_id=99)["ok"] == 1.0
    return docs, frames


def test_exhaust_getmore_streams_moretocome_replies_until_the_cursor_ends(pair: Pair) -> None:
    expected = list(pair.main.c.find().sort("_id", 1))
    docs, frames = _exhaust(pair.port, pair.db, 4)
    assert docs == expected
    # mongod: every reply but the last flagged moreToCome, each answering the one before
    # it, the cursor id an int64 throughout and 0 on the last.
    assert len(frames) == -(-(len(expected) - 4) // 4)
    assert all(flags == MORE_TO_COME for flags, _, _ in frames[:-1])
    assert frames[-1][0] == 0
    assert all(chained for _, chained, _ in frames)
    assert all(isinstance(cid, Int64) and cid for _, _, cid in frames[:-1])
    assert isinstance(frames[-1][2], Int64) and frames[-1][2] == 0


def test_exhaust_cursor_from_pymongo_gives_mains_documents(pair: Pair) -> None:
    for batch in (1, 3, 1000):
        expected = list(pair.main.c.find({"k": {"$lt": 100}}).sort("_id", 1))
        got = list(pair.branch.c.find({"k": {"$lt": 100}}, cursor_type=CursorType.EXHAUST,
                                      batch_size=batch).sort("_id", 1))
        assert got == expected
        assert got == list(pair.main.c.find({"k": {"$lt": 100}},
                                            cursor_type=CursorType.EXHAUST,
                                            batch_size=batch).sort("_id", 1))


def test_exhaust_stream_of_an_unchanged_collection_matches_the_main_ports(pair: Pair) -> None:
    """Not changed on the branch: its cursor is the upstream's, and so is the stream."""
    docs, frames = _exhaust(pair.port, pair.db, 7, "u")
    assert docs == list(pair.main.u.find().sort("_id", 1))
    main_docs, main_frames = _exhaust(pair.main_port, pair.db, 7, "u")
    assert docs == main_docs
    assert [flags for flags, _, _ in frames] == [flags for flags, _, _ in main_frames]
