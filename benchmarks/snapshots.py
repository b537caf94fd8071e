"""Snapshots benchmark (issue 11): what keeping children of main exact costs.

Main's changes reach its children and its history through the capture of the
upstream's change stream (docs/ARCHITECTURE.md, "Main", "Capture", "Cost"): a main-port
write runs as sent under main's fence and does not wait for its preservation; every
command on a child's port first waits until the capture has passed the upstream's
current time. One in-memory SecantusDB and one proxy; one run measures, each ratio
within the run:

(1) main-port write throughput, 4 client threads running point inserts, updates (by
    _id) and deletes, with 0, 1 and 10 live children of main, the configurations
    rotating over several rounds (targets: 1 child >= 70%, 10 children >= 50% of none);
(2) read latency on a child of main after main changed 1% of the base since the fork,
    vs the same reads on the main port: point find by _id, indexed range find,
    $match + $group (benchmarks/branches.py's reads; targets 1.2x, 1.5x, 2.5x);
(3) capture lag of writes made directly on the upstream (a pymongo client, not the
    proxy): from the write's acknowledgement until its entry is in main's WAL, on an
    idle upstream and beside direct writers; and the extra latency of an exact read,
    a child's point read right after such a write (it waits for the capture) vs one on
    an idle upstream;
(4) storage per preserved document: the child's overlay collections and its WAL `keep`
    entries, per document main changed after the fork;
(5) a branch of main at a past point: main changes N documents after a recorded LSN,
    then POST /branches {"from": "main", "at": lsn} is timed (target >= 20,000
    restored documents per second).

It never asserts: wrong answers (a child showing main's later value, a restore that
fails or restores the wrong documents) are printed and written down with the figures.
Rewrites the "## Snapshots (issue 11)" section of benchmarks/RESULTS.md (other
sections kept).

    .venv/bin/python benchmarks/snapshots.py            # ~6-10 minutes
    .venv/bin/python benchmarks/snapshots.py --quick    # smoke run, no RESULTS.md update
    .venv/bin/python benchmarks/snapshots.py --only-restore   # part (5) alone, printed
    .venv/bin/python benchmarks/snapshots.py --reads-only  # (2) alone, ~1-2 minutes; only
                                                           # its paragraph is replaced
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo import MongoClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests/
import branches
from branches import (
    BASE,
    DB,
    META,
    Stack,
    coll_stats,
    machine,
    measure_reads,
    ms,
    pct,
    seed,
    start_stack,
)

from benchmarks.results import replace_section
from tests.servers import Procs

SECTION = "## Snapshots (issue 11)"
CLIENTS = 4
OPS = ("insert", "update", "delete")
LAG, HIST, ITEMS = "lag", "hist", "items"
MAIN = "main"
POLL = 0.002  # seconds between polls of main's WAL
QUIET = 1.5  # seconds without writes before an idle read (see exact_reads)
OPCOUNTERS = ("insert", "query", "update", "delete", "getmore", "command")
POLLS = [0]  # WAL polls made by logged_after, so far (left out of the opcounters)


@dataclass
class Sizes:
    items: int = 10_000      # write-throughput collection
    base: int = 10_000       # read and storage collection (benchmarks/branches.py's docs)
    lag: int = 4_000         # documents written directly on the upstream, each once
    hist: int = 20_000       # documents main changes after the point of (5)
    rounds: int = 3
    seconds: float = 4.0
    read_rounds: int = 30
    read_block: int = 20
    lag_samples: int = 300
    cycles: int = 50
    preserved: int = 1_000
    restore_trials: int = 1


@dataclass
class Findings:
    """Wrong answers met on the way: reported beside the figures, never hidden."""

    notes: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        print(f"  WARNING: {text}", flush=True)
        self.notes.append(text)


# -- (1) main-port writes ------------------------------------------------------------------
def block(uri: str, op: str, seconds: float, tag: str, n_docs: int,
          made: dict[str, list[str]], done: list[int] | None = None) -> float:
    """Operations per second of 4 clients running one kind of write for a while (and
    in `done`, how many ran)."""
    counts = [0] * CLIENTS
    stop = time.monotonic() + seconds

    def run(n: int) -> None:
        rng = random.Random(f"{tag}-{n}")
        with MongoClient(uri) as c:
            coll = c[DB][ITEMS]
            i = 0
            mine = made.setdefault(f"{tag}-{n}", [])
            while time.monotonic() < stop:
                if op == "insert":
                    key = f"{tag}-{n}-{i}"
                    coll.insert_one({"_id": key, "v": i})
                    mine.append(key)
                elif op == "update":
                    coll.update_one({"_id": rng.randrange(n_docs)}, {"$inc": {"n": 1}})
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
    if done is not None:
        done.append(sum(counts))
    return sum(counts) / (time.monotonic() - started)


def set_children(stack: Stack, want: int, live: list[str]) -> None:
    while len(live) < want:
        name = f"kid{len(live)}-{int(time.time() * 1000) % 100000}"
        stack.branch(name)
        live.append(name)
    while len(live) > want:
        drop(stack, live.pop())


def drop(stack: Stack, name: str) -> None:
    status, body = stack.api("DELETE", f"/branches/{name}")
    if status not in (200, 204):
        raise RuntimeError(f"dropping {name}: {status} {body}")


def precondition(uri: str, n_docs: int, most: int = 40) -> list[float]:
    """Direct update rates of 2 s blocks until two in a row agree within 20%.

    SecantusDB's own write rate falls several-fold over its first ~10-20k single-document
    writes, then levels off (measured without the proxy: ~1,350 -> ~150 inserts/s, with or
    without pre-images and whether clients are reused), so the configurations are
    compared on the level part only."""
    rates: list[float] = []
    for i in range(most):
        rates.append(block(uri, "update", 2.0, f"pre{i}", n_docs, {}))
        if len(rates) >= 3 and abs(rates[-1] - rates[-2]) <= 0.2 * rates[-2] \
                and rates[-1] < 0.5 * rates[0]:
            break
    return rates


def opcounters(direct: MongoClient[dict[str, Any]]) -> dict[str, int]:
    got = direct.admin.command("serverStatus").get("opcounters") or {}
    return {k: int(got.get(k, 0)) for k in OPCOUNTERS}


def measure_writes(stack: Stack, direct: MongoClient[dict[str, Any]], sz: Sizes
                   ) -> dict[tuple[int, str], list[float]]:
    """Rates per (children, op), and under (children, op + ":settle") the seconds the
    capture still needed after each block: each block starts with the capture caught
    up, so none pays for the previous block's backlog. Children -1: the same writes
    straight to the upstream, without the proxy. Under (children, op + ":" + counter):
    the upstream's opcounters moved from the block's start until the capture had
    logged it, per write of the block, the benchmark's own commands (the settle's
    marker write and polls, serverStatus) left out: what each write cost the upstream,
    the write itself included."""
    results: dict[tuple[int, str], list[float]] = {}
    live: list[str] = []
    configs = (-1, 0, 1, 10)
    upstream = stack.upstream + "?directConnection=true"
    for r in range(sz.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for kids in order:
            if max(kids, 0) > len(live):
                set_children(stack, max(kids, 0), live)
                # A new child's overlay is created by the first copy-up into it: once per
                # child and collection, not a cost of each write, so not in the blocks.
                with MongoClient(stack.proxy_uri) as warm:
                    warm[DB][ITEMS].update_one({"_id": 0}, {"$inc": {"warm": 1}})
            set_children(stack, max(kids, 0), live)
            made: dict[str, list[str]] = {}
            for op in OPS:
                settle(stack, direct)
                before = opcounters(direct)
                done: list[int] = []
                rate = block(upstream if kids < 0 else stack.proxy_uri, op, sz.seconds,
                             f"r{r}k{kids}", sz.items, made, done)
                polls = POLLS[0]
                tail = settle(stack, direct)
                moved = {k: v - before[k] for k, v in opcounters(direct).items()}
                moved["query"] -= POLLS[0] - polls + 1  # settle's polls and `newest`
                moved["update"] -= 1                     # settle's marker
                moved["command"] -= 1                    # serverStatus
                results.setdefault((kids, op), []).append(rate)
                results.setdefault((kids, op + ":settle"), []).append(tail)
                for k, v in moved.items():
                    results.setdefault((kids, f"{op}:{k}"), []).append(v / max(done[0], 1))
                print(f"  round {r} children {kids:2d} {op:6s} {rate:8.0f} ops/s, capture "
                      f"done {tail:.1f}s later; upstream ops per write: " + " ".join(
                          f"{k} {v / max(done[0], 1):.2f}" for k, v in moved.items() if v),
                      flush=True)
    set_children(stack, 0, live)
    return results


# -- WAL look-ups --------------------------------------------------------------------------
def newest(wal: Any, ns: str, key: Any) -> int:
    """LSN of main's newest entry for one document (0: none)."""
    got = wal.find_one({"b": MAIN, "ns": ns, "id": key}, {"_id": 1}, sort=[("_id", -1)])
    return 0 if got is None else int(got["_id"])


