"""Scale-out: which of several `mongobranch serve` processes runs the branch engine.

One process at a time holds the engine lease, a document in the metadata database
({_id: "engine", owner, addr, main, admin, expires}); it serves every branch and the
main port's intercepted writes, and the others relay those clients to it byte for byte
(docs/ARCHITECTURE.md, "Scale-out"). The lease is taken and renewed with one
conditional findAndModify (owner is me, or the lease has expired), every third of its
length. Times are the upstream's (hello's localTime), so the processes' clocks need
not agree.

A holder that cannot renew before its lease runs out stops at once: a successor may
hold the lease by then, and two engines must never write beside each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from pymongo import AsyncMongoClient, ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from proxy import metrics

log = logging.getLogger("mongobranch.cluster")

LEASE_ID = "engine"
# The share of its lease a holder counts on: it stops serving once this much has passed
# since its last renewal was sent without a newer one, before any other process may
# take the lease over.
SAFE = 0.8


class Cluster:
    def __init__(self, client: AsyncMongoClient[dict[str, Any]], meta_db: str, *,
                 lease: float, addr: str, main_port: int, admin: str, handoff: str = ""):
        self.client = client
        self.leases = client[meta_db]["leases"]
        self.lease = lease
        # This process, unique across restarts and machines.
        self.me = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.addr = addr
        self.main_port = main_port
        self.admin = admin
        # Workers of one machine (--workers): the Unix socket name under which this
        # process takes connections and main-port calls of the others; "" otherwise.
        self.handoff = handoff
        # The lease document as last read (None: never read, or nobody holds it).
        self.holder: dict[str, Any] | None = None
        # Local monotonic time until which this process's lease surely holds.
        self._valid_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self._promotion: asyncio.Task[None] | None = None
        # Called once this process took the lease (it then runs the engine); and when it
        # held it and cannot renew it in time (it must stop serving at once).
        self.on_acquired: Callable[[], Coroutine[Any, Any, None]] | None = None
        self.on_lost: Callable[[], None] = _exit_lost
        # Called every round, leader or not (the serving layer opens branch ports).
        self.on_tick: Callable[[], Awaitable[None]] | None = None
        self.leading = False
        self.ready = asyncio.Event()  # set after the first round

    def leader(self) -> dict[str, Any] | None:
        """The lease holder's document, while its lease runs."""
        return self.holder

    def relay_host(self) -> str | None:
        """Where clients this process does not serve go (None: served here)."""
        if self.leading:
            return None
        return self.holder["addr"] if self.holder is not None else None

    def owner(self) -> dict[str, Any] | None:
        if self.holder is None:
            return None
        return {"id": self.holder["owner"], "addr": self.holder["addr"],
                "admin": self.holder.get("admin"), "this_process": self.leading}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        for task in (self._task, self._promotion):
            if task is not None:
                task.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.leading:
            # Handed over at once rather than after the lease runs out.
            try:
                await self.leases.update_one({"_id": LEASE_ID, "owner": self.me},
                                             {"$set": {"expires": dt.datetime(1970, 1, 1)}})
            except PyMongoError as exc:
                log.warning("could not release the engine lease: %s", exc)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            # A holder's round may last only as long as its lease surely holds.
            limit = self._valid_until - started if self.leading else self.lease
            try:
                await asyncio.wait_for(self.round(started), max(0.05, limit))
            except (PyMongoError, TimeoutError) as exc:
                log.warning("engine lease: %s", exc or "no answer in time")
            if self.leading and loop.time() >= self._valid_until:
                self.on_lost()
                return
            self.ready.set()
            if self.on_tick is not None:
                try:
                    await self.on_tick()
                except Exception:
                    log.exception("scale-out round failed; it runs again")
            wake = started + self.lease / 3
            if self.leading:
                wake = min(wake, self._valid_until)  # a holder checks its lease in time
            await asyncio.sleep(max(0.0, wake - loop.time()))

    async def round(self, started: float) -> None:
        """One attempt to take or renew the lease; learns the holder either way."""
        hello = await self.client.admin.command("hello")
        now = hello.get("localTime") or dt.datetime.now(dt.UTC).replace(tzinfo=None)
        expires = now + dt.timedelta(seconds=self.lease)
        try:
            before = await self.leases.find_one_and_update(
                {"_id": LEASE_ID, "$or": [{"owner": self.me}, {"expires": {"$lt": now}}]},
                {"$set": {"owner": self.me, "addr": self.addr, "main": self.main_port,
                          "admin": self.admin, "handoff": self.handoff, "expires": expires}},
                upsert=True, return_document=ReturnDocument.BEFORE)
        except DuplicateKeyError:
            self.holder = await self.leases.find_one({"_id": LEASE_ID})
            if self.leading:
                log.error("the engine lease was taken by %s",
                          self.holder["owner"] if self.holder else "another process")
                self.on_lost()
            return
        # Measured from before the request, less a margin for a slow loop: the lease
        # surely holds until then.
        self._valid_until = started + self.lease * SAFE
        self.holder = {"_id": LEASE_ID, "owner": self.me, "addr": self.addr,
                       "main": self.main_port, "admin": self.admin, "handoff": self.handoff,
                       "expires": expires}
        if self.leading:
            return
        self.leading = True
        metrics.CLUSTER_LEADER.set(1)
        previous = before.get("owner") if before else None
        if previous is not None and previous != self.me:
            metrics.CLUSTER_TAKEOVERS.inc()
            log.warning("took over the branch engine from %s (its lease expired)", previous)
        else:
            log.info("holding the engine lease (%s)", self.me)
        if self.on_acquired is not None:
            # Apart from this loop: the engine's start may take longer than a renewal.
            self._promotion = asyncio.create_task(self.on_acquired())


def _exit_lost() -> None:
    log.critical("the engine lease could not be renewed in time; stopping at once so that "
                 "its next holder is the only engine writing")
    logging.shutdown()
    os._exit(3)
