"""A child's point reads answered inline (the connection's path without a task,
`EngineRouter.inline`) are exactly as exact as the usual path: a read never shows a write
made to main after the fork, through the main port or straight on the upstream, even
while the capture has not yet preserved that write.

The capture is held back explicitly: a `failCommand` failpoint (the upstream runs with
its test commands) blocks the next `getMore` of the proxy's engine, the capture's
change stream, for a few seconds. Main's write lands in that window, before its
pre-image is in the child; a read passed through to the base in that window would show
it, unless its capture check sends it the usual way, which waits for the capture.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import bson
import pytest
from pymongo import MongoClient

from tests import rawwire
from tests.branchutil import Branches, branches
from tests.servers import ProxyProcess, Secantus

DB = "inline"
WAKE = "inline_wake"  # another database: the pin of its new collection changes nothing in DB
# Long enough that every read below runs while the capture is held back; the reads'
# answers never depend on it (they wait for the capture however long it takes).
BLOCK_MS = 4000


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Secantus, ProxyProcess]]:
    server = Secantus(extra=["--enable-test-commands"]).start()
    proxy = ProxyProcess(server.uri).start()
    yield server, proxy
    proxy.stop()
    server.stop()


@pytest.fixture()
def made(stack: tuple[Secantus, ProxyProcess]) -> Iterator[Branches]:
    with branches(stack[1]) as b:
        yield b


def _hold_capture(direct: MongoClient, child: MongoClient) -> None:
    """Blocks the capture's next two getMores (each for BLOCK_MS), then waits until the
    capture has passed a write made now: the getMore that follows is blocked, and a
    write made after this returns waits in the upstream for it."""
    direct.admin.command({"configureFailPoint": "failCommand", "mode": {"times": 2},
                          "data": {"failCommands": ["getMore"],
                                   "appName": "mongobranch-engine",
                                   "blockConnection": True, "blockTimeMS": BLOCK_MS}})
    direct[WAKE].wake.insert_one({})
    # A count on the child (an aggregation: never inline) waits for the capture; a
    # collection created after the fork is absent there.
    assert child[WAKE].wake.count_documents({}) == 0


def _find_one(request_id: int, doc_id: int) -> bytes:
    return rawwire.op_msg({"find": "items", "filter": {"_id": doc_id}, "limit": 1,
                           "singleBatch": True, "$db": DB}, request_id=request_id)


def test_inline_reads_never_show_mains_later_writes(
        stack: tuple[Secantus, ProxyProcess], made: Branches) -> None:
    server, proxy = stack
    direct: MongoClient = MongoClient(server.uri, directConnection=True)
    main: MongoClient = MongoClient(proxy.uri)
    try:
        main[DB].items.drop()
        main[WAKE].wake.drop()
        main[DB].items.insert_many([{"_id": i, "v": 0} for i in range(20)])
        child = made.create()
        with made.client(child) as c:
            items = c[DB].items
            assert items.find_one({"_id": 3}) == {"_id": 3, "v": 0}
            readers = [made.client(child) for _ in range(4)]
            for own in readers:
                assert own[DB].items.find_one({"_id": 10}) == {"_id": 10, "v": 0}
            sock = rawwire.connect(int(child["port"]))
            sock.sendall(rawwire.op_msg({"find": "items", "filter": {"_id": 10}, "$db": DB},
                                        request_id=1))
            rawwire.read_message(sock)
            _hold_capture(direct, c)
            # Main changes documents the child never touched, straight on the upstream
            # (another application), while the capture is held back.
            direct[DB].items.update_one({"_id": 5}, {"$set": {"v": "upstream"}})
            direct[DB].items.replace_one({"_id": 6}, {"v": "replaced"})
            direct[DB].items.delete_one({"_id": 7})
            assert main[DB].items.find_one({"_id": 5}) == {"_id": 5, "v": "upstream"}

            # Several clients at once, each reading the changed documents; their
            # connections are up (a first command connects upstream the usual way).
            seen: list[Any] = []
            errors: list[BaseException] = []

            def reader(own: MongoClient) -> None:
                try:
                    seen.append([own[DB].items.find_one({"_id": i}) for i in (5, 6, 7)])
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=reader, args=(own,)) for own in readers]
            for t in threads:
                t.start()
            # Pipelined: three finds in one write on one connection.
            try:
                sock.sendall(b"".join(_find_one(10 + i, i) for i in (5, 6, 7)))
                piped = [rawwire.msg_reply(rawwire.read_message(sock)[2]) for _ in range(3)]
            finally:
                sock.close()
            for t in threads:
                t.join()
            for own in readers:
                own.close()
            assert not errors, errors
            assert seen == [[{"_id": 5, "v": 0}, {"_id": 6, "v": 0}, {"_id": 7, "v": 0}]] * 4
            assert [r["cursor"]["firstBatch"] for r in piped] == [
                [{"_id": 5, "v": 0}], [{"_id": 6, "v": 0}], [{"_id": 7, "v": 0}]]
            assert items.find_one({"_id": 5}) == {"_id": 5, "v": 0}
            # Documents main did not change still read through to the base.
            assert items.find_one({"_id": 8}) == {"_id": 8, "v": 0}
            assert items.count_documents({}) == 20
    finally:
        direct.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
        direct.close()
        main.close()


def test_inline_reads_answer_as_the_usual_path(
        stack: tuple[Secantus, ProxyProcess], made: Branches) -> None:
    """What a pass-through point read answers, ids of every kind, a miss, a projection and
    an error, is the upstream's own reply, as on the main port."""
    _server, proxy = stack
    main: MongoClient = MongoClient(proxy.uri)
    try:
        main[DB].kinds.drop()
        ids: list[Any] = [1, "s", bson.ObjectId(), 2.5, {"a": 1}, bson.Int64(7)]
        main[DB].kinds.insert_many([{"_id": i, "v": n} for n, i in enumerate(ids)])
        child = made.create()
        with made.client(child) as c:
            kinds = c[DB].kinds
            for n, i in enumerate(ids):
                assert kinds.find_one({"_id": i}) == {"_id": i, "v": n}
                assert kinds.find_one({"_id": i}, {"_id": 0}) == {"v": n}
            assert kinds.find_one({"_id": "missing"}) is None
            reply = c[DB].command({"find": "kinds", "filter": {"_id": 1}, "limit": 1,
                                   "singleBatch": True, "projection": {"$bad": 1}},
                                  check=False)
            on_main = main[DB].command({"find": "kinds", "filter": {"_id": 1}, "limit": 1,
                                        "singleBatch": True, "projection": {"$bad": 1}},
                                       check=False)
            assert (reply.get("ok"), reply.get("code")) == (on_main.get("ok"),
                                                             on_main.get("code"))
    finally:
        main.close()


