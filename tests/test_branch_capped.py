"""`convertToCapped` and `cloneCollectionAsCapped` on a branch port: the branch's copy
becomes capped, main's collection stays as it was, and the steps are the branch's own
logged writes (a reset undoes them).

SecantusDB implements neither command (CommandNotFound on the main port), so these are
held to mongod's documented behaviour: the target is a capped collection of the given
size holding the source's documents, with only the `_id` index; a missing source is
NamespaceNotFound, an existing target NamespaceExists, a view CommandNotSupportedOnView.
SecantusDB does not enforce a capped collection's size either, so its truncation of the
oldest documents is not checked here."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import CursorType, MongoClient
from pymongo.errors import OperationFailure

from tests.branchutil import Branches, api_ok, unique
from tests.servers import ProxyProcess


@pytest.fixture()
def db_name(direct: MongoClient) -> Iterator[str]:
    name = unique("capped").replace("-", "_")
    direct[name].t.insert_many([{"_id": i, "a": i, "s": "x" * 50} for i in range(40)])
    direct[name].t.create_index("a")
    yield name
    direct.drop_database(name)


def _shown(db: Any, coll: str) -> list[Any]:
    return [doc["_id"] for doc in db[coll].find()]


def test_convert_to_capped_makes_the_branchs_copy_capped(
        proxy: ProxyProcess, made: Branches, direct: MongoClient, db_name: str) -> None:
    info = made.create(unique("cap"))
    db = made.client(info)[db_name]
    db.t.insert_one({"_id": 100, "a": 1})
    db.t.delete_many({"_id": {"$lt": 5}})
    before = sorted(_shown(db, "t"))
    # What the branch shows of main's options (the capture's pre-images setting).
    options = db.t.options()
    assert "capped" not in options
    mark = api_ok(proxy, "GET", f"/branches/{info['name']}/log")
    assert db.command("convertToCapped", "t", size=1 << 20)["ok"] == 1.0
    assert db.t.options() == {"capped": True, "size": 1 << 20}
    assert sorted(_shown(db, "t")) == before
    assert [ix["name"] for ix in db.t.list_indexes()] == ["_id_"]
    assert db.list_collection_names() == ["t"]  # the temporary copy was renamed over it
    # A tailable cursor reads it, as on any capped collection the branch holds whole.
    tail = db.t.find(cursor_type=CursorType.TAILABLE)
    assert sorted(doc["_id"] for doc in tail) == before
    tail.close()
    # Main's collection is untouched.
    assert "capped" not in direct[db_name].t.options()
    assert sorted(_shown(direct[db_name], "t")) == list(range(40))
    assert len(list(direct[db_name].t.list_indexes())) == 2
    # The steps are the branch's writes: a reset to before them gives the copy back.
    entries = mark["entries"] if isinstance(mark, dict) else mark
    last = max(entry["lsn"] for entry in entries)
    api_ok(proxy, "POST", f"/branches/{info['name']}/reset", {"to": last})
    assert db.t.options() == options
    assert sorted(_shown(db, "t")) == before
    assert sorted(ix["name"] for ix in db.t.list_indexes()) == ["_id_", "a_1"]


def test_clone_collection_as_capped_on_a_branch(
        made: Branches, direct: MongoClient, db_name: str) -> None:
    db = made.client(made.create(unique("cap")))[db_name]
    db.t.update_one({"_id": 3}, {"$set": {"a": -3}})
    options = db.t.options()
    assert db.command("cloneCollectionAsCapped", "t", toCollection="c", size=1 << 20,
                      max=1000)["ok"] == 1.0
    assert db.c.options() == {"capped": True, "size": 1 << 20, "max": 1000}
    assert list(db.c.find().sort("_id", 1)) == list(db.t.find().sort("_id", 1))
    assert db.c.find_one({"_id": 3})["a"] == -3
    assert [ix["name"] for ix in db.c.list_indexes()] == ["_id_"]
    assert "c" not in direct[db_name].list_collection_names()
    assert db.t.options() == options  # the source stays as it was

    def code(cmd: dict[str, Any]) -> int:
        with pytest.raises(OperationFailure) as failure:
            db.command(cmd)
        return int(failure.value.code or 0)

    assert code({"cloneCollectionAsCapped": "t", "toCollection": "c", "size": 4096}) == 48
    assert code({"cloneCollectionAsCapped": "none", "toCollection": "d", "size": 4096}) == 26
    assert code({"convertToCapped": "none", "size": 4096}) == 26
    # The capped options are the upstream's to judge, in its words.
    assert code({"convertToCapped": "t"}) == code_on_upstream(direct, db_name)
    db.command("create", "v", viewOn="t", pipeline=[])
    assert code({"convertToCapped": "v", "size": 4096}) == 166
    assert db.t.options() == options and "d" not in db.list_collection_names()


def code_on_upstream(direct: MongoClient, db_name: str) -> int:
    """What the upstream answers to a capped collection without a size."""
    with pytest.raises(OperationFailure) as failure:
        direct[db_name].create_collection("sizeless", capped=True)
    return int(failure.value.code or 0)
