"""The proxy's own ceiling: requests/s it relays when the upstream costs nothing.

Every other throughput figure is capped by the upstream (SecantusDB answers a few
thousand finds/s on this machine), so none shows the relay's limit. Here the upstream is
benchmarks/canned.py, which answers any command with one pre-encoded reply. One run
measures, interleaved in short blocks so that a shared machine's noise falls on all
targets alike, the raw-wire point-find client of benchmarks/passthrough.py against:

* `direct`: the canned responder itself (the floor of the client and the responder);
* `socat`: socat in front of it (a byte relay: one extra hop, no parsing);
* `proxy`: `mongobranch serve --upstream` the responder (its main port).

at 1, 64 and 512 concurrent connections, and reports requests/s with the proxy's share
of socat's. The script never asserts; it prints a table and rewrites the
"## Proxy ceiling (issue 16)" section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/ceiling.py            # ~2 minutes
    .venv/bin/python benchmarks/ceiling.py --quick    # smoke run, no RESULTS.md update

`--proxy-workers N` (default 2) adds `serve --workers N` as target `proxy-Nw`;
`--pure` adds the same proxy with its relay checks in pure Python (MONGOBRANCH_PURE_PYTHON=1),
`--baseline DIR` the proxy of another source tree, as further targets.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests/

import passthrough as pt  # a sibling script, not a package

from benchmarks.results import replace_section
from tests.servers import Procs, ProxyProcess, free_port, tree_exe, wait_port

SECTION = "## Proxy ceiling (issue 16)"


def start_targets(procs: Procs, logdir: Path, responders: int, pure: bool = False,
                  baseline: str | None = None, proxy_workers: int = 1) -> list[pt.Target]:
    up_port = free_port()
    canned = procs.spawn("canned", [sys.executable, str(pt.HERE / "canned.py"), str(up_port),
                                    "--procs", str(responders)])
    wait_port(up_port, proc=canned)
    upstream = f"mongodb://127.0.0.1:{up_port}/"
    targets = [pt.Target("direct", upstream + "?directConnection=true", up_port)]
    socat_exe = shutil.which("socat")
    if socat_exe:
        s_port = free_port()
        socat = procs.spawn("socat", [socat_exe, f"TCP-LISTEN:{s_port},fork,reuseaddr,backlog=1024",
                                      f"TCP:127.0.0.1:{up_port}"])
        wait_port(s_port, proc=socat)
        targets.append(pt.Target("socat", f"mongodb://127.0.0.1:{s_port}/", s_port, socat.pid,
                                 children=True))
    else:
        print("socat not found on PATH (apt-get install -y socat): no socat row",
              file=sys.stderr)
    b_port = free_port()
    # The canned upstream cannot hold branch metadata: the engine reports itself
    # unavailable and the main port relays, which is all this measures.
    proxy = procs.add(ProxyProcess(
        upstream, meta_db=None, branch_ports=(b_port, b_port), data_dir=str(logdir / "data"),
        log_level="WARNING", lifecycle_defaults=True, log=procs.log("proxy")
    ).start(wait_healthy=False))
    p_port = proxy.port
    targets.append(pt.Target("proxy", f"mongodb://127.0.0.1:{p_port}/", p_port, proxy.pid))
    if proxy_workers > 1:
        # `serve --workers N`: N processes share the main port (docs/ARCHITECTURE.md,
        # "Workers"); their CPU is the supervisor's children's.
        w_port = free_port()
        multi = procs.add(ProxyProcess(
            upstream, meta_db=None, branch_ports=(w_port, w_port),
            data_dir=str(logdir / "data-workers"), log_level="WARNING",
            lifecycle_defaults=True, log=procs.log("proxy-workers"),
            extra=["--workers", str(proxy_workers)]
        ).start(wait_healthy=False))
        targets.append(pt.Target(f"proxy-{proxy_workers}w",
                                 f"mongodb://127.0.0.1:{multi.port}/", multi.port, multi.pid,
                                 children=True))
    if pure:
        # The same tree with its relay checks in pure Python (proxy/wire/fastwire.py).
        q_port = free_port()
        pure_proxy = procs.add(ProxyProcess(
            upstream, meta_db=None, branch_ports=(q_port, q_port),
            data_dir=str(logdir / "data-pure"), log_level="WARNING", lifecycle_defaults=True,
            log=procs.log("proxy-pure"), env={"MONGOBRANCH_PURE_PYTHON": "1"}
        ).start(wait_healthy=False))
        targets.append(pt.Target("proxy-pure", f"mongodb://127.0.0.1:{pure_proxy.port}/",
                                 pure_proxy.port, pure_proxy.pid))
    if baseline:
        qb_port = free_port()
        old = procs.add(ProxyProcess(
            upstream, exe=tree_exe(baseline), meta_db=None,
            branch_ports=(qb_port, qb_port), data_dir=str(logdir / "data-b"),
            log_level="WARNING", lifecycle_defaults=True, log=procs.log("baseline")
        ).start(wait_healthy=False))
        targets.append(pt.Target("baseline", f"mongodb://127.0.0.1:{old.port}/", old.port,
                                 old.pid))
    return targets


def report(thr: dict[Any, Any], targets: list[pt.Target], levels: list[pt.Level],
           window: float, rounds: int, responders: int, workers: int,
           load: tuple[float, float]) -> str:
    names = [t.name for t in targets]
    lines = [SECTION, "",
             f"Measured {dt.date.today().isoformat()} with `.venv/bin/python "
             "benchmarks/ceiling.py`: the raw-wire point-find client (pre-encoded OP_MSG, "
             "replies not decoded) against benchmarks/canned.py, an upstream that answers any "
             f"command with one fixed reply ({responders} responder process(es), {workers} "
             f"client process(es)); {rounds} rounds of {window} s per target and level, targets "
             "rotated every round. Requests/s, mean over rounds (min-max):", "",
             "| target | " + " | ".join(lv.label for lv in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for n in names:
        cells = []
        for lv in levels:
            vals = thr[(n, lv, "ops")]
            cells.append(f"{statistics.mean(vals):,.0f} ({min(vals):,.0f}-{max(vals):,.0f})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if "socat" in names:
        def share(lv: pt.Level) -> float:
            return float(statistics.mean(thr[("proxy", lv, "ops")])
                         / statistics.mean(thr[("socat", lv, "ops")]))

        lines += ["", "| proxy / socat | " + " | ".join(f"{share(lv):.0%}" for lv in levels)
                  + " |", "|---|" + "---|" * len(levels)]
        for n in [n for n in names if n.startswith("proxy-") and n.endswith("w")]:
            def multi(lv: pt.Level, n: str = n) -> str:
                mine = statistics.mean(thr[(n, lv, "ops")])
                return (f"{mine / statistics.mean(thr[('socat', lv, 'ops')]):.0%} of socat, "
                        f"{mine / statistics.mean(thr[('proxy', lv, 'ops')]):.2f}x proxy")
            lines += [f"| {n} | " + " | ".join(multi(lv) for lv in levels) + " |"]
        lines += ["", "Relay CPU per request, µs (proxy process; socat with its forks):", "",
                  "| target | " + " | ".join(lv.label for lv in levels) + " |",
                  "|---|" + "---|" * len(levels)]
        for n in [n for n in names if n != "direct"]:
            cells = [f"{sum(thr[(n, lv, 'cpu_relay')]) / sum(thr[(n, lv, 'ops_total')]) * 1e6:.1f}"
                     for lv in levels]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "socat forks a process per connection and moves each message through its own "
              "buffer with a poll per chunk, so its cost per request grows with the number of "
              "connections; the proxy's one event loop reads and writes many connections' "
              "messages per wake-up. With one connection the proxy's Python per request shows "
              "(relay CPU per request above)."]
    if any(n.startswith("proxy-") and n.endswith("w") for n in names):
        lines += ["", "proxy-Nw is `serve --workers N`: N processes share the main port "
                  "(SO_REUSEPORT), each relaying its own connections. It can only beat one "
                  "process where a core is idle: on a machine whose cores the client and the "
                  "responder already share with the relay, the workers take turns on the "
                  "same cores, and the figure to compare is the relay CPU per request, which "
                  "stays close to one process's (each worker's loop batches fewer "
                  "connections)."]
    info = pt.machine()
    lines += ["", f"Machine: {', '.join(f'{k} {v}' for k, v in info.items())}; 1-minute load "
              f"average {load[0]:.1f} at the start, {load[1]:.1f} at the end (other work on "
              "the machine: only ratios within the run are comparable)."]
    return "\n".join(lines) + "\n"


def write_results(text: str) -> None:
    replace_section(SECTION, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run; no RESULTS.md update")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--window", type=float, default=1.0, help="seconds per block")
    ap.add_argument("--levels", default="1,64,512", help="concurrent connections per level")
    ap.add_argument("--workers", type=int, default=1,
                    help="client processes (the client must not starve the relay of the cores)")
    ap.add_argument("--responders", type=int, default=1, help="canned responder processes")
    ap.add_argument("--pure", action="store_true",
                    help="also run the same proxy with MONGOBRANCH_PURE_PYTHON=1 (target "
                         "proxy-pure: the relay checks in pure Python)")
    ap.add_argument("--proxy-workers", type=int, default=2, metavar="N",
                    help="also run `serve --workers N` as target proxy-Nw (1: not)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run the proxy from another source tree (a directory holding a "
                         "`proxy/` package) as target 'baseline'")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.window = 2, 0.5
    levels = [pt.Level(int(x), raw=True) for x in args.levels.split(",") if x]
    logdir = Path(tempfile.mkdtemp(prefix="mongobranch-ceiling-"))
    procs = Procs(logdir)
    try:
        targets = start_targets(procs, logdir, args.responders, args.pure, args.baseline,
                                args.proxy_workers)
        print(f"targets: {', '.join(t.name for t in targets)}; levels "
              f"{', '.join(lv.label for lv in levels)} ...", flush=True)
        responder = procs.children[0]
        load0 = os.getloadavg()[0]
        thr = pt.measure_throughput(targets, responder.pid, levels, args.rounds, args.window,
                                    args.workers)
        text = report(thr, targets, levels, args.window, args.rounds, args.responders,
                      args.workers, (load0, os.getloadavg()[0]))
        print(text)
        if not (args.quick or args.no_write):
            write_results(text)
            print(f"wrote {SECTION!r} in {pt.RESULTS}")
    finally:
        procs.stop_all()
        with contextlib.suppress(subprocess.SubprocessError):
            shutil.rmtree(logdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
