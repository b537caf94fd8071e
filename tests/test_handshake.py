"""The proxy's own mongos handshake: streaming hello, helloOk, compression negotiation."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
from bson import Int64, ObjectId
from pymongo import MongoClient, monitoring

from tests import rawwire
from tests.servers import ProxyProcess

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14 and 15 of stat (utime, stime), counted after the parenthesised name.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def hello(sock: Any, request_id: int = 1, **fields: Any) -> dict[str, Any]:
    return rawwire.command(sock, {"hello": 1, **fields, "$db": "admin"}, request_id=request_id)


def test_streaming_hello_waits_without_spinning(proxy: ProxyProcess) -> None:
    assert proxy.proc is not None
    with rawwire.connect(proxy.port, timeout=30) as sock:
        first = hello(sock, client={"driver": {"name": "raw", "version": "0"},
                                    "os": {"type": "linux"}})
        version = first["topologyVersion"]
        assert isinstance(version["processId"], ObjectId)
        # int64 on the wire, as mongod: pymongo keeps the BSON type as Int64.
        assert isinstance(version["counter"], Int64)
        cpu_before = cpu_seconds(proxy.proc.pid)
        for i in range(3):
            started = time.monotonic()
            reply = hello(sock, request_id=10 + i, topologyVersion=version, maxAwaitTimeMS=500)
            waited = time.monotonic() - started
            assert reply["ok"] == 1.0 and reply["msg"] == "isdbgrid"
            assert reply["topologyVersion"] == version
            assert waited >= 0.4, waited
        cpu_used = cpu_seconds(proxy.proc.pid) - cpu_before
        # 1.5 s of waiting: a busy loop would burn about that much CPU; waiting burns ~none.
        assert cpu_used < 0.5, f"proxy used {cpu_used:.2f}s CPU during 1.5s of streaming hello"


def test_streaming_hello_does_not_block_other_connections(proxy: ProxyProcess) -> None:
    with rawwire.connect(proxy.port, timeout=30) as waiting:
        version = hello(waiting)["topologyVersion"]
        result: dict[str, float] = {}

        def long_wait() -> None:
            started = time.monotonic()
            hello(waiting, request_id=2, topologyVersion=version, maxAwaitTimeMS=2000)
            result["waited"] = time.monotonic() - started

        t = threading.Thread(target=long_wait)
        t.start()
        time.sleep(0.2)
        with rawwire.connect(proxy.port) as other:
            started = time.monotonic()
            assert rawwire.command(other, {"ping": 1, "$db": "admin"})["ok"] == 1.0
            assert time.monotonic() - started < 1.5
        t.join(10)
        assert result["waited"] >= 1.5


def test_stale_topology_version_answers_at_once(proxy: ProxyProcess) -> None:
    """mongod only holds a hello whose topologyVersion is its current one: one from another
    process (a restarted server, here a restarted proxy) is answered at once."""
    with rawwire.connect(proxy.port, timeout=30) as sock:
        current = hello(sock)["topologyVersion"]
        version = {"processId": ObjectId(), "counter": Int64(current["counter"])}
        started = time.monotonic()
        reply = hello(sock, request_id=2, topologyVersion=version, maxAwaitTimeMS=5000)
        assert time.monotonic() - started < 2.5
        assert reply["ok"] == 1.0 and reply["topologyVersion"] == current


@pytest.mark.parametrize(("fields", "code"), [
    ({"maxAwaitTimeMS": 100}, 31368),
    ({"topologyVersion": "current"}, 31368),
    ({"topologyVersion": "current", "maxAwaitTimeMS": -1}, 2),
    ({"topologyVersion": "current", "maxAwaitTimeMS": "soon"}, 14),
    ({"topologyVersion": {"processId": "x", "counter": Int64(0)}, "maxAwaitTimeMS": 1}, 14),
    ({"topologyVersion": {"counter": Int64(0)}, "maxAwaitTimeMS": 1}, 40414),
    ({"topologyVersion": "negative", "maxAwaitTimeMS": 1}, 31372),
    ({"topologyVersion": "future", "maxAwaitTimeMS": 1}, 31382),
])
def test_bad_awaitable_hello_arguments(proxy: ProxyProcess, fields: dict[str, Any],
                                       code: int) -> None:
    with rawwire.connect(proxy.port) as sock:
        current = hello(sock)["topologyVersion"]
        special = {
            "current": current,
            "negative": {"processId": current["processId"], "counter": Int64(-1)},
            "future": {"processId": current["processId"], "counter": Int64(current["counter"] + 5)},
        }
        request = {k: special.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}
        reply = hello(sock, request_id=2, **request)
        assert reply["ok"] == 0.0 and reply["code"] == code, reply
        # The connection stays usable.
        assert hello(sock, request_id=3)["ok"] == 1.0


def test_pymongo_streaming_monitor(proxy: ProxyProcess) -> None:
    """pymongo's own streaming protocol (exhaustAllowed hellos) works against the proxy."""

    class Heartbeats(monitoring.ServerHeartbeatListener):
        def __init__(self) -> None:
            self.ok: list[monitoring.ServerHeartbeatSucceededEvent] = []
            self.bad: list[monitoring.ServerHeartbeatFailedEvent] = []

        def started(self, event: monitoring.ServerHeartbeatStartedEvent) -> None:
            pass

        def succeeded(self, event: monitoring.ServerHeartbeatSucceededEvent) -> None:
            self.ok.append(event)

        def failed(self, event: monitoring.ServerHeartbeatFailedEvent) -> None:
            self.bad.append(event)

    beats = Heartbeats()
    with MongoClient(proxy.uri, heartbeatFrequencyMS=500, event_listeners=[beats]) as c:
        c.admin.command("ping")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(e.awaited for e in beats.ok) < 2:
            time.sleep(0.1)
        assert sum(e.awaited for e in beats.ok) >= 2, beats.ok
        assert not beats.bad
        assert c.admin.command("ping")["ok"] == 1.0


