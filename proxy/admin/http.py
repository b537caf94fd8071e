"""aiohttp application: health, metrics and (from the engine) branch routes."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
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


# Answered by every process itself, even where another one serves the API (scale-out).
LOCAL_PATHS = ("/healthz", "/metrics")


@dataclass
class Peers:
    """The other workers of this machine (`serve --workers`), whose figures a scrape of
    any worker shows too, each sample labelled with its worker."""

    me: str
    others: list[tuple[str, str]]  # (worker label, base URL of its own admin port)


def build_app(healthy: Callable[[], bool],
              tokens: auth.Tokens | None = None,
              forward_to: Callable[[], str | None] | None = None,
              before_metrics: Callable[[], Awaitable[None]] | None = None,
              workers: Peers | None = None) -> web.Application:
    """forward_to: the base URL of the process that serves the branch API instead of this
    one (None: this one), asked at every request. before_metrics: brings the figures a
    scrape reads from the upstream up to date."""
    middlewares = [auth.middleware(tokens or auth.Tokens()), _json_errors]
    sessions: list[aiohttp.ClientSession] = []
    if forward_to is not None:
        middlewares.append(_forwarding(forward_to, sessions))
    app = web.Application(middlewares=middlewares)

    async def close_sessions(_app: web.Application) -> None:
        for session in sessions:
            await session.close()

    app.on_cleanup.append(close_sessions)

    async def healthz(_request: web.Request) -> web.Response:
        if healthy():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "upstream unavailable"}, status=503)

    async def metrics(request: web.Request) -> web.Response:
        if before_metrics is not None:
            await before_metrics()
        body = generate_latest(REGISTRY)
        if workers is not None and request.query.get("worker") != "local":
            if not sessions:
                sessions.append(aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)))
            body = await _all_workers(sessions[0], request, workers, body.decode())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    add_console(app)
    return app


async def _all_workers(session: aiohttp.ClientSession, request: web.Request, workers: Peers,
                       mine: str) -> bytes:
    """This worker's exposition and the others' (asked with `?worker=local`, this
    request's credentials), merged, every sample labelled `worker`. A worker that does not
    answer (being restarted) is left out of this scrape, as a dead target would be."""
    headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
    texts = [(workers.me, mine)]
    for label, base in workers.others:
        try:
            async with session.get(f"{base}/metrics?worker=local", headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=10)) as answer:
                if answer.status == 200:
                    texts.append((label, await answer.text()))
                else:
                    log.info("worker %s answered /metrics with %d", label, answer.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("worker %s did not answer /metrics: %s", label, exc)
    return merged(texts)


def merged(texts: list[tuple[str, str]]) -> bytes:
    """Prometheus expositions as one, each sample labelled `worker` with its source."""
    families: dict[str, Metric] = {}
    for label, text in texts:
        for family in text_string_to_metric_families(text):
            into = families.get(family.name)
            if into is None:
                into = families[family.name] = Metric(family.name, family.documentation,
                                                      family.type, family.unit)
            into.samples.extend(sample._replace(labels={**sample.labels, "worker": label})
                                for sample in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


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


def _forwarding(forward_to: Callable[[], str | None], session: list[aiohttp.ClientSession]
                ) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Hands branch API requests to the process that runs the branch engine, as they
    are (its own token check runs again there); the answer streams back unchanged."""
    @web.middleware
    async def forward(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                      ) -> web.StreamResponse:
        base = forward_to()
        if base is None or request.path in LOCAL_PATHS or request.path == "/" \
                or request.path.startswith("/console"):
            return await handler(request)
        if not session:
            session.append(aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)))
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "transfer-encoding")}
        try:
            async with session[0].request(request.method, base + request.rel_url.raw_path_qs,
                                          headers=headers, data=await request.read(),
                                          allow_redirects=False) as answer:
                reply = web.StreamResponse(status=answer.status, headers={
                    k: v for k, v in answer.headers.items()
                    if k.lower() in ("content-type", "cache-control", "location")})
                await reply.prepare(request)
                async for chunk in answer.content.iter_chunked(1 << 16):
                    await reply.write(chunk)
                await reply.write_eof()
                return reply
        except aiohttp.ClientError as exc:
            raise BranchError(Kind.UNAVAILABLE,
                              f"the process running the branch engine ({base}) cannot be "
                              f"reached: {exc}; retry once another one takes over") from exc

    return forward


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
                tls: ssl.SSLContext | None = None, *, reuse_port: bool = False,
                private: socket.socket | None = None) -> web.AppRunner:
    """The API on host:port (shared by the workers of one machine with `reuse_port`);
    with `private`, also on that bound socket of its own, where the other workers forward
    what only this process can answer."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=tls,
                       reuse_port=reuse_port or None)
    await site.start()
    if private is not None:
        await web.SockSite(runner, private, ssl_context=tls).start()
    return runner
