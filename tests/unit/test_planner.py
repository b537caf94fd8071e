"""The read planner's decisions, in process (docs/ARCHITECTURE.md, "Reads"): each plan
kind chosen for the case it is for, with its reason, and the second planning steps
(a refused merged find falls back to the union; an aggregation's probe narrows it)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from bson import Int64

from proxy.branching import planner, views
from proxy.branching.errors import CommandError
from proxy.branching.model import NsState
from proxy.branching.planner import PlanKind, Source
from proxy.wire.codes import Code


def layer(bid: str, hidden: list[Any] | None = (), *, dropped: bool = False,
          coll: str = "items") -> NsState:
    state = NsState(bid=bid, db="app", coll=coll, base_dropped=dropped)
    if hidden is None:
        state.hidden_ids = None
    else:
        state.hide(list(hidden))
    return state


def find(**fields: Any) -> dict[str, Any]:
    return {"find": "items", **fields, "$db": "app"}


# -- find ---------------------------------------------------------------------------------

def test_a_collection_the_branch_never_changed_passes_through() -> None:
    plan = planner.plan_find(find(filter={"x": 1}), [])
    assert plan.kind is PlanKind.PASS
    assert "never changed items" in plan.reason
    assert plan.command == {"find": "items", "filter": {"x": 1}}


def test_an_id_no_layer_hides_passes_through_to_the_base() -> None:
    plan = planner.plan_find(find(filter={"_id": 3}, hint="x_1"), [layer("b2", [1]),
                                                                   layer("b1", [2])])
    assert plan.kind is PlanKind.PASS
    assert "the base collection holds it" in plan.reason
    assert plan.sources == (Source("items"),)


def test_an_id_a_layer_hides_is_a_point_lookup_on_that_overlay() -> None:
    top, parent = layer("b2", [1]), layer("b1", [2])
    # 1, 1.0 and Int64(1) are one _id under BSON equality.
    plan = planner.plan_find(find(filter={"_id": Int64(2)}, hint="x_1", batchSize=5),
                             [top, parent])
    assert plan.kind is PlanKind.POINT
    assert parent.live in plan.reason
    assert plan.sources == (Source(parent.live),)
    assert plan.command == {"find": parent.live, "filter": {"_id": Int64(2)}, "batchSize": 5,
                            "singleBatch": True}


def test_a_point_on_a_dropped_collection_reads_only_the_layer_that_dropped_it() -> None:
    top, mid, bottom = layer("b3"), layer("b2", dropped=True), layer("b1", [5])
    plan = planner.plan_find(find(filter={"_id": 5}), [top, mid, bottom])
    assert plan.kind is PlanKind.POINT and plan.sources == (Source(mid.live),)


def test_an_id_the_parent_view_hides_is_a_point_with_nothing_to_read() -> None:
    plan = planner.plan_find(find(filter={"_id": 1}), [layer("b2", [1]), layer("b1")],
                             skip_top_live=True)
    assert plan.kind is PlanKind.POINT
    assert plan.sources == () and plan.command is None
    assert "no collection can hold it" in plan.reason


def test_a_point_with_a_skip_is_a_merged_find_on_the_one_collection() -> None:
    top = layer("b1", [1])
    plan = planner.plan_find(find(filter={"_id": 1}, skip=1), [top])
    assert plan.kind is PlanKind.MERGED
    assert plan.sources == (Source(top.live),)
    assert "skip" in plan.reason


def test_a_collated_id_equality_is_not_a_point() -> None:
    # Under a case-insensitive collation {_id: "a"} also matches "A".
    top = layer("b1", ["a"])
    plan = planner.plan_find(find(filter={"_id": "a"}, collation={"locale": "en",
                                                                  "strength": 2}), [top])
    assert plan.kind is PlanKind.MERGED and len(plan.sources) == 2


@pytest.mark.parametrize("filt", [{"_id": {"$gt": 1}}, {"_id": 1, "x": 2}, {"x": 1},
                                  {"_id": [1]}, None])
def test_anything_but_an_id_equality_is_not_a_point(filt: Any) -> None:
    assert planner.point_sources("items", [layer("b1", [1])], filt) is None
    assert planner.plan_find(find(filter=filt), [layer("b1", [1])]).kind is PlanKind.MERGED


def test_a_point_needs_the_hidden_set_in_memory() -> None:
    assert planner.point_sources("items", [layer("b1", None)], {"_id": 1}) is None
    plan = planner.plan_find(find(filter={"_id": 1}), [layer("b1", None)])
    assert plan.kind is PlanKind.UNION and "too large to keep in memory" in plan.reason


def test_a_collection_the_branch_owns_outright_is_read_in_place() -> None:
    top = layer("b1", None, dropped=True)  # its hidden set does not matter then
    plan = planner.plan_find(find(filter={"x": 1}, sort={"x": 1}, hint="x_1",
                                  singleBatch=True), [top, layer("b0", [1])])
    assert plan.kind is PlanKind.IN_PLACE
    assert "owns items outright" in plan.reason
    assert plan.sources == (Source(top.live),)
    assert plan.command == {"find": top.live, "filter": {"x": 1}, "sort": {"x": 1},
                            "hint": "x_1"}


def test_a_parent_view_that_hides_nothing_is_the_base_itself() -> None:
    plan = planner.plan_find(find(filter={"x": 1}), [layer("b1")], skip_top_live=True)
    assert plan.kind is PlanKind.PASS
    assert plan.command == {"find": "items", "filter": {"x": 1}}


def test_a_parent_view_whose_hidden_set_is_not_in_memory_is_the_union() -> None:
    """A hidden set too large to cache (or set aside by a transaction, txn.py) may hide
    anything: the parent view a write copies from excludes it on the server."""
    plan = planner.plan_find(find(filter={"_id": {"$in": [3]}}), [layer("b1", None)],
                             skip_top_live=True)
    assert plan.kind is PlanKind.UNION
    assert plan.command is not None and layer("b1").hidden in repr(plan.command)


def test_finds_over_cached_hidden_sets_are_merged_from_every_collection() -> None:
    top, parent = layer("b2", [1]), layer("b1", [2])
    plan = planner.plan_find(find(filter={"x": 1}, sort={"x": -1}), [top, parent])
    assert plan.kind is PlanKind.MERGED
    assert "3 collections" in plan.reason and "merged by sort key" in plan.reason
    assert [s.coll for s in plan.sources] == ["items", top.live, parent.live]
    # The base loses what either layer hides; the parent's overlay what the top hides.
    assert [s.hidden_ids() for s in plan.sources] == [[1, 2], [], [1]]
    assert plan.command is None


@pytest.mark.parametrize(("fields", "reason"), [
    ({"projection": {"_id": 0}}, "drops _id"),
    ({"sort": {"x": 1}, "collation": {"locale": "fr"}}, "collation orders the sort"),
    ({"sort": {"score": {"$meta": "textScore"}}}, "$meta or $natural sort"),
    ({"sort": {"$natural": True}}, "$meta or $natural sort"),
    ({"sort": {"x": 1}, "projection": {"y": 0}}, "exclusion projection with a sort"),
    ({"filter": {"loc": {"$near": [0, 0]}}}, "$near"),
])
def test_finds_the_proxy_cannot_merge_take_the_server_side_union(fields: dict[str, Any],
                                                                  reason: str) -> None:
    top = layer("b1", [1])
    plan = planner.plan_find(find(**fields), [top])
    assert plan.kind is PlanKind.UNION
    assert reason in plan.reason
    assert plan.command is not None and plan.command["aggregate"] == "items"
    assert {"$unionWith": {"coll": top.live, "pipeline": [
        {"$match": fields.get("filter", {})}] if fields.get("filter") else []}} in \
        plan.command["pipeline"]


def test_a_tailable_find_has_no_view_form() -> None:
    with pytest.raises(CommandError) as info:
        planner.plan_find(find(tailable=True), [layer("b1", [1])], branch="dev")
    assert info.value.code == Code.COMMAND_NOT_SUPPORTED
    assert "'dev'" in str(info.value)


def test_a_refused_merged_find_falls_back_to_the_union() -> None:
    top = layer("b1", [1])
    cmd = find(filter={"x": 1}, sort={"x": 1}, limit=-3, batchSize=2)
    merged = planner.plan_find(cmd, [top])
    assert merged.kind is PlanKind.MERGED
    plan = planner.fall_back(merged, cmd, [top], "a side refused its getMore")
    assert plan.kind is PlanKind.UNION
    assert plan.reason.startswith("the merged plan failed (a side refused its getMore)")
    assert plan.command == {
        "aggregate": "items", "cursor": {"batchSize": 2},
        "pipeline": [{"$match": {"x": 1}}, {"$match": {"_id": {"$nin": [1]}}},
                     {"$unionWith": {"coll": top.live, "pipeline": [{"$match": {"x": 1}}]}},
                     {"$sort": {"x": 1}}, {"$limit": 3}]}


def test_a_merged_find_whose_projection_the_union_cannot_carry_falls_back_to_a_refetch() -> None:
    top = layer("b1", [1])
    cmd = find(projection={"tags.$": 1})
    merged = planner.plan_find(cmd, [top], branch="dev")
    assert merged.kind is PlanKind.MERGED  # the upstream evaluates it on each side
    plan = planner.fall_back(merged, cmd, [top], "refused", branch="dev")
    assert plan.kind is PlanKind.UNION and plan.refetch
    assert "the positional projection is a find's" in plan.reason
    assert plan.command is not None and plan.command["pipeline"][-1] == {"$project": {"_id": 1}}


@pytest.mark.parametrize("projection", [{"a": {"$slice": 2}, "_id": 0},
                                        {"a": {"$elemMatch": {"x": 1}}, "_id": False}])
def test_an_unmergeable_find_only_projection_is_a_refetch_whose_union_picks_ids(
        projection: dict[str, Any]) -> None:
    plan = planner.plan_find(find(projection=projection, sort={"k": 1}, skip=2, limit=3),
                             [layer("b1", [1])])
    assert plan.kind is PlanKind.UNION and plan.refetch
    assert plan.command is not None
    assert plan.command["pipeline"][-4:] == [{"$sort": {"k": 1}}, {"$skip": 2}, {"$limit": 3},
                                             {"$project": {"_id": 1}}]


def test_show_record_id_is_a_refetch_and_index_bound_finds_are_merged() -> None:
    top = layer("b1", [1])
    assert planner.plan_find(find(showRecordId=True), [top]).refetch
    for option in ({"returnKey": True, "hint": {"k": -1}}, {"min": {"k": 1}, "hint": {"k": 1}},
                   {"max": {"k": 1}}, {"min": {"_id": 1}, "hint": {"_id": 1},
                                       "filter": {"_id": 1}}):
        plan = planner.plan_find(find(**option), [top], branch="dev")
        assert plan.kind is PlanKind.MERGED and len(plan.sources) == 2
    assert planner.merge_sort(find(min={"k": 1}, hint={"k": -1})) == {"k": -1}
    assert planner.merge_sort(find(min={"k": 1}, hint={"k": -1}, sort={"j": 1})) == {"j": 1}
    # No key order to merge by, or no hidden set to drop in memory: the find runs as it
    # is on a copy of the branch view (commands/read.py).
    for option in ({"returnKey": True}, {"returnKey": True, "hint": "k_1"},
                   {"min": {"k": 1}, "hint": {"k": "2d"}},
                   {"min": {"x": 1}, "hint": {"x": "hashed"}}):
        plan = planner.plan_find(find(**option), [top], branch="dev")
        assert plan.kind is PlanKind.COPY and "hint" in plan.reason, option
    plan = planner.plan_find(find(min={"k": 1}, hint={"k": 1}), [layer("b1", None)])
    assert plan.kind is PlanKind.COPY and "too large" in plan.reason


def test_a_tailable_find_tails_only_a_collection_one_upstream_collection_holds() -> None:
    cmd = find(tailable=True, awaitData=True)
    assert planner.plan_tailable(cmd, []).kind is PlanKind.PASS
    owned = layer("b1", dropped=True)
    plan = planner.plan_tailable(cmd, [owned])
    assert plan.kind is PlanKind.IN_PLACE
    assert plan.command == {"find": owned.live, "tailable": True, "awaitData": True}
    changed = planner.plan_tailable(cmd, [layer("b1", [1])])
    assert changed.kind is PlanKind.UNION and changed.command is None


def test_each_planned_read_logs_one_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    top = layer("b1", [1])
    with caplog.at_level(logging.DEBUG, logger="mongobranch.planner"):
        plan = planner.plan_find(find(filter={"x": 1}), [top])
        planner.fall_back(plan, find(filter={"x": 1}), [top], "refused")
    lines = [r.getMessage() for r in caplog.records if r.name == "mongobranch.planner"]
    assert len(lines) == 2
    assert lines[0].startswith("find app.items: merged: plain finds on 2 collections")
    assert lines[1].startswith("find app.items: union: the merged plan failed")


def test_the_explain_field_names_the_plan_and_what_is_explained() -> None:
    plan = planner.plan_find(find(filter={"x": 1}), [layer("b1", [1])])
    assert plan.explain(PlanKind.UNION) == {"plan": "merged", "reason": plan.reason,
                                            "explained": "union"}
    assert plan.explain()["explained"] == "merged"


# -- count and distinct -------------------------------------------------------------------

def test_count_plans() -> None:
    top, parent = layer("b2", [1]), layer("b1", [2])
    assert planner.plan_count({"count": "items"}, []).kind is PlanKind.PASS
    merged = planner.plan_count({"count": "items", "query": {"x": 1}}, [top, parent])
    assert merged.kind is PlanKind.MERGED and "counts summed" in merged.reason
    assert [s.hidden_ids() for s in merged.sources] == [[1, 2], [], [1]]
    owned = planner.plan_count({"count": "items"}, [layer("b3", None, dropped=True), top])
    assert owned.kind is PlanKind.IN_PLACE and owned.sources[0].coll.endswith("_l_items")
    union = planner.plan_count({"count": "items", "query": {"x": 1}, "skip": 2, "limit": 5,
                                "hint": "x_1"}, [layer("b3", None), parent])
    assert union.kind is PlanKind.UNION and "too large" in union.reason
    assert union.command is not None and union.command["hint"] == "x_1"
    assert union.command["pipeline"][-3:] == [{"$skip": 2}, {"$limit": 5}, {"$count": "n"}]


def test_distinct_plans() -> None:
    top = layer("b1", [1])
    # An untouched collection: the upstream answers, and refuses a bad key in its words.
    assert planner.plan_distinct({"distinct": "items", "key": 5}, []).kind is PlanKind.PASS
    with pytest.raises(CommandError) as info:
        planner.plan_distinct({"distinct": "items", "key": 5}, [top])
    assert info.value.code == Code.TYPE_MISMATCH
    merged = planner.plan_distinct({"distinct": "items", "key": "k"}, [top])
    assert merged.kind is PlanKind.MERGED and "deduplicated" in merged.reason
    union = planner.plan_distinct({"distinct": "items", "key": "k"}, [layer("b1", None)])
    assert union.kind is PlanKind.UNION and union.command is not None
    assert union.command["pipeline"][-1] == {"$group": {"_id": None,
                                                        "v": {"$addToSet": "$k"}}}
    with pytest.raises(CommandError):
        planner.plan_distinct({"distinct": "items", "key": "a.b"}, [layer("b1", None)])


# -- aggregate ----------------------------------------------------------------------------

def layers_of(known: dict[str, list[NsState]]) -> planner.LayersOf:
    return lambda coll: known.get(coll, [])


def test_an_aggregate_reading_nothing_changed_passes_through() -> None:
    cmd = {"aggregate": "items", "pipeline": [{"$match": {"x": 1}}], "cursor": {}, "$db": "app"}
    plan = planner.plan_aggregate(cmd, layers_of({}))
    assert plan.kind is PlanKind.PASS
    assert plan.command == {"aggregate": "items", "cursor": {},
                            "pipeline": [{"$match": {"x": 1}}]}


def test_an_unchanged_source_joining_a_changed_collection_reads_its_view() -> None:
    other = layer("b1", [1], coll="other")
    cmd = {"aggregate": "items", "cursor": {}, "pipeline": [
        {"$unionWith": {"coll": "other", "pipeline": [{"$match": {"y": 2}}]}}]}
    plan = planner.plan_aggregate(cmd, layers_of({"other": [other]}))
    assert plan.kind is PlanKind.UNION and "items is unchanged" in plan.reason
    assert plan.command is not None
    inner = plan.command["pipeline"][0]["$unionWith"]["pipeline"]
    assert {"$unionWith": {"coll": other.live, "pipeline": []}} in inner


def test_an_aggregate_on_a_collection_the_branch_owns_runs_in_place() -> None:
    """With its hint: the branch's own collection holds the indexes the branch shows
    (one it made after refilling the collection, say), and mongod applies a hint."""
    top = layer("b1", dropped=True)
    cmd = {"aggregate": "items", "pipeline": [], "cursor": {}, "hint": "x_1"}
    plan = planner.plan_aggregate(cmd, layers_of({"items": [top]}))
    assert plan.kind is PlanKind.IN_PLACE
    assert plan.command == {"aggregate": top.live, "cursor": {}, "pipeline": [], "hint": "x_1"}


def test_an_aggregate_over_an_ancestors_whole_collection_goes_without_the_hint() -> None:
    """The union reads the ancestor's collection, not the one the hint was written for."""
    cmd = {"aggregate": "items", "pipeline": [], "cursor": {}, "hint": "x_1"}
    plan = planner.plan_aggregate(cmd, layers_of({"items": [layer("b2", [1]),
                                                            layer("b1", dropped=True)]}))
    assert plan.kind is not PlanKind.IN_PLACE
    assert plan.command is not None and "hint" not in plan.command


