"""Helpers shared by the branch-management tests: unique names, cleanup, fingerprints."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bson import encode
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient
from pymongo.database import Database

from tests.servers import ProxyProcess

RAW = CodecOptions(document_class=RawBSONDocument)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Branches:
    """Creates branches through the HTTP API and deletes whatever is left, children first."""

    def __init__(self, proxy: ProxyProcess):
        self.proxy = proxy
        self.created: list[str] = []

    def create(self, name: str | None = None, **body: Any) -> dict[str, Any]:
        name = name or unique("b")
        status, reply = self.proxy.api("POST", "/branches", {"name": name, **body})
        assert status == 201, reply
        assert isinstance(reply, dict)
        self.created.append(name)
        return reply

    def client(self, branch: dict[str, Any]) -> MongoClient:
        return MongoClient(branch["uri"], serverSelectionTimeoutMS=10000)

    def track(self, name: str) -> None:
        self.created.append(name)

    def cleanup(self) -> None:
        for name in reversed(self.created):
            self.proxy.api("DELETE", f"/branches/{name}")
        self.created.clear()


@contextmanager
def branches(proxy: ProxyProcess) -> Iterator[Branches]:
    made = Branches(proxy)
    try:
        yield made
    finally:
        made.cleanup()


def api_ok(proxy: ProxyProcess, method: str, path: str, body: object | None = None) -> Any:
    """The reply of an admin API call that must succeed (200 or 201)."""
    status, reply = proxy.api(method, path, body)
    assert status in (200, 201), (status, reply)
    return reply


def bid_of(direct: MongoClient, proxy: ProxyProcess, name: str) -> str:
    doc = direct[proxy.meta_db]["branches"].find_one({"_id": name})
    assert doc is not None, f"no metadata for branch {name}"
    return str(doc["bid"])


def overlay_collections(direct: MongoClient, bid: str) -> list[str]:
    """Every collection on the upstream that belongs to this branch's overlays."""
    prefix = f"__mb_{bid}_"
    # Not "": SecantusDB lists a database of that name after a write with `$db: ""` (the
    # fuzzer's; mongod refuses it), and no driver can name it. No branch writes there.
    return [f"{db}.{coll}" for db in direct.list_database_names() if db
            for coll in direct[db].list_collection_names() if coll.startswith(prefix)]


def fingerprint(db: Database) -> dict[str, str]:
    """sha256 per user collection: its documents (sorted BSON) and its index specs."""
    out = {}
    for name in sorted(db.list_collection_names()):
        if name.startswith("__mb_") or name.startswith("system."):
            continue
        coll = db.get_collection(name, codec_options=RAW)
        h = hashlib.sha256()
        for raw in sorted(doc.raw for doc in coll.find()):
            h.update(len(raw).to_bytes(4, "little"))
            h.update(raw)
        for spec in sorted(encode(dict(ix)) for ix in db[name].list_indexes()):
            h.update(b"index")
            h.update(spec)
        out[name] = h.hexdigest()
    return out
