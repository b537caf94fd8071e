"""Snapshot reads (`readConcern: {level: "snapshot"}`) on a branch, where one read is
several upstream commands (a merged find or distinct over the base and the overlays, an
aggregate with its probes): all of them read at one cluster time, the upstream's own
choice, and the reply carries it as `atClusterTime` as mongod's does."""

from __future__ import annotations

from typing import Any

from proxy.branching.commands.base import Request, carry


def requested(cmd: dict[str, Any]) -> bool:
    concern = cmd.get("readConcern")
    return isinstance(concern, dict) and concern.get("level") == "snapshot"


async def pinned(req: Request, coll: str, cmd: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The command with its snapshot read pinned to one cluster time, and that time
    (None: not a snapshot read, or the upstream refused one; the read itself then gets
    the upstream's answer). Without `atClusterTime`, the upstream picks the time, as it
    would for the read itself: an empty snapshot find tells which."""
    if not requested(cmd):
        return cmd, None
    concern = cmd["readConcern"]
    if "atClusterTime" in concern:
        return cmd, concern["atClusterTime"]
    probe = carry(cmd, {"find": coll, "filter": {"_id": {"$in": []}}, "limit": 1,
                        "singleBatch": True}, ("lsid", "$clusterTime", "readConcern",
                                               "apiVersion", "apiStrict"))
    reply = await req.run.reply(req.db, probe)
    cursor = reply.get("cursor")
    at = cursor.get("atClusterTime") if reply.get("ok") and isinstance(cursor, dict) else None
    if at is None:
        return cmd, None
    return {**cmd, "readConcern": {**concern, "atClusterTime": at}}, at


def stamp(reply: dict[str, Any], at: Any) -> dict[str, Any]:
    """A cursor reply the proxy built, with the time its snapshot read was at."""
    cursor = reply.get("cursor")
    if at is not None and reply.get("ok") and isinstance(cursor, dict):
        cursor.setdefault("atClusterTime", at)
    return reply