def test_an_aggregate_over_a_small_hidden_set_inlines_the_view_without_a_probe() -> None:
    top = layer("b1", [1, 2])
    cmd = {"aggregate": "items", "pipeline": [{"$match": {"x": 1}}, {"$count": "n"}]}
    plan = planner.plan_aggregate(cmd, layers_of({"items": [top]}))
    assert plan.kind is PlanKind.UNION and "$nin" in plan.reason
    assert plan.probe is None
    assert plan.command is not None and plan.command["pipeline"] == [
        {"$match": {"x": 1}}, {"$match": {"_id": {"$nin": [1, 2]}}},
        {"$unionWith": {"coll": top.live, "pipeline": [{"$match": {"x": 1}}]}},
        {"$count": "n"}]


def test_a_large_hidden_set_and_a_leading_match_ask_for_a_probe() -> None:
    big = layer("b1", list(range(views.NIN_LIMIT + 1)))
    cmd = {"aggregate": "items", "pipeline": [{"$match": {"x": 1}}, {"$count": "n"}],
           "hint": "x_1", "lsid": {"id": 1}}
    plan = planner.plan_aggregate(cmd, layers_of({"items": [big]}))
    assert plan.kind is PlanKind.UNION and "anti-join" in plan.reason
    assert plan.probe == planner.Probe("items", {"x": 1}, [{"$count": "n"}], literal=True)
    # Without the second step the anti-join answers.
    assert plan.command is not None and "$lookup" in plan.command["pipeline"][1]
    base_probe = planner.probe_find(cmd, "items", {"x": 1}, base=True)
    assert base_probe["hint"] == "x_1" and base_probe["limit"] == planner.NARROW_LIMIT + 1
    assert "projection" in base_probe
    live_probe = planner.probe_find(cmd, big.live, {"x": 1}, base=False)
    assert "hint" not in live_probe and "projection" not in live_probe
    no_match = {"aggregate": "items", "pipeline": [{"$count": "n"}]}
    assert planner.plan_aggregate(no_match, layers_of({"items": [big]})).probe is None


