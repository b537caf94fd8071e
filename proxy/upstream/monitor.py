"""Keeps the upstream's hello fresh and says whether it answers (for /healthz)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from proxy.upstream.connection import UpstreamConfig, UpstreamConnection, UpstreamUnavailable

log = logging.getLogger("mongobranch.monitor")


class Learner(Protocol):
    """Whoever advertises what the upstream's hello says (net/handshake.py's Topology):
    the upstream layer knows nothing of the proxy's own hello."""

    def learn(self, hello: dict[str, Any]) -> None: ...


class UpstreamMonitor:
    def __init__(self, config: UpstreamConfig, topology: Learner, interval: float = 2.0):
        self.config = config
        self.topology = topology
        self.interval = interval
        self.healthy = False
        self._conn = UpstreamConnection(config)
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        try:
            # Bounded as a whole: a hung upstream (one that accepts connections but never
            # answers) must turn /healthz to 503, not freeze the monitor.
            ok = await asyncio.wait_for(self._probe(), self.config.connect_timeout)
        except (UpstreamUnavailable, TimeoutError, OSError) as exc:
            self._conn.close()
            if self.healthy:
                log.warning("upstream %s stopped answering: %s", self.config.address,
                            exc or type(exc).__name__)
            ok = False
        if ok and not self.healthy:
            log.info("upstream %s answers", self.config.address)
        self.healthy = ok
        return ok

    async def _probe(self) -> bool:
        if not self._conn.connected:
            reply = await self._conn.connect({"client": {"application": {
                "name": "mongobranch-monitor"}}})
            self.topology.learn(reply)
        reply = await self._conn.command("admin", {"ping": 1})
        return bool(reply.get("ok"))

    async def wait_ready(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if await self.check():
                return True
            await asyncio.sleep(0.2)
        return False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:
                log.exception("upstream health check failed")
                self.healthy = False

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self._conn.close()
