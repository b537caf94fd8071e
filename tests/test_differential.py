"""Differential testing: a branch must answer exactly as a plain copy of its base.

CI runs one fixed seed at a fixed length; `make differential` runs many (see
tests/differential.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from pymongo import MongoClient

from tests.differential import run_seed
from tests.servers import ProxyProcess, Secantus

SEED = int(os.environ.get("MONGOBRANCH_DIFF_SEED", "20261126"))
OPS = int(os.environ.get("MONGOBRANCH_DIFF_OPS", "2000"))
# 2,000 seeded operations take 84-96 s on an idle machine, on an upstream of their own;
# 270-440 s at a load average of 10-14 on 2 cores. A hang still fails here.
pytestmark = pytest.mark.timeout(900)


# An upstream and a proxy of each test's own, not the session's. SecantusDB keeps the
# outcome of every retryable write for 30 minutes, scans them all on each write and,
# past 10,000, sorts them on each write: measured on a fresh server, insert_one fell from
# 1,156/s to 483/s over the first 10,000 and to 82/s after (1,700/s throughout with
# retryWrites=False). Late in a full run the session upstream is past that point, and
# these tests, which write the most, took 240 s to over 300 s instead of 90. Per test
# rather than per module: the fewer retryable writes its upstream holds, the faster.
@pytest.fixture()
def upstream() -> Iterator[Secantus]:
    server = Secantus().start()
    yield server
    server.stop()


@pytest.fixture()
def proxy(upstream: Secantus) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(upstream.uri).start()
    yield proc
    proc.stop()


@pytest.fixture()
def two_workers(upstream: Secantus) -> Iterator[ProxyProcess]:
    """`serve --workers 2`: the branch's connections reach either worker and are served
    by the one holding the engine (docs/ARCHITECTURE.md, "Workers")."""
    proc = ProxyProcess(upstream.uri, extra=["--workers", "2"]).start()
    yield proc
    proc.stop()


@pytest.fixture()
def direct(upstream: Secantus) -> Iterator[MongoClient]:
    client: MongoClient = MongoClient(upstream.uri, directConnection=True)
    yield client
    client.close()


@pytest.mark.parametrize("mode", ["wal", "copy"])
def test_branch_matches_copy(proxy: ProxyProcess, direct: MongoClient, mode: str) -> None:
    run_seed(proxy, direct, f"diff-{mode}", mode, SEED, OPS)


@pytest.mark.parametrize("mode", ["wal", "copy"])
def test_branch_of_branch_matches_copy(proxy: ProxyProcess, direct: MongoClient, mode: str
                                       ) -> None:
    """Writes on a parent branch, then on its child: the child equals the copy."""
    run_seed(proxy, direct, f"diff-kid-{mode}", mode, SEED, OPS // 4, kid_ops=OPS // 4)


def test_branch_matches_copy_under_two_workers(two_workers: ProxyProcess, direct: MongoClient
                                               ) -> None:
    run_seed(two_workers, direct, "diff-workers", "wal", SEED + 7, OPS // 2)
