"""Documents whose WAL entry cannot hold their images even compressed: a document of
random bytes within a few hundred bytes of 16 MiB (inserted or deleted), or an update of
one over 8 MiB (its pre- and post-image together). Their images are stored out of line
(`walimages` chunks the entry names), and every reader of images reads them there: the
branch's reads, its change stream, diff, a branch at a point, a reset, a rebuild of its
overlay from the WAL, and gc's folding, which also deletes the chunks no entry names.

Runs on a proxy of its own (its own metadata database): gc's horizon is global."""

from __future__ import annotations

import os
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from tests.branchutil import bid_of, unique
from tests.historyutil import contents, diff, doc_changes, last_lsn, ok
from tests.servers import ProxyProcess, Secantus

LIMIT = 16 * 1024 * 1024
NINE = 9 * 1024 * 1024


def _bytes(direct: MongoClient, meta: str, coll: str) -> int:
    group = {"$group": {"_id": None, "n": {"$sum": {"$bsonSize": "$$ROOT"}}}}
    return sum(doc["n"] for doc in direct[meta][coll].aggregate([group]))


def _chunks(direct: MongoClient, meta: str) -> tuple[set[str], set[str]]:
    """The ids of the stored image chunks, and those the WAL's entries name."""
    stored = {c["_id"] for c in direct[meta].walimages.find({}, {"_id": 1})}
    named: set[str] = set()
    for entry in direct[meta].wal.find({"$or": [{"prex": {"$exists": True}},
                                                {"postx": {"$exists": True}}]},
                                       {"prex": 1, "postx": 1}):
        named.update(entry.get("prex") or [])
        named.update(entry.get("postx") or [])
    return stored, named


def _view(proxy: ProxyProcess, name: str, db: str) -> list[dict[str, Any]]:
    _, info = proxy.api("GET", f"/branches/{name}")
    assert isinstance(info, dict)
    with MongoClient(info["uri"]) as c:
        return contents(c[db].items)


