"""Modes benchmark (issue 5 item 5): copy branches vs WAL branches, side by side.

One run starts its own in-memory SecantusDB and a proxy in front of it
(`mongobranch serve --upstream ...`), then, for each base size in turn (10k,
100k, 1M documents of ~200 BSON bytes with an index on `k`; a copy branch
copies every user database, so each size's branches are deleted and its base
dropped before the next size is seeded):

1. creation: 10 WAL and 10 copy branches, POST /branches {"mode": ...} on the
   admin API, interleaved (W C, C W, ...); time per branch, median and p90 per
   mode, and the ratio copy/WAL (the original plan promised creation 50x faster);
2. storage: each branch then updates 1% of the base through its own port; WAL
   branches = overlay collections + their WAL entries (BSON bytes), copy
   branches = the copied collections (their WAL entries reported beside), and
   how much less WAL mode uses (the original plan promised 87% less for 10);
3. latency (p50, one sync client, interleaved rounds) on one WAL and one copy
   branch of the same base: point find by _id, indexed range find, an
   aggregation; insert_one, update_one by _id, delete_one (10k, and 100k when
   the budget allows).

SecantusDB is slow and a copy branch copies the whole base server-side, so the
run has a time budget (--budget, 12 minutes): a copy branch, a size or a
latency phase is only started when its projected time (from what this run
already measured) fits in what is left. The report says exactly what was
measured and what was skipped and why. The script never asserts: it prints a
table and rewrites the "## Modes: copy vs WAL (issue 5)" section of
benchmarks/RESULTS.md (re-reading the file just before writing).

    .venv/bin/python benchmarks/modes.py            # full run, ~12 minutes
    .venv/bin/python benchmarks/modes.py --quick    # smoke run, no RESULTS.md update
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests/
from benchmarks.results import replace_section
from tests.servers import Procs, ProxyProcess, Secantus, free_port, free_range, tree_exe

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
SECTION = "## Modes: copy vs WAL (issue 5)"
DB, BASE = "bench", "base"
META = "mongobranch_bench"
BASELINE_META = "mongobranch_bench_b"
BASELINE = "wal-baseline"  # latency target: the WAL branch of the --baseline tree's proxy
BATCH = 10_000
WAL, COPY = "wal", "copy"
MODES = (WAL, COPY)
AGG_SPAN = 200  # documents matched by the aggregation, whatever the base size
SLACK = 20.0  # seconds kept free for teardown and the report
DEFAULT_UPDATE_RATE = 200.0  # docs/s through a branch port, until this run measured one
PROMISED_SPEEDUP = 50.0
PROMISED_SAVING = 87.0


# -- processes ------------------------------------------------------------------------------
@dataclass
class Stack:
    """One SecantusDB and the proxy in front of it."""

    upstream: str
    proxy_uri: str
    admin_port: int
    http: http.client.HTTPConnection | None = None
    baseline_admin: int | None = None  # --baseline: the other tree's proxy, own metadata

    def api(self, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
        for attempt in (0, 1):
            if self.http is None:
                # A copy branch of a big base answers after minutes.
                self.http = http.client.HTTPConnection("127.0.0.1", self.admin_port,
                                                       timeout=3600)
            try:
                data = None if body is None else json.dumps(body)
                self.http.request(method, path, body=data,
                                  headers={"Content-Type": "application/json"})
                resp = self.http.getresponse()
                return resp.status, json.loads(resp.read() or b"null")
            except (OSError, http.client.HTTPException):
                self.http.close()
                self.http = None
                if attempt or method == "POST":  # never create a branch twice
                    raise
        raise AssertionError("unreachable")


def start_baseline(procs: Procs, tree: str, upstream: str) -> int:
    """The proxy of another source tree on the same upstream, with its own metadata
    database and one branch port; returns its admin port."""
    qb_port = free_port()
    baseline = procs.add(ProxyProcess(
        upstream, exe=tree_exe(tree), meta_db=BASELINE_META,
        branch_ports=(qb_port, qb_port), data_dir=str(procs.logdir / "data-b"),
        log_level="WARNING", lifecycle_defaults=True,
        log=procs.log("baseline")).start(wait_healthy=False))
    return baseline.admin_port


def start_stack(procs: Procs, nports: int, cache: str) -> Stack:
    server = procs.add(Secantus(extra=["--cache-size", cache], log=procs.log("secantus")).start())
    # Drops remove at once and main takes merges (ProxyProcess without lifecycle_defaults):
    # the engine is measured, not branch lifecycle (whose defaults keep dropped branches,
    # children of main included).
    proxy = procs.add(ProxyProcess(
        server.uri, meta_db=META, branch_ports=free_range(nports),
        data_dir=str(procs.logdir / "data"), log_level="WARNING",
        log=procs.log("proxy")).start())
    return Stack(server.uri, proxy.uri, proxy.admin_port)


# -- clock and projections ------------------------------------------------------------------
@dataclass
class Clock:
    began: float
    budget: float

    def spent(self) -> float:
        return time.monotonic() - self.began

    def left(self) -> float:
        return self.budget - self.spent()

    def say(self, text: str) -> None:
        print(f"[{self.spent():5.0f}s] {text}", flush=True)


@dataclass
class Rates:
    """What this run measured so far, for projecting the next step."""

    seed: float | None = None  # docs/s inserted on the upstream
    copy: float | None = None  # docs/s copied by a copy branch
    update: dict[str, float] = field(default_factory=dict)  # docs/s updated through a port

    def seed_secs(self, n: int) -> float | None:
        return None if self.seed is None else n / self.seed

    def copy_secs(self, n: int, measured: list[float]) -> float | None:
        if measured:
            return max(statistics.median(measured), measured[-1])
        return None if self.copy is None else n / self.copy

    def update_secs(self, mode: str, docs: int) -> float:
        return docs / self.update.get(mode, DEFAULT_UPDATE_RATE)


# -- data -----------------------------------------------------------------------------------
EPOCH = dt.datetime(2026, 1, 1)


def doc(i: int) -> dict[str, Any]:
    """~200 BSON bytes, shaped like an application's record; `k` is indexed."""
    return {"_id": i, "k": i, "g": i % 100, "v": 0, "s": f"doc{i}", "name": f"user {i:07d}",
            "email": f"user{i:07d}@example.com", "created": EPOCH + dt.timedelta(seconds=i),
            "tags": ["red", f"t{i % 13}"], "score": i * 0.5, "city": "Springfield",
            "note": "lorem"}


