"""Tiny real upstream servers for the tests: an echo app that can be told how to answer."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

__all__ = [
    "GZIP_BODY",
    "STATS",
    "UpstreamStats",
    "break_off_uploads",
    "make_upstream_app",
    "raw_upstream",
    "tcp_upstream",
]


class UpstreamStats:
    """What the test can observe and steer on a running upstream."""

    def __init__(self) -> None:
        self.hits = 0
        self.inflight = 0
        self.release = asyncio.Event()
        self.received = 0  # request body bytes read by /upload so far
        self.fail_ratio = 0.0  # this share of requests answers 500, evenly spread
        self.hang = False  # every request waits for `release`
        self.delay = 0.0  # every request waits this many seconds before it is answered
        self._failed = 0

    def should_fail(self) -> bool:
        """Deterministic: after n requests, exactly floor(n * fail_ratio) have failed."""
        if self.fail_ratio and int(self.hits * self.fail_ratio) > self._failed:
            self._failed += 1
            return True
        return False


STATS = web.AppKey("stats", UpstreamStats)

GZIP_BODY = gzip.compress(b"hello compressed world " * 100)


def make_upstream_app(name: str) -> web.Application:
    """Answers as `name`; the path picks the behaviour (see the handlers)."""
    app = web.Application(client_max_size=1024**4)
    stats = app[STATS] = UpstreamStats()

    async def count(request: web.Request, handler):
        stats.hits += 1
        stats.inflight += 1
        try:
            if stats.hang:
                await stats.release.wait()
            if stats.delay:
                await asyncio.sleep(stats.delay)
            if stats.should_fail():
                return web.json_response({"error": {"message": f"{name} failed"}}, status=500)
            return await handler(request)
        finally:
            stats.inflight -= 1

    app.middlewares.append(web.middleware(count))

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "arm": name,
                "method": request.method,
                "path_qs": request.path_qs,
                "headers": {k: v for k, v in request.headers.items()},
                "body_len": len(body),
            },
            headers={"Connection": "keep-alive, X-Hop", "X-Hop": "secret-hop", "Keep-Alive": "timeout=5",
                     "Set-Cookie": "k=v"},
        )

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text=f"{name} says {request.match_info['code']}")

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(body=GZIP_BODY, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await stats.release.wait()  # the test releases the rest once it saw the first event
        for i in range(3):
            await response.write(f"data: {i}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async def sleep(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.Response(text=f"{name} slept")

    async def hang(request: web.Request) -> web.Response:
        await stats.release.wait()
        return web.Response(text=f"{name} released")

    async def upload(request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            stats.received += len(chunk)
        return web.json_response({"received": total})

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        block = b"x" * 65536
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            await response.write(piece)
            sent += len(piece)
        return response

    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b"partial")
        request.transport.close()
        return response

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"one,")
        await response.write(b"two")
        return response

    app.router.add_get("/chunked", chunked)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/sse", sse)
    app.router.add_get("/sleep/{seconds}", sleep)
    app.router.add_get("/hang", hang)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download/{size}", download)
    app.router.add_get("/broken", broken)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def break_off_uploads(port: int, stats: UpstreamStats, *, count: int = 3, settle=None) -> None:
    """Clients that start a 1 MB upload through the proxy on `port` and leave after 100 KB
    reached the upstream; `settle()` is awaited after each one."""
    from tests.polling import until

    for attempt in range(1, count + 1):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"p" * 100_000)
        await writer.drain()
        await until(lambda: stats.received >= attempt * 100_000, what="the upload reaching the upstream")
        writer.close()
        if settle is not None:
            await settle()


ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def tcp_upstream(handle: ConnectionHandler) -> AsyncIterator[str]:
    """A plain asyncio server on 127.0.0.1 running `handle` per connection; yields its base URL.

    It owns its connections: on exit it closes every one still open (an idle keep-alive
    connection the proxy pooled, a handler waiting for a next request), then waits for the
    server. Since Python 3.12.1 `Server.wait_closed()` waits until all connections are gone,
    and `Server.close_clients()` only exists from 3.13, so the tracking is done here."""
    open_writers: set[asyncio.StreamWriter] = set()
    closing = False

    async def owned(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if closing:  # accepted while the server was being closed
            writer.close()
            return
        open_writers.add(writer)
        try:
            await handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the peer (or our own exit) closed the connection
        finally:
            open_writers.discard(writer)
            writer.close()

    server = await asyncio.start_server(owned, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        closing = True
        server.close()
        for writer in list(open_writers):
            writer.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def raw_upstream(answer: bytes) -> AsyncIterator[str]:
    """An upstream that answers every request with exactly `answer` bytes (malformed HTTP,
    forbidden header characters...) and closes; yields its base URL."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()

    async with tcp_upstream(reply) as url:
        yield url
