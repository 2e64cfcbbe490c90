"""WebSocket passthrough through the real proxy handler to real WebSocket upstreams:
frames both ways through each arm, fragmentation, ping/pong, close codes, sticky key,
outcomes per arm, backpressure, and closing the canary's connections on rollback."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from config.settings import RoutingSettings, Upstreams, WebSocketSettings
from proxy.front.forward import PROXY_SERVER_OPTIONS, ProxyState, make_proxy_handler
from proxy.front.routing import Router, RoutingSnapshot
from proxy.front.websocket import WebSockets
from proxy.upstream.pool import make_transport
from rollout.evidence import OutcomeRecorder
from tests.conftest import upstream_settings
from tests.polling import until
from tests.ws_upstreams import FLOOD_CHUNK, WS_STATS, make_ws_upstream_app


@pytest.fixture
async def ws_upstreams(aiohttp_server) -> dict[str, Any]:
    return {arm: await aiohttp_server(make_ws_upstream_app(arm)) for arm in ("baseline", "canary")}


@pytest.fixture
async def ws_proxy(aiohttp_raw_server, ws_upstreams):
    """`await ws_proxy(weight=.., on_rollback=..)`: the real proxy handler with WebSockets."""
    states: list[ProxyState] = []

    async def start(*, weight: int = 50, on_rollback: str = "close") -> tuple[Any, ProxyState]:
        upstreams = Upstreams(
            baseline=upstream_settings("baseline", ws_upstreams["baseline"]),
            canary=upstream_settings("canary", ws_upstreams["canary"]),
        )
        router = Router(RoutingSnapshot.from_settings(RoutingSettings(), weight), rng=random.Random(7).random)
        websockets = WebSockets(upstreams, WebSocketSettings(on_rollback=on_rollback))
        router.on_weight = websockets.weight_changed
        state = ProxyState(
            router=router,
            recorder=OutcomeRecorder(window=60, warn_limit=5, crit_limit=10),
            transports={arm: make_transport(upstreams.get(arm)) for arm in ("baseline", "canary")},
            clock=time.monotonic,
            websockets=websockets,
        )
        states.append(state)
        server = await aiohttp_raw_server(make_proxy_handler(state), **PROXY_SERVER_OPTIONS)
        return server, state

    yield start
    for state in states:
        for transport in state.transports.values():
            await transport.close()


async def hello(ws: aiohttp.ClientWebSocketResponse) -> str:
    message = await ws.receive(timeout=5)
    assert message.type == WSMsgType.TEXT, message
    return message.data.removeprefix("arm:")


async def test_text_and_binary_frames_echo_both_ways_through_each_arm(ws_proxy, ws_upstreams):
    server, state = await ws_proxy(weight=50)
    payload = os.urandom(300_000)  # bigger than any socket read: many reads, one message
    async with aiohttp.ClientSession() as client:
        for arm in ("baseline", "canary"):
            async with client.ws_connect(server.make_url("/ws/echo"), headers={"X-Canary": arm},
                                         protocols=("chat.v1",), autoping=False) as ws:
                assert ws._response.headers["X-Canary-Arm"] == arm
                assert ws.protocol == "chat.v1"  # negotiated end to end
                assert await hello(ws) == arm
                await ws.send_str("héllo")
                assert (await ws.receive(timeout=5)).data == "héllo"
                await ws.send_bytes(payload)
                assert (await ws.receive(timeout=5)).data == payload
                await ws.ping(b"are you there")
                pong = await ws.receive(timeout=5)
                assert (pong.type, pong.data) == (WSMsgType.PONG, b"are you there")
                await ws.close(code=4000, message=b"bye")
            stats = ws_upstreams[arm].app[WS_STATS]
            await until(lambda stats=stats: stats.close_codes == [4000], what="close code upstream")
    canary = state.recorders["canary"].stage_counts()
    assert (canary.requests, canary.errors) == (1, 0)
    assert state.websockets.counts() == {"baseline": 0, "canary": 0}


async def test_fragmented_frames_pass_unchanged(ws_proxy):
    server, _ = await ws_proxy(weight=100)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ") and b"X-Canary-Arm: canary" in head
    assert await reader.readexactly(2 + len("arm:canary")) == b"\x81\x0aarm:canary"
    # "hello" as a text frame without FIN, then a ping in between, then the continuation
    writer.write(masked(0x01, b"hel") + masked(0x89, b"p") + masked(0x80, b"lo"))
    assert await reader.readexactly(3) == b"\x8a\x01p"  # the upstream's pong, in between
    assert await reader.readexactly(7) == b"\x81\x05hello"  # reassembled by the upstream
    writer.write(masked(0x88, (1000).to_bytes(2, "big")))
    assert await reader.readexactly(4) == b"\x88\x02\x03\xe8"
    assert await reader.read() == b""  # then the proxy closes the connection
    writer.close()


def masked(first: int, payload: bytes) -> bytes:
    key = os.urandom(4)
    return bytes((first, 0x80 | len(payload))) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def test_a_sticky_key_keeps_a_users_websocket_on_one_arm(ws_proxy):
    server, _ = await ws_proxy(weight=50)
    seen: dict[str, set[str]] = {}
    async with aiohttp.ClientSession() as client:
        for user in [f"user-{i}" for i in range(12)] * 3:
            async with client.ws_connect(server.make_url("/ws/echo"), headers={"X-User-Id": user}) as ws:
                seen.setdefault(user, set()).add(await hello(ws))
    assert all(len(arms) == 1 for arms in seen.values()), seen
    assert {arm for arms in seen.values() for arm in arms} == {"baseline", "canary"}


async def test_abnormal_upstream_closes_are_errors_of_their_arm_and_leaving_clients_are_not(ws_proxy):
    server, state = await ws_proxy(weight=100)
    async with aiohttp.ClientSession() as client:
        for path in ("/ws/fail", "/ws/drop"):
            async with client.ws_connect(server.make_url(path)) as ws:
                assert await hello(ws) == "canary"
                closing = await ws.receive(timeout=5)
                assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
            if path == "/ws/fail":
                assert ws.close_code == 1011  # passed through unchanged
        async with client.ws_connect(server.make_url("/ws/echo")) as ws:
            assert await hello(ws) == "canary"
        refused = await client.get(server.make_url("/ws/refuse"), headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()})
        assert refused.status == 403 and await refused.text() == "canary refuses"
    recorder = state.recorders["canary"]
    await until(lambda: recorder.stage_counts().requests == 4, what="four outcomes")
    assert recorder.stage_counts().errors == 2  # 1011 and the dropped connection
    assert state.websockets.counts()["canary"] == 0


async def test_a_slow_reader_pauses_the_other_side_instead_of_buffering(ws_proxy, ws_upstreams):
    server, state = await ws_proxy(weight=0)
    total = 1024  # messages of 64 KiB: 64 MiB, far more than all socket buffers together
    stats = ws_upstreams["baseline"].app[WS_STATS]
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(server.make_url(f"/ws/flood?n={total}"), max_msg_size=0) as ws:
            (relay,) = state.websockets.open["baseline"]
            await until(lambda: not relay.upstream_transport.is_reading(), what="upstream paused")
            await until(lambda: stats.flood_sent == stable(stats), what="upstream blocked")
            assert relay.client.get_write_buffer_size() < 1 << 20
            assert stats.flood_sent < total * FLOOD_CHUNK // 2
            received = 0
            async for message in ws:
                received += len(message.data)
            assert received == total * FLOOD_CHUNK  # nothing lost once the reader reads

        # and the other way: an upstream that does not read pauses the client
        async with client.ws_connect(server.make_url("/ws/sink")) as ws:
            (relay,) = state.websockets.open["baseline"]
            chunk = bytes(FLOOD_CHUNK)

            async def send_all() -> None:
                for _ in range(total):
                    await ws.send_bytes(chunk)

            sender = asyncio.create_task(send_all())
            await until(lambda: not relay.client.is_reading(), what="client paused")
            assert relay.upstream_transport.get_write_buffer_size() < 1 << 20
            assert not sender.done()
            ws_upstreams["baseline"].app[WS_STATS].reading.set()
            await sender
            await until(lambda: ws_upstreams["baseline"].app[WS_STATS].received == total * FLOOD_CHUNK,
                        what="all delivered")


_last: dict[int, int] = {}


def stable(stats: Any) -> int:
    """The upstream's sent count if it did not move since the previous poll, else -1."""
    previous = _last.get(id(stats))
    _last[id(stats)] = stats.flood_sent
    return stats.flood_sent if previous == stats.flood_sent else -1


