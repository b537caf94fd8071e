"""Reads with a read preference on the main port: which commands go to another member.

As mongos does, a read command whose `$readPreference` is not `primary` runs on the
replica-set member pymongo's server selection picks for that read preference, and its
cursor's `getMore` and `killCursors` follow it there, whichever of the client's pooled
connections they arrive on. Everything else, writes above all, goes to the primary on
the client's own upstream connection. Only the messages this module names leave the
fast path: a read carrying the bytes `$readPreference`, and a `getMore`/`killCursors`
while some cursor is open on another member.
"""

from __future__ import annotations

from typing import Any

from bson.raw_bson import RawBSONDocument

from proxy.metrics import KNOWN_COMMANDS
from proxy.wire import opmsg
from proxy.wire.framing import OP_MSG, Frame

Address = tuple[str, int]

# Commands a read preference may send to a secondary (mongos's "secondary allowed"
# reads; an aggregate only without $out/$merge, an explain only of one of these).
READS = frozenset({"find", "aggregate", "count", "distinct", "listIndexes", "collStats",
                   "collstats", "dbStats", "dbstats", "dataSize", "datasize", "explain"})
CURSOR_NAMES = frozenset({"getMore", "killCursors"})
# The requests-counter keys under which such commands reach the fast path.
ROUTABLE_COUNTERS = frozenset((READS | CURSOR_NAMES) & KNOWN_COMMANDS | {"other"})

_READ_PREFERENCE = b"$readPreference"
_GET_MORE_HEAD = b"\x12getMore\x00"  # an int64 first element named getMore
# Cursors remembered at most (a client that neither exhausts nor kills its cursors
# must not grow the table without bound): the oldest are forgotten first, and their
# getMore then goes to the primary, which answers CursorNotFound.
MAX_CURSORS = 100_000


class MemberCursors:
    """Cursor id -> the member that opened it, for cursors not on the primary.

    One table per listener: drivers pin a cursor to a server (here the proxy), not to
    one of their pooled connections, so a getMore may come on another connection."""

    def __init__(self) -> None:
        self._by_id: dict[int, Address] = {}

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def __contains__(self, cursor_id: object) -> bool:
        return cursor_id in self._by_id

    def add(self, cursor_id: int, address: Address) -> None:
        self._by_id[cursor_id] = address
        while len(self._by_id) > MAX_CURSORS:
            del self._by_id[next(iter(self._by_id))]

    def pop(self, cursor_id: object) -> None:
        if isinstance(cursor_id, int):
            self._by_id.pop(cursor_id, None)

    def find(self, ids: Any) -> Address | None:
        """The member of the first of these cursor ids opened on one."""
        for cursor_id in ids if isinstance(ids, list) else ():
            if isinstance(cursor_id, int) and cursor_id in self._by_id:
                return self._by_id[cursor_id]
        return None


def wants_member(name: str, data: bytes, at: int, cursors: MemberCursors) -> bool:
    """Whether a message (its command document at `at` in `data`) may go to another
    member: decided without decoding it, so it may say yes to one that, decoded, stays
    on the primary (`read_preference_of`, `target_cursor` decide)."""
    if name == "getMore":
        if not cursors:
            return False
        if data[at + 4 : at + 13] == _GET_MORE_HEAD:
            return int.from_bytes(data[at + 13 : at + 21], "little", signed=True) in cursors
        return True
    if name == "killCursors":
        return bool(cursors)
    return name in READS and _READ_PREFERENCE in data


def wants_member_raw(data: bytes, at: int, cursors: MemberCursors) -> bool:
    """`wants_member` for a plain OP_MSG whose command name is not decoded yet; the
    usual case (no read preference, no cursor on another member) costs one scan."""
    if not cursors and _READ_PREFERENCE not in data:
        return False
    end = data.find(b"\x00", at + 5)
    try:
        name = data[at + 5 : end].decode()
    except UnicodeDecodeError:
        return True  # the slow path refuses it
    return wants_member(name, data, at, cursors)


def is_read(name: str, cmd: dict[str, Any]) -> bool:
    """Whether a decoded command is a read a secondary may serve."""
    if name == "explain":
        inner = cmd.get("explain")
        return isinstance(inner, dict) and bool(inner) and next(iter(inner)) != "explain" \
            and is_read(next(iter(inner)), inner)
    if name == "aggregate":
        pipeline = cmd.get("pipeline")
        last = pipeline[-1] if isinstance(pipeline, list) and pipeline else None
        return not (isinstance(last, dict) and {"$out", "$merge"} & set(last))
    return name in READS


def cursor_id(reply: Frame) -> int | None:
    """The cursor id of a successful cursor reply (0 when exhausted), else None."""
    if reply.op_code != OP_MSG:
        return None
    try:
        body = RawBSONDocument(opmsg.body_bytes(reply))
        if not body.get("ok"):
            return None
        cursor = body.get("cursor")
        value = cursor.get("id") if isinstance(cursor, RawBSONDocument) else None
    except Exception:
        return None
    return value if isinstance(value, int) else None
