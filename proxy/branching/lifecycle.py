"""Branch lifecycle (docs/ARCHITECTURE.md, "Lifecycle"): expiry, protection, refresh and
soft delete, over the engine's own create/fork/forget.

- A branch may carry an absolute expiry (`expires_at`) and an idle expiry (`idle_ttl`:
  seconds without a client request on its port). The reaper, a task of the serving layer,
  drops what is due every `--reap-interval` seconds. A branch with live children or a
  protected one is never expired: the reaper logs why (once) and tries again next time.
- A protected branch (and main, by default) is not dropped, reset, refreshed or merged
  into without `force`.
- A drop keeps the branch for `--deleted-retention`: its port closes, its records, overlays
  and WAL stay, and it still counts as a child of its parent, so the parent's writes keep
  preserving what it showed (snapshot.py) and a restore brings it back exactly as it was.
  Its name and port stay reserved until the reaper purges it.
- A refresh gives a branch a new identity (bid) forked at its parent's current state,
  with the same name, port and lifecycle settings, and removes the old identity's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.branching import audit
from proxy.branching.errors import BranchError, Kind
from proxy.branching.model import Branch
from proxy.branching.naming import MAIN

if TYPE_CHECKING:
    from proxy.branching.engine import Engine

log = logging.getLogger("mongobranch.lifecycle")

DEFAULT_RETENTION = dt.timedelta(hours=24)
DEFAULT_REAP_INTERVAL = 60.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(?:\d+[smhdw])+")
# The metadata collection holding main's protection once it was set through the API.
SETTINGS = "settings"


@dataclass
class Lifecycle:
    """The engine's lifecycle settings and the reaper's memory."""

    # How long a dropped branch stays restorable; zero: a drop removes it at once.
    retention: dt.timedelta = DEFAULT_RETENTION
    # main's protection when none was set through the API (serve --protect-main).
    protect_main: bool = True
    # main's protection as set through the API (persisted); None: protect_main.
    main_protected: bool | None = None
    # Idle clocks start no earlier than this process: downtime of the proxy is not idleness.
    started: dt.datetime = field(default_factory=lambda: _now())
    # (branch, reason) the reaper already logged as not expirable, so it says it once.
    reported: set[tuple[str, str]] = field(default_factory=set)
    # Serializes drops, restores, refreshes and reaps with one another.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Reaper passes finished (for tests and /reap's answer).
    passes: int = 0


def _now() -> dt.datetime:
    return ms(dt.datetime.now(dt.UTC).replace(tzinfo=None))


def ms(value: dt.datetime) -> dt.datetime:
    """BSON keeps milliseconds: a time held in memory equals the one read back."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.replace(tzinfo=dt.UTC).isoformat()


