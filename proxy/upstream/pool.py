"""The upstream clients of both arms, replaced on a config reload without dropping a request."""

from __future__ import annotations

import asyncio
import os

import structlog

from config.settings import ARMS, HTTP1_CLIENTS, ArmName, Upstreams, UpstreamSettings
from proxy.upstream.base import Transport
from proxy.upstream.http2 import HttpxTransport
from proxy.upstream.lean import Http1Transport
from proxy.upstream.session import AiohttpTransport

__all__ = ["CLIENT_ENV", "HTTP1_CLIENTS", "UpstreamClients", "client_override", "make_transport"]

log = structlog.get_logger("canary.upstreams")


class UpstreamClients:
    """One transport per arm. `transports` is the dict the hot path reads; a reload builds
    a new dict (the old transports finish their requests, then close)."""

    def __init__(self, upstreams: Upstreams) -> None:
        self.settings = upstreams
        self.transports: dict[ArmName, Transport] = {arm: make_transport(upstreams.get(arm)) for arm in ARMS}
        self._retiring: dict[asyncio.Task[None], Transport] = {}  # replaced, closing once idle

    def replace(self, upstreams: Upstreams, *, drain: float) -> dict[ArmName, Transport]:
        """New transports for the arms whose settings changed; returns the new dict."""
        fresh = dict(self.transports)
        for arm in ARMS:
            if upstreams.get(arm) != self.settings.get(arm):
                old = fresh[arm]
                fresh[arm] = make_transport(upstreams.get(arm))
                task = asyncio.ensure_future(self._close_later(arm, old, drain))
                self._retiring[task] = old
                task.add_done_callback(self._retiring.pop)
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
        """Close every client, the replaced ones still draining included (the listener has
        drained by now, so waiting on them would only wait on idle connections)."""
        retiring = list(self._retiring.items())
        for task, _ in retiring:
            task.cancel()
        for transport in [old for _, old in retiring] + list(self.transports.values()):
            await transport.close()


CLIENT_ENV = "CANARY_HTTP1_CLIENT"  # deprecated: `upstreams.NAME.client` in the config


def client_override() -> str | None:
    """The deprecated environment override of `upstreams.NAME.client`, if set (ValueError
    when it names no client)."""
    choice = os.environ.get(CLIENT_ENV) or None
    if choice is not None and choice not in HTTP1_CLIENTS:
        raise ValueError(f"{CLIENT_ENV}={choice!r}: use one of {', '.join(HTTP1_CLIENTS)} (better: upstreams.NAME.client)")
    return choice


def make_transport(upstream: UpstreamSettings, *, http1_client: str | None = None) -> Transport:
    """The client for one upstream: httpx for `http2: true`, else the HTTP/1.1 client named
    by `http1_client`, the deprecated CANARY_HTTP1_CLIENT variable, or `upstream.client`
    (default lean), in that order."""
    if upstream.http2:
        return HttpxTransport(upstream)
    choice = http1_client or client_override() or upstream.client
    if choice == "aiohttp":
        return AiohttpTransport(upstream)
    return Http1Transport(upstream)
