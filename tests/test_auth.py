"""Authentication through the proxy, against a SecantusDB started with --auth.

(a) credentials-less upstream URI: each client's own SCRAM conversation passes through on
    the main port; branching is off, and says what it needs;
(b) credentials in the upstream URI: the proxy authenticates its upstream connections.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import Iterator
from typing import Any

import bson
import pytest
from bson.binary import Binary
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from tests import rawwire
from tests.servers import ProxyProcess, Secantus

USER, PASSWORD = "alice", "s3cret-pw"
READER, READER_PASSWORD = "bob", "r3ad-only"


@pytest.fixture(scope="module")
def auth_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secantus]:
    """Users are provisioned without --auth, then the server restarts with it."""
    storage = str(tmp_path_factory.mktemp("auth") / "db")
    server = Secantus(storage=storage).start()
    with MongoClient(server.uri, directConnection=True) as c:
        c.admin.command("createUser", USER, pwd=PASSWORD,
                        roles=[{"role": "root", "db": "admin"}], mechanisms=["SCRAM-SHA-256"])
        c.admin.command("createUser", READER, pwd=READER_PASSWORD,
                        roles=[{"role": "read", "db": "authdb"}], mechanisms=["SCRAM-SHA-256"])
    server.stop()
    server.auth = True
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def passthrough_proxy(auth_upstream: Secantus) -> Iterator[ProxyProcess]:
    proxy = ProxyProcess(auth_upstream.uri).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def credentialed_proxy(auth_upstream: Secantus) -> Iterator[ProxyProcess]:
    uri = f"mongodb://{USER}:{PASSWORD}@127.0.0.1:{auth_upstream.port}/?authSource=admin"
    proxy = ProxyProcess(uri).start()
    yield proxy
    proxy.stop()


# -- (a) the client's own credentials pass through --------------------------------------


def test_client_credentials_pass_through(passthrough_proxy: ProxyProcess) -> None:
    with MongoClient(passthrough_proxy.uri, username=USER, password=PASSWORD,
                     serverSelectionTimeoutMS=5000) as c:
        coll = c.authdb.items
        coll.drop()
        coll.insert_many([{"_id": i} for i in range(3)])
        assert sorted(d["_id"] for d in coll.find()) == [0, 1, 2]
        status = c.admin.command("connectionStatus")
        users = status["authInfo"]["authenticatedUsers"]
        assert {"user": USER, "db": "admin"} in [{"user": u["user"], "db": u["db"]}
                                                 for u in users]


def test_branching_off_without_uri_credentials(passthrough_proxy: ProxyProcess) -> None:
    """The engine cannot read its metadata: the main port serves, branch commands and the
    admin API say what is missing, and the log says it once (no retry can succeed)."""
    needed = "--upstream URI has no credentials for mongobranch's metadata"
    status, body = passthrough_proxy.api("GET", "/branches")
    assert status == 503 and needed in body["error"], body  # type: ignore[index]
    status, body = passthrough_proxy.api("POST", "/branches", {"name": "nope"})
    assert status == 503 and needed in body["error"], body  # type: ignore[index]
    with MongoClient(passthrough_proxy.uri, username=USER, password=PASSWORD,
                     serverSelectionTimeoutMS=5000) as c:
        with pytest.raises(OperationFailure) as info:
            c.admin.command({"listBranches": 1})
        assert needed in str(info.value)
        with pytest.raises(OperationFailure) as info:
            c.admin.command({"createBranch": "nope"})
        assert needed in str(info.value)
        assert c.admin.command("ping")["ok"] == 1.0
    log = passthrough_proxy.read_log()
    assert log.count("ERROR mongobranch: branching is off") == 1, log
    assert "readWrite on 'mongobranch_test'" in log


def test_explicit_mechanism_and_source(passthrough_proxy: ProxyProcess) -> None:
    uri = (f"mongodb://{USER}:{PASSWORD}@127.0.0.1:{passthrough_proxy.port}/"
           "?authSource=admin&authMechanism=SCRAM-SHA-256")
    with MongoClient(uri, serverSelectionTimeoutMS=5000) as c:
        c.authdb.items.insert_one({"_id": "explicit"})
        assert c.authdb.items.find_one({"_id": "explicit"}) == {"_id": "explicit"}


def test_without_credentials_is_unauthorized(passthrough_proxy: ProxyProcess) -> None:
    with MongoClient(passthrough_proxy.uri, serverSelectionTimeoutMS=5000) as c:
        # The handshake is the proxy's own: connecting works, commands are refused upstream.
        assert c.admin.command("ping")["ok"] == 1.0
        with pytest.raises(OperationFailure) as info:
            c.authdb.items.find_one()
        assert info.value.code == 13
        with pytest.raises(OperationFailure) as info:
            c.authdb.items.insert_one({"_id": "nope"})
        assert info.value.code == 13


def test_wrong_password_fails_authentication(passthrough_proxy: ProxyProcess) -> None:
    with MongoClient(passthrough_proxy.uri, username=USER, password="wrong",
                     serverSelectionTimeoutMS=5000) as c, \
            pytest.raises(OperationFailure) as info:
        c.authdb.items.find_one()
    assert info.value.code == 18  # AuthenticationFailed


def _scram_first(user: str = USER) -> tuple[str, str]:
    nonce = base64.b64encode(os.urandom(24)).decode()
    return nonce, f"n={user},r={nonce}"


def _scram_final(first_bare: str, server_first: bytes, nonce: str,
                 password: str = PASSWORD) -> tuple[str, bytes]:
    fields = dict(item.split("=", 1) for item in server_first.decode().split(","))
    assert fields["r"].startswith(nonce)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(fields["s"]),
                                 int(fields["i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    final_bare = f"c=biws,r={fields['r']}"
    auth_message = f"{first_bare},{server_first.decode()},{final_bare}".encode()
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))
    server_sig = base64.b64encode(
        hmac.digest(hmac.digest(salted, b"Server Key", "sha256"), auth_message, "sha256"))
    return f"{final_bare},p={proof.decode()}", server_sig


def test_speculative_authentication_in_hello(passthrough_proxy: ProxyProcess) -> None:
    """The hello's speculativeAuthenticate reaches the upstream and its reply comes back."""
    nonce, first_bare = _scram_first()
    with rawwire.connect(passthrough_proxy.port) as sock:
        hello = rawwire.command(sock, {
            "hello": 1, "helloOk": True, "$db": "admin",
            "client": {"driver": {"name": "raw-test", "version": "0"}, "os": {"type": "x"}},
            "saslSupportedMechs": f"admin.{USER}",
            "speculativeAuthenticate": {
                "saslStart": 1, "mechanism": "SCRAM-SHA-256", "db": "admin",
                "payload": Binary(f"n,,{first_bare}".encode()),
                "options": {"skipEmptyExchange": True},
            },
        })
        assert hello["ok"] == 1.0 and hello["msg"] == "isdbgrid"
        assert "SCRAM-SHA-256" in hello["saslSupportedMechs"]
        spec = hello["speculativeAuthenticate"]
        assert spec["done"] is False
        final, server_sig = _scram_final(first_bare, bytes(spec["payload"]), nonce)
        reply = rawwire.command(sock, {"saslContinue": 1, "conversationId": spec["conversationId"],
                                       "payload": Binary(final.encode()), "$db": "admin"},
                                request_id=2)
        assert reply["ok"] == 1.0, reply
        assert bytes(reply["payload"]) == b"v=" + server_sig
        if not reply["done"]:
            reply = rawwire.command(sock, {"saslContinue": 1, "payload": Binary(b""),
                                           "conversationId": reply["conversationId"],
                                           "$db": "admin"}, request_id=3)
        assert reply["done"] is True
        ins = rawwire.command(sock, {"insert": "items", "documents": [{"_id": "spec"}],
                                     "$db": "authdb"}, request_id=4)
        assert ins["ok"] == 1.0 and ins["n"] == 1, ins
        found = rawwire.command(sock, {"find": "items", "filter": {"_id": "spec"},
                                       "$db": "authdb"}, request_id=5)
        assert found["cursor"]["firstBatch"] == [{"_id": "spec"}]
    # A second connection is not authenticated by the first one's conversation.
    with rawwire.connect(passthrough_proxy.port) as sock:
        reply = rawwire.command(sock, {"find": "items", "filter": {}, "$db": "authdb"})
        assert reply["ok"] == 0.0 and reply["code"] == 13


