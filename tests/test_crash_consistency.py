"""Crash consistency: SIGKILL the proxy in the middle of a branch write workload.

A dedicated on-disk SecantusDB (one for this module, emptied between tests) and a
dedicated proxy process per test. A thread runs a
seeded mix of writes on a branch and records every acknowledged one (the op
and its result) in order; the proxy is SIGKILLed after N acknowledged writes
plus a seeded jitter of up to 20 ms, so the kill lands inside some write.
A new proxy is started on the same upstream, meta db and branch ports, and:

(a) every acknowledged write is visible: the acknowledged ops replayed on a
    plain copy collection give the same results the branch gave, and the
    branch equals the copy, with or without the op that was in flight;
(b) the overlay equals a replay of the WAL, folded here (last op per _id,
    puts give post-images), and the hidden ids are the ids the WAL names;
(c) nothing is half-applied: the branch view is exactly one of the two copies;
    and the recovered branch keeps working: more writes after the restart give the
    same results and the same data as on that copy.

Right after the kill (before the restart) the test also checks the recovery
precondition: an overlay that differs from its WAL fold has a dirty marker. A few
writes before the kill follow an idle pause long enough for the engine to clear the
marker, so the kill also covers a marker set again after a flush.

A second test sends the same retryable write (same lsid and txnNumber) before and
after a SIGKILL and restart: it must be applied once. So must each op of a client
`bulkWrite` sent again after a restart, and after a SIGKILL that cut its first attempt
off between two of its ops (a `failCommand` failpoint of the upstream holds the op's
overlay write, so the kill lands there, not at a time).

    MONGOBRANCH_CRASH_SEED=N pytest tests/test_crash_consistency.py -s   # other seeds
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from bson import Binary, Int64
from pymongo import MongoClient, ReturnDocument
from pymongo.collection import Collection
from pymongo.errors import OperationFailure, PyMongoError

from tests import rawwire
from tests.servers import ProxyProcess, Secantus, until

SEED = int(os.environ.get("MONGOBRANCH_CRASH_SEED", "20261126"))
BASE_DOCS = 300
DB, COLL = "crashdb", "items"
COPY_DB = "crashcopy"
WITH = "items_with_in_flight"
META = "mongobranch_crash"
BRANCH = "crashy"
KEYS = 50


@dataclass
class Op:
    kind: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def apply(self, coll: Collection) -> Any:
        """Runs the op; returns a comparable summary of its result."""
        if self.kind == "insert_one":
            return coll.insert_one(*self.args).inserted_id
        if self.kind in ("update_one", "update_many"):
            res = getattr(coll, self.kind)(*self.args, **self.kwargs)
            return res.matched_count, res.modified_count, res.upserted_id
        if self.kind == "delete_one":
            return coll.delete_one(*self.args).deleted_count
        if self.kind == "find_one_and_update":
            return coll.find_one_and_update(*self.args, **self.kwargs)
        raise AssertionError(self.kind)


def make_ops(rng: random.Random, n: int, fresh: int = 0) -> Iterator[Op]:
    """A seeded, order-independent write mix (every single-doc op is addressed by _id);
    new ids start at `fresh` above the generator's id ranges."""
    next_id = 100_000 + fresh
    for i in range(n):
        roll = rng.random()
        some_id = rng.randrange(0, BASE_DOCS + 40)  # now and then a deleted or absent one
        if some_id >= BASE_DOCS:
            some_id = 100_000 + some_id - BASE_DOCS
        if roll < 0.25:
            yield Op("insert_one", ({"_id": next_id, "k": rng.randrange(KEYS), "v": 0,
                                     "s": f"new{i}", "tags": ["n", str(i)]},))
            next_id += 1
        elif roll < 0.50:
            yield Op("update_one", ({"_id": some_id}, {"$inc": {"v": 1}, "$set": {"t": i}}))
        elif roll < 0.62:
            yield Op("update_many", ({"k": rng.randrange(KEYS)}, {"$inc": {"v": 10}}))
        elif roll < 0.70:
            lo = rng.randrange(KEYS)
            yield Op("update_many", ({"k": {"$gte": lo, "$lt": lo + 3}},
                                     {"$set": {"s": f"m{i}", "sub.w": i}}))
        elif roll < 0.73:
            yield Op("update_one", ({"_id": 200_000 + fresh + i}, {"$set": {"k": 7, "up": i}}),
                     {"upsert": True})
        elif roll < 0.85:
            yield Op("delete_one", ({"_id": some_id},))
        else:
            yield Op("find_one_and_update",
                     ({"k": rng.randrange(KEYS)}, {"$inc": {"v": 100}, "$push": {"log": i}}),
                     {"sort": [("_id", 1)], "return_document": ReturnDocument.AFTER})


