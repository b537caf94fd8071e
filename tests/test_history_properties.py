"""Properties of history, with hypothesis (derandomized, few examples: the file runs in
well under 90 s) against the real proxy:

(a) the state at an LSN, rebuilt from the WAL (a branch created `at` it), equals the
    state the branch showed when its log stood there, resets in between included;
(b) after a merge the diff is empty and the parent holds exactly the branch's data;
(c) a reset to n gives exactly the state of a branch created at n;
(d) every kind of concurrent parent change is a conflict;
(e) a merge killed midway (SIGKILL of the proxy) and re-run ends exactly as an
    uninterrupted merge of an identical setup.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pymongo import MongoClient
from pymongo.errors import DuplicateKeyError

from tests.branchutil import Branches, branches, unique
from tests.historyutil import contents, diff, entries, merge, ok
from tests.servers import ProxyProcess, Secantus


def examples(n: int) -> Any:
    """Deterministic (derandomized) and bounded: every example runs real servers, so no
    shrinking either (a failure prints its full example)."""
    return settings(deadline=None, derandomize=True, max_examples=n, database=None,
                    phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


COLLS = ("a", "b")
IDS = st.integers(0, 5)
VALUES = st.integers(0, 3)
WRITE = st.one_of(
    st.tuples(st.just("insert"), st.sampled_from(COLLS), IDS, VALUES),
    st.tuples(st.just("update"), st.sampled_from(COLLS), IDS, VALUES),
    st.tuples(st.just("delete"), st.sampled_from(COLLS), IDS),
    st.tuples(st.just("inc_many"), st.sampled_from(COLLS), VALUES),
    st.tuples(st.just("delete_many"), st.sampled_from(COLLS), VALUES),
)
# A reset to one of the points recorded so far (index taken modulo their number).
RESET = st.tuples(st.just("reset"), st.integers(0, 20))


def seed(client: MongoClient, db: str) -> None:
    for coll in COLLS:
        client[db][coll].insert_many([{"_id": i, "v": i % 3, "coll": coll} for i in range(4)])


def apply(db: Any, op: tuple[Any, ...]) -> None:
    kind, coll = op[0], db[op[1]]
    if kind == "insert":
        with contextlib.suppress(DuplicateKeyError):
            coll.insert_one({"_id": op[2], "v": op[3], "new": True})
    elif kind == "update":
        coll.update_one({"_id": op[2]}, {"$set": {"v": op[3]}})
    elif kind == "delete":
        coll.delete_one({"_id": op[2]})
    elif kind == "inc_many":
        coll.update_many({"v": {"$gte": op[2]}}, {"$inc": {"n": 1}})
    elif kind == "delete_many":
        coll.delete_many({"v": op[2]})
    else:
        raise AssertionError(op)


def view(uri: str, db: str) -> dict[str, list[dict[str, Any]]]:
    with MongoClient(uri) as c:
        return {coll: contents(c[db][coll]) for coll in COLLS}


def newest(proxy: ProxyProcess, name: str) -> dict[str, Any] | None:
    got = entries(proxy, name, limit=1)
    return got[0] if got else None


# -- (a) and (c): points in history ------------------------------------------------------

@examples(15)
@given(ops=st.lists(st.one_of(WRITE, WRITE, WRITE, RESET), min_size=1, max_size=9),
       targets=st.lists(st.integers(0, 20), min_size=1, max_size=3))
def test_points_in_history(proxy: ProxyProcess, ops: list[tuple[Any, ...]],
                           targets: list[int]) -> None:
    """(a) a branch created at each observed LSN holds what was observed there; (c) a
    reset to it gives the same state, also after resets to later or earlier points."""
    db = unique("hprop").replace("-", "_")
    with MongoClient(proxy.uri) as main, branches(proxy) as made:
        seed(main, db)
        source = made.create()
        name = source["name"]
        observed: dict[int, dict[str, list[dict[str, Any]]]] = {}
        with MongoClient(source["uri"]) as c:
            for op in ops:
                if op[0] == "reset":
                    if not observed:
                        continue
                    lsn = sorted(observed)[op[1] % len(observed)]
                    ok(proxy, "POST", f"/branches/{name}/reset", {"to": lsn})
                    assert view(source["uri"], db) == observed[lsn], ("reset", lsn)
                    continue
                apply(c[db], op)
                entry = newest(proxy, name)
                if entry is not None and entry["visible"]:
                    # The newest entry is this write's (or, for a write that changed
                    # nothing, the last one's, with the same view).
                    observed[entry["lsn"]] = view(source["uri"], db)
        if not observed:
            return
        points = sorted(observed)
        at_branches = {}
        for lsn in points:  # (a)
            at = made.create(**{"from": name, "at": lsn})
            at_branches[lsn] = at
            assert at["fork_lsn"] == lsn
            assert view(at["uri"], db) == observed[lsn], ("at", lsn)
        for target in targets:  # (c)
            lsn = points[target % len(points)]
            ok(proxy, "POST", f"/branches/{name}/reset", {"to": lsn})
            assert view(source["uri"], db) == view(at_branches[lsn]["uri"], db) == \
                observed[lsn], ("reset", lsn)
        # The branches made at each point kept their state through the source's resets.
        for lsn, at in at_branches.items():
            assert view(at["uri"], db) == observed[lsn], ("kept", lsn)


# -- (b): merge ------------------------------------------------------------------------------

DDL = st.one_of(st.tuples(st.just("drop"), st.sampled_from(COLLS)),
                st.tuples(st.just("index"), st.sampled_from(COLLS)))


def apply_any(db: Any, op: tuple[Any, ...]) -> None:
    if op[0] == "drop":
        db[op[1]].drop()
    elif op[0] == "index":
        db[op[1]].create_index("v", name="v_1")
    else:
        apply(db, op)


@examples(20)
@given(into_branch=st.booleans(),
       before=st.lists(WRITE, max_size=3),
       mine=st.lists(st.one_of(WRITE, WRITE, WRITE, DDL), min_size=1, max_size=8),
       theirs=st.lists(WRITE, max_size=4))
def test_after_a_merge_the_parent_equals_the_branch(
        proxy: ProxyProcess, into_branch: bool, before: list[tuple[Any, ...]],
        mine: list[tuple[Any, ...]], theirs: list[tuple[Any, ...]]) -> None:
    """(b) with 'ours', whatever the parent did meanwhile: the diff is empty, every
    document the branch changed is in the parent as the branch has it, a collection the
    branch replaced is the branch's, and the rest of the parent is as it was (the branch
    is a snapshot: the parent's own later changes never showed in it and stay)."""
    db = unique("hmerge").replace("-", "_")
    with MongoClient(proxy.uri) as main, branches(proxy) as made:
        seed(main, db)
        if into_branch:
            parent = made.create()
            with MongoClient(parent["uri"]) as p:
                for op in before:
                    apply(p[db], op)
            parent_uri, parent_name = parent["uri"], parent["name"]
        else:
            parent_uri, parent_name = proxy.uri, "main"
        child = made.create(**{"from": parent_name})
        with MongoClient(child["uri"]) as c:
            for op in mine:
                apply_any(c[db], op)
        with MongoClient(parent_uri) as p:
            for op in theirs:
                apply(p[db], op)
        pending = diff(proxy, child["name"])["changes"]
        changed = {(c["ns"].split(".", 1)[1], repr(c["_id"])) for c in pending if "op" in c}
        replaced = {c["ns"].split(".", 1)[1] for c in pending if "collection" in c}
        with MongoClient(parent_uri) as p:
            parent_before = {coll: {repr(d["_id"]): d for d in p[db][coll].find()}
                             for coll in COLLS}
        dry = merge(proxy, child["name"], strategy="ours", dry_run=True)
        result = merge(proxy, child["name"], into=parent_name, strategy="ours")
        assert result["applied"] == dry["applied"]
        assert diff(proxy, child["name"])["changes"] == []
        with MongoClient(child["uri"]) as c, MongoClient(parent_uri) as p:
            assert sorted(c[db].list_collection_names()) == \
                sorted(p[db].list_collection_names())
            for coll in COLLS:
                if coll in replaced:
                    assert contents(c[db][coll]) == contents(p[db][coll]), coll
                else:
                    mine = {repr(d["_id"]): d for d in c[db][coll].find()}
                    theirs = {repr(d["_id"]): d for d in p[db][coll].find()}
                    for key in set(mine) | set(theirs) | set(parent_before[coll]):
                        want = mine if (coll, key) in changed else parent_before[coll]
                        assert theirs.get(key) == want.get(key), (coll, key)
                assert sorted(ix["name"] for ix in c[db][coll].list_indexes()) == \
                    sorted(ix["name"] for ix in p[db][coll].list_indexes()), coll
        # Nothing is left to merge.
        again = merge(proxy, child["name"])
        assert again["applied"] == {"insert": 0, "update": 0, "delete": 0}
        assert again["conflicts"] == [] and again["collections"] == []


