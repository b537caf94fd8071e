"""`validate` on a branch port.

A collection the branch never touched is validated on the upstream as it is (the
router forwards it). One it changed is stored in several collections: the base it
still reads through, and the live and hidden overlays of each branch in its chain.
Each of those is validated by the upstream itself, with the user's options (`full`,
`background`, ...), and the verdicts are combined: valid when every one is, their
errors and warnings together, document counts of the branch's view. `keysPerIndex`
is left out: the keys of one index of the view are spread over several collections,
with hidden ids among them, and no sum of theirs is the view's.
"""

from __future__ import annotations

from typing import Any

from proxy.branching import planner
from proxy.branching.commands import read
from proxy.branching.commands.base import Request, coll_name
from proxy.branching.commands.catalog import exists
from proxy.branching.errors import CommandError
from proxy.wire.codes import Code

_SUMS = ("nInvalidDocuments", "nNonCompliantDocuments")
_LISTS = ("warnings", "errors", "extraIndexEntries", "missingIndexEntries", "corruptRecords")


async def validate(req: Request) -> dict[str, Any] | None:
    coll = coll_name(req)
    layers = req.layers(coll)
    if not layers:
        return None
    ns = f"{req.db}.{coll}"
    if not await exists(req, coll):
        raise CommandError(Code.NAMESPACE_NOT_FOUND,
                           f"Collection '{ns}' does not exist to validate.")
    options = req.options
    storage = [side.coll for side in planner.sources(coll, layers)]
    storage += [layer.hidden for layer in layers]
    replies = []
    for name in storage:
        reply = await req.run.reply(req.db, {"validate": name, **options})
        if not reply.get("ok"):
            if reply.get("code") == 26:  # an overlay not created yet, or a base dropped
                continue
            return {k: v for k, v in reply.items() if k in ("ok", "errmsg", "code", "codeName")}
        replies.append(reply)
    counted = await read.count(Request(req.engine, req.branch, req.ctx, req.run, req.db,
                                       {"count": coll, "$db": req.db}))
    indexes = await req.engine.view_indexes(req.on_branch, req.db, coll, req.run)
    result: dict[str, Any] = {"ns": ns}
    for key in _SUMS:
        if any(key in r for r in replies):
            result[key] = sum(int(r.get(key, 0)) for r in replies)
    result["nrecords"] = int(counted["n"]) if counted else 0
    result["nIndexes"] = len(indexes)
    details = {}
    for ix in indexes:
        name = str(ix.get("name"))
        found = [r["indexDetails"][name] for r in replies
                 if isinstance(r.get("indexDetails"), dict) and name in r["indexDetails"]]
        details[name] = {"valid": all(bool(d.get("valid", True)) for d in found)}
    result["indexDetails"] = details
    result["valid"] = all(bool(r.get("valid")) for r in replies)
    result["repaired"] = any(bool(r.get("repaired")) for r in replies)
    for key in _LISTS:
        result[key] = [item for r in replies for item in r.get(key, [])]
    result["ok"] = 1.0
    return result
