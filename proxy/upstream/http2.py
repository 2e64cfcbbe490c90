"""HTTP/2 upstream client: `httpx.AsyncHTTPTransport` used directly.

Going through the transport rather than `AsyncClient` means no default headers, no
cookie jar, no redirects and no body decoding: the proxy forwards exactly what it got.
The total timeout is enforced as one deadline over the headers and the whole body.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterable, AsyncIterator

import httpx
from multidict import CIMultiDict

from config.errors import PoolExhausted, UpstreamConnectError, UpstreamError, UpstreamTimeout
from config.settings import UpstreamSettings
from proxy.upstream.base import MAX_RESPONSE_HEAD_BYTES, MAX_RESPONSE_HEADERS, UpstreamResponse, overloaded

__all__ = ["HttpxTransport"]

_CONNECT_FAILURES = (httpx.ConnectError, httpx.ConnectTimeout)


class _HttpxResponse:
    __slots__ = ("_arm", "_owner", "_response", "_deadline", "status", "reason", "headers")

    def __init__(self, owner: HttpxTransport, response: httpx.Response, deadline: float) -> None:
        self._owner: HttpxTransport | None = owner
        self._arm = owner.arm
        self._response = response
        self._deadline = deadline
        self.status = response.status_code
        self.reason = response.reason_phrase
        self.headers = CIMultiDict(response.headers.multi_items())

    async def iter_body(self) -> AsyncIterator[bytes]:
        stream = self._response.stream.__aiter__()
        while True:
            try:
                async with asyncio.timeout_at(self._deadline):
                    chunk = await stream.__anext__()
            except StopAsyncIteration:
                return
            except (TimeoutError, httpx.HTTPError) as exc:
                raise _translate(self._arm, exc) from None
            yield chunk

    def complete_body(self) -> None:
        return None  # httpx does not say; the body is always streamed

    async def aclose(self) -> None:
        if self._owner is not None:
            self._owner.in_use -= 1
            self._owner = None
            await self._response.aclose()


class HttpxTransport:
    def __init__(self, upstream: UpstreamSettings) -> None:
        self.arm = self._arm = upstream.name
        self.in_use = 0
        self._base = upstream.url
        self._retries = upstream.retries
        self._total = upstream.timeout.total
        connect = upstream.timeout.connect
        self._timeouts = {"connect": connect, "read": None, "write": None, "pool": connect}
        self._transport = httpx.AsyncHTTPTransport(
            http2=True,
            # https: HTTP/2 by ALPN with HTTP/1.1 fallback; http: h2c with prior knowledge.
            http1=upstream.url.startswith("https://"),
            limits=httpx.Limits(
                max_connections=upstream.pool.max_connections,
                max_keepalive_connections=upstream.pool.max_keepalive,
            ),
            retries=0,
            trust_env=False,
        )

    async def send(
        self, method: str, path_qs: str, headers: CIMultiDict[str], body: AsyncIterable[bytes] | None
    ) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._total
        request = httpx.Request(
            method,
            self._base + path_qs,
            headers=list(headers.items()),
            content=body,
            extensions={"timeout": self._timeouts},
        )
        self.in_use += 1  # from now on a reload must not close this client under us
        try:
            return await self._exchange(request, deadline)
        except BaseException:
            self.in_use -= 1
            raise

    async def _exchange(self, request: httpx.Request, deadline: float) -> UpstreamResponse:
        attempt = 0
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    response = await self._transport.handle_async_request(request)
                await self._check_head(response)
                return _HttpxResponse(self, response, deadline)
            except _CONNECT_FAILURES as exc:
                if attempt >= self._retries.attempts or overloaded(self._arm, exc) is not None:
                    raise _translate(self._arm, exc) from None
                await asyncio.sleep(self._retries.backoff * 2**attempt)
                attempt += 1
            except (TimeoutError, httpx.HTTPError) as exc:
                raise _translate(self._arm, exc) from None

    async def _check_head(self, response: httpx.Response) -> None:
        """The same response head cap as the HTTP/1.1 clients (h2's own limit is hpack's)."""
        raw = response.headers.raw
        if len(raw) > MAX_RESPONSE_HEADERS or sum(len(n) + len(v) + 4 for n, v in raw) > MAX_RESPONSE_HEAD_BYTES:
            await response.aclose()
            arm = self._arm
            raise UpstreamConnectError(
                arm, f"{arm}: the upstream's response head is over {MAX_RESPONSE_HEAD_BYTES} bytes or {MAX_RESPONSE_HEADERS} headers"
            )

    def busy(self) -> bool:
        return self.in_use > 0

    async def close(self) -> None:
        await self._transport.aclose()


def _translate(arm: str, exc: BaseException) -> UpstreamError:
    if (shortage := overloaded(arm, exc)) is not None:
        return shortage
    if isinstance(exc, httpx.PoolTimeout):
        return PoolExhausted(arm, f"{arm}: all connections busy")
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        return UpstreamTimeout(arm, f"{arm}: upstream timed out ({exc.__class__.__name__})")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamConnectError(arm, f"{arm}: cannot connect to upstream ({exc.__class__.__name__})")
    return UpstreamConnectError(arm, f"{arm}: upstream connection failed ({exc.__class__.__name__})")
