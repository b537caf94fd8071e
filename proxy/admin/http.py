"""aiohttp application: health, metrics and (from the engine) branch routes."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pymongo.errors import ConnectionFailure

from proxy.admin import auth
from proxy.branching.errors import BranchError, Kind
from proxy.metrics import REGISTRY

log = logging.getLogger("mongobranch.admin")

# The web console: static files, served as they are (no build step, nothing external).
CONSOLE = Path(__file__).resolve().parent / "console"
# The one place a branch failure becomes an HTTP status.
HTTP_STATUS = {Kind.INVALID: 400, Kind.FORBIDDEN: 403, Kind.NOT_FOUND: 404, Kind.CONFLICT: 409,
               Kind.INTERNAL: 500, Kind.UPSTREAM: 502, Kind.UNAVAILABLE: 503}


def build_app(healthy: Callable[[], bool],
              tokens: auth.Tokens | None = None) -> web.Application:
    app = web.Application(middlewares=[auth.middleware(tokens or auth.Tokens()), _json_errors])

    async def healthz(_request: web.Request) -> web.Response:
        if healthy():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "upstream unavailable"}, status=503)

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    add_console(app)
    return app


def add_console(app: web.Application) -> None:
    """/console/: a page that calls this same API from the browser."""
    async def to_console(_request: web.Request) -> web.StreamResponse:
        # Relative, so that it also holds behind a reverse proxy's path prefix.
        return web.Response(status=302, headers={"Location": "console/"})

    async def index(_request: web.Request) -> web.StreamResponse:
        return web.FileResponse(CONSOLE / "index.html", headers={"Cache-Control": "no-cache"})

    app.router.add_get("/", to_console)
    app.router.add_get("/console", to_console)
    app.router.add_get("/console/", index)
    app.router.add_static("/console/", CONSOLE)


@web.middleware
async def _json_errors(request: web.Request, handler: Callable) -> web.StreamResponse:  # type: ignore[type-arg]
    """Every error the API returns is JSON {"error": ...}, including aiohttp's own 404/405;
    a branch operation's failure with the status of its kind."""
    try:
        return await handler(request)
    except BranchError as exc:
        return web.json_response({"error": str(exc)}, status=HTTP_STATUS[exc.kind])
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return web.json_response({"error": exc.reason}, status=exc.status)
    except ConnectionFailure as exc:  # the upstream is down or unreachable: not our bug
        log.warning("admin API %s %s: upstream unavailable: %s", request.method, request.path,
                    exc)
        return web.json_response({"error": f"upstream unavailable: {exc}"}, status=503)
    except Exception as exc:  # a bug or an upstream failure: still a JSON error
        log.exception("admin API %s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error: {exc}"}, status=500)


async def start(app: web.Application, host: str, port: int,
                tls: ssl.SSLContext | None = None) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=tls)
    await site.start()
    return runner
