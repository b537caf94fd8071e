"""/branches routes: JSON over the engine, errors as {"error": ...}."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from bson import json_util

from proxy.branching import audit, copymode, gc, history, lifecycle
from proxy.branching.engine import MAIN, Engine
from proxy.branching.errors import BranchError, Kind

# The one place a branch failure becomes an HTTP status.
HTTP_STATUS = {Kind.INVALID: 400, Kind.FORBIDDEN: 403, Kind.NOT_FOUND: 404, Kind.CONFLICT: 409,
               Kind.INTERNAL: 500, Kind.UPSTREAM: 502, Kind.UNAVAILABLE: 503}
_CREATE_FIELDS = {"name", "from", "port", "at", "mode", *lifecycle.FIELDS}
_JSON = json_util.JSONOptions(json_mode=json_util.JSONMode.RELAXED, tz_aware=True)


def dumps(value: Any) -> str:
    """JSON for documents: BSON types in relaxed Extended JSON."""
    return json_util.dumps(value, json_options=_JSON)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status, dumps=dumps)


def _int_param(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise BranchError(Kind.INVALID, f"{name} must be an integer, got {raw!r}") from exc


def _force(request: web.Request, body: dict[str, Any] | None = None) -> bool:
    """force from the query string (?force=true) or the body ("force": true)."""
    return lifecycle.parse_force(request.query.get("force")) or \
        lifecycle.parse_force((body or {}).get("force"))


async def _optional_body(request: web.Request) -> dict[str, Any]:
    return await _body(request) if request.can_read_body else {}


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise BranchError(Kind.INVALID, f"unknown field(s): {', '.join(sorted(unknown))}")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


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
        try:
            body = await _body(request)
            request["mb_branch"] = body.get("name")
            _only(body, _CREATE_FIELDS)
            # Checked before the branch exists: bad lifecycle input creates nothing.
            changes = lifecycle.settings({k: v for k, v in body.items()
                                          if k in lifecycle.FIELDS})
            if body.get("at") is not None:
                branch = await history.create_at(engine, body.get("name"),
                                                 body.get("from", MAIN), body["at"],
                                                 body.get("port"))
            else:
                branch = await engine.create_branch(body.get("name"), body.get("from", MAIN),
                                                    body.get("port"), body.get("mode"))
            await lifecycle.apply(engine, branch, changes)
        except BranchError as exc:
            return _error(HTTP_STATUS[exc.kind], str(exc))
        return web.json_response(engine.public(branch), status=201)

    async def list_all(request: web.Request) -> web.Response:
        if engine.unavailable is not None:
            return _error(503, engine.unavailable)
        try:
            if lifecycle.parse_force(request.query.get("deleted")):
                return web.json_response([lifecycle.deleted_public(engine, b)
                                          for b in lifecycle.deleted(engine)])
        except BranchError:
            return _error(400, f"deleted must be true or false, got "
                               f"{request.query.get('deleted')!r}")
        return web.json_response([engine.public(b) for b in engine.branches.values()
                                  if b.deleted_at is None])

    async def show(request: web.Request) -> web.Response:
        try:
            return _json(await engine.describe(request.match_info["name"]))
        except BranchError as exc:
            return _error(HTTP_STATUS[exc.kind], str(exc))

    @audited("DELETE /branches/{name}")
    async def delete(request: web.Request) -> web.Response:
        try:
            purge = request.query.get("purge")
            return web.json_response(await lifecycle.drop(
                engine, request.match_info["name"], force=_force(request), purge=purge))
        except BranchError as exc:
            return _error(HTTP_STATUS[exc.kind], str(exc))

    async def log(request: web.Request) -> web.Response:
        try:
            limit = _int_param(request, "limit")
            entries = await history.log(engine, request.match_info["name"],
                                        100 if limit is None else limit,
                                        _int_param(request, "before_lsn"))
        except BranchError as exc:
            return _error(HTTP_STATUS[exc.kind], str(exc))
        return _json({"branch": request.match_info["name"], "entries": entries})

    async def diff(request: web.Request) -> web.StreamResponse:
        """Streamed: one change at a time, so memory does not grow with the diff."""
        name = request.match_info["name"]
        try:
            branch = engine.get(name)
        except BranchError as exc:
            return _error(HTTP_STATUS[exc.kind], str(exc))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(f'{{"branch": {json.dumps(name)}, '
                             f'"parent": {json.dumps(branch.parent)}, "changes": ['.encode())
        summary: dict[str, Any] = {}
        first = True
        async for change in history.diff(engine, name):
            history.summarize(summary, change)
            await response.write((("" if first else ",\n") + dumps(change)).encode())
            first = False
        await response.write(f'], "summary": {dumps(summary)}}}\n'.encode())
        await response.write_eof()
        return response

    @audited("POST /branches/{name}/merge")
    async def merge(request: web.Request) -> web.Response:
        try:
            body = await _body(request)
            _only(body, {"into", "strategy", "dry_run", "force"})
            branch = engine.get(request.match_info["name"])
            # Only a merge that would write (bad input is left to merge's own 400s).
            if body.get("dry_run", False) is False and body.get("into") in (None,
                                                                            branch.parent):
                lifecycle.guard(engine, branch.parent, _force(request, body), "merging into")
            result = await history.merge(engine, request.match_info["name"], body.get("into"),
                                         body.get("strategy", "abort"),
                                         body.get("dry_run", False))
        except BranchError as exc:
            return _error(HTTP_STATUS[exc.kind], str(exc))
        aborted = result["strategy"] == "abort" and result["conflicts"] and \
            not result["dry_run"]
        return _json(result, 409 if aborted else 200)

    @audited("POST /branches/{name}/reset")
    async def reset(request: web.Request) -> web.Response:
        try:
            body = await _body(request)
            _only(body, {"to", "force"})
            if "to" not in body:
                raise BranchError(Kind.INVALID, "reset needs 'to': an LSN or an ISO-8601 time")
            engine.get(request.match_info["name"])
            lifecycle.guard(engine, request.match_info["name"], _force(request, body),
                            "resetting")
            return _json(await history.reset(engine, request.match_info["name"], body["to"]))
        except BranchError as exc:
            return _error(HTTP_STATUS[exc.kind], str(exc))

    @audited("POST /gc")
    async def collect(request: web.Request) -> web.Response:
        try:
            engine.check_ready()
            body = await _body(request)
            _only(body, {"retention"})
            if "retention" not in body:
                raise BranchError(Kind.INVALID, "gc needs 'retention', e.g. \"7d\"")
            return _json(await gc.collect(engine, gc.parse_duration(body["retention"])))
        except BranchError as exc:
            return _error(HTTP_STATUS[exc.kind], str(exc))

    async def config(_request: web.Request) -> web.Response:
        return _json(engine.config.to_json())

    @audited("POST /branches/{name}/migrate")
    async def migrate(request: web.Request) -> web.Response:
        try:
            body = await _body(request)
            _only(body, {"to"})
            if "to" not in body:
                raise BranchError(Kind.INVALID, "migrate needs 'to': \"wal\" or \"copy\"")
            return _json(await copymode.migrate(engine, request.match_info["name"],
                                                body["to"]))
        except BranchError as exc:
            return _error(HTTP_STATUS[exc.kind], str(exc))

    async def progress(request: web.Request) -> web.Response:
        state = engine.progress.get(request.match_info["name"])
        if state is None:
            return _error(404, f"branch {request.match_info['name']!r} is not being copied")
        return _json(state)

    @audited("PATCH /branches/{name}")
    async def patch(request: web.Request) -> web.Response:
        try:
            body = await _body(request)
            return _json(await lifecycle.update(engine, request.match_info["name"], body))
        except BranchError as exc:
            return _error(HTTP_STATUS[exc.kind], str(exc))

    @audited("POST /branches/{name}/refresh")
    async def refresh(request: web.Request) -> web.Response:
        try:
            body = await _optional_body(request)
            _only(body, {"force"})
            branch = await lifecycle.refresh(engine, request.match_info["name"],
                                             _force(request, body))
        except BranchError as exc:
            return _error(HTTP_STATUS[exc.kind], str(exc))
        return _json(engine.public(branch))

    @audited("POST /branches/{name}/restore")
    async def restore(request: web.Request) -> web.Response:
        try:
            body = await _optional_body(request)
            _only(body, {"port"})
            branch = await lifecycle.restore(engine, request.match_info["name"],
                                             body.get("port"))
        except BranchError as exc:
            return _error(HTTP_STATUS[exc.kind], str(exc))
        return _json(engine.public(branch))

    @audited("POST /reap")
    async def reap(request: web.Request) -> web.Response:
        """One reaper pass now; `now` (a later time) asks what would expire by then and
        acts on it, `dry_run` only reports."""
        try:
            body = await _optional_body(request)
            _only(body, {"now", "dry_run"})
            now = None
            if body.get("now") is not None:
                now = lifecycle.parse_time(body["now"], "now")
            dry_run = body.get("dry_run", False)
            if not isinstance(dry_run, bool):
                raise BranchError(Kind.INVALID, "dry_run must be true or false")
            return _json(await lifecycle.reap(engine, now, dry_run))
        except BranchError as exc:
            return _error(HTTP_STATUS[exc.kind], str(exc))

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
