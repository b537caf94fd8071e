"""Read preferences on the main port: reads go to the member pymongo selects, as mongos
sends them; cursors stay on the member that opened them; branch ports read from the
primary.

What SecantusDB can present: each node is a single-node replica set "secantus" whose
hello lists only itself, so a primary's hello removes every other node from a driver's
view and no real set of a primary and a secondary can be formed. A node inside a
`replSetStepDown` window is a SECONDARY that serves reads (as mongod's is). So the
members here are two nodes, both stepped down for the whole module: the proxy's pymongo
sees a replica set with two secondaries and no primary, where only a read preference
that allows a secondary can be served at all, and each node holds documents of its own,
which say which member answered. The case with a primary is tested on a single node
(reads that allow the primary are served by it, `secondary` finds no member).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import OperationFailure
from pymongo.read_preferences import Secondary

from tests.servers import ProxyProcess, Secantus

pytestmark = pytest.mark.timeout(240)

DOCS = 10  # documents of each node's rp.where, each naming its node


def _fill(server: Secantus, node: str) -> None:
    with MongoClient(server.uri, directConnection=True) as c:
        c.rp.where.insert_many([{"_id": i, "node": node} for i in range(DOCS)])


@pytest.fixture(scope="module")
def members() -> Iterator[tuple[ProxyProcess, dict[str, Secantus]]]:
    """Two stepped-down nodes A and B behind the proxy (their window outlasts the
    module; the nodes are stopped after it)."""
    nodes = {"A": Secantus().start(), "B": Secantus().start()}
    proxy: ProxyProcess | None = None
    try:
        for name, server in nodes.items():
            _fill(server, name)
            with MongoClient(server.uri, directConnection=True) as c:
                c.admin.command("replSetStepDown", 3600, force=True)
                assert c.admin.command("hello")["secondary"] is True
        seeds = ",".join(f"127.0.0.1:{s.port}" for s in nodes.values())
        proxy = ProxyProcess(f"mongodb://{seeds}/?replicaSet=secantus"
                             "&serverSelectionTimeoutMS=2000&heartbeatFrequencyMS=500",
                             meta_db="mb_rp")
        proxy.start(wait_healthy=False)  # no primary: the engine cannot start
        yield proxy, nodes
    finally:
        if proxy is not None:
            proxy.stop()
        for server in nodes.values():
            server.stop()


def _find(client: MongoClient, pref: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A find sent with an explicit $readPreference (pymongo leaves one given in the
    command alone), as a driver sends it to mongos."""
    reply: dict[str, Any] = client.rp.command({"find": "where", "filter": {}, **extra,
                                               "$readPreference": pref})
    return reply


def test_secondary_reads_are_served_by_the_members(
        members: tuple[ProxyProcess, dict[str, Secantus]]) -> None:
    """Each read goes to a secondary pymongo selects at random among the two: both
    answer over a few dozen reads (the chance that one never does is 2**-47), every
    document comes from a node, and a read that needs the primary finds none."""
    proxy, _nodes = members
    with MongoClient(proxy.uri, readPreference="secondary",
                     serverSelectionTimeoutMS=20000) as client:
        seen = {client.rp.where.find_one({"_id": 3})["node"] for _ in range(48)}
        assert seen == {"A", "B"}
        assert client.rp.where.count_documents({}) == DOCS
    with MongoClient(proxy.uri, serverSelectionTimeoutMS=20000, retryReads=False) as client, \
            pytest.raises(OperationFailure) as failed:
        client.rp.where.find_one({})
    assert failed.value.code == 6  # HostUnreachable: no primary


@pytest.mark.parametrize("pref", [
    {"mode": "secondaryPreferred"},
    {"mode": "primaryPreferred"},
    {"mode": "nearest"},
    {"mode": "secondary", "tags": [{"dc": "east"}, {}]},
    {"mode": "secondary", "maxStalenessSeconds": 90},
], ids=["secondaryPreferred", "primaryPreferred", "nearest", "tags-fallback", "staleness"])
def test_modes_that_allow_a_secondary(members: tuple[ProxyProcess, dict[str, Secantus]],
                                      pref: dict[str, Any]) -> None:
    proxy, _nodes = members
    with MongoClient(proxy.uri, serverSelectionTimeoutMS=20000) as client:
        batch = _find(client, pref)["cursor"]["firstBatch"]
    assert len(batch) == DOCS
    assert {d["node"] for d in batch} in ({"A"}, {"B"})