def logged_after(wal: Any, ns: str, key: Any, after: int, timeout: float = 60.0) -> float:
    """Seconds until main's WAL holds an entry for the document newer than `after`,
    polled every POLL seconds (plus the poll's own round trip): polling harder takes the
    upstream's time from the capture it measures. inf when it never came."""
    perf = time.perf_counter
    t0 = perf()
    query = {"b": MAIN, "ns": ns, "id": key, "_id": {"$gt": after}}
    while perf() - t0 < timeout:
        POLLS[0] += 1
        if wal.find_one(query, {"_id": 1}) is not None:
            return perf() - t0
        time.sleep(POLL)
    return float("inf")


def main_lsn(stack: Stack) -> int:
    """Main's newest LSN; the log waits for the capture first (history.log)."""
    status, body = stack.api("GET", "/branches/main/log?limit=1")
    if status != 200 or not body.get("entries"):
        raise RuntimeError(f"GET /branches/main/log: {status} {body}")
    return int(body["entries"][0]["lsn"])


def settle(stack: Stack, direct: MongoClient[dict[str, Any]], timeout: float = 600.0) -> float:
    """Waits until the capture has logged everything written so far (a marker write on
    the upstream, then its WAL entry); returns the seconds it took."""
    coll = direct[DB][LAG]
    wal = direct[META]["wal"]
    before = newest(wal, f"{DB}.{LAG}", -1)
    t0 = time.monotonic()
    coll.update_one({"_id": -1}, {"$inc": {"marks": 1}}, upsert=True)
    if logged_after(wal, f"{DB}.{LAG}", -1, before, timeout) == float("inf"):
        raise RuntimeError(f"the capture did not log a marker write within {timeout:.0f}s")
    return time.monotonic() - t0


