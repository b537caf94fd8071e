"""Real processes for the suite: a SecantusDB upstream and the proxy itself."""

from __future__ import annotations

import json
import os
import signal as signals
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0,
              proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


_CAPPED_LAUNCHER = """
import functools, sys
import secantus.cli as cli
cap = int(sys.argv.pop(1))
cli.SecantusDBServer = functools.partial(cli.SecantusDBServer, max_connections=cap)
sys.exit(cli.main())
"""


@dataclass
class Secantus:
    """A SecantusDB server process (in memory unless a storage path is given)."""

    port: int = field(default_factory=free_port)
    storage: str = ":memory:"
    auth: bool = False
    extra: list[str] = field(default_factory=list)
    # SecantusDB refuses connections beyond 1,000 and has no option for it (mongod has no
    # such default cap): set, the server is started with this cap instead.
    max_connections: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: str = ""

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self) -> Secantus:
        launcher = [str(BIN / "secantusd-py")]
        if self.max_connections is not None:
            launcher = [sys.executable, "-c", _CAPPED_LAUNCHER, str(self.max_connections)]
        args = [*launcher, "--host", "127.0.0.1", "--port", str(self.port),
                "--storage-path", self.storage, "--log-level", "WARNING"]
        if self.auth:
            args.append("--auth")
        args.extend(self.extra)
        self.log = tempfile.mktemp(prefix="secantus-", suffix=".log")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True)
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class ProxyProcess:
    """`mongobranch serve` as a child process, exactly as a user runs it."""

    upstream: str
    meta_db: str = "mongobranch_test"
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    branch_ports: tuple[int, int] | None = None
    extra: list[str] = field(default_factory=list)
    # A command the proxy runs under (e.g. `unshare` with its own /etc/resolv.conf).
    wrapper: list[str] = field(default_factory=list)
    # The suite's tests drop branches expecting them gone and merge into main freely, as
    # before branch lifecycle existed: unless set, the proxy runs with drops removing at
    # once and main unprotected. tests/test_lifecycle.py runs with the serve defaults.
    lifecycle_defaults: bool = False
    proc: subprocess.Popen[bytes] | None = None
    log: str = ""

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, wait_healthy: bool = True) -> ProxyProcess:
        if self.branch_ports is None:
            base = 20000 + (os.getpid() * 7 + self.port) % 30000
            self.branch_ports = (base, base + 49)
        args = [*self.wrapper, str(BIN / "mongobranch"), "serve", "--upstream", self.upstream,
                "--listen", f"127.0.0.1:{self.port}", "--admin", f"127.0.0.1:{self.admin_port}",
                "--branch-ports", f"{self.branch_ports[0]}-{self.branch_ports[1]}",
                "--meta-db", self.meta_db, "--log-level", "INFO", *self.extra]
        if not self.lifecycle_defaults:
            args += ["--deleted-retention", "0", "--no-protect-main"]
        if not self.log:
            self.log = tempfile.mktemp(prefix="mongobranch-", suffix=".log")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True)
        wait_port(self.admin_port, proc=self.proc)
        wait_port(self.port, proc=self.proc)
        if wait_healthy:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.admin_url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("proxy never became healthy")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signals.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def read_log(self) -> str:
        return Path(self.log).read_text(errors="replace")

    def api(self, method: str, path: str, body: object | None = None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.admin_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")
