"""Change streams on a branch port, produced from the branch's WAL: pymongo's `watch()` on
a collection, a database and the whole branch. Each test writes, then blocks in `next()`
(getMore until an event arrives): no test waits on a delay."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bson.timestamp import Timestamp
from pymongo import MongoClient, monitoring
from pymongo.errors import OperationFailure

from tests.branchutil import Branches, api_ok
from tests.servers import ProxyProcess

NODE_DIR = Path(__file__).parent / "node"
# getMore await of the streams below: short, so that a test that expects nothing more
# (try_next) returns quickly; events never depend on it.
AWAIT_MS = 200


@pytest.fixture()
def branch(made: Branches, direct: MongoClient, db_name: str
           ) -> Iterator[tuple[dict[str, Any], MongoClient]]:
    direct[db_name].items.insert_many([{"_id": 1, "a": 1, "z": 0}, {"_id": 2, "a": 2}])
    info = made.create()
    client = made.client(info)
    yield info, client
    client.close()


def _strip(event: dict[str, Any]) -> dict[str, Any]:
    """An event without the fields that vary from run to run."""
    return {k: v for k, v in event.items() if k not in ("_id", "clusterTime", "wallTime")}


def test_collection_stream_reports_each_write_in_order(
        branch: tuple[dict[str, Any], MongoClient], db_name: str) -> None:
    _, client = branch
    items = client[db_name].items
    with items.watch(max_await_time_ms=AWAIT_MS) as stream:
        items.insert_one({"_id": 10, "a": 1})
        items.update_one({"_id": 1}, {"$set": {"a": 5}, "$unset": {"z": ""}})
        items.replace_one({"_id": 10}, {"b": 2})
        items.delete_one({"_id": 2})
        items.drop()
        events = [stream.next() for _ in range(6)]
        assert not stream.alive  # invalidated: the server closed the cursor
    ns = {"db": db_name, "coll": "items"}
    assert [_strip(e) for e in events] == [
        {"operationType": "insert", "fullDocument": {"_id": 10, "a": 1}, "ns": ns,
         "documentKey": {"_id": 10}},
        {"operationType": "update", "ns": ns, "documentKey": {"_id": 1},
         "updateDescription": {"updatedFields": {"a": 5}, "removedFields": ["z"],
                               "truncatedArrays": []}},
        {"operationType": "replace", "fullDocument": {"_id": 10, "b": 2}, "ns": ns,
         "documentKey": {"_id": 10}},
        {"operationType": "delete", "ns": ns, "documentKey": {"_id": 2}},
        {"operationType": "drop", "ns": ns},
        {"operationType": "invalidate"},
    ]
    times = [e["clusterTime"] for e in events]
    assert all(isinstance(t, Timestamp) for t in times)
    assert times[:5] == sorted(times[:5])
    assert len({str(e["_id"]) for e in events}) == 6
    # After an invalidate a stream may start, not resume (mongod's rule).
    with pytest.raises(OperationFailure) as err:
        items.watch(resume_after=events[5]["_id"])
    assert err.value.code == 260
    items.insert_one({"_id": "new"})
    with items.watch(start_after=events[5]["_id"]) as again:
        assert again.next()["documentKey"] == {"_id": "new"}


def test_writes_on_main_and_other_branches_never_show(
        branch: tuple[dict[str, Any], MongoClient], made: Branches, client: MongoClient,
        db_name: str) -> None:
    _, mine = branch
    other = made.client(made.create())
    with mine.watch(max_await_time_ms=AWAIT_MS) as whole, \
            mine[db_name].watch(max_await_time_ms=AWAIT_MS) as db_stream, \
            mine[db_name].items.watch(max_await_time_ms=AWAIT_MS) as coll_stream:
        # Main changes a document the branch shows: the branch keeps its image (a keep
        # entry in its WAL), which is no change of the branch's.
        client[db_name].items.update_one({"_id": 1}, {"$set": {"a": "main"}})
        client[db_name].items.insert_one({"_id": "main"})
        other[db_name].items.insert_one({"_id": "other"})
        other[db_name].items.delete_one({"_id": 2})
        mine[db_name].items.insert_one({"_id": "mine"})
        for stream in (whole, db_stream, coll_stream):
            event = stream.next()
            assert event["operationType"] == "insert"
            assert event["documentKey"] == {"_id": "mine"}
    other.close()
    assert mine[db_name].items.find_one({"_id": 1}) == {"_id": 1, "a": 1, "z": 0}


def test_a_waiting_getmore_holds_no_write_back(
        branch: tuple[dict[str, Any], MongoClient], proxy: ProxyProcess, client: MongoClient,
        db_name: str) -> None:
    """A getMore waiting for the branch's next write reads only the WAL: main's writes,
    which a branch read would hold back while it runs, go through meanwhile."""
    info, _ = branch
    waiting = threading.Event()

    class GetMores(monitoring.CommandListener):
        def started(self, event: monitoring.CommandStartedEvent) -> None:
            if event.command_name == "getMore":
                waiting.set()

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
            pass

        def failed(self, event: monitoring.CommandFailedEvent) -> None:
            pass

    watcher: MongoClient = MongoClient(info["uri"], event_listeners=[GetMores()])
    got: list[Any] = []
    with watcher[db_name].items.watch(max_await_time_ms=60_000) as stream:
        reader = threading.Thread(target=lambda: got.append(stream.try_next()))
        reader.start()
        assert waiting.wait(30)
        # Main changes a document the branch shows (preserved for it first).
        client[db_name].items.update_one({"_id": 2}, {"$set": {"a": "main"}})
        assert reader.is_alive()  # its getMore still waits: nothing of the branch's yet
        watcher[db_name].items.insert_one({"_id": "wake"})
        reader.join(60)
    watcher.close()
    assert [e["documentKey"] for e in got] == [{"_id": "wake"}]


def test_database_and_branch_streams_cover_their_scope(
        branch: tuple[dict[str, Any], MongoClient], db_name: str) -> None:
    _, client = branch
    second = f"{db_name}_b"
    with client.watch(max_await_time_ms=AWAIT_MS) as whole, \
            client[db_name].watch(max_await_time_ms=AWAIT_MS) as db_stream:
        client[db_name].items.insert_one({"_id": "x"})
        client[db_name].others.insert_one({"_id": "y"})
        client[second].items.insert_one({"_id": "z"})
        got = [(e["ns"], e["documentKey"]) for e in (whole.next() for _ in range(3))]
        assert got == [({"db": db_name, "coll": "items"}, {"_id": "x"}),
                       ({"db": db_name, "coll": "others"}, {"_id": "y"}),
                       ({"db": second, "coll": "items"}, {"_id": "z"})]
        got = [(e["ns"], e["documentKey"]) for e in (db_stream.next() for _ in range(2))]
        assert got == [({"db": db_name, "coll": "items"}, {"_id": "x"}),
                       ({"db": db_name, "coll": "others"}, {"_id": "y"})]
        assert db_stream.try_next() is None  # the other database's insert is not its


def test_rename_and_drop_database(branch: tuple[dict[str, Any], MongoClient],
                                  db_name: str) -> None:
    _, client = branch
    db = client[db_name]
    with db.watch(max_await_time_ms=AWAIT_MS) as db_stream, \
            db.items.watch(max_await_time_ms=AWAIT_MS) as coll_stream:
        db.items.rename("renamed")
        event = coll_stream.next()
        assert _strip(event) == {"operationType": "rename",
                                 "ns": {"db": db_name, "coll": "items"},
                                 "to": {"db": db_name, "coll": "renamed"}}
        assert coll_stream.next()["operationType"] == "invalidate"
        assert _strip(db_stream.next()) == _strip(event)  # not the copied documents
        client.drop_database(db_name)
        kinds = [_strip(db_stream.next()) for _ in range(3)]
        assert kinds == [{"operationType": "drop", "ns": {"db": db_name, "coll": "renamed"}},
                         {"operationType": "dropDatabase", "ns": {"db": db_name}},
                         {"operationType": "invalidate"}]
        assert not db_stream.alive


def test_resume_after_and_start_after_a_token(
        branch: tuple[dict[str, Any], MongoClient], db_name: str) -> None:
    _, client = branch
    items = client[db_name].items
    with items.watch(max_await_time_ms=AWAIT_MS) as stream:
        start = stream.resume_token  # the point the stream opened at
        for i in range(3):
            items.insert_one({"_id": f"r{i}"})
        first = stream.next()
        assert stream.resume_token == first["_id"]
    with items.watch(max_await_time_ms=AWAIT_MS, start_after=first["_id"]) as again:
        assert [again.next()["documentKey"]["_id"] for _ in range(2)] == ["r1", "r2"]
    with items.watch(max_await_time_ms=AWAIT_MS, resume_after=first["_id"]) as again:
        assert [again.next()["documentKey"]["_id"] for _ in range(2)] == ["r1", "r2"]
        assert again.try_next() is None
        # Past the last event: the point read up to, resumable in its turn.
        token = again.resume_token
    items.insert_one({"_id": "after"})
    with items.watch(resume_after=token) as later:
        assert later.next()["documentKey"]["_id"] == "after"
    with items.watch(resume_after=start) as whole:
        assert [whole.next()["documentKey"]["_id"] for _ in range(3)] == ["r0", "r1", "r2"]


def test_reset_voids_events(branch: tuple[dict[str, Any], MongoClient], db_name: str,
                            proxy: ProxyProcess) -> None:
    info, client = branch
    items = client[db_name].items
    with items.watch(max_await_time_ms=AWAIT_MS) as stream:
        start = stream.resume_token
    items.insert_one({"_id": "kept"})
    lsn = client.admin.command({"branchLog": info["name"], "limit": 1})["entries"][0]["lsn"]
    items.insert_one({"_id": "voided"})
    api_ok(proxy, "POST", f"/branches/{info['name']}/reset", {"to": lsn})
    items.insert_one({"_id": "later"})
    with items.watch(resume_after=start, max_await_time_ms=AWAIT_MS) as again:
        assert [again.next()["documentKey"]["_id"] for _ in range(2)] == ["kept", "later"]


def test_a_migration_is_no_change(made: Branches, direct: MongoClient, db_name: str,
                                  proxy: ProxyProcess) -> None:
    """A copy branch migrated to WAL mode re-logs what it holds: not its changes."""
    direct[db_name].items.insert_many([{"_id": 1}, {"_id": 2}])
    info = made.create(mode="copy")
    with made.client(info) as client:
        items = client[db_name].items
        with items.watch(max_await_time_ms=AWAIT_MS) as stream:
            start = stream.resume_token
        items.insert_one({"_id": "before"})
        items.delete_one({"_id": 1})
        api_ok(proxy, "POST", f"/branches/{info['name']}/migrate", {"to": "wal"})
        items.insert_one({"_id": "after"})
        with items.watch(resume_after=start, max_await_time_ms=AWAIT_MS) as again:
            got = [(e["operationType"], e["documentKey"]["_id"])
                   for e in (again.next() for _ in range(3))]
            assert got == [("insert", "before"), ("delete", 1), ("insert", "after")]


def test_start_at_operation_time(branch: tuple[dict[str, Any], MongoClient],
                                 db_name: str) -> None:
    _, client = branch
    items = client[db_name].items
    with items.watch(max_await_time_ms=AWAIT_MS) as stream:
        items.insert_one({"_id": "a"})
        at = stream.next()["clusterTime"]
    items.insert_one({"_id": "b"})
    with items.watch(start_at_operation_time=at, max_await_time_ms=AWAIT_MS) as again:
        assert [again.next()["documentKey"]["_id"] for _ in range(2)] == ["a", "b"]
    later = Timestamp(int(time.time()) + 3600, 1)
    with items.watch(start_at_operation_time=later, max_await_time_ms=AWAIT_MS) as future:
        items.insert_one({"_id": "c"})  # logged before that time: not an event
        assert future.try_next() is None


def test_user_pipeline_filters_on_the_server(
        branch: tuple[dict[str, Any], MongoClient], db_name: str) -> None:
    _, client = branch
    items = client[db_name].items
    pipeline = [{"$match": {"operationType": "delete"}},
                {"$project": {"operationType": 1, "documentKey": 1, "tag": {"$literal": 7}}}]
    with items.watch(pipeline, max_await_time_ms=AWAIT_MS) as stream:
        items.insert_one({"_id": "gone"})
        items.update_one({"_id": 1}, {"$set": {"a": 3}})
        items.delete_one({"_id": "gone"})
        event = stream.next()
        assert {k: v for k, v in event.items() if k != "_id"} == {
            "operationType": "delete", "documentKey": {"_id": "gone"}, "tag": 7}
        items.insert_one({"_id": "filtered"})
        assert stream.try_next() is None
        # The point moved past the events the filter dropped.
        token = stream.resume_token
    assert token != event["_id"]
    items.insert_one({"_id": "next"})
    with items.watch(resume_after=token) as again:
        assert again.next()["documentKey"] == {"_id": "next"}


def test_many_events_cross_windows_and_batches(
        branch: tuple[dict[str, Any], MongoClient], db_name: str) -> None:
    _, client = branch
    items = client[db_name].items
    n = 2500
    with items.watch(max_await_time_ms=AWAIT_MS, batch_size=700) as stream:
        items.insert_many([{"_id": f"m{i}", "pad": "x" * 100} for i in range(n)])
        items.delete_many({"_id": {"$regex": "^m"}})
        got = [stream.next() for _ in range(2 * n)]
    assert [e["operationType"] for e in got] == ["insert"] * n + ["delete"] * n
    assert [e["documentKey"]["_id"] for e in got[:n]] == [f"m{i}" for i in range(n)]
    assert {e["documentKey"]["_id"] for e in got[n:]} == {f"m{i}" for i in range(n)}


def test_full_document_and_before_change(
        branch: tuple[dict[str, Any], MongoClient], db_name: str) -> None:
    _, client = branch
    items = client[db_name].items
    with items.watch(full_document="updateLookup",
                     full_document_before_change="whenAvailable",
                     max_await_time_ms=AWAIT_MS) as stream:
        items.update_one({"_id": 1}, {"$inc": {"a": 1}})
        items.delete_one({"_id": 1})
        update, delete = stream.next(), stream.next()
    assert update["fullDocument"] == {"_id": 1, "a": 2, "z": 0}
    assert update["fullDocumentBeforeChange"] == {"_id": 1, "a": 1, "z": 0}
    assert update["updateDescription"]["updatedFields"] == {"a": 2}
    assert delete["fullDocumentBeforeChange"] == {"_id": 1, "a": 2, "z": 0}
    assert "fullDocument" not in delete


def test_stream_errors_have_mongods_shape(branch: tuple[dict[str, Any], MongoClient],
                                          db_name: str) -> None:
    _, client = branch
    items = client[db_name].items
    cases: list[tuple[dict[str, Any], list[dict[str, Any]], int]] = [
        ({"resumeAfter": {"_data": "nonsense"}}, [], 2),
        ({"bogus": 1}, [], 40415),
        ({}, [{"$group": {"_id": None}}], 20),
        ({}, [{"$match": {"$bad": 1}}], 2),
        ({"resumeAfter": {"_data": "B1" + "0" * 22}, "startAtOperationTime": Timestamp(1, 1)},
         [], 40674),
        ({}, [{"$out": "elsewhere"}], 20),
    ]
    for spec, rest, code in cases:
        try:
            client[db_name].command({"aggregate": "items", "cursor": {},
                                     "pipeline": [{"$changeStream": spec}, *rest]})
        except OperationFailure as err:
            assert err.code == code, (spec, rest, err.details)
        else:
            pytest.fail(f"accepted: {spec} {rest}")
    # A pipeline that changes the resume token fails the stream at its first event.
    with items.watch([{"$project": {"_id": 0}}], max_await_time_ms=AWAIT_MS) as stream:
        items.insert_one({"_id": "untokened"})
        with pytest.raises(OperationFailure) as err:
            stream.next()
        assert err.value.code == 280
    # The stream still works after the refusals.
    with items.watch(max_await_time_ms=AWAIT_MS) as stream:
        items.insert_one({"_id": "ok"})
        assert stream.next()["documentKey"] == {"_id": "ok"}


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH")
def test_node_driver_streams(branch: tuple[dict[str, Any], MongoClient], db_name: str,
                             tmp_path: Path) -> None:
    info, _ = branch
    if not (NODE_DIR / "node_modules" / "mongodb").is_dir():
        pytest.fail("tests/node/node_modules is missing: run `make test` (npm install)")
    done = subprocess.run(["node", "changestream.js", info["uri"], db_name], cwd=NODE_DIR,
                          env=dict(os.environ, HOME=str(tmp_path)), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.splitlines()[-1])
    ns = {"db": db_name, "coll": "items"}
    assert out["events"] == [
        {"op": "insert", "key": "n1", "full": {"_id": "n1", "v": 1}, "ns": ns},
        {"op": "update", "key": "n1", "full": {"_id": "n1", "v": 2},
         "before": {"_id": "n1", "v": 1}, "ns": ns, "updated": {"v": 2}},
        {"op": "delete", "key": "n1", "before": {"_id": "n1", "v": 2}, "ns": ns},
    ]
    assert out["whole"] == {"op": "delete", "key": "n1", "ns": ns}
    assert out["db"] == {"op": "insert", "key": "n1", "full": {"_id": "n1", "v": 1}, "ns": ns}
    assert out["resumed"] == ["update", "delete"]
