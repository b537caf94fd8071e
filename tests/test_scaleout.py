"""Scale-out: three `mongobranch serve` processes over one upstream and one metadata
database, each on its own loopback address as each machine of a cluster has its own,
all on the same port numbers; one holds the engine lease and the others relay its
clients to it; a SIGKILL of the holder loses no acknowledged write and another process
serves the branch again (docs/ARCHITECTURE.md, "Scale-out")."""

from __future__ import annotations

import datetime as dt
import json
import secrets
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from tests.servers import ProxyProcess, Secantus, executable, free_port, free_range, until

LEASE = 2.0
# For a test that is not about takeover. Seen once in a full run on a loaded machine: the
# holder, busy relaying a 15 MB document and a 5 MB insert_many, missed its 2 s lease and
# stopped, and the driver's retry of the insert_many through the next holder failed with
# a duplicate key on its first document. A retry run alone is answered from the
# upstream's record (SecantusDB dedupes it): most likely the retry met its first attempt
# still running there, which mongod holds back by checking the session out and
# SecantusDB may not. Not established; takeover is tested above.
STEADY_LEASE = 30.0
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def _loopback_aliases() -> bool:
    """Linux routes all of 127.0.0.0/8 to the loopback interface; elsewhere only .1."""
    try:
        with socket.socket() as s:
            s.bind((HOSTS[1], 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _loopback_aliases(),
                                reason="needs 127.0.0.2 and 127.0.0.3 on the loopback "
                                       "interface (Linux has them)")


class Trio:
    def __init__(self, upstream: Secantus, meta_db: str, lease: float = LEASE):
        self.meta = MongoClient(upstream.uri)[meta_db]
        port, ports = free_port(), free_range(10)
        self.procs = [ProxyProcess(upstream.uri, meta_db=meta_db, port=port, branch_ports=ports,
                                   host=host, extra=["--lease", str(lease)]) for host in HOSTS]

    def holder(self) -> ProxyProcess | None:
        """The process whose engine lease runs now (per the metadata database)."""
        doc = self.meta["leases"].find_one({"_id": "engine"})
        if doc is None:
            return None
        pid = int(doc["owner"].split(":")[-2])
        return next((p for p in self.procs if p.proc is not None and p.pid == pid
                     and p.proc.poll() is None), None)


@pytest.fixture
def trio(upstream: Secantus, request: pytest.FixtureRequest) -> Iterator[Trio]:
    """Three processes, the first holding the lease (LEASE, or the test's
    `lease` marker)."""
    meta_db = f"mb_scale_{secrets.token_hex(3)}"
    marker = request.node.get_closest_marker("lease")
    trio = Trio(upstream, meta_db, marker.args[0] if marker else LEASE)
    first = trio.procs[0].start()
    # The first process takes the lease before the others start: it runs the engine.
    until("the first process holds the lease", lambda: trio.holder() is first)
    for proc in trio.procs[1:]:
        proc.start()
    try:
        yield trio
    finally:
        for proc in trio.procs:
            proc.stop()
        trio.meta.client.drop_database(meta_db)
        trio.meta.client.close()


def _metric(proc: ProxyProcess, name: str) -> float | None:
    with urllib.request.urlopen(proc.admin_url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def _find_all(uri: str, db: str) -> list[dict[str, Any]] | None:
    """The branch's documents through one process, None while it cannot answer."""
    with MongoClient(uri, serverSelectionTimeoutMS=2000, connectTimeoutMS=2000) as c:
        try:
            return sorted(c[db].t.find(), key=lambda d: d["_id"])
        except PyMongoError:
            return None


def test_three_processes_relay_and_take_over_after_sigkill(trio: Trio, db_name: str) -> None:
    a, b, c = trio.procs
    with MongoClient(a.uri, serverSelectionTimeoutMS=30000) as main_a:
        main_a[db_name].m.insert_one({"_id": "m", "v": 1})
    # Created through B's admin API: B does not run the engine, and hands it to A.
    status, made = b.api("POST", "/branches", {"name": "scale"})
    assert status == 201, made
    assert isinstance(made, dict)
    port = made["port"]
    status, shown = c.api("GET", "/branches/scale")
    assert status == 200 and isinstance(shown, dict)
    assert shown["owner"]["id"].split(":")[-2] == str(a.pid), shown["owner"]

    # Written through B (relayed to A), read through C (relayed to A): one branch.
    with MongoClient(f"mongodb://{b.host}:{port}/", serverSelectionTimeoutMS=30000) as via_b:
        for i in range(10):
            via_b[db_name].t.insert_one({"_id": i, "via": "b"})
    with MongoClient(f"mongodb://{c.host}:{port}/", serverSelectionTimeoutMS=30000) as via_c:
        assert [d["_id"] for d in via_c[db_name].t.find()] == list(range(10))
    # The branch is a branch: main does not see its writes, and a write to main through
    # another process than the engine's is not seen by the branch either. The branch
    # commands work on that process's main port too.
    with MongoClient(c.uri, serverSelectionTimeoutMS=30000) as main_c:
        assert main_c[db_name].t.count_documents({}) == 0
        main_c[db_name].m.update_one({"_id": "m"}, {"$set": {"v": 2}})
        listed = main_c.admin.command({"listBranches": 1})
        assert "scale" in json.dumps(listed, default=str)
    with MongoClient(f"mongodb://{b.host}:{port}/", serverSelectionTimeoutMS=30000) as via_b:
        assert via_b[db_name].m.find_one({"_id": "m"}) == {"_id": "m", "v": 1}

    # A client of C with retryable writes, connected (through C) before the kill.
    keep: MongoClient[dict[str, Any]] = MongoClient(
        f"mongodb://{c.host}:{port}/", retryWrites=True, serverSelectionTimeoutMS=60000)
    try:
        keep[db_name].t.insert_one({"_id": 10, "via": "keep"})
        a.kill()  # SIGKILL: no clean shutdown, the lease is left to expire
        killed = time.monotonic()
        # Its next write lands once a survivor serves the branch; the driver retries.
        keep[db_name].t.insert_one({"_id": 11, "via": "keep"})
        survivor = until("a survivor holds the lease", trio.holder)
        assert survivor in (b, c)
        docs = until("the branch is read through a survivor",
                     lambda: _find_all(f"mongodb://{b.host}:{port}/", db_name))
        took = time.monotonic() - killed
        print(f"\ntakeover: {took:.2f}s from SIGKILL to the branch read through a survivor "
              f"(lease {LEASE}s)")
        assert [d["_id"] for d in docs] == list(range(12))
        keep[db_name].t.insert_one({"_id": 12, "via": "keep"})
    finally:
        keep.close()
    docs = until("the branch is read through the other survivor",
                 lambda: _find_all(f"mongodb://{c.host}:{port}/", db_name))
    assert [d["_id"] for d in docs] == list(range(13))
    with MongoClient(f"mongodb://{c.host}:{port}/", serverSelectionTimeoutMS=30000) as via_c:
        assert via_c[db_name].m.find_one({"_id": "m"}) == {"_id": "m", "v": 1}
    status, shown = b.api("GET", "/branches/scale")
    assert status == 200 and isinstance(shown, dict)
    assert shown["owner"]["id"].split(":")[-2] == str(survivor.pid)
    assert _metric(survivor, "mongobranch_engine_lease_held") == 1.0
    assert _metric(survivor, "mongobranch_engine_takeovers_total") == 1.0
    other = c if survivor is b else b
    assert _metric(other, "mongobranch_engine_lease_held") == 0.0
    # The branch keeps working for the admin API through either survivor.
    status, listed = other.api("GET", "/branches")
    assert status == 200 and "scale" in json.dumps(listed)
    # The new holder's engine makes branches too, created and dropped through the other
    # survivor, whose ports follow the catalog.
    status, made = other.api("POST", "/branches", {"name": "scale-2"})
    assert status == 201, made
    assert isinstance(made, dict)
    port2 = made["port"]
    with MongoClient(f"mongodb://{other.host}:{port2}/",
                     serverSelectionTimeoutMS=30000) as via_other:
        via_other[db_name].t.insert_one({"_id": "new"})
    docs = until("the new branch is read through the holder",
                 lambda: _find_all(f"mongodb://{survivor.host}:{port2}/", db_name))
    assert [d["_id"] for d in docs] == ["new"]
    relayed = _metric(other, 'mongobranch_relayed_connections_total{listener="branch"}')
    assert relayed is not None and relayed > 0
    status, _ = other.api("DELETE", "/branches/scale-2")
    assert status == 200
    until("the dropped branch's port closes on the follower",
          lambda: not _listening(other.host, port2))


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def test_a_holder_whose_lease_was_taken_stops_at_once(upstream: Secantus) -> None:
    """Two engines never write side by side: a holder that finds its lease held by another
    process (here written by hand, as a process that took it after a pause of this one
    would) exits instead of serving on."""
    meta_db = f"mb_scale_{secrets.token_hex(3)}"
    meta = MongoClient(upstream.uri)[meta_db]
    proc = ProxyProcess(upstream.uri, meta_db=meta_db, extra=["--lease", str(LEASE)])
    proc.start()
    try:
        until("it holds the lease", lambda: meta["leases"].find_one(
            {"_id": "engine", "owner": {"$regex": f":{proc.pid}:"}}))
        meta["leases"].update_one({"_id": "engine"}, {"$set": {
            "owner": "elsewhere:1:000000", "expires": dt.datetime(2100, 1, 1)}})
        assert proc.proc is not None
        assert proc.proc.wait(60) == 3
        assert "the engine lease was taken by elsewhere:1:000000" in proc.read_log()
    finally:
        proc.stop()
        meta.client.drop_database(meta_db)
        meta.client.close()


@pytest.mark.parametrize(("args", "says"), [
    (["--tls-cert", "/nonexistent.pem"], "does not support --tls-cert"),
    (["--listen", "0.0.0.0:27018"], "needs --relay-host"),
])
def test_scale_out_settings_that_cannot_work_are_refused(args: list[str], says: str) -> None:
    """Refused at start, before anything listens: a relay cannot pass TLS through, and a
    wildcard address cannot be where the other processes relay to."""
    done = subprocess.run([executable("mongobranch") or "mongobranch", "serve", "--lease", "2",
                           *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert says in done.stderr


def test_a_stopped_holder_hands_its_branches_over(trio: Trio, db_name: str) -> None:
    """SIGTERM (a rolling restart): the holder drains, releases the lease, and a survivor
    takes it at its next round, with every acknowledged write."""
    a, b, c = trio.procs
    status, made = c.api("POST", "/branches", {"name": "handover"})
    assert status == 201 and isinstance(made, dict), made
    port = made["port"]
    with MongoClient(f"mongodb://{c.host}:{port}/", serverSelectionTimeoutMS=30000) as via_c:
        via_c[db_name].t.insert_many([{"_id": i} for i in range(5)])
    assert a.stop() == 0
    # Released at the end of the stop, not left to run out.
    lease = trio.meta["leases"].find_one({"_id": "engine"})
    assert lease is not None
    assert lease["expires"] == dt.datetime(1970, 1, 1) or f":{a.pid}:" not in lease["owner"]
    survivor = until("a survivor holds the lease", trio.holder)
    assert survivor in (b, c)
    with MongoClient(f"mongodb://{b.host}:{port}/", serverSelectionTimeoutMS=30000) as via_b:
        via_b[db_name].t.insert_one({"_id": 5})
        assert [d["_id"] for d in via_b[db_name].t.find().sort("_id", 1)] == list(range(6))
    assert "could not release" not in a.read_log()


@pytest.mark.lease(STEADY_LEASE)
def test_large_messages_cross_the_relay_whole(trio: Trio, db_name: str) -> None:
    """Byte for byte both ways, with the relay's flow control: a document near the 16 MB
    limit and a cursor of many batches, written and read through a follower."""
    _, b, _ = trio.procs
    big = "x" * (15 * 1024 * 1024)
    with MongoClient(b.uri, serverSelectionTimeoutMS=30000) as via_b:
        coll = via_b[db_name].big
        coll.insert_one({"_id": "big", "s": big})
        coll.insert_many([{"_id": i, "pad": "y" * 1000} for i in range(5000)])
        assert coll.find_one({"_id": "big"}) == {"_id": "big", "s": big}
        assert sum(1 for _ in coll.find({"_id": {"$type": "int"}}).batch_size(100)) == 5000
    relayed = _metric(b, 'mongobranch_relayed_connections_total{listener="main"}')
    assert relayed is not None and relayed > 0
