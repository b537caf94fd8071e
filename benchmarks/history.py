"""History benchmarks (issue 4): branches at a past point, diff, merge and gc.

One run starts an in-memory SecantusDB and a proxy in front of it
(`mongobranch serve --upstream ...`), then measures:

(1) POST /branches {"name", "from", "at"} at points near the start, the middle and
    the end of a source branch's WAL history: latency (median of a few runs), documents
    the new branch had to restore, and whether its contents are the source's contents
    at that point; plain POST /branches for comparison. Two sources, one after the
    other: `src-small` (5 passes of update_many over 1,000 documents, 5,000 entries;
    deleted with its WAL once measured), then `src`, built through its port with
    update_many calls over ranges of a 20,000-document collection (5 passes = 100,000
    entries, or as many as fit in the build budget, default 210s; the report says how
    many). A point whose run is projected past the time left for its source is not run
    (the report says so and why);
(2) GET /branches/{name}/diff (streamed) of a 1,000-change and a 10,000-change
    branch: total time, time to first byte, and the proxy's resident memory
    (VmRSS sampled every 10 ms, and VmHWM after resetting it through
    /proc/<pid>/clear_refs) against its RSS before the request;
(3) POST /branches/{name}/merge {"strategy": "ours"} of the 10,000-change branch
    into main, dry run first (main changed 100 of those documents too: conflicts);
(4) POST /gc {"retention": "0s"}: WAL entries and bytes before and after, and the
    full contents of the branches' collections before and after, compared.

The script never asserts: it prints a table and rewrites the "## History (issue 4)"
section of benchmarks/RESULTS.md (re-reading the file just before writing, so other
sections are kept).

    .venv/bin/python benchmarks/history.py            # full run, ~10 minutes
    .venv/bin/python benchmarks/history.py --quick    # smoke run, no RESULTS.md update
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests/
from benchmarks.results import replace_section
from tests.servers import Procs, ProxyProcess, Secantus, free_range

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
SECTION = "## History (issue 4)"
DB = "bench"
HIST = "hist"  # the collection of `src`
SMALL = "hist_small"  # the collection of `src-small`
DM = "dm"  # the diff/merge branches' collection
META = "mongobranch_bench"
PAD = "x" * 100
SEED_BATCH = 5_000
HTTP_TIMEOUT = 3600.0
AT_NOTE = (
    "How `at` creation reads the source's WAL: `history.at._images_then` "
    "reads the WAL for the restored ids in chunks of 100, as `{$match: {b, ns, id: {$in: "
    "chunk}}}` then a second `$match` on the LSN range. SecantusDB answers the first stage "
    "from the `(b, ns, id, _id)` index but plans the combined filter as a COLLSCAN (mongod "
    "coalesces the two stages into one indexed plan), and evaluates `$in` by comparing with "
    "each element, so its cost grows with the square of the list (measured: 1,000 ids "
    "6.7 s, 100 ids 0.13 s on a 10,000-entry WAL); hence the two stages and the chunks. "
    "What remains is one pair of aggregations per 100 restored documents, each walking the "
    "index entries of its ids. The ids to restore come from `{b, ns, _id: {$gt: lsn}}` "
    "(indexed) with the `op` test in a second `$match` (`wal.matching`); with `op` in the "
    "same stage SecantusDB scanned the whole WAL, and the end point of `src` took 9.9 s "
    "instead of 1.8 s.")


# -- processes ------------------------------------------------------------------------------
@dataclass
class Stack:
    """The SecantusDB and the proxy in front of it."""

    upstream: str
    proxy_uri: str
    admin_port: int
    proxy_pid: int
    http: http.client.HTTPConnection | None = None

    def api(self, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
        for attempt in (0, 1):
            if self.http is None:
                self.http = http.client.HTTPConnection("127.0.0.1", self.admin_port,
                                                       timeout=HTTP_TIMEOUT)
            try:
                data = None if body is None else json.dumps(body)
                self.http.request(method, path, body=data,
                                  headers={"Content-Type": "application/json"})
                resp = self.http.getresponse()
                raw = resp.read()
                try:
                    return resp.status, json.loads(raw or b"null")
                except json.JSONDecodeError:
                    return resp.status, raw.decode(errors="replace")
            except (OSError, http.client.HTTPException):
                self.http.close()
                self.http = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        status, reply = self.api("POST", "/branches", body)
        if status != 201:
            raise RuntimeError(f"POST /branches {body}: {status} {reply}")
        return dict(reply)

    def delete(self, name: str) -> None:
        status, reply = self.api("DELETE", f"/branches/{name}")
        if status != 200:
            print(f"  WARNING: DELETE /branches/{name}: {status} {reply}", flush=True)


def start_stack(procs: Procs, nports: int) -> Stack:
    server = procs.add(Secantus(log=procs.log("secantus")).start())
    # Drops remove at once and main takes merges (ProxyProcess without lifecycle_defaults):
    # the engine is measured, not branch lifecycle (whose defaults keep dropped branches,
    # children of main included).
    proxy = procs.add(ProxyProcess(
        server.uri, meta_db=META, branch_ports=free_range(nports),
        data_dir=str(procs.logdir / "data"), log_level="WARNING",
        log=procs.log("proxy")).start())
    return Stack(server.uri, proxy.uri, proxy.admin_port, proxy.pid)


# -- memory of the proxy process ----------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def reset_hwm(pid: int) -> bool:
    """Resets the process's VmHWM to its current RSS (Linux >= 4.0, same user)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Memory:
    before_kb: int = 0
    peak_sampled_kb: int = 0
    hwm_kb: int | None = None  # None when clear_refs could not reset it
    samples: int = 0

    @property
    def peak_kb(self) -> int:
        return max(self.peak_sampled_kb, self.hwm_kb or 0)

    @property
    def growth_kb(self) -> int:
        return self.peak_kb - self.before_kb