# -- (2) reads -----------------------------------------------------------------------------
def measure_child_reads(stack: Stack, direct: MongoClient[dict[str, Any]], sz: Sizes,
                        found: Findings) -> tuple[str, dict[tuple[str, str], list[float]]]:
    child = stack.branch("reads")
    ids = random.Random(11).sample(range(sz.base), sz.base // 100)
    with MongoClient(stack.proxy_uri) as c:
        for start in range(0, len(ids), 1000):
            c[DB][BASE].update_many({"_id": {"$in": ids[start:start + 1000]}},
                                    {"$inc": {"v": 1}, "$set": {"s": "changed"}})
    with MongoClient(child["uri"]) as c:
        shown = c[DB][BASE].count_documents({"s": "changed"})
        total = c[DB][BASE].count_documents({})
    moved = direct[DB][BASE].count_documents({"s": "changed"})
    print(f"  main changed {moved} docs; the child shows {shown} of them changed, "
          f"{total} docs", flush=True)
    if shown or total != sz.base or moved != len(ids):
        found.add(f"(2) after main changed {len(ids)} documents the child shows {shown} of "
                  f"them changed and {total} documents (expected 0 and {sz.base}); "
                  f"the upstream holds {moved} changed")
    return child["uri"], measure_reads(stack.proxy_uri, child["uri"], sz.base,
                                       sz.read_rounds, sz.read_block)


# -- (3) capture lag and exact reads -------------------------------------------------------
def lag_samples(direct: MongoClient[dict[str, Any]], pool: list[int], samples: int,
                fresh: list[int], found: Findings, label: str) -> list[float]:
    """Direct writes one at a time (insert, update, delete in turn), each followed by
    polling main's WAL for it."""
    coll, wal, ns = direct[DB][LAG], direct[META]["wal"], f"{DB}.{LAG}"
    out: list[float] = []
    missing = 0
    for i in range(samples):
        kind = OPS[i % 3]
        if kind == "insert":
            key = fresh.pop()
            before = 0
            coll.insert_one({"_id": key, "v": 0, "pad": branches.PAD})
        else:
            key = pool.pop()
            before = newest(wal, ns, key)
            if kind == "update":
                coll.update_one({"_id": key}, {"$inc": {"v": 1}})
            else:
                coll.delete_one({"_id": key})
        took = logged_after(wal, ns, key, before)
        if took == float("inf"):
            missing += 1
        else:
            out.append(took)
        time.sleep(0.01)
    if missing:
        found.add(f"(3) {missing} of {samples} direct writes ({label}) never reached main's "
                  "WAL within 60 s")
    return out


def background_writers(upstream: str, ids: list[int], stop: threading.Event,
                       counts: list[int]) -> list[threading.Thread]:
    def run(n: int) -> None:
        rng = random.Random(n)
        with MongoClient(upstream, directConnection=True) as c:
            coll = c[DB][LAG]
            while not stop.is_set():
                coll.update_one({"_id": rng.choice(ids)}, {"$inc": {"bg": 1}})
                counts[n] += 1

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(counts))]
    for t in threads:
        t.start()
    return threads


def exact_reads(child_uri: str, direct: MongoClient[dict[str, Any]], pool: list[int],
                idle_ids: list[int], cycles: int, quiet: float, found: Findings
                ) -> dict[str, list[float]]:
    """Child point reads, per cycle: one after `quiet` seconds without any write, one
    right after a direct upstream update of the document it reads (it must wait for the
    capture and show the document as at the fork, v = 0), and one of another document
    0.1 s later."""
    coll = direct[DB][LAG]
    perf = time.perf_counter
    out: dict[str, list[float]] = {"idle": [], "after": [], "later": []}
    wrong = 0
    rng = random.Random(17)
    with MongoClient(child_uri, maxPoolSize=1) as c:
        kid = c[DB][LAG]
        for _ in range(20):  # warm-up
            kid.find_one({"_id": rng.choice(idle_ids)})
        for _ in range(cycles):
            time.sleep(quiet)
            t0 = perf()
            kid.find_one({"_id": rng.choice(idle_ids)})
            out["idle"].append(perf() - t0)
            key = pool.pop()
            coll.update_one({"_id": key}, {"$inc": {"v": 1}})
            t0 = perf()
            got = kid.find_one({"_id": key})
            out["after"].append(perf() - t0)
            if got is None or got.get("v") != 0:
                wrong += 1
            time.sleep(0.1)
            t0 = perf()
            kid.find_one({"_id": rng.choice(idle_ids)})
            out["later"].append(perf() - t0)
    if wrong:
        found.add(f"(3) {wrong} of {cycles} child reads right after a direct upstream update "
                  "showed main's new value (or nothing) instead of the document at the fork")
    return out


def measure_lag(stack: Stack, direct: MongoClient[dict[str, Any]], child_uri: str, sz: Sizes,
                found: Findings) -> dict[str, Any]:
    ids = list(range(sz.lag))
    random.Random(13).shuffle(ids)
    quarter = len(ids) // 4
    bg_ids, idle_ids, pool = ids[:quarter], ids[quarter:2 * quarter], ids[2 * quarter:]
    fresh = list(range(10_000_000 + 2 * sz.lag_samples, 10_000_000, -1))
    out: dict[str, Any] = {}
    print(f"  {sz.lag_samples} direct writes one at a time ...", flush=True)
    out["idle"] = lag_samples(direct, pool, sz.lag_samples, fresh, found, "idle upstream")
    counts = [0, 0]
    stop = threading.Event()
    print(f"  {sz.lag_samples} direct writes beside {len(counts)} direct writers ...",
          flush=True)
    began = time.monotonic()
    threads = background_writers(stack.upstream, bg_ids, stop, counts)
    try:
        time.sleep(0.5)
        out["busy"] = lag_samples(direct, pool, sz.lag_samples, fresh, found,
                                  "beside direct writers")
    finally:
        stop.set()
        for t in threads:
            t.join()
    out["bg_rate"] = sum(counts) / (time.monotonic() - began)
    settle(stack, direct)
    print(f"  {sz.cycles} cycles of child point reads: idle, after a direct write, 0.1 s "
          "later ...", flush=True)
    out["reads"] = exact_reads(child_uri, direct, pool, idle_ids, sz.cycles, QUIET, found)
    return out


