"""Main's index list and options at a past point, undone from the change events the
capture logged (history/catalogat.py): entries shaped as mongod's events are, and the
refusal where an event does not say what was before (SecantusDB's index collMod)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.branching.catalogundo import undo
from proxy.branching.errors import BranchError, Kind

ID = {"v": 2, "key": {"_id": 1}, "name": "_id_"}


def names(indexes: list[dict[str, Any]]) -> list[str]:
    return sorted(ix["name"] for ix in indexes)


def test_created_indexes_go_and_dropped_ones_come_back_newest_first() -> None:
    now = ([ID, {"v": 2, "key": {"w": 1}, "name": "w_1"}], {"validator": {"v": 1}})
    entries = [  # newest first
        {"op": "collMod", "desc": {"validator": {"v": 1}},
         "before": {"collectionOptions": {"uuid": b"u", "validationLevel": "moderate"}}},
        {"op": "dropIndexes", "desc": {"indexes": [
            {"v": 2, "key": {"u": 1}, "name": "u_1", "unique": True}]}},
        {"op": "createIndexes", "desc": {"indexes": [{"v": 2, "key": {"w": 1}, "name": "w_1"}]}},
        {"op": "createIndexes", "desc": {"indexes": [
            {"v": 2, "key": {"u": 1}, "name": "u_1", "unique": True}]}},
    ]
    indexes, options = undo("d.c", now, entries[:3])
    assert names(indexes) == ["_id_", "u_1"]
    assert next(ix for ix in indexes if ix["name"] == "u_1")["unique"] is True
    assert options == {"validationLevel": "moderate"}
    indexes, _ = undo("d.c", now, entries)
    assert names(indexes) == ["_id_"]


def test_an_index_collmod_is_undone_from_the_index_options_before() -> None:
    ttl = {"v": 2, "key": {"t": 1}, "name": "t_1", "expireAfterSeconds": 50, "hidden": True}
    entry = {"op": "collMod", "desc": {"index": {"name": "t_1", "expireAfterSeconds": 50,
                                                 "hidden": True}},
             "before": {"collectionOptions": {}, "indexOptions": {"expireAfterSeconds": 100}}}
    indexes, options = undo("d.c", ([ID, ttl], {}), [entry])
    assert next(ix for ix in indexes if ix["name"] == "t_1") == {
        "v": 2, "key": {"t": 1}, "name": "t_1", "expireAfterSeconds": 100}
    assert options == {}
    by_key = {**entry, "desc": {"index": {"keyPattern": {"t": 1}, "hidden": True}}}
    indexes, _ = undo("d.c", ([ID, ttl], {}), [by_key])
    assert next(ix for ix in indexes if ix["name"] == "t_1")["expireAfterSeconds"] == 100


@pytest.mark.parametrize("entry", [
    # SecantusDB: an index's collMod says neither which index nor how it was.
    {"op": "collMod", "desc": {}, "before": {"collectionOptions": {"uuid": b"u"}}},
    {"op": "collMod", "desc": {"index": {"name": "t_1", "hidden": True}},
     "before": {"collectionOptions": {}}},
])
def test_a_collmod_that_does_not_say_what_was_before_is_refused(entry: dict[str, Any]) -> None:
    with pytest.raises(BranchError) as refused:
        undo("d.c", ([ID], {}), [entry])
    assert refused.value.kind is Kind.CONFLICT
    assert "main changed d.c with collMod after that point" in str(refused.value)
