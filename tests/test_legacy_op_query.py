"""Legacy OP_QUERY commands (`<db>.$cmd` queries from older drivers, such as Debian's Java
3.6 driver's `buildinfo`) translated to OP_MSG for the upstream, and the OP_MSG reply
back to an OP_REPLY, on the main port and on a branch port; and `--no-legacy-op-query`,
which refuses them as mongod 6.0+ does."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import bson
import pytest
from bson import Int64
from pymongo import MongoClient

from tests import rawwire
from tests.branchutil import Branches, unique
from tests.servers import ProxyProcess, Secantus

QUERY_FAILURE = 2


def legacy(sock: socket.socket, collection: str, query: dict[str, Any],
           request_id: int) -> tuple[int, dict[str, Any]]:
    """(responseFlags, the one document) of the OP_REPLY to an OP_QUERY."""
    sock.sendall(rawwire.op_query(collection, query, request_id=request_id))
    op_code, response_to, payload = rawwire.read_message(sock)
    assert (op_code, response_to) == (rawwire.OP_REPLY, request_id)
    flags, cursor_id, starting_from, returned = struct.unpack_from("<iqii", payload, 0)
    assert (cursor_id, starting_from, returned) == (0, 0, 1)
    (doc,) = bson.decode_all(payload[20:])
    return flags, doc


@pytest.fixture(scope="module")
def ports(proxy: ProxyProcess, direct: MongoClient) -> Iterator[dict[str, Any]]:
    name = unique("legacy").replace("-", "_")
    direct[name].items.insert_many([{"_id": i, "n": i} for i in range(10)])
    made = Branches(proxy)
    try:
        branch = made.create()
        with MongoClient(branch["uri"]) as on_branch:
            # Changed on the branch: its reads are the proxy's own.
            on_branch[name].items.update_one({"_id": 0}, {"$set": {"n": 100}})
        yield {"db": name, "main": proxy.port, "branch": int(branch["port"])}
    finally:
        made.cleanup()
        direct.drop_database(name)


def test_a_legacy_read_the_branch_passes_to_the_base_is_answered(
        ports: dict[str, Any]) -> None:
    """A find the branch runs on the base unchanged (an id it did not change) is answered
    with the upstream's reply passed on undecoded (router.Passed); as an OP_REPLY it is
    still the one document."""
    with rawwire.connect(ports["branch"]) as sock:
        flags, found = legacy(sock, f"{ports['db']}.$cmd",
                              {"find": "items", "filter": {"_id": 5}}, 1)
    assert flags == 0 and found["ok"] == 1.0
    assert found["cursor"]["firstBatch"] == [{"_id": 5, "n": 5}]


@pytest.mark.parametrize("port", ["main", "branch"])
def test_legacy_commands_are_served(ports: dict[str, Any], port: str) -> None:
    db = ports["db"]
    new_id = 50 if port == "main" else 60  # the branch sees what main inserted in the base
    with rawwire.connect(ports[port]) as sock:
        flags, build = legacy(sock, "admin.$cmd", {"buildinfo": 1}, 1)
        assert flags == 0 and build["ok"] == 1.0 and isinstance(build["version"], str)
        flags, ping = legacy(sock, "admin.$cmd",
                             {"$query": {"ping": 1}, "$readPreference": {"mode": "primary"}}, 2)
        assert flags == 0 and ping["ok"] == 1.0

        flags, found = legacy(sock, f"{db}.$cmd", {"find": "items", "filter": {"_id": {"$lt": 10}},
                                                   "sort": {"_id": 1}, "batchSize": 4}, 3)
        assert flags == 0 and found["ok"] == 1.0
        cursor = found["cursor"]
        assert [d["_id"] for d in cursor["firstBatch"]] == [0, 1, 2, 3]
        assert cursor["firstBatch"][0]["n"] == (100 if port == "branch" else 0)
        assert isinstance(cursor["id"], Int64) and cursor["id"] != 0
        ids = [d["_id"] for d in cursor["firstBatch"]]
        cursor_id = cursor["id"]
        for request_id in range(4, 10):
            if not cursor_id:
                break
            flags, more = legacy(sock, f"{db}.$cmd", {"getMore": cursor_id,
                                                      "collection": "items", "batchSize": 4},
                                 request_id)
            assert flags == 0 and more["ok"] == 1.0
            ids += [d["_id"] for d in more["cursor"]["nextBatch"]]
            cursor_id = more["cursor"]["id"]
        assert ids == list(range(10)) and cursor_id == 0

        flags, inserted = legacy(sock, f"{db}.$cmd",
                                 {"insert": "items", "documents": [{"_id": new_id}, {"_id": 1}]},
                                 11)
        assert flags == 0 and inserted["ok"] == 1.0 and inserted["n"] == 1
        assert [(e["index"], e["code"]) for e in inserted["writeErrors"]] == [(1, 11000)]
        flags, listed = legacy(sock, f"{db}.$cmd", {"listCollections": 1, "nameOnly": True}, 12)
        assert flags == 0 and [c["name"] for c in listed["cursor"]["firstBatch"]] == ["items"]
        assert isinstance(listed["cursor"]["id"], Int64)

        # A failed command is an ordinary reply document, as it was over OP_QUERY.
        flags, failed = legacy(sock, f"{db}.$cmd", {"find": "items", "filter": {"$bogus": 1}}, 13)
        assert flags & QUERY_FAILURE == 0
        assert failed["ok"] == 0.0 and isinstance(failed["code"], int) and failed["errmsg"]
        # The connection goes on in OP_MSG.
        assert rawwire.command(sock, {"count": "items", "query": {"_id": new_id}, "$db": db},
                               request_id=14)["n"] == 1
    if port == "main":
        assert MongoClient(f"mongodb://127.0.0.1:{ports['main']}/")[db].items.find_one(
            {"_id": new_id}) == {"_id": new_id}


@pytest.fixture(scope="module")
def strict_proxy(upstream: Secantus) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(upstream.uri, meta_db="mongobranch_strict",
                        extra=["--no-legacy-op-query"]).start()
    yield proc
    proc.stop()


@pytest.mark.parametrize(("collection", "query"), [
    ("malformed.$cmd", {"find": "items"}),
    ("admin.$cmd", {"ping": 1}),
    ("admin.$cmd", {"buildinfo": 1}),
])
def test_legacy_commands_refused_when_turned_off(strict_proxy: ProxyProcess, collection: str,
                                                 query: dict[str, Any]) -> None:
    with rawwire.connect(strict_proxy.port) as sock:
        flags, doc = legacy(sock, collection, query, 31)
        assert doc["ok"] == 0.0 and doc["code"] == 352, doc
        assert doc["codeName"] == "UnsupportedOpQueryCommand"
        assert flags & QUERY_FAILURE and "$err" in doc
        # The handshake itself still works over OP_QUERY, as on mongod.
        flags, hello = legacy(sock, "admin.$cmd", {"isMaster": 1}, 32)
        assert flags == 0 and hello["ismaster"] is True
        assert rawwire.command(sock, {"ping": 1, "$db": "admin"}, request_id=33)["ok"] == 1.0
    status, config = strict_proxy.api("GET", "/config")
    assert status == 200
    assert config["legacy_op_query"] == {  # type: ignore[index]
        "value": False, "source": "flag --legacy-op-query/--no-legacy-op-query"}
