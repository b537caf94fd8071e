"""`configureFailPoint` through the proxy, and the failpoints' reach on a branch port.

A failpoint is the upstream's (mongod's and SecantusDB's test-only `failCommand`): it is
forwarded as it is, from either port, and the upstream decides when it fires. It fires
on the commands it sees by name, and a branch does not send the upstream the client's
command: it answers a `delete` with finds and overlay writes, a client `bulkWrite` with
per-collection writes. So, while a `failCommand` failpoint set through this proxy names
a command a branch handles itself (`PROBES`), the branch first sends the upstream a
probe: a command of that name, on the client's own upstream connection (its
handshake's `appName`, which the failpoint may filter on), that changes nothing (a
write matching no document of the metadata database's probe collection; an insert of
the one document already there). The upstream evaluates it against the failpoint, its
`times`/`skip` counts, `appName`, `errorCode`, `closeConnection`, `blockConnection`
and `writeConcernError` included: a failing probe is the client's answer, the probe's
`writeConcernError` (and labels) is attached to the branch's own reply, a cut
connection is the client's, and otherwise the branch handles the command as always.
A retryable write's probe carries a session and transaction number of its own (never
the client's, which the branch's writes use), so that the upstream labels its error as
it would the client's write.

Not covered: the branch's own commands of a name a failpoint lists (its overlay
`insert`s, the `find`s of its merged reads) meet the failpoint too, and a statement of a
multi-document transaction gets no probe (a failpoint there fails the statement the
branch runs of that name, if any).
"""

from __future__ import annotations

import uuid
from typing import Any

from bson.binary import Binary
from bson.int64 import Int64

from proxy.branching.commands.base import Request
from proxy.branching.failpoints import ALIASES

# The probe of each command name PROBED lists (failpoints.py), on the metadata
# database's PROBE_COLL.
PROBE_COLL = "failpoint_probe"
# The one document of PROBE_COLL (an insert probe collides with it), and an id no
# document has (the other probes match nothing).
_PROBE_ID = {"_id": "mongobranch-failpoint-probe"}
_ABSENT = {"_id": "mongobranch-failpoint-probe-absent"}


def _probes(meta_db: str) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "insert": (meta_db, {"insert": PROBE_COLL, "documents": [_PROBE_ID]}),
        "update": (meta_db, {"update": PROBE_COLL,
                             "updates": [{"q": _ABSENT, "u": {"$set": {"probed": 1}}}]}),
        "delete": (meta_db, {"delete": PROBE_COLL, "deletes": [{"q": _ABSENT, "limit": 1}]}),
        "findAndModify": (meta_db, {"findAndModify": PROBE_COLL, "query": _ABSENT,
                                    "update": {"$set": {"probed": 1}}}),
        "bulkWrite": ("admin", {"bulkWrite": 1, "nsInfo": [{"ns": f"{meta_db}.{PROBE_COLL}"}],
                                "ops": [{"delete": 0, "filter": _ABSENT, "multi": False}]}),
        "count": (meta_db, {"count": PROBE_COLL, "query": _ABSENT}),
        "distinct": (meta_db, {"distinct": PROBE_COLL, "key": "probed", "query": _ABSENT}),
    }


_FIRED = "'failCommand' failpoint"
_RETRYABLE = frozenset({"insert", "update", "delete", "findAndModify", "bulkWrite"})


async def configure_fail_point(req: Request) -> dict[str, Any]:
    """Forwarded as it is; what the upstream accepted is noted for the probes."""
    reply = await req.run.reply(req.db, {k: v for k, v in req.cmd.items() if k != "$db"})
    if reply.get("ok"):
        req.engine.failpoints.note(req.cmd)
    return reply


async def probe(req: Request) -> dict[str, Any] | None:
    """The upstream's failpoint on the client's command, asked with a probe of its name
    (module docstring): the failpoint's error reply when it fired with one, the probe's
    reply when it carried a `writeConcernError` (for the branch's reply), else None."""
    points = req.engine.failpoints
    name = ALIASES.get(req.name, req.name)
    meta = req.engine.meta_db
    if not points.seeded:
        # The one document an insert probe collides with (on the engine's pool: the
        # client's connection may not write the metadata database).
        await req.engine.pool.reply(meta, {
            "update": PROBE_COLL,
            "updates": [{"q": _PROBE_ID, "u": {"$setOnInsert": {"probed": 0}}, "upsert": True}]})
        points.seeded = True
    db, cmd = _probes(meta)[name]
    cmd = dict(cmd)
    if name in _RETRYABLE and "txnNumber" in req.cmd:
        cmd["lsid"] = {"id": Binary(uuid.uuid4().bytes, 4)}
        cmd["txnNumber"] = Int64(1)
    reply = await req.run.reply(db, cmd)
    if not reply.get("ok") and _FIRED in str(reply.get("errmsg", "")):
        return {k: v for k, v in reply.items() if k not in ("$clusterTime", "operationTime")}
    if "writeConcernError" in reply:
        return {"ok": 1.0, "writeConcernError": reply["writeConcernError"],
                **({"errorLabels": reply["errorLabels"]} if "errorLabels" in reply else {})}
    return None


def with_wce(reply: dict[str, Any], probed: dict[str, Any]) -> dict[str, Any]:
    """The branch's reply with the probe's writeConcernError, as the upstream attaches
    the failpoint's to a command that ran."""
    if reply.get("ok"):
        reply["writeConcernError"] = probed["writeConcernError"]
        if "errorLabels" in probed:
            labels = list(reply.get("errorLabels") or [])
            reply["errorLabels"] = labels + [x for x in probed["errorLabels"] if x not in labels]
    return reply
