"""Differential testing: a branch must answer exactly as a plain copy of its base."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient

from tests.differential import Runner, make_doc
from tests.servers import ProxyProcess

SEED = int(os.environ.get("MONGOBRANCH_DIFF_SEED", "20261126"))
OPS = int(os.environ.get("MONGOBRANCH_DIFF_OPS", "2000"))


def seed_base(db: Any, rng: random.Random) -> None:
    db.items.drop()
    db.other.drop()
    db.items.insert_many([make_doc(rng, i) for i in range(400)])
    db.other.insert_many([{"_id": i, "k": i % 6, "label": f"o{i}"} for i in range(30)])
    db.items.create_index("s")


@pytest.fixture(params=["wal", "copy"])
def pair(proxy: ProxyProcess, direct: MongoClient, request: pytest.FixtureRequest
         ) -> Iterator[tuple[Any, Any, str]]:
    name = f"diff-{request.node.name}".replace("[", "-").replace("]", "")[:60]
    base_db, copy_db = f"dbase_{abs(hash(name)) % 10**6}", f"dcopy_{abs(hash(name)) % 10**6}"
    seed_base(direct[base_db], random.Random(SEED))
    seed_base(direct[copy_db], random.Random(SEED))
    status, body = proxy.api("POST", "/branches", {"name": name, "mode": request.param})
    assert status == 201, body
    branch: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    yield branch[base_db], direct[copy_db], name
    branch.close()
    proxy.api("DELETE", f"/branches/{name}")
    direct.drop_database(base_db)
    direct.drop_database(copy_db)


def final_state(db: Any) -> Any:
    return (list(db.items.find().sort("_id", 1)), list(db.other.find().sort("_id", 1)),
            sorted(ix["name"] for ix in db.items.list_indexes()))


def test_branch_matches_copy(pair: tuple[Any, Any, str]) -> None:
    branch_db, copy_db, _ = pair
    runner = Runner(branch_db, copy_db, random.Random(SEED + 1))
    for _ in range(OPS):
        runner.step()
    assert final_state(branch_db) == final_state(copy_db)


def test_branch_of_branch_matches_copy(pair: tuple[Any, Any, str], proxy: ProxyProcess) -> None:
    """Writes on a parent branch, then on its child: the child equals the copy."""
    branch_db, copy_db, parent = pair
    runner = Runner(branch_db, copy_db, random.Random(SEED + 2))
    for _ in range(OPS // 4):
        runner.step()
    status, body = proxy.api("POST", "/branches", {"name": parent[:50] + "-kid", "from": parent})
    assert status == 201, body
    kid: MongoClient = MongoClient(body["uri"])  # type: ignore[index]
    try:
        runner.branch_db = kid[branch_db.name]
        for _ in range(OPS // 4):
            runner.step()
        assert final_state(runner.branch_db) == final_state(copy_db)
    finally:
        kid.close()
        proxy.api("DELETE", f"/branches/{parent[:50]}-kid")
