"""`mongobranch serve`: wires the upstream, listeners, engine and admin API together."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous import uri_parser as async_uri_parser
from pymongo.errors import ConfigurationError, OperationFailure

from proxy import metrics
from proxy.admin import auth, http
from proxy.admin import branches as branch_routes
from proxy.branching import copymode, gc, lifecycle, router, sizes
from proxy.branching.commands import mainwrite
from proxy.branching.engine import Engine
from proxy.branching.model import Branch
from proxy.branching.requests import parse_retention
from proxy.branching.router import EngineRouter
from proxy.cluster import Cluster
from proxy.config import Config
from proxy.embedded import EmbeddedServer
from proxy.net import tls
from proxy.net.handoff import HandoffClient, HandoffServer
from proxy.net.handshake import Topology
from proxy.net.router import Router
from proxy.net.server import Listener, raise_open_file_limit
from proxy.upstream.connection import UpstreamConfig
from proxy.upstream.monitor import UpstreamMonitor
from proxy.upstream.scram import SUPPORTED as SUPPORTED_MECHANISMS
from proxy.upstream.topology import UpstreamTopology
from proxy.wire import fastwire
from proxy.workerlink import EngineHub, EngineLink, RemoteRouter, SwitchedRouter
from proxy.workers import Worker

log = logging.getLogger("mongobranch")

# The engine lease between the workers of one machine, unless --lease gives one: how
# long branch ports wait for another worker after the holder dies.
WORKER_LEASE = 2.0


def parse_hostport(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        return default_host, int(value)
    return (host or default_host).strip("[]"), int(port)


def parse_range(value: str) -> tuple[int, int]:
    lo, sep, hi = value.partition("-")
    if not sep:
        raise ValueError(f"expected LO-HI, got {value!r}")
    low, high = int(lo), int(hi)
    if not 0 < low <= high < 65536:
        raise ValueError(f"bad port range {value!r}")
    return low, high


@dataclass
class ServeOptions:
    upstream: str | None = None
    listen: str = "127.0.0.1:27018"
    admin: str = "127.0.0.1:9090"
    branch_ports: str = "27100-27199"
    meta_db: str = "mongobranch"
    data_dir: str = ".mongobranch"
    grace: float = 10.0
    # Periodic WAL retention ("7d"); None leaves gc to `mongobranch gc`.
    gc_retention: str | None = None
    gc_interval: float = 3600.0
    # Branch lifecycle (lifecycle.py): how long a dropped branch stays restorable ("0":
    # drops remove at once), seconds between reaper passes, and whether main is protected
    # unless the API said otherwise.
    deleted_retention: str = "24h"
    reap_interval: float = lifecycle.DEFAULT_REAP_INTERVAL
    protect_main: bool = True
    # Seconds a transaction on a branch port may stay open (txn.py).
    transaction_lifetime: float = 60.0
    # Feature flags; None: from the environment, the config file or the default.
    config_path: str | None = None
    default_mode: str | None = None
    allow_wal: bool | None = None
    # Branches with their own metrics labels; the rest are counted as branch="other".
    metrics_branch_limit: int = 100
    # How old the per-branch size figures in /metrics may be before a scrape measures
    # them again (0: every scrape).
    metrics_size_interval: float = 30.0
    # The host branch URIs name (the --listen host when None): a proxy listening on
    # 0.0.0.0 hands out URIs its clients can resolve.
    advertise_host: str | None = None
    legacy_op_query: bool | None = None
    # Capture of main's changes from the change stream, and whether it may turn on
    # pre-images for main's collections (docs/ARCHITECTURE.md, "Capture").
    capture: bool = True
    pre_images: bool = True
    # Whether clients that do not authenticate run as the --upstream URI's user; None:
    # only when the listening address is loopback-only.
    anonymous_as_uri_user: bool | None = None
    # Bearer tokens of the admin API: this file, and the MONGOBRANCH_ADMIN_TOKEN* variables.
    admin_token_file: str | None = None
    # TLS on the listening side (main, branch ports, admin API); with tls_ca, client
    # certificates signed by it are required.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    # Scale-out (cluster.py): seconds of the engine lease (0: this process alone runs the
    # engine, no lease), and the address other processes reach this one's ports on (the
    # --listen host when None; every process listens on the same port numbers).
    lease: float = 0.0
    relay_host: str | None = None
    # Workers of one machine (workers.py): who this process is among them (None: not a
    # worker).
    worker: Worker | None = None


async def connect_upstream(
        uri: str) -> tuple[AsyncMongoClient[dict[str, Any]], UpstreamConfig]:
    """The engine's client and the raw connections' config, both from pymongo's own
    parsing of `uri`: seed lists, `replicaSet` and `mongodb+srv://` (SRV and TXT records)
    are discovered and monitored by that client, whose topology tells every raw
    connection where the primary is."""
    try:
        return await _connect_upstream(uri)
    except (ConfigurationError, ValueError, OSError) as exc:
        raise UpstreamConfigError(f"--upstream: {exc}") from exc


def retention(value: str) -> dt.timedelta:
    """--deleted-retention: a duration, or 0 for none (a drop removes the branch at once)."""
    if value.strip() in ("0", "0s"):
        return dt.timedelta(0)
    return lifecycle.parse_duration(value, "--deleted-retention")


FAST_CONNECT_TIMEOUT = 5.0


class UpstreamConfigError(Exception):
    """The upstream URI cannot be used (bad option, unreadable file, SRV lookup failed)."""


async def _connect_upstream(
        uri: str) -> tuple[AsyncMongoClient[dict[str, Any]], UpstreamConfig]:
    parsed = await async_uri_parser.parse_uri(uri)
    given = {key.lower() for key in parsed["options"]}
    defaults: dict[str, Any] = {}
    if "appname" not in given:
        defaults["appname"] = "mongobranch-engine"
    if "serverselectiontimeoutms" not in given:
        # Fail fast while the upstream is down: the admin API answers 503 within seconds.
        defaults["serverSelectionTimeoutMS"] = 5000
    if "maxidletimems" not in given:
        # Retire pooled connections before a server, firewall or load balancer drops
        # them as idle (SecantusDB closes a connection idle for 300 s): a dropped one
        # handed to a merge fails it.
        defaults["maxIdleTimeMS"] = 60_000
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        uri, tz_aware=False, datetime_conversion="DATETIME_AUTO",
        uuidRepresentation="unspecified", **defaults)
    # A raw connection waits this long for a primary while an election is under way
    # (pymongo's own default unless the URI sets serverSelectionTimeoutMS).
    selection = (client.options.server_selection_timeout
                 if "serverselectiontimeoutms" in given else 30.0)
    topology = UpstreamTopology(client, selection)
    seeds = [(str(h), int(p)) for h, p in parsed["nodelist"]]
    config = UpstreamConfig.from_options(uri, seeds, client.options, topology)
    if "connecttimeoutms" not in given:
        # A client's connection fails fast while the upstream does not answer. The
        # engine's own client keeps pymongo's 20 s: its monitor times its heartbeat by
        # connectTimeoutMS and, on a timeout, cancels every operation under way, so a
        # single-threaded upstream busy for 5 s (SecantusDB writing a copy branch's
        # $out) failed the engine's other work with "operation cancelled".
        config.connect_timeout = FAST_CONNECT_TIMEOUT
    if config.username and config.mechanism not in SUPPORTED_MECHANISMS:
        await client.close()
        raise ValueError(f"authMechanism={config.mechanism} is not supported for the "
                         f"upstream; use one of {', '.join(sorted(SUPPORTED_MECHANISMS))}")
    return client, config


class BranchPorts:
    """One listener per branch, each serving that branch's view."""

    def __init__(self, proxy: Proxy, host: str):
        self.proxy = proxy
        self.host = host
        self.listeners: dict[str, Listener] = {}

    async def open(self, branch: Branch) -> None:
        assert self.proxy.upstream is not None and self.proxy.engine is not None
        open_ = self.listeners.get(branch.name)
        if open_ is not None and open_.port == branch.port:
            return  # opened by a follower's catalog sync before this process took over
        if open_ is not None:
            await self.close_name(branch.name)
        listener = Listener(f"branch:{branch.name}", self.host, branch.port,
                            upstream=self.proxy.upstream, topology=self.proxy.topology,
                            router=EngineRouter(self.proxy.engine, branch.name),
                            stats=metrics.BRANCHES.acquire(branch.name),
                            legacy_op_query=self.proxy.engine.config.legacy_op_query.value,
                            anonymous_as_uri_user=self.proxy.anonymous_as_uri_user,
                            tls=self.proxy.tls,
                            relay_to=self.proxy.relay_target(branch.port),
                            reuse_port=self.proxy.options.worker is not None)
        try:
            await listener.start()
        except OSError:
            metrics.BRANCHES.release(branch.name)
            raise
        self.listeners[branch.name] = listener

    async def close(self, branch: Branch) -> None:
        await self.close_name(branch.name)

    async def close_name(self, name: str) -> None:
        listener = self.listeners.pop(name, None)
        metrics.BRANCHES.release(name)
        if listener is not None:
            await listener.stop(self.proxy.options.grace)

    async def stop_all(self, grace: float) -> None:
        await asyncio.gather(*(lst.stop(grace) for lst in self.listeners.values()))
        self.listeners.clear()