def test_authentication_per_client_connection(passthrough_proxy: ProxyProcess) -> None:
    """Authenticated and anonymous clients on one proxy never share an upstream session."""
    authed: MongoClient = MongoClient(passthrough_proxy.uri, username=USER, password=PASSWORD,
                                      maxPoolSize=4, serverSelectionTimeoutMS=5000)
    anon: MongoClient = MongoClient(passthrough_proxy.uri, maxPoolSize=4,
                                    serverSelectionTimeoutMS=5000)
    try:
        for i in range(20):
            authed.authdb.mixed.replace_one({"_id": i}, {"_id": i}, upsert=True)
            with pytest.raises(OperationFailure) as info:
                anon.authdb.mixed.find_one({"_id": i})
            assert info.value.code == 13
        assert authed.authdb.mixed.count_documents({}) == 20
    finally:
        authed.close()
        anon.close()


# -- (b) credentials in the upstream URI -------------------------------------------------


def test_uri_credentials_serve_anonymous_clients(credentialed_proxy: ProxyProcess) -> None:
    status, _ = credentialed_proxy.api("GET", "/healthz")
    assert status == 200
    with MongoClient(credentialed_proxy.uri, serverSelectionTimeoutMS=5000) as c:
        coll = c.authdb.via_uri
        coll.drop()
        coll.insert_many([{"_id": i, "v": i} for i in range(5)])
        assert coll.count_documents({"v": {"$gte": 2}}) == 3
        assert [d["_id"] for d in coll.find().sort("_id", -1).batch_size(2)] == [4, 3, 2, 1, 0]
        users = c.admin.command("connectionStatus")["authInfo"]["authenticatedUsers"]
        assert [u["user"] for u in users] == [USER]


