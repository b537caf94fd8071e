"""Group commit of WAL appends (issue 16): appends that wait while another's insert is
under way are stored together in one insert, and each still gets its own LSNs and its
own outcome. Run on the engine's Wal against the real upstream; the insert under way is
held explicitly (the store lock taken by the test), not raced."""

from __future__ import annotations

import asyncio
from typing import Any

from pymongo import AsyncMongoClient, MongoClient, monitoring

from proxy.branching.wal import PUT, Change, Wal
from tests.servers import Secantus


class _Inserts(monitoring.CommandListener):
    """The insert commands this client sends to the WAL: the driver's own count, which
    other work on the shared upstream cannot move (its opcounters can)."""

    def __init__(self) -> None:
        self.n = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "insert" and event.command.get("insert") == "wal":
            self.n += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_waiting_appends_are_stored_in_one_insert(upstream: Secantus,
                                                        direct: MongoClient,
                                                        db_name: str) -> None:
    inserts = _Inserts()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        upstream.uri, directConnection=True, event_listeners=[inserts])
    try:
        wal = Wal(client, db_name)
        await wal.init()
        first = await wal.append("b1", [Change("d.c", 0, PUT, None, {"_id": 0})], {"conn": 1})
        before = inserts.n
        # The store lock held, as while an insert is under way: the appends queue up.
        async with wal._storing:
            appends = [asyncio.ensure_future(wal.append(
                f"b{i}", [Change("d.c", i, PUT, None, {"_id": i, "n": j}) for j in range(i)],
                {"conn": i})) for i in (1, 2, 3)]
            while len(wal._pending) < 3:
                await asyncio.sleep(0)
            assert not any(a.done() for a in appends)
        lasts = await asyncio.gather(*appends)
        assert inserts.n - before == 1
        # Each append's own LSNs, in order after the earlier one, none shared.
        assert sorted(lasts) == lasts and lasts[0] > first
        stored = list(direct[db_name]["wal"].find({"_id": {"$gt": first}}).sort("_id", 1))
        assert [(e["b"], e["post"]["n"]) for e in stored] == [
            ("b1", 0), ("b2", 0), ("b2", 1), ("b3", 0), ("b3", 1), ("b3", 2)]
        assert [e["_id"] for e in stored if e["_id"] in lasts] == lasts
    finally:
        await client.close()


async def test_a_group_with_an_entry_over_the_limit(upstream: Secantus, direct: MongoClient,
                                                   db_name: str) -> None:
    """One waiting append's entry over 16 MiB (an update's pre- and post-image of a 9 MB
    document): the group is stored all the same, that entry with compressed images."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(upstream.uri,
                                                                directConnection=True)
    big = 9 * 1024 * 1024
    try:
        wal = Wal(client, db_name)
        await wal.init()
        async with wal._storing:
            appends = [asyncio.ensure_future(wal.append(f"b{i}", [Change(
                "d.c", i, PUT, {"_id": i, "s": "a" * (big if i == 2 else 1)},
                {"_id": i, "s": "b" * (big if i == 2 else 1)})], {"conn": i}))
                for i in (1, 2, 3)]
            while len(wal._pending) < 3:
                await asyncio.sleep(0)
        lasts = await asyncio.gather(*appends)
        stored = {e["b"]: e for e in direct[db_name]["wal"].find({"_id": {"$in": lasts}})}
        assert sorted(stored) == ["b1", "b2", "b3"]
        assert "prez" in stored["b2"] and "postz" in stored["b2"]
        assert stored["b1"]["post"] == {"_id": 1, "s": "b"}
        assert stored["b3"]["pre"] == {"_id": 3, "s": "a"}
    finally:
        await client.close()