class Workload(threading.Thread):
    """Runs ops on the branch until one fails; records acknowledged ops in order."""

    def __init__(self, uri: str, seed: int, kill_after: int,
                 at_rest: Callable[[], bool] | None = None, fresh: int = 0):
        super().__init__(daemon=True)
        self.at_rest = at_rest
        self.client: MongoClient = MongoClient(
            uri, retryWrites=False, retryReads=False, serverSelectionTimeoutMS=2000,
            socketTimeoutMS=10000, connectTimeoutMS=2000)
        self.ops = make_ops(random.Random(seed), 100_000, fresh)
        self.kill_after = kill_after
        self.acked: list[tuple[Op, Any]] = []
        self.in_flight: Op | None = None
        self.error: BaseException | None = None
        self.reached = threading.Event()
        self.rested: bool | None = None

    def run(self) -> None:
        coll = self.client[DB][COLL]
        try:
            for op in self.ops:
                if self.at_rest is not None and len(self.acked) == self.kill_after - 3:
                    # Let the engine clear its dirty marker first: the last writes before
                    # the kill must set it again.
                    deadline = time.monotonic() + 10
                    while not self.at_rest() and time.monotonic() < deadline:
                        time.sleep(0.05)
                    self.rested = self.at_rest()
                self.in_flight = op
                result = op.apply(coll)
                self.acked.append((op, result))
                self.in_flight = None
                if len(self.acked) >= self.kill_after:
                    self.reached.set()
        except PyMongoError as exc:
            self.error = exc
        finally:
            self.reached.set()
            self.client.close()


def wal_fold(direct: MongoClient, bid: str, coll: str = COLL
             ) -> tuple[dict[Any, dict[str, Any]], set[Any]]:
    """Live docs and hidden ids of the overlay, as the WAL says they must be."""
    entries = list(direct[META]["wal"].find({"b": bid, "ns": f"{DB}.{coll}"}).sort("_id", 1))
    drops = [i for i, e in enumerate(entries) if e["op"] == "drop"]
    if drops:
        entries = entries[drops[-1] + 1:]
    last: dict[Any, dict[str, Any]] = {}
    for entry in entries:
        last[entry["id"]] = entry
    live = {i: e["post"] for i, e in last.items() if e["op"] == "put"}
    return live, set(last)


def overlay(direct: MongoClient, bid: str, coll: str = COLL
            ) -> tuple[dict[Any, dict[str, Any]], set[Any]]:
    db = direct[DB]
    live = {d["_id"]: d for d in db[f"__mb_{bid}_l_{coll}"].find()}
    hidden = {d["_id"] for d in db[f"__mb_{bid}_h_{coll}"].find()}
    return live, hidden


def snapshot(coll: Collection) -> list[dict[str, Any]]:
    return list(coll.find().sort("_id", 1))


@pytest.fixture(scope="module")
def disk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secantus]:
    server = Secantus(storage=str(tmp_path_factory.mktemp("crash") / "secantus"),
                      extra=["--enable-test-commands"]).start()
    yield server
    server.stop()


@pytest.fixture()
def upstream(disk_server: Secantus) -> Secantus:
    """The module's on-disk server, emptied of what an earlier test left."""
    with MongoClient(disk_server.uri, directConnection=True) as c:
        for name in (DB, COPY_DB, META):
            c.drop_database(name)
    return disk_server


def _started(upstream: Secantus, proxies: list[ProxyProcess]) -> tuple[ProxyProcess,
                                                                       dict[str, Any]]:
    """A proxy on the module's server (added to `proxies`, for the test to kill) with
    the test's branch made: the proxy and the branch's description."""
    proxy = ProxyProcess(upstream.uri, meta_db=META).start()
    proxies.append(proxy)
    status, body = proxy.api("POST", "/branches", {"name": BRANCH})
    assert status == 201 and isinstance(body, dict), body
    return proxy, body


def _rebuilt_after_a_kill(upstream: Secantus, direct: MongoClient, first: ProxyProcess,
                          proxies: list[ProxyProcess]) -> None:
    """SIGKILL the proxy while an overlay is marked dirty; the next one, on the same
    ports, rebuilds it from the WAL."""
    assert direct[META].dirty.count_documents({}) >= 1
    first.kill()
    second = ProxyProcess(upstream.uri, meta_db=META, branch_ports=first.branch_ports)
    proxies.append(second.start())
    assert "rematerializing" in second.read_log()