@pytest.mark.parametrize("mechanism", [None, "SCRAM-SHA-256"])
def test_client_credentials_win_over_uri_credentials(
    credentialed_proxy: ProxyProcess, mechanism: str | None
) -> None:
    """A client that authenticates itself is that user upstream, not the proxy's user."""
    extra = {"authMechanism": mechanism} if mechanism else {}
    with MongoClient(credentialed_proxy.uri, username=READER, password=READER_PASSWORD,
                     serverSelectionTimeoutMS=5000, **extra) as c:
        users = c.admin.command("connectionStatus")["authInfo"]["authenticatedUsers"]
        assert [u["user"] for u in users] == [READER]
        c.authdb.items.find_one()
        with pytest.raises(OperationFailure) as info:
            c.authdb.items.insert_one({"_id": "bob was here"})
        assert info.value.code == 13


def test_legacy_op_query_authentication_is_the_clients(credentialed_proxy: ProxyProcess
                                                       ) -> None:
    """An older driver's SCRAM conversation in OP_QUERY commands (Java 3.6 authenticates
    so) reaches the upstream as the client's own: afterwards it is that user there."""
    def legacy(sock: Any, query: dict[str, Any], request_id: int) -> dict[str, Any]:
        sock.sendall(rawwire.op_query("admin.$cmd" if "$db" not in query else
                                      f"{query.pop('$db')}.$cmd", query, request_id))
        op_code, response_to, payload = rawwire.read_message(sock)
        assert (op_code, response_to) == (rawwire.OP_REPLY, request_id)
        doc: dict[str, Any] = bson.decode_all(payload[20:])[0]
        return doc

    nonce, first_bare = _scram_first(READER)
    with rawwire.connect(credentialed_proxy.port) as sock:
        assert legacy(sock, {"isMaster": 1}, 1)["ok"] == 1.0
        start = legacy(sock, {"saslStart": 1, "mechanism": "SCRAM-SHA-256",
                              "payload": Binary(f"n,,{first_bare}".encode()),
                              "options": {"skipEmptyExchange": True}}, 2)
        assert start["ok"] == 1.0, start
        final, server_sig = _scram_final(first_bare, bytes(start["payload"]), nonce,
                                         READER_PASSWORD)
        reply = legacy(sock, {"saslContinue": 1, "conversationId": start["conversationId"],
                              "payload": Binary(final.encode())}, 3)
        assert reply["ok"] == 1.0 and bytes(reply["payload"]) == b"v=" + server_sig, reply
        if not reply["done"]:
            reply = legacy(sock, {"saslContinue": 1, "payload": Binary(b""),
                                  "conversationId": reply["conversationId"]}, 4)
        assert reply["done"] is True
        status = legacy(sock, {"connectionStatus": 1}, 5)
        assert [u["user"] for u in status["authInfo"]["authenticatedUsers"]] == [READER]
        refused = legacy(sock, {"insert": "items", "documents": [{"_id": "legacy"}],
                                "$db": "authdb"}, 6)
        assert refused["ok"] == 0.0 and refused["code"] == 13, refused


