"""Where the proxy's raw upstream connections go: pymongo's own server discovery.

The proxy keeps no monitor of its own. The engine's AsyncMongoClient, built from the
`--upstream` URI exactly as an application would build it (seed list, `replicaSet`,
`mongodb+srv://` with its SRV and TXT records), runs pymongo's server discovery and
monitoring; each raw connection asks it for a writable server (the primary of a replica
set, one of the mongos of a sharded cluster, the standalone) and tells it when that
server answered "not primary" or dropped the connection, so the next selection waits
for the new primary instead of returning the old one.

`Topology.select_server` and `Topology.handle_error` are pymongo's internal API (the
ones its own operations use); they are confined to this module.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from pymongo import AsyncMongoClient
from pymongo.errors import AutoReconnect, ConfigurationError, NotPrimaryError, PyMongoError
from pymongo.helpers_shared import _NOT_PRIMARY_CODES
from pymongo.read_preferences import (
    _MONGOS_MODES,
    Primary,
    _ServerMode,
    make_read_preference,
)
from pymongo.server_selectors import writable_server_selector
from pymongo.topology_description import TOPOLOGY_TYPE
from pymongo.topology_shared import _ErrorContext

from proxy.wire.codes import Code
from proxy.wire.errors import CommandError

if TYPE_CHECKING:
    from proxy.upstream.connection import UpstreamConnection

log = logging.getLogger("mongobranch.topology")

Address = tuple[str, int]

# Codes after which the server that sent them is no longer the one to write to
# (SDAM's "not writable primary" and "node is recovering" codes).
STATE_CHANGE_CODES: frozenset[int] = frozenset(_NOT_PRIMARY_CODES)

# How long one server selection waits before looking whether any server answers at all.
_SELECT_STEP = 1.0


# Topologies whose members a read preference chooses among (a mongos or a standalone
# serves every read itself; Unknown: not discovered yet, decided after selection).
_REPLICA_SETS = frozenset({TOPOLOGY_TYPE.ReplicaSetNoPrimary,
                           TOPOLOGY_TYPE.ReplicaSetWithPrimary, TOPOLOGY_TYPE.Unknown})


class NoWritableServer(Exception):
    """Server selection found no primary (or mongos) within its timeout."""


def read_preference(doc: Any) -> _ServerMode:
    """A command's `$readPreference` as pymongo's own read preference, refused with
    mongos's codes when malformed: BadValue for a bad mode or tag set, and
    MaxStalenessOutOfRange for a maxStalenessSeconds pymongo's selection refuses."""
    if not isinstance(doc, dict):
        raise CommandError(Code.TYPE_MISMATCH, "$readPreference must be an object")
    mode = doc.get("mode")
    if mode not in _MONGOS_MODES:
        raise CommandError(Code.BAD_VALUE, f"Unknown read preference mode: {mode!r}")
    tags = doc.get("tags")
    staleness = doc.get("maxStalenessSeconds", -1)
    if isinstance(staleness, float) and staleness.is_integer():
        staleness = int(staleness)
    if staleness == 0:
        staleness = -1  # as mongos: 0 means no bound
    if isinstance(staleness, bool) or not isinstance(staleness, int) or (
            staleness < 0 and staleness != -1):
        raise CommandError(Code.BAD_VALUE, "maxStalenessSeconds must be a non-negative "
                           f"integer, not {staleness!r}")
    try:
        return make_read_preference(_MONGOS_MODES.index(mode),
                                    None if tags is None else list(tags), staleness)
    except (ConfigurationError, TypeError, ValueError) as exc:
        raise CommandError(Code.BAD_VALUE, f"invalid $readPreference: {exc}") from exc


