"""The real Node driver and mongosh through the proxy, without directConnection."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from tests.branchutil import Branches, unique
from tests.servers import ProxyProcess

NODE_DIR = Path(__file__).parent / "node"
MONGOSH = NODE_DIR / "node_modules" / ".bin" / "mongosh"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH")


def run_json(args: list[str], *, cwd: Path, home: Path, timeout: float = 120) -> Any:
    if not (NODE_DIR / "node_modules" / "mongodb").is_dir():
        pytest.fail("tests/node/node_modules is missing: run `make test` (npm install)")
    env = dict(os.environ, HOME=str(home), MONGOSH_NO_TELEMETRY="1")
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}: {done.stderr[-4000:]}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines, f"no output; stderr: {done.stderr[-4000:]}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("options", ["", "?compressors=zlib"])
def test_node_driver(proxy: ProxyProcess, tmp_path: Path, options: str) -> None:
    out = run_json(["node", "crud.js", proxy.uri + options], cwd=NODE_DIR, home=tmp_path)
    address = f"127.0.0.1:{proxy.port}"
    # Discovered as a mongos: the driver never left the proxy's address.
    assert out["topologyTypes"][-1] == "Sharded"
    assert out["serverAddresses"] == [address]
    assert out["addresses"] == [address]
    assert out["hello"]["msg"] == "isdbgrid"
    assert out["inserted"] == 250
    assert out["one"] == {"_id": 7, "group": 2, "v": 14}
    assert out["ids"] == list(range(250))
    assert out["groups"] == [{"_id": g, "n": 50, "total": sum(2 * i for i in range(g, 250, 5))}
                             for g in range(5)]
    assert (out["updated"], out["deleted"], out["count"]) == (50, 50, 200)
    assert out["txn"] == {"_id": "txn"}


MONGOSH_SCRIPT = """
const d = db.getSiblingDB('shell_clients');
d.items.drop();
d.items.insertMany([...Array(120).keys()].map(i => ({_id: i, k: i % 3})));
d.items.updateOne({_id: 0}, {$set: {first: true}});
const sp = db.getMongo()._serviceProvider;
const topology = sp.mongoClient.topology.description;
EJSON.stringify({
  count: d.items.countDocuments({}),
  first: d.items.findOne({_id: 0}),
  ids: d.items.find({}, {_id: 1}).sort({_id: 1}).batchSize(25).toArray().map(x => x._id),
  groups: d.items.aggregate([{$group: {_id: '$k', n: {$sum: 1}}}, {$sort: {_id: 1}}]).toArray(),
  hello: db.hello(),
  topologyType: topology.type,
  servers: [...topology.servers.keys()],
}, {relaxed: true})
"""


def test_mongosh(proxy: ProxyProcess, tmp_path: Path) -> None:
    if not MONGOSH.exists():
        pytest.fail("mongosh is missing from tests/node/node_modules: run `make test`")
    # mongosh adds directConnection=true to a single-host URI unless told otherwise.
    uri = proxy.uri + "?directConnection=false"
    out = run_json([str(MONGOSH), uri, "--quiet", "--norc", "--eval", MONGOSH_SCRIPT],
                   cwd=NODE_DIR, home=tmp_path)
    assert out["topologyType"] == "Sharded"
    assert out["servers"] == [f"127.0.0.1:{proxy.port}"]
    assert out["hello"]["msg"] == "isdbgrid"
    assert out["count"] == 120
    assert out["first"] == {"_id": 0, "k": 0, "first": True}
    assert out["ids"] == list(range(120))
    assert out["groups"] == [{"_id": k, "n": 40} for k in range(3)]


# -- the catalog and paged cursors, on the main port and on a branch port ---------------
CATALOG_SCRIPT = """
const d = db.getSiblingDB(%(db)s);
d.items.updateOne({_id: 1}, {$set: {shell: true}});
const shown = show('collections');
EJSON.stringify({
  shown: shown.value.map(c => c.name).sort(),
  names: d.getCollectionNames().sort(),
  infos: d.getCollectionInfos({name: 'items'}).map(c => c.name),
  indexes: d.items.getIndexes().map(i => i.name).sort(),
  paged: d.items.find({}, {_id: 1}).sort({_id: 1}).batchSize(3).toArray().map(x => x._id),
}, {relaxed: true})
"""


@pytest.fixture(scope="module")
def catalog_ports(proxy: ProxyProcess, direct: MongoClient) -> Iterator[dict[str, Any]]:
    """A database of 20 documents, the main port and a branch port over it."""
    name = unique("node_cat").replace("-", "_")
    direct[name].items.insert_many([{"_id": i, "n": i} for i in range(20)])
    direct[name].items.create_index("n")
    direct[name].other.insert_one({"_id": 1})
    made = Branches(proxy)
    try:
        branch = made.create()
        yield {"db": name, "main": proxy.uri, "branch": branch["uri"]}
    finally:
        made.cleanup()
        direct.drop_database(name)


@pytest.mark.parametrize("port", ["main", "branch"])
def test_node_driver_catalog_and_paged_cursors(catalog_ports: dict[str, Any], port: str,
                                               tmp_path: Path) -> None:
    out = run_json(["node", "cursors.js", catalog_ports[port], catalog_ports["db"]],
                   cwd=NODE_DIR, home=tmp_path)
    assert out["collections"] == ["items", "other"]
    assert out["named"] == ["items"]
    assert out["nameOnly"] == ["items", "other"]
    assert out["collectionNames"] == ["items", "other"]
    assert out["indexes"] == ["_id_", "n_1"]
    assert out["indexExists"] is True
    assert out["ids"] == list(range(20))
    assert out["getMores"]["find"] == 6  # 20 documents, 3 at a time
    assert out["limited"] == list(range(19, 12, -1))
    assert out["getMores"]["findLimit"] >= 2
    assert out["aggregated"] == list(range(20))
    assert out["getMores"]["aggregate"] >= 4
    assert out["early"] == [0, 1, 2]
    assert out["getMores"]["closed"] == 1
    assert (out["count"], out["distinct"]) == (10, [0, 1, 2])


@pytest.mark.parametrize("port", ["main", "branch"])
def test_mongosh_show_collections(catalog_ports: dict[str, Any], port: str,
                                  tmp_path: Path) -> None:
    if not MONGOSH.exists():
        pytest.fail("mongosh is missing from tests/node/node_modules: run `make test`")
    script = CATALOG_SCRIPT % {"db": json.dumps(catalog_ports["db"])}
    # `show collections` lists the shell's current database: the one the URI names.
    uri = f"{catalog_ports[port]}{catalog_ports['db']}?directConnection=false"
    out = run_json([str(MONGOSH), uri, "--quiet", "--norc", "--eval", script], cwd=NODE_DIR,
                   home=tmp_path)
    assert out["shown"] == ["items", "other"]
    assert out["names"] == ["items", "other"]
    assert out["infos"] == ["items"]
    assert out["indexes"] == ["_id_", "n_1"]
    assert out["paged"] == list(range(20))
