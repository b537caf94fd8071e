"""gc: compacting WAL history changes no branch's visible state, keeps what merge needs
to find conflicts, refuses points before its horizon, and leaves a WAL that overlays
rebuild from exactly.

Runs on a proxy of its own (its own metadata database): a gc horizon is global, and
the shared proxy's other tests branch from points in their own history."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pymongo import MongoClient

from tests.branchutil import bid_of, unique
from tests.historyutil import contents, diff, doc_changes, error, last_lsn, merge, ok
from tests.servers import ProxyProcess, Secantus

PAD = "x" * 300  # images that zstd shrinks, so gc compresses every one


def views(proxy: ProxyProcess, db: str, names: list[str]) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name in names:
        _, info = proxy.api("GET", f"/branches/{name}")
        assert isinstance(info, dict)
        with MongoClient(info["uri"]) as c:
            out[name] = contents(c[db].items)
    return out


def histories(proxy: ProxyProcess, db: str, names: list[str]) -> dict[str, Any]:
    """What a user sees of each branch: its documents, its diff, and merge's conflicts."""
    seen: dict[str, Any] = {"views": views(proxy, db, names)}
    seen["diffs"] = {name: doc_changes(diff(proxy, name)) for name in names}
    dry = merge(proxy, "dev", 409, strategy="abort")
    seen["conflicts"] = sorted(c["_id"] for c in dry["conflicts"])
    return seen


def test_gc_keeps_every_branch_and_refuses_points_before_its_horizon(upstream: Secantus
                                                                      ) -> None:
    db = unique("gc").replace("-", "_")
    proxy = ProxyProcess(upstream.uri, meta_db=unique("mb_gc").replace("-", "_"))
    direct: MongoClient = MongoClient(upstream.uri, directConnection=True)
    direct[db].items.insert_many([{"_id": i, "v": 0, "pad": PAD} for i in range(30)])
    restarted: ProxyProcess | None = None
    try:
        proxy.start()
        dev = ok(proxy, "POST", "/branches", {"name": "dev"}, 201)
        with MongoClient(dev["uri"]) as c:
            items = c[db].items
            for _ in range(4):
                items.update_many({"_id": {"$lt": 10}}, {"$inc": {"v": 1}})
            items.delete_many({"_id": {"$gte": 25}})
            items.insert_many([{"_id": 100 + i, "v": "new", "pad": PAD} for i in range(5)])
            items.update_one({"_id": 100}, {"$set": {"v": "again"}})
            mid = last_lsn(proxy, "dev")
            items.update_many({"_id": {"$lt": 5}}, {"$set": {"v": "voided"}})
        ok(proxy, "POST", "/branches/dev/reset", {"to": mid})
        feat = ok(proxy, "POST", "/branches", {"name": "feat", "from": "dev"}, 201)
        with MongoClient(feat["uri"]) as c:
            c[db].items.update_one({"_id": 1}, {"$set": {"v": "feat"}})
            c[db].items.delete_one({"_id": 2})
        copy = ok(proxy, "POST", "/branches", {"name": "cp", "mode": "copy"}, 201)
        with MongoClient(copy["uri"]) as c:
            for _ in range(3):
                c[db].items.update_one({"_id": 20}, {"$inc": {"v": 1}})
        # main changes documents dev touched: conflicts a merge must still find after gc
        direct[db].items.update_many({"_id": {"$in": [3, 100, 26]}}, {"$set": {"v": "main"}})
        names = ["dev", "feat", "cp"]
        before = histories(proxy, db, names)
        assert before["conflicts"] == [3, 26]
        wal = direct[proxy.meta_db]["wal"]
        entries_before = wal.count_documents({})

        result = ok(proxy, "POST", "/gc", {"retention": "0s"})

        horizon = result["horizon_lsn"]
        assert horizon >= last_lsn(proxy, "cp")
        assert result["folded"] > 0 and result["compressed"] > 0
        assert result["before"]["entries"] == entries_before
        assert result["after"]["entries"] == wal.count_documents({}) < entries_before
        assert result["after"]["bytes"] < result["before"]["bytes"]
        # One entry per document and branch is left, its images compressed.
        per_doc = Counter((e["b"], e["ns"], repr(e["id"])) for e in wal.find())
        assert set(per_doc.values()) == {1}
        assert wal.find_one({"$or": [{"pre": {"$type": "object"}},
                                     {"post": {"$type": "object"}}]}) is None
        assert histories(proxy, db, names) == before

        status, message = error(proxy, "POST", "/branches",
                                {"name": "old", "from": "dev", "at": mid})
        assert status == 409 and "compacted by gc" in message
        status, message = error(proxy, "POST", "/branches/dev/reset", {"to": mid})
        assert status == 409 and "compacted by gc" in message
        again = ok(proxy, "POST", "/gc", {"retention": "0s"})
        assert again["folded"] == 0 and again["compressed"] == 0
        assert histories(proxy, db, names) == before

        # Overlays rebuilt from the compacted WAL alone equal what they were.
        assert proxy.stop() == 0
        meta = direct[proxy.meta_db]
        for name in ("dev", "feat"):
            bid = bid_of(direct, proxy, name)
            direct[db].drop_collection(f"__mb_{bid}_l_items")
            meta["dirty"].insert_one({"_id": f"{bid}:{db}.items"})
        restarted = ProxyProcess(upstream.uri, meta_db=proxy.meta_db,
                                 branch_ports=proxy.branch_ports).start()
        assert "rematerializing" in restarted.read_log()
        assert histories(restarted, db, names) == before

        # and the branches take writes as before
        with MongoClient(dev["uri"]) as c:
            c[db].items.insert_one({"_id": 500, "v": "after gc"})
            c[db].items.update_one({"_id": 7}, {"$set": {"v": "after gc"}})
            assert c[db].items.count_documents({"v": "after gc"}) == 2
        assert (f"{db}.items", "insert", 500) in doc_changes(diff(restarted, "dev"))
    finally:
        for running in (restarted, proxy):
            if running is not None:
                running.stop()
        direct.drop_database(db)
        direct.drop_database(proxy.meta_db)
        direct.close()
