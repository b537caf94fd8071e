"""The upstream dies, hangs and comes back; the proxy itself is stopped by signals.

Each test runs its own SecantusDB and proxy process: these tests kill them.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient, WriteConcern
from pymongo.errors import OperationFailure, PyMongoError

from tests import rawwire
from tests.servers import ProxyProcess, Secantus

FAST_FAIL = 15.0  # a failing command must come back well within this, never hang


@dataclass
class Upstream(Secantus):
    """A SecantusDB with test commands (failpoints) enabled."""

    extra: list[str] = field(default_factory=lambda: ["--enable-test-commands"])


@pytest.fixture()
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    """An upstream of the test's own, on disk so that a restart keeps its data."""
    server = Upstream(storage=str(tmp_path / "db")).start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()  # its data is thrown away with tmp_path: no clean shutdown needed


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[Upstream]:
    """For tests that stop the proxy but leave the upstream alone."""
    server = Upstream().start()
    yield server
    server.stop()


@pytest.fixture()
def proxy(upstream: Upstream) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(upstream.uri).start()
    yield proc
    proc.kill()


@pytest.fixture()
def doomed_proxy(shared_upstream: Upstream) -> Iterator[ProxyProcess]:
    """A proxy of the test's own, which the test stops with a signal."""
    proc = ProxyProcess(shared_upstream.uri).start()
    yield proc
    proc.kill()


