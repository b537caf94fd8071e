"""The write-ahead log: one physical entry per changed document.

Entries live in the metadata database as {_id: lsn, b: branch id, ns, id,
op: put | delete | keep | drop | create | rebase, pre, post, ts, client}. LSNs come from an atomic
counter; a batch reserves its range in one round trip.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import bson
import zstandard
from bson.binary import Binary
from bson.int64 import Int64
from bson.timestamp import Timestamp
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument
from pymongo.errors import BulkWriteError, ConnectionFailure, DocumentTooLarge, OperationFailure

from proxy.branching.runner import SESSION
from proxy.wire.bsonutil import CODEC

# While a transaction's statement runs (txn.py): the first LSNs of its appends, which
# stay in flight until it ends (settled() stops below them).
PINNED: ContextVar[list[int] | None] = ContextVar("mongobranch_pinned", default=None)

# The largest WAL entry stored as it is (mongod's BSON limit, as pymongo checks it).
MAX_ENTRY = 16 * 1024 * 1024
TOO_LARGE = 10334
# LSNs taken from the shared counter at a time (one metadata round trip per block).
LSN_BLOCK = 256
# The first LSN window Wal.newest looks for the newest entries in.
WINDOW = 128

PUT = "put"
DELETE = "delete"
DROP = "drop"
CREATE = "create"
REBASE = "rebase"
# A parent's image copied up into a child before the parent changed it (snapshot.py):
# part of what the child shows, never a change the child made.
KEEP = "keep"
# Marks a collection the branch holds whole, reading its overlay alone from then on: one
# a child copied whole before its parent changed the collection itself (snapshot.freeze),
# a capped one it took whole, one created on its parent after the fork (pinned absent),
# or one its parent did not show when the branch first wrote to it (snapshot.first_write).
OWN = "own"
# Marks an `own` entry logged while the branch's own drop or create stood
# (snapshot.latent): the branch replaced the collection all the same.
LATENT = "latent"
# Entries no reset voids: what the branch holds of its parent as the parent was (a kept
# image; a collection held whole) is what it showed before the entry too.
UNVOIDED = (KEEP, OWN)
# Entries whose post-image is a document the overlay holds.
HOLDS = (PUT, KEEP)
# Entries that replace a collection on the branch (the parent no longer shows through).
RESETS = (DROP, CREATE)
# A branch's own change of a collection's indexes or options, named for its command: in
# its log so that a reset can name it. What it left is the state's (NsState.catalog).
CATALOG = ("createIndexes", "dropIndexes", "collMod")
# Document changes a branch (or main) made itself.
WRITES = (PUT, DELETE)
# Entries about one document: what a branch shows of it folds from these alone.
DOCUMENT = (*WRITES, KEEP)
# Entries replay starts after (the last one): a rebase restarts the overlay of a
# collection whose parent still shows through (a copy branch migrated to WAL).
STARTS = (DROP, CREATE, REBASE)


_ZC = zstandard.ZstdCompressor(level=9)
_ZD = zstandard.ZstdDecompressor()


def packed(image: dict[str, Any]) -> Binary | None:
    """A zstd-compressed image, or None when compression would not save space."""
    raw = bson.encode(image, codec_options=CODEC)
    small = _ZC.compress(raw)
    return Binary(small) if len(small) < len(raw) else None


# Images an entry cannot hold even compressed (a document of data zstd does not shrink:
# one within about 1 KiB of 16 MiB, or an update's pre- and post-image of one over
# 8 MiB) are stored out of line: their BSON in chunks of `walimages`, which the entry
# names in order (`prex`/`postx`). A chunk's id is its entry's LSN, image and index, so
# storing it again (an insert retried) finds it there.
IMAGES = "walimages"
CHUNK_BYTES = 8 * 1024 * 1024
# Out-of-line images loaded at a time (`Wal.parts`): each is up to 16 MiB.
PART_IMAGES = 4


def chunk_ids(lsn: int, which: str, size: int) -> list[str]:
    return [f"{lsn}.{which}.{i}" for i in range(max(1, -(-size // CHUNK_BYTES)))]


class Unloaded(RuntimeError):
    """An out-of-line image read before `Wal.load` brought it in: a reader's bug."""


