"""Session fixtures: one real SecantusDB upstream and one proxy process for the suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pymongo import MongoClient

from tests.branchutil import Branches, branches
from tests.servers import ProxyProcess, Secantus


@pytest.fixture(scope="session")
def upstream() -> Iterator[Secantus]:
    # The whole suite shares this in-memory server, and the capture keeps pre-images of
    # main's changes: SecantusDB's default 1 GB cache filled up in a full run
    # (WT_CACHE_FULL on every write after it). The cap is a ceiling, not an allocation.
    server = Secantus(extra=["--cache-size", "4G"]).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def proxy(upstream: Secantus) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(upstream.uri).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def direct(upstream: Secantus) -> Iterator[MongoClient]:
    client: MongoClient = MongoClient(upstream.uri, directConnection=True)
    yield client
    client.close()


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
