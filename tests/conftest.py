"""Session fixtures: one real SecantusDB upstream and one proxy process for the suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pymongo import MongoClient

from tests.branchutil import Branches, branches, unique
from tests.servers import RELAY_CHECKS, ProxyProcess, Secantus, relay_checks_proxy


@pytest.fixture(scope="session")
def upstream() -> Iterator[Secantus]:
    # The whole suite shares this in-memory server, and the capture keeps pre-images of
    # main's changes: SecantusDB's default 1 GB cache filled up in a full run
    # (WT_CACHE_FULL on every write after it). The cap is a ceiling, not an allocation.
    server = Secantus(extra=["--cache-size", "4G"]).start()
    _shared.append(MongoClient(server.uri, directConnection=True))
    yield server
    _shared.pop().close()
    server.stop()


@pytest.fixture(scope="session")
def proxy(upstream: Secantus) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(upstream.uri).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module", params=RELAY_CHECKS)
def relay_proxy(request: pytest.FixtureRequest, proxy: ProxyProcess,
                upstream: Secantus) -> Iterator[ProxyProcess]:
    """For the relay's own test modules: each of their tests runs against the relay with
    its compiled checks and with the pure-Python fallback (MONGOBRANCH_PURE_PYTHON=1)."""
    with relay_checks_proxy(request.param, proxy, upstream) as proc:
        yield proc


@pytest.fixture()
def relay_client(relay_proxy: ProxyProcess) -> Iterator[MongoClient]:
    """`client` on `relay_proxy`."""
    c: MongoClient = MongoClient(relay_proxy.uri, serverSelectionTimeoutMS=10000)
    yield c
    c.close()


@pytest.fixture(scope="session")
def direct(upstream: Secantus) -> MongoClient:
    """The session upstream's own client (the one the per-test cleanup uses)."""
    return _shared[0]


# Metadata databases of the suite's proxies (registry included): never dropped between
# tests, since a proxy of a module or the session still uses its own.
META_PREFIXES = ("mongobranch", "mb_")
SYSTEM_DBS = frozenset({"admin", "local", "config"})
# The session's upstream once started: tests that never touch it do not start it.
_shared: list[MongoClient] = []


def _user_databases(client: MongoClient) -> set[str]:
    # Not "": SecantusDB takes a write with `$db: ""` (mongod refuses it, InvalidNamespace)
    # and lists the database it made, which no driver can name to drop (the fuzzer of
    # test_robustness.py sends such writes).
    return {name for name in client.list_database_names()
            if name and name not in SYSTEM_DBS and not name.startswith(META_PREFIXES)}


@pytest.fixture(autouse=True)
def _drop_test_databases() -> Iterator[None]:
    """Drops, after each test, the databases it made on the shared upstream.

    A copy branch copies every database its parent shows: with every earlier test's
    databases left behind, a copy fork late in a full run took up to two minutes.
    Autouse: set up after the module's and session's fixtures (their databases are older
    than the test and stay) and torn down after the test's own branches are dropped."""
    before = _user_databases(_shared[0]) if _shared else set()
    yield
    if _shared:
        for name in sorted(_user_databases(_shared[0]) - before):
            _shared[0].drop_database(name)


@pytest.fixture()
def client(proxy: ProxyProcess) -> Iterator[MongoClient]:
    c: MongoClient = MongoClient(proxy.uri, serverSelectionTimeoutMS=10000)
    yield c
    c.close()


@pytest.fixture()
def made(proxy: ProxyProcess) -> Iterator[Branches]:
    """Branches a test creates, dropped after it."""
    with branches(proxy) as b:
        yield b


@pytest.fixture()
def db_name(request: pytest.FixtureRequest) -> str:
    """A database of the test's own, named after its module (dropped after the test by
    _drop_test_databases)."""
    stem = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    return unique(stem).replace("-", "_")
