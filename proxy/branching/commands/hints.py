"""A read's `hint` checked against the indexes the branch shows, before it is rewritten.

On a changed collection a read runs on overlays, merged sides or a `$unionWith`
pipeline, where the user's hint either names nothing (an overlay's own collection) or
is dropped: mongod would have refused a hint that names no index of the collection,
and the branch would have answered. The branch's index list (`listIndexes` on the
branch) is the one mongod would check against; an index is named by its name or by
its exact key pattern, and `$natural` always resolves.
"""

from __future__ import annotations

from typing import Any

from proxy.branching.commands.base import Request
from proxy.branching.errors import CommandError
from proxy.branching.runner import outside_transaction
from proxy.wire.codes import Code

# Commands whose own `hint` selects an index of the collection they name.
_HINTED = ("find", "count", "distinct", "aggregate", "findAndModify", "findandmodify")


def _pattern(key: Any) -> list[tuple[str, Any]]:
    """A key pattern comparable as mongod compares it: field order counts, 1 equals 1.0."""
    return [(k, float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v)
            for k, v in dict(key).items()]


def _resolves(hint: Any, indexes: list[dict[str, Any]]) -> bool:
    if isinstance(hint, str):
        return hint == "$natural" or any(ix.get("name") == hint for ix in indexes)
    if isinstance(hint, dict):
        if not hint or list(hint) == ["$natural"]:
            return True
        wanted = _pattern(hint)
        return any(_pattern(ix.get("key") or {}) == wanted for ix in indexes)
    return True  # a hint of another type is refused by the upstream in its own words


def named(hint: Any, indexes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The indexes a hint names: by name, or every one with its exact key pattern."""
    if isinstance(hint, str):
        return [ix for ix in indexes if ix.get("name") == hint]
    if isinstance(hint, dict) and hint and list(hint) != ["$natural"]:
        wanted = _pattern(hint)
        return [ix for ix in indexes if _pattern(ix.get("key") or {}) == wanted]
    return []


async def check(req: Request) -> None:
    """Refuses, as mongod does (BadValue), a hint naming no index of a changed collection."""
    cmd = req.cmd
    if req.name == "explain" and isinstance(cmd.get("explain"), dict):
        cmd = cmd["explain"]
    name = next(iter(cmd), None)
    if name not in _HINTED or "hint" not in cmd:
        return
    coll = cmd[name]
    layers = req.layers(coll) if isinstance(coll, str) else []
    if not layers:
        return  # an untouched collection is read on the upstream, which checks the hint
    if next((layer.present for layer in layers if layer.present is not None), True) is False:
        return  # dropped on the branch: nothing to read, as on a missing collection
    indexes = await req.engine.view_indexes(req.on_branch, req.db, coll, req.run)
    # A hidden index (collMod) cannot be hinted, as on mongod.
    indexes = [ix for ix in indexes if not ix.get("hidden")]
    if not _resolves(cmd["hint"], indexes):
        raise CommandError(Code.BAD_VALUE, "hint provided does not correspond to an existing index")


async def on_base(req: Request, coll: str, cmd: dict[str, Any]) -> dict[str, Any]:
    """A find whose base side gets the user's hint: without it when the hint names an
    index of the branch's own list the base lacks (one its parent dropped after a
    branch's point, history/catalogat.py), as a read on a changed collection that runs
    as one pipeline goes without it, rather than fail. A collection the branch or an
    ancestor holds whole is not read from the base at all: its own collection has the
    hinted index (created on the branch, say, after a drop), so the hint stays."""
    hint = cmd.get("hint")
    layers = req.layers(coll)
    if hint is None or all(layer.indexes is None for layer in layers) \
            or any(layer.base_dropped for layer in layers) \
            or (isinstance(hint, str) and hint == "$natural") \
            or (isinstance(hint, dict) and list(hint) == ["$natural"]):
        return cmd
    with outside_transaction():  # mongod lists no indexes in a transaction
        reply = await req.run.reply(req.db, {"listIndexes": coll})
    if reply.get("ok") and _resolves(hint, list(reply["cursor"]["firstBatch"])):
        return cmd
    return {k: v for k, v in cmd.items() if k != "hint"}


async def passed(req: Request, judged: dict[str, Any]) -> dict[str, Any] | None:
    """A read the planner passes to the base as the client sent it (None), or, when
    `on_base` took its hint out (`judged`: what it gave), its reply without the hint."""
    if "hint" not in req.cmd or "hint" in judged:
        return None
    return await req.run.reply(req.db, {k: v for k, v in req.cmd.items()
                                        if k not in ("hint", "$db")})
