"""aiohttp's `ClientSession` as an upstream client for HTTP/1.1 upstreams.

Behind the `proxy.upstream.base.Transport` interface like the other clients; aiohttp's
errors are translated into `config.errors.UpstreamError` here.

Two things aiohttp does not do for a proxy are added: a body delimited by the connection's
close that ends in a reset is reported as cut short (aiohttp ends it as if complete; its
connection protocol is swapped for one that remembers how the connection ended), and a
response head over `MAX_RESPONSE_HEAD_BYTES` is refused (aiohttp caps each line only).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterable, AsyncIterator

import aiohttp
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict
from yarl import URL

from config.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout
from config.settings import UpstreamSettings
from proxy.upstream.base import (
    MAX_RESPONSE_HEAD_BYTES,
    PoolGate,
    UpstreamResponse,
    delimited_by_close,
    describe,
    overloaded,
)

__all__ = ["AiohttpTransport"]

_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class _Protocol(ResponseHandler):
    """aiohttp's connection protocol, remembering an error that ended the connection."""

    broken: BaseException | None = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if exc is not None:
            self.broken = exc
        super().connection_lost(exc)


class _AiohttpResponse:
    __slots__ = ("_arm", "_gate", "_response", "_until_close", "headers", "reason", "status")

    def __init__(self, arm: str, response: aiohttp.ClientResponse, gate: PoolGate, *, head_only: bool) -> None:
        self._arm = arm
        self._response = response
        self._gate: PoolGate | None = gate
        self.status = response.status
        self.reason = response.reason or ""
        self.headers = response.headers
        # aiohttp keeps no public handle on the connection once the body ended
        protocol = getattr(response, "_protocol", None)
        self._until_close = protocol if not head_only and delimited_by_close(response.status, response.headers) else None

    async def iter_body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except TimeoutError:
            raise UpstreamTimeout(self._arm, f"{self._arm}: upstream timed out while sending the body") from None
        except aiohttp.ClientError as exc:
            raise UpstreamConnectError(self._arm, f"{self._arm}: upstream broke off the body: {describe(exc)}") from None
        self._raise_if_cut()

    def _raise_if_cut(self) -> None:
        """A body delimited by the close ended in a reset: it was cut short, not complete."""
        broken = getattr(self._until_close, "broken", None)
        if broken is not None:
            raise UpstreamConnectError(self._arm, f"{self._arm}: upstream broke off the body: {describe(broken)}")

    def complete_body(self) -> bytes | None:
        content = self._response.content
        if not content.is_eof() or content.exception() is not None:
            return None
        if getattr(self._until_close, "broken", None) is not None:
            return None  # iter_body reports it
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
        connector._factory = functools.partial(_Protocol, loop=asyncio.get_running_loop())  # see _Protocol
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
        if sum(len(name) + len(value) + 4 for name, value in response.raw_headers) > MAX_RESPONSE_HEAD_BYTES:
            response.close()
            self._gate.release()
            raise UpstreamConnectError(
                self._arm, f"{self._arm}: the upstream's response head is over {MAX_RESPONSE_HEAD_BYTES} bytes"
            )
        return _AiohttpResponse(self._arm, response, self._gate, head_only=method == "HEAD")

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
                if attempt >= self._retries.attempts or overloaded(self._arm, exc) is not None:
                    raise _translate(self._arm, exc) from None
                await asyncio.sleep(self._retries.backoff * 2**attempt)
                attempt += 1
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise _translate(self._arm, exc) from None

    async def close(self) -> None:
        await self._session.close()


def _translate(arm: str, exc: BaseException) -> UpstreamError:
    if (shortage := overloaded(arm, exc)) is not None:
        return shortage
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeout(arm, f"{arm}: upstream timed out ({exc.__class__.__name__})")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(arm, f"{arm}: cannot connect to upstream: {describe(exc)}")
    return UpstreamConnectError(arm, f"{arm}: upstream connection failed: {describe(exc)}")
