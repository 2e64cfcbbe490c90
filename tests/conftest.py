from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestServer

from config.settings import (
    FallbackSettings,
    PoolSettings,
    RetrySettings,
    RoutingSettings,
    StickyKey,
    TimeoutSettings,
    UpstreamSettings,
)
from proxy.front.fallback import Fallback
from proxy.front.forward import PROXY_SERVER_OPTIONS, ProxyState, make_proxy_handler
from proxy.front.routing import Router, RoutingSnapshot
from proxy.upstream.pool import HTTP1_CLIENTS, make_transport
from rollout.evidence import OutcomeRecorder
from tests.admin_support import canary  # noqa: F401 (fixture: a real `canary serve`)
from tests.redis_server import redis_server  # noqa: F401 (fixture: a real redis-server)
from tests.upstreams import make_upstream_app


@pytest.fixture
async def upstreams(aiohttp_server) -> dict[str, TestServer]:
    """A real baseline and canary upstream on 127.0.0.1."""
    return {
        "baseline": await aiohttp_server(make_upstream_app("baseline")),
        "canary": await aiohttp_server(make_upstream_app("canary")),
    }


def upstream_settings(name: str, server: TestServer | str, **overrides: Any) -> UpstreamSettings:
    url = server if isinstance(server, str) else str(server.make_url("")).rstrip("/")
    values: dict[str, Any] = dict(
        name=name,
        url=url,
        timeout=TimeoutSettings(connect=2.0, total=10.0),
        pool=PoolSettings(max_connections=100, max_keepalive=20),
        retries=RetrySettings(attempts=1, backoff=0.01),
    )
    values.update(overrides)
    return UpstreamSettings(**values)


ProxyFactory = Callable[..., Awaitable[tuple[BaseTestServer, ProxyState]]]


@pytest.fixture(params=HTTP1_CLIENTS)
def http1_client(request: pytest.FixtureRequest) -> str:
    """Every forwarding test runs with each HTTP/1.1 upstream client."""
    return request.param


@pytest.fixture
async def proxy_factory(aiohttp_raw_server, upstreams, http1_client) -> ProxyFactory:
    """Start the real proxy app in front of `upstreams` (or given upstream settings)."""
    states: list[ProxyState] = []

    async def start(
        *,
        weight: int = 50,
        routing: RoutingSettings | None = None,
        baseline: UpstreamSettings | None = None,
        canary: UpstreamSettings | None = None,
        seed: int | None = None,
        fallback: FallbackSettings | None = None,
    ) -> tuple[BaseTestServer, ProxyState]:
        routing = routing or RoutingSettings()
        rng = random.Random(seed).random if seed is not None else random.random
        settings = {
            "baseline": baseline or upstream_settings("baseline", upstreams["baseline"]),
            "canary": canary or upstream_settings("canary", upstreams["canary"]),
        }
        state = ProxyState(
            router=Router(RoutingSnapshot.from_settings(routing, weight), rng=rng),
            recorder=OutcomeRecorder(window=60, warn_limit=5, crit_limit=10),
            transports={arm: make_transport(s, http1_client=http1_client) for arm, s in settings.items()},
            clock=__import__("time").monotonic,
            fallback=Fallback(fallback or FallbackSettings(), body_timeout=settings["canary"].timeout.total),
        )
        states.append(state)
        server = await aiohttp_raw_server(make_proxy_handler(state), **PROXY_SERVER_OPTIONS)
        return server, state

    yield start
    for state in states:
        for transport in state.transports.values():
            await transport.close()


__all__ = ["ProxyFactory", "StickyKey", "replace", "upstream_settings", "web"]