# -- (4) storage per preserved document ----------------------------------------------------
def measure_preserved(stack: Stack, direct: MongoClient[dict[str, Any]], sz: Sizes,
                      found: Findings) -> dict[str, float]:
    child = stack.branch("store")
    meta = direct[META]["branches"].find_one({"_id": "store"})
    if meta is None:
        raise RuntimeError("branch 'store' has no metadata document")
    bid = str(meta["bid"])
    ids = random.Random(21).sample(range(sz.base), sz.preserved)
    with MongoClient(stack.proxy_uri) as c:
        for start in range(0, len(ids), 1000):
            c[DB][BASE].update_many({"_id": {"$in": ids[start:start + 1000]}},
                                    {"$inc": {"v": 1}, "$set": {"s": "moved"}})
    with MongoClient(child["uri"]) as c:  # waits for the capture
        shown = c[DB][BASE].count_documents({"s": "moved"})
    if shown:
        found.add(f"(4) the child shows {shown} of the {len(ids)} documents main changed "
                  "after its fork with main's new value")
    db = direct[DB]
    live = coll_stats(db, f"__mb_{bid}_l_{BASE}")
    hidden = coll_stats(db, f"__mb_{bid}_h_{BASE}")
    keep = list(direct[META]["wal"].aggregate([
        {"$match": {"b": bid}}, {"$match": {"op": "keep"}},
        {"$group": {"_id": None, "n": {"$sum": 1}, "bytes": {"$sum": {"$bsonSize": "$$ROOT"}}}}]))
    keep_n = float(keep[0]["n"]) if keep else 0.0
    keep_bytes = float(keep[0]["bytes"]) if keep else 0.0
    wal = coll_stats(direct[META], "wal")
    base = coll_stats(db, BASE)
    if keep_n != len(ids) or live["count"] != len(ids) or hidden["count"] != len(ids):
        found.add(f"(4) main changed {len(ids)} documents after the fork; the child holds "
                  f"{live['count']:.0f} live, {hidden['count']:.0f} hidden ids, "
                  f"{keep_n:.0f} keep entries")
    drop(stack, "store")
    return {"docs": float(len(ids)), "live": live["size"], "live_n": live["count"],
            "live_index": live["index"], "hidden": hidden["size"], "hidden_n": hidden["count"],
            "hidden_index": hidden["index"], "keep_n": keep_n, "keep": keep_bytes,
            "wal_index": wal["index"] * keep_n / max(1.0, wal["count"]),
            "doc": base["size"] / max(1.0, base["count"])}


# -- (5) a branch of main at a past point --------------------------------------------------
def upstream_pid(stack: Stack) -> int | None:
    """The SecantusDB process serving the stack's upstream port."""
    port = f"--port {stack.upstream.rstrip('/').rsplit(':', 1)[1]} "
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "secantusd" in cmd and port in cmd:
            return int(entry.name)
    return None


