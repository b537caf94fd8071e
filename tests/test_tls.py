"""TLS on the listening side: main port, branch ports and admin API, with pymongo, the
Node driver and mongosh; client certificates with --tls-ca. A private CA is made with
`openssl` for the test."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import ServerSelectionTimeoutError

from tests.servers import BIN, ProxyProcess, Secantus, free_port
from tests.test_node_clients import MONGOSH, MONGOSH_SCRIPT, NODE_DIR, run_json

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="openssl is not on PATH (apt-get install openssl)")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _leaf(d: Path, name: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"{ext}\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN=mongobranch-test-{name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-sha256", "-extfile",
             f"{name}.ext", cwd=d)
    (d / f"{name}-combined.pem").write_text((d / f"{name}.pem").read_text()
                                            + (d / f"{name}.key").read_text())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-sha256", "-subj", "/CN=mongobranch-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _leaf(d, "server", "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost")
    _leaf(d, "client", "extendedKeyUsage=clientAuth")
    return d


def _https(pki: Path, client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client_cert:
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return ctx


def _start(upstream: Secantus, pki: Path, *extra: str, client_cert: bool = False,
           ) -> ProxyProcess:
    proc = ProxyProcess(upstream.uri, meta_db="mongobranch_tls",
                        extra=["--tls-cert", str(pki / "server.pem"), "--tls-key",
                               str(pki / "server.key"), *extra])
    proc.start(wait_healthy=False)
    url = f"https://127.0.0.1:{proc.admin_port}/healthz"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2,
                                        context=_https(pki, client_cert)) as r:
                if r.status == 200:
                    return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
        time.sleep(0.1)


@pytest.fixture(scope="module")
def tls_proxy(upstream: Secantus, pki: Path) -> Iterator[ProxyProcess]:
    proc = _start(upstream, pki)
    yield proc
    proc.stop()


def tls_uri(port: int, pki: Path, **extra: str) -> str:
    params = "&".join([f"tls=true&tlsCAFile={pki / 'ca.pem'}",
                       *(f"{k}={v}" for k, v in extra.items())])
    return f"mongodb://127.0.0.1:{port}/?{params}"


def test_pymongo_main_and_branch_ports(tls_proxy: ProxyProcess, pki: Path) -> None:
    with MongoClient(tls_uri(tls_proxy.port, pki), serverSelectionTimeoutMS=10000) as c:
        c.tls_db.items.drop()
        c.tls_db.items.insert_many([{"_id": i} for i in range(300)])
        assert [d["_id"] for d in c.tls_db.items.find().sort("_id", 1).batch_size(50)] == \
            list(range(300))
        branch = c.admin.command({"createBranch": "tls-b"})
    try:
        with MongoClient(tls_uri(branch["port"], pki), serverSelectionTimeoutMS=10000) as b:
            b.tls_db.items.insert_one({"_id": "branch"})
            assert b.tls_db.items.count_documents({}) == 301
        with MongoClient(tls_uri(tls_proxy.port, pki)) as c:
            assert c.tls_db.items.count_documents({}) == 300
    finally:
        with MongoClient(tls_uri(tls_proxy.port, pki)) as c:
            c.admin.command({"dropBranch": "tls-b"})


def test_plain_clients_get_nothing(tls_proxy: ProxyProcess) -> None:
    with MongoClient(tls_proxy.uri, serverSelectionTimeoutMS=1500) as c, \
            pytest.raises(ServerSelectionTimeoutError):
        c.admin.command("ping")


def test_admin_api_over_https(tls_proxy: ProxyProcess, pki: Path) -> None:
    url = f"https://127.0.0.1:{tls_proxy.admin_port}/branches"
    with urllib.request.urlopen(url, timeout=10, context=_https(pki)) as r:
        assert r.status == 200 and json.loads(r.read()) == []
    # The CLI verifies it against the CA named by SSL_CERT_FILE.
    done = subprocess.run([str(BIN / "mongobranch"), "branch", "list", "--json", "--admin",
                           f"https://127.0.0.1:{tls_proxy.admin_port}"],
                          capture_output=True, text=True, timeout=60,
                          env={"SSL_CERT_FILE": str(pki / "ca.pem"), "PATH": str(BIN)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH")
def test_node_driver_and_mongosh(tls_proxy: ProxyProcess, pki: Path, tmp_path: Path) -> None:
    out: Any = run_json(["node", "crud.js", tls_uri(tls_proxy.port, pki)], cwd=NODE_DIR,
                        home=tmp_path)
    assert out["inserted"] == 250 and out["ids"] == list(range(250))
    assert out["hello"]["msg"] == "isdbgrid"
    uri = tls_uri(tls_proxy.port, pki, directConnection="false")
    out = run_json([str(MONGOSH), uri, "--quiet", "--norc", "--eval", MONGOSH_SCRIPT],
                   cwd=NODE_DIR, home=tmp_path)
    assert out["count"] == 120 and out["ids"] == list(range(120))


def test_client_certificates(upstream: Secantus, pki: Path) -> None:
    proc = _start(upstream, pki, "--tls-ca", str(pki / "ca.pem"), client_cert=True)
    try:
        uri = tls_uri(proc.port, pki, tlsCertificateKeyFile=str(pki / "client-combined.pem"))
        with MongoClient(uri, serverSelectionTimeoutMS=10000) as c:
            assert c.admin.command("ping")["ok"] == 1.0
        with MongoClient(tls_uri(proc.port, pki), serverSelectionTimeoutMS=1500) as c, \
                pytest.raises(ServerSelectionTimeoutError):
            c.admin.command("ping")
        with pytest.raises(OSError):
            urllib.request.urlopen(f"https://127.0.0.1:{proc.admin_port}/branches",
                                   timeout=10, context=_https(pki))
    finally:
        proc.stop()


def test_unusable_files_are_a_clear_error(upstream: Secantus, pki: Path) -> None:
    args = [str(BIN / "mongobranch"), "serve", "--upstream", upstream.uri, "--listen",
            f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"]
    done = subprocess.run([*args, "--tls-cert", str(pki / "absent.pem")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "absent.pem" in done.stderr
    done = subprocess.run([*args, "--tls-cert", str(pki / "server.pem"), "--tls-key",
                           str(pki / "client.key")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "cannot load the TLS certificate" in done.stderr
    done = subprocess.run([*args, "--tls-ca", str(pki / "ca.pem")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "--tls-cert" in done.stderr