class UpstreamTopology:
    """The upstream's members as pymongo's monitors see them."""

    def __init__(self, client: AsyncMongoClient[Any], selection_timeout: float):
        self.client = client
        self.selection_timeout = selection_timeout
        # Open raw connections by server, so that a state change retires them all.
        self._open: dict[Address, set[UpstreamConnection]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def opened(self, conn: UpstreamConnection) -> None:
        if conn.address is not None:
            self._open.setdefault(conn.address, set()).add(conn)

    def closed(self, conn: UpstreamConnection) -> None:
        if conn.address is not None:
            conns = self._open.get(conn.address)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self._open[conn.address]

    def report(self, address: Address, code: int | None,
               topology_version: dict[str, Any] | None = None) -> None:
        """A raw connection saw `code` (a state change) or lost its socket (None).

        A state change retires every connection to that server: it no longer takes
        writes, and a driver retries a failed write once, so its retry must not land on
        another connection still open to the old primary. A lost socket only marks the
        server Unknown: the other connections find out for themselves (a server that
        closed one idle connection may serve the rest).
        """
        if code is not None:
            log.warning("upstream %s:%d answered %d: finding the primary again", *address, code)
            for conn in list(self._open.get(address, ())):
                conn.retire()
        task = asyncio.get_running_loop().create_task(
            self.failed(address, code, topology_version))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def select(self, timeout: float | None = None) -> Address:
        """The address to open a raw connection to: the current primary, a mongos or the
        standalone.

        While some member answers (an election is under way: the old primary stepped
        down, secondaries are there) this waits for a primary, up to `timeout`. When no
        server answers at all, it fails within a second, as a driver's operation fails
        fast against a deployment that is down: clients get HostUnreachable at once.
        """
        topology = await self.client._get_topology()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.selection_timeout if timeout is None else timeout)
        while True:
            step = max(0.0, min(_SELECT_STEP, deadline - loop.time()))
            try:
                server = await topology.select_server(
                    writable_server_selector, "mongobranch upstream connection", step)
            except PyMongoError as exc:
                servers = topology.description.server_descriptions().values()
                down = all(not sd.is_server_type_known and sd.error is not None
                           for sd in servers)
                if down or loop.time() >= deadline:
                    raise NoWritableServer(str(exc)) from exc
                continue
            host, port = server.description.address
            return str(host), int(port or 27017)

    async def select_reader(self, pref: _ServerMode) -> Address | None:
        """The member a read with this read preference goes to, chosen by pymongo's own
        server selection (tag sets, maxStalenessSeconds, the latency window), as mongos
        chooses; None when that is the primary (where the client's own connection goes),
        for mode primary, and when the upstream is not a replica set (a mongos or a
        standalone serves the read itself, on the client's own connection).

        Waits for a matching member up to the selection timeout, or a second when no
        member answers at all; then FailedToSatisfyReadPreference, as mongos answers."""
        if isinstance(pref, Primary):
            return None
        topology = await self.client._get_topology()
        if topology.description.topology_type not in _REPLICA_SETS:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.selection_timeout
        while True:
            step = max(0.0, min(_SELECT_STEP, deadline - loop.time()))
            try:
                server = await topology.select_server(pref, "mongobranch read", step)
            except ConfigurationError as exc:
                raise CommandError(Code.MAX_STALENESS_OUT_OF_RANGE, str(exc)) from exc
            except PyMongoError as exc:
                servers = topology.description.server_descriptions().values()
                down = all(not sd.is_server_type_known and sd.error is not None
                           for sd in servers)
                if down or loop.time() >= deadline:
                    raise CommandError(
                        Code.FAILED_TO_SATISFY_READ_PREFERENCE,
                        f"Could not find host matching read preference {pref.document} "
                        f"for set {topology.description.replica_set_name}: {exc}") from exc
                continue
            if (topology.description.topology_type not in _REPLICA_SETS
                    or server.description.is_writable):
                return None
            host, port = server.description.address
            return str(host), int(port or 27017)

    async def failed(self, address: Address, code: int | None,
                     topology_version: dict[str, Any] | None = None) -> None:
        """A raw connection to `address` saw a state-change error (`code`, with the
        server's `topologyVersion` when it sent one) or lost its socket (`code` None):
        handled as pymongo handles its own operations' errors (an error whose
        topologyVersion is not newer than the monitor's is stale and ignored), so the
        server is marked Unknown and rechecked, and the next selection finds the primary."""
        topology = self.client._topology
        if topology is None:
            return
        error: PyMongoError
        if code is None:
            error = AutoReconnect(f"connection to {address[0]}:{address[1]} closed")
        else:
            details: dict[str, Any] = {"ok": 0.0, "code": code, "errmsg": "not primary"}
            if topology_version is not None:
                details["topologyVersion"] = topology_version
            error = NotPrimaryError(f"upstream answered code {code}", details)
        server = topology.get_server_by_address(address)
        if server is None:
            return
        ctx = _ErrorContext(error, server.description.max_wire_version or 0,
                            server.pool.gen.get_overall(), True, None)
        try:
            await topology.handle_error(address, ctx)
            if code is not None and not server.description.is_server_type_known:
                # A streaming monitor would only see the change when its awaited hello
                # returns (up to heartbeatFrequencyMS): check again now, as pymongo does
                # after a network error.
                server._monitor.cancel_check()
        except Exception:
            log.exception("could not report the failure of %s:%d to server monitoring",
                          *address)

    def describe(self) -> dict[str, Any]:
        """The members and their states, for logs and the admin API."""
        topology = self.client._topology
        if topology is None:
            return {"type": "Unknown", "members": []}
        desc = topology.description
        return {
            "type": TOPOLOGY_TYPE._fields[desc.topology_type],
            "setName": desc.replica_set_name,
            "members": [{"address": f"{sd.address[0]}:{sd.address[1]}",
                         "state": sd.server_type_name}
                        for sd in desc.server_descriptions().values()],
        }
