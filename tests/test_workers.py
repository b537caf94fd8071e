"""`serve --workers 2`: two processes share the ports of one machine (SO_REUSEPORT). Both
serve main's pass-through traffic; the one holding the engine lease serves every branch
connection (the other hands it over, socket and all) and runs the other's main-port
commands that are the engine's, on the client's own upstream connection; a branch stays
a snapshot whichever worker a main-port write or DDL arrives on (docs/ARCHITECTURE.md,
"Workers").

Which worker holds a connection is read from /proc (the server side of each TCP
connection, by socket inode), so each test knows it drove both workers rather than
hoping the kernel spread the connections."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from tests import rawwire
from tests.servers import ProxyProcess, Secantus, executable, secantus_with_users, until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="workers share ports with SO_REUSEPORT and talk over "
                                       "abstract Unix sockets: Linux only")

META_DB = "mongobranch_test"


def worker_pids(proxy: ProxyProcess) -> list[int]:
    children = Path(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def _socket_inodes(pid: int) -> set[int]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def _tcp(port: int) -> list[tuple[int, int, int]]:
    """(state, remote port, inode) of every TCP socket whose local port is `port`."""
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], int(fields[3], 16), int(fields[9])
        if int(local.split(":")[1], 16) == port:
            rows.append((state, int(remote.split(":")[1], 16), inode))
    return rows


ESTABLISHED, LISTEN = 0x01, 0x0A


def server_side_owner(proxy: ProxyProcess, port: int, client: socket.socket) -> int | None:
    """The worker holding the server side of this client connection to `port`."""
    mine = client.getsockname()[1]
    inodes = {inode for state, remote, inode in _tcp(port)
              if state == ESTABLISHED and remote == mine}
    for pid in worker_pids(proxy):
        if inodes & _socket_inodes(pid):
            return pid
    return None


def listeners_of(proxy: ProxyProcess, port: int) -> set[int]:
    """The workers listening on `port`."""
    inodes = {inode for state, _remote, inode in _tcp(port) if state == LISTEN}
    return {pid for pid in worker_pids(proxy) if inodes & _socket_inodes(pid)}


def holder_pid(upstream: Secantus, uri: str | None = None) -> int:
    with MongoClient(uri or upstream.uri) as client:
        lease = client[META_DB]["leases"].find_one({"_id": "engine"})
    assert lease is not None
    return int(str(lease["owner"]).split(":")[1])


def spread(proxy: ProxyProcess, port: int, per_worker: int = 2, limit: int = 200
           ) -> dict[int, list[socket.socket]]:
    """Raw connections to `port` until each worker holds `per_worker` of them (the kernel
    picks the worker of each; a connection beyond what is needed is closed)."""
    pids = worker_pids(proxy)
    held: dict[int, list[socket.socket]] = {pid: [] for pid in pids}
    for _ in range(limit):
        if all(len(socks) >= per_worker for socks in held.values()):
            return held
        sock = rawwire.connect(port)
        rawwire.command(sock, {"ping": 1, "$db": "admin"})  # accepted and served
        owner = server_side_owner(proxy, port, sock)
        if owner in held and len(held[owner]) < per_worker:
            held[owner].append(sock)
        else:
            sock.close()
    raise AssertionError(f"the kernel did not spread {limit} connections over {pids}")


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") == 1.0, reply
    return reply


@pytest.fixture()
def upstream() -> Iterator[Secantus]:
    server = Secantus().start()
    yield server
    server.stop()


@pytest.fixture()
def proxy(upstream: Secantus) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(upstream.uri, meta_db=META_DB, extra=["--workers", "2"]).start()
    until("two workers, one holding the engine", lambda: len(worker_pids(proc)) == 2
          and holder_pid(upstream) in worker_pids(proc))
    until("the admin API answers through either worker",
          lambda: proc.api("GET", "/branches")[0] == 200)
    yield proc
    proc.stop()


@pytest.fixture()
def direct(upstream: Secantus) -> Iterator[MongoClient]:
    client: MongoClient = MongoClient(upstream.uri, directConnection=True)
    yield client
    client.close()


def test_both_workers_serve_main_and_the_holder_serves_every_branch_connection(
        proxy: ProxyProcess, upstream: Secantus, direct: MongoClient) -> None:
    held = spread(proxy, proxy.port)
    holder = holder_pid(upstream)
    follower = next(pid for pid in held if pid != holder)
    socks = [s for group in held.values() for s in group]
    for i, sock in enumerate(socks):
        ok(rawwire.command(sock, {"insert": "items", "documents": [{"_id": i, "v": i}],
                                  "$db": "app"}))
    assert direct.app.items.count_documents({}) == len(socks)
    # A branch command on a connection the follower serves runs in the holder's engine.
    created = ok(rawwire.command(held[follower][0], {"createBranch": "wb", "$db": "admin"}))
    port = int(created["port"])
    until("both workers listen on the new branch port",
          lambda: listeners_of(proxy, port) == set(held))
    branch_socks = spread(proxy, port, per_worker=0, limit=12)
    assert not branch_socks[follower]
    clients = []
    for i in range(12):
        sock = rawwire.connect(port)
        clients.append(sock)
        ok(rawwire.command(sock, {"insert": "items", "documents": [{"_id": 100 + i}],
                                  "$db": "app"}))
        assert server_side_owner(proxy, port, sock) == holder, \
            "a branch connection is served by the worker holding the engine"
    got = ok(rawwire.command(clients[0], {"count": "items", "$db": "app"}))
    assert got["n"] == len(socks) + 12
    assert direct.app.items.count_documents({}) == len(socks), "the base is never written"
    for sock in [*socks, *clients]:
        sock.close()


def test_main_writes_and_ddl_on_either_worker_keep_a_child_exact(
        proxy: ProxyProcess, direct: MongoClient) -> None:
    n = 8
    direct.app.items.insert_many([{"_id": i, "v": i} for i in range(n)])
    for i in range(n):
        direct.app[f"c{i}"].insert_one({"_id": i})
    status, body = proxy.api("POST", "/branches", {"name": "snap"})
    assert status == 201, body
    held = spread(proxy, proxy.port, per_worker=n // 2)
    socks = [s for group in held.values() for s in group]
    for i, sock in enumerate(socks):
        ok(rawwire.command(sock, {"update": "items", "updates": [
            {"q": {"_id": i}, "u": {"$set": {"v": -1}}}], "$db": "app"}))
        ok(rawwire.command(sock, {"insert": "items", "documents": [{"_id": 1000 + i}],
                                  "$db": "app"}))
        ok(rawwire.command(sock, {"drop": f"c{i}", "$db": "app"}))
    assert direct.app.items.count_documents({"v": -1}) == n
    with MongoClient(body["uri"]) as branch:  # type: ignore[index]
        assert sorted((d["_id"], d["v"]) for d in branch.app.items.find()) == \
            [(i, i) for i in range(n)]
        for i in range(n):
            assert list(branch.app[f"c{i}"].find()) == [{"_id": i}], f"c{i} lost"
    status, info = proxy.api("GET", "/branches/snap")
    assert status == 200 and info["isolation"] == "snapshot", info  # type: ignore[index]
    for sock in socks:
        sock.close()


def test_the_holder_killed_the_other_worker_serves_the_branches(
        proxy: ProxyProcess, upstream: Secantus, direct: MongoClient) -> None:
    status, body = proxy.api("POST", "/branches", {"name": "survivor"})
    assert status == 201, body
    uri = str(body["uri"])  # type: ignore[index]
    with MongoClient(uri, retryWrites=True) as branch:
        branch.app.items.insert_many([{"_id": i} for i in range(10)])
    old = holder_pid(upstream)
    os.kill(old, signal.SIGKILL)
    new = until("another worker holds the engine",
                lambda: (lambda pid: pid if pid != old else None)(holder_pid(upstream)),
                timeout=30)
    until("the supervisor started a worker again",
          lambda: len(worker_pids(proxy)) == 2 and old not in worker_pids(proxy))
    assert new in worker_pids(proxy)

    def counted() -> int | None:
        try:
            with MongoClient(uri, serverSelectionTimeoutMS=2000) as branch:
                return branch.app.items.count_documents({})
        except Exception:
            return None
    assert until("the branch answers again", counted) == 10
    assert proxy.proc is not None and proxy.proc.poll() is None


def test_stop_stops_every_worker(upstream: Secantus) -> None:
    proc = ProxyProcess(upstream.uri, meta_db=META_DB, extra=["--workers", "2"]).start()
    until("two workers", lambda: len(worker_pids(proc)) == 2)
    pids = worker_pids(proc)
    assert proc.stop() == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.mark.parametrize(("args", "message"), [
    (["--workers", "0"], "give a number of processes"),
    (["--workers", "many"], "give a number of processes"),
    (["--workers", "2"], "--workers needs --upstream"),
    (["--workers", "2", "--upstream", "mongodb://127.0.0.1:1/", "--lease", "5"],
     "--workers with --lease"),
])
def test_bad_workers_options_are_refused(args: list[str], message: str) -> None:
    exe = executable("mongobranch")
    assert exe is not None
    done = subprocess.run([exe, "serve", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr


PW = "pw-workers"
ROOT_USER = "root"
AUTH_USERS: dict[str, list[dict[str, str]]] = {
    ROOT_USER: [{"role": "root", "db": "admin"}],
    "reader": [{"role": "read", "db": "app"}],
    # may manage branches (readWrite on the metadata database)
    "keeper": [{"role": "readWrite", "db": META_DB}, {"role": "read", "db": "app"}],
}


@pytest.fixture()
def auth_upstream(tmp_path: Path) -> Iterator[Secantus]:
    server = secantus_with_users(str(tmp_path / "db"), AUTH_USERS, PW)
    yield server
    server.stop()


def _my_connections_to(port: int) -> set[int]:
    """The local ports of this test process's connections to `port`."""
    mine = _socket_inodes(os.getpid())
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port and int(fields[9]) in mine:
            found.add(int(fields[1].split(":")[1], 16))
    return found


