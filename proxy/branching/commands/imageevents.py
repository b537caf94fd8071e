"""Change events of WAL entries whose images are not plain fields of the entry
(docs/ARCHITECTURE.md, "Change streams"): stored out of line (a document near 16 MiB,
an update of one over 8 MiB, whose images do not fit one entry) or compressed by gc.

A window's aggregation cannot read such images, and an entry of two images over 8 MiB
could not carry them through the pipeline as one document anyway. Such an entry is a
window of its own (changestream.Stream): the upstream builds its event without the
images; the proxy loads them, has the upstream mask them (on a masked branch) and
compare the fields they share (updateDescription, as the window's aggregation computes
it), puts them in, and has the upstream run the client's stages on the event.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import bson
from bson.int64 import Int64

from proxy.branching.batching import INSERT_BYTES, fitted
from proxy.branching.errors import CommandError
from proxy.branching.runner import Runner
from proxy.branching.stages import documents_stage
from proxy.branching.wal import Wal, image
from proxy.wire.codes import Code

# Whether an entry's images need this path: any of them compressed or out of line.
HELD_APART = {"$or": [{"$ne": [{"$type": f"${field}"}, "missing"]}
                      for field in ("prez", "postz", "prex", "postx")]}
# mongod's largest document in a reply (BSONObjMaxInternalSize): a change event over it
# fails the getMore with BSONObjectTooLarge.
MAX_EVENT = 16 * 1024 * 1024 + 16 * 1024
# The largest field pair sent for comparison (`fitted` sends up to this much at once).
_COMPARE_BYTES = INSERT_BYTES


class Listed:
    """A window's events the proxy holds, read as the window's cursor would be."""

    def __init__(self, docs: list[dict[str, Any]]):
        self._docs: Iterator[dict[str, Any]] = iter(docs)

    async def next(self) -> dict[str, Any]:
        try:
            return next(self._docs)
        except StopIteration:
            raise StopAsyncIteration from None

    async def close(self) -> None:
        self._docs = iter(())


async def events(run: Runner, meta_db: str, wal: Wal, lsn: int, bare: list[dict[str, Any]],
                 masking: dict[str, Any] | None,
                 stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events of the entry at `lsn`, from those the window's pipeline built of it
    without its images (`bare`) and before the client's stages."""
    entry = await wal.entries.find_one({"_id": Int64(lsn)})
    if entry is None:
        return []
    await wal.load([entry])
    images = {which: image(entry, which) for which in ("pre", "post")}
    if masking is not None:
        for which, img in images.items():
            if img is not None:
                images[which] = await _masked(run, meta_db, masking, entry["ns"], which, img)
    pre, post = images["pre"], images["post"]
    out: list[dict[str, Any]] = []
    for event in bare:
        described = None
        if event.get("operationType") == "update" and pre is not None and post is not None:
            described = await _update_description(run, meta_db, pre, post)
        filled: dict[str, Any] = {}
        for key, value in event.items():
            if key == "updateDescription":
                continue
            if key == "fullDocument":
                value = post
            elif key == "fullDocumentBeforeChange":
                value = pre
            filled[key] = value
            if key == "documentKey" and described is not None:
                filled["updateDescription"] = described
        size = len(bson.encode(filled))
        if size > MAX_EVENT:
            raise CommandError(Code.BSON_OBJECT_TOO_LARGE,
                               f"BSONObj size: {size} is invalid. Size must be between 0 and "
                               f"{MAX_EVENT}(16MB) First element: _id: {filled['_id']}")
        out.extend(await _staged(run, meta_db, filled, stages))
    return out


async def _masked(run: Runner, meta_db: str, masking: dict[str, Any], ns: str, which: str,
                  img: dict[str, Any]) -> dict[str, Any]:
    """One image masked by the branch's stage, alone (two could be over the limit)."""
    async for batch in run.batches(meta_db, {"aggregate": 1, "cursor": {}, "pipeline": [
            documents_stage([{"ns": ns, which: img}]), masking]}):
        return batch[0][which]  # type: ignore[no-any-return]
    raise CommandError(Code.INTERNAL_ERROR, "masking an image returned nothing")


async def _update_description(run: Runner, meta_db: str, pre: dict[str, Any],
                              post: dict[str, Any]) -> dict[str, Any]:
    """The window's updateDescription (the post-image's fields that are new or whose
    value differs, the pre-image's fields it lacks) for two images that may not fit one
    command: fields of identical BSON are the same value; the others are compared by the
    upstream, as `$setDifference` compares them, a few at a time. A pair too large for one
    command differs in its bytes and counts as changed."""
    def raw(value: Any) -> bytes:
        return bson.encode({"v": value})

    differ = {k for k in post if k in pre and raw(pre[k]) != raw(post[k])}
    pairs = [pair for pair in ({"k": k, "a": pre[k], "b": post[k]} for k in differ)
             if len(bson.encode(pair)) <= _COMPARE_BYTES]
    equal: set[str] = set()
    for group in fitted(pairs):
        equal |= await _equal(run, meta_db, group)
    return {"updatedFields": {k: v for k, v in post.items()
                              if k not in pre or (k in differ and k not in equal)},
            "removedFields": [k for k in pre if k not in post],
            "truncatedArrays": []}


async def _equal(run: Runner, meta_db: str, pairs: list[dict[str, Any]]) -> set[str]:
    found: set[str] = set()
    async for batch in run.batches(meta_db, {"aggregate": 1, "cursor": {}, "pipeline": [
            documents_stage(pairs),
            {"$project": {"_id": 0, "k": 1, "eq": {"$eq": ["$a", "$b"]}}}]}):
        found.update(d["k"] for d in batch if d["eq"] is True)
    return found


async def _staged(run: Runner, meta_db: str, event: dict[str, Any],
                  stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The client's stages run by the upstream on one event."""
    if not stages:
        return [event]
    return [doc async for batch in run.batches(meta_db, {
        "aggregate": 1, "cursor": {}, "pipeline": [documents_stage([event]), *stages]})
        for doc in batch]