@contextlib.contextmanager
def watch_memory(pid: int, interval: float = 0.01) -> Iterator[Memory]:
    mem = Memory()
    hwm_ok = reset_hwm(pid)
    mem.before_kb = proc_status(pid)["VmRSS"]
    mem.peak_sampled_kb = mem.before_kb
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                mem.peak_sampled_kb = max(mem.peak_sampled_kb, proc_status(pid)["VmRSS"])
                mem.samples += 1
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield mem
    finally:
        stop.set()
        thread.join()
        if hwm_ok:
            mem.hwm_kb = proc_status(pid)["VmHWM"]


# -- data -----------------------------------------------------------------------------------
def doc(i: int, v: int = 0) -> dict[str, Any]:
    return {"_id": i, "k": i, "v": v, "pad": PAD}


def seed(coll: Any, n: int) -> None:
    for start in range(0, n, SEED_BATCH):
        coll.insert_many([doc(i) for i in range(start, min(n, start + SEED_BATCH))],
                         ordered=False)


def contents(uri: str, coll: str) -> list[dict[str, Any]]:
    """Every document of a collection as the port at uri shows it, in _id order."""
    from pymongo import MongoClient

    with MongoClient(uri) as c:
        return sorted(c[DB][coll].find(), key=lambda d: d["_id"])


