"""The real Node driver and mongosh through the proxy, without directConnection."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

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
