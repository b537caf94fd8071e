"""Legacy OP_QUERY on a client connection, answered in an OP_REPLY.

The handshake may still come this way (hello, isMaster); older drivers (Java 3.6 runs
buildinfo and authenticates this way) also send other commands, served as the same
command over OP_MSG would be unless the listener refuses them, as mongod 6.0+ does.
Queries on collections are refused. The framing is `proxy.wire.legacy`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.metrics import count_request
from proxy.net import handshake, hello
from proxy.net.replies import host_unreachable
from proxy.net.router import Passed
from proxy.upstream.connection import UpstreamUnavailable, next_request_id
from proxy.wire import legacy, opmsg
from proxy.wire.bsonutil import decode
from proxy.wire.framing import Frame

if TYPE_CHECKING:
    from proxy.net.connection import ClientConnection


def unsupported_command(name: str) -> dict[str, Any]:
    """As mongod 6.0+: only the handshake may still use OP_QUERY."""
    message = (f"Unsupported OP_QUERY command: {name}. The client driver may require an "
               f"upgrade. mongobranch only accepts hello and isMaster over OP_QUERY.")
    return {"$err": message, "errmsg": message, "ok": 0.0, "code": 352,
            "codeName": "UnsupportedOpQueryCommand"}


def unsupported_query(collection: str) -> dict[str, Any]:
    message = ("OP_QUERY is no longer supported. The client driver may require an "
               f"upgrade (query on {collection}).")
    return {"$err": message, "errmsg": message, "ok": 0.0, "code": 5739101,
            "codeName": "Location5739101"}


async def answer(conn: ClientConnection, frame: Frame) -> Frame:
    """The OP_REPLY to an OP_QUERY."""
    query = legacy.parse_query(frame)
    cmd = query.query
    if "$query" in cmd and isinstance(cmd["$query"], dict):
        cmd = cmd["$query"]
    name = next(iter(cmd), "")
    count_request(name)
    flags = 0
    body = legacy.command_body(query)
    if body is not None and name in handshake.HELLO_NAMES:
        reply = await hello.answer(conn, cmd)
    elif body is not None and conn.legacy_op_query and name:
        reply = await _command(conn, body)
    elif body is not None:
        reply = unsupported_command(name)
        flags = legacy.QUERY_FAILURE
    else:
        reply = unsupported_query(query.collection)
        flags = legacy.QUERY_FAILURE
    return legacy.build_reply(reply, request_id=next_request_id(),
                              response_to=frame.request_id, flags=flags)


async def _command(conn: ClientConnection, body: dict[str, Any]) -> dict[str, Any]:
    """A legacy OP_QUERY command, run as an OP_MSG: routed like one, else sent to the
    upstream (which may no longer speak OP_QUERY) as one."""
    name = next(iter(body))
    if conn.router.wants(name):
        routed = await conn.routed(opmsg.OpMsg(0, body))
        if isinstance(routed, dict):  # never a stream: OP_QUERY cannot allow one
            return routed
        if isinstance(routed, Passed):
            return decode(routed.body)
    if name in handshake.CLIENT_AUTH:
        conn.client_authenticated = True
    if name in handshake.IDENTITY_CHANGES:
        conn.identity_known = False
    try:
        if not conn.upstream.connected:
            await conn.ensure_upstream(client_auth=name in handshake.CLIENT_AUTH)
        db = body.pop("$db")
        return await conn.upstream_command(db, body)
    except UpstreamUnavailable as exc:
        conn.upstream.close()
        return host_unreachable(str(exc), body)
