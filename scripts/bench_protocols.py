"""WebSocket and TLS figures (`python scripts/benchmark.py --protocols`; docs/benchmark.md).

* idle WebSockets: N (default 1,000) concurrent idle WebSockets through a real
  `canary serve` (pinned to one core); the proxy's RSS growth per connection, measured
  once the N are open and again after a second batch of N (so allocator warm-up of the
  first batch is visible);
* echo: messages/s echoed through one WebSocket, direct to the upstream and through the
  proxy: one message at a time (round trips) and 100 in flight (pipelined);
* TLS: req/s through the proxy with `tls` set and without, with the same built-in load
  generator (keep-alive connections, so the handshake is paid once per connection).

The upstream is a small aiohttp app (`python scripts/bench_protocols.py upstream PORT`)
on the other core.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from bench_load import LoadResult
from bench_servers import Children, canary_command, free_port, rss_kib

__all__ = ["ProtocolFigures", "measure_protocols", "print_protocols"]

ECHO_MESSAGES = 20_000
WINDOW = 100


@dataclass
class ProtocolFigures:
    websockets: int
    rss_before_kib: int
    rss_open_kib: int
    rss_twice_kib: int
    kib_per_websocket: float
    kib_per_websocket_second_batch: float
    echo_direct_rtt: float  # messages/s, one at a time
    echo_proxy_rtt: float
    echo_direct_pipelined: float  # messages/s, WINDOW in flight
    echo_proxy_pipelined: float
    plain_rps: float
    tls_rps: float
    tls_ratio: float


def _config(directory: Path, name: str, *, port: int, upstream: int, tls: bool = False) -> Path:
    tls_block = f'tls: {{cert: "{directory}/cert.pem", key: "{directory}/key.pem"}}\n' if tls else ""
    url = f"http://127.0.0.1:{upstream}"
    path = directory / f"{name}.yaml"
    path.write_text(
        f"""listen: "127.0.0.1:{port}"
drain_timeout: 2s
admin: {{listen: "127.0.0.1:{free_port()}", token: "benchmark"}}
upstreams:
  baseline: {{url: "{url}", pool: {{max_connections: 256, max_keepalive: 256}}}}
  canary: {{url: "{url}", pool: {{max_connections: 256, max_keepalive: 256}}}}
rollout: {{weight: 50}}
limits: {{max_connections: 10000}}
state: {{path: "{directory}/{name}-state.json"}}
logging: {{level: warning, format: json}}
{tls_block}"""
    )
    return path


def _self_signed(directory: Path) -> None:
    import trustme

    cert = trustme.CA().issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(directory / "cert.pem")
    cert.private_key_pem.write_to_path(directory / "key.pem")


def measure_protocols(
    children: Children, directory: Path, *, proxy_core: int | None, upstream_core: int | None,
    load: Callable[[str, int, float], LoadResult], websockets: int, connections: int, seconds: float,
    http_upstream: int,
) -> ProtocolFigures:
    """`http_upstream`: the benchmark's fast fixed upstream, so TLS vs plain compares the proxy."""
    upstream_port = free_port()
    upstream = children.start("ws-upstream", [sys.executable, __file__, "upstream", str(upstream_port)], core=upstream_core)
    children.wait_listening(upstream, upstream_port)
    port = free_port()
    proxy = children.start("canary-ws", canary_command(_config(directory, "ws", port=port, upstream=upstream_port)), core=proxy_core)
    children.wait_listening(proxy, port)
    idle = asyncio.run(_idle(f"ws://127.0.0.1:{port}/ws", proxy.pid, websockets))
    echo = asyncio.run(_echo(f"ws://127.0.0.1:{upstream_port}/ws", f"ws://127.0.0.1:{port}/ws"))
    children.stop(proxy)
    children.stop(upstream)
    _self_signed(directory)
    port, tls_port = free_port(), free_port()
    for name, listen, tls in (("canary-plain", port, False), ("canary-tls", tls_port, True)):
        config = _config(directory, name, port=listen, upstream=http_upstream, tls=tls)
        children.wait_listening(children.start(name, canary_command(config), core=proxy_core), listen)
    plain_rps = tls_rps = 0.0
    for _ in range(2):  # interleaved, best of two
        plain_rps = max(plain_rps, load(f"http://127.0.0.1:{port}/", connections, seconds).rps)
        tls_rps = max(tls_rps, load(f"https://127.0.0.1:{tls_port}/", connections, seconds).rps)
    return ProtocolFigures(**idle, **echo, plain_rps=round(plain_rps), tls_rps=round(tls_rps),
                           tls_ratio=round(tls_rps / plain_rps, 3) if plain_rps else 0.0)


