"""The test upstream's own write rate, and why it falls (SecantusDB, not the proxy).

Every other benchmark compares the proxy with the same work done on SecantusDB, whose
single-document write rate falls several-fold over its first ~10,000 writes. The cause
is SecantusDB's record of retryable-write outcomes (kept 30 minutes, for a retry to get
the first answer): each write scans every record, and once there are more than 10,000,
sorts them all. A client with retryWrites (pymongo's default, and the proxy's own pool)
pays it on every write; one without does not. mongod keeps these records in
`config.transactions`, one per session, so it has no such curve.

This benchmark starts one fresh in-memory SecantusDB and times `insert_one` in blocks
of 1,000 with retryWrites on, then on a new collection with it off, and rewrites the
"## Upstream write rate (SecantusDB)" section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/upstream_writes.py            # 13 blocks each
    .venv/bin/python benchmarks/upstream_writes.py --blocks 3 --no-write
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

from pymongo import MongoClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests/
from benchmarks.results import replace_section
from tests.servers import Secantus

SECTION = "## Upstream write rate (SecantusDB)"
BLOCK = 1000


def rates(uri: str, retry: bool, blocks: int) -> list[float]:
    """insert_one/s of each block of BLOCK writes, on a collection of its own."""
    client: MongoClient = MongoClient(uri, directConnection=True, retryWrites=retry)
    try:
        coll = client.bench[f"retry_{retry}"]
        out = []
        for b in range(blocks):
            start = time.perf_counter()
            for i in range(BLOCK):
                coll.insert_one({"b": b, "i": i})
            out.append(BLOCK / (time.perf_counter() - start))
        return out
    finally:
        client.close()


def section(results: dict[bool, list[float]], load: tuple[float, float]) -> str:
    blocks = len(results[True])
    head = "| writes so far | " + " | ".join(
        f"{(b + 1) * BLOCK // 1000}k" for b in range(blocks)) + " |"
    rows = [f"| retryWrites={'on' if retry else 'off'} | " + " | ".join(
        f"{r:,.0f}" for r in results[retry]) + " |" for retry in (True, False)]
    return "\n".join([
        SECTION, "",
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC with "
        "`.venv/bin/python benchmarks/upstream_writes.py` on one fresh in-memory "
        f"SecantusDB; 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at "
        "the end. `insert_one`/s per block of 1,000, retryWrites on (pymongo's default), "
        "then off, each on a collection of its own:", "",
        head, "|---|" + "---|" * blocks, *rows, "",
        "With retryWrites on, each write scans SecantusDB's records of the retryable "
        "writes of the last 30 minutes and, past 10,000 of them, sorts them all: the rate "
        "falls block after block, then drops at 10,000. Without it the rate holds. The "
        "Snapshots section's upstream is past that point after its warm-up (its "
        "\"levelled-off\" rate), and so is the test suite's shared upstream late in a "
        "full run (tests/test_differential.py therefore starts its own). A benchmark's "
        "absolute rates depend on where its upstream is on this curve; its ratios "
        "compare like with like only when both sides run on the same upstream at the "
        "same point, as they do when interleaved in one run.", ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=13, help="blocks of 1,000 writes each")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()
    start_load = os.getloadavg()[0]
    server = Secantus().start()
    try:
        results = {retry: rates(server.uri, retry, args.blocks) for retry in (True, False)}
    finally:
        server.stop()
    text = section(results, (start_load, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        replace_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
