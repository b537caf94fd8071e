"""Seeded random operations applied to a branch and to a plain copy of its base.

Every reply must be equal, and after every write so must the full contents of the
collection it touched (as BSON, so field order and number types count too). The
generator aims at the cases where a branch's bookkeeping (hidden ids, overlay, WAL) can
part from the data: batches that stop at an error, ids deleted and re-inserted, wiped
collections, writes that change nothing, colliding upserts, transactions committed or
aborted, and documents only the base, only the branch, or both hold. It never relies on
unspecified order: sorts end with _id, and arrays built by $lookup/$group are sorted.

Many seeds at once: `make differential SEEDS=20 OPS=2000 MODES="wal copy kid"`. Each
failing seed prints its first diverging operation and the earlier operations that touched
the same ids, a reproduction as it stands.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import (
    DeleteMany,
    DeleteOne,
    InsertOne,
    MongoClient,
    ReplaceOne,
    ReturnDocument,
    UpdateMany,
    UpdateOne,
)
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, OperationFailure

WORDS = ["apple", "Apple", "banana", "cherry", "Cherry", "date", "elder", "fig", "grape", "kiwi"]
CI = {"locale": "en", "strength": 2}
RAW = CodecOptions(document_class=RawBSONDocument)
# Base sizes: "items" is the large one; "churn" is small, has a unique secondary index
# and is the one wiped (delete_many({}), drop) and written again.
BASE = {"items": 200, "churn": 40}
# A collection the base does not have: the branch's first write to it makes it the
# branch's own (snapshot.first_write), the plain copy's creates it.
FRESH = "fresh"
COLLS = ("items", "churn", "other", FRESH)
GOSSIP = ("$clusterTime", "operationTime", "electionId", "opTime")


def make_doc(rng: random.Random, _id: int, *, base: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": _id}
    roll = rng.random()
    if roll < 0.7:
        doc["a"] = rng.randint(0, 20)
    elif roll < 0.8:
        doc["a"] = None
    elif roll < 0.9:
        doc["a"] = rng.choice(WORDS)
    if rng.random() < 0.85:
        doc["b"] = {"c": rng.randint(0, 5),
                    "d": [rng.randint(0, 9) for _ in range(rng.randint(0, 4))]}
    if rng.random() < 0.8:
        doc["tags"] = rng.sample(WORDS, rng.randint(0, 3))
    if rng.random() < 0.9:
        doc["s"] = rng.choice(WORDS)
    n_roll = rng.random()
    if n_roll < 0.3:
        doc["n"] = rng.randint(100, 110)
    elif n_roll < 0.5:
        doc["n"] = rng.choice(["x", "y", "z"])
    elif n_roll < 0.6:
        # Not 0 or 1: SecantusDB's distinct and $group conflate true with 1 and false
        # with 0 (mongod keeps them apart), so booleans below must not meet them.
        doc["n"] = [rng.randint(4, 7), rng.randint(4, 7)]
    elif n_roll < 0.7:
        doc["n"] = {"k": rng.randint(0, 2)}
    elif n_roll < 0.8:
        doc["n"] = rng.random() < 0.5
    # "u" has a unique sparse index: distinct in the base, and new documents may take
    # a value some other document holds (a duplicate-key error).
    if base:
        if rng.random() < 0.4:
            doc["u"] = _id * 3
    elif rng.random() < 0.25:
        doc["u"] = rand_u(rng)
    return doc


def rand_u(rng: random.Random) -> int:
    return rng.randint(0, 600) * 3


def seed_base(db: Database[Any], rng: random.Random) -> None:
    for name in COLLS:
        db[name].drop()
    db.items.insert_many([make_doc(rng, i, base=True) for i in range(BASE["items"])])
    db.churn.insert_many([make_doc(rng, i, base=True) for i in range(BASE["churn"])])
    db.other.insert_many([{"_id": i, "k": i % 6, "label": f"o{i}"} for i in range(30)])
    db.items.create_index("s")
    # The unique index is on the small collection only: SecantusDB's $lookup (which the
    # proxy's cross-layer unique check runs) scans, and on "items" it would cost
    # the CI run most of its time.
    db.churn.create_index("u", unique=True, sparse=True)


def rand_filter(rng: random.Random) -> dict[str, Any]:
    choices: list[Callable[[], dict[str, Any]]] = [
        lambda: {"a": {"$gt": rng.randint(0, 20)}},
        lambda: {"a": {"$lte": rng.randint(0, 20)}},
        lambda: {"a": None},
        lambda: {"a": {"$exists": False}},
        lambda: {"a": {"$in": [rng.randint(0, 20) for _ in range(3)]}},
        lambda: {"b.c": rng.randint(0, 5)},
        lambda: {"b.d": rng.randint(0, 9)},
        lambda: {"b.d": {"$elemMatch": {"$gt": rng.randint(0, 9)}}},
        lambda: {"tags": rng.choice(WORDS)},
        lambda: {"tags": {"$size": rng.randint(0, 3)}},
        lambda: {"s": {"$regex": "^" + rng.choice("abcdefgk"), "$options": "i"}},
        lambda: {"n": {"$type": rng.choice(["string", "int", "array", "object", "bool"])}},
        lambda: {"n": {"$gte": 105}},
        lambda: {"_id": {"$lt": rng.randint(0, 250)}},
        lambda: {"_id": rng.randint(0, 250)},
        lambda: {"$or": [{"a": {"$lt": 5}}, {"s": rng.choice(WORDS)}]},
        lambda: {"$and": [{"a": {"$type": "int"}}, {"b.c": {"$ne": rng.randint(0, 5)}}]},
        lambda: {"s": rng.choice(WORDS)},
        lambda: {"u": {"$exists": True}},
        lambda: {},
    ]
    return rng.choice(choices)()


def rand_sort(rng: random.Random) -> list[tuple[str, int]]:
    # Not "tags": a branch merges sorted finds by {$meta: "sortKey"}, which SecantusDB
    # fails to return for an empty array (an internal error, on a getMore once the
    # first batch is out); mongod returns it. A SecantusDB gap, not the branch's.
    keys = rng.sample(["a", "b.c", "s", "n"], rng.randint(0, 2))
    return [(k, rng.choice([1, -1])) for k in keys] + [("_id", rng.choice([1, -1]))]


def rand_projection(rng: random.Random) -> dict[str, Any] | None:
    return rng.choice([
        None, None, {"a": 1, "s": 1}, {"b": 0, "tags": 0}, {"b.c": 1}, {"_id": 0, "a": 1},
        {"sum": {"$add": [{"$ifNull": ["$b.c", 0]}, 1]}, "s": 1},
    ])


def rand_update(rng: random.Random, *, single: bool = False) -> Any:
    """An update; single: for one document, so it may also set the unique key (on
    several, which document collides first would be natural order, unspecified)."""
    choices: list[Callable[[], Any]] = [
        lambda: {"$set": {"a": rng.randint(0, 20)}},
        lambda: {"$inc": {"b.c": rng.randint(-2, 2)}},
        lambda: {"$unset": {"s": ""}},
        lambda: {"$push": {"tags": rng.choice(WORDS)}},
        lambda: {"$pull": {"tags": rng.choice(WORDS)}},
        lambda: {"$addToSet": {"b.d": rng.randint(0, 9)}},
        lambda: {"$set": {"s": rng.choice(WORDS), "new": rng.random() < 0.5}},
        lambda: {"$mul": {"b.c": 2}},  # a may hold strings: a partial failure is order-dependent
        lambda: {"$max": {"n": 107}},
        lambda: [{"$set": {"pipe": {"$concat": [{"$ifNull": ["$s", ""]}, "!"]}}}],
        lambda: {"$unset": {"u": ""}},
    ]
    if single:
        choices.append(lambda: {"$set": {"u": rand_u(rng)}})
    return rng.choice(choices)()


def noop_update(rng: random.Random) -> tuple[dict[str, Any], Any]:
    """A filter and an update that changes nothing in the documents it matches."""
    word = rng.choice(WORDS)
    choices: list[tuple[dict[str, Any], Any]] = [
        ({"s": word}, {"$set": {"s": word}}),
        ({"tags": {"$type": "array"}}, {"$pull": {"tags": "zzz"}}),
        ({"a": {"$gte": 0}}, {"$max": {"a": -1}}),
        ({"a": {"$lte": 20}}, {"$min": {"a": 50}}),
        ({"b.d": {"$type": "array"}}, {"$pull": {"b.d": 99}}),
        ({"s": word}, [{"$set": {"s": word}}]),
    ]
    return rng.choice(choices)


@dataclass
class Outcome:
    value: Any = None
    error: Any = None
    # Shown in a report, never compared (the wording is the server's own).
    message: str = field(default="", compare=False)


@dataclass
class Step:
    number: int
    coll: str
    label: str
    ids: set[Any]


class Divergence(AssertionError):
    """The branch and the copy parted: the message is a reproduction."""


@dataclass
class Runner:
    branch_db: Database[Any]
    copy_db: Database[Any]
    rng: random.Random
    next_id: int = 1000
    log: list[Step] = field(default_factory=list)
    coll: str = "items"
    hot: dict[str, list[int]] = field(default_factory=dict)
    inserted: dict[str, list[int]] = field(default_factory=dict)
    # The copy's contents after the last write, per collection: which ids each write
    # changed is the difference (for the minimal history of a divergence).
    snap: dict[str, dict[Any, bytes]] = field(default_factory=dict)
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))

    def __post_init__(self) -> None:
        for name, size in BASE.items():
            reserved = 900 if name == "items" else 950
            self.hot[name] = self.rng.sample(range(size), 10) + list(range(reserved,
                                                                          reserved + 6))
            self.inserted[name] = []
        self.hot[FRESH], self.inserted[FRESH] = list(range(980, 990)), []
        for name in COLLS:
            self.snap[name] = contents(self.copy_db[name])

    @property
    def c(self) -> str:
        return self.coll

    def both(self, label: str, fn: Callable[[Database[Any]], Any], *, write: bool = False,
             ids: Any = ()) -> None:
        name = self.coll

        def side(db: Database[Any]) -> tuple[Outcome, dict[Any, bytes]]:
            out = capture(fn, db)
            return out, (contents(db[name]) if write else {})
        # The two sides are independent databases: the copy's runs beside the branch's.
        copy_side = self.pool.submit(side, self.copy_db)
        got, mine = side(self.branch_db)
        want, theirs = copy_side.result()
        step = Step(len(self.log) + 1, self.coll, label, {key(i) for i in ids})
        self.log.append(step)
        if got != want:
            self.diverged(step, f"reply differs:\n  branch: {got!r}\n  copy:   {want!r}",
                          reply_ids(got, want) or step.ids)
        if not write:
            return
        before = self.snap[self.coll]
        step.ids |= {k for k in before.keys() | theirs.keys() if before.get(k) != theirs.get(k)}
        self.snap[self.coll] = theirs
        if mine != theirs:
            bad = {k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)}
            shown = "\n".join(f"  _id {k!r}: branch {show(mine.get(k))}  copy {show(theirs.get(k))}"
                              for k in sorted(bad, key=repr)[:10])
            self.diverged(step, f"contents of {self.coll} differ after it:\n{shown}",
                          bad or step.ids)

    def diverged(self, step: Step, what: str, ids: set[Any]) -> None:
        earlier = [s for s in self.log[:-1] if s.ids & ids]
        lines = [f"operation #{step.number} on {step.coll}: {step.label}", what,
                 f"earlier operations touching ids {sorted(ids, key=repr)[:20]}:"]
        lines += [f"  #{s.number} on {s.coll}: {s.label}" for s in earlier] or ["  (none)"]
        raise Divergence("\n".join(lines))

    def step(self) -> None:
        rng = self.rng
        roll = rng.random()
        self.coll = "churn" if roll < 0.35 else FRESH if roll < 0.45 else "items"
        op = rng.choices(
            ["find", "count", "distinct", "agg", "insert", "insert_many", "update_one",
             "update_many", "replace", "upsert", "delete_one", "delete_many", "fam", "index",
             "estimated", "find_one_id", "other_write", "batch", "bulk", "noop", "wipe",
             "txn", "view", "stats"],
            weights=[16, 5, 4, 9, 6, 3, 7, 3, 3, 4, 4, 2, 6, 1, 1, 5, 2, 6, 4, 6, 0.5, 3, 3, 1],
        )[0]
        getattr(self, "op_" + op)()

    def pick_id(self) -> int:
        """An id from the hot set (deleted, re-inserted, changed again), one the branch
        inserted, or any id of the base."""
        roll = self.rng.random()
        if roll < 0.35:
            return self.rng.choice(self.hot[self.coll])
        if roll < 0.55 and self.inserted[self.coll]:
            return self.rng.choice(self.inserted[self.coll][-40:])
        return self.rng.randint(0, BASE.get(self.coll, 0) + 10)

    @property
    def col_of(self) -> Callable[[Database[Any]], Collection[Any]]:
        name = self.coll
        return lambda db: db[name]

    # -- reads --------------------------------------------------------------------
    def op_find(self) -> None:
        filt, sort, proj = rand_filter(self.rng), rand_sort(self.rng), rand_projection(self.rng)
        skip, limit = self.rng.choice([0, 0, 3]), self.rng.choice([0, 0, 5, 50])
        collation = CI if self.rng.random() < 0.2 else None
        batch = self.rng.choice([0, 0, 7])
        col = self.col_of

        def fn(db: Database[Any]) -> Any:
            cur = col(db).find(filt, proj, sort=sort, skip=skip, limit=limit,
                               collation=collation, batch_size=batch)
            return list(cur)
        self.both(f"find({filt}, {proj}, sort={sort}, skip={skip}, limit={limit}, "
                  f"collation={collation}, batch_size={batch})", fn)

    def op_find_one_id(self) -> None:
        _id = self.pick_id()
        col = self.col_of
        self.both(f"find_one({{'_id': {_id}}})", lambda db: col(db).find_one({"_id": _id}))

    def op_count(self) -> None:
        filt = rand_filter(self.rng)
        limit = self.rng.choice([0, 10])
        col = self.col_of
        self.both(f"count_documents({filt}, limit={limit})",
                  lambda db: col(db).count_documents(filt, limit=limit) if limit
                  else col(db).count_documents(filt))

    def op_estimated(self) -> None:
        col = self.col_of
        self.both("estimated_document_count()", lambda db: col(db).estimated_document_count())

    def op_stats(self) -> None:
        """What collStats and $collStats say of the documents (storage figures are the
        stored collections', which differ by design). Not the names in `indexSizes`:
        SecantusDB leaves out the indexes of an empty collection, where mongod, and the
        branch, list each index."""
        col, name = self.col_of, self.coll

        def fn(db: Database[Any]) -> Any:
            if not col(db).find_one({}, {"_id": 1}):
                # SecantusDB creates a collection on an update that matches nothing
                # (mongod, and a branch, do not): an empty one may exist on the copy
                # alone, which its existence, not its figures, would tell apart.
                return "empty or absent"
            try:
                stats = db.command("collStats", name)
            except OperationFailure as failure:
                return failure.code
            staged = list(col(db).aggregate([{"$collStats": {"count": {}}}]))
            return ({k: stats.get(k) for k in ("count", "size", "avgObjSize", "nindexes")},
                    [d.get("count") for d in staged])
        self.both("collStats", fn)

    def op_distinct(self) -> None:
        key_ = self.rng.choice(["a", "s", "tags", "b.c", "b.d", "n", "u"])
        filt = rand_filter(self.rng)
        collation = CI if key_ == "s" and self.rng.random() < 0.3 else None
        col = self.col_of
        # Under a case-insensitive collation, which spelling represents equal values is
        # unspecified (mongod keeps the first one it meets): compare case-folded.
        fold = (lambda v: v.casefold() if isinstance(v, str) else v) if collation else \
            (lambda v: v)
        self.both(f"distinct({key_!r}, {filt}, collation={collation})", lambda db: sorted(
            repr(fold(v)) for v in col(db).distinct(key_, filt, collation=collation)))

    def op_agg(self) -> None:
        rng = self.rng
        filt = rand_filter(rng)
        kind = rng.choice(["group", "lookup", "unwind", "facet", "union", "project"])
        pipeline: list[dict[str, Any]] = [{"$match": filt}]
        if kind == "group":
            pipeline += [{"$group": {"_id": "$b.c", "n": {"$sum": 1},
                                     "ids": {"$addToSet": "$_id"}}},
                         {"$set": {"ids": {"$sortArray": {"input": "$ids", "sortBy": 1}}}},
                         {"$sort": {"_id": 1}}]
        elif kind == "lookup":
            join: dict[str, Any] = {"from": "other", "localField": "b.c",
                                    "foreignField": "k", "as": "j"}
            if rng.random() < 0.5:  # mongod's concise correlated form
                join["pipeline"] = [{"$match": {"k": {"$ne": None}}},
                                    {"$project": {"k": 1, "a": 1}}]
            pipeline += [{"$lookup": join},
                         {"$set": {"j": {"$sortArray": {"input": "$j",
                                                        "sortBy": {"_id": 1}}}}},
                         {"$sort": {"_id": 1}}, {"$limit": 20}]
        elif kind == "unwind":
            pipeline += [{"$unwind": "$tags"}, {"$group": {"_id": "$tags", "c": {"$sum": 1}}},
                         {"$sort": {"_id": 1}}]
        elif kind == "facet":
            pipeline += [{"$facet": {
                "count": [{"$count": "n"}],
                "top": [{"$sort": {"a": -1, "_id": 1}}, {"$limit": 3}, {"$project": {"a": 1}}],
            }}]
        elif kind == "union":
            pipeline += [{"$project": {"_id": 1, "a": 1}},
                         {"$unionWith": {"coll": "other", "pipeline": [
                             {"$project": {"_id": 1, "a": "$k"}}]}},
                         {"$sort": {"_id": 1, "a": 1}}]
        else:
            pipeline += [{"$project": {"x": {"$cond": [{"$gt": ["$a", 10]}, "hi", "lo"]}}},
                         {"$sort": {"_id": -1}}, {"$skip": 2}, {"$limit": 10}]
        col = self.col_of
        self.both(f"aggregate({pipeline})", lambda db: list(col(db).aggregate(pipeline)))

    # -- writes -------------------------------------------------------------------
    def _new_doc(self) -> dict[str, Any]:
        self.next_id += 1
        self.inserted[self.coll].append(self.next_id)
        return make_doc(self.rng, self.next_id)

    def _some_doc(self) -> dict[str, Any]:
        """A new id, or an id that may exist (base, hot, inserted): a likely duplicate
        or the re-insert of one the branch deleted."""
        if self.rng.random() < 0.5:
            return self._new_doc()
        return make_doc(self.rng, self.pick_id())

    def settle(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Drop the unique key from documents whose _id is taken (in the collection or
        earlier in the batch). mongod checks the _id index first and reports a document
        that collides on both as an _id duplicate; SecantusDB reports the secondary key
        (a SecantusDB gap): a document colliding on both would compare the two servers,
        not the branch. The copy's contents say which ids are taken."""
        seen = set(self.snap[self.coll])
        for doc in docs:
            k = key(doc["_id"])
            if k in seen:
                doc.pop("u", None)
            seen.add(k)
        return docs

    def op_insert(self) -> None:
        doc = self.settle([self._some_doc()])[0]
        col = self.col_of
        self.both(f"insert_one({doc})", lambda db: col(db).insert_one(dict(doc)).inserted_id,
                  write=True, ids=[doc["_id"]])

    def op_insert_many(self) -> None:
        docs = [self._new_doc() for _ in range(self.rng.randint(1, 5))]
        if self.rng.random() < 0.5:
            docs.insert(self.rng.randint(0, len(docs)), make_doc(self.rng, self.pick_id()))
        self.settle(docs)
        ordered = self.rng.random() < 0.5
        col = self.col_of
        self.both(f"insert_many({docs}, ordered={ordered})",
                  lambda db: col(db).insert_many([dict(d) for d in docs],
                                                 ordered=ordered).inserted_ids,
                  write=True, ids=[d["_id"] for d in docs])

    def _failing(self, docs: list[dict[str, Any]]) -> dict[str, Any]:
        """A document that fails to insert next to these: a duplicate _id inside the batch,
        against the base, against the branch, or on the unique secondary key."""
        rng = self.rng
        causes = ["batch", "base", "branch", "unique"] if docs else ["base", "branch", "unique"]
        if self.coll not in BASE:
            causes.remove("base")
        cause = rng.choice(causes)
        if cause == "batch":
            return make_doc(rng, rng.choice(docs)["_id"])
        if cause == "base":
            return make_doc(rng, rng.randint(0, BASE[self.coll] - 1))
        if cause == "branch":
            pool = self.inserted[self.coll][-20:] + self.hot[self.coll]
            return make_doc(rng, rng.choice(pool))
        doc = self._new_doc()
        doc["u"] = rng.choice([d.get("u", rand_u(rng)) for d in docs] + [rand_u(rng)] * 2)
        return doc

    def _batch_docs(self) -> list[dict[str, Any]]:
        """Documents for a batch failing at its first, a middle or its last index (or
        not at all); the others are new ids and ids the branch deleted or changed."""
        rng = self.rng
        docs: list[dict[str, Any]] = []
        for _ in range(rng.randint(2, 6)):
            if rng.random() < 0.5:
                docs.append(self._new_doc())
            else:
                docs.append(make_doc(rng, rng.choice(self.hot[self.coll])))
        where = rng.choice(["first", "middle", "last", "none"])
        if where != "none":
            at = {"first": 0, "middle": len(docs) // 2, "last": len(docs)}[where]
            docs.insert(at, self._failing(docs[:at] if where != "first" else []))
        return self.settle(docs)

    def op_batch(self) -> None:
        docs = self._batch_docs()
        ordered = self.rng.random() < 0.6
        col = self.col_of
        self.both(f"insert_many({docs}, ordered={ordered})",
                  lambda db: col(db).insert_many([dict(d) for d in docs],
                                                 ordered=ordered).inserted_ids,
                  write=True, ids=[d["_id"] for d in docs])

    def op_bulk(self) -> None:
        """A bulk_write mixing inserts (one may fail) with updates, replaces, upserts and
        deletes on single ids; ordered stops at the error, unordered goes on."""
        rng = self.rng
        ops: list[Any] = []
        ids: list[Any] = []
        for doc in self._batch_docs():
            ops.append(InsertOne(doc))
            ids.append(doc["_id"])
            if rng.random() < 0.5:
                _id = self.pick_id()
                ids.append(_id)
                kind = rng.choice(["update", "replace", "upsert", "delete", "noop",
                                   "delete_many"])
                if kind == "update":
                    ops.append(UpdateOne({"_id": _id}, rand_update(rng, single=True)))
                elif kind == "replace":
                    body = make_doc(rng, _id)
                    del body["_id"]
                    ops.append(ReplaceOne({"_id": _id}, body, upsert=rng.random() < 0.5))
                elif kind == "upsert":
                    ops.append(UpdateOne({"_id": _id}, {"$set": {"up": True}}, upsert=True))
                elif kind == "delete":
                    ops.append(DeleteOne({"_id": _id}))
                elif kind == "noop":
                    filt, upd = noop_update(rng)
                    ops.append(UpdateMany({"$and": [filt, {"_id": _id}]}, upd))
                else:
                    ops.append(DeleteMany({"_id": {"$in": [_id, self.pick_id()]}}))
        ordered = rng.random() < 0.6
        col = self.col_of
        self.both(f"bulk_write({ops}, ordered={ordered})",
                  lambda db: col(db).bulk_write(ops, ordered=ordered).bulk_api_result,
                  write=True, ids=ids)

    def op_update_one(self) -> None:
        filt = rand_filter(self.rng)
        upd = rand_update(self.rng, single=True)
        col = self.col_of
        q = {"$and": [filt, {"_id": {"$gte": 0}}]}
        self.both(f"update_one({q}, {upd}, sort={{'_id': 1}})", lambda db: raw(
            col(db).update_one(q, upd, sort={"_id": 1})), write=True)

    def op_update_many(self) -> None:
        filt = rand_filter(self.rng)
        upd = rand_update(self.rng)
        # A multi-update that fails part-way leaves the documents it reached first
        # changed, and which come first is natural order, unspecified: keep array
        # operators away from fields an upsert may have made scalar.
        for op, path in (("$push", "tags"), ("$pull", "tags"), ("$addToSet", "b.d")):
            if isinstance(upd, dict) and op in upd:
                filt = {"$and": [filt, {"$or": [{path: {"$exists": False}},
                                                {path: {"$type": "array"}}]}]}
        col = self.col_of
        self.both(f"update_many({filt}, {upd})",
                  lambda db: raw(col(db).update_many(filt, upd)), write=True)

    def op_noop(self) -> None:
        """An update that matches documents and changes none, through every write command
        (findAndModify with each of its options)."""
        rng = self.rng
        filt, upd = noop_update(rng)
        # Mostly on one id: a no-op over half the collection copies it all into the
        # overlay and out again, the CI run's most expensive step.
        if rng.random() < 0.8:
            filt = {"$and": [filt, {"_id": self.pick_id()}]}
        how = rng.choice(["update_one", "update_many", "replace", "bulk", "fam", "fam"])
        col = self.col_of
        sort = rand_sort(rng)
        if how == "update_one":
            self.both(f"update_one({filt}, {upd}, sort={sort})", lambda db: raw(
                col(db).update_one(filt, upd, sort=dict(sort))), write=True)
        elif how == "update_many":
            self.both(f"update_many({filt}, {upd})", lambda db: raw(
                col(db).update_many(filt, upd)), write=True)
        elif how == "replace":
            def same(db: Database[Any]) -> Any:
                doc = col(db).find_one(filt, sort=sort)
                if doc is None:
                    return None
                return raw(col(db).replace_one({"_id": doc["_id"]},
                                               {k: v for k, v in doc.items() if k != "_id"}))
            self.both(f"replace the first of find({filt}, sort={sort}) by itself", same,
                      write=True)
        elif how == "bulk":
            ops: list[Any] = [UpdateOne(filt, upd, sort=dict(sort)), UpdateMany(filt, upd),
                   InsertOne(self._new_doc())]
            self.both(f"bulk_write({ops})", lambda db: col(db).bulk_write(ops).bulk_api_result,
                      write=True)
        else:
            after = rng.random() < 0.5
            upsert = rng.random() < 0.3
            proj = rng.choice([None, {"a": 1}, {"tags": 0}, {"s": 1, "_id": 0}])
            if upsert:
                filt = {"$and": [filt, {"_id": self.pick_id()}]}
            cmd = {"query": filt, "update": upd, "new": after, "upsert": upsert,
                   "sort": dict(sort)}
            if proj is not None:
                cmd["fields"] = proj
            name = self.coll
            self.both(f"findAndModify {name} {cmd}", lambda db: clean(
                db.command("findAndModify", name, **cmd)), write=True)

    def op_replace(self) -> None:
        _id = self.pick_id()
        doc = make_doc(self.rng, _id)
        del doc["_id"]
        col = self.col_of
        self.both(f"replace_one({{'_id': {_id}}}, {doc})",
                  lambda db: raw(col(db).replace_one({"_id": _id}, doc)), write=True, ids=[_id])

    def op_upsert(self) -> None:
        rng = self.rng
        _id = self.pick_id() if rng.random() < 0.7 else rng.randint(0, self.next_id + 50)
        # An _id and a condition no document meets: the upsert collides on _id.
        filt = {"_id": _id} if rng.random() < 0.7 else {"_id": _id, "a": -1}
        upd: dict[str, Any] = {"$set": {"up": True}, "$inc": {"cnt": 1}}
        if rng.random() < 0.25:
            upd["$set"]["u"] = rand_u(rng)  # may collide on the unique key
        col = self.col_of
        self.both(f"update_one({filt}, {upd}, upsert=True)", lambda db: raw(
            col(db).update_one(filt, upd, upsert=True)), write=True, ids=[_id])

    def op_delete_one(self) -> None:
        # One document at most, so natural order (unspecified) never decides which.
        _id = self.pick_id()
        filt = {"_id": _id} if self.rng.random() < 0.6 else {"_id": _id, "a": {"$exists": True}}
        col = self.col_of
        self.both(f"delete_one({filt})", lambda db: raw(col(db).delete_one(filt)), write=True,
                  ids=[_id])

    def op_delete_many(self) -> None:
        filt = {"$and": [rand_filter(self.rng), {"_id": {"$mod": [7, self.rng.randint(0, 6)]}}]}
        col = self.col_of
        self.both(f"delete_many({filt})", lambda db: raw(col(db).delete_many(filt)), write=True)

    def op_wipe(self) -> None:
        """Empty "churn" (delete_many({}) or drop, which also drops its indexes); the
        writes that follow land in an emptied collection."""
        self.coll = "churn"
        if self.rng.random() < 0.5:
            self.both("delete_many({})", lambda db: raw(db.churn.delete_many({})), write=True)
            return
        unique = self.rng.random() < 0.5

        def fn(db: Database[Any]) -> Any:
            db.churn.drop()
            if unique:
                db.churn.create_index("u", unique=True, sparse=True)
            return sorted(ix["name"] for ix in db.churn.list_indexes())
        self.both(f"drop(); create_index('u', unique=True, sparse=True): {unique}", fn,
                  write=True)

    def op_fam(self) -> None:
        rng = self.rng
        filt = rand_filter(rng)
        sort = rand_sort(rng)
        proj = rng.choice([None, {"a": 1}, {"tags": 0}])
        kind = rng.choice(["update", "replace", "delete"])
        after = rng.random() < 0.5
        upsert = rng.random() < 0.2 and kind != "delete"
        if upsert:
            # An upsert without an _id in its filter gets a server-generated ObjectId,
            # which no two servers share: pin the _id so both sides insert the same.
            filt = {"$and": [filt, {"_id": self.pick_id()}]}
        upd = {"$inc": {"fam": 1}} if rng.random() < 0.8 else {"$set": {"u": rand_u(rng)}}
        col = self.col_of

        def fn(db: Database[Any]) -> Any:
            c = col(db)
            ret = ReturnDocument.AFTER if after else ReturnDocument.BEFORE
            if kind == "update":
                return c.find_one_and_update(filt, upd, projection=proj,
                                             sort=sort, return_document=ret, upsert=upsert)
            if kind == "replace":
                return c.find_one_and_replace(filt, {"r": 1}, projection=proj, sort=sort,
                                              return_document=ret, upsert=upsert)
            return c.find_one_and_delete(filt, projection=proj, sort=sort)
        self.both(f"find_one_and_{kind}({filt}, {upd if kind == 'update' else ''}, "
                  f"projection={proj}, sort={sort}, after={after}, upsert={upsert})", fn,
                  write=True)

    def op_other_write(self) -> None:
        """Change the collection that $lookup and $unionWith read, so they see a branch view."""
        rng = self.rng
        self.coll = "other"
        choice = rng.choice(["insert", "update", "delete"])
        if choice == "insert":
            self.next_id += 1
            doc = {"_id": self.next_id, "k": rng.randint(0, 5), "label": "new"}
            self.both(f"insert_one({doc})", lambda db: db.other.insert_one(dict(doc)).inserted_id,
                      write=True, ids=[doc["_id"]])
        elif choice == "update":
            k = rng.randint(0, 5)
            self.both(f"update_many({{'k': {k}}}, {{'$set': {{'k': {(k + 1) % 6}}}}})",
                      lambda db: raw(db.other.update_many({"k": k}, {"$set": {"k": (k + 1) % 6}})),
                      write=True)
        else:
            _id = rng.randint(0, 30)
            self.both(f"delete_one({{'_id': {_id}}})",
                      lambda db: raw(db.other.delete_one({"_id": _id})), write=True, ids=[_id])

    def op_txn(self) -> None:
        """A few writes and a read in a multi-document transaction, committed or aborted:
        all of it or nothing lands. A statement that fails ends the transaction (both
        servers abort it) and is the step's answer."""
        rng = self.rng
        commit = rng.random() < 0.7
        steps: list[tuple[Any, ...]] = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice(["insert", "update", "delete", "read"])
            if kind == "insert":
                steps.append(("insert", self.settle([self._some_doc()])[0]))
            elif kind == "update":
                steps.append(("update", self.pick_id(), rand_update(rng, single=True)))
            elif kind == "delete":
                steps.append(("delete", self.pick_id()))
            else:
                steps.append(("read", rand_filter(rng)))
        col = self.col_of

        def fn(db: Database[Any]) -> Any:
            c = col(db)
            out: list[Any] = []
            with db.client.start_session() as session:
                session.start_transaction()
                for step in steps:
                    try:
                        if step[0] == "insert":
                            out.append(c.insert_one(dict(step[1]), session=session).inserted_id)
                        elif step[0] == "update":
                            out.append(raw(c.update_one({"_id": step[1]}, step[2],
                                                        session=session)))
                        elif step[0] == "delete":
                            out.append(raw(c.delete_one({"_id": step[1]}, session=session)))
                        else:
                            out.append(sorted(key(d["_id"]) for d in
                                              c.find(step[1], {"_id": 1}, session=session)))
                    except OperationFailure as exc:
                        details = exc.details or {}
                        out.append(("error", exc.code, details.get("keyPattern"),
                                    details.get("keyValue")))
                        session.abort_transaction()
                        return out
                if commit:
                    session.commit_transaction()
                else:
                    session.abort_transaction()
            return out
        self.both(f"transaction({steps}, commit={commit})", fn, write=True,
                  ids=[s[1]["_id"] if s[0] == "insert" else s[1] for s in steps
                       if s[0] != "read"])

    def op_view(self) -> None:
        """A view over the collection, defined or defined anew on each side, then read
        through: the branch resolves it over its own view of the source. Anew by a drop
        and a create, not collMod: SecantusDB ignores collMod on a view (a SecantusDB
        gap; tests/test_branch_views.py holds the branch to mongod's collMod)."""
        rng = self.rng
        name = f"v_{self.coll}"
        stages: list[dict[str, Any]] = [{"$match": rand_filter(rng)}]
        if rng.random() < 0.5:
            stages.append({"$set": {"tier": {"$cond": [{"$gt": ["$a", 10]}, "hi", "lo"]}}})
        if rng.random() < 0.3:
            stages.append({"$project": {"a": 1, "b": 1, "tier": 1}})
        filt, sort = rand_filter(rng), rand_sort(rng)
        source = self.coll

        def fn(db: Database[Any]) -> Any:
            db.drop_collection(name)
            db.create_collection(name, viewOn=source, pipeline=stages)
            view = db[name]
            return (list(view.find(filt).sort(sort)),
                    view.count_documents(filt),
                    list(view.aggregate([{"$match": filt},
                                         {"$group": {"_id": "$b.c", "n": {"$sum": 1}}},
                                         {"$sort": {"_id": 1}}])))
        self.both(f"view {name} on {source} {stages}: find({filt}).sort({sort}), "
                  "count, group", fn)

    def op_index(self) -> None:
        key_ = self.rng.choice(["a", "s", "b.c"])
        col = self.col_of

        def fn(db: Database[Any]) -> Any:
            name = col(db).create_index([(key_, 1)])
            return sorted((ix["name"], dict(ix["key"])) for ix in col(db).list_indexes()), name
        self.both(f"create_index({key_!r})", fn)


def key(value: Any) -> Any:
    return repr(value)


def contents(coll: Collection[Any]) -> dict[Any, bytes]:
    """The collection as BSON per _id, in _id order: field order and number types count."""
    raw_coll = coll.with_options(codec_options=RAW)
    return {key(d["_id"]): bytes(d.raw) for d in raw_coll.find(batch_size=10_000).sort("_id", 1)}


def show(raw_doc: bytes | None) -> str:
    return "(none)" if raw_doc is None else repr(dict(RawBSONDocument(raw_doc)))


def reply_ids(got: Outcome, want: Outcome) -> set[Any]:
    """Ids of the documents that differ between two replies."""
    def docs(value: Any, out: dict[Any, str]) -> dict[Any, str]:
        if isinstance(value, dict):
            if "_id" in value:
                out[key(value["_id"])] = repr(value)
            for v in value.values():
                docs(v, out)
        elif isinstance(value, list | tuple):
            for v in value:
                docs(v, out)
        return out
    a, b = docs(got.value, {}), docs(want.value, {})
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def clean(reply: dict[str, Any]) -> dict[str, Any]:
    """A reply without the cluster-time gossip: a plain mongod and a mongos (which the
    proxy presents itself as) differ in whether they send it; it is not the write's."""
    return {k: v for k, v in reply.items() if k not in GOSSIP}


def raw(result: Any) -> Any:
    return clean(dict(result.raw_result))


def capture(fn: Callable[[Database[Any]], Any], db: Database[Any]) -> Outcome:
    try:
        return Outcome(value=fn(db))
    except BulkWriteError as exc:
        d = exc.details
        # errmsg is left out: its wording is the server's own (mongod versions word it
        # differently); code, keyPattern and keyValue are what it specifies.
        return Outcome(error=("bulk", d["nInserted"], d["nUpserted"], d["nMatched"],
                              d["nModified"], d["nRemoved"], d["upserted"],
                              [(e["index"], e["code"], e.get("keyPattern"), e.get("keyValue"))
                               for e in d["writeErrors"]]))
    except OperationFailure as exc:
        details = exc.details or {}
        return Outcome(error=("op", exc.code, details.get("keyPattern"),
                              details.get("keyValue")), message=str(exc)[:300])


# -- running seeds ------------------------------------------------------------------------
def final_state(db: Database[Any]) -> Any:
    return ([contents(db[name]) for name in COLLS],
            [sorted(ix["name"] for ix in db[name].list_indexes()) for name in COLLS],
            # The copy is main's data, which the branch keeps its snapshot of: the
            # overlays that holds are in the copy's database, listed on the upstream.
            sorted(n for n in db.list_collection_names() if not n.startswith("__mb_")))


@contextmanager
def paired(proxy: Any, direct: MongoClient, name: str, mode: str, seed: int
           ) -> Iterator[tuple[Database[Any], Database[Any]]]:
    """A base and a plain copy seeded alike, and a branch of the base: (branch db, copy db)."""
    tag = abs(hash(name)) % 10**6
    base_db, copy_db = f"dbase_{tag}", f"dcopy_{tag}"
    seed_base(direct[base_db], random.Random(seed))
    seed_base(direct[copy_db], random.Random(seed))
    status, body = proxy.api("POST", "/branches", {"name": name, "mode": mode})
    assert status == 201, body
    branch: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    try:
        yield branch[base_db], direct[copy_db]
    finally:
        branch.close()
        proxy.api("DELETE", f"/branches/{name}")
        direct.drop_database(base_db)
        direct.drop_database(copy_db)


def run_seed(proxy: Any, direct: MongoClient, name: str, mode: str, seed: int, ops: int,
             kid_ops: int = 0) -> None:
    """ops operations on a branch in this mode; then, with kid_ops, kid_ops more on a
    branch of it. Raises Divergence with a reproduction."""
    with paired(proxy, direct, name, mode, seed) as (branch_db, copy_db):
        runner = Runner(branch_db, copy_db, random.Random(seed + (2 if kid_ops else 1)))
        try:
            run_steps(proxy, runner, name, ops, kid_ops)
        finally:
            runner.pool.shutdown()


def run_steps(proxy: Any, runner: Runner, name: str, ops: int, kid_ops: int) -> None:
    with watched(runner):
        for _ in range(ops):
            runner.step()
    if not kid_ops:
        check_final(runner)
        return
    kid_name = name[:50] + "-kid"
    status, body = proxy.api("POST", "/branches", {"name": kid_name, "from": name})
    assert status == 201, body
    kid: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    try:
        runner.branch_db = kid[runner.branch_db.name]
        with watched(runner):
            for _ in range(kid_ops):
                runner.step()
        check_final(runner)
    finally:
        kid.close()
        proxy.api("DELETE", f"/branches/{kid_name}")


SENTINEL = "mb_sentinel"


@contextmanager
def watched(runner: Runner) -> Iterator[None]:
    """A change stream on each side's database across the operations: the events each
    delivers must agree. mongod leaves unspecified the order of a multi-document
    write's events across documents, so they are compared per document (the sequence of
    operation types, and the documents inserts carry) and per collection (its drops)."""
    streams = [db.watch() for db in (runner.branch_db, runner.copy_db)]
    try:
        yield
        # A last insert on each side marks the end of what its stream must deliver.
        runner.copy_db[SENTINEL].insert_one({"_id": len(runner.log)})
        runner.branch_db[SENTINEL].insert_one({"_id": len(runner.log)})
        mine, theirs = (per_document(stream) for stream in streams)
        if mine != theirs:
            bad = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            shown = "\n".join(f"  {k}: branch {mine.get(k)}  copy {theirs.get(k)}"
                              for k in bad[:10])
            raise Divergence(f"change stream events differ for {len(bad)} documents:\n{shown}")
    finally:
        for stream in streams:
            stream.close()


def per_document(stream: Any) -> dict[str, list[Any]]:
    """Each document's events until the sentinel's insert: (type, inserted document as
    BSON)."""
    out: dict[str, list[Any]] = {}
    for event in stream:
        coll = event["ns"]["coll"]
        if coll == SENTINEL:
            return out
        if coll.startswith("__mb_"):
            # The copy lives on main: the branch, a child of main, keeps the pre-images
            # of the copy's documents in its own overlay collections there.
            continue
        kind = event["operationType"]
        doc = event.get("fullDocument") if kind == "insert" else None
        if kind == "replace":
            # SecantusDB reports a pipeline update as a replacement where mongod (and a
            # branch) report an update; what either left is compared after every write.
            kind = "update"
        where = f"{coll} {key(event['documentKey']['_id'])}" if "documentKey" in event \
            else f"{coll} ({kind})"
        out.setdefault(where, []).append(
            (kind, None if doc is None else bytes(RawBSONDocument(bson.encode(doc)).raw)))
    raise Divergence("a change stream ended before the sentinel's insert")


def check_final(runner: Runner) -> None:
    mine, theirs = final_state(runner.branch_db), final_state(runner.copy_db)
    if mine == theirs:
        return
    parts = [f"{name}: {what}" for name, (a_docs, a_ix), (b_docs, b_ix) in zip(
                 COLLS, zip(*mine[:2], strict=True), zip(*theirs[:2], strict=True), strict=True)
             for what, differs in (("contents", a_docs != b_docs), ("indexes", a_ix != b_ix))
             if differs]
    if mine[2] != theirs[2]:
        parts.append(f"collections: branch {mine[2]}, copy {theirs[2]}")
    if mine[1] != theirs[1]:
        parts.append(f"index names: branch {mine[1]}, copy {theirs[1]}")
    raise Divergence("final state differs: " + "; ".join(parts))


MODES = {"wal": ("wal", False), "copy": ("copy", False), "kid": ("wal", True),
         "kidcopy": ("copy", True)}


def main(argv: list[str] | None = None) -> int:
    from tests.servers import ProxyProcess, Secantus

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--modes", default="wal copy kid",
                        help=f"space- or comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args(argv)
    modes = args.modes.replace(",", " ").split()
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}")
    upstream = Secantus().start()
    proxy = ProxyProcess(upstream.uri).start()
    direct: MongoClient = MongoClient(upstream.uri, directConnection=True)
    failed: list[str] = []
    try:
        for mode in modes:
            branch_mode, kid = MODES[mode]
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                start = time.monotonic()
                ops, kid_ops = (args.ops // 2, args.ops - args.ops // 2) if kid else (args.ops, 0)
                try:
                    run_seed(proxy, direct, f"d-{mode}-{seed}", branch_mode, seed, ops, kid_ops)
                except Divergence as exc:
                    failed.append(f"{mode}:{seed}")
                    print(f"{mode} seed {seed}: DIVERGED\n{exc}\n", flush=True)
                    continue
                print(f"{mode} seed {seed}: clean, {args.ops} operations, "
                      f"{time.monotonic() - start:.0f} s", flush=True)
    finally:
        direct.close()
        proxy.stop()
        upstream.stop()
    total = len(modes) * args.seeds
    print(f"{total - len(failed)} of {total} runs clean" +
          (f"; diverged: {' '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
