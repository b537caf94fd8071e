"""Multi-document transactions on a branch (docs/ARCHITECTURE.md, "Transactions").

A client's transaction (lsid + txnNumber) on a branch port runs as one upstream
transaction, in a pymongo session of the engine's own client held here until the
client commits or aborts. While a command of the transaction runs, `runner.SESSION`
holds that session: the engine's pool and the WAL's inserts run in it, so the copy-up
into the overlay, the hidden ids, the client's statements on the overlay and the WAL
entries commit together or not at all, and the reads of the branch view see the
transaction's own writes while other clients see none of them.

From its first write until it ends, the transaction holds the branch's write lock
exclusively (as a multi-document write does for one command): the overlay and the
WAL then advance by the whole transaction at once, and a second transaction's write
waits a bounded time, then fails with a WriteConflict labelled
TransientTransactionError, which drivers' `withTransaction` retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import OrderedDict
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.client_session import TransactionOptions
from pymongo.errors import ConfigurationError, OperationFailure, PyMongoError, WriteConcernError
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from proxy.branching import snapshot
from proxy.branching.errors import CommandError
from proxy.branching.idkey import idkey
from proxy.branching.runner import SESSION, outside_transaction
from proxy.branching.wal import PINNED, WRITES, Change
from proxy.wire.codes import Code, code_name

if TYPE_CHECKING:
    from proxy.branching.engine import Engine
    from proxy.branching.model import Branch, NsState

log = logging.getLogger("mongobranch.txn")

TRANSIENT = "TransientTransactionError"
UNKNOWN_COMMIT = "UnknownTransactionCommitResult"
# mongod's transactionLifetimeLimitSeconds: a transaction left open this long is aborted.
LIFETIME = 60.0
# How long a transaction's first write waits for the branch's write lock before it fails
# with a retryable WriteConflict (mongod's maxTransactionLockRequestTimeoutMillis is 5 ms;
# a branch lock is held for whole commands, so the wait here is longer).
LOCK_WAIT = 1.0
# Outcomes remembered for a retried commitTransaction / abortTransaction.
DONE_MEMORY = 10_000

Key = tuple[bytes, int]


def in_transaction(cmd: dict[str, Any]) -> bool:
    """Whether a command belongs to a multi-document transaction: drivers send
    `autocommit: false` on every command of one, `startTransaction` on its first."""
    return cmd.get("autocommit") is False or cmd.get("startTransaction") is True


def no_such(message: str) -> CommandError:
    return CommandError(Code.NO_SUCH_TRANSACTION, message, errorLabels=[TRANSIENT])


def transient(exc: CommandError) -> CommandError:
    """An error of a statement in a transaction, labelled as mongod labels it: a write
    conflict or a transaction gone are worth retrying the whole transaction for."""
    if exc.code in (Code.WRITE_CONFLICT, Code.NO_SUCH_TRANSACTION, Code.HOST_UNREACHABLE) \
            and TRANSIENT not in exc.extra.get("errorLabels", []):
        exc.extra["errorLabels"] = [*exc.extra.get("errorLabels", []), TRANSIENT]
    return exc


_OVERLAY = re.compile(r"__mb_[0-9a-f]+_[lh]_")


def first_failure(failed: list[dict[str, Any]]) -> CommandError | None:
    """The first error the upstream gave within a statement of a transaction (one that
    ended it), as the client's error, naming the user's collections, not the overlays."""
    if not failed:
        return None
    reply = failed[0]
    if reply.get("writeErrors"):
        reply = {**reply["writeErrors"][0], "ok": 0.0}
    extra = {k: v for k, v in reply.items() if k in ("keyPattern", "keyValue", "errInfo",
                                                     "errorLabels")}
    code = int(reply.get("code", 8))
    return CommandError(code, _OVERLAY.sub("", str(reply.get("errmsg", "command failed"))),
                        code_name=str(reply.get("codeName") or code_name(code)), **extra)


@dataclass(eq=False)
class Txn:
    key: Key
    branch: Branch
    session: AsyncClientSession
    # Serializes the transaction's own commands, its commit, abort and expiry.
    mutex: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The branch's write lock, held from the first write to the end.
    held: contextlib.AsyncExitStack | None = None
    # Overlay states whose hidden-id caches are set aside while the transaction runs:
    # other clients must not see its hidden ids before it commits (NsState.hidden_ids).
    states: dict[str, NsState] = field(default_factory=dict)
    # Collections the transaction's writes create on the branch (by NsState key).
    present: dict[str, NsState] = field(default_factory=dict)
    # Overlays (NsState keys) the transaction created: an abort removes them.
    new: set[str] = field(default_factory=set)
    # Index lists of collections it created and indexed (commands/txnddl.py), by NsState
    # key: the engine's memory takes them when it commits.
    indexes: dict[str, tuple[NsState, list[dict[str, Any]]]] = field(default_factory=dict)
    expiry: asyncio.Task[None] | None = None
    ended: bool = False
    # Whether a statement ran: the first one sets the upstream snapshot, under the
    # fences of the branch's ancestors (router.py); the later ones read that snapshot.
    begun: bool = False
    # The first change of each document the transaction changed, (ns, idkey) -> change:
    # what its children must keep, copied up into them at the commit.
    pending: dict[tuple[str, Any], Change] = field(default_factory=dict)
    # First LSNs of its WAL appends, in flight until it ends (wal.PINNED).
    lsns: list[int] = field(default_factory=list)
    # Scratch copies its reads made (commands/scratchfrom.py), (db, name): dropped when
    # it ends, since no drop runs in a transaction.
    scratch: list[tuple[str, str]] = field(default_factory=list)

    def defer(self, changes: list[Change]) -> None:
        for change in changes:
            if change.op in WRITES:
                self.pending.setdefault((change.ns, idkey(change.id)),
                                        Change(change.ns, change.id, change.op, change.pre,
                                               None))

    @property
    def locked(self) -> bool:
        return self.held is not None


# The transaction of the command running now (None outside one).
CURRENT: ContextVar[Txn | None] = ContextVar("mongobranch_txn", default=None)


class Transactions:
    """The open transactions of every branch port, by (lsid, txnNumber)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.open: dict[bytes, Txn] = {}
        self.done: OrderedDict[Key, str] = OrderedDict()
        self.lifetime = LIFETIME
        self.lock_wait = LOCK_WAIT

    def holding(self, bid: str) -> bool:
        """Whether an open transaction holds this branch's write lock."""
        return any(t.locked and t.branch.bid == bid for t in self.open.values())

    @staticmethod
    def key_of(cmd: dict[str, Any]) -> Key:
        lsid = cmd.get("lsid")
        number = cmd.get("txnNumber")
        if not isinstance(lsid, dict) or not isinstance(number, int) or "id" not in lsid:
            raise CommandError(Code.INVALID_OPTIONS,
                               "a multi-document transaction needs lsid and txnNumber")
        return bytes(lsid["id"]), int(number)

    async def enter(self, branch: Branch, cmd: dict[str, Any]) -> Txn:
        """The transaction a statement belongs to: started by `startTransaction`, else one
        already open."""
        key = self.key_of(cmd)
        current = self.open.get(key[0])
        if current is not None and current.key[1] > key[1]:
            raise CommandError(Code.TRANSACTION_TOO_OLD,
                               f"txnNumber {key[1]} is less than last txnNumber "
                               f"{current.key[1]} seen in session")
        if cmd.get("startTransaction") is True:
            if key in self.done or (current is not None and current.key == key):
                raise CommandError(Code.CONFLICTING_OPERATION_IN_PROGRESS,
                                   f"transaction {key[1]} has already been started")
            if current is not None:  # a newer txnNumber ends the session's older one
                await self.abort(current)
            return await self._start(branch, key, cmd)
        if current is None or current.key != key:
            state = self.done.get(key)
            raise no_such(f"Transaction with txnNumber {key[1]} has been {state}"
                          if state else f"Given transaction number {key[1]} does not match "
                          "any in-progress transactions")
        if current.branch is not branch:
            raise CommandError(Code.OPERATION_NOT_SUPPORTED_IN_TRANSACTION,
                               "a transaction runs on one branch port; it was started on "
                               f"branch {current.branch.name!r}")
        return current

    async def _start(self, branch: Branch, key: Key, cmd: dict[str, Any]) -> Txn:
        level = cmd.get("readConcern", {}).get("level") if isinstance(
            cmd.get("readConcern"), dict) else None
        session = self.engine.client.start_session(causal_consistency=False)
        await session.start_transaction(
            read_concern=ReadConcern(level) if isinstance(level, str) else None)
        txn = Txn(key, branch, session)
        self.open[key[0]] = txn
        txn.expiry = asyncio.get_running_loop().create_task(self._expire(txn))
        return txn

    async def _expire(self, txn: Txn) -> None:
        await asyncio.sleep(self.lifetime)
        log.info("aborting a transaction on branch %s open for over %.0f s",
                 txn.branch.name, self.lifetime)
        # Without its mutex: a statement of it may be stuck waiting (for the branch's
        # lock, or for what waits for that lock); it fails once the session is gone.
        await self.abort_held(txn)

    @contextlib.contextmanager
    def active(self, txn: Txn) -> Iterator[None]:
        """While a command of the transaction runs: the engine's upstream calls join it."""
        session_token = SESSION.set(txn.session)
        txn_token = CURRENT.set(txn)
        pinned_token = PINNED.set(txn.lsns)
        try:
            yield
        finally:
            PINNED.reset(pinned_token)
            CURRENT.reset(txn_token)
            SESSION.reset(session_token)

    async def begin(self, txn: Txn) -> None:
        """Sets the upstream transaction's snapshot now, with one small read in it: the
        caller holds the fences that keep half-preserved writes out of it, which the
        transaction's later statements do not take."""
        await self.engine.pool(self.engine.meta_db, {
            "find": "branches", "filter": {}, "projection": {"_id": 1}, "limit": 1,
            "singleBatch": True})
        txn.begun = True

    async def lock(self, txn: Txn) -> None:
        """The branch's write lock for the rest of the transaction (its first write)."""
        if txn.locked:
            return
        stack = contextlib.AsyncExitStack()
        try:
            await asyncio.wait_for(stack.enter_async_context(
                self.engine.branch_lock(txn.branch.bid).exclusive()), self.lock_wait)
        except TimeoutError:
            raise CommandError(
                Code.WRITE_CONFLICT,
                "Caused by :: Write conflict during plan execution and yielding is disabled. "
                f":: Please retry your operation or multi-document transaction (branch "
                f"{txn.branch.name!r} is being written)",
                errorLabels=[TRANSIENT]) from None
        if txn.ended:  # expired while it waited
            await stack.aclose()
            raise no_such(f"Transaction with txnNumber {txn.key[1]} has been aborted")
        txn.held = stack

    def set_aside(self, state: NsState) -> None:
        """The transaction writes this overlay: other clients' reads stop trusting its
        cached hidden ids (they read the committed hidden set on the server instead)."""
        txn = CURRENT.get()
        if txn is None or state.key in txn.states:
            return
        txn.states[state.key] = state
        state.hidden_ids = None

    def created(self, state: NsState) -> None:
        """An overlay created in the transaction: it exists only if it commits."""
        txn = CURRENT.get()
        if txn is not None and SESSION.get() is not None:
            txn.new.add(state.key)

    async def creating(self, state: NsState) -> bool:
        """In a transaction, a write makes this collection exist on the branch: in its
        namespace state upstream now, in the engine's memory (which other clients'
        listCollections read) once it commits. False outside a transaction."""
        txn = CURRENT.get()
        if txn is None:
            return False
        if state.key not in txn.present:
            await self._record(state)
            txn.present[state.key] = state
        return True

    async def _record(self, state: NsState, **fields: Any) -> None:
        """A collection's namespace state as the commit makes it (present, and these
        fields), written in the transaction."""
        await self.engine.meta["namespaces"].replace_one(
            {"_id": state.key}, {**state.to_doc(), "present": True, **fields}, upsert=True,
            session=SESSION.get())

    async def set_indexes(self, state: NsState, indexes: list[dict[str, Any]]) -> None:
        """A collection created in the transaction has these indexes once it commits:
        in its namespace state upstream now, in the engine's memory then."""
        txn = CURRENT.get()
        assert txn is not None and state.key in txn.present
        await self._record(state, indexes=indexes)
        txn.indexes[state.key] = (state, indexes)

    def indexes_of(self, state: NsState) -> list[dict[str, Any]] | None:
        """The index list a transaction's statements see for a collection it created."""
        txn = CURRENT.get()
        pending = None if txn is None else txn.indexes.get(state.key)
        return state.indexes if pending is None else pending[1]

    async def commit(self, key: Key, cmd: dict[str, Any] | None = None) -> dict[str, Any]:
        """Commits with the client's commitTransaction options (writeConcern,
        maxTimeMS); returns the reply's extra fields: a writeConcernError, when the
        commit applied but its write concern was not met (as mongod, ok: 1)."""
        txn = self.open.get(key[0])
        if txn is None or txn.key != key:
            state = self.done.get(key)
            if state == "committed":
                return {}  # a retried commit: mongod answers it again
            raise no_such(f"Transaction with txnNumber {key[1]} has been {state}"
                          if state else f"Given transaction number {key[1]} does not match "
                          "any in-progress transactions")
        async with txn.mutex:
            if txn.ended:
                return await self.commit(key, cmd)
            try:
                _commit_options(txn.session, cmd or {})
            except CommandError:
                # A statement that fails ends the transaction; nothing to retry in it.
                await self.abort_held(txn)
                raise
            try:
                await self._commit(txn)
            except WriteConcernError as exc:
                await self._end(txn, "committed")
                return {"writeConcernError": {k: v for k, v in (exc.details or {}).items()
                                              if k in _WCE_FIELDS}}
            except CommandError as exc:
                await self._end(txn, "aborted")
                raise transient(exc) from None
            except OperationFailure as exc:
                details = dict(exc.details or {})
                if not exc.has_error_label(UNKNOWN_COMMIT):
                    await self._end(txn, "aborted")
                labels = list(details.get("errorLabels", [])) or (
                    [TRANSIENT] if exc.code in (Code.WRITE_CONFLICT,
                                                Code.NO_SUCH_TRANSACTION) else [])
                if exc.has_error_label(UNKNOWN_COMMIT) and UNKNOWN_COMMIT not in labels:
                    labels.append(UNKNOWN_COMMIT)  # pymongo's, not in the reply
                raise CommandError(int(exc.code or 8), str(details.get("errmsg", exc)),
                                   code_name=str(details.get("codeName", "UnknownError")),
                                   **({"errorLabels": labels} if labels else {})) from None
            except PyMongoError as exc:
                # The commit may have landed: the transaction stays open, and the
                # client's retried commit commits the session again (pymongo allows it).
                # RetryableWriteError, as mongos labels it, is what makes a driver retry.
                raise CommandError(Code.HOST_UNREACHABLE, f"commit failed: {exc}",
                                   errorLabels=["RetryableWriteError", UNKNOWN_COMMIT]
                                   ) from None
            await self._end(txn, "committed")
            return {}

    async def _commit(self, txn: Txn) -> None:
        """The children keep what they showed of every document the transaction changed
        (snapshot.py), then it commits. The copies are made outside the transaction: it
        began before children's later writes, which it could not see past without write
        conflicts; and they copy the branch's committed images, which the children show,
        so a commit that fails after them leaves every view as it was. The branch's fence
        is held throughout, as a write holds it: a child's command runs wholly before the
        commit (the old documents) or after it (the new ones, and the copies)."""
        async with self.engine.fence(txn.branch.bid).hold("w"):
            if txn.pending:
                kids = [b for b in self.engine.branches.values()
                        if b.parent == txn.branch.name]
                # No statement of a child's transaction runs now (each holds this fence
                # as a reader), but one may hold the child's lock until its client
                # commits, which could come after this commit: do not wait for it.
                if any(self.holding(kid.bid) for kid in kids):
                    raise CommandError(
                        Code.WRITE_CONFLICT,
                        f"a child branch of {txn.branch.name!r} has a transaction in "
                        "progress; retry the transaction", errorLabels=[TRANSIENT])
                with outside_transaction():
                    await snapshot.preserve(self.engine, txn.branch.name,
                                            list(txn.pending.values()))
            await txn.session.commit_transaction()

    async def abort_key(self, key: Key) -> None:
        txn = self.open.get(key[0])
        if txn is None or txn.key != key:
            state = self.done.get(key)
            if state == "committed":
                raise CommandError(Code.TRANSACTION_COMMITTED,
                                   f"Transaction with txnNumber {key[1]} has been committed")
            raise no_such(f"Transaction with txnNumber {key[1]} has been {state}"
                          if state else f"Given transaction number {key[1]} does not match "
                          "any in-progress transactions")
        await self.abort(txn)

    async def abort(self, txn: Txn) -> None:
        """Ends a transaction without effect: the upstream discards its writes."""
        async with txn.mutex:
            await self.abort_held(txn)

    async def abort_held(self, txn: Txn) -> None:
        """`abort`, by a caller that holds the transaction's mutex."""
        if txn.ended:
            return
        try:
            # pymongo ignores the server's errors; an aborted transaction is gone anyway.
            with contextlib.suppress(PyMongoError):
                await txn.session.abort_transaction()
        finally:
            await self._end(txn, "aborted")

    async def abort_branch(self, branch: Branch) -> None:
        """Abort the branch's open transactions (it is being dropped), without waiting
        for a statement of one that is stuck (as the expiry)."""
        for txn in [t for t in self.open.values() if t.branch.bid == branch.bid]:
            await self.abort_held(txn)

    async def _end(self, txn: Txn, outcome: str) -> None:
        """Forget the transaction; put back what other clients may trust again."""
        txn.ended = True
        if self.open.get(txn.key[0]) is txn:
            del self.open[txn.key[0]]
        self.done[txn.key] = outcome
        while len(self.done) > DONE_MEMORY:
            self.done.popitem(last=False)
        if txn.expiry is not None and txn.expiry is not asyncio.current_task():
            txn.expiry.cancel()
        try:
            with outside_transaction():
                if outcome == "committed":
                    for state in txn.present.values():
                        state.present = True
                    for state, indexes in txn.indexes.values():
                        state.indexes, state.unique = indexes, None
                else:
                    # The upstream rolled their documents back; the engine's memory too.
                    for key in txn.new:
                        self.engine.states.pop(key, None)
                        txn.states.pop(key, None)
                with contextlib.suppress(PyMongoError):
                    await txn.session.end_session()
                for db, name in txn.scratch:
                    # An abort took the copy back already (NamespaceNotFound).
                    await self.engine.pool.reply(db, {"drop": name})
                for state in txn.states.values():
                    await self.engine.load_hidden(state)
        finally:
            self.engine.wal.release(txn.lsns)
            txn.lsns.clear()
            if txn.held is not None:
                await txn.held.aclose()
                txn.held = None


