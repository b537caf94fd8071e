"""Scale-out takeover (issue 17): how long after a SIGKILL of the engine lease's holder
another `mongobranch serve` process serves the branches.

One in-memory SecantusDB and three `serve --lease L` processes on 127.0.0.1-3 (same
ports, as on three machines). Each round: a client with retryable writes, connected to a
process that does not hold the lease, writes once; the holder is killed; then measured
from the kill: (lease) another process holds the lease, per the metadata database;
(read) a new client's first successful read on the branch through a survivor; (write)
that first client's next insert_one returns (its driver retries once the branch is
served). The killed process is restarted (it rejoins as a follower) before the next
round. At the end every acknowledged write must be on the branch. The script prints a
table and rewrites the "## Scale-out (issue 17)" section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/scaleout.py --rounds 5 --lease 2
    .venv/bin/python benchmarks/scaleout.py --quick    # 1 round, no RESULTS.md update
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests/
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from benchmarks.results import replace_section
from tests.servers import Procs, ProxyProcess, Secantus, free_port, free_range

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
SECTION = "## Scale-out (issue 17)"
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
META, DB = "mongobranch_scale", "bench"


def holder(meta: Any, procs: list[ProxyProcess]) -> ProxyProcess | None:
    doc = meta["leases"].find_one({"_id": "engine"})
    if doc is None:
        return None
    pid = int(doc["owner"].split(":")[-2])
    return next((p for p in procs if p.proc is not None and p.proc.poll() is None
                 and p.pid == pid), None)


def until(probe: Any, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError("condition not met")


def read_ok(uri: str) -> bool:
    with MongoClient(uri, serverSelectionTimeoutMS=1000, connectTimeoutMS=1000) as c:
        try:
            c[DB].t.find_one()
            return True
        except PyMongoError:
            return False


def timed_insert(client: MongoClient[dict[str, Any]], doc: dict[str, Any], since: float,
                 out: list[float]) -> None:
    client[DB].t.insert_one(doc)
    out.append(time.monotonic() - since)


def point_reads(direct: str, relayed: str, port: int, n: int = 2000
                ) -> tuple[list[float], list[float]]:
    """Latencies (ms) of find_one by _id on one port, straight to the holder and through
    a follower's relay, interleaved in blocks of 100 so the machine's noise falls alike."""
    clients = [MongoClient(f"mongodb://{h}:{port}/", serverSelectionTimeoutMS=30000)
               for h in (direct, relayed)]
    out: list[list[float]] = [[], []]
    try:
        for c in clients:
            c[DB].p.replace_one({"_id": 1}, {"_id": 1, "v": "x" * 100}, upsert=True)
        for _ in range(n // 100):
            for c, xs in zip(clients, out, strict=True):
                for _ in range(100):
                    t = time.perf_counter()
                    c[DB].p.find_one({"_id": 1})
                    xs.append((time.perf_counter() - t) * 1000)
    finally:
        for c in clients:
            c.close()
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lease", type=float, nargs="+", default=[2.0, 5.0])
    ap.add_argument("--quick", action="store_true", help="1 round, no RESULTS.md update")
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds
    runs = {lease: run(lease, rounds) for lease in args.lease}
    report(args, rounds, runs)


def run(lease: float, rounds: int) -> tuple[dict[str, list[float]], int, int]:
    """Figures of `rounds` takeovers with this lease; acknowledged and present writes."""
    procs = Procs(Path(tempfile.mkdtemp(prefix="mb-scaleout-")))
    try:
        up = procs.add(Secantus(log=procs.log("secantus")).start())
        meta = MongoClient(up.uri)[META]
        port, ports = free_port(), free_range(5)
        nodes = [ProxyProcess(up.uri, meta_db=META, port=port, branch_ports=ports, host=h,
                              log=procs.log(f"serve-{i}"), extra=["--lease", str(lease)])
                 for i, h in enumerate(HOSTS)]
        for node in nodes:
            procs.add(node.start())
            until(lambda: holder(meta, nodes))
        status, made = nodes[0].api("POST", "/branches", {"name": "scale"})
        assert status == 201, made
        bport = made["port"]  # type: ignore[index]
        figures: dict[str, list[float]] = {"lease": [], "read": [], "write": []}
        holding = until(lambda: holder(meta, nodes))
        follower = next(n for n in nodes if n is not holding)
        for key, p in (("main", port), ("branch", bport)):
            direct, relayed = point_reads(holding.host, follower.host, p)
            figures[f"{key} direct"] = direct
            figures[f"{key} relayed"] = relayed
        acked = 0
        for r in range(rounds):
            old = until(lambda: holder(meta, nodes))
            others = [n for n in nodes if n is not old]
            client: MongoClient[dict[str, Any]] = MongoClient(
                f"mongodb://{others[0].host}:{bport}/", retryWrites=True,
                serverSelectionTimeoutMS=120000)
            client[DB].t.insert_one({"round": r, "at": "before"})
            acked += 1
            old.kill()
            killed = time.monotonic()
            wrote: list[float] = []
            writer = threading.Thread(target=timed_insert, args=(
                client, {"round": r, "at": "after"}, killed, wrote))
            writer.start()
            new = until(lambda: holder(meta, nodes))
            figures["lease"].append(time.monotonic() - killed)
            survivor = f"mongodb://{others[1].host}:{bport}/"
            until(functools.partial(read_ok, survivor))
            figures["read"].append(time.monotonic() - killed)
            writer.join()
            assert wrote, "the insert issued after the kill failed"
            acked += 1
            figures["write"].append(wrote[0])
            client.close()
            print(f"round {r + 1}: lease {figures['lease'][-1]:.2f}s, read "
                  f"{figures['read'][-1]:.2f}s, write {figures['write'][-1]:.2f}s "
                  f"(holder {HOSTS[nodes.index(old)]} -> {HOSTS[nodes.index(new)]})",
                  flush=True)
            assert old.proc is not None
            procs.children.remove(old.proc)
            old.proc = None
            old.start()  # rejoins as a follower
            procs.add(old)
        with MongoClient(f"mongodb://{nodes[0].host}:{bport}/",
                         serverSelectionTimeoutMS=60000) as c:
            present = c[DB].t.count_documents({})
        print(f"lease {lease:g}s: acknowledged writes {acked}, on the branch {present}")
        assert present == acked
    finally:
        procs.stop_all()
    return figures, acked, present


def report(args: argparse.Namespace, rounds: int,
           runs: dict[float, tuple[dict[str, list[float]], int, int]]) -> None:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    leases = " ".join(f"{lease:g}" for lease in runs)
    cmd = f".venv/bin/python benchmarks/scaleout.py --rounds {rounds} --lease {leases}"
    lines = [SECTION, "",
             f"Measured {now} on {platform.node()} ({os.cpu_count()} cores, shared), Python "
             f"{platform.python_version()}; `{cmd}`.", "",
             "Three `serve --lease` processes on 127.0.0.1-3 over one SecantusDB; each "
             "round SIGKILLs the engine lease's holder and measures from the kill: "
             "*lease*, until another process holds the lease (per the metadata database); "
             "*read*, until a new client's first read on the branch through a survivor "
             "succeeds; *write*, until an insert_one issued right after the kill by a "
             "client (retryWrites) already connected through a survivor returns. The "
             "killed process is restarted as a follower before the next round. "
             "`.venv/bin/pytest tests/test_scaleout.py -q -s` prints the same *read* figure "
             "for one kill with --lease 2.", "",
             "| --lease s | from the SIGKILL to | median s | min s | max s |",
             "|---|---|---|---|---|"]
    names = {"lease": "another process holds the lease", "read": "first read through a survivor",
             "write": "the retried insert_one returns"}
    for lease, (figures, _acked, _present) in runs.items():
        for key, label in names.items():
            xs = figures[key]
            lines.append(f"| {lease:g} | {label} | {statistics.median(xs):.2f} | "
                         f"{min(xs):.2f} | {max(xs):.2f} |")
    lines += ["", "Relay cost (the first run's processes, before the kills): find_one by _id, "
              "2,000 per target interleaved, one client, straight to the holder vs through a "
              "follower that relays the connection to it.", "",
              "| port | to the holder p50 ms | through a follower p50 ms | p99 ms (holder / "
              "follower) |", "|---|---|---|---|"]
    first = next(iter(runs.values()))[0]
    for key in ("main", "branch"):
        d, r = sorted(first[f"{key} direct"]), sorted(first[f"{key} relayed"])
        lines.append(f"| {key} | {d[len(d) // 2]:.3f} | {r[len(r) // 2]:.3f} | "
                     f"{d[int(len(d) * 0.99)]:.3f} / {r[int(len(r) * 0.99)]:.3f} |")
    kept = "; ".join(f"--lease {lease:g}: {acked} acknowledged, {present} on the branch"
                     for lease, (_f, acked, present) in runs.items())
    lines += ["", f"Acknowledged writes vs writes on the branch after the last round: "
              f"{kept}. The takeover is bounded by the lease: the holder's last renewal plus "
              "the lease, plus up to a third of it until a follower's next round, plus the "
              "new holder's engine start.", ""]
    table = "\n".join(lines)
    print(table)
    if args.quick:
        return
    replace_section(SECTION, table)
    print(f"updated {RESULTS.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
