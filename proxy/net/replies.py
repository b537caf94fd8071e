"""Error replies a client connection builds itself, labelled as mongos labels them.

For requests the upstream could not serve (unreachable, or cut short by an election)
and for a router that failed: the error shapes, and the errorLabels that tell a driver
what it may retry.
"""

from __future__ import annotations

from typing import Any

from pymongo.errors import ConnectionFailure, NotPrimaryError, OperationFailure, PyMongoError

from proxy.upstream.topology import STATE_CHANGE_CODES
from proxy.wire.bsonutil import decode
from proxy.wire.errors import ProtocolError

# Commands a driver may retry with the same txnNumber (the retryable-writes spec).
RETRYABLE_WRITES = frozenset({
    "insert", "update", "delete", "findAndModify", "findandmodify", "bulkWrite",
    "commitTransaction", "abortTransaction",
})


def host_unreachable(message: str, command: dict[str, Any] | None = None) -> dict[str, Any]:
    """The reply when the upstream cannot be reached, labelled as mongos labels it."""
    reply: dict[str, Any] = {"ok": 0.0, "errmsg": message, "code": 6,
                             "codeName": "HostUnreachable"}
    labels = error_labels(command) if command is not None else []
    if labels:
        reply["errorLabels"] = labels
    return reply


def upstream_state_error(exc: PyMongoError, command: dict[str, Any]) -> dict[str, Any] | None:
    """The reply for an engine operation that the upstream's election or loss cut short
    (the engine's client could not finish it): the state-change code, or
    HostUnreachable, labelled so that the client's driver retries. None for any other
    error."""
    details = getattr(exc, "details", None)
    details = details if isinstance(details, dict) else {}
    code = details.get("code", 10107 if isinstance(exc, NotPrimaryError) else None)
    if isinstance(exc, (NotPrimaryError, OperationFailure)) and code in STATE_CHANGE_CODES:
        reply: dict[str, Any] = {"ok": 0.0, "errmsg": str(details.get("errmsg", exc)),
                                 "code": code,
                                 "codeName": details.get("codeName", "NotWritablePrimary")}
        labels = error_labels(command)
        if labels:
            reply["errorLabels"] = labels
        return reply
    if isinstance(exc, ConnectionFailure):
        return host_unreachable(f"upstream unavailable: {exc}", command)
    return None


def error_labels(command: dict[str, Any]) -> list[str]:
    """Labels for a network-class error, so drivers retry what is safe to retry."""
    name = next(iter(command), "")
    if command.get("autocommit") is False and name not in ("commitTransaction",
                                                           "abortTransaction"):
        return ["TransientTransactionError"]
    if "txnNumber" in command and name in RETRYABLE_WRITES:
        return ["RetryableWriteError"]
    return []


# An exception's text can quote whole documents (a failed bulk write's operations): the
# client gets its start, the log has all of it.
INTERNAL_ERROR_CHARS = 2000


def internal_error(exc: Exception) -> dict[str, Any]:
    """A router failed in a way nothing else maps: the client gets an error, not silence."""
    text = repr(exc)
    if len(text) > INTERNAL_ERROR_CHARS:
        text = text[:INTERNAL_ERROR_CHARS] + f"... ({len(text)} characters; see the proxy's log)"
    return {"ok": 0.0, "errmsg": f"mongobranch internal error: {text}", "code": 1,
            "codeName": "InternalError"}


def decoded_or_none(body: bytes | None) -> dict[str, Any] | None:
    """The command of a request the upstream could not serve, for its error labels."""
    if body is None:
        return None
    try:
        return decode(body)
    except ProtocolError:
        return None
