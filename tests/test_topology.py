"""Production upstreams: TLS options, seed lists and replica sets, state changes.

Every test runs the proxy as `mongobranch serve` in front of real SecantusDB processes and
talks to it with pymongo. What SecantusDB can and cannot be (it is a single-node replica
set "secantus": its hello lists only itself in `hosts`, so two of them never form one
set) is said where a test depends on it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bson import Int64
from pymongo import MongoClient, monitoring
from pymongo.errors import NotPrimaryError, PyMongoError

from tests.servers import ProxyProcess, Secantus, free_port

pytestmark = pytest.mark.timeout(240)


# -- certificates -----------------------------------------------------------------------

@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    wrong_name_cert: Path
    wrong_name_key: Path
    client: Path  # certificate and key in one PEM, as tlsCertificateKeyFile takes them


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(d: Path, name: str, subject: str, extensions: str) -> None:
    (d / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (apt-get install openssl)")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "2", "-subj", "/CN=mongobranch test CA", cwd=d)
    _issue(d, "server", "/CN=localhost",
           "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _issue(d, "elsewhere", "/CN=elsewhere.invalid",
           "subjectAltName=DNS:elsewhere.invalid\nextendedKeyUsage=serverAuth\n")
    _issue(d, "client", "/CN=mongobranch-client", "extendedKeyUsage=clientAuth\n")
    (d / "client-bundle.pem").write_text((d / "client.pem").read_text()
                                         + (d / "client.key").read_text())
    return Certs(ca=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key",
                 wrong_name_cert=d / "elsewhere.pem", wrong_name_key=d / "elsewhere.key",
                 client=d / "client-bundle.pem")


def _tls_server(cert: Path, key: Path, *extra: str) -> Secantus:
    return Secantus(extra=["--tls-cert-file", str(cert), "--tls-key-file", str(key),
                           *extra]).start()


def _round_trip(proxy: ProxyProcess, tag: str) -> None:
    """Writes and reads through the main port and through a new branch's port."""
    with MongoClient(proxy.uri, serverSelectionTimeoutMS=20000) as client:
        coll = client.topo[tag]
        coll.insert_many([{"_id": i, "tag": tag} for i in range(5)])
        assert coll.count_documents({}) == 5
    status, branch = proxy.api("POST", "/branches", {"name": f"{tag}-b"})
    assert status == 201, branch
    assert isinstance(branch, dict)
    with MongoClient(branch["uri"], serverSelectionTimeoutMS=20000) as client:
        coll = client.topo[tag]
        coll.insert_one({"_id": 99})
        coll.delete_one({"_id": 0})
        assert sorted(d["_id"] for d in coll.find()) == [1, 2, 3, 4, 99]


def _healthz(proxy: ProxyProcess) -> int:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(proxy.admin_url + "/healthz", timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


# -- task 0: URI options as pymongo honours them -----------------------------------------

def test_tls_upstream_with_private_ca(certs: Certs) -> None:
    server = _tls_server(certs.server_cert, certs.server_key)
    proxy = ProxyProcess(f"mongodb://127.0.0.1:{server.port}/?tls=true&tlsCAFile={certs.ca}")
    try:
        proxy.start()
        _round_trip(proxy, "ca")
    finally:
        proxy.stop()
        server.stop()


def test_tls_upstream_requiring_a_client_certificate(certs: Certs) -> None:
    server = _tls_server(certs.server_cert, certs.server_key, "--tls-ca-file", str(certs.ca),
                         "--tls-require-client-cert")
    base = f"mongodb://127.0.0.1:{server.port}/?tls=true&tlsCAFile={certs.ca}"
    with_cert = ProxyProcess(f"{base}&tlsCertificateKeyFile={certs.client}")
    without = ProxyProcess(base)
    try:
        with_cert.start()
        _round_trip(with_cert, "mtls")
        # The same server refuses a proxy that presents no certificate: the option is what
        # made the difference.
        without.start(wait_healthy=False)
        assert _healthz(without) == 503
        with MongoClient(without.uri, serverSelectionTimeoutMS=5000) as client, \
                pytest.raises(PyMongoError):
            client.topo.mtls.insert_one({})
    finally:
        without.stop()
        with_cert.stop()
        server.stop()


def test_tls_allow_invalid_hostnames(certs: Certs) -> None:
    server = _tls_server(certs.wrong_name_cert, certs.wrong_name_key)
    base = f"mongodb://127.0.0.1:{server.port}/?tls=true&tlsCAFile={certs.ca}"
    lax = ProxyProcess(f"{base}&tlsAllowInvalidHostnames=true")
    strict = ProxyProcess(base)
    try:
        lax.start()
        _round_trip(lax, "hostnames")
        strict.start(wait_healthy=False)
        assert _healthz(strict) == 503
    finally:
        strict.stop()
        lax.stop()
        server.stop()


@pytest.fixture(scope="module")
def sha1_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secantus]:
    """An --auth node whose only user has SCRAM-SHA-1 credentials."""
    server = Secantus(storage=str(tmp_path_factory.mktemp("sha1") / "db")).start()
    with MongoClient(server.uri, directConnection=True) as c:
        c.admin.command("createUser", "carol", pwd="pw-sha1",
                        roles=[{"role": "root", "db": "admin"}], mechanisms=["SCRAM-SHA-1"])
    server.stop()
    server.auth = True
    server.start()
    yield server
    server.stop()