def test_a_state_change_error_on_an_inline_read_is_served_again(
        stack: tuple[Secantus, ProxyProcess], made: Branches) -> None:
    """The upstream answers an inline read with a state-change error (NotWritablePrimary):
    the proxy retires that upstream connection with the reply, before the ping's reply
    comes. The read is served again the usual way, on a new connection, and never
    hangs (nor keeps main's fence held for main's writes to wait on)."""
    server, proxy = stack
    direct: MongoClient = MongoClient(server.uri, directConnection=True)
    main: MongoClient = MongoClient(proxy.uri)
    try:
        main[DB].retired.drop()
        main[DB].retired.insert_many([{"_id": i} for i in range(5)])
        child = made.create()
        with MongoClient(child["uri"], appname="inline-retired",
                         socketTimeoutMS=30_000) as c:
            assert c[DB].retired.find_one({"_id": 1}) == {"_id": 1}
            direct.admin.command({"configureFailPoint": "failCommand", "mode": {"times": 1},
                                  "data": {"failCommands": ["find"], "errorCode": 10107,
                                           "appName": "inline-retired"}})
            try:
                assert c[DB].retired.find_one({"_id": 2}) == {"_id": 2}
            finally:
                direct.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
            main[DB].retired.update_one({"_id": 3}, {"$set": {"v": 1}})  # main's fence free
            assert c[DB].retired.find_one({"_id": 3}) == {"_id": 3}
    finally:
        direct.close()
        main.close()
