"""Prometheus metrics. Label values come from a closed set so clients cannot grow them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

OPEN_CONNECTIONS = Gauge(
    "mongobranch_open_connections", "Client connections open", ["listener"], registry=REGISTRY
)
REQUESTS = Counter(
    "mongobranch_requests", "Requests by command name", ["command"], registry=REGISTRY
)
LATENCY = Histogram(
    "mongobranch_request_seconds",
    "Request latency as seen by the proxy",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "mongobranch_upstream_errors", "Upstream connection failures", registry=REGISTRY
)
BYTES_IN = Counter("mongobranch_bytes_in", "Bytes received from clients", registry=REGISTRY)
BYTES_OUT = Counter("mongobranch_bytes_out", "Bytes sent to clients", registry=REGISTRY)
PROTOCOL_ERRORS = Counter(
    "mongobranch_protocol_errors", "Client connections closed for malformed input",
    registry=REGISTRY,
)

KNOWN_COMMANDS = frozenset(
    """
hello isMaster ismaster ping buildInfo buildinfo saslStart saslContinue authenticate
logout find getMore killCursors aggregate count distinct insert update delete
findAndModify create drop dropDatabase renameCollection createIndexes dropIndexes
listIndexes listCollections listDatabases explain collMod endSessions startSession
commitTransaction abortTransaction serverStatus getParameter getLog hostInfo whatsmyuri
connectionStatus getCmdLineOpts dbStats collStats currentOp killOp validate bulkWrite
createBranch listBranches branchInfo dropBranch
""".split()
)

_counters = {name: REQUESTS.labels(name) for name in KNOWN_COMMANDS}
_other = REQUESTS.labels("other")


def count_request(name: str) -> None:
    _counters.get(name, _other).inc()
