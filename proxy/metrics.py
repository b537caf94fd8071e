"""Prometheus metrics. Label values come from a closed set so clients cannot grow them.

The per-request figures (requests by command, latency, bytes in and out) are plain
integers and floats bumped on the forwarding path and turned into Prometheus samples
only when /metrics is scraped: a prometheus_client Counter or Histogram takes a lock
and a few attribute look-ups per update, several microseconds per request all told.
Everything runs on the event loop's thread, so plain arithmetic is safe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

REGISTRY = CollectorRegistry(auto_describe=True)
log = logging.getLogger("mongobranch.metrics")

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
CLUSTER_LEADER = Gauge(
    "mongobranch_engine_lease_held",
    "1 while this process holds the engine lease and serves every branch (scale-out)",
    registry=REGISTRY,
)
CLUSTER_TAKEOVERS = Counter(
    "mongobranch_engine_takeovers",
    "Times this process took the engine lease over from another process whose lease expired",
    registry=REGISTRY,
)
RELAYED = Counter(
    "mongobranch_relayed_connections",
    "Client connections this process relayed to the engine lease's holder (scale-out)",
    ["listener"], registry=REGISTRY,
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


class PortStats:
    """One port's request figures (a branch's, or the main port's), bumped where the
    global latency is observed; `last_started` is a perf_counter reading, turned into a
    wall-clock time only when scraped."""

    __slots__ = ("last_started", "latency_counts", "latency_sum", "size")

    def __init__(self) -> None:
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.last_started = 0.0
        # (overlay documents, overlay bytes, WAL entries), once measured (BranchSizes).
        self.size: tuple[int, int, int] | None = None

    def observe(self, started: float, elapsed: float) -> None:
        self.latency_counts[bisect_left(LATENCY_BUCKETS, elapsed)] += 1
        self.latency_sum += elapsed
        self.last_started = started

    @property
    def requests(self) -> int:
        return sum(self.latency_counts)

    def last_used(self) -> float:
        """Unix time of the last request's start, 0 if there was none."""
        if not self.last_started:
            return 0.0
        return time.time() - (time.perf_counter() - self.last_started)


OTHER = "other"


class BranchSeries:
    """Per-branch series with a cap on branch labels: a scrape's size stays bounded
    however many branches exist. Ports beyond the cap share the `other` label; the main
    port is always labelled `main`. A dropped branch frees its label."""

    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self.ports: dict[str, PortStats] = {}
        self.other = PortStats()
        self.main = PortStats()
        self.folded: set[str] = set()

    def acquire(self, branch: str) -> PortStats:
        stats = self.ports.get(branch)
        if stats is not None:
            return stats
        if len(self.ports) < self.limit:
            stats = self.ports[branch] = PortStats()
            self.folded.discard(branch)
            return stats
        self.folded.add(branch)
        return self.other

    def release(self, branch: str) -> None:
        self.ports.pop(branch, None)
        self.folded.discard(branch)

    def series(self) -> Iterator[tuple[str, PortStats]]:
        yield "main", self.main
        yield from self.ports.items()
        yield OTHER, self.other


BRANCHES = BranchSeries()

SIZE_SERIES = (
    ("mongobranch_branch_overlay_documents", "Documents in a branch's overlays (measured "
     "at most once per --metrics-size-interval, on scrape; labelled branches only)"),
    ("mongobranch_branch_overlay_bytes", "Data bytes of a branch's overlays and hidden-id "
     "sets, as the upstream's collStats counts them"),
    ("mongobranch_branch_wal_entries", "WAL entries of a branch"),
)


class BranchSizes:
    """Refreshes the labelled branches' sizes when a scrape finds them older than the
    interval: measuring costs a few upstream commands per branch, so it is neither done
    per write nor on every scrape of a busy Prometheus."""

    def __init__(self, measure: Callable[[list[str]], Awaitable[dict[str, Any]]],
                 interval: float) -> None:
        self.measure = measure
        self.interval = interval
        self.measured = -float("inf")
        self.lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self.lock:
            if time.monotonic() - self.measured < self.interval:
                return
            names = list(BRANCHES.ports)
            try:
                sizes = await asyncio.wait_for(self.measure(names), SIZE_TIMEOUT)
            except Exception:  # a scrape answers with the last figures rather than fail
                log.warning("measuring branch sizes failed; /metrics keeps the last figures",
                            exc_info=True)
                return
            for name, size in sizes.items():
                stats = BRANCHES.ports.get(name)
                if stats is not None:
                    stats.size = (size.overlay_documents, size.overlay_bytes,
                                  size.wal_entries)
            self.measured = time.monotonic()


# Bounds a scrape's wait for the upstream.
SIZE_TIMEOUT = 5.0


class _BranchCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "mongobranch_branch_requests", "Requests answered on a branch's port "
            "(main: the main port; other: branches beyond the label cap)", labels=["branch"])
        latency = HistogramMetricFamily("mongobranch_branch_request_seconds",
                                        "Request latency by branch port", labels=["branch"])
        last = GaugeMetricFamily("mongobranch_branch_last_request_timestamp_seconds",
                                 "Unix time of the last request on a branch's port "
                                 "(0: none since the proxy started)", labels=["branch"])
        sizes = [GaugeMetricFamily(name, text, labels=["branch"]) for name, text in SIZE_SERIES]
        for label, stats in BRANCHES.series():
            if stats.size is not None:
                for family, value in zip(sizes, stats.size, strict=True):
                    family.add_metric([label], value)
            total = 0
            buckets = []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), stats.latency_counts,
                                    strict=True):
                total += count
                buckets.append((floatToGoString(bound), total))
            requests.add_metric([label], total)
            latency.add_metric([label], buckets, sum_value=stats.latency_sum)
            last.add_metric([label], stats.last_used())
        yield requests
        yield latency
        yield last
        yield from sizes
        yield GaugeMetricFamily("mongobranch_branch_labels_folded",
                                "Branches counted under branch=\"other\" (label cap reached)",
                                value=len(BRANCHES.folded))
        yield GaugeMetricFamily("mongobranch_branch_label_limit",
                                "The cap on per-branch labels", value=BRANCHES.limit)


REGISTRY.register(_BranchCollector())


# The capture's figures (proxy/branching/capture.Stats), read at scrape time; set by the
# serving layer once the engine started its capture.
CAPTURE: list[Callable[[], Any]] = []


class _CaptureCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        if not CAPTURE:
            return
        stats = CAPTURE[0]()
        if stats is None:
            return
        yield GaugeMetricFamily("mongobranch_capture_lag_seconds",
                                "Age of the newest change the capture of main applied, when "
                                "its batch was applied (0 when the stream is idle)",
                                value=stats.lag_seconds)
        yield CounterMetricFamily("mongobranch_capture_events",
                                  "Change-stream events of main the capture applied",
                                  value=stats.events)
        yield CounterMetricFamily("mongobranch_capture_barrier_waits",
                                  "Branch reads (and main-port writes) that waited for the "
                                  "capture", value=stats.barrier_waits)
        yield CounterMetricFamily("mongobranch_capture_barrier_timeouts",
                                  "Branch reads that went ahead without the capture catching up",
                                  value=stats.barrier_timeouts)
        yield CounterMetricFamily("mongobranch_capture_unpreservable",
                                  "Changes of main that arrived without their pre-image",
                                  value=stats.unpreservable)


REGISTRY.register(_CaptureCollector())