def image(entry: dict[str, Any], which: str) -> dict[str, Any] | None:
    """An entry's pre- or post-image, whether stored plain, compressed by gc, or out of
    line (once `Wal.load` brought it in). A `keep` entry holds its image once, as its
    post-image: it is its pre-image too."""
    if entry.get(which) is not None:
        return entry[which]  # type: ignore[no-any-return]
    if entry.get(which + "x") is not None:
        raise Unloaded(f"the {which}-image of entry {entry.get('_id')} is out of line")
    blob = entry.get(which + "z")
    if blob is None:
        if which == "pre" and entry.get("op") == KEEP:
            return image(entry, "post")
        return None
    return bson.decode(_ZD.decompress(bytes(blob)), CODEC)


def first_pre() -> dict[str, Any]:
    """`$group` accumulators of the first entry's pre-image, as `pre`, `prez` and `prex`
    (read them with `image`, after `Wal.load`): a `keep` entry's is its post-image."""
    keep = {"$eq": ["$op", KEEP]}
    return {"pre": {"$first": {"$cond": [keep, "$post", "$pre"]}},
            "prez": {"$first": {"$cond": [keep, "$postz", "$prez"]}},
            "prex": {"$first": {"$cond": [keep, "$postx", "$prex"]}}}


# The fields the WAL's indexes are built on.
_INDEXED = ("b", "ns", "id", "_id")


def matching(filt: dict[str, Any]) -> list[dict[str, Any]]:
    """A WAL filter as $match stages: first the part an index answers, then the rest.

    SecantusDB uses an index only when every predicate of a filter is on that index's
    fields, and never for an `$in` beside a range: `{b, ns, op}` scans the whole WAL
    where `{b, ns}` walks one branch's entries (measured on 100,000 entries: 3.0 s
    against 0.04 s). mongod coalesces consecutive $match stages into one plan, so the
    split costs it nothing."""
    head = {k: v for k, v in filt.items() if k in _INDEXED}
    rest = {k: v for k, v in filt.items() if k not in _INDEXED}
    if "_id" in head and isinstance(head.get("id"), dict):
        rest["_id"] = head.pop("_id")
    return [{"$match": head}, *([{"$match": rest}] if rest else [])]


@dataclass
class Change:
    ns: str
    id: Any
    op: str
    pre: dict[str, Any] | None
    post: dict[str, Any] | None
    # Fields stored with the entry as they are (a captured change's cluster time and
    # change-stream token, its time on the upstream).
    extra: dict[str, Any] | None = None


def entry(lsn: int, bid: str, change: Change, now: dt.datetime, second: int,
          client: dict[str, Any], txn: dict[str, Any] | None) -> dict[str, Any]:
    """A change's WAL entry as stored (a retryable write's last entry also gets its
    reply)."""
    doc: dict[str, Any] = {"_id": Int64(lsn), "b": bid, "ns": change.ns, "id": change.id,
                           "op": change.op, "ts": now, "client": client,
                           "ct": Timestamp(second, lsn & 0xFFFFFFFF)}
    if change.pre is not None:
        doc["pre"] = change.pre
    if change.post is not None:
        doc["post"] = change.post
    if change.extra:
        doc.update(change.extra)
    if txn is not None:
        doc["txn"] = txn
    return doc


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# Ids in one `$in` (SecantusDB's `$in` costs grow with the square of the list).
IN_CHUNK = 100


def _size(doc: dict[str, Any]) -> int:
    return len(bson.encode(doc, codec_options=CODEC))


