"""A small client for the admin HTTP API, used by the `mongobranch branch` commands."""

from __future__ import annotations

import codecs
import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

DEFAULT_URL = "http://127.0.0.1:9090"
ENV_VAR = "MONGOBRANCH_ADMIN"
TOKEN_ENV = "MONGOBRANCH_ADMIN_TOKEN"
TOKEN_FILE_ENV = "MONGOBRANCH_ADMIN_TOKEN_FILE"


class ApiError(Exception):
    """The API answered with an error status; the message is its {"error": ...}, and body
    the parsed reply (a merge refused for conflicts answers 409 with its full result)."""

    def __init__(self, status: int, message: str, body: Any = None):
        super().__init__(message)
        self.status = status
        self.body = body


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


def resolve_token() -> str | None:
    """$MONGOBRANCH_ADMIN_TOKEN, else the first token of $MONGOBRANCH_ADMIN_TOKEN_FILE (the
    server's token file format, so one mounted secret serves both)."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = os.environ.get(TOKEN_FILE_ENV)
    if not path:
        return None
    try:
        with open(path) as f:
            for raw in f:
                line = raw.split("#", 1)[0].strip()
                if line:
                    scope, sep, rest = line.partition(":")
                    return rest if sep and scope in ("admin", "read") else line
    except OSError as exc:
        raise ApiError(0, f"cannot read the admin token file {path}: "
                          f"{exc.strerror or exc}") from exc
    return None


class AdminClient:
    def __init__(self, url: str | None = None, timeout: float = 60.0,
                 token: str | None = None):
        self.url = resolve_url(url)
        self.timeout = timeout
        self.token = token if token is not None else resolve_token()

    def request(self, method: str, path: str, body: object | None = None) -> Any:
        raw = b"".join(self.stream(method, path, body))
        try:
            return json.loads(raw or b"null")
        except ValueError as exc:
            raise ApiError(0, f"the admin API at {self.url} did not answer JSON") from exc

    def stream(self, method: str, path: str, body: object | None = None,
               chunk: int = 64 * 1024) -> Iterator[bytes]:
        """The reply body in chunks as it arrives (a diff is streamed by the server)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            raise ApiError(exc.code, _error_message(exc.code, raw), _parse(raw)) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(self.url, reason) from exc
        with resp:
            try:
                while True:
                    part = resp.read(chunk)
                    if not part:
                        return
                    yield part
            except (http.client.HTTPException, OSError) as exc:
                raise ApiError(0, f"the admin API at {self.url} broke off its reply: "
                                  f"{exc!r}") from exc

    # -- branches -------------------------------------------------------------------
    def create_branch(self, name: str, parent: str | None = None, port: int | None = None,
                      at: int | str | None = None, mode: str | None = None,
                      **lifecycle: Any) -> dict[str, Any]:
        """lifecycle: ttl, expires_at, idle_ttl, protected, masked (those not None are
        sent)."""
        body: dict[str, Any] = {"name": name}
        body.update({k: v for k, v in lifecycle.items() if v is not None})
        if mode is not None:
            body["mode"] = mode
        if parent is not None:
            body["from"] = parent
        if port is not None:
            body["port"] = port
        if at is not None:
            body["at"] = at
        return dict(self.request("POST", "/branches", body))

    def progress(self, name: str) -> dict[str, Any]:
        return dict(self.request("GET", "/branches/" + _quote(name) + "/progress"))

    def migrate_branch(self, name: str, to: str) -> dict[str, Any]:
        return dict(self.request("POST", "/branches/" + _quote(name) + "/migrate", {"to": to}))

    def config(self) -> dict[str, Any]:
        return dict(self.request("GET", "/config"))

    def gc(self, retention: str) -> dict[str, Any]:
        return dict(self.request("POST", "/gc", {"retention": retention}))

    def list_branches(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/branches"))

    def get_branch(self, name: str) -> dict[str, Any]:
        return dict(self.request("GET", "/branches/" + _quote(name)))

    def delete_branch(self, name: str, force: bool = False,
                      purge: bool = False) -> dict[str, Any]:
        query = {k: "true" for k, v in (("force", force), ("purge", purge)) if v}
        path = "/branches/" + _quote(name)
        if query:
            path += "?" + urllib.parse.urlencode(query)
        return dict(self.request("DELETE", path))

    # -- lifecycle ------------------------------------------------------------------
    def update_branch(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """PATCH: ttl/expires_at/idle_ttl (None clears) and protected."""
        return dict(self.request("PATCH", "/branches/" + _quote(name), changes))

    def refresh_branch(self, name: str, force: bool = False) -> dict[str, Any]:
        return dict(self.request("POST", f"/branches/{_quote(name)}/refresh",
                                 {"force": force}))

    def restore_branch(self, name: str, port: int | None = None) -> dict[str, Any]:
        body = {} if port is None else {"port": port}
        return dict(self.request("POST", f"/branches/{_quote(name)}/restore", body))

    def deleted_branches(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/branches?deleted=true"))

    def reap(self, now: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"dry_run": dry_run}
        if now is not None:
            body["now"] = now
        return dict(self.request("POST", "/reap", body))

    # -- history --------------------------------------------------------------------
    def branch_log(self, name: str, limit: int | None = None,
                   before_lsn: int | None = None) -> dict[str, Any]:
        query = {k: str(v) for k, v in (("limit", limit), ("before_lsn", before_lsn))
                 if v is not None}
        path = f"/branches/{_quote(name)}/log"
        if query:
            path += "?" + urllib.parse.urlencode(query)
        return dict(self.request("GET", path))

    def diff_stream(self, name: str) -> Iterator[bytes]:
        """The diff's JSON as the server streams it."""
        return self.stream("GET", f"/branches/{_quote(name)}/diff")

    def diff_items(self, name: str) -> Iterator[tuple[str, Any]]:
        """The diff parsed as it streams, one change in memory at a time:
        ("parent", name), then ("change", change) for each, then ("summary", summary)."""
        return _diff_items(self.diff_stream(name), self.url)

    def branch_diff(self, name: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/branches/{_quote(name)}/diff"))

    def merge_branch(self, name: str, into: str | None = None, strategy: str | None = None,
                     dry_run: bool = False, force: bool = False) -> dict[str, Any]:
        """The merge result; a merge refused for conflicts raises ApiError(409) whose body
        is the result with its conflicts. force: into a protected branch (main)."""
        body: dict[str, Any] = {"dry_run": dry_run}
        if force:
            body["force"] = True
        if into is not None:
            body["into"] = into
        if strategy is not None:
            body["strategy"] = strategy
        return dict(self.request("POST", f"/branches/{_quote(name)}/merge", body))

    def reset_branch(self, name: str, to: int | str, force: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"to": to}
        if force:
            body["force"] = True
        return dict(self.request("POST", f"/branches/{_quote(name)}/reset", body))


_CHANGES = '"changes": ['


def _diff_items(chunks: Iterator[bytes], url: str) -> Iterator[tuple[str, Any]]:
    """Parses the server's diff stream: a header object up to `"changes": [`, the changes
    separated by commas, then `], "summary": {...}}` (proxy/admin/branches.py writes it)."""
    decoder = json.JSONDecoder()
    text = codecs.getincrementaldecoder("utf-8")()
    buf = ""
    source = iter(chunks)

    def more() -> bool:
        nonlocal buf
        for chunk in source:
            buf += text.decode(chunk)
            return True
        buf += text.decode(b"", final=True)
        return False

    def broken() -> ApiError:
        return ApiError(0, f"the admin API at {url} sent a diff that is not well-formed")

    while _CHANGES not in buf:
        if not more():
            raise broken()
    head, _, buf = buf.partition(_CHANGES)
    try:
        yield "parent", json.loads(head.rstrip().rstrip(",") + "}").get("parent")
    except ValueError as exc:
        raise broken() from exc
    pos = 0
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if pos < len(buf) and buf[pos] == "]":
            break
        try:
            change, end = decoder.raw_decode(buf, pos)
        except ValueError:
            buf = buf[pos:]
            pos = 0
            if not more():
                raise broken() from None
            continue
        yield "change", change
        pos = end
        if pos > 1 << 16:  # keep the buffer to what is not parsed yet
            buf, pos = buf[pos:], 0
    rest, buf = buf[pos + 1:], ""
    while more():
        rest += buf
        buf = ""
    try:
        yield "summary", json.loads("{" + rest.strip().lstrip(",")).get("summary")
    except ValueError as exc:
        raise broken() from exc


def _quote(name: str) -> str:
    # "." and ".." are valid branch names but dot segments of a URL path: encode the dots.
    return urllib.parse.quote(name, safe="").replace(".", "%2E")


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _error_message(status: int, raw: bytes) -> str:
    body = _parse(raw)
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    text = raw.decode(errors="replace").strip()
    return f"HTTP {status}" + (f": {text}" if text else "")
