"""Branch benchmarks (issue 3): creation, reads, writes and storage of branches.

One run starts two in-memory SecantusDB servers, each with its own proxy
(`mongobranch serve --upstream ...`): a small one whose base collection holds
10k documents and a big one holding 1M (100k if inserting 1M takes more than
about 4 minutes; the report says which). It then measures, interleaving the
compared targets round by round so the noise of a shared machine falls on
both alike:

(a) branch creation latency, POST /branches on the admin HTTP API, on the
    small and on the big upstream alternately (target p50 <= 5 ms, equal
    within noise);
(b) read latency on a branch whose overlay holds 1% of the base (updated
    through the branch first) vs the main port, on the same collection:
    point find by _id, indexed range find, $match + $group aggregation
    (targets: branch/main p50 <= 1.2x, 1.5x, 2.5x);
(c) write throughput with a few concurrent clients, on the branch vs the
    main port: insert_one, update_one ($inc), delete_one (target >= 50%);
(d) storage of 10 branches that each updated 1% of the base: collStats of
    their overlay collections plus the BSON bytes of their WAL entries, vs
    10 full copies of the base collection.

(b)-(d) run on the small upstream. The script never asserts: it prints a
table and rewrites the "## Branches (issue 3)" section of benchmarks/RESULTS.md
(re-reading the file just before writing, so other sections are kept).

    .venv/bin/python benchmarks/branches.py            # full run, ~5-8 minutes
    .venv/bin/python benchmarks/branches.py --quick    # smoke run, no RESULTS.md update
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests/
from benchmarks.results import replace_section
from tests.servers import Procs, ProxyProcess, Secantus, free_range

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
SECTION = "## Branches (issue 3)"
DB, BASE = "bench", "base"
META = "mongobranch_bench"
PAD = "x" * 100
BIG_BUDGET = 240.0  # seconds allowed for inserting the big base
BATCH = 10_000


# -- processes ------------------------------------------------------------------------------
@dataclass
class Stack:
    """One SecantusDB and the proxy in front of it."""

    name: str
    upstream: str
    proxy_uri: str
    admin_port: int
    proxy_pid: int
    http: http.client.HTTPConnection | None = None

    def api(self, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
        for attempt in (0, 1):
            if self.http is None:
                # Long enough for a restore of thousands of documents on a loaded machine:
                # a timed-out POST is sent again and then finds its branch already made.
                self.http = http.client.HTTPConnection("127.0.0.1", self.admin_port,
                                                       timeout=900)
            try:
                data = None if body is None else json.dumps(body)
                self.http.request(method, path, body=data,
                                  headers={"Content-Type": "application/json"})
                resp = self.http.getresponse()
                return resp.status, json.loads(resp.read() or b"null")
            except (OSError, http.client.HTTPException):
                self.http.close()
                self.http = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def branch(self, name: str) -> dict[str, Any]:
        status, body = self.api("POST", "/branches", {"name": name})
        if status != 201:
            raise RuntimeError(f"creating branch {name} on {self.name}: {status} {body}")
        return dict(body)


def start_stack(procs: Procs, name: str, taken: set[int], nports: int) -> Stack:
    server = procs.add(Secantus(log=procs.log(f"secantus-{name}")).start())
    # Drops remove at once and main takes merges (ProxyProcess without lifecycle_defaults):
    # the engine is measured, not branch lifecycle (whose defaults keep dropped branches,
    # children of main included).
    proxy = procs.add(ProxyProcess(
        server.uri, meta_db=META, branch_ports=free_range(nports, taken),
        data_dir=str(procs.logdir / f"data-{name}"), log_level="WARNING",
        log=procs.log(f"proxy-{name}")).start())
    return Stack(name, server.uri, proxy.uri, proxy.admin_port, proxy.pid)


# -- data -----------------------------------------------------------------------------------
def doc(i: int) -> dict[str, Any]:
    return {"_id": i, "k": i, "g": i % 100, "v": 0, "s": f"doc{i}", "pad": PAD}


def seed(coll: Any, n: int, budget: float | None = None, fallback: int | None = None,
         say: Callable[[str], None] = print) -> tuple[int, float]:
    """Inserts docs 0..n-1 in batches; returns (count, seconds). With a budget, stops at
    `fallback` docs when inserting n is projected to take longer, or wherever the budget
    runs out."""
    began = time.monotonic()
    done = 0
    while done < n:
        coll.insert_many([doc(i) for i in range(done, min(n, done + BATCH))], ordered=False)
        done = min(n, done + BATCH)
        spent = time.monotonic() - began
        if done % 100_000 == 0 or done == n:
            say(f"  {coll.name}: {done:,} docs in {spent:.0f}s")
        if budget is None:
            continue
        if fallback is not None and done == fallback and spent * n / done > budget:
            say(f"  projected {spent * n / done:.0f}s for {n:,} docs > {budget:.0f}s: "
                f"stopping at {done:,}")
            break
        if spent > budget:
            say(f"  over the {budget:.0f}s budget: stopping at {done:,}")
            break
    return done, time.monotonic() - began


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- (a) creation ---------------------------------------------------------------------------
def measure_creation(stacks: list[Stack], rounds: int, per_round: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {s.name: [] for s in stacks}
    perf = time.perf_counter
    for s in stacks:  # warm-up: first branch opens the HTTP connection, first listener etc.
        for j in range(3):
            s.branch(f"warm{j}")
        for j in range(3):
            s.api("DELETE", f"/branches/warm{j}")
    for r in range(rounds):
        order = stacks[r % len(stacks):] + stacks[: r % len(stacks)]
        for s in order:
            names = [f"c{r}-{j}" for j in range(per_round)]
            for name in names:
                t0 = perf()
                status, body = s.api("POST", "/branches", {"name": name})
                out[s.name].append(perf() - t0)
                if status != 201:
                    raise RuntimeError(f"create {name}: {status} {body}")
            for name in names:  # not timed
                s.api("DELETE", f"/branches/{name}")
    return out


# -- (b) reads ------------------------------------------------------------------------------
def measure_reads(main_uri: str, branch_uri: str, n: int, rounds: int, block: int
                  ) -> dict[tuple[str, str], list[float]]:
    from pymongo import MongoClient

    rnd = random.Random(3)
    clients = {"main": MongoClient(main_uri, maxPoolSize=1),
               "branch": MongoClient(branch_uri, maxPoolSize=1)}
    span = max(10, n // 50)

    def ops(coll: Any) -> dict[str, Callable[[], Any]]:
        return {
            "point": lambda: coll.find_one({"_id": rnd.randrange(n)}),
            "range": lambda: list(coll.find({"k": {"$gte": (x := rnd.randrange(n - 20)),
                                                   "$lt": x + 20}})),
            "agg": lambda: list(coll.aggregate([
                {"$match": {"k": {"$gte": (y := rnd.randrange(n - span)), "$lt": y + span}}},
                {"$group": {"_id": "$g", "n": {"$sum": 1}, "v": {"$sum": "$v"}}}])),
        }

    table = {name: ops(c[DB][BASE]) for name, c in clients.items()}
    # Same answers on both sides (ids only: the branch changed some values).
    probe = {"k": {"$gte": 0, "$lt": span}}
    a, b = ([d["_id"] for d in c[DB][BASE].find(probe).sort("_id", 1)]
            for c in clients.values())
    if a != b:
        print(f"  WARNING: main and branch disagree on {probe}: {len(a)} vs {len(b)} docs")
    samples: dict[tuple[str, str], list[float]] = {}
    perf = time.perf_counter
    try:
        for fns in table.values():
            for fn in fns.values():
                for _ in range(30):
                    fn()
        targets = list(table)
        for r in range(rounds):
            order = targets[r % 2:] + targets[: r % 2]
            for op in ("point", "range", "agg"):
                for t in order:
                    fn = table[t][op]
                    got = samples.setdefault((t, op), [])
                    for _ in range(block if op != "agg" else max(1, block // 2)):
                        t0 = perf()
                        fn()
                        got.append(perf() - t0)
    finally:
        for c in clients.values():
            c.close()
    return samples


# -- (c) writes -----------------------------------------------------------------------------
async def _upstream_ops(direct: Any) -> int:
    counters = (await direct.admin.command("serverStatus"))["opcounters"]
    return sum(int(v) for v in counters.values())


async def _write_windows(targets: dict[str, str], colls: dict[str, str], upstream: str, n: int,
                         rounds: int, window: float, clients: int
                         ) -> dict[tuple[str, str], list[float]]:
    from pymongo import AsyncMongoClient

    conns = {t: AsyncMongoClient(uri, maxPoolSize=clients) for t, uri in targets.items()}
    direct: Any = AsyncMongoClient(upstream, directConnection=True)
    rnd = random.Random(5)
    next_id = {t: 10_000_000 for t in targets}
    deletable = {t: list(range(n)) for t in targets}
    for ids in deletable.values():
        random.Random(7).shuffle(ids)
    misses = {t: 0 for t in targets}

    def make(t: str, op: str) -> Callable[[], Awaitable[Any]]:
        coll = conns[t][DB][colls[t]]

        async def insert() -> None:
            next_id[t] += 1
            await coll.insert_one(doc(next_id[t]))

        async def update() -> None:
            await coll.update_one({"_id": rnd.randrange(n)}, {"$inc": {"v": 1}})

        async def delete() -> None:
            if not deletable[t]:
                misses[t] += 1
                await coll.delete_one({"_id": -1})
                return
            res = await coll.delete_one({"_id": deletable[t].pop()})
            if res.deleted_count != 1:
                misses[t] += 1

        return {"insert": insert, "update": update, "delete": delete}[op]

    out: dict[tuple[str, str], list[float]] = {}
    try:
        for t in targets:  # warm up connections and the branch's overlay
            fn = make(t, "update")
            await asyncio.gather(*(fn() for _ in range(clients)))
        names = list(targets)
        for r in range(rounds):
            order = names[r % 2:] + names[: r % 2]
            for op in ("insert", "update", "delete"):
                for t in order:
                    fn = make(t, op)
                    done = total = 0
                    before = await _upstream_ops(direct)
                    t0 = time.monotonic() + 0.1  # ramp-up not counted
                    t1 = t0 + window

                    async def loop(fn: Callable[[], Awaitable[Any]] = fn,
                                   t0: float = t0, t1: float = t1) -> None:
                        nonlocal done, total
                        while time.monotonic() < t1:
                            await fn()
                            total += 1
                            if t0 <= time.monotonic() <= t1:
                                done += 1

                    await asyncio.gather(*(loop() for _ in range(clients)))
                    # Upstream operations per client write (the serverStatus call is one).
                    spent = await _upstream_ops(direct) - before - 1
                    out.setdefault((t, op), []).append(done / window)
                    out.setdefault((t, op + ":upstream"), []).append(spent / max(1, total))
    finally:
        for c in [*conns.values(), direct]:
            await c.close()
    for t, missed in misses.items():
        if missed:
            print(f"  WARNING: {missed} deletes on {t} found nothing to delete")
    return out


def measure_writes(targets: dict[str, str], colls: dict[str, str], upstream: str, n: int,
                   rounds: int, window: float, clients: int
                   ) -> dict[tuple[str, str], list[float]]:
    job = _write_windows(targets, colls, upstream, n, rounds, window, clients)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(job)
    return uvloop.run(job)


# -- (d) storage ----------------------------------------------------------------------------
def coll_stats(db: Any, name: str) -> dict[str, float]:
    from bson import encode
    from pymongo.errors import OperationFailure

    try:
        st = db.command("collStats", name)
        return {"size": float(st["size"]), "storage": float(st.get("storageSize", st["size"])),
                "index": float(st.get("totalIndexSize", 0)), "count": float(st["count"])}
    except (OperationFailure, KeyError):
        size = sum(len(encode(d)) for d in db[name].find())
        return {"size": size, "storage": size, "index": 0.0,
                "count": float(db[name].count_documents({}))}


def measure_storage(stack: Stack, n: int, branches: int, share: float
                    ) -> dict[str, float]:
    from bson.codec_options import CodecOptions
    from bson.raw_bson import RawBSONDocument
    from pymongo import MongoClient

    direct: MongoClient[dict[str, Any]] = MongoClient(stack.upstream, directConnection=True)
    try:
        bids = []
        per = max(1, int(n * share))
        for i in range(branches):
            info = stack.branch(f"storage{i}")
            ids = random.Random(100 + i).sample(range(n), per)
            with MongoClient(info["uri"]) as c:
                for start in range(0, per, 1000):
                    c[DB][BASE].update_many({"_id": {"$in": ids[start:start + 1000]}},
                                            {"$inc": {"v": 1}, "$set": {"s": f"b{i}"}})
            meta = direct[META]["branches"].find_one({"_id": f"storage{i}"})
            assert meta is not None
            bids.append(meta["bid"])
        db = direct[DB]
        out = {"docs_per_branch": float(per), "overlay_size": 0.0, "overlay_storage": 0.0,
               "overlay_index": 0.0}
        for bid in bids:
            for kind in ("l", "h"):
                st = coll_stats(db, f"__mb_{bid}_{kind}_{BASE}")
                out["overlay_size"] += st["size"]
                out["overlay_storage"] += st["storage"]
                out["overlay_index"] += st["index"]
                out[f"{kind}_docs"] = out.get(f"{kind}_docs", 0.0) + st["count"]
                out[f"{kind}_size"] = out.get(f"{kind}_size", 0.0) + st["size"]
        wal = direct[META].get_collection(
            "wal", codec_options=CodecOptions(document_class=RawBSONDocument))
        entries = list(wal.find({"b": {"$in": bids}}))
        out["wal_entries"] = float(len(entries))
        out["wal_bytes"] = float(sum(len(e.raw) for e in entries))
        wal_stats = coll_stats(direct[META], "wal")
        out["wal_index"] = wal_stats["index"] * len(entries) / max(1.0, wal_stats["count"])
        base = coll_stats(db, BASE)
        out["base_size"], out["base_storage"] = base["size"], base["storage"]
        out["base_index"] = base["index"]
        return out
    finally:
        direct.close()


# -- report ---------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    import pymongo

    rev = "unknown"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "proxy"], cwd=HERE.parent,
                               check=True, capture_output=True, text=True).stdout.strip()
        if dirty:
            rev += " + uncommitted changes in proxy/"
    return {"nproc": str(os.cpu_count()), "cpu": model, "mem": mem,
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "pymongo": pymongo.version, "kernel": platform.release(), "rev": rev}


def ms(v: float) -> str:
    return f"{v * 1e3:.2f}"


def report(args: argparse.Namespace, small: int, big: int, big_secs: float,
           create: dict[str, list[float]], reads: dict[tuple[str, str], list[float]],
           writes: dict[tuple[str, str], list[float]], storage: dict[str, float]) -> str:
    lines: list[str] = []
    lines += [f"(a) Branch creation, POST /branches (HTTP keep-alive), ms; "
              f"{args.create_rounds} rounds x {args.create_per_round} creations per upstream, "
              "alternating:", "",
              "| base documents | n | p50 | p99 | max | target |", "|---|---|---|---|---|---|"]
    for label, key, count in (("small", "small", small), ("big", "big", big)):
        v = create[key]
        lines.append(f"| {count:,} ({label}) | {len(v)} | **{ms(pct(v, .5))}** | "
                     f"{ms(pct(v, .99))} | {ms(max(v))} | p50 <= 5 ms |")
    a, b = create["small"], create["big"]
    lines += ["", f"p50 big / p50 small = {pct(b, .5) / pct(a, .5):.2f} "
                  "(equal within noise is the target).", ""]

    targets = {"point": 1.2, "range": 1.5, "agg": 2.5}
    labels = {"point": "point find by _id",
              "range": "indexed range find, 20 docs (`k` in [x, x+20))",
              "agg": f"aggregate `$match` on `k` ({max(10, small // 50):,} docs) + "
                     "`$group` on `g` (100 groups)"}
    lines += [f"(b) Read latency, ms, {small:,}-document base, branch overlay = 1% "
              f"({small // 100:,} docs updated through the branch); one sync client per target, "
              f"{args.read_rounds} rounds x {args.read_block} requests ({args.read_block // 2} "
              "for the aggregation) per query and target, alternating:", "",
              "| query | main p50 | main p99 | branch p50 | branch p99 | branch/main p50 | "
              "target |", "|---|---|---|---|---|---|---|"]
    for op, target in targets.items():
        m, br = reads[("main", op)], reads[("branch", op)]
        ratio = pct(br, .5) / pct(m, .5)
        lines.append(f"| {labels[op]} | {ms(pct(m, .5))} | {ms(pct(m, .99))} | "
                     f"{ms(pct(br, .5))} | {ms(pct(br, .99))} | **{ratio:.2f}x** | "
                     f"<= {target}x |")

    lines += ["", f"(c) Write throughput, ops/s, {args.clients} concurrent clients "
                  f"(asyncio pymongo, one process), mean of {args.write_rounds} rounds x "
                  f"{args.window}s windows (min-max), alternating; main and branch write to "
                  f"separate {small:,}-doc collections:", "",
              "| op | main | branch | branch/main | median of per-round ratios | target | "
              "upstream ops per write, main / branch |", "|---|---|---|---|---|---|---|"]
    for op, label in (("insert", "insert_one (new _id)"),
                      ("update", "update_one by random _id, `$inc`"),
                      ("delete", "delete_one by _id (each base doc once)")):
        m, br = writes[("main", op)], writes[("branch", op)]
        share = 100 * statistics.mean(br) / statistics.mean(m)
        paired = 100 * statistics.median(x / y for x, y in zip(br, m, strict=True) if y)
        lines.append(f"| {label} | {statistics.mean(m):.0f} ({min(m):.0f}-{max(m):.0f}) | "
                     f"{statistics.mean(br):.0f} ({min(br):.0f}-{max(br):.0f}) | "
                     f"**{share:.0f}%** | {paired:.0f}% | >= 50% | "
                     f"{statistics.mean(writes[('main', op + ':upstream')]):.1f} / "
                     f"{statistics.mean(writes[('branch', op + ':upstream')]):.1f} |")
    lines += ["", "A write on a branch holds that branch's write lock for the whole command "
                  "(`Engine.writing`), so the clients' writes on the branch run one at a time; "
                  "on the main port they are forwarded concurrently. Upstream ops per write = "
                  "increase of the upstream's serverStatus `opcounters` (all kinds; inserts "
                  "count documents) over the window, divided by the writes completed."]

    s = storage
    branches = args.storage_branches
    ovl = s["overlay_size"] + s["wal_bytes"]
    ovl_ix = ovl + s["overlay_index"] + s["wal_index"]
    copies, copies_ix = branches * s["base_size"], branches * (s["base_size"] + s["base_index"])
    lines += ["", f"(d) Storage of {branches} branches, each updating 1% of the "
                  f"{small:,}-doc base ({s['docs_per_branch']:.0f} docs per branch), vs "
                  f"{branches} full copies; SecantusDB collStats `size` (= `storageSize` in "
                  "memory) of the overlay collections, WAL = BSON bytes of those branches' "
                  "entries:", "",
              "| | documents | bytes |", "|---|---|---|",
              f"| overlay live collections ({branches}) | {s['l_docs']:.0f} | "
              f"{s['l_size']:.0f} |",
              f"| overlay hidden-id collections ({branches}) | {s['h_docs']:.0f} | "
              f"{s['h_size']:.0f} |",
              f"| WAL entries (pre- and post-images) | {s['wal_entries']:.0f} | "
              f"{s['wal_bytes']:.0f} |",
              f"| overlay indexes | | {s['overlay_index']:.0f} |",
              f"| WAL indexes, these branches' share by entry count | | "
              f"{s['wal_index']:.0f} |",
              f"| **branches: data + WAL** | | **{ovl:.0f}** |",
              f"| branches: data + WAL + indexes | | {ovl_ix:.0f} |",
              f"| base collection (1 copy), data / indexes | {small:,} | "
              f"{s['base_size']:.0f} / {s['base_index']:.0f} |",
              f"| **{branches} full copies: data** | | **{copies:.0f}** |",
              f"| {branches} full copies: data + indexes | | {copies_ix:.0f} |",
              "", f"Branches use **{100 * ovl / copies:.1f}%** of the bytes of {branches} "
                  f"full copies (data + WAL vs data); {100 * ovl_ix / copies_ix:.1f}% "
                  "counting indexes on both sides."]
    return "\n".join(lines)


def write_results(text: str) -> None:
    replace_section(SECTION, text)


# -- main -----------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run; implies --no-write")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--small", type=int, default=10_000, help="documents in the small base")
    ap.add_argument("--big", type=int, default=1_000_000, help="documents in the big base")
    ap.add_argument("--big-fallback", type=int, default=100_000,
                    help=f"stop there if inserting --big is projected over {BIG_BUDGET:.0f}s")
    ap.add_argument("--create-rounds", type=int, default=40)
    ap.add_argument("--create-per-round", type=int, default=5)
    ap.add_argument("--read-rounds", type=int, default=30)
    ap.add_argument("--read-block", type=int, default=20)
    ap.add_argument("--write-rounds", type=int, default=6)
    ap.add_argument("--window", type=float, default=1.5, help="seconds per write window")
    ap.add_argument("--clients", type=int, default=4, help="concurrent writing clients")
    ap.add_argument("--storage-branches", type=int, default=10)
    args = ap.parse_args()
    if args.quick:
        args.big, args.big_fallback = 50_000, 50_000
        args.create_rounds, args.read_rounds, args.write_rounds = 6, 4, 2
        args.window, args.storage_branches = 0.5, 3
    write = not (args.quick or args.no_write)
    load_start = os.getloadavg()[0]

    from pymongo import MongoClient

    logdir = Path(tempfile.mkdtemp(prefix="mongobranch-bench-branches-"))
    procs = Procs(logdir)
    began = time.monotonic()
    taken: set[int] = set()
    n = args.small
    try:
        small = start_stack(procs, "small", taken, 2 * args.create_per_round + 40)
        big = start_stack(procs, "big", taken, 2 * args.create_per_round + 10)
        print(f"logs in {logdir}", flush=True)

        print("seeding ...", flush=True)
        with MongoClient(small.upstream, directConnection=True) as c:
            for name in (BASE, "wmain", "wbranch"):
                seed(c[DB][name], n)
                c[DB][name].create_index("k")
        with MongoClient(big.upstream, directConnection=True) as c:
            big_n, big_secs = seed(c[DB][BASE], args.big, BIG_BUDGET, args.big_fallback)
            t0 = time.monotonic()
            c[DB][BASE].create_index("k")
            print(f"  index on {big_n:,} docs: {time.monotonic() - t0:.0f}s", flush=True)

        print(f"(a) creation: {args.create_rounds} rounds x {args.create_per_round} per "
              "upstream ...", flush=True)
        create = measure_creation([small, big], args.create_rounds, args.create_per_round)
        create = {"small": create["small"], "big": create["big"]}

        print("(b) reads ...", flush=True)
        reads_branch = small.branch("reads")
        ids = random.Random(11).sample(range(n), n // 100)
        with MongoClient(reads_branch["uri"]) as c:
            for start in range(0, len(ids), 1000):
                c[DB][BASE].update_many({"_id": {"$in": ids[start:start + 1000]}},
                                        {"$inc": {"v": 1}, "$set": {"s": "changed"}})
        reads = measure_reads(small.proxy_uri, reads_branch["uri"], n, args.read_rounds,
                              args.read_block)

        print("(c) writes ...", flush=True)
        writes_branch = small.branch("writes")
        writes = measure_writes({"main": small.proxy_uri, "branch": writes_branch["uri"]},
                                {"main": "wmain", "branch": "wbranch"}, small.upstream, n,
                                args.write_rounds,
                                args.window, args.clients)

        print("(d) storage ...", flush=True)
        storage = measure_storage(small, n, args.storage_branches, 0.01)
    finally:
        procs.stop_all()
    elapsed = time.monotonic() - began
    load_end = os.getloadavg()[0]

    info = machine()
    table = report(args, n, big_n, big_secs, create, reads, writes, storage)
    command = ".venv/bin/python benchmarks/branches.py" + (
        "" if sys.argv[1:] == [] else " " + " ".join(sys.argv[1:]))
    big_note = (f"{big_n:,} documents, inserted directly on the upstream with insert_many "
                f"batches of {BATCH:,} in {big_secs:.0f}s")
    if big_n < args.big:
        big_note += (f" (**measured at {big_n:,}, not {args.big:,}: inserting {args.big:,} "
                     f"was projected to take over {BIG_BUDGET / 60:.0f} minutes**)")
    body = "\n".join([
        SECTION, "",
        f"Measured {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; the whole "
        f"run took {elapsed:.0f}s ({elapsed / 60:.1f} min), seeding included.", "",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), {info['mem']} RAM, Linux "
        f"{info['kernel']}, shared and noisy (1-minute load average {load_start:.1f} at the "
        f"start, {load_end:.1f} at the end, other users' processes included), loopback only",
        f"- {info['python']}, pymongo {info['pymongo']}; proxy at {info['rev']}",
        "- upstreams: two SecantusDB (`secantusd-py --storage-path :memory:`), each with its "
        "own proxy (`mongobranch serve --upstream ...`): small = "
        f"{n:,} base documents (~{len(PAD) + 45} B each, index on `k`), big = {big_note}; "
        "(b)-(d) use the small one",
        f"- reproduce: `{command}`", "",
        table, "",
    ])
    print()
    print(body)
    if write:
        write_results(body)
        print(f"updated {RESULTS.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
