"""The one narrow interface through which the proxy talks to an upstream.

`Transport.send` takes a request and returns an `UpstreamResponse` whose body streams;
every failure comes out as a `config.errors.UpstreamError` subclass (translated in each
client, nowhere else). The clients (`session`, `lean`, `http2`) import this module; it
imports none of them.
"""

from __future__ import annotations

import asyncio
import errno
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from config.errors import PoolExhausted, ProxyOverloaded

__all__ = [
    "MAX_RESPONSE_HEAD_BYTES",
    "MAX_RESPONSE_HEADERS",
    "PoolGate",
    "Transport",
    "UpstreamResponse",
    "delimited_by_close",
    "describe",
    "overloaded",
    "shortage_reason",
]

# An upstream's response head beyond these is refused (502), whichever client reads it
# (nginx: proxy_buffer_size, 4-8 KiB; Envoy: 60 KiB and 100 headers).
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
MAX_RESPONSE_HEADERS = 128

_SHORTAGES = {errno.EMFILE: "descriptors", errno.ENFILE: "descriptors", errno.ENOMEM: "memory", errno.ENOBUFS: "memory"}


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


def shortage_reason(exc: BaseException | None) -> str | None:
    """"descriptors" or "memory" when `exc` (or what caused it) is the proxy running out
    of its own resources (EMFILE, ENFILE, ENOMEM, ENOBUFS), else None."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _SHORTAGES:
            return _SHORTAGES[exc.errno]
        os_error = getattr(exc, "os_error", None)  # aiohttp's ClientConnectorError
        if isinstance(os_error, OSError) and os_error.errno in _SHORTAGES:
            return _SHORTAGES[os_error.errno]
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def overloaded(arm: str, exc: BaseException) -> ProxyOverloaded | None:
    """The `ProxyOverloaded` to raise instead of `exc`, when that is a shortage of the proxy's."""
    reason = shortage_reason(exc)
    if reason is None:
        return None
    return ProxyOverloaded(arm, f"{arm}: the proxy is out of {reason} ({describe(exc)})", reason=reason)


def delimited_by_close(status: int, headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> bool:
    """Whether a response's body ends only when the upstream closes the connection
    (RFC 9112 §6.3): then a reset, not a close, means the body was cut short."""
    return (
        status >= 200 and status not in (204, 304)
        and "Content-Length" not in headers and "Transfer-Encoding" not in headers
    )
