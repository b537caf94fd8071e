"""Main's changes, captured from the upstream's change stream (docs/ARCHITECTURE.md,
"Capture").

Every write that reaches the upstream (through the main port, from another
application, from a shell on the cluster) appears in one cluster-wide change stream
with its pre-image. For each document event the capture copies the pre-image up into
every child of main forked before the event (snapshot.preserve: nothing for a child
that already owns the document), then logs the change in main's WAL. Collection-level
events that cannot be preserved after the fact (a drop, a rename, a dropDatabase made
behind the proxy's back) are recorded on the children they break, which then report
their isolation as inexact; a collection created after a child's fork is pinned absent
in it.

A child's read is exact when the capture has processed every event up to the moment
the read starts: `barrier()` asks the upstream for its current operation time and
waits until the stream has passed it (an empty batch's postBatchResumeToken carries the
time of writes the stream's filter leaves out, so an idle stream passes it at once; a
write of the proxy's own wakes it when the last write was one it does not report).

The stream's resume token is persisted after each batch, and every captured WAL entry
carries its event's token: after a restart the capture resumes after the newest of the
two, so nothing is missed and nothing is logged twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import bson
from bson.timestamp import Timestamp
from pymongo.errors import OperationFailure, PyMongoError

from proxy.branching import naming, snapshot
from proxy.branching.wal import DELETE, DROP, PUT, Change
from proxy.wire.errors import CommandError

if TYPE_CHECKING:
    from proxy.branching.engine import Engine
    from proxy.branching.model import Branch

log = logging.getLogger("mongobranch.capture")

# Databases whose changes are never main's data.
SYSTEM_DBS = ("admin", "config", "local")
# Every proxy names its metadata database here at start-up, so that the captures of other
# proxies on the same upstream leave it out: a proxy capturing another's WAL as main's
# data would log it in its own WAL, which the other would capture in turn.
REGISTRY_DB = "mongobranch_registry"
REGISTRY = "meta_dbs"


async def metadata_databases(client: Any) -> set[str]:
    """The databases of every proxy on this upstream (the registry included): never
    main's data, for the capture as for a copy of main."""
    found = {REGISTRY_DB}
    async for entry in client[REGISTRY_DB][REGISTRY].find({}, {"_id": 1}):
        found.add(entry["_id"])
    return found


async def register(client: Any, meta_db: str) -> None:
    """Name this proxy's metadata database in the upstream's registry."""
    try:
        await client[REGISTRY_DB][REGISTRY].update_one(
            {"_id": meta_db}, {"$set": {"at": dt.datetime.now(dt.UTC).replace(tzinfo=None)}},
            upsert=True)
    except PyMongoError as exc:
        log.warning("cannot name the metadata database %s in %s.%s (%s): another proxy's "
                    "capture on this upstream would take its writes for main's", meta_db,
                    REGISTRY_DB, REGISTRY, exc)
DOCUMENT_OPS = ("insert", "update", "replace", "delete")
# Collection-level events that change what a child reads and cannot be undone for it.
BREAKING_OPS = ("drop", "rename", "dropDatabase")
# Events of a change to a collection's indexes or options, logged in main's history
# under the command's name (wal.CATALOG): a branch of main at an earlier point undoes
# them (history/catalogat.py).
CATALOG_OPS = {"createIndexes": "createIndexes", "dropIndexes": "dropIndexes",
               "modify": "collMod"}
# Entries in main's WAL made by the capture name this as their client.
CLIENT = {"app": "upstream", "via": "change stream"}
# How long a barrier waits for the stream to move before writing a tick to wake it
# (seconds): SecantusDB does not always wake an awaiting getMore for the capture's own
# writes, which leave the upstream's time ahead of the stream until the next event.
TICK_AFTER = 0.003
HISTORY_LOST = 286
# Seconds of cluster time the capture may trail main-port writes before they wait for it.
MAX_LAG = 1
# While nothing waits for the capture, a batch may grow for this long per child of main
# beyond the first (up to COALESCE_MAX seconds) before it is applied (Capture._coalesce):
# under MAX_LAG, so main-port writes do not wait for it...
COALESCE_PER_CHILD = 0.05
COALESCE_MAX = 0.5
# ... or until it holds this many events per child: enough that the children's inserts
# (one or two per child per batch) cost the upstream less than one per event.
COALESCE_EVENTS = 3


