"""The clock of an exact read (docs/ARCHITECTURE.md, "Snapshots"): the `ping` whose time
a branch read is checked against must run after the read's commands, on the same
connection, or a write landing between the two would pass unseen by the check."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.branching.runner import Runner

Sent = list[tuple[tuple[str, dict[str, Any]], ...]]


def recording() -> tuple[Runner, Sent]:
    sent: Sent = []
    clock = iter(range(1, 100))

    async def raw(db: str, cmd: dict[str, Any]) -> dict[str, Any]:
        return (await pipelined((db, cmd)))[0]

    async def pipelined(*requests: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
        sent.append(requests)
        return [{"ok": 1.0, "at": next(clock), "for": next(iter(cmd))} for _, cmd in requests]

    return Runner(raw, pipelined), sent


def test_a_clocked_runner_sends_the_ping_behind_each_exchange_in_one_write() -> None:
    runner, sent = recording()
    clocked = runner.clocked()

    async def read() -> None:
        assert (await clocked.reply("app", {"find": "items"}))["for"] == "find"
        replies = await clocked.replies("app", [{"find": "a"}, {"find": "b"}])
        assert [r["for"] for r in replies] == ["find", "find"]

    asyncio.run(read())
    assert [[next(iter(cmd)) for _, cmd in write] for write in sent] == [
        ["find", "ping"], ["find", "find", "ping"]]
    assert sent[0][1] == ("admin", {"ping": 1})
    # The time kept is the latest ping's: after every command sent so far.
    assert clocked.after is not None and clocked.after["at"] == 5


def test_an_unclocked_runner_sends_no_ping_and_pipelines_only_what_is_sent_together() -> None:
    runner, sent = recording()

    async def run() -> None:
        await runner.reply("app", {"find": "items"})
        await runner("app", {"count": "items"})
        await runner.replies("app", [{"find": "a"}, {"find": "b"}])

    asyncio.run(run())
    assert [[next(iter(cmd)) for _, cmd in write] for write in sent] == [
        ["find"], ["count"], ["find", "find"]]
    assert runner.after is None


def test_without_pipelining_a_clocked_runner_sends_commands_alone() -> None:
    sent: list[str] = []

    async def raw(db: str, cmd: dict[str, Any]) -> dict[str, Any]:
        sent.append(next(iter(cmd)))
        return {"ok": 1.0}

    clocked = Runner(raw).clocked()
    asyncio.run(clocked.replies("app", [{"find": "a"}, {"find": "b"}]))
    assert sent == ["find", "find"]
    assert clocked.after is None
