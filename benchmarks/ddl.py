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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--colls", type=int, default=200)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
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
    print("\n".join(rows))
    print(ratios)
    if args.no_write:
        return
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = f"""{HEADING}

`.venv/bin/python benchmarks/ddl.py --colls {args.colls} --docs {args.docs} --rounds {args.rounds}`,
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
"""
    replace_section(HEADING, text)


if __name__ == "__main__":
    main()