def ndiff(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> int:
    """Documents present on one side only or different on both, by _id."""
    left, right = {repr(d["_id"]): d for d in a}, {repr(d["_id"]): d for d in b}
    return sum(left.get(k) != right.get(k) for k in set(left) | set(right))


def bid_of(direct: Any, name: str) -> str:
    meta = direct[META]["branches"].find_one({"_id": name})
    if meta is None:
        raise RuntimeError(f"no metadata for branch {name}")
    return str(meta["bid"])


def wal_count(direct: Any, bid: str | None = None) -> int:
    return int(direct[META]["wal"].count_documents({} if bid is None else {"b": bid}))


def last_lsn(direct: Any, bid: str) -> int:
    entry = direct[META]["wal"].find_one({"b": bid}, {"_id": 1}, sort=[("_id", -1)])
    return 0 if entry is None else int(entry["_id"])


def update_ranges(uri: str, coll: str, lo: int, hi: int, chunk: int) -> None:
    """`$inc v` on every document in [lo, hi), one update_many per `chunk` ids."""
    from pymongo import MongoClient

    with MongoClient(uri) as c:
        for start in range(lo, hi, chunk):
            c[DB][coll].update_many({"_id": {"$gte": start, "$lt": min(hi, start + chunk)}},
                                    {"$inc": {"v": 1}})


# -- (1) history and branches at a point ----------------------------------------------------
@dataclass
class History:
    source: str  # the source branch
    coll: str
    n: int
    chunk: int
    passes_wanted: int
    budget: float
    entries: int = 0
    wal_entries: int = 0  # counted on the upstream afterwards
    seconds: float = 0.0
    calls: int = 0
    stopped_by_budget: bool = False
    # after each update_many: (calls done, source's newest LSN, entries so far)
    marks: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def per_pass(self) -> int:
        return -(-self.n // self.chunk)

    def expected(self, done: int) -> dict[int, int]:
        """v of every document after `done` update_many calls."""
        full, part = divmod(done, self.per_pass)
        return {i: full + (1 if i // self.chunk < part else 0) for i in range(self.n)}

    def changed_after(self, done: int) -> int:
        """Documents the source changed after `done` calls: what a branch there restores."""
        if self.calls - done >= self.per_pass:
            return self.n
        slots = {k % self.per_pass for k in range(done, self.calls)}
        return sum(min(self.n, (s + 1) * self.chunk) - s * self.chunk for s in slots)


def build_history(uri: str, direct: Any, bid: str, hist: History,
                  say: Callable[[str], None]) -> None:
    from pymongo import MongoClient

    began = time.monotonic()
    with MongoClient(uri) as c:
        coll = c[DB][hist.coll]
        for p in range(hist.passes_wanted):
            for k in range(hist.per_pass):
                lo = k * hist.chunk
                res = coll.update_many({"_id": {"$gte": lo, "$lt": lo + hist.chunk}},
                                       {"$inc": {"v": 1}})
                hist.calls += 1
                hist.entries += res.modified_count
                hist.marks.append((hist.calls, last_lsn(direct, bid), hist.entries))
                spent = time.monotonic() - began
                if hist.calls % 10 == 0:
                    say(f"  {hist.entries:,} entries in {spent:.0f}s "
                        f"({hist.entries / spent:.0f}/s), pass {p + 1}")
                if spent > hist.budget:
                    hist.stopped_by_budget = True
                    break
            if hist.stopped_by_budget:
                break
    hist.seconds = time.monotonic() - began
    hist.wal_entries = wal_count(direct, bid)


@dataclass
class AtPoint:
    label: str
    calls: int  # update_many calls done at the point
    lsn: int
    entries_after: int
    restored_expected: int
    restored_wal: list[int] = field(default_factory=list)  # the new branch's own WAL entries
    create: list[float] = field(default_factory=list)
    drop: list[float] = field(default_factory=list)
    check: str = "not checked"
    skipped: str = ""


def points_of(hist: History) -> list[AtPoint]:
    """Points near the start, the middle and the end of a history, cheapest first."""
    out = []
    for label, frac in (("end", 1.0), ("middle", 0.5), ("start", 0.05)):
        if label == "end":  # the last call but one: the very end restores nothing
            calls, lsn, entries = hist.marks[max(0, len(hist.marks) - 2)]
        else:
            calls, lsn, entries = min(hist.marks, key=lambda m: abs(m[2] - frac * hist.entries))
        out.append(AtPoint(label, calls, lsn, hist.entries - entries,
                           hist.changed_after(calls)))
    return out


def check_contents(uri: str, hist: History, calls: int) -> str:
    got = contents(uri, hist.coll)
    want = hist.expected(calls)
    wrong = [d["_id"] for d in got if d != doc(d["_id"], want.get(d["_id"], -1))]
    missing = len(want) - len({d["_id"] for d in got} & set(want))
    if not wrong and not missing and len(got) == len(want):
        return "identical"
    return (f"DIFFERENT: {len(got)} docs, {len(wrong)} wrong, {missing} missing "
            f"(e.g. _id {wrong[:3]})")


def measure_points(stack: Stack, direct: Any, hist: History, runs: int, point_budget: float,
                   series_budget: float, say: Callable[[str], None]) -> list[AtPoint]:
    """POST /branches {name, from, at} at each point, up to `runs` times while the point's
    runs took less than point_budget; a point whose first run is projected (by proportion
    to the documents it restores, from the points measured before) past what is left of
    series_budget is not run: one request cannot be cut short."""
    perf = time.perf_counter
    points = points_of(hist)
    began = time.monotonic()
    for pt in points:
        done = [p for p in points if p.create]
        if done:
            ref = max(done, key=lambda p: p.restored_expected)
            projected = med(ref.create) * pt.restored_expected / max(1, ref.restored_expected)
            left = series_budget - (time.monotonic() - began)
            if projected > left:
                pt.skipped = (f"not run: projected {projected:.0f}s ({projected / 60:.0f} min) "
                              f"from the {ref.label} point, {max(0.0, left):.0f}s of the "
                              f"{series_budget:.0f}s budget left")
                say(f"  at {pt.label}: {pt.skipped}")
                continue
        for run in range(runs):
            if run and sum(pt.create) + sum(pt.drop) > point_budget:
                break
            name = f"at-{hist.source}-{pt.label}-{run}"
            t0 = perf()
            stack.create({"name": name, "from": hist.source, "at": pt.lsn})
            pt.create.append(perf() - t0)
            pt.restored_wal.append(wal_count(direct, bid_of(direct, name)))
            if pt.check == "not checked":
                info = stack.api("GET", f"/branches/{name}")[1]
                pt.check = check_contents(f"mongodb://127.0.0.1:{info['port']}/", hist,
                                          pt.calls)
            t0 = perf()
            stack.delete(name)
            pt.drop.append(perf() - t0)
            say(f"  at {pt.label} (LSN {pt.lsn}): {pt.create[-1]:.2f}s, restored "
                f"{pt.restored_wal[-1]:,} docs, drop {pt.drop[-1]:.2f}s; {pt.check}")
    return points


def measure_plain(stack: Stack, source: str, runs: int) -> list[float]:
    for j in range(2):  # warm-up
        stack.create({"name": f"warm{j}", "from": source})
        stack.delete(f"warm{j}")
    out = []
    for j in range(runs):
        name = f"plain-{source}-{j}"
        t0 = time.perf_counter()
        stack.create({"name": name, "from": source})
        out.append(time.perf_counter() - t0)
        stack.delete(name)
    return out


# -- (2) diff -------------------------------------------------------------------------------
@dataclass
class DiffRun:
    seconds: float
    first_byte: float
    nbytes: int
    changes: int
    summary: Any
    memory: Memory


def stream_diff(stack: Stack, name: str) -> DiffRun:
    conn = http.client.HTTPConnection("127.0.0.1", stack.admin_port, timeout=HTTP_TIMEOUT)
    try:
        with watch_memory(stack.proxy_pid) as mem:
            t0 = time.perf_counter()
            conn.request("GET", f"/branches/{name}/diff")
            resp = conn.getresponse()
            first = resp.read1(65536)
            t_first = time.perf_counter() - t0
            parts = [first]
            while chunk := resp.read1(65536):
                parts.append(chunk)
            seconds = time.perf_counter() - t0
    finally:
        conn.close()
    body = b"".join(parts)
    if resp.status != 200:
        raise RuntimeError(f"diff {name}: {resp.status} {body[:300]!r}")
    parsed = json.loads(body)
    return DiffRun(seconds, t_first, len(body), len(parsed["changes"]), parsed["summary"], mem)


# -- (3) merge ------------------------------------------------------------------------------
@dataclass
class MergeRun:
    label: str
    seconds: float
    status: int
    reply: Any
    memory: Memory

    @property
    def applied(self) -> int:
        return sum(self.reply.get("applied", {}).values()) if isinstance(self.reply, dict) else 0


def run_merge(stack: Stack, name: str, body: dict[str, Any], label: str) -> MergeRun:
    with watch_memory(stack.proxy_pid) as mem:
        t0 = time.perf_counter()
        status, reply = stack.api("POST", f"/branches/{name}/merge", body)
        seconds = time.perf_counter() - t0
    return MergeRun(label, seconds, status, reply, mem)


# -- (4) gc ---------------------------------------------------------------------------------
def wal_bytes(direct: Any) -> tuple[int, int]:
    """Entries and total BSON bytes of the WAL, read back raw."""
    from bson.codec_options import CodecOptions
    from bson.raw_bson import RawBSONDocument

    wal = direct[META].get_collection(
        "wal", codec_options=CodecOptions(document_class=RawBSONDocument))
    n = size = 0
    for entry in wal.find():
        n += 1
        size += len(entry.raw)
    return n, size


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


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mib(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def spread(values: list[float], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0] * scale)
    return (fmt.format(med(values) * scale) + " (" + fmt.format(min(values) * scale) + "-"
            + fmt.format(max(values) * scale) + ")")


def describe(hist: History) -> str:
    full, part = divmod(hist.calls, hist.per_pass)
    shape = f"{full} full pass{'es' if full != 1 else ''}" + (
        f" + {part}/{hist.per_pass} of a pass" if part else "")
    wanted = hist.passes_wanted * hist.n
    return (f"`{hist.source}`: **{hist.wal_entries:,} WAL entries**, written through its port "
            f"by {hist.calls:,} `update_many({{_id: {{$gte: x, $lt: x+{hist.chunk}}}}}, "
            f"{{$inc: {{v: 1}}}})` calls over a {hist.n:,}-document collection ({shape}) in "
            f"**{hist.seconds:.0f}s** ({hist.entries / max(hist.seconds, 1e-9):.0f} entries/s)"
            + (f"; **stopped at {hist.entries:,}, not {wanted:,}: the build budget is "
               f"{hist.budget:.0f}s**" if hist.stopped_by_budget else ""))


def point_rows(hist: History, points: list[AtPoint], plain: list[float]) -> list[str]:
    rows = [f"| `{hist.source}` ({hist.wal_entries:,} entries) | plain "
            f"`{{name, from: {hist.source}}}` | - | - | {len(plain)} | "
            f"{spread(plain, 1e3, '{:.1f}')} ms | - | - |"]
    for pt in points:
        if pt.skipped:
            rows.append(f"| | at {pt.label}: LSN {pt.lsn:,} (after call {pt.calls:,} of "
                        f"{hist.calls:,}) | {pt.entries_after:,} | ({pt.restored_expected:,}) "
                        f"| 0 | {pt.skipped} | - | - |")
            continue
        restored = sorted(set(pt.restored_wal))
        rows.append(
            f"| | at {pt.label}: LSN {pt.lsn:,} (after call {pt.calls:,} of {hist.calls:,}) | "
            f"{pt.entries_after:,} | {', '.join(f'{x:,}' for x in restored)} "
            f"({pt.restored_expected:,}) | {len(pt.create)} | **{spread(pt.create)}** s | "
            f"{spread(pt.drop)} | {pt.check} |")
    return rows


def report(r: dict[str, Any]) -> str:
    lines: list[str] = []
    big: History = r["hist"]
    small: History = r["small_hist"]
    lines += [
        f"(1) Two source branches, one after the other on the same stack: {describe(big)}; "
        f"and, measured first and deleted (with its WAL) before `{big.source}` was built, "
        f"{describe(small)}.", "",
        "Branch creation, POST /branches: median (min-max) of the runs; `at` points are the "
        "source's newest LSN after a given update_many call; restored = entries the new "
        "branch wrote to its own WAL (one per document given back its image from then), in "
        "brackets the documents the source changed after the point; content = the new "
        "branch's collection read in full through its port vs the state computed for that "
        "point; drop = DELETE of the new branch (not part of the latency):", "",
        "| source | creation | WAL entries of the source after the point | restored "
        "(expected) | runs | latency | drop, s | content |",
        "|---|---|---|---|---|---|---|---|"]
    lines += point_rows(big, r["points"], r["plain"])
    lines += point_rows(small, r["small_points"], r["small_plain"])
    rates = [f"{pt.label} of `{h.source}` {pt.restored_expected / med(pt.create):.0f}"
             for h, pts in ((big, r["points"]), (small, r["small_points"])) for pt in pts
             if pt.create and pt.restored_expected]
    if rates:
        lines += ["", "Documents restored per second of `at` creation: " + ", ".join(rates)
                  + "."]
    lines += ["", r["at_note"]]

    lines += ["", f"(2) Diff, GET /branches/{{name}}/diff read to the end as it streams; "
                  f"branches of main that updated ranges of a {r['dm_n']:,}-document "
                  f"collection (`$inc`); the {r['dm_n']:,}-change one was built in "
                  f"{r['d10k_build']:.0f}s. "
                  "Proxy memory: VmRSS before the request, peak = max of VmRSS sampled every "
                  "10 ms and VmHWM after resetting it (clear_refs) just before:", "",
              "| diff | changes | runs | total, s | first byte, ms | changes/s | body, MiB | "
              "RSS before, MiB | peak RSS, MiB | growth, MiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for label, runs in r["diffs"]:
        if not runs:
            continue
        secs = [x.seconds for x in runs]
        worst = max(runs, key=lambda x: x.memory.growth_kb)
        lines.append(
            f"| {label} | {runs[0].changes:,} | {len(runs)} | **{spread(secs)}** | "
            f"{spread([x.first_byte for x in runs], 1e3, '{:.0f}')} | "
            f"{runs[0].changes / med(secs):.0f} | {runs[0].nbytes / 2**20:.1f} | "
            f"{mib(worst.memory.before_kb)} | {mib(worst.memory.peak_kb)} | "
            f"**{mib(worst.memory.growth_kb)}** |")

    lines += ["", f"(3) Merge of the {r['merge_changes']:,}-change branch into main, "
                  "POST /branches/{name}/merge; main updated "
                  f"{r['conflicts_made']:,} of those documents after the branch did "
                  "(conflicts); after the merge main's collection was compared in full with "
                  f"the branch's: **{r['merge_check']}**:", "",
              "| merge | HTTP | s | applied (insert/update/delete) | conflicts reported | "
              "docs/s | RSS before / peak, MiB |", "|---|---|---|---|---|---|---|"]
    for m in r["merges"]:
        reply = m.reply if isinstance(m.reply, dict) else {}
        ap = reply.get("applied", {})
        lines.append(
            f"| {m.label} | {m.status} | **{m.seconds:.1f}** | "
            f"{m.applied:,} ({ap.get('insert', 0)}/{ap.get('update', 0)}/{ap.get('delete', 0)})"
            f" | {len(reply.get('conflicts', []))} | **{m.applied / m.seconds:.0f}** | "
            f"{mib(m.memory.before_kb)} / {mib(m.memory.peak_kb)} |")

    g = r["gc"]
    lines += ["", "(4) gc, POST /gc {\"retention\": \"0s\"}, on the whole WAL (`src` plus the "
                  "diff/merge branches), figures from the gc reply (bytes = sum of "
                  "`$bsonSize`), WAL entries of `src` counted on the upstream:", "",
              "| | WAL entries | WAL bytes | entries of `src` |", "|---|---|---|---|",
              f"| before | {g['before']['entries']:,} | {g['before']['bytes']:,} | "
              f"{g['src_before']:,} |",
              f"| after | {g['after']['entries']:,} | {g['after']['bytes']:,} | "
              f"{g['src_after']:,} |",
              f"| after / before | {g['after']['entries'] / max(1, g['before']['entries']):.1%} "
              f"| {g['after']['bytes'] / max(1, g['before']['bytes']):.1%} | "
              f"{g['src_after'] / max(1, g['src_before']):.1%} |",
              "", f"gc took **{g['seconds']:.1f}s** (HTTP {g['status']}; folded "
                  f"{g.get('folded', '?')} entries, compressed {g.get('compressed', '?')} "
                  f"images, horizon LSN {g.get('horizon_lsn', '?')}); proxy RSS "
                  f"{mib(g['memory'].before_kb)} -> peak {mib(g['memory'].peak_kb)} MiB. "
                  "Full contents before vs after gc: " + "; ".join(g["checks"]) + "."]
    return "\n".join(lines)


def write_results(text: str) -> None:
    replace_section(SECTION, text)


# -- issue 16: each operation beside its raw baseline ----------------------------------------
BULK_SECTION = "## History in bulk (issue 16)"


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_bulk(args: argparse.Namespace) -> int:
    """Diff, merge, branch at a point and gc of `--bulk` changes, each beside the same
    work done straight on the upstream in the same run (issue 16's ratios)."""
    from pymongo import MongoClient, ReplaceOne

    n = args.bulk
    logdir = Path(tempfile.mkdtemp(prefix="mongobranch-bench-history-bulk-"))
    procs = Procs(logdir)
    began = time.monotonic()
    rows: list[tuple[str, float, str, float, str]] = []
    notes: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        stack = start_stack(procs, 10)
        say(f"logs in {logdir}")
        direct: MongoClient[dict[str, Any]] = MongoClient(stack.upstream, directConnection=True)
        parts = set(args.bulk_parts.split(","))
        seed(direct[DB][DM], n)
        seed(direct[DB][HIST], n)
        # The metadata database: the capture of main's changes leaves it alone.
        scratch = direct[META]
        # The diff/merge branch: one update of each of n documents (n WAL entries).
        dmb = stack.create({"name": "dm-b"})
        if parts & {"diff", "merge", "gc"}:
            update_ranges(dmb["uri"], DM, 0, n, 500)
        dm_bid = bid_of(direct, "dm-b")
        # The `at` source: two passes; the point is after the first, so n documents
        # are given back their image from then.
        src = stack.create({"name": "src-b"})
        src_bid = bid_of(direct, "src-b")
        update_ranges(src["uri"], HIST, 0, n, 500)
        point = last_lsn(direct, src_bid)
        update_ranges(src["uri"], HIST, 0, n, 500)
        say(f"built: dm-b {wal_count(direct, dm_bid):,} entries, src-b "
            f"{wal_count(direct, src_bid):,} entries, point LSN {point}")

        # diff vs a plain cursor over the same WAL entries
        if "diff" in parts:
            raw_s, raw_n = _timed(lambda: sum(1 for _ in direct[META]["wal"].find(
                {"b": dm_bid}).sort("_id", 1).batch_size(1000)))
            d = stream_diff(stack, "dm-b")
            say(f"diff: {d.changes:,} changes {d.seconds:.2f}s; plain cursor {raw_n:,} "
                f"entries {raw_s:.2f}s")
            rows.append((f"diff of {d.changes:,} changes", d.seconds,
                         f"plain cursor read of its {raw_n:,} WAL entries", raw_s, "<= 2x"))

        # merge vs a direct bulk write of the same documents
        if "merge" in parts:
            branch_docs = contents(dmb["uri"], DM)
            seed(scratch["raw_dm"], n)

            def bulk_write() -> None:
                for i in range(0, len(branch_docs), 1000):
                    scratch["raw_dm"].bulk_write(
                        [ReplaceOne({"_id": x["_id"]}, x, upsert=True)
                         for x in branch_docs[i:i + 1000]], ordered=False)
            raw_s, _ = _timed(bulk_write)
            m = run_merge(stack, "dm-b", {"strategy": "ours"}, "`ours`")
            check = "identical" if contents(stack.proxy_uri, DM) == branch_docs \
                else "DIFFERENT"
            # Main's log holds the merge's writes (the capture preserved them for main's
            # children) before the next operation is timed.
            capture_s, _ = _timed(lambda: stack.api("GET", "/branches/main/log?limit=1"))
            notes.append(f"After the merge the capture needed {capture_s:.2f}s more to log "
                         "its writes in main's WAL (not part of either figure).")
            say(f"merge: HTTP {m.status} {m.seconds:.2f}s applied {m.applied:,} ({check}); "
                f"direct bulk write {raw_s:.2f}s")
            rows.append((f"merge of {m.applied:,} changes into main (main after: {check})",
                         m.seconds, f"bulk_write of the same {len(branch_docs):,} documents "
                         "(replace by _id, 1,000 per call)", raw_s, "<= 3x"))

        # branch at a point vs the upstream inserting the documents restored
        if "at" in parts:
            then = [doc(i, 1) for i in range(n)]

            def insert() -> None:
                for i in range(0, n, 1000):
                    scratch["raw_restored"].insert_many(then[i:i + 1000], ordered=False)
            raw_s, _ = _timed(insert)
            at_s, _ = _timed(lambda: stack.create({"name": "at-b", "from": "src-b",
                                                   "at": point}))
            restored = wal_count(direct, bid_of(direct, "at-b"))
            at_view = contents(stack.api("GET", "/branches/at-b")[1]["uri"], HIST)
            check = "identical" if at_view == then else \
                f"DIFFERENT ({ndiff(at_view, then)} differ)"
            say(f"at: {restored:,} restored in {at_s:.2f}s ({check}); insert_many "
                f"{raw_s:.2f}s")
            rows.append((f"branch of src-b at a point, {restored:,} documents restored "
                         f"(contents: {check})", at_s,
                         f"insert_many of the same {n:,} documents (1,000 per call)", raw_s,
                         "docs/s >= 50% of the upstream's"))

        # gc vs reading every entry and writing it back
        if "gc" in parts:
            entries = wal_count(direct)

            def rewrite() -> None:
                batch: list[dict[str, Any]] = []
                for entry in direct[META]["wal"].find().batch_size(1000):
                    batch.append(entry)
                    if len(batch) == 1000:
                        scratch["raw_wal"].insert_many(batch, ordered=False)
                        batch = []
                if batch:
                    scratch["raw_wal"].insert_many(batch, ordered=False)
            raw_s, _ = _timed(rewrite)
            views = {"dm-b": (dmb["uri"], DM), "src-b": (src["uri"], HIST)}
            before = {k: contents(uri, coll) for k, (uri, coll) in views.items()}
            gc_s, (status, reply) = _timed(lambda: stack.api("POST", "/gc",
                                                             {"retention": "0s"}))
            same = all(contents(uri, coll) == before[k] for k, (uri, coll) in views.items())
            say(f"gc: HTTP {status} {gc_s:.2f}s of {entries:,} entries "
                f"({str(reply)[:200]}); read+rewrite {raw_s:.2f}s; views "
                f"{'identical' if same else 'DIFFERENT'}")
            rows.append((f"gc of {entries:,} entries (views after: "
                         f"{'identical' if same else 'DIFFERENT'})", gc_s,
                         f"read of the same {entries:,} entries and insert_many of them "
                         "(1,000 per call)", raw_s, "<= 3x"))
        direct.close()
    finally:
        procs.stop_all()
    elapsed = time.monotonic() - began
    info = machine()
    command = ".venv/bin/python benchmarks/history.py " + " ".join(sys.argv[1:])
    lines = [
        BULK_SECTION, "",
        f"Measured {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} in one run of "
        f"{elapsed:.0f}s; {info['nproc']} CPUs, shared; proxy at {info['rev']}; one in-memory "
        f"SecantusDB; documents {len(doc(1)['pad']) + 38} B. Reproduce: `{command}`.", "",
        "| operation | s | raw baseline, same run | s | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for label, op_s, raw_label, raw_s, target in rows:
        lines.append(f"| {label} | {op_s:.2f} | {raw_label} | {raw_s:.2f} | "
                     f"**{op_s / raw_s:.2f}x** | {target} |")
    lines.extend(["", *notes])
    body = "\n".join(lines)
    print()
    print(body)
    return 0


# -- main -----------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run; implies --no-write")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--docs", type=int, default=20_000, help="documents of `src`")
    ap.add_argument("--passes", type=int, default=5, help="update passes over them")
    ap.add_argument("--chunk", type=int, default=500, help="documents per update_many")
    ap.add_argument("--build-budget", type=float, default=210.0,
                    help="seconds allowed for building the history of `src`")
    ap.add_argument("--small-docs", type=int, default=1_000,
                    help="documents of `src-small` (5 passes, 250 per update_many)")
    ap.add_argument("--at-runs", type=int, default=3, help="runs per point in history")
    ap.add_argument("--point-budget", type=float, default=40.0,
                    help="no further runs at a point once its runs took this many seconds")
    ap.add_argument("--series-budget", type=float, default=150.0,
                    help="seconds for the `at` points of one source; a point projected past "
                         "what is left is not run")
    ap.add_argument("--plain-runs", type=int, default=9)
    ap.add_argument("--big-diff", type=int, default=10_000, help="changes of the big diff")
    ap.add_argument("--small-diff", type=int, default=1_000, help="changes of the small diff")
    ap.add_argument("--diff-runs", type=int, default=2)
    ap.add_argument("--conflicts", type=int, default=100,
                    help="documents main changes after the merged branch did")
    ap.add_argument("--bulk", type=int, default=0,
                    help="only issue 16's run: diff, merge, branch at a point and gc of this "
                         "many changes, each beside its raw baseline (prints, never writes)")
    ap.add_argument("--bulk-parts", default="diff,merge,at,gc",
                    help="with --bulk: which of diff,merge,at,gc to run (comma-separated)")
    args = ap.parse_args()
    if args.bulk:
        return run_bulk(args)
    if args.quick:
        args.docs, args.passes, args.chunk, args.build_budget = 2_000, 3, 250, 20.0
        args.small_docs, args.at_runs, args.plain_runs = 500, 2, 4
        args.point_budget, args.series_budget = 10.0, 30.0
        args.big_diff, args.small_diff, args.diff_runs, args.conflicts = 1_000, 100, 1, 10
    write = not (args.quick or args.no_write)
    load_start = os.getloadavg()[0]

    import bson
    from pymongo import MongoClient

    def say(text: str) -> None:
        print(text, flush=True)

    logdir = Path(tempfile.mkdtemp(prefix="mongobranch-bench-history-"))
    procs = Procs(logdir)
    began = time.monotonic()
    r: dict[str, Any] = {"dm_n": args.big_diff}
    # timeout(1) and friends: stop the server and the proxy too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        stack = start_stack(procs, 40)
        say(f"logs in {logdir}")
        direct: MongoClient[dict[str, Any]] = MongoClient(stack.upstream, directConnection=True)
        say("seeding ...")
        seed(direct[DB][HIST], args.docs)
        seed(direct[DB][DM], args.big_diff)

        seed(direct[DB][SMALL], args.small_docs)

        say(f"(1a) history of src-small: 5 passes over {args.small_docs:,} docs ...")
        stack.create({"name": "src-small"})
        small_hist = History("src-small", SMALL, args.small_docs, 250, 5, args.build_budget)
        build_history(stack.api("GET", "/branches/src-small")[1]["uri"], direct,
                      bid_of(direct, "src-small"), small_hist, say)
        say(f"  built {small_hist.wal_entries:,} entries in {small_hist.seconds:.0f}s")
        r["small_hist"] = small_hist
        r["small_points"] = measure_points(stack, direct, small_hist, args.at_runs,
                                           args.point_budget, args.series_budget, say)
        r["small_plain"] = measure_plain(stack, "src-small", args.plain_runs)
        stack.delete("src-small")  # its entries leave the WAL with it

        say(f"(1b) history of src: {args.passes} passes over {args.docs:,} docs, "
            f"budget {args.build_budget:.0f}s ...")
        src = stack.create({"name": "src"})
        src_bid = bid_of(direct, "src")
        hist = History("src", HIST, args.docs, args.chunk, args.passes, args.build_budget)
        build_history(src["uri"], direct, src_bid, hist, say)
        r["hist"] = hist
        say(f"  built {hist.wal_entries:,} entries ({hist.entries:,} counted by the client) "
            f"in {hist.seconds:.0f}s")
        r["plain"] = measure_plain(stack, "src", args.plain_runs)
        r["points"] = measure_points(stack, direct, hist, args.at_runs, args.point_budget,
                                     args.series_budget, say)
        r["at_note"] = AT_NOTE

        say(f"(2) building the diff branches ({args.small_diff:,} and {args.big_diff:,} "
            "changes) ...")
        small = stack.create({"name": "d-small"})
        update_ranges(small["uri"], DM, 0, args.small_diff, args.chunk)
        big = stack.create({"name": "d-big"})
        t0 = time.monotonic()
        update_ranges(big["uri"], DM, 0, args.big_diff, args.chunk)
        r["d10k_build"] = time.monotonic() - t0
        say(f"  big diff branch built in {r['d10k_build']:.0f}s")
        # main changes some of the documents the big branch changed: merge conflicts
        with MongoClient(stack.proxy_uri) as main_port:
            main_port[DB][DM].update_many({"_id": {"$lt": args.conflicts}},
                                          {"$set": {"main": 1}})
        r["conflicts_made"] = args.conflicts
        diffs: list[tuple[str, list[DiffRun]]] = [(f"{args.small_diff:,} changes", []),
                                                  (f"{args.big_diff:,} changes", [])]
        for run in range(args.diff_runs):
            for (_label, runs), name in zip(diffs, ("d-small", "d-big"), strict=True):
                if run and name == "d-big" and runs and runs[0].seconds > 90:
                    continue  # one run of a slow diff is all the budget allows
                runs.append(stream_diff(stack, name))
                x = runs[-1]
                say(f"  diff {name}: {x.changes:,} changes in {x.seconds:.2f}s, first byte "
                    f"{x.first_byte * 1e3:.0f} ms, RSS {mib(x.memory.before_kb)} -> peak "
                    f"{mib(x.memory.peak_kb)} MiB ({x.memory.samples} samples)")
        r["diffs"] = diffs

        say("(3) merge ...")
        r["merge_changes"] = args.big_diff
        merges = [run_merge(stack, "d-big", {"strategy": "ours", "dry_run": True},
                            "dry run, `ours`"),
                  run_merge(stack, "d-big", {"strategy": "ours"}, "`ours`")]
        for m in merges:
            reply = m.reply if isinstance(m.reply, dict) else {}
            say(f"  {m.label}: HTTP {m.status} in {m.seconds:.1f}s, applied "
                f"{reply.get('applied')}, conflicts {len(reply.get('conflicts', []))}"
                + ("" if m.status == 200 else f": {str(m.reply)[:300]}"))
        r["merges"] = merges
        main_view, branch_view = contents(stack.proxy_uri, DM), contents(big["uri"], DM)
        r["merge_check"] = ("identical" if main_view == branch_view else
                            f"DIFFERENT ({ndiff(main_view, branch_view)} of {len(branch_view)} "
                            "documents differ)")
        say(f"  main vs branch after merge: {r['merge_check']}")

        say("(4) gc ...")
        views = {"src": (src["uri"], HIST), "d-small": (small["uri"], DM),
                 "d-big": (big["uri"], DM)}
        before = {k: contents(uri, coll) for k, (uri, coll) in views.items()}
        src_before = wal_count(direct, src_bid)
        raw_before = wal_bytes(direct)
        with watch_memory(stack.proxy_pid) as mem:
            t0 = time.perf_counter()
            status, reply = stack.api("POST", "/gc", {"retention": "0s"})
            seconds = time.perf_counter() - t0
        say(f"  gc: HTTP {status} in {seconds:.1f}s: {str(reply)[:300]}")
        raw_after = wal_bytes(direct)
        after = {k: contents(uri, coll) for k, (uri, coll) in views.items()}
        checks = []
        for k in views:
            same = before[k] == after[k]
            checks.append(f"`{k}` (its view of `{views[k][1]}`, {len(before[k]):,} docs) "
                          + ("**identical**" if same else
                             f"**DIFFERENT**: {len(after[k]):,} docs after, "
                             f"{ndiff(before[k], after[k])} differ"))
        gc_out = dict(reply) if isinstance(reply, dict) else {}
        gc_out.setdefault("before", {"entries": raw_before[0], "bytes": raw_before[1]})
        gc_out.setdefault("after", {"entries": raw_after[0], "bytes": raw_after[1]})
        r["gc"] = {**gc_out, "status": status, "seconds": seconds, "memory": mem,
                   "src_before": src_before, "src_after": wal_count(direct, src_bid),
                   "checks": checks, "raw_before": raw_before, "raw_after": raw_after}
        say("  " + "; ".join(checks))
        direct.close()
    finally:
        procs.stop_all()
    elapsed = time.monotonic() - began
    load_end = os.getloadavg()[0]
    with contextlib.suppress(OSError):
        log = (logdir / "proxy.log").read_text(errors="replace")
        errors = [line for line in log.splitlines() if "Traceback" in line or " ERROR " in line]
        if errors:
            say(f"WARNING: {len(errors)} error lines in {logdir / 'proxy.log'}, e.g. {errors[0]}")

    info = machine()
    table = report(r)
    command = ".venv/bin/python benchmarks/history.py" + (
        "" if sys.argv[1:] == [] else " " + " ".join(sys.argv[1:]))
    body = "\n".join([
        SECTION, "",
        f"Measured {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; the whole "
        f"run took {elapsed:.0f}s ({elapsed / 60:.1f} min), building included.", "",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), {info['mem']} RAM, Linux "
        f"{info['kernel']}, shared and noisy (1-minute load average {load_start:.1f} at the "
        f"start, {load_end:.1f} at the end, other users' processes included), loopback only",
        f"- {info['python']}, pymongo {info['pymongo']}; proxy at {info['rev']}",
        "- upstream: one SecantusDB (`secantusd-py --storage-path :memory:`) and the proxy "
        "in front of it (`mongobranch serve --upstream ...`); documents "
        f"{len(bson.encode(doc(1)))} B of BSON "
        "(`{_id, k, v, pad: 100 x 'x'}`), seeded directly on the upstream; every timed "
        "request is one HTTP call to the admin API",
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
