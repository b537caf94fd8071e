"""Failover benchmark (issue 12): from the loss of the primary to the first write that
succeeds, through the proxy's main port, through a branch port, and with pymongo alone.

One run starts its own SecantusDB (on disk, with test commands) and the proxy in front
of it (`mongobranch serve --upstream "mongodb://...?replicaSet=secantus"`), opens three
long-lived pymongo clients (retryable writes on, as applications run them) and, in
interleaved rounds (direct, main, branch; then main, branch, direct; ...), makes the
primary go away in two ways:

1. step-down: `replSetStepDown: W, force: true`. The node is a secondary for W seconds
   (its hello says so, writes fail NotWritablePrimary) and then primary again.
   SecantusDB is a single-node replica set: it cannot hand over to another member, so
   this is the whole of what an election looks like to a client here.
2. kill: SIGKILL the node, start it again at once on the same port and data.

Each round times from the moment the primary was lost (the step-down answered, the
kill sent) to the first `insert_one` that succeeds, the client retrying whatever
error it gets at once. The figures are medians and maxima over the rounds; the
overhead columns subtract what every client must wait for regardless (the window W;
the node's restart, measured as the time until it answers a ping).

The script never asserts: it prints a table and rewrites the "## Failover (issue 12)"
section of benchmarks/RESULTS.md (re-reading the file just before writing).

    .venv/bin/python benchmarks/failover.py            # about 3 minutes
    .venv/bin/python benchmarks/failover.py --quick    # 1 round, no RESULTS.md update
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, for tests/
from benchmarks.results import replace_section  # noqa: E402
from tests.servers import ProxyProcess, Secantus  # noqa: E402

RESULTS = HERE / "RESULTS.md"
SECTION = "## Failover (issue 12)"


def until_write(client: Any, coll: str, seq: list[int]) -> float:
    """Insert until one succeeds; the monotonic time it did."""
    from pymongo.errors import PyMongoError
    seq[0] += 1
    while True:
        try:
            client.failover[coll].insert_one({"round": seq[0]})
            return time.monotonic()
        except PyMongoError:
            continue


def ready(admin: Any) -> None:
    """Wait until the node is a writable primary again."""
    from pymongo.errors import PyMongoError
    while True:
        try:
            if admin.admin.command("hello").get("isWritablePrimary"):
                return
        except PyMongoError:
            pass
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--window", type=float, default=2.0, help="step-down seconds")
    ap.add_argument("--quick", action="store_true", help="1 round, no RESULTS.md update")
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds

    from pymongo import MongoClient

    tmp = tempfile.mkdtemp(prefix="mb-failover-")
    # On disk, so that a node killed and started again keeps its data.
    node = Secantus(storage=os.path.join(tmp, "db"), extra=["--enable-test-commands"],
                    log=os.path.join(tmp, "secantus.log")).start()
    uri = f"mongodb://127.0.0.1:{node.port}/?replicaSet=secantus"
    lo = 20000 + (os.getpid() * 7) % 30000
    proxy = ProxyProcess(uri, meta_db="mb_failover", branch_ports=(lo, lo + 9),
                         log_level="WARNING", lifecycle_defaults=True,
                         log=os.path.join(tmp, "proxy.log"))
    port, admin_port = proxy.port, proxy.admin_port
    results: dict[str, dict[str, list[float]]] = {"step-down": {}, "kill": {}}
    baseline: dict[str, list[float]] = {"step-down": [], "kill": []}
    try:
        proxy.start(wait_healthy=False)
        req = urllib.request.Request(f"http://127.0.0.1:{admin_port}/branches",
                                     data=json.dumps({"name": "failover"}).encode(),
                                     method="POST",
                                     headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    branch = json.loads(r.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        opts: dict[str, Any] = {"serverSelectionTimeoutMS": 60000}
        clients = {
            "pymongo direct": MongoClient(uri, **opts),
            "main port": MongoClient(f"mongodb://127.0.0.1:{port}/", **opts),
            "branch port": MongoClient(branch["uri"], **opts),
        }
        admin = MongoClient(f"mongodb://127.0.0.1:{node.port}/", directConnection=True,
                            serverSelectionTimeoutMS=60000)
        names = list(clients)
        seq = [0]
        for client in clients.values():
            until_write(client, "warm", seq)

        def lose_by_step_down() -> float:
            admin.admin.command("replSetStepDown", args.window, force=True)
            return time.monotonic()

        def lose_by_kill() -> float:
            started = time.monotonic()
            node.kill()
            node.start()
            with MongoClient(f"mongodb://127.0.0.1:{node.port}/", directConnection=True,
                             serverSelectionTimeoutMS=60000) as probe:
                probe.admin.command("ping")
            baseline["kill"].append(time.monotonic() - started)
            return started

        scenarios: list[tuple[str, Callable[[], float]]] = [
            ("step-down", lose_by_step_down), ("kill", lose_by_kill)]
        for name, lose in scenarios:
            for r in range(rounds):
                order = names[r % 3:] + names[:r % 3]
                for target in order:
                    ready(admin)
                    for client in clients.values():  # every client has seen the primary
                        until_write(client, "before", seq)
                    lost = lose()
                    done = until_write(clients[target], "after", seq)
                    results[name].setdefault(target, []).append(done - lost)
                    print(f"{name:9} round {r + 1} {target:15} {done - lost:6.2f} s",
                          flush=True)
        baseline["step-down"] = [args.window]
    finally:
        proxy.stop(timeout=30)
        node.stop()

    lines = [SECTION, "",
             f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
             f"({os.cpu_count()} cores, shared), Python {platform.python_version()}; "
             f"`.venv/bin/python benchmarks/failover.py --rounds {rounds} --window "
             f"{args.window:g}`.",
             "",
             "Time from the loss of the primary to the first successful `insert_one` (a "
             "pymongo client with retryable writes, retrying any error at once), per "
             f"round, {rounds} rounds interleaved across the three clients. SecantusDB is "
             "a single-node replica set, so the primary comes back on the same node: "
             f"*step-down* is `replSetStepDown: {args.window:g}, force: true` (a "
             f"{args.window:g} s window every client must wait out), *kill* is SIGKILL "
             "and an immediate restart on the same port and data (the restart until the "
             "node answers a ping is measured per round and subtracted as *overhead*).",
             "",
             "| loss | client | median s | max s | median overhead s | vs pymongo (median) |",
             "|---|---|---|---|---|---|"]
    for name in ("step-down", "kill"):
        base = statistics.median(baseline[name]) if baseline[name] else 0.0
        direct = statistics.median(results[name].get("pymongo direct", [0.0]))
        for target in ("pymongo direct", "main port", "branch port"):
            vals = results[name].get(target, [])
            if not vals:
                continue
            med = statistics.median(vals)
            ratio = med / direct if direct else float("nan")
            lines.append(f"| {name} | {target} | {med:.2f} | {max(vals):.2f} | "
                         f"{med - base:.2f} | {ratio:.2f}x |")
    lines += ["",
              "Every client, pymongo alone included, learns that the node is primary again "
              "from pymongo's monitor: SecantusDB does not answer a waiting (streaming) "
              "hello when its step-down window ends (mongod does, as its topologyVersion "
              "changes), so the monitor sees it only at its next heartbeat "
              "(`heartbeatFrequencyMS`, 10 s by default). The proxy takes the primary "
              "from the same monitors, which is why its figures follow pymongo's."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        replace_section(SECTION, text)
        print(f"updated {RESULTS.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
