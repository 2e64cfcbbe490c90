"""The one narrow interface through which the proxy talks to an upstream.

`Transport.send` takes a request and returns an `UpstreamResponse` whose body streams;
every failure comes out as a `config.errors.UpstreamError` subclass (translated in the
transport, nowhere else). Two implementations: `AiohttpTransport` for HTTP/1.1
upstreams (the default: ~12x faster than httpx as a proxy's client) and
`proxy.upstream.http2.HttpxTransport` for `http2: true` upstreams.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import AsyncIterable, AsyncIterator, Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from config.errors import PoolExhausted, UpstreamConnectError, UpstreamError, UpstreamTimeout
from config.settings import UpstreamSettings

__all__ = [
    "HTTP1_CLIENTS", "AiohttpTransport", "PoolGate", "Transport", "UpstreamResponse", "describe", "make_transport",
]

_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class UpstreamResponse(Protocol):
    status: int
    reason: str
    headers: CIMultiDictProxy[str] | CIMultiDict[str]

    def iter_body(self) -> AsyncIterator[bytes]: ...

    def complete_body(self) -> bytes | None:
        """The whole body if all of it has arrived already (it is then consumed), else
        None: then `iter_body` streams it. Lets a small answer go out in one write."""
        ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    async def send(
        self, method: str, path_qs: str, headers: CIMultiDict[str], body: AsyncIterable[bytes] | None
    ) -> UpstreamResponse: ...

    def busy(self) -> bool:
        """Whether a request is still using this client (reload drains before closing)."""
        ...

    async def close(self) -> None: ...


class PoolGate:
    """Caps requests in flight at the pool size; waiting longer than `wait` is a 503.

    A counter with a FIFO of waiters rather than `asyncio.Semaphore`: taking a free slot
    is a plain decrement (no coroutine, no scan of the waiters), which the hot path
    does on every request. A released slot passes straight to the oldest waiter.
    """

    def __init__(self, arm: str, size: int, wait: float) -> None:
        self._arm = arm
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._wait = wait
        self.in_use = 0

    def try_acquire(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            self.in_use += 1
            return True
        return False

    async def acquire(self) -> None:
        if not self.try_acquire():
            await self._wait_for_slot()

    async def _wait_for_slot(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._wait):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._pass_on()  # a slot came just as we gave up: hand it to the next
            else:
                waiter.cancel()  # `_pass_on` skips it
            if isinstance(exc, TimeoutError):
                raise PoolExhausted(self._arm, f"{self._arm}: all connections busy for {self._wait:g}s") from None
            raise
        self.in_use += 1

    def release(self) -> None:
        self.in_use -= 1
        self._pass_on()

    def _pass_on(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class _AiohttpResponse:
    __slots__ = ("_arm", "_response", "_gate", "status", "reason", "headers")

    def __init__(self, arm: str, response: aiohttp.ClientResponse, gate: PoolGate) -> None:
        self._arm = arm
        self._response = response
        self._gate: PoolGate | None = gate
        self.status = response.status
        self.reason = response.reason or ""
        self.headers = response.headers

    async def iter_body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except asyncio.TimeoutError:
            raise UpstreamTimeout(self._arm, f"{self._arm}: upstream timed out while sending the body") from None
        except aiohttp.ClientError as exc:
            raise UpstreamConnectError(self._arm, f"{self._arm}: upstream broke off the body: {describe(exc)}") from None

    def complete_body(self) -> bytes | None:
        content = self._response.content
        if not content.is_eof() or content.exception() is not None:
            return None
        return content.read_nowait(-1)

    async def aclose(self) -> None:
        if self._gate is not None:
            self._response.release()
            self._gate.release()
            self._gate = None


class AiohttpTransport:
    """HTTP/1.1 upstream client: one `aiohttp.ClientSession` per upstream."""

    def __init__(self, upstream: UpstreamSettings) -> None:
        self._arm = upstream.name
        self._base = upstream.url
        self._retries = upstream.retries
        pool = upstream.pool
        self._gate = PoolGate(upstream.name, pool.max_connections, upstream.timeout.connect)
        connector = aiohttp.TCPConnector(
            limit=pool.max_connections, limit_per_host=0, keepalive_timeout=15.0, ttl_dns_cache=60
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # a proxy never keeps cookies
            auto_decompress=False,  # Content-Encoding passes through untouched
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(
                total=upstream.timeout.total, connect=None, sock_connect=upstream.timeout.connect
            ),
            trust_env=False,
        )

    async def send(
        self, method: str, path_qs: str, headers: CIMultiDict[str], body: AsyncIterable[bytes] | None
    ) -> UpstreamResponse:
        await self._gate.acquire()
        try:
            response = await self._request(method, URL(self._base + path_qs, encoded=True), headers, body)
        except BaseException:
            self._gate.release()
            raise
        return _AiohttpResponse(self._arm, response, self._gate)

    def busy(self) -> bool:
        return self._gate.in_use > 0

    async def _request(
        self, method: str, url: URL, headers: CIMultiDict[str], body: AsyncIterable[bytes] | None
    ) -> aiohttp.ClientResponse:
        attempt = 0
        while True:
            try:
                return await self._session.request(
                    method, url, headers=headers, data=body, allow_redirects=False, compress=None
                )
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Nothing was sent yet, so a retry cannot repeat a side effect.
                if attempt >= self._retries.attempts:
                    raise _translate(self._arm, exc) from None
                await asyncio.sleep(self._retries.backoff * 2**attempt)
                attempt += 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise _translate(self._arm, exc) from None

    async def close(self) -> None:
        await self._session.close()


def describe(exc: BaseException) -> str:
    """What went wrong, for the log, without the request: client errors' reprs carry the
    URL (query string) and every request header, Authorization and Cookie included."""
    name = exc.__class__.__name__
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{name}: {exc.status} {exc.message}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{name}: {exc.os_error.strerror or exc.os_error.__class__.__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{name}: {exc.strerror}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{name}: the upstream closed the connection"
    return name


def _translate(arm: str, exc: BaseException) -> UpstreamError:
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeout(arm, f"{arm}: upstream timed out ({exc.__class__.__name__})")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(arm, f"{arm}: cannot connect to upstream: {describe(exc)}")
    return UpstreamConnectError(arm, f"{arm}: upstream connection failed: {describe(exc)}")


HTTP1_CLIENTS = ("aiohttp", "lean")


def make_transport(upstream: UpstreamSettings, *, http1_client: str | None = None) -> Transport:
    """The client for one upstream. HTTP/1.1 upstreams use `aiohttp.ClientSession`, or the
    lean `proxy.upstream.lean` client when `http1_client` (default: the environment
    variable CANARY_HTTP1_CLIENT) is "lean"."""
    if upstream.http2:
        from proxy.upstream.http2 import HttpxTransport

        return HttpxTransport(upstream)
    choice = http1_client or os.environ.get("CANARY_HTTP1_CLIENT") or "aiohttp"
    if choice not in HTTP1_CLIENTS:
        raise ValueError(f"CANARY_HTTP1_CLIENT={choice!r}: use one of {', '.join(HTTP1_CLIENTS)}")
    if choice == "lean":
        from proxy.upstream.lean import Http1Transport

        return Http1Transport(upstream)
    return AiohttpTransport(upstream)
