"""Prometheus metrics. Label values come from a closed set so clients cannot grow them.

The per-request figures (requests by command, latency, bytes in and out) are plain
integers and floats bumped on the forwarding path and turned into Prometheus samples
only when /metrics is scraped: a prometheus_client Counter or Histogram takes a lock
and a few attribute look-ups per update, several microseconds per request all told.
Everything runs on the event loop's thread, so plain arithmetic is safe.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

REGISTRY = CollectorRegistry(auto_describe=True)

OPEN_CONNECTIONS = Gauge(
    "mongobranch_open_connections", "Client connections open", ["listener"], registry=REGISTRY
)
UPSTREAM_ERRORS = Counter(
    "mongobranch_upstream_errors", "Upstream connection failures", registry=REGISTRY
)
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

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class Hot:
    """The per-request figures, bumped in place on the forwarding path."""

    __slots__ = ("bytes_in", "bytes_out", "latency_counts", "latency_sum", "requests")

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.requests: dict[str, int] = dict.fromkeys(sorted(KNOWN_COMMANDS | {"other"}), 0)
        # One count per bucket (value <= its bound, not cumulative) and one for +Inf.
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0


HOT = Hot()
_requests = HOT.requests
_latency_counts = HOT.latency_counts


def count_request(name: str) -> None:
    if name in _requests:
        _requests[name] += 1
    else:
        _requests["other"] += 1


def observe_latency(seconds: float) -> None:
    _latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
    HOT.latency_sum += seconds


class _HotCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("mongobranch_requests", "Requests by command name",
                                       labels=["command"])
        for name, count in HOT.requests.items():
            requests.add_metric([name], count)
        yield requests
        buckets = []
        total = 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), HOT.latency_counts,
                                strict=True):
            total += count
            buckets.append((floatToGoString(bound), total))
        latency = HistogramMetricFamily("mongobranch_request_seconds",
                                        "Request latency as seen by the proxy")
        latency.add_metric([], buckets, sum_value=HOT.latency_sum)
        yield latency
        yield CounterMetricFamily("mongobranch_bytes_in", "Bytes received from clients",
                                  value=HOT.bytes_in)
        yield CounterMetricFamily("mongobranch_bytes_out", "Bytes sent to clients",
                                  value=HOT.bytes_out)


REGISTRY.register(_HotCollector())
