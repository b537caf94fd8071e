"""A small client for the admin HTTP API, used by the `mongobranch branch` commands."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:9090"
ENV_VAR = "MONGOBRANCH_ADMIN"


class ApiError(Exception):
    """The API answered with an error status; the message is its {"error": ...}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Unreachable(Exception):
    """Nothing answered at the admin URL."""

    def __init__(self, url: str, reason: object):
        super().__init__(f"cannot reach the admin API at {url}: {reason}")
        self.url = url


def resolve_url(url: str | None) -> str:
    """The explicit URL, else $MONGOBRANCH_ADMIN, else the default; scheme added if missing."""
    value = (url or os.environ.get(ENV_VAR) or DEFAULT_URL).strip()
    if "://" not in value:
        value = "http://" + value
    return value.rstrip("/")


class AdminClient:
    def __init__(self, url: str | None = None, timeout: float = 60.0):
        self.url = resolve_url(url)
        self.timeout = timeout

    def request(self, method: str, path: str, body: object | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, _error_message(exc.code, exc.read())) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(self.url, reason) from exc
        try:
            return json.loads(raw or b"null")
        except ValueError as exc:
            raise ApiError(0, f"the admin API at {self.url} did not answer JSON") from exc

    # -- branches -------------------------------------------------------------------
    def create_branch(self, name: str, parent: str | None = None,
                      port: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name}
        if parent is not None:
            body["from"] = parent
        if port is not None:
            body["port"] = port
        return dict(self.request("POST", "/branches", body))

    def list_branches(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/branches"))

    def get_branch(self, name: str) -> dict[str, Any]:
        return dict(self.request("GET", "/branches/" + _quote(name)))

    def delete_branch(self, name: str) -> dict[str, Any]:
        return dict(self.request("DELETE", "/branches/" + _quote(name)))


def _quote(name: str) -> str:
    # "." and ".." are valid branch names but dot segments of a URL path: encode the dots.
    return urllib.parse.quote(name, safe="").replace(".", "%2E")


def _error_message(status: int, raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    text = raw.decode(errors="replace").strip()
    return f"HTTP {status}" + (f": {text}" if text else "")
