"""What pymongo's own test suite (`make conformance`) found missing on a branch port.

The upstream here runs with `--enable-test-commands`, as pymongo's suite expects.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from tests.branchutil import Branches, unique
from tests.servers import ProxyProcess, Secantus


@pytest.fixture(scope="module")
def test_upstream() -> Iterator[Secantus]:
    server = Secantus(options=["--enable-test-commands"]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def test_proxy(test_upstream: Secantus) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(test_upstream.uri).start()
    yield proc
    proc.stop()


@pytest.fixture()
def upstream_client(test_upstream: Secantus) -> Iterator[MongoClient]:
    c: MongoClient = MongoClient(test_upstream.uri, directConnection=True)
    yield c
    c.close()


@pytest.fixture()
def branch(test_proxy: ProxyProcess) -> Iterator[MongoClient]:
    made = Branches(test_proxy)
    info: dict[str, Any] = made.create(unique("conf"))
    c = made.client(info)
    yield c
    c.close()
    made.cleanup()


def test_configure_fail_point_reaches_the_upstream_from_a_branch(
        branch: MongoClient, upstream_client: MongoClient) -> None:
    reply = branch.admin.command("configureFailPoint", "failCommand", mode={"times": 1},
                                 data={"failCommands": ["ping"], "errorCode": 2})
    assert reply["ok"] == 1.0
    with pytest.raises(OperationFailure) as info:
        upstream_client.admin.command("ping")
    assert info.value.code == 2
    branch.admin.command("configureFailPoint", "failCommand", mode="off")
    assert upstream_client.admin.command("ping")["ok"] == 1.0
