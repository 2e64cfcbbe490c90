"""The upstream clients of both arms, replaced on a config reload without dropping a request."""

from __future__ import annotations

import asyncio

import structlog

from config.settings import ARMS, ArmName, Upstreams
from proxy.upstream.transport import Transport, make_transport

__all__ = ["UpstreamClients"]

log = structlog.get_logger("canary.upstreams")


class UpstreamClients:
    """One transport per arm. `transports` is the dict the hot path reads; a reload builds
    a new dict (the old transports finish their requests, then close)."""

    def __init__(self, upstreams: Upstreams) -> None:
        self.settings = upstreams
        self.transports: dict[ArmName, Transport] = {arm: make_transport(upstreams.get(arm)) for arm in ARMS}
        self._closing: set[asyncio.Task[None]] = set()

    def replace(self, upstreams: Upstreams, *, drain: float) -> dict[ArmName, Transport]:
        """New transports for the arms whose settings changed; returns the new dict."""
        fresh = dict(self.transports)
        for arm in ARMS:
            if upstreams.get(arm) != self.settings.get(arm):
                old = fresh[arm]
                fresh[arm] = make_transport(upstreams.get(arm))
                task = asyncio.ensure_future(self._close_later(arm, old, drain))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
                log.info("upstream_replaced", arm=arm, url=upstreams.get(arm).url)
        self.settings = upstreams
        self.transports = fresh
        return fresh

    @staticmethod
    async def _close_later(arm: ArmName, transport: Transport, drain: float) -> None:
        """Requests already using the old client keep it until they finish (or `drain`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        while transport.busy() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await transport.close()

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
        for transport in self.transports.values():
            await transport.close()
