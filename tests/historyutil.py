"""Helpers for the history tests (log, diff, merge, reset, branches at a point)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from bson import json_util
from pymongo import MongoClient
from pymongo.collection import Collection

from tests.branchutil import Branches
from tests.servers import ProxyProcess


def ok(proxy: ProxyProcess, method: str, path: str, body: object | None = None,
       status: int = 200) -> dict[str, Any]:
    got, reply = proxy.api(method, path, body)
    assert got == status, (got, reply)
    assert isinstance(reply, dict)
    return reply


def error(proxy: ProxyProcess, method: str, path: str, body: object | None = None) -> tuple[
        int, str]:
    """An error reply: its status and its {"error": ...} message."""
    status, reply = proxy.api(method, path, body)
    assert status >= 400, (status, reply)
    assert isinstance(reply, dict) and isinstance(reply.get("error"), str), reply
    return status, reply["error"]


def entries(proxy: ProxyProcess, name: str, **query: Any) -> list[dict[str, Any]]:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return list(ok(proxy, "GET", f"/branches/{name}/log" + (f"?{qs}" if qs else ""))["entries"])


def last_lsn(proxy: ProxyProcess, name: str) -> int:
    """The newest LSN in the branch's log (0 when it has none)."""
    got = entries(proxy, name, limit=1)
    return int(got[0]["lsn"]) if got else 0


def diff_raw(proxy: ProxyProcess, name: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"{proxy.admin_url}/branches/{name}/diff")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


def diff(proxy: ProxyProcess, name: str) -> dict[str, Any]:
    """The streamed diff, parsed (Extended JSON turned back into BSON values)."""
    status, _, body = diff_raw(proxy, name)
    assert status == 200, body
    json.loads(body)  # plain JSON first: the stream is one well-formed document
    parsed = json_util.loads(body)
    assert isinstance(parsed, dict)
    return parsed


def doc_changes(result: dict[str, Any]) -> list[tuple[str, str, Any]]:
    return sorted(((c["ns"], c["op"], c["_id"]) for c in result["changes"] if "op" in c),
                  key=repr)


def merge(proxy: ProxyProcess, name: str, status: int = 200, **body: Any) -> dict[str, Any]:
    return ok(proxy, "POST", f"/branches/{name}/merge", body, status)


def contents(coll: Collection) -> list[dict[str, Any]]:
    """A collection's documents in _id order, compared by value."""
    return sorted(coll.find(), key=lambda d: repr(d["_id"]))


def changed_branch(client: MongoClient, made: Branches, db: str,
                   appname: str | None = None) -> dict[str, Any]:
    """A branch of four documents in which one was updated, one deleted, one inserted
    (by a client of this application name)."""
    client[db].items.insert_many([{"_id": i, "v": i} for i in range(4)])
    branch = made.create()
    with MongoClient(branch["uri"], appname=appname) as b:
        b[db].items.update_one({"_id": 1}, {"$set": {"v": "b"}})
        b[db].items.delete_one({"_id": 2})
        b[db].items.insert_one({"_id": "new"})
    return branch