def healthz(proxy: ProxyProcess) -> int:
    try:
        with urllib.request.urlopen(proxy.admin_url + "/healthz", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def wait_healthz(proxy: ProxyProcess, status: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthz(proxy) == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"/healthz never answered {status} within {timeout}s")


def direct(server: Secantus) -> MongoClient:
    return MongoClient(server.uri, directConnection=True, serverSelectionTimeoutMS=5000)


def block_next(server: Secantus, command: str, app_name: str, ms: int) -> None:
    """Make the upstream sleep ms before running the next `command` from app_name."""
    with direct(server) as c:
        c.admin.command("configureFailPoint", "failCommand", mode={"times": 1}, data={
            "failCommands": [command], "blockConnection": True, "blockTimeMS": ms,
            "appName": app_name})


def assert_unreachable(exc: BaseException) -> None:
    if isinstance(exc, OperationFailure):
        assert exc.code == 6, exc.details  # HostUnreachable, as mongos answers


def run_failing(fn: Any) -> PyMongoError:
    started = time.monotonic()
    with pytest.raises(PyMongoError) as info:
        fn()
    assert time.monotonic() - started < FAST_FAIL
    assert_unreachable(info.value)
    return info.value


def test_upstream_killed_then_restarted(upstream: Upstream, proxy: ProxyProcess) -> None:
    client: MongoClient = MongoClient(proxy.uri, serverSelectionTimeoutMS=3000)
    try:
        coll = client.uf.items.with_options(write_concern=WriteConcern(j=True))
        coll.drop()
        coll.insert_many([{"_id": i} for i in range(5)])
        assert coll.count_documents({}) == 5

        upstream.kill()
        err = run_failing(lambda: coll.find_one({"_id": 1}))
        if isinstance(err, OperationFailure):
            assert "upstream" in str(err)
        run_failing(lambda: client.uf.command("count", "items"))
        # A retryable write fails the same way (after the driver's one retry), labelled so.
        write_err = run_failing(lambda: coll.insert_one({"_id": 99}))
        if isinstance(write_err, OperationFailure):
            assert write_err.has_error_label("RetryableWriteError")
        wait_healthz(proxy, 503)
        # Branch management needs the upstream: a clear 503, within seconds.
        status, body = proxy.api("POST", "/branches", {"name": "during-outage"})
        assert status == 503 and "upstream unavailable" in body["error"], body  # type: ignore[index]
        # The proxy answers the handshake itself: the driver still sees it.
        assert client.admin.command("hello")["msg"] == "isdbgrid"

        upstream.start()  # same port, same on-disk data
        wait_healthz(proxy, 200)
        # The same client, on its same pooled connections: the proxy reconnects upstream.
        assert sorted(d["_id"] for d in coll.find()) == [0, 1, 2, 3, 4]
        coll.insert_one({"_id": 5})
        assert coll.count_documents({}) == 6
        status, body = proxy.api("POST", "/branches", {"name": "during-outage"})
        assert status == 201, body
        assert proxy.api("DELETE", "/branches/during-outage")[0] == 200
    finally:
        client.close()
    assert "Traceback" not in proxy.read_log()


def test_upstream_dies_during_a_request(upstream: Upstream, proxy: ProxyProcess) -> None:
    client: MongoClient = MongoClient(proxy.uri, appname="dies-mid-request",
                                      serverSelectionTimeoutMS=3000, retryReads=False)
    try:
        coll = client.uf.mid
        coll.with_options(write_concern=WriteConcern(j=True)).insert_one({"_id": 1})
        block_next(upstream, "find", "dies-mid-request", 10_000)
        killer = threading.Timer(1.0, upstream.kill)
        killer.start()
        try:
            run_failing(lambda: coll.find_one({"_id": 1}))
        finally:
            killer.join()
        # Other clients get the same answer, not a hang.
        other: MongoClient = MongoClient(proxy.uri, serverSelectionTimeoutMS=3000)
        try:
            run_failing(lambda: other.uf.mid.find_one({}))
        finally:
            other.close()
        upstream.start()
        wait_healthz(proxy, 200)
        assert coll.find_one({"_id": 1}) == {"_id": 1}
    finally:
        client.close()


def test_hung_upstream_turns_healthz_503(upstream: Upstream, proxy: ProxyProcess) -> None:
    assert upstream.proc is not None
    wait_healthz(proxy, 200)
    upstream.proc.send_signal(signal.SIGSTOP)
    replies: dict[str, Any] = {}

    def ping_on_new_connection() -> None:
        # A new client connection must not be stuck in the upstream handshake forever.
        started = time.monotonic()
        with rawwire.connect(proxy.port, timeout=30) as sock:
            replies["ping"] = rawwire.command(sock, {"ping": 1, "$db": "admin"})
        replies["seconds"] = time.monotonic() - started

    pinger = threading.Thread(target=ping_on_new_connection)
    pinger.start()
    try:
        # The kernel still accepts connections for a stopped process: only a bounded
        # health check notices it does not answer.
        wait_healthz(proxy, 503, timeout=30)
        pinger.join(30)
        assert replies["ping"]["code"] == 6, replies
        assert replies["seconds"] < FAST_FAIL
    finally:
        upstream.proc.send_signal(signal.SIGCONT)
    wait_healthz(proxy, 200)
    with MongoClient(proxy.uri, serverSelectionTimeoutMS=3000) as c:
        assert c.admin.command("ping")["ok"] == 1.0


def test_an_upstream_busy_for_seconds_fails_no_engine_operation(upstream: Upstream) -> None:
    """An upstream that stops answering for longer than a client connection waits (5 s)
    but less than the engine's heartbeat timeout (pymongo's 20 s): the branch created
    meanwhile is created once it answers again. The engine's heartbeat used to time out
    after 5 s and pymongo then cancelled the fork under way ("operation cancelled"); a
    heartbeat every 0.5 s makes one fall inside the stall for certain."""
    assert upstream.proc is not None
    proc = ProxyProcess(upstream.uri + "?heartbeatFrequencyMS=500").start()
    try:
        with MongoClient(proc.uri) as main:
            main.uf.busy.insert_many([{"_id": i} for i in range(3)])
        replies: list[tuple[int, Any]] = []
        upstream.proc.send_signal(signal.SIGSTOP)
        try:
            creating = threading.Thread(target=lambda: replies.append(
                proc.api("POST", "/branches", {"name": "during-stall"})))
            creating.start()
            time.sleep(7)  # the stall itself: longer than 5 s, shorter than 20 s
        finally:
            upstream.proc.send_signal(signal.SIGCONT)
        creating.join(60)
        assert replies and replies[0][0] == 201, replies
        with MongoClient(replies[0][1]["uri"]) as b:
            assert sorted(d["_id"] for d in b.uf.busy.find()) == [0, 1, 2]
    finally:
        proc.kill()


# -- signals ---------------------------------------------------------------------------


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except ConnectionResetError:
        return False  # the listener closed while this connect was queued: ask again
    except ConnectionRefusedError:
        return True


def _requests(proxy: ProxyProcess, command: str) -> float:
    with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f'mongobranch_requests_total{{command="{command}"}}'):
                return float(line.split()[1])
    return 0.0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_request_then_exits_0(
    shared_upstream: Upstream, doomed_proxy: ProxyProcess, sig: int
) -> None:
    upstream, proxy = shared_upstream, doomed_proxy
    assert proxy.proc is not None
    # Short server selection: closing a client whose server is gone waits that long.
    client: MongoClient = MongoClient(proxy.uri, appname="slow-at-shutdown",
                                      serverSelectionTimeoutMS=1000, retryReads=False)
    idle: MongoClient = MongoClient(proxy.uri, serverSelectionTimeoutMS=1000)
    result: dict[str, Any] = {}
    stopped = False
    try:
        client.uf.drain.drop()
        client.uf.drain.insert_many([{"_id": i, "pad": "x" * 1000} for i in range(2000)])
        idle.admin.command("ping")  # an idle pooled connection, plus its monitor's stream
        before = _requests(proxy, "find")
        # The upstream answers nothing until the test releases it: the find stays in
        # flight for as long as the test needs, however busy the machine.
        assert upstream.proc is not None
        upstream.proc.send_signal(signal.SIGSTOP)
        stopped = True

        def slow_find() -> None:
            try:
                # One reply of about 2 MB: the whole result in the first batch.
                cursor = client.uf.drain.find().sort("_id", 1).batch_size(2000).limit(2000)
                result["docs"] = list(cursor)
            except BaseException as exc:
                result["error"] = exc

        worker = threading.Thread(target=slow_find)
        worker.start()
        deadline = time.monotonic() + 10
        while _requests(proxy, "find") <= before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _requests(proxy, "find") > before, "the find never reached the proxy"

        proxy.signal(sig)
        deadline = time.monotonic() + 5
        while not _refused(proxy.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _refused(proxy.port), "new connections still accepted during shutdown"
        assert worker.is_alive(), "the slow request should still be in flight"

        upstream.proc.send_signal(signal.SIGCONT)
        stopped = False
        code = proxy.proc.wait(timeout=15)  # grace is 10 s
        worker.join(10)
        assert code == 0
        # The in-flight request was answered in full before the process went away.
        assert "error" not in result, result.get("error")
        assert [d["_id"] for d in result["docs"]] == list(range(2000))
        assert _refused(proxy.port)
    finally:
        if stopped and upstream.proc is not None:
            upstream.proc.send_signal(signal.SIGCONT)
        client.close()
        idle.close()
    log = proxy.read_log()
    assert "shutting down" in log and "Traceback" not in log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_with_idle_clients_exits_0_promptly(doomed_proxy: ProxyProcess, sig: int) -> None:
    proxy = doomed_proxy
    assert proxy.proc is not None
    clients = [MongoClient(proxy.uri, serverSelectionTimeoutMS=500) for _ in range(3)]
    try:
        for c in clients:
            c.admin.command("ping")
        started = time.monotonic()
        proxy.signal(sig)
        assert proxy.proc.wait(timeout=15) == 0
        # Idle connections are not waited on for the whole grace period.
        assert time.monotonic() - started < 9
        assert _refused(proxy.port)
        assert _refused(proxy.admin_port)
    finally:
        for c in clients:
            c.close()
    assert "Traceback" not in proxy.read_log()
