"""Debian's Go driver (1.8) and Java driver (3.6) through the proxy, with no URI options.

Both are strict where pymongo is lenient: the Go driver refuses a cursor id that is not a
BSON int64, and the Java 3.6 driver sends its handshake and `buildinfo` as legacy
OP_QUERY commands. The toolchains are optional test dependencies (`.ci/run` installs
them with apt-get); without them these tests skip and say why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.branchutil import Branches, unique
from tests.servers import ProxyProcess

HERE = Path(__file__).parent
GOPATH = Path("/usr/share/gocode")
GO_DRIVER = GOPATH / "src" / "go.mongodb.org" / "mongo-driver"
JAVA_DRIVER = Path("/usr/share/java/mongo-java-driver.jar")


def _run(args: list[str], *, timeout: float, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd, check=False)


def _json_line(done: subprocess.CompletedProcess[str], what: str) -> Any:
    assert done.returncode == 0, f"{what} exited {done.returncode}: {done.stderr[-4000:]}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines, f"{what} printed nothing; stderr: {done.stderr[-4000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def go_smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go program, built offline: GOPATH mode over Debian's packaged sources (the
    module proxy is not needed, nor reachable on a build machine)."""
    if shutil.which("go") is None:
        pytest.skip("go is not installed (apt-get install golang-go)")
    if not GO_DRIVER.is_dir():
        pytest.skip(f"the Go driver is not installed at {GO_DRIVER} "
                    "(apt-get install golang-mongodb-mongo-driver-dev)")
    out = tmp_path_factory.mktemp("go")
    env = dict(os.environ, GO111MODULE="off", GOPATH=str(GOPATH), GOFLAGS="", CGO_ENABLED="0")
    if "HOME" not in env and "XDG_CACHE_HOME" not in env:
        env["GOCACHE"] = str(out / "cache")  # else the user's build cache, kept between runs
    binary = out / "smoke"
    done = _run(["go", "build", "-o", str(binary), "smoke.go"], timeout=900, env=env,
                cwd=HERE / "go")
    assert done.returncode == 0, f"go build failed: {done.stderr[-4000:]}"
    return binary


@pytest.fixture(scope="module")
def java_smoke(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The class path of the compiled Java program."""
    if shutil.which("javac") is None or shutil.which("java") is None:
        pytest.skip("a JDK is not installed (apt-get install default-jdk-headless)")
    if not JAVA_DRIVER.exists():
        pytest.skip(f"the Java driver is not installed at {JAVA_DRIVER} "
                    "(apt-get install libmongodb-java)")
    out = tmp_path_factory.mktemp("java")
    done = _run(["javac", "-nowarn", "-d", str(out), "-cp", str(JAVA_DRIVER),
                 str(HERE / "java" / "Smoke.java")], timeout=300)
    assert done.returncode == 0, f"javac failed: {done.stderr[-4000:]}"
    return f"{JAVA_DRIVER}{os.pathsep}{out}"


@pytest.fixture(scope="module")
def ports(proxy: ProxyProcess) -> Iterator[dict[str, str]]:
    made = Branches(proxy)
    try:
        branch = made.create()
        yield {"main": proxy.uri, "branch": branch["uri"]}
    finally:
        made.cleanup()


def _check_smoke(out: dict[str, Any]) -> None:
    assert out["inserted"] == 50
    assert out["index"] == "group_1"
    assert out["indexes"] == 2
    assert out["one"] == 14
    assert out["ids"] == list(range(50))
    assert out["getMores"] >= 6  # 50 documents, 7 at a time
    assert (out["updated"], out["deleted"], out["count"]) == (10, 10, 40)
    assert out["groups"] == [0, 1, 2, 3]
    assert out["collections"] == ["items"]


@pytest.mark.parametrize("port", ["main", "branch"])
def test_go_driver(go_smoke: Path, ports: dict[str, str], port: str) -> None:
    db = unique("go").replace("-", "_")
    args = [str(go_smoke), ports[port], db, "txn"]
    out = _json_line(_run(args, timeout=180), "the Go program")
    _check_smoke(out)
    assert out["txn"] == 1  # WithTransaction, on main and on a branch port


@pytest.mark.parametrize("port", ["main", "branch"])
def test_java_driver(java_smoke: str, ports: dict[str, str], port: str) -> None:
    db = unique("java").replace("-", "_")
    out = _json_line(_run(["java", "-cp", java_smoke, "Smoke", ports[port], db], timeout=180),
                     "the Java program")
    _check_smoke(out)
    assert isinstance(out["version"], str) and out["version"]
