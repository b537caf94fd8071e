"""The audit trail: one structured line per branch operation, on logger `mongobranch.audit`.

Each line is a JSON object: `op` (the wire command or HTTP route), `branch`, `user` (the
authenticated user as the upstream reports it, `null` when anonymous; for the admin API,
`admin-api:<scope>:<token fingerprint>`), `client` (address and port), `via` (`wire` or
`http`), `outcome` (`ok`, `refused`, `conflict` or `failed`) and, unless ok, `code` and
`error`. Operators route the logger where they keep audit records.
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("mongobranch.audit")

# Branch operations over the wire that are audited (every outcome).
WIRE_OPS = frozenset({"createBranch", "dropBranch", "resetBranch", "mergeBranch"})


def record(op: str, *, branch: Any, user: str | None, client: str, via: str, outcome: str,
           code: int | None = None, error: str | None = None, **details: Any) -> None:
    entry: dict[str, Any] = {"op": op, "branch": branch if isinstance(branch, str) else None,
                             "user": user, "client": client, "via": via, "outcome": outcome}
    if code is not None:
        entry["code"] = code
    if error is not None:
        entry["error"] = error
    entry.update(details)
    log.info("%s", json.dumps(entry, default=str, sort_keys=False))


def outcome_of(status_or_code: int, *, http: bool) -> str:
    """ok / refused / conflict / failed, from an HTTP status or a command error code."""
    if http:
        if status_or_code < 400:
            return "ok"
        return {401: "refused", 403: "refused", 409: "conflict"}.get(status_or_code, "failed")
    return {13: "refused", 117: "conflict"}.get(status_or_code, "failed")
