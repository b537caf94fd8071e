"""Real processes for the suite and the benchmarks: a SecantusDB upstream and the proxy.

The one place that knows how to start, wait for and stop them. The benchmarks import it
(`benchmarks/*.py` put the repository root on `sys.path`), so a test and a benchmark run
the same command lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal as signals
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self, TypeVar

from pymongo import MongoClient

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_range(n: int, taken: set[int] | None = None) -> tuple[int, int]:
    """n consecutive free ports (a proxy's branch ports), none of them in `taken`, which
    gets them."""
    taken = set() if taken is None else taken
    rnd = random.Random()
    for _ in range(200):
        lo = rnd.randrange(20000, 60000 - n)
        span = set(range(lo, lo + n))
        if not span & taken and all(port_free(p) for p in span):
            taken |= span
            return lo, lo + n - 1
    raise RuntimeError(f"no free range of {n} ports")


def wait_port(port: int, timeout: float = 60.0,
              proc: subprocess.Popen[bytes] | None = None, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before port "
                               f"{port} opened")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def executable(name: str) -> str | None:
    """A program of this environment (the venv's own first), None when not installed."""
    here = BIN / name
    return str(here) if here.exists() else shutil.which(name)


def _program(name: str) -> str:
    found = executable(name)
    if found is None:
        raise SystemExit(f"{name} not found: pip install -e '.[embedded]' (or `make bench`)")
    return found


def spawn(args: list[str], log: str | Path,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A child in its own session (a signal to its group reaches its forks too), its output
    appended to `log`; `env` is added to this process's environment."""
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True,
                                env=None if env is None else {**os.environ, **env})


class _Started(Protocol):
    proc: subprocess.Popen[bytes] | None


_S = TypeVar("_S", bound=_Started)


@dataclass
class Procs:
    """A benchmark's children, logging into one directory and stopped together."""

    logdir: Path
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def log(self, name: str) -> str:
        return str(self.logdir / f"{name}.log")

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        proc = spawn(args, self.log(name))
        self.children.append(proc)
        return proc

    def add(self, started: _S) -> _S:
        """A Secantus or ProxyProcess already started, stopped with the rest."""
        assert started.proc is not None
        self.children.append(started.proc)
        return started

    def stop_all(self) -> None:
        for proc in self.children:
            if proc.poll() is not None:
                print(f"WARNING: {proc.args[0]} (pid {proc.pid}) had exited with "
                      f"{proc.returncode} before the end of the run", flush=True)
        for proc in reversed(self.children):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signals.SIGTERM)
        for proc in self.children:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signals.SIGKILL)
                proc.wait()


_CAPPED_LAUNCHER = """
import functools, sys
import secantus.cli as cli
cap = int(sys.argv.pop(1))
cli.SecantusDBServer = functools.partial(cli.SecantusDBServer, max_connections=cap)
sys.exit(cli.main())
"""


