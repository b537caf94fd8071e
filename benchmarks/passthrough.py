"""Passthrough overhead of the main port: direct vs socat vs mongobranch.

One run starts its own in-memory SecantusDB, a `socat` byte relay in front of
it (the floor any TCP relay pays: one extra hop, no parsing) and the proxy as
`mongobranch serve --upstream ...`, then measures, with the three targets
interleaved in short blocks over many rounds so that the noise of a shared
machine falls on all of them alike:

* round-trip latency p50/p99 of `ping` and of a point `find` by `_id`
  (sync pymongo, one connection, one request at a time);
* throughput of point finds with 1, 8 and 64 concurrent clients. The load
  comes from separate worker processes (spawned, one per core at most), each
  running pymongo's AsyncMongoClient on uvloop with concurrency/workers
  tasks, so the client's own Python cost is spread over the cores instead of
  serialising on one GIL. All targets see the same clients. pymongo costs about
  as much CPU per find as SecantusDB itself, so the x64 level is repeated with
  a raw-wire client (pre-encoded OP_MSG finds on plain asyncio sockets, replies
  not decoded) whose CPU cost is a small fraction, to show the relay's effect
  when the clients do not compete with it for the 2 cores.

Direct and socat are addressed with directConnection=true; the proxy is
addressed like a mongos, without it, and (latency only, target `proxy-dc`,
unless --no-proxy-dc) once more with directConnection=true, which separates
the driver's own cost of a mongos topology from the proxy's. The script never asserts: it prints a
table and rewrites the "## Passthrough (issue 2)" section of
benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/passthrough.py            # full run, ~2.5 minutes
    .venv/bin/python benchmarks/passthrough.py --quick    # smoke run, no RESULTS.md update
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests/
from benchmarks.results import replace_section
from tests.servers import (
    Procs,
    ProxyProcess,
    Secantus,
    executable,
    free_port,
    tree_exe,
    wait_port,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
SECTION = "## Passthrough (issue 2)"
DB, COLL, NDOCS = "bench", "points", 1000
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes ------------------------------------------------------------------------------
def _task_cpu(pid: int) -> float:
    """CPU seconds of every thread of a process, in ns precision where the kernel allows."""
    total = 0.0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
            continue
        except (OSError, ValueError, IndexError):
            pass
        try:  # no schedstat: clock ticks from stat
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, ValueError, IndexError):
            pass
    return total


def cpu_seconds(pid: int, with_children: bool = False) -> float:
    """CPU time of a process and, for socat (one fork per connection), its live children."""
    pids = [pid]
    if with_children:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                kids = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                pids.extend(int(k) for k in kids)
    return sum(_task_cpu(p) for p in pids)


# -- targets --------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    uri: str
    port: int
    pid: int | None = None  # the relay process whose CPU is charged to this target
    children: bool = False


# -- latency --------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_latency(targets: list[Target], rounds: int, block: int) -> dict[Any, Any]:
    from pymongo import MongoClient

    clients: dict[str, MongoClient[dict[str, Any]]] = {
        t.name: MongoClient(t.uri, maxPoolSize=1) for t in targets}
    samples: dict[tuple[str, str], list[float]] = {}
    block_medians: dict[tuple[str, str], list[float]] = {}
    relay_cpu: dict[tuple[str, str], float] = {}
    rnd = random.Random(1)
    try:
        ops = {}
        for t in targets:
            admin, coll = clients[t.name].admin, clients[t.name][DB][COLL]
            ops[(t.name, "ping")] = lambda a=admin: a.command("ping")
            ops[(t.name, "find")] = lambda c=coll: c.find_one({"_id": rnd.randrange(NDOCS)})
            for _ in range(200):  # warm up the connection, the server's caches, the proxy
                ops[(t.name, "ping")]()
                ops[(t.name, "find")]()
        perf = time.perf_counter
        for r in range(rounds):
            order = targets[r % len(targets):] + targets[: r % len(targets)]
            for op in ("ping", "find"):
                for t in order:
                    fn = ops[(t.name, op)]
                    got = []
                    cpu0 = cpu_seconds(t.pid, t.children) if t.pid else 0.0
                    for _ in range(block):
                        start = perf()
                        fn()
                        got.append(perf() - start)
                    if t.pid:
                        relay_cpu[(t.name, op)] = (relay_cpu.get((t.name, op), 0.0)
                                                   + cpu_seconds(t.pid, t.children) - cpu0)
                    samples.setdefault((t.name, op), []).extend(got)
                    block_medians.setdefault((t.name, op), []).append(statistics.median(got))
    finally:
        for c in clients.values():
            c.close()
    out: dict[Any, Any] = {}
    for (name, op), values in samples.items():
        out[(name, op, "p50")] = pct(values, 0.50) * 1e6
        out[(name, op, "p99")] = pct(values, 0.99) * 1e6
        out[(name, op, "n")] = len(values)
    for (name, op), meds in block_medians.items():
        out[(name, op, "blocks")] = meds
    for (name, op), seconds in relay_cpu.items():
        out[(name, op, "relay_cpu")] = seconds / len(samples[(name, op)]) * 1e6
    return out


# -- throughput -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Level:
    clients: int
    raw: bool = False

    @property
    def label(self) -> str:
        return f"x{self.clients}" + (" raw" if self.raw else "")


def _find_messages() -> list[bytes]:
    """Pre-encoded OP_MSG point finds, one per _id, for the raw-wire client."""
    import bson

    out = []
    for i in range(NDOCS):
        body = bson.encode({"find": COLL, "filter": {"_id": i}, "limit": 1, "singleBatch": True,
                            "$db": DB})
        payload = b"\x00\x00\x00\x00\x00" + body
        out.append(struct.pack("<iiii", 16 + len(payload), i + 1, 0, 2013) + payload)
    return out


def _worker(conn: Connection, targets: list[tuple[str, int]], tasks: int, raw: bool) -> None:
    try:
        import uvloop

        uvloop.run(_worker_main(conn, targets, tasks, raw))
    except ImportError:
        asyncio.run(_worker_main(conn, targets, tasks, raw))


async def _worker_main(conn: Connection, targets: list[tuple[str, int]], tasks: int,
                       raw: bool) -> None:
    """Runs `tasks` concurrent point-find loops against the target it is told, when told."""
    rnd = random.Random(os.getpid())
    closers: list[Any] = []
    ops: list[list[Callable[[], Awaitable[Any]]]] = []
    if raw:
        import bson

        msgs = _find_messages()
        for _, port in targets:
            mine: list[Callable[[], Awaitable[Any]]] = []
            for _ in range(tasks):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                closers.append(writer.close)

                async def raw_op(reader: asyncio.StreamReader = reader,
                                 writer: asyncio.StreamWriter = writer) -> bytes:
                    writer.write(msgs[rnd.randrange(NDOCS)])
                    head = await reader.readexactly(16)
                    return await reader.readexactly(int.from_bytes(head[:4], "little") - 16)

                mine.append(raw_op)
            reply = bson.decode((await raw_op())[5:])
            if reply.get("ok") != 1 or len(reply["cursor"]["firstBatch"]) != 1:
                raise RuntimeError(f"raw find got {reply!r}")
            ops.append(mine)
    else:
        from pymongo import AsyncMongoClient

        for uri, _ in targets:
            client: Any = AsyncMongoClient(uri, maxPoolSize=tasks)
            closers.append(client.close)
            coll = client[DB][COLL]

            async def op(coll: Any = coll) -> Any:
                return await coll.find_one({"_id": rnd.randrange(NDOCS)})

            ops.append([op] * tasks)
    for mine in ops:  # open every connection and warm everything up before timing
        for _ in range(5):
            await asyncio.gather(*(op() for op in mine))
    conn.send("ready")
    loop = asyncio.get_running_loop()
    while True:
        msg = await loop.run_in_executor(None, conn.recv)
        if msg is None:
            break
        index, start, t0, t1 = msg
        done = 0
        cpu: list[float] = []

        async def run(op: Callable[[], Awaitable[Any]], t0: float = t0, t1: float = t1) -> None:
            nonlocal done
            mono = time.monotonic
            while mono() < t1:
                await op()
                if t0 <= mono() <= t1:
                    done += 1

        async def cpu_marks(cpu: list[float] = cpu, t0: float = t0, t1: float = t1) -> None:
            await asyncio.sleep(max(0.0, t0 - time.monotonic()))
            cpu.append(time.process_time())
            await asyncio.sleep(max(0.0, t1 - time.monotonic()))
            cpu.append(time.process_time())

        await asyncio.sleep(max(0.0, start - time.monotonic()))
        await asyncio.gather(cpu_marks(), *(run(op) for op in ops[index]))
        conn.send((done, cpu[1] - cpu[0]))
    for close in closers:
        result = close()
        if asyncio.iscoroutine(result):
            await result


def measure_throughput(targets: list[Target], server_pid: int, levels: list[Level], rounds: int,
                       window: float, workers_max: int) -> dict[Any, Any]:
    ctx = mp.get_context("spawn")
    out: dict[Any, Any] = {}
    for level in levels:
        nworkers = min(level.clients, workers_max)
        tasks = level.clients // nworkers
        pipes, procs = [], []
        for _ in range(nworkers):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker, daemon=True, args=(
                theirs, [(t.uri, t.port) for t in targets], tasks, level.raw))
            proc.start()
            pipes.append(mine)
            procs.append(proc)
        try:
            for p in pipes:
                p.recv()
            for r in range(rounds):
                order = list(range(len(targets)))
                order = order[r % len(order):] + order[: r % len(order)]
                for index in order:
                    t = targets[index]
                    start = time.monotonic() + 0.05
                    t0 = start + min(0.15, window / 4)  # ramp-up, not counted
                    t1 = t0 + window
                    for p in pipes:
                        p.send((index, start, t0, t1))
                    time.sleep(max(0.0, t0 - time.monotonic()))
                    c0 = (cpu_seconds(server_pid),
                          cpu_seconds(t.pid, t.children) if t.pid else 0.0)
                    time.sleep(max(0.0, t1 - time.monotonic()))
                    c1 = (cpu_seconds(server_pid),
                          cpu_seconds(t.pid, t.children) if t.pid else 0.0)
                    results = [p.recv() for p in pipes]
                    ops = sum(r[0] for r in results)
                    key = (t.name, level)
                    out.setdefault((*key, "ops"), []).append(ops / window)
                    out.setdefault((*key, "ops_total"), []).append(ops)
                    out.setdefault((*key, "cpu_server"), []).append(c1[0] - c0[0])
                    out.setdefault((*key, "cpu_relay"), []).append(c1[1] - c0[1])
                    out.setdefault((*key, "cpu_client"), []).append(sum(r[1] for r in results))
        finally:
            for p in pipes:
                with contextlib.suppress(OSError):
                    p.send(None)
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
    return out


# -- report ---------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop

        loop = f"yes (uvloop {uvloop.__version__})"
    except ImportError:
        loop = "no (asyncio default loop)"
    import pymongo

    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "uvloop": loop,
        "pymongo": pymongo.version,
        "kernel": platform.release(),
    }


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "n/a" if v is None else format(v, spec)


def report(lat: dict[Any, Any], thr: dict[Any, Any], names: list[str], levels: list[Level],
           window: float, thr_names: list[str] | None = None) -> str:
    thr_names = names if thr_names is None else thr_names
    lines = ["Round-trip latency, µs (one request at a time):", "",
             "| target | ping p50 | ping p99 | find p50 | find p99 |", "|---|---|---|---|---|"]
    for n in names:
        lines.append("| " + " | ".join(
            [n] + [f"{lat[(n, op, q)]:.0f}" for op in ("ping", "find") for q in ("p50", "p99")])
            + " |")
    lines += ["", "Point-find throughput, ops/s: mean over rounds (min-max); xN = N concurrent "
              "clients (connections), \"raw\" = the raw-wire client:", "",
              "| target | " + " | ".join(lv.label for lv in levels) + " |",
              "|---|" + "---|" * len(levels)]
    for n in thr_names if levels else []:
        row = [n]
        for lv in levels:
            spread = thr[(n, lv, "ops")]
            row.append(f"{sum(thr[(n, lv, 'ops_total')]) / (window * len(spread)):.0f} "
                       f"({min(spread):.0f}-{max(spread):.0f})")
        lines.append("| " + " | ".join(row) + " |")

    def added(n: str, op: str) -> float:
        return float(lat[(n, op, "p50")] - lat[("direct", op, "p50")])

    def paired(n: str, op: str) -> float:
        diffs = [a - b for a, b in zip(lat[(n, op, "blocks")], lat[("direct", op, "blocks")],
                                       strict=True)]
        return statistics.median(diffs) * 1e6

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b > 0 else "n/a (socat-added <= 0)"

    has_socat = "socat" in names
    proxies = [n for n in names if n not in ("direct", "socat")]
    lines += ["", "| figure | ping | find | target |", "|---|---|---|---|"]
    if has_socat:
        lines.append("| socat-added p50 µs (socat p50 - direct p50) | "
                     f"{added('socat', 'ping'):.0f} | {added('socat', 'find'):.0f} | |")
    for n in proxies:
        lines.append(f"| {n}-added p50 µs ({n} p50 - direct p50) | "
                     f"{added(n, 'ping'):.0f} | {added(n, 'find'):.0f} | |")
    for n in proxies if has_socat else []:
        b = "**" if n == "proxy" else ""
        cells = [ratio(added(n, op), added("socat", op)) for op in ("ping", "find")]
        lines.append(f"| {b}{n}-added / socat-added{b} | {b}{cells[0]}{b} | {b}{cells[1]}{b} "
                     + ("| <= 1.5 |" if n in ("proxy", "baseline") else "| |"))
        cells = [f"{paired(n, op):.0f} / {paired('socat', op):.0f} = "
                 + ratio(paired(n, op), paired("socat", op)) for op in ("ping", "find")]
        lines.append(f"| same from per-round paired block medians ({n}), µs | "
                     f"{cells[0]} | {cells[1]} | |")
    for n in names[1:]:
        if (n, "ping", "relay_cpu") in lat:
            lines.append(f"| {n}: relay CPU µs per request (latency runs) | "
                         f"{lat[(n, 'ping', 'relay_cpu')]:.1f} | "
                         f"{lat[(n, 'find', 'relay_cpu')]:.1f} | |")

    def share(n: str, lv: Level) -> float:
        return 100.0 * sum(thr[(n, lv, "ops_total")]) / sum(thr[("direct", lv, "ops_total")])

    def paired_share(n: str, lv: Level) -> float:
        """Median over rounds of target/direct, each from windows run back to back."""
        return 100.0 * statistics.median(
            a / d for a, d in zip(thr[(n, lv, "ops")], thr[("direct", lv, "ops")], strict=True)
            if d > 0)

    if not levels:
        return "\n".join(lines)
    lines += ["", "| figure | " + " | ".join(lv.label for lv in levels) + " | target |",
              "|---|" + "---|" * (len(levels) + 1)]
    for n in thr_names[1:]:
        b = "**" if n == "proxy" else ""
        lines.append(f"| {b}{n} throughput, % of direct{b} (median of per-round ratios) | "
                     + " | ".join(f"{b}{share(n, lv):.1f}%{b} ({paired_share(n, lv):.0f}%)"
                                  for lv in levels)
                     + (" | >= 85% at x64 |" if n in ("proxy", "baseline") else " | |"))
    for n in thr_names:
        cells = []
        for lv in levels:
            ops = sum(thr[(n, lv, "ops_total")]) or 1
            server, relay, client = (sum(thr[(n, lv, f"cpu_{k}")]) / ops * 1e6
                                     for k in ("server", "relay", "client"))
            cells.append(f"{server:.0f} / {relay:.0f} / {client:.0f}" if n != "direct"
                         else f"{server:.0f} / - / {client:.0f}")
        lines.append(f"| {n}: CPU µs per find, server / relay / clients | "
                     + " | ".join(cells) + " | |")
    return "\n".join(lines)


def write_results(text: str) -> None:
    replace_section(SECTION, text)


# -- main -----------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run; implies --no-write")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--lat-rounds", type=int, default=200)
    ap.add_argument("--lat-block", type=int, default=20)
    ap.add_argument("--thr-rounds", type=int, default=10)
    ap.add_argument("--window", type=float, default=0.75, help="seconds per throughput block")
    ap.add_argument("--levels", default="1,8,64",
                    help="concurrent pymongo clients per throughput level")
    ap.add_argument("--raw-levels", default="64",
                    help="levels also run with the raw-wire client ('' for none)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                    help="max client worker processes")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run the proxy from another source tree (a directory holding a "
                         "`proxy/` package, e.g. a `git worktree` of an older commit) as target "
                         "'baseline', interleaved with the others: a before/after in one run")
    ap.add_argument("--no-proxy-dc", action="store_true",
                    help="skip the latency target 'proxy-dc': the same proxy process addressed "
                         "with directConnection=true, as direct and socat are (the difference "
                         "to 'proxy' is the driver's own cost of talking to a mongos)")
    ap.add_argument("--python-floor", action="store_true",
                    help="also measure the minimal Python relays of benchmarks/pyrelay.py "
                         "(targets py-protocol and py-streams)")
    ap.add_argument("--profile", metavar="FILE",
                    help="record the proxy with py-spy (raw collapsed stacks) into FILE; "
                         "implies --no-write")
    args = ap.parse_args()
    if args.quick:
        args.lat_rounds, args.lat_block, args.thr_rounds, args.window = 30, 10, 2, 0.5
    write = not (args.quick or args.no_write or args.profile)
    levels = [Level(int(x)) for x in args.levels.split(",") if x]
    levels += [Level(int(x), raw=True) for x in args.raw_levels.split(",") if x]

    from pymongo import MongoClient

    logdir = Path(tempfile.mkdtemp(prefix="mongobranch-bench-"))
    procs = Procs(logdir)
    began = time.monotonic()
    profiler: subprocess.Popen[bytes] | None = None
    try:
        server = procs.add(Secantus(log=procs.log("secantus")).start())
        up_port = server.port
        upstream = f"mongodb://127.0.0.1:{up_port}/"
        targets = [Target("direct", upstream + "?directConnection=true", up_port)]

        socat_exe = shutil.which("socat")
        if socat_exe:
            s_port = free_port()
            socat = procs.spawn("socat", [socat_exe, f"TCP-LISTEN:{s_port},fork,reuseaddr",
                                          f"TCP:127.0.0.1:{up_port}"])
            wait_port(s_port, proc=socat)
            targets.append(Target("socat", f"mongodb://127.0.0.1:{s_port}/?directConnection=true",
                                   s_port, socat.pid, children=True))
        else:
            print("socat not found on PATH (apt-get install -y socat): the socat rows are "
                  "skipped", file=sys.stderr)

        if args.python_floor:
            for mode in ("protocol", "streams"):
                r_port = free_port()
                relay = procs.spawn(f"py-{mode}", [sys.executable, str(HERE / "pyrelay.py"), mode,
                                                   str(up_port), str(r_port)])
                wait_port(r_port, proc=relay)
                targets.append(Target(f"py-{mode}",
                                      f"mongodb://127.0.0.1:{r_port}/?directConnection=true",
                                      r_port, relay.pid))

        b_port = free_port()
        proxy = procs.add(ProxyProcess(
            upstream, meta_db="mongobranch_bench", branch_ports=(b_port, b_port),
            data_dir=str(logdir / "data"), log_level="WARNING", lifecycle_defaults=True,
            log=procs.log("proxy")).start())
        p_port = proxy.port
        targets.append(Target("proxy", f"mongodb://127.0.0.1:{p_port}/", p_port, proxy.pid))
        if not args.no_proxy_dc:
            targets.append(Target("proxy-dc",
                                  f"mongodb://127.0.0.1:{p_port}/?directConnection=true",
                                  p_port, proxy.pid))
        if args.baseline:
            qb_port = free_port()
            baseline = procs.add(ProxyProcess(
                upstream, exe=tree_exe(args.baseline),
                meta_db="mongobranch_bench_b", branch_ports=(qb_port, qb_port),
                data_dir=str(logdir / "data-b"), log_level="WARNING", lifecycle_defaults=True,
                log=procs.log("baseline")).start(wait_healthy=False))
            q_port = baseline.port
            targets.append(Target("baseline", f"mongodb://127.0.0.1:{q_port}/", q_port,
                                  baseline.pid))
        names = [t.name for t in targets]
        thr_targets = [t for t in targets if t.name != "proxy-dc"]
        thr_names = [t.name for t in thr_targets]

        seed: Any
        with MongoClient(targets[0].uri) as seed:
            seed[DB][COLL].drop()
            seed[DB][COLL].insert_many([{"_id": i, "n": i, "pad": "x" * 200}
                                        for i in range(NDOCS)])

        if args.profile:
            spy = executable("py-spy")
            if spy:
                profiler = subprocess.Popen(
                    [spy, "record", "--pid", str(proxy.pid), "--format", "raw", "--rate", "250",
                     "--nonblocking", "--output", args.profile],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            else:
                print("py-spy not found: pip install py-spy", file=sys.stderr)

        info = machine()
        print(f"targets: {', '.join(names)}; server pid {server.pid}, proxy pid {proxy.pid}")
        print(f"latency: {args.lat_rounds} rounds x {args.lat_block} requests per target "
              "and op, targets rotated every round ...", flush=True)
        lat = measure_latency(targets, args.lat_rounds, args.lat_block)
        print(f"throughput: {', '.join(lv.label for lv in levels)}, {args.thr_rounds} rounds "
              f"x {args.window}s per target, rotated ...", flush=True)
        thr = measure_throughput(thr_targets, server.pid, levels, args.thr_rounds, args.window,
                                 args.workers)
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(30)
        procs.stop_all()
    elapsed = time.monotonic() - began

    table = report(lat, thr, names, levels, args.window, thr_names)
    command = ".venv/bin/python benchmarks/passthrough.py" + (
        "" if sys.argv[1:] == [] else " " + " ".join(sys.argv[1:]))
    client_desc = (
        f"latency: one sync pymongo client per target, one request at a time, "
        f"{args.lat_rounds} rounds x {args.lat_block} requests per target and op "
        f"({lat[('direct', 'ping', 'n')]} samples each), targets rotated every round. "
        f"Throughput: up to {args.workers} spawned worker processes, each running pymongo "
        f"AsyncMongoClient on uvloop with concurrency/workers tasks doing `find_one` by random "
        f"`_id` over {NDOCS} documents; {args.thr_rounds} rounds x {args.window}s windows per "
        f"target, rotated. The pymongo client costs about as much CPU per find as the server, "
        f"so on 2 cores the clients compete with the proxy for CPU; the \"raw\" level repeats "
        "x64 with a minimal client (pre-encoded OP_MSG finds written on plain asyncio "
        "sockets, one per concurrent client, replies read by length and not decoded) that "
        "leaves the CPU to the server and the relay."
        + ("" if args.no_proxy_dc else
           " `proxy-dc` (latency only) is the same proxy process addressed with "
           "directConnection=true, as direct and socat are: the difference to `proxy` is "
           "the driver's own work for a mongos topology, on the client's CPU."))
    body = "\n".join([
        SECTION, "",
        f"Measured {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} in "
        f"{elapsed:.0f}s.", "",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}, "
        "shared and noisy, loopback only",
        f"- {info['python']}, uvloop: {info['uvloop']}, pymongo {info['pymongo']}",
        "- upstream: SecantusDB (`secantusd-py --storage-path :memory:`); socat relay: "
        "`socat TCP-LISTEN:P,fork,reuseaddr TCP:127.0.0.1:UPSTREAM`"
        + ("" if "socat" in names else " (**socat not installed: rows skipped**)"),
        f"- clients: {client_desc}",
        f"- reproduce: `{command}` (or `make bench`)", "",
        table, "",
        "CPU per find is process CPU time (utime+stime from /proc) during the throughput "
        "windows divided by the finds completed; \"relay\" is socat (all its forks) or the "
        "proxy. Every process shares the same 2 cores, so relay CPU is taken from the server "
        "and the clients. \"Relay CPU µs per request (latency runs)\" is the same measure "
        "over the one-at-a-time latency blocks: what one forwarded request costs the relay, "
        "syscalls included.", "",
    ])
    print()
    print(body)
    if write:
        write_results(body)
        print(f"updated {RESULTS.relative_to(HERE.parent)}")
    if args.profile:
        print(f"py-spy raw profile of the proxy: {args.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
