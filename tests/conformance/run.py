"""pymongo's own test modules against the main port and a branch port of one proxy.

`make conformance` runs this. The tests come from the source distribution of the
pymongo version installed here (PyPI ships its `test/` folder), unpacked under a
git-ignored cache; only `test/` and its pytest configuration are taken out of it, so
the installed pymongo (with its C extensions) is what the tests drive. The upstream
is a SecantusDB started with `--enable-test-commands` (failpoints), as pymongo's
suite expects. The main port runs first, the databases it wrote are dropped, then a
fresh branch of the same proxy runs the same modules: every test that passed on main
and fails on the branch is a gap of the branch port, grouped by its error. Tests much
slower on the branch are listed too (the factor and floor are options; timings are
reported, never asserted).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from pymongo import MongoClient

from tests.servers import BIN, ProxyProcess, Secantus

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "conformance"
ARTIFACTS = ROOT / ".artifacts" / "conformance"
MODULES = ["test/test_crud_unified.py", "test/test_collection.py", "test/test_cursor.py",
           "test/test_bulk.py", "test/test_database.py"]
META_DB = "mongobranch"
KEEP_DBS = {"admin", "local", "config", META_DB}
WARM_UP_DB = "conformance_warm_up"


@dataclass
class Outcome:
    status: str  # passed, failed, error, skipped
    seconds: float
    message: str


def pymongo_tests() -> Path:
    """The `test/` folder of the installed pymongo's sdist, downloaded once into the cache."""
    version = importlib.metadata.version("pymongo")
    where = CACHE / f"pymongo-{version}"
    if (where / "test" / "__init__.py").exists():
        return where
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"pymongo-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run([str(BIN / "pip"), "download", "-q", "--no-binary", ":all:", "--no-deps",
                        f"pymongo=={version}", "-d", str(CACHE)], check=True)
    prefix = f"pymongo-{version}/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix + "test/") or m.name == prefix + "pyproject.toml"]
        tar.extractall(CACHE, members=members, filter="data")
    return where


def run_pytest(tests: Path, port: int, label: str, modules: list[str], keyword: str | None,
               timeout: int) -> dict[str, Outcome]:
    xml = ARTIFACTS / f"{label}.xml"
    log = ARTIFACTS / f"{label}.log"
    args = [str(BIN / "python"), "-m", "pytest", *modules, "-c", "pyproject.toml",
            "-o", "addopts=", "-m", "default", "-p", "no:cacheprovider", "-q", "-rN",
            f"--junitxml={xml}", f"--timeout={timeout}"]
    if keyword:
        args += ["-k", keyword]
    env = {**os.environ, "DB_IP": "127.0.0.1", "DB_PORT": str(port)}
    started = time.monotonic()
    print(f"[{label}] pytest on port {port} ... (log: {log})", flush=True)
    with log.open("wb") as out:
        subprocess.run(args, cwd=tests, env=env, stdout=out, stderr=subprocess.STDOUT,
                       check=False)
    print(f"[{label}] done in {time.monotonic() - started:.0f} s", flush=True)
    return parse_junit(xml)


def parse_junit(xml: Path) -> dict[str, Outcome]:
    results: dict[str, Outcome] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = "failed" if child.tag == "failure" else child.tag
                message = child.get("message") or (child.text or "")
                break
        results[name] = Outcome(status, float(case.get("time") or 0.0), message)
    return results