# The fields of a writeConcernError mongod sends.
_WCE_FIELDS = ("code", "codeName", "errmsg", "errInfo")


def _commit_options(session: AsyncClientSession, cmd: dict[str, Any]) -> None:
    """The client names its transaction's write concern (and commit time limit) only on
    commitTransaction; pymongo takes both from the options the transaction started
    with, so they are set there first (its `_transaction.opts`, the one place it reads
    them from)."""
    wc, limit = cmd.get("writeConcern"), cmd.get("maxTimeMS")
    if not isinstance(wc, dict) and limit is None:
        return
    held = getattr(session, "_transaction", None)
    opts = getattr(held, "opts", None)
    if held is None or not isinstance(opts, TransactionOptions):
        return
    unknown = sorted(set(wc or {}) - {"w", "j", "wtimeout", "fsync", "provenance"})
    if unknown:
        raise CommandError(Code.FAILED_TO_PARSE,
                           f"unrecognized write concern field: {unknown[0]}")
    try:
        concern = WriteConcern(**{k: v for k, v in wc.items() if k != "provenance"}) \
            if isinstance(wc, dict) else opts.write_concern
        held.opts = TransactionOptions(
            read_concern=opts.read_concern, write_concern=concern,
            read_preference=opts.read_preference,
            max_commit_time_ms=int(limit) if isinstance(limit, int) and limit > 0
            else opts.max_commit_time_ms)
    except (ConfigurationError, TypeError, ValueError) as exc:
        raise CommandError(Code.FAILED_TO_PARSE, f"invalid writeConcern: {exc}") from None