@pytest.mark.parametrize("on_rollback", ["close", "keep"])
async def test_the_canary_losing_its_traffic_closes_its_websockets_with_1012(ws_proxy, on_rollback):
    server, state = await ws_proxy(weight=100, on_rollback=on_rollback)
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(server.make_url("/ws/echo"), headers={"X-Canary": "baseline"}) as base_ws,
    ):
        assert await hello(base_ws) == "baseline"
        async with client.ws_connect(server.make_url("/ws/echo")) as ws:
            assert await hello(ws) == "canary"
            assert state.websockets.counts() == {"baseline": 1, "canary": 1}
            state.router.set_weight(0)  # what a rollback does
            if on_rollback == "keep":
                await ws.send_str("still here")
                assert (await ws.receive(timeout=5)).data == "still here"
            else:
                closing = await ws.receive(timeout=5)
                assert closing.type == WSMsgType.CLOSE and closing.data == 1012
        if on_rollback == "close":
            assert ws.close_code == 1012
            async with client.ws_connect(server.make_url("/ws/echo")) as again:
                assert await hello(again) == "baseline"  # the reconnect lands on the baseline
        await base_ws.send_str("untouched")
        assert (await base_ws.receive(timeout=5)).data == "untouched"
    canary = state.recorders["canary"]
    await until(lambda: canary.inflight == 0, what="canary outcome recorded")
    assert canary.code_totals[-1] == 0  # a proxy-initiated close is no error of the canary
