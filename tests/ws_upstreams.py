"""A real WebSocket upstream for the tests: echo, abnormal closes, refusals, a flood."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

__all__ = ["WS_STATS", "WsStats", "make_ws_upstream_app"]

FLOOD_CHUNK = 64 * 1024


@dataclass
class WsStats:
    """What a test can observe on the upstream."""

    accepted: int = 0
    open: int = 0
    close_codes: list[int | None] = field(default_factory=list)  # as the upstream saw them
    flood_sent: int = 0
    received: int = 0  # bytes of messages received by /ws/sink
    reading: asyncio.Event = field(default_factory=asyncio.Event)  # /ws/sink reads once set


WS_STATS = web.AppKey("ws_stats", WsStats)


def make_ws_upstream_app(name: str) -> web.Application:
    app = web.Application()
    stats = app[WS_STATS] = WsStats()

    async def accept(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat.v1",))
        await ws.prepare(request)
        stats.accepted += 1
        return ws

    async def echo(request: web.Request) -> web.WebSocketResponse:
        """First says which arm it is, then echoes text and binary; pings are answered."""
        ws = await accept(request)
        stats.open += 1
        try:
            await ws.send_str(f"arm:{name}")
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    await ws.send_str(message.data)
                elif message.type == WSMsgType.BINARY:
                    await ws.send_bytes(message.data)
        finally:
            stats.open -= 1
            stats.close_codes.append(ws.close_code)
        return ws

    async def fail(request: web.Request) -> web.WebSocketResponse:
        """Accepts, says hello, then closes with 1011 (internal error)."""
        ws = await accept(request)
        await ws.send_str(f"arm:{name}")
        await ws.close(code=1011, message=b"boom")
        return ws

    async def drop(request: web.Request) -> web.WebSocketResponse:
        """Accepts, says hello, then drops the TCP connection without a close frame."""
        ws = await accept(request)
        await ws.send_str(f"arm:{name}")
        assert request.transport is not None
        request.transport.abort()
        return ws

    async def refuse(_request: web.Request) -> web.Response:
        return web.Response(status=403, text=f"{name} refuses")

    async def flood(request: web.Request) -> web.WebSocketResponse:
        """Sends `n` binary messages of 64 KiB as fast as the connection takes them."""
        ws = await accept(request)
        chunk = bytes(FLOOD_CHUNK)
        for _ in range(int(request.query["n"])):
            await ws.send_bytes(chunk)
            stats.flood_sent += FLOOD_CHUNK
        await ws.close()
        return ws

    async def sink(request: web.Request) -> web.WebSocketResponse:
        """A slow reader: reads nothing until the test sets `stats.reading`."""
        ws = await accept(request)
        await stats.reading.wait()
        async for message in ws:
            if message.type == WSMsgType.BINARY:
                stats.received += len(message.data)
        return ws

    app.router.add_get("/ws/echo", echo)
    app.router.add_get("/ws/fail", fail)
    app.router.add_get("/ws/drop", drop)
    app.router.add_get("/ws/refuse", refuse)
    app.router.add_get("/ws/flood", flood)
    app.router.add_get("/ws/sink", sink)
    async def plain(_request: web.Request) -> web.Response:
        return web.json_response({"arm": name})

    app.router.add_get("/echo", plain)
    return app