@pytest.mark.parametrize("kill_after", [12, 45, 100])
def test_sigkill_mid_workload(upstream: Secantus, kill_after: int) -> None:
    rng = random.Random(SEED + kill_after)
    direct: MongoClient = MongoClient(upstream.uri, directConnection=True)
    clients = [direct]
    proxies: list[ProxyProcess] = []
    try:
        base = [{"_id": i, "k": rng.randrange(KEYS), "v": rng.randrange(1000),
                 "s": f"d{i}", "tags": ["a", "b"][: i % 3]} for i in range(BASE_DOCS)]
        for coll in (direct[DB][COLL], direct[COPY_DB][COLL], direct[COPY_DB][WITH]):
            coll.insert_many(base)
            coll.create_index("k")
        first, body = _started(upstream, proxies)
        branch_uri = body["uri"]
        bid = direct[META]["branches"].find_one({"_id": BRANCH})["bid"]

        marker = {"_id": f"{bid}:{DB}.{COLL}"}
        work = Workload(branch_uri, SEED * 7 + kill_after, kill_after,
                        lambda: direct[META]["dirty"].find_one(marker) is None)
        work.start()
        assert work.reached.wait(45), "workload never reached the kill point"
        assert work.error is None, f"workload failed before the kill: {work.error!r}"
        time.sleep(rng.uniform(0.0, 0.02))
        first.kill()
        work.join(20)
        assert not work.is_alive()
        assert work.error is not None, "the kill did not interrupt the workload"
        in_flight = work.in_flight
        acked = work.acked
        assert len(acked) >= kill_after
        assert work.rested, "the dirty marker was never cleared while the branch was idle"

        # Precondition of recovery: wherever the overlay and the WAL disagree, a dirty
        # marker must say so (give the upstream a moment to finish the dead proxy's commands).
        time.sleep(0.5)
        marked = direct[META]["dirty"].find_one(marker) is not None
        consistent = overlay(direct, bid) == wal_fold(direct, bid)
        assert consistent or marked, \
            "overlay differs from the WAL after the kill, and no dirty marker is left"

        second = ProxyProcess(upstream.uri, meta_db=META, branch_ports=first.branch_ports)
        second.start()
        proxies.append(second)

        # (a) every acknowledged write: same results on a plain copy, in order.
        copy, copy_with = direct[COPY_DB][COLL], direct[COPY_DB][WITH]
        for n, (op, result) in enumerate(acked):
            assert op.apply(copy) == result, f"acknowledged op #{n} {op} answered differently"
            op.apply(copy_with)
        if in_flight is not None:
            in_flight.apply(copy_with)
        without, with_op = snapshot(copy), snapshot(copy_with)

        # (c) the branch view is exactly one of the two outcomes.
        branch: MongoClient = MongoClient(branch_uri, serverSelectionTimeoutMS=10000)
        clients.append(branch)
        seen = snapshot(branch[DB][COLL])
        print(f"kill after {len(acked)} acked, in flight {in_flight}, marker {marked}, "
              f"consistent at kill {consistent}, applied {seen == with_op != without}, "
              f"rematerialized {'rematerializing' in second.read_log()}")
        assert seen in (without, with_op), (
            f"branch view after restart matches neither outcome of the in-flight op "
            f"{in_flight} ({len(acked)} acknowledged); "
            f"missing from branch: {[d['_id'] for d in without if d not in seen][:10]}, "
            f"extra on branch: {[d['_id'] for d in seen if d not in without][:10]}")

        # (b) the overlay is the fold of the WAL.
        live, hidden = overlay(direct, bid)
        want_live, want_hidden = wal_fold(direct, bid)
        assert sorted(live, key=repr) == sorted(want_live, key=repr)
        assert live == want_live
        assert hidden == want_hidden
        # ... and the base collection itself was never touched.
        assert snapshot(direct[DB][COLL]) == sorted(base, key=lambda d: d["_id"])

        # The recovered branch keeps working like the copy it matched.
        twin = copy if seen == without else copy_with
        more = make_ops(random.Random(SEED * 11 + kill_after), 25, fresh=50_000)
        for n, op in enumerate(more):
            assert op.apply(branch[DB][COLL]) == op.apply(twin), \
                f"op #{n} {op} after the restart answered differently"
        assert snapshot(branch[DB][COLL]) == snapshot(twin)
        live, hidden = overlay(direct, bid)
        assert (live, hidden) == wal_fold(direct, bid)
    finally:
        for c in clients:  # first: closing a client whose server is gone waits for it
            c.close()
        for proc in proxies:
            proc.kill()


KILLS = int(os.environ.get("MONGOBRANCH_CRASH_KILLS", "20"))


def test_repeated_sigkills_in_one_workload(upstream: Secantus) -> None:
    """KILLS SIGKILLs of the proxy in one branch's write workload, each at a seeded point
    inside some write. After every restart: each acknowledged write is there (the same
    ops on a plain copy answer the same and leave the same data), the write in flight is
    wholly applied or not at all, and the overlay is the fold of the WAL."""
    rng = random.Random(SEED * 3)
    direct: MongoClient = MongoClient(upstream.uri, directConnection=True)
    proxy: ProxyProcess | None = None
    try:
        base = [{"_id": i, "k": rng.randrange(KEYS), "v": rng.randrange(1000),
                 "s": f"d{i}", "tags": ["a", "b"][: i % 3]} for i in range(BASE_DOCS)]
        copy, scratch = direct[COPY_DB][COLL], direct[COPY_DB][WITH]
        for coll in (direct[DB][COLL], copy):
            coll.insert_many(base)
            coll.create_index("k")
        proxy = ProxyProcess(upstream.uri, meta_db=META).start()
        status, body = proxy.api("POST", "/branches", {"name": BRANCH})
        assert status == 201, body
        assert isinstance(body, dict)
        branch_uri = body["uri"]
        bid = direct[META]["branches"].find_one({"_id": BRANCH})["bid"]
        applied = 0
        for cycle in range(KILLS):
            kill_after = rng.randrange(3, 30)
            work = Workload(branch_uri, SEED * 31 + cycle, kill_after,
                            fresh=(cycle + 1) * 1_000)
            work.start()
            assert work.reached.wait(45), f"kill {cycle}: workload never reached its point"
            assert work.error is None, f"kill {cycle}: failed before the kill: {work.error!r}"
            time.sleep(rng.uniform(0.0, 0.02))
            proxy.kill()
            work.join(20)
            assert not work.is_alive() and work.error is not None, \
                f"kill {cycle} did not interrupt the workload"
            proxy = ProxyProcess(upstream.uri, meta_db=META,
                                 branch_ports=proxy.branch_ports).start()

            for n, (op, result) in enumerate(work.acked):
                assert op.apply(copy) == result, \
                    f"kill {cycle}: acknowledged op #{n} {op} answered differently"
            without = snapshot(copy)
            with MongoClient(branch_uri, serverSelectionTimeoutMS=10000) as branch:
                seen = snapshot(branch[DB][COLL])
            if seen != without and work.in_flight is not None:
                # Its only other allowed outcome: the write in flight, wholly applied.
                scratch.drop()
                copy.aggregate([{"$match": {}}, {"$out": WITH}])
                work.in_flight.apply(scratch)
                assert seen == snapshot(scratch), \
                    f"kill {cycle}: branch matches neither outcome of {work.in_flight}"
                work.in_flight.apply(copy)
                applied += 1
            else:
                assert seen == without, f"kill {cycle}: branch differs from its acked writes"
            assert overlay(direct, bid) == wal_fold(direct, bid), \
                f"kill {cycle}: the overlay is not the fold of the WAL"
        assert snapshot(direct[DB][COLL]) == sorted(base, key=lambda d: d["_id"])
        print(f"{KILLS} kills; the write in flight had been applied at {applied} of them")
    finally:
        direct.close()
        if proxy is not None:
            proxy.kill()


