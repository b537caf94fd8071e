"""Per-branch Prometheus metrics (bounded labels) and `serve --log-format json`, against a
real proxy process with its own metadata database."""

from __future__ import annotations

import json
import logging
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymongo import MongoClient

from proxy.logs import JsonFormatter
from tests import rawwire
from tests.branchutil import unique
from tests.servers import ProxyProcess, Secantus

LIMIT = 2  # --metrics-branch-limit of the proxy under test


@pytest.fixture(scope="module")
def observed(upstream: Secantus) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(upstream.uri, meta_db=unique("mbobs").replace("-", "_"),
                        extra=["--log-format", "json", "--metrics-branch-limit", str(LIMIT),
                               "--metrics-size-interval", "0"])
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        with MongoClient(upstream.uri, directConnection=True) as c:
            c.drop_database(proc.meta_db)


def scrape(proxy: ProxyProcess) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Samples by name, then by their sorted labels."""
    with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def by_branch(samples: dict[str, dict[tuple[tuple[str, str], ...], float]],
              name: str) -> dict[str, float]:
    return {dict(labels)["branch"]: value for labels, value in samples.get(name, {}).items()
            if "le" not in dict(labels)}


def create(proxy: ProxyProcess, name: str) -> dict[str, Any]:
    status, branch = proxy.api("POST", "/branches", {"name": name})
    assert status == 201, branch
    assert isinstance(branch, dict)
    return branch


def drop(proxy: ProxyProcess, name: str) -> None:
    proxy.api("DELETE", f"/branches/{name}")


def send(port: int, commands: list[dict[str, Any]]) -> None:
    """Exactly these requests on one raw connection: no driver handshake or monitoring."""
    sock = rawwire.connect(port)
    try:
        for i, cmd in enumerate(commands, 1):
            reply = rawwire.command(sock, cmd, request_id=i)
            assert reply.get("ok") == 1.0, reply
    finally:
        sock.close()


def test_requests_latency_and_last_use_per_branch(observed: ProxyProcess) -> None:
    first, second = unique("obs-a"), unique("obs-b")
    a, b = create(observed, first), create(observed, second)
    try:
        before = scrape(observed)
        assert by_branch(before, "mongobranch_branch_requests_total")[first] == 0
        assert by_branch(before, "mongobranch_branch_last_request_timestamp_seconds")[
            first] == 0
        started = time.time()
        # Forwarded (ping), routed reads and writes: every path a request can take.
        send(a["port"], [{"ping": 1, "$db": "admin"}] * 3 + [
            {"insert": "things", "documents": [{"_id": 1}], "$db": "obs"},
            {"find": "things", "filter": {}, "$db": "obs"}])
        send(b["port"], [{"ping": 1, "$db": "admin"}] * 2)
        finished = time.time()
        after = scrape(observed)
        requests = by_branch(after, "mongobranch_branch_requests_total")
        assert requests[first] == 5 and requests[second] == 2
        counts = by_branch(after, "mongobranch_branch_request_seconds_count")
        assert counts[first] == 5 and counts[second] == 2
        sums = by_branch(after, "mongobranch_branch_request_seconds_sum")
        assert sums[first] > 0 and sums[second] > 0
        buckets = {dict(labels)["le"]: value for labels, value in
                   after["mongobranch_branch_request_seconds_bucket"].items()
                   if dict(labels)["branch"] == first}
        assert buckets["+Inf"] == 5
        last = by_branch(after, "mongobranch_branch_last_request_timestamp_seconds")
        # Clock readings around the requests (the proxy converts a monotonic reading).
        assert started - 1 <= last[first] <= finished + 1
        assert started - 1 <= last[second] <= finished + 1
        # The main port is labelled main, never counted under a branch.
        main_before = by_branch(after, "mongobranch_branch_requests_total")["main"]
        send(observed.port, [{"ping": 1, "$db": "admin"}])
        final = by_branch(scrape(observed), "mongobranch_branch_requests_total")
        assert final["main"] == main_before + 1
        assert final[first] == 5 and final[second] == 2
    finally:
        drop(observed, first)
        drop(observed, second)
    gone = by_branch(scrape(observed), "mongobranch_branch_requests_total")
    assert first not in gone and second not in gone


def test_overlay_and_wal_sizes_per_branch(observed: ProxyProcess) -> None:
    name = unique("obs-size")
    branch = create(observed, name)
    try:
        samples = scrape(observed)
        assert by_branch(samples, "mongobranch_branch_overlay_documents")[name] == 0
        assert by_branch(samples, "mongobranch_branch_wal_entries")[name] == 0
        send(branch["port"], [
            {"insert": "sized", "documents": [{"_id": i, "pad": "x" * 500} for i in range(3)],
             "$db": "obs"},
            {"delete": "sized", "deletes": [{"q": {"_id": 0}, "limit": 1}], "$db": "obs"}])
        samples = scrape(observed)
        assert by_branch(samples, "mongobranch_branch_overlay_documents")[name] == 2
        # The collection is new on the branch: an `own` entry, 3 puts and a delete.
        assert by_branch(samples, "mongobranch_branch_wal_entries")[name] == 5
        # Two documents of over 500 bytes (a collection of its own hides no ids).
        assert by_branch(samples, "mongobranch_branch_overlay_bytes")[name] > 1000
        # Sizes are labelled like the request series: main's are the upstream's own.
        assert "main" not in by_branch(samples, "mongobranch_branch_overlay_documents")
    finally:
        drop(observed, name)
    assert name not in by_branch(scrape(observed), "mongobranch_branch_wal_entries")


def test_branch_labels_are_capped(observed: ProxyProcess) -> None:
    names = [unique(f"cap{i}") for i in range(LIMIT + 2)]
    made = [create(observed, name) for name in names]
    late = unique("cap-late")
    try:
        samples = scrape(observed)
        requests = by_branch(samples, "mongobranch_branch_requests_total")
        labelled = [n for n in names if n in requests]
        assert labelled == names[:LIMIT]  # first come, first labelled
        assert set(requests) == {"main", "other", *names[:LIMIT]}
        assert samples["mongobranch_branch_labels_folded"][()] == 2
        assert samples["mongobranch_branch_label_limit"][()] == LIMIT
        other_before = requests["other"]
        send(made[LIMIT]["port"], [{"ping": 1, "$db": "admin"}] * 2)
        send(made[LIMIT + 1]["port"], [{"ping": 1, "$db": "admin"}])
        requests = by_branch(scrape(observed), "mongobranch_branch_requests_total")
        assert requests["other"] == other_before + 3
        assert all(requests[n] == 0 for n in names[:LIMIT])
        # A dropped branch frees its label for the next branch created.
        drop(observed, names[0])
        create(observed, late)
        samples = scrape(observed)
        requests = by_branch(samples, "mongobranch_branch_requests_total")
        assert names[0] not in requests and late in requests
        assert len(requests) == LIMIT + 2  # main and other besides the capped branches
        assert samples["mongobranch_branch_labels_folded"][()] == 2
    finally:
        for name in (late, *names):
            drop(observed, name)


def test_json_log_lines(observed: ProxyProcess) -> None:
    branch = create(observed, unique("obs-log"))
    try:
        sock = rawwire.connect(branch["port"])
        sock.sendall(b"\x10\x00\x00\x00garbage-bytes!")  # an unknown opCode
        assert rawwire.closed_by_peer(sock)
        sock.close()
    finally:
        drop(observed, branch["name"])
    lines = [line for line in observed.read_log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
        assert entry["time"].endswith("Z") and "T" in entry["time"]
    messages = [e["message"] for e in entries]
    assert any(m.startswith("mongobranch ready") for m in messages)
    assert any(f"branch:{branch['name']} listening on" in m for m in messages)
    closed = [e for e in entries if e["logger"] == "mongobranch.conn"
              and "closing connection" in e["message"]]
    assert closed and closed[0]["level"] == "WARNING"


def test_json_formatter_keeps_tracebacks_and_extra_fields() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("mongobranch.test", logging.ERROR, __file__, 1,
                                   "failed %s", ("here",), sys.exc_info())
    record.branch = "feature-x"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed here" and entry["level"] == "ERROR"
    assert entry["logger"] == "mongobranch.test"
    assert entry["branch"] == "feature-x"
    assert "ValueError: boom" in entry["exception"]
    assert "\n" not in JsonFormatter().format(record)


def test_serve_refuses_unknown_log_format(upstream: Secantus) -> None:
    import os
    import subprocess

    from tests.servers import BIN

    done = subprocess.run([str(BIN / "mongobranch"), "serve", "--upstream", upstream.uri,
                           "--log-format", "xml"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--log-format" in done.stderr
    env = {**os.environ, "MONGOBRANCH_LOG_FORMAT": "yaml"}
    done = subprocess.run([str(BIN / "mongobranch"), "serve", "--upstream", upstream.uri],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "--log-format" in done.stderr


def test_grafana_dashboard_queries_metrics_the_proxy_exports(observed: ProxyProcess) -> None:
    """Every series the dashboard queries is one the proxy serves, so a renamed metric
    cannot leave an empty panel behind."""
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "deploy/grafana/mongobranch-dashboard.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {m for e in exprs for m in re.findall(r"\b(mongobranch_[a-z_]+)\b", e)}
    assert len(queried) >= 10
    # A branch, so that the series only measured branches have are there too.
    name = unique("obs-dash")
    create(observed, name)
    try:
        exported = set(scrape(observed))
    finally:
        drop(observed, name)
    assert queried <= exported, queried - exported
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for expr in exprs:
        assert set(re.findall(r"\$([a-z]+)", expr)) - {"__rate_interval"} <= variables