def test_the_probe_narrows_the_exclusion_and_inlines_the_live_matches() -> None:
    big = layer("b1", list(range(views.NIN_LIMIT + 1)))
    cmd = {"aggregate": "items", "pipeline": [{"$match": {"x": 1}}, {"$count": "n"}]}
    plan = planner.plan_aggregate(cmd, layers_of({"items": [big]}))
    selected = [{"_id": 3, planner.SIZE: 40}, {"_id": 10_000, planner.SIZE: 40}]
    base = planner.narrow([big], selected)
    assert base == planner.Narrowed([3], 2, 80)
    live = [[{"_id": 3, "x": 1}]]
    assert planner.literal_fits(base, live)
    final = planner.replan(plan, [big], base, live)
    assert final.kind is PlanKind.UNION and final.probe is None
    assert "selects 2 base documents, 1 of them hidden" in final.reason
    assert "literal" in final.reason
    assert final.command is not None
    stages = final.command["pipeline"]
    assert stages[:2] == [{"$match": {"x": 1}}, {"$match": {"_id": {"$nin": [3]}}}]
    assert not any("$unionWith" in s or "$lookup" in s for s in stages)
    assert stages[-1] == {"$count": "n"}
    # Too many live matches for a literal: the overlay is unioned instead.
    unioned = planner.replan(plan, [big], base, None)
    assert unioned.command is not None
    assert any("$unionWith" in s for s in unioned.command["pipeline"])
    assert "each overlay a $unionWith" in unioned.reason


