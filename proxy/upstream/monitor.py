"""Keeps the upstream's hello fresh and says whether it answers (for /healthz)."""

from __future__ import annotations

import asyncio
import logging

from proxy.net.handshake import Topology, UpstreamInfo
from proxy.upstream.connection import UpstreamConfig, UpstreamConnection, UpstreamUnavailable

log = logging.getLogger("mongobranch.monitor")


class UpstreamMonitor:
    def __init__(self, config: UpstreamConfig, topology: Topology, interval: float = 2.0):
        self.config = config
        self.topology = topology
        self.interval = interval
        self.healthy = False
        self._conn = UpstreamConnection(config)
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        try:
            if not self._conn.connected:
                reply = await self._conn.connect({"client": {"application": {
                    "name": "mongobranch-monitor"}}})
                self._apply(reply)
            reply = await asyncio.wait_for(self._conn.command("admin", {"ping": 1}),
                                           self.config.connect_timeout)
            ok = bool(reply.get("ok"))
        except (UpstreamUnavailable, TimeoutError, OSError) as exc:
            self._conn.close()
            if self.healthy:
                log.warning("upstream %s stopped answering: %s", self.config.address, exc)
            ok = False
        if ok and not self.healthy:
            log.info("upstream %s answers", self.config.address)
        self.healthy = ok
        return ok

    def _apply(self, hello: dict[str, object]) -> None:
        info = UpstreamInfo.from_hello(hello)
        if self.topology.info.known and info != self.topology.info:
            self.topology.counter += 1
        self.topology.info = info

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
            await self.check()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self._conn.close()