def test_retried_write_after_restart_is_not_applied_twice(upstream: Secantus) -> None:
    """A retryable write (same lsid and txnNumber) is applied at most once, across a crash.

    A driver that lost the connection in the middle of a write retries it once with the
    same lsid/txnNumber on whatever answers at that address next: after a crash and a
    quick restart, that is the new proxy. mongod keeps the outcome of (lsid, txnNumber)
    durably; the WAL entries carry it too.
    """
    direct: MongoClient = MongoClient(upstream.uri, directConnection=True)
    proxies: list[ProxyProcess] = []
    try:
        direct[DB][COLL].insert_many([{"_id": i, "v": 0} for i in range(10)])
        first, body = _started(upstream, proxies)
        port = int(body["port"])
        cmd = {"update": COLL, "updates": [{"q": {"_id": 3}, "u": {"$inc": {"v": 1}}}],
               "ordered": True, "lsid": {"id": Binary(uuid.uuid4().bytes, 4)},
               "txnNumber": Int64(1), "$db": DB}

        def send() -> dict[str, Any]:
            with rawwire.connect(port) as sock:
                return rawwire.command(sock, cmd)

        def value() -> int:
            with MongoClient(body["uri"], serverSelectionTimeoutMS=10000) as c:
                doc = c[DB][COLL].find_one({"_id": 3})
                assert doc is not None
                return int(doc["v"])

        assert send()["nModified"] == 1
        assert send()["nModified"] == 1, "the retry's reply must repeat the original one"
        assert value() == 1, "retried write applied twice by the same proxy"

        first.kill()
        second = ProxyProcess(upstream.uri, meta_db=META, branch_ports=first.branch_ports)
        second.start()
        proxies.append(second)
        reply = send()
        assert reply.get("ok") == 1, reply
        assert value() == 1, "a retried write was applied a second time after the restart"
    finally:
        for proc in proxies:
            proc.kill()
        direct.close()


BULK_APP = "bw-retry"


def _bulk_ops(db: str, ordered: bool) -> dict[str, Any]:
    """A client bulkWrite over two namespaces of `db`: inserts (two in a row into one
    namespace, which run as one insert; one of a base document's _id, which fails),
    `$inc` updates of base documents, of a document the bulk inserted, of many (multi) and
    an upsert, an update matching nothing and a delete. Its first `update` command on the
    client's upstream connection is op 3's overlay write (the ops before are inserts)."""
    return {"bulkWrite": 1, "ops": [
        {"insert": 0, "document": {"_id": 100, "v": 0}},
        {"insert": 0, "document": {"_id": 101, "v": 0}},
        {"insert": 1, "document": {"_id": 100, "v": 0}},
        {"update": 0, "filter": {"_id": 1}, "updateMods": {"$inc": {"v": 1}}},
        {"update": 1, "filter": {"_id": 2}, "updateMods": {"$inc": {"v": 1}}},
        {"update": 0, "filter": {"_id": 100}, "updateMods": {"$inc": {"v": 10}}},
        {"update": 1, "filter": {"v": {"$lt": 5}}, "updateMods": {"$inc": {"w": 1}},
         "multi": True},
        {"update": 0, "filter": {"_id": 50}, "updateMods": {"$inc": {"v": 1}}, "upsert": True},
        {"delete": 1, "filter": {"_id": 3}, "multi": False},
        {"update": 0, "filter": {"_id": 77}, "updateMods": {"$inc": {"v": 1}}},
        {"insert": 1, "document": {"_id": 5}},
        {"insert": 1, "document": {"_id": 101, "v": 0}},
    ], "nsInfo": [{"ns": f"{db}.a"}, {"ns": f"{db}.b"}], "ordered": ordered}


