"""/branches routes: JSON over the engine, errors as {"error": ...}."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from proxy.branching.engine import MAIN, Engine
from proxy.branching.errors import BranchError

_CREATE_FIELDS = {"name", "from", "port"}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, LookupError) as exc:
        raise BranchError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BranchError(400, "request body must be a JSON object")
    return body


def add_routes(app: web.Application, engine: Engine) -> None:
    async def create(request: web.Request) -> web.Response:
        try:
            body = await _body(request)
            unknown = set(body) - _CREATE_FIELDS
            if unknown:
                raise BranchError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
            branch = await engine.create_branch(body.get("name"), body.get("from", MAIN),
                                                body.get("port"))
        except BranchError as exc:
            return _error(exc.status, str(exc))
        return web.json_response(branch.public(engine.host), status=201)

    async def list_all(_request: web.Request) -> web.Response:
        if engine.unavailable is not None:
            return _error(503, engine.unavailable)
        return web.json_response([b.public(engine.host) for b in engine.branches.values()])

    async def show(request: web.Request) -> web.Response:
        try:
            return web.json_response(await engine.describe(request.match_info["name"]))
        except BranchError as exc:
            return _error(exc.status, str(exc))

    async def delete(request: web.Request) -> web.Response:
        try:
            await engine.drop_branch(request.match_info["name"])
        except BranchError as exc:
            return _error(exc.status, str(exc))
        return web.json_response({"deleted": request.match_info["name"]})

    app.router.add_post("/branches", create)
    app.router.add_get("/branches", list_all)
    app.router.add_get("/branches/{name}", show)
    app.router.add_delete("/branches/{name}", delete)
