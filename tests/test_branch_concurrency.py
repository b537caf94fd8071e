"""Concurrent writers on one branch: point writes on different documents run side by
side (locks.py), on the same document one at a time; nothing is lost or applied twice,
and the overlay stays the fold of the WAL."""

from __future__ import annotations

import random
import threading
from typing import Any

from pymongo import MongoClient, ReturnDocument
from pymongo.errors import DuplicateKeyError

from tests.servers import ProxyProcess

DB, COLL = "concurrency", "items"
BASE = 200
THREADS = 8
OPS = 60


def test_concurrent_point_writes(proxy: ProxyProcess, direct: MongoClient) -> None:
    base = direct[DB][COLL]
    base.drop()
    base.insert_many([{"_id": i, "v": 0, "email": f"e{i}"} for i in range(BASE)])
    base.create_index("email", unique=True)
    status, body = proxy.api("POST", "/branches", {"name": "concurrent"})
    assert status == 201, body
    incs = [[0] * BASE for _ in range(THREADS)]
    inserted: list[list[int]] = [[] for _ in range(THREADS)]
    deleted: list[list[int]] = [[] for _ in range(THREADS)]
    dup_refused = [0] * THREADS
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(t: int) -> None:
        rng = random.Random(t)
        client: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
        coll = client[DB][COLL]
        try:
            start.wait()
            for n in range(OPS):
                op = rng.random()
                # ids 0-49 are contended by every thread; each thread deletes its own
                # ids from 100 + 10t and inserts fresh ones.
                target = rng.randrange(50)
                if op < 0.35:
                    coll.update_one({"_id": target}, {"$inc": {"v": 1}})
                    incs[t][target] += 1
                elif op < 0.5:
                    coll.find_one_and_update({"_id": target}, {"$inc": {"v": 1}},
                                             return_document=ReturnDocument.AFTER)
                    incs[t][target] += 1
                elif op < 0.7:
                    new_id = 1000 + t * 1000 + n
                    coll.insert_one({"_id": new_id, "v": 0, "email": f"n{new_id}"})
                    inserted[t].append(new_id)
                elif op < 0.8 and len(deleted[t]) < 10:
                    victim = 100 + 10 * t + len(deleted[t])
                    assert coll.delete_one({"_id": victim}).deleted_count == 1
                    deleted[t].append(victim)
                else:
                    # Every thread races for the same unique email: at most one wins.
                    try:
                        coll.insert_one({"_id": f"race-{t}-{n}", "email": "contested"})
                        inserted[t].append(-1)
                    except DuplicateKeyError:
                        dup_refused[t] += 1
        except BaseException as exc:  # reported below, in the test thread
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    client: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    try:
        docs = {d["_id"]: d for d in client[DB][COLL].find()}
    finally:
        client.close()
        proxy.api("DELETE", "/branches/concurrent")
    for i in range(BASE):
        gone = any(i in d for d in deleted)
        assert (i in docs) != gone, i
        if not gone:
            assert docs[i]["v"] == sum(inc[i] for inc in incs), i
    fresh = [i for ids in inserted for i in ids if i >= 0]
    assert all(docs[i]["v"] == 0 for i in fresh)
    contested = [d for d in docs.values() if d.get("email") == "contested"]
    assert len(contested) == sum(ids.count(-1) for ids in inserted) <= 1
    assert len(docs) == BASE - sum(map(len, deleted)) + len(fresh) + len(contested)
    assert base.count_documents({}) == BASE and base.find_one({"_id": 0})["v"] == 0
    # The first insert of the contested email succeeds, every later one is refused.
    assert sum(dup_refused) + len(contested) == 0 or len(contested) == 1


def test_overlay_is_the_wal_fold_after_concurrent_writes(proxy: ProxyProcess,
                                                          direct: MongoClient) -> None:
    base = direct[DB]["fold"]
    base.drop()
    base.insert_many([{"_id": i, "v": 0} for i in range(40)])
    status, body = proxy.api("POST", "/branches", {"name": "fold"})
    assert status == 201, body
    bid = direct[proxy.meta_db]["branches"].find_one({"_id": "fold"})["bid"]

    def worker(t: int) -> None:
        rng = random.Random(100 + t)
        with MongoClient(body["uri"]) as client:  # type: ignore[index]
            coll = client[DB]["fold"]
            for n in range(40):
                i = rng.randrange(40)
                if rng.random() < 0.8:
                    coll.update_one({"_id": i}, {"$inc": {"v": 1}, "$push": {"by": t}})
                else:
                    coll.insert_one({"_id": f"t{t}-{n}"})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        entries = list(direct[proxy.meta_db]["wal"].find({"b": bid, "ns": f"{DB}.fold"})
                       .sort("_id", 1))
        last: dict[Any, dict[str, Any]] = {}
        for entry in entries:
            last[entry["id"]] = entry
        live = {d["_id"]: d for d in direct[DB][f"__mb_{bid}_l_fold"].find()}
        hidden = {d["_id"] for d in direct[DB][f"__mb_{bid}_h_fold"].find()}
        assert live == {i: e["post"] for i, e in last.items() if e["op"] == "put"}
        assert hidden == set(last)
        # Each document's entries chain: every pre-image is the previous post-image.
        chains: dict[Any, dict[str, Any] | None] = {}
        for entry in entries:
            if entry["id"] in chains:
                assert entry.get("pre") == chains[entry["id"]], entry["id"]
            chains[entry["id"]] = entry.get("post")
        for doc in live.values():
            if isinstance(doc["_id"], int):
                assert doc["v"] == len(doc["by"])
    finally:
        proxy.api("DELETE", "/branches/fold")