def _hello(sock: Any) -> None:
    """A handshake naming the test's application (which a failpoint may be scoped to)."""
    rawwire.command(sock, {"hello": 1, "client": {
        "application": {"name": BULK_APP}, "driver": {"name": "rawwire", "version": "0"},
        "os": {"type": "Linux"}}, "$db": "admin"})


def _send_bulk(port: int, cmd: dict[str, Any]) -> dict[str, Any]:
    with rawwire.connect(port, timeout=60) as sock:
        _hello(sock)
        return rawwire.command(sock, cmd, request_id=2)


def _answer(reply: dict[str, Any], db: str = DB) -> dict[str, Any]:
    """What a bulkWrite reply on `db`'s namespaces says of its ops: the per-op results
    (error messages name the namespace as `db.<coll>`) and the counts."""
    assert reply.get("ok") == 1, reply
    items = [{**item, "errmsg": item["errmsg"].replace(f" {db}.", " db.")}
             if "errmsg" in item else item for item in reply["cursor"]["firstBatch"]]
    return {"items": items, **{k: v for k, v in reply.items() if k.startswith("n")}}


def _bulk_setup(direct: MongoClient, ordered: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Seeds the base (and its plain copy) and applies the bulkWrite once to the copy:
    its answer, and the retryable command to send to the branch."""
    for db in (DB, COPY_DB):
        for coll in ("a", "b"):
            direct[db][coll].insert_many([{"_id": i, "v": 0} for i in range(10)])
    expected = _answer(direct.admin.command(_bulk_ops(COPY_DB, ordered)), COPY_DB)
    cmd = {**_bulk_ops(DB, ordered), "lsid": {"id": Binary(uuid.uuid4().bytes, 4)},
           "txnNumber": Int64(1), "$db": "admin"}
    return expected, cmd


def _bulk_data(client: MongoClient, db: str) -> dict[str, list[dict[str, Any]]]:
    return {c: list(client[db][c].find().sort("_id", 1)) for c in ("a", "b")}


@pytest.mark.parametrize("ordered", [True, False])
def test_retried_bulk_write_after_restart_is_answered(upstream: Secantus,
                                                      ordered: bool) -> None:
    """A client bulkWrite sent again with the same lsid and txnNumber after the proxy
    restarted (a driver's retry of a write whose reply the crash lost) is answered with
    the first attempt's reply, and each op is applied once (its `$inc`s too)."""
    direct: MongoClient = MongoClient(upstream.uri, directConnection=True)
    proxies: list[ProxyProcess] = []
    try:
        expected, cmd = _bulk_setup(direct, ordered)
        assert expected["nErrors"] == 1
        first, body = _started(upstream, proxies)
        port = int(body["port"])
        assert _answer(_send_bulk(port, cmd)) == expected

        first.kill()
        second = ProxyProcess(upstream.uri, meta_db=META, branch_ports=first.branch_ports)
        second.start()
        proxies.append(second)
        assert _answer(_send_bulk(port, cmd)) == expected, \
            "the retry after the restart must repeat the first attempt's reply"
        with MongoClient(body["uri"], serverSelectionTimeoutMS=10000) as branch:
            assert _bulk_data(branch, DB) == _bulk_data(direct, COPY_DB), \
                "a retried bulkWrite's ops were applied again after the restart"
        assert _bulk_data(direct, DB) == {c: [{"_id": i, "v": 0} for i in range(10)]
                                          for c in ("a", "b")}
    finally:
        for proc in proxies:
            proc.kill()
        direct.close()


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("held", ["update", "delete"])
def test_bulk_write_cut_off_by_sigkill_is_completed_once_by_its_retry(
        upstream: Secantus, ordered: bool, held: str) -> None:
    """SIGKILL of the proxy in the middle of a client bulkWrite, then the driver's retry
    (same lsid and txnNumber) on the restarted proxy: every op is applied exactly once,
    and the reply is the one a single uninterrupted run gives.

    The upstream holds (then fails) the first overlay write of the command named `held`
    on the client's connection, so that the kill lands inside a chosen op: `update`, op
    3, an update of a base document that has copied it into the overlay (ops 0-2, inserts
    into both namespaces, are done); `delete`, op 8, a delete of a document the branch
    changed (ops 0-7, the inserts, `$inc` updates, a multi-update and an upsert, are
    done). The retry must run neither of the done ones again."""
    direct: MongoClient = MongoClient(upstream.uri, directConnection=True)
    proxies: list[ProxyProcess] = []
    sock = None
    try:
        expected, cmd = _bulk_setup(direct, ordered)
        first, body = _started(upstream, proxies)
        port = int(body["port"])
        bid = direct[META]["branches"].find_one({"_id": BRANCH})["bid"]
        # Held until long after the kill, then failed: the dead proxy's write never lands.
        direct.admin.command("configureFailPoint", "failCommand", mode={"times": 1}, data={
            "failCommands": [held], "appName": BULK_APP, "blockConnection": True,
            "blockTimeMS": 120_000, "errorCode": 2})
        sock = rawwire.connect(port)
        _hello(sock)
        sock.sendall(rawwire.op_msg(cmd, request_id=2))
        wal = direct[META]["wal"]
        done = list(range(3 if held == "update" else 8))

        def reached() -> bool:
            """Op 3 copies base document 1 into the overlay just before its held update;
            op 8's held delete is its first write, right after op 7's upsert is logged."""
            if held == "update":
                return direct[DB][f"__mb_{bid}_l_a"].find_one({"_id": 1}) is not None
            return wal.find_one({"b": bid, "ns": f"{DB}.a", "id": 50}) is not None

        deadline = time.monotonic() + 60
        while not reached() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reached(), f"op {len(done)} never began"
        first.kill()
        assert rawwire.closed_by_peer(sock), "the first attempt was answered"
        direct.admin.command("configureFailPoint", "failCommand", mode="off")
        # The ops whose outcome the first attempt logged (checked last: the test's point
        # is what the retry does).
        logged = sorted(e["txn"]["stmt"] for e in wal.find(
            {"b": bid, "txn.stmt": {"$exists": True}, "reply": {"$exists": True}}))

        second = ProxyProcess(upstream.uri, meta_db=META, branch_ports=first.branch_ports)
        second.start()
        proxies.append(second)
        assert _answer(_send_bulk(port, cmd)) == expected
        with MongoClient(body["uri"], serverSelectionTimeoutMS=10000) as branch:
            assert _bulk_data(branch, DB) == _bulk_data(direct, COPY_DB), \
                "ops of the bulkWrite cut off were applied twice, or not at all"
        assert _answer(_send_bulk(port, cmd)) == expected  # and again, from memory
        for coll in ("a", "b"):
            assert overlay(direct, bid, coll) == wal_fold(direct, bid, coll)
        assert logged == done, logged
    finally:
        if sock is not None:
            sock.close()
        direct.admin.command("configureFailPoint", "failCommand", mode="off")
        for proc in proxies:
            proc.kill()
        direct.close()


def _connections(direct: MongoClient) -> int:
    """The upstream's open connections, for knowing when a killed client's last command
    ended (the server closes its side only then)."""
    return int(direct.admin.command("serverStatus")["connections"]["current"])


def test_sigkill_during_copy_branch_creation(upstream: Secantus) -> None:
    """A copy branch whose copy is cut off was never acknowledged: after a restart it is
    gone with everything it had copied, instead of serving part of its data (the
    collections not yet copied would read through to the live base)."""
    # Polled monitoring: one monitor connection from the start, no round-trip monitor
    # opening one later, so the upstream's connection count (`_connections`) moves
    # only with the proxies'.
    direct: MongoClient = MongoClient(upstream.uri, directConnection=True,
                                      serverMonitoringMode="poll")
    proxies: list[ProxyProcess] = []
    name = "half-copied"
    try:
        direct[DB]["a_big"].insert_many([{"_id": i, "pad": "x" * 200} for i in range(20_000)])
        direct[DB]["z_small"].insert_many([{"_id": i} for i in range(10)])
        alone = _connections(direct)
        first = ProxyProcess(upstream.uri, meta_db=META).start()
        proxies.append(first)
        replies: list[Any] = []

        def create() -> None:
            try:
                replies.append(first.api("POST", "/branches", {"name": name, "mode": "copy"}))
            except OSError as exc:  # the kill cuts the request off
                replies.append(exc)

        creating = threading.Thread(target=create)
        creating.start()
        deadline = time.monotonic() + 30
        branch = None
        while time.monotonic() < deadline:
            branch = direct[META]["branches"].find_one({"_id": name})
            if branch and direct[META]["namespaces"].find_one(
                    {"_id": f"{branch['bid']}:{DB}.a_big"}):
                break
            time.sleep(0.005)
        assert branch is not None and branch.get("creating") is True, branch
        first.kill()
        creating.join(30)
        assert isinstance(replies[0], OSError), f"the copy finished before the kill: {replies}"
        bid = branch["bid"]
        # The upstream finishes what the dead proxy had sent (its copy, if the kill came
        # after it) on its own, and closes the connection only then: wait for that, so
        # nothing it writes afterwards can outlive the clean-up.
        until("the dead proxy's connections to close",
              lambda: _connections(direct) <= alone, timeout=300)

        second = ProxyProcess(upstream.uri, meta_db=META, branch_ports=first.branch_ports)
        second.start()
        proxies.append(second)
        assert second.api("GET", f"/branches/{name}")[0] == 404
        assert "cut off" in second.read_log()
        assert not [c for c in direct[DB].list_collection_names() if c.startswith(f"__mb_{bid}")]
        assert direct[META]["namespaces"].count_documents({"_id": {"$regex": f"^{bid}:"}}) == 0
        # A copy of every document: however long a loaded machine takes over it.
        status, body = second.api("POST", "/branches", {"name": name, "mode": "copy"},
                                  timeout=600)
        assert status == 201, body
        client: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
        try:
            direct[DB]["z_small"].insert_one({"_id": 99})  # the copy is a snapshot
            assert client[DB]["z_small"].count_documents({}) == 10
            assert client[DB]["a_big"].count_documents({}) == 20_000
        finally:
            client.close()
    finally:
        for proxy in proxies:
            proxy.kill()
        direct.close()


def test_a_capped_collection_a_branch_took_whole_is_rebuilt_capped_in_order(
        upstream: Secantus) -> None:
    """Killed right after its writes (the overlay still marked dirty), the branch's own
    capped copy of a collection is rebuilt from the WAL as it was: capped with the same
    limits, in its insertion order, evicting the oldest document on the next insert."""
    direct: MongoClient = MongoClient(upstream.uri, directConnection=True)
    proxies: list[ProxyProcess] = []
    try:
        direct[DB].create_collection("cap", capped=True, size=1 << 16, max=4)
        direct[DB].cap.insert_many([{"_id": i} for i in (5, 1, 4, 2)])
        first, body = _started(upstream, proxies)
        with MongoClient(body["uri"]) as c:
            c[DB].cap.insert_one({"_id": 3})  # evicts 5
            c[DB].cap.update_one({"_id": 4}, {"$set": {"v": 1}})
            before = list(c[DB].cap.find())
        assert [d["_id"] for d in before] == [1, 4, 2, 3]
        _rebuilt_after_a_kill(upstream, direct, first, proxies)
        with MongoClient(body["uri"], serverSelectionTimeoutMS=10000) as c:
            assert list(c[DB].cap.find()) == before
            c[DB].cap.insert_one({"_id": 0})  # evicts 1
            assert [d["_id"] for d in c[DB].cap.find()] == [4, 2, 3, 0]
        assert [d["_id"] for d in direct[DB].cap.find()] == [5, 1, 4, 2]
    finally:
        for proc in proxies:
            proc.kill()
        direct.close()


def test_a_collection_a_transaction_created_is_rebuilt_with_its_options_and_indexes(
        upstream: Secantus) -> None:
    """A collection made in a committed transaction (create with a validator, a unique
    index, writes), its overlay still marked dirty when the proxy is killed, is rebuilt
    from the WAL and the namespace state the transaction committed: the same documents,
    options and indexes, which the upstream goes on enforcing."""
    direct: MongoClient = MongoClient(upstream.uri, directConnection=True)
    proxies: list[ProxyProcess] = []
    try:
        first, body = _started(upstream, proxies)
        with MongoClient(body["uri"]) as c, c.start_session() as s:
            with s.start_transaction():
                c[DB].create_collection("made", validator={"n": {"$type": "int"}}, session=s)
                c[DB].made.create_index("k", unique=True, session=s)
                c[DB].made.insert_many([{"_id": 1, "k": "a", "n": 1},
                                        {"_id": 2, "k": "b", "n": 2}], session=s)
            before = (list(c[DB].made.find()), c[DB].made.options(),
                      c[DB].made.index_information())
        _rebuilt_after_a_kill(upstream, direct, first, proxies)
        with MongoClient(body["uri"], serverSelectionTimeoutMS=10000) as c:
            assert (list(c[DB].made.find()), c[DB].made.options(),
                    c[DB].made.index_information()) == before
            for bad, code in (({"_id": 3, "k": "c", "n": "x"}, 121),
                              ({"_id": 3, "k": "a", "n": 3}, 11000)):
                with pytest.raises(OperationFailure) as info:
                    c[DB].made.insert_one(bad)
                assert info.value.code == code
        assert "made" not in direct[DB].list_collection_names()
    finally:
        for proc in proxies:
            proc.kill()
        direct.close()


def test_a_write_cut_off_before_its_new_collection_was_recorded_leaves_none(
        upstream: Secantus) -> None:
    """A branch's first write to a collection it has none of makes the overlay, marks it
    dirty, then logs the `own` entry and records the collection's state in one write.
    Killed while the upstream holds that `own` entry's insert (the engine's connection,
    `appName` mongobranch-engine): after a restart the branch does not show the
    collection, nothing of the unacknowledged write is there, and the same insert made
    again succeeds (the overlay the dead proxy left is dropped and made again) and is
    rebuilt from the WAL after a second kill."""
    direct: MongoClient = MongoClient(upstream.uri, directConnection=True)
    proxies: list[ProxyProcess] = []
    outcome: list[Any] = []
    try:
        first, body = _started(upstream, proxies)
        bid = direct[META]["branches"].find_one({"_id": BRANCH})["bid"]
        direct.admin.command("configureFailPoint", "failCommand", mode={"times": 1}, data={
            "failCommands": ["insert"], "appName": "mongobranch-engine",
            "blockConnection": True, "blockTimeMS": 120_000, "errorCode": 2})

        def insert() -> None:
            try:
                with MongoClient(body["uri"], retryWrites=False,
                                 serverSelectionTimeoutMS=10000) as c:
                    outcome.append(c[DB].fresh.insert_one({"_id": 1, "v": "first"}))
            except PyMongoError as exc:  # the kill cuts it off
                outcome.append(exc)

        writer = threading.Thread(target=insert)
        writer.start()
        until("the new collection's overlay and dirty marker", lambda: direct[META].dirty.find_one(
            {"_id": f"{bid}:{DB}.fresh"}))
        assert f"__mb_{bid}_l_fresh" in direct[DB].list_collection_names()
        assert direct[META].namespaces.find_one({"_id": f"{bid}:{DB}.fresh"}) is None
        first.kill()
        writer.join(60)
        assert outcome and isinstance(outcome[0], PyMongoError), outcome
        direct.admin.command("configureFailPoint", "failCommand", mode="off")
        assert direct[META].wal.count_documents({"b": bid, "ns": f"{DB}.fresh"}) == 0

        second = ProxyProcess(upstream.uri, meta_db=META, branch_ports=first.branch_ports)
        proxies.append(second.start())
        with MongoClient(body["uri"], serverSelectionTimeoutMS=10000) as c:
            assert "fresh" not in c[DB].list_collection_names()
            assert c[DB].fresh.find_one() is None
            c[DB].fresh.insert_one({"_id": 1, "v": "again"})
            assert list(c[DB].fresh.find()) == [{"_id": 1, "v": "again"}]
            assert "fresh" in c[DB].list_collection_names()
        # (Its own, hiding nothing: the live documents are the WAL's.)
        assert overlay(direct, bid, "fresh")[0] == wal_fold(direct, bid, "fresh")[0]
        _rebuilt_after_a_kill(upstream, direct, second, proxies)
        with MongoClient(body["uri"], serverSelectionTimeoutMS=10000) as c:
            assert list(c[DB].fresh.find()) == [{"_id": 1, "v": "again"}]
            assert "fresh" in c[DB].list_collection_names()
    finally:
        direct.admin.command("configureFailPoint", "failCommand", mode="off")
        for proc in proxies:
            proc.kill()
        direct.close()


def test_an_append_cut_off_after_its_out_of_line_images_leaves_no_change(
        upstream: Secantus) -> None:
    """An update of a document of random bytes over 8 MiB: its WAL entry cannot hold both
    images (the upstream refuses it: the engine's first insert of the write), so one
    image's chunks are stored (its second), then the entry naming them (its third).
    Killed while the upstream holds that entry's insert: after a restart the branch shows the
    document as it was (its overlay is rebuilt from the WAL, which has no entry of the
    update), the chunks no entry names are left to gc, which deletes them, and the same
    update made again is stored and logged."""
    direct: MongoClient = MongoClient(upstream.uri, directConnection=True)
    proxies: list[ProxyProcess] = []
    outcome: list[Any] = []
    nine = os.urandom(9 * 1024 * 1024)
    try:
        first, body = _started(upstream, proxies)
        bid = direct[META]["branches"].find_one({"_id": BRANCH})["bid"]
        with MongoClient(body["uri"]) as c:
            c[DB].big.insert_one({"_id": 1, "b": nine})
        direct.admin.command("configureFailPoint", "failCommand",
                             mode={"skip": 2, "times": 1}, data={
                                 "failCommands": ["insert"], "appName": "mongobranch-engine",
                                 "blockConnection": True, "blockTimeMS": 120_000,
                                 "errorCode": 2})

        def update() -> None:
            try:
                with MongoClient(body["uri"], retryWrites=False,
                                 serverSelectionTimeoutMS=10000) as c:
                    outcome.append(c[DB].big.update_one({"_id": 1}, {"$set": {"n": 1}}))
            except PyMongoError as exc:  # the kill cuts it off
                outcome.append(exc)

        writer = threading.Thread(target=update)
        writer.start()
        until("the image's chunks", lambda: direct[META].walimages.find_one({"b": bid}))
        first.kill()
        writer.join(60)
        assert outcome and isinstance(outcome[0], PyMongoError), outcome
        direct.admin.command("configureFailPoint", "failCommand", mode="off")
        assert direct[META].wal.count_documents({"b": bid, "id": 1}) == 1  # the insert's
        assert direct[META].walimages.count_documents({"b": bid}) >= 1

        second = ProxyProcess(upstream.uri, meta_db=META, branch_ports=first.branch_ports)
        proxies.append(second.start())
        with MongoClient(body["uri"], serverSelectionTimeoutMS=10000) as c:
            assert c[DB].big.find_one({"_id": 1}) == {"_id": 1, "b": nine}
        status, result = second.api("POST", "/gc", {"retention": "0s"})
        assert status == 200, result
        assert direct[META].walimages.count_documents({"b": bid}) == 0
        with MongoClient(body["uri"], serverSelectionTimeoutMS=10000) as c:
            assert c[DB].big.update_one({"_id": 1}, {"$set": {"n": 1}}).modified_count == 1
            assert c[DB].big.find_one({"_id": 1}) == {"_id": 1, "b": nine, "n": 1}
        entry = direct[META].wal.find_one({"b": bid, "id": 1}, {"prex": 1, "postx": 1},
                                          sort=[("_id", -1)])
        assert entry is not None, entry
        names = (entry.get("prex") or []) + (entry.get("postx") or [])
        assert names and direct[META].walimages.count_documents(
            {"_id": {"$in": names}}) == len(names)
    finally:
        direct.admin.command("configureFailPoint", "failCommand", mode="off")
        for proc in proxies:
            proc.kill()
        direct.close()
