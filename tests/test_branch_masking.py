"""Masked branches: every way a driver reads a masked field through a masked branch's port
shows it masked, or is refused with an error naming masking; the main port and unmasked
branches show the real values."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bson import json_util
from pymongo import MongoClient, ReturnDocument
from pymongo.errors import OperationFailure

from proxy.branching import masking
from tests.branchutil import Branches, branches, unique
from tests.servers import ProxyProcess, Secantus

DB = "mask_app"
NODE_DIR = Path(__file__).parent / "node"
NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper"]
CONFIG = f"""
[masking."{DB}.users"]
email = "hash"
name = "fake:names"
ssn = "redact"
"profile.phone" = "null"
tags = "hash"

[masking."{DB}.summaries"]
label = "redact"

[masking."{DB}.orders"]
card = "redact"
email = "hash"

[masking_lists]
names = {json.dumps(NAMES)}
"""

USERS = [
    {"_id": 1, "email": "alice@real.example", "name": "Alice Real", "ssn": "111-22-3333",
     "profile": {"phone": "+1-555-0101", "city": "Paris"}, "tags": ["vip-secret", "x"],
     "age": 31},
    {"_id": 2, "email": "bob@real.example", "name": "Bob Real", "ssn": "222-33-4444",
     "profile": {"city": "Oslo"}, "age": 45},
    {"_id": 3, "email": "carol@real.example", "name": "Carol Real", "ssn": "333-44-5555",
     "profile": [{"phone": "+1-555-0303"}, {"phone": "+1-555-0304", "kind": "work"}],
     "age": 27},
]
ORDERS = [{"_id": 10, "user": 1, "email": "alice@real.example", "card": "4111-1111",
           "total": 5},
          {"_id": 11, "user": 3, "email": "carol@real.example", "card": "4222-2222",
           "total": 7}]
SECRETS = ["alice@real", "bob@real", "carol@real", "Alice Real", "Bob Real", "Carol Real",
           "111-22", "222-33", "333-44", "555-01", "555-03", "vip-secret", "4111-", "4222-",
           "dave@real", "Dave Real", "444-55", "555-04", "dave2@real", "erin@real",
           "Erin Real", "555-66", "4333-", "zed@real"]
DAVE = {"_id": 4, "email": "dave@real.example", "name": "Dave Real", "ssn": "444-55-6666",
        "profile": {"phone": "+1-555-0404", "city": "Rome"}, "tags": ["vip-secret-d"],
        "age": 20}


def leaked(value: Any) -> list[str]:
    """The real values that appear anywhere in a reply, whatever its shape (each holds a
    character no hash has: a hash is all digits and may hold any digit run)."""
    text = json_util.dumps(value)
    return [s for s in SECRETS if s in text]


@pytest.fixture(scope="module")
def mproxy(upstream: Secantus, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ProxyProcess]:
    config = tmp_path_factory.mktemp("masking") / "mongobranch.toml"
    config.write_text(CONFIG)
    proc = ProxyProcess(upstream.uri, meta_db="mb_masking_test",
                        extra=["--config", str(config)]).start()
    yield proc
    proc.stop()


@pytest.fixture()
def data(mproxy: ProxyProcess) -> Iterator[MongoClient]:
    main: MongoClient = MongoClient(mproxy.uri, serverSelectionTimeoutMS=10000)
    main[DB].users.insert_many(USERS)
    main[DB].orders.insert_many(ORDERS)
    yield main
    main.drop_database(DB)
    main.close()


@pytest.fixture()
def made(mproxy: ProxyProcess) -> Iterator[Branches]:
    with branches(mproxy) as b:
        yield b


@pytest.fixture()
def mbranch(data: MongoClient, made: Branches) -> dict[str, Any]:
    return made.create(unique("masked"), masked=True)


@pytest.fixture()
def masked(mbranch: dict[str, Any], made: Branches) -> Iterator[MongoClient]:
    c = made.client(mbranch)
    yield c
    c.close()


def refused(call: Any) -> OperationFailure:
    with pytest.raises(OperationFailure) as info:
        call()
    assert "mask" in str(info.value), info.value
    assert info.value.code == 115, info.value.details
    return info.value


# -- find, projection, filter, sort, getMore ------------------------------------------------

def test_find_masks_every_rule(masked: MongoClient, data: MongoClient) -> None:
    docs = list(masked[DB].users.find({}, batch_size=1).sort("_id", 1))  # getMore batches
    assert [d["_id"] for d in docs] == [1, 2, 3]
    assert not leaked(docs), docs
    alice, bob, carol = docs
    assert alice["ssn"] == "REDACTED"
    assert alice["email"].isdigit() and alice["email"] != bob["email"]
    assert alice["name"] in NAMES
    assert alice["profile"] == {"phone": None, "city": "Paris"}
    assert bob["profile"] == {"city": "Oslo"}  # a missing field stays missing
    assert carol["profile"] == [{"phone": None}, {"phone": None, "kind": "work"}]
    assert len(alice["tags"]) == 2 and all(t.isdigit() for t in alice["tags"])
    assert "tags" not in bob
    assert alice["age"] == 31  # unmasked fields as they are
    # The main port is the real database.
    assert data[DB].users.find_one({"_id": 1})["email"] == "alice@real.example"


def test_projection_filter_and_sort_see_masked_values(masked: MongoClient) -> None:
    users = masked[DB].users
    assert not leaked(list(users.find({}, {"email": 1, "ssn": 1, "profile.phone": 1})))
    assert not leaked(list(users.find({}, {"copy": "$email", "n": {"$concat": ["$name"]}})))
    assert users.find_one({"email": "alice@real.example"}) is None
    assert users.find_one({"ssn": {"$regex": "^111"}}) is None
    assert users.count_documents({"ssn": "REDACTED"}) == 3
    hashed = users.find_one({"_id": 2})["email"]
    assert users.find_one({"email": hashed})["_id"] == 2
    by_email = [d["email"] for d in users.find({}, {"email": 1}).sort("email", 1)]
    assert by_email == sorted(by_email)
    assert users.find_one({"_id": 1}, {"email": 1})["email"] == \
        users.find_one({"_id": 1})["email"]


def test_hints_of_indexes_on_masked_fields_are_refused(data: MongoClient,
                                                       made: Branches) -> None:
    data[DB].users.create_index("email")
    data[DB].users.create_index("age")
    with made.client(made.create(unique("hinted"), masked=True)) as masked:
        users = masked[DB].users
        # Documents would come in the order of the stored emails.
        refused(lambda: list(users.find().hint([("email", 1)])))
        refused(lambda: list(users.find().hint("email_1")))
        refused(lambda: list(users.aggregate([], hint={"email": 1})))
        assert [d["_id"] for d in users.find().hint([("age", 1)])] == [3, 1, 2]
        assert not leaked(list(users.find().hint([("age", 1)])))


def test_reads_are_deterministic_and_salted_per_branch(masked: MongoClient, made: Branches,
                                                       mproxy: ProxyProcess) -> None:
    first = list(masked[DB].users.find().sort("_id", 1))
    again = list(masked[DB].users.find().sort("_id", 1))
    assert first == again
    other = made.create(unique("masked2"), masked=True)
    with made.client(other) as c:
        second = list(c[DB].users.find().sort("_id", 1))
    assert [d["email"] for d in second] != [d["email"] for d in first]
    assert all(d["name"] in NAMES for d in second)
    plain = made.create(unique("plain"))
    with made.client(plain) as c:
        assert c[DB].users.find_one({"_id": 1})["email"] == "alice@real.example"


def test_child_of_a_masked_branch_is_masked(mbranch: dict[str, Any], made: Branches,
                                            mproxy: ProxyProcess) -> None:
    listed: Any = mproxy.api("GET", "/branches")[1]
    listed = listed["branches"] if isinstance(listed, dict) else listed
    parent = next(b for b in listed if b["name"] == mbranch["name"])
    assert parent["masked"] is True and "mask_salt" not in parent
    child = made.create(unique("kid"), **{"from": parent["name"]})
    assert child["masked"] is True
    with made.client(child) as c:
        assert not leaked(list(c[DB].users.find()))
        info = c.admin.command("branchInfo", child["name"])
        assert info["masked"] is True and "mask_salt" not in json_util.dumps(info)
    # Over the wire from the main port, and the rules as GET /config shows them.
    wired = unique("wired")
    with MongoClient(mproxy.uri) as main:
        assert main.admin.command("createBranch", wired, masked=True)["masked"] is True
        made.track(wired)
        with pytest.raises(OperationFailure, match="masked must be true or false"):
            main.admin.command("createBranch", unique("bad"), masked="yes")
    shown: Any = mproxy.api("GET", "/config")[1]
    assert shown["masking"]["value"][f"{DB}.users"]["ssn"] == "redact"
    assert shown["masking"]["lists"]["names"] == NAMES


# -- aggregate --------------------------------------------------------------------------------

def test_aggregate_stages_see_masked_values(masked: MongoClient) -> None:
    users, orders = masked[DB].users, masked[DB].orders
    grouped = list(users.aggregate([{"$group": {"_id": "$email", "n": {"$sum": 1},
                                                "names": {"$push": "$name"}}}]))
    assert len(grouped) == 3 and not leaked(grouped)
    assert list(users.aggregate([{"$match": {"email": "alice@real.example"}}])) == []
    projected = list(users.aggregate([{"$project": {"e": "$email", "all": "$$ROOT"}}]))
    assert not leaked(projected)
    joined = list(orders.aggregate([{"$lookup": {
        "from": "users", "let": {"u": "$user"}, "as": "who",
        "pipeline": [{"$match": {"$expr": {"$eq": ["$_id", "$$u"]}}}]}}]))
    assert [len(d["who"]) for d in joined] == [1, 1] and not leaked(joined)
    # The same salt hashes the same email alike in both collections: joins still match.
    by_email = list(orders.aggregate([{"$lookup": {
        "from": "users", "let": {"e": "$email"}, "as": "who",
        "pipeline": [{"$match": {"$expr": {"$eq": ["$email", "$$e"]}}}]}}]))
    assert [w["_id"] for d in by_email for w in d["who"]] == [1, 3]
    by_id = list(orders.aggregate([{"$lookup": {"from": "users", "localField": "user",
                                                "foreignField": "_id", "as": "who"}}]))
    assert [len(d["who"]) for d in by_id] == [1, 1] and not leaked(by_id)
    unioned = list(orders.aggregate([{"$unionWith": "users"}]))
    assert len(unioned) == 5 and not leaked(unioned)
    faceted = list(orders.aggregate([{"$facet": {"u": [{"$unionWith": {"coll": "users"}}],
                                                 "o": [{"$project": {"card": 1}}]}}]))
    assert len(faceted[0]["u"]) == 5 and not leaked(faceted)
    # Joined on the real value, the email would tell which order is whose.
    refused(lambda: list(orders.aggregate([{"$lookup": {
        "from": "users", "localField": "email", "foreignField": "email", "as": "who"}}])))
    refused(lambda: list(orders.aggregate([{"$graphLookup": {
        "from": "users", "startWith": "$user", "connectFromField": "_id",
        "connectToField": "_id", "as": "g"}}])))
    refused(lambda: list(orders.aggregate([{"$merge": {"into": "users"}}])))


def test_distinct_and_count_use_masked_values(masked: MongoClient) -> None:
    users = masked[DB].users
    assert users.distinct("ssn") == ["REDACTED"]
    emails = users.distinct("email")
    assert len(emails) == 3 and not leaked(emails)
    assert not leaked(users.distinct("profile.phone"))
    assert users.count_documents({"email": "bob@real.example"}) == 0
    assert masked[DB].command("count", "users", query={"ssn": "222-33-4444"})["n"] == 0
    assert masked[DB].command("count", "users", query={"ssn": "REDACTED"})["n"] == 3
    assert users.estimated_document_count() == 3
    # Neither query nor key names a masked field: answered without masking, alike.
    assert masked[DB].command("count", "users", query={"age": {"$gt": 30}})["n"] == 2
    assert sorted(users.distinct("age", {"profile.city": "Paris"})) == [31]
    assert not leaked(users.distinct("profile", {"age": 31}))
    assert not leaked(users.distinct("tags", {"age": {"$gt": 0}}))


def test_views_over_a_masked_collection_are_masked(data: MongoClient,
                                                   made: Branches) -> None:
    data[DB].command("create", "contacts", viewOn="users",
                     pipeline=[{"$project": {"email": 1, "ssn": 1}}])
    # A rule may name a view: it masks what the view's stages make.
    data[DB].command("create", "summaries", viewOn="orders",
                     pipeline=[{"$project": {"label": {"$concat": [
                         "total ", {"$toString": "$total"}]}}}])
    with made.client(made.create(unique("viewed"), masked=True)) as masked:
        contacts = list(masked[DB].contacts.find().sort("_id", 1))
        assert [d["ssn"] for d in contacts] == ["REDACTED"] * 3 and not leaked(contacts)
        assert masked[DB].contacts.count_documents({"ssn": "111-22-3333"}) == 0
        unioned = list(masked[DB].orders.aggregate([{"$unionWith": "contacts"}]))
        assert len(unioned) == 5 and not leaked(unioned)
        assert [d["label"] for d in masked[DB].summaries.find()] == ["REDACTED"] * 2
        assert masked[DB].summaries.count_documents({"label": "total 5"}) == 0


def test_stages_reading_a_scratch_copy_never_copy_masked_values(data: MongoClient,
                                                                made: Branches) -> None:
    """$graphLookup from a changed collection or a view reads a copy of what `from`
    shows, made before the read's own masking: a masked source is refused, and a view
    that joins a masked collection is copied with that join masked."""
    data[DB].nodes.insert_many([{"_id": i, "next": i + 1, "user": 1 + i % 3}
                                for i in range(4)])
    data[DB].command("create", "contacts", viewOn="users",
                     pipeline=[{"$project": {"email": 1}}])
    data[DB].command("create", "nodes_with_users", viewOn="nodes", pipeline=[
        {"$lookup": {"from": "users", "localField": "user", "foreignField": "_id",
                     "as": "who"}}])
    with made.client(made.create(unique("copied"), masked=True)) as masked:
        db = masked[DB]
        db.nodes.insert_one({"_id": 4, "next": 5, "user": 2})  # nodes now changed
        db.users.update_one({"_id": 2}, {"$set": {"age": 46}})  # users too
        walk = {"startWith": "$_id", "connectFromField": "next", "connectToField": "_id",
                "as": "chain"}
        chained = list(db.nodes.aggregate([{"$match": {"_id": 0}},
                                           {"$graphLookup": {"from": "nodes", **walk}}]))
        assert sorted(d["_id"] for d in chained[0]["chain"]) == [0, 1, 2, 3, 4]
        through_view = list(db.nodes.aggregate([
            {"$match": {"_id": 0}},
            {"$graphLookup": {"from": "nodes_with_users", **walk}}]))
        chain = through_view[0]["chain"]
        assert len(chain) == 5 and all(len(d["who"]) == 1 for d in chain)
        assert not leaked(through_view)
        refused(lambda: list(db.orders.aggregate([{"$graphLookup": {
            "from": "users", "startWith": "$user", "connectFromField": "_id",
            "connectToField": "_id", "as": "g"}}])))
        refused(lambda: list(db.orders.aggregate([{"$graphLookup": {
            "from": "contacts", "startWith": "$user", "connectFromField": "_id",
            "connectToField": "_id", "as": "g"}}])))
        refused(lambda: list(db.orders.aggregate([{"$lookup": {
            "from": "users", "localField": "user", "foreignField": "_id", "as": "who",
            "pipeline": [{"$sort": {"age": 1}}, {"$limit": 1}]}}])))


# -- writes -----------------------------------------------------------------------------------

def test_writes_work_and_read_back_masked(masked: MongoClient, data: MongoClient) -> None:
    users = masked[DB].users
    users.insert_one({"_id": 4, "email": "dave@real.example", "ssn": "444"})
    assert users.find_one({"_id": 4})["ssn"] == "REDACTED"
    assert users.update_one({"_id": 1}, {"$set": {"age": 32}}).modified_count == 1
    assert users.update_one({"age": 45}, {"$inc": {"age": 1}}).modified_count == 1
    users.update_one({"_id": 2}, {"$set": {"email": "new@real.example"}})
    assert "@" not in users.find_one({"_id": 2})["email"]
    assert users.delete_one({"_id": 3}).deleted_count == 1
    assert sorted(d["_id"] for d in users.find()) == [1, 2, 4]
    assert data[DB].users.find_one({"_id": 3}) is not None  # the base is never written


def test_writes_that_would_read_a_masked_field_are_refused(masked: MongoClient) -> None:
    users = masked[DB].users
    # A filter on the stored value tells, by what it matches, what the value is.
    refused(lambda: users.update_many({"ssn": {"$regex": "^1"}}, {"$set": {"hit": 1}}))
    refused(lambda: users.delete_many({"email": "alice@real.example"}))
    refused(lambda: users.update_one({"$expr": {"$eq": ["$ssn", "x"]}}, {"$set": {"a": 1}}))
    refused(lambda: users.update_one({"profile": {"city": "Oslo"}}, {"$set": {"a": 1}}))
    # Copying a masked field into another one would show it there.
    refused(lambda: users.update_many({}, [{"$set": {"copy": "$email"}}]))
    refused(lambda: users.update_many({}, {"$rename": {"ssn": "plain"}}))
    # Whether these change the document tells how the stored value compares.
    refused(lambda: users.update_one({"_id": 1}, {"$max": {"ssn": "5"}}))
    refused(lambda: users.update_one({"_id": 1}, {"$pull": {"tags": {"$regex": "^v"}}}))
    refused(lambda: users.update_one({"_id": 1}, {"$addToSet": {"tags": "vip-secret"}}))
    refused(lambda: users.update_one({"_id": 1}, {"$push": {"tags": {"$each": [],
                                                                     "$sort": 1}}}))
    # mongod's error for a field made inside a string quotes the string.
    refused(lambda: users.update_one({"_id": 1}, {"$set": {"ssn.x": 1}}))
    refused(lambda: users.update_one({"_id": 1}, {"$set": {"profile.phone.x": 1}}))
    # Under a name without rules, the stored values would be read as they are.
    refused(lambda: masked.admin.command("renameCollection", f"{DB}.users",
                                         to=f"{DB}.plain_users"))
    refused(lambda: masked.admin.command("renameCollection", f"{DB}.users",
                                         to=f"{DB}.orders", dropTarget=True))
    refused(lambda: masked.admin.command(
        {"bulkWrite": 1, "nsInfo": [{"ns": f"{DB}.users"}],
         "ops": [{"update": 0, "filter": {"ssn": "x"}, "updateMods": {"$set": {"a": 1}}}]}))
    assert not leaked(list(users.find()))


def test_find_one_and_modify_returns_masked_documents(masked: MongoClient) -> None:
    users = masked[DB].users
    before = users.find_one_and_update({"_id": 1}, {"$set": {"age": 40}},
                                       return_document=ReturnDocument.BEFORE)
    after = users.find_one_and_update({"_id": 1}, {"$set": {"age": 41}},
                                      return_document=ReturnDocument.AFTER)
    assert before["age"] == 31 and after["age"] == 41
    assert before["ssn"] == after["ssn"] == "REDACTED" and not leaked([before, after])
    assert after["email"] == users.find_one({"_id": 1})["email"]
    projected = users.find_one_and_update({"_id": 2}, {"$set": {"age": 1}},
                                          projection={"copy": "$ssn", "email": 1})
    assert projected["copy"] == "REDACTED" and not leaked(projected)
    removed = users.find_one_and_delete({"_id": 3})
    assert removed["_id"] == 3 and not leaked(removed)
    replaced = users.find_one_and_replace({"_id": 2}, {"email": "x@real.example"},
                                          return_document=ReturnDocument.AFTER)
    assert "@" not in replaced["email"]
    refused(lambda: users.find_one_and_update({"ssn": "111-22-3333"}, {"$set": {"a": 1}}))


# -- change streams, explain, commands that show others' values, history -----------------------

def test_change_streams_show_what_reads_show(masked: MongoClient) -> None:
    users = masked[DB].users
    with users.watch(full_document="updateLookup",
                     full_document_before_change="whenAvailable") as stream:
        users.insert_one(DAVE)
        inserted = users.find_one({"_id": 4})
        users.update_one({"_id": 4}, {"$set": {"email": "dave2@real.example", "age": 21}})
        updated = users.find_one({"_id": 4})
        users.replace_one({"_id": 4}, {"email": "erin@real.example", "name": "Erin Real",
                                       "ssn": "555-66-7777"})
        replaced = users.find_one({"_id": 4})
        users.delete_one({"_id": 4})
        parent_alice = users.find_one({"_id": 1})
        users.update_one({"_id": 1}, {"$set": {"tags": ["zed@real.example"]}})
        alice = users.find_one({"_id": 1})
        events = [stream.next() for _ in range(5)]
    assert not leaked(events), events
    assert [e["operationType"] for e in events] == \
        ["insert", "update", "replace", "delete", "update"]
    assert inserted["ssn"] == "REDACTED" and inserted["email"].isdigit()
    insert, update, replace, delete, kept = events
    # The same document, read with find and streamed, shows the same masked values.
    assert insert["fullDocument"] == inserted
    assert update["fullDocument"] == updated
    assert update["fullDocumentBeforeChange"] == inserted
    assert update["updateDescription"]["updatedFields"] == \
        {"email": updated["email"], "age": 21}
    assert replace["fullDocument"] == replaced
    assert replace["fullDocumentBeforeChange"] == updated
    assert delete["fullDocumentBeforeChange"] == replaced
    assert [e["documentKey"] for e in events] == [{"_id": 4}] * 4 + [{"_id": 1}]
    # The parent's image the branch copied up is masked too.
    assert kept["fullDocumentBeforeChange"] == parent_alice
    assert kept["fullDocument"] == alice
    assert kept["updateDescription"]["updatedFields"] == {"tags": alice["tags"]}


def test_change_stream_stages_see_masked_values(masked: MongoClient) -> None:
    users = masked[DB].users
    probe = [{"$match": {"$or": [{"fullDocument.email": "dave@real.example"},
                                 {"fullDocument.ssn": {"$regex": "^444"}},
                                 {"fullDocument.end": True}]}}]
    with users.watch(probe) as raw, masked[DB].watch(
            [{"$match": {"fullDocument.ssn": "REDACTED"}}]) as whole_db, \
            masked.watch([{"$match": {"ns.coll": "orders"}}]) as cluster:
        users.insert_one(DAVE)
        masked[DB].orders.insert_one({"_id": 12, "card": "4333-3333", "total": 1})
        users.insert_one({"_id": 5, "end": True})
        # A filter on the stored value matches nothing: the first event is the last insert.
        first = raw.next()
        assert first["documentKey"] == {"_id": 5}, first
        seen = whole_db.next()
        assert seen["documentKey"] == {"_id": 4} and seen["fullDocument"]["ssn"] == "REDACTED"
        order = cluster.next()
        assert order["fullDocument"]["card"] == "REDACTED"
        assert not leaked([first, seen, order])


def test_explain_and_others_refused(masked: MongoClient, direct: MongoClient,
                                    mbranch: dict[str, Any]) -> None:
    refused(lambda: masked.admin.command("currentOp"))
    refused(lambda: masked.admin.command("getLog", "global"))
    explained = masked[DB].command("explain", {"find": "users", "filter": {"ssn": "x"}},
                                   verbosity="executionStats")
    assert not leaked(explained) and explained["mongobranch"]["masked"] is True
    # The salt would let a client test guesses against the hashes.
    salt = direct["mb_masking_test"].branches.find_one({"_id": mbranch["name"]})["mask_salt"]
    seed = str(int(masking.seed_of(salt)))  # the hash's state after the salt
    for reply in (explained, masked[DB].command("aggregate", "users", pipeline=[],
                                                explain=True)):
        assert salt not in json_util.dumps(reply) and seed not in json_util.dumps(reply)
    refused(lambda: masked[DB].command("explain", {"update": "users", "updates": [
        {"q": {"_id": 1}, "u": {"$set": {"a": 1}}}]}))
    with masked[DB].notes.watch() as stream:  # an unmasked collection streams as usual
        masked[DB].notes.insert_one({"_id": 99, "card": "4333"})
        event = stream.try_next() or stream.next()
        assert event["documentKey"] == {"_id": 99}


def test_diff_and_log_of_a_masked_branch_are_masked(masked: MongoClient,
                                                    mbranch: dict[str, Any],
                                                    mproxy: ProxyProcess) -> None:
    users = masked[DB].users
    before = {d["_id"]: d for d in users.find()}
    users.update_one({"_id": 1}, {"$set": {"email": "zed@real.example", "age": 50}})
    users.insert_one(DAVE)
    users.delete_one({"_id": 3})
    masked[DB].notes.insert_one({"_id": 1, "card": "4333-free"})  # no rules: as stored
    after = {d["_id"]: d for d in users.find()}
    name = mbranch["name"]
    status, body = mproxy.api("GET", f"/branches/{name}/diff")
    assert status == 200, body
    assert isinstance(body, dict)
    changes = {(c["ns"], c["_id"]): c for c in body["changes"]}
    notes = changes.pop((f"{DB}.notes", 1))
    assert notes["branch"] == {"_id": 1, "card": "4333-free"}
    assert not leaked(list(changes.values())), body
    # Both sides, the parent's current documents too, as the branch's port shows them.
    update, insert, delete = (changes[(f"{DB}.users", i)] for i in (1, 4, 3))
    assert (update["op"], insert["op"], delete["op"]) == ("update", "insert", "delete")
    assert update["parent"] == json.loads(json_util.dumps(before[1]))
    assert update["branch"] == json.loads(json_util.dumps(after[1]))
    assert update["branch"]["email"].isdigit() and update["branch"]["age"] == 50
    assert insert["branch"] == json.loads(json_util.dumps(after[4])) and insert["parent"] is None
    assert delete["parent"] == json.loads(json_util.dumps(before[3]))
    status, log = mproxy.api("GET", f"/branches/{name}/log")
    assert status == 200 and not leaked(log), log
    assert isinstance(log, dict) and len(log["entries"]) >= 4
    with MongoClient(mproxy.uri) as main:
        wired = main.admin.command("branchDiff", name)
        assert not leaked([c for c in wired["changes"] if c["ns"] != f"{DB}.notes"])
        assert next(c for c in wired["changes"] if c["_id"] == 4)["branch"] == after[4]
        assert not leaked(main.admin.command("branchLog", name))
        # The main port is the real database.
        assert main[DB].users.find_one({"_id": 1})["email"] == "alice@real.example"
    shown = subprocess.run([shutil.which("mongobranch") or ".venv/bin/mongobranch", "branch",
                            "diff", name, "--json", "--admin", mproxy.admin_url],
                           capture_output=True, text=True, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "REDACTED" in shown.stdout and not leaked(
        [line for line in shown.stdout.splitlines() if "4333-free" not in line])


def test_a_long_diff_is_masked_batch_by_batch(masked: MongoClient, mbranch: dict[str, Any],
                                              mproxy: ProxyProcess) -> None:
    # More changes than one masking round trip takes (history.changes.BATCH).
    masked[DB].users.insert_many([{"_id": 100 + i, "email": f"u{i}@real.example"}
                                  for i in range(1100)])
    shown = {d["_id"]: d["email"] for d in masked[DB].users.find({}, {"email": 1})}
    status, body = mproxy.api("GET", f"/branches/{mbranch['name']}/diff")
    assert status == 200 and isinstance(body, dict), body
    inserted = {c["_id"]: c["branch"]["email"] for c in body["changes"]}
    assert len(inserted) == 1100 and "@real" not in json.dumps(body)
    assert all(inserted[i] == shown[i] for i in inserted)


def test_merge_conflicts_and_the_port_of_a_masked_branch(masked: MongoClient,
                                                         mbranch: dict[str, Any],
                                                         mproxy: ProxyProcess) -> None:
    masked[DB].users.update_one({"_id": 1}, {"$set": {"age": 50}})
    name = mbranch["name"]
    # A merge's conflicts name the documents without their images.
    with MongoClient(mproxy.uri) as main:
        main[DB].users.update_one({"_id": 1}, {"$set": {"age": 60}})
    status, merged = mproxy.api("POST", f"/branches/{name}/merge",
                                {"strategy": "abort", "dry_run": True})
    assert status in (200, 409), merged
    conflicts: Any = merged["conflicts"]  # type: ignore[index]
    assert [(c["ns"], c["_id"], set(c)) for c in conflicts] == \
        [(f"{DB}.users", 1, {"ns", "_id", "op"})], merged
    assert not leaked(merged), merged
    # Through the masked port: no branch management but listing and describing.
    refused(lambda: masked.admin.command("createBranch", unique("x"), **{"from": "main"}))
    refused(lambda: masked.admin.command("branchDiff", name))
    refused(lambda: masked.admin.command("listBranches"))  # it would name unmasked ports
    refused(lambda: masked.admin.command("branchInfo", "main"))
    assert masked.admin.command("branchInfo", name)["masked"] is True


def test_cli_creates_a_masked_branch(data: MongoClient, mproxy: ProxyProcess,
                                     made: Branches) -> None:
    name = unique("climask")
    done = subprocess.run([shutil.which("mongobranch") or ".venv/bin/mongobranch", "branch",
                           "create", name, "--masked", "--json", "--admin",
                           mproxy.admin_url], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    made.track(name)
    branch = json.loads(done.stdout)
    assert branch["masked"] is True
    with MongoClient(branch["uri"]) as c:
        assert c[DB].users.find_one({"_id": 1})["ssn"] == "REDACTED"


@pytest.mark.parametrize(("table", "error"), [
    ('[masking."app.users"]\n_id = "hash"\n', "not a maskable field path"),
    ('[masking."app.users"]\nemail = "scramble"\n', "rule must be redact"),
    ('[masking."app.users"]\nname = "fake:nobody"\n', "rule must be redact"),
    ('[masking."app.users"]\nprofile = "null"\n"profile.phone" = "hash"\n', "overlap"),
    ('[masking."users"]\nemail = "hash"\n', "<db>.<coll>"),
    ('[masking_lists]\nnames = []\n', "non-empty arrays"),
])
def test_bad_masking_rules_stop_serve(tmp_path: Path, table: str, error: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(table)
    done = subprocess.run([shutil.which("mongobranch") or ".venv/bin/mongobranch", "serve",
                           "--config", str(config)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2 and error in done.stderr, done.stderr


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH")
def test_node_driver_reads_masked_values(mbranch: dict[str, Any],
                                         tmp_path: Path) -> None:
    done = subprocess.run(["node", "masked.js", mbranch["uri"], DB],
                          cwd=NODE_DIR, capture_output=True, text=True, timeout=120,
                          check=False, env=dict(os.environ, HOME=str(tmp_path)))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert [d["_id"] for d in out["found"]] == [1, 2, 3]
    assert out["found"][0]["ssn"] == "REDACTED"
    assert len(out["grouped"]) == 3 and len(out["joined"]) == 2
    assert out["distinct"] == ["REDACTED"] and out["filtered"] == 0
    assert out["returned"]["_id"] == 1
    assert not leaked(out), out


def test_reads_and_find_and_modify_in_a_transaction_are_masked(masked: MongoClient) -> None:
    users = masked[DB].users
    with masked.start_session() as session, session.start_transaction():
        found = list(users.find({}, session=session))
        returned = users.find_one_and_update({"_id": 2}, {"$set": {"age": 9}},
                                             session=session,
                                             return_document=ReturnDocument.AFTER)
        counted = users.count_documents({"ssn": "REDACTED"}, session=session)
    assert len(found) == 3 and returned["age"] == 9 and counted == 3
    assert not leaked([found, returned])
    assert users.find_one({"_id": 2})["age"] == 9


async def test_an_agent_takes_a_masked_sandbox_over_mcp(data: MongoClient,
                                                       mproxy: ProxyProcess,
                                                       made: Branches) -> None:
    pytest.importorskip("mcp", reason="the mcp package is not installed")
    from tests.test_mcp import Tools, session

    name = unique("agent")
    async with session(mproxy.admin_url) as s:
        tools = Tools(s)
        created = await tools.call("create_branch", name=name, masked=True)
        made.track(name)
        assert created["masked"] is True
        with MongoClient(created["uri"]) as c:
            c[DB].users.update_one({"_id": 1}, {"$set": {"age": 1}})
            assert not leaked(list(c[DB].users.find()))
            alice = json.loads(json_util.dumps(c[DB].users.find_one({"_id": 1})))
        # Its changes reviewed as a diff: masked on both sides.
        reviewed = await tools.call("diff_branch", name=name)
        assert not leaked(reviewed), reviewed
        change = next(c for c in reviewed["changes"] if c["_id"] == 1)
        assert change["branch"] == alice and change["parent"]["ssn"] == "REDACTED"


def test_indexes_and_validators_over_masked_fields_are_refused(masked: MongoClient) -> None:
    users = masked[DB].users
    # A unique index's build error quotes the duplicate stored values; which writes a
    # validator fails (and its error details) tell them too.
    refused(lambda: users.create_index("email", unique=True))
    refused(lambda: users.create_index([("profile.phone", 1)]))
    refused(lambda: users.create_index("age", partialFilterExpression={"ssn": "x"}))
    refused(lambda: masked[DB].command("collMod", "users",
                                       validator={"ssn": {"$regex": "^1"}}))
    users.create_index("age")  # a field without rules
    masked[DB].command("create", "contacts2", viewOn="users",
                       pipeline=[{"$project": {"e": {"$toInt": "$name"}}}])
    with pytest.raises(OperationFailure) as info:
        list(masked[DB].contacts2.find())
    assert not leaked(info.value.details), info.value.details


def test_a_masked_copy_branch_reads_its_copies_masked(data: MongoClient,
                                                      made: Branches) -> None:
    branch = made.create(unique("maskcopy"), masked=True, mode="copy")
    assert branch["mode"] == "copy" and branch["masked"] is True
    with made.client(branch) as c:
        users = c[DB].users
        docs = list(users.find().sort("_id", 1))
        assert [d["ssn"] for d in docs] == ["REDACTED"] * 3 and not leaked(docs)
        assert users.count_documents({"ssn": "111-22-3333"}) == 0
        assert not leaked(list(c[DB].orders.aggregate([{"$unionWith": "users"}])))


def test_a_masked_branch_of_main_at_a_past_point(mproxy: ProxyProcess, data: MongoClient,
                                                 made: Branches) -> None:
    """A masked branch of main at a past point gets back each collection's documents as
    they were then (updated, deleted and inserted ones alike) and shows them masked:
    the restore writes the stored values, masking applies to what it wrote."""
    made.create()  # waits for the capture: main's history now holds the inserts
    status, log = mproxy.api("GET", "/branches/main/log?limit=1")
    assert status == 200 and isinstance(log, dict)
    point = log["entries"][0]["lsn"]
    made.cleanup()
    data[DB].users.update_many({}, {"$inc": {"age": 100}, "$set": {"email": "zed@real.x"}})
    data[DB].users.delete_one({"_id": 2})
    data[DB].users.insert_one(DAVE)
    data[DB].orders.update_one({"_id": 10}, {"$set": {"card": "4333-3333", "total": 50}})
    data[DB].orders.delete_one({"_id": 11})
    data[DB].orders.insert_one({"_id": 12, "user": 4, "email": "erin@real.example",
                                "card": "4333-4444", "total": 9})
    past = made.create(**{"from": "main", "at": point, "masked": True})
    with made.client(past) as b:
        users = list(b[DB].users.find().sort("_id", 1))
        orders = list(b[DB].orders.find().sort("_id", 1))
        assert b[DB].users.count_documents({"age": {"$lt": 100}}) == 3
    assert [(u["_id"], u["age"]) for u in users] == [(1, 31), (2, 45), (3, 27)]
    assert [(o["_id"], o["total"]) for o in orders] == [(10, 5), (11, 7)]
    assert all(u["ssn"] == "REDACTED" and u["email"].isdigit() for u in users), users
    assert all(o["card"] == "REDACTED" for o in orders), orders
    assert not leaked(users + orders), users + orders
    # Main keeps its own later state.
    assert data[DB].users.find_one({"_id": 4})["email"] == DAVE["email"]
    assert data[DB].orders.count_documents({}) == 2


def test_images_stored_out_of_line_are_masked(data: MongoClient, made: Branches,
                                              mproxy: ProxyProcess) -> None:
    """A user of 9 MiB of random bytes beside the masked fields, updated on a masked
    branch: the update's WAL entry holds its images out of line. Its change event and
    the branch's diff (the parent's image and the branch's, each 9 MiB) show masked
    values only."""
    blob = os.urandom(9 * 1024 * 1024)
    data[DB].users.insert_one({**DAVE, "blob": blob})
    branch = made.create(unique("masked"), masked=True)
    with made.client(branch) as c:
        users = c[DB].users
        with users.watch(full_document="updateLookup") as stream:
            users.update_one({"_id": 4}, {"$set": {"age": 21}})
            shown = users.find_one({"_id": 4})
            event = stream.next()
    assert shown["ssn"] == "REDACTED" and shown["blob"] == blob
    assert not leaked(event), event["fullDocument"]["ssn"]
    assert event["fullDocument"] == shown
    assert event["updateDescription"]["updatedFields"] == {"age": 21}
    status, body = mproxy.api("GET", f"/branches/{branch['name']}/diff")
    assert status == 200 and isinstance(body, dict), body
    assert not leaked(body)
    (change,) = [c for c in body["changes"] if c.get("_id") == 4]
    assert change["branch"]["ssn"] == "REDACTED" and change["parent"]["ssn"] == "REDACTED"