# -- (d): conflicts ----------------------------------------------------------------------------

BRANCH_OPS = ("update", "delete")
PARENT_OPS = ("none", "update", "delete", "reinsert")


@examples(20)
@given(into_branch=st.booleans(),
       existing=st.lists(st.tuples(st.sampled_from(BRANCH_OPS), st.sampled_from(PARENT_OPS)),
                         min_size=1, max_size=6),
       inserted=st.lists(st.booleans(), max_size=3))
def test_every_concurrent_parent_change_is_a_conflict(
        proxy: ProxyProcess, into_branch: bool, existing: list[tuple[str, str]],
        inserted: list[bool]) -> None:
    """(d) For each base document the branch updates or deletes, the parent updates it,
    deletes it, deletes and re-inserts it (other content), or leaves it; the branch also
    inserts new ids, some of which the parent inserts too. Every parent change is a
    conflict, except a delete on both sides (the same outcome); nothing else is."""
    db = unique("hconf").replace("-", "_")
    with MongoClient(proxy.uri) as main, branches(proxy) as made:
        main[db].items.insert_many([{"_id": i, "v": "base"} for i in range(len(existing))])
        if into_branch:
            parent = made.create()
            parent_uri, parent_name = parent["uri"], parent["name"]
        else:
            parent_uri, parent_name = proxy.uri, "main"
        child = made.create(**{"from": parent_name})
        expected = set()
        with MongoClient(child["uri"]) as c, MongoClient(parent_uri) as p:
            mine, theirs = c[db].items, p[db].items
            for i, (branch_op, parent_op) in enumerate(existing):
                if branch_op == "update":
                    mine.update_one({"_id": i}, {"$set": {"v": f"branch-{i}"}})
                else:
                    mine.delete_one({"_id": i})
                if parent_op == "update":
                    theirs.update_one({"_id": i}, {"$set": {"v": f"parent-{i}"}})
                elif parent_op == "delete":
                    theirs.delete_one({"_id": i})
                elif parent_op == "reinsert":
                    theirs.delete_one({"_id": i})
                    theirs.insert_one({"_id": i, "v": f"again-{i}"})
                if parent_op != "none" and not (branch_op == parent_op == "delete"):
                    expected.add(i)
            for j, also in enumerate(inserted):
                new_id = f"new-{j}"
                mine.insert_one({"_id": new_id, "v": "branch"})
                if also:
                    theirs.insert_one({"_id": new_id, "v": "parent"})
                    expected.add(new_id)
        before = view_items(parent_uri, db)
        dry = merge(proxy, child["name"], dry_run=True)
        assert {c["_id"] for c in dry["conflicts"]} == expected
        if expected:
            status, body = proxy.api("POST", f"/branches/{child['name']}/merge", {})
            assert status == 409 and isinstance(body, dict)
            assert {c["_id"] for c in body["conflicts"]} == expected
            assert view_items(parent_uri, db) == before  # abort changed nothing
        theirs_result = merge(proxy, child["name"], strategy="theirs")
        assert theirs_result["skipped_conflicts"] == len(expected)
        after = {d["_id"]: d for d in view_items(parent_uri, db)}
        for key in expected:  # the parent's version stays
            assert after.get(key) == next((d for d in before if d["_id"] == key), None)


