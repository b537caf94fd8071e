"""A branch's write lock: exclusive for most writes, shared for point writes.

A write that names its one document up front (an insert of one document, or one
statement whose filter is an equality on _id) touches only that document's overlay
entry, hidden id and WAL entries, so such writes on different ids can run side by
side, as mongod's document locks let them. They hold the branch lock shared plus a
lock on (namespace, _id); one key each, so no order is needed against deadlock.
Everything else (multi-document writes, DDL, merge, reset, gc, clearing dirty
markers) holds it exclusive, and a waiting exclusive holder keeps new shared holders
out so it is not starved.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable


class BranchLock:
    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0
        self._ids: dict[Hashable, tuple[asyncio.Lock, int]] = {}
        # Serializes the set-up of a write (overlay creation, dirty marker) among
        # shared holders.
        self.setup = asyncio.Lock()

    def locked(self) -> bool:
        return self._exclusive or self._shared > 0 or self._waiting > 0

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def shared(self, key: Hashable) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            async with self._id_lock(key):
                yield
        finally:
            async with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def _id_lock(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._ids.get(key, (asyncio.Lock(), 0))
        self._ids[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._ids[key]
            if users == 1:
                del self._ids[key]
            else:
                self._ids[key] = (lock, users - 1)
