"""WebSockets through a real `canary serve` child: an upstream dropping connections gets
its canary rolled back; a rollback closes the canary's WebSockets with 1012 and the
reconnect lands on the baseline; the gauge and status count them; SIGTERM sends 1001
after drain_timeout."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from tests.admin_support import TOKEN, admin_get, admin_post, until_status, upstream_url
from tests.serve_process import ServeProcess, write_config
from tests.ws_upstreams import make_ws_upstream_app


@pytest.fixture
async def ws_upstreams(aiohttp_server) -> dict[str, Any]:
    return {arm: await aiohttp_server(make_ws_upstream_app(arm)) for arm in ("baseline", "canary")}


@pytest.fixture
async def serve(tmp_path: Path, ws_upstreams):
    started: list[ServeProcess] = []

    async def start(*, rollout: str, drain: str = "5s", on_rollback: str = "close", workers: int = 1) -> ServeProcess:
        config = write_config(
            tmp_path / "canary.yaml",
            f"""workers: {workers}
listen: "127.0.0.1:0"
drain_timeout: {drain}
admin: {{listen: "127.0.0.1:0", token: "{TOKEN}"}}
upstreams:
  baseline: {{url: "{upstream_url(ws_upstreams['baseline'])}"}}
  canary: {{url: "{upstream_url(ws_upstreams['canary'])}"}}
routing:
  websocket: {{on_rollback: {on_rollback}}}
rollout: {rollout}
analysis: {{interval: 100ms, min_requests: 5, compare_baseline: false}}
state: {{path: "var/state.json"}}
""",
        )
        process = await ServeProcess(config).start()
        started.append(process)
        return process

    yield start
    for process in started:
        await process.kill()


async def hello(ws: aiohttp.ClientWebSocketResponse) -> str:
    message = await ws.receive(timeout=5)
    assert message.type == WSMsgType.TEXT, message
    return message.data.removeprefix("arm:")


async def test_an_upstream_dropping_websockets_gets_its_canary_rolled_back(serve):
    proxy = await serve(rollout="{stages: [50, 100], bake: 1h}")
    async with aiohttp.ClientSession() as client:
        for attempt in range(200):
            async with client.ws_connect(f"{proxy.proxy_url}/ws/drop", headers={"X-Canary": "canary"}) as ws:
                first = await ws.receive(timeout=5)
                if (first.type, first.data) == (WSMsgType.CLOSE, 1012):
                    break  # the rollback came while this connection opened: it was closed for it
                assert (first.type, first.data) == (WSMsgType.TEXT, "arm:canary"), first
                await ws.receive(timeout=5)  # the connection breaks
            status = await admin_get(proxy, "/status")
            if status["state"] == "rolled_back":
                break
        status = await admin_get(proxy, "/status")
    assert status["state"] == "rolled_back" and status["weight"] == 0, status
    assert status["history"][-1]["trigger"] == "auto"
    assert attempt < 100
    assert any(e.get("event") == "websocket_upstream_failed" and e.get("arm") == "canary" for e in proxy.events)


async def test_a_rollback_closes_canary_websockets_with_1012_and_the_reconnect_lands_on_the_baseline(serve):
    proxy = await serve(rollout="{weight: 100}")
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(f"{proxy.proxy_url}/ws/echo") as ws:
            assert await hello(ws) == "canary"
            status = await until_status(proxy, lambda s: s["arms"]["canary"]["websockets_open"] == 1)
            assert status["arms"]["baseline"]["websockets_open"] == 0
            async with client.get(f"{proxy.admin_url}/metrics") as response:
                metrics = await response.text()
            assert 'canary_websockets_open{arm="canary"} 1.0' in metrics
            assert 'canary_websockets_open{arm="baseline"} 0.0' in metrics

            code, _ = await admin_post(proxy, "/rollback", {"reason": "test"})
            assert code == 200
            closing = await ws.receive(timeout=5)
            assert (closing.type, closing.data) == (WSMsgType.CLOSE, 1012)
        async with client.ws_connect(f"{proxy.proxy_url}/ws/echo") as again:
            assert await hello(again) == "baseline"
            await again.send_str("after the rollback")
            assert (await again.receive(timeout=5)).data == "after the rollback"
    await until_status(proxy, lambda s: s["arms"]["canary"]["websockets_open"] == 0)


async def test_sigterm_closes_open_websockets_with_1001_after_drain_timeout(serve):
    proxy = await serve(rollout="{weight: 50}", drain="1s")
    async with aiohttp.ClientSession() as client:
        sockets = [
            await client.ws_connect(f"{proxy.proxy_url}/ws/echo", headers={"X-Canary": arm})
            for arm in ("baseline", "canary")
        ]
        for ws, arm in zip(sockets, ("baseline", "canary")):
            assert await hello(ws) == arm
        mark = len(proxy.events)
        proxy.proc.send_signal(signal.SIGTERM)
        await proxy.wait_for_event("draining", after=mark)
        for ws in sockets:  # still relaying during the drain
            await ws.send_str("draining")
            assert (await ws.receive(timeout=5)).data == "draining"
        for ws in sockets:
            closing = await ws.receive(timeout=10)
            assert (closing.type, closing.data) == (WSMsgType.CLOSE, 1001)
            await ws.close()
    assert await proxy.stop(timeout=15) == 0


async def test_with_two_workers_websockets_relay_count_and_close_on_rollback(serve):
    proxy = await serve(rollout="{weight: 100}", workers=2)
    async with aiohttp.ClientSession() as client:
        sockets = [await client.ws_connect(f"{proxy.proxy_url}/ws/echo") for _ in range(4)]
        for ws in sockets:
            assert await hello(ws) == "canary"
            await ws.send_bytes(b"\x00\xff" * 1000)
            assert (await ws.receive(timeout=5)).data == b"\x00\xff" * 1000
        await until_status(proxy, lambda s: s["arms"]["canary"]["websockets_open"] == 4)  # summed over workers
        code, _ = await admin_post(proxy, "/rollback", {"reason": "test"})
        assert code == 200
        for ws in sockets:  # each worker closes its own
            closing = await ws.receive(timeout=5)
            assert (closing.type, closing.data) == (WSMsgType.CLOSE, 1012)
            await ws.close()
    await until_status(proxy, lambda s: s["arms"]["canary"]["websockets_open"] == 0)
