"""DDL on a branch port vs the main port (issue 15): what pymongo's own
`list_collection_names` tests and a unique index build cost on a branch.

One run starts an in-memory SecantusDB and a proxy on it, and measures, each target in
turn within one round so the noise of a shared machine falls on all alike (median of
--rounds rounds):

- `create_collection` of --colls new collections, then `drop_database`: on the main
  port with main having no child, on a branch, and on the main port while main has that
  child (each DDL of main then waits for the capture, which pins the new collection
  absent in the child);
- a unique `createIndexes` on a collection of --docs documents: on the main port, and on
  a branch that reads the collection through main (it builds the index on a scratch
  copy of its view first, as mongod's build reads every document, then on its overlay).

The script never asserts: it prints a table and rewrites the "## DDL on a branch
(issue 15)" section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/ddl.py                  # 200 collections, 100,000 documents
    .venv/bin/python benchmarks/ddl.py --colls 50 --docs 10000 --rounds 1 --no-write
    .venv/bin/python benchmarks/ddl.py --fill 11000  # and with SecantusDB's retryable-
                                                     # write registry full, as in
                                                     # `make conformance`'s branch run
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests/

from pymongo import MongoClient

from benchmarks.results import replace_section
from tests.servers import ProxyProcess, Secantus

HEADING = "## DDL on a branch (issue 15)"


def collections(client: MongoClient[dict[str, Any]], n: int) -> float:
    """Seconds for n create_collection and the drop_database after them."""
    db = client.ddl_bench
    start = time.perf_counter()
    for i in range(n):
        db.create_collection(f"c{i}")
    client.drop_database("ddl_bench")
    return time.perf_counter() - start


def unique_index(client: MongoClient[dict[str, Any]], name: str) -> float:
    coll = client.ddl_seed.items
    start = time.perf_counter()
    coll.create_index("u", unique=True, name=name)
    took = time.perf_counter() - start
    coll.drop_index(name)
    return took


FILLED = """
The "registry full" rows come after `--fill` retryable `insert_one`s sent to the
upstream directly (and a first write on the branch, which waits for the capture to log
them in main's history). SecantusDB keeps the reply of each retryable write (10,000 at
most, for 30 minutes) and, on every retryable write, scans them all and, once it holds
10,000, sorts them. A new collection on a branch costs retryable writes of its metadata
(its namespace state, its dirty mark, its WAL entries); on the main port, the capture's
entry for the `create` in main's history is one. Over `make conformance` the registry
fills: the branch run, which makes several such writes per operation of a test, runs
with it fuller than the main run did. mongod keeps one record per session, in
`config.transactions`.
"""


def fill_registry(uri: str, n: int) -> None:
    """n retryable writes on the upstream directly, which SecantusDB keeps (FILLED)."""
    direct: MongoClient[dict[str, Any]] = MongoClient(uri, directConnection=True)
    with direct:
        for i in range(n):
            direct.ddl_fill.items.insert_one({"i": i})
        direct.drop_database("ddl_fill")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--colls", type=int, default=200)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--fill", type=int, default=0,
                    help="then this many retryable writes on the upstream directly, and "
                         "the collections targets once more (11000 fills SecantusDB's "
                         "retryable-write registry, 10,000 records)")
    args = ap.parse_args()
    server = Secantus().start()
    # Seeded on the upstream before the proxy starts: the capture, which logs main's
    # writes in main's history at about 1,000 documents/s on SecantusDB, has no backlog
    # of the seed that the first branch's DDL would wait for (its reads are exact). A
    # fork waits for such a backlog 30 s at most (the barrier's timeout), so one made
    # after a seed through the main port does not clear it.
    with MongoClient(server.uri, directConnection=True) as direct:
        items = direct.ddl_seed.items
        for start in range(0, args.docs, 10_000):
            items.insert_many([{"_id": i, "u": i, "pad": "p" * 50}
                               for i in range(start, min(args.docs, start + 10_000))])
    proxy = ProxyProcess(server.uri).start()
    runs: dict[str, list[float]] = {}
    try:
        main_port: MongoClient[dict[str, Any]] = MongoClient(proxy.uri)
        for _ in range(args.rounds):
            runs.setdefault("collections, main (no child)", []).append(
                collections(main_port, args.colls))
            runs.setdefault("unique index, main", []).append(unique_index(main_port, "u_main"))
            status, body = proxy.api("POST", "/branches", {"name": "ddl-bench"})
            assert status == 201 and isinstance(body, dict), body
            branch: MongoClient[dict[str, Any]]
            with MongoClient(body["uri"]) as branch:
                runs.setdefault("collections, branch", []).append(
                    collections(branch, args.colls))
                runs.setdefault("unique index, branch", []).append(
                    unique_index(branch, "u_branch"))
            runs.setdefault("collections, main (one child)", []).append(
                collections(main_port, args.colls))
            proxy.api("DELETE", "/branches/ddl-bench")
        if args.fill:
            fill_registry(server.uri, args.fill)
            status, body = proxy.api("POST", "/branches", {"name": "ddl-bench"})
            assert status == 201 and isinstance(body, dict), body
            with MongoClient(body["uri"]) as branch:
                # A branch's first write waits for the capture to have logged the fill
                # in main's history; neither target is timed while it works on that.
                branch.ddl_warm.c.insert_one({})
                branch.drop_database("ddl_warm")
                runs["collections, branch, registry full"] = [collections(branch, args.colls)]
            proxy.api("DELETE", "/branches/ddl-bench")
            runs["collections, main (no child), registry full"] = [
                collections(main_port, args.colls)]
        main_port.close()
    finally:
        proxy.stop()
        server.stop()
    got = {k: statistics.median(v) for k, v in runs.items()}
    rows = [f"| {k} | {v:.2f} s |" for k, v in got.items()]
    alone = got["collections, main (no child)"]
    ratios = (f"collections: branch / main {got['collections, branch'] / alone:.1f}x, "
              f"main with a child / main {got['collections, main (one child)'] / alone:.1f}x; "
              "unique index: branch / main "
              f"{got['unique index, branch'] / got['unique index, main']:.1f}x")
    if args.fill:
        full = got["collections, main (no child), registry full"]
        ratios += (f"; registry full: collections, branch / main "
                   f"{got['collections, branch, registry full'] / full:.1f}x")
    print("\n".join(rows))
    print(ratios)
    if args.no_write:
        return
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = (f".venv/bin/python benchmarks/ddl.py --colls {args.colls} --docs {args.docs} "
               f"--rounds {args.rounds}" + (f" --fill {args.fill}" if args.fill else ""))
    text = f"""{HEADING}