def tkey(ts: Timestamp) -> tuple[int, int]:
    return (ts.time, ts.inc)


def token_time(token: Any) -> tuple[int, int] | None:
    """The cluster time a resume token stands for. mongod's tokens are KeyStrings whose
    first value is the event's timestamp (type byte 130, then seconds and increment as
    big-endian 32-bit integers); SecantusDB's are BSON documents holding it as `t`."""
    data = token.get("_data") if isinstance(token, dict) else None
    if not isinstance(data, str):
        return None
    try:
        raw = bytes.fromhex(data)
    except ValueError:
        return None
    if raw[:1] == b"\x82" and len(raw) >= 9:
        return (int.from_bytes(raw[1:5], "big"), int.from_bytes(raw[5:9], "big"))
    try:
        doc = bson.decode(raw)
    except Exception:
        return None
    t = doc.get("t")
    return tkey(t) if isinstance(t, Timestamp) else None


def now_of(reply: dict[str, Any]) -> Timestamp | None:
    """The upstream's current time as a reply states it."""
    t = reply.get("operationTime")
    if isinstance(t, Timestamp):
        return t
    clock = reply.get("$clusterTime")
    t = clock.get("clusterTime") if isinstance(clock, dict) else None
    return t if isinstance(t, Timestamp) else None


@dataclass
class Stats:
    """What /metrics shows of the capture."""

    events: int = 0
    lag_seconds: float = 0.0
    barrier_waits: int = 0
    barrier_timeouts: int = 0
    unpreservable: int = 0