def seed(coll: Any, n: int, say: Callable[[str], None]) -> float:
    began = time.monotonic()
    for start in range(0, n, BATCH):
        coll.insert_many([doc(i) for i in range(start, min(n, start + BATCH))], ordered=False)
        done = min(n, start + BATCH)
        if done % 100_000 == 0 or done == n:
            say(f"  {done:,} docs in {time.monotonic() - began:.0f}s")
    coll.create_index("k")
    return time.monotonic() - began


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- one base size --------------------------------------------------------------------------
@dataclass
class Size:
    n: int
    seed_secs: float = 0.0
    skipped: str | None = None  # why the whole size was not measured
    create: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    branches: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {m: [] for m in MODES})
    copy_stop: str | None = None  # why fewer copy branches than asked
    update_secs: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    step_secs: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    storage_stop: dict[str, str] = field(default_factory=dict)
    storage: dict[str, list[dict[str, float]]] = field(
        default_factory=lambda: {m: [] for m in MODES})
    base: dict[str, float] = field(default_factory=dict)
    latency: dict[tuple[str, str], list[float]] | None = None
    lat_rounds: int = 0
    lat_allowance: float = 0.0
    latency_skip: str | None = None
    baseline: bool = False  # a --baseline WAL branch was made at this size
    warnings: list[str] = field(default_factory=list)


