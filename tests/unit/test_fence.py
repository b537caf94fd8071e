"""The fence between a branch's writers and its descendants' commands (snapshot.py):
its uncontended path takes no lock, and must still keep both sides apart and let
them take turns."""

from __future__ import annotations

import asyncio

from proxy.branching.snapshot import Fence


async def _let_run() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_readers_share_the_fence_and_a_writer_waits_for_them() -> None:
    async def run() -> list[str]:
        fence = Fence()
        order: list[str] = []
        release = asyncio.Event()

        async def reader(name: str) -> None:
            async with fence.hold("r"):
                order.append(f"{name} in")
                await release.wait()
            order.append(f"{name} out")

        async def writer() -> None:
            async with fence.hold("w"):
                order.append("w in")

        r1 = asyncio.create_task(reader("r1"))
        r2 = asyncio.create_task(reader("r2"))
        await _let_run()
        w = asyncio.create_task(writer())
        await _let_run()
        assert order == ["r1 in", "r2 in"]  # both readers at once; the writer waits
        # A reader arriving while the writer waits goes after it (turns).
        r3 = asyncio.create_task(reader("r3"))
        await _let_run()
        assert "r3 in" not in order
        release.set()
        await asyncio.gather(r1, r2, w, r3)
        return order

    order = asyncio.run(run())
    assert order.index("w in") > max(order.index("r1 out"), order.index("r2 out"))
    assert order.index("r3 in") > order.index("w in")


def test_a_writer_holding_the_fence_keeps_readers_out_until_it_leaves() -> None:
    async def run() -> None:
        fence = Fence()
        release = asyncio.Event()
        entered: list[str] = []

        async def writer() -> None:
            async with fence.hold("w"):
                entered.append("w")
                await release.wait()

        async def reader() -> None:
            async with fence.hold("r"):
                entered.append("r")

        w = asyncio.create_task(writer())
        await _let_run()
        r = asyncio.create_task(reader())
        await _let_run()
        assert entered == ["w"]
        release.set()
        await asyncio.gather(w, r)
        assert entered == ["w", "r"]
        # Nothing left held: both sides enter at once again.
        async with fence.hold("w"):
            pass
        async with fence.hold("r"):
            pass

    asyncio.run(run())


def test_try_acquire_takes_only_what_acquire_would_take_at_once() -> None:
    """The inline reads' synchronous form (Fence.try_acquire/release_soon): readers share
    it, a writer holding or awaiting it keeps them out, and a release wakes a waiter."""
    async def run() -> list[str]:
        fence = Fence()
        order: list[str] = []
        assert fence.try_acquire("r") and fence.try_acquire("r")

        async def writer() -> None:
            async with fence.hold("w"):
                order.append("w in")
                assert not fence.try_acquire("r")

        w = asyncio.create_task(writer())
        await _let_run()
        assert order == []
        assert not fence.try_acquire("r")  # a writer waits: no reader jumps ahead of it
        fence.release_soon("r")
        fence.release_soon("r")
        await w
        assert fence.try_acquire("r")
        fence.release_soon("r")
        assert fence.try_acquire("w")
        return order

    assert asyncio.run(run()) == ["w in"]