def client_on(proxy: ProxyProcess, pid: int, user: str, limit: int = 80
              ) -> MongoClient[dict[str, Any]]:
    """An authenticated client all of whose connections (monitor and pool of one) the
    worker `pid` serves, so its commands surely run there."""
    for _ in range(limit):
        before = _my_connections_to(proxy.port)
        client: MongoClient[dict[str, Any]] = MongoClient(
            proxy.uri, username=user, password=PW, maxPoolSize=1, directConnection=True,
            serverSelectionTimeoutMS=5000)
        client.app.command("ping")
        ports = _my_connections_to(proxy.port) - before
        owners = set()
        for local in ports:
            inodes = {inode for state, remote, inode in _tcp(proxy.port)
                      if state == ESTABLISHED and remote == local}
            owners |= {p for p in worker_pids(proxy) if inodes & _socket_inodes(p)}
        if owners == {pid}:
            return client
        client.close()
    raise AssertionError(f"no client landed wholly on worker {pid} in {limit} tries")


def test_a_branch_command_through_the_other_worker_runs_with_the_clients_own_rights(
        auth_upstream: Secantus) -> None:
    uri = f"mongodb://{ROOT_USER}:{PW}@127.0.0.1:{auth_upstream.port}/?authSource=admin"
    proc = ProxyProcess(uri, meta_db=META_DB, extra=["--workers", "2"]).start()
    try:
        until("two workers, one holding the engine", lambda: len(worker_pids(proc)) == 2
              and holder_pid(auth_upstream, uri) in worker_pids(proc))
        follower = next(p for p in worker_pids(proc) if p != holder_pid(auth_upstream, uri))
        with client_on(proc, follower, "reader") as reader:
            with pytest.raises(OperationFailure) as info:
                reader.admin.command({"createBranch": "not-yours"})
            assert info.value.code == 13, info.value.details
        with client_on(proc, follower, "keeper") as keeper:
            created = keeper.admin.command({"createBranch": "yours"})
            assert created["ok"] == 1.0 and created["name"] == "yours", created
        status, body = proc.api("GET", "/branches")
        assert status == 200
        names = {b["name"] for b in body}  # type: ignore[union-attr, index]
        assert "yours" in names and "not-yours" not in names
    finally:
        proc.stop()


