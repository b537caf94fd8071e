"""Branch bulk writes (issue 16): multi-document writes on a branch port vs the main port.

One run starts one in-memory SecantusDB and one proxy in front of it, and measures, for
each target (the main port, a branch port), in alternating order round by round so the
noise of a shared machine falls on both alike. Each round's branch is created before its
steps and dropped after them, so that main is measured without children (a write on
main with children also preserves what they showed, which is not the baseline here):

- insert_many of N small documents into a new collection;
- update_many ($inc) of those N documents, then delete_many of them (documents the
  target wrote itself: on the branch, its own overlay's);
- update_many and delete_many of N documents of the base (on the branch: documents its
  parent holds, so each one is copied up or hidden);
- a maximum-size bulk: pymongo's `test_bulk_max_message_size` (three documents near
  16 MB and 9,996 small ones in one insert_many).

Each figure is documents/s (the median of the rounds) and the upstream operations per
document: the increase of the upstream's serverStatus `opcounters` (all kinds) over the
step, divided by its documents. With --costs it also inserts, directly, what a branch
insert writes per document (the document, its hidden id, its WAL entry with and without
the WAL's indexes): their sum bounds the branch's ratio whatever the proxy does. The
script never asserts; it prints a table, and with
--write rewrites the "## Branch bulk writes (issue 16)" section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/bulkwrites.py                 # N=10,000, 3 rounds
    .venv/bin/python benchmarks/bulkwrites.py -n 100100 --rounds 1 --write
    .venv/bin/python benchmarks/bulkwrites.py -n 3000 --rounds 1 --costs
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pymongo.errors import PyMongoError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests/
from benchmarks.results import replace_section
from tests.servers import Procs, ProxyProcess, Secantus, free_range

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
SECTION = "## Branch bulk writes (issue 16)"
DB = "bench"
META = "mongobranch_bench"
_16_MB = 16 * 1000 * 1000
STEPS = ("insert_many", "update_many own", "delete_many own",
         "update_many base", "delete_many base", "max-size bulk")


def small(i: int) -> dict[str, Any]:
    return {"_id": i, "k": i, "v": 0, "s": f"doc{i}"}


def opcounters(direct: Any) -> dict[str, int]:
    counters = direct.admin.command("serverStatus")["opcounters"]
    return {k: int(v) for k, v in counters.items()}


def timed(direct: Any, fn: Callable[[], int]) -> tuple[float, int, dict[str, int]]:
    """Seconds, documents written, upstream operations by kind (the two serverStatus
    calls' own not counted)."""
    before = opcounters(direct)
    t0 = time.perf_counter()
    docs = fn()
    secs = time.perf_counter() - t0
    after = opcounters(direct)
    ops = {k: after[k] - before.get(k, 0) for k in after}
    ops["command"] = ops.get("command", 0) - 1
    return secs, docs, ops


def upstream_costs(direct: Any, n: int) -> list[str]:
    """The upstream's own cost per document of what a branch insert writes, inserted
    directly (1,000 to a command, as the proxy sends them) into fresh collections: the
    document itself (all main writes), its hidden id, and its WAL entry with the WAL's
    secondary indexes (wal.py) and without. Their sum bounds a branch insert's rate
    from above, whatever the proxy does."""
    from bson import Int64, Timestamp
    from pymongo import ASCENDING, DESCENDING

    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)

    def entry(i: int) -> dict[str, Any]:
        return {"_id": Int64(i), "b": "0" * 16, "ns": f"{DB}.own", "id": i, "op": "put",
                "ts": now, "client": {"addr": "127.0.0.1:50000", "app": "bench"},
                "ct": Timestamp(1, i), "post": small(i)}

    kinds: list[tuple[str, Callable[[int], dict[str, Any]], bool]] = [
        ("the document (main's insert)", small, False),
        ("its hidden id `{_id}`", lambda i: {"_id": i}, False),
        ("its WAL entry, no secondary index", entry, False),
        ("its WAL entry, the WAL's 3 secondary indexes", entry, True)]
    costs: dict[str, list[float]] = {}
    for r in range(2):
        for k, (name, make, indexed) in enumerate(kinds):
            coll = direct[f"{DB}_costs"][f"c{r}_{k}"]
            if indexed:
                coll.create_index([("b", ASCENDING), ("ns", ASCENDING), ("_id", ASCENDING)])
                coll.create_index([("b", ASCENDING), ("_id", DESCENDING)])
                coll.create_index([("b", ASCENDING), ("ns", ASCENDING), ("id", ASCENDING),
                                   ("_id", ASCENDING)])
            docs = [make(i) for i in range(n)]
            t0 = time.perf_counter()
            for start in range(0, n, 1000):
                coll.insert_many(docs[start:start + 1000])
            costs.setdefault(name, []).append((time.perf_counter() - t0) / n * 1e6)
    direct.drop_database(f"{DB}_costs")
    best = {name: min(v) for name, v in costs.items()}
    lines = [f"Upstream cost per document inserted directly ({n:,} documents, best of 2):", "",
             "| written | µs/document |", "|---|---:|"]
    lines += [f"| {name} | {us:,.0f} |" for name, us in best.items()]
    names = list(best)
    floor = best[names[0]] / (best[names[0]] + best[names[1]] + best[names[3]])
    lines += ["", "A branch insert writes the three (document, hidden id, indexed WAL "
                  f"entry): at most {floor:.0%} of main's documents/s on this upstream "
                  "(its commands share one Python interpreter, so their costs add up)."]
    return lines