def test_hello_ok_echo(proxy: ProxyProcess) -> None:
    with rawwire.connect(proxy.port) as sock:
        assert hello(sock, helloOk=True)["helloOk"] is True
        assert "helloOk" not in hello(sock, request_id=2)
        assert "helloOk" not in hello(sock, request_id=3, helloOk=False)
        legacy = rawwire.command(sock, {"isMaster": 1, "helloOk": True, "$db": "admin"},
                                 request_id=4)
        assert legacy["helloOk"] is True and legacy["ismaster"] is True
        assert "isWritablePrimary" not in legacy
        modern = hello(sock, request_id=5)
        assert modern["isWritablePrimary"] is True and "ismaster" not in modern


@pytest.mark.parametrize(("offer", "expected"), [
    (["snappy", "zlib", "bogus"], ["snappy", "zlib"]),
    (["zlib", "snappy"], ["zlib", "snappy"]),
    (["bogus", "zstd", "zlib"], ["zstd", "zlib"]),
    (["bogus"], []),
    ([], []),
])
def test_compression_negotiation(proxy: ProxyProcess, offer: list[str],
                                 expected: list[str]) -> None:
    with rawwire.connect(proxy.port) as sock:
        assert hello(sock, compression=offer)["compression"] == expected


def test_no_compression_field_without_an_offer(proxy: ProxyProcess) -> None:
    with rawwire.connect(proxy.port) as sock:
        assert "compression" not in hello(sock)


def test_hello_limits_come_from_the_upstream(proxy: ProxyProcess, direct: MongoClient) -> None:
    up = direct.admin.command("hello")
    with rawwire.connect(proxy.port) as a, rawwire.connect(proxy.port) as b:
        mine, theirs = hello(a), hello(b)
    for key in ("maxBsonObjectSize", "maxMessageSizeBytes", "maxWriteBatchSize",
                "maxWireVersion", "logicalSessionTimeoutMinutes"):
        assert mine[key] == up[key], key
    assert mine["msg"] == "isdbgrid" and "setName" not in mine and "hosts" not in mine
    assert isinstance(mine["connectionId"], Int64)
    assert mine["connectionId"] != theirs["connectionId"]
    assert mine["readOnly"] is False and mine["localTime"] is not None