def test_images_too_large_for_one_entry_are_stored_out_of_line(upstream: Secantus) -> None:
    db = unique("imgs").replace("-", "_")
    meta = unique("mb_imgs").replace("-", "_")
    proxy = ProxyProcess(upstream.uri, meta_db=meta)
    restarted: ProxyProcess | None = None
    direct: MongoClient = MongoClient(upstream.uri, directConnection=True)
    nine, huge, fresh = os.urandom(NINE), os.urandom(LIMIT - 100), os.urandom(LIMIT - 100)
    # Text zstd shrinks: an update's entry holds both its images compressed.
    text = "mongobranch " * (NINE // 12)
    base = [{"_id": "huge", "b": huge}, {"_id": "nine", "b": nine}, {"_id": "small", "n": 0},
            {"_id": "text", "s": text}]
    direct[db].items.insert_many(base[1:])
    direct[db].items.insert_one(base[0])
    try:
        proxy.start()
        dev = ok(proxy, "POST", "/branches", {"name": "dev"}, 201)
        bid = bid_of(direct, proxy, "dev")
        with MongoClient(dev["uri"]) as c:
            items = c[db].items
            plain = items.watch(full_document="updateLookup")
            deletes = items.watch([{"$match": {"operationType": "delete"}}],
                                  full_document_before_change="whenAvailable")
            both = items.watch(full_document="updateLookup",
                               full_document_before_change="whenAvailable")
            start = last_lsn(proxy, "dev")
            items.update_one({"_id": "nine"}, {"$set": {"n": 1}})
            items.delete_one({"_id": "huge"})
            mid = last_lsn(proxy, "dev")
            items.insert_one({"_id": "fresh", "b": fresh})
            items.update_one({"_id": "small"}, {"$inc": {"n": 1}})
            items.update_one({"_id": "text"}, {"$set": {"n": 1}})
            written = [{"_id": "fresh", "b": fresh}, {"_id": "nine", "b": nine, "n": 1},
                       {"_id": "small", "n": 1}, {"_id": "text", "s": text, "n": 1}]
            assert contents(items) == written

            # Change events carry the images, and what the update changed.
            update, delete, insert, small, compressed = (plain.next() for _ in range(5))
            assert (update["operationType"], update["documentKey"]) == ("update", {"_id": "nine"})
            assert update["updateDescription"] == {"updatedFields": {"n": 1},
                                                   "removedFields": [], "truncatedArrays": []}
            assert update["fullDocument"] == {"_id": "nine", "b": nine, "n": 1}
            assert delete["operationType"] == "delete" and "fullDocument" not in delete
            assert (insert["operationType"], insert["fullDocument"]) == (
                "insert", {"_id": "fresh", "b": fresh})
            assert small["updateDescription"]["updatedFields"] == {"n": 1}
            assert compressed["updateDescription"] == update["updateDescription"]
            assert compressed["fullDocument"] == {"_id": "text", "s": text, "n": 1}
            # The client's stages see the event with its images.
            only = deletes.next()
            assert only["documentKey"] == {"_id": "huge"}
            assert only["fullDocumentBeforeChange"] == {"_id": "huge", "b": huge}
            # An event over mongod's largest reply document (the 9 MiB document before
            # and after) fails as mongod's would.
            with pytest.raises(OperationFailure) as too_big:
                both.next()
            assert too_big.value.code == 10334, too_big.value.details
            for stream in (plain, deletes, both):
                stream.close()

        wal = direct[meta].wal
        apart = list(wal.find({"b": bid, "$or": [{"prex": {"$exists": True}},
                                                 {"postx": {"$exists": True}}]},
                              {"id": 1, "op": 1, "prex": 1, "postx": 1, "pre": 1}))
        assert sorted((e["id"], e["op"]) for e in apart) == [
            ("fresh", "put"), ("huge", "delete"), ("nine", "put")], apart
        stored, named = _chunks(direct, meta)
        assert stored == named and len(stored) >= 5
        changes = doc_changes(diff(proxy, "dev"))
        assert changes == sorted([(f"{db}.items", "insert", "fresh"),
                                  (f"{db}.items", "delete", "huge"),
                                  (f"{db}.items", "update", "nine"),
                                  (f"{db}.items", "update", "small"),
                                  (f"{db}.items", "update", "text")], key=repr)
        assert wal.find_one({"b": bid, "id": "text", "prez": {"$exists": True},
                             "postz": {"$exists": True}}, {"_id": 1}) is not None

        # A branch of dev at a point between its writes.
        ok(proxy, "POST", "/branches", {"name": "then", "from": "dev", "at": mid}, 201)
        assert _view(proxy, "then", db) == [{"_id": "nine", "b": nine, "n": 1},
                                            {"_id": "small", "n": 0}, {"_id": "text", "s": text}]

        # dev's overlay rebuilt from the WAL alone.
        assert proxy.stop() == 0
        direct[db].drop_collection(f"__mb_{bid}_l_items")
        direct[meta].dirty.insert_one({"_id": f"{bid}:{db}.items"})
        restarted = ProxyProcess(upstream.uri, meta_db=meta,
                                 branch_ports=proxy.branch_ports).start()
        assert "rematerializing" in restarted.read_log()
        assert _view(restarted, "dev", db) == written

        # A reset to before the writes shows the base documents again.
        ok(restarted, "POST", "/branches/dev/reset", {"to": start})
        assert _view(restarted, "dev", db) == base

        # A document whose first entry holds its pre-image out of line, folded by gc.
        again = os.urandom(LIMIT - 100)
        with MongoClient(dev["uri"]) as c:
            items = c[db].items
            items.delete_one({"_id": "huge"})
            items.insert_one({"_id": "huge", "b": again})
            items.update_one({"_id": "nine"}, {"$set": {"n": 2}})
            items.update_one({"_id": "nine"}, {"$set": {"n": 3}})
        later = [{"_id": "huge", "b": again}, {"_id": "nine", "b": nine, "n": 3},
                 {"_id": "small", "n": 0}, {"_id": "text", "s": text}]
        views = {"dev": _view(restarted, "dev", db), "then": _view(restarted, "then", db)}
        assert views["dev"] == later
        diffs = {name: doc_changes(diff(restarted, name)) for name in ("dev", "then")}
        stored_before, _ = _chunks(direct, meta)
        sizes_before = {name: _bytes(direct, meta, name) for name in ("wal", "walimages")}

        result = ok(restarted, "POST", "/gc", {"retention": "0s"})

        assert result["folded"] > 0
        # Its byte counts take in the images held out of line.
        assert result["before"]["bytes"] == sizes_before["wal"] + sizes_before["walimages"]
        assert sizes_before["walimages"] > LIMIT
        assert {"dev": _view(restarted, "dev", db),
                "then": _view(restarted, "then", db)} == views
        assert {name: doc_changes(diff(restarted, name)) for name in ("dev", "then")} == diffs
        stored, named = _chunks(direct, meta)
        assert stored == named, (stored - named, named - stored)
        assert stored_before - stored, "the folded-away entries' chunks are deleted"
        folded = wal.find_one({"b": bid, "id": "huge"})
        assert folded is not None and folded.get("prex") and folded.get("postx"), folded
    finally:
        for running in (restarted, proxy):
            if running is not None:
                running.stop()
        direct.drop_database(db)
        direct.drop_database(meta)
        direct.close()
