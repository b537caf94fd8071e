"""The pure parts of the branch view and of history, in process: the stages that yield a
branch view (`views.py`), which resets void what. The planner's decisions built on them
are in test_planner.py."""

from __future__ import annotations

from typing import Any

from proxy.branching import views
from proxy.branching.history import voids_at
from proxy.branching.model import NsState


def layer(bid: str, hidden: list[Any] | None = (), *, dropped: bool = False) -> NsState:
    state = NsState(bid=bid, db="app", coll="items", base_dropped=dropped)
    if hidden is None:
        state.hidden_ids = None
    else:
        state.hide(list(hidden))
    return state


def test_small_cached_hidden_sets_are_excluded_with_nin() -> None:
    top, parent = layer("b2", [1, 2]), layer("b1", [3])
    assert views.exclusion([top, parent]) == [{"$match": {"_id": {"$nin": [1, 2, 3]}}}]
    assert views.exclusion([layer("b1")]) == []


def test_large_or_uncached_hidden_sets_take_the_anti_join() -> None:
    big = layer("b1", list(range(views.NIN_LIMIT + 1)))
    stages = views.exclusion([big])
    assert stages[0]["$lookup"]["from"] == big.hidden
    uncached, empty = layer("b2", None), layer("b3")
    # Only layers that hide something get a join.
    assert [s["$lookup"]["from"] for s in views.exclusion([uncached, empty]) if "$lookup" in s] \
        == [uncached.hidden]


def test_view_unions_each_layer_with_the_exclusions_of_the_layers_above() -> None:
    top, parent = layer("b2", [1]), layer("b1", [2])
    stages = views.view_stages([top, parent], {"x": 1})
    assert stages == [
        {"$match": {"x": 1}}, {"$match": {"_id": {"$nin": [1, 2]}}},
        {"$unionWith": {"coll": top.live, "pipeline": [{"$match": {"x": 1}}]}},
        {"$unionWith": {"coll": parent.live, "pipeline": [
            {"$match": {"x": 1}}, {"$match": {"_id": {"$nin": [1]}}}]}},
    ]


def test_a_dropped_collection_hides_everything_below_it() -> None:
    top, mid, bottom = layer("b3"), layer("b2", dropped=True), layer("b1", [5])
    stages = views.view_stages([top, mid, bottom])
    assert stages[0] == {"$match": {"_id": {"$in": []}}}
    assert [s["$unionWith"]["coll"] for s in stages[1:]] == [top.live, mid.live]
    assert views.whole([mid]) == mid.live and views.whole([top, mid]) is None


def test_voids_follow_the_chain_of_resets() -> None:
    # Reset at 20 back to 10, then at 40 back to 25 (after the first reset).
    resets = [(10, 20), (25, 40)]
    assert voids_at(resets, None) == [[25, 40], [10, 20]]
    assert voids_at(resets, 30) == [[10, 20]]
    assert voids_at(resets, 5) == []
    # Back to 15, a point before the first reset was taken: what was visible then (the
    # entries up to 15) is visible again, and the first reset voids nothing on this chain.
    assert voids_at([(10, 20), (15, 40)], None) == [[15, 40]]


def test_live_documents_go_in_as_a_literal_only_when_both_sides_are_small() -> None:
    assert views.injects_live(200, 40_000, 3, 600)
    assert views.injects_live(views.INJECT_DOCS, 1000, views.INJECT_DOCS, 1000)
    assert not views.injects_live(views.INJECT_DOCS + 1, 1000, 0, 0)
    assert not views.injects_live(10, 1000, views.INJECT_DOCS + 1, 1000)
    # $facet holds the base side and the literal in one document: bytes bound it too
    assert not views.injects_live(10, views.INJECT_BYTES, 1, 1)
    assert not views.injects_live(10, 0, 1, views.INJECT_BYTES // 2 + 1)


def test_injected_live_documents_replace_the_unions_and_stay_literal() -> None:
    top, parent = layer("b2", [1, "x"]), layer("b1", [2])
    docs = [{"_id": 1, "s": "$notapath"}, {"_id": "y", "o": {"$gt": 1}}]
    stages = views.view_stages([top, parent], {"k": 1}, base_hidden=[1], live_docs=docs)
    assert stages[:2] == [{"$match": {"k": 1}}, {"$match": {"_id": {"$nin": [1]}}}]
    assert not any("$unionWith" in s for s in stages)
    assert {"$literal": docs} in stages[3]["$project"]["__mb_live"]["$concatArrays"]
    assert views.view_stages([top], {"k": 1}, base_hidden=[], live_docs=[]) == \
        [{"$match": {"k": 1}}]


def test_each_layers_live_documents_lose_the_ids_hidden_above_it() -> None:
    top, parent = layer("b2", [1, "x"]), layer("b1", [2])
    live = [[{"_id": 1}, {"_id": 9}], [{"_id": 1}, {"_id": "x"}, {"_id": 2}, {"_id": 3}]]
    assert views.live_view([top, parent], live) == [{"_id": 1}, {"_id": 9}, {"_id": 2},
                                                    {"_id": 3}]