async def _idle(url: str, pid: int, count: int) -> dict[str, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one() -> aiohttp.ClientWebSocketResponse:
            ws = await session.ws_connect(url, autoping=False, heartbeat=None)
            await ws.send_str("hi")
            await ws.receive()
            return ws

        for ws in [await one() for _ in range(20)]:  # warm up the proxy's code paths
            await ws.close()
        await asyncio.sleep(1)
        before = rss_kib(pid)
        first = await _open(one, count)
        await asyncio.sleep(1)
        opened = rss_kib(pid)
        second = await _open(one, count)
        await asyncio.sleep(1)
        twice = rss_kib(pid)
        for ws in first + second:
            await ws.close()
    return {
        "websockets": count, "rss_before_kib": before, "rss_open_kib": opened, "rss_twice_kib": twice,
        "kib_per_websocket": round((opened - before) / count, 2),
        "kib_per_websocket_second_batch": round((twice - opened) / count, 2),
    }


async def _open(one: Callable[[], Any], count: int) -> list[aiohttp.ClientWebSocketResponse]:
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    for start in range(0, count, 100):
        sockets += await asyncio.gather(*(one() for _ in range(min(100, count - start))))
    return sockets


async def _echo(direct: str, proxied: str) -> dict[str, float]:
    figures: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:
        for name, url in (("direct", direct), ("proxy", proxied)):
            async with session.ws_connect(url) as ws:
                figures[f"echo_{name}_rtt"] = await _round_trips(ws)
                figures[f"echo_{name}_pipelined"] = await _pipelined(ws)
    return figures


async def _round_trips(ws: aiohttp.ClientWebSocketResponse) -> float:
    started = time.perf_counter()
    for i in range(ECHO_MESSAGES // 4):
        await ws.send_str("x" * 32)
        await ws.receive()
    return round(ECHO_MESSAGES // 4 / (time.perf_counter() - started))


async def _pipelined(ws: aiohttp.ClientWebSocketResponse) -> float:
    started = time.perf_counter()
    for _ in range(ECHO_MESSAGES // WINDOW):
        for _ in range(WINDOW):
            await ws.send_str("x" * 32)
        for _ in range(WINDOW):
            await ws.receive()
    return round(ECHO_MESSAGES / (time.perf_counter() - started))


def print_protocols(figures: ProtocolFigures) -> None:
    f = figures
    print(f"idle WebSockets through the proxy: {f.websockets:,} open: RSS {f.rss_before_kib:,} -> {f.rss_open_kib:,} KiB, "
          f"{f.kib_per_websocket} KiB each (second {f.websockets:,}: {f.kib_per_websocket_second_batch} KiB each)")
    print(f"echo through one WebSocket, messages/s: one at a time direct {f.echo_direct_rtt:,.0f} / proxy {f.echo_proxy_rtt:,.0f} "
          f"({f.echo_proxy_rtt / f.echo_direct_rtt:.2f}x); {WINDOW} in flight direct {f.echo_direct_pipelined:,.0f} / "
          f"proxy {f.echo_proxy_pipelined:,.0f} ({f.echo_proxy_pipelined / f.echo_direct_pipelined:.2f}x)")
    print(f"TLS: {f.tls_rps:,.0f} req/s with TLS vs {f.plain_rps:,.0f} without: ratio {f.tls_ratio}")
    print(json.dumps(asdict(f)))


def _upstream(port: int) -> None:
    from aiohttp import WSMsgType, web

    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="hello world!")

    app = web.Application()
    app.router.add_get("/ws", ws_echo)
    app.router.add_get("/", hello)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096)


if __name__ == "__main__":
    if sys.argv[1:2] == ["upstream"]:
        _upstream(int(sys.argv[2]))
    else:
        sys.exit(__doc__)
