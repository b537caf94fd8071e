"""The main port forwards everything to the upstream, seen through real drivers."""

from __future__ import annotations

import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import OperationFailure

from tests.servers import ProxyProcess


def test_handshake_without_direct_connection_stays_on_proxy(relay_proxy: ProxyProcess) -> None:
    c: MongoClient = MongoClient(relay_proxy.uri)
    try:
        c.admin.command("ping")
        assert c.topology_description.topology_type_name == "Sharded"
        assert c.address == ("127.0.0.1", relay_proxy.port)
        hello = c.admin.command("hello")
        assert hello["msg"] == "isdbgrid"
        assert hello["isWritablePrimary"] is True
        assert "topologyVersion" in hello
        assert hello["maxWireVersion"] >= 6
        legacy = c.admin.command("isMaster")
        assert legacy["ismaster"] is True and legacy["msg"] == "isdbgrid"
    finally:
        c.close()


def test_crud_round_trip(relay_client: MongoClient) -> None:
    coll = relay_client.mp_crud.items
    coll.drop()
    coll.insert_many([{"_id": i, "v": i * 2} for i in range(10)])
    assert coll.find_one({"_id": 3}) == {"_id": 3, "v": 6}
    coll.update_many({"v": {"$gte": 10}}, {"$inc": {"v": 1}})
    assert sorted(d["v"] for d in coll.find({"v": {"$gt": 10}})) == [11, 13, 15, 17, 19]
    assert coll.delete_many({"_id": {"$lt": 5}}).deleted_count == 5
    assert coll.count_documents({}) == 5


def test_cursor_getmore_across_batches_and_kill(relay_client: MongoClient) -> None:
    coll = relay_client.mp_cursor.items
    coll.drop()
    coll.insert_many([{"_id": i} for i in range(1000)])
    assert [d["_id"] for d in coll.find().sort("_id", 1).batch_size(37)] == list(range(1000))
    cursor = coll.find().batch_size(10)
    next(cursor)
    cursor_id = cursor.cursor_id
    assert cursor_id
    reply = relay_client.mp_cursor.command("killCursors", "items", cursors=[cursor_id])
    assert cursor_id in reply["cursorsKilled"]
    with pytest.raises(OperationFailure):
        relay_client.mp_cursor.command("getMore", cursor_id, collection="items")


def test_transaction_commits_and_aborts(relay_client: MongoClient) -> None:
    coll = relay_client.mp_txn.items
    coll.drop()
    coll.insert_one({"_id": 0})
    with relay_client.start_session() as s:
        with s.start_transaction():
            coll.insert_one({"_id": 1}, session=s)
        with s.start_transaction():
            coll.insert_one({"_id": 2}, session=s)
            s.abort_transaction()
    assert sorted(d["_id"] for d in coll.find()) == [0, 1]


@pytest.mark.parametrize("compressor", ["zlib", "snappy"])
def test_compression_negotiated_and_used(relay_proxy: ProxyProcess, compressor: str) -> None:
    import urllib.request

    def bytes_in() -> float:
        with urllib.request.urlopen(relay_proxy.admin_url + "/metrics") as r:
            for line in r.read().decode().splitlines():
                if line.startswith("mongobranch_bytes_in_total"):
                    return float(line.split()[1])
        raise AssertionError("no bytes_in metric")

    c: MongoClient = MongoClient(relay_proxy.uri, compressors=compressor)
    try:
        c.admin.command("ping")
        pool_conn_compressors = c.admin.command("hello", compression=[compressor])["compression"]
        assert pool_conn_compressors == [compressor]
        coll = c.mp_compress.items
        coll.drop()
        doc = {"_id": 1, "blob": "a" * 200_000}
        before = bytes_in()
        coll.insert_one(doc)
        sent = bytes_in() - before
        # 200 kB of one repeated letter compresses far below its size: it was compressed.
        assert sent < 50_000
        assert coll.find_one({"_id": 1}) == doc
    finally:
        c.close()


async def test_async_pymongo(relay_proxy: ProxyProcess) -> None:
    c: AsyncMongoClient = AsyncMongoClient(relay_proxy.uri)
    try:
        coll = c.mp_async.items
        await coll.drop()
        await coll.insert_many([{"_id": i} for i in range(250)])
        got = [d["_id"] async for d in coll.find().sort("_id", 1).batch_size(20)]
        assert got == list(range(250))
    finally:
        await c.close()


def test_healthz_and_metrics(relay_proxy: ProxyProcess) -> None:
    status, body = relay_proxy.api("GET", "/healthz")
    assert status == 200 and body == {"status": "ok"}
    import urllib.request

    with urllib.request.urlopen(relay_proxy.admin_url + "/metrics") as r:
        text = r.read().decode()
    for name in ("mongobranch_open_connections", "mongobranch_requests_total",
                 "mongobranch_request_seconds_bucket", "mongobranch_upstream_errors_total",
                 "mongobranch_bytes_in_total", "mongobranch_bytes_out_total"):
        assert name in text
