"""Helpers for the hardening tests: configs with limits, hostile upstreams, raw clients."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from tests.admin_support import admin_get, upstream_url
from tests.serve_process import ServeProcess, write_config
from tests.upstreams import tcp_upstream

__all__ = [
    "arm_figures",
    "exchange",
    "hardened_config",
    "read_head",
    "resetting_upstream",
    "status_code",
]


def hardened_config(
    path: Path,
    upstreams: dict[str, TestServer],
    *,
    client: str = "lean",
    canary_url: str | None = None,
    limits: str = "",
    weight: int = 100,
    pool: int = 20,
) -> Path:
    """Both arms on `client`; `limits` is the body of a `limits:` flow mapping."""
    baseline = upstream_url(upstreams["baseline"])
    canary = canary_url or upstream_url(upstreams["canary"])
    arm = f"client: {client}, pool: {{max_connections: {pool}, max_keepalive: 10}}, retries: {{attempts: 0}}"
    return write_config(
        path,
        f"""listen: "127.0.0.1:0"
drain_timeout: 2s
admin: {{listen: "127.0.0.1:0", token: "test-token"}}
upstreams:
  baseline: {{url: "{baseline}", {arm}}}
  canary: {{url: "{canary}", {arm}}}
rollout: {{weight: {weight}}}
analysis: {{interval: 100ms}}
state: {{path: "var/state.json"}}
logging: {{level: info, format: json}}
limits: {{{limits}}}
""",
    )


async def arm_figures(proxy: ServeProcess, arm: str = "canary") -> dict[str, Any]:
    """An arm's figures from /status once nothing of it is in flight."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        figures = (await admin_get(proxy, "/status"))["arms"][arm]
        if figures["inflight"] == 0:
            return figures
        assert loop.time() < deadline, f"{arm} still has requests in flight: {figures}"
        await asyncio.sleep(0.02)


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)


def status_code(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


async def exchange(port: int, raw: bytes) -> bytes:
    """Send `raw` on a fresh connection and read until the proxy closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def resetting_upstream(release: asyncio.Event) -> AsyncIterator[str]:
    """Answers 200 with a body delimited by the close, sends part of it, and once
    `release` is set resets the connection (RST) instead of closing it."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial")
        await writer.drain()
        await release.wait()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with tcp_upstream(reply) as url:  # closes its connections, then waits for the server
        yield url


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()
