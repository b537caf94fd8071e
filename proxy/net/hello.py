"""hello (and isMaster) on a client connection: answered by the proxy itself, as a mongos.

What the client says about itself (metadata, compressors) is kept on its connection;
what only the upstream can answer (SASL mechanisms, speculative authentication) is asked
of the client's own upstream connection; a streaming hello waits for a topology change.
The reply's shape is `handshake.build_reply`'s.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from proxy.net import handshake
from proxy.upstream.connection import UpstreamUnavailable

if TYPE_CHECKING:
    from proxy.net.connection import ClientConnection

log = logging.getLogger("mongobranch.conn")


async def answer(conn: ClientConnection, request: dict[str, Any]) -> dict[str, Any]:
    """The reply to a client's hello, its effects on the connection made."""
    if conn.client_metadata is None and isinstance(request.get("client"), dict):
        conn.client_metadata = request["client"]
        app = request["client"].get("application")
        if isinstance(app, dict):
            conn.app_name = app.get("name")
    problem = handshake.awaitable_problem(request, conn.topology)
    if problem is not None:
        return problem
    negotiated = handshake.negotiate_compression(request)
    if negotiated is not None:
        conn.compressors = negotiated
    if handshake.is_streaming(request):
        await _await_topology_change(conn, request)
    upstream_reply = None
    if any(key in request for key in handshake.UPSTREAM_FIELDS):
        if "speculativeAuthenticate" in request:
            conn.identity_known = False
            if isinstance(request["speculativeAuthenticate"], dict):
                conn.client_authenticated = True
        upstream_hello = handshake.upstream_hello(request)
        try:
            if conn.upstream.connected:
                upstream_hello.pop("client", None)
                upstream_reply = await conn.upstream.command("admin", upstream_hello)
            else:
                upstream_reply = await conn.ensure_upstream(upstream_hello, client_auth=True)
        except UpstreamUnavailable as exc:
            log.info("hello could not reach the upstream: %s", exc)
    return handshake.build_reply(
        request, conn.topology, conn.connection_id,
        upstream_reply=upstream_reply, negotiated=negotiated,
    )


async def _await_topology_change(conn: ClientConnection, request: dict[str, Any]) -> None:
    """Streaming hello: hold the reply until the topology changes, maxAwaitTimeMS passes
    or the proxy stops. A client whose topologyVersion is stale is answered at once."""
    if not conn.topology.is_current(request["topologyVersion"]):
        return
    wait = max(0.0, float(request["maxAwaitTimeMS"]) / 1000.0)
    waiters = [asyncio.ensure_future(conn.stopping.wait()),
               asyncio.ensure_future(conn.topology.wait_changed())]
    try:
        await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