def test_the_probe_keeps_the_anti_join_when_the_match_selects_too_much() -> None:
    big = layer("b1", list(range(2 * views.NIN_LIMIT)))
    assert planner.narrow([big], None) is None  # refused, or more than one batch
    many = [{"_id": i} for i in range(planner.NARROW_LIMIT + 1)]
    assert planner.narrow([big], many) is None
    hidden = [{"_id": i} for i in range(views.NIN_LIMIT + 1)]
    assert planner.narrow([big], hidden) is None  # too many hidden among them for $nin
    plan = planner.plan_aggregate({"aggregate": "items", "pipeline": [{"$match": {}}]},
                                  layers_of({"items": [big]}))
    assert planner.replan(plan, [big], None, None) is plan
    base = planner.Narrowed([], 10, 100)
    assert not planner.literal_fits(base, [[{"_id": i} for i in range(views.INJECT_DOCS + 1)]])


def test_aggregate_refusals_and_malformed_pipelines() -> None:
    changed = {"items": [layer("b1", [1])]}
    with pytest.raises(CommandError) as info:
        planner.plan_aggregate({"aggregate": "items", "pipeline": {}}, layers_of(changed))
    assert info.value.code == Code.TYPE_MISMATCH
    with pytest.raises(CommandError) as info:
        planner.plan_aggregate({"aggregate": "x", "pipeline": [{"$graphLookup": {
            "from": "items"}}]}, layers_of(changed), branch="dev")
    assert info.value.code == Code.COMMAND_NOT_SUPPORTED and "$graphLookup" in str(info.value)
    with pytest.raises(CommandError) as info:
        planner.plan_aggregate({"aggregate": "x", "pipeline": [{"$merge": "y"}, {"$count": "n"}]},
                               layers_of({}))
    assert info.value.code == Code.MERGE_NOT_LAST