`{command}`,
{when}, {os.cpu_count()} cores (median of {args.rounds} rounds, targets interleaved in each):
{args.colls} `create_collection` then `drop_database`, and a unique `createIndexes` on
a collection of {args.docs:,} documents.

| what | time |
|---|---|
{chr(10).join(rows)}

{ratios}.

A collection new on a branch costs its overlay's two collections (one pipelined
exchange), its namespace state and a `create` WAL entry where the main port sends one
`create`; with a child, each DDL of main waits for the capture, which pins the new
collection absent in the child. Whether a name exists is asked with a `listIndexes` of
it (`Runner.has`): a `listCollections`, even filtered by one name, costs the whole
database's list on SecantusDB, and a branch's overlays make its databases large. Before
that (2026-12-01 23:29 UTC, same command, seed through the main port): collections on
main 7.25 s, on the branch 36.15 s, on main with a child 41.10 s. The seed now goes to
the upstream before the proxy starts, so that no target waits for the capture to log it
in main's history (about 1,000 documents/s on SecantusDB; a fork waits 30 s at most). A
unique index on a branch that reads the collection through main is built first on a
scratch copy of the branch's view (mongod refuses it over duplicates already there),
so it costs a copy of the collection.
{FILLED if args.fill else ""}"""
    replace_section(HEADING, text)


if __name__ == "__main__":
    main()