def test_uri_auth_mechanism_is_honoured(sha1_upstream: Secantus) -> None:
    """authMechanism=SCRAM-SHA-1 is what the proxy's own connections use (this user has
    no SCRAM-SHA-256 key). Without authMechanism, pymongo itself fails to authenticate
    this user against SecantusDB (its speculative SCRAM-SHA-256 is refused rather than
    ignored as mongod does), so the negotiated default is not tested here."""
    proxy = ProxyProcess(f"mongodb://carol:pw-sha1@127.0.0.1:{sha1_upstream.port}/"
                         "?authSource=admin&authMechanism=SCRAM-SHA-1", meta_db="mb_sha1")
    try:
        proxy.start()
        _round_trip(proxy, "sha1")
    finally:
        proxy.stop()


@pytest.mark.parametrize(("query", "expected"), [
    ("tls=true&tlsCAFile=/nonexistent/ca.pem", "not readable"),
    ("authMechanism=GSSAPI&authSource=$external", "GSSAPI is not supported"),
    ("tls=false&tlsCAFile=/etc/hostname", "TLS has not been enabled"),
])
def test_unusable_upstream_options_exit_with_one_clear_line(query: str, expected: str) -> None:
    from tests.servers import BIN
    uri = f"mongodb://user:pw@127.0.0.1:{free_port()}/?{query}"
    done = subprocess.run([str(BIN / "mongobranch"), "serve", "--upstream", uri,
                           "--listen", f"127.0.0.1:{free_port()}",
                           "--admin", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert expected in out
    assert "Traceback" not in out


# -- task 1: seed lists and replica sets ------------------------------------------------

@pytest.fixture(scope="module")
def rs_node() -> Iterator[Secantus]:
    """A SecantusDB node with mongod's test commands: a single-node replica set
    "secantus" whose failpoints and step-downs the election tests drive."""
    server = Secantus(extra=["--enable-test-commands"]).start()
    yield server
    server.stop()


def test_seed_list_with_a_dead_first_host_starts_and_serves(rs_node: Secantus) -> None:
    dead = free_port()
    proxy = ProxyProcess(
        f"mongodb://127.0.0.1:{dead},127.0.0.1:{rs_node.port}/?replicaSet=secantus",
        meta_db="mb_seed")
    try:
        proxy.start()
        _round_trip(proxy, "seed")
    finally:
        proxy.stop()


def test_seed_list_without_replica_set_name(rs_node: Secantus) -> None:
    dead = free_port()
    proxy = ProxyProcess(f"mongodb://127.0.0.1:{dead},127.0.0.1:{rs_node.port}/",
                         meta_db="mb_seed2")
    try:
        proxy.start()
        _round_trip(proxy, "seed2")
    finally:
        proxy.stop()


# -- task 2: state changes ----------------------------------------------------------------

@pytest.fixture(scope="module")
def rs_proxy(rs_node: Secantus) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(f"mongodb://127.0.0.1:{rs_node.port}/?replicaSet=secantus",
                        meta_db="mb_elect").start()
    yield proc
    proc.stop()


@pytest.fixture()
def admin(rs_node: Secantus) -> Iterator[MongoClient]:
    client: MongoClient = MongoClient(rs_node.uri, directConnection=True)
    yield client
    client.admin.command("configureFailPoint", "failCommand", mode="off")
    client.close()


class _Failures(monitoring.CommandListener):
    """The commands a client saw fail (its driver retried them): proof that a failpoint
    armed for this client's appName did fire."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.names.append(event.command_name)


def _fail_next(admin: MongoClient, commands: list[str], **data: object) -> None:
    admin.admin.command("configureFailPoint", "failCommand", mode={"times": 1},
                        data={"failCommands": commands, **data})


def _ports(rs_proxy: ProxyProcess, name: str) -> list[str]:
    status, branch = rs_proxy.api("POST", "/branches", {"name": name})
    assert status == 201, branch
    assert isinstance(branch, dict)
    return [rs_proxy.uri, branch["uri"]]


def test_not_writable_primary_is_labelled_retried_and_applied_once(
        rs_proxy: ProxyProcess, admin: MongoClient) -> None:
    """A state-change error retires the connection; the driver's retry runs on a new one,
    and applies once. The failpoint's write errors carry no labels (`errorLabels: []`, as
    SecantusDB's own "not primary" replies): the driver retries them only because the
    proxy labelled them `RetryableWriteError`, as mongos does."""
    app = "topo-nwp"
    seen = _Failures()
    with MongoClient(rs_proxy.uri, appname=app, serverSelectionTimeoutMS=20000,
                     event_listeners=[seen]) as client:
        coll = client.elect.nwp
        coll.insert_one({"_id": 0})
        _fail_next(admin, ["insert"], errorCode=10107, errorLabels=[], appName=app)
        coll.insert_one({"_id": 1})
        assert coll.count_documents({}) == 2
        _fail_next(admin, ["update"], errorCode=189, errorLabels=[], appName=app)
        coll.update_one({"_id": 1}, {"$inc": {"n": 1}})
        assert coll.find_one({"_id": 1}) == {"_id": 1, "n": 1}
        _fail_next(admin, ["aggregate"], errorCode=11602, appName=app)
        assert coll.count_documents({}) == 2  # a retryable read
    assert seen.names == ["insert", "update", "aggregate"]


class _Opened(monitoring.ConnectionPoolListener):
    """The driver's own connections to the proxy: proof that a change of upstream
    connection was the proxy's doing, not a reconnect of the driver's."""

    def __init__(self) -> None:
        self.created = 0
        self.cleared = 0

    def connection_created(self, event: monitoring.ConnectionCreatedEvent) -> None:
        self.created += 1

    def pool_cleared(self, event: monitoring.PoolClearedEvent) -> None:
        self.cleared += 1

    def pool_created(self, event: monitoring.PoolCreatedEvent) -> None:
        pass

    def pool_ready(self, event: monitoring.PoolReadyEvent) -> None:
        pass

    def pool_closed(self, event: monitoring.PoolClosedEvent) -> None:
        pass

    def connection_ready(self, event: monitoring.ConnectionReadyEvent) -> None:
        pass

    def connection_closed(self, event: monitoring.ConnectionClosedEvent) -> None:
        pass

    def connection_check_out_started(self, event: monitoring.ConnectionCheckOutStartedEvent
                                     ) -> None:
        pass

    def connection_check_out_failed(self, event: monitoring.ConnectionCheckOutFailedEvent
                                    ) -> None:
        pass

    def connection_checked_out(self, event: monitoring.ConnectionCheckedOutEvent) -> None:
        pass

    def connection_checked_in(self, event: monitoring.ConnectionCheckedInEvent) -> None:
        pass


def test_not_writable_primary_reply_is_labelled_and_moves_the_upstream_connection(
        rs_proxy: ProxyProcess, admin: MongoClient) -> None:
    """What the client receives for an unlabelled NotWritablePrimary: the upstream's
    error with `RetryableWriteError` added for a retryable write (an explicit `insert`
    with a txnNumber, which the driver does not retry, so the reply is seen as sent), and
    its next command runs on a new upstream connection (the old one was retired with
    that reply; `whatsmyuri` names the proxy's end of it) over the same driver connection."""
    app = "topo-nwp-raw"
    opened = _Opened()
    with MongoClient(rs_proxy.uri, appname=app, maxPoolSize=1, serverSelectionTimeoutMS=20000,
                     event_listeners=[opened]) as client:
        db = client.elect
        db.nwp_raw.insert_one({"_id": 0})
        before = client.admin.command("whatsmyuri")["you"]
        created = opened.created
        _fail_next(admin, ["insert"], errorCode=10107, errorLabels=[], appName=app)
        with client.start_session() as session, pytest.raises(NotPrimaryError) as failed:
            db.command({"insert": "nwp_raw", "documents": [{"_id": 1}],
                        "txnNumber": Int64(1)}, session=session)
        details = failed.value.details
        assert isinstance(details, dict)
        assert details.get("code") == 10107
        assert details.get("errorLabels") == ["RetryableWriteError"]
        after = client.admin.command("whatsmyuri")["you"]
        assert (opened.created, opened.cleared) == (created, 0)
        assert after != before
        # Not labelled: a write without a txnNumber is not a retryable one; its upstream
        # connection is retired all the same.
        _fail_next(admin, ["insert"], errorCode=10107, errorLabels=[], appName=app)
        with pytest.raises(NotPrimaryError) as failed:
            db.command({"insert": "nwp_raw", "documents": [{"_id": 2}]})
        assert isinstance(failed.value.details, dict)
        assert "errorLabels" not in failed.value.details
        assert client.admin.command("whatsmyuri")["you"] != after
        assert sorted(d["_id"] for d in db.nwp_raw.find()) == [0]


@pytest.mark.parametrize("port", ["main", "branch"])
def test_closed_connection_is_retried_and_applied_once(
        rs_proxy: ProxyProcess, admin: MongoClient, port: str) -> None:
    """The failpoint is limited to this client's appName, which the proxy passes on in
    the handshake of the client's upstream connection: on a branch port it cuts the
    command the proxy runs there, never the engine's own pooled writes (whose
    interplay with a cut overlay write is the branch write path's gap, README)."""
    uri = dict(zip(["main", "branch"], _ports(rs_proxy, f"close-{port}"), strict=True))[port]
    app = f"topo-close-{port}"
    seen = _Failures()
    with MongoClient(uri, appname=app, serverSelectionTimeoutMS=20000,
                     event_listeners=[seen]) as client:
        coll = client.elect[f"close_{port}"]
        coll.insert_one({"_id": 0})
        _fail_next(admin, ["insert"], closeConnection=True, appName=app)
        coll.insert_one({"_id": 1})
        _fail_next(admin, ["update"], closeConnection=True, appName=app)
        coll.update_one({"_id": 1}, {"$inc": {"n": 1}})
        assert coll.count_documents({}) == 2
        assert coll.find_one({"_id": 1}) == {"_id": 1, "n": 1}
    assert seen.names == ["insert", "update"]


@pytest.mark.parametrize("port", ["main", "branch"])
def test_write_during_a_step_down_waits_for_the_primary(
        rs_proxy: ProxyProcess, admin: MongoClient, port: str) -> None:
    """The primary steps down (hello: secondary, writes fail NotWritablePrimary) for a
    window; a write sent inside it is answered once the node is primary again (a
    single-node set elects the same node: SecantusDB cannot hand over to another one)."""
    uri = dict(zip(["main", "branch"], _ports(rs_proxy, f"step-{port}"), strict=True))[port]
    with MongoClient(uri, serverSelectionTimeoutMS=30000) as client:
        coll = client.elect[f"step_{port}"]
        coll.insert_one({"_id": 0})
        admin.admin.command("replSetStepDown", 10, force=True)
        assert admin.admin.command("hello")["isWritablePrimary"] is False
        if port == "main":
            # SecantusDB's own "not primary" reply to a retryable write carries no
            # RetryableWriteError label (mongod's does); the proxy adds it as mongos does.
            with client.start_session() as session, pytest.raises(PyMongoError) as failed:
                client.elect.command({"insert": "step_raw", "documents": [{"_id": 1}],
                                      "txnNumber": Int64(1)}, session=session)
            details = getattr(failed.value, "details", None) or {}
            assert details.get("code") == 10107
            assert "RetryableWriteError" in details.get("errorLabels", [])
        coll.insert_one({"_id": 1})
        assert admin.admin.command("hello")["isWritablePrimary"] is True
        assert coll.count_documents({}) == 2


# -- task 3: mongodb+srv:// ------------------------------------------------------------

_DNS_HOST = "127.0.0.77"  # a loopback address of its own: the resolver's port 53 there


class _Zone:
    """A dnslib resolver answering from a fixed set of records; NXDOMAIN for other names."""

    def __init__(self, records: dict[tuple[str, str], list[object]]):
        self.records = records

    def resolve(self, request: object, handler: object) -> object:
        import dnslib
        assert isinstance(request, dnslib.DNSRecord)
        reply = request.reply()
        name = str(request.q.qname).lower()
        qtype = dnslib.QTYPE[request.q.qtype]
        answers = self.records.get((name, qtype), [])
        if not answers and not any(n == name for n, _ in self.records):
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
        for rdata in answers:
            reply.add_answer(dnslib.RR(request.q.qname, request.q.qtype, rdata=rdata, ttl=60))
        return reply


@pytest.fixture(scope="module")
def dns_zone(rs_node: Secantus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A DNS server on loopback serving a cluster's SRV and TXT records (a first host
    that is down, then the live node; the TXT record names the replica set), and a
    resolv.conf naming it."""
    dnslib = pytest.importorskip("dnslib")
    from dnslib.server import DNSServer
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("unshare/mount (util-linux) are not installed")
    dead = free_port()
    zone = _Zone({
        ("_mongodb._tcp.db.mb.test.", "SRV"): [
            dnslib.SRV(priority=0, weight=0, port=dead, target="n1.db.mb.test."),
            dnslib.SRV(priority=0, weight=0, port=rs_node.port, target="n2.db.mb.test.")],
        ("db.mb.test.", "TXT"): [dnslib.TXT("replicaSet=secantus")],
        ("_mongodb._tcp.other.mb.test.", "SRV"): [
            dnslib.SRV(priority=0, weight=0, port=rs_node.port, target="n2.other.mb.test.")],
        ("other.mb.test.", "TXT"): [dnslib.TXT("replicaSet=elsewhere")],
        ("n2.other.mb.test.", "A"): [dnslib.A("127.0.0.1")],
        ("n2.other.mb.test.", "AAAA"): [],
        ("n1.db.mb.test.", "A"): [dnslib.A("127.0.0.1")],
        ("n2.db.mb.test.", "A"): [dnslib.A("127.0.0.1")],
        ("n1.db.mb.test.", "AAAA"): [],
        ("n2.db.mb.test.", "AAAA"): [],
    })
    servers = []
    try:
        for tcp in (False, True):
            server = DNSServer(zone, address=_DNS_HOST, port=53, tcp=tcp,
                               logger=dnslib.server.DNSLogger("-request,-reply,-truncated,"
                                                              "-error,-recv,-send,-data"))
            server.start_thread()
            servers.append(server)
    except OSError as exc:
        for server in servers:
            server.stop()
        pytest.skip(f"cannot serve DNS on {_DNS_HOST}:53: {exc}")
    resolv = tmp_path_factory.mktemp("dns") / "resolv.conf"
    resolv.write_text(f"nameserver {_DNS_HOST}\noptions attempts:1 timeout:2\n")
    yield resolv
    for server in servers:
        server.stop()


def _with_resolv_conf(resolv: Path) -> list[str]:
    """Runs the proxy in a mount namespace of its own whose /etc/resolv.conf is `resolv`:
    dnspython (which pymongo resolves SRV/TXT with) and the system resolver read it as
    they would on a host configured that way. Nothing in the proxy is test-specific."""
    return ["unshare", "--mount", "sh", "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv)]


def test_srv_uri_resolves_hosts_and_options(dns_zone: Path) -> None:
    probe = subprocess.run([*_with_resolv_conf(dns_zone), "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace: {probe.stderr.decode().strip()}")
    # mongodb+srv implies tls=true; this node speaks plain TCP.
    proxy = ProxyProcess("mongodb+srv://db.mb.test/?tls=false", meta_db="mb_srv",
                         wrapper=_with_resolv_conf(dns_zone))
    try:
        proxy.start()
        _round_trip(proxy, "srv")
    finally:
        proxy.stop()


def test_srv_txt_options_are_applied(dns_zone: Path) -> None:
    """other.mb.test's TXT record names a replica set the node is not a member of: the
    proxy finds no primary (as pymongo would), which shows the TXT options are used."""
    proxy = ProxyProcess("mongodb+srv://other.mb.test/?tls=false", meta_db="mb_srv2",
                         wrapper=_with_resolv_conf(dns_zone))
    try:
        proxy.start(wait_healthy=False)
        assert _healthz(proxy) == 503
        assert "ReplicaSetNoPrimary" in proxy.read_log()
    finally:
        proxy.stop()


def _drop_every_branch(proxy: ProxyProcess) -> None:
    """Children before their parents: a branch with children cannot be dropped."""
    while True:
        status, body = proxy.api("GET", "/branches")
        assert status == 200, body
        listed = body["branches"] if isinstance(body, dict) else body
        names = [b["name"] for b in listed if b["name"] != "main"]
        if not names:
            return
        parents = {b["parent"] for b in listed}
        for name in names:
            if name not in parents:
                status, body = proxy.api("DELETE", f"/branches/{name}")
                assert status in (200, 204), body


def test_concurrent_writers_through_a_step_down_lose_nothing(
        rs_proxy: ProxyProcess, admin: MongoClient) -> None:
    """Writers on the main port insert in sequence; every writer stops after its first
    third until the primary has stepped down, then goes on through the window. Every
    insert is acknowledged (the drivers' retries succeed) and there exactly once.

    Branch-port writers are not here: a branch insert whose overlay write landed just
    before the step-down and whose WAL append (the engine's pymongo client, one retry
    within its 5 s server selection) failed after it is retried by the driver into a
    duplicate key error (a gap of the branch write path; README, Upstreams). For the
    same reason main has no children here: while it has some, its writes go through
    that path too (the engine's client waits 5 s for a primary; a step-down lasts longer)."""
    import threading
    _drop_every_branch(rs_proxy)
    main_uri = rs_proxy.uri
    writers = [("main", main_uri, 0), ("main", main_uri, 1), ("main", main_uri, 2)]
    per_writer, pause_at = 45, 15
    stepped = threading.Barrier(len(writers) + 1)
    acked: dict[tuple[str, int], list[int]] = {(p, w): [] for p, _, w in writers}
    errors: list[str] = []

    def write(port: str, uri: str, writer: int) -> None:
        with MongoClient(uri, serverSelectionTimeoutMS=60000) as client:
            coll = client.elect.concurrent
            for i in range(per_writer):
                if i == pause_at:
                    stepped.wait()
                doc_id = f"{port}-{writer}-{i}"
                try:
                    coll.insert_one({"_id": doc_id})
                except PyMongoError as exc:
                    errors.append(f"{doc_id}: {exc!r}")
                else:
                    acked[(port, writer)].append(i)

    threads = [threading.Thread(target=write, args=w) for w in writers]
    for t in threads:
        t.start()
    while stepped.n_waiting < len(writers):  # every writer is at its pause
        threading.Event().wait(0.05)
    admin.admin.command("replSetStepDown", 5, force=True)
    stepped.wait()
    for t in threads:
        t.join()
    assert errors == []
    with MongoClient(main_uri) as client:
        seen = {d["_id"] for d in client.elect.concurrent.find({"_id": {"$regex": "^main-"}})}
    assert seen == {f"main-{w}-{i}" for (p, w), ids in acked.items() if p == "main"
                    for i in ids}
    assert all(len(ids) == per_writer for ids in acked.values())
    with MongoClient(main_uri) as client:
        assert client.elect.concurrent.count_documents({}) == len(writers) * per_writer