@pytest.mark.parametrize("cmd", [
    find(filter={"_id": 3}), find(filter={"_id": 1}), find(filter={"_id": Int64(2)}),
    find(filter={"_id": 2.0}), find(filter={"_id": "x"}), find(filter={"_id": {"$gt": 1}}),
    find(filter={"_id": 3, "v": 1}), find(filter={"_id": 3}, skip=1),
    find(filter={"_id": 3}, collation={"locale": "fr"}), find(filter={"_id": 3}, min={"_id": 1}),
    find(filter={"x": 1}), find(), find(filter={"_id": 3}, limit=1, singleBatch=True),
])
@pytest.mark.parametrize("layers", [
    [], [layer("b1", [1])], [layer("b2", [1]), layer("b1", [2])], [layer("b1", [], dropped=True)],
    [layer("b1", None)], [layer("b1", [3])],
], ids=["none", "one", "two", "dropped", "uncached", "hides-3"])
def test_passes_never_says_pass_where_plan_find_does_not(cmd: dict[str, Any],
                                                         layers: list[NsState]) -> None:
    """The inline path's cheap test (planner.passes) says pass-through only where
    plan_find does; for a point or an untouched collection it says so too."""
    try:
        planned = planner.plan_find(cmd, layers).kind is PlanKind.PASS
    except CommandError:  # refused: the usual path answers with the refusal
        planned = False
    quick = planner.passes(cmd, layers)
    assert not quick or planned
    point = planner.point_id(cmd.get("filter")) is not None
    if not layers or (point and not cmd.get("skip") and not planner.collated(cmd)
                      and not planner.index_bound(cmd)):
        assert quick == planned
