"""Differential testing: a branch must answer exactly as a plain copy of its base.

CI runs one fixed seed at a fixed length; `make differential` runs many (see
tests/differential.py)."""

from __future__ import annotations

import os

import pytest
from pymongo import MongoClient

from tests.differential import run_seed
from tests.servers import ProxyProcess

SEED = int(os.environ.get("MONGOBRANCH_DIFF_SEED", "20261126"))
OPS = int(os.environ.get("MONGOBRANCH_DIFF_OPS", "2000"))
# 2,000 seeded operations take 84-96 s alone on an idle machine; in one full-suite run
# the first of them passed 300 s waiting on a branch's delete_many, for a reason not
# found yet (no error or capture timeout in the proxy's log). A hang still fails here.
pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("mode", ["wal", "copy"])
def test_branch_matches_copy(proxy: ProxyProcess, direct: MongoClient, mode: str) -> None:
    run_seed(proxy, direct, f"diff-{mode}", mode, SEED, OPS)


@pytest.mark.parametrize("mode", ["wal", "copy"])
def test_branch_of_branch_matches_copy(proxy: ProxyProcess, direct: MongoClient, mode: str
                                       ) -> None:
    """Writes on a parent branch, then on its child: the child equals the copy."""
    run_seed(proxy, direct, f"diff-kid-{mode}", mode, SEED, OPS // 4, kid_ops=OPS // 4)
