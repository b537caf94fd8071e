"""`mongobranch mcp` as a subprocess, driven by the mcp package's own stdio client, each
tool's result checked against the admin API and the data on the branch and main ports."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pymongo import MongoClient

from tests.branchutil import api_ok, unique
from tests.servers import BIN, ProxyProcess, Secantus, free_port

mcp = pytest.importorskip("mcp", reason="the mcp package is not installed")

from mcp import ClientSession  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402

TOOLS = {"create_branch", "list_branches", "branch_uri", "show_branch", "diff_branch",
         "branch_log", "merge_branch", "reset_branch", "drop_branch"}


@asynccontextmanager
async def session(admin_url: str) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command=str(BIN / "mongobranch"),
                                   args=["mcp", "--admin", admin_url])
    async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
        await s.initialize()
        yield s


class Tools:
    def __init__(self, s: ClientSession):
        self.s = s

    async def call(self, tool: str, **arguments: Any) -> Any:
        result = await self.s.call_tool(tool, arguments)
        assert not result.is_error, result.content
        value = result.structured_content
        if isinstance(value, dict) and set(value) == {"result"}:
            value = value["result"]  # a non-object result, wrapped for older protocols
        # The text content says the same, for clients that read only text.
        text = "".join(getattr(block, "text", "") for block in result.content)
        if isinstance(value, str):
            assert text == value
        else:
            assert json.loads(text) == value
        return value

    async def error(self, tool: str, **arguments: Any) -> str:
        result = await self.s.call_tool(tool, arguments)
        assert result.is_error, result
        return "".join(getattr(block, "text", "") for block in result.content)


async def test_every_tool_against_the_api(proxy: ProxyProcess, client: MongoClient) -> None:
    db_name = unique("mcp").replace("-", "_")
    name = unique("agent")
    main = client[db_name].items
    main.insert_many([{"_id": 1, "v": "base"}, {"_id": 2, "v": "base"}])
    try:
        async with session(proxy.admin_url) as s:
            tools = Tools(s)
            listed = await s.list_tools()
            assert {t.name for t in listed.tools} == TOOLS
            assert all(t.description for t in listed.tools)

            created = await tools.call("create_branch", name=name)
            assert created == next(b for b in api_ok(proxy, "GET", "/branches")
                                   if b["name"] == name)
            assert created["parent"] == "main"
            assert await tools.call("branch_uri", name=name) == created["uri"]
            listed_now = await tools.call("list_branches")
            assert listed_now == {"branches": api_ok(proxy, "GET", "/branches")}

            with MongoClient(created["uri"], serverSelectionTimeoutMS=10000) as b:
                b[db_name].items.update_one({"_id": 1}, {"$set": {"v": "agent"}})
                b[db_name].items.insert_one({"_id": 3, "v": "agent"})
            shown = await tools.call("show_branch", name=name)
            assert shown == api_ok(proxy, "GET", f"/branches/{name}")
            assert shown["namespaces"][f"{db_name}.items"]["changed"] == 2

            diff = await tools.call("diff_branch", name=name)
            full = api_ok(proxy, "GET", f"/branches/{name}/diff")
            assert diff["changes"] == full["changes"] and diff["summary"] == full["summary"]
            assert diff["parent"] == "main" and diff["total"] == 2 and not diff["truncated"]
            by_id = {c["_id"]: c for c in diff["changes"]}
            assert by_id[1]["parent"] == {"_id": 1, "v": "base"}
            assert by_id[1]["branch"] == {"_id": 1, "v": "agent"}
            short = await tools.call("diff_branch", name=name, limit=1)
            assert short["total"] == 2 and short["truncated"] and len(short["changes"]) == 1
            assert "limit must be 1-1000" in await tools.error("diff_branch", name=name,
                                                                limit=0)

            log = await tools.call("branch_log", name=name, limit=5)
            assert log == api_ok(proxy, "GET", f"/branches/{name}/log?limit=5")

            # Dry run (the default): reported, nothing applied.
            dry = await tools.call("merge_branch", name=name)
            assert dry["dry_run"] is True and dry["aborted"] is False
            assert main.find_one({"_id": 1}) == {"_id": 1, "v": "base"}
            assert main.count_documents({}) == 2

            # main changes the same document: a conflict, and abort changes nothing.
            main.update_one({"_id": 1}, {"$set": {"v": "main"}})
            dry = await tools.call("merge_branch", name=name)
            assert [c["_id"] for c in dry["conflicts"]] == [1]
            refused = await tools.call("merge_branch", name=name, dry_run=False)
            assert refused["aborted"] is True and [c["_id"] for c in refused["conflicts"]] == [1]
            assert main.count_documents({}) == 2

            # Reset to the fork point: the branch shows main as it is now.
            reset = await tools.call("reset_branch", name=name, to="0")
            assert reset["to_lsn"] == 0 and reset["branch"] == name
            assert (await tools.call("diff_branch", name=name))["total"] == 0

            # A clean change merges.
            with MongoClient(created["uri"], serverSelectionTimeoutMS=10000) as b:
                b[db_name].items.insert_one({"_id": 4, "v": "agent"})
            merged = await tools.call("merge_branch", name=name, dry_run=False)
            assert merged["aborted"] is False and merged["dry_run"] is False
            assert main.find_one({"_id": 4}) == {"_id": 4, "v": "agent"}
            assert main.find_one({"_id": 1}) == {"_id": 1, "v": "main"}

            # Errors come back as tool errors with the API's message.
            assert "already exists" in await tools.error("create_branch", name=name)
            assert "does not exist" in await tools.error("branch_uri", name=unique("none"))

            assert await tools.call("drop_branch", name=name) == {"deleted": name}
            assert proxy.api("GET", f"/branches/{name}")[0] == 404
    finally:
        proxy.api("DELETE", f"/branches/{name}")
        client.drop_database(db_name)


async def test_unreachable_api_is_a_tool_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with session(url) as s:
        text = await Tools(s).error("list_branches")
        assert f"cannot reach the admin API at {url}" in text


async def test_protected_targets_need_force(upstream: Secantus) -> None:
    """With the serve defaults main is protected: an agent's merge into it, and the drop
    or reset of a protected branch, are tool errors naming force until it passes force."""
    proc = ProxyProcess(upstream.uri, meta_db="mongobranch_mcp_life",
                        lifecycle_defaults=True).start()
    db_name = unique("mcplife").replace("-", "_")
    name = unique("agent")
    try:
        async with session(proc.admin_url) as s:
            tools = Tools(s)
            created = await tools.call("create_branch", name=name)
            with MongoClient(created["uri"], serverSelectionTimeoutMS=10000) as b:
                b[db_name].items.insert_one({"_id": 1})
            assert (await tools.call("merge_branch", name=name))["dry_run"] is True
            text = await tools.error("merge_branch", name=name, dry_run=False)
            assert "branch 'main' is protected" in text and "force" in text
            merged = await tools.call("merge_branch", name=name, dry_run=False, force=True)
            assert merged["applied"]["insert"] == 1
            api_ok(proc, "PATCH", f"/branches/{name}", {"protected": True})
            assert "protected" in await tools.error("reset_branch", name=name, to="0")
            assert (await tools.call("reset_branch", name=name, to="0", force=True))[
                "to_lsn"] == 0
            assert "protected" in await tools.error("drop_branch", name=name)
            dropped = await tools.call("drop_branch", name=name, force=True)
            assert dropped["deleted"] == name and "restorable_until" in dropped
    finally:
        proc.api("DELETE", f"/branches/{name}?force=true&purge=true")
        proc.stop()