class Capture:
    def __init__(self, engine: Engine, *, pre_images: bool = True, history: bool = True,
                 await_ms: int = 1000, barrier_timeout: float = 30.0):
        self.engine = engine
        self.coll = engine.meta["capture"]
        # Whether the proxy may turn on changeStreamPreAndPostImages (the operator's
        # choice): without pre-images an update or delete cannot be preserved.
        self.pre_images = pre_images
        self.history = history
        self.await_ms = await_ms
        self.barrier_timeout = barrier_timeout
        self.running = False
        # Why the capture is not running (None while it is).
        self.why: str | None = "not started"
        self.position: tuple[int, int] = (0, 0)
        self.token: dict[str, Any] | None = None
        self.since_lsn: int | None = None
        self.stats = Stats()
        self._waiters: list[tuple[tuple[int, int], asyncio.Future[None]]] = []
        # Set when a waiter arrives: a batch being coalesced is applied at once.
        self._wanted = asyncio.Event()
        # Whether the capture holds events it has not applied yet (coalescing or applying).
        self._holding = False
        self._task: asyncio.Task[None] | None = None
        self._enabled: set[str] = set()
        self._warned: set[str] = set()
        self._ticking: asyncio.Future[Any] | None = None
        self._idle = 0.0
        # Per child of main: bumped whenever the capture changes what it holds, so that a
        # read that ran meanwhile knows it must run again (Capture.checked).
        self.generation: dict[str, int] = {}
        # Collections the stream showed a change of, and whether the catalog was listed.
        self._seen: set[str] = set()
        self._listed = False
        # Per collection of main, its index specs as listed (by name): SecantusDB's
        # index events name only an index's key and name, and a child keeping an index
        # main dropped needs all of it (`unique`, a TTL).
        self._specs: dict[str, dict[str, dict[str, Any]]] = {}
        # Other proxies' metadata databases (REGISTRY_DB): never main's data.
        self._others: set[str] = set()

    # -- life cycle ----------------------------------------------------------------------
    async def start(self) -> bool:
        """Open the stream where the last run left off (or now); False, with the reason
        logged, when the upstream offers no change streams."""
        doc = await self.coll.find_one({"_id": "main"}) or {}
        token = doc.get("token")
        logged = await anext(self.engine.wal.newest(
            {"b": naming.MAIN, "ev": {"$exists": True}}, 1, {"ev": 1}), None) \
            if self.history else None
        if logged is not None and (token is None or (token_time(logged["ev"]) or (0, 0))
                                   > (token_time(token) or (0, 0))):
            token = logged["ev"]
        self.token = token
        self._others = await metadata_databases(self.engine.client) - {
            self.engine.meta_db, REGISTRY_DB}
        try:
            reply = await self._open()
        except OperationFailure as exc:
            if exc.code == HISTORY_LOST and token is not None:
                log.error("the change stream cannot resume where the capture stopped (the "
                          "upstream's oplog no longer holds it): writes made meanwhile are "
                          "lost to main's children and history; capture restarts now")
                self._break_all("changes made while the proxy was down were not captured")
                self.token = None
                reply = await self._open()
            else:
                self.why = f"the upstream offers no change stream ({exc.details or exc})"
                log.warning("capture of main's changes is off: %s; writes that reach the "
                            "upstream without the proxy show through in branches", self.why)
                return False
        if "since_lsn" not in doc:
            self.since_lsn = await self.engine.wal.current()
            await self.coll.update_one({"_id": "main"}, {"$set": {
                "since_lsn": self.since_lsn,
                "since": dt.datetime.now(dt.UTC).replace(tzinfo=None)}}, upsert=True)
        else:
            self.since_lsn = int(doc["since_lsn"])
        self.running = True
        self.why = None
        if self.pre_images and self.children():
            await self.enable_pre_images()
        self._task = asyncio.create_task(self._run(reply))
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.running = False
        self.why = "stopped"
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    @property
    def exact(self) -> bool:
        """Whether every write to main, whoever makes it, is preserved for children."""
        return self.running and self.pre_images

    def children(self) -> list[Branch]:
        return [b for b in self.engine.branches.values()
                if b.parent == naming.MAIN and not b.creating]

    # -- the stream ------------------------------------------------------------------------
    def _spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"allChangesForCluster": True, "showExpandedEvents": True,
                                "fullDocument": "whenAvailable",
                                "fullDocumentBeforeChange": "whenAvailable"}
        if self.token is not None:
            spec["startAfter"] = self.token
        return spec

    def _filter(self) -> dict[str, Any]:
        return {"$match": {
            "ns.db": {"$nin": [*SYSTEM_DBS, self.engine.meta_db, *sorted(self._others)]},
            "ns.coll": {"$not": {"$regex": f"^({naming.PREFIX}|system\\.)"}}}}

    async def _open(self) -> dict[str, Any]:
        return await self.engine.client.admin.command({
            "aggregate": 1, "pipeline": [{"$changeStream": self._spec()}, self._filter()],
            "cursor": {}})

    async def _run(self, reply: dict[str, Any] | None) -> None:
        backoff = 0.1
        while True:
            try:
                if reply is None:
                    reply = await self._open()
                cursor = reply["cursor"]
                events = list(cursor.get("firstBatch", []))
                while True:
                    # The next batch is fetched while this one is applied.
                    more = asyncio.create_task(self._more(cursor)) if cursor.get("id") \
                        else None
                    self._holding = bool(events)
                    try:
                        if events and more is not None:
                            cursor, more = await self._coalesce(events, cursor, more)
                        await self._batch(events, cursor.get("postBatchResumeToken"))
                    except BaseException:
                        if more is not None:
                            more.cancel()
                        raise
                    finally:
                        self._holding = False
                    if more is None:
                        break
                    cursor = (await more)["cursor"]
                    events = list(cursor.get("nextBatch", []))
                    backoff = 0.1
                reply = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reply = None
                if isinstance(exc, OperationFailure) and exc.code == HISTORY_LOST:
                    self._break_all("the change stream lost its place in the upstream's oplog")
                    self.token = None
                log.warning("change stream interrupted (%s); resuming in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _coalesce(self, events: list[dict[str, Any]], cursor: dict[str, Any],
                        more: asyncio.Task[dict[str, Any]]
                        ) -> tuple[dict[str, Any], asyncio.Task[dict[str, Any]] | None]:
        """Lets the batch grow (events appended in place) while nothing waits for it:
        each batch costs every child of main an insert or two whatever its size, so with
        many children, steady writes to main cost the upstream far less in larger
        batches. A read or write waiting for the capture (reached()) ends the wait at
        once, so exact reads are not held back by it. Returns the cursor of the last
        batch taken and the next fetch."""
        kids = len(self.children())
        window = min(COALESCE_PER_CHILD * (kids - 1), COALESCE_MAX)
        if window <= 0:
            return cursor, more
        deadline = time.monotonic() + window
        try:
            while not self._waiters and len(events) < COALESCE_EVENTS * kids:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wanted.clear()
                wanted = asyncio.ensure_future(self._wanted.wait())
                try:
                    await asyncio.wait((more, wanted), timeout=left,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wanted.cancel()
                if not more.done():
                    break
                cursor = more.result()["cursor"]
                events.extend(cursor.get("nextBatch", []))
                if not cursor.get("id"):
                    return cursor, None
                more = asyncio.create_task(self._more(cursor))
        except BaseException:
            more.cancel()  # the fetch this started, which the caller does not know of
            raise
        return cursor, more

    async def _more(self, cursor: dict[str, Any]) -> dict[str, Any]:
        """The next batch. An upstream whose awaiting getMore returns at once with nothing
        and no progress (seen on a SecantusDB whose storage failed) would make this a
        busy loop: such answers are spaced out, up to half a second apart."""
        started = time.monotonic()
        reply: dict[str, Any] = await self.engine.client.admin.command({
            "getMore": cursor["id"], "collection": "$cmd.aggregate",
            "maxTimeMS": self.await_ms})
        batch = reply["cursor"]
        idle = not batch.get("nextBatch") and \
            batch.get("postBatchResumeToken") == cursor.get("postBatchResumeToken")
        if idle and time.monotonic() - started < self.await_ms / 10_000:
            self._idle = min(max(self._idle * 2, 0.01), 0.5)
            await asyncio.sleep(self._idle)
        else:
            self._idle = 0.0
        return reply

    async def _batch(self, events: list[dict[str, Any]], pbrt: Any) -> None:
        """Apply a batch, then move the position (and wake the reads waiting for it).
        The token is persisted only after events: a batch that only moved the
        postBatchResumeToken holds nothing a restart would have to replay."""
        if events:
            await self._apply(events)
            self.token = events[-1]["_id"]
            self.position = max(self.position, tkey(events[-1]["clusterTime"]))
            wall = events[-1].get("wallTime")
            if isinstance(wall, dt.datetime):
                lag = (dt.datetime.now(dt.UTC).replace(tzinfo=None) - wall).total_seconds()
                self.stats.lag_seconds = max(lag, 0.0)
            self.stats.events += len(events)
        else:
            self.stats.lag_seconds = 0.0
        if pbrt is not None:
            self.token = pbrt
            at = token_time(pbrt)
            if at is not None:
                self.position = max(self.position, at)
        if events and not self._logged(events[-1]):
            await self.coll.update_one({"_id": "main"}, {"$set": {"token": self.token}},
                                       upsert=True)
        self._wake()

    def _logged(self, event: dict[str, Any]) -> bool:
        """Whether main's WAL holds this event's token (start() resumes after it)."""
        return self.history and event.get("operationType") in (
            *DOCUMENT_OPS, *BREAKING_OPS, *CATALOG_OPS)

    def _wake(self) -> None:
        keep = []
        for target, fut in self._waiters:
            if fut.done():
                continue
            if target <= self.position:
                fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep

    # -- applying events ---------------------------------------------------------------------
    async def _apply(self, events: list[dict[str, Any]]) -> None:
        """Preserve and log a batch, in order: document events in runs between the
        collection-level ones."""
        run: list[tuple[tuple[int, int], Change, bool]] = []
        for ev in events:
            op = ev.get("operationType")
            ns_doc = ev.get("ns") or {}
            db, coll = ns_doc.get("db"), ns_doc.get("coll")
            if db == REGISTRY_DB:
                key = (ev.get("documentKey") or {}).get("_id")
                if isinstance(key, str) and key != self.engine.meta_db:
                    self._others.add(key)  # a proxy started since: its writes are not main's
                continue
            if db in self._others:
                continue
            at = tkey(ev["clusterTime"])
            extra = {"ct": ev["clusterTime"], "ev": ev["_id"]}
            if isinstance(ev.get("wallTime"), dt.datetime):
                extra["ts"] = ev["wallTime"]
            if op in DOCUMENT_OPS and isinstance(db, str) and isinstance(coll, str):
                ns = f"{db}.{coll}"
                self._seen.add(ns)
                key = ev.get("documentKey") or {}
                if "_id" not in key:
                    continue
                pre = None if op == "insert" else ev.get("fullDocumentBeforeChange")
                post = None if op == "delete" else ev.get("fullDocument")
                missing = op != "insert" and pre is None
                if missing:
                    extra["nopre"] = True  # main's state before it is not known
                change = Change(ns, key["_id"], DELETE if op == "delete" else PUT, pre, post,
                                extra)
                run.append((at, change, missing))
                continue
            await self._documents(run)
            run = []
            if op == "create" and isinstance(db, str) and isinstance(coll, str):
                await self._created(at, db, coll)
            elif op in BREAKING_OPS and isinstance(db, str):
                await self._broken(at, op, db, coll, extra)
            elif op in CATALOG_OPS and isinstance(db, str) and isinstance(coll, str):
                await self._catalog(at, CATALOG_OPS[op], db, coll, ev, extra)
            elif op == "invalidate":
                self.token = None
        await self._documents(run)

    def _eligible(self, at: tuple[int, int]) -> list[Branch]:
        """Children of main forked before this time: the change is not in their view."""
        return [kid for kid in self.children()
                if kid.fork_ct is None or tkey(kid.fork_ct) < at]

    async def _documents(self, run: list[tuple[tuple[int, int], Change, bool]]) -> None:
        if not run:
            return
        # Runs of changes for the same children, in stream order; one without its
        # pre-image alone, judged once those before it are preserved (_unpreservable).
        groups: list[tuple[list[Branch], list[Change], bool]] = []
        for at, change, missing in run:
            kids = self._eligible(at)
            if groups and not missing and not groups[-1][2] \
                    and [k.bid for k in groups[-1][0]] == [k.bid for k in kids]:
                groups[-1][1].append(change)
            else:
                groups.append((kids, [change], missing))
        # The children's keep entries and main's changes go to the WAL in one insert,
        # keeps first. A crash before it leaves the copies unlogged and main's changes
        # too: start-up rebuilds the overlays without them and the capture replays the
        # events, copying them again.
        keeps: list[tuple[str, list[Change]]] = []
        for kids, changes, missing in groups:
            if missing and kids:
                await self._unpreservable(changes[0], kids)
            elif kids:
                await snapshot.preserve(self.engine, naming.MAIN, changes, kids=kids,
                                        deferred=keeps)
                self._bump(kids)  # after: a read that began meanwhile saw it half done
        if self.history:
            keeps.append((naming.MAIN, [c for _, c, _ in run]))
        await self.engine.wal.append_groups(keeps, CLIENT)

    def _bump(self, kids: Iterable[Branch]) -> None:
        for kid in kids:
            self.generation[kid.bid] = self.generation.get(kid.bid, 0) + 1

    async def _unpreservable(self, change: Change, kids: Iterable[Branch]) -> None:
        """An update or delete arrived without its pre-image: the children forked before
        it that read the document through main may now show the new one. One that holds
        the collection whole or absent, or its own image of the document (a document
        main inserted after its fork, kept absent), does not: so a collection main
        creates after a fork, whose pre-images the capture turns on only once it sees
        it, breaks no child."""
        self.stats.unpreservable += 1
        db, coll = change.ns.split(".", 1)
        for kid in kids:
            if not snapshot.reads_base(self.engine, kid, db, [coll]):
                continue
            state = self.engine.state(kid, db, coll)
            if await snapshot.owned_ids(self.engine, state, [change.id]):
                continue
            self.engine.break_snapshot(kid, f"{change.ns}: a change arrived without its "
                                            "pre-image (changeStreamPreAndPostImages is "
                                            "off for it)")

    async def _created(self, at: tuple[int, int], db: str, coll: str) -> None:
        """A collection created after a child's fork stays absent in that child."""
        if self.pre_images and self.children():
            await self._enable(db, coll)
        kids = self._eligible(at)
        for kid in kids:
            await snapshot.pin_absent(self.engine, kid, db, coll)
        self._bump(kids)

    async def _broken(self, at: tuple[int, int], op: str, db: str, coll: Any,
                      extra: dict[str, Any]) -> None:
        """A drop or rename the proxy did not make (it freezes its own first): the data
        is gone from the base, so each child still reading it says so."""
        colls = [coll] if isinstance(coll, str) else None
        # Recreated later, the collection starts without pre-images.
        self._enabled = {ns for ns in self._enabled if not (
            ns == f"{db}.{coll}" or (colls is None and ns.startswith(f"{db}.")))}
        self._specs = {ns: specs for ns, specs in self._specs.items() if not (
            ns == f"{db}.{coll}" or (colls is None and ns.startswith(f"{db}.")))}
        for kid in self._eligible(at):
            if snapshot.reads_base(self.engine, kid, db, colls):
                what = f"{db}.{coll}" if isinstance(coll, str) else db
                self.engine.break_snapshot(kid, f"{op} of {what} on the upstream, not "
                                                "through the proxy")
        if self.history:
            ns = f"{db}.{coll}" if isinstance(coll, str) else f"{db}.*"
            await self.engine.wal.append(naming.MAIN, [Change(ns, None, DROP, None, None,
                                                              extra)], CLIENT)

    async def _catalog(self, at: tuple[int, int], name: str, db: str, coll: str,
                       ev: dict[str, Any], extra: dict[str, Any]) -> None:
        """Main's change of a collection's indexes or options: logged in its history
        with what the event says of it (`desc`: the specs, the options set; `before`:
        the options before a collMod), and kept as it was before by the children that
        show main's (snapshot.keep_catalog). The capture's own collMod, which turns
        pre-images on, is neither."""
        desc = ev.get("operationDescription") or {}
        if name == "collMod" and set(desc) == {"changeStreamPreAndPostImages"}:
            return
        kids = self._eligible(at)
        options = name == "collMod" and bool(desc) and "index" not in desc
        ns = f"{db}.{coll}"
        specs = desc.get("indexes") if name != "collMod" else None
        # The children's list, when they want one, is the listing the specs learn from.
        listed = await self._catalog_now(db, coll) if kids and not options else None
        if listed is None and ((name == "createIndexes" and isinstance(specs, list))
                               or (name == "collMod" and ns in self._specs)):
            await self._learn(db, coll)  # a created index, or a TTL or hidden one changed
        if isinstance(specs, list):
            desc = {**desc, "indexes": self._whole_specs(name, ns, specs)}
        before = ev.get("stateBeforeChange") or {}
        entry = {"op": name, "desc": desc, **({"before": before} if before else {})}
        if self.history:
            await self.engine.wal.append(naming.MAIN, [Change(
                f"{db}.{coll}", None, name, None, None,
                {**extra, **{k: v for k, v in entry.items() if k != "op"}})], CLIENT)
        if kids:
            await snapshot.keep_catalog(self.engine, kids, db, coll, entry,
                                        ev["clusterTime"], listed)
            self._bump(kids)

    def _whole_specs(self, name: str, ns: str, specs: list[Any]) -> list[Any]:
        """An index event's specs, each as listed when known: a created index as the
        upstream lists it now (the caller has just learnt it), a dropped one as it was
        last listed."""
        known = self._specs.get(ns, {})
        out = [{**spec, **known.get(str(spec.get("name")), {})} if isinstance(spec, dict)
               else spec for spec in specs]
        if name == "dropIndexes":
            for spec in specs:
                if isinstance(spec, dict):
                    known.pop(str(spec.get("name")), None)
        return out

    async def _learn(self, db: str, coll: str) -> list[dict[str, Any]] | None:
        """The collection's index specs as listed now (None: it is gone), learnt over
        those known: one gone from the list was dropped after it, by an event the
        capture has yet to reach, whose spec it will want (removed when that event
        comes)."""
        reply = await self.engine.pool.reply(db, {"listIndexes": coll})
        if not reply.get("ok"):
            return None
        listed = list(reply["cursor"]["firstBatch"])
        self._specs.setdefault(f"{db}.{coll}", {}).update((ix["name"], ix) for ix in listed)
        return listed

    async def _catalog_now(self, db: str, coll: str) -> snapshot.Listed | None:
        """A collection's index list now, and the upstream's time after (None: it is
        gone)."""
        listed = await self._learn(db, coll)
        return None if listed is None else snapshot.Listed(listed, await self.clock())

    def _break_all(self, why: str) -> None:
        for kid in self.children():
            self.engine.break_snapshot(kid, why)

    # -- pre-images ------------------------------------------------------------------------
    async def enable_pre_images(self) -> None:
        """Turn on changeStreamPreAndPostImages for every collection of main, so that an
        update or delete made after a child's fork arrives with what the child shows.
        The catalog is listed once; after that the collections the stream has shown
        since are enough (a fork runs after the capture caught up with the upstream)."""
        if self._listed:
            for ns in sorted(self._seen - self._enabled):
                db, coll = ns.split(".", 1)
                await self._enable(db, coll)
            return
        self._listed = True
        dbs = await self.engine.client.admin.command({"listDatabases": 1, "nameOnly": True})
        for entry in dbs.get("databases", []):
            db = entry.get("name")
            if not isinstance(db, str) or not db or db in (
                    *SYSTEM_DBS, self.engine.meta_db, REGISTRY_DB, *self._others):
                continue
            async for batch in self.engine.pool.batches(db, {
                    "listCollections": 1, "filter": {"type": "collection"}}):
                for spec in batch:
                    name = spec.get("name")
                    if not isinstance(name, str) or name.startswith(("system.",
                                                                     naming.PREFIX)):
                        continue
                    on = (spec.get("options") or {}).get("changeStreamPreAndPostImages", {})
                    if on.get("enabled"):
                        self._enabled.add(f"{db}.{name}")
                        await self._learn(db, name)
                    else:
                        await self._enable(db, name)

    async def _enable(self, db: str, coll: str) -> None:
        ns = f"{db}.{coll}"
        if ns in self._enabled:
            return
        try:
            await self.engine.pool(db, {"collMod": coll,
                                        "changeStreamPreAndPostImages": {"enabled": True}})
            self._enabled.add(ns)
            await self._learn(db, coll)
        except (PyMongoError, CommandError) as exc:  # the engine's runner: CommandError
            if ns not in self._warned:
                self._warned.add(ns)
                log.warning("cannot turn on pre-images for %s (%s): an update or delete of "
                            "it made behind the proxy's back cannot be preserved", ns, exc)

    # -- exact reads -------------------------------------------------------------------------
    async def clock(self) -> Timestamp | None:
        """The upstream's current time (None: its replies carry none)."""
        return now_of(await self.engine.client.admin.command("ping"))

    async def barrier(self) -> None:
        """Wait until every write the upstream acknowledged before now is preserved."""
        if not self.running:
            return
        at = await self.clock()
        if at is not None:
            await self.reached(at)

    async def checked(self, root: str, since: int, at: Timestamp | None) -> bool:
        """After a read on a branch of the child of main `root` (its generation `since`
        when the read began; `at`, the upstream's time asked beside it): once the
        capture has passed `at`, whether nothing was preserved for that child meanwhile.
        Then every write acknowledged before the read began had been preserved before
        it ran, and its answer is exact without waiting beforehand."""
        if at is not None:
            await self.reached(at)
        return self.generation.get(root, 0) == since

    def behind(self, at: Timestamp) -> bool:
        """Whether the capture trails this time by more than MAX_LAG seconds: main-port
        writes then wait for it, so that it cannot fall ever further behind."""
        return self.running and at.time - self.position[0] > MAX_LAG

    async def reached(self, at: Timestamp) -> None:
        """Wait until the capture has processed every event up to this time."""
        target = tkey(at)
        if not self.running or target <= self.position:
            return
        self.stats.barrier_waits += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._wanted.set()
        deadline = time.monotonic() + self.barrier_timeout
        seen = self.position
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), TICK_AFTER)
                return
            if self.position == seen and not self._holding:
                # Nothing came: the last write before `at` may be one the stream's filter
                # leaves out. A write of the proxy's own moves the stream past it. Not
                # while the capture holds events it is applying: the position moves once
                # they are applied, and ticks would only queue on the upstream before
                # the capture's own writes (every waiting write ticking every few ms).
                await self._tick()
            seen = self.position
        self.stats.barrier_timeouts += 1
        log.warning("the capture of main's changes is %.1f s behind: a read on a branch went "
                    "ahead without waiting for it (it may show a later write to main)",
                    self.barrier_timeout)

    async def _tick(self) -> None:
        """One tick at a time, however many reads wait."""
        if self._ticking is not None and not self._ticking.done():
            await asyncio.shield(self._ticking)
            return
        self._ticking = asyncio.ensure_future(
            self.coll.update_one({"_id": "tick"}, {"$inc": {"n": 1}}, upsert=True))
        await asyncio.shield(self._ticking)