@pytest.mark.parametrize(("pref", "code"), [
    ({"mode": "secondary", "tags": [{"dc": "east"}]}, 133),  # FailedToSatisfyReadPreference
    ({"mode": "secondary", "maxStalenessSeconds": 30}, 160),  # MaxStalenessOutOfRange
    ({"mode": "sideways"}, 2),  # BadValue
    ({"mode": "primary", "tags": [{"dc": "east"}]}, 2),
], ids=["no-tag-match", "staleness-too-small", "bad-mode", "primary-with-tags"])
def test_read_preferences_no_member_satisfies(
        members: tuple[ProxyProcess, dict[str, Secantus]], pref: dict[str, Any],
        code: int) -> None:
    proxy, _nodes = members
    with MongoClient(proxy.uri, serverSelectionTimeoutMS=20000) as client, \
            pytest.raises(OperationFailure) as failed:
        _find(client, pref)
    assert failed.value.code == code, failed.value.details


def test_cursors_stay_on_the_member_that_opened_them(
        members: tuple[ProxyProcess, dict[str, Secantus]]) -> None:
    """Cursors of one client, iterated in turn two documents at a time: every getMore
    goes to its cursor's member (a getMore anywhere else finds no such cursor), so each
    cursor returns all of one node's documents."""
    proxy, _nodes = members
    with MongoClient(proxy.uri, read_preference=Secondary(),
                     serverSelectionTimeoutMS=20000) as client:
        cursors = [client.rp.where.find({}, sort=[("_id", 1)], batch_size=2)
                   for _ in range(24)]
        got: list[list[dict[str, Any]]] = [[] for _ in cursors]
        for _ in range(DOCS):
            for i, cursor in enumerate(cursors):
                got[i].append(next(cursor))
    for docs in got:
        assert [d["_id"] for d in docs] == list(range(DOCS))
        assert len({d["node"] for d in docs}) == 1
    assert {docs[0]["node"] for docs in got} == {"A", "B"}  # 2**-23 that one never does


def test_get_more_and_kill_cursors_follow_the_cursor_across_connections(
        members: tuple[ProxyProcess, dict[str, Secantus]]) -> None:
    """A driver pins a cursor to the server (here the proxy), not to one of its pooled
    connections: a getMore and a killCursors sent on another connection reach the
    cursor's member too."""
    proxy, _nodes = members
    with MongoClient(proxy.uri, serverSelectionTimeoutMS=20000) as one, \
            MongoClient(proxy.uri, serverSelectionTimeoutMS=20000) as other:
        opened = _find(one, {"mode": "secondary"}, batchSize=2)["cursor"]
        node = opened["firstBatch"][0]["node"]
        more = other.rp.command({"getMore": opened["id"], "collection": "where",
                                 "batchSize": 3})["cursor"]
        assert [d["_id"] for d in more["nextBatch"]] == [2, 3, 4]
        assert {d["node"] for d in more["nextBatch"]} == {node}
        killed = other.rp.command({"killCursors": "where", "cursors": [opened["id"]]})
        assert killed["cursorsKilled"] == [opened["id"]]


def test_compressed_requests_are_routed_too(
        members: tuple[ProxyProcess, dict[str, Secantus]]) -> None:
    """A client that compresses its requests (OP_COMPRESSED, decompressed by the proxy
    before it looks at them): its reads and getMores reach the members as well."""
    proxy, _nodes = members
    with MongoClient(proxy.uri, readPreference="secondary", compressors="zlib",
                     serverSelectionTimeoutMS=20000) as client:
        assert client.admin.command("hello", compression=["zlib"])["compression"] == ["zlib"]
        docs = list(client.rp.where.find({}, sort=[("_id", 1)], batch_size=2))
    assert [d["_id"] for d in docs] == list(range(DOCS))
    assert {d["node"] for d in docs} in ({"A"}, {"B"})


async def test_async_pymongo_reads_from_the_members(
        members: tuple[ProxyProcess, dict[str, Secantus]]) -> None:
    proxy, _nodes = members
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        proxy.uri, readPreference="secondaryPreferred", serverSelectionTimeoutMS=20000)
    try:
        docs = await client.rp.where.find({}, sort=[("_id", 1)], batch_size=3).to_list()
    finally:
        await client.close()
    assert [d["_id"] for d in docs] == list(range(DOCS))
    assert {d["node"] for d in docs} in ({"A"}, {"B"})


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH")
def test_node_driver_reads_from_the_members(
        members: tuple[ProxyProcess, dict[str, Secantus]], tmp_path: Path) -> None:
    """The Node driver with readPreference=secondary in its URI: cursors paged
    concurrently over a pool of connections each return one member's documents."""
    from tests.test_node_clients import NODE_DIR, run_json
    proxy, _nodes = members
    out = run_json(["node", "readpref.js", proxy.uri + "?readPreference=secondary"],
                   cwd=NODE_DIR, home=tmp_path)
    for docs in out["cursors"]:
        assert [d[0] for d in docs] == list(range(DOCS))
        assert len({d[1] for d in docs}) == 1
    assert out["count"] == DOCS


