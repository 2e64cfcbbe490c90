"""An `http2: true` upstream is reached over real HTTP/2 (hypercorn, h2c prior knowledge)."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket

import aiohttp
import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config

from tests.conftest import upstream_settings

GZ = gzip.compress(b"h2 body " * 500)


async def h2_app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/gzip":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-encoding", b"gzip"), (b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": GZ})
        return
    if scope["path"] == "/big-head":  # 100 KB of ordinary header lines
        headers = [(b"x-h%d" % i, b"b" * 1000) for i in range(100)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    if scope["path"] == "/sse":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(3):
            await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    payload = {"http_version": scope["http_version"], "path": scope["path"], "query": scope["query_string"].decode(),
               "body_len": len(body), "headers": {k.decode(): v.decode() for k, v in scope["headers"]}}
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


@pytest.fixture
async def h2_upstream():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    stop = asyncio.Event()
    task = asyncio.create_task(serve(h2_app, config, shutdown_trigger=stop.wait))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        except OSError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    stop.set()
    await task


async def test_http2_upstream_gets_http2_and_bodies_stream_through(proxy_factory, h2_upstream):
    canary = upstream_settings("canary", h2_upstream, http2=True)
    server, state = await proxy_factory(weight=100, canary=canary)
    async with aiohttp.ClientSession(auto_decompress=False, headers={"User-Agent": "test-agent/1"}) as client:
        async with client.post(server.make_url("/v1/chat/completions?x=1"), data=b"q" * 100_000) as resp:
            echo = await resp.json()
        async with client.get(server.make_url("/gzip")) as resp:
            raw = await resp.read()
            encoding = resp.headers["Content-Encoding"]
        async with client.get(server.make_url("/sse")) as resp:
            events = await resp.read()
    assert echo["http_version"] == "2"
    assert echo["path"] == "/v1/chat/completions" and echo["query"] == "x=1" and echo["body_len"] == 100_000
    assert echo["headers"]["user-agent"] == "test-agent/1"  # the client's, not httpx's
    assert encoding == "gzip" and raw == GZ
    assert events == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert state.recorder.arms["canary"].stage_counts().requests == 3


async def test_an_http2_response_head_over_the_cap_is_502_and_counts_against_the_arm(proxy_factory, h2_upstream):
    canary = upstream_settings("canary", h2_upstream, http2=True)
    server, state = await proxy_factory(weight=100, canary=canary)
    async with aiohttp.ClientSession() as client:
        async with client.get(server.make_url("/big-head")) as resp:
            body = await resp.json()
    assert resp.status == 502 and body["arm"] == "canary" and "X-H1" not in resp.headers
    counts = state.recorder.arms["canary"].stage_counts()
    assert (counts.requests, counts.errors) == (1, 1)
