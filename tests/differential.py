"""Seeded random operations applied to a branch and to a plain copy of its base.

Every result must be equal. The generator never relies on unspecified order:
sorts end with _id, and arrays built by $lookup/$group are sorted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, OperationFailure

WORDS = ["apple", "Apple", "banana", "cherry", "Cherry", "date", "elder", "fig", "grape", "kiwi"]
CI = {"locale": "en", "strength": 2}


def make_doc(rng: random.Random, _id: int) -> dict[str, Any]:
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
    return doc


def rand_filter(rng: random.Random) -> dict[str, Any]:
    choices = [
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
        lambda: {"_id": {"$lt": rng.randint(0, 400)}},
        lambda: {"_id": rng.randint(0, 400)},
        lambda: {"$or": [{"a": {"$lt": 5}}, {"s": rng.choice(WORDS)}]},
        lambda: {"$and": [{"a": {"$type": "int"}}, {"b.c": {"$ne": rng.randint(0, 5)}}]},
        lambda: {"s": rng.choice(WORDS)},
        lambda: {},
    ]
    return rng.choice(choices)()


def rand_sort(rng: random.Random) -> list[tuple[str, int]]:
    keys = rng.sample(["a", "b.c", "s", "n", "tags"], rng.randint(0, 2))
    return [(k, rng.choice([1, -1])) for k in keys] + [("_id", rng.choice([1, -1]))]


def rand_projection(rng: random.Random) -> dict[str, Any] | None:
    return rng.choice([
        None, None, {"a": 1, "s": 1}, {"b": 0, "tags": 0}, {"b.c": 1}, {"_id": 0, "a": 1},
        {"sum": {"$add": [{"$ifNull": ["$b.c", 0]}, 1]}, "s": 1},
    ])


def rand_update(rng: random.Random) -> Any:
    return rng.choice([
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
    ])()


@dataclass
class Outcome:
    value: Any = None
    error: Any = None


@dataclass
class Runner:
    branch_db: Database[Any]
    copy_db: Database[Any]
    rng: random.Random
    next_id: int = 1000
    log: list[str] = field(default_factory=list)

    def both(self, label: str, fn: Any) -> None:
        got = capture(fn, self.branch_db)
        want = capture(fn, self.copy_db)
        self.log.append(label)
        assert got == want, (
            f"operation #{len(self.log)} {label} differs:\n branch: {got!r}\n copy:   {want!r}"
        )

    def step(self) -> None:
        rng = self.rng
        op = rng.choices(
            ["find", "count", "distinct", "agg", "insert", "insert_many", "update_one",
             "update_many", "replace", "upsert", "delete_one", "delete_many", "fam", "index",
             "estimated", "find_one_id", "other_write"],
            weights=[18, 6, 5, 10, 6, 3, 8, 5, 3, 4, 3, 2, 6, 1, 1, 6, 2],
        )[0]
        getattr(self, "op_" + op)()

    # -- reads --------------------------------------------------------------------
    def op_find(self) -> None:
        filt, sort, proj = rand_filter(self.rng), rand_sort(self.rng), rand_projection(self.rng)
        skip, limit = self.rng.choice([0, 0, 3]), self.rng.choice([0, 0, 5, 50])
        collation = CI if self.rng.random() < 0.2 else None
        batch = self.rng.choice([0, 0, 7])

        def fn(db: Database[Any]) -> Any:
            cur = db.items.find(filt, proj, sort=sort, skip=skip, limit=limit,
                                collation=collation, batch_size=batch)
            return list(cur)
        self.both(f"find {filt} sort={sort} proj={proj} skip={skip} limit={limit} "
                  f"coll={collation}", fn)

    def op_find_one_id(self) -> None:
        _id = self.rng.randint(0, self.next_id)
        self.both(f"find_one {_id}", lambda db: db.items.find_one({"_id": _id}))

    def op_count(self) -> None:
        filt = rand_filter(self.rng)
        limit = self.rng.choice([0, 10])
        self.both(f"count {filt}", lambda db: db.items.count_documents(filt, limit=limit)
                  if limit else db.items.count_documents(filt))

    def op_estimated(self) -> None:
        self.both("estimated", lambda db: db.items.estimated_document_count())

    def op_distinct(self) -> None:
        key = self.rng.choice(["a", "s", "tags", "b.c", "b.d", "n"])
        filt = rand_filter(self.rng)
        collation = CI if key == "s" and self.rng.random() < 0.3 else None
        # Under a case-insensitive collation, which spelling represents equal values is
        # unspecified (mongod keeps the first one it meets): compare case-folded.
        fold = (lambda v: v.casefold() if isinstance(v, str) else v) if collation else \
            (lambda v: v)
        self.both(f"distinct {key} {filt} collation={collation}", lambda db: sorted(
            repr(fold(v)) for v in db.items.distinct(key, filt, collation=collation)))

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
            pipeline += [{"$lookup": {"from": "other", "localField": "b.c",
                                      "foreignField": "k", "as": "j"}},
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
        self.both(f"aggregate {pipeline}", lambda db: list(db.items.aggregate(pipeline)))

    # -- writes -------------------------------------------------------------------
    def _new_doc(self) -> dict[str, Any]:
        self.next_id += 1
        return make_doc(self.rng, self.next_id)

    def op_insert(self) -> None:
        if self.rng.random() < 0.2:
            doc = make_doc(self.rng, self.rng.randint(0, 400))  # likely a duplicate
        else:
            doc = self._new_doc()
        self.both(f"insert {doc}", lambda db: db.items.insert_one(dict(doc)).inserted_id)

    def op_insert_many(self) -> None:
        docs = [self._new_doc() for _ in range(self.rng.randint(1, 5))]
        if self.rng.random() < 0.5:
            docs.insert(self.rng.randint(0, len(docs)), make_doc(self.rng,
                                                                 self.rng.randint(0, 400)))
        ordered = self.rng.random() < 0.5
        self.both(f"insert_many ordered={ordered} {[d['_id'] for d in docs]}",
                  lambda db: db.items.insert_many([dict(d) for d in docs],
                                                  ordered=ordered).inserted_ids)

    def op_update_one(self) -> None:
        filt = rand_filter(self.rng)
        upd = rand_update(self.rng)
        self.both(f"update_one {filt} {upd}", lambda db: raw(db.items.update_one(
            {"$and": [filt, {"_id": {"$gte": 0}}]}, upd, sort={"_id": 1})))

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
        self.both(f"update_many {filt} {upd}",
                  lambda db: raw(db.items.update_many(filt, upd)))

    def op_replace(self) -> None:
        _id = self.rng.randint(0, 400)
        doc = make_doc(self.rng, _id)
        del doc["_id"]
        self.both(f"replace {_id}", lambda db: raw(db.items.replace_one({"_id": _id}, doc)))

    def op_upsert(self) -> None:
        _id = self.rng.randint(0, self.next_id + 50)
        filt = {"_id": _id} if self.rng.random() < 0.7 else {"_id": _id, "a": -1}
        self.both(f"upsert {filt}", lambda db: raw(db.items.update_one(
            filt, {"$set": {"up": True}, "$inc": {"cnt": 1}}, upsert=True)))

    def op_delete_one(self) -> None:
        # One document at most, so natural order (unspecified) never decides which.
        _id = self.rng.randint(0, self.next_id)
        filt = {"_id": _id} if self.rng.random() < 0.6 else {"_id": _id, "a": {"$exists": True}}
        self.both(f"delete_one {filt}", lambda db: raw(db.items.delete_one(filt)))

    def op_delete_many(self) -> None:
        filt = {"$and": [rand_filter(self.rng), {"_id": {"$mod": [7, self.rng.randint(0, 6)]}}]}
        self.both(f"delete_many {filt}", lambda db: raw(db.items.delete_many(filt)))

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
            filt = {"$and": [filt, {"_id": rng.randint(0, self.next_id + 50)}]}

        def fn(db: Database[Any]) -> Any:
            c: Collection[Any] = db.items
            ret = ReturnDocument.AFTER if after else ReturnDocument.BEFORE
            if kind == "update":
                return c.find_one_and_update(filt, {"$inc": {"fam": 1}}, projection=proj,
                                             sort=sort, return_document=ret, upsert=upsert)
            if kind == "replace":
                return c.find_one_and_replace(filt, {"r": 1}, projection=proj, sort=sort,
                                              return_document=ret, upsert=upsert)
            return c.find_one_and_delete(filt, projection=proj, sort=sort)
        self.both(f"findAndModify {kind} {filt} sort={sort} after={after} upsert={upsert}", fn)

    def op_other_write(self) -> None:
        """Change the collection that $lookup and $unionWith read, so they see a branch view."""
        rng = self.rng
        choice = rng.choice(["insert", "update", "delete"])
        if choice == "insert":
            self.next_id += 1
            doc = {"_id": self.next_id, "k": rng.randint(0, 5), "label": "new"}
            self.both(f"other insert {doc}", lambda db: db.other.insert_one(dict(doc)).inserted_id)
        elif choice == "update":
            k = rng.randint(0, 5)
            self.both(f"other update k={k}", lambda db: raw(db.other.update_many(
                {"k": k}, {"$set": {"k": (k + 1) % 6}})))
        else:
            _id = rng.randint(0, 30)
            self.both(f"other delete {_id}", lambda db: raw(db.other.delete_one({"_id": _id})))

    def op_index(self) -> None:
        key = self.rng.choice(["a", "s", "b.c"])

        def fn(db: Database[Any]) -> Any:
            name = db.items.create_index([(key, 1)])
            return sorted((ix["name"], dict(ix["key"])) for ix in db.items.list_indexes()), name
        self.both(f"create_index {key}", fn)


def raw(result: Any) -> Any:
    doc = dict(result.raw_result)
    for k in ("$clusterTime", "operationTime", "electionId", "opTime"):
        doc.pop(k, None)
    return doc


def capture(fn: Any, db: Database[Any]) -> Outcome:
    try:
        return Outcome(value=fn(db))
    except BulkWriteError as exc:
        details = exc.details
        return Outcome(error=("bulk", details["nInserted"],
                              [(e["index"], e["code"]) for e in details["writeErrors"]]))
    except OperationFailure as exc:
        return Outcome(error=("op", exc.code))