def view_items(uri: str, db: str) -> list[dict[str, Any]]:
    with MongoClient(uri) as c:
        return contents(c[db].items)


# -- (e): a merge killed midway ------------------------------------------------------------

BASE = 300
NEW = 3000


@pytest.fixture()
def own_proxy(upstream: Secantus) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(upstream.uri, meta_db=unique("mb_kill").replace("-", "_")).start()
    yield proc
    proc.stop()


def _prepare(proxy: ProxyProcess, made: Branches, db: str) -> dict[str, Any]:
    """A base of BASE documents; a branch that updates a third of them, deletes a
    third and inserts NEW documents."""
    with MongoClient(proxy.uri) as main:
        main[db].items.insert_many([{"_id": i, "v": 0} for i in range(BASE)])
    branch = made.create()
    with MongoClient(branch["uri"]) as c:
        items = c[db].items
        items.update_many({"_id": {"$lt": BASE // 3}}, {"$set": {"v": 1}})
        items.delete_many({"_id": {"$gte": 2 * BASE // 3}})
        items.insert_many([{"_id": BASE + i, "v": 2, "pad": "x" * 200} for i in range(NEW)])
    return branch


def test_a_merge_killed_midway_then_rerun_is_a_merge(own_proxy: ProxyProcess) -> None:
    """(e) SIGKILL while a merge of NEW + BASE changes is writing, restart, merge again:
    the parent ends exactly as after an uninterrupted merge of an identical setup."""
    proxy = own_proxy
    killed_db, clean_db = (unique(p).replace("-", "_") for p in ("hkill", "hclean"))
    with branches(proxy) as made:
        killed = _prepare(proxy, made, killed_db)
        clean = _prepare(proxy, made, clean_db)
        merge(proxy, clean["name"])
        with MongoClient(proxy.uri) as main:
            want = contents(main[clean_db].items)
            assert len(want) == BASE - BASE // 3 + NEW

        outcome: dict[str, Any] = {}

        def run_merge() -> None:
            try:
                outcome["reply"] = proxy.api("POST", f"/branches/{killed['name']}/merge", {})
            except OSError as exc:  # the proxy died under the request
                outcome["error"] = exc

        worker = threading.Thread(target=run_merge)
        with MongoClient(proxy.upstream, directConnection=True) as direct:
            items = direct[killed_db].items
            initial = items.count_documents({})
            worker.start()
            # Kill as soon as the merge has written part of the new documents.
            while items.count_documents({}) == initial and worker.is_alive():
                time.sleep(0.005)
            proxy.kill()
            worker.join(60)
            assert "error" in outcome, f"the merge finished before the kill: {outcome}"
            partial = contents(items)
            assert partial != want  # really interrupted midway
            state = direct[proxy.meta_db]["merges"].find_one({"_id": killed["name"]})
            assert state is not None and state["status"] == "running"

        proxy.start()
        result = merge(proxy, killed["name"])
        assert result["conflicts"] == []
        with MongoClient(proxy.uri) as main:
            # The same documents, whatever the database they sit in.
            assert contents(main[killed_db].items) == want
        assert diff(proxy, killed["name"])["changes"] == []
        with MongoClient(proxy.upstream, directConnection=True) as direct:
            state = direct[proxy.meta_db]["merges"].find_one({"_id": killed["name"]})
            assert state is not None and state["status"] == "done"
