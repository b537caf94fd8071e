"""`mongobranch mcp`: branches as tools for AI agents, over the Model Context Protocol.

An agent takes a sandbox branch, works in it through the connection string, and its
changes are reviewed as a diff before a merge. Like the CLI, every tool is one call of
the admin HTTP API client; nothing here knows the engine. The API is synchronous
(urllib), so each call runs in a worker thread and the stdio session stays responsive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

import anyio.to_thread
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from proxy.admin.client import AdminClient, ApiError, Unreachable

T = TypeVar("T")

DIFF_LIMIT = 100
DIFF_MAX = 1000

INSTRUCTIONS = """\
mongobranch gives MongoDB Git-style branches. Create a branch (a copy-on-write sandbox of
its parent, made in milliseconds whatever the data size), connect any MongoDB driver to
its `uri`, and work there: the parent is never written. Review what changed with
diff_branch, then merge_branch (dry_run first), reset_branch to undo, drop_branch when done.
"""


async def _api(fn: Callable[[], T]) -> T:
    """One API call in a worker thread; its error becomes the tool's error message."""
    try:
        return await anyio.to_thread.run_sync(fn)
    except Unreachable as exc:
        raise ToolError(str(exc)) from exc
    except ApiError as exc:
        raise ToolError(f"{exc} (HTTP {exc.status})" if exc.status else str(exc)) from exc


def build(admin_url: str | None = None) -> MCPServer:
    api = AdminClient(admin_url)
    server: MCPServer = MCPServer("mongobranch", instructions=INSTRUCTIONS)

    @server.tool()
    async def create_branch(name: str, parent: str = "main",
                            mode: Literal["wal", "copy"] | None = None,
                            masked: bool = False) -> dict[str, Any]:
        """Create a branch of `parent` (default main) and return it, with `uri`: the
        MongoDB connection string that reads the parent's data plus the branch's writes.
        `masked`: the server's masking rules apply on its port (personal fields masked)."""
        return await _api(lambda: api.create_branch(name, parent, None, None, mode,
                                                    masked=masked or None))

    @server.tool()
    async def list_branches() -> dict[str, Any]:
        """{"branches": [...]}: every branch's name, parent, port, uri, mode, created_at."""
        return {"branches": await _api(api.list_branches)}

    @server.tool()
    async def branch_uri(name: str) -> str:
        """The MongoDB connection string of a branch."""
        branch = await _api(lambda: api.get_branch(name))
        return str(branch["uri"])

    @server.tool()
    async def show_branch(name: str) -> dict[str, Any]:
        """A branch with its changed collections (documents changed, live, dropped) and
        its child branches."""
        return await _api(lambda: api.get_branch(name))

    @server.tool()
    async def diff_branch(name: str, limit: int = DIFF_LIMIT) -> dict[str, Any]:
        """What the branch changed against its parent: each changed document with `op`
        (insert, update, delete), the `parent` and `branch` versions side by side, and a
        per-collection summary. At most `limit` changes (1-1000) are listed; `total`
        counts them all."""
        if not 1 <= limit <= DIFF_MAX:
            raise ToolError(f"limit must be 1-{DIFF_MAX}, got {limit}")

        def collect() -> dict[str, Any]:
            result: dict[str, Any] = {"branch": name, "changes": [], "total": 0}
            for kind, value in api.diff_items(name):
                if kind == "change":
                    result["total"] += 1
                    if len(result["changes"]) < limit:
                        result["changes"].append(value)
                else:
                    result[kind] = value
            result["truncated"] = result["total"] > len(result["changes"])
            return result

        return await _api(collect)

    @server.tool()
    async def branch_log(name: str, limit: int = 20) -> dict[str, Any]:
        """The branch's write log, newest first: LSN, time, namespace, _id, op, client."""
        return await _api(lambda: api.branch_log(name, limit))

    @server.tool()
    async def merge_branch(name: str, dry_run: bool = True,
                           strategy: Literal["abort", "ours", "theirs"] = "abort",
                           force: bool = False) -> dict[str, Any]:
        """Merge a branch's changes into its parent. dry_run (the default) only reports
        what would be applied and the conflicts; call again with dry_run=false to apply.
        A conflict is a document the parent changed after the branch did: `abort` refuses
        the whole merge (`aborted: true`, nothing changed), `ours` keeps the branch's
        version, `theirs` the parent's. A protected parent (main is, by default) refuses
        the merge unless force=true: ask the user before forcing it."""
        def merge() -> dict[str, Any]:
            try:
                return {**api.merge_branch(name, None, strategy, dry_run, force),
                        "aborted": False}
            except ApiError as exc:
                if exc.status == 409 and isinstance(exc.body, dict) and \
                        "conflicts" in exc.body:
                    return {**exc.body, "aborted": True}
                raise

        return await _api(merge)

    @server.tool()
    async def reset_branch(name: str, to: str, force: bool = False) -> dict[str, Any]:
        """Return a branch to its state at an LSN (from branch_log; "0" is the fork
        point) or an ISO-8601 time, undoing later writes. A protected branch needs
        force=true."""
        return await _api(lambda: api.reset_branch(name, to, force))

    @server.tool()
    async def drop_branch(name: str, force: bool = False) -> dict[str, Any]:
        """Delete a branch (refused while it has child branches; a protected one needs
        force=true). The server may keep it restorable for a while
        (`restorable_until`)."""
        return await _api(lambda: api.delete_branch(name, force=force))

    return server


def run(admin_url: str | None = None) -> None:
    """Serves on stdin/stdout until the client closes stdin."""
    anyio.run(build(admin_url).run_stdio_async)