@dataclass
class Secantus:
    """A SecantusDB server process (in memory unless a storage path is given); started
    again after a stop or kill, it comes back on the same port and storage."""

    port: int = field(default_factory=free_port)
    storage: str = ":memory:"
    auth: bool = False
    extra: list[str] = field(default_factory=list)
    # SecantusDB refuses connections beyond 1,000 and has no option for it (mongod has no
    # such default cap): set, the server is started with this cap instead.
    max_connections: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: str = ""  # a temporary file unless set

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> Self:
        launcher = [_program("secantusd-py")]
        if self.max_connections is not None:
            launcher = [sys.executable, "-c", _CAPPED_LAUNCHER, str(self.max_connections)]
        args = [*launcher, "--host", "127.0.0.1", "--port", str(self.port),
                "--storage-path", self.storage, "--log-level", "WARNING"]
        if self.auth:
            args.append("--auth")
        args.extend(self.extra)
        if not self.log:
            self.log = tempfile.mktemp(prefix="secantus-", suffix=".log")
        self.proc = spawn(args, self.log)
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

    def kill(self) -> None:
        """Gone at once, as in a crash: no clean shutdown."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class ProxyProcess:
    """`mongobranch serve` as a child process, exactly as a user runs it."""

    upstream: str
    meta_db: str | None = "mongobranch_test"  # None: the serve default
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    branch_ports: tuple[int, int] | None = None
    data_dir: str | None = None  # None: the serve default
    log_level: str = "INFO"
    extra: list[str] = field(default_factory=list)
    # The program: `mongobranch` unless set (a benchmark's baseline runs another tree's).
    exe: list[str] = field(default_factory=list)
    # A command the proxy runs under (e.g. `unshare` with its own /etc/resolv.conf).
    wrapper: list[str] = field(default_factory=list)
    # The suite's tests drop branches expecting them gone and merge into main freely, as
    # before branch lifecycle existed: unless set, the proxy runs with drops removing at
    # once and main unprotected. tests/test_lifecycle.py runs with the serve defaults.
    lifecycle_defaults: bool = False
    proc: subprocess.Popen[bytes] | None = None
    log: str = ""  # a temporary file unless set
    # The main and branch ports' address (scale-out tests give each process its own
    # loopback address, as each machine of a cluster has its own).
    host: str = "127.0.0.1"
    # Environment variables set for the proxy process only (added to the tests' own).
    env: dict[str, str] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, wait_healthy: bool = True) -> Self:
        if self.branch_ports is None:
            base = 20000 + (os.getpid() * 7 + self.port) % 30000
            self.branch_ports = (base, base + 49)
        exe = self.exe or [_program("mongobranch")]
        args = [*self.wrapper, *exe, "serve", "--upstream", self.upstream,
                "--listen", f"{self.host}:{self.port}", "--admin", f"127.0.0.1:{self.admin_port}",
                "--branch-ports", f"{self.branch_ports[0]}-{self.branch_ports[1]}",
                "--log-level", self.log_level]
        if self.meta_db is not None:
            args += ["--meta-db", self.meta_db]
        if self.data_dir is not None:
            args += ["--data-dir", self.data_dir]
        args += self.extra
        if not self.lifecycle_defaults:
            args += ["--deleted-retention", "0", "--no-protect-main"]
        if not self.log:
            self.log = tempfile.mktemp(prefix="mongobranch-", suffix=".log")
        self.proc = spawn(args, self.log, self.env)
        wait_port(self.admin_port, proc=self.proc)
        wait_port(self.port, proc=self.proc, host=self.host)
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

    def api(self, method: str, path: str, body: object | None = None,
            timeout: float = 60) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.admin_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")


# The relay's per-message checks run compiled (proxy/wire/_cwire.pyx) or in pure Python
# (proxy/wire/fastwire.py); test modules of the relay run against both.
RELAY_CHECKS = ("compiled", "pure")


@contextlib.contextmanager
def relay_checks_proxy(kind: str, session_proxy: ProxyProcess,
                       upstream: Secantus) -> Iterator[ProxyProcess]:
    """The session proxy for "compiled" (skipped where the extension is not built), a proxy
    of its own started with MONGOBRANCH_PURE_PYTHON=1 for "pure"; either way its log is
    checked to say that the relay runs the checks asked for."""
    import pytest

    from proxy.wire import fastwire

    if kind == "compiled":
        if not fastwire.COMPILED:
            pytest.skip(f"relay checks: {fastwire.IMPLEMENTATION}")
        _wait_relay_checks(session_proxy, "relay checks: compiled")
        yield session_proxy
        return
    proc = ProxyProcess(upstream.uri, meta_db="mongobranch_test_pure",
                        env={"MONGOBRANCH_PURE_PYTHON": "1"}).start()
    try:
        _wait_relay_checks(proc, "relay checks: pure Python (MONGOBRANCH_PURE_PYTHON is set)")
        yield proc
    finally:
        proc.stop()


def _wait_relay_checks(proxy: ProxyProcess, line: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while line not in proxy.read_log():
        if time.monotonic() > deadline:
            raise AssertionError(f"the proxy's log never says {line!r}")
        time.sleep(0.05)


_T = TypeVar("_T")


def until(what: str, probe: Callable[[], _T | None], timeout: float = 60.0) -> _T:
    """Polls an observable condition, bounded: a test never sleeps and hopes."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def secantus_with_users(storage: str, users: dict[str, list[dict[str, str]]],
                        password: str) -> Secantus:
    """A SecantusDB on `storage` started with --auth, holding these users (user -> roles,
    SCRAM-SHA-256, one password): made without auth first, then restarted with it."""
    server = Secantus(storage=storage).start()
    with MongoClient(server.uri, directConnection=True) as c:
        for user, roles in users.items():
            c.admin.command("createUser", user, pwd=password, roles=roles,
                            mechanisms=["SCRAM-SHA-256"])
    server.stop()
    server.auth = True
    return server.start()


# `mongobranch` from another source tree, in this interpreter with its dependencies: the
# `proxy` package is imported from the tree (a benchmark's baseline, before/after).
_TREE_MAIN = ("import sys; src = sys.argv.pop(1); sys.path.insert(0, src); import proxy; "
              "assert proxy.__file__.startswith(src), proxy.__file__; "
              "from proxy.cli import main; sys.argv[0] = 'mongobranch'; main()")


def tree_exe(tree: str | Path) -> list[str]:
    """ProxyProcess.exe running the proxy of the source tree `tree`."""
    return [sys.executable, "-c", _TREE_MAIN, str(Path(tree).resolve())]