def cause(message: str) -> str:
    """A failure message with its variable parts blanked, so that failures group by cause."""
    line = message.strip().splitlines()[0] if message.strip() else "(no message)"
    line = re.sub(r"ObjectId\('[0-9a-f]+'\)", "ObjectId(..)", line)
    line = re.sub(r"branch '[^']*'", "branch ..", line)
    line = re.sub(r"full error: .*", "", line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    return line[:160]


def clean_main(uri: str) -> None:
    """Drops what the main run wrote, so that the branch starts from the same empty base."""
    with MongoClient(uri, serverSelectionTimeoutMS=10000) as client:
        for name in client.list_database_names():
            if name not in KEEP_DBS:
                client.drop_database(name)


def catch_up(uri: str) -> float:
    """Seconds a first write on the fresh branch waits: a branch write waits for the
    capture to have logged every write main made before it (main's history), and the
    main run's writes (100,000-document inserts among them) would otherwise be waited for
    inside the first test's timeout. Reported with the results."""
    started = time.monotonic()
    with MongoClient(uri, serverSelectionTimeoutMS=10000, socketTimeoutMS=None) as client:
        client[WARM_UP_DB].c.insert_one({})
        client.drop_database(WARM_UP_DB)
    return time.monotonic() - started


def report(main: dict[str, Outcome], branch: dict[str, Outcome], modules: list[str], factor: float,
           floor: float, waited: float = 0.0) -> tuple[str, dict[str, object]]:
    passed_main = {n for n, o in main.items() if o.status == "passed"}
    failing = sorted(n for n in passed_main
                     if n not in branch or branch[n].status in ("failed", "error"))
    skipped = sorted(n for n in passed_main if n in branch and branch[n].status == "skipped")
    by_cause: dict[str, list[str]] = defaultdict(list)
    for n in failing:
        by_cause[cause(branch[n].message) if n in branch else "(not run)"].append(n)
    slower = sorted(
        (n for n in passed_main if n in branch and branch[n].status == "passed"
         and branch[n].seconds > factor * main[n].seconds
         and branch[n].seconds - main[n].seconds > floor),
        key=lambda n: main[n].seconds - branch[n].seconds)
    counts = {side: dict(Counter(o.status for o in res.values()))
              for side, res in (("main", main), ("branch", branch))}
    lines = ["# pymongo conformance: main port vs branch port", "",
             f"pymongo {importlib.metadata.version('pymongo')}, modules: {', '.join(modules)}",
             "", f"- main: {counts['main']}", f"- branch: {counts['branch']}",
             f"- passing on main, failing on the branch: **{len(failing)}**",
             f"- passing on main, skipped on the branch: {len(skipped)}",
             f"- slower on the branch by more than {factor}x and {floor} s: {len(slower)}",
             f"- the branch's first write, before its tests, waited {waited:.0f} s (the "
             "capture logging the main run's writes)",
             "", "## Failing on the branch, by cause", ""]
    for text, names in sorted(by_cause.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"### {len(names)} x {text}")
        lines += [f"- {n}" for n in names]
        lines.append("")
    lines += ["## Slower on the branch", ""]
    lines += [f"- {n}: main {main[n].seconds:.2f} s, branch {branch[n].seconds:.2f} s"
              for n in slower]
    data: dict[str, object] = {
        "counts": counts, "failing": {n: branch[n].message if n in branch else "" for n in failing},
        "by_cause": {k: len(v) for k, v in by_cause.items()}, "skipped_on_branch": skipped,
        "slower": {n: [main[n].seconds, branch[n].seconds] for n in slower},
        "first_write_waited": waited}
    return "\n".join(lines) + "\n", data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, to run a subset")
    parser.add_argument("--module", action="append", help="test module(s); default: the five")
    parser.add_argument("--factor", type=float, default=3.0, help="slower-than factor")
    parser.add_argument("--floor", type=float, default=1.0,
                        help="seconds a test must also lose to count as slower")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per test")
    parser.add_argument("--upstream-cache", default="8G",
                        help="SecantusDB --cache-size: its in-memory storage lives in that "
                             "cache, and the branch run stores each document two or three "
                             "times (overlay, WAL images, and a hidden id where the parent "
                             "has the collection); with the 1G default "
                             "test_bulk's large inserts fail with WT_CACHE_FULL")
    opts = parser.parse_args()
    modules = opts.module or MODULES
    tests = pymongo_tests()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    upstream = Secantus(extra=["--enable-test-commands", "--cache-size",
                               opts.upstream_cache]).start()
    proxy = ProxyProcess(upstream.uri, meta_db=META_DB)
    try:
        proxy.start()
        main_results = run_pytest(tests, proxy.port, "main", modules, opts.keyword, opts.timeout)
        clean_main(proxy.uri)
        status, body = proxy.api("POST", "/branches", {"name": "conformance"})
        if status not in (200, 201) or not isinstance(body, dict):
            raise SystemExit(f"could not create the branch: {status} {body}")
        waited = catch_up(f"mongodb://127.0.0.1:{body['port']}/")
        print(f"[branch] its first write waited {waited:.0f} s", flush=True)
        # The timeout stops a hang; speed is the factor's to judge: a test main ran in
        # more than timeout/factor seconds gets factor times that on the branch, and is
        # reported slower if it needs more than that share.
        slowest = max((o.seconds for o in main_results.values()), default=0.0)
        timeout = max(opts.timeout, math.ceil(opts.factor * slowest))
        branch_results = run_pytest(tests, int(body["port"]), "branch", modules, opts.keyword,
                                    timeout)
    finally:
        proxy.kill()
        upstream.stop()
    text, data = report(main_results, branch_results, modules, opts.factor, opts.floor, waited)
    (ARTIFACTS / "summary.md").write_text(text)
    (ARTIFACTS / "summary.json").write_text(json.dumps(data, indent=1))
    print(text)
    print(f"summary: {ARTIFACTS / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
