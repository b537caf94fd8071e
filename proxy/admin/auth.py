"""Bearer tokens for the admin HTTP API.

The admin API acts with the proxy's own upstream credentials (it is the operator's
channel), so who may call it is decided here: a token of scope `read` may call the GET
routes, one of scope `admin` every route. `/healthz` and `/metrics` stay open for
probes and scrapers.

Tokens come from (all are merged):
- `MONGOBRANCH_ADMIN_TOKEN`: one admin token;
- `MONGOBRANCH_ADMIN_TOKENS`: entries separated by commas or whitespace;
- a file (`--admin-token-file`, `MONGOBRANCH_ADMIN_TOKEN_FILE`): one entry per line,
  `#` starts a comment.
An entry is `SCOPE:TOKEN` or a bare `TOKEN` (scope admin).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from proxy.branching import audit

log = logging.getLogger("mongobranch.admin")

ADMIN, READ = "admin", "read"
SCOPES = (ADMIN, READ)
ENV_TOKEN = "MONGOBRANCH_ADMIN_TOKEN"
ENV_TOKENS = "MONGOBRANCH_ADMIN_TOKENS"
ENV_TOKEN_FILE = "MONGOBRANCH_ADMIN_TOKEN_FILE"
MIN_LENGTH = 16
OPEN_PATHS = frozenset({"/healthz", "/metrics"})


class TokenError(ValueError):
    """The tokens cannot be read, or the admin API would be exposed without one."""


def parse_entry(entry: str, origin: str) -> tuple[str, str]:
    """(scope, token) from `SCOPE:TOKEN` or a bare token."""
    scope, sep, token = entry.partition(":")
    if not sep or scope not in SCOPES:
        scope, token = ADMIN, entry
    if len(token) < MIN_LENGTH:
        raise TokenError(f"admin token from {origin} is shorter than {MIN_LENGTH} characters; "
                         "use a random one, e.g. `openssl rand -hex 32`")
    return scope, token


def read_token_file(path: str) -> list[tuple[str, str]]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TokenError(f"cannot read the admin token file {path}: {exc.strerror or exc}") \
            from exc
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            entries.append(parse_entry(line, f"{path} line {number}"))
    return entries


@dataclass
class Tokens:
    entries: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, token_file: str | None = None,
             env: Mapping[str, str] | None = None) -> Tokens:
        env = os.environ if env is None else env
        entries: list[tuple[str, str]] = []
        if env.get(ENV_TOKEN):
            entries.append(parse_entry(f"{ADMIN}:{env[ENV_TOKEN].strip()}", ENV_TOKEN))
        for item in env.get(ENV_TOKENS, "").replace(",", " ").split():
            entries.append(parse_entry(item, ENV_TOKENS))
        path = token_file or env.get(ENV_TOKEN_FILE)
        if path:
            found = read_token_file(path)
            if not found:
                raise TokenError(f"the admin token file {path} holds no token")
            entries.extend(found)
        return cls(entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def scope_of(self, presented: str) -> str | None:
        """The scope of a presented token (the widest, if listed twice), else None."""
        scopes = {scope for scope, token in self.entries
                  if hmac.compare_digest(token.encode(), presented.encode())}
        if ADMIN in scopes:
            return ADMIN
        return READ if scopes else None


def fingerprint(token: str) -> str:
    """Names a token in the audit log without revealing it."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, port: int, tokens: Tokens) -> None:
    """An admin API reachable from elsewhere must not run without a token."""
    if not tokens and not is_loopback(host):
        raise TokenError(
            f"the admin API would listen on {host}:{port}, reachable from other machines, "
            f"without a token: set {ENV_TOKEN} (or {ENV_TOKENS}, or --admin-token-file / "
            f"{ENV_TOKEN_FILE}), or listen on a loopback address (--admin 127.0.0.1:{port})")


def _denied(request: web.Request, status: int, message: str) -> web.Response:
    if request.method not in ("GET", "HEAD"):
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        audit.record(f"{request.method} {route}", branch=request.match_info.get("name"),
                     user=request.get("mb_user"), client=str(request.remote), via="http",
                     outcome="refused", code=status, error=message)
    headers = {"WWW-Authenticate": 'Bearer realm="mongobranch"'} if status == 401 else {}
    return web.json_response({"error": message}, status=status, headers=headers)


def middleware(tokens: Tokens) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Checks the bearer token of every request but those of OPEN_PATHS. Without any
    token configured (only allowed on a loopback address) the API is open."""

    @web.middleware
    async def check(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                    ) -> web.StreamResponse:
        if not tokens:
            request["mb_user"] = "admin-api:open"
            return await handler(request)
        if request.path in OPEN_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        kind, _, presented = header.partition(" ")
        if kind.lower() != "bearer" or not presented.strip():
            return _denied(request, 401, "authentication required: send 'Authorization: "
                                         "Bearer <token>' (the CLI sends "
                                         "$MONGOBRANCH_ADMIN_TOKEN)")
        scope = tokens.scope_of(presented.strip())
        if scope is None:
            return _denied(request, 401, "invalid admin token")
        request["mb_user"] = f"admin-api:{scope}:{fingerprint(presented.strip())}"
        if scope == READ and request.method not in ("GET", "HEAD"):
            return _denied(request, 403, f"a read-only token may not {request.method} "
                                         f"{request.path}; this needs an admin token")
        return await handler(request)

    return check