class Proxy:
    """A running proxy; tests start it in-process, `serve` runs it until a signal."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.embedded: EmbeddedServer | None = None
        self.topology = Topology()
        self.upstream: UpstreamConfig | None = None
        self.monitor: UpstreamMonitor | None = None
        self.main: Listener | None = None
        self.engine: Engine | None = None
        self.meta_client: AsyncMongoClient[dict[str, Any]] | None = None
        self.ports: BranchPorts | None = None
        self._engine_retry: asyncio.Task[None] | None = None
        self._gc_task: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.admin_runner: object | None = None
        self.admin_port = 0
        self.anonymous_as_uri_user = False
        self.tls: ssl.SSLContext | None = None
        # Scale-out (cluster.py): None when this process alone runs the engine.
        self.cluster: Cluster | None = None
        # Workers of one machine: where other workers hand this one connections and
        # main-port calls, and this one's link to the worker holding the engine.
        self.handoff: HandoffServer | None = None
        self.hub: EngineHub | None = None
        self.link: EngineLink | None = None
        self._handoff_to: HandoffClient | None = None
        self._private_admin: socket.socket | None = None
        self._stopping = False

    async def start(self) -> None:
        opts = self.options
        tokens = auth.Tokens.load(opts.admin_token_file)
        ahost, aport = parse_hostport(opts.admin)
        auth.check_exposure(ahost, aport, tokens)
        if opts.tls_cert:
            self.tls = tls.server_context(opts.tls_cert, opts.tls_key, opts.tls_ca)
        raise_open_file_limit()
        if not tokens:
            log.warning("the admin API on %s has no token: anyone who can reach it may manage "
                        "branches (set MONGOBRANCH_ADMIN_TOKEN)", opts.admin)
        uri = opts.upstream
        if not uri:
            self.embedded = EmbeddedServer(Path(opts.data_dir))
            await self.embedded.start()
            uri = self.embedded.uri
        self.meta_client, self.upstream = await connect_upstream(uri)
        metrics.BRANCHES.limit = opts.metrics_branch_limit
        self.monitor = UpstreamMonitor(self.upstream, self.topology)
        if not await self.monitor.wait_ready(15.0):
            log.warning("upstream %s is not answering yet; serving anyway",
                        self.upstream.address)
        if self.upstream.topology is not None:
            log.info("upstream topology: %s", self.upstream.topology.describe())
        self.monitor.start()
        host, port = parse_hostport(opts.listen)
        self.anonymous_as_uri_user = self._anonymous_policy(host)
        self.engine = Engine(self.meta_client, opts.meta_db, parse_range(opts.branch_ports),
                             host=opts.advertise_host or host)
        self.engine.copier = copymode
        self.engine.writer = router.write_through
        self.engine.config = Config.load(opts.config_path, flags={
            "default_mode": opts.default_mode, "allow_wal": opts.allow_wal,
            "legacy_op_query": opts.legacy_op_query})
        self.engine.capture_options = {"pre_images": opts.pre_images} if opts.capture \
            else None
        self.engine.lifecycle.retention = retention(opts.deleted_retention)
        self.engine.lifecycle.protect_main = opts.protect_main
        self.engine.txns.lifetime = opts.transaction_lifetime
        self.ports = BranchPorts(self, host)
        self.engine.ports = self.ports
        lease = opts.lease or (WORKER_LEASE if opts.worker is not None else 0.0)
        if opts.worker is not None:
            if self.tls is not None:
                raise UpstreamConfigError("--workers does not support --tls-cert yet")
            me = opts.worker
            base = f"\0mongobranch-{me.group}-{me.index}"
            self.handoff = HandoffServer(base + ".fd", self._adopt)
            self.handoff.start()
            self.hub = EngineHub(base + ".rpc", EngineRouter(self.engine, None),
                                 self.engine.intercepting_main)
            await self.hub.start()
            self.link = EngineLink(self._main_state_changed)
            # The shared admin port may land on any worker: the others forward what only
            # the holder answers to its own loopback port (bound by the supervisor).
            self._private_admin = socket.socket(fileno=me.admin_fd)
            private_url = f"http://127.0.0.1:{self._private_admin.getsockname()[1]}"
            self.cluster = Cluster(self.meta_client, opts.meta_db, lease=lease,
                                   addr=host if host not in ("", "0.0.0.0", "::")
                                   else "127.0.0.1", main_port=port, admin=private_url,
                                   handoff=base)
        elif lease > 0:
            relay_host = opts.relay_host or host
            if relay_host in ("", "0.0.0.0", "::"):
                raise UpstreamConfigError(
                    f"--lease: the listening host {host!r} is a wildcard; give --relay-host, "
                    "the address other processes reach this one on (a pod's IP)")
            if self.tls is not None:
                raise UpstreamConfigError("--lease (scale-out) does not support --tls-cert yet: "
                                          "relayed connections would be decrypted in between")
            self.cluster = Cluster(self.meta_client, opts.meta_db, lease=lease,
                                   addr=relay_host, main_port=port, admin="")
        if self.cluster is not None:
            self.cluster.on_acquired = self._promote
            self.cluster.on_tick = self._sync_ports
            self.engine.owner = self.cluster.owner
            self.engine.unavailable = "this process does not hold the engine lease"
            if aport and self.link is None:
                self.cluster.admin = self._admin_url(ahost, aport)
            self.cluster.start()
            # Before any port or the API answers: the first round tells whether this
            # process runs the engine or relays, and to whom.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.cluster.ready.wait(), 15.0)
            if self.link is not None:  # and reaches the holder before serving main
                await self._follow_holder()
        else:
            await self._start_engine_and_tasks()
        main_router: Router = EngineRouter(self.engine, None)
        if self.link is not None:
            cluster = self.cluster
            assert cluster is not None
            main_router = SwitchedRouter(main_router, RemoteRouter(self.link),
                                         lambda: cluster.leading)
        self.main = Listener("main", host, port, upstream=self.upstream,
                             topology=self.topology, router=main_router,
                             stats=metrics.BRANCHES.main,
                             legacy_op_query=self.engine.config.legacy_op_query.value,
                             anonymous_as_uri_user=self.anonymous_as_uri_user, tls=self.tls,
                             read_routing=True, relay_to=self._main_target(),
                             reuse_port=self.link is not None)
        self.engine.reroute = self._reroute_main
        engine = self.engine
        metrics.CAPTURE[:] = [lambda: engine.capture.stats if engine.capture else None]
        await self.main.start()
        monitor = self.monitor
        app = http.build_app(lambda: monitor.healthy, tokens,
                             forward_to=self._admin_target() if self.cluster else None,
                             before_metrics=metrics.BranchSizes(
                                 self._measure_sizes, opts.metrics_size_interval).refresh,
                             workers=self._metrics_peers())
        branch_routes.add_routes(app, self.engine)
        runner = await http.start(app, ahost, aport, self.tls,
                                  reuse_port=self.link is not None, private=self._private_admin)
        self.admin_runner = runner
        self.admin_port = aport or runner.addresses[0][1]
        if self.link is None and self.cluster is not None and not aport:
            self.cluster.admin = self._admin_url(ahost, self.admin_port)  # at the next round

    def _metrics_peers(self) -> http.Peers | None:
        """A worker's /metrics also shows the other workers' (label `worker`)."""
        me = self.options.worker
        if me is None:
            return None
        return http.Peers(str(me.index), [(str(i), f"http://127.0.0.1:{port}")
                                          for i, port in enumerate(me.admin_ports)
                                          if i != me.index])

    async def _reroute_main(self) -> None:
        """Main's writes become the engine's (main gained children): the main port and
        every other worker's first answer the writes they forwarded unchanged."""
        assert self.main is not None
        await self.main.reroute(mainwrite.NAMES)
        if self.hub is not None:
            await self.hub.broadcast()

    async def _main_state_changed(self) -> None:
        """The holder says main's writes changed hands: this worker's main port asks its
        router again, once the writes it forwarded unchanged are answered."""
        if self.main is not None:
            await self.main.reroute(mainwrite.NAMES)

    def _adopt(self, port: int, sock: Any) -> None:
        """A connection another worker accepted and handed to this one (the holder)."""
        listeners = [self.main] if self.main is not None else []
        if self.ports is not None:
            listeners += list(self.ports.listeners.values())
        for listener in listeners:
            if listener.port == port:
                listener.adopt(sock)
                return
        sock.close()  # a branch dropped meanwhile: closed, as a closed port would

    async def _measure_sizes(self, names: list[str]) -> dict[str, sizes.BranchSize]:
        """Only the process running the engine knows the branches' overlays."""
        engine = self.engine
        if engine is None or engine.unavailable:
            return {}
        return await sizes.measure(engine, names)

    def _admin_url(self, host: str, port: int) -> str:
        """Where the other processes forward admin requests to this one."""
        assert self.cluster is not None
        public = self.cluster.addr if host in ("", "0.0.0.0", "::") else host
        return f"{'https' if self.tls else 'http'}://{public}:{port}"

    async def _start_engine_and_tasks(self) -> None:
        """The engine and its periodic work (alone, or once this process took the lease)."""
        assert self.engine is not None
        opts = self.options
        if not await self._start_engine():
            self._engine_retry = asyncio.create_task(self._retry_engine())
        if opts.gc_retention:
            self._gc_task = asyncio.create_task(self._periodic_gc(
                parse_retention(opts.gc_retention), opts.gc_interval))
        self._reaper = asyncio.create_task(lifecycle.run(self.engine, opts.reap_interval))

    async def _promote(self) -> None:
        """This process took the engine lease: its engine starts from the metadata
        database, as after a crash (dirty overlays rebuilt from the WAL, retried writes'
        replies reloaded), and its ports serve instead of relaying."""
        assert self.engine is not None and self.ports is not None
        self.engine.unavailable = "branch engine is starting (this process took the lease)"
        await self._start_engine_and_tasks()
        for name in [n for n in self.ports.listeners if n not in self.engine.branches]:
            await self.ports.close_name(name)
        if self.link is not None:
            await self.link.connect(None)
            if self.main is not None:  # its router is now the engine's own
                await self.main.reroute(frozenset(router.MAIN) | mainwrite.NAMES)

    def relay_target(self, port: int
                     ) -> Callable[[], tuple[str, int] | HandoffClient | None] | None:
        """A branch port's clients go to the engine lease holder's same port."""
        cluster = self.cluster
        if cluster is None:
            return None

        def target() -> tuple[str, int] | HandoffClient | None:
            if self.link is not None:  # a worker: handed to the holder, socket and all
                return None if cluster.leading else self._handoff_to
            host = cluster.relay_host()
            return None if host is None else (host, port)
        return target

    def _main_target(self) -> Callable[[], tuple[str, int] | None] | None:
        """The main port relays to the holder's too: its branch commands (createBranch
        and the rest) and, while main has children, its writes are the engine's work,
        and which of them a connection will send is not known when it is accepted."""
        cluster = self.cluster
        if cluster is None or self.link is not None:
            return None  # a worker serves its main port itself (workerlink.py)

        def target() -> tuple[str, int] | None:
            holder = cluster.holder
            if cluster.leading or holder is None:
                return None
            return holder["addr"], int(holder["main"])
        return target

    def _admin_target(self) -> Callable[[], str | None]:
        def target() -> str | None:
            cluster = self.cluster
            if cluster is None or cluster.leading or cluster.holder is None:
                return None
            admin = cluster.holder.get("admin")
            return str(admin) if admin else None
        return target

    async def _sync_ports(self) -> None:
        """Without the lease: listen on every branch port the catalog names (to relay
        its clients), so that branches created through any process are reachable here."""
        assert self.engine is not None and self.ports is not None and self.cluster is not None
        if self.link is not None:
            await self._follow_holder()
        if self.cluster.leading or self._stopping:
            return
        want: dict[str, Branch] = {}
        async for doc in self.engine.meta["branches"].find():
            branch = Branch.from_doc(doc)
            if branch.deleted_at is None and not branch.creating:
                want[branch.name] = branch
        for name in [n for n in self.ports.listeners if n not in want]:
            await self.ports.close_name(name)
        for branch in want.values():
            try:
                await self.ports.open(branch)
            except OSError as exc:
                log.error("branch %s: cannot listen on port %d: %s", branch.name, branch.port,
                          exc)

    async def _follow_holder(self) -> None:
        """A worker: the channels to the worker holding the engine, as the lease names it."""
        assert self.cluster is not None and self.link is not None
        holder = self.cluster.holder
        name = None if self.cluster.leading or holder is None else holder.get("handoff")
        if not name:
            await self.link.connect(None)
            self._handoff_to = None
            return
        if self._handoff_to is None or self._handoff_to.name != name + ".fd":
            if self._handoff_to is not None:
                self._handoff_to.close()
            self._handoff_to = HandoffClient(name + ".fd")
        await self.link.connect(name + ".rpc")

    def _anonymous_policy(self, host: str) -> bool:
        """Whether clients that do not authenticate get the URI user's privileges: the
        operator's explicit choice, else yes only on a loopback-only listener."""
        assert self.upstream is not None
        choice = self.options.anonymous_as_uri_user
        if not self.upstream.username:
            return False  # nothing to lend: anonymous clients are the upstream's to judge
        if choice is None:
            choice = auth.is_loopback(host)
            why = "the listener is loopback-only" if choice else (
                f"the listener {host} is not loopback-only; --anonymous-as-uri-user lends them")
        else:
            why = "--anonymous-as-uri-user" if choice else "--no-anonymous-as-uri-user"
        log.info("clients that do not authenticate %s the upstream URI user's privileges (%s)",
                 "get" if choice else "do not get", why)
        return choice

    async def _start_engine(self) -> bool:
        """Load branches and open their ports; the main port serves even when this fails
        (an upstream down at start-up, or credentials that cannot read the metadata)."""
        assert self.engine is not None and self.ports is not None
        try:
            await asyncio.wait_for(self.engine.start(), 60)
        except Exception as exc:
            refused = isinstance(exc, OperationFailure) and exc.code in (13, 18)
            if refused and self.upstream is not None and not self.upstream.username:
                # No credentials will appear without a restart: say what is needed, once.
                self.engine.unavailable = (
                    "branching is off: the upstream requires authentication and the "
                    "--upstream URI has no credentials for mongobranch's metadata; give it "
                    f"a user with readWrite on {self.options.meta_db!r} "
                    "(mongodb://user:pass@host/?authSource=admin). The main port forwards "
                    "each client's own authentication")
                log.error("%s", self.engine.unavailable)
                return True
            if refused:
                self.engine.unavailable = (
                    f"branch engine cannot start: the --upstream user may not use the "
                    f"metadata database {self.options.meta_db!r} (it needs readWrite on "
                    f"it): {exc}")
            else:
                self.engine.unavailable = f"branch engine cannot start: {exc}"
            log.error("%s; the main port serves, branches are unavailable",
                      self.engine.unavailable)
            return False
        self.engine.unavailable = None
        await lifecycle.load(self.engine)
        for branch in list(self.engine.branches.values()):
            if branch.deleted_at is not None:
                continue  # kept for restore: no port until then
            try:
                await self.ports.open(branch)
            except OSError as exc:
                log.error("branch %s: cannot listen on port %d: %s", branch.name, branch.port,
                          exc)
        return True

    async def _retry_engine(self) -> None:
        while not await self._start_engine():
            await asyncio.sleep(5.0)
        if self.engine is not None and self.engine.unavailable is None:
            log.info("branch engine started")

    async def _periodic_gc(self, retention: dt.timedelta, interval: float) -> None:
        assert self.engine is not None
        while True:
            await asyncio.sleep(interval)
            if self.engine.unavailable is not None:
                continue
            try:
                result = await gc.collect(self.engine, retention)
                log.info("gc: horizon LSN %s, WAL %s -> %s bytes", result["horizon_lsn"],
                         result["before"]["bytes"], result["after"]["bytes"])
            except Exception:
                log.exception("periodic gc failed; it runs again in %.0fs", interval)

    async def stop(self) -> None:
        # The lease is renewed while clients drain and released only at the end: no
        # other process's engine starts while this one's may still write.
        self._stopping = True
        for task in (self._engine_retry, self._gc_task, self._reaper):
            if task is not None:
                task.cancel()
        if self.engine is not None and (self.cluster is None
                                        or self.engine.unavailable is None):
            await lifecycle.save_use(self.engine)  # a follower has no uses to save
        if self.main:
            await self.main.stop(self.options.grace)
        if self.ports:
            await self.ports.stop_all(self.options.grace)
        if self.engine and self.engine.unavailable is None:
            await self.engine.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        if self.link is not None:
            self.link.close()
        if self.hub is not None:
            await self.hub.stop()
        if self.handoff is not None:
            self.handoff.close()
        if self.meta_client:
            await self.meta_client.close()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()  # type: ignore[attr-defined]
        if self.monitor:
            await self.monitor.stop()
        if self.embedded:
            await self.embedded.stop()


async def serve(options: ServeOptions) -> int:
    proxy = Proxy(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await proxy.start()
        except UpstreamConfigError as exc:
            log.error("%s", exc)
            return 2
        log.info("mongobranch ready: main port %s, admin http://%s", options.listen, options.admin)
        log.info("relay checks: %s", fastwire.IMPLEMENTATION)
        await stop.wait()
        log.info("shutting down")
    finally:
        await proxy.stop()
    return 0