def _out_of_line(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Move an entry's images out of line, the largest first, until it fits; the
    chunks to store before it."""
    chunks: list[dict[str, Any]] = []
    lsn = int(doc["_id"])
    sides = [w for w in ("pre", "post") if doc.get(w) is not None or doc.get(w + "z") is not None]
    for which in sorted(sides, key=lambda w: -_size({"v": doc.get(w) or doc.get(w + "z")})):
        if _size(doc) <= MAX_ENTRY:
            break
        img = image(doc, which)
        assert img is not None
        made = _chunks(bson.encode(img, codec_options=CODEC), doc["b"], lsn, which)
        chunks.extend(made)
        doc.pop(which, None)
        doc.pop(which + "z", None)
        doc[which + "x"] = [chunk["_id"] for chunk in made]
    return chunks


def _chunks(raw: bytes, bid: str, lsn: int, which: str) -> list[dict[str, Any]]:
    """An image's BSON in chunks, as stored for the entry at `lsn`."""
    now = _now()
    return [{"_id": cid, "b": bid, "e": Int64(lsn), "ts": now,
             "d": Binary(raw[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES])}
            for i, cid in enumerate(chunk_ids(lsn, which, len(raw)))]


def _settle(done: asyncio.Future[None], exc: Exception | None = None) -> None:
    """An append's outcome, unless its writer stopped waiting (cancelled)."""
    if done.done():
        return
    if exc is None:
        done.set_result(None)
    else:
        done.set_exception(exc)


# Appends of at most this many entries go in a plain `insert` command (_insert_plain);
# larger ones (a bulk write's) through insert_many, which splits them in batches.
PLAIN_INSERT = 100
# The errors on which the driver retries a retryable write (pymongo's list): a plain
# insert is sent again on them (_insert_plain).
_RETRYABLE = frozenset({6, 7, 89, 91, 134, 189, 262, 9001, 10058, 10107, 11600, 11602,
                        13435, 13436})


class Wal:
    def __init__(self, client: AsyncMongoClient[dict[str, Any]], db: str):
        self.db = client[db]
        self.entries = self.db["wal"]
        self.images = self.db[IMAGES]
        self.counters = self.db["counters"]
        self._reserving = asyncio.Lock()
        self._next = 0
        self._end = 0
        self._issued: int | None = None
        # First LSNs of the appends under way: an entry above the lowest of them may be
        # stored before a lower one (writes on different documents of a branch run side
        # by side), so readers that follow the log stop below it (settled()).
        self._inflight: set[int] = set()
        # The newest LSN appended per branch, and an event replaced at every append:
        # change streams (commands/changestream.py) sleep on it instead of polling.
        self.last: dict[str, int] = {}
        self._appended = asyncio.Event()
        # Group commit: appends waiting to be stored, and the lock whose holder stores
        # every one waiting in one insert (_store).
        self._pending: list[tuple[list[dict[str, Any]], asyncio.Future[None]]] = []
        self._storing = asyncio.Lock()

    async def init(self) -> None:
        await self.entries.create_index([("b", ASCENDING), ("ns", ASCENDING), ("_id", ASCENDING)])
        await self.entries.create_index([("b", ASCENDING), ("_id", DESCENDING)])
        await self.entries.create_index([("b", ASCENDING), ("ns", ASCENDING), ("id", ASCENDING),
                                         ("_id", ASCENDING)])
        await self.images.create_index([("b", ASCENDING), ("ts", ASCENDING)])

    async def reserve(self, n: int) -> int:
        """The first of n consecutive fresh LSNs. The counter is advanced a block at a
        time, so most appends cost no round trip for it; unused numbers of a block are
        gaps, which LSNs allow."""
        async with self._reserving:
            if self._next + n > self._end:
                size = max(n, LSN_BLOCK)
                doc = await self.counters.find_one_and_update(
                    {"_id": "lsn"}, {"$inc": {"v": Int64(size)}}, upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
                assert doc is not None
                self._end = int(doc["v"]) + 1
                self._next = self._end - size
            first = self._next
            self._next += n
            self._issued = self._next - 1
            return first

    async def current(self) -> int:
        """The newest LSN issued: every entry written so far is at or below it."""
        if self._issued is not None:
            return self._issued
        doc = await self.counters.find_one({"_id": "lsn"})
        return int(doc["v"]) if doc else 0

    def settled(self) -> int | None:
        """The LSN every entry at or below which is stored (None: nothing appended since
        start; current() then is)."""
        if self._inflight:
            return min(self._inflight) - 1
        return self._issued

    def release(self, firsts: list[int]) -> None:
        """A transaction's appends (`PINNED`) are stored or gone: it committed or aborted."""
        if not firsts:
            return
        self._inflight.difference_update(firsts)
        self._appended.set()
        self._appended = asyncio.Event()

    def tick(self) -> asyncio.Event:
        """Set at the next append's end: take it before looking at the log, then wait."""
        return self._appended

    async def append(self, bid: str, changes: list[Change], client: dict[str, Any],
                     txn: dict[str, Any] | None = None,
                     reply: dict[str, Any] | None = None) -> int:
        """Append changes in order; returns the last LSN (0 when there was nothing).

        A retryable write's reply rides on its last entry, so a retry after a restart
        is answered from the log instead of being applied again."""
        return await self.append_groups([(bid, changes)], client, txn, reply)

    async def append_groups(self, groups: list[tuple[str, list[Change]]],
                            client: dict[str, Any], txn: dict[str, Any] | None = None,
                            reply: dict[str, Any] | None = None) -> int:
        """Several branches' changes in one insert, in order (the capture logs the
        children's copy-ups and main's change together: one round trip, not one per
        child)."""
        total = sum(len(changes) for _, changes in groups)
        if not total:
            return 0
        first = await self.reserve(total)
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        self._inflight.add(first)
        # In a transaction the entries are stored once it commits: the append stays in
        # flight until then (`release`), so that readers following the log wait for it.
        pinned = PINNED.get() if SESSION.get() is not None else None
        try:
            return await self._append(first, total, now, groups, client, txn, reply)
        finally:
            if pinned is not None:
                pinned.append(first)
            else:
                self._inflight.discard(first)
            for bid, changes in groups:
                if changes:
                    self.last[bid] = max(self.last.get(bid, 0), first + total - 1)
            self._appended.set()
            self._appended = asyncio.Event()

    async def _append(self, first: int, total: int, now: dt.datetime,
                      groups: list[tuple[str, list[Change]]], client: dict[str, Any],
                      txn: dict[str, Any] | None, reply: dict[str, Any] | None) -> int:
        # A cluster time of the entry's own (a captured change brings the upstream's in
        # its extra): the second it was logged, then its LSN, so that times order as
        # LSNs do; a branch's change stream reports it as the event's clusterTime.
        second = int(now.replace(tzinfo=dt.UTC).timestamp())
        docs: list[dict[str, Any]] = []
        for bid, changes in groups:
            for change in changes:
                docs.append(entry(first + len(docs), bid, change, now, second, client, txn))
        if txn is not None and reply is not None:
            docs[-1]["reply"] = reply
        if SESSION.get() is not None:
            await self._insert(docs)
        else:
            await self._store(docs)
        return first + total - 1

    async def _store(self, docs: list[dict[str, Any]]) -> None:
        """Group commit: the entries of appends that wait while an insert is under way
        are stored together by the next, in one insert instead of one each (concurrent
        writers on branches cost one WAL round trip between them). Each append returns
        once its own entries are stored, or raises what storing them raised."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((docs, done))
        async with self._storing:
            if not done.done():
                group, self._pending = self._pending, []
                try:
                    await self._commit(group)
                except BaseException:
                    # Cut off (cancelled, or the connection lost): the others' entries
                    # are stored by the next holder (any stored already are found again
                    # as duplicates, as expected); this one fails.
                    done.cancel()
                    self._pending[:0] = [(d, f) for d, f in group if not f.done()]
                    raise
        await done

    async def _commit(self, group: list[tuple[list[dict[str, Any]], asyncio.Future[None]]]
                      ) -> None:
        """One insert of the waiting appends' entries; when it fails, each append's
        alone, so that one append's failure (its entry too large, say) is its own."""
        if len(group) > 1:
            try:
                await self._insert([doc for docs, _ in group for doc in docs])
            except (DocumentTooLarge, BulkWriteError):
                pass
            else:
                for _, done in group:
                    _settle(done)
                return
        for docs, done in group:
            try:
                await self._insert(docs, again=len(group) > 1)
            except Exception as exc:
                _settle(done, exc)
            else:
                _settle(done)

    async def _insert(self, docs: list[dict[str, Any]], *, again: bool = False) -> None:
        """Insert entries in order. again: some may be stored already (a group's insert
        failed part-way), so duplicates of them are expected. In a transaction, entries
        over the limit are fitted first: a write error there would abort it."""
        try:
            if again or (SESSION.get() is not None
                         and any(_size(doc) > MAX_ENTRY for doc in docs)):
                await self._insert_fitted(docs)
            elif SESSION.get() is None and len(docs) <= PLAIN_INSERT:
                try:
                    await self._insert_plain(docs)
                except DocumentTooLarge:
                    # pymongo's size check of a whole command, before it is sent: what
                    # does not fit goes as insert_many sends it (in batches, the
                    # upstream judging each entry), as every append did before.
                    await self.entries.insert_many(docs, ordered=True)
            else:
                await self.entries.insert_many(docs, ordered=True, session=SESSION.get())
        except DocumentTooLarge:  # pymongo's own size check
            await self._insert_fitted(docs)
        except BulkWriteError as exc:  # the server's (BSONObjectTooLarge)
            if not any(e.get("code") == TOO_LARGE for e in exc.details.get("writeErrors", [])):
                raise
            await self._insert_fitted(docs)

    async def _insert_plain(self, docs: list[dict[str, Any]]) -> None:
        """Insert entries in order with an `insert` command that is no retryable write.
        SecantusDB keeps the reply of each retryable write (10,000 at most) and scans
        them all at every one: once full, each costs it tens of milliseconds, one per
        append (a branch's `create`, each write of a branch). The retryable write bought
        nothing here: an entry's `_id` is its LSN, which no other write stores, so an
        insert that reached the upstream twice stores the entry once. A failure the
        driver would retry (the connection lost, a primary stepped down) is retried as
        it would be, as an insert where entries stored already are expected duplicates
        (`_insert_all`): each entry stored exactly once, or an error raised."""
        cmd: dict[str, Any] = {"insert": self.entries.name, "documents": docs, "ordered": True}
        concern = self.entries.write_concern
        if not concern.is_server_default:
            cmd["writeConcern"] = concern.document
        try:
            reply = await self.db.command(cmd, codec_options=self.entries.codec_options)
        except ConnectionFailure:
            await self._insert_all(self.entries, docs)
            return
        except OperationFailure as exc:
            if exc.code not in _RETRYABLE:
                raise
            await self._insert_all(self.entries, docs)
            return
        if reply.get("writeErrors") or reply.get("writeConcernError"):
            # As insert_many raises them, for _insert's handling and its callers'.
            raise BulkWriteError({
                "writeErrors": list(reply.get("writeErrors") or []),
                "writeConcernErrors": ([reply["writeConcernError"]]
                                       if reply.get("writeConcernError") else []),
                "nInserted": reply.get("n", 0), "nUpserted": 0, "nMatched": 0,
                "nModified": 0, "nRemoved": 0, "upserted": []})

    async def _insert_fitted(self, docs: list[dict[str, Any]]) -> None:
        """Entries over the BSON limit: a document near 16 MiB, or an update's pre- and
        post-image of one over 8 MiB, do not fit one entry. Their images are stored
        zstd-compressed (`prez`/`postz`, as gc writes them) and, where that is not
        enough, out of line (`_out_of_line`), and the batch is inserted again: entries
        the first attempt already stored are the same documents under the same LSN, so
        their duplicate-key errors are what is expected."""
        chunks: list[dict[str, Any]] = []
        for doc in docs:
            if _size(doc) <= MAX_ENTRY:
                continue
            for which in ("pre", "post"):
                if doc.get(which) is not None and (z := packed(doc[which])) is not None:
                    doc[which + "z"] = z
                    del doc[which]
            if _size(doc) > MAX_ENTRY:
                chunks.extend(_out_of_line(doc))
        await self._insert_all(self.images, chunks)
        await self._insert_all(self.entries, docs)

    @staticmethod
    async def _insert_all(coll: Any, docs: list[dict[str, Any]]) -> None:
        """Insert documents some of which may be stored already (duplicates expected)."""
        if not docs:
            return
        try:
            await coll.insert_many(docs, ordered=False, session=SESSION.get())
        except BulkWriteError as exc:
            if any(err.get("code") != 11000 for err in exc.details.get("writeErrors", [])):
                raise

    async def load(self, holders: list[dict[str, Any]]) -> int:
        """Bring the out-of-line images of these entries (or `$group` results holding
        their image fields) in, as their plain `pre`/`post`, in one query; how many
        images it brought. Each is up to 16 MiB: callers load a few at a time
        (`parts`)."""
        wanted: list[tuple[dict[str, Any], str, list[str]]] = [
            (holder, which, list(holder[which + "x"])) for holder in holders
            for which in ("pre", "post")
            if holder.get(which) is None and holder.get(which + "x") is not None]
        if not wanted:
            return 0
        ids = [cid for _, _, names in wanted for cid in names]
        found: dict[str, bytes] = {}
        async for stored in self.images.find({"_id": {"$in": ids}}, session=SESSION.get()):
            found[stored["_id"]] = bytes(stored["d"])
        for holder, which, names in wanted:
            missing = [cid for cid in names if cid not in found]
            if missing:
                raise Unloaded(f"WAL image chunks {missing} are missing")
            holder[which] = bson.decode(b"".join(found[cid] for cid in names), CODEC)
        return len(wanted)

    async def parts(self, batch: list[dict[str, Any]],
                    holders: Callable[[dict[str, Any]], list[dict[str, Any]]] = lambda d: [d],
                    ) -> AsyncIterator[list[dict[str, Any]]]:
        """A batch of entries in parts whose out-of-line images are loaded, a few such
        images at a time, so that a batch of them never sits in memory whole (most
        batches have none, and come as one part)."""
        part: list[dict[str, Any]] = []
        pending: list[dict[str, Any]] = []
        for doc in batch:
            heavy = [h for h in holders(doc) for w in ("pre", "post")
                     if h.get(w) is None and h.get(w + "x") is not None]
            if heavy and len(pending) + len(heavy) > PART_IMAGES and part:
                await self.load(pending)
                yield part
                part, pending = [], []
            part.append(doc)
            pending.extend(holders(doc) if heavy else [])
        if part:
            await self.load(pending)
            yield part

    async def store_image(self, img: dict[str, Any], bid: str, lsn: int, which: str
                          ) -> list[str]:
        """An image stored out of line for an entry already stored (gc's fold); the
        chunks' ids, replacing any the entry had under them."""
        chunks = _chunks(bson.encode(img, codec_options=CODEC), bid, lsn, which)
        for chunk in chunks:
            await self.images.replace_one({"_id": chunk["_id"]}, chunk, upsert=True)
        return [chunk["_id"] for chunk in chunks]

    async def copy_images(self, ids: list[str], bid: str, lsn: int, which: str) -> list[str]:
        """An out-of-line image stored again for another entry (gc gives a folded entry
        its first pre-image), as `store_image` stores one."""
        holder: dict[str, Any] = {which + "x": ids}
        await self.load([holder])
        return await self.store_image(holder[which], bid, lsn, which)

    async def sweep_images(self, bid: str, before: dt.datetime) -> int:
        """Delete a branch's out-of-line image chunks stored before a time that no entry
        names: those of entries gc folded away or gave another pre-image, and those of an
        append cut off after its chunks were stored and before its entries were (only old
        ones: an append under way stores its entries right after its chunks)."""
        owners: dict[str, int] = {}
        async for chunk in self.images.find({"b": bid, "ts": {"$lt": before}}, {"e": 1}):
            owners[chunk["_id"]] = int(chunk["e"])
        lsns = sorted(set(owners.values()))
        named: set[str] = set()
        for start in range(0, len(lsns), IN_CHUNK):
            async for entry in self.entries.find(
                    {"_id": {"$in": [Int64(n) for n in lsns[start:start + IN_CHUNK]]}},
                    {"prex": 1, "postx": 1}):
                named.update(entry.get("prex") or [])
                named.update(entry.get("postx") or [])
        gone = [cid for cid in owners if cid not in named]
        for start in range(0, len(gone), IN_CHUNK):
            await self.images.delete_many({"_id": {"$in": gone[start:start + IN_CHUNK]}})
        return len(gone)

    async def first(self, filt: dict[str, Any], *, newest: bool = False
                    ) -> dict[str, Any] | None:
        """The oldest (newest) entry matching a filter, in one query: the filters it
        takes match few entries (see `newest` for the log's newest)."""
        async for doc in self._sorted(filt, 1, None, not newest):
            return doc
        return None

    async def newest(self, filt: dict[str, Any], limit: int,
                     fields: dict[str, Any] | None = None) -> AsyncIterator[dict[str, Any]]:
        """Up to `limit` entries matching a filter, newest first, streamed.

        SecantusDB reads every entry a filter matches before it sorts and limits them,
        even along an index in that order: the newest entry of main's log took 43 s
        once it held 189,000 entries (late in a full test run). So the newest are looked
        for in LSN windows going back from the newest reserved, each eight times the last
        (an index range, which it does bound): the cost follows how far back they are,
        not the size of the log. A filter without a branch (`b`: a window
        then costs every entry in it, and one that matches nothing reads the whole log
        window by window, slower than one pass), or one with its own `_id` condition
        other than a bound below, reads in one query."""
        bound = filt.get("_id", {})
        if "b" not in filt or not isinstance(bound, dict) or set(bound) - {"$lt", "$lte"}:
            async for doc in self._sorted(filt, limit, fields, False):
                yield doc
            return
        # The counter, not this process's own newest: workers share the log, each
        # issuing LSNs from blocks of its own.
        counter = await self.counters.find_one({"_id": "lsn"})
        hi = int(counter["v"]) if counter else 0
        if "$lt" in bound:
            hi = min(hi, int(bound["$lt"]) - 1)
        if "$lte" in bound:
            hi = min(hi, int(bound["$lte"]))
        width = WINDOW
        while limit > 0 and hi > 0:
            lo = max(hi - width, 0)
            window = {**filt, "_id": {"$gt": lo, "$lte": hi}}
            async for doc in self._sorted(window, limit, fields, False):
                limit -= 1
                yield doc
            hi, width = lo, width * 8

    async def _sorted(self, filt: dict[str, Any], limit: int,
                      fields: dict[str, Any] | None, oldest: bool
                      ) -> AsyncIterator[dict[str, Any]]:
        pipeline = [*matching(filt), {"$sort": {"_id": 1 if oldest else -1}},
                    {"$limit": limit}, *([{"$project": fields}] if fields else [])]
        async for doc in await self.entries.aggregate(pipeline):
            yield doc

    async def count(self, filt: dict[str, Any]) -> int:
        async for doc in await self.entries.aggregate([*matching(filt), {"$count": "n"}]):
            return int(doc["n"])
        return 0

    async def recent_replies(self, limit: int) -> list[dict[str, Any]]:
        """The newest logged retryable-write replies, newest first."""
        cursor = self.entries.find({"reply": {"$exists": True}}, {"txn": 1, "reply": 1})
        return [doc async for doc in cursor.sort("_id", DESCENDING).limit(limit)]

    async def delete_branch(self, bid: str) -> None:
        await self.entries.delete_many({"b": bid})
        await self.images.delete_many({"b": bid})
