"""`create_collection` on a branch port vs the main port (issue 15): pymongo's own
`test_list_collection_names_single_socket` as a benchmark.

One run starts an in-memory SecantusDB and a proxy on it (and, with --baseline, a
second proxy from another source tree on the same upstream, its own metadata database),
and for each proxy and target (its main port; a branch of it, made for the round and
deleted after it) runs what the pymongo test runs, on a client of one connection:
`drop_database`, --colls `create_collection(str(i))` (pymongo asks `listCollections`
for the name first), one `list_collection_names`, and `drop_database`. The creates and
the listing are timed; the upstream's `opcounters` over the creates give the upstream
operations per create. Before each timed target the script waits for the upstream to
be nearly idle (the capture of main's changes runs behind the previous target).

--fill N first makes N retryable `insert_one`s on the upstream directly: SecantusDB
keeps the reply of each retryable write (10,000 at most, for 30 minutes) and scans
them all on every retryable write, so, full, each retryable write costs it tens of
milliseconds. pymongo's suite fills it on the main port before it runs on a branch
(`make conformance`); the main port's `create` is no retryable write, the proxy's
metadata writes of a branch's `create` were three.

The script never asserts: it prints a table and, with --write, rewrites the
"## create_collection on a branch (issue 15)" section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/ddl_create.py                       # 200 collections
    .venv/bin/python benchmarks/ddl_create.py --fill 11000 --write
    git archive <old> proxy | tar -x -C /tmp/old
    .venv/bin/python benchmarks/ddl_create.py --fill 11000 --baseline /tmp/old
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests/

from pymongo import MongoClient

from benchmarks.bulkwrites import baseline_exe, opcounters, quiet
from benchmarks.ddl import fill_registry
from benchmarks.results import replace_section
from tests.servers import Procs, ProxyProcess, Secantus, free_range

SECTION = "## create_collection on a branch (issue 15)"
DB = "test_collection_names_single_socket"


def single_socket(uri: str, n: int, direct: Any) -> tuple[float, float, dict[str, int]]:
    """pymongo's test_list_collection_names_single_socket: seconds for the n creates,
    seconds for the listing, the upstream's operations by kind over the creates."""
    client: MongoClient[dict[str, Any]] = MongoClient(uri, maxPoolSize=1)
    with client:
        client.drop_database(DB)
        db = client[DB]
        before = opcounters(direct)
        start = time.perf_counter()
        for i in range(n):
            db.create_collection(str(i))
        created = time.perf_counter() - start
        after = opcounters(direct)
        start = time.perf_counter()
        names = db.list_collection_names()
        listed = time.perf_counter() - start
        assert len(names) == n, len(names)
        client.drop_database(DB)
    ops = {k: after[k] - before.get(k, 0) for k in after}
    ops["command"] -= 1  # the second serverStatus
    return created, listed, ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--colls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fill", type=int, default=0,
                    help="retryable writes on the upstream first (11000 fills SecantusDB's "
                         "registry of them, as pymongo's suite on the main port does)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also a proxy from another source tree (its proxy/ package), e.g. "
                         "`git archive <commit> proxy | tar -x -C DIR`, measured alike")
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = ap.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="mongobranch-bench-ddlcreate-"))
    procs = Procs(logdir)
    runs: dict[str, list[tuple[float, float, dict[str, int]]]] = {}
    try:
        server = procs.add(Secantus(log=procs.log("secantus")).start())
        direct: Any = MongoClient(server.uri, directConnection=True)
        if args.fill:
            fill_registry(server.uri, args.fill)
        trees = {"this tree": None} if args.baseline is None else {
            "baseline": args.baseline, "this tree": None}
        proxies: dict[str, ProxyProcess] = {}
        taken: set[int] = set()
        for n, (label, tree) in enumerate(trees.items()):
            ports = free_range(4, taken)
            taken.update(range(ports[0], ports[1] + 1))
            proxies[label] = procs.add(ProxyProcess(
                server.uri, meta_db=f"mongobranch_bench{n}", branch_ports=ports,
                data_dir=str(logdir / f"data{n}"), log_level="WARNING",
                log=procs.log(f"proxy{n}"), exe=baseline_exe(tree)).start())
        print(f"logs in {logdir}", flush=True)
        for r in range(args.rounds):
            labels = list(proxies) if r % 2 == 0 else list(reversed(proxies))
            for label in labels:
                proxy = proxies[label]
                for target in (("main", "branch") if r % 2 == 0 else ("branch", "main")):
                    uri = proxy.uri
                    if target == "branch":
                        status, body = proxy.api("POST", "/branches", {"name": f"ddl{r}"},
                                                 timeout=300)
                        assert status == 201 and isinstance(body, dict), body
                        uri = body["uri"]
                    quiet(direct)
                    got = single_socket(uri, args.colls, direct)
                    runs.setdefault(f"{label}, {target}", []).append(got)
                    print(f"round {r + 1}: {label}, {target}: creates {got[0]:.2f} s, "
                          f"list {got[1]:.3f} s", flush=True)
                    if target == "branch":
                        proxy.api("DELETE", f"/branches/ddl{r}")
        direct.close()
    finally:
        procs.stop_all()
    rows = ["| proxy, port | creates | per create | list | upstream ops per create |",
            "|---|---:|---:|---:|---|"]
    med: dict[str, float] = {}
    for key, got in runs.items():
        created = statistics.median(g[0] for g in got)
        listed = statistics.median(g[1] for g in got)
        med[key] = created
        ops = got[-1][2]
        per = ", ".join(f"{k} {v / args.colls:.1f}" for k, v in ops.items()
                        if v and k != "getmore")
        rows.append(f"| {key} | {created:.2f} s | {created / args.colls * 1000:.1f} ms "
                    f"| {listed * 1000:.0f} ms | {per} |")
    ratios = "; ".join(
        f"{label}: branch / main {med[f'{label}, branch'] / med[f'{label}, main']:.1f}x"
        for label in proxies)
    print("\n".join(rows))
    print(ratios)
    if not args.write:
        return
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = (f".venv/bin/python benchmarks/ddl_create.py --colls {args.colls} "
               f"--rounds {args.rounds}" + (f" --fill {args.fill}" if args.fill else "")
               + (" --baseline <tree>" if args.baseline else ""))
    filled = (f", SecantusDB's retryable-write registry filled with {args.fill:,} writes "
              "first" if args.fill else "")
    text = f"""{SECTION}

`{command}`,
{when}, {os.cpu_count()} cores (median of {args.rounds} rounds, order alternated):
pymongo's `test_list_collection_names_single_socket` ({args.colls} `create_collection`
on one connection, then `list_collection_names`){filled}.
Upstream operations per create: SecantusDB's `opcounters` (getMores, the capture's
change stream, left out).

{chr(10).join(rows)}

{ratios}.
"""
    replace_section(SECTION, text)


if __name__ == "__main__":
    main()
