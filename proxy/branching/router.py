"""The command table: which handler serves which command on main and branch ports."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from proxy.branching import audit, authz, masking
from proxy.branching.capture import now_of
from proxy.branching.commands import (
    admin,
    aggregate,
    bulkwrite,
    capped,
    catalog,
    changestream,
    dbhash,
    ddl,
    failpoints,
    hints,
    mainwrite,
    masked,
    read,
    server,
    stats,
    transactions,
    txnddl,
    upkeep,
    validate,
    viewdefs,
    write,
)
from proxy.branching.commands.base import Handler, Request, in_mongod_order
from proxy.branching.engine import Engine
from proxy.branching.errors import CommandError, not_supported
from proxy.branching.model import Branch
from proxy.branching.runner import FAILED, Runner
from proxy.branching.txn import first_failure, in_transaction, no_such, transient
from proxy.net.router import Context, Continued, Inline, Passed
from proxy.wire.bsonutil import decode, raw_ok, raw_timestamp
from proxy.wire.codes import Code
from proxy.wire.opmsg import EXHAUST_ALLOWED, OpMsg

# Seconds a branch port's request waits for an engine that is starting.
STARTING_WAIT = 20.0

ADMIN: dict[str, Handler] = {
    "createBranch": admin.create_branch,
    "listBranches": admin.list_branches,
    "branchInfo": admin.branch_info,
    "dropBranch": admin.drop_branch,
    "branchLog": admin.branch_log,
    "branchDiff": admin.branch_diff,
    "mergeBranch": admin.merge_branch,
    "resetBranch": admin.reset_branch,
}

BRANCH: dict[str, Handler] = {
    "find": viewdefs.reading(read.find),
    "count": viewdefs.reading(read.count),
    "distinct": viewdefs.reading(read.distinct),
    "explain": viewdefs.explain,
    "getMore": read.get_more,
    "killCursors": read.kill_cursors,
    "aggregate": viewdefs.reading(aggregate.aggregate),
    "listCollections": catalog.list_collections,
    "listIndexes": viewdefs.not_on_views(catalog.list_indexes),
    "insert": viewdefs.not_on_views(write.insert),
    "update": masked.guarded(viewdefs.not_on_views(write.update)),
    "delete": masked.guarded(viewdefs.not_on_views(write.delete)),
    "findAndModify": masked.find_and_modify(viewdefs.not_on_views(write.find_and_modify)),
    "findandmodify": masked.find_and_modify(viewdefs.not_on_views(write.find_and_modify)),
    "bulkWrite": masked.guarded(bulkwrite.bulk_write),
    "create": masked.guarded(viewdefs.create),
    "collMod": masked.guarded(viewdefs.coll_mod),
    "drop": ddl.drop,
    "dropDatabase": ddl.drop_database,
    "renameCollection": masked.guarded(viewdefs.not_on_views(ddl.rename_collection)),
    "createIndexes": masked.guarded(viewdefs.not_on_views(ddl.create_indexes)),
    "dropIndexes": viewdefs.not_on_views(ddl.drop_indexes),
    "deleteIndexes": viewdefs.not_on_views(ddl.drop_indexes),
    "validate": viewdefs.not_on_views(validate.validate),
    "collStats": viewdefs.not_on_views(stats.coll_stats),
    "collstats": viewdefs.not_on_views(stats.coll_stats),
    "dbStats": stats.db_stats,
    "dbstats": stats.db_stats,
    "convertToCapped": viewdefs.not_on_views(capped.convert_to_capped),
    "cloneCollectionAsCapped": viewdefs.not_on_views(capped.clone_collection_as_capped),
    "compact": viewdefs.not_on_views(upkeep.upkeep),
    "reIndex": viewdefs.not_on_views(upkeep.upkeep),
    "planCacheClear": viewdefs.not_on_views(upkeep.upkeep),
    "dbHash": dbhash.db_hash,
    "dbhash": dbhash.db_hash,
    "dataSize": dbhash.data_size,
    "datasize": dbhash.data_size,
    "commitTransaction": transactions.commit_transaction,
    "abortTransaction": transactions.abort_transaction,
    # Test-only (an upstream started with enableTestCommands): forwarded, and noted for
    # the failpoint probes (commands/failpoints.py).
    "configureFailPoint": failpoints.configure_fail_point,
    "fsync": server.fsync,
    **ADMIN,
}

# Served without the branch's fences: the end of a transaction (it runs no statement),
# a failpoint's configuration and fsync (they read and write no collection).
UNFENCED = frozenset({"commitTransaction", "abortTransaction", "configureFailPoint", "fsync"})

# What a multi-document transaction on a branch may run (mongod refuses other DDL,
# counts and catalog reads in one too).
IN_TXN = frozenset({"find", "aggregate", "distinct", "insert", "update", "delete",
                    "findAndModify", "findandmodify", "getMore", "killCursors",
                    "bulkWrite", "create", "createIndexes"})
# Their handlers in a transaction, in place of BRANCH's.
TXN: dict[str, Handler] = {"create": masked.guarded(txnddl.create),
                           "createIndexes": masked.guarded(txnddl.create_indexes)}

# On the main port: writes are routed here only while main has child branches
# (mainwrite.NAMES); otherwise they stay on the pass-through fast path.
MAIN: dict[str, Handler] = {"listCollections": catalog.list_collections, **ADMIN,
                            "dbStats": stats.db_stats, "dbstats": stats.db_stats,
                            "configureFailPoint": failpoints.configure_fail_point,
                            **mainwrite.HANDLERS, "bulkWrite": bulkwrite.bulk_write_on_main}

# Reads answered without waiting for the capture first (EngineRouter._read).
CHECKED_READS = frozenset({"find", "aggregate", "count", "distinct", "listCollections",
                           "listIndexes"})
READ_ATTEMPTS = 3
# A true singleBatch (bool) and a limit field, as a find's BSON holds them.
_SINGLE_BATCH = b"singleBatch\x00\x01"
_LIMIT = b"limit\x00"
# What an inline read sends behind itself: the ping whose reply gives the upstream's time.
_CLOCK = (("admin", {"ping": 1}),)

# Commands that continue a cursor: they read nothing new of main.
CURSOR_OPS = frozenset({"getMore", "killCursors"})

# Commands that only read: they need no identity for the WAL.
READS = frozenset({"find", "count", "distinct", "explain", "getMore", "killCursors",
                   "listCollections", "listIndexes", "listBranches", "branchInfo",
                   "branchLog", "branchDiff", "configureFailPoint", "fsync", "collStats",
                   "collstats", "dbStats", "dbstats", "dbHash", "dbhash", "dataSize", "datasize"})

_SERVER_WIDE = ("it changes the server that main and every branch share, not the branch; "
                "run it on the main port")
_FILTERS = ("index filters belong to the server's collection and a query shape: an "
            "unchanged collection's are main's, and a changed one's queries reach the server "
            "in other shapes (unions, hidden ids excluded) that no filter set for the "
            "client's shape matches; use a hint")
_SEARCH = ("Atlas Search indexes are built by a search service from the stored collections, "
           "and score each document by statistics of the whole index: a branch's documents "
           "are spread over the base and its overlays, which it would index and score apart")
_USAGE = ("it reports the server's use of its stored collections, and a branch's are "
          "overlays under reserved names beside main's; run it on the main port")
# Commands a branch port refuses for good, and why (README, "Not supported on a branch
# port"). Any other command outside BRANCH and FORWARDED is refused as not built yet.
REFUSED: dict[str, str] = {
    **dict.fromkeys(("mapReduce", "mapreduce"),
                    "mongod deprecates it since 5.0; run the equivalent aggregation ($group, "
                    "$merge), which a branch supports"),
    **dict.fromkeys(("planCacheSetFilter", "planCacheClearFilters", "planCacheListFilters"),
                    _FILTERS),
    **dict.fromkeys((
        "createUser", "updateUser", "dropUser", "dropAllUsersFromDatabase",
        "grantRolesToUser", "revokeRolesFromUser", "createRole", "updateRole", "dropRole",
        "dropAllRolesFromDatabase", "grantPrivilegesToRole", "revokePrivilegesFromRole",
        "grantRolesToRole", "revokeRolesFromRole", "invalidateUserCache", "setParameter",
        "setFeatureCompatibilityVersion", "shutdown", "replSetInitiate", "replSetReconfig",
        "replSetStepDown", "replSetFreeze", "replSetMaintenance", "replSetSyncFrom",
        "replSetResizeOplog", "addShard", "removeShard", "enableSharding",
        "shardCollection", "setDefaultRWConcern", "setClusterParameter", "logRotate",
        "rotateCertificates", "profile", "setProfilingFilterGlobally", "dropConnections",
        "autoCompact"), _SERVER_WIDE),
    **dict.fromkeys(("createSearchIndexes", "updateSearchIndex", "dropSearchIndex"), _SEARCH),
    "top": _USAGE,
}

# Commands that touch no collection data: forwarded unchanged from a branch port.
# Anything neither here nor in BRANCH is refused there, so nothing reaches the base.
FORWARDED = frozenset({
    "ping", "buildInfo", "buildinfo", "saslStart", "saslContinue",
    "authenticate", "logout", "endSessions", "startSession", "refreshSessions", "killSessions",
    "killAllSessions", "killAllSessionsByPattern", "getClusterParameter", "serverStatus",
    "hostInfo", "whatsmyuri", "getLog", "getParameter",
    "connectionStatus", "getCmdLineOpts", "listDatabases", "getDefaultRWConcern", "features",
    "lockInfo", "currentOp", "killOp",
    "usersInfo", "rolesInfo", "atlasVersion", "getFreeMonitoringStatus", "listCommands",
    "connPoolStats", "isMaster", "ismaster", "hello", "replSetGetStatus", "replSetGetConfig",
    # Test-only commands (an upstream started with enableTestCommands): they wait for
    # server-wide failpoints or sleep, and read or write no collection.
    "waitForFailPoint", "sleep",
})


async def write_through(engine: Engine, branch: Branch | None, ctx: Context, run: Runner,
                        db: str, cmd: dict[str, Any]) -> dict[str, Any] | None:
    """The engine's WritePath (engine.py): a write command through the handler a client's
    would reach on that branch's port. On main, the main-port handler keeps what main's
    other children show, then the write itself runs on the base."""
    req = Request(engine, branch, ctx, run, db, cmd)
    if branch is None:
        return await MAIN[next(iter(cmd))](req) or await run(db, cmd)
    return await BRANCH[next(iter(cmd))](req)


def _continues(msg: OpMsg, reply: dict[str, Any]) -> bool:
    """Whether a reply to an exhaust getMore leaves its cursor open (more batches follow)."""
    cursor = reply.get("cursor")
    return (next(iter(msg.body), None) == "getMore" and bool(reply.get("ok"))
            and isinstance(cursor, dict) and bool(cursor.get("id")))


class EngineRouter:
    """Serves one port: the main port (branch None) or a branch's."""

    def __init__(self, engine: Engine, branch: str | None):
        self.engine = engine
        self.branch = branch
        self.table = BRANCH if branch is not None else MAIN

    def wants(self, name: str) -> bool:
        if self.branch is None:
            if name in mainwrite.NAMES:
                return self.engine.intercepting_main()
            return name in self.table
        if name in masking.REFUSED_COMMANDS:
            # Refused in _serve on a masked branch (set at its creation, never changed).
            branch = self.engine.branches.get(self.branch)
            return branch is not None and branch.masked
        return name not in FORWARDED

    def inline(self, ctx: Context, name: str, body: bytes) -> Inline | None:
        """A branch's find that `_serve` would answer with the client's own command on
        the base, checked against the capture afterwards (`_read`), answered without a
        task: the same fences, taken where they would not wait, the same ping behind it
        and the same check, on its raw reply. Anything that check does not pass (the
        capture not past the ping's time, a preservation meanwhile, an error) is dropped
        and served by `handle`, from the start."""
        if name != "find" or self.branch is None or (
                _SINGLE_BATCH not in body and _LIMIT not in body):
            return None  # never one batch (viewdefs.find_passes): not worth decoding here
        engine = self.engine
        branch = engine.branches.get(self.branch)
        if (branch is None or branch.deleted_at is not None or engine.unavailable is not None
                or branch.name in engine.migrating or engine.failpoints.armed(name)):
            return None
        try:
            cmd = decode(body)
        except Exception:
            return None  # refused in mongod's words by the usual path
        db = cmd.get("$db")
        if not isinstance(db, str) or not viewdefs.find_passes(engine, branch, db, cmd):
            return None
        try:
            authz.check_branch_port(cmd, db, engine.meta_db, branch.name)
        except CommandError:
            return None
        chain = engine.chain(branch)
        held = engine.try_reading(chain[1:])
        if held is None:
            return None
        branch.used = time.time()
        capture = engine.capture
        if capture is None or not capture.running:
            # Reads wait for no capture (as `reading(exact=True)` waits for none then).
            def passes(reply: bytes | None, after: list[bytes]) -> bool:
                engine.stop_reading(held)
                return reply is not None and raw_ok(reply) is True
            return Inline((), passes)
        root = chain[-1].bid
        since = capture.generation.get(root, 0)

        def checked(reply: bytes | None, after: list[bytes]) -> bool:
            engine.stop_reading(held)
            if reply is None or raw_ok(reply) is not True:
                return False
            # As `_read`: the upstream's time once the read had run, which the capture
            # must have passed with nothing preserved for the child meanwhile.
            at = raw_timestamp(after[0], b"operationTime")
            return (at is not None and capture.running and at <= capture.position
                    and capture.generation.get(root, 0) == since)
        return Inline(_CLOCK, checked)

    async def handle(self, ctx: Context, msg: OpMsg
                     ) -> dict[str, Any] | Continued | Passed | None:
        try:
            reply = await self._serve(ctx, msg)
        except CommandError as exc:
            reply = exc.to_reply()
        if reply is None or isinstance(reply, Passed):
            # Passed: the upstream's own successful reply to the client's read, in
            # mongod's order with its own cluster time (never a masked one's explain).
            return reply
        reply = self._unsalted(msg, reply)
        reply = in_mongod_order(reply, ctx.gossip)
        if msg.flags & EXHAUST_ALLOWED and _continues(msg, reply):
            # mongod's exhaust getMore: the same getMore again, answered without a request,
            # until the cursor is exhausted (a cursor the upstream holds is forwarded, flag
            # and all, and the upstream streams it).
            return Continued(reply, lambda: self.handle(ctx, msg))
        return reply

    def _unsalted(self, msg: OpMsg, reply: dict[str, Any]) -> dict[str, Any]:
        """On a masked branch, an explain or an error may quote the masking stage: its
        salt is taken out (documents never hold it; their replies are left alone)."""
        branch = self.engine.branches.get(self.branch) if self.branch is not None else None
        if branch is None or not branch.masked or branch.mask_salt is None:
            return reply
        cmd = msg.command
        if reply.get("ok") and next(iter(cmd), None) != "explain" and not cmd.get("explain"):
            return reply
        scrubbed: dict[str, Any] = masking.scrub(reply, branch.mask_salt)
        return scrubbed

    async def _serve(self, ctx: Context, msg: OpMsg) -> dict[str, Any] | Passed | None:
        cmd = msg.command
        name = next(iter(cmd))
        db = cmd.get("$db")
        if not isinstance(db, str):
            raise CommandError(Code.OP_MSG_NEEDS_DB, "OP_MSG requests require a $db argument")
        branch = None
        if self.branch is not None and self.engine.unavailable is not None:
            # A branch port open while the engine starts (this process just took the
            # engine lease over, cluster.py): its requests wait for it a while, so that a
            # driver's one retry after the old process died succeeds.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.engine.ready.wait(), STARTING_WAIT)
            if self.engine.unavailable is not None:
                labels = ["TransientTransactionError"] if cmd.get("autocommit") is False \
                    else ["RetryableWriteError"] if "txnNumber" in cmd else []
                raise CommandError(Code.HOST_UNREACHABLE, self.engine.unavailable,
                                   errorLabels=labels)
        if self.branch is not None:
            branch = self.engine.branches.get(self.branch)
            if branch is None or branch.deleted_at is not None:
                raise CommandError(Code.NAMESPACE_NOT_FOUND, f"branch {self.branch!r} was dropped")
            branch.used = time.time()  # its idle clock (lifecycle.py); hello/ping do not count
            if branch.name in self.engine.migrating:
                raise CommandError(
                    Code.INTERRUPTED_DUE_TO_REPL_STATE_CHANGE,
                    f"branch {branch.name!r} is migrating to {branch.migrating} mode; retry",
                    errorLabels=["RetryableWriteError"])
            if name not in ADMIN:
                authz.check_branch_port(cmd, db, self.engine.meta_db, branch.name)
            # A masked branch's port describes only itself: other branch commands could
            # read history (unmasked images), make an unmasked branch, or list the ports
            # of branches that are not masked.
            if branch.masked and (name in masking.REFUSED_COMMANDS or (
                    name in ADMIN and (name, cmd.get(name)) != ("branchInfo", branch.name))):
                raise masking.refusal(f"command {name!r}", branch.name)
        handler = self.table.get(name)
        if handler is None and self.branch is not None and name in REFUSED:
            raise CommandError(Code.COMMAND_NOT_SUPPORTED,
                               f"{name} is not supported on branch {self.branch!r} "
                               f"(mongobranch): {REFUSED[name]}")
        if handler is None:
            raise not_supported(f"command {name!r}", self.branch or "main")
        if name not in READS:
            await ctx.authenticated_user()  # the WAL and the audit name who did it
        req = Request(self.engine, branch, ctx,
                      Runner(ctx.upstream_command, ctx.upstream_commands, ctx.upstream_raw),
                      db, cmd)
        if name in audit.WIRE_OPS:
            return await self._audited(name, ctx, handler, req)
        if name in ADMIN or name in UNFENCED:
            return await handler(req)
        if in_transaction(cmd):
            if branch is None:
                return await handler(req)
            return await self._in_transaction(ctx, branch, name, handler, req)
        if not self.engine.failpoints.armed(name):
            return await self._fenced(name, cmd, handler, req)
        # A failpoint names the command: the upstream is asked whether it fires on it
        # (commands/failpoints.py), as a main port's write handled while main has
        # branches (mainwrite.py) and a branch's handler both send it other commands.
        probed = await failpoints.probe(req)
        if probed is not None and not probed.get("ok"):
            return probed
        reply = await self._fenced(name, cmd, handler, req)
        if probed is not None and reply is not None:
            reply = failpoints.with_wce(
                decode(reply.body) if isinstance(reply, Passed) else reply, probed)
        return reply

    async def _fenced(self, name: str, cmd: dict[str, Any], handler: Handler,
                      req: Request) -> dict[str, Any] | Passed | None:
        branch = req.branch
        if branch is None:
            return await handler(req)
        if name == "getMore" and changestream.held(req):
            return await handler(req)  # a change stream reads only the WAL
        if name == "getMore" and self.engine.cursors.tailing(cmd.get("getMore")):
            # A tailable cursor's getMore may wait up to maxAwaitTimeMS for new documents
            # of the branch's own collection, which main's writes never change: it holds
            # no fence that main's writes would wait for.
            return await handler(req)
        # What the branch reads through must not change under it half-preserved
        # (snapshot.py); admin commands take what they need themselves. A read is
        # checked against the capture after it ran (and run again in the rare case it
        # raced a preservation); a write waits for the capture before it runs.
        checked = self._checked_read(name, cmd)
        async with self.engine.reading(self.engine.ancestors(branch),
                                       exact=not checked and name not in CURSOR_OPS):
            await hints.check(req)
            if not checked:
                return await handler(req)
            return await self._read(branch, handler, req)

    async def _in_transaction(self, ctx: Context, branch: Branch, name: str,
                              handler: Handler, req: Request) -> dict[str, Any]:
        """A statement of a multi-document transaction: every upstream call it makes runs
        in the transaction's session (txn.py), on the engine's client. A statement that
        fails aborts the transaction, as on mongod."""
        txns = self.engine.txns
        txn = await txns.enter(branch, req.cmd)
        own = req.run
        req.run = self.engine.pool
        failed: list[dict[str, Any]] = []
        async with txn.mutex:
            if txn.ended:
                raise no_such(f"Transaction with txnNumber {txn.key[1]} has been aborted")
            token = FAILED.set(failed)
            try:
                if name not in IN_TXN:
                    raise CommandError(Code.OPERATION_NOT_SUPPORTED_IN_TRANSACTION,
                                       f"Cannot run '{name}' in a multi-document transaction "
                                       f"on branch {branch.name!r}")
                handler = TXN.get(name, handler)
                if not ctx.as_uri_user:
                    # The transaction's session is the engine's, and runs as the URI's
                    # user: the client's own privileges (an anonymous client's too,
                    # when it is not lent that user) judge each statement first.
                    await authz.require_statement(own, req.db, req.cmd)
                with txns.active(txn):
                    if txn.begun:
                        # The upstream snapshot is set: no write of an ancestor (nor of
                        # main, preserved by the capture) half-preserved can show in it,
                        # and waiting for their fences or the capture here could wait
                        # for this transaction's own lock (the capture's copy-up does).
                        reply = await self._txn_statement(handler, req)
                    else:
                        async with self.engine.reading(self.engine.ancestors(branch),
                                                       exact=name not in CURSOR_OPS):
                            await txns.begin(txn)
                            reply = await self._txn_statement(handler, req)
            except CommandError as exc:
                await txns.abort_held(txn)
                raise transient(first_failure(failed) or exc) from None
            except BaseException:
                await txns.abort_held(txn)
                raise
            finally:
                FAILED.reset(token)
            if not reply.get("ok") or reply.get("writeErrors"):
                await txns.abort_held(txn)
            elif failed:  # an error the handler got past: the upstream transaction is over
                await txns.abort_held(txn)
                raise transient(first_failure(failed) or no_such("transaction aborted"))
        return reply

    @staticmethod
    async def _txn_statement(handler: Handler, req: Request) -> dict[str, Any]:
        await hints.check(req)
        reply = await handler(req)
        if reply is None:  # what a branch forwards, run in the session
            reply = await req.run.reply(req.db, req.cmd)
        return reply

    def _checked_read(self, name: str, cmd: dict[str, Any]) -> bool:
        capture = self.engine.capture
        if capture is None or not capture.running or name not in CHECKED_READS:
            return False
        if name == "aggregate":
            pipeline = cmd.get("pipeline")
            return isinstance(pipeline, list) and not any(
                isinstance(stage, dict) and {"$out", "$merge"} & set(stage)
                for stage in pipeline)
        return True

    async def _read(self, branch: Branch, handler: Handler,
                    req: Request) -> dict[str, Any] | Passed | None:
        capture = self.engine.capture
        assert capture is not None
        root = self.engine.chain(branch)[-1].bid
        for _ in range(READ_ATTEMPTS):
            since = capture.generation.get(root, 0)
            # The upstream's time once the read's last command had run: at least that of
            # every write the answer shows, and of every write acknowledged before the
            # read began. A ping pipelined behind each of the read's commands gives it
            # (a reply's own operationTime does not: SecantusDB may stamp a read before
            # a write it already sees); a read that sent nothing asks afterwards.
            run = req.run.clocked()
            reply: dict[str, Any] | Passed | None = await handler(
                Request(req.engine, req.branch, req.ctx, run, req.db, req.cmd))
            if reply is None:
                # A pass-through read: sent here rather than forwarded after, so that the
                # ping follows it; its answer goes to the client as the upstream sent it
                # (on a masked branch, decoded: an error may quote the masking stage).
                own = {k: v for k, v in req.cmd.items() if k != "$db"}
                reply = await (run.reply(req.db, own) if branch.masked
                               else run.passed(req.db, own))
            at = now_of(run.after) if run.after is not None else await capture.clock()
            if await capture.checked(root, since, at):
                return reply
            await self._discard(req, reply)
        # Main keeps changing under the reads: wait for the capture first, as writes do.
        await capture.barrier()
        return await handler(req)

    async def _discard(self, req: Request, reply: dict[str, Any] | Passed | None) -> None:
        """A read answered again: the cursor its first answer opened is closed."""
        if isinstance(reply, Passed):
            reply = decode(reply.body)
        cursor = reply.get("cursor") if isinstance(reply, dict) else None
        if not isinstance(cursor, dict) or not cursor.get("id"):
            return
        ns = cursor.get("ns")
        coll = ns.split(".", 1)[1] if isinstance(ns, str) and "." in ns else ""
        kill = Request(self.engine, req.on_branch, req.ctx, req.run, req.db,
                       {"killCursors": coll, "cursors": [cursor["id"]], "$db": req.db})
        await BRANCH["killCursors"](kill)

    async def _audited(self, name: str, ctx: Context, handler: Handler,
                       req: Request) -> dict[str, Any] | None:
        """A branch operation, with its audit line whatever its outcome."""
        target = req.cmd[name]
        try:
            reply = await handler(req)
        except CommandError as exc:
            audit.record(name, branch=target, user=ctx.user, client=ctx.peer, via="wire",
                         outcome=audit.outcome_of(exc.code, http=False), code=exc.code,
                         error=str(exc), port=self.branch or "main")
            raise
        except Exception as exc:
            audit.record(name, branch=target, user=ctx.user, client=ctx.peer, via="wire",
                         outcome="failed", error=repr(exc), port=self.branch or "main")
            raise
        audit.record(name, branch=target, user=ctx.user, client=ctx.peer, via="wire",
                     outcome="ok", port=self.branch or "main",
                     dry_run=req.cmd.get("dryRun") is True)
        return reply
