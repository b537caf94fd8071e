"""The log's newest entries as main's history grows (issue 15): `GET /branches/main/log`.

SecantusDB reads every entry a filter matches before it sorts and limits them, even
along an index in that order, so a plain "newest first, limit n" query costs the size
of the log. `Wal.newest` reads LSN windows going back from the newest issued instead.
One run starts one in-memory SecantusDB per size, stores that many synthetic entries of
main's log directly in the metadata database, starts a proxy on it, and times, for each
size (median of --repeat calls): the newest entry (`limit=1`), a page of 100
(`limit=100`), and the same page through a plain sorted aggregation directly on the
upstream (what the log read before). The script never asserts; it prints a table.

    .venv/bin/python benchmarks/logsize.py                     # 1,000 and 100,000 entries
    .venv/bin/python benchmarks/logsize.py --sizes 1000 200000 --repeat 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests/

from bson import Int64
from pymongo import MongoClient

from tests.servers import ProxyProcess, Secantus

META = "mb_logsize"


def timed(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of `repeat` calls."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def measure(n: int, repeat: int) -> dict[str, float]:
    server = Secantus().start()
    try:
        direct: MongoClient[dict[str, Any]] = MongoClient(server.uri, directConnection=True)
        wal = direct[META].wal
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        for start in range(0, n, 10_000):
            wal.insert_many([{"_id": Int64(i + 1), "b": "main", "ns": "app.items", "id": i,
                              "op": "put", "post": {"_id": i, "pad": "p" * 100}, "ts": now,
                              "client": {}} for i in range(start, min(n, start + 10_000))])
        direct[META].counters.insert_one({"_id": "lsn", "v": Int64(n)})
        proxy = ProxyProcess(server.uri, meta_db=META).start()
        try:
            proxy.api("GET", "/branches/main/log?limit=1", timeout=600)  # warm
            out = {
                "newest": timed(lambda: proxy.api("GET", "/branches/main/log?limit=1",
                                                  timeout=600), repeat),
                "page": timed(lambda: proxy.api("GET", "/branches/main/log?limit=100",
                                                timeout=600), repeat),
                "plain": timed(lambda: list(wal.aggregate([
                    {"$match": {"b": "main"}}, {"$sort": {"_id": -1}}, {"$limit": 100},
                    {"$project": {"post": 0}}])), repeat),
            }
        finally:
            proxy.stop()
        direct.close()
        return out
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rows = [(n, measure(n, args.repeat)) for n in args.sizes]
    print(f"{'entries':>10} {'newest (s)':>11} {'page of 100 (s)':>16} {'plain sorted (s)':>17}")
    for n, got in rows:
        print(f"{n:>10,} {got['newest']:>11.3f} {got['page']:>16.3f} {got['plain']:>17.3f}")
    small, large = rows[0][1], rows[-1][1]
    print(f"largest / smallest: newest {large['newest'] / small['newest']:.1f}x, page "
          f"{large['page'] / small['page']:.1f}x, plain {large['plain'] / small['plain']:.1f}x")


if __name__ == "__main__":
    main()