def create_branches(stack: Stack, size: Size, count: int, clock: Clock, rates: Rates,
                    latency_sizes: set[int], allowance: float, max_copied: int) -> None:
    """count WAL and count copy branches, interleaved; a copy branch only when its
    projected time still leaves room for the updates that follow."""
    n = size.n
    per = max(1, n // 100)
    for i in range(count):
        for mode in (WAL, COPY) if i % 2 == 0 else (COPY, WAL):
            if mode == COPY:
                if size.copy_stop:
                    continue
                guess = rates.copy_secs(n, size.create[COPY])
                copies = len(size.create[COPY]) + 1
                if copies * n > max_copied:
                    size.copy_stop = (
                        f"copy branch {copies} of {count} not started: {copies} copies of "
                        f"{n:,} documents would pass --max-copied-docs {max_copied:,}, the "
                        "guard that keeps the in-memory upstream within this machine's RAM")
                    clock.say("  " + size.copy_stop)
                    continue
                reserve = (rates.update_secs(WAL, per) * count
                           + rates.update_secs(COPY, per) * copies + SLACK)
                if copies > 1 and n in latency_sizes:
                    reserve += allowance  # a second copy must not cost the latency phase
                if guess is not None and clock.left() < 1.1 * guess + reserve:
                    size.copy_stop = (
                        f"copy branch {copies} of {count} not started at {clock.spent():.0f}s: "
                        f"projected {guess:.0f}s (from the copies measured "
                        f"{'at this size' if size.create[COPY] else 'at the previous size'}) "
                        f"+ {reserve:.0f}s kept for the 1% updates"
                        f"{' and the latency phase' if copies > 1 and n in latency_sizes else ''}"
                        f" > {clock.left():.0f}s left")
                    clock.say("  " + size.copy_stop)
                    continue
            name = f"{mode}-{n}-{i}"
            t0 = time.perf_counter()
            status, body = stack.api("POST", "/branches", {"name": name, "mode": mode})
            took = time.perf_counter() - t0
            if status != 201 and mode == COPY:
                size.copy_stop = (f"copy branch {len(size.create[COPY]) + 1} of {count} "
                                  f"failed after {took:.0f}s: HTTP {status} {body}")
                clock.say("  " + size.copy_stop)
                continue
            if status != 201:
                raise RuntimeError(f"creating {name}: {status} {body}")
            if body.get("mode") != mode:
                size.warnings.append(f"{name} was asked for mode {mode}, got {body.get('mode')}")
            size.create[mode].append(took)
            size.branches[mode].append(dict(body))
            clock.say(f"  created {name} in {took * 1e3:.1f} ms")
        if size.create[COPY]:
            rates.copy = n / statistics.median(size.create[COPY])


def coll_stats(db: Any, name: str) -> dict[str, float]:
    from bson import encode
    from pymongo.errors import OperationFailure

    try:
        st = db.command("collStats", name)
        return {"size": float(st["size"]), "index": float(st.get("totalIndexSize", 0)),
                "count": float(st["count"])}
    except (OperationFailure, KeyError):
        return {"size": float(sum(len(encode(d)) for d in db[name].find())), "index": 0.0,
                "count": float(db[name].count_documents({}))}


def update_and_measure(stack: Stack, size: Size, clock: Clock, rates: Rates) -> None:
    """Each branch updates 1% of the base through its port (distinct random ids per
    branch); then the bytes each branch holds."""
    from bson.codec_options import CodecOptions
    from bson.raw_bson import RawBSONDocument
    from pymongo import MongoClient

    n = size.n
    per = max(1, n // 100)
    direct: MongoClient[dict[str, Any]] = MongoClient(stack.upstream, directConnection=True)
    wal = direct[META].get_collection(
        "wal", codec_options=CodecOptions(document_class=RawBSONDocument))
    try:
        pairs = [(m, j) for j in range(max(len(v) for v in size.branches.values()))
                 for m in ((WAL, COPY) if j % 2 == 0 else (COPY, WAL))
                 if j < len(size.branches[m])]
        for mode, j in pairs:
            info = size.branches[mode][j]
            guess = rates.update_secs(mode, per)
            if mode in size.storage_stop or clock.left() < 1.2 * guess + SLACK:
                size.storage_stop.setdefault(mode, (
                    f"{mode} branch {j + 1}: 1% update not started at {clock.spent():.0f}s, "
                    f"projected {guess:.0f}s > {clock.left() - SLACK:.0f}s left"))
                continue
            ids = random.Random(1000 * j + (mode == COPY)).sample(range(n), per)
            step = time.perf_counter()
            t0 = time.perf_counter()
            modified = 0
            with MongoClient(info["uri"]) as c:
                for start in range(0, per, 1000):
                    res = c[DB][BASE].update_many({"_id": {"$in": ids[start:start + 1000]}},
                                                  {"$inc": {"v": 1}, "$set": {"s": f"b{j}"}})
                    modified += res.modified_count
                took = time.perf_counter() - t0
                probe = c[DB][BASE].find_one({"_id": ids[0]})
                # The count command; count_documents({}) is an aggregation that costs a WAL
                # branch seconds per 10k documents on SecantusDB (see the report).
                total = c[DB][BASE].estimated_document_count() if j == 0 else n
            if modified != per:
                size.warnings.append(f"{info['name']}: update_many modified {modified} of {per}")
            if probe is None or probe.get("v") != 1:
                size.warnings.append(f"{info['name']}: _id {ids[0]} reads back as {probe}")
            if total != n:
                size.warnings.append(f"{info['name']}: count = {total}, base has {n}")
            size.update_secs[mode].append(took)
            meta = direct[META]["branches"].find_one({"_id": info["name"]})
            assert meta is not None
            bid = meta["bid"]
            row: dict[str, float] = {}
            for kind in ("l", "h"):
                st = coll_stats(direct[DB], f"__mb_{bid}_{kind}_{BASE}")
                for key, value in st.items():
                    row[f"{kind}_{key}"] = value
            entries = list(wal.find({"b": bid}))
            row["wal_entries"] = float(len(entries))
            row["wal_bytes"] = float(sum(len(e.raw) for e in entries))
            size.storage[mode].append(row)
            # Projections use the whole step: the update, the checks and collStats.
            size.step_secs[mode].append(time.perf_counter() - step)
            rates.update[mode] = per / statistics.median(size.step_secs[mode])
            clock.say(f"  {info['name']}: 1% ({per:,} docs) updated in {took:.1f}s; "
                      f"live {row['l_count']:.0f} docs / {row['l_size']:.0f} B, "
                      f"WAL {row['wal_entries']:.0f} entries / {row['wal_bytes']:.0f} B")
        wal_stats = coll_stats(direct[META], "wal")
        size.base = coll_stats(direct[DB], BASE)
        size.base["wal_index_per_entry"] = wal_stats["index"] / max(1.0, wal_stats["count"])
    finally:
        direct.close()


# -- latency --------------------------------------------------------------------------------
def measure_latency(uris: dict[str, str], n: int, args: argparse.Namespace, size: Size,
                    allowance: float) -> None:
    """Reads on main, the WAL and the copy branch; writes on the two branches. Each round
    runs every op on every target (order rotated), so rounds can stop at the allowance
    without favouring a target."""
    from pymongo import MongoClient

    rnd = random.Random(3)
    clients = {t: MongoClient(uri, maxPoolSize=1) for t, uri in uris.items()}
    span = min(AGG_SPAN, n // 2)
    next_id = {t: 10_000_000 for t in uris}
    # Deletes take odd ids, updates even ones, so an update never meets a deleted id.
    deletable = {t: list(range(1, n, 2)) for t in uris}
    for ids in deletable.values():
        random.Random(7).shuffle(ids)
    misses = {t: 0 for t in uris}

    def ops(t: str) -> dict[str, Callable[[], Any]]:
        coll = clients[t][DB][BASE]

        def insert() -> None:
            next_id[t] += 1
            coll.insert_one(doc(next_id[t]))

        def update() -> None:
            if coll.update_one({"_id": 2 * rnd.randrange(n // 2)},
                               {"$inc": {"v": 1}}).matched_count != 1:
                misses[t] += 1

        def delete() -> None:
            if coll.delete_one({"_id": deletable[t].pop()}).deleted_count != 1:
                misses[t] += 1

        return {
            "point": lambda: coll.find_one({"_id": rnd.randrange(n)}),
            "range": lambda: list(coll.find({"k": {"$gte": (x := rnd.randrange(n - 20)),
                                                   "$lt": x + 20}})),
            "agg": lambda: list(coll.aggregate([
                {"$match": {"k": {"$gte": (y := rnd.randrange(n - span)), "$lt": y + span}}},
                {"$group": {"_id": "$g", "n": {"$sum": 1}, "v": {"$sum": "$v"}}}])),
            "insert": insert, "update": update, "delete": delete,
        }

    table = {t: ops(t) for t in uris}
    # Same ids and the same group sizes on every target (the branches changed values only).
    probe = {"k": {"$gte": n // 3, "$lt": n // 3 + span}}
    seen = {t: [d["_id"] for d in c[DB][BASE].find(probe, {"_id": 1}).sort("_id", 1)]
            for t, c in clients.items()}
    if len({tuple(v) for v in seen.values()}) != 1:
        size.warnings.append(f"targets disagree on the ids matching {probe}: "
                             + ", ".join(f"{t} {len(v)}" for t, v in seen.items()))
    groups = {t: sorted((d["_id"], d["n"]) for d in c[DB][BASE].aggregate([
        {"$match": probe}, {"$group": {"_id": "$g", "n": {"$sum": 1}}}]))
        for t, c in clients.items()}
    if len({tuple(v) for v in groups.values()}) != 1:
        size.warnings.append(f"targets disagree on the group sizes of {probe}")
    samples: dict[tuple[str, str], list[float]] = {}
    perf = time.perf_counter
    blocks = {"point": args.lat_block, "range": args.lat_block,
              "agg": max(1, args.lat_block // 5), "insert": args.lat_block,
              "update": args.lat_block, "delete": args.lat_block}
    readers = list(uris)
    # The baseline branch takes the same writes, so both trees' overlays grow alike.
    writers = [t for t in uris if t != "main"]
    began = time.monotonic()
    try:
        for t in readers:
            for op in blocks:
                if op in ("point", "range", "agg") or t in writers:
                    table[t][op]()
        for r in range(args.lat_rounds):
            if r >= 2 and time.monotonic() - began > allowance:
                break
            for op, block in blocks.items():
                targets = readers if op in ("point", "range", "agg") else writers
                order = targets[r % len(targets):] + targets[: r % len(targets)]
                for t in order:
                    fn = table[t][op]
                    got = samples.setdefault((t, op), [])
                    for _ in range(block):
                        t0 = perf()
                        fn()
                        got.append(perf() - t0)
            size.lat_rounds = r + 1
    finally:
        for c in clients.values():
            c.close()
    for t, missed in misses.items():
        if missed:
            size.warnings.append(f"{missed} update/delete writes on the {t} branch matched "
                                 "nothing")
    size.latency = samples


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
    return f"{v * 1e3:.2f}" if v < 1 else f"{v * 1e3:,.0f}"


def secs(v: float) -> str:
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.1f} s"


def plural(k: int, noun: str) -> str:
    return f"{k} {noun}" + ("" if k == 1 else "es" if noun.endswith("ch") else "s")


def total(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows)


STORAGE_ROWS = (
    ("l_count", "live collection: documents"),
    ("l_size", "live collection: bytes"),
    ("h_count", "hidden-id collection: documents"),
    ("h_size", "hidden-id collection: bytes"),
    ("wal_entries", "WAL entries"),
    ("wal_bytes", "WAL entries: bytes"),
    ("index", "indexes of the branch collections, bytes"),
    ("wal_index", "WAL index, these entries' share by entry count, bytes"),
    ("headline", "WAL mode: collections + WAL; copy mode: copied collections"),
    ("headline_per", "same, per branch"),
    ("all_per", "collections + WAL, per branch (both modes)"),
    ("ix_per", "collections + WAL + all their indexes, per branch (both modes)"),
)


def summarize(rows: list[dict[str, float]], wal_ix: float, mode: str) -> dict[str, float]:
    if not rows:
        return {}
    out = {key: total(rows, key) for key in ("l_count", "l_size", "h_count", "h_size",
                                             "wal_entries", "wal_bytes")}
    out["index"] = total(rows, "l_index") + total(rows, "h_index")
    out["wal_index"] = out["wal_entries"] * wal_ix
    colls = out["l_size"] + out["h_size"]
    out["headline"] = colls + (out["wal_bytes"] if mode == WAL else 0.0)
    out["headline_per"] = out["headline"] / len(rows)
    out["all_per"] = (colls + out["wal_bytes"]) / len(rows)
    out["ix_per"] = (colls + out["wal_bytes"] + out["index"] + out["wal_index"]) / len(rows)
    return out


def report(args: argparse.Namespace, sizes: list[Size], doc_bytes: float) -> str:
    count = args.branches
    lines: list[str] = []

    # What was measured, what was not.
    lines += ["What this run measured and skipped:", ""]
    for s in sizes:
        if s.skipped:
            lines.append(f"- **{s.n:,} documents: not measured.** {s.skipped}")
            continue
        nw, nc = len(s.create[WAL]), len(s.create[COPY])
        line = (f"- {s.n:,} documents (seeded in {s.seed_secs:.0f}s): {nw} WAL and {nc} copy "
                "branches created")
        if s.copy_stop:
            line += f" (**{plural(count - nc, 'copy branch')} skipped**: {s.copy_stop})"
        line += (f"; storage measured on {len(s.storage[WAL])} WAL and "
                 f"{len(s.storage[COPY])} copy branches")
        for mode, why in s.storage_stop.items():
            line += f" (**{mode}: skipped the rest**: {why})"
        line += (f"; latency measured ({s.lat_rounds} rounds)" if s.latency is not None
                 else f"; **latency not measured**: {s.latency_skip}")
        lines.append(line + ".")
    lines.append("")

    # 1. creation
    lines += ["(1) Branch creation, POST /branches {\"mode\": ...} on the admin API "
              "(HTTP keep-alive), the WAL and copy creations interleaved (W C, C W, ...); "
              "time until the 201 reply, which for a copy branch comes after the copy:", "",
              "| base documents | WAL n | WAL p50 | WAL p90 | copy n | copy p50 | copy p90 | "
              "**copy/WAL (p50)** | copy rate |", "|---|---|---|---|---|---|---|---|---|"]
    ratios: list[tuple[int, float]] = []
    for s in sizes:
        w, c = s.create[WAL], s.create[COPY]
        if s.skipped or not w:
            lines.append(f"| {s.n:,} | 0 | - | - | 0 | - | - | not measured | - |")
            continue
        row = f"| {s.n:,} | {len(w)} | {secs(pct(w, .5))} | {secs(pct(w, .9))} | {len(c)} | "
        if c:
            ratio = pct(c, .5) / pct(w, .5)
            ratios.append((s.n, ratio))
            row += (f"{secs(pct(c, .5))} | {secs(pct(c, .9))} | **{ratio:,.0f}x** | "
                    f"{s.n / pct(c, .5):,.0f} docs/s |")
        else:
            row += "- | - | not measured | - |"
        lines.append(row)
    lines += ["", "p50 = median; p90 is the nearest-rank value, so with fewer than 10 samples it "
                  "is the largest or second largest."]
    if ratios:
        said = ", ".join(f"**{r:,.0f}x** at {n:,} documents" for n, r in ratios)
        lines += ["", f"The original plan promised WAL creation **50x faster** than copy. "
                      f"Measured: WAL creation is {said} faster (p50 vs p50). "
                      + ("The promise holds at every size measured" if all(
                          r >= PROMISED_SPEEDUP for _, r in ratios) else
                         "The promise does not hold at every size measured")
                      + "; the factor grows with the base, since a WAL branch costs the "
                        "same whatever the size and a copy branch copies every document."]
    lines.append("")

    # 2. storage
    saving: list[tuple[int, float]] = []
    lines += ["(2) Storage: each branch updated 1% of the base through its own port "
              "(`update_many` with `$in` of 1,000 ids, `$inc` + `$set`, distinct random ids "
              "per branch). SecantusDB collStats `size` of each branch's collections "
              "(`__mb_<bid>_l_base` live documents, `__mb_<bid>_h_base` hidden ids), WAL = BSON "
              "bytes of that branch's entries (pre- and post-images). Totals over the branches "
              "measured; per branch = their mean:", ""]
    for s in sizes:
        sw, sc = s.storage[WAL], s.storage[COPY]
        if s.skipped or not sw:
            continue
        sums = {mode: summarize(s.storage[mode], s.base["wal_index_per_entry"], mode)
                for mode in MODES}
        upd = "; ".join(f"{mode} p50 {statistics.median(v):.1f}s" for mode, v in
                        s.update_secs.items() if v)
        lines += [f"{s.n:,}-document base ({s.base['size']:,.0f} B data, "
                  f"{s.base['index']:,.0f} B indexes), 1% = {max(1, s.n // 100):,} docs per "
                  f"branch (time to update them through the branch port: {upd}):", "",
                  f"| | WAL mode ({plural(len(sw), 'branch')}) | "
                  f"copy mode ({plural(len(sc), 'branch')}) |",
                  "|---|---|---|"]
        for key, label in STORAGE_ROWS:
            cells = [("not measured" if not sums[m] else f"{sums[m][key]:,.0f}") for m in MODES]
            bold = key in ("headline", "headline_per")
            cells = [f"**{c}**" if bold and c[0].isdigit() else c for c in cells]
            lines.append(f"| {f'**{label}**' if bold else label} | {cells[0]} | {cells[1]} |")
        wsum, csum = sums[WAL], sums[COPY]
        if wsum and csum:
            less = 100 * (1 - wsum["headline_per"] / csum["headline_per"])
            saving.append((s.n, less))
            measured = (f"{count} branches of each mode" if len(sw) == len(sc) == count else
                        f"{len(sw)} WAL and {len(sc)} copy branches measured, compared per "
                        "branch")
            lines += ["", f"**WAL uses {less:.1f}% less storage than copy** at {s.n:,} "
                          f"documents ({measured}; WAL branch: collections + WAL entries, copy "
                          "branch: copied collections); "
                          f"{100 * (1 - wsum['all_per'] / csum['all_per']):.1f}% less when the "
                          "copy "
                          "branch's own WAL entries are counted too, "
                          f"{100 * (1 - wsum['ix_per'] / csum['ix_per']):.1f}% less counting "
                          "indexes on both sides as well."]
            if len(sc) < count:
                lines += ["", f"For {count} copy branches this run measured only {len(sc)}; "
                              f"{count} x the measured per-branch mean would be "
                              f"{count * csum['headline_per']:,.0f} B (computed, not "
                              "measured)."]
        lines.append("")
    if saving:
        said = ", ".join(f"**{v:.1f}% less** at {n:,} documents" for n, v in saving)
        lines += [f"The original plan promised WAL branches would use **87% less storage** "
                  f"than copies for 10 branches. Measured: {said} (per branch, 1% of the base "
                  "updated by each). "
                  + ("The promise holds at every size measured." if all(
                      v >= PROMISED_SAVING for _, v in saving) else
                     "The promise does not hold at every size measured.")
                  + " The saving depends on the share of the base each branch changes (1% "
                    "here): a WAL branch holds what it changed (live documents, hidden ids, "
                    "WAL entries with pre- and post-images), a copy branch the whole base.",
                  ""]

    # 3. latency
    labels = {"point": "find_one by random `_id`",
              "range": "indexed range find, 20 docs (`k` in [x, x+20))",
              "agg": f"aggregate `$match` on `k` ({AGG_SPAN} docs) + `$group` on `g`",
              "insert": "insert_one (new `_id`)",
              "update": "update_one by random even `_id`, `$inc`",
              "delete": "delete_one by odd `_id` (each at most once)"}
    for s in sizes:
        if s.latency is None:
            continue
        reads = writes = s.latency
        lines += [f"(3) Latency at {s.n:,} documents, ms, on branches `{WAL}-{s.n}-0` and "
                  f"`{COPY}-{s.n}-0` (each had updated 1% of the base) and, for reads, the main "
                  f"port; one sync pymongo client per target, {s.lat_rounds} rounds (of "
                  f"{args.lat_rounds} asked; rounds stop past {s.lat_allowance:.0f}s) x "
                  f"{args.lat_block} requests per op and target ({max(1, args.lat_block // 5)} "
                  "for the aggregation), each round running every op on every target, "
                  "target order rotated every round:", "",
                  "| op | main p50 | WAL p50 | WAL p90 | copy p50 | copy p90 | "
                  "**WAL/copy p50** |", "|---|---|---|---|---|---|---|"]
        for op in ("point", "range", "agg"):
            m, w, c = reads[("main", op)], reads[(WAL, op)], reads[(COPY, op)]
            lines.append(f"| {labels[op]} | {ms(pct(m, .5))} | {ms(pct(w, .5))} | "
                         f"{ms(pct(w, .9))} | {ms(pct(c, .5))} | {ms(pct(c, .9))} | "
                         f"**{pct(w, .5) / pct(c, .5):.2f}x** |")
        for op in ("insert", "update", "delete"):
            w, c = writes[(WAL, op)], writes[(COPY, op)]
            lines.append(f"| {labels[op]} | - | {ms(pct(w, .5))} | {ms(pct(w, .9))} | "
                         f"{ms(pct(c, .5))} | {ms(pct(c, .9))} | "
                         f"**{pct(w, .5) / pct(c, .5):.2f}x** |")
        if (BASELINE, "agg") in reads:
            lines += ["", f"Before/after in the same rounds: the same reads on `{BASELINE}-{s.n}`, "
                      "a WAL branch of the proxy run from the `--baseline` tree (its own "
                      "metadata, the same 1% update as `wal-<n>-0`: same ids, same values), "
                      "beside this tree's WAL branch and main:", "",
                      "| op | main p50 | baseline WAL p50 | WAL p50 | **baseline WAL/main** | "
                      "**WAL/main** |", "|---|---|---|---|---|---|"]
            for op in ("point", "range", "agg"):
                m, b, w = reads[("main", op)], reads[(BASELINE, op)], reads[(WAL, op)]
                lines.append(f"| {labels[op]} | {ms(pct(m, .5))} | {ms(pct(b, .5))} | "
                             f"{ms(pct(w, .5))} | **{pct(b, .5) / pct(m, .5):.2f}x** | "
                             f"**{pct(w, .5) / pct(m, .5):.2f}x** |")
        lines += ["", "A copy branch runs the aggregation on its copied collection itself. A WAL "
                      "branch runs it on the base collection. Its leading `$match` selects few "
                      "base documents here (at most 1,000): the proxy first reads their ids "
                      "(an indexed find) to exclude only the hidden ones among them with a "
                      "short `$nin`, then reads the branch's live documents the `$match` "
                      "selects with an indexed find on the overlay, and they enter the "
                      "pipeline as a literal (`$facet` holding the base side, `$concatArrays`, "
                      "`$unwind`). A `$unionWith` of the overlay would cost a scan of the whole "
                      "overlay on SecantusDB, which evaluates a `$unionWith` sub-pipeline "
                      "without indexes (352 ms for 200 of 20,000 documents, against 7 ms for "
                      "the same `$match` as a first stage); mongod answers it from the "
                      "overlay's index. What remains over main is the id read: SecantusDB "
                      "fetches every selected document for it, so it costs about what main's "
                      "whole aggregation costs.", ""]
    warnings = [f"{s.n:,}: {w}" for s in sizes for w in s.warnings]
    lines += ["Correctness checks during the run (each 1% update's modified count, a "
              "read-back of an updated document, the count command on the first branch of each "
              "mode, the same ids and group sizes from a range query and an aggregation on "
              "every latency target, matched/deleted counts of the latency writes): "
              + ("all passed." if not warnings else "**failures**: " + "; ".join(warnings))]
    lines += ["", f"Document size: {doc_bytes:.0f} BSON bytes on average (`_id`, `k` indexed, "
                  "`g`, `v`, `s`, `name`, `email`, `created`, `tags`, `score`, `city`, "
                  "`note`)."]
    return "\n".join(lines)


def write_results(text: str) -> None:
    replace_section(SECTION, text)


# -- main -----------------------------------------------------------------------------------
def teardown(stack: Stack, size: Size, clock: Clock) -> None:
    from pymongo import MongoClient

    t0 = time.monotonic()
    for rows in size.branches.values():
        for info in rows:
            stack.api("DELETE", f"/branches/{info['name']}")
    if size.baseline and stack.baseline_admin is not None:
        Stack(stack.upstream, "", stack.baseline_admin).api(
            "DELETE", f"/branches/{BASELINE}-{size.n}")
    with MongoClient(stack.upstream, directConnection=True) as c:
        c.drop_database(DB)
    clock.say(f"  deleted the {size.n:,}-doc branches and base in {time.monotonic() - t0:.0f}s")


def run_size(stack: Stack, size: Size, args: argparse.Namespace, clock: Clock,
             rates: Rates, previous: Size | None) -> None:
    from pymongo import MongoClient

    n = size.n
    guess = rates.seed_secs(n)
    if previous is not None and guess is not None and \
            clock.left() < 1.1 * guess + 30 + SLACK:
        size.skipped = (f"seeding {n:,} documents was projected at {guess:.0f}s (from this "
                        f"run's seeding rate, {rates.seed:,.0f} docs/s) and only "
                        f"{clock.left():.0f}s of the {args.budget:.0f}s budget were left")
        if rates.copy:
            size.skipped += (f"; one copy branch of {n:,} documents would take about "
                             f"{n / rates.copy:.0f}s at this run's copy rate "
                             f"({rates.copy:,.0f} docs/s) (projection, not a measurement)")
        clock.say(f"{n:,}: skipped: {size.skipped}")
        return
    if previous is not None:
        teardown(stack, previous, clock)
    clock.say(f"{n:,}: seeding ...")
    with MongoClient(stack.upstream, directConnection=True) as c:
        size.seed_secs = seed(c[DB][BASE], n, clock.say)
    rates.seed = n / size.seed_secs
    clock.say(f"{n:,}: creating {args.branches} WAL and {args.branches} copy branches ...")
    create_branches(stack, size, args.branches, clock, rates, args.latency_sizes,
                    args.latency_allowance, args.max_copied_docs)
    clock.say(f"{n:,}: 1% updates and storage ...")
    update_and_measure(stack, size, clock, rates)
    if n not in args.latency_sizes:
        size.latency_skip = "not asked for this size (--latency-sizes)"
    elif not size.branches[WAL] or not size.branches[COPY]:
        size.latency_skip = "no copy branch at this size"
    elif clock.left() - SLACK < (least := min(30.0, args.latency_allowance)):
        size.latency_skip = (f"{clock.left() - SLACK:.0f}s left of the budget at "
                             f"{clock.spent():.0f}s, under the {least:.0f}s minimum")
    else:
        size.lat_allowance = min(args.latency_allowance, clock.left() - SLACK)
        clock.say(f"{n:,}: latency (up to {size.lat_allowance:.0f}s) ...")
        t0 = time.monotonic()
        uris = {"main": stack.proxy_uri, WAL: size.branches[WAL][0]["uri"],
                COPY: size.branches[COPY][0]["uri"]}
        if stack.baseline_admin is not None:
            uris[BASELINE] = baseline_branch(stack, size, clock)
        measure_latency(uris, n, args, size, size.lat_allowance)
        clock.say(f"{n:,}: latency: {size.lat_rounds} rounds in "
                  f"{time.monotonic() - t0:.0f}s")
    if size.latency_skip:
        clock.say(f"{n:,}: latency skipped: {size.latency_skip}")


def baseline_branch(stack: Stack, size: Size, clock: Clock) -> str:
    """A WAL branch on the --baseline proxy holding the same 1% update as `wal-<n>-0`
    (same ids, same update), so the two trees answer the same reads over the same data."""
    from pymongo import MongoClient

    assert stack.baseline_admin is not None
    other = Stack(stack.upstream, "", stack.baseline_admin)
    name = f"{BASELINE}-{size.n}"
    status, body = other.api("POST", "/branches", {"name": name, "mode": WAL})
    if status != 201:
        raise SystemExit(f"baseline branch: HTTP {status} {body}")
    per = max(1, size.n // 100)
    ids = random.Random(0).sample(range(size.n), per)  # update_and_measure's wal branch 0
    t0 = time.monotonic()
    c: MongoClient[dict[str, Any]]
    with MongoClient(body["uri"]) as c:
        for start in range(0, per, 1000):
            c[DB][BASE].update_many({"_id": {"$in": ids[start:start + 1000]}},
                                    {"$inc": {"v": 1}, "$set": {"s": "b0"}})
    clock.say(f"{size.n:,}: baseline WAL branch updated {per:,} docs in "
              f"{time.monotonic() - t0:.0f}s")
    size.baseline = True
    return str(body["uri"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run; implies --no-write")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--sizes", default="10000,100000,1000000",
                    help="base sizes, run in this order")
    ap.add_argument("--latency-sizes", default="10000,100000",
                    help="sizes at which to measure latency, if the budget allows")
    ap.add_argument("--branches", type=int, default=10, help="branches per mode and size")
    ap.add_argument("--budget", type=float, default=720.0, help="seconds for the whole run")
    ap.add_argument("--upstream-cache", default="16G",
                    help="SecantusDB --cache-size: its in-memory storage lives in that cache")
    ap.add_argument("--max-copied-docs", type=int, default=4_000_000,
                    help="copy branches at one size hold at most this many documents in all "
                         "(the upstream keeps everything in memory)")
    ap.add_argument("--lat-rounds", type=int, default=20)
    ap.add_argument("--latency-allowance", type=float, default=120.0,
                    help="seconds for one size's latency phase: rounds stop past it")
    ap.add_argument("--lat-block", type=int, default=10)
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run the proxy from another source tree (a directory holding a "
                         "`proxy/` package, e.g. `git archive main` unpacked) with a WAL "
                         "branch holding wal-<n>-0's 1%% update; its reads join the latency "
                         "rounds as target 'wal-baseline': a before/after in one run")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.latency_sizes = "2000,20000", "2000,20000"
        args.branches, args.budget, args.lat_rounds, args.lat_block = 3, 150.0, 4, 4
        args.latency_allowance = 20.0
    args.latency_sizes = {int(x) for x in args.latency_sizes.split(",") if x}
    write = not (args.quick or args.no_write)
    load_start = os.getloadavg()[0]
    rev_start = machine()["rev"]  # the proxy runs the tree as it is now

    import bson

    logdir = Path(tempfile.mkdtemp(prefix="mongobranch-bench-modes-"))
    procs = Procs(logdir)
    clock = Clock(time.monotonic(), args.budget)
    rates = Rates()
    sizes = [Size(int(x)) for x in args.sizes.split(",")]
    try:
        stack = start_stack(procs, 2 * args.branches + 10, args.upstream_cache)
        if args.baseline:
            stack.baseline_admin = start_baseline(procs, args.baseline, stack.upstream)
        clock.say(f"logs in {logdir}")
        measured: Size | None = None  # the last size seeded, torn down before the next
        for size in sizes:
            run_size(stack, size, args, clock, rates, measured)
            if not size.skipped:
                measured = size
    finally:
        procs.stop_all()
    elapsed = clock.spent()
    load_end = os.getloadavg()[0]
    doc_bytes = statistics.mean(len(bson.encode(doc(i))) for i in range(0, 1_000_000, 997))

    info = machine()
    table = report(args, sizes, doc_bytes)
    command = ".venv/bin/python benchmarks/modes.py" + (
        "" if sys.argv[1:] == [] else " " + " ".join(sys.argv[1:]))
    body = "\n".join([
        SECTION, "",
        f"Measured {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; the whole "
        f"run took {elapsed:.0f}s ({elapsed / 60:.1f} min) against a budget of "
        f"{args.budget:.0f}s, seeding included.", "",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), {info['mem']} RAM, Linux "
        f"{info['kernel']}, shared and noisy (1-minute load average {load_start:.1f} at the "
        f"start, {load_end:.1f} at the end, other users' processes included), loopback only",
        f"- {info['python']}, pymongo {info['pymongo']}; proxy at {rev_start}"
        + ("" if info["rev"] == rev_start else
           f" when the run started ({info['rev']} when it ended)"),
        "- upstream: one SecantusDB (`secantusd-py --storage-path :memory: --cache-size "
        f"{args.upstream_cache}`) behind one proxy "
        "(`mongobranch serve --upstream ...`); base documents inserted directly on the "
        f"upstream with insert_many batches of {BATCH:,}. The sizes run one after another in "
        f"the same database `{DB}`: a copy branch copies every user database, so each size's "
        "branches are deleted and its base dropped before the next size is seeded",
        f"- budget: a copy branch, a size or a latency phase starts only if its time, "
        "projected from what this run had measured so far, fits in what is left of the "
        f"budget (`--budget {args.budget:.0f}`); nothing below is extrapolated unless it says "
        "so",
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
