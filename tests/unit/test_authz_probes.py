"""Which probes judge a transaction's statement (authz._statement_probes): every action
the statement needs, on the namespaces the client named, and only probes that change
nothing or run in a transaction of their own."""

from __future__ import annotations

from typing import Any

from proxy.branching.authz import _statement_probes


def _kinds(db: str, cmd: dict[str, Any]) -> list[tuple[str, str, Any, bool]]:
    return [(pdb, next(iter(p)), p[next(iter(p))], writes)
            for pdb, p, writes in _statement_probes(db, cmd)]


def test_reads_are_probed_with_what_matches_nothing() -> None:
    assert _kinds("app", {"find": "c", "filter": {"x": 1}}) == [("app", "find", "c", False)]
    assert _kinds("app", {"distinct": "c", "key": "x"}) == [("app", "distinct", "c", False)]
    (_, probe, writes), = _statement_probes("app", {"aggregate": "c", "pipeline": [
        {"$lookup": {"from": "other", "localField": "a", "foreignField": "b", "as": "o"}}]})
    assert not writes
    assert probe["pipeline"][0] == {"$match": {"_id": {"$in": []}}}
    assert probe["pipeline"][1]["$lookup"]["from"] == "other"
    assert probe["pipeline"][-1] == {"$limit": 1}
    (_, probe, _), = _statement_probes("app", {"aggregate": 1, "pipeline": [
        {"$documents": [{"a": 1}]}, {"$unionWith": "c"}]})
    assert [next(iter(s)) for s in probe["pipeline"]] == ["$documents", "$match",
                                                          "$unionWith", "$limit"]


def test_writes_are_probed_per_action() -> None:
    assert _kinds("app", {"insert": "c", "documents": [{}]}) == [("app", "insert", "c", True)]
    assert _kinds("app", {"update": "c", "updates": [{"q": {}, "u": {}}]}) \
        == [("app", "update", "c", False)]
    assert _kinds("app", {"update": "c", "updates": [{"q": {}, "u": {}, "upsert": True}]}) \
        == [("app", "update", "c", False), ("app", "insert", "c", True)]
    assert _kinds("app", {"delete": "c", "deletes": [{"q": {}, "limit": 0}]}) \
        == [("app", "delete", "c", False)]
    assert _kinds("app", {"findAndModify": "c", "remove": True}) \
        == [("app", "find", "c", False), ("app", "delete", "c", False)]
    assert _kinds("app", {"findAndModify": "c", "update": {}, "upsert": True}) \
        == [("app", "find", "c", False), ("app", "update", "c", False),
            ("app", "insert", "c", True)]
    update = next(p for _, p, _ in _statement_probes(
        "app", {"update": "c", "updates": [{"q": {}, "u": {}}], "bypassDocumentValidation": True}))
    assert update["bypassDocumentValidation"] is True
    assert update["updates"][0]["q"] == {"_id": {"$in": []}}


def test_a_client_bulk_write_is_probed_on_each_namespace() -> None:
    cmd = {"bulkWrite": 1, "nsInfo": [{"ns": "a.x"}, {"ns": "b.y"}],
           "ops": [{"insert": 0, "document": {}}, {"update": 1, "filter": {}, "updateMods": {},
                                                   "upsert": True},
                   {"delete": 0, "filter": {}}, {"insert": 7, "document": {}}]}
    assert _kinds("admin", cmd) == [("a", "insert", "x", True), ("b", "update", "y", False),
                                    ("b", "insert", "y", True), ("a", "delete", "x", False)]


def test_creations_are_probed_in_a_transaction_without_the_clients_session() -> None:
    cmd = {"create": "c", "validator": {}, "lsid": {"id": 1}, "txnNumber": 3,
           "autocommit": False}
    (db, probe, writes), = _statement_probes("app", cmd)
    assert (db, writes) == ("app", True)
    assert probe == {"create": "c", "validator": {}}
