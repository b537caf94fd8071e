"""Snapshots benchmark: main-port write throughput with 0, 1 and 10 live children of main.

With no children the main port forwards writes on its fast path; with children each
write is intercepted, its pre-images copied up into the children and logged in main's
WAL (docs/ARCHITECTURE.md, "Snapshots"). One in-memory SecantusDB and one proxy; 4
client threads run point inserts, updates (by _id) and deletes (of the documents the
insert block made) for a fixed time per block; the configurations rotate over several
rounds so machine noise falls on all alike. Writes the "## Snapshots (issue 11)"
section of benchmarks/RESULTS.md (other sections kept).

    .venv/bin/python benchmarks/snapshots.py            # ~3 minutes
    .venv/bin/python benchmarks/snapshots.py --quick    # smoke run, no RESULTS.md update
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from pymongo import MongoClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
import branches
from branches import DB, Procs, Stack, start_stack, write_results

SECTION = "## Snapshots (issue 11)"
CLIENTS = 4
BASE_DOCS = 10_000
OPS = ("insert", "update", "delete")


def block(stack: Stack, op: str, seconds: float, tag: str,
          made: dict[str, list[str]]) -> float:
    """Operations per second of 4 clients running one kind of write for a while."""
    counts = [0] * CLIENTS
    stop = time.monotonic() + seconds

    def run(n: int) -> None:
        rng = random.Random(f"{tag}-{n}")
        with MongoClient(stack.proxy_uri) as c:
            coll = c[DB]["items"]
            i = 0
            mine = made.setdefault(f"{tag}-{n}", [])
            while time.monotonic() < stop:
                if op == "insert":
                    key = f"{tag}-{n}-{i}"
                    coll.insert_one({"_id": key, "v": i})
                    mine.append(key)
                elif op == "update":
                    coll.update_one({"_id": rng.randrange(BASE_DOCS)}, {"$inc": {"n": 1}})
                else:
                    if not mine:
                        break
                    coll.delete_one({"_id": mine.pop()})
                i += 1
            counts[n] = i

    threads = [threading.Thread(target=run, args=(n,)) for n in range(CLIENTS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def set_children(stack: Stack, want: int, live: list[str]) -> None:
    while len(live) < want:
        name = f"kid{len(live)}-{int(time.time() * 1000) % 100000}"
        stack.branch(name)
        live.append(name)
    while len(live) > want:
        name = live.pop()
        status, body = stack.api("DELETE", f"/branches/{name}")
        if status != 204 and status != 200:
            raise RuntimeError(f"dropping {name}: {status} {body}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run; no RESULTS.md")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0, help="per block")
    args = ap.parse_args()
    rounds, seconds = (1, 1.0) if args.quick else (args.rounds, args.seconds)
    configs = (0, 1, 10)
    procs = Procs(Path(tempfile.mkdtemp(prefix="mb-snapbench-")))
    results: dict[tuple[int, str], list[float]] = {}
    try:
        stack = start_stack(procs, "snap", set(), 20)
        with MongoClient(stack.proxy_uri) as c:
            c[DB]["items"].insert_many([{"_id": i, "v": i} for i in range(BASE_DOCS)])
        live: list[str] = []
        for r in range(rounds):
            order = list(configs) if r % 2 == 0 else list(reversed(configs))
            for kids in order:
                set_children(stack, kids, live)
                made: dict[str, list[str]] = {}
                for op in OPS:
                    rate = block(stack, op, seconds, f"r{r}k{kids}", made)
                    results.setdefault((kids, op), []).append(rate)
                    print(f"round {r} children {kids:2d} {op:6s} {rate:8.0f} ops/s",
                          flush=True)
        set_children(stack, 0, live)
    finally:
        procs.stop_all()
    med = {key: statistics.median(v) for key, v in results.items()}
    lines = [SECTION, "",
             f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
             f"({platform.machine()}, Python {platform.python_version()}), with "
             f"`.venv/bin/python benchmarks/snapshots.py --rounds {rounds} --seconds "
             f"{seconds:g}`: one in-memory SecantusDB, one proxy, {BASE_DOCS:,} documents, "
             f"{CLIENTS} client threads, median of {rounds} rotating rounds. Shared 2-core "
             "machine: absolute figures are noisy, ratios within one run less so.", "",
             "| children of main | insert ops/s | update ops/s | delete ops/s "
             "| insert vs 0 | update vs 0 | delete vs 0 |",
             "|---|---|---|---|---|---|---|"]
    for kids in configs:
        row = [str(kids)] + [f"{med[(kids, op)]:.0f}" for op in OPS] + [
            f"{med[(kids, op)] / med[(0, op)]:.0%}" for op in OPS]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Targets of issue 11: with 1 child >= 70% of with none, with 10 >= 50%. "
              "With children every write is read first, copied up into each child (a "
              "hidden id, the document, a WAL entry per child) and logged in main's WAL "
              "with its post-image: several round trips where the fast path has one."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_results(text)
    return 0


branches.SECTION = SECTION  # write_results replaces this section only

if __name__ == "__main__":
    raise SystemExit(main())