def cpu(pid: int | None) -> float:
    """CPU seconds a process has used: what a restore costs each side, whatever else
    the shared machine runs meanwhile (wall time moves with the load, this much less)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def profilers(stack: Stack, into: Path | None, tag: str) -> list[subprocess.Popen[bytes]]:
    """py-spy recording the proxy and the upstream (when asked): where a restore's time
    goes, on each side of the wire."""
    if into is None:
        return []
    spy = Path(sys.executable).parent / "py-spy"
    into.mkdir(parents=True, exist_ok=True)
    out = []
    for who, pid in (("proxy", stack.proxy_pid), ("upstream", upstream_pid(stack))):
        if pid is not None:
            out.append(subprocess.Popen(
                [str(spy), "record", "-r", "50", "-f", "raw", "-o",
                 str(into / f"{tag}-{who}.txt"), "--pid", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # py-spy attaches
    return out


def stop_profilers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(2)  # py-spy writes its file on SIGINT
        proc.wait(30)


def measure_restore(stack: Stack, direct: MongoClient[dict[str, Any]], sz: Sizes,
                    found: Findings, profile: Path | None = None) -> list[dict[str, float]]:
    out: list[dict[str, float]] = []
    wal = direct[META]["wal"]
    ns = f"{DB}.{HIST}"
    perf = time.perf_counter
    for t in range(sz.restore_trials):
        lsn = main_lsn(stack)
        t0 = perf()
        with MongoClient(stack.proxy_uri) as c:
            changed = c[DB][HIST].update_many({}, {"$inc": {"v": 1}}).modified_count
        wrote = perf() - t0
        # Main's log waits for the capture only up to its barrier's timeout: count the
        # entries instead.
        deadline = time.monotonic() + 900
        logged = 0
        while time.monotonic() < deadline:
            logged = wal.count_documents({"b": MAIN, "ns": ns, "_id": {"$gt": lsn}})
            if logged >= changed:
                break
            time.sleep(0.2)
        captured = perf() - t0
        print(f"  trial {t}: main changed {changed:,} docs in {wrote:.1f}s, all in main's "
              f"WAL {captured:.1f}s after the write began", flush=True)
        if logged < changed:
            found.add(f"(5) main changed {changed} documents; main's WAL held {logged} "
                      "entries for them after 900 s")
        name = f"past{t}"
        spies = profilers(stack, profile, name)
        up = upstream_pid(stack)
        c0 = (cpu(stack.proxy_pid), cpu(up))
        t0 = perf()
        status, body = stack.api("POST", "/branches", {"name": name, "from": MAIN, "at": lsn})
        took = perf() - t0
        spent = (cpu(stack.proxy_pid) - c0[0], cpu(up) - c0[1])
        stop_profilers(spies)
        if status != 201:
            found.add(f"(5) POST /branches at LSN {lsn} (before main changed {changed} "
                      f"documents): {status} {body}")
            continue
        with MongoClient(body["uri"]) as c:
            then = c[DB][HIST].count_documents({"v": t})
            total = c[DB][HIST].count_documents({})
        if then != sz.hist or total != sz.hist:
            found.add(f"(5) the branch at LSN {lsn} shows {then} of {sz.hist} documents as "
                      f"they were at that point (v = {t}) and {total} documents")
        print(f"  trial {t}: branch at LSN {lsn} in {took:.2f}s: {changed / took:,.0f} docs/s; "
              f"{then:,} of {sz.hist:,} as then", flush=True)
        # The upstream's own rate right after, each trial: the machine's load moves both.
        u0 = cpu(up)
        floor = upstream_floor(direct, int(changed))
        floor_cpu = cpu(up) - u0
        print(f"  trial {t}: the upstream inserts them at {floor:,.0f} docs/s: the restore "
              f"ran at {changed / took / floor:.0%} of that; CPU s: restore {spent[0]:.2f} "
              f"proxy + {spent[1]:.2f} upstream, insert_many {floor_cpu:.2f} upstream",
              flush=True)
        out.append({"docs": float(changed), "seconds": took, "write": wrote,
                    "captured": captured, "right": float(then), "floor": floor,
                    "proxy_cpu": spent[0], "upstream_cpu": spent[1], "floor_cpu": floor_cpu})
        drop(stack, name)
    return out


def upstream_floor(direct: MongoClient[dict[str, Any]], n: int) -> float:
    """Documents per second the upstream itself inserts, in batches of 1,000 of the
    restored documents' shape: what a restore, which writes each document into the
    live overlay, the hidden ids and the WAL, is bounded by. Written in the metadata
    database, which the capture leaves out."""
    scratch = direct[META]["bench_floor"]
    t0 = time.perf_counter()
    for start in range(0, n, 1000):
        scratch.insert_many([branches.doc(i) for i in range(start, min(n, start + 1000))],
                            ordered=False)
    took = time.perf_counter() - t0
    scratch.drop()
    return n / took


def restore_lines(sz: Sizes, restore: list[dict[str, float]], floor: float) -> list[str]:
    """The (5) paragraph and table."""
    lines: list[str] = []
    if restore:
        rates = [r["docs"] / r["seconds"] for r in restore]
        lines += [f"(5) Branch of main at a past point: main's newest LSN recorded (`GET "
                  f"/branches/main/log?limit=1`), then `update_many({{}}, {{$inc: {{v: 1}}}})` "
                  f"on the main port changed all {sz.hist:,} documents of a collection; once "
                  f"main's WAL held all of them, `POST /branches {{\"from\": \"main\", \"at\": "
                  f"<lsn>}}` was timed ({len(restore)} trials, no child of main meanwhile):",
                  "", "| trial | documents | update_many s | capture done s | branch at "
                  "point s | restored docs/s | upstream insert_many docs/s | restore / "
                  "upstream | CPU s of the restore, proxy + upstream | upstream CPU s of the "
                  "insert_many | documents as then |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(restore):
            rate = r["docs"] / r["seconds"]
            lines.append(f"| {i} | {r['docs']:,.0f} | {r['write']:.2f} | {r['captured']:.2f} "
                         f"| {r['seconds']:.2f} | {rate:,.0f} | {r['floor']:,.0f} | "
                         f"**{rate / r['floor']:.0%}** | {r['proxy_cpu']:.2f} + "
                         f"{r['upstream_cpu']:.2f} | {r['floor_cpu']:.2f} | {r['right']:,.0f} |")
        ratio = statistics.median(r["docs"] / r["seconds"] / r["floor"] for r in restore)
        lines += ["", f"Median **{statistics.median(rates):,.0f} restored documents per "
                  f"second**, **{ratio:.0%}** of the upstream's own bulk-insert rate (targets: "
                  ">= 20,000/s, issue 11; >= 50% of the upstream's rate, issue 16). \"capture "
                  "done\": from the start of the `update_many` until main's WAL held an entry "
                  "for every changed document. The upstream's rate: right after each trial, "
                  "the upstream itself inserted the same number of documents of that shape "
                  f"(`insert_many`, batches of 1,000; median {floor:,.0f}/s). A restore reads "
                  "each changed document's first and last later WAL entries (one aggregation: "
                  "the first's pre-image is the document then, the last's post-image the "
                  "document now), and writes it three times, side by side: into the live "
                  "overlay, its id into the hidden set, a WAL entry.", ""]
    else:
        lines += ["(5) Branch of main at a past point: no trial succeeded (see below).", ""]
    return lines


# -- report --------------------------------------------------------------------------------
def reads_part(sz: Sizes, reads: dict[tuple[str, str], list[float]],
               when: str = "") -> list[str]:
    """Part (2) of the section: its own paragraph, so that --reads-only can replace it."""
    targets = {"point": 1.2, "range": 1.5, "agg": 2.5}
    labels = {"point": "point find by _id",
              "range": "indexed range find, 20 docs (`k` in [x, x+20))",
              "agg": f"aggregate `$match` on `k` ({max(10, sz.base // 50):,} docs) + "
                     "`$group` on `g` (100 groups)"}
    lines = [f"(2) Read latency, ms, on a child of main after main changed 1% of the "
             f"{sz.base:,}-doc base ({sz.base // 100:,} docs, `update_many` on the main port "
             "after the fork; the child holds their pre-images) vs the same reads on the "
              f"main port; one sync client per target, {sz.read_rounds} rounds x "
             f"{sz.read_block} requests ({sz.read_block // 2} for the aggregation), "
             "alternating (benchmarks/branches.py's `measure_reads`)" + when + ":", "",
             "| query | main p50 | main p99 | child p50 | child p99 | child/main p50 "
             "| target |", "|---|---|---|---|---|---|---|"]
    for op, limit in targets.items():
        m, br = reads[("main", op)], reads[("branch", op)]
        lines.append(f"| {labels[op]} | {ms(pct(m, .5))} | {ms(pct(m, .99))} | "
                     f"{ms(pct(br, .5))} | {ms(pct(br, .99))} | "
                     f"**{pct(br, .5) / pct(m, .5):.2f}x** | <= {limit}x |")
    lines += ["", "A read on a child is checked rather than held back: a `ping` pipelined "
              "behind each of its upstream commands, on the client's own connection, gives "
              "the upstream's time once the read had run, and the read is answered once the "
              "capture has passed that time, unless the capture preserved something for the "
              "child meanwhile (then it runs again). On an idle main that check almost never "
              "waits (`barrier_waits` moved by 4 over ~5,600 back-to-back child point reads). "
              "A point `find_one` on an id the child does not hide (pymongo's: an `_id` "
              "equality, `singleBatch`) is answered inline since f8e0774 (`Router.inline`, "
              "`EngineRouter.inline`): no task, no decode of the reply; the client's message "
              "and the ping go to the upstream in one write, the same fences are taken "
              "where they would not wait and the same capture check runs on the raw ping "
              "reply, and anything it does not pass runs the usual way from the start "
              "(tests/test_branch_inline_reads.py holds the capture back and fails with the "
              "check removed). Profiled after it (py-spy --gil, /proc, thread CPU timers in "
              "the proxy; loaded machine): the proxy's CPU per child point read went from "
              "~300-340 us to ~190-230 us (main port ~50-100 us); the router's inline "
              "decision (decode of the command, view and plan checks, fences) ~50 us of it, "
              "the two socket writes most of the rest. What is left of the gap: that CPU, "
              "the ping on the upstream (SecantusDB answers find by _id in ~0.20 ms, find + "
              "ping in one write in ~0.26 ms, raw socket), and this VM's cross-CPU wake-ups "
              "(a loopback TCP round trip between two processes on different vCPUs 79 us, "
              "on one 6 us), which the ping's reply, arriving in a second segment in ~44% of "
              "reads, adds one of. Range finds (a merged find: base and overlay, hidden ids "
              "dropped in memory) and the aggregation (a server-side union) are unchanged "
              "by it. Six --reads-only runs alternating the proxy before it (ceed10b) and "
              "after it (96d46a6) on 2026-11-30 22:14-22:18 UTC, 1-minute load 2.6-4.6 "
              "(other work on the machine), measured the point read at 1.81x, 1.70x, 1.78x "
              "before and 1.37x, 1.48x, 1.40x after (range 1.78x, 1.77x, 1.93x / 1.90x, "
              "1.81x, 1.80x; aggregation 2.46x, 2.58x, 2.91x / 2.72x, 2.71x, 2.83x). "
              "Earlier figures: the issue-3 run without the capture had the point read at "
              "1.12x; before the ping was pipelined, 2.49x / 1.86x / 2.62x; before the "
              "reply was passed undecoded, 1.68x / 1.65x / 2.57x (2026-11-30 13:03 UTC, "
              "quiet machine); with it, before the inline path, 1.70x / 1.73x / 2.55x "
              "(18:49 UTC, load 6).", ""]
    return lines


def write_lines(sz: Sizes, warm: list[float], writes: dict[tuple[int, str], list[float]]
                ) -> list[str]:
    """Part (1) of the report."""
    med = {key: statistics.median(v) for key, v in writes.items()}
    lines = [f"(1) Main-port write throughput, ops/s: {CLIENTS} client threads (pymongo), "
              f"point `insert_one` (new _id), `update_one` by _id (`$inc`), `delete_one` of "
              f"the block's inserts, on a {sz.items:,}-doc collection; median of {sz.rounds} "
              f"rotating rounds of {sz.seconds:g}s blocks, each started with the capture "
              "caught up (a marker write on the upstream, then its WAL entry), and after new "
              "children were made one main-port update before the blocks, so that their "
              "overlays exist (created by the first copy-up, once per child); the last "
              "column is how long after the block that took. \"upstream direct\": the same "
              "writes straight to SecantusDB, without the proxy. Before the rounds, direct "
              "2 s blocks of updates ran until SecantusDB's own rate levelled off (it falls "
              "several-fold over its first ~10-20k single-document writes, with or without "
              "the proxy): " + ", ".join(f"{r:.0f}" for r in warm) + " updates/s.", "",
              "| children of main | insert | update | delete | insert vs 0 | update vs 0 "
              "| delete vs 0 | target | capture done after the block, s (ins/upd/del) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for kids, target in ((-1, "(no proxy)"), (0, ""), (1, ">= 70%"), (10, ">= 50%")):
        cells = ["upstream direct" if kids < 0 else str(kids)]
        cells += [f"{med[(kids, op)]:.0f}" for op in OPS] + [
            f"**{med[(kids, op)] / med[(0, op)]:.0%}**" if kids > 0 else
            f"{med[(kids, op)] / med[(0, op)]:.0%}" for op in OPS]
        tails = " / ".join(f"{med[(kids, op + ':settle')]:.1f}" for op in OPS)
        lines.append("| " + " | ".join(cells) + f" | {target} | {tails} |")
    lines += ["", "A main-port write, children or not, is the client's own command on its "
              "own upstream connection; with children it also holds main's fence as a writer "
              "while it runs, so that no child's command runs beside it. It does not wait "
              "for the capture (unless the capture trails by more than a second): the "
              "capture preserves the pre-images into each child and logs main's change "
              "beside it, a batch of events at a time; with several children a batch grows "
              "while nothing waits for the capture (50 ms per child beyond the first, at "
              "most 0.5 s), as each batch costs every child an insert or two whatever its "
              "size. The ratios are taken against "
              "SecantusDB's levelled-off rate (the first row): the slower the upstream, the "
              "smaller the share of a write the proxy's and the capture's work is, so against "
              "a faster upstream the same children cost a larger share.", ""]
    lines += ["Upstream operations per main write (`serverStatus().opcounters`, moved from "
              "a block's start until the capture had logged it, divided by the block's "
              "writes; the write itself included, the benchmark's own marker write, WAL "
              "polls and serverStatus left out; median of the rounds):", "",
              "| children of main | write | " + " | ".join(OPCOUNTERS) + " | all |",
              "|---|---|" + "---|" * (len(OPCOUNTERS) + 1)]
    for kids in (-1, 0, 1, 10):
        for op in OPS:
            per = [med.get((kids, f"{op}:{k}"), 0.0) for k in OPCOUNTERS]
            lines.append(f"| {'upstream direct' if kids < 0 else kids} | {op} | "
                         + " | ".join(f"{v:.2f}" for v in per) + f" | {sum(per):.2f} |")
    lines.append("")
    return lines


def report(sz: Sizes, command: str, elapsed: float, load: tuple[float, float],
           warm: list[float], writes: dict[tuple[int, str], list[float]],
           reads: dict[tuple[str, str], list[float]], lag: dict[str, Any],
           store: dict[str, float], restore: list[dict[str, float]], floor: float,
           found: Findings) -> str:
    info = machine()
    lines = [SECTION, "",
             f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; the whole run took "
             f"{elapsed:.0f}s, seeding included. Machine: {info['nproc']} CPUs "
             f"({info['cpu']}), {info['mem']} RAM, shared and noisy (1-minute load average "
             f"{load[0]:.1f} at the start, {load[1]:.1f} at the end); {info['python']}, "
             f"pymongo {info['pymongo']}; proxy at {info['rev']}. One in-memory SecantusDB "
             "(`secantusd-py --storage-path :memory:`) and one proxy with the capture on (the "
             f"default). Reproduce: `{command}`.", ""]

    lines += write_lines(sz, warm, writes)

    lines += reads_part(sz, reads)

    def row(label: str, v: list[float]) -> str:
        if not v:
            return f"| {label} | 0 | - | - | - |"
        return (f"| {label} | {len(v)} | **{ms(pct(v, .5))}** | **{ms(pct(v, .99))}** | "
                f"{ms(max(v))} |")

    rd = lag["reads"]
    ri, ra, rl = rd["idle"], rd["after"], rd["later"]
    lines += ["(3) Capture lag, ms, of writes made directly on the upstream (a pymongo "
              "client connected to SecantusDB, not through the proxy), insert / update / "
              "delete in turn, one at a time: from the write's acknowledgement until its "
              "entry is in main's WAL (the metadata database's `wal`, polled by `id` every "
              f"{POLL * 1e3:g} ms plus the poll's round trip; 10 ms between samples). A "
              "child of main exists throughout, so each event is also preserved for it:", "",
              "| writes | n | p50 | p99 | max |", "|---|---|---|---|---|",
              row("one at a time, upstream otherwise idle", lag["idle"]),
              row(f"one at a time, beside 2 direct writers ({lag['bg_rate']:.0f} updates/s)",
                  lag["busy"]),
              "", f"Exact reads, ms: a child's point find by _id; per cycle one after "
              f"{QUIET:g}s without any write, one right after a direct upstream update of "
              "the document it reads (it must wait for the capture, then show the document "
              "as at the fork), and one of another document 0.1 s after that; "
              f"{sz.cycles} cycles:", "",
              "| child point read | n | p50 | p99 | max |", "|---|---|---|---|---|",
              row(f"idle upstream ({QUIET:g}s without writes)", ri),
              row("right after a direct write", ra),
              row("0.1 s after that read", rl),
              "", f"Extra latency of the exact read over the idle one: "
              f"**{ms(pct(ra, .5) - pct(ri, .5))} ms** at p50, "
              f"{ms(pct(ra, .99) - pct(ri, .99))} ms at p99 "
              f"({pct(ra, .5) / pct(ri, .5):.2f}x the idle read at p50). "
              "Point reads on the child back to back with no write anywhere, as in (2): "
              f"{ms(pct(reads[('branch', 'point')], .5))} ms p50.", ""]

    s = store
    n = s["docs"]
    data = s["live"] + s["hidden"] + s["keep"]
    index = s["live_index"] + s["hidden_index"] + s["wal_index"]
    lines += [f"(4) Storage per preserved document: a fresh child of main, then main changed "
              f"{n:.0f} of the base's documents (`update_many` on the main port, "
              f"{s['doc']:.0f} B per document on average); SecantusDB collStats `size` of the "
              "child's overlay collections, `$bsonSize` of its WAL `keep` entries:", "",
              "| | documents | bytes | bytes per preserved document |", "|---|---|---|---|",
              f"| live overlay (the pre-images) | {s['live_n']:.0f} | {s['live']:.0f} | "
              f"{s['live'] / n:.0f} |",
              f"| hidden ids | {s['hidden_n']:.0f} | {s['hidden']:.0f} | "
              f"{s['hidden'] / n:.0f} |",
              f"| WAL `keep` entries (the image once) | {s['keep_n']:.0f} | "
              f"{s['keep']:.0f} | {s['keep'] / n:.0f} |",
              f"| **data** | | **{data:.0f}** | **{data / n:.0f}** "
              f"({data / n / s['doc']:.1f}x the document) |",
              f"| indexes (overlay; WAL's share by entry count) | | {index:.0f} | "
              f"{index / n:.0f} |", ""]

    lines += restore_lines(sz, restore, floor)

    if found.notes:
        lines += ["Wrong answers met in this run:", ""] + [f"- {t}" for t in found.notes]
    else:
        lines += ["Checked in this run: the child of (2) and (4) showed none of main's later "
                  "values, every exact read of (3) showed the document as at the fork, every "
                  "direct write reached main's WAL, and every branch at a past point showed "
                  "all changed documents as they were then."]
    return "\n".join(lines) + "\n"


def reads_only(sz: Sizes, quick: bool) -> int:
    """Part (2) alone: the same base and child as in a whole run, without (1)'s writes
    before it; its paragraph of the section is replaced, the other parts are kept."""
    load_start = os.getloadavg()[0]
    procs = Procs(Path(tempfile.mkdtemp(prefix="mb-snapbench-")))
    found = Findings()
    try:
        stack = start_stack(procs, "snap", set(), 10)
        print(f"logs in {procs.logdir}", flush=True)
        direct: MongoClient[dict[str, Any]] = MongoClient(stack.upstream, directConnection=True)
        seed(direct[DB][BASE], sz.base)
        direct[DB][BASE].create_index("k")
        settle(stack, direct)
        print("(2) reads on a child after main changed 1% ...", flush=True)
        _uri, reads = measure_child_reads(stack, direct, sz, found)
        direct.close()
    finally:
        procs.stop_all()
    info = machine()
    command = ".venv/bin/python benchmarks/snapshots.py " + " ".join(sys.argv[1:])
    when = (f"; measured alone {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC (`{command}`: "
            f"a fresh stack, the base seeded, no part (1) before it; proxy at {info['rev']}, "
            f"1-minute load average {load_start:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end)")
    lines = reads_part(sz, reads, when)
    if found.notes:
        lines += ["Wrong answers met in this run:", ""] + [f"- {t}" for t in found.notes] + [""]
    text = "\n".join(lines).rstrip("\n") + "\n\n"
    print()
    print(text)
    if quick:
        return 0
    results = branches.RESULTS
    old = results.read_text()
    start = old.index(SECTION)
    first = old.index("(2) Read latency", start)
    last = old.index("(3) Capture lag", first)
    results.write_text(old[:first] + text + old[last:])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run; no RESULTS.md")
    ap.add_argument("--rounds", type=int, default=Sizes.rounds)
    ap.add_argument("--seconds", type=float, default=Sizes.seconds, help="per write block")
    ap.add_argument("--reads-only", action="store_true",
                    help="run only (2), on a stack seeded with its collection alone, and "
                         "replace only its paragraph in RESULTS.md")
    ap.add_argument("--restore-docs", type=int, default=Sizes.hist,
                    help="documents main changes after the point of (5)")
    ap.add_argument("--restore-trials", type=int, default=Sizes.restore_trials,
                    help="times (5) is repeated")
    ap.add_argument("--profile", type=Path, default=None,
                    help="py-spy raw profiles of the proxy and the upstream during (5), here")
    ap.add_argument("--only-restore", action="store_true",
                    help="run part (5) alone and print its paragraph; no RESULTS.md update")
    ap.add_argument("--writes-only", action="store_true",
                    help="part (1) only; rewrites only its paragraphs of RESULTS.md")
    args = ap.parse_args()
    sz = Sizes(rounds=args.rounds, seconds=args.seconds, hist=args.restore_docs,
               restore_trials=args.restore_trials)
    if args.quick:
        sz = Sizes(items=10_000, base=2_000, lag=600, hist=2_000, rounds=1, seconds=1.0,
                   read_rounds=4, read_block=10, lag_samples=30, cycles=6, preserved=100,
                   restore_trials=1)
    if args.reads_only:
        return reads_only(sz, args.quick)
    load_start = os.getloadavg()[0]
    began = time.monotonic()
    procs = Procs(Path(tempfile.mkdtemp(prefix="mb-snapbench-")))
    found = Findings()
    try:
        stack = start_stack(procs, "snap", set(), 30)
        print(f"logs in {procs.logdir}", flush=True)
        direct: MongoClient[dict[str, Any]] = MongoClient(stack.upstream, directConnection=True)
        print("seeding (directly on the upstream, before any child) ...", flush=True)
        db = direct[DB]
        if args.only_restore:
            seed(db[HIST], sz.hist)
            # In the full run the children of (1)-(4) had the proxy turn pre-images on.
            db.command({"collMod": HIST, "changeStreamPreAndPostImages": {"enabled": True}})
            print(f"  the capture logged the seeding in {settle(stack, direct):.0f}s more",
                  flush=True)
            restore = measure_restore(stack, direct, sz, found, args.profile)
            floor = statistics.median(r["floor"] for r in restore) if restore else 0.0
            print("\n".join(["", *restore_lines(sz, restore, floor), *found.notes]))
            return 0
        db[ITEMS].insert_many([{"_id": i, "v": i} for i in range(sz.items)])
        if args.writes_only:
            db[LAG].insert_one({"_id": -1, "v": 0})
            settle(stack, direct)
            warm = precondition(stack.upstream + "?directConnection=true", sz.items,
                                3 if args.quick else 40)
            writes = measure_writes(stack, direct, sz)
            direct.close()
            return writes_only(sz, warm, writes, time.monotonic() - began, load_start,
                               write=not args.quick)
        seed(db[BASE], sz.base)
        db[BASE].create_index("k")
        db[LAG].insert_many([{"_id": i, "v": 0, "pad": branches.PAD} for i in range(sz.lag)])
        seed(db[HIST], sz.hist)
        print(f"  the capture logged the seeding in {settle(stack, direct):.0f}s more",
              flush=True)

        print("(1) main-port writes with 0, 1, 10 children ...", flush=True)
        warm = precondition(stack.upstream + "?directConnection=true", sz.items,
                            3 if args.quick else 40)
        print("  direct update rates while preconditioning: "
              + ", ".join(f"{r:.0f}" for r in warm), flush=True)
        writes = measure_writes(stack, direct, sz)
        settle(stack, direct)
        print("(2) reads on a child after main changed 1% ...", flush=True)
        child_uri, reads = measure_child_reads(stack, direct, sz, found)
        print("(3) capture lag ...", flush=True)
        lag = measure_lag(stack, direct, child_uri, sz, found)
        print("(4) storage per preserved document ...", flush=True)
        store = measure_preserved(stack, direct, sz, found)
        drop(stack, "reads")
        print(f"(5) branch of main at a past point, {sz.hist:,} changed docs ...", flush=True)
        restore = measure_restore(stack, direct, sz, found, args.profile)
        floor = statistics.median(r["floor"] for r in restore) if restore else 0.0
        direct.close()
    finally:
        procs.stop_all()
    command = ".venv/bin/python benchmarks/snapshots.py" + (
        " " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    text = report(sz, command, time.monotonic() - began, (load_start, os.getloadavg()[0]),
                  warm, writes, reads, lag, store, restore, floor, found)
    print()
    print(text)
    if not args.quick:
        replace_section(SECTION, text)
    return 0


def writes_only(sz: Sizes, warm: list[float], writes: dict[tuple[int, str], list[float]],
                elapsed: float, load_start: float, write: bool) -> int:
    """Part (1) alone: its paragraphs of the Snapshots section are replaced, dated and
    with their own command; the rest of the section stays as its full run left it."""
    info = machine()
    command = ".venv/bin/python benchmarks/snapshots.py " + " ".join(sys.argv[1:])
    lines = write_lines(sz, warm, writes)
    lines[0] = (f"{lines[0]} Part (1) measured alone on "
                f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC in {elapsed:.0f}s (`{command}`, "
                f"proxy at {info['rev']}; load "
                f"average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end).")
    text = "\n".join(lines)
    print()
    print(text)
    if write:
        old = branches.RESULTS.read_text()
        at = old.index(SECTION)
        first = old.index("(1) Main-port write throughput", at)
        second = old.index("(2) Read latency", first)
        branches.RESULTS.write_text(old[:first] + text.rstrip("\n") + "\n\n" + old[second:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