@pytest.fixture(scope="module")
def primary_only() -> Iterator[tuple[ProxyProcess, Secantus]]:
    """A single-node set with its primary: no secondary to read from."""
    node = Secantus().start()
    _fill(node, "P")
    proxy = ProxyProcess(f"mongodb://127.0.0.1:{node.port}/?replicaSet=secantus"
                         "&serverSelectionTimeoutMS=2000", meta_db="mb_rp_primary")
    try:
        proxy.start()
        yield proxy, node
    finally:
        proxy.stop()
        node.stop()


@pytest.mark.parametrize("mode", ["primaryPreferred", "secondaryPreferred", "nearest"])
def test_modes_that_allow_the_primary_read_from_it(
        primary_only: tuple[ProxyProcess, Secantus], mode: str) -> None:
    proxy, _node = primary_only
    with MongoClient(proxy.uri, serverSelectionTimeoutMS=20000) as client:
        batch = _find(client, {"mode": mode})["cursor"]["firstBatch"]
    assert [d["node"] for d in batch] == ["P"] * DOCS


def test_a_read_the_primary_serves_uses_the_clients_own_connection(
        primary_only: tuple[ProxyProcess, Secantus]) -> None:
    """When pymongo selects the primary, the read goes on the client's own upstream
    connection, even as the client's first command: the node sees one connection
    opened for the client (serverStatus totalCreated), not one per member used."""
    proxy, node = primary_only
    # Polled monitoring: its one monitor connection is open before `before`; a streaming
    # client's round-trip monitor may open another one later (a clean-clone run counted
    # 2 here).
    with MongoClient(node.uri, directConnection=True, serverMonitoringMode="poll") as direct:
        before = direct.admin.command("serverStatus")["connections"]["totalCreated"]
        with MongoClient(proxy.uri, serverSelectionTimeoutMS=20000) as client:
            for mode in ("nearest", "primaryPreferred", "secondaryPreferred"):
                assert len(_find(client, {"mode": mode})["cursor"]["firstBatch"]) == DOCS
            assert client.rp.where.count_documents({}) == DOCS
        after = direct.admin.command("serverStatus")["connections"]["totalCreated"]
    assert after - before == 1


def test_secondary_mode_without_a_secondary_fails_as_on_mongos(
        primary_only: tuple[ProxyProcess, Secantus]) -> None:
    """mongos answers FailedToSatisfyReadPreference; the primary never serves it."""
    proxy, _node = primary_only
    with MongoClient(proxy.uri, serverSelectionTimeoutMS=20000) as client, \
            pytest.raises(OperationFailure) as failed:
        _find(client, {"mode": "secondary"})
    assert failed.value.code == 133


def test_branch_ports_read_from_the_primary(
        primary_only: tuple[ProxyProcess, Secantus]) -> None:
    """A branch's overlay and WAL are written on the primary: its reads are served
    there whatever their read preference (here one no member of this set satisfies)."""
    proxy, _node = primary_only
    status, branch = proxy.api("POST", "/branches", {"name": "rp-branch"})
    assert status == 201, branch
    assert isinstance(branch, dict)
    try:
        with MongoClient(branch["uri"], serverSelectionTimeoutMS=20000) as client:
            client.rp.where.insert_one({"_id": "new", "node": "branch"})
            batch = _find(client, {"mode": "secondary"})["cursor"]["firstBatch"]
        assert sorted(d["node"] for d in batch) == ["P"] * DOCS + ["branch"]
    finally:
        proxy.api("DELETE", "/branches/rp-branch")


def test_writes_with_a_read_preference_go_to_the_primary(
        primary_only: tuple[ProxyProcess, Secantus]) -> None:
    """A read preference on a write is not a reason to leave the primary."""
    proxy, node = primary_only
    with MongoClient(proxy.uri, serverSelectionTimeoutMS=20000) as client:
        client.rp.command({"insert": "written", "documents": [{"_id": 1}],
                           "$readPreference": {"mode": "secondary"}})
    with MongoClient(node.uri, directConnection=True) as direct:
        assert direct.rp.written.find_one() == {"_id": 1}
