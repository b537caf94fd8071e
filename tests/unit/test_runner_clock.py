"""The clock of an exact read (docs/ARCHITECTURE.md, "Snapshots"): the `ping` whose time
a branch read is checked against must run after the read's commands, on the same
connection, or a write landing between the two would pass unseen by the check."""

from __future__ import annotations

import asyncio
from typing import Any

import bson
from bson import Binary, Int64, Regex, Timestamp

from proxy.branching.runner import Runner
from proxy.net.router import Passed
from proxy.wire.bsonutil import raw_ok

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


def undecoded_runner() -> tuple[Runner, Sent, list[bytes]]:
    """A runner whose exchanges answer with the BSON given, in order."""
    sent: Sent = []
    answers: list[bytes] = []

    async def raw(db: str, cmd: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("passed() sends through the undecoded exchange")

    async def pipelined(*requests: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
        raise AssertionError("passed() sends through the undecoded exchange")

    async def undecoded(*requests: tuple[str, dict[str, Any]]) -> list[bytes]:
        sent.append(requests)
        return [answers.pop(0) for _ in requests]

    return Runner(raw, pipelined, undecoded), sent, answers


def test_a_passed_reply_keeps_the_upstreams_bytes_and_the_ping_behind_it() -> None:
    runner, sent, answers = undecoded_runner()
    clocked = runner.clocked()
    found = bson.encode({"cursor": {"firstBatch": [{"_id": 1}], "id": Int64(0), "ns": "a.b"},
                         "ok": 1.0, "operationTime": Timestamp(5, 1)})
    answers += [found, bson.encode({"ok": 1.0, "operationTime": Timestamp(7, 2)})]
    reply = asyncio.run(clocked.passed("a", {"find": "b", "filter": {"_id": 1}}))
    assert isinstance(reply, Passed) and reply.body == found
    assert [[next(iter(cmd)) for _, cmd in write] for write in sent] == [["find", "ping"]]
    assert clocked.after is not None and clocked.after["operationTime"] == Timestamp(7, 2)


def test_a_failed_reply_is_decoded_for_the_router_to_judge() -> None:
    runner, _, answers = undecoded_runner()
    answers += [bson.encode({"ok": 0.0, "errmsg": "bad", "code": 2, "codeName": "BadValue"})]
    reply = asyncio.run(runner.passed("a", {"find": "b"}))
    assert isinstance(reply, dict) and reply["code"] == 2 and runner.after is None


def test_raw_ok_reads_the_top_level_ok_without_decoding() -> None:
    assert raw_ok(bson.encode({"cursor": {"firstBatch": [{"s": "ok", "b": Binary(b"x", 4)}],
                                          "id": Int64(3)}, "ok": 1.0})) is True
    assert raw_ok(bson.encode({"n": 2, "ok": 1})) is True
    assert raw_ok(bson.encode({"ok": 0.0, "errmsg": "x"})) is False
    assert raw_ok(bson.encode({"ok": False})) is False
    # An `ok` nested deeper is not the reply's; a type the walk does not know: undecided.
    assert raw_ok(bson.encode({"cursor": {"ok": 1.0}})) is None
    assert raw_ok(bson.encode({"r": Regex("a"), "ok": 1.0})) is None
    assert raw_ok(b"\x05\x00") is None