def test_workers_do_not_outlive_a_killed_supervisor(upstream: Secantus) -> None:
    proc = ProxyProcess(upstream.uri, meta_db=META_DB, extra=["--workers", "2"]).start()
    until("two workers", lambda: len(worker_pids(proc)) == 2)
    pids = worker_pids(proc)
    proc.kill()  # SIGKILL: the supervisor cannot pass anything on

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        except FileNotFoundError:
            return True
    until("every worker exits", lambda: all(gone(pid) for pid in pids))
    with socket.socket() as probe:
        # No listener left on the main port (SO_REUSEADDR: closed connections' TIME_WAIT
        # do not count).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", proc.port))


def test_a_scrape_of_any_worker_shows_every_worker(proxy: ProxyProcess,
                                                   upstream: Secantus) -> None:
    environ = Path(f"/proc/{holder_pid(upstream)}/environ").read_bytes().split(b"\0")
    holder = next(v.split(b"=", 1)[1].decode() for v in environ
                  if v.startswith(b"MONGOBRANCH_WORKER="))
    for _ in range(6):  # the shared admin port answers from either worker
        with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=30) as answer:
            text = answer.read().decode()
        held = {s.labels["worker"]: s.value for f in text_string_to_metric_families(text)
                if f.name == "mongobranch_engine_lease_held" for s in f.samples}
        assert held == {"0": 0.0, "1": 0.0, holder: 1.0}, text