def baseline_exe(tree: str | None) -> list[str]:
    """The `mongobranch` program, from another source tree when one is given."""
    if tree is None:
        return []
    code = (f"import sys; sys.path.insert(0, {str(Path(tree).resolve())!r}); "
            "from proxy.cli import main; sys.exit(main())")
    return [sys.executable, "-c", code]


def quiet(direct: Any, limit: float = 900.0) -> None:
    """Wait until the upstream is nearly idle: the capture of main's changes (the
    previous target's writes, the maximum-size bulk's 48 MB among them) runs behind them
    and would otherwise be measured with the next target."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = sum(opcounters(direct).values())
        time.sleep(2.0)
        if sum(opcounters(direct).values()) - before < 20:
            return


def run_round(client: Any, direct: Any, tag: str, n: int, big: bool
              ) -> dict[str, tuple[float, int, dict[str, int]]]:
    db = client[DB]
    own = db[f"own_{tag}"]
    base = db[f"base_{tag}"]
    out = {}

    def insert() -> int:
        own.insert_many([small(i) for i in range(n)])
        return n

    def update(coll: Any) -> Callable[[], int]:
        return lambda: int(coll.update_many({}, {"$inc": {"v": 1}}).modified_count)

    def delete(coll: Any) -> Callable[[], int]:
        return lambda: int(coll.delete_many({}).deleted_count)

    def max_bulk() -> int:
        docs = [{"_id": 1, "l": "s" * _16_MB}, {"_id": 2, "l": "s" * _16_MB},
                {"_id": 3, "l": "s" * (_16_MB - 10000)}]
        docs += [{"_id": i} for i in range(4, 10000)]
        try:
            db[f"max_{tag}"].insert_many(docs)
        except PyMongoError as exc:  # a proxy that never answers (before issue 16)
            print(f"  max-size bulk failed: {exc!r}"[:300], flush=True)
            return 0
        return len(docs)

    out["insert_many"] = timed(direct, insert)
    out["update_many own"] = timed(direct, update(own))
    out["delete_many own"] = timed(direct, delete(own))
    out["update_many base"] = timed(direct, update(base))
    out["delete_many base"] = timed(direct, delete(base))
    if big:
        out["max-size bulk"] = timed(direct, max_bulk)
        db[f"max_{tag}"].drop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="documents per step")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-big", action="store_true", help="skip the maximum-size bulk")
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    ap.add_argument("--costs", action="store_true",
                    help="also measure the upstream's own cost of what a branch insert "
                         "writes (direct inserts; the bound it sets on the ratio)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="run the proxy from another source tree (its proxy/ package), "
                         "e.g. `git archive <commit> proxy | tar -x -C DIR`, for a before")
    args = ap.parse_args()

    from pymongo import MongoClient

    logdir = Path(tempfile.mkdtemp(prefix="mongobranch-bench-bulk-"))
    procs = Procs(logdir)
    load_start = os.getloadavg()[0]
    began = time.monotonic()
    results: dict[tuple[str, str], list[tuple[float, int, dict[str, int]]]] = {}
    try:
        server = procs.add(Secantus(log=procs.log("secantus")).start())
        proxy = procs.add(ProxyProcess(
            server.uri, meta_db=META, branch_ports=free_range(4, set()),
            data_dir=str(logdir / "data"), log_level="WARNING",
            log=procs.log("proxy"), exe=baseline_exe(args.baseline)).start())
        print(f"logs in {logdir}", flush=True)
        direct: Any = MongoClient(server.uri, directConnection=True)
        # The bases: one collection per round and target, seeded directly before the
        # branch exists, so on the branch they are the parent's documents.
        for r in range(args.rounds):
            for target in ("main", "branch"):
                coll = direct[DB][f"base_{target}{r}"]
                for start in range(0, args.n, 10_000):
                    coll.insert_many([small(i) for i in range(start, min(args.n, start + 10_000))])
        main = MongoClient(proxy.uri)
        for r in range(args.rounds):
            order = ["main", "branch"] if r % 2 == 0 else ["branch", "main"]
            for target in order:
                quiet(direct)
                print(f"round {r + 1}/{args.rounds}: {target} ...", flush=True)
                if target == "main":
                    got = run_round(main, direct, f"{target}{r}", args.n, not args.no_big)
                else:
                    # Creation waits for the capture of main's changes (a minute or
                    # more after the maximum-size bulk on a loaded machine).
                    status, body = proxy.api("POST", "/branches", {"name": f"bulk{r}"},
                                             timeout=900)
                    assert status == 201, (status, body)
                    quiet(direct)
                    with MongoClient(str(body["uri"]), socketTimeoutMS=180_000) as client:
                        got = run_round(client, direct, f"{target}{r}", args.n,
                                        not args.no_big)
                    status, body = proxy.api("DELETE", f"/branches/bulk{r}", timeout=900)
                    assert status in (200, 204), (status, body)
                for step, fig in got.items():
                    results.setdefault((target, step), []).append(fig)
                    secs, docs, ops = fig
                    print(f"  {step:18} {docs / secs:9.0f} docs/s  {secs:7.2f}s  "
                          f"{sum(ops.values()) / max(1, docs):.3f} ops/doc  {ops}", flush=True)
        main.close()
        costs = upstream_costs(direct, args.n) if args.costs else []
        direct.close()
    finally:
        procs.stop_all()
    elapsed = time.monotonic() - began
    table = report(results, args) + (["", *costs] if costs else [])
    print("\n".join(table))
    if args.write:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=HERE).stdout.strip()
        command = ".venv/bin/python benchmarks/bulkwrites.py " + " ".join(sys.argv[1:])
        body_lines = [
            SECTION, "",
            f"Measured {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} in "
            f"{elapsed:.0f}s on a shared {os.cpu_count()}-CPU machine (1-minute load "
            f"average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end); "
            f"proxy at {rev}; one in-memory SecantusDB and one proxy, the main port and a "
            "branch port measured alternately.", "",
            f"Command: `{command.strip()}`", "", *table, ""]
        write_results("\n".join(body_lines))
    return 0


def report(results: dict[tuple[str, str], list[tuple[float, int, dict[str, int]]]],
           args: argparse.Namespace) -> list[str]:
    lines = [f"N = {args.n:,} documents per step, {args.rounds} round(s); docs/s is the "
             "median over rounds; upstream ops/doc: serverStatus `opcounters` (all kinds) "
             "per document written.", "",
             "| step | main docs/s | branch docs/s | branch/main | main ops/doc | "
             "branch ops/doc |", "|---|---:|---:|---:|---:|---:|"]
    for step in STEPS:
        if ("main", step) not in results:
            continue
        rate = {t: statistics.median(d / s for s, d, _ in results[(t, step)])
                for t in ("main", "branch")}
        per = {t: statistics.median(sum(o.values()) / max(1, d) for _, d, o in results[(t, step)])
               for t in ("main", "branch")}
        lines.append(f"| {step} | {rate['main']:,.0f} | {rate['branch']:,.0f} | "
                     f"{rate['branch'] / rate['main']:.0%} | {per['main']:.3f} | "
                     f"{per['branch']:.3f} |")
    return lines


def write_results(section: str) -> None:
    replace_section(SECTION, section)


if __name__ == "__main__":
    sys.exit(main())