def test_no_password_in_proxy_log(credentialed_proxy: ProxyProcess) -> None:
    assert PASSWORD not in credentialed_proxy.read_log()


def test_uri_credentials_after_upstream_restart(
    auth_upstream: Secantus, credentialed_proxy: ProxyProcess
) -> None:
    """Every new upstream connection authenticates again (runs last: it restarts the server)."""
    with MongoClient(credentialed_proxy.uri, serverSelectionTimeoutMS=5000) as c:
        c.authdb.via_uri.insert_one({"_id": "before"})
        auth_upstream.stop()
        auth_upstream.start()
        deadline = time.monotonic() + 20
        while True:
            try:
                c.authdb.via_uri.insert_one({"_id": "after"})
                break
            except OperationFailure as exc:
                assert exc.code == 6, exc.details  # only "unreachable" while it comes back
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert c.authdb.via_uri.find_one({"_id": "after"}) == {"_id": "after"}


def test_branch_transactions_judge_a_client_with_its_own_privileges(
        credentialed_proxy: ProxyProcess) -> None:
    """A transaction on a branch port runs in the engine's own session, as the --upstream
    URI's user. A client running as that user is served as it is; a client that
    authenticated itself has each statement judged with its own privileges first: the
    read-only user reads in a transaction, and its write is refused (13) and ends it."""
    status, branch = credentialed_proxy.api("POST", "/branches", {"name": "auth-txn"})
    assert status == 201, branch
    assert isinstance(branch, dict)
    try:
        with MongoClient(branch["uri"], serverSelectionTimeoutMS=5000) as c, \
                c.start_session() as session:
            with session.start_transaction():
                c.authdb.txn.insert_one({"_id": 1}, session=session)
                c.authdb.other.insert_one({"_id": 1}, session=session)
            assert c.authdb.txn.find_one() == {"_id": 1}
        with MongoClient(branch["uri"], username=READER, password=READER_PASSWORD,
                         serverSelectionTimeoutMS=5000) as c, c.start_session() as session:
            session.start_transaction()
            assert c.authdb.txn.find_one({}, session=session) == {"_id": 1}
            with pytest.raises(OperationFailure) as info:
                c.authdb.txn.insert_one({"_id": 2}, session=session)
            assert info.value.code == 13, info.value.details
            with pytest.raises(OperationFailure) as info:
                c.authdb.txn.find_one({}, session=session)
            assert info.value.code == 251
            assert c.authdb.txn.find_one({"_id": 2}) is None
    finally:
        credentialed_proxy.api("DELETE", "/branches/auth-txn")