# -- parsing -------------------------------------------------------------------------------
def parse_duration(value: Any, what: str) -> dt.timedelta:
    """`30s`, `15m`, `2h`, `7d`, `2w` or combined (`1h30m`); a positive number of seconds."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return dt.timedelta(seconds=value)
    text = value.strip().lower() if isinstance(value, str) else None
    if text is None or not _DURATION.fullmatch(text):
        raise BranchError(Kind.INVALID, f"{what} must be a duration such as 30m, 2h, 7d or 1h30m "
                                        f"(in JSON also seconds as an integer), got {value!r}")
    seconds = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([smhdw])", text))
    if seconds <= 0:
        raise BranchError(Kind.INVALID, f"{what} must be longer than zero, got {value!r}")
    return dt.timedelta(seconds=seconds)


def parse_time(value: Any, what: str) -> dt.datetime:
    """An ISO-8601 time as naive UTC (the engine's convention); without an offset, UTC."""
    if not isinstance(value, str):
        raise BranchError(Kind.INVALID, f"{what} must be an ISO-8601 time such as "
                                        f"2026-12-01T09:00:00Z, got {value!r}")
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise BranchError(Kind.INVALID, f"{what} must be an ISO-8601 time such as "
                                        f"2026-12-01T09:00:00Z, got {value!r}") from exc
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed


FIELDS = frozenset({"ttl", "expires_at", "idle_ttl", "protected"})


def settings(body: dict[str, Any], now: dt.datetime | None = None) -> dict[str, Any]:
    """The lifecycle changes a request asks for (the Branch fields they set), validated
    before anything changes: `ttl` (from now) or `expires_at`, `idle_ttl`, `protected`;
    null clears an expiry."""
    now = now or _now()
    out: dict[str, Any] = {}
    if "ttl" in body and "expires_at" in body:
        raise BranchError(Kind.INVALID, "give either ttl or expires_at, not both")
    if "ttl" in body:
        ttl = body["ttl"]
        out["expires_at"] = None if ttl is None else ms(now + parse_duration(ttl, "ttl"))
    if "expires_at" in body:
        at = body["expires_at"]
        out["expires_at"] = None if at is None else ms(parse_time(at, "expires_at"))
        if at is not None and out["expires_at"] <= now:
            raise BranchError(Kind.INVALID, f"expires_at {at!r} is in the past (now is {iso(now)})")
    if "idle_ttl" in body:
        idle = body["idle_ttl"]
        out["idle_ttl"] = (None if idle is None
                           else int(parse_duration(idle, "idle_ttl").total_seconds()))
    if "protected" in body:
        if not isinstance(body["protected"], bool):
            raise BranchError(Kind.INVALID, f"protected must be true or false, got "
                                            f"{body['protected']!r}")
        out["protected"] = body["protected"]
    return out


# -- protection ----------------------------------------------------------------------------
def is_protected(engine: Engine, name: str) -> bool:
    if name == MAIN:
        chosen = engine.lifecycle.main_protected
        return engine.lifecycle.protect_main if chosen is None else chosen
    branch = engine.branches.get(name)
    return branch is not None and branch.protected


def guard(engine: Engine, name: str, force: bool, action: str) -> None:
    """Refuses (409) an action on a protected branch without force."""
    if is_protected(engine, name) and not force:
        raise BranchError(Kind.CONFLICT, f"branch {name!r} is protected: {action} it needs force "
                                         "(API: ?force=true or \"force\": true; CLI: --force), or "
                                         f"unprotect it first (`branch unprotect {name}`)")


async def load(engine: Engine) -> None:
    """main's protection as set through the API, if it ever was."""
    doc = await engine.meta[SETTINGS].find_one({"_id": MAIN})
    engine.lifecycle.main_protected = None if doc is None else bool(doc.get("protected"))


async def update(engine: Engine, name: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Applies changes of a branch's expiry, idle expiry or protection (from `settings`;
    main's only `protected`, which requests.parse_update sees to)."""
    if name == MAIN:
        engine.check_ready()
        if "protected" in changes:
            await engine.meta[SETTINGS].replace_one(
                {"_id": MAIN}, {"_id": MAIN, "protected": changes["protected"]}, upsert=True)
            engine.lifecycle.main_protected = changes["protected"]
            log.info("main is %s", "protected" if changes["protected"] else "unprotected")
        return {"name": MAIN, "protected": is_protected(engine, MAIN)}
    async with engine.lifecycle.lock:  # not under a refresh replacing the record
        branch = engine.get(name)
        await apply(engine, branch, changes)
        return engine.public(branch)


async def apply(engine: Engine, branch: Branch, changes: dict[str, Any]) -> None:
    if not changes:
        return
    for key, value in changes.items():
        setattr(branch, key, value)
    await engine.meta["branches"].update_one({"_id": branch.name}, {"$set": changes})
    # A new expiry is a new question: the reaper may say again why it cannot apply it.
    engine.lifecycle.reported = {r for r in engine.lifecycle.reported if r[0] != branch.name}
    log.info("branch %s: %s", branch.name, ", ".join(
        f"{k}={iso(v) if isinstance(v, dt.datetime) else v}" for k, v in changes.items()))


# -- drop, restore, purge ------------------------------------------------------------------
def deleted(engine: Engine) -> list[Branch]:
    return sorted((b for b in engine.branches.values() if b.deleted_at is not None),
                  key=lambda b: b.name)


def deleted_public(engine: Engine, branch: Branch) -> dict[str, Any]:
    assert branch.deleted_at is not None
    return {**engine.public(branch), "deleted_at": iso(branch.deleted_at),
            "restorable_until": iso(branch.deleted_at + engine.lifecycle.retention)}


async def drop(engine: Engine, name: str, *, force: bool = False, purge: bool = False,
               why: str = "dropped") -> dict[str, Any]:
    """Drops a branch: kept for restore during the retention window, unless purge (or a
    zero window) removes it at once. purge also removes a branch already deleted."""
    async with engine.lifecycle.lock:
        engine.check_ready()
        kept = engine.branches.get(name)
        if purge and kept is not None and kept.deleted_at is not None:
            await _purge_tree(engine, kept, "purged")
            return {"deleted": name}
        branch = engine.get(name)
        guard(engine, name, force, "dropping")
        kids = engine.children(name)
        if kids:
            raise BranchError(Kind.CONFLICT,
                              f"branch {name!r} has child branches: {', '.join(kids)}")
        if purge or engine.lifecycle.retention <= dt.timedelta(0):
            for kid in engine.children(name, deleted=True):
                await _purge_tree(engine, engine.branches[kid], f"its parent {name} was "
                                                                "dropped for good")
            await engine.drop_branch(name)
            return {"deleted": name}
        if engine.ports is not None:
            await engine.ports.close(branch)
        # Its clients cannot end their transactions any more: those would hold its lock.
        await engine.txns.abort_branch(branch)
        async with engine.writing(branch):
            branch.deleted_at = _now()
            await engine.meta["branches"].update_one(
                {"_id": name}, {"$set": {"deleted_at": branch.deleted_at,
                                         "last_used": branch.last_use()}})
        until = branch.deleted_at + engine.lifecycle.retention
        log.info("%s branch %s: restorable until %s (`branch restore %s`)", why, name,
                 iso(until), name)
        return {"deleted": name, "restorable_until": iso(until)}


async def _purge_tree(engine: Engine, branch: Branch, why: str) -> None:
    """Removes a deleted branch and its deleted descendants for good, children first."""
    for kid in engine.children(branch.name, deleted=True):
        await _purge_tree(engine, engine.branches[kid], f"its parent {branch.name} was purged")
    if engine.ports is not None:
        await engine.ports.close(branch)  # a no-op unless it was still live
    await engine.txns.abort_branch(branch)
    async with engine.writing(branch):
        await engine._forget(branch)
    engine._locks.pop(branch.bid, None)
    log.info("purged branch %s (%s): its overlays and WAL are gone", branch.name, why)


async def restore(engine: Engine, name: str, port: int | None = None) -> Branch:
    """Brings a deleted branch back with its data, on its old port unless told another."""
    async with engine.lifecycle.lock:
        engine.check_ready()
        branch = engine.branches.get(name)
        if branch is None:
            raise BranchError(Kind.NOT_FOUND, f"no deleted branch {name!r} is kept (never existed, "
                                              "or purged after the retention window)")
        if branch.deleted_at is None:
            raise BranchError(Kind.CONFLICT, f"branch {name!r} is not deleted")
        parent = engine.branches.get(branch.parent)
        if parent is not None and parent.deleted_at is not None:
            raise BranchError(Kind.CONFLICT, f"branch {name!r} reads through its parent "
                                             f"{branch.parent!r}, which is deleted too: restore "
                                             f"{branch.parent!r} first")
        if port is not None:
            if any(b.port == port for b in engine.branches.values() if b is not branch):
                raise BranchError(Kind.CONFLICT, f"port {port} is already used by another branch")
            branch.port = port
        changes: dict[str, Any] = {"deleted_at": None, "port": branch.port}
        now = _now()
        if branch.expires_at is not None and branch.expires_at <= now:
            # Restored after it expired: it would expire again at once.
            changes["expires_at"] = None
            log.info("branch %s is restored without its past expiry %s", name,
                     iso(branch.expires_at))
        branch.used = time.time()  # its idle clock starts again
        for key, value in changes.items():
            setattr(branch, key, value)
        if engine.ports is not None:
            try:
                await engine.ports.open(branch)
            except OSError as exc:
                branch.deleted_at = now
                raise BranchError(Kind.CONFLICT, f"port {branch.port} cannot be opened: {exc}; "
                                                 "restore it on another port") from exc
        await engine.meta["branches"].update_one({"_id": name}, {"$set": changes})
        log.info("restored branch %s on port %d", name, branch.port)
        return branch


# -- refresh -------------------------------------------------------------------------------
async def refresh(engine: Engine, name: str, force: bool = False) -> Branch:
    """Re-forks a branch at its parent's current state: its changes are discarded, its
    name, port and lifecycle settings stay. Refused while it has children (live or kept
    for restore): they show the branch as it is, and a refresh would change that."""
    async with engine.lifecycle.lock:
        branch = engine.get(name)
        guard(engine, name, force, "refreshing")
        kids = engine.children(name, deleted=True)
        if kids:
            raise BranchError(Kind.CONFLICT,
                              f"branch {name!r} has child branches ({', '.join(kids)}): "
                              "they show it as it is, and a refresh would change that; "
                              "drop them first (deleted ones: purge them)")
        if branch.creating or name in engine.migrating:
            raise BranchError(Kind.CONFLICT, f"branch {name!r} is being copied or migrated; retry")
        if engine.ports is not None:
            await engine.ports.close(branch)
        await engine.txns.abort_branch(branch)  # its changes are discarded anyway
        try:
            fresh = await _refork(engine, branch)
        finally:
            current = engine.branches.get(name, branch)
            if engine.ports is not None:
                await engine.ports.open(current)
        log.info("refreshed branch %s from %s at LSN %d (port %d)", name, fresh.parent,
                 fresh.fork_lsn, fresh.port)
        return fresh


async def _refork(engine: Engine, branch: Branch) -> Branch:
    parent = engine.branches.get(branch.parent)
    # As a create does: the parent's writes wait, so the new fork is at a state no write
    # is half-way through; the branch's own lock keeps its (closed) port's stragglers out.
    async with engine.reading(engine.chain(parent) if parent is not None else []), \
            engine.writing(branch):
        fork_ct = None
        capture = engine.capture
        if branch.parent == MAIN and capture is not None and capture.running:
            # As _fork: what the capture sees after this clock is preserved for it.
            if capture.pre_images:
                await capture.enable_pre_images()
            fork_ct = await capture.clock()
        # A new identity: the old one's isolation breaks are not its own.
        fresh = dataclasses.replace(branch, bid=secrets.token_hex(4),
                                    fork_lsn=await engine.wal.current(), voids=[],
                                    migrating=None, creating=branch.mode == "copy",
                                    fork_ct=fork_ct, breaks=[])
        fresh.used = branch.used
        old = [s for s in engine.states.values() if s.bid == branch.bid]
        # The record switches to the new identity in one write; what is left of the old
        # one is only data no record names.
        await engine.save_branch(fresh)
        engine.branches[branch.name] = fresh
        if fresh.mode == "copy":
            await engine.copy().materialize(engine, fresh)
            fresh.creating = False
            await engine.save_branch(fresh)
        for state in old:
            db = engine.client[state.db]
            await db.drop_collection(state.live)
            await db.drop_collection(state.hidden)
            await engine.meta["namespaces"].delete_one({"_id": state.key})
            engine.states.pop(state.key, None)
        await engine.wal.delete_branch(branch.bid)
        await engine.meta["resets"].delete_many({"b": branch.bid})
        await engine.meta["merges"].delete_one({"_id": branch.name})
    engine._locks.pop(branch.bid, None)
    return fresh


# -- expiry and the reaper -----------------------------------------------------------------
def due(engine: Engine, branch: Branch) -> dt.datetime | None:
    """When the branch expires: the earlier of its expiry and its idle deadline."""
    times = [] if branch.expires_at is None else [branch.expires_at]
    if branch.idle_ttl:
        last = max(t for t in (branch.last_use(), branch.created_at,
                               engine.lifecycle.started) if t is not None)
        times.append(last + dt.timedelta(seconds=branch.idle_ttl))
    return min(times) if times else None


def _depth(engine: Engine, branch: Branch) -> int:
    return len(engine.chain(branch))


async def _save_use(engine: Engine) -> None:
    """Writes each branch's last use to its record, if it moved: at most once a pass."""
    for branch in list(engine.branches.values()):
        last = branch.last_use()
        if last is not None and last != branch.last_used and branch.deleted_at is None:
            branch.last_used = last
            await engine.meta["branches"].update_one({"_id": branch.name},
                                                     {"$set": {"last_used": last}})


async def reap(engine: Engine, now: dt.datetime | None = None,
               dry_run: bool = False) -> dict[str, Any]:
    """One pass: drops the branches due by `now` (children before parents, so a tree
    expiring together goes in one pass) and purges those deleted longer ago than the
    retention window."""
    now = now or _now()
    result: dict[str, Any] = {"now": iso(now), "dry_run": dry_run, "expired": [],
                              "purged": [], "skipped": []}
    engine.check_ready()
    if not dry_run:
        await _save_use(engine)
    live = [b for b in engine.branches.values()
            if b.deleted_at is None and not b.creating and b.name not in engine.migrating]
    expired: set[str] = set()
    for branch in sorted(live, key=lambda b: -_depth(engine, b)):
        when = due(engine, branch)
        if when is None or when > now:
            continue
        reason = None
        if is_protected(engine, branch.name):
            reason = "it is protected"
        else:
            kids = [k for k in engine.children(branch.name) if k not in expired]
            if kids:
                reason = f"it has child branches: {', '.join(kids)}"
        if reason is not None:
            result["skipped"].append({"branch": branch.name, "due": iso(when),
                                      "reason": reason})
            if (branch.name, reason) not in engine.lifecycle.reported:
                engine.lifecycle.reported.add((branch.name, reason))
                log.warning("branch %s expired at %s but is kept: %s", branch.name,
                            iso(when), reason)
            continue
        if not dry_run:
            try:
                await drop(engine, branch.name, force=True, why="expired")
            except BranchError as exc:  # dropped or changed meanwhile: next pass decides
                log.warning("could not expire branch %s: %s", branch.name, exc)
                continue
        expired.add(branch.name)
        result["expired"].append({"branch": branch.name, "due": iso(when)})
        if dry_run:
            continue
        log.info("branch %s expired (due %s)", branch.name, iso(when))
        audit.record("expire", branch=branch.name, user="mongobranch-reaper", client="-",
                     via="reaper", outcome="ok", due=iso(when))
    cutoff = now - engine.lifecycle.retention
    gone = [b for b in engine.branches.values()
            if b.deleted_at is not None and b.deleted_at <= cutoff]
    for branch in sorted(gone, key=lambda b: -_depth(engine, b)):
        if dry_run:
            result["purged"].append(branch.name)
            continue
        async with engine.lifecycle.lock:
            if engine.branches.get(branch.name) is not branch or branch.deleted_at is None \
                    or branch.deleted_at > cutoff:
                continue  # went with its parent, or was restored meanwhile
            await _purge_tree(engine, branch, f"deleted at {iso(branch.deleted_at)}, "
                                              "past the retention window")
        result["purged"].append(branch.name)
        audit.record("purge", branch=branch.name, user="mongobranch-reaper", client="-",
                     via="reaper", outcome="ok")
    if not dry_run:
        async with engine.lifecycle.lock:
            result["orphans"] = await _sweep_orphans(engine)
        engine.lifecycle.passes += 1
    return result


async def _sweep_orphans(engine: Engine) -> list[str]:
    """Removes overlays and WAL entries of identities no branch record names: what a
    crash left between a refresh's switch to its new identity and its removal of the old
    one. Under the lifecycle lock, so no refresh is half-way; a create or drop writes the
    record before the first overlay and removes it after the last."""
    bids = {b.bid for b in engine.branches.values()}
    orphans = sorted({s.bid for s in engine.states.values()
                      if s.bid not in bids and s.bid != MAIN})
    for bid in orphans:
        for state in [s for s in engine.states.values() if s.bid == bid]:
            db = engine.client[state.db]
            await db.drop_collection(state.live)
            await db.drop_collection(state.hidden)
            await engine.meta["namespaces"].delete_one({"_id": state.key})
            engine.states.pop(state.key, None)
        await engine.wal.delete_branch(bid)
        await engine.meta["resets"].delete_many({"b": bid})
        log.warning("removed the overlays and WAL entries of branch identity %s, which no "
                    "branch names (left by a refresh cut off by a crash)", bid)
    return orphans


async def run(engine: Engine, interval: float) -> None:
    """The reaper: a pass every `interval` seconds while the engine is up."""
    while True:
        await asyncio.sleep(interval)
        if engine.unavailable is not None:
            continue
        try:
            await reap(engine)
        except Exception:
            log.exception("branch reaper pass failed; it runs again in %.0fs", interval)


async def save_use(engine: Engine) -> None:
    """At shutdown: last uses not yet written."""
    if engine.unavailable is None:
        with contextlib.suppress(Exception):
            await _save_use(engine)
