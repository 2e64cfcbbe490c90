"""The HTTP/1.1 upstream clients under conditions the plain forwarding tests do not reach:
stale keep-alive connections, large bodies both ways, the idle-connection cap, a timeout
in the middle of a body, and the pool gate's hand-over of slots."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from config.errors import PoolExhausted
from config.settings import PoolSettings, TimeoutSettings
from proxy.upstream.base import PoolGate
from tests.conftest import upstream_settings
from tests.upstreams import STATS, tcp_upstream

MB = 1024 * 1024


@pytest.fixture
async def closes_reused_connections():
    """Answers the first request on a connection, then closes the connection when the
    next one arrives, unanswered: an upstream whose keep-alive timeout just fired."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")

    async with tcp_upstream(handle) as url:
        yield url


async def test_a_keepalive_connection_the_upstream_closed_is_retried_once_for_a_get(
    proxy_factory, closes_reused_connections
):
    canary = upstream_settings("canary", closes_reused_connections)
    server, state = await proxy_factory(weight=100, canary=canary)
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.get(server.make_url("/")) as resp:
                assert (resp.status, await resp.text()) == (200, "fresh")
    assert state.recorder.arms["canary"].stage_counts().errors == 0


async def test_large_bodies_stream_both_ways(proxy_factory):
    server, _ = await proxy_factory(weight=100)
    size = 32 * MB

    async def body():
        block = b"u" * (256 * 1024)
        for _ in range(size // len(block)):
            yield block

    async with aiohttp.ClientSession() as client:
        async with client.post(server.make_url("/upload"), data=body()) as resp:
            assert (await resp.json())["received"] == size
        received = 0
        async with client.get(server.make_url(f"/download/{size}")) as resp:
            async for chunk in resp.content.iter_chunked(MB):
                received += len(chunk)
    assert received == size


async def test_a_timeout_in_the_middle_of_a_body_truncates_and_counts_as_an_error(proxy_factory, upstreams):
    slow = upstream_settings("canary", upstreams["canary"], timeout=TimeoutSettings(connect=1, total=0.3))
    server, state = await proxy_factory(weight=100, canary=slow)
    async with aiohttp.ClientSession() as client:
        async with client.get(server.make_url("/sse")) as resp:  # first event, then nothing
            assert await resp.content.readuntil(b"\n\n") == b"data: first\n\n"
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
    upstreams["canary"].app[STATS].release.set()
    assert state.recorder.arms["canary"].stage_counts().errors == 1


# Only the lean client caps idle connections: aiohttp's TCPConnector has no such limit
# (it keeps idle ones up to max_connections, closing each after 15 s); docs/configuration.md.
@pytest.mark.parametrize("http1_client", ["lean"])
async def test_idle_connections_beyond_max_keepalive_are_closed(proxy_factory, upstreams, http1_client):
    capped = upstream_settings("canary", upstreams["canary"], pool=PoolSettings(max_connections=20, max_keepalive=2))
    server, _ = await proxy_factory(weight=100, canary=capped)
    async with aiohttp.ClientSession() as client:
        async def one() -> None:
            async with client.get(server.make_url("/sleep/0.2")) as resp:
                await resp.read()
        await asyncio.gather(*(one() for _ in range(10)))
    upstream_server = upstreams["canary"].runner.server
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while len(upstream_server.connections) > 2:
        assert loop.time() < deadline, f"{len(upstream_server.connections)} connections still open"
        await asyncio.sleep(0.02)


async def test_pool_gate_hands_a_released_slot_to_the_oldest_waiter():
    gate = PoolGate("canary", 1, wait=5)
    await gate.acquire()
    order: list[int] = []

    async def wait(n: int) -> None:
        await gate.acquire()
        order.append(n)
        gate.release()

    waiters = [asyncio.ensure_future(wait(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert not gate.try_acquire()
    gate.release()
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2] and gate.in_use == 0 and gate.try_acquire()


async def test_pool_gate_timeout_is_pool_exhausted_and_leaks_no_slot():
    gate = PoolGate("canary", 1, wait=0.05)
    await gate.acquire()
    with pytest.raises(PoolExhausted, match="canary: all connections busy"):
        await gate.acquire()
    cancelled = asyncio.ensure_future(gate.acquire())
    await asyncio.sleep(0)
    cancelled.cancel()
    gate.release()  # the cancelled waiter must not swallow this slot
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert gate.try_acquire() and gate.in_use == 1
