"""/branches routes: the admin HTTP edge of the branch operations (operations.py).

Each route parses its request (path, query string, JSON body) with requests.py, calls the
operation and shapes the reply; a BranchError becomes {"error": ...} with its status in
the error middleware (http.py), once for every route.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from bson import json_util

from proxy.admin.http import HTTP_STATUS
from proxy.branching import audit, history, operations
from proxy.branching import requests as rq
from proxy.branching.engine import Engine
from proxy.branching.errors import BranchError, Kind

_JSON = json_util.JSONOptions(json_mode=json_util.JSONMode.RELAXED, tz_aware=True)


def dumps(value: Any) -> str:
    """JSON for documents: BSON types in relaxed Extended JSON."""
    return json_util.dumps(value, json_options=_JSON)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status, dumps=dumps)


def _with_force(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
    """force from the query string (?force=true) or the body ("force": true): either
    says so."""
    query = request.query.get("force")
    if query is None:
        return body
    return {**body, "force": rq.parse_flag(query, "force") or
            rq.parse_flag(body.get("force"), "force")}


def _query(request: web.Request, *keys: str) -> dict[str, str]:
    """The query parameters a route reads (others are ignored, as they always were)."""
    return {k: request.query[k] for k in keys if k in request.query}


async def _optional_body(request: web.Request) -> dict[str, Any]:
    return await _body(request) if request.can_read_body else {}


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, LookupError) as exc:
        raise BranchError(Kind.INVALID, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BranchError(Kind.INVALID, "request body must be a JSON object")
    return body


Route = Callable[[web.Request], Awaitable[web.Response]]


def audited(op: str) -> Callable[[Route], Route]:
    """One audit line per call of a route that changes branches, whatever its outcome."""

    def wrap(route: Route) -> Route:
        @functools.wraps(route)
        async def run(request: web.Request) -> web.Response:
            try:
                response = await route(request)
            except BranchError as exc:  # the error middleware answers it, with this status
                _audit(request, op, HTTP_STATUS[exc.kind], str(exc))
                raise
            except Exception as exc:
                _audit(request, op, 500, repr(exc))
                raise
            error = None
            if response.status >= 400 and response.text:
                try:
                    error = json.loads(response.text).get("error")
                except (ValueError, AttributeError):
                    error = None
            _audit(request, op, response.status, error)
            return response

        return run

    return wrap


def _audit(request: web.Request, op: str, status: int, error: str | None) -> None:
    audit.record(op, branch=request.get("mb_branch") or request.match_info.get("name"),
                 user=request.get("mb_user"), client=str(request.remote), via="http",
                 outcome=audit.outcome_of(status, http=True),
                 code=status if status >= 400 else None, error=error)


def add_routes(app: web.Application, engine: Engine) -> None:
    @audited("POST /branches")
    async def create(request: web.Request) -> web.Response:
        body = await _body(request)
        request["mb_branch"] = body.get("name")
        branch = await operations.create(engine, rq.parse_create(body))
        return web.json_response(engine.public(branch), status=201)

    async def list_all(request: web.Request) -> web.Response:
        req = rq.parse_list(_query(request, "deleted"))
        return web.json_response(operations.list_branches(engine, req))

    async def show(request: web.Request) -> web.Response:
        return _json(await engine.describe(request.match_info["name"]))

    @audited("DELETE /branches/{name}")
    async def delete(request: web.Request) -> web.Response:
        drop = rq.parse_drop(request.match_info["name"],
                             _query(request, "force", "purge"))
        return web.json_response(await operations.drop(engine, drop))

    async def log(request: web.Request) -> web.Response:
        req = rq.parse_log(request.match_info["name"],
                           _query(request, "limit", "before_lsn"))
        return _json({"branch": req.name, "entries": await operations.log(engine, req)})

    async def diff(request: web.Request) -> web.StreamResponse:
        """Streamed: one change at a time, so memory does not grow with the diff."""
        name = request.match_info["name"]
        # The query string is not read: nothing in it can change a diff.
        parent, changes = operations.diff(engine, rq.parse_diff(name, {}))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(f'{{"branch": {json.dumps(name)}, '
                             f'"parent": {json.dumps(parent)}, "changes": ['.encode())
        summary: dict[str, Any] = {}
        first = True
        async for change in changes:
            history.summarize(summary, change)
            await response.write((("" if first else ",\n") + dumps(change)).encode())
            first = False
        await response.write(f'], "summary": {dumps(summary)}}}\n'.encode())
        await response.write_eof()
        return response

    @audited("POST /branches/{name}/merge")
    async def merge(request: web.Request) -> web.Response:
        body = _with_force(request, await _body(request))
        result = await operations.merge(engine, rq.parse_merge(request.match_info["name"], body))
        aborted = result["strategy"] == "abort" and result["conflicts"] and \
            not result["dry_run"]
        return _json(result, 409 if aborted else 200)

    @audited("POST /branches/{name}/reset")
    async def reset(request: web.Request) -> web.Response:
        body = _with_force(request, await _body(request))
        return _json(await operations.reset(engine,
                                            rq.parse_reset(request.match_info["name"], body)))

    @audited("POST /gc")
    async def collect(request: web.Request) -> web.Response:
        return _json(await operations.collect(engine, rq.parse_gc(await _body(request))))

    async def config(_request: web.Request) -> web.Response:
        return _json(engine.config.to_json())

    @audited("POST /branches/{name}/migrate")
    async def migrate(request: web.Request) -> web.Response:
        req = rq.parse_migrate(request.match_info["name"], await _body(request))
        return _json(await operations.migrate(engine, req))

    async def progress(request: web.Request) -> web.Response:
        state = engine.progress.get(request.match_info["name"])
        if state is None:
            raise BranchError(Kind.NOT_FOUND,
                              f"branch {request.match_info['name']!r} is not being copied")
        return _json(state)

    @audited("PATCH /branches/{name}")
    async def patch(request: web.Request) -> web.Response:
        req = rq.parse_update(request.match_info["name"], await _body(request))
        return _json(await operations.update(engine, req))

    @audited("POST /branches/{name}/refresh")
    async def refresh(request: web.Request) -> web.Response:
        body = _with_force(request, await _optional_body(request))
        branch = await operations.refresh(engine,
                                          rq.parse_refresh(request.match_info["name"], body))
        return _json(engine.public(branch))

    @audited("POST /branches/{name}/restore")
    async def restore(request: web.Request) -> web.Response:
        req = rq.parse_restore(request.match_info["name"], await _optional_body(request))
        return _json(engine.public(await operations.restore(engine, req)))

    @audited("POST /reap")
    async def reap(request: web.Request) -> web.Response:
        """One reaper pass now; `now` (a later time) asks what would expire by then and
        acts on it, `dry_run` only reports."""
        req = rq.parse_reap(await _optional_body(request))
        return _json(await operations.reap(engine, req))

    app.router.add_patch("/branches/{name}", patch)
    app.router.add_post("/branches/{name}/refresh", refresh)
    app.router.add_post("/branches/{name}/restore", restore)
    app.router.add_post("/reap", reap)
    app.router.add_get("/branches/{name}/progress", progress)
    app.router.add_post("/branches/{name}/migrate", migrate)
    app.router.add_get("/config", config)
    app.router.add_post("/gc", collect)
    app.router.add_get("/branches/{name}/log", log)
    app.router.add_get("/branches/{name}/diff", diff)
    app.router.add_post("/branches/{name}/merge", merge)
    app.router.add_post("/branches/{name}/reset", reset)
    app.router.add_post("/branches", create)
    app.router.add_get("/branches", list_all)
    app.router.add_get("/branches/{name}", show)
    app.router.add_delete("/branches/{name}", delete)
