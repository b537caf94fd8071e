"""Change streams on a branch port: `watch()` on a collection, a database or the whole
branch, answered from the branch's WAL (docs/ARCHITECTURE.md, "Change streams").

The upstream evaluates, the proxy rewrites: each batch is one aggregation over the WAL
collection that selects the branch's visible entries after the stream's point, turns
each into mongod's change event (resume token, operationType, images, updateDescription
computed from the images by the server) and then runs the user's own stages. The proxy
keeps only the point, the LSN the stream has read up to, which its resume tokens carry.

A stream reads the log in windows of at most WINDOW entries, and never past the LSN
below which every append has landed (`Wal.settled`): writes on different documents of
a branch append side by side, and an entry read above one still under way would let
that one be skipped. A getMore with nothing to read sleeps on the WAL's append event
until the branch appends or maxTimeMS (the driver's maxAwaitTimeMS) runs out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from typing import Any

import bson
from bson.int64 import Int64
from bson.timestamp import Timestamp
from pymongo.asynchronous.command_cursor import AsyncCommandCursor
from pymongo.errors import OperationFailure

from proxy.branching import gc, masking
from proxy.branching.commands import imageevents
from proxy.branching.commands.base import Request
from proxy.branching.copymode import MIGRATION
from proxy.branching.cursormerge import DEFAULT_FIRST_BATCH, MAX_REPLY_BYTES
from proxy.branching.errors import CommandError, not_supported
from proxy.branching.model import Branch
from proxy.branching.runner import Runner, error_from
from proxy.branching.stages import documents_stage
from proxy.branching.wal import DELETE, DROP, PUT, matching
from proxy.wire.codes import Code

# WAL entries one window (one aggregation's range) spans at most.
WINDOW = 1000
# Events the upstream hands back per batch of a window's cursor.
EVENT_BATCH = 100
# mongod's await time of a tailable awaitData getMore without maxTimeMS.
DEFAULT_AWAIT_MS = 1000
# Resume tokens: "B1", the LSN in 20 digits, then which event of the entry: "00" its
# own, "02" the dropDatabase after the last drop of one, "01" the invalidate.
_TOKEN = re.compile(r"^B1(\d{20})(0[0-2])$")
_ZEROS = "0" * 20

FULL_DOCUMENT = ("default", "updateLookup", "whenAvailable", "required")
BEFORE_CHANGE = ("off", "whenAvailable", "required")
_SPEC_FIELDS = frozenset({"fullDocument", "fullDocumentBeforeChange", "resumeAfter",
                          "startAfter", "startAtOperationTime", "allChangesForCluster",
                          "showExpandedEvents"})
# The stages mongod allows after $changeStream; they see the event only (never the WAL
# entry it came from, nor another collection of the metadata database).
_USER_STAGES = frozenset({"$match", "$project", "$addFields", "$set", "$unset",
                          "$replaceRoot", "$replaceWith", "$redact"})
_DOC_KINDS = ["insert", "update", "replace", "delete"]
# A branch's own changes that make events (keep, own, create and rebase entries do not).
_EVENT_OPS = [PUT, DELETE, DROP]


def token(lsn: int, invalidate: bool = False) -> dict[str, str]:
    """A resume token: opaque to drivers, stable across restarts (the LSN is the WAL's)."""
    return {"_data": f"B1{lsn:020d}{'01' if invalidate else '00'}"}


def _parse_token(value: Any, option: str) -> tuple[int, bool]:
    data = value.get("_data") if isinstance(value, dict) else None
    found = _TOKEN.match(data) if isinstance(data, str) else None
    if found is None:
        raise CommandError(Code.BAD_VALUE, f"$changeStream {option}: {value!r} is not a "
                                           "resume token of this branch's change streams")
    return int(found.group(1)), found.group(2) == "01"


def wanted(cmd: dict[str, Any]) -> bool:
    """Whether an aggregate opens a change stream ($changeStream first)."""
    pipeline = cmd.get("pipeline")
    return isinstance(pipeline, list) and bool(pipeline) and isinstance(pipeline[0], dict) \
        and "$changeStream" in pipeline[0]


def held(req: Request) -> bool:
    """Whether a getMore continues a change stream: it reads only the WAL, so it neither
    waits for nor holds back the writes of the branches it reads through."""
    return isinstance(req.engine.cursors.get(req.cmd.get("getMore")), Stream)


# -- the events, as server expressions ------------------------------------------------------

def _db_of(field: str) -> dict[str, Any]:
    return {"$substrBytes": [field, 0, {"$indexOfBytes": [field, "."]}]}


def _coll_of(field: str) -> dict[str, Any]:
    return {"$substrBytes": [field, {"$add": [{"$indexOfBytes": [field, "."]}, 1]}, -1]}


def _missing(field: str) -> dict[str, Any]:
    return {"$eq": [{"$type": field}, "missing"]}


def _is(kind: str | list[str]) -> dict[str, Any]:
    if isinstance(kind, list):
        return {"$in": ["$$kind", kind]}
    return {"$eq": ["$$kind", kind]}


# The operationType of an entry. A put without a pre-image created its document (an
# insert, an upsert); a put marked `rep` came from a replacement document; others are
# updates. A drop marked `rename` is the source side of a rename (ddl.py).
_OPERATION = {"$switch": {"branches": [
    {"case": {"$and": [{"$eq": ["$op", DROP]}, {"$eq": [{"$type": "$rename"}, "string"]}]},
     "then": "rename"},
    {"case": {"$eq": ["$op", DROP]}, "then": "drop"},
    {"case": {"$eq": ["$op", DELETE]}, "then": "delete"},
    {"case": {"$and": [_missing("$pre"), _missing("$prez"), _missing("$prex")]},
     "then": "insert"},
    {"case": {"$eq": ["$rep", True]}, "then": "replace"},
], "default": "update"}}

# updateDescription from the images, top-level fields: the fields of the post-image
# that are new or differ, and those of the pre-image it lacks. (mongod names the dotted
# paths an update operator touched; applying either to the pre-image gives the
# post-image.)
_UPDATE_DESCRIPTION = {
    "updatedFields": {"$arrayToObject": {"$setDifference": [
        {"$objectToArray": "$post"}, {"$objectToArray": "$pre"}]}},
    "removedFields": {"$setDifference": [
        {"$map": {"input": {"$objectToArray": "$pre"}, "in": "$$this.k"}},
        {"$map": {"input": {"$objectToArray": "$post"}, "in": "$$this.k"}}]},
    "truncatedArrays": [],
}


def _event(full: str, before: str) -> dict[str, Any]:
    """One event of an entry, `$$kind` its operationType, in mongod's field order."""
    lsn = {"$toString": "$_id"}
    padded = {"$substrCP": [{"$concat": [_ZEROS, lsn]}, {"$strLenCP": lsn}, 20]}
    full_kinds = ["insert", "replace"] + (["update"] if full != "default" else [])
    event: dict[str, Any] = {
        "_id": {"_data": {"$concat": ["B1", padded, {"$switch": {"branches": [
            {"case": _is("invalidate"), "then": "01"},
            {"case": _is("dropDatabase"), "then": "02"}], "default": "00"}}]}},
        "operationType": "$$kind",
        "clusterTime": "$ct",
        "wallTime": "$ts",
        "fullDocument": {"$cond": [_is(full_kinds), {"$ifNull": ["$post", None]},
                                   "$$REMOVE"]},
        "ns": {"$switch": {"branches": [
            {"case": _is("invalidate"), "then": "$$REMOVE"},
            {"case": _is("dropDatabase"), "then": {"db": _db_of("$ns")}}],
            "default": {"db": _db_of("$ns"), "coll": _coll_of("$ns")}}},
        "to": {"$cond": [_is("rename"), {"db": _db_of("$rename"), "coll": _coll_of("$rename")},
                         "$$REMOVE"]},
        "documentKey": {"$cond": [_is(_DOC_KINDS), {"_id": "$id"}, "$$REMOVE"]},
        "updateDescription": {"$cond": [
            {"$and": [_is("update"), {"$eq": [{"$type": "$pre"}, "object"]},
                      {"$eq": [{"$type": "$post"}, "object"]}]},
            _UPDATE_DESCRIPTION, "$$REMOVE"]},
    }
    if before != "off":
        event["fullDocumentBeforeChange"] = {"$cond": [
            _is(["update", "replace", "delete"]), {"$ifNull": ["$pre", None]}, "$$REMOVE"]}
    return event


# -- the stream -----------------------------------------------------------------------------

class Stream:
    """A change stream held in the engine's cursor table (getMore and killCursors reach it
    there). `after` is the LSN read up to; a window is the range (after, end] whose
    events the open upstream cursor is handing back."""

    def __init__(self, req: Request, ns: str, scope: dict[str, Any], whole_db: bool,
                 invalidating: Any, full: str, before: str, stages: list[dict[str, Any]],
                 after: int):
        self.engine = req.engine
        self.branch: Branch = req.on_branch
        self._ns = ns
        self.scope = scope
        # Database and branch streams see the dropDatabase event after the last drop.
        self.whole_db = whole_db
        self.invalidating = invalidating
        self.full = full
        self.before = before
        self.stages = stages
        # On a masked branch: the $set that masks the entries' images before any event
        # is made of them (masking.py), so events and the client's stages see masked
        # values only, as reads of the branch do.
        self.masking: dict[str, Any] | None = None
        self.after = after
        self.id = 0
        self.used = time.monotonic()
        self.cursor: AsyncCommandCursor[dict[str, Any]] | imageevents.Listed | None = None
        self.end = after
        self.reach = after
        self.stop = False
        self.ended = False
        self.pending: dict[str, Any] | None = None
        self.last_token: dict[str, Any] | None = None
        # startAtOperationTime: entries logged before its second are not events, even
        # those appended after the stream opened (it may name a time to come).
        self.since: dt.datetime | None = None

    @property
    def ns(self) -> str:
        return self._ns

    @property
    def done(self) -> bool:
        return self.ended and self.cursor is None and self.pending is None

    def _filter(self, lo: int, hi: int) -> dict[str, Any]:
        return {"b": self.branch.bid, **self.scope, "_id": {"$gt": Int64(lo), "$lte": Int64(hi)},
                "op": {"$in": _EVENT_OPS}, "from": {"$exists": False},
                "client.app": {"$ne": MIGRATION},
                **({"ts": {"$gte": self.since}} if self.since is not None else {}),
                **self.branch.visible()}

    def events_pipeline(self, lo: int, hi: int, *, staged: bool = True
                        ) -> list[dict[str, Any]]:
        """The window's events, through the client's stages unless not `staged`."""
        dropped_db = {"$eq": ["$dropdb", True]} if self.whole_db else False
        kinds = {"$concatArrays": [[_OPERATION],
                                   {"$cond": [dropped_db, ["dropDatabase"], []]},
                                   {"$cond": [self.invalidating, ["invalidate"], []]}]}
        masked = [self.masking] if self.masking is not None else []
        return [*matching(self._filter(lo, hi)), {"$sort": {"_id": 1}}, *masked,
                {"$project": {"_id": 0, "e": {"$map": {"input": kinds, "as": "kind",
                                                       "in": _event(self.full, self.before)}}}},
                {"$unwind": "$e"}, {"$replaceRoot": {"newRoot": "$e"}},
                *(self.stages if staged else [])]

    async def events(self, lo: int, hi: int) -> AsyncCommandCursor[dict[str, Any]]:
        try:
            return await self.engine.wal.entries.aggregate(self.events_pipeline(lo, hi),
                                                           batchSize=EVENT_BATCH)
        except OperationFailure as exc:
            raise _upstream_error(exc) from exc

    async def _settled(self) -> int:
        settled = self.engine.wal.settled()
        return settled if settled is not None else await self.engine.wal.current()

    async def _open_window(self) -> bool:
        """Open the cursor of the next window; False when the branch logged nothing for
        this stream since its point."""
        settled = await self._settled()
        if settled <= self.after:
            return False
        window = [*matching(self._filter(self.after, settled)), {"$sort": {"_id": 1}},
                  {"$limit": WINDOW},
                  {"$group": {"_id": None, "n": {"$sum": 1}, "last": {"$max": "$_id"},
                              "first": {"$min": "$_id"},
                              "stop": {"$min": {"$cond": [self.invalidating, "$_id", None]}},
                              "apart": {"$min": {"$cond": [imageevents.HELD_APART, "$_id",
                                                           None]}}}}]
        found = None
        try:
            async for doc in await self.engine.wal.entries.aggregate(window):
                found = doc
        except OperationFailure as exc:
            raise _upstream_error(exc) from exc
        if found is None:
            self.after = settled
            return False
        self.stop = found.get("stop") is not None
        self.end = int(found["stop"] if self.stop else found["last"])
        # A window that reached the settled point leaves nothing unread below it.
        self.reach = settled if not self.stop and int(found["n"]) < WINDOW else self.end
        apart = found.get("apart")
        if apart is not None and int(apart) <= self.end:
            # An entry whose images the pipeline cannot read: the window stops before it,
            # or is that entry alone (imageevents).
            self.stop = False
            self.end = self.reach = int(apart) - (int(found["first"]) != int(apart))
            if self.end == int(apart):
                self.cursor = imageevents.Listed(await self._apart(self.end))
                return True
        self.cursor = await self.events(self.after, self.end)
        return True

    async def _apart(self, lsn: int) -> list[dict[str, Any]]:
        try:
            bare = [doc async for doc in await self.engine.wal.entries.aggregate(
                self.events_pipeline(self.after, lsn, staged=False))]
        except OperationFailure as exc:
            raise _upstream_error(exc) from exc
        return await imageevents.events(self.engine.pool, self.engine.meta_db, self.engine.wal,
                                        lsn, bare, self.masking, self.stages)

    async def _next(self) -> dict[str, Any] | None:
        """The next event of the open window; None at its end (the window is then
        closed and the point moves past it)."""
        if self.pending is not None:
            doc, self.pending = self.pending, None
            return doc
        if self.cursor is None:
            return None
        try:
            return await self.cursor.next()
        except StopAsyncIteration:
            pass
        except OperationFailure as exc:
            raise _upstream_error(exc) from exc
        await self.cursor.close()
        self.cursor = None
        self.after = self.reach
        self.last_token = None
        if self.stop:
            self.ended = True
        return None

    async def _wait(self, timeout: float) -> None:
        """Until the branch appends past the point (and that append has settled) or the
        time runs out; woken by each append, never polling."""
        wal = self.engine.wal
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            tick = wal.tick()
            settled = wal.settled()
            if wal.last.get(self.branch.bid, 0) > self.after and settled is not None \
                    and settled > self.after:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(tick.wait(), remaining)
            except TimeoutError:
                return

    async def fetch(self, size: int | None, wait: float) -> list[dict[str, Any]]:
        """Up to size events (None: what fits one reply), waiting up to `wait` seconds
        for the first."""
        self.used = time.monotonic()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        out: list[dict[str, Any]] = []
        total = 0
        while size is None or len(out) < size:
            had_window = self.cursor is not None
            doc = await self._next()
            if doc is None:
                if out or self.ended:
                    break
                if had_window or await self._open_window():
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await self._wait(remaining)
                continue
            size_of = len(bson.encode(doc))
            if out and total + size_of > MAX_REPLY_BYTES:
                self.pending = doc
                break
            resume = doc.get("_id")
            if not isinstance(resume, dict) or not isinstance(resume.get("_data"), str) \
                    or _TOKEN.match(resume["_data"]) is None:
                raise CommandError(Code.CHANGE_STREAM_FATAL_ERROR,
                                   "Encountered an event whose _id field, which contains the "
                                   "resume token, was modified by the pipeline. Modifying the "
                                   "_id field of an event makes it impossible to resume the "
                                   "stream from that point. Only transformations that retain "
                                   "the unmodified _id field are allowed.")
            out.append(doc)
            total += size_of
            self.last_token = resume
        return out

    def resume_token(self) -> dict[str, Any]:
        """postBatchResumeToken: the last event returned while its window is open, else
        the point read up to."""
        if self.ended:
            return token(self.end, invalidate=True)
        if (self.cursor is not None or self.pending is not None) and self.last_token:
            return self.last_token
        return token(self.after)

    async def batch(self, run: Runner, size: int | None) -> list[dict[str, Any]]:
        return await self.fetch(size, 0.0)

    async def close(self, run: Runner) -> None:
        if self.cursor is not None:
            await self.cursor.close()
            self.cursor = None
        self.pending = None
        self.ended = True


def _upstream_error(exc: OperationFailure) -> CommandError:
    details = dict(exc.details or {})
    details.setdefault("errmsg", str(exc))
    details.setdefault("code", exc.code or 8)
    return error_from(details)


def _reply(stream: Stream, docs: list[dict[str, Any]], cursor_id: int,
           key: str) -> dict[str, Any]:
    return {"cursor": {key: docs, "postBatchResumeToken": stream.resume_token(),
                       "id": Int64(cursor_id), "ns": stream.ns}, "ok": 1.0}


# -- the commands ---------------------------------------------------------------------------

async def open_stream(req: Request) -> dict[str, Any]:
    """aggregate with $changeStream first, on a branch port."""
    cmd = req.cmd
    if cmd.get("autocommit") is False or cmd.get("startTransaction"):
        raise CommandError(Code.OPERATION_NOT_SUPPORTED_IN_TRANSACTION,
                           "$changeStream cannot run in a multi-document transaction")
    if "explain" in cmd:
        raise not_supported("explain of a change stream", req.on_branch.name)
    pipeline: list[Any] = cmd["pipeline"]
    spec = pipeline[0]["$changeStream"]
    if len(pipeline[0]) != 1:
        raise CommandError(Code.STAGE_NEEDS_ONE_FIELD, "A pipeline stage specification "
                           "object must contain exactly one field.")
    if not isinstance(spec, dict):
        raise CommandError(Code.TYPE_MISMATCH,
                           "the $changeStream stage specification must be an object")
    for key in spec:
        if key not in _SPEC_FIELDS:
            raise CommandError(Code.UNKNOWN_FIELD,
                               f"BSON field '$changeStream.{key}' is an unknown field.")
    full = spec.get("fullDocument", "default")
    before = spec.get("fullDocumentBeforeChange", "off")
    if full not in FULL_DOCUMENT:
        raise CommandError(Code.BAD_VALUE, f"unknown full document option: {full!r}")
    if before not in BEFORE_CHANGE:
        raise CommandError(Code.BAD_VALUE,
                           f"unknown full document before change option: {before!r}")
    stages = _user_stages(pipeline[1:])
    target = cmd["aggregate"]
    cluster = spec.get("allChangesForCluster") is True
    scope: dict[str, Any]
    invalidating: Any
    if cluster:
        if req.db != "admin" or target != 1:
            raise CommandError(Code.INVALID_OPTIONS,
                               "A $changeStream with 'allChangesForCluster:true' may only be "
                               "opened on the 'admin' database, and with no collection name")
        ns, scope, invalidating = "admin.$cmd.aggregate", {}, False
    elif target == 1:
        if req.db == "admin":
            raise CommandError(Code.INVALID_NAMESPACE,
                               "$changeStream may not be opened on the internal admin database")
        ns = f"{req.db}.$cmd.aggregate"
        scope = {"ns": {"$regex": f"^{re.escape(req.db)}\\."}}
        invalidating = {"$eq": ["$dropdb", True]}
    elif isinstance(target, str) and target:
        ns = f"{req.db}.{target}"
        scope, invalidating = {"ns": ns}, {"$eq": ["$op", DROP]}
    else:
        raise CommandError(Code.INVALID_NAMESPACE, f"invalid aggregate target {target!r}")
    await _check_access(req, target if isinstance(target, str) else None, cluster)
    after, since = await _start(req, spec)
    stream = Stream(req, ns, scope, not isinstance(target, str), invalidating, full, before,
                    stages, after)
    stream.since = since
    masker = masking.for_branch(req.engine.config, req.branch)
    if masker is not None:
        # The images of the entries of every masked collection the stream can meet.
        watched = masker.namespaces() if cluster else masker.namespaces(req.db) \
            if not isinstance(target, str) else [ns]
        stream.masking = masker.images(["pre", "post"], watched)
    await _check_stages(req, ns, stages)
    size = (cmd.get("cursor") or {}).get("batchSize", DEFAULT_FIRST_BATCH)
    docs = await stream.fetch(int(size), 0.0)
    cursor_id = 0 if stream.done else req.engine.cursors.add(stream)
    return _reply(stream, docs, cursor_id, "firstBatch")


def _user_stages(stages: list[Any]) -> list[dict[str, Any]]:
    for stage in stages:
        name = next(iter(stage)) if isinstance(stage, dict) and len(stage) == 1 else None
        if name == "$changeStream":
            raise CommandError(Code.CHANGE_STREAM_NOT_FIRST,
                               "$changeStream is only valid as the first stage in a pipeline")
        if name not in _USER_STAGES:
            raise CommandError(Code.ILLEGAL_OPERATION,
                         f"{name or stage!r} is not permitted in a $changeStream pipeline")
    return list(stages)


async def _check_stages(req: Request, ns: str, stages: list[dict[str, Any]]) -> None:
    """The upstream parses the user's stages now, as mongod does when a stream opens: over
    one event of the stream's shape (a server may leave a stage unparsed until a document
    reaches it)."""
    if not stages:
        return
    db, _, coll = ns.partition(".")
    sample = {"_id": token(0), "operationType": "insert", "clusterTime": Timestamp(0, 0),
              "wallTime": dt.datetime(1970, 1, 1), "fullDocument": {"_id": 0},
              "ns": {"db": db, "coll": coll}, "documentKey": {"_id": 0}}
    reply = await req.engine.pool.reply(req.engine.meta_db, {
        "aggregate": 1, "cursor": {}, "pipeline": [documents_stage([sample]), *stages]})
    if not reply.get("ok"):
        raise error_from(reply)


async def _check_access(req: Request, coll: str | None, cluster: bool) -> None:
    """The WAL is read with the proxy's credentials: the client must be allowed to read
    what it watches, as the upstream judges on its own connection (a find matching
    nothing on the collection, on any collection of the database; listing every
    database for the whole branch)."""
    cmd: dict[str, Any]
    if cluster:
        db, cmd = "admin", {"listDatabases": 1, "nameOnly": True, "authorizedDatabases": False}
    else:
        db = req.db
        cmd = {"find": coll or "mongobranch_probe", "filter": {"_id": {"$in": []}}, "limit": 1,
               "singleBatch": True}
    reply = await req.run.reply(db, cmd)
    if reply.get("code") == Code.UNAUTHORIZED:
        raise CommandError(Code.UNAUTHORIZED, f"not authorized to open this $changeStream: "
                                              f"{reply.get('errmsg')}")


async def _start(req: Request, spec: dict[str, Any]) -> tuple[int, dt.datetime | None]:
    """The LSN the stream starts after, and for startAtOperationTime the time from which
    entries are events."""
    options = [k for k in ("resumeAfter", "startAfter", "startAtOperationTime") if k in spec]
    if len(options) > 1:
        raise CommandError(Code.ONE_RESUME_OPTION,
                           "Only one type of resume option is allowed, but multiple were found.")
    engine = req.engine
    if not options:
        settled = engine.wal.settled()
        return (settled if settled is not None else await engine.wal.current()), None
    option = options[0]
    when = None
    if option == "startAtOperationTime":
        at = spec[option]
        if not isinstance(at, Timestamp):
            raise CommandError(Code.TYPE_MISMATCH,
                               "$changeStream startAtOperationTime must be a timestamp")
        # Entries logged from that second on (their times are the proxy's clock, to the
        # second a cluster time carries).
        when = dt.datetime.fromtimestamp(at.time, dt.UTC).replace(tzinfo=None)
        before = await anext(engine.wal.newest({"b": req.on_branch.bid, "ts": {"$lt": when}},
                                               1, {"_id": 1}), None)
        lsn = int(before["_id"]) if before is not None else 0
    else:
        lsn, invalidate = _parse_token(spec[option], option)
        if invalidate and option == "resumeAfter":
            raise CommandError(Code.INVALID_RESUME_TOKEN,
                               "Attempting to resume a change stream using 'resumeAfter' is "
                               "not allowed from an invalidate notification.")
    horizon = await gc.horizon(engine)
    if lsn and lsn < horizon:
        raise CommandError(Code.CHANGE_STREAM_HISTORY_LOST,
                           f"Resume of change stream was not possible: the branch's log before "
                           f"LSN {horizon} was compacted by gc")
    return lsn, when


async def get_more(req: Request, stream: Stream) -> dict[str, Any]:
    size = int(req.cmd["batchSize"]) if req.cmd.get("batchSize") else None
    wait = req.cmd.get("maxTimeMS", DEFAULT_AWAIT_MS)
    docs = await stream.fetch(size, max(float(wait), 0.0) / 1000)
    cursor_id = stream.id
    if stream.done:
        req.engine.cursors.pop(stream.id)
        await stream.close(req.run)
        cursor_id = 0
    return _reply(stream, docs, cursor_id, "nextBatch")
